//! Admission: from an accepted socket to a connection its protocol may
//! serve, or a refusal saying why. Every step fails closed.
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpStream;

use super::{Conn, ConnRegistry};
use crate::{
    access::Outcome,
    addr::{ClientAddr, OrigDstAddr},
    intercept::{Interception, Unadmitted},
    policy::{ActivePolicy, Protocol, RecordMode, Target, TargetId, Verdict, evaluate},
    sessions::{Event, Recorder, Store, StoreError, Summary, Ticket},
    workload::{Workload, WorkloadResolver},
};

/// What admission reads, shared by every connection.
pub struct Gate {
    /// The kernel side: records of redirected connects, exemptions for the
    /// agent's own upstream sockets.
    pub kernel: Arc<dyn Interception>,
    pub resolver: Arc<WorkloadResolver>,
    /// The live policy; a reload swaps it, and every protocol reads it
    /// again at each request.
    pub active: ArcSwap<ActivePolicy>,
    pub connections: ConnRegistry,
    /// Where sessions are recorded.
    pub store: Arc<Store>,
    /// Commands held for a person's approval, and standing grants.
    pub approvals: Arc<crate::approvals::Approvals>,
}

/// A connection its target's protocol serves next.
pub struct Admitted {
    pub conn: Conn,
    pub stream: TcpStream,
    pub orig_dst: OrigDstAddr,
    pub workload: Arc<Workload>,
    /// The policy that admitted it.
    pub active: Arc<ActivePolicy>,
    pub target: TargetId,
    pub verdict: Verdict,
    /// The verdict is applied: the agent enforces, and the deciding rule
    /// (or, for the default deny, the workload's rules) is not in rollout.
    pub enforced: bool,
    /// The session's record: its start and the decision are appended,
    /// durable once `started` is (see [`Admitted::durable`]).
    pub recorder: Arc<Recorder>,
    pub started: Ticket,
}

impl Admitted {
    pub fn target(&self) -> &Target {
        self.active.policy.target(self.target)
    }

    /// Waits until the session's start is on disk: before anything of the
    /// connection goes upstream. Opaque TCP overlaps this wait with its
    /// upstream connect instead (a SYN carries nothing of the client's).
    pub async fn durable(self) -> Result<Self, Box<Refused>> {
        match self.recorder.durable(self.started).await {
            Ok(()) => Ok(self),
            Err(error) => {
                tracing::error!(%error, "session refused: it cannot be recorded");
                let reached = Some((self.target().protocol, self.orig_dst));
                Err(refused(self.conn, self.stream, error.into(), reached))
            }
        }
    }
}

/// A connection that goes no further; its end is already set.
pub struct Refused {
    pub conn: Conn,
    pub stream: TcpStream,
    pub why: Refusal,
    /// The target's protocol and the address the client asked for, when
    /// found (to refuse in the protocol's words).
    pub target: Option<(Protocol, OrigDstAddr)>,
}

/// Why a connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Not redirected by the agent's programs, or not by this socket.
    #[error(transparent)]
    Unadmitted(#[from] Unadmitted),
    #[error("workload resolution failed: {0}")]
    Unresolved(String),
    /// The kernel redirected it, but the policy no longer protects the
    /// destination (a reload raced the connect).
    #[error("{0} is not a protected destination")]
    Unprotected(OrigDstAddr),
    /// Nothing reaches a target unrecorded.
    #[error("{0}")]
    Unrecordable(#[from] StoreError),
    /// The connection-level decision.
    #[error("{0}")]
    Denied(String),
}

impl Refusal {
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::Unadmitted(_) | Self::Unprotected(_) | Self::Unrecordable(_) => Outcome::Rejected,
            Self::Unresolved(_) => Outcome::Error,
            Self::Denied(_) => Outcome::Denied,
        }
    }
}

/// Admits `stream`: its kernel record, the workload behind it, its
/// target, the connection-level decision, and the session's start
/// appended to its record (durable before any byte goes upstream: see
/// [`Admitted::durable`]; a denial waits for it here).
pub async fn admit(
    gate: &Gate,
    stream: TcpStream,
    client: ClientAddr,
    mut conn: Conn,
) -> Result<Admitted, Box<Refused>> {
    let (orig_dst, workload) = match identify(gate, &stream, client, &mut conn).await {
        Ok(found) => found,
        Err(why) => return Err(refused(conn, stream, why, None)),
    };
    let active = gate.active.load_full();
    let Some(target_id) = active.table.lookup(orig_dst.0) else {
        return Err(refused(conn, stream, Refusal::Unprotected(orig_dst), None));
    };
    let target = active.policy.target(target_id);
    let reached = Some((target.protocol, orig_dst));
    tracing::Span::current().record("target", target.name.as_str());
    gate.connections
        .identify(conn.access.session_id, &target.name, workload.pid);

    let verdict = evaluate(&active.policy, &workload, target_id);
    let enforced = active.enforce && active.policy.enforces(verdict.rule, &workload, target_id);
    let access = &mut conn.access;
    access.target = Some(target.name.clone());
    access.protocol = Some(target.protocol.as_str());
    access.decision = Some(verdict.action);
    access.enforced = enforced;
    access.rule = active.policy.rule_name(verdict.rule).map(str::to_owned);
    access.reason = Some(verdict.reason.clone());

    let begin = Begin {
        session_id: conn.access.session_id,
        client,
        orig_dst,
        workload: &workload,
        active: &active,
        target,
        verdict: &verdict,
        enforced,
    };
    let (recorder, started) = match begin_session(&gate.store, begin) {
        Ok((recorder, started)) => (Arc::new(recorder), started),
        Err(error) => {
            tracing::error!(%error, "session refused: it cannot be recorded");
            return Err(refused(conn, stream, error.into(), reached));
        }
    };
    conn.recorder = Some(recorder.clone());
    if verdict.denied() && enforced {
        tracing::info!(reason = %verdict.reason, "denied");
        // The decision is on record before the client hears of it.
        if let Err(error) = recorder.durable(started).await {
            tracing::error!(%error, "the denial cannot be recorded");
        }
        return Err(refused(
            conn,
            stream,
            Refusal::Denied(verdict.reason),
            reached,
        ));
    }
    Ok(Admitted {
        conn,
        stream,
        orig_dst,
        workload,
        active,
        target: target_id,
        verdict,
        enforced,
        recorder,
        started,
    })
}

/// Where the client was going (its kernel record, bound to its socket)
/// and who it is.
async fn identify(
    gate: &Gate,
    stream: &TcpStream,
    client: ClientAddr,
    conn: &mut Conn,
) -> Result<(OrigDstAddr, Arc<Workload>), Refusal> {
    let intercepted = stream
        .local_addr()
        .map_err(|error| Unadmitted::Lookup(error.to_string()))
        .and_then(|listener| gate.kernel.admit(client, listener))
        .inspect_err(|why| tracing::warn!(%why, "connection not admitted; reset"))?;
    conn.access.orig_dst = Some(intercepted.orig_dst.0);
    let resolver = gate.resolver.clone();
    let kernel = intercepted.kernel;
    let workload = tokio::task::spawn_blocking(move || resolver.resolve(&kernel))
        .await
        .map(Arc::new)
        .map_err(|error| Refusal::Unresolved(error.to_string()))?;
    conn.access.workload = Some(workload.clone());
    let span = tracing::Span::current();
    span.record("pid", workload.pid);
    if let Some(exe) = &workload.exe {
        span.record("exe", exe.as_str());
    }
    Ok((intercepted.orig_dst, workload))
}

/// Ends `conn` as `why` says and hands it back with its socket.
fn refused(
    mut conn: Conn,
    stream: TcpStream,
    why: Refusal,
    target: Option<(Protocol, OrigDstAddr)>,
) -> Box<Refused> {
    conn.refuse(&why);
    Box::new(Refused {
        conn,
        stream,
        why,
        target,
    })
}

/// What a session's record starts with.
struct Begin<'a> {
    session_id: ulid::Ulid,
    client: ClientAddr,
    orig_dst: OrigDstAddr,
    workload: &'a Workload,
    active: &'a ActivePolicy,
    target: &'a Target,
    verdict: &'a Verdict,
    enforced: bool,
}

/// Opens the session's record: its start and the connection's decision,
/// durable once the returned ticket is.
fn begin_session(store: &Arc<Store>, begin: Begin<'_>) -> Result<(Recorder, Ticket), StoreError> {
    let Begin {
        session_id,
        client,
        orig_dst,
        workload,
        active,
        target,
        verdict,
        enforced,
    } = begin;
    store.admit()?;
    let workloads = crate::policy::matching_workloads(&active.policy, workload);
    let rule = verdict
        .rule
        .map(|rule| active.policy.rule(rule).name.as_str());
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
        job: workload.job.clone(),
        decision: verdict.action.as_str().into(),
        rule: rule.map(str::to_owned),
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
        policy_bundle: active.bundle.as_ref(),
    };
    let connection = Event::Connection {
        decision: verdict.action,
        enforced,
        rule,
        reason: &verdict.reason,
        as_user: verdict
            .rule
            .and_then(|id| active.policy.rule(id).as_user.as_deref()),
    };
    let (recorder, ticket) = store.begin(
        session_id,
        summary,
        &start,
        &connection,
        target.record == RecordMode::Full,
    )?;
    Ok((recorder, ticket))
}
