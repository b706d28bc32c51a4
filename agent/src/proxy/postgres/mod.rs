//! PostgreSQL: a protocol-aware proxy that decides every statement.
//!
//! The session, in order:
//! 1. Startup from the client: SSL and GSS encryption requests are declined
//!    (`N`), the client's parameters kept; its password is never asked for.
//! 2. Upstream login with the target's held credential (`upstream.rs`).
//! 3. `AuthenticationOk` and the server's parameters go to the client.
//! 4. What names resolve to: the session's search path, and what
//!    `pg_catalog` holds (read once per target); when the session's masks
//!    name table columns, their OIDs (`catalog.rs`, `names.rs`).
//! 5. Client → server (`requests.rs`), message by message: each `Query`,
//!    `Parse` and `Bind` is analysed with PostgreSQL's own parser
//!    (`sql/`), its names resolved (`names.rs`) and every statement decided
//!    by policy (`statements.rs`); none of a denied query runs.
//! 6. Server → client (`responses.rs`): each response matched to its
//!    request; rows masked as they stream (`mask.rs`), each statement
//!    audited when it completes.
pub mod bench;
mod cancel;
mod catalog;
mod names;
mod requests;
mod responses;
mod rows;
pub mod sql;
mod statements;
mod upstream;
mod wire;

#[doc(hidden)]
pub mod fuzz;
#[cfg(test)]
mod tests;

pub use cancel::CancelKeys;
pub use names::SystemCatalog;
pub use sql::{Analyzer, Literals};

use std::sync::Arc;

use crate::access::StatementCounts;

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::server::TlsStream;
use tracing::Instrument;

use crate::{
    access::{ByteCounters, Outcome},
    addr::OrigDstAddr,
    conn::{Admitted, Conn},
    policy::{Credential, UpstreamTls},
    workload::Workload,
};
use wire::{Startup, WireError};

/// What a session needs besides its two sockets.
pub struct Session {
    pub session_id: String,
    /// How to secure the upstream connection, and the name to verify.
    pub upstream_tls: UpstreamTls,
    pub upstream_ca_file: Option<std::path::PathBuf>,
    pub server_name: String,
    /// The role to take after login (`as_user` of the admitting rule).
    pub as_user: Option<String>,
    /// The proxy's shared state: the live policy (re-read per statement, so
    /// a reload applies to open sessions) and the upstream socket mark.
    pub context: Arc<super::ProxyContext>,
    pub target: String,
    pub credential: Credential,
    pub workload: Arc<Workload>,
    /// The session's record: every statement is in it, durably, before it
    /// is sent upstream, or (one that cannot change the target) before its
    /// answer reaches the client.
    pub recorder: Arc<crate::sessions::Recorder>,
    /// What must be durable before the next answer goes to the client.
    pub answers: crate::sessions::TicketMark,
}

/// What PostgreSQL sessions share.
pub struct Shared {
    /// Statement analyses by shape, and the threads large ones parse on.
    pub analyzer: Arc<Analyzer>,
    /// What `pg_catalog` holds, per target (read by its first session).
    pub catalogs: parking_lot::Mutex<std::collections::HashMap<String, Arc<SystemCatalog>>>,
    /// Larger statements are refused (SQLSTATE 54000) without parsing.
    pub max_statement_bytes: usize,
    /// A client that has not finished its startup by then is dropped.
    pub startup_timeout: std::time::Duration,
    /// Each statement (and each HTTP request) also gets an access-log
    /// line.
    pub statement_lines: bool,
}

impl Shared {
    pub fn new(settings: &crate::config::AgentSettings) -> Self {
        let threads = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .min(2);
        Self {
            analyzer: Arc::new(Analyzer::new(threads)),
            catalogs: Default::default(),
            max_statement_bytes: settings.max_statement_bytes,
            startup_timeout: settings.startup_timeout,
            statement_lines: settings.access_log_statements,
        }
    }
}

/// Serves an admitted PostgreSQL connection until either side ends it.
pub async fn serve(context: Arc<super::ProxyContext>, admitted: Admitted) {
    let Admitted {
        mut conn,
        stream,
        orig_dst,
        workload,
        active,
        target,
        verdict,
        recorder,
        ..
    } = admitted;
    let policy = &active.policy;
    let target = policy.target(target);
    let Some(credential) = target.credential.clone() else {
        conn.end(
            Outcome::Error,
            Some("postgres target without a credential".into()),
        );
        return super::reset(stream);
    };
    let session = Session {
        // The role, when the admitting rule names one.
        as_user: verdict.rule.and_then(|id| policy.rule(id).as_user.clone()),
        session_id: recorder.id().to_string(),
        upstream_tls: target.tls,
        upstream_ca_file: target.tls_ca_file.clone(),
        server_name: super::upstream_name(target, &orig_dst),
        context,
        target: target.name.clone(),
        credential,
        workload,
        recorder,
        answers: Default::default(),
    };
    let (outcome, error) = run_session(stream, orig_dst, session, &mut conn).await;
    conn.end(outcome, error);
}

async fn run_session(
    client: TcpStream,
    dst: OrigDstAddr,
    session: Session,
    conn: &mut Conn,
) -> (Outcome, Option<String>) {
    // Requests and replies are small and latency-bound: no Nagle delays.
    let _ = client.set_nodelay(true);
    let counts = conn.count_statements();
    // Half-open clients must not pile up: the startup has a deadline.
    let timeout = session.context.pg.startup_timeout;
    let negotiated = tokio::time::timeout(timeout, negotiate(client, dst, &session.context))
        .await
        .unwrap_or_else(|_| {
            Err(SessionError {
                outcome: Outcome::Error,
                message: format!(
                    "the client did not finish its startup within {}",
                    humantime::format_duration(timeout)
                ),
                to_client: None,
            })
        });
    let ctx = Ctx {
        dst,
        session: &session,
        bytes: conn.bytes(),
        counts: &counts,
    };
    let result = match negotiated {
        Ok(Negotiated::Plain(mut tcp, params)) => session_on(&mut tcp, &params, ctx).await,
        Ok(Negotiated::Tls(mut tls, params)) => session_on(&mut *tls, &params, ctx).await,
        Ok(Negotiated::Cancel { pid, key }) => relay_cancel(dst, &session, pid, key).await,
        Ok(Negotiated::Closed) => Ok(()),
        Err(error) => Err(error),
    };
    match result {
        Ok(()) => (Outcome::Closed, None),
        Err(SessionError {
            outcome: Outcome::Closed,
            message,
            ..
        }) => {
            tracing::debug!(%message, "postgres session ended");
            (Outcome::Closed, None)
        }
        Err(SessionError {
            outcome, message, ..
        }) => {
            tracing::warn!(%message, "postgres session ended");
            (outcome, Some(message))
        }
    }
}

/// The peer hung up: EOF (rustls reports a missing close_notify so),
/// reset, broken pipe.
fn went_away(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        error.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

/// Refuses a session in the client's own protocol: after the startup
/// packet, a FATAL ErrorResponse (SQLSTATE 53100, as for a full disk).
pub async fn refuse(client: TcpStream, dst: OrigDstAddr, context: &super::ProxyContext, why: &str) {
    match negotiate(client, dst, context).await {
        Ok(Negotiated::Plain(mut tcp, _)) => fatal(&mut tcp, "53100", why).await,
        Ok(Negotiated::Tls(mut tls, _)) => fatal(&mut *tls, "53100", why).await,
        _ => {}
    }
}

/// What the steps of one session share.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    dst: OrigDstAddr,
    session: &'a Session,
    bytes: &'a ByteCounters,
    counts: &'a StatementCounts,
}

/// A connection, plain TCP or TLS (terminated by the agent for clients,
/// originated by it upstream), split into its two directions. Each kind is
/// compiled on its own: plain TCP splits without a lock, TLS through
/// tokio's shared-state split.
trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {
    fn halves(&mut self) -> (impl AsyncRead + Unpin + '_, impl AsyncWrite + Unpin + '_);
}

impl Duplex for TcpStream {
    fn halves(&mut self) -> (impl AsyncRead + Unpin + '_, impl AsyncWrite + Unpin + '_) {
        self.split()
    }
}

impl Duplex for TlsStream<TcpStream> {
    fn halves(&mut self) -> (impl AsyncRead + Unpin + '_, impl AsyncWrite + Unpin + '_) {
        tokio::io::split(self)
    }
}

impl Duplex for tokio_rustls::client::TlsStream<TcpStream> {
    fn halves(&mut self) -> (impl AsyncRead + Unpin + '_, impl AsyncWrite + Unpin + '_) {
        tokio::io::split(self)
    }
}

/// Runs the session on a negotiated connection; an error the client can
/// still be told about ends it with a FATAL ErrorResponse.
async fn session_on<C: Duplex>(
    client: &mut C,
    params: &[(String, String)],
    ctx: Ctx<'_>,
) -> Result<(), SessionError> {
    let result = run(client, params, ctx).await;
    if let Err(SessionError {
        to_client: Some((code, text)),
        ..
    }) = &result
    {
        fatal(client, code, text).await;
    }
    result
}

enum Negotiated {
    Plain(TcpStream, Vec<(String, String)>),
    Tls(Box<TlsStream<TcpStream>>, Vec<(String, String)>),
    Cancel { pid: i32, key: i32 },
    Closed,
}

/// The startup phase: SSL (answered with TLS when the agent has its local
/// CA), GSS encryption (declined), cancel, then the startup parameters.
async fn negotiate(
    mut tcp: TcpStream,
    dst: OrigDstAddr,
    context: &super::ProxyContext,
) -> Result<Negotiated, SessionError> {
    loop {
        match next_startup(&mut tcp).await? {
            Some(Startup::SslRequest) => {
                let Some(ca) = &context.tls else {
                    tcp.write_all(b"N")
                        .await
                        .map_err(|e| SessionError::protocol(e.into()))?;
                    continue;
                };
                tcp.write_all(b"S")
                    .await
                    .map_err(|e| SessionError::protocol(e.into()))?;
                let mut tls = match ca.accept(tcp, dst.0.ip(), crate::tls::Alpn::None).await {
                    Ok(tls) => tls,
                    // libpq gives up on TLS it does not want (sslmode=prefer
                    // with GSS first, a client that only probes): not an error.
                    Err(crate::tls::TlsError::Handshake(io)) if went_away(&io) => {
                        return Ok(Negotiated::Closed);
                    }
                    Err(error) => {
                        return Err(SessionError {
                            outcome: Outcome::Error,
                            message: error.to_string(),
                            to_client: None,
                        });
                    }
                };
                return match next_startup(&mut tls).await? {
                    Some(Startup::Params(params)) => Ok(Negotiated::Tls(Box::new(tls), params)),
                    Some(Startup::Cancel { pid, key }) => Ok(Negotiated::Cancel { pid, key }),
                    Some(other) => {
                        let error = WireError::Malformed {
                            what: "startup packet",
                            why: format!("{other:?} inside TLS"),
                        };
                        fatal(&mut tls, "08P01", &error.to_string()).await;
                        Err(SessionError::protocol(error))
                    }
                    None => Ok(Negotiated::Closed),
                };
            }
            Some(Startup::GssEncRequest) => tcp
                .write_all(b"N")
                .await
                .map_err(|e| SessionError::protocol(e.into()))?,
            Some(Startup::Cancel { pid, key }) => return Ok(Negotiated::Cancel { pid, key }),
            Some(Startup::Params(params)) => return Ok(Negotiated::Plain(tcp, params)),
            None => return Ok(Negotiated::Closed),
        }
    }
}

/// Reads a startup packet; a malformed one gets a FATAL ErrorResponse
/// naming what is wrong, and ends the session (never the agent).
async fn next_startup<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
) -> Result<Option<Startup>, SessionError> {
    match wire::read_startup(io).await {
        Ok(startup) => Ok(Some(startup)),
        Err(WireError::Closed) => Ok(None),
        Err(error) => {
            fatal(io, "08P01", &error.to_string()).await;
            Err(SessionError::protocol(error))
        }
    }
}

async fn fatal<S: AsyncWrite + Unpin + ?Sized>(io: &mut S, code: &str, text: &str) {
    let mut buf = BytesMut::new();
    wire::error_response(&mut buf, "FATAL", code, &format!("interlock: {text}"));
    let _ = io.write_all(&buf).await;
    let _ = io.flush().await;
}

struct SessionError {
    outcome: Outcome,
    message: String,
    /// SQLSTATE and text for a FATAL ErrorResponse, when the client can
    /// still be told in its own protocol.
    to_client: Option<(&'static str, String)>,
}

impl SessionError {
    /// The target failed the session: `log` for the agent's log, and the
    /// SQLSTATE and text of the client's FATAL (none when it cannot be told).
    fn upstream(log: String, to_client: Option<(&'static str, String)>) -> Self {
        Self {
            outcome: Outcome::UpstreamError,
            message: log,
            to_client,
        }
    }

    fn protocol(error: WireError) -> Self {
        let message = error.to_string();
        if let WireError::Io(io) = &error
            && went_away(io)
        {
            // A client (or server) that hangs up is not an error of anyone's.
            return Self {
                outcome: Outcome::Closed,
                message: format!("the other side went away ({io})"),
                to_client: None,
            };
        }
        let code = match error {
            WireError::Record(_) => "53100",
            _ => "08P01",
        };
        Self {
            outcome: Outcome::Error,
            to_client: Some((code, message.clone())),
            message,
        }
    }
}

/// Startup parameters passed on to the server (the rest are dropped).
const FORWARDED_PARAMETERS: [&str; 7] = [
    "application_name",
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "extra_float_digits",
    "lc_monetary",
];

async fn run<C: Duplex>(
    client: &mut C,
    params: &[(String, String)],
    ctx: Ctx<'_>,
) -> Result<(), SessionError> {
    let Ctx { dst, session, .. } = ctx;
    let param = |key: &str| {
        params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    if param("replication").is_some_and(|v| v != "false" && v != "0" && v != "off") {
        return Err(SessionError {
            outcome: Outcome::Denied,
            message: "replication connections are not allowed".into(),
            to_client: Some((
                "42501",
                "replication connections are not allowed through the agent".into(),
            )),
        });
    }
    // The database is the client's choice (libpq defaults it to the user
    // name); the role is always the held credential's.
    let database = param("database")
        .or(param("user"))
        .unwrap_or(&session.credential.user)
        .to_owned();
    // Only parameters that shape formatting pass: `options` (and the like)
    // could set search_path or a role at startup, changing what an
    // unqualified table name means behind the policy's back.
    let forwarded: Vec<(&str, &str)> = params
        .iter()
        .filter(|(k, _)| FORWARDED_PARAMETERS.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain(std::iter::once(("database", database.as_str())))
        .collect();

    let upstream = super::tcp::connect_upstream(dst, &*session.context.gate.kernel)
        .await
        .map_err(|e| {
            SessionError::upstream(
                format!("connecting to {dst}: {e}"),
                Some((
                    "08006",
                    format!("cannot reach target {:?} at {dst}: {e}", session.target),
                )),
            )
        })?;
    let _ = upstream.set_nodelay(true);
    let tls_error = |e: upstream::LoginError| {
        SessionError::upstream(
            format!("upstream TLS: {e}"),
            Some((
                "08006",
                format!(
                    "cannot secure the connection to target {:?}: {e}",
                    session.target
                ),
            )),
        )
    };
    match session.upstream_tls {
        UpstreamTls::Disable => relay(client, upstream, &forwarded, &database, ctx).await,
        mode => {
            let server_name = session.server_name.clone();
            let config = crate::tls::upstream_config(mode, session.upstream_ca_file.as_deref())
                .map_err(|e| tls_error(upstream::LoginError::Tls(e.to_string())))?;
            let upstream = upstream::start_tls(upstream, config, server_name)
                .await
                .map_err(tls_error)?;
            relay(client, upstream, &forwarded, &database, ctx).await
        }
    }
}

/// Logs in upstream, greets the client, then relays both ways.
/// What the upstream connection knows once it is ready for the client.
struct Prepared {
    /// The server's messages after authentication (parameters, backend
    /// key), passed on to the client.
    after_auth: Vec<wire::Frame>,
    policy: Arc<crate::policy::ActivePolicy>,
    resolved: catalog::Resolved,
    names: names::Names,
}

/// Logs in upstream with the held credential, takes the rule's role, and
/// reads what names and masked columns resolve to.
async fn prepare<U: Duplex>(
    upstream: &mut U,
    session: &Session,
    forwarded: &[(&str, &str)],
    database: &str,
) -> Result<Prepared, SessionError> {
    let after_auth = upstream::login(upstream, &session.credential, forwarded)
        .await
        .map_err(|e| {
            SessionError::upstream(
                format!("upstream login as {:?}: {e}", session.credential.user),
                Some((
                    "28000",
                    format!(
                        "login to target {:?} as its held role failed: {e}",
                        session.target
                    ),
                )),
            )
        })?;
    if let Some(role) = &session.as_user {
        upstream::set_role(upstream, role).await.map_err(|e| {
            SessionError::upstream(
                format!("SET ROLE {role:?}: {e}"),
                Some((
                    "28000",
                    format!(
                        "cannot take role {role:?} on target {:?}: {e}",
                        session.target
                    ),
                )),
            )
        })?;
    }
    let role = session
        .as_user
        .as_deref()
        .unwrap_or(&session.credential.user);
    tracing::info!(database = %database, %role, "postgres session started");

    let policy = session.context.gate.active.load_full();
    let columns = qualified_mask_columns(&policy, session);
    let resolved = catalog::resolve(upstream, &columns).await.map_err(|e| {
        SessionError::upstream(
            format!("looking up masked columns: {e}"),
            Some((
                "08006",
                format!(
                    "cannot look up the masked columns on target {:?}: {e}",
                    session.target
                ),
            )),
        )
    })?;

    let names = session_names(upstream, session).await.map_err(|e| {
        SessionError::upstream(
            format!("reading the search path and pg_catalog: {e}"),
            Some((
                "08006",
                format!(
                    "cannot read the search path on target {:?}: {e}",
                    session.target
                ),
            )),
        )
    })?;

    Ok(Prepared {
        after_auth,
        policy,
        resolved,
        names,
    })
}

async fn relay<C: Duplex, U: Duplex>(
    client: &mut C,
    mut upstream: U,
    forwarded: &[(&str, &str)],
    database: &str,
    ctx: Ctx<'_>,
) -> Result<(), SessionError> {
    let Ctx {
        session,
        bytes,
        counts,
        ..
    } = ctx;
    let Prepared {
        after_auth,
        policy,
        resolved,
        names,
    } = prepare(&mut upstream, session, forwarded, database).await?;

    let mut greeting = BytesMut::new();
    wire::authentication_ok(&mut greeting);
    for frame in &after_auth {
        greeting.extend_from_slice(&frame.bytes);
    }
    client
        .write_all(&greeting)
        .await
        .map_err(|e| SessionError::protocol(e.into()))?;

    // A cancel for this session's key withdraws a held statement.
    let cancel_guard = after_auth
        .iter()
        .find_map(cancel::backend_key)
        .map(|(pid, key)| session.context.pg_cancels.register(pid, key));
    let expected = responses::Expected::default();
    let (notices, notices_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut requests =
        requests::Requests::new(session, counts, &expected, policy, resolved, names, notices);
    requests.cancelled = cancel_guard.as_ref().map(|g| g.signal.clone());
    // `application_name=reason:…` at startup (PGAPPNAME) states why.
    requests.stated_reason = forwarded
        .iter()
        .find(|(key, _)| *key == "application_name")
        .and_then(|(_, value)| sql::labelled_reason(value));
    let mut responses = responses::Responses::new(session, counts, &expected, notices_rx);
    let (mut client_read, mut client_write) = client.halves();
    let (mut upstream_read, mut upstream_write) = upstream.halves();
    // Set when the client side fails: the server side then leaves the
    // client's connection open, so the session's FATAL can still reach it.
    let client_failed = std::sync::atomic::AtomicBool::new(false);
    let up = requests::relay_client(
        &mut client_read,
        &mut upstream_write,
        &mut requests,
        &bytes.up,
        &client_failed,
    );
    let down = responses::relay_server(
        &mut upstream_read,
        &mut client_write,
        &mut responses,
        &bytes.down,
        &client_failed,
    );
    // A result that cannot be recorded ends the session: the client's
    // side then stops waiting for a client that waits for that result.
    let down_failed = tokio::sync::Notify::new();
    let down = async {
        let result = down.await;
        if result.is_err() {
            down_failed.notify_one();
        }
        result
    };
    let up = async {
        tokio::select! {
            result = up.in_current_span() => result,
            () = down_failed.notified() => Ok(()),
        }
    };
    let (up, down) = tokio::join!(up, down);
    responses.finish();
    up.map_err(SessionError::protocol)?;
    down.map_err(|e| SessionError {
        outcome: Outcome::Error,
        // The store failing mid-result: the client is told why (a FATAL
        // may come at any point of the protocol), not just cut off.
        to_client: matches!(e, responses::ResponseError::Record(_))
            .then(|| ("53100", e.to_string())),
        message: e.to_string(),
    })
}

/// The session's name resolution: its search path as the server reports
/// it, and the target's `pg_catalog` (read by the target's first session,
/// on its own upstream connection, and kept).
async fn session_names<U: Duplex>(
    upstream: &mut U,
    session: &Session,
) -> Result<names::Names, upstream::LoginError> {
    let known = session
        .context
        .pg
        .catalogs
        .lock()
        .get(&session.target)
        .cloned();
    let catalog = match known {
        Some(catalog) => catalog,
        None => {
            let mut catalog = SystemCatalog::default();
            upstream::simple_query(upstream, SystemCatalog::RELATIONS_SQL, |row| {
                if let [Some(name)] = catalog::text_values(row).as_deref().unwrap_or_default() {
                    catalog.relations.insert((*name).to_owned());
                }
                Ok(())
            })
            .await?;
            upstream::simple_query(upstream, SystemCatalog::FUNCTIONS_SQL, |row| {
                if let [Some(name), Some(volatile)] =
                    catalog::text_values(row).as_deref().unwrap_or_default()
                {
                    catalog
                        .functions
                        .insert((*name).to_owned(), *volatile == "t");
                }
                Ok(())
            })
            .await?;
            let catalog = Arc::new(catalog);
            session
                .context
                .pg
                .catalogs
                .lock()
                .insert(session.target.clone(), catalog.clone());
            catalog
        }
    };
    let mut path = Vec::new();
    upstream::simple_query(
        upstream,
        "SELECT pg_catalog.unnest(pg_catalog.current_schemas(true))",
        |row| {
            if let [Some(schema)] = catalog::text_values(row).as_deref().unwrap_or_default() {
                path.push((*schema).to_owned());
            }
            Ok(())
        },
    )
    .await?;
    let user = session
        .as_user
        .clone()
        .unwrap_or_else(|| session.credential.user.clone());
    Ok(names::Names::new(catalog, path, user))
}

/// The table-qualified columns this session's masks name.
fn qualified_mask_columns<'p>(
    policy: &'p crate::policy::ActivePolicy,
    session: &Session,
) -> Vec<&'p crate::policy::ColumnName> {
    let Some(target) = policy.policy.target_id(&session.target) else {
        return Vec::new();
    };
    crate::policy::masks_for(&policy.policy, &session.workload, target)
        .into_iter()
        .filter_map(|mask| match &mask.selects {
            crate::policy::MaskSelects::Column(name) if name.is_qualified() => Some(name),
            _ => None,
        })
        .collect()
}

async fn relay_cancel(
    dst: OrigDstAddr,
    session: &Session,
    pid: i32,
    key: i32,
) -> Result<(), SessionError> {
    if session.context.pg_cancels.cancel(pid, key) {
        tracing::info!(
            backend_pid = pid,
            "cancel request withdrew a held statement"
        );
        return Ok(());
    }
    let mut upstream = super::tcp::connect_upstream(dst, &*session.context.gate.kernel)
        .await
        .map_err(|e| SessionError::upstream(format!("cancel: {e}"), None))?;
    let mut packet = Vec::with_capacity(16);
    packet.extend_from_slice(&16i32.to_be_bytes());
    packet.extend_from_slice(&wire::CANCEL_REQUEST.to_be_bytes());
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(&key.to_be_bytes());
    upstream
        .write_all(&packet)
        .await
        .map_err(|e| SessionError::upstream(format!("cancel: {e}"), None))?;
    tracing::info!(backend_pid = pid, "cancel request relayed");
    Ok(())
}
