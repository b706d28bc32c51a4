//! Where table-qualified mask columns live: RowDescription names a column by
//! its table's OID and its number, so `customers.email` is looked up once
//! per session in `pg_catalog`, on the session's own upstream connection
//! before the client's first message (no second login, and the lookup sees
//! the database the client chose).
use std::collections::HashMap;

use tokio::io::{AsyncRead, AsyncWrite};

use super::upstream::LoginError;
use crate::masking::Origin;
use crate::policy::ColumnName;

/// Where a session's masked table columns are.
#[derive(Default)]
pub struct Resolved {
    /// Each masked column's origins; an empty entry when no table has it
    /// (so a later reload can tell "looked up" from "never asked").
    pub columns: HashMap<ColumnName, Vec<Origin>>,
    /// Views (and materialized views) whose definition reads a masked
    /// column, directly or through another view: `schema.view` and the
    /// column. The server reports their columns as the view's own, so a
    /// column mask cannot follow the value through them.
    pub views: Vec<(String, String)>,
}

/// Looks every column up, then the views that read them.
pub async fn resolve<S: AsyncRead + AsyncWrite + Unpin>(
    upstream: &mut S,
    columns: &[&ColumnName],
) -> Result<Resolved, LoginError> {
    let columns = resolve_columns(upstream, columns).await?;
    let views = reading_views(upstream, &columns).await?;
    Ok(Resolved { columns, views })
}

async fn reading_views<S: AsyncRead + AsyncWrite + Unpin>(
    upstream: &mut S,
    columns: &HashMap<ColumnName, Vec<Origin>>,
) -> Result<Vec<(String, String)>, LoginError> {
    let literal = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let seeds: Vec<String> = columns
        .iter()
        .flat_map(|(name, origins)| {
            origins.iter().map(move |(oid, attnum)| {
                format!(
                    "({oid}::pg_catalog.oid, {attnum}::pg_catalog.int2, {})",
                    literal(&name.to_string())
                )
            })
        })
        .collect();
    if seeds.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "WITH RECURSIVE reads(relid, attnum, masked) AS (VALUES {}
         UNION
         SELECT r.ev_class, 0::pg_catalog.int2, reads.masked
         FROM pg_catalog.pg_depend d
         JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
         JOIN reads ON d.refobjid = reads.relid
              AND (reads.attnum = 0 OR d.refobjsubid = reads.attnum)
         WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
           AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
           AND r.ev_class <> d.refobjid)
         SELECT DISTINCT n.nspname, c.relname, reads.masked FROM reads
         JOIN pg_catalog.pg_class c ON c.oid = reads.relid
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE reads.attnum = 0",
        seeds.join(", ")
    );
    let mut views = Vec::new();
    super::upstream::simple_query(upstream, &sql, |row| {
        let values = text_values(row).ok_or(LoginError::Unexpected('D'))?;
        if let [Some(schema), Some(view), Some(masked)] = values[..] {
            views.push((format!("{schema}.{view}"), masked.to_owned()));
        }
        Ok(())
    })
    .await?;
    Ok(views)
}

/// Looks every column up; each one gets an entry, empty when no table has
/// it.
async fn resolve_columns<S: AsyncRead + AsyncWrite + Unpin>(
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
