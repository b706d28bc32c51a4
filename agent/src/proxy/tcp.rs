//! Opaque TCP: connect upstream (exempted, so it is not redirected again)
//! and copy bytes both ways, passing each half-close on.
use std::{
    io,
    net::Shutdown,
    os::fd::AsRawFd,
    sync::atomic::{AtomicU64, Ordering},
};

use nix::{
    fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice},
    unistd::pipe2,
};
use socket2::SockRef;
use tokio::{
    io::Interest,
    net::{TcpSocket, TcpStream},
};

use std::sync::Arc;

use super::ProxyContext;
use crate::{
    access::Outcome,
    addr::OrigDstAddr,
    approvals::{NewRequest, Requester},
    conn::{self, Admitted, Asked, Conn, Refusal},
    intercept::Interception,
    policy::{Action, ActivePolicy, Verdict},
    sessions::{Event, Recorder},
    workload::Workload,
};

/// The copy buffer starts small (request/response traffic) and doubles
/// while reads fill it, up to the maximum (bulk streams).
const COPY_BUFFER: usize = 16 * 1024;
const MAX_COPY_BUFFER: usize = 256 * 1024;
/// An upstream that does not answer a SYN in this long is reported as
/// unreachable rather than holding the client for the kernel's ~2 minutes.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves an admitted TCP connection: held first when an `approve` rule
/// caught it, then forwarded.
pub async fn serve(context: &ProxyContext, admitted: Admitted) {
    let Admitted {
        mut conn,
        stream,
        orig_dst,
        workload,
        active,
        target,
        verdict,
        enforced,
        recorder,
        started,
    } = admitted;
    if verdict.action == Action::Approve && enforced {
        let target = &active.policy.target(target).name;
        let asked = approve(
            context, &stream, &recorder, &workload, &active, target, &verdict,
        )
        .await;
        if let Err(refusal) = asked {
            tracing::info!(%refusal, "connection refused");
            conn.set_reason(refusal);
            conn.end(Outcome::Denied, None);
            super::reset(stream);
            return;
        }
    }
    // The session's start goes to disk while the upstream handshake runs;
    // no byte of the client's goes upstream before both are done.
    let kernel = &*context.gate.kernel;
    let (upstream, durable) = tokio::join!(
        connect_upstream(orig_dst, kernel),
        recorder.durable(started)
    );
    if let Err(error) = durable {
        tracing::error!(%error, "session refused: it cannot be recorded");
        conn.refuse(&Refusal::Unrecordable(error));
        super::reset(stream);
        return;
    }
    let upstream = match upstream {
        Ok(upstream) => upstream,
        Err(error) => {
            tracing::warn!(%orig_dst, %error, "upstream unreachable");
            let error = format!("connecting to {orig_dst}: {error}");
            conn.end(Outcome::UpstreamError, Some(error));
            super::reset(stream);
            return;
        }
    };
    let (outcome, error) = forward(stream, upstream, &conn, &recorder).await;
    conn.end(outcome, error);
}

/// A TCP connection an `approve` rule catches waits, before anything goes
/// upstream, for its request's answer; `Err` says why it may not go on.
/// A client that closes meanwhile withdraws the request.
async fn approve(
    context: &ProxyContext,
    client: &TcpStream,
    recorder: &Arc<Recorder>,
    workload: &Workload,
    active: &ActivePolicy,
    target: &str,
    verdict: &Verdict,
) -> Result<(), String> {
    let rule = verdict
        .rule
        .map(|id| active.policy.rule(id))
        .ok_or("the approving rule is gone")?;
    let spec = rule
        .approval
        .clone()
        .ok_or("the rule asks approval of no one")?;
    let requester = Requester::of(&active.policy, workload);
    let approvals = &context.gate.approvals;
    if approvals
        .use_grant(recorder, &requester, target, &rule.name, |_| false)
        .map_err(|e| e.to_string())?
    {
        return Ok(());
    }
    let command = format!("connect to {target}");
    let request = NewRequest {
        requester,
        target,
        rule: &rule.name,
        spec,
        command: &command,
    };
    // Watch the client (peeking: its bytes are the target's) until it
    // sends something; the end of its stream means it gave up.
    let gave_up = async {
        let mut byte = [0u8; 1];
        match client.peek(&mut byte).await {
            Ok(0) | Err(_) => "the client disconnected",
            Ok(_) => std::future::pending().await,
        }
    };
    match conn::ask(approvals, recorder, request, async |_| {}, gave_up).await {
        Ok(Asked::Approved(_)) => Ok(()),
        Ok(Asked::Refused(why)) => Err(why),
        Ok(Asked::GaveUp { id, .. }) => {
            Err(format!("the client left; approval request {id} withdrawn"))
        }
        Err(error) => Err(format!(
            "approval needed, but the request cannot be recorded: {error}"
        )),
    }
}

/// Copies both ways until both sides have closed: in the kernel with
/// `splice(2)` where nothing of the bytes is recorded, through the
/// agent's memory where the server's output is (`record = "full"`).
async fn forward(
    client: TcpStream,
    upstream: TcpStream,
    conn: &Conn,
    recorder: &Recorder,
) -> (Outcome, Option<String>) {
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);

    let bytes = conn.bytes();
    let down = async {
        if recorder.records_output() {
            copy(&upstream, &client, &bytes.down, Some(recorder)).await
        } else {
            splice_or_copy(&upstream, &client, &bytes.down).await
        }
    };
    let result = tokio::try_join!(splice_or_copy(&client, &upstream, &bytes.up), down);
    match result {
        Ok(_) => (Outcome::Closed, None),
        Err(error) => (Outcome::Error, Some(error.to_string())),
    }
}

/// A pipe between two sockets holds this much at most (the kernel's
/// default, 64 KiB, when the pipe size limit refuses it).
const PIPE_SIZE: usize = 1 << 20;

/// Moves bytes from `from` to `to` until EOF, then half-closes `to`. The
/// bytes go socket → pipe → socket with `splice(2)`: the kernel moves
/// their pages and they never reach user space (no copy, no buffer in the
/// agent). Without a pipe (the descriptor limit) the agent copies them.
async fn splice_or_copy(from: &TcpStream, to: &TcpStream, counter: &AtomicU64) -> io::Result<()> {
    let (pipe_out, pipe_in) = match pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) {
        Ok(pipe) => pipe,
        Err(error) => {
            tracing::debug!(%error, "no pipe for splice; copying");
            return copy(from, to, counter, None).await;
        }
    };
    let _ = fcntl(
        pipe_in.as_raw_fd(),
        FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32),
    );
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        // The pipe is empty here, so `EAGAIN` means the socket is.
        let n = from
            .async_io(Interest::READABLE, || {
                Ok(splice(from, None, &pipe_in, None, PIPE_SIZE, flags)?)
            })
            .await?;
        if n == 0 {
            return SockRef::from(to).shutdown(Shutdown::Write);
        }
        let mut left = n;
        while left > 0 {
            left -= to
                .async_io(Interest::WRITABLE, || {
                    Ok(splice(&pipe_out, None, to, None, left, flags)?)
                })
                .await?;
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Opens the upstream connection. The socket's cookie is registered with
/// the kernel programs between `socket()` and `connect()`, which is what
/// lets it through un-redirected; nothing a workload can set does.
pub async fn connect_upstream(
    dst: OrigDstAddr,
    kernel: &dyn Interception,
) -> io::Result<TcpStream> {
    let socket = if dst.0.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    let cookie = crate::intercept::socket_cookie(&socket)?;
    kernel.exempt(cookie)?;
    // Released however the connect ends, even if this future is dropped.
    let _exempt = Exempt { kernel, cookie };
    tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst.0))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer within 10 s"))?
}

struct Exempt<'a> {
    kernel: &'a dyn Interception,
    cookie: u64,
}

impl Drop for Exempt<'_> {
    fn drop(&mut self) {
        self.kernel.release(self.cookie);
    }
}

/// Copies until EOF through a buffer of the agent's, then half-closes
/// `to`, counting bytes and, with `record = "full"`, recording them.
async fn copy(
    from: &TcpStream,
    to: &TcpStream,
    counter: &AtomicU64,
    recorder: Option<&Recorder>,
) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = from
            .async_io(Interest::READABLE, || from.try_read(&mut buf))
            .await?;
        if n == 0 {
            return SockRef::from(to).shutdown(Shutdown::Write);
        }
        if let Some(recorder) = recorder {
            recorder
                .append(&Event::Output { data: &buf[..n] })
                .map_err(io::Error::other)?;
        }
        let mut sent = 0;
        while sent < n {
            sent += to
                .async_io(Interest::WRITABLE, || to.try_write(&buf[sent..n]))
                .await?;
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
        // A read that fills the buffer is a stream, not a request: fewer,
        // larger reads then (bounded per direction).
        if n == buf.len() && buf.len() < MAX_COPY_BUFFER {
            buf.resize(buf.len() * 2, 0);
        }
    }
}
