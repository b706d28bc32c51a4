//! Masking rows as they stream: a [`RowPlan`] is made once per
//! RowDescription (which columns to mask, and how), then every DataRow of
//! that result goes through [`MaskSet::mask_row`]. A row none of whose
//! values changes is forwarded as it came; a changed row is rebuilt in one
//! reused buffer, copying the untouched columns as contiguous runs. Nothing
//! is kept per row, so memory does not grow with the result.
use std::{collections::HashMap, sync::Arc};

use bytes::{BufMut, BytesMut};
use hmac::{Hmac, Mac};
use regex::bytes::Regex;
use sha2::Sha256;

use crate::policy::{BuiltinPattern, ColumnName, Mask, MaskSelects, Strategy};

#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    #[error("malformed {0} from the server")]
    Malformed(&'static str),
}

/// Secret key of the `hash` strategy.
pub struct MaskKey([u8; 32]);

impl MaskKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Reads the key at `path`, creating a random one (0600) the first
    /// time. Hosts that must hash alike (to join masked values across them)
    /// share one file.
    pub fn load_or_create(path: &std::path::Path) -> std::io::Result<Self> {
        crate::keyfile::load_or_create(path).map(Self)
    }
}

impl std::fmt::Debug for MaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MaskKey(****)")
    }
}

/// Where a column of a result comes from, as RowDescription says: the
/// table's OID and the column's number (zero for computed columns).
pub type Origin = (u32, i16);

/// The masks of one session, ready to apply.
pub struct MaskSet {
    /// Masks matching a result column by its name.
    by_name: Vec<(String, Strategy)>,
    /// Table-qualified column masks, resolved through the catalog.
    by_origin: HashMap<Origin, Strategy>,
    /// Masks looking at every value.
    scanners: Vec<Scanner>,
    key: Arc<MaskKey>,
    /// Views reading a masked column (`schema.view`, the column): a
    /// statement naming one is refused, since its columns are the view's.
    pub views: Vec<(String, String)>,
}

/// A check a match must also pass (Luhn, IBAN mod 97).
type Check = fn(&[u8]) -> bool;

struct Scanner {
    regex: Regex,
    check: Option<Check>,
    strategy: Strategy,
}

/// Table-qualified mask columns the session could not resolve: the policy
/// changed after it looked them up.
#[derive(Debug)]
pub struct Unresolved(pub Vec<String>);

impl MaskSet {
    /// Compiles a session's masks. `resolved` maps each table-qualified
    /// column that was looked up to where it lives (empty if nowhere).
    pub fn compile(
        masks: &[&Mask],
        resolved: &HashMap<ColumnName, Vec<Origin>>,
        key: Arc<MaskKey>,
    ) -> Result<Self, Unresolved> {
        let mut set = Self {
            by_name: Vec::new(),
            by_origin: HashMap::new(),
            scanners: Vec::new(),
            key,
            views: Vec::new(),
        };
        let mut unresolved = Vec::new();
        for mask in masks {
            match &mask.selects {
                MaskSelects::Column(name) if name.is_qualified() => match resolved.get(name) {
                    Some(origins) => {
                        for origin in origins {
                            let slot = set.by_origin.entry(*origin).or_insert(mask.strategy);
                            *slot = strictest(*slot, mask.strategy);
                        }
                    }
                    None => unresolved.push(name.to_string()),
                },
                MaskSelects::Column(name) => set.by_name.push((name.column.clone(), mask.strategy)),
                MaskSelects::Pattern(pattern) => {
                    set.scanners.push(builtin(*pattern, mask.strategy))
                }
                MaskSelects::Regex(regex) => set.scanners.push(Scanner {
                    regex: (**regex).clone(),
                    check: None,
                    strategy: mask.strategy,
                }),
            }
        }
        if unresolved.is_empty() {
            Ok(set)
        } else {
            Err(Unresolved(unresolved))
        }
    }

    /// The plan for the rows a RowDescription ('T') body announces.
    pub fn plan(&self, description: &[u8]) -> Result<RowPlan, MaskError> {
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
            columns.push(self.column_action(name, (table, attnum), type_oid, binary));
        }
        let active = columns.iter().any(|c| !matches!(c, ColumnAction::Keep));
        Ok(RowPlan { columns, active })
    }

    fn column_action(
        &self,
        name: &[u8],
        origin: Origin,
        type_oid: u32,
        binary: bool,
    ) -> ColumnAction {
        let by_origin = (origin.0 != 0)
            .then(|| self.by_origin.get(&origin))
            .flatten();
        let by_name = self
            .by_name
            .iter()
            .filter(|(column, _)| column.as_bytes().eq_ignore_ascii_case(name))
            .map(|(_, strategy)| *strategy);
        match by_origin
            .copied()
            .into_iter()
            .chain(by_name)
            .reduce(strictest)
        {
            // A binary value cannot be rewritten without decoding its type.
            Some(_) if binary => ColumnAction::Whole(Strategy::Null),
            Some(strategy) => ColumnAction::Whole(strategy),
            None if self.scanners.is_empty() => ColumnAction::Keep,
            None if !binary || is_text_type(type_oid) => ColumnAction::Scan,
            None => ColumnAction::Keep,
        }
    }

    /// Masks one DataRow ('D') frame. `None`: nothing changed, forward the
    /// frame as it is. `Some(cells)`: `out` holds the rebuilt frame.
    pub fn mask_row(
        &self,
        plan: &RowPlan,
        frame: &[u8],
        out: &mut BytesMut,
    ) -> Result<Option<u32>, MaskError> {
        if !plan.active {
            return Ok(None);
        }
        let malformed = || MaskError::Malformed("DataRow");
        let mut pos = 7; // tag, length, column count
        let count = frame
            .get(5..7)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(malformed)?;
        if count as usize != plan.columns.len() {
            return Err(malformed());
        }
        let mut masked = 0;
        let mut copied_to = 0; // frame[..copied_to] is already in `out`
        let start = out.len();
        for action in &plan.columns {
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
                ColumnAction::Scan => match self.scan(value, false) {
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
                (ColumnAction::Whole(strategy), _) => self.put_masked(*strategy, value, out),
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

    /// A whole value under `strategy`, as a DataRow column (length first).
    fn put_masked(&self, strategy: Strategy, value: &[u8], out: &mut BytesMut) {
        let at = out.len();
        out.put_i32(0);
        match self.apply(strategy, value, out) {
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

    /// A value under `strategy`, appended to `out`; `None` for NULL (then
    /// nothing is appended).
    fn apply(&self, strategy: Strategy, value: &[u8], out: &mut impl BufMut) -> Option<()> {
        match strategy {
            Strategy::Redact => out.put_slice(REDACTED),
            Strategy::Partial { keep } => {
                out.put_slice(REDACTED);
                out.put_slice(last_chars(value, keep));
            }
            Strategy::Hash => {
                let mut mac = Hmac::<Sha256>::new_from_slice(&self.key.0).expect("any key length");
                mac.update(value);
                let digest = mac.finalize().into_bytes();
                for byte in &digest[..16] {
                    out.put_u8(HEX[usize::from(byte >> 4)]);
                    out.put_u8(HEX[usize::from(byte & 15)]);
                }
            }
            Strategy::Null => return None,
        }
        Some(())
    }

    /// Masks what the value patterns find in free text (SSH output); `None`
    /// when nothing is found. Text has no NULL: a `null` mask redacts.
    pub fn scan_text(&self, text: &[u8]) -> Option<Vec<u8>> {
        match self.scan(text, true) {
            Scanned::Rewritten(text) => Some(text),
            Scanned::Untouched | Scanned::Null => None,
        }
    }

    /// Runs every scanner over a value, masking what they find (a new
    /// value is only made when something is found). In `free_text`, a
    /// `null` strategy redacts the match instead of the whole value.
    fn scan(&self, value: &[u8], free_text: bool) -> Scanned {
        let mut current: Option<Vec<u8>> = None;
        for scanner in &self.scanners {
            let text = current.as_deref().unwrap_or(value);
            let mut last = 0;
            let mut rewritten: Option<Vec<u8>> = None;
            for found in scanner.regex.find_iter(text) {
                if scanner.check.is_some_and(|check| !check(found.as_bytes())) {
                    continue;
                }
                let out = rewritten.get_or_insert_with(|| Vec::with_capacity(text.len()));
                out.extend_from_slice(&text[last..found.start()]);
                let strategy = match scanner.strategy {
                    Strategy::Null if free_text => Strategy::Redact,
                    strategy => strategy,
                };
                if self.apply(strategy, found.as_bytes(), out).is_none() {
                    return Scanned::Null;
                }
                last = found.end();
            }
            if let Some(mut out) = rewritten {
                out.extend_from_slice(&text[last..]);
                current = Some(out);
            }
        }
        match current {
            Some(text) => Scanned::Rewritten(text),
            None => Scanned::Untouched,
        }
    }
}

enum Scanned {
    Untouched,
    Rewritten(Vec<u8>),
    Null,
}

const REDACTED: &[u8] = b"****";
const HEX: &[u8; 16] = b"0123456789abcdef";

/// How a result's rows are masked, column by column.
#[derive(Debug, Default)]
pub struct RowPlan {
    columns: Vec<ColumnAction>,
    /// Whether any column is masked at all (else rows pass untouched).
    active: bool,
}

impl RowPlan {
    pub fn is_active(&self) -> bool {
        self.active
    }
}

#[derive(Debug)]
enum ColumnAction {
    Keep,
    Whole(Strategy),
    Scan,
}

/// When two masks name the same column, the one revealing least wins.
fn strictest(a: Strategy, b: Strategy) -> Strategy {
    let rank = |s: Strategy| match s {
        Strategy::Null => 3,
        Strategy::Redact => 2,
        Strategy::Hash => 1,
        Strategy::Partial { .. } => 0,
    };
    match (a, b) {
        (Strategy::Partial { keep: x }, Strategy::Partial { keep: y }) => {
            Strategy::Partial { keep: x.min(y) }
        }
        _ if rank(b) > rank(a) => b,
        _ => a,
    }
}

/// Types whose binary form is their text (so patterns can scan it):
/// text, varchar, bpchar, name, json, jsonb (a version byte first), xml.
fn is_text_type(oid: u32) -> bool {
    matches!(oid, 25 | 1043 | 1042 | 19 | 114 | 3802 | 142)
}

/// The last `keep` characters (bytes, if the value is not UTF-8); nothing
/// if that would be the whole value.
fn last_chars(value: &[u8], keep: usize) -> &[u8] {
    let start = match std::str::from_utf8(value) {
        Ok(text) => text
            .char_indices()
            .rev()
            .nth(keep.saturating_sub(1))
            .map(|(i, _)| i),
        Err(_) => value.len().checked_sub(keep),
    };
    match start {
        Some(start) if keep > 0 && start > 0 => &value[start..],
        _ => b"",
    }
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

fn builtin(pattern: BuiltinPattern, strategy: Strategy) -> Scanner {
    let (source, check): (&str, Option<Check>) = match pattern {
        BuiltinPattern::Email => (
            r"(?i-u)[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}",
            None,
        ),
        BuiltinPattern::CardNumber => (r"(?-u)\b[0-9](?:[ -]?[0-9]){12,18}\b", Some(luhn)),
        BuiltinPattern::Iban => (
            r"(?-u)\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}\b",
            Some(iban),
        ),
        BuiltinPattern::Jwt => (
            r"(?-u)\beyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*",
            None,
        ),
        BuiltinPattern::ApiKey => (
            concat!(
                r"(?-u)\b(?:AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,}",
                r"|github_pat_[A-Za-z0-9_]{22,}|glpat-[A-Za-z0-9_-]{20,}",
                r"|xox[abposr]-[A-Za-z0-9-]{10,}|[sr]k_live_[A-Za-z0-9]{24,}",
                r"|AIza[0-9A-Za-z_-]{35})"
            ),
            None,
        ),
    };
    Scanner {
        regex: Regex::new(source).expect("built-in patterns compile"),
        check,
        strategy,
    }
}

/// The Luhn checksum of the digits in `text` (separators skipped).
fn luhn(text: &[u8]) -> bool {
    let mut sum = 0;
    let digits = text.iter().rev().filter(|b| b.is_ascii_digit());
    for (i, digit) in digits.enumerate() {
        let mut d = u32::from(digit - b'0');
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    sum % 10 == 0
}

/// ISO 13616: move the first four characters to the end, letters to
/// numbers (A = 10), and the number mod 97 must be 1.
fn iban(text: &[u8]) -> bool {
    let compact: Vec<u8> = text.iter().copied().filter(|b| *b != b' ').collect();
    let (head, tail) = compact.split_at(4);
    let mut remainder = 0u32;
    for &b in tail.iter().chain(head) {
        let value = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return false,
        };
        remainder = if value >= 10 {
            (remainder * 100 + value) % 97
        } else {
            (remainder * 10 + value) % 97
        };
    }
    remainder == 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::MaskSpec;

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
        MaskSet::compile(&refs, &resolved, Arc::new(MaskKey([7; 32]))).unwrap()
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
        let plan = set
            .plan(&description(&[
                ("id", 16384, 1, 23, false),
                ("contact", 16384, 2, 25, false),
                ("CARD", 0, 0, 25, false),
                ("note", 16384, 4, 25, false),
            ]))
            .unwrap();
        let frame = row(&[
            Some(b"1"),
            Some(b"a@b.com"),
            Some(b"4111111111111111"),
            None,
        ]);
        let mut out = BytesMut::new();
        assert_eq!(set.mask_row(&plan, &frame, &mut out).unwrap(), Some(2));
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
        let plan = set
            .plan(&description(&[("note", 0, 0, 25, false)]))
            .unwrap();
        let mut out = BytesMut::new();
        let frame = row(&[Some(b"nothing to see")]);
        assert_eq!(set.mask_row(&plan, &frame, &mut out).unwrap(), None);
        assert!(out.is_empty());
        let frame = row(&[Some(b"mail bob@example.org now")]);
        assert_eq!(set.mask_row(&plan, &frame, &mut out).unwrap(), Some(1));
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
        let binary = set
            .plan(&description(&[("email", 0, 0, 25, true)]))
            .unwrap();
        let mut out = BytesMut::new();
        set.mask_row(&binary, &row(&[Some(b"a@b.com")]), &mut out)
            .unwrap();
        assert_eq!(values(&out), vec![None]);

        let text = set
            .plan(&description(&[("email", 0, 0, 25, false)]))
            .unwrap();
        let hashed = |v: &[u8]| {
            let mut out = BytesMut::new();
            set.mask_row(&text, &row(&[Some(v)]), &mut out).unwrap();
            values(&out).remove(0).unwrap()
        };
        assert_eq!(hashed(b"a@b.com"), hashed(b"a@b.com"));
        assert_ne!(hashed(b"a@b.com"), hashed(b"c@d.com"));
        assert_eq!(hashed(b"a@b.com").len(), 32);
    }

    #[test]
    fn malformed_rows_are_errors() {
        let set = set(&[r#"column = "a""#], &[]);
        let plan = set.plan(&description(&[("a", 0, 0, 25, false)])).unwrap();
        let mut out = BytesMut::new();
        let mut frame = row(&[Some(b"xyz")]);
        frame.truncate(frame.len() - 1);
        assert!(set.mask_row(&plan, &frame, &mut out).is_err());
        let two = row(&[Some(b"x"), Some(b"y")]);
        assert!(set.mask_row(&plan, &two, &mut out).is_err());
        assert!(set.plan(&[0, 1, b'a']).is_err());
    }

    #[test]
    fn partial_keeps_characters_not_bytes() {
        assert_eq!(last_chars("héllo".as_bytes(), 4), "éllo".as_bytes());
        assert_eq!(last_chars(b"1234", 4), b"");
        assert_eq!(last_chars(b"12345", 0), b"");
    }

    #[test]
    fn unresolved_qualified_columns_are_reported() {
        let masks = masks(&[r#"column = "customers.email""#]);
        let refs: Vec<&Mask> = masks.iter().collect();
        let err = MaskSet::compile(&refs, &HashMap::new(), Arc::new(MaskKey([0; 32])))
            .err()
            .unwrap();
        assert_eq!(err.0, vec!["customers.email".to_owned()]);
    }
}
