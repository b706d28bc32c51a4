//! Logging in upstream with the target's held credential: SCRAM-SHA-256,
//! MD5 or cleartext, as the server asks (SCRAM and MD5 from
//! `postgres-protocol`, not hand-written crypto).
use bytes::BytesMut;
use postgres_protocol::{
    authentication::{
        md5_hash,
        sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256},
    },
    message::frontend,
};
use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::wire::{self, Frame, WireError};
use crate::policy::Credential;

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("the server refused the login: {message} (SQLSTATE {code})")]
    Refused { code: String, message: String },
    #[error("the server asks for {0}, which the agent does not support")]
    Unsupported(String),
    #[error("SCRAM exchange failed: {0}")]
    Scram(std::io::Error),
    #[error("unexpected message {0:?} during login")]
    Unexpected(char),
    #[error("{0}")]
    Tls(String),
}

/// Asks the server for TLS (SSLRequest) and completes the handshake,
/// verifying the server as `config` says.
pub async fn start_tls(
    mut tcp: TcpStream,
    config: std::sync::Arc<rustls::ClientConfig>,
    server_name: String,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, LoginError> {
    use tokio::io::AsyncReadExt;
    tcp.write_all(&[0, 0, 0, 8, 4, 210, 22, 47])
        .await
        .map_err(WireError::Io)?;
    match tcp.read_u8().await.map_err(WireError::Io)? {
        b'S' => {}
        b'N' => return Err(LoginError::Tls("the server does not offer TLS (set tls = \"disable\" on the target to connect in clear)".into())),
        other => return Err(LoginError::Unexpected(other as char)),
    }
    let name = rustls::pki_types::ServerName::try_from(server_name.clone())
        .map_err(|_| LoginError::Tls(format!("{server_name:?} is not a valid server name")))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| LoginError::Tls(format!("handshake with {server_name}: {e}")))
}

const AUTH_OK: i32 = 0;
const AUTH_CLEARTEXT: i32 = 3;
const AUTH_MD5: i32 = 5;
const AUTH_SASL: i32 = 10;
const AUTH_SASL_CONTINUE: i32 = 11;
const AUTH_SASL_FINAL: i32 = 12;

/// Takes the rule's role for the session (`SET ROLE`), after login.
pub async fn set_role<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    upstream: &mut S,
    role: &str,
) -> Result<(), LoginError> {
    let quoted = role.replace('"', "\"\"");
    simple_query(upstream, &format!("SET ROLE \"{quoted}\""), |_| Ok(())).await
}

/// Runs one simple query of the agent's own, handing each DataRow body to
/// `on_row`, up to ReadyForQuery; a server error is the result.
pub async fn simple_query<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    upstream: &mut S,
    sql: &str,
    mut on_row: impl FnMut(&[u8]) -> Result<(), LoginError>,
) -> Result<(), LoginError> {
    let mut out = BytesMut::new();
    frontend::query(sql, &mut out).map_err(WireError::Io)?;
    upstream.write_all(&out).await.map_err(WireError::Io)?;
    let mut buf = BytesMut::new();
    let mut refused = None;
    loop {
        let frame = wire::read_frame(upstream, &mut buf)
            .await?
            .ok_or(WireError::Closed)?;
        match frame.tag {
            b'D' => on_row(frame.body())?,
            b'E' => refused = Some(error_fields(frame.body())),
            b'Z' => {
                return match refused {
                    Some((code, message)) => Err(LoginError::Refused { code, message }),
                    None => Ok(()),
                };
            }
            _ => {}
        }
    }
}

/// SQLSTATE and message of an ErrorResponse body.
fn error_fields(body: &[u8]) -> (String, String) {
    let field = |tag: u8| {
        body.split(|b| *b == 0)
            .find(|f| f.first() == Some(&tag))
            .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
            .unwrap_or_default()
    };
    (field(b'C'), field(b'M'))
}

/// Sends the startup packet and authenticates. Returns what the server sent
/// after authentication (ParameterStatus, BackendKeyData, notices, up to
/// and including ReadyForQuery), for the client.
pub async fn login<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    upstream: &mut S,
    credential: &Credential,
    params: &[(&str, &str)],
) -> Result<Vec<Frame>, LoginError> {
    let mut out = BytesMut::new();
    let with_user =
        std::iter::once(("user", credential.user.as_str())).chain(params.iter().copied());
    frontend::startup_message(with_user, &mut out).map_err(WireError::Io)?;
    upstream.write_all(&out).await.map_err(WireError::Io)?;

    let mut scram: Option<ScramSha256> = None;
    let mut buf = BytesMut::new();
    let mut after_auth = Vec::new();
    loop {
        let frame = wire::read_frame(upstream, &mut buf)
            .await?
            .ok_or(WireError::Closed)?;
        let body = frame.body();
        out.clear();
        match frame.tag {
            b'R' => {
                if answer(body, credential, &mut scram, &mut out)? {
                    upstream.write_all(&out).await.map_err(WireError::Io)?;
                }
            }
            b'E' => {
                let (code, message) = error_fields(body);
                return Err(LoginError::Refused { code, message });
            }
            b'Z' => {
                after_auth.push(frame);
                return Ok(after_auth);
            }
            b'S' | b'K' | b'N' => after_auth.push(frame),
            other => return Err(LoginError::Unexpected(other as char)),
        }
    }
}

/// Answers one authentication request of the server into `out`; `false`
/// when there is nothing to send (login succeeded, or the server's SCRAM
/// signature checked out).
fn answer(
    request: &[u8],
    credential: &Credential,
    scram: &mut Option<ScramSha256>,
    out: &mut BytesMut,
) -> Result<bool, LoginError> {
    let password = credential.password.expose().as_bytes();
    let (code, data) = request
        .split_at_checked(4)
        .ok_or(LoginError::Unexpected('R'))?;
    match i32::from_be_bytes(code.try_into().expect("4 bytes")) {
        AUTH_OK => return Ok(false),
        AUTH_CLEARTEXT => frontend::password_message(password, out).map_err(WireError::Io)?,
        AUTH_MD5 => {
            let salt: [u8; 4] = data
                .get(..4)
                .and_then(|s| s.try_into().ok())
                .ok_or(LoginError::Unexpected('R'))?;
            let hash = md5_hash(credential.user.as_bytes(), password, salt);
            frontend::password_message(hash.as_bytes(), out).map_err(WireError::Io)?;
        }
        AUTH_SASL => {
            let offered = data
                .split(|b| *b == 0)
                .any(|m| m == SCRAM_SHA_256.as_bytes());
            if !offered {
                return Err(LoginError::Unsupported(format!(
                    "SASL mechanisms {:?}",
                    String::from_utf8_lossy(data)
                )));
            }
            let exchange = ScramSha256::new(password, ChannelBinding::unsupported());
            frontend::sasl_initial_response(SCRAM_SHA_256, exchange.message(), out)
                .map_err(WireError::Io)?;
            *scram = Some(exchange);
        }
        AUTH_SASL_CONTINUE => {
            let exchange = scram.as_mut().ok_or(LoginError::Unexpected('R'))?;
            exchange.update(data).map_err(LoginError::Scram)?;
            frontend::sasl_response(exchange.message(), out).map_err(WireError::Io)?;
        }
        AUTH_SASL_FINAL => {
            // Verifies the server's signature: a server that does
            // not know the password cannot complete the login.
            scram
                .as_mut()
                .ok_or(LoginError::Unexpected('R'))?
                .finish(data)
                .map_err(LoginError::Scram)?;
            return Ok(false);
        }
        other => {
            return Err(LoginError::Unsupported(format!(
                "authentication method {other}"
            )));
        }
    }
    Ok(true)
}
