//! Masking, a stage of the data path shared by the protocols: a
//! [`MaskSet`] is compiled from the masks a session's policy puts on what
//! its workload reads, then applied by each protocol where values pass:
//! PostgreSQL rows column by column (`proxy::postgres::rows`), SSH output
//! as a stream ([`StreamMask`]), Kubernetes Secrets in JSON as it streams
//! (`json`). Strategies (`redact`, `partial`, `hash`,
//! `null`) and value patterns (e-mail, card numbers with Luhn, IBAN with
//! mod 97, JWT, API keys, regexes) are the same everywhere.
pub mod json;
mod stream;

pub use stream::StreamMask;

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
};

use bytes::BufMut;
use hmac::{Hmac, Mac};
use regex::bytes::Regex;
use sha2::Sha256;

use crate::policy::{BuiltinPattern, ColumnName, Mask, MaskSelects, Strategy};

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
                // An HTTP target's: refused at load on the others'.
                MaskSelects::Json(_) => {}
            }
        }
        if unresolved.is_empty() {
            Ok(set)
        } else {
            Err(Unresolved(unresolved))
        }
    }

    /// The strategy for a whole column, found by where it comes from
    /// (table-qualified masks) or by its name; the strictest if several.
    pub(crate) fn column_strategy(&self, name: &[u8], origin: Origin) -> Option<Strategy> {
        let by_origin = (origin.0 != 0)
            .then(|| self.by_origin.get(&origin))
            .flatten();
        let by_name = self
            .by_name
            .iter()
            .filter(|(column, _)| column.as_bytes().eq_ignore_ascii_case(name))
            .map(|(_, strategy)| *strategy);
        by_origin
            .copied()
            .into_iter()
            .chain(by_name)
            .reduce(strictest)
    }

    /// Whether any mask looks at every value (patterns, regexes).
    pub(crate) fn scans(&self) -> bool {
        !self.scanners.is_empty()
    }

    /// A value under `strategy`, appended to `out`; `None` for NULL (then
    /// nothing is appended).
    pub(crate) fn apply(
        &self,
        strategy: Strategy,
        value: &[u8],
        out: &mut impl BufMut,
    ) -> Option<()> {
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
    pub(crate) fn scan(&self, value: &[u8], free_text: bool) -> Scanned {
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

pub(crate) enum Scanned {
    Untouched,
    Rewritten(Vec<u8>),
    Null,
}

const REDACTED: &[u8] = b"****";
const HEX: &[u8; 16] = b"0123456789abcdef";

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

fn builtin(pattern: BuiltinPattern, strategy: Strategy) -> Scanner {
    // Compiled once per process: a mask set is made per session (per
    // request on HTTP targets), and a regex clone is a reference count.
    static COMPILED: [OnceLock<Regex>; 5] = [const { OnceLock::new() }; 5];
    let (index, source, check): (usize, &str, Option<Check>) = match pattern {
        BuiltinPattern::Email => (
            0,
            r"(?i-u)[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}",
            None,
        ),
        BuiltinPattern::CardNumber => (1, r"(?-u)\b[0-9](?:[ -]?[0-9]){12,18}\b", Some(luhn)),
        BuiltinPattern::Iban => (
            2,
            r"(?-u)\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}\b",
            Some(iban),
        ),
        BuiltinPattern::Jwt => (
            3,
            r"(?-u)\beyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*",
            None,
        ),
        BuiltinPattern::ApiKey => (
            4,
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
        regex: COMPILED[index]
            .get_or_init(|| Regex::new(source).expect("built-in patterns compile"))
            .clone(),
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

    #[test]
    fn partial_keeps_characters_not_bytes() {
        assert_eq!(last_chars("héllo".as_bytes(), 4), "éllo".as_bytes());
        assert_eq!(last_chars(b"1234", 4), b"");
        assert_eq!(last_chars(b"12345", 0), b"");
    }

    #[test]
    fn unresolved_qualified_columns_are_reported() {
        let mask = toml::from_str::<MaskSpec>(r#"column = "customers.email""#)
            .unwrap()
            .compile()
            .unwrap();
        let err = MaskSet::compile(&[&mask], &HashMap::new(), Arc::new(MaskKey([0; 32])))
            .err()
            .unwrap();
        assert_eq!(err.0, vec!["customers.email".to_owned()]);
    }
}
