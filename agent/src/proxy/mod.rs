//! The proxy: accept a redirected connection, have the `conn` stage admit
//! it, then hand it to its target's protocol.
#[doc(hidden)]
pub mod http;
pub mod postgres;
pub(crate) mod spdy;
pub mod ssh;
mod tcp;
pub(crate) mod websocket;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};
use tracing::{Instrument, info_span};

use crate::{
    addr::{ClientAddr, ListenAddr},
    conn::{self, Conn},
    policy::{Protocol, Target},
};

/// Everything a connection needs, shared by all of them.
pub struct ProxyContext {
    /// What admission reads: the kernel side, the workload resolver, the
    /// live policy, the session store, approvals.
    pub gate: conn::Gate,
    /// The local CA, for clients that ask for TLS (PostgreSQL SSLRequest,
    /// HTTPS).
    pub tls: Option<Arc<crate::tls::LocalCa>>,
    /// The key of the `hash` mask strategy.
    pub mask_key: Arc<crate::masking::MaskKey>,
    /// What statement audit lines keep of literal values.
    pub literals: postgres::Literals,
    /// PostgreSQL sessions by backend key, so a cancel reaches a held one.
    pub pg_cancels: postgres::CancelKeys,
    /// What PostgreSQL sessions share: analyses, catalogs, limits.
    pub pg: postgres::Shared,
    /// The SSH server clients talk to (with the agent's host key).
    pub ssh_server: Arc<russh::server::Config>,
}

/// Accepts on every listener until `shutdown` turns true, then gives live
/// connections `drain` to finish before cancelling them (each cancelled one
/// still writes its access line).
pub async fn serve(
    context: Arc<ProxyContext>,
    listeners: Vec<TcpListener>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let mut connections = JoinSet::new();
    let (accepted_tx, mut accepted_rx) =
        tokio::sync::mpsc::channel::<(TcpStream, SocketAddr)>(1024);
    let mut acceptors = JoinSet::new();
    for listener in listeners {
        let tx = accepted_tx.clone();
        acceptors.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok(accepted) => {
                        if tx.send(accepted).await.is_err() {
                            return;
                        }
                    }
                    // EMFILE and friends: back off instead of spinning.
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    drop(accepted_tx);

    loop {
        tokio::select! {
            Some((stream, peer)) = accepted_rx.recv() => {
                let context = context.clone();
                connections.spawn(handle(context, stream, ClientAddr(peer)));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    acceptors.abort_all();
    tracing::info!(live = connections.len(), ?drain, "draining connections");
    let drained = tokio::time::timeout(drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
}

/// Binds the agent's listeners on 127.0.0.1 and, when the host has IPv6,
/// on ::1 (without it, IPv6 targets are refused: still closed, not open).
pub async fn bind(port: u16) -> std::io::Result<Vec<(TcpListener, ListenAddr)>> {
    let v4 = listen(SocketAddr::from(([127, 0, 0, 1], port)))?;
    let mut listeners = vec![v4];
    match listen(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))) {
        Ok(v6) => listeners.push(v6),
        Err(error)
            if matches!(
                error.raw_os_error(),
                Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
            ) =>
        {
            tracing::warn!(%error, "no IPv6 loopback: connections to IPv6 targets will be refused");
        }
        Err(error) => return Err(error),
    }
    Ok(listeners)
}

fn listen(addr: SocketAddr) -> std::io::Result<(TcpListener, ListenAddr)> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        let socket = tokio::net::TcpSocket::new_v6()?;
        socket2::SockRef::from(&socket).set_only_v6(true)?;
        socket
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(4096)?;
    let local = listener.local_addr()?;
    Ok((listener, ListenAddr(local)))
}

/// One connection: admitted (or refused) by the `conn` stage, then served
/// by its target's protocol. Dropping its `Conn` writes its end.
async fn handle(context: Arc<ProxyContext>, stream: TcpStream, client: ClientAddr) {
    let session_id = ulid::Ulid::new();
    let span = info_span!(
        "conn",
        session = %session_id,
        client = %client,
        target = tracing::field::Empty,
        pid = tracing::field::Empty,
        exe = tracing::field::Empty,
    );
    async move {
        let _live = context.gate.connections.open(session_id, client);
        let conn = Conn::new(session_id, client.0);
        let admitted = match conn::admit(&context.gate, stream, client, conn).await {
            Ok(admitted) => admitted,
            Err(refused) => return refuse(&context, *refused).await,
        };
        let protocol = admitted.target().protocol;
        match protocol {
            Protocol::Tcp => tcp::serve(&context, admitted).await,
            // Each request's record is made durable before it goes up, and
            // the session's start with it.
            Protocol::Http | Protocol::Kubernetes => http::serve(context.clone(), admitted).await,
            Protocol::Ssh | Protocol::Postgres => {
                // They start talking upstream at once (handshake, login):
                // the session's start is on disk first.
                let admitted = match admitted.durable().await {
                    Ok(admitted) => admitted,
                    Err(refused) => return refuse(&context, *refused).await,
                };
                if protocol == Protocol::Ssh {
                    ssh::serve(context.clone(), admitted).await
                } else {
                    postgres::serve(context.clone(), admitted).await
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// A request's decision (SSH, HTTP), with the policy it was made under:
/// requests are decided under the policy live when they come.
pub(crate) struct Decision {
    pub verdict: crate::policy::Verdict,
    pub active: Arc<crate::policy::ActivePolicy>,
    /// The verdict is applied (the agent enforces; no rule in rollout
    /// decided it).
    enforced: bool,
}

impl Decision {
    /// A verdict for `workload` on `target` (none: the target left the
    /// policy), applied as the policy says.
    pub fn new(
        verdict: crate::policy::Verdict,
        active: Arc<crate::policy::ActivePolicy>,
        workload: &crate::workload::Workload,
        target: Option<crate::policy::TargetId>,
    ) -> Self {
        let enforced = active.enforce
            && target.is_none_or(|target| active.policy.enforces(verdict.rule, workload, target));
        Self {
            verdict,
            active,
            enforced,
        }
    }

    pub fn enforced(&self) -> bool {
        self.enforced
    }

    pub fn rule_name(&self) -> Option<&str> {
        self.active.policy.rule_name(self.verdict.rule)
    }
}

/// Tells a refused client, in its protocol's words where it has them: a
/// PostgreSQL client whose session cannot be recorded gets a FATAL
/// (53100); every other refusal is a reset.
async fn refuse(context: &ProxyContext, refused: conn::Refused) {
    let conn::Refused {
        conn,
        stream,
        why,
        target,
    } = refused;
    match (target, &why) {
        (Some((Protocol::Postgres, orig_dst)), conn::Refusal::Unrecordable(error)) => {
            postgres::refuse(stream, orig_dst, context, &error.to_string()).await
        }
        _ => reset(stream),
    }
    drop(conn);
}

/// The name the upstream server is checked under (its TLS certificate,
/// its SSH host key): the target's host name, else the address reached.
fn upstream_name(target: &Target, orig_dst: &crate::addr::OrigDstAddr) -> String {
    match &target.address {
        crate::policy::TargetAddress::Host(host, _) => host.clone(),
        _ => orig_dst.0.ip().to_string(),
    }
}

/// Closes with RST rather than FIN, so a denied client fails at once
/// (ECONNRESET) instead of seeing an empty, successful exchange.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

#[cfg(test)]
mod tests;
