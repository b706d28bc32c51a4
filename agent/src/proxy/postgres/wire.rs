//! PostgreSQL protocol 3.0 framing: the startup packet, typed-message frames
//! with size limits, and the few messages the proxy writes itself.
//!
//! Frames stay raw bytes: only `Query` and `Parse` are ever looked into.
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest startup packet accepted (PostgreSQL itself allows 10,000 bytes).
const MAX_STARTUP: usize = 10_000;
/// Largest message accepted from either side. PostgreSQL caps a field at
/// 1 GB; a message beyond this ends the session instead of exhausting memory.
pub const MAX_MESSAGE: usize = 256 * 1024 * 1024;

const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;
const PROTOCOL_3_0: i32 = 196_608;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed {what}: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("message {tag:?} of {len} bytes is over the {MAX_MESSAGE}-byte limit")]
    TooLarge { tag: char, len: usize },
    /// The session cannot be recorded: nothing more goes upstream.
    #[error(transparent)]
    Record(#[from] crate::sessions::StoreError),
}

fn malformed(what: &'static str, why: impl Into<String>) -> WireError {
    WireError::Malformed {
        what,
        why: why.into(),
    }
}

/// The first packet of a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Startup {
    SslRequest,
    GssEncRequest,
    Cancel {
        pid: i32,
        key: i32,
    },
    /// Protocol 3.0 startup parameters, in order (`user`, `database`, ...).
    Params(Vec<(String, String)>),
}

pub async fn read_startup<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Startup, WireError> {
    let len = match reader.read_i32().await {
        Ok(len) => len,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    };
    let len = usize::try_from(len)
        .ok()
        .filter(|l| (8..=MAX_STARTUP).contains(l))
        .ok_or_else(|| {
            malformed(
                "startup packet",
                format!("length {len} is outside 8..={MAX_STARTUP}"),
            )
        })?;
    let mut body = vec![0u8; len - 4];
    reader.read_exact(&mut body).await?;
    parse_startup(&body)
}

pub fn parse_startup(body: &[u8]) -> Result<Startup, WireError> {
    let mut buf = body;
    let code = buf.get_i32();
    match code {
        SSL_REQUEST => Ok(Startup::SslRequest),
        GSSENC_REQUEST => Ok(Startup::GssEncRequest),
        CANCEL_REQUEST if buf.remaining() == 8 => Ok(Startup::Cancel {
            pid: buf.get_i32(),
            key: buf.get_i32(),
        }),
        PROTOCOL_3_0 => {
            let mut fields = buf.split(|b| *b == 0);
            let mut params = Vec::new();
            loop {
                let key = fields
                    .next()
                    .ok_or_else(|| malformed("startup packet", "missing terminator"))?;
                if key.is_empty() {
                    break;
                }
                let value = fields
                    .next()
                    .ok_or_else(|| malformed("startup packet", "parameter without a value"))?;
                let text = |b: &[u8]| {
                    String::from_utf8(b.to_vec())
                        .map_err(|_| malformed("startup packet", "parameter is not UTF-8"))
                };
                params.push((text(key)?, text(value)?));
            }
            Ok(Startup::Params(params))
        }
        other => Err(malformed(
            "startup packet",
            format!("unsupported protocol or request code {other}"),
        )),
    }
}

/// One typed message: its tag and the whole frame (tag and length
/// included), so it can be forwarded as it came.
#[derive(Debug)]
pub struct Frame {
    pub tag: u8,
    pub bytes: Bytes,
}

impl Frame {
    /// The body after the tag and length.
    pub fn body(&self) -> &[u8] {
        &self.bytes[5..]
    }
}

/// Reads one typed message into `buf` (reused across calls); `None` on a
/// clean end of stream between messages.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> Result<Option<Frame>, WireError> {
    while buf.len() < 5 {
        if reader.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(malformed("message", "truncated header"))
            };
        }
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let len = usize::try_from(len)
        .ok()
        .filter(|l| *l >= 4)
        .ok_or_else(|| malformed("message", format!("length {len}")))?;
    if len > MAX_MESSAGE {
        return Err(WireError::TooLarge {
            tag: tag as char,
            len,
        });
    }
    let total = len + 1;
    buf.reserve(total.saturating_sub(buf.len()));
    while buf.len() < total {
        if reader.read_buf(buf).await? == 0 {
            return Err(malformed("message", "truncated body"));
        }
    }
    Ok(Some(Frame {
        tag,
        bytes: buf.split_to(total).freeze(),
    }))
}

/// Whether `buf` already holds a whole frame (so reading it will not block).
pub fn has_frame(buf: &[u8]) -> bool {
    buf.len() >= 5
        && usize::try_from(i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]))
            .is_ok_and(|len| buf.len() > len)
}

/// The SQL text of a `Query` ('Q') body.
pub fn query_text(body: &[u8]) -> Result<&str, WireError> {
    let text = body
        .strip_suffix(&[0])
        .ok_or_else(|| malformed("Query", "missing terminator"))?;
    std::str::from_utf8(text).map_err(|_| malformed("Query", "not UTF-8"))
}

/// A NUL-terminated string at the start of `body`, and what follows it.
fn cstr<'a>(body: &'a [u8], what: &'static str) -> Result<(&'a str, &'a [u8]), WireError> {
    let end = body
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| malformed(what, "missing terminator"))?;
    let text = std::str::from_utf8(&body[..end]).map_err(|_| malformed(what, "not UTF-8"))?;
    Ok((text, &body[end + 1..]))
}

/// The statement name and SQL text of a `Parse` ('P') body.
pub fn parse_fields(body: &[u8]) -> Result<(&str, &str), WireError> {
    let (name, rest) = cstr(body, "Parse")?;
    let (text, _) = cstr(rest, "Parse")?;
    Ok((name, text))
}

/// The SQL text of a `Parse` ('P') body.
#[cfg(test)]
pub fn parse_text(body: &[u8]) -> Result<&str, WireError> {
    parse_fields(body).map(|(_, text)| text)
}

/// The portal and statement names of a `Bind` ('B') body.
pub fn bind_names(body: &[u8]) -> Result<(&str, &str), WireError> {
    let (portal, rest) = cstr(body, "Bind")?;
    let (statement, _) = cstr(rest, "Bind")?;
    Ok((portal, statement))
}

/// The kind (`S`tatement or `P`ortal) and name of a `Describe` or `Close`.
pub fn target_name<'a>(body: &'a [u8], what: &'static str) -> Result<(u8, &'a str), WireError> {
    match body.split_first() {
        Some((kind @ (b'S' | b'P'), rest)) => Ok((*kind, cstr(rest, what)?.0)),
        _ => Err(malformed(what, "neither a statement nor a portal")),
    }
}

/// The portal name of an `Execute` ('E') body.
pub fn execute_portal(body: &[u8]) -> Result<&str, WireError> {
    cstr(body, "Execute").map(|(portal, _)| portal)
}

// === messages the proxy writes ===

pub fn authentication_ok(buf: &mut BytesMut) {
    buf.put_u8(b'R');
    buf.put_i32(8);
    buf.put_i32(0);
}

/// An ErrorResponse with severity FATAL or ERROR, a SQLSTATE and a message.
pub fn error_response(buf: &mut BytesMut, severity: &str, code: &str, message: &str) {
    report(buf, b'E', severity, code, message);
}

/// An ErrorResponse (`body`: its fields) again, without its `W` (where)
/// field.
pub fn without_context(body: &[u8], buf: &mut BytesMut) {
    let start = buf.len();
    buf.put_u8(b'E');
    buf.put_i32(0);
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
        if field != b'W' {
            buf.put_u8(field);
            buf.put_slice(&tail[..end]);
            buf.put_u8(0);
        }
        rest = tail.get(end + 1..).unwrap_or_default();
    }
    buf.put_u8(0);
    let len = (buf.len() - start - 1) as i32;
    buf[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
}

/// A NoticeResponse: shown by the client while it keeps waiting.
pub fn notice_response(buf: &mut BytesMut, message: &str) {
    report(buf, b'N', "NOTICE", "00000", message);
}

fn report(buf: &mut BytesMut, tag: u8, severity: &str, code: &str, message: &str) {
    let start = buf.len();
    buf.put_u8(tag);
    buf.put_i32(0);
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', message),
    ] {
        buf.put_u8(field);
        buf.put_slice(value.as_bytes());
        buf.put_u8(0);
    }
    buf.put_u8(0);
    let len = (buf.len() - start - 1) as i32;
    buf[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_bytes(params: &[(&str, &str)]) -> Vec<u8> {
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::startup_message(params.iter().copied(), &mut buf)
            .unwrap();
        buf.to_vec()
    }

    #[tokio::test]
    async fn startup_roundtrip_and_requests() {
        let bytes = startup_bytes(&[("user", "alice"), ("database", "orders")]);
        let startup = read_startup(&mut bytes.as_slice()).await.unwrap();
        assert_eq!(
            startup,
            Startup::Params(vec![
                ("user".into(), "alice".into()),
                ("database".into(), "orders".into())
            ])
        );

        let ssl = [0, 0, 0, 8, 4, 210, 22, 47];
        assert_eq!(
            read_startup(&mut ssl.as_slice()).await.unwrap(),
            Startup::SslRequest
        );
        let cancel = [0, 0, 0, 16, 4, 210, 22, 46, 0, 0, 0, 7, 0, 0, 0, 9];
        assert_eq!(
            read_startup(&mut cancel.as_slice()).await.unwrap(),
            Startup::Cancel { pid: 7, key: 9 }
        );
    }

    #[tokio::test]
    async fn malformed_startups_are_errors_not_panics() {
        let cases: [&[u8]; 5] = [
            &[0, 0, 0, 3],                                   // length below the minimum
            &[0, 1, 0, 0],                                   // absurd length
            &[0, 0, 0, 8, 0, 2, 0, 0],                       // protocol 2.0
            &[0, 0, 0, 12, 0, 3, 0, 0, b'u', 0, b'x', b'y'], // no terminator
            &[0, 0, 0, 10, 0, 3, 0, 0, b'u', 0],             // key without value
        ];
        for case in cases {
            assert!(
                matches!(
                    read_startup(&mut &case[..]).await,
                    Err(WireError::Malformed { .. }) | Err(WireError::Io(_))
                ),
                "{case:?}"
            );
        }
        assert!(matches!(
            read_startup(&mut &b""[..]).await,
            Err(WireError::Closed)
        ));
    }

    #[tokio::test]
    async fn frames_roundtrip_and_are_bounded() {
        let mut wire = BytesMut::new();
        postgres_protocol::message::frontend::query("SELECT 1", &mut wire).unwrap();
        postgres_protocol::message::frontend::parse("s1", "SELECT $1", [], &mut wire).unwrap();
        let mut reader = &wire[..];
        let mut buf = BytesMut::new();
        let q = read_frame(&mut reader, &mut buf).await.unwrap().unwrap();
        assert_eq!((q.tag, query_text(q.body()).unwrap()), (b'Q', "SELECT 1"));
        let p = read_frame(&mut reader, &mut buf).await.unwrap().unwrap();
        assert_eq!((p.tag, parse_text(p.body()).unwrap()), (b'P', "SELECT $1"));
        assert!(read_frame(&mut reader, &mut buf).await.unwrap().is_none());

        let huge = [b'Q', 0x7f, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame(&mut &huge[..], &mut BytesMut::new()).await,
            Err(WireError::TooLarge { .. })
        ));
        let negative = [b'Q', 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame(&mut &negative[..], &mut BytesMut::new()).await,
            Err(WireError::Malformed { .. })
        ));
        let truncated = [b'Q', 0, 0, 0, 9, b'S'];
        assert!(matches!(
            read_frame(&mut &truncated[..], &mut BytesMut::new()).await,
            Err(WireError::Malformed { .. })
        ));
    }

    #[test]
    fn error_response_is_well_formed() {
        let mut buf = BytesMut::new();
        error_response(&mut buf, "ERROR", "42501", "denied");
        assert_eq!(buf[0], b'E');
        let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        assert_eq!(len + 1, buf.len());
        assert!(buf.ends_with(b"Mdenied\0\0"));
    }
}
