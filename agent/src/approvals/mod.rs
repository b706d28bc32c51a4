//! Just-in-time approval: a command an `approve` rule catches is held in
//! flight until enough of the rule's approvers say yes, anyone says no, or
//! it times out.
//!
//! The proxy asks [`Approvals::hold`] and waits on the [`Held`] it gets
//! (each step is an event of the session, recorded here);
//! people answer through the admin socket (`interlock approvals ...`,
//! authorized by SO_PEERCRED) or the HTTP callback (`callback.rs`). Every
//! request and grant is a record in the session store's sled database, so
//! it outlives the process: requests still pending at start belonged to
//! connections that died with the old process, and are marked `abandoned`.
pub mod ask;
pub mod callback;
mod held;
mod notify;
mod records;

pub use held::Held;
pub use notify::Notifier;
pub use records::{
    Answer, Caller, GrantRecord, GrantScope, RequestRecord, RequestState, Requester, describe_job,
};

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::{
    policy::{ApprovalSpec, Approver, GrantSpec},
    sessions::{Event, Recorder, StoreError},
};

#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error(
        "no pending approval request {0:?} (it may have been answered, withdrawn or timed out; see `interlock approvals list --all`)"
    )]
    NotFound(String),
    #[error("{0:?} matches more than one pending request; give more of the id")]
    Ambiguous(String),
    #[error("no grant {0:?}")]
    NoGrant(String),
    #[error(
        "{who} cannot answer for its own workload (uid {uid} made this request): another person must"
    )]
    OwnRequest { who: String, uid: u32 },
    #[error("{who} is not an approver of rule {rule:?} (approvers: {approvers})")]
    NotApprover {
        who: String,
        rule: String,
        approvers: String,
    },
    #[error("{0} has already approved this request; it needs another approver")]
    Again(String),
    #[error("a denial needs a --reason")]
    NoReason,
    #[error("{0}")]
    NotRequestable(String),
    #[error("approval records: {0}")]
    Store(#[from] sled::Error),
    #[error("approval records: {0}")]
    Json(#[from] serde_json::Error),
    /// The session cannot record the request: the session must end.
    #[error(transparent)]
    Record(#[from] StoreError),
}

struct Pending {
    record: RequestRecord,
    spec: Arc<ApprovalSpec>,
    /// What a yes grants: the rule's `grant`, or the duration asked for
    /// up front.
    grant: GrantSpec,
    wake: Option<oneshot::Sender<RequestRecord>>,
}

#[derive(Default)]
struct State {
    pending: HashMap<String, Pending>,
    grants: Vec<GrantRecord>,
}

pub struct Approvals {
    host: String,
    requests: sled::Tree,
    grants: sled::Tree,
    state: Mutex<State>,
    notifier: Option<Notifier>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// What the proxy knows about a command to hold.
pub struct NewRequest<'a> {
    pub requester: Requester,
    pub target: &'a str,
    pub rule: &'a str,
    pub spec: Arc<ApprovalSpec>,
    pub command: &'a str,
}

/// A grant asked for up front (`interlock request`), already checked
/// against its rule ([`ask::check`]).
#[derive(Debug)]
pub struct GrantAsk {
    pub requester: Requester,
    pub target: String,
    pub rule: String,
    pub spec: Arc<ApprovalSpec>,
    pub duration: std::time::Duration,
    pub scope: Option<GrantScope>,
    pub for_workload: Option<String>,
}

impl Approvals {
    /// Opens the records in `db`: requests left pending by an earlier
    /// process are marked abandoned; unexpired grants are loaded.
    pub fn open(
        db: &sled::Db,
        host: String,
        notifier: Option<Notifier>,
    ) -> Result<Arc<Self>, ApprovalError> {
        let requests = db.open_tree("approvals")?;
        let grants_tree = db.open_tree("grants")?;
        let now = now_ms();
        for entry in requests.iter() {
            let (key, value) = entry?;
            let mut record: RequestRecord = serde_json::from_slice(&value)?;
            if record.state == RequestState::Pending {
                record.state = RequestState::Abandoned;
                record.decided_ms = Some(now);
                requests.insert(key, serde_json::to_vec(&record)?)?;
                log_request(&record);
                if let Some(notifier) = &notifier {
                    notifier.send(&record);
                }
            }
        }
        let mut grants = Vec::new();
        for entry in grants_tree.iter() {
            let (_, value) = entry?;
            let grant: GrantRecord = serde_json::from_slice(&value)?;
            grants.push(grant);
        }
        Ok(Arc::new(Self {
            host,
            requests,
            grants: grants_tree,
            state: Mutex::new(State {
                pending: HashMap::new(),
                grants,
            }),
            notifier,
        }))
    }

    /// Whether an active grant lets this workload run this rule's commands
    /// on this target without asking; its use is recorded in the session.
    /// A grant asked for up front with a scope applies only where `fits`
    /// says the command is within it.
    pub fn use_grant(
        &self,
        recorder: &Recorder,
        requester: &Requester,
        target: &str,
        rule: &str,
        fits: impl Fn(&GrantScope) -> bool,
    ) -> Result<bool, StoreError> {
        let Some(grant) = self.grant_for(requester, target, rule, fits) else {
            return Ok(false);
        };
        recorder.append(&Event::GrantUsed {
            grant: &grant.id,
            rule,
            request: &grant.request_id,
            scope: grant.scope.as_ref(),
            reason: grant.requester.reason.as_deref(),
            expires_ms: grant.expires_ms,
        })?;
        tracing::info!(grant = %grant.id, %rule, "let through by a grant");
        Ok(true)
    }

    /// The grant that lets this workload run this rule's commands on this
    /// target without asking, if one is active.
    fn grant_for(
        &self,
        requester: &Requester,
        target: &str,
        rule: &str,
        fits: impl Fn(&GrantScope) -> bool,
    ) -> Option<GrantRecord> {
        let key = requester.grant_key();
        let now = now_ms();
        let state = self.state.lock();
        state
            .grants
            .iter()
            .find(|g| {
                g.active(now)
                    && g.rule == rule
                    && g.target == target
                    && g.holder(requester, &key)
                    && g.scope.as_ref().is_none_or(&fits)
            })
            .cloned()
    }

    /// Holds a command of `recorder`'s session: the request is recorded,
    /// announced, and an event of the session, durable before this returns
    /// (so before the client is told to wait). The caller waits on the
    /// returned [`Held`].
    pub async fn hold(
        self: &Arc<Self>,
        recorder: &Arc<Recorder>,
        new: NewRequest<'_>,
    ) -> Result<Held, ApprovalError> {
        let held = self.request(recorder, new)?;
        let record = &held.record;
        let ticket = recorder.append(&Event::ApprovalRequested {
            id: &record.id,
            rule: &record.rule,
            command: &record.command,
            approvers: &record.approvers,
            min_approvals: record.min_approvals,
            timeout_s: (record.expires_ms - record.created_ms) / 1000,
            grant: &record.grant,
            reason: record.requester.reason.as_deref(),
        })?;
        recorder.durable(ticket).await?;
        // The request itself (sled, flushed about once a second on its
        // own) is on disk too before the client is told to wait: a
        // restart then finds it and ends it as abandoned.
        self.requests.flush_async().await?;
        Ok(held)
    }

    fn request(
        self: &Arc<Self>,
        recorder: &Arc<Recorder>,
        new: NewRequest<'_>,
    ) -> Result<Held, ApprovalError> {
        let id = ulid::Ulid::new().to_string();
        let created_ms = now_ms();
        let record = RequestRecord {
            id: id.clone(),
            session_id: recorder.id().to_string(),
            host: self.host.clone(),
            state: RequestState::Pending,
            target: new.target.to_owned(),
            rule: new.rule.to_owned(),
            command: new.command.to_owned(),
            requester: new.requester,
            approvers: new.spec.approvers.iter().map(|a| a.to_string()).collect(),
            min_approvals: new.spec.min_approvals,
            grant: new.spec.grant.to_string(),
            created_ms,
            expires_ms: created_ms + new.spec.timeout.as_millis() as u64,
            answers: Vec::new(),
            decided_ms: None,
            grant_id: None,
            up_front: false,
            scope: None,
            for_workload: None,
        };
        let wait = self.pend(record.clone(), new.spec.clone(), new.spec.grant)?;
        Ok(Held {
            approvals: self.clone(),
            recorder: recorder.clone(),
            record,
            wait: Some(wait),
            deadline: Instant::now() + new.spec.timeout,
        })
    }

    /// Records, announces and keeps a new pending request; its outcome
    /// comes through the receiver.
    fn pend(
        &self,
        record: RequestRecord,
        spec: Arc<ApprovalSpec>,
        grant: GrantSpec,
    ) -> Result<oneshot::Receiver<RequestRecord>, ApprovalError> {
        self.requests
            .insert(record.id.as_bytes(), serde_json::to_vec(&record)?)?;
        log_request(&record);
        if let Some(notifier) = &self.notifier {
            notifier.send(&record);
        }
        let (wake, wait) = oneshot::channel();
        self.state.lock().pending.insert(
            record.id.clone(),
            Pending {
                record,
                spec,
                grant,
                wake: Some(wake),
            },
        );
        Ok(wait)
    }

    /// Asks, up front, for a grant of `ask.duration`: a request approvers
    /// answer like any other, which times out on its own after the rule's
    /// `timeout`. The outcome comes through the receiver (it may be
    /// dropped: the request stands without its asker).
    pub async fn request_grant(
        self: &Arc<Self>,
        ask: GrantAsk,
    ) -> Result<(RequestRecord, oneshot::Receiver<RequestRecord>), ApprovalError> {
        let id = ulid::Ulid::new().to_string();
        let created_ms = now_ms();
        let duration = humantime::format_duration(ask.duration).to_string();
        let what = match &ask.scope {
            Some(scope) => scope.describe(),
            None => format!("what rule {:?} is about", ask.rule),
        };
        let whom = match &ask.for_workload {
            Some(name) => format!(" for workload {name:?}"),
            None => String::new(),
        };
        let record = RequestRecord {
            id: id.clone(),
            session_id: String::new(),
            host: self.host.clone(),
            state: RequestState::Pending,
            target: ask.target,
            rule: ask.rule,
            command: format!("grant{whom}: {what}, for {duration}"),
            requester: ask.requester,
            approvers: ask.spec.approvers.iter().map(|a| a.to_string()).collect(),
            min_approvals: ask.spec.min_approvals,
            grant: duration,
            created_ms,
            expires_ms: created_ms + ask.spec.timeout.as_millis() as u64,
            answers: Vec::new(),
            decided_ms: None,
            grant_id: None,
            up_front: true,
            scope: ask.scope,
            for_workload: ask.for_workload,
        };
        let timeout = ask.spec.timeout;
        let wait = self.pend(record.clone(), ask.spec, GrantSpec::For(ask.duration))?;
        self.requests.flush_async().await?;
        let approvals = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            approvals.resolve(&id, RequestState::TimedOut);
        });
        Ok((record, wait))
    }

    /// An answer from `caller`; the request as it now stands.
    pub fn answer(
        &self,
        id: &str,
        caller: &Caller,
        approve: bool,
        reason: Option<String>,
    ) -> Result<RequestRecord, ApprovalError> {
        let reason = reason.filter(|r| !r.trim().is_empty());
        if !approve && reason.is_none() {
            return Err(ApprovalError::NoReason);
        }
        let who = caller.name();
        let mut state = self.state.lock();
        let id = find_pending(&state.pending, id)?;
        let pending = state.pending.get_mut(&id).expect("found");
        if let Caller::Local { uid, .. } = caller
            && *uid == pending.record.requester.uid
        {
            return Err(ApprovalError::OwnRequest { who, uid: *uid });
        }
        if !pending.spec.approvers.iter().any(|a| caller.is(a)) {
            return Err(ApprovalError::NotApprover {
                who,
                rule: pending.record.rule.clone(),
                approvers: pending.record.approvers.join(", "),
            });
        }
        if pending.record.answers.iter().any(|a| a.by == who) {
            return Err(ApprovalError::Again(who));
        }
        pending.record.answers.push(Answer {
            by: who,
            approve,
            reason,
            at_ms: now_ms(),
        });
        let approvals = pending.record.answers.iter().filter(|a| a.approve).count();
        let outcome = if !approve {
            Some(RequestState::Denied)
        } else if approvals >= pending.spec.min_approvals as usize {
            Some(RequestState::Approved)
        } else {
            None
        };
        match outcome {
            Some(outcome) => Ok(self
                .resolve_locked(&mut state, &id, outcome)
                .expect("pending")),
            None => {
                let record = pending.record.clone();
                self.requests
                    .insert(id.as_bytes(), serde_json::to_vec(&record)?)?;
                log_request(&record);
                // Still pending, with one more approval: the chat sees it.
                if let Some(notifier) = &self.notifier {
                    notifier.send(&record);
                }
                Ok(record)
            }
        }
    }

    /// Ends a pending request; `None` if it already ended.
    fn resolve(&self, id: &str, outcome: RequestState) -> Option<RequestRecord> {
        let mut state = self.state.lock();
        self.resolve_locked(&mut state, id, outcome)
    }

    fn resolve_locked(
        &self,
        state: &mut State,
        id: &str,
        outcome: RequestState,
    ) -> Option<RequestRecord> {
        let mut pending = state.pending.remove(id)?;
        crate::metrics::get()
            .approvals
            .get_or_create(&crate::metrics::OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
        let record = &mut pending.record;
        record.state = outcome;
        let now = now_ms();
        record.decided_ms = Some(now);
        if let (RequestState::Approved, GrantSpec::For(duration)) = (outcome, pending.grant) {
            let grant = GrantRecord {
                id: ulid::Ulid::new().to_string(),
                rule: record.rule.clone(),
                target: record.target.clone(),
                workload_key: record.requester.grant_key(),
                requester: record.requester.clone(),
                request_id: record.id.clone(),
                approved_by: record.deciders(),
                approvers: record.approvers.clone(),
                created_ms: now,
                expires_ms: now + duration.as_millis() as u64,
                revoked: None,
                scope: record.scope.clone(),
                workload: record.for_workload.clone(),
            };
            record.grant_id = Some(grant.id.clone());
            self.put_grant(&grant);
            log_grant("granted", &grant);
            state.grants.push(grant);
        }
        match serde_json::to_vec(&*record) {
            Ok(bytes) => {
                if let Err(error) = self.requests.insert(id.as_bytes(), bytes) {
                    tracing::error!(%error, "cannot store an approval request's outcome");
                }
            }
            Err(error) => tracing::error!(%error, "cannot serialise an approval request"),
        }
        // The outcome and its grant are on disk before anyone acts on them.
        if let Err(error) = self.requests.flush() {
            tracing::error!(%error, "cannot flush an approval request's outcome");
        }
        log_request(record);
        if let Some(notifier) = &self.notifier {
            notifier.send(record);
        }
        if let Some(wake) = pending.wake.take() {
            let _ = wake.send(record.clone());
        }
        Some(pending.record)
    }

    fn put_grant(&self, grant: &GrantRecord) {
        let stored = serde_json::to_vec(grant)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                self.grants
                    .insert(grant.id.as_bytes(), bytes)
                    .map_err(|e| e.to_string())
            });
        if let Err(error) = stored {
            tracing::error!(%error, "cannot store a grant");
        }
    }

    /// Ends every pending request as abandoned: the agent is stopping, and
    /// each held client is told so before its connection goes.
    pub fn abandon_all(&self) {
        let mut state = self.state.lock();
        let ids: Vec<String> = state.pending.keys().cloned().collect();
        for id in ids {
            self.resolve_locked(&mut state, &id, RequestState::Abandoned);
        }
    }

    pub fn pending_count(&self) -> usize {
        self.state.lock().pending.len()
    }

    /// Pending requests `caller` may answer (all of them for an admin).
    pub fn pending(&self, caller: &Caller, admin: bool) -> Vec<RequestRecord> {
        let state = self.state.lock();
        let mut list: Vec<RequestRecord> = state
            .pending
            .values()
            .filter(|p| admin || p.spec.approvers.iter().any(|a| caller.is(a)))
            .map(|p| p.record.clone())
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    /// Every request on record, oldest first (admins).
    pub fn history(&self) -> Result<Vec<RequestRecord>, ApprovalError> {
        self.requests
            .iter()
            .map(|entry| Ok(serde_json::from_slice(&entry?.1)?))
            .collect()
    }

    /// Active grants, or every grant on record with `all`.
    pub fn grants(&self, all: bool) -> Vec<GrantRecord> {
        let now = now_ms();
        let state = self.state.lock();
        state
            .grants
            .iter()
            .filter(|g| all || g.active(now))
            .cloned()
            .collect()
    }

    /// Ends a grant before it expires: by an admin or one of its rule's
    /// approvers.
    pub fn revoke(
        &self,
        id: &str,
        caller: &Caller,
        admin: bool,
        reason: Option<String>,
    ) -> Result<GrantRecord, ApprovalError> {
        let now = now_ms();
        let who = caller.name();
        let mut state = self.state.lock();
        let mut matching = state
            .grants
            .iter_mut()
            .filter(|g| g.active(now) && g.id.starts_with(&id.to_ascii_uppercase()));
        let grant = matching
            .next()
            .ok_or_else(|| ApprovalError::NoGrant(id.to_owned()))?;
        let may = admin
            || grant
                .approvers
                .iter()
                .filter_map(|a| Approver::parse(a).ok())
                .any(|a| caller.is(&a));
        if !may {
            return Err(ApprovalError::NotApprover {
                who,
                rule: grant.rule.clone(),
                approvers: grant.approvers.join(", "),
            });
        }
        grant.revoked = Some(Answer {
            by: who,
            approve: false,
            reason,
            at_ms: now,
        });
        let grant = grant.clone();
        drop(state);
        self.put_grant(&grant);
        log_grant("revoked", &grant);
        Ok(grant)
    }
}

/// The one pending request whose id starts with `given` (ids are long;
/// a unique prefix will do, as with git).
fn find_pending(pending: &HashMap<String, Pending>, given: &str) -> Result<String, ApprovalError> {
    let given_upper = given.to_ascii_uppercase();
    if pending.contains_key(&given_upper) {
        return Ok(given_upper);
    }
    let mut matching = pending.keys().filter(|id| id.starts_with(&given_upper));
    match (matching.next(), matching.next()) {
        (Some(id), None) if !given.is_empty() => Ok(id.clone()),
        (Some(_), Some(_)) => Err(ApprovalError::Ambiguous(given.to_owned())),
        _ => Err(ApprovalError::NotFound(given.to_owned())),
    }
}

/// A request's line in the access log.
fn log_request(record: &RequestRecord) {
    #[derive(Serialize)]
    struct Line<'a> {
        event: &'static str,
        time: String,
        #[serde(flatten)]
        record: &'a RequestRecord,
    }
    crate::access::write_line(&Line {
        event: "approval",
        time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        record,
    });
}

fn log_grant(change: &'static str, grant: &GrantRecord) {
    #[derive(Serialize)]
    struct Line<'a> {
        event: &'static str,
        change: &'static str,
        time: String,
        #[serde(flatten)]
        grant: &'a GrantRecord,
    }
    crate::access::write_line(&Line {
        event: "grant",
        change,
        time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        grant,
    });
}

#[cfg(test)]
mod tests;
