//! The access log: exactly one JSON line per intercepted connection.
//!
//! An [`AccessRecord`] is created on accept and written once, when its
//! connection ends (`conn::Conn` writes it, with the session record's end,
//! however the connection ends: denied, failed, or cancelled at shutdown). Lines go through `tracing` (target `access`) and
//! [`AccessLayer`] writes them as they are, one JSON object per line.
use std::{
    io::Write,
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, sync_channel},
    },
    time::{Instant, SystemTime},
};

use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, Layer};

use crate::{policy::Action, workload::Workload};

/// Bytes each way, updated by the copy loops while the record is alive.
#[derive(Debug, Default)]
pub struct ByteCounters {
    pub up: AtomicU64,
    pub down: AtomicU64,
}

#[derive(Debug)]
pub struct AccessRecord {
    started: Instant,
    time: SystemTime,
    pub session_id: ulid::Ulid,
    pub client: SocketAddr,
    pub orig_dst: Option<SocketAddr>,
    pub target: Option<String>,
    /// The target's protocol (for metrics).
    pub protocol: Option<&'static str>,
    pub workload: Option<Arc<Workload>>,
    pub decision: Option<Action>,
    /// False in audit mode: the decision was logged, not applied.
    pub enforced: bool,
    pub rule: Option<String>,
    pub reason: Option<String>,
    pub outcome: Outcome,
    pub error: Option<String>,
    pub bytes: Arc<ByteCounters>,
    /// Statement decisions, for protocols that decide statements.
    pub statements: Option<Arc<StatementCounts>>,
}

/// How a connection ended: the `outcome` of its access line and of its
/// session record's end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Either side closed.
    Closed,
    /// Refused by policy (or by the person asked to approve it).
    Denied,
    /// Not admitted: not redirected by the agent's programs, another
    /// socket's record, not a protected destination, or unrecordable.
    Rejected,
    /// The target could not be reached or failed the session.
    UpstreamError,
    /// The agent or the client failed the session.
    Error,
    /// It had not finished when the agent stopped.
    Cancelled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Denied => "denied",
            Self::Rejected => "rejected",
            Self::UpstreamError => "upstream_error",
            Self::Error => "error",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Statement decisions of one session, for its access line.
#[derive(Debug, Default, Serialize)]
pub struct StatementCounts {
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
}

impl AccessRecord {
    pub fn new(session_id: ulid::Ulid, client: SocketAddr) -> Self {
        Self {
            started: Instant::now(),
            time: SystemTime::now(),
            session_id,
            client,
            orig_dst: None,
            target: None,
            protocol: None,
            workload: None,
            decision: None,
            enforced: true,
            rule: None,
            reason: None,
            outcome: Outcome::Cancelled,
            error: None,
            bytes: Arc::default(),
            statements: None,
        }
    }

    pub fn finish(&mut self, outcome: Outcome, error: Option<String>) {
        self.outcome = outcome;
        self.error = error;
    }
}

#[derive(Serialize)]
struct Line<'a> {
    event: &'static str,
    time: String,
    session_id: String,
    client: SocketAddr,
    orig_dst: Option<SocketAddr>,
    target: Option<&'a str>,
    workload: Option<&'a Workload>,
    decision: Option<Action>,
    enforced: bool,
    rule: Option<&'a str>,
    reason: Option<&'a str>,
    outcome: Outcome,
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    statements: Option<&'a StatementCounts>,
    bytes_up: u64,
    bytes_down: u64,
    duration_ms: f64,
}

impl AccessRecord {
    /// Writes the connection's line (once: `conn::Conn` calls it as the
    /// connection ends).
    pub fn write(&self) {
        crate::metrics::get()
            .connections
            .get_or_create(&crate::metrics::ConnectionLabels {
                target: self.target.clone().unwrap_or_else(|| "-".into()),
                protocol: self.protocol.unwrap_or("-"),
                decision: self.decision.map_or("-", Action::as_str),
                outcome: self.outcome.as_str(),
            })
            .inc();
        let line = Line {
            event: "connection",
            time: humantime::format_rfc3339_millis(self.time).to_string(),
            session_id: self.session_id.to_string(),
            client: self.client,
            orig_dst: self.orig_dst,
            target: self.target.as_deref(),
            workload: self.workload.as_deref(),
            decision: self.decision,
            enforced: self.enforced,
            rule: self.rule.as_deref(),
            reason: self.reason.as_deref(),
            outcome: self.outcome,
            error: self.error.as_deref(),
            statements: self.statements.as_deref(),
            bytes_up: self.bytes.up.load(Ordering::Relaxed),
            bytes_down: self.bytes.down.load(Ordering::Relaxed),
            duration_ms: self.started.elapsed().as_secs_f64() * 1000.0,
        };
        match serde_json::to_string(&line) {
            Ok(json) => tracing::info!(target: "access", line = json.as_str()),
            Err(error) => tracing::error!(%error, "cannot serialise an access record"),
        }
    }
}

/// One statement of a session, its decision and what became of it: the
/// statement's own access line (`"event": "statement"`), beside its
/// connection's. Written when the statement completes (at once if denied).
#[derive(Serialize)]
pub struct StatementLine<'a> {
    pub event: &'static str,
    pub time: String,
    pub session_id: &'a str,
    pub target: &'a str,
    pub statement: &'a str,
    pub kinds: crate::policy::KindSet,
    pub tables: &'a [String],
    pub writes: bool,
    pub decision: Action,
    pub enforced: bool,
    pub rule: Option<&'a str>,
    pub outcome: crate::sessions::StatementOutcome,
    /// Rows returned or affected; `None` when it did not run.
    pub rows: Option<u64>,
    pub cells_masked: u64,
    pub duration_ms: Option<f64>,
}

impl StatementLine<'_> {
    /// Queues the line for the writer directly: statements are the hot
    /// path, so this skips the tracing dispatch and the copy it implies.
    pub fn write(&self) {
        write_line(self);
    }
}

/// Writes one JSON line to the access log (stdout, through the writer
/// thread once it runs).
pub fn write_line<T: Serialize>(record: &T) {
    let mut line = Vec::with_capacity(256);
    match serde_json::to_writer(&mut line, record) {
        Ok(()) => {
            line.push(b'\n');
            // serde_json writes UTF-8 only.
            let line = String::from_utf8(line).expect("JSON is UTF-8");
            match QUEUE.get() {
                Some(queue) => {
                    let _ = queue.send(Queued::Line(line));
                }
                None => print!("{line}"),
            }
        }
        Err(error) => tracing::error!(%error, "cannot serialise an access record"),
    }
}

/// Longest statement text kept in a statement line.
pub const MAX_STATEMENT_TEXT: usize = 4096;

/// Writes `access` events' `line` field verbatim to stdout (or the demo's
/// log file), one per line.
///
/// A writer thread does the writing, so a connection or statement never
/// waits for stdout (or the journal behind it): lines are queued (bounded;
/// when the queue is full the caller waits rather than a line being
/// dropped) and written in batches, flushed whenever the queue runs dry.
pub struct AccessLayer {
    queue: SyncSender<Queued>,
}

enum Queued {
    Line(String),
    /// Written once every line queued before it is on stdout.
    Flushed(SyncSender<()>),
}

/// Lines waiting for the writer; beyond this, writers wait.
const QUEUE_LINES: usize = 65_536;

static QUEUE: OnceLock<SyncSender<Queued>> = OnceLock::new();

impl AccessLayer {
    /// Starts the writer thread, writing to `out`.
    pub fn spawn(out: Box<dyn Write + Send>) -> Self {
        let (queue, lines) = sync_channel(QUEUE_LINES);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(lines, out))
            .expect("spawn the access-log writer");
        let _ = QUEUE.set(queue.clone());
        Self { queue }
    }
}

/// Lines are gathered for up to this long before a write, so a busy agent
/// makes one write (and wakes its reader once) per batch, not per line.
const BATCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(2);

fn write_lines(lines: Receiver<Queued>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, out);
    while let Ok(first) = lines.recv() {
        let deadline = std::time::Instant::now() + BATCH_WINDOW;
        let mut next = Some(first);
        while let Some(item) = next {
            match item {
                Queued::Line(line) => {
                    let _ = out.write_all(line.as_bytes());
                }
                Queued::Flushed(done) => {
                    let _ = out.flush();
                    let _ = done.send(());
                }
            }
            next = lines
                .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                .ok();
        }
        let _ = out.flush();
    }
}

/// Waits until every access line emitted so far is written (at exit).
pub fn flush() {
    if let Some(queue) = QUEUE.get() {
        let (done, wait) = sync_channel(1);
        if queue.send(Queued::Flushed(done)).is_ok() {
            let _ = wait.recv_timeout(std::time::Duration::from_secs(5));
        }
    }
}

struct LineVisitor(Option<String>);

impl Visit for LineVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "line" {
            let mut line = String::with_capacity(value.len() + 1);
            line.push_str(value);
            line.push('\n');
            self.0 = Some(line);
        }
    }

    fn record_debug(&mut self, _field: &Field, _value: &dyn std::fmt::Debug) {}
}

impl<S: tracing::Subscriber> Layer<S> for AccessLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != "access" {
            return;
        }
        let mut visitor = LineVisitor(None);
        event.record(&mut visitor);
        if let Some(line) = visitor.0 {
            let _ = self.queue.send(Queued::Line(line));
        }
    }
}
