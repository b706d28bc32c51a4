//! Masking rows as they stream: a [`RowPlan`] is made once per
//! RowDescription (which columns to mask, and how), then every DataRow of
//! that result goes through [`RowPlan::mask_row`]. A row none of whose
//! values changes is forwarded as it came; a changed row is rebuilt in one
//! reused buffer, copying the untouched columns as contiguous runs. Nothing
//! is kept per row, so memory does not grow with the result.
use bytes::{BufMut, BytesMut};

use crate::{
    masking::{MaskSet, Origin, Scanned},
    policy::Strategy,
};

#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    #[error("malformed {0} from the server")]
    Malformed(&'static str),
}

/// How a result's rows are masked, column by column.
#[derive(Debug, Default)]
pub struct RowPlan {
    columns: Vec<ColumnAction>,
    /// Whether any column is masked at all (else rows pass untouched).
    active: bool,
}

#[derive(Debug)]
enum ColumnAction {
    Keep,
    Whole(Strategy),
    Scan,
}

impl RowPlan {
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The plan for the rows a RowDescription ('T') body announces.
    pub fn new(masks: &MaskSet, description: &[u8]) -> Result<Self, MaskError> {
        let malformed = || MaskError::Malformed("RowDescription");
        let mut rest = description;
        let count = take_i16(&mut rest).ok_or_else(malformed)?;
        let mut columns = Vec::with_capacity(count.max(0) as usize);
        for _ in 0..count {
            let end = rest.iter().position(|b| *b == 0).ok_or_else(malformed)?;
            let name = &rest[..end];
            rest = &rest[end + 1..];
            let table = take_i32(&mut rest).ok_or_else(malformed)? as u32;
            let attnum = take_i16(&mut rest).ok_or_else(malformed)?;
            let type_oid = take_i32(&mut rest).ok_or_else(malformed)? as u32;
            let _typlen = take_i16(&mut rest).ok_or_else(malformed)?;
            let _typmod = take_i32(&mut rest).ok_or_else(malformed)?;
            let binary = take_i16(&mut rest).ok_or_else(malformed)? == 1;
            columns.push(column_action(
                masks,
                name,
                (table, attnum),
                type_oid,
                binary,
            ));
        }
        let active = columns.iter().any(|c| !matches!(c, ColumnAction::Keep));
        Ok(Self { columns, active })
    }

    /// Masks one DataRow ('D') frame. `None`: nothing changed, forward the
    /// frame as it is. `Some(cells)`: `out` holds the rebuilt frame.
    pub fn mask_row(
        &self,
        masks: &MaskSet,
        frame: &[u8],
        out: &mut BytesMut,
    ) -> Result<Option<u32>, MaskError> {
        if !self.active {
            return Ok(None);
        }
        let malformed = || MaskError::Malformed("DataRow");
        let mut pos = 7; // tag, length, column count
        let count = frame
            .get(5..7)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(malformed)?;
        if count as usize != self.columns.len() {
            return Err(malformed());
        }
        let mut masked = 0;
        let mut copied_to = 0; // frame[..copied_to] is already in `out`
        let start = out.len();
        for action in &self.columns {
            let len_at = pos;
            let len = frame
                .get(pos..pos + 4)
                .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(malformed)?;
            pos += 4;
            let value = if len < 0 {
                None
            } else {
                let end = pos.checked_add(len as usize).filter(|e| *e <= frame.len());
                let value = &frame[pos..end.ok_or_else(malformed)?];
                pos += len as usize;
                Some(value)
            };
            let Some(value) = value else { continue };
            let scanned = match action {
                ColumnAction::Keep => continue,
                ColumnAction::Whole(_) => None,
                ColumnAction::Scan => match masks.scan(value, false) {
                    Scanned::Untouched => continue,
                    found => Some(found),
                },
            };
            if masked == 0 {
                out.reserve(frame.len() + 64);
            }
            masked += 1;
            out.put_slice(&frame[copied_to..len_at]);
            match (action, scanned) {
                (ColumnAction::Whole(strategy), _) => put_masked(masks, *strategy, value, out),
                (_, Some(Scanned::Rewritten(text))) => {
                    out.put_i32(text.len() as i32);
                    out.put_slice(&text);
                }
                _ => out.put_i32(-1),
            }
            copied_to = pos;
        }
        if pos != frame.len() {
            out.truncate(start);
            return Err(malformed());
        }
        if masked == 0 {
            return Ok(None);
        }
        out.put_slice(&frame[copied_to..]);
        let len = (out.len() - start - 1) as i32;
        out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
        Ok(Some(masked))
    }
}

/// What to do with one column of a result.
fn column_action(
    masks: &MaskSet,
    name: &[u8],
    origin: Origin,
    type_oid: u32,
    binary: bool,
) -> ColumnAction {
    match masks.column_strategy(name, origin) {
        // A binary value cannot be rewritten without decoding its type.
        Some(_) if binary => ColumnAction::Whole(Strategy::Null),
        Some(strategy) => ColumnAction::Whole(strategy),
        None if !masks.scans() => ColumnAction::Keep,
        None if !binary || is_text_type(type_oid) => ColumnAction::Scan,
        None => ColumnAction::Keep,
    }
}

/// A whole value under `strategy`, as a DataRow column (length first).
fn put_masked(masks: &MaskSet, strategy: Strategy, value: &[u8], out: &mut BytesMut) {
    let at = out.len();
    out.put_i32(0);
    match masks.apply(strategy, value, out) {
        Some(()) => {
            let len = (out.len() - at - 4) as i32;
            out[at..at + 4].copy_from_slice(&len.to_be_bytes());
        }
        None => {
            out.truncate(at);
            out.put_i32(-1);
        }
    }
}

/// Types whose binary form is their text (so patterns can scan it):
/// text, varchar, bpchar, name, json, jsonb (a version byte first), xml.
fn is_text_type(oid: u32) -> bool {
    matches!(oid, 25 | 1043 | 1042 | 19 | 114 | 3802 | 142)
}

fn take_i16(rest: &mut &[u8]) -> Option<i16> {
    let (head, tail) = rest.split_first_chunk::<2>()?;
    *rest = tail;
    Some(i16::from_be_bytes(*head))
}

fn take_i32(rest: &mut &[u8]) -> Option<i32> {
    let (head, tail) = rest.split_first_chunk::<4>()?;
    *rest = tail;
    Some(i32::from_be_bytes(*head))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        masking::MaskKey,
        policy::{ColumnName, Mask, MaskSpec},
    };

    fn masks(specs: &[&str]) -> Vec<Mask> {
        specs
            .iter()
            .map(|s| toml::from_str::<MaskSpec>(s).unwrap().compile().unwrap())
            .collect()
    }

    fn set(specs: &[&str], resolved: &[(&str, Origin)]) -> MaskSet {
        let masks = masks(specs);
        let refs: Vec<&Mask> = masks.iter().collect();
        let resolved = resolved
            .iter()
            .map(|(name, origin)| (ColumnName::parse(name).unwrap(), vec![*origin]))
            .collect();
        MaskSet::compile(&refs, &resolved, Arc::new(MaskKey::new([7; 32]))).unwrap()
    }

    /// A RowDescription body: (name, table oid, attnum, type oid, binary).
    fn description(columns: &[(&str, u32, i16, u32, bool)]) -> Vec<u8> {
        let mut body = BytesMut::new();
        body.put_i16(columns.len() as i16);
        for (name, table, attnum, type_oid, binary) in columns {
            body.put_slice(name.as_bytes());
            body.put_u8(0);
            body.put_u32(*table);
            body.put_i16(*attnum);
            body.put_u32(*type_oid);
            body.put_i16(-1);
            body.put_i32(-1);
            body.put_i16(i16::from(*binary));
        }
        body.to_vec()
    }

    fn row(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut frame = BytesMut::new();
        frame.put_u8(b'D');
        frame.put_i32(0);
        frame.put_i16(values.len() as i16);
        for value in values {
            match value {
                Some(v) => {
                    frame.put_i32(v.len() as i32);
                    frame.put_slice(v);
                }
                None => frame.put_i32(-1),
            }
        }
        let len = (frame.len() - 1) as i32;
        frame[1..5].copy_from_slice(&len.to_be_bytes());
        frame.to_vec()
    }

    fn values(frame: &[u8]) -> Vec<Option<Vec<u8>>> {
        let mut rest = &frame[7..];
        let mut out = Vec::new();
        while !rest.is_empty() {
            let len = take_i32(&mut rest).unwrap();
            if len < 0 {
                out.push(None);
            } else {
                out.push(Some(rest[..len as usize].to_vec()));
                rest = &rest[len as usize..];
            }
        }
        let len = i32::from_be_bytes(frame[1..5].try_into().unwrap()) as usize;
        assert_eq!(len + 1, frame.len(), "length field");
        out
    }

    #[test]
    fn qualified_and_named_columns_are_masked_whole() {
        let set = set(
            &[
                r#"column = "customers.email""#,
                r#"column = "card"
strategy = "partial"
keep = 4"#,
            ],
            &[("customers.email", (16384, 2))],
        );
        let plan = RowPlan::new(
            &set,
            &description(&[
                ("id", 16384, 1, 23, false),
                ("contact", 16384, 2, 25, false),
                ("CARD", 0, 0, 25, false),
                ("note", 16384, 4, 25, false),
            ]),
        )
        .unwrap();
        let frame = row(&[
            Some(b"1"),
            Some(b"a@b.com"),
            Some(b"4111111111111111"),
            None,
        ]);
        let mut out = BytesMut::new();
        assert_eq!(plan.mask_row(&set, &frame, &mut out).unwrap(), Some(2));
        assert_eq!(
            values(&out),
            vec![
                Some(b"1".to_vec()),
                Some(b"****".to_vec()),
                Some(b"****1111".to_vec()),
                None
            ]
        );
    }

    #[test]
    fn untouched_rows_are_not_rebuilt() {
        let set = set(&[r#"pattern = "email""#], &[]);
        let plan = RowPlan::new(&set, &description(&[("note", 0, 0, 25, false)])).unwrap();
        let mut out = BytesMut::new();
        let frame = row(&[Some(b"nothing to see")]);
        assert_eq!(plan.mask_row(&set, &frame, &mut out).unwrap(), None);
        assert!(out.is_empty());
        let frame = row(&[Some(b"mail bob@example.org now")]);
        assert_eq!(plan.mask_row(&set, &frame, &mut out).unwrap(), Some(1));
        assert_eq!(values(&out), vec![Some(b"mail **** now".to_vec())]);
    }

    #[test]
    fn patterns_check_what_they_find() {
        let set = set(
            &[
                r#"pattern = "card_number"
strategy = "partial""#,
                r#"pattern = "iban""#,
                r#"pattern = "jwt""#,
                r#"pattern = "api_key""#,
                r#"regex = "ORD-[0-9]+""#,
            ],
            &[],
        );
        let cases: [(&[u8], &[u8]); 7] = [
            (b"card 4111 1111 1111 1111 ok", b"card ****1111 ok"),
            (
                b"not a card 4111111111111112",
                b"not a card 4111111111111112",
            ),
            (b"GB82WEST12345698765432", b"****"),
            (b"GB00WEST12345698765432", b"GB00WEST12345698765432"),
            (
                b"tok eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln",
                b"tok ****",
            ),
            (b"key AKIAIOSFODNN7EXAMPLE", b"key ****"),
            (b"order ORD-991 shipped", b"order **** shipped"),
        ];
        for (input, expected) in cases {
            let result = match set.scan(input, false) {
                Scanned::Untouched => input.to_vec(),
                Scanned::Rewritten(text) => text,
                Scanned::Null => panic!("no null strategy here"),
            };
            assert_eq!(
                String::from_utf8_lossy(&result),
                String::from_utf8_lossy(expected)
            );
        }
    }

    #[test]
    fn binary_masked_columns_become_null_and_hash_is_stable() {
        let set = set(
            &[r#"column = "email"
strategy = "hash""#],
            &[],
        );
        let binary = RowPlan::new(&set, &description(&[("email", 0, 0, 25, true)])).unwrap();
        let mut out = BytesMut::new();
        binary
            .mask_row(&set, &row(&[Some(b"a@b.com")]), &mut out)
            .unwrap();
        assert_eq!(values(&out), vec![None]);

        let text = RowPlan::new(&set, &description(&[("email", 0, 0, 25, false)])).unwrap();
        let hashed = |v: &[u8]| {
            let mut out = BytesMut::new();
            text.mask_row(&set, &row(&[Some(v)]), &mut out).unwrap();
            values(&out).remove(0).unwrap()
        };
        assert_eq!(hashed(b"a@b.com"), hashed(b"a@b.com"));
        assert_ne!(hashed(b"a@b.com"), hashed(b"c@d.com"));
        assert_eq!(hashed(b"a@b.com").len(), 32);
    }

    #[test]
    fn malformed_rows_are_errors() {
        let set = set(&[r#"column = "a""#], &[]);
        let plan = RowPlan::new(&set, &description(&[("a", 0, 0, 25, false)])).unwrap();
        let mut out = BytesMut::new();
        let mut frame = row(&[Some(b"xyz")]);
        frame.truncate(frame.len() - 1);
        assert!(plan.mask_row(&set, &frame, &mut out).is_err());
        let two = row(&[Some(b"x"), Some(b"y")]);
        assert!(plan.mask_row(&set, &two, &mut out).is_err());
        assert!(RowPlan::new(&set, &[0, 1, b'a']).is_err());
    }
}
