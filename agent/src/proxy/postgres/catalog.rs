//! Where table-qualified mask columns live: RowDescription names a column by
//! its table's OID and its number, so `customers.email` is looked up once
//! per session in `pg_catalog`, on the session's own upstream connection
//! before the client's first message (no second login, and the lookup sees
//! the database the client chose).
use std::collections::HashMap;

use tokio::io::{AsyncRead, AsyncWrite};

use super::{mask::Origin, upstream::LoginError};
use crate::policy::ColumnName;

/// Looks every column up; each one gets an entry, empty when no table has
/// it (so a later reload can tell "looked up" from "never asked").
pub async fn resolve<S: AsyncRead + AsyncWrite + Unpin>(
    upstream: &mut S,
    columns: &[&ColumnName],
) -> Result<HashMap<ColumnName, Vec<Origin>>, LoginError> {
    let mut resolved: HashMap<ColumnName, Vec<Origin>> =
        columns.iter().map(|c| ((*c).clone(), Vec::new())).collect();
    if columns.is_empty() {
        return Ok(resolved);
    }
    let literal = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let pairs: Vec<String> = columns
        .iter()
        .filter_map(|c| {
            let table = c.table.as_deref()?;
            Some(format!("({}, {})", literal(table), literal(&c.column)))
        })
        .collect();
    let sql = format!(
        "SELECT lower(n.nspname), lower(c.relname), lower(a.attname), c.oid, a.attnum \
         FROM pg_catalog.pg_attribute a \
         JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE a.attnum > 0 AND NOT a.attisdropped \
         AND (lower(c.relname), lower(a.attname)) IN ({})",
        pairs.join(", ")
    );
    super::upstream::simple_query(upstream, &sql, |row| {
        let values = text_values(row).ok_or(LoginError::Unexpected('D'))?;
        let [
            Some(schema),
            Some(table),
            Some(column),
            Some(oid),
            Some(attnum),
        ] = values[..]
        else {
            return Err(LoginError::Unexpected('D'));
        };
        let origin: Origin = (
            oid.parse().map_err(|_| LoginError::Unexpected('D'))?,
            attnum.parse().map_err(|_| LoginError::Unexpected('D'))?,
        );
        for (name, origins) in resolved.iter_mut() {
            if name.table.as_deref() == Some(table)
                && name.column == column
                && name.schema.as_deref().is_none_or(|s| s == schema)
            {
                origins.push(origin);
            }
        }
        Ok(())
    })
    .await?;
    Ok(resolved)
}

/// The text values of a DataRow body (`None` for NULL); `None` if malformed.
pub fn text_values(body: &[u8]) -> Option<Vec<Option<&str>>> {
    let (count, mut rest) = body.split_first_chunk::<2>()?;
    let mut values = Vec::new();
    for _ in 0..i16::from_be_bytes(*count) {
        let (len, tail) = rest.split_first_chunk::<4>()?;
        let len = i32::from_be_bytes(*len);
        if len < 0 {
            values.push(None);
            rest = tail;
            continue;
        }
        let (value, tail) = tail.split_at_checked(len as usize)?;
        values.push(Some(std::str::from_utf8(value).ok()?));
        rest = tail;
    }
    Some(values)
}
