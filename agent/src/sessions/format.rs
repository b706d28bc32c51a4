//! The session log, format version 1 (docs/SESSIONS.md): one JSON object
//! per line, events in order, then a seal.
//!
//! Each event line ends with its chain hash, `"hash":"<hex>"}`: the SHA-256
//! of the previous event's hash and of the line itself without that field.
//! The seal signs the last hash with the host's ed25519 key, so a changed,
//! missing or reordered event breaks the chain where it happened, and a
//! rewritten chain breaks the signature.
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Version of the event schema, in every `session_start`.
pub const SCHEMA_VERSION: u32 = 1;

/// What starts every chain: the session id, so that no event can be moved
/// into another session's log.
pub fn chain_start(session_id: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"interlock-session-v1\n");
    hasher.update(session_id.as_bytes());
    hasher.finalize().into()
}

/// `,"hash":"` + 64 hex digits + `"}`.
const HASH_SUFFIX_LEN: usize = 9 + 64 + 2;

/// One event with its place in the chain. `event` serializes to a JSON
/// object whose `kind` names it; its fields are flattened into the line.
#[derive(Serialize)]
struct Envelope<'a, E: Serialize> {
    seq: u64,
    time_us: u64,
    #[serde(flatten)]
    event: &'a E,
}

/// Appends the line of event `seq` to `out` (no newline) and returns its
/// hash, the next event's `prev`.
pub fn encode_event<E: Serialize>(
    out: &mut Vec<u8>,
    prev: &[u8; 32],
    seq: u64,
    time_us: u64,
    event: &E,
) -> serde_json::Result<[u8; 32]> {
    let start = out.len();
    serde_json::to_writer(
        &mut *out,
        &Envelope {
            seq,
            time_us,
            event,
        },
    )?;
    let hash: [u8; 32] = Sha256::new()
        .chain_update(prev)
        .chain_update(&out[start..])
        .finalize()
        .into();
    out.pop(); // the closing brace
    out.extend_from_slice(b",\"hash\":\"");
    let mut hex = [0u8; 64];
    hex::encode_to_slice(hash, &mut hex).expect("64 digits for 32 bytes");
    out.extend_from_slice(&hex);
    out.extend_from_slice(b"\"}");
    Ok(hash)
}

/// The chain hash written at the end of an event line.
pub fn line_hash(line: &[u8]) -> Option<[u8; 32]> {
    let suffix = line.get(line.len().checked_sub(HASH_SUFFIX_LEN)?..)?;
    let digits = suffix.strip_prefix(b",\"hash\":\"")?.strip_suffix(b"\"}")?;
    let mut hash = [0u8; 32];
    hex::decode_to_slice(digits, &mut hash).ok()?;
    Some(hash)
}

/// What the hash of `line` should be, given the previous one.
fn expected_hash(prev: &[u8; 32], line: &[u8]) -> Option<[u8; 32]> {
    let body = line.get(..line.len().checked_sub(HASH_SUFFIX_LEN)?)?;
    Some(
        Sha256::new()
            .chain_update(prev)
            .chain_update(body)
            .chain_update(b"}")
            .finalize()
            .into(),
    )
}

/// The last line of a finished session.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Seal {
    pub kind: String,
    pub session_id: String,
    pub host: String,
    /// Number of events, the last one being `events - 1`.
    pub events: u64,
    /// Hash of the last event.
    pub head: String,
    pub public_key: String,
    pub signature: String,
}

fn seal_message(session_id: &str, events: u64, head: &str) -> Vec<u8> {
    format!("interlock-session-v1\n{session_id}\n{events}\n{head}").into_bytes()
}

impl Seal {
    pub fn sign(
        key: &SigningKey,
        host: &str,
        session_id: &str,
        events: u64,
        head: &[u8; 32],
    ) -> Self {
        let head = hex::encode(head);
        let signature = key.sign(&seal_message(session_id, events, &head));
        Self {
            kind: "seal".into(),
            session_id: session_id.into(),
            host: host.into(),
            events,
            head,
            public_key: hex::encode(key.verifying_key().as_bytes()),
            signature: hex::encode(signature.to_bytes()),
        }
    }
}

/// A session whose chain and seal check out.
#[derive(Debug)]
pub struct Verified {
    pub session_id: String,
    pub host: String,
    pub events: u64,
    pub public_key: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("empty log")]
    Empty,
    #[error("event {seq} (line {line}) is not a readable event: {why}")]
    Unreadable { seq: u64, line: usize, why: String },
    #[error("event {seq} is missing (the next event present is {found})")]
    Missing { seq: u64, found: u64 },
    #[error("event {seq} (line {line}) is out of order (expected event {expected})")]
    OutOfOrder {
        seq: u64,
        line: usize,
        expected: u64,
    },
    #[error(
        "event {seq} (line {line}) was altered: its hash does not match its contents and the chain before it"
    )]
    Altered { seq: u64, line: usize },
    #[error(
        "the log ends without a seal after event {last} (a session still running, or cut short)"
    )]
    Unsealed { last: u64 },
    #[error("the seal is not readable: {0}")]
    BadSeal(String),
    #[error("the seal covers {sealed} events but the log has {found}: events after {found_last} are missing", found_last = found.saturating_sub(1))]
    Truncated { sealed: u64, found: u64 },
    #[error("the seal's head does not match event {last}: the seal or the last event was altered")]
    HeadMismatch { last: u64 },
    #[error("the seal's signature is not valid for its key")]
    BadSignature,
    #[error("signed by key {found}, but host {host:?} publishes {expected}")]
    WrongKey {
        host: String,
        found: String,
        expected: String,
    },
    #[error("the seal names session {sealed}, the events session {events}")]
    WrongSession { sealed: String, events: String },
}

/// Checks the chain and the seal of a whole log, naming the first bad
/// event. `trusted_key` (hex), when given, is the key the host publishes.
pub fn verify<'a>(
    lines: impl IntoIterator<Item = &'a [u8]>,
    trusted_key: Option<&str>,
) -> Result<Verified, VerifyError> {
    let Walked {
        session_id,
        head,
        events,
        seal,
    } = walk_chain(lines)?;
    let expected_seq = events;
    let prev = head;
    let session_id = session_id.ok_or(VerifyError::Empty)?;
    let Some(seal) = seal else {
        return Err(VerifyError::Unsealed {
            last: expected_seq.saturating_sub(1),
        });
    };
    if seal.session_id != session_id {
        return Err(VerifyError::WrongSession {
            sealed: seal.session_id,
            events: session_id,
        });
    }
    if seal.events != expected_seq {
        return Err(VerifyError::Truncated {
            sealed: seal.events,
            found: expected_seq,
        });
    }
    if seal.head != hex::encode(prev) {
        return Err(VerifyError::HeadMismatch {
            last: expected_seq.saturating_sub(1),
        });
    }
    let key = decode_key(&seal.public_key).ok_or(VerifyError::BadSignature)?;
    let signature = hex::decode(&seal.signature)
        .ok()
        .and_then(|s| Signature::from_slice(&s).ok())
        .ok_or(VerifyError::BadSignature)?;
    key.verify(
        &seal_message(&seal.session_id, seal.events, &seal.head),
        &signature,
    )
    .map_err(|_| VerifyError::BadSignature)?;
    if let Some(trusted) = trusted_key
        && !trusted.eq_ignore_ascii_case(&seal.public_key)
    {
        return Err(VerifyError::WrongKey {
            host: seal.host,
            found: seal.public_key,
            expected: trusted.to_owned(),
        });
    }
    Ok(Verified {
        session_id,
        host: seal.host,
        events: seal.events,
        public_key: seal.public_key,
    })
}

/// What the events of a log chain to, and the seal after them.
struct Walked {
    session_id: Option<String>,
    /// The last event's hash.
    head: [u8; 32],
    events: u64,
    seal: Option<Seal>,
}

/// Follows the hash chain line by line: sequence numbers in order, each
/// line's hash over the one before.
fn walk_chain<'a>(lines: impl IntoIterator<Item = &'a [u8]>) -> Result<Walked, VerifyError> {
    #[derive(Deserialize)]
    struct Head<'a> {
        seq: Option<u64>,
        kind: Option<&'a str>,
        session_id: Option<String>,
    }
    let mut session_id: Option<String> = None;
    let mut prev = [0u8; 32];
    let mut expected_seq = 0u64;
    let mut seal = None;
    for (index, line) in lines.into_iter().enumerate() {
        let line_no = index + 1;
        if line.is_empty() {
            continue;
        }
        if seal.is_some() {
            return Err(VerifyError::Unreadable {
                seq: expected_seq,
                line: line_no,
                why: "a line after the seal".into(),
            });
        }
        let unreadable = |why: String| VerifyError::Unreadable {
            seq: expected_seq,
            line: line_no,
            why,
        };
        let head: Head = serde_json::from_slice(line).map_err(|e| unreadable(e.to_string()))?;
        if head.kind == Some("seal") {
            seal = Some(
                serde_json::from_slice::<Seal>(line)
                    .map_err(|e| VerifyError::BadSeal(e.to_string()))?,
            );
            continue;
        }
        let seq = head.seq.ok_or_else(|| unreadable("no seq".into()))?;
        if seq > expected_seq {
            return Err(VerifyError::Missing {
                seq: expected_seq,
                found: seq,
            });
        }
        if seq < expected_seq {
            return Err(VerifyError::OutOfOrder {
                seq,
                line: line_no,
                expected: expected_seq,
            });
        }
        if seq == 0 {
            let id = head
                .session_id
                .filter(|_| head.kind == Some("session_start"))
                .ok_or_else(|| unreadable("the first event is not a session_start".into()))?;
            prev = chain_start(&id);
            session_id = Some(id);
        }
        let stated = line_hash(line);
        if stated.is_none() || stated != expected_hash(&prev, line) {
            return Err(VerifyError::Altered { seq, line: line_no });
        }
        prev = stated.expect("checked");
        expected_seq += 1;
    }
    Ok(Walked {
        session_id,
        head: prev,
        events: expected_seq,
        seal,
    })
}

fn decode_key(text: &str) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = hex::decode(text).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn log(events: usize) -> (Vec<Vec<u8>>, SigningKey) {
        let key = SigningKey::from_bytes(&[7; 32]);
        let id = "01JTESTSESSION0000000000000";
        let mut prev = chain_start(id);
        let mut lines = Vec::new();
        for seq in 0..events as u64 {
            let event = if seq == 0 {
                json!({"kind": "session_start", "session_id": id})
            } else {
                json!({"kind": "statement", "text": format!("SELECT {seq}")})
            };
            let mut line = Vec::new();
            prev = encode_event(&mut line, &prev, seq, 1000 + seq, &event).unwrap();
            lines.push(line);
        }
        let seal = Seal::sign(&key, "host-a", id, events as u64, &prev);
        lines.push(serde_json::to_vec(&seal).unwrap());
        (lines, key)
    }

    fn check(lines: &[Vec<u8>]) -> Result<Verified, VerifyError> {
        verify(lines.iter().map(Vec::as_slice), None)
    }

    #[test]
    fn a_sealed_log_verifies() {
        let (lines, key) = log(5);
        let verified = check(&lines).unwrap();
        assert_eq!(verified.events, 5);
        assert_eq!(verified.host, "host-a");
        let trusted = hex::encode(key.verifying_key().as_bytes());
        verify(lines.iter().map(Vec::as_slice), Some(&trusted)).unwrap();
        let other = hex::encode(SigningKey::from_bytes(&[8; 32]).verifying_key().as_bytes());
        assert!(matches!(
            verify(lines.iter().map(Vec::as_slice), Some(&other)),
            Err(VerifyError::WrongKey { .. })
        ));
    }

    #[test]
    fn an_altered_byte_names_its_event() {
        let (mut lines, _) = log(5);
        let at = lines[3].windows(8).position(|w| w == b"SELECT 3").unwrap();
        lines[3][at + 7] = b'4';
        assert_eq!(
            check(&lines).unwrap_err(),
            VerifyError::Altered { seq: 3, line: 4 }
        );
    }

    #[test]
    fn a_removed_event_is_named_missing() {
        let (mut lines, _) = log(5);
        lines.remove(2);
        assert_eq!(
            check(&lines).unwrap_err(),
            VerifyError::Missing { seq: 2, found: 3 }
        );
        let (mut lines, _) = log(5);
        lines.remove(4); // the last event
        assert!(matches!(
            check(&lines).unwrap_err(),
            VerifyError::Truncated {
                sealed: 5,
                found: 4
            }
        ));
    }

    #[test]
    fn a_rewritten_chain_breaks_the_signature() {
        let (lines, _) = log(3);
        let mut seal: Seal = serde_json::from_slice(lines.last().unwrap()).unwrap();
        seal.events = 2;
        let mut cut = lines[..2].to_vec();
        cut.push(serde_json::to_vec(&seal).unwrap());
        seal.head = hex::encode(line_hash(&lines[1]).unwrap());
        *cut.last_mut().unwrap() = serde_json::to_vec(&seal).unwrap();
        assert_eq!(check(&cut).unwrap_err(), VerifyError::BadSignature);
    }

    #[test]
    fn an_unsealed_log_says_so() {
        let (mut lines, _) = log(3);
        lines.pop();
        assert_eq!(
            check(&lines).unwrap_err(),
            VerifyError::Unsealed { last: 2 }
        );
    }
}
