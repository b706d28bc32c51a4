//! Masks values in a JSON stream as it passes, without parsing it whole:
//! a byte-level tokenizer keeps only the stack of open containers and the
//! last key (at most 64 bytes), so memory stays flat however large the
//! document or a value is, and a value being masked is never held.
//!
//! What is masked: every string value of an object that is the value of
//! one of `members_of` keys (a Kubernetes Secret's `data` and
//! `stringData`), and every string value of one of `whole` keys (the
//! `last-applied-configuration` annotation, which repeats the object).

/// Longer keys are not remembered whole: no masked key is that long.
const MAX_KEY: usize = 64;

#[derive(Clone, Copy)]
struct Open {
    object: bool,
    /// An object whose members' string values are replaced by this.
    members_masked: Option<&'static str>,
    /// In an object: the next string is a key.
    expects_key: bool,
}

pub struct JsonMask {
    members_of: &'static [(&'static str, &'static str)],
    whole: &'static [(&'static str, &'static str)],
    stack: Vec<Open>,
    in_string: bool,
    escaped: bool,
    /// The string being read is a key; its bytes so far.
    key: Option<Vec<u8>>,
    /// The last key read, while its value has not started.
    last_key: Vec<u8>,
    /// The string being read is masked: its bytes are dropped.
    masking: bool,
    /// Values masked so far.
    pub masked: u64,
}

impl JsonMask {
    /// `members_of`: (key, replacement) for objects whose members' string
    /// values are replaced; `whole`: (key, replacement) for string values.
    pub fn new(
        members_of: &'static [(&'static str, &'static str)],
        whole: &'static [(&'static str, &'static str)],
    ) -> Self {
        Self {
            members_of,
            whole,
            stack: Vec::new(),
            in_string: false,
            escaped: false,
            key: None,
            last_key: Vec::new(),
            masking: false,
            masked: 0,
        }
    }

    /// A Kubernetes Secret's values: `data` (base64: replaced by `****`
    /// encoded), `stringData`, and the last applied configuration.
    pub fn kubernetes_secrets() -> Self {
        Self::new(
            &[("data", "KioqKg=="), ("stringData", "****")],
            &[("kubectl.kubernetes.io/last-applied-configuration", "****")],
        )
    }

    fn replacement(table: &[(&'static str, &'static str)], key: &[u8]) -> Option<&'static str> {
        table
            .iter()
            .find(|(name, _)| name.as_bytes() == key)
            .map(|(_, with)| *with)
    }

    /// Passes `input` on into `out`, masked.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len());
        for &byte in input {
            if self.in_string {
                self.string_byte(byte, out);
            } else {
                self.structure_byte(byte, out);
            }
        }
    }

    fn string_byte(&mut self, byte: u8, out: &mut Vec<u8>) {
        let closes = !self.escaped && byte == b'"';
        self.escaped = !self.escaped && byte == b'\\';
        if self.masking {
            if closes {
                self.in_string = false;
                self.masking = false;
                out.push(b'"');
            }
            return;
        }
        out.push(byte);
        if closes {
            self.in_string = false;
            if let Some(key) = self.key.take() {
                self.last_key = key;
            }
        } else if let Some(key) = &mut self.key
            && key.len() <= MAX_KEY
        {
            // Cut one byte past the limit: it then matches no masked key.
            key.push(byte);
        }
    }

    fn structure_byte(&mut self, byte: u8, out: &mut Vec<u8>) {
        let top = self.stack.last().copied();
        match byte {
            b'"' => {
                self.in_string = true;
                self.escaped = false;
                out.push(b'"');
                match top {
                    Some(open) if open.object && open.expects_key => {
                        self.key = Some(Vec::new());
                    }
                    _ => {
                        let with = match top {
                            Some(open) if open.object => open
                                .members_masked
                                .or_else(|| Self::replacement(self.whole, &self.last_key)),
                            _ => None,
                        };
                        if let Some(with) = with {
                            out.extend_from_slice(with.as_bytes());
                            self.masking = true;
                            self.masked += 1;
                        }
                        self.last_key.clear();
                    }
                }
                return;
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
                let object = byte == b'{';
                let members_masked = match top {
                    Some(open) if object && open.object => {
                        Self::replacement(self.members_of, &self.last_key)
                    }
                    _ => None,
                };
                self.last_key.clear();
                self.stack.push(Open {
                    object,
                    members_masked,
                    expects_key: object,
                });
            }
            b'}' | b']' => {
                self.stack.pop();
                self.last_key.clear();
            }
            _ => {}
        }
        out.push(byte);
    }
}

/// For the fuzz target: any bytes from a server, cut where the input
/// says, come out as the whole would, and never panic.
#[doc(hidden)]
pub fn fuzz(data: &[u8]) {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let mut chunked = JsonMask::kubernetes_secrets();
    let mut out = Vec::new();
    for chunk in body.chunks(usize::from(cut).max(1)) {
        chunked.push(chunk, &mut out);
    }
    let mut whole = JsonMask::kubernetes_secrets();
    let mut want = Vec::new();
    whole.push(body, &mut want);
    assert_eq!(out, want);
    assert_eq!(chunked.masked, whole.masked);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(text: &str, cut: usize) -> String {
        let mut mask = JsonMask::kubernetes_secrets();
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

    #[test]
    fn memory_stays_flat_however_long_a_value() {
        let mut mask = JsonMask::kubernetes_secrets();
        let mut out = Vec::new();
        mask.push(br#"{"data":{"big":""#, &mut out);
        let chunk = vec![b'A'; 1 << 20];
        for _ in 0..64 {
            out.clear();
            mask.push(&chunk, &mut out);
            assert!(out.is_empty());
        }
        out.clear();
        mask.push(br#""}}"#, &mut out);
        assert_eq!(out, br#""}}"#);
        assert_eq!(mask.masked, 1);
    }
}
