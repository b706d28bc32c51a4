//! One session channel: the client's requests, already decided, go to
//! the server's channel in order; what the server sends comes back masked
//! and recorded, with its exit status, EOF and close.
use parking_lot::Mutex;
use std::{
    sync::Arc,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use bytes::Bytes;
use russh::{
    Channel, ChannelId, ChannelMsg, ChannelWriteHalf, Pty, Sig, client,
    server::{self, Msg},
};
use tokio::sync::mpsc;

use super::{Connection, Decision, RequestRecord, sftp::SftpLog};
use crate::{
    access::{ByteCounters, Outcome},
    approvals::{ApprovalError, NewRequest, RequestRecord as Request, Requester},
    conn::{self, Asked},
    masking::{MaskSet, StreamMask},
    policy::Action,
    sessions::{Event, StoreError},
};

/// What the client asked of a channel, in the order it asked.
pub enum Op {
    Data(Bytes),
    Eof,
    Close,
    Pty(PtyRequest),
    Env(String, String),
    WindowChange {
        cols: u32,
        rows: u32,
        pix_width: u32,
        pix_height: u32,
    },
    Signal(Sig),
    /// A decided exec, shell or subsystem.
    Start {
        start: Start,
        decision: Decision,
    },
}

pub struct PtyRequest {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
    pub pix_width: u32,
    pub pix_height: u32,
    pub modes: Vec<(Pty, u32)>,
}

pub enum Start {
    Exec(String),
    Shell,
    Subsystem(String),
}

impl Start {
    fn request(&self) -> &'static str {
        match self {
            Start::Exec(_) => "exec",
            Start::Shell => "shell",
            Start::Subsystem(_) => "subsystem",
        }
    }

    fn command(&self) -> Option<&str> {
        match self {
            Start::Exec(command) => Some(command),
            Start::Shell => None,
            Start::Subsystem(name) => Some(name),
        }
    }
}

/// Exit status of a command the agent refused, as a shell's for a command
/// found but not executable.
pub const REFUSED_STATUS: u32 = 126;

/// Output held back this long at most, waiting for the rest of a value
/// that may be a secret, before it goes out anyway.
const MASK_IDLE: Duration = Duration::from_millis(20);
/// The server's EOF is passed on right after its exit status, or after
/// this long without one. A client that has sent its own EOF closes the
/// channel on seeing the server's, and an exit status that reaches the
/// client's side after that close is lost: OpenSSH sends EOF, then the
/// status a moment later. Passed on as they came, a multiplexed `scp`
/// failed about once in fifty runs; with the EOF first and the status
/// right behind it, about once in a thousand (the client's close can
/// still slip between the two), and every time with 50 ms between them.
/// Status first, then EOF, leaves no gap: RFC 4254 allows either order
/// and `sshd` sends the status first when its child exits before its
/// output is drained.
const EOF_HOLD: Duration = Duration::from_millis(250);

/// Why a request does not run: refused (the session goes on), or its
/// record failed (the session ends).
enum Stop {
    Refused(String),
    Unrecordable(String),
}

impl Stop {
    fn into_message(self) -> String {
        match self {
            Stop::Refused(why) | Stop::Unrecordable(why) => why,
        }
    }
}

impl From<StoreError> for Stop {
    fn from(error: StoreError) -> Self {
        Stop::Unrecordable(format!("the session cannot be recorded: {error}"))
    }
}

/// What both directions of a channel know.
pub struct Relay {
    connection: Arc<Connection>,
    id: ChannelId,
    handle: server::Handle,
    /// The SSH user the client asked for.
    user: String,
    /// Set once the server was asked to start the command.
    started: AtomicBool,
    /// The masks on the command's output (exec and shell; never a
    /// subsystem's binary protocol), as the policy that let it start says.
    masks: Mutex<Option<Arc<MaskSet>>>,
    terminal: AtomicBool,
    /// Set once the session's record failed: no more output goes out.
    unrecorded: AtomicBool,
    sftp: Mutex<Option<SftpLog>>,
}

impl Relay {
    pub fn new(
        connection: Arc<Connection>,
        id: ChannelId,
        handle: server::Handle,
        user: String,
    ) -> Self {
        Self {
            connection,
            id,
            handle,
            user,
            started: AtomicBool::new(false),
            masks: Mutex::new(None),
            terminal: AtomicBool::new(false),
            unrecorded: AtomicBool::new(false),
            sftp: Mutex::new(None),
        }
    }

    /// Runs both directions until the server closes the channel, the
    /// client goes away, or a request is refused. Each direction waits
    /// only on its own peer's window, so neither can stall the other.
    pub async fn run(
        self,
        upstream: Channel<client::Msg>,
        to_client: ChannelWriteHalf<Msg>,
        ops: mpsc::Receiver<Op>,
    ) {
        let (from_server, to_server) = upstream.split();
        let mut down = Down {
            relay: &self,
            to_client,
            mask: None,
            eof_held: false,
        };
        tokio::select! {
            result = self.up(ops, &to_server) => match result {
                Ok(()) => {}
                Err(RelayError::Store(error)) => self.end_session(Stop::from(error).into_message()).await,
                Err(error) => tracing::warn!(%error, "channel ended"),
            },
            () = down.run(from_server) => {}
        }
        let _ = to_server.close().await;
    }

    /// Client to server: the ops, in order.
    async fn up(
        &self,
        mut ops: mpsc::Receiver<Op>,
        to_server: &ChannelWriteHalf<client::Msg>,
    ) -> Result<(), RelayError> {
        let recorder = &self.connection.recorder;
        while let Some(op) = ops.recv().await {
            match op {
                Op::Data(data) => self.input(data, to_server).await?,
                Op::Eof => to_server.eof().await?,
                Op::Close => to_server.close().await?,
                Op::Pty(pty) => {
                    self.terminal.store(true, Ordering::Relaxed);
                    recorder.append(&Event::Terminal {
                        channel: self.id.into(),
                        term: Some(&pty.term),
                        cols: pty.cols,
                        rows: pty.rows,
                    })?;
                    to_server
                        .request_pty(
                            false,
                            &pty.term,
                            pty.cols,
                            pty.rows,
                            pty.pix_width,
                            pty.pix_height,
                            &pty.modes,
                        )
                        .await?;
                }
                Op::Env(name, value) => to_server.set_env(false, name, value).await?,
                Op::WindowChange {
                    cols,
                    rows,
                    pix_width,
                    pix_height,
                } => {
                    recorder.append(&Event::Terminal {
                        channel: self.id.into(),
                        term: None,
                        cols,
                        rows,
                    })?;
                    to_server
                        .window_change(cols, rows, pix_width, pix_height)
                        .await?;
                }
                Op::Signal(signal) => to_server.signal(signal).await?,
                Op::Start { start, decision } => {
                    if !self.start(start, decision, to_server).await? {
                        return Ok(());
                    }
                }
            }
        }
        // The client is gone.
        Ok(())
    }

    /// The client's input: recorded (SFTP requests as events, a terminal's
    /// keystrokes with `record = "full"`), then sent on.
    async fn input(
        &self,
        data: Bytes,
        to_server: &ChannelWriteHalf<client::Msg>,
    ) -> Result<(), RelayError> {
        if !self.started.load(Ordering::Relaxed) {
            // Input before a command is allowed goes nowhere.
            return Ok(());
        }
        let recorder = &self.connection.recorder;
        self.connection
            .bytes
            .up
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if let Some(sftp) = self.sftp.lock().as_mut() {
            let mut failed = None;
            sftp.client_sent(&data, &mut |event| {
                if let Err(error) = recorder.append(event) {
                    failed.get_or_insert(error);
                }
            });
            if let Some(error) = failed {
                return Err(error.into());
            }
        } else if self.terminal.load(Ordering::Relaxed) && recorder.records_output() {
            recorder.append(&Event::Input { data: &data })?;
        }
        to_server.data_bytes(data).await?;
        Ok(())
    }

    /// A decided exec, shell or subsystem: recorded, held or refused, then
    /// started upstream. `false`: the channel is over (refused).
    async fn start(
        &self,
        start: Start,
        decision: Decision,
        to_server: &ChannelWriteHalf<client::Msg>,
    ) -> Result<bool, RelayError> {
        if self.started.load(Ordering::Relaxed) {
            return Ok(true);
        }
        let admitted = self.admit(&start, &decision).await.and_then(|()| {
            self.connection
                .masks(&decision.active)
                .map_err(Stop::Refused)
        });
        let masks = match admitted {
            Ok(masks) => masks,
            Err(Stop::Refused(refusal)) => {
                self.refuse(&refusal).await;
                return Ok(false);
            }
            Err(Stop::Unrecordable(error)) => {
                self.end_session(error).await;
                return Ok(false);
            }
        };
        match &start {
            Start::Subsystem(name) if name == "sftp" => {
                *self.sftp.lock() = Some(SftpLog::default());
            }
            Start::Subsystem(_) => {}
            _ => *self.masks.lock() = masks,
        }
        self.started.store(true, Ordering::Relaxed);
        match &start {
            Start::Exec(command) => to_server.exec(true, command.as_bytes()).await?,
            Start::Shell => to_server.request_shell(true).await?,
            Start::Subsystem(name) => to_server.request_subsystem(true, name.as_str()).await?,
        }
        Ok(true)
    }

    /// Records the request and applies its decision: `Err` says why it
    /// may not run.
    async fn admit(&self, start: &Start, decision: &Decision) -> Result<(), Stop> {
        let recorder = &self.connection.recorder;
        let request = RequestRecord {
            channel: self.id.into(),
            request: start.request(),
            command: start.command(),
        };
        let ticket = self
            .connection
            .record_request(&self.user, request, decision)?;
        // Nothing goes upstream before its record is on disk.
        recorder.durable(ticket).await?;
        let verdict = &decision.verdict;
        match verdict.action {
            Action::Deny if decision.enforced() => Err(Stop::Refused(verdict.reason.clone())),
            Action::Approve if decision.enforced() => self.approval(start, decision).await,
            _ => Ok(()),
        }
    }

    /// Holds the request until a person answers. The client waits with
    /// the request's id on its stderr; if it leaves, the relay ends and
    /// the request is withdrawn with it.
    async fn approval(&self, start: &Start, decision: &Decision) -> Result<(), Stop> {
        let connection = &self.connection;
        let policy = &decision.active.policy;
        let rule = decision
            .verdict
            .rule
            .map(|id| policy.rule(id))
            .ok_or_else(|| Stop::Refused("the approving rule is gone".into()))?;
        let spec = rule
            .approval
            .clone()
            .ok_or_else(|| Stop::Refused("the rule asks no one".into()))?;
        let requester = Requester::of(policy, &connection.workload);
        let approvals = &connection.context.gate.approvals;
        let target = &connection.target;
        if approvals.use_grant(&connection.recorder, &requester, target, &rule.name, |_| {
            false
        })? {
            return Ok(());
        }
        let command = match start {
            Start::Exec(command) => command.clone(),
            Start::Shell => "interactive shell".to_owned(),
            Start::Subsystem(name) => format!("subsystem {name}"),
        };
        let approvers = spec
            .approvers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let timeout = humantime::format_duration(spec.timeout).to_string();
        let request = NewRequest {
            requester,
            target,
            rule: &rule.name,
            spec,
            command: &command,
        };
        let waiting = async |record: &Request| {
            let id = &record.id;
            self.notice(&format!(
                "approval request {id} sent to {approvers}; waiting up to {timeout} \
                 (interlock approvals approve {id})"
            ))
            .await;
        };
        let gave_up = std::future::pending::<&str>();
        match conn::ask(approvals, &connection.recorder, request, waiting, gave_up).await {
            Ok(Asked::Approved(record)) => {
                self.notice(&format!("request {} approved", record.id))
                    .await;
                Ok(())
            }
            Ok(Asked::Refused(why)) => Err(Stop::Refused(why)),
            Ok(Asked::GaveUp { id, why }) => {
                Err(Stop::Refused(format!("{why}; request {id} withdrawn")))
            }
            Err(ApprovalError::Record(error)) => Err(error.into()),
            Err(error) => Err(Stop::Refused(format!(
                "approval needed, but the request cannot be recorded: {error}"
            ))),
        }
    }

    /// The session's record failed: the client is told why (stderr, exit
    /// 126), and the whole connection ends, as every protocol's does when
    /// its record fails.
    async fn end_session(&self, why: String) {
        tracing::error!(%why, "session ended: it cannot be recorded");
        self.connection.fail(Outcome::Error, why.clone());
        self.refuse(&why).await;
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, why, String::new())
            .await;
    }

    /// A line from the agent on the client's stderr.
    async fn notice(&self, text: &str) {
        let line = format!("interlock: {text}\r\n");
        let _ = self
            .handle
            .extended_data(self.id, 1, line.into_bytes())
            .await;
    }

    /// Tells the client why, exits 126, and ends the channel.
    async fn refuse(&self, why: &str) {
        tracing::info!(reason = why, "request refused");
        self.notice(&format!("refused: {why}")).await;
        let _ = self.record_exit(Some(REFUSED_STATUS), None);
        let _ = self
            .handle
            .exit_status_request(self.id, REFUSED_STATUS)
            .await;
        let _ = self.handle.eof(self.id).await;
        let _ = self.handle.close(self.id).await;
    }

    fn record_exit(&self, status: Option<u32>, signal: Option<&str>) -> Result<(), StoreError> {
        self.connection
            .recorder
            .append(&Event::Exit {
                channel: self.id.into(),
                status,
                signal,
            })
            .map(|_| ())
    }
}

/// Server to client: output (masked, recorded, counted), exit status,
/// EOF, close.
struct Down<'r> {
    relay: &'r Relay,
    to_client: ChannelWriteHalf<Msg>,
    mask: Option<StreamMask>,
    /// The server's EOF, not yet passed on (see [`EOF_HOLD`]).
    eof_held: bool,
}

impl Down<'_> {
    async fn run(&mut self, mut from_server: russh::ChannelReadHalf) {
        loop {
            let wait = if self.mask.as_ref().is_some_and(StreamMask::holding) {
                Some(MASK_IDLE)
            } else if self.eof_held {
                Some(EOF_HOLD)
            } else {
                None
            };
            let message = match wait {
                Some(wait) => match tokio::time::timeout(wait, from_server.wait()).await {
                    Ok(message) => message,
                    Err(_) => {
                        // An idle moment: what was held back goes out.
                        self.flush_mask().await;
                        self.release_eof().await;
                        continue;
                    }
                },
                None => from_server.wait().await,
            };
            if !self.pass_on(message).await {
                return;
            }
        }
    }

    async fn release_eof(&mut self) {
        if std::mem::take(&mut self.eof_held) {
            let _ = self.relay.handle.eof(self.relay.id).await;
        }
    }

    /// Passes one server message on; `false` when the channel is done.
    async fn pass_on(&mut self, message: Option<ChannelMsg>) -> bool {
        let relay = self.relay;
        let (handle, id) = (&relay.handle, relay.id);
        let Some(message) = message else {
            // The upstream connection is gone.
            self.flush_mask().await;
            self.release_eof().await;
            let _ = handle.close(id).await;
            return false;
        };
        match message {
            ChannelMsg::Data { data } => self.output(None, data).await,
            ChannelMsg::ExtendedData { data, ext } => self.output(Some(ext), data).await,
            ChannelMsg::Eof => {
                self.flush_mask().await;
                self.eof_held = true;
            }
            ChannelMsg::ExitStatus { exit_status } => {
                self.flush_mask().await;
                let _ = relay.record_exit(Some(exit_status), None);
                let _ = handle.exit_status_request(id, exit_status).await;
                self.release_eof().await;
            }
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                lang_tag,
            } => {
                self.flush_mask().await;
                let _ = relay.record_exit(None, Some(&format!("{signal_name:?}")));
                let _ = handle
                    .exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag)
                    .await;
                self.release_eof().await;
            }
            ChannelMsg::Failure => {
                // The server refused to start what policy allowed.
                relay.notice("the server refused the request").await;
                let _ = relay.record_exit(Some(255), None);
                let _ = handle.exit_status_request(id, 255).await;
                let _ = handle.eof(id).await;
                let _ = handle.close(id).await;
                return false;
            }
            ChannelMsg::Close => {
                self.flush_mask().await;
                self.release_eof().await;
                let _ = handle.close(id).await;
                return false;
            }
            _ => {}
        }
        true
    }

    async fn output(&mut self, ext: Option<u32>, data: Bytes) {
        let relay = self.relay;
        // An SFTP channel's packets become events; its bytes are not
        // terminal output.
        let sftp = match relay.sftp.lock().as_mut() {
            Some(sftp) => {
                sftp.server_sent(&data);
                true
            }
            None => false,
        };
        if self.mask.is_none()
            && let Some(masks) = relay.masks.lock().clone()
        {
            self.mask = Some(StreamMask::new(masks));
        }
        match self.mask.as_mut() {
            Some(mask) => {
                for (ext, chunk) in mask.push(ext, &data) {
                    self.deliver(ext, chunk, true).await;
                }
            }
            None => self.deliver(ext, data, !sftp).await,
        }
    }

    async fn flush_mask(&mut self) {
        if let Some(chunks) = self.mask.as_mut().map(StreamMask::flush) {
            for (ext, chunk) in chunks {
                self.deliver(ext, chunk, true).await;
            }
        }
    }

    /// Sends output on to the client; `terminal` output is recorded with
    /// `record = "full"` (masked output always is: never a subsystem's).
    async fn deliver(&self, ext: Option<u32>, data: Bytes, terminal: bool) {
        if data.is_empty() {
            return;
        }
        let relay = self.relay;
        if relay.unrecorded.load(Ordering::Relaxed) {
            return;
        }
        let recorder = &relay.connection.recorder;
        if terminal
            && recorder.records_output()
            && let Err(error) = recorder.append(&Event::Output { data: &data })
        {
            // Nothing passes on unrecorded: the session ends here.
            relay.unrecorded.store(true, Ordering::Relaxed);
            relay.end_session(Stop::from(error).into_message()).await;
            return;
        }
        relay
            .connection
            .bytes
            .down
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let _ = match ext {
            None => self.to_client.data_bytes(data).await,
            Some(ext) => self.to_client.extended_data_bytes(ext, data).await,
        };
    }
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("ssh: {0}")]
    Ssh(#[from] russh::Error),
    #[error("recording: {0}")]
    Store(#[from] StoreError),
}

/// A forwarded port (`ssh -L`), once allowed: bytes both ways.
pub async fn forward(client: Channel<Msg>, server: Channel<client::Msg>, bytes: Arc<ByteCounters>) {
    let mut client = client.into_stream();
    let mut server = server.into_stream();
    match tokio::io::copy_bidirectional(&mut client, &mut server).await {
        Ok((up, down)) => {
            bytes.up.fetch_add(up, Ordering::Relaxed);
            bytes.down.fetch_add(down, Ordering::Relaxed);
        }
        Err(error) => tracing::debug!(%error, "forwarded connection ended"),
    }
}
