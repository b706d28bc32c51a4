//! The proxy: accept a redirected connection, find out where it was going
//! and who opened it, decide, then hand it to the target's protocol.
pub mod postgres;
mod registry;
pub mod ssh;
mod tcp;

pub use postgres::{StatementCounts, StatementOutcome};
pub use registry::ConnRegistry;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};
use tracing::{Instrument, info_span};

use crate::{
    access::{AccessRecord, outcome},
    addr::{ClientAddr, ListenAddr},
    intercept::{Interception, Unadmitted},
    policy::{ActivePolicy, Protocol, RecordMode, Target, Verdict, evaluate},
    sessions::{Event, Recorder, StoreError, Summary},
    workload::{Workload, WorkloadResolver},
};

/// Everything a connection needs, shared by all of them.
pub struct ProxyContext {
    /// The kernel side: records of redirected connects, exemptions for the
    /// agent's own upstream sockets.
    pub kernel: Arc<dyn Interception>,
    pub resolver: Arc<WorkloadResolver>,
    pub active: ArcSwap<ActivePolicy>,
    pub connections: ConnRegistry,
    /// The local CA, for clients that ask for TLS (PostgreSQL SSLRequest).
    pub tls: Option<Arc<crate::tls::LocalCa>>,
    /// The key of the `hash` mask strategy.
    pub mask_key: Arc<postgres::MaskKey>,
    /// What statement audit lines keep of literal values.
    pub literals: postgres::Literals,
    /// Where sessions are recorded.
    pub store: Arc<crate::sessions::Store>,
    /// Commands held for a person's approval, and standing grants.
    pub approvals: Arc<crate::approvals::Approvals>,
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
        let mut record = AccessRecord::new(session_id, client.0);
        let _live = context.connections.open(session_id, client);

        let listener = stream.local_addr();
        let admitted = listener
            .map_err(|error| Unadmitted::Lookup(error.to_string()))
            .and_then(|listener| context.kernel.admit(client, listener));
        let intercepted = match admitted {
            Ok(intercepted) => intercepted,
            // Not redirected by our programs (a direct connection to the
            // listener, another socket's record, a record lost to an LRU
            // eviction): fail closed.
            Err(why) => {
                record.reason = Some(why.to_string());
                record.finish(outcome::REJECTED, None);
                tracing::warn!(%why, "connection not admitted; reset");
                reset(stream);
                return;
            }
        };
        record.orig_dst = Some(intercepted.orig_dst.0);

        let resolver = context.resolver.clone();
        let kernel = intercepted.kernel;
        let workload = match tokio::task::spawn_blocking(move || resolver.resolve(&kernel)).await {
            Ok(workload) => Arc::new(workload),
            Err(error) => {
                record.finish(
                    outcome::ERROR,
                    Some(format!("workload resolution failed: {error}")),
                );
                reset(stream);
                return;
            }
        };
        record.workload = Some(workload.clone());
        let span = tracing::Span::current();
        span.record("pid", workload.pid);
        if let Some(exe) = &workload.exe {
            span.record("exe", exe.as_str());
        }

        let active = context.active.load_full();
        let Some(target_id) = active.table.lookup(intercepted.orig_dst.0) else {
            // The kernel redirected it, but the policy no longer protects
            // this destination (a reload raced the connect): fail closed.
            record.reason = Some(format!(
                "{} is not a protected destination",
                intercepted.orig_dst
            ));
            record.finish(outcome::REJECTED, None);
            reset(stream);
            return;
        };
        let target = &active.policy.targets[target_id.0];
        record.target = Some(target.name.clone());
        tracing::Span::current().record("target", target.name.as_str());
        context
            .connections
            .identify(session_id, &target.name, workload.pid);

        let verdict = evaluate(&active.policy, &workload, target_id);
        record.decision = Some(verdict.action);
        record.enforced = active.enforce;
        record.rule = verdict.rule.clone();
        record.reason = Some(verdict.reason.clone());
        let denied = verdict.denied() && active.enforce;

        // Nothing reaches the target unrecorded: the session's start and
        // the decision are on disk before the first byte goes upstream.
        let recorder = match begin_session(
            &context,
            session_id,
            client,
            &intercepted.orig_dst,
            &workload,
            &active,
            target,
            &verdict,
        )
        .await
        {
            Ok(recorder) => Arc::new(recorder),
            Err(error) => {
                tracing::error!(%error, "session refused: it cannot be recorded");
                record.reason = Some(error.to_string());
                record.finish(outcome::REJECTED, Some(error.to_string()));
                match target.protocol {
                    Protocol::Postgres if !denied => {
                        postgres::refuse(stream, intercepted.orig_dst, &context, &error.to_string())
                            .await
                    }
                    _ => reset(stream),
                }
                return;
            }
        };
        if denied {
            tracing::info!(rule = ?verdict.rule, "denied");
            record.finish(outcome::DENIED, None);
            recorder.finish(outcome::DENIED, None, 0, 0);
            reset(stream);
            return;
        }

        match target.protocol {
            Protocol::Tcp if verdict.action == crate::policy::Action::Approve && active.enforce => {
                if let Err(refusal) = approve_connection(
                    &context, &stream, &recorder, &workload, &active, target, &verdict,
                )
                .await
                {
                    tracing::info!(%refusal, "connection refused");
                    record.reason = Some(refusal);
                    record.finish(outcome::DENIED, None);
                    recorder.finish(outcome::DENIED, None, 0, 0);
                    reset(stream);
                    return;
                }
                tcp::forward(
                    stream,
                    intercepted.orig_dst,
                    &*context.kernel,
                    &mut record,
                    &recorder,
                )
                .await
            }
            Protocol::Tcp => {
                tcp::forward(
                    stream,
                    intercepted.orig_dst,
                    &*context.kernel,
                    &mut record,
                    &recorder,
                )
                .await
            }
            Protocol::Ssh => {
                let session = ssh::Session {
                    context: context.clone(),
                    active: active.clone(),
                    target: target_id,
                    workload,
                    recorder: recorder.clone(),
                    orig_dst: intercepted.orig_dst,
                    host_name: upstream_name(target, &intercepted.orig_dst),
                };
                ssh::serve(stream, session, &mut record).await;
            }
            Protocol::Postgres => {
                let Some(credential) = target.credential.clone() else {
                    record.finish(
                        outcome::ERROR,
                        Some("postgres target without a credential".into()),
                    );
                    return reset(stream);
                };
                // The role, when the admitting rule names one.
                let as_user = verdict
                    .rule
                    .as_ref()
                    .and_then(|name| active.policy.rules.iter().find(|r| &r.name == name))
                    .and_then(|rule| rule.as_user.clone());
                let session = postgres::Session {
                    as_user,
                    session_id: session_id.to_string(),
                    upstream_tls: target.tls,
                    upstream_ca_file: target.tls_ca_file.clone(),
                    server_name: upstream_name(target, &intercepted.orig_dst),
                    context: context.clone(),
                    target: target.name.clone(),
                    credential,
                    workload,
                    recorder: recorder.clone(),
                };
                postgres::serve(stream, intercepted.orig_dst, session, &mut record).await;
            }
        }
        recorder.finish(
            record.outcome,
            record.error.as_deref(),
            record.bytes.up.load(std::sync::atomic::Ordering::Relaxed),
            record.bytes.down.load(std::sync::atomic::Ordering::Relaxed),
        );
    }
    .instrument(span)
    .await
}

/// The name the upstream server is checked under (its TLS certificate,
/// its SSH host key): the target's host name, else the address reached.
fn upstream_name(target: &Target, orig_dst: &crate::addr::OrigDstAddr) -> String {
    match &target.address {
        crate::policy::TargetAddress::Host(host, _) => host.clone(),
        _ => orig_dst.0.ip().to_string(),
    }
}

/// A TCP connection an `approve` rule catches waits, before anything goes
/// upstream, for its request's answer; `Err` says why it may not go on.
/// A client that closes meanwhile withdraws the request.
async fn approve_connection(
    context: &ProxyContext,
    client: &TcpStream,
    recorder: &Arc<Recorder>,
    workload: &Workload,
    active: &ActivePolicy,
    target: &Target,
    verdict: &Verdict,
) -> Result<(), String> {
    let rule = verdict
        .rule
        .as_deref()
        .and_then(|name| active.policy.rules.iter().find(|r| r.name == name))
        .ok_or("the approving rule is gone")?;
    let spec = rule
        .approval
        .clone()
        .ok_or("the rule asks approval of no one")?;
    let requester = crate::approvals::Requester::of(&active.policy, workload);
    let approvals = &context.approvals;
    let store_error = |e: StoreError| e.to_string();
    if approvals
        .use_grant(recorder, &requester, &target.name, &rule.name)
        .map_err(store_error)?
    {
        return Ok(());
    }
    let command = format!("connect to {}", target.name);
    let request = crate::approvals::NewRequest {
        requester,
        target: &target.name,
        rule: &rule.name,
        spec,
        command: &command,
    };
    let mut held = approvals
        .hold(recorder, request)
        .await
        .map_err(|e| format!("approval needed, but the request cannot be recorded: {e}"))?;
    let id = held.record().id.clone();
    // Watch the client (peeking: its bytes are the target's) until it
    // sends something; the end of its stream means it gave up.
    let mut watching = true;
    let mut byte = [0u8; 1];
    let record = loop {
        tokio::select! {
            outcome = held.outcome() => break outcome.map_err(store_error)?,
            peeked = client.peek(&mut byte), if watching => match peeked {
                Ok(0) | Err(_) => {
                    held.withdraw("the client disconnected").map_err(store_error)?;
                    return Err(format!("the client left; approval request {id} withdrawn"));
                }
                Ok(_) => watching = false,
            },
        }
    };
    if record.state == crate::approvals::RequestState::Approved {
        Ok(())
    } else {
        Err(record.refusal())
    }
}

/// Opens the session's record and waits until its start is durable.
#[allow(clippy::too_many_arguments)]
async fn begin_session(
    context: &ProxyContext,
    session_id: ulid::Ulid,
    client: ClientAddr,
    orig_dst: &crate::addr::OrigDstAddr,
    workload: &Workload,
    active: &ActivePolicy,
    target: &Target,
    verdict: &Verdict,
) -> Result<Recorder, StoreError> {
    let store = &context.store;
    store.admit()?;
    let workloads = crate::policy::matching_workloads(&active.policy, workload);
    let id = session_id.to_string();
    let protocol = target.protocol.as_str();
    let summary = Summary {
        id: id.clone(),
        host: store.host.clone(),
        start_us: crate::sessions::now_us(),
        protocol: protocol.into(),
        target: target.name.clone(),
        orig_dst: orig_dst.0.to_string(),
        workloads: workloads.iter().map(|w| (*w).to_owned()).collect(),
        uid: workload.uid,
        user: workload.user.clone(),
        unit: workload.unit.clone(),
        exe: workload.exe.clone(),
        pid: workload.pid,
        decision: verdict.action.as_str().into(),
        rule: verdict.rule.clone(),
        outcome: "live".into(),
        ..Summary::default()
    };
    let start = Event::SessionStart {
        schema: crate::sessions::format::SCHEMA_VERSION,
        session_id: &id,
        host: &store.host,
        protocol,
        target: &target.name,
        client: client.0,
        orig_dst: orig_dst.0,
        workload,
        workloads: &workloads,
        record: target.record,
    };
    let connection = Event::Connection {
        decision: verdict.action,
        enforced: active.enforce,
        rule: verdict.rule.as_deref(),
        reason: &verdict.reason,
    };
    let (recorder, ticket) = store.begin(
        session_id,
        summary,
        &start,
        &connection,
        target.record == RecordMode::Full,
    )?;
    recorder.durable(ticket).await?;
    Ok(recorder)
}

/// Closes with RST rather than FIN, so a denied client fails at once
/// (ECONNRESET) instead of seeing an empty, successful exchange.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

#[cfg(test)]
mod tests;
