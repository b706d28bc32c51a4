//! Masks values in a JSON stream as it passes, without parsing it whole:
//! a byte-level tokenizer keeps only the stack of open containers and the
//! last key (at most 64 bytes), so memory stays flat however large the
//! document or a value is, and a value being masked is never held.
//!
//! What is masked is said by selectors: a key (every value of a member
//! with that name, anywhere) or a path from the root (`$.items[*].data`).
//! A masked string, number, `true`, `false` or `null` is replaced by the
//! selector's replacement; a masked object or array keeps its shape and
//! every value in it is replaced.
//!
//! Value patterns (`pattern`, `regex`) look at every other string, key and
//! number, as it reads once unescaped: each is held until it ends (at most
//! [`MAX_SCANNED`] bytes; a longer one is redacted whole), then goes out
//! unchanged, or re-escaped with what the patterns found masked. A masked
//! number becomes a string.

use std::{borrow::Cow, sync::Arc};

use super::{MaskSet, Scanned};

/// Longer keys are not remembered whole: no selector names a key so long.
pub const MAX_KEY: usize = 64;

/// At most this many selectors (a bit each in a container's path state).
pub const MAX_SELECTORS: usize = 64;

/// The longest string or number the value patterns look at: a longer one
/// is redacted whole, as it cannot be read whole within bounded memory.
pub const MAX_SCANNED: usize = 256 * 1024;

/// What a selector picks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// Every value of a member with this key, at any depth.
    Key(String),
    /// The values at this path from the root.
    Path(Vec<Step>),
}

/// A step of a path: `.name` or `['name']`, `.*` (any member), `[*]`
/// (any element).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Member(String),
    AnyMember,
    AnyElement,
}

impl Selector {
    /// `name` (a key anywhere) or `$.a.b[*]['c d'].*` (a path from the
    /// root).
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some(mut rest) = text.strip_prefix('$') else {
            if text.is_empty() || text.len() > MAX_KEY {
                return Err(format!(
                    "json key {text:?}: a key is 1 to {MAX_KEY} bytes (or a path from $)"
                ));
            }
            return Ok(Self::Key(text.to_owned()));
        };
        let unsupported =
            || format!("json path {text:?}: a path takes .name, ['name'], .* and [*] steps from $");
        let mut steps = Vec::new();
        while !rest.is_empty() {
            let (step, after) = if let Some(after) = rest.strip_prefix("[*]") {
                (Step::AnyElement, after)
            } else if let Some(after) = rest.strip_prefix(".*") {
                (Step::AnyMember, after)
            } else if let Some(quoted) = rest.strip_prefix("['") {
                let end = quoted.find("']").ok_or_else(unsupported)?;
                (Step::Member(quoted[..end].to_owned()), &quoted[end + 2..])
            } else if let Some(named) = rest.strip_prefix('.') {
                let end = named.find(['.', '[']).unwrap_or(named.len());
                (Step::Member(named[..end].to_owned()), &named[end..])
            } else {
                return Err(unsupported());
            };
            if let Step::Member(name) = &step
                && (name.is_empty() || name.len() > MAX_KEY)
            {
                return Err(unsupported());
            }
            steps.push(step);
            rest = after;
        }
        if steps.is_empty() {
            return Err(format!(
                "json path {text:?}: the whole document cannot be masked"
            ));
        }
        Ok(Self::Path(steps))
    }
}

#[derive(Clone, Copy)]
struct Open {
    object: bool,
    /// In an object: the next string is a key.
    expects_key: bool,
    /// Every value inside is masked, by this selector.
    masked: Option<usize>,
    /// Path selectors whose steps so far lead here (a bit each).
    paths: u64,
}

pub struct JsonMask {
    /// Each selector and the JSON text that replaces what it picks.
    selectors: Vec<(Selector, Cow<'static, str>)>,
    stack: Vec<Open>,
    in_string: bool,
    escaped: bool,
    /// The string being read is a key; its bytes so far.
    key: Option<Vec<u8>>,
    /// The last key read, while its value has not started.
    last_key: Vec<u8>,
    /// The string being read is masked: its bytes are dropped.
    masking: bool,
    /// In a number or literal: passed on, or dropped when masked.
    in_scalar: bool,
    scalar_masked: bool,
    /// The value patterns, and the string or number they are waiting
    /// for the end of (raw, as it came; a string without its quotes).
    scan: Option<Arc<MaskSet>>,
    scanning: bool,
    scanned: Vec<u8>,
    /// Values masked so far.
    pub masked: u64,
}

impl JsonMask {
    /// `selectors`: each with the JSON text that replaces what it picks
    /// (`"****"` with its quotes, or `null`); at most [`MAX_SELECTORS`].
    pub fn new(mut selectors: Vec<(Selector, Cow<'static, str>)>) -> Self {
        selectors.truncate(MAX_SELECTORS);
        Self {
            selectors,
            stack: Vec::new(),
            in_string: false,
            escaped: false,
            key: None,
            last_key: Vec::new(),
            masking: false,
            in_scalar: false,
            scalar_masked: false,
            scan: None,
            scanning: false,
            scanned: Vec::new(),
            masked: 0,
        }
    }

    /// Also masks what value patterns find in strings, keys and numbers.
    pub fn scanning(mut self, patterns: Arc<MaskSet>) -> Self {
        self.scan = patterns.scans().then_some(patterns);
        self
    }

    /// A Kubernetes Secret's values: `data` (base64: replaced by `****`
    /// encoded), `stringData`, and the last applied configuration.
    pub fn secret_selectors() -> Vec<(Selector, Cow<'static, str>)> {
        let key = |name: &str| Selector::Key(name.to_owned());
        vec![
            (key("data"), Cow::Borrowed("\"KioqKg==\"")),
            (key("stringData"), Cow::Borrowed("\"****\"")),
            (
                key("kubectl.kubernetes.io/last-applied-configuration"),
                Cow::Borrowed("\"****\""),
            ),
        ]
    }

    /// Passes `input` on into `out`, masked.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len());
        for &byte in input {
            if self.in_string {
                self.string_byte(byte, out);
                continue;
            }
            if self.in_scalar {
                if is_scalar_byte(byte) {
                    if self.scanning {
                        self.hold(byte);
                    } else if !self.scalar_masked {
                        out.push(byte);
                    }
                    continue;
                }
                self.in_scalar = false;
                if self.scanning {
                    self.scanned_ends(false, out);
                }
            }
            self.structure_byte(byte, out);
        }
    }

    /// The end of the document: a number still being read (a document
    /// may be one) goes out.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.scanning {
            let string = self.in_string;
            self.in_string = false;
            self.in_scalar = false;
            self.scanned_ends(string, out);
        }
    }

    fn hold(&mut self, byte: u8) {
        if self.scanned.len() <= MAX_SCANNED {
            self.scanned.push(byte);
        }
    }

    /// A scanned string (`string`) or number has ended: out it goes, with
    /// what the patterns find masked.
    fn scanned_ends(&mut self, string: bool, out: &mut Vec<u8>) {
        self.scanning = false;
        let raw = std::mem::take(&mut self.scanned);
        let Some(patterns) = &self.scan else {
            return;
        };
        let quote = |out: &mut Vec<u8>, text: &[u8]| {
            out.push(b'"');
            out.extend_from_slice(text);
            out.push(b'"');
        };
        if raw.len() > MAX_SCANNED {
            out.extend_from_slice(b"\"****\"");
            self.masked += 1;
        } else {
            // A string is read as its value reads (a server may escape any
            // character); one that does not decode is read as it came.
            let decoded = (string && raw.contains(&b'\\'))
                .then(|| {
                    let mut quoted = Vec::with_capacity(raw.len() + 2);
                    quote(&mut quoted, &raw);
                    serde_json::from_slice::<String>(&quoted).ok()
                })
                .flatten();
            let text = decoded.as_ref().map_or(&raw[..], |d| d.as_bytes());
            // A key cannot be null: there, a `null` mask redacts.
            let key = string && self.key.is_some();
            match patterns.scan(text, key) {
                Scanned::Untouched if string => quote(out, &raw),
                Scanned::Untouched => out.extend_from_slice(&raw),
                Scanned::Rewritten(masked) => {
                    let masked = String::from_utf8_lossy(&masked);
                    serde_json::to_writer(&mut *out, &masked).expect("a string is written");
                    self.masked += 1;
                }
                Scanned::Null => {
                    out.extend_from_slice(b"null");
                    self.masked += 1;
                }
            }
        }
        self.scanned = raw;
        self.scanned.clear();
        self.scanned.shrink_to(1024);
    }

    /// Whether a value starting now is masked (by which selector), and
    /// the path selectors that lead into it.
    fn value_starts(&self) -> (Option<usize>, u64) {
        let Some(parent) = self.stack.last() else {
            // The root: every path starts here.
            let paths = self
                .selectors
                .iter()
                .enumerate()
                .filter(|(_, (s, _))| matches!(s, Selector::Path(_)))
                .fold(0, |bits, (i, _)| bits | 1 << i);
            return (None, paths);
        };
        if parent.masked.is_some() {
            return (parent.masked, 0);
        }
        let depth = self.stack.len() - 1;
        let key = parent.object.then_some(self.last_key.as_slice());
        let mut paths = 0;
        for (i, (selector, _)) in self.selectors.iter().enumerate() {
            match selector {
                Selector::Key(name) if key == Some(name.as_bytes()) => return (Some(i), 0),
                Selector::Key(_) => {}
                Selector::Path(steps) if parent.paths & 1 << i != 0 => {
                    let step = match (&steps[depth], key) {
                        (Step::Member(name), Some(key)) => name.as_bytes() == key,
                        (Step::AnyMember, Some(_)) | (Step::AnyElement, None) => true,
                        _ => false,
                    };
                    if step && depth + 1 == steps.len() {
                        return (Some(i), 0);
                    }
                    if step {
                        paths |= 1 << i;
                    }
                }
                Selector::Path(_) => {}
            }
        }
        (None, paths)
    }

    fn replace(&mut self, by: usize, out: &mut Vec<u8>) {
        out.extend_from_slice(self.selectors[by].1.as_bytes());
        self.masked += 1;
    }

    fn string_byte(&mut self, byte: u8, out: &mut Vec<u8>) {
        let closes = !self.escaped && byte == b'"';
        self.escaped = !self.escaped && byte == b'\\';
        if self.masking {
            if closes {
                self.in_string = false;
                self.masking = false;
            }
            return;
        }
        if self.scanning {
            if closes {
                self.scanned_ends(true, out);
            } else {
                self.hold(byte);
            }
        } else {
            out.push(byte);
        }
        if closes {
            self.in_string = false;
            if let Some(key) = self.key.take() {
                self.last_key = unescaped_key(key);
            }
        } else if let Some(key) = &mut self.key
            && key.len() <= MAX_KEY * 6
        {
            // Cut past the limit (escaped, a byte can take six): it then
            // matches no selector.
            key.push(byte);
        }
    }

    fn structure_byte(&mut self, byte: u8, out: &mut Vec<u8>) {
        let top = self.stack.last().copied();
        match byte {
            b'"' if top.is_some_and(|open| open.object && open.expects_key) => {
                self.in_string = true;
                self.escaped = false;
                self.key = Some(Vec::new());
                if self.scan.is_some() {
                    self.scanning = true;
                    return;
                }
            }
            b'"' => {
                self.in_string = true;
                self.escaped = false;
                let (masked, _) = self.value_starts();
                self.last_key.clear();
                if let Some(by) = masked {
                    self.replace(by, out);
                    self.masking = true;
                    return;
                }
                if self.scan.is_some() {
                    self.scanning = true;
                    return;
                }
            }
            b':' => {
                if let Some(open) = self.stack.last_mut() {
                    open.expects_key = false;
                }
            }
            b',' => {
                if let Some(open) = self.stack.last_mut() {
                    open.expects_key = open.object;
                }
                self.last_key.clear();
            }
            b'{' | b'[' => {
                let (masked, paths) = self.value_starts();
                self.last_key.clear();
                let object = byte == b'{';
                self.stack.push(Open {
                    object,
                    expects_key: object,
                    masked,
                    paths,
                });
            }
            b'}' | b']' => {
                self.stack.pop();
                self.last_key.clear();
            }
            byte if is_scalar_byte(byte) => {
                let (masked, _) = self.value_starts();
                self.last_key.clear();
                self.in_scalar = true;
                self.scalar_masked = masked.is_some();
                if let Some(by) = masked {
                    self.replace(by, out);
                    return;
                }
                if self.scan.is_some() {
                    self.scanning = true;
                    self.hold(byte);
                    return;
                }
            }
            _ => {}
        }
        out.push(byte);
    }
}

/// A number's or a literal's bytes (and what a malformed one might hold).
fn is_scalar_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'+' | b'.')
}

/// A key as its value reads: a server may escape any character
/// (`"pass\u0077ord"` is `password`).
fn unescaped_key(key: Vec<u8>) -> Vec<u8> {
    if !key.contains(&b'\\') || key.len() > MAX_KEY * 6 {
        return key;
    }
    let mut quoted = Vec::with_capacity(key.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(&key);
    quoted.push(b'"');
    match serde_json::from_slice::<String>(&quoted) {
        Ok(text) => text.into_bytes(),
        Err(_) => key,
    }
}

/// For the fuzz target: any bytes from a server, cut where the input
/// says, come out as the whole would, and never panic.
#[doc(hidden)]
pub fn fuzz(data: &[u8]) {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    // The low bit says whether value patterns scan too.
    let patterns = (cut & 1 == 1).then(|| FUZZ_PATTERNS.clone());
    let masks = || {
        let mut selectors = JsonMask::secret_selectors();
        for path in ["$.items[*].token", "$.*[*]", "password"] {
            let selector = Selector::parse(path).expect("a valid path");
            selectors.push((selector, Cow::Borrowed("null")));
        }
        let mask = JsonMask::new(selectors);
        match &patterns {
            Some(set) => mask.scanning(set.clone()),
            None => mask,
        }
    };
    let mut chunked = masks();
    let mut out = Vec::new();
    for chunk in body.chunks(usize::from(cut >> 1).max(1)) {
        chunked.push(chunk, &mut out);
    }
    chunked.finish(&mut out);
    let mut whole = masks();
    let mut want = Vec::new();
    whole.push(body, &mut want);
    whole.finish(&mut want);
    assert_eq!(out, want);
    assert_eq!(chunked.masked, whole.masked);
    // What a server sent as valid JSON stays valid JSON.
    if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() {
        assert!(
            serde_json::from_slice::<serde::de::IgnoredAny>(&out).is_ok(),
            "masked JSON no longer parses: {}",
            String::from_utf8_lossy(&out)
        );
    }
}

static FUZZ_PATTERNS: std::sync::LazyLock<Arc<MaskSet>> = std::sync::LazyLock::new(|| {
    let specs: Vec<crate::policy::Mask> = [
        "pattern = \"email\"",
        "pattern = \"card_number\"\nstrategy = \"null\"",
        "regex = '[a-z]\\\\?\"?x'\nstrategy = \"hash\"",
    ]
    .iter()
    .map(|text| {
        toml::from_str::<crate::policy::MaskSpec>(text)
            .expect("a mask")
            .compile()
            .expect("a mask")
    })
    .collect();
    let refs: Vec<&crate::policy::Mask> = specs.iter().collect();
    let key = Arc::new(super::MaskKey::new([7; 32]));
    Arc::new(MaskSet::compile(&refs, &Default::default(), key).expect("no columns"))
});

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(text: &str, cut: usize) -> String {
        let mut mask = JsonMask::new(JsonMask::secret_selectors());
        let mut out = Vec::new();
        for chunk in text.as_bytes().chunks(cut.max(1)) {
            mask.push(chunk, &mut out);
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn secret_values_are_masked_wherever_chunks_cut() {
        let secret = r#"{"kind":"SecretList","items":[{"kind":"Secret","metadata":{"name":"web","annotations":{"kubectl.kubernetes.io/last-applied-configuration":"{\"data\":{\"password\":\"aHVudGVyMg==\"}}","other":"kept"},"managedFields":[{"fieldsV1":{"f:data":{"f:password":{}}}}]},"data":{"password":"aHVudGVyMg==","token":"c2VjcmV0\"x"},"stringData":{"raw":"hunter2"},"type":"Opaque"}]}"#;
        let want = r#"{"kind":"SecretList","items":[{"kind":"Secret","metadata":{"name":"web","annotations":{"kubectl.kubernetes.io/last-applied-configuration":"****","other":"kept"},"managedFields":[{"fieldsV1":{"f:data":{"f:password":{}}}}]},"data":{"password":"KioqKg==","token":"KioqKg=="},"stringData":{"raw":"****"},"type":"Opaque"}]}"#;
        for cut in 1..=secret.len() {
            assert_eq!(masked(secret, cut), want, "cut {cut}");
        }
        let value: serde_json::Value = serde_json::from_str(want).unwrap();
        assert_eq!(value["items"][0]["type"], "Opaque");
        // Whitespace, and a key named like a masked one elsewhere.
        let spaced = "{ \"data\" : { \"a\" : \"x\" , \"b\": \"y\" }, \"name\": \"data\", \"list\": [\"data\", {\"data\": {}}] }";
        assert_eq!(
            masked(spaced, 3),
            "{ \"data\" : { \"a\" : \"KioqKg==\" , \"b\": \"KioqKg==\" }, \"name\": \"data\", \"list\": [\"data\", {\"data\": {}}] }"
        );
    }

    fn masked_by(selectors: &[&str], text: &str, cut: usize) -> String {
        let selectors = selectors
            .iter()
            .map(|s| (Selector::parse(s).unwrap(), Cow::Borrowed("\"****\"")))
            .collect();
        let mut mask = JsonMask::new(selectors);
        let mut out = Vec::new();
        for chunk in text.as_bytes().chunks(cut.max(1)) {
            mask.push(chunk, &mut out);
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn keys_and_paths_mask_every_kind_of_value() {
        let doc = r#"{"items": [{"name": "a", "token": 12.5e3, "auth": {"user": "u", "password": "p"}, "tags": [true, null]},
 {"name": "b", "token": "t\"x", "auth": null, "tags": []}], "pass\u0077ord": false, "meta": {"token": "kept-by-path"}}"#;
        let want = r#"{"items": [{"name": "a", "token": "****", "auth": {"user": "****", "password": "****"}, "tags": ["****", "****"]},
 {"name": "b", "token": "****", "auth": "****", "tags": []}], "pass\u0077ord": "****", "meta": {"token": "kept-by-path"}}"#;
        let selectors = [
            "password",
            "$.items[*].token",
            "$.items[*].auth",
            "$['items'][*].tags[*]",
        ];
        for cut in 1..=doc.len() {
            assert_eq!(masked_by(&selectors, doc, cut), want, "cut {cut}");
        }
        let value: serde_json::Value = serde_json::from_str(want).unwrap();
        assert_eq!(value["items"][1]["name"], "b");
        // `.*` is any member, `[*]` any element: a path that says an
        // element does not pick a member, and the other way round.
        assert_eq!(
            masked_by(&["$.a[*]"], r#"{"a": {"x": 1}}"#, 1),
            r#"{"a": {"x": 1}}"#
        );
        assert_eq!(
            masked_by(&["$.a.*"], r#"{"a": [1, 2]}"#, 1),
            r#"{"a": [1, 2]}"#
        );
        assert_eq!(
            masked_by(&["$[*]"], r#"[1, "x", {"y": 2}]"#, 1),
            r#"["****", "****", {"y": "****"}]"#
        );
    }

    #[test]
    fn selectors_parse_or_say_what_they_take() {
        assert_eq!(Selector::parse("token"), Ok(Selector::Key("token".into())));
        assert_eq!(
            Selector::parse("$.items[*]['a.b'].*"),
            Ok(Selector::Path(vec![
                Step::Member("items".into()),
                Step::AnyElement,
                Step::Member("a.b".into()),
                Step::AnyMember,
            ]))
        );
        for bad in [
            "",
            "$",
            "$..token",
            "$.items[0]",
            "$[?(@.x)]",
            "$.",
            "$['x'",
            "x.y.z.w.very-long-key-name-that-goes-on-and-on-past-sixty-four-bytes",
        ] {
            assert!(Selector::parse(bad).is_err(), "{bad:?}");
        }
    }

    fn patterns(specs: &[&str]) -> Arc<MaskSet> {
        let specs: Vec<crate::policy::Mask> = specs
            .iter()
            .map(|t| {
                toml::from_str::<crate::policy::MaskSpec>(t)
                    .unwrap()
                    .compile()
                    .unwrap()
            })
            .collect();
        let refs: Vec<&crate::policy::Mask> = specs.iter().collect();
        let key = Arc::new(super::super::MaskKey::new([0; 32]));
        Arc::new(MaskSet::compile(&refs, &Default::default(), key).unwrap())
    }

    fn scanned(set: &Arc<MaskSet>, selectors: &[&str], text: &[u8], cut: usize) -> (String, u64) {
        let selectors = selectors
            .iter()
            .map(|s| (Selector::parse(s).unwrap(), Cow::Borrowed("\"****\"")))
            .collect();
        let mut mask = JsonMask::new(selectors).scanning(set.clone());
        let mut out = Vec::new();
        for chunk in text.chunks(cut.max(1)) {
            mask.push(chunk, &mut out);
        }
        mask.finish(&mut out);
        (String::from_utf8(out).unwrap(), mask.masked)
    }

    #[test]
    fn patterns_mask_strings_keys_and_numbers_as_they_read() {
        let set = patterns(&[
            "pattern = \"email\"",
            "pattern = \"card_number\"",
            "regex = 'tok-[0-9]+'",
        ]);
        // An escaped `@` and a `/` are read unescaped; a key and a number
        // are scanned too; a value a selector masks is not looked at.
        let doc = br#"{"users": [{"mail": "ann\u0040example.com", "note": "see tok-42 \"now\"", "card": 4111111111111111},
 {"bob@example.com": 1, "url": "http:\/\/x", "password": "tok-7", "n": 12.5, "ok": true, "nil": null}]}"#;
        let want = r#"{"users": [{"mail": "****", "note": "see **** \"now\"", "card": "****"},
 {"****": 1, "url": "http:\/\/x", "password": "****", "n": 12.5, "ok": true, "nil": null}]}"#;
        for cut in 1..=doc.len() {
            let (out, masked) = scanned(&set, &["password"], doc, cut);
            assert_eq!(out, want, "cut {cut}");
            assert_eq!(masked, 5, "cut {cut}");
        }
        let value: serde_json::Value = serde_json::from_str(want).unwrap();
        assert_eq!(value["users"][1]["n"], 12.5);
        // A document that is one number ends with the body.
        assert_eq!(scanned(&set, &[], b"4111111111111111", 3).0, "\"****\"");
        assert_eq!(scanned(&set, &[], b"17", 1).0, "17");
        // `null` nulls a value, and redacts a key (a key cannot be null).
        let null = patterns(&["pattern = \"email\"\nstrategy = \"null\""]);
        assert_eq!(
            scanned(&null, &[], br#"{"a@b.io": "c@d.io"}"#, 2).0,
            r#"{"****": null}"#
        );
    }

    #[test]
    fn a_value_too_long_to_scan_is_redacted_whole() {
        let set = patterns(&["pattern = \"email\""]);
        let mut doc = br#"{"blob": ""#.to_vec();
        doc.extend(std::iter::repeat_n(b'a', MAX_SCANNED + 1));
        doc.extend_from_slice(br#"", "short": "kept"}"#);
        let (out, masked) = scanned(&set, &[], &doc, 4096);
        assert_eq!(out, r#"{"blob": "****", "short": "kept"}"#);
        assert_eq!(masked, 1);
        let mut doc = br#"{"fits": ""#.to_vec();
        doc.extend(std::iter::repeat_n(b'a', MAX_SCANNED));
        doc.extend_from_slice(br#""}"#);
        assert_eq!(scanned(&set, &[], &doc, 4096).0.len(), doc.len());
    }

    #[test]
    fn memory_stays_flat_however_long_a_value() {
        let mut mask = JsonMask::new(JsonMask::secret_selectors());
        let mut out = Vec::new();
        mask.push(br#"{"data":{"big":""#, &mut out);
        assert_eq!(out, br#"{"data":{"big":"KioqKg==""#);
        out.clear();
        let chunk = vec![b'A'; 1 << 20];
        for _ in 0..64 {
            out.clear();
            mask.push(&chunk, &mut out);
            assert!(out.is_empty());
        }
        out.clear();
        mask.push(br#""}}"#, &mut out);
        assert_eq!(out, br#"}}"#);
        assert_eq!(mask.masked, 1);
    }
}
