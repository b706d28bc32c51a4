//! SSH: the agent is the server the client talks to (its own host key,
//! the client's authentication accepted: who calls comes from the kernel)
//! and a client of the real server (the held credential). Every channel
//! request is decided by policy before anything of it goes upstream.
//!
//! ```text
//! client ──ssh──▶ ClientHandler (russh server; one per connection)
//!                   │ decides exec / shell / subsystem / pty / env /
//!                   │ forwarding, answers the client at once
//!                   ▼ Op (bounded queue, in order)
//!                 channel::relay (a task per channel) ──ssh──▶ server
//!                   ◀── output, masked and recorded; exit status, EOF, close
//! ```
/// Command lines up to this size are parsed where they arrive (a few µs;
/// Ansible's longest, 334 bytes, in 44 µs); longer ones on the blocking
/// pool.
const INLINE_PARSE_BYTES: usize = 2048;

mod channel;
#[doc(hidden)]
pub mod fuzz;
mod host_key;
mod sftp;
mod upstream;

pub use host_key::{known_hosts_lines, load_or_create_host_key};

use std::{
    collections::HashMap,
    sync::{Arc, Weak},
    time::Duration,
};

use futures::{FutureExt, future::BoxFuture, future::Shared};
use russh::{
    Channel, ChannelId, ChannelOpenFailure, Pty, Sig, cipher,
    server::{self, Auth, Msg, Session as ServerSession},
};
use tokio::{net::TcpStream, sync::mpsc};
use tracing::Instrument;

use crate::{
    access::Outcome,
    conn::Admitted,
    masking::MaskSet,
    policy::{
        Action, ActivePolicy, CommandLine, SshRequest, TargetId, Verdict, evaluate_ssh,
        ssh_env_allowed, ssh_pty_allowed,
    },
    sessions::{Event, Recorder},
    workload::Workload,
};

pub(crate) use super::Decision;
use super::ProxyContext;

/// Each side's channel window, and how many messages a channel queues
/// before the connection waits for it: bounded memory per channel.
pub(crate) const WINDOW_SIZE: u32 = 2 * 1024 * 1024;
pub(crate) const CHANNEL_BUFFER: usize = 64;
const PACKET_SIZE: u32 = 32 * 1024;

/// The client-facing server configuration, made once at start.
pub fn server_config(host_key: russh::keys::PrivateKey) -> Arc<server::Config> {
    Arc::new(server::Config {
        server_id: russh::SshId::Standard("SSH-2.0-Interlock".into()),
        keys: vec![host_key],
        auth_rejection_time: Duration::from_millis(0),
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        window_size: WINDOW_SIZE,
        maximum_packet_size: PACKET_SIZE,
        channel_buffer_size: CHANNEL_BUFFER,
        event_buffer_size: CHANNEL_BUFFER,
        nodelay: true,
        preferred: preferred(&[cipher::AES_256_GCM, cipher::AES_128_GCM]),
        ..Default::default()
    })
}

/// The default algorithms with these ciphers. AES-GCM comes first on both
/// hops: ring runs it on the CPU's AES instructions, several times faster
/// than russh's ChaCha20 and CTR modes, and every byte is encrypted twice
/// on its way through the agent. Clients are offered AES-GCM only, since an
/// OpenSSH client takes ChaCha20 or CTR first whenever offered.
pub(crate) fn preferred(ciphers: &'static [cipher::Name]) -> russh::Preferred {
    russh::Preferred {
        cipher: std::borrow::Cow::Borrowed(ciphers),
        ..russh::Preferred::default()
    }
}

type UpstreamFuture = Shared<BoxFuture<'static, Result<Arc<upstream::Upstream>, String>>>;

/// What every channel of a connection shares.
pub(crate) struct Connection {
    pub context: Arc<ProxyContext>,
    /// The target's name: requests are decided under the policy live when
    /// they come (a reload reaches running sessions), by this name.
    pub target: String,
    pub workload: Arc<Workload>,
    pub recorder: Arc<Recorder>,
    /// The upstream connection, started as the client connects, so both
    /// handshakes happen at once.
    upstream: UpstreamFuture,
    /// Why the connection failed (upstream, or its record), for its end.
    pub failure: parking_lot::Mutex<Option<(Outcome, String)>>,
    pub bytes: Arc<crate::access::ByteCounters>,
    /// The masks of the policy that decided the last request, by policy.
    masks: parking_lot::Mutex<(Weak<ActivePolicy>, Option<Arc<MaskSet>>)>,
}

impl Connection {
    /// The live policy, and the target in it (gone if a reload removed it).
    fn policy(&self) -> (Arc<ActivePolicy>, Option<TargetId>) {
        let active = self.context.gate.active.load_full();
        let target = active.policy.target_id(&self.target);
        (active, target)
    }

    /// Decides `request` under the live policy.
    fn decide(&self, user: &str, request: &SshRequest) -> Decision {
        let (active, target) = self.policy();
        let verdict = match target {
            Some(target) => evaluate_ssh(&active.policy, &self.workload, target, user, request),
            None => Verdict::refused(format!(
                "target {:?} is no longer in the policy",
                self.target
            )),
        };
        Decision::new(verdict, active, &self.workload, target)
    }

    /// What the agent never passes on, whatever the policy.
    fn refused(&self, reason: &str) -> Decision {
        Decision::new(
            Verdict::refused(reason),
            self.context.gate.active.load_full(),
            &self.workload,
            None,
        )
    }

    /// The free-text masks `decision`'s policy puts on this workload's
    /// output (compiled once per policy).
    pub fn masks(&self, active: &Arc<ActivePolicy>) -> Result<Option<Arc<MaskSet>>, String> {
        let mut cached = self.masks.lock();
        if let Some(current) = cached.0.upgrade()
            && Arc::ptr_eq(&current, active)
        {
            return Ok(cached.1.clone());
        }
        let target = active
            .policy
            .target_id(&self.target)
            .ok_or_else(|| format!("target {:?} is no longer in the policy", self.target))?;
        let masks = compile_masks(&active.policy, &self.workload, target, &self.context)?;
        *cached = (Arc::downgrade(active), masks.clone());
        Ok(masks)
    }

    /// Ends the connection because its record failed: nothing more may
    /// pass unrecorded.
    pub fn fail(&self, outcome: Outcome, why: String) {
        let mut failure = self.failure.lock();
        failure.get_or_insert((outcome, why));
    }

    /// Records a request and its decision: a session event (the ticket
    /// says when it is on disk) and an access line. A refusal counts as a
    /// denied statement of the session.
    pub fn record_request(
        &self,
        user: &str,
        request: RequestRecord<'_>,
        decision: &Decision,
    ) -> Result<crate::sessions::Ticket, crate::sessions::StoreError> {
        let verdict = &decision.verdict;
        let enforced = decision.enforced();
        let event = Event::SshRequest {
            channel: request.channel,
            request: request.request,
            command: request.command,
            decision: verdict.action,
            enforced,
            rule: decision.rule_name(),
            reason: &verdict.reason,
        };
        let recorder = &self.recorder;
        let ticket = recorder.append(&event)?;
        recorder.count_statement(verdict.action == Action::Deny && enforced);
        if self.context.pg.statement_lines {
            crate::access::write_line(&RequestLine {
                event: "ssh_request",
                time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
                session_id: recorder.id().to_string(),
                target: &self.target,
                user,
                request: &event,
            });
        }
        Ok(ticket)
    }
}

/// Only masks of values apply to a byte stream; column masks (which a rule
/// may also hold for PostgreSQL targets) are not SSH's.
fn compile_masks(
    policy: &crate::policy::Policy,
    workload: &Workload,
    target: TargetId,
    context: &ProxyContext,
) -> Result<Option<Arc<MaskSet>>, String> {
    let list: Vec<&crate::policy::Mask> = crate::policy::masks_for(policy, workload, target)
        .into_iter()
        .filter(|mask| mask.selects.is_free_text())
        .collect();
    if list.is_empty() {
        return Ok(None);
    }
    MaskSet::compile(&list, &HashMap::new(), context.mask_key.clone())
        .map(|set| Some(Arc::new(set)))
        .map_err(|error| format!("masks on columns not found: {}", error.0.join(", ")))
}

/// What a request was, for [`Connection::record_request`].
pub(crate) struct RequestRecord<'a> {
    /// The client's channel; `u32::MAX` for a global request.
    pub channel: u32,
    pub request: &'a str,
    pub command: Option<&'a str>,
}

/// The access line of a request: the session event, with whose it is.
#[derive(serde::Serialize)]
struct RequestLine<'a> {
    event: &'static str,
    time: String,
    session_id: String,
    target: &'a str,
    user: &'a str,
    #[serde(flatten)]
    request: &'a Event<'a>,
}

pub async fn serve(context: Arc<ProxyContext>, admitted: Admitted) {
    let Admitted {
        mut conn,
        stream,
        orig_dst,
        workload,
        active,
        target,
        recorder,
        ..
    } = admitted;
    let target = active.policy.target(target);
    let (outcome, error) = match target.ssh.clone() {
        None => (
            Outcome::Error,
            Some("ssh target without a credential".into()),
        ),
        Some(settings) => {
            let host_name = super::upstream_name(target, &orig_dst);
            let connect =
                upstream::connect(orig_dst, context.gate.kernel.clone(), host_name, settings);
            let connection = Arc::new(Connection {
                target: target.name.clone(),
                upstream: start_upstream(connect),
                context,
                workload,
                recorder,
                failure: Default::default(),
                bytes: conn.bytes().clone(),
                masks: parking_lot::Mutex::new((Weak::new(), None)),
            });
            match connection.masks(&active) {
                // Fail closed: never serve a session whose masks are off.
                Err(why) => {
                    tracing::error!(%why, "SSH masks cannot be compiled; session refused");
                    (Outcome::Error, Some(why))
                }
                Ok(_) => run(connection, stream).await,
            }
        }
    };
    conn.end(outcome, error);
}

/// Starts the upstream handshake now, shared by every channel.
fn start_upstream(
    connect: impl std::future::Future<Output = Result<upstream::Upstream, upstream::UpstreamError>>
    + Send
    + 'static,
) -> UpstreamFuture {
    let connect = tokio::spawn(connect.in_current_span());
    async move {
        match connect.await {
            Ok(Ok(handle)) => Ok(Arc::new(handle)),
            Ok(Err(error)) => Err(error.to_string()),
            Err(error) => Err(format!("connecting upstream: {error}")),
        }
    }
    .boxed()
    .shared()
}

/// Serves the client until it leaves; how the connection ended.
async fn run(connection: Arc<Connection>, stream: TcpStream) -> (Outcome, Option<String>) {
    let config = connection.context.ssh_server.clone();
    let relays = Arc::new(parking_lot::Mutex::new(tokio::task::JoinSet::new()));
    let handler = ClientHandler {
        connection: connection.clone(),
        user: String::new(),
        channels: HashMap::new(),
        relays: relays.clone(),
    };
    let result = match server::run_stream(config, stream, handler).await {
        Ok(running) => running.await,
        Err(error) => Err(error),
    };
    // The client is gone: give channels a moment to pass on what the
    // server still sends (exit statuses), then end them (a request held
    // for approval is withdrawn when its relay ends).
    let mut relays = std::mem::take(&mut *relays.lock());
    if tokio::time::timeout(Duration::from_secs(1), async {
        while relays.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        relays.abort_all();
        while relays.join_next().await.is_some() {}
    }
    let failure = connection.failure.lock().take();
    match (result, failure) {
        (_, Some((outcome, error))) => (outcome, Some(error)),
        (Ok(()), None) => (Outcome::Closed, None),
        (Err(SshError::Ssh(russh::Error::Disconnect | russh::Error::IO(_))), None) => {
            (Outcome::Closed, None)
        }
        (Err(other), None) => (Outcome::Error, Some(other.to_string())),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("{0}")]
    Ssh(#[from] russh::Error),
    #[error("the session cannot be recorded: {0}")]
    Store(#[from] crate::sessions::StoreError),
}

/// The russh server handler of one connection: decides each request and
/// hands it, in order, to the channel's relay.
struct ClientHandler {
    connection: Arc<Connection>,
    /// The SSH user the client asked for.
    user: String,
    channels: HashMap<ChannelId, mpsc::Sender<channel::Op>>,
    relays: Arc<parking_lot::Mutex<tokio::task::JoinSet<()>>>,
}

impl ClientHandler {
    fn login(&mut self, user: &str, method: &str) -> Result<Auth, SshError> {
        if self.user.is_empty() {
            self.connection
                .recorder
                .append(&Event::SshLogin { user, method })?;
        }
        self.user = user.to_owned();
        Ok(Auth::Accept)
    }

    fn decide(&self, request: &SshRequest) -> Decision {
        self.connection.decide(&self.user, request)
    }

    /// A per-channel setting the live policy allows (`pty`, `env`); none
    /// once the target is gone from the policy.
    fn allows(&self, setting: impl Fn(&crate::policy::Policy, TargetId) -> bool) -> bool {
        let (active, target) = self.connection.policy();
        !active.enforce || target.is_some_and(|target| setting(&active.policy, target))
    }

    /// Queues an op for a channel's relay (waiting while it is busy: that
    /// is the client's flow control). A relay that has ended takes nothing.
    async fn send(&self, channel: ChannelId, op: channel::Op) {
        if let Some(tx) = self.channels.get(&channel) {
            let _ = tx.send(op).await;
        }
    }

    /// Answers a channel request and queues what starts the channel.
    async fn start(
        &self,
        channel: ChannelId,
        start: channel::Start,
        decision: Decision,
        session: &mut ServerSession,
    ) -> Result<(), SshError> {
        // The client hears "success" whatever the decision: a denied
        // command then tells why on stderr and exits 126, as a shell does
        // for a command it may not run.
        session.channel_success(channel)?;
        self.send(channel, channel::Op::Start { start, decision })
            .await;
        Ok(())
    }
}

impl server::Handler for ClientHandler {
    type Error = SshError;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        self.login(user, "none")
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        // Accepted and dropped: never logged, never used upstream.
        self.login(user, "password")
    }

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        _offer: server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        _key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        self.login(user, "publickey")
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        _response: Option<server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        self.login(user, "keyboard-interactive")
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        session: &mut ServerSession,
    ) -> Result<(), Self::Error> {
        let id = channel.id();
        // The client's messages come through the callbacks below, so the
        // channel's own queue is dropped; its write half (which waits for
        // the client's window) carries output.
        let (_, to_client) = channel.split();
        let upstream = match self.connection.upstream.clone().await {
            Ok(upstream) => upstream
                .channel_open_session()
                .await
                .map_err(|e| e.to_string()),
            Err(error) => Err(error),
        };
        let upstream = match upstream {
            Ok(upstream) => upstream,
            Err(error) => {
                // Accept, then say why on stderr and exit 255 as ssh does
                // for a connection it cannot make: the user reads it in
                // their terminal, not as a bare "open failed".
                tracing::warn!(%error, "upstream unavailable");
                self.connection.fail(Outcome::UpstreamError, error.clone());
                reply.accept().await;
                let handle = session.handle();
                tokio::spawn(async move {
                    let message = format!("interlock: {error}\r\n");
                    let _ = to_client.extended_data_bytes(1, message.into_bytes()).await;
                    let _ = handle.exit_status_request(id, 255).await;
                    let _ = handle.eof(id).await;
                    let _ = handle.close(id).await;
                });
                return Ok(());
            }
        };
        reply.accept().await;
        let (tx, rx) = mpsc::channel(CHANNEL_BUFFER);
        self.channels.insert(id, tx);
        let relay = channel::Relay::new(
            self.connection.clone(),
            id,
            session.handle(),
            self.user.clone(),
        );
        self.relays
            .lock()
            .spawn(relay.run(upstream, to_client, rx).in_current_span());
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: server::ChannelOpenHandle,
        _session: &mut ServerSession,
    ) -> Result<(), Self::Error> {
        let port16 = u16::try_from(port).unwrap_or(0);
        let decision = self.decide(&SshRequest::Forward { host, port: port16 });
        let request = RequestRecord {
            channel: channel.id().into(),
            request: "forward",
            command: Some(&format!("{host}:{port}")),
        };
        let ticket = self
            .connection
            .record_request(&self.user, request, &decision)?;
        let verdict = &decision.verdict;
        if verdict.action != Action::Allow && decision.enforced() {
            tracing::info!(host, port, reason = %verdict.reason, "port forwarding refused");
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        self.connection.recorder.durable(ticket).await?;
        let opened = match self.connection.upstream.clone().await {
            Ok(upstream) => upstream
                .channel_open_direct_tcpip(host, port, "127.0.0.1", 0)
                .await
                .map_err(|e| e.to_string()),
            Err(error) => Err(error),
        };
        let upstream = match opened {
            Ok(upstream) => upstream,
            Err(error) => {
                tracing::warn!(%error, host, port, "forwarding failed upstream");
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                return Ok(());
            }
        };
        reply.accept().await;
        // A forwarded port carries bytes only: copy both ways.
        let bytes = self.connection.bytes.clone();
        self.relays
            .lock()
            .spawn(channel::forward(channel, upstream, bytes).in_current_span());
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut ServerSession,
    ) -> Result<(), Self::Error> {
        self.send(
            channel,
            channel::Op::Data(bytes::Bytes::copy_from_slice(data)),
        )
        .await;
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut ServerSession,
    ) -> Result<(), Self::Error> {
        self.send(channel, channel::Op::Eof).await;
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut ServerSession,
    ) -> Result<(), Self::Error> {
        self.send(channel, channel::Op::Close).await;
        self.channels.remove(&channel);
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        cols: u32,
        rows: u32,
        pix_width: u32,
        pix_height: u32,
        modes: &[(Pty, u32)],
        session: &mut ServerSession,
    ) -> Result<(), Self::Error> {
        let workload = &self.connection.workload;
        let allowed =
            self.allows(|policy, target| ssh_pty_allowed(policy, workload, target, &self.user));
        if !allowed {
            session.channel_failure(channel)?;
            return Ok(());
        }
        session.channel_success(channel)?;
        self.send(
            channel,
            channel::Op::Pty(channel::PtyRequest {
                term: term.to_owned(),
                cols,
                rows,
                pix_width,
                pix_height,
                modes: modes.to_vec(),
            }),
        )
        .await;
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        cols: u32,
        rows: u32,
        pix_width: u32,
        pix_height: u32,
        _session: &mut ServerSession,
    ) -> Result<(), Self::Error> {
        self.send(
            channel,
            channel::Op::WindowChange {
                cols,
                rows,
                pix_width,
                pix_height,
            },
        )
        .await;
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut ServerSession,
    ) -> Result<(), Self::Error> {
        let workload = &self.connection.workload;
        if self.allows(|policy, target| ssh_env_allowed(policy, workload, target, &self.user, name))
        {
            session.channel_success(channel)?;
            self.send(channel, channel::Op::Env(name.to_owned(), value.to_owned()))
                .await;
        } else {
            tracing::debug!(name, "environment variable not passed on");
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut ServerSession,
    ) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(data).into_owned();
        let line = if command.len() <= INLINE_PARSE_BYTES {
            CommandLine::parse(&command)
        } else {
            // Up to tens of milliseconds for a 64 KiB line: not on a worker.
            let text = command.clone();
            tokio::task::spawn_blocking(move || CommandLine::parse(&text))
                .await
                .unwrap_or_else(|_| CommandLine::unreadable(&command))
        };
        let decision = self.decide(&SshRequest::Exec(&line));
        self.start(channel, channel::Start::Exec(command), decision, session)
            .await
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut ServerSession,
    ) -> Result<(), Self::Error> {
        let decision = self.decide(&SshRequest::Shell);
        self.start(channel, channel::Start::Shell, decision, session)
            .await
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut ServerSession,
    ) -> Result<(), Self::Error> {
        let decision = self.decide(&SshRequest::Subsystem(name));
        self.start(
            channel,
            channel::Start::Subsystem(name.to_owned()),
            decision,
            session,
        )
        .await
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        _session: &mut ServerSession,
    ) -> Result<(), Self::Error> {
        self.send(channel, channel::Op::Signal(signal)).await;
        Ok(())
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _protocol: &str,
        _cookie: &str,
        _screen: u32,
        session: &mut ServerSession,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        _session: &mut ServerSession,
    ) -> Result<bool, Self::Error> {
        // Agent forwarding would hand the server the client's keys.
        tracing::info!(?channel, "agent forwarding refused");
        let request = RequestRecord {
            channel: channel.into(),
            request: "agent-forwarding",
            command: None,
        };
        let decision = self
            .connection
            .refused("agent forwarding is never passed on");
        self.connection
            .record_request(&self.user, request, &decision)?;
        Ok(false)
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut ServerSession,
    ) -> Result<bool, Self::Error> {
        tracing::info!(address, port = *port, "remote port forwarding refused");
        let request = RequestRecord {
            channel: u32::MAX,
            request: "remote-forward",
            command: Some(&format!("{address}:{port}")),
        };
        let decision = self
            .connection
            .refused("remote port forwarding is not passed on");
        self.connection
            .record_request(&self.user, request, &decision)?;
        Ok(false)
    }
}
