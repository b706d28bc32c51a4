//! Client → server: every `Query`, `Parse` and `Bind` is decided by policy
//! before it is sent on, and every message that gets an answer is announced
//! to the server side ([`Expect`]) first.
//!
//! A denied query is replaced by a statement that makes the *server* raise
//! the denial (SQLSTATE 42501), so the error arrives in order with every
//! other response and the transaction state is the server's own (`E` inside
//! a transaction block). A denied `Parse` (or a `Bind` the policy no longer
//! allows) drops the rest of the client's batch; the denial is raised at
//! its next Flush or Sync.
use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, atomic::AtomicU64, atomic::Ordering},
};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::{
    Session, StatementCounts,
    names::Names,
    responses::{Expect, Expected},
    sql::{Analysed, Parsed},
    statements::{Audit, Decided, DecisionCache, Denial, Masking, decide},
    wire::{self, Frame, WireError},
};
use crate::{
    approvals::{ApprovalError, RequestRecord, Requester},
    conn::{self, Asked},
    masking::MaskSet,
    policy::{ActivePolicy, KindSet, RuleId, StatementKind},
    sessions::{StatementOutcome, Ticket},
};

/// Prepared statements tracked per session; a Parse beyond is refused
/// (an unknown statement could not be decided at Bind).
const MAX_PREPARED: usize = 4096;

/// The client → server state of one session.
pub struct Requests<'s> {
    session: &'s Session,
    counts: &'s StatementCounts,
    expected: &'s Expected,
    decisions: DecisionCache,
    /// How names resolve in this session (search_path, pg_catalog).
    names: Names,
    /// Bumped when `names` changes: decisions made before are stale.
    generation: u64,
    /// The policy the masks below were made from.
    policy: Arc<ActivePolicy>,
    masking: Masking,
    /// Table-qualified mask columns looked up at session start.
    resolved: super::catalog::Resolved,
    /// Protocol-level prepared statements, by name.
    prepared: HashMap<String, Arc<Decided>>,
    portals: HashMap<String, Portal>,
    denied_batch: Option<DeniedBatch>,
    /// The latest statement recorded that may change the target: what
    /// must be durable before the gathered messages go upstream.
    pending: Option<Ticket>,
    /// The latest statement recorded that cannot: its record is flushed
    /// while it runs, and its answer waits for it (`Session::answers`).
    pending_read: Option<Ticket>,
    /// The rule whose approval the message being replayed just got (by
    /// name: the replay is decided again, under the policy live then).
    cleared: Option<String>,
    /// NoticeResponses for the client, sent by the server side between
    /// two of its messages.
    notices: tokio::sync::mpsc::UnboundedSender<BytesMut>,
    /// Woken by a cancel request for this session (psql's Ctrl-C).
    pub cancelled: Option<Arc<super::cancel::CancelSignal>>,
    /// An Execute of `COPY … FROM STDIN` went upstream and the client has
    /// not ended its data yet (CopyDone, CopyFail).
    copying_in: bool,
    /// Why, as the client stated it in its application_name (at startup,
    /// or by `SET` since): the reason of what it asks next.
    pub stated_reason: Option<String>,
}

/// What a client message asks of the relay.
pub enum Step {
    /// Handled: what goes upstream is in the output buffer.
    Done,
    /// It needs a person's approval first: hold it, then replay it.
    Hold(Hold),
}

/// A message held for approval under one rule.
pub struct Hold {
    decided: Arc<Decided>,
    rule: RuleId,
}

/// Resolves when the client gives up on a held statement: it cancels it,
/// or leaves. Meanwhile it is read (into `buf`, bounded) only to notice
/// that it left.
async fn gave_up<R: AsyncRead + Unpin>(
    cancelled: Option<&super::cancel::CancelSignal>,
    reader: &mut R,
    buf: &mut BytesMut,
) -> GaveUp {
    use tokio::io::AsyncReadExt;
    let cancel = async {
        match cancelled {
            Some(signal) => signal.notify.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(cancel);
    loop {
        tokio::select! {
            () = &mut cancel => return GaveUp::Cancelled,
            read = reader.read_buf(buf), if buf.len() < MAX_WHILE_HELD => {
                if matches!(read, Ok(0) | Err(_)) {
                    return GaveUp::Left;
                }
            }
        }
    }
}

/// How a client gives up on a held statement.
#[derive(Debug)]
enum GaveUp {
    /// A cancel request for the session's key.
    Cancelled,
    /// The connection closed.
    Left,
}

impl std::fmt::Display for GaveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GaveUp::Cancelled => "the client cancelled the statement",
            GaveUp::Left => "the client disconnected",
        })
    }
}

/// How a hold ended.
enum Answer {
    /// Approved: the message is handled again, as if it had just arrived.
    Cleared,
    /// Denied or timed out: the client gets this as an error.
    Refused(String),
    /// The client went away while it waited.
    Gone,
}

/// Passes a client message on as it came.
fn forward(frame: &Frame, out: &mut BytesMut) -> Step {
    out.extend_from_slice(&frame.bytes);
    Step::Done
}

/// Bytes a held client may send meanwhile (it is not read beyond this).
const MAX_WHILE_HELD: usize = 1024 * 1024;

struct Portal {
    decided: Option<Arc<Decided>>,
    /// Whether its columns are known to the server side (the client, or
    /// the agent, described it).
    described: bool,
}

struct DeniedBatch {
    denial: Denial,
    raised: bool,
}

impl<'s> Requests<'s> {
    pub fn new(
        session: &'s Session,
        counts: &'s StatementCounts,
        expected: &'s Expected,
        policy: Arc<ActivePolicy>,
        resolved: super::catalog::Resolved,
        names: Names,
        notices: tokio::sync::mpsc::UnboundedSender<BytesMut>,
    ) -> Self {
        let mut requests = Self {
            session,
            counts,
            expected,
            decisions: DecisionCache::default(),
            names,
            generation: 0,
            masking: Masking::Off,
            policy,
            resolved,
            prepared: HashMap::new(),
            portals: HashMap::new(),
            denied_batch: None,
            pending: None,
            pending_read: None,
            cleared: None,
            notices,
            cancelled: None,
            copying_in: false,
            stated_reason: None,
        };
        requests.masking = requests.compute_masking();
        requests
    }

    /// The session's masks under the current policy.
    fn compute_masking(&self) -> Masking {
        let policy = &self.policy.policy;
        let Some(target) = policy.target_id(&self.session.target) else {
            return Masking::Off;
        };
        let masks = crate::policy::masks_for(policy, &self.session.workload, target);
        if masks.is_empty() {
            return Masking::Off;
        }
        match MaskSet::compile(
            &masks,
            &self.resolved.columns,
            self.session.context.mask_key.clone(),
        ) {
            Ok(mut set) => {
                set.views = self.resolved.views.clone();
                Masking::On(Arc::new(set))
            }
            Err(unresolved) => Masking::Unresolved(
                format!(
                    "the policy now masks {} (reloaded after this session looked its columns up); reconnect",
                    unresolved.0.join(", ")
                )
                .into(),
            ),
        }
    }

    /// Follows a policy reload (a pointer comparison when there is none).
    fn refresh(&mut self) {
        let current = self.session.context.gate.active.load();
        if !Arc::ptr_eq(&current, &self.policy) {
            self.policy = arc_swap::Guard::into_inner(current);
            self.masking = self.compute_masking();
        }
    }

    fn expect(&self, entry: Expect) {
        self.expected.lock().push_back(entry);
    }

    /// Sends, in the client's message's place, a query that makes the
    /// server raise `denial`; `hide_ready` inside an extended-protocol batch.
    fn raise_denial(&self, denial: &Denial, out: &mut BytesMut, hide_ready: bool) {
        out.extend_from_slice(&raise(denial.code, &denial.message));
        self.expect(Expect::Query {
            audits: VecDeque::new(),
            masks: None,
            hide_ready,
            raised: true,
        });
    }

    fn masks(&self) -> Option<Arc<MaskSet>> {
        self.masking.set().cloned()
    }

    /// Records every statement of `decided` in the session; their audits.
    fn record(&mut self, decided: &Arc<Decided>) -> Result<VecDeque<Audit>, WireError> {
        (0..decided.statements.len())
            .map(|index| self.record_one(decided, index))
            .collect()
    }

    fn record_one(&mut self, decided: &Arc<Decided>, index: usize) -> Result<Audit, WireError> {
        let (audit, ticket) = Audit::record(self.session, decided, index)?;
        if decided.reads_only {
            self.pending_read = Some(ticket);
        } else {
            self.pending = Some(ticket);
        }
        Ok(audit)
    }

    /// Records a denied query, writes its audit lines and logs the denial.
    fn record_denial(&mut self, decided: &Arc<Decided>) -> Result<(), WireError> {
        for audit in self.record(decided)? {
            let (action, ..) = decided.verdicts[audit.index];
            let outcome = match action {
                crate::policy::Action::Deny => StatementOutcome::Denied,
                crate::policy::Action::Allow | crate::policy::Action::Approve => {
                    StatementOutcome::NotRun
                }
            };
            audit.finish(self.session, self.counts, outcome, None);
        }
        tracing::info!(
            denial = decided.denial.as_ref().map(|d| d.message.as_str()),
            "statement denied"
        );
        Ok(())
    }

    /// Whether `decided` must wait for a person: not when the message is
    /// being replayed after its approval, nor under an active grant.
    fn gate(&mut self, decided: &Arc<Decided>) -> Result<Option<Hold>, WireError> {
        let Some(rule) = decided.approval else {
            return Ok(None);
        };
        let name = &decided.policy.policy.rule(rule).name;
        if self.cleared.take_if(|cleared| cleared == name).is_some() {
            return Ok(None);
        }
        let requester = Requester::of(&self.policy.policy, &self.session.workload);
        let session = self.session;
        // A grant asked for up front with a scope covers the query when it
        // covers every statement this rule holds.
        let fits = |scope: &crate::approvals::GrantScope| {
            decided
                .statements
                .iter()
                .zip(decided.verdicts.iter())
                .filter(|(_, (_, by, _))| *by == Some(rule))
                .all(|(statement, _)| scope.covers(statement))
        };
        if session.context.gate.approvals.use_grant(
            &session.recorder,
            &requester,
            &session.target,
            name,
            fits,
        )? {
            return Ok(None);
        }
        Ok(Some(Hold {
            decided: decided.clone(),
            rule,
        }))
    }

    fn notice(&self, message: &str) {
        let mut buf = BytesMut::new();
        wire::notice_response(&mut buf, &format!("interlock: {message}"));
        let _ = self.notices.send(buf);
    }

    /// Holds a message until its request is answered; meanwhile the client
    /// is read (into `buf`, bounded) only to notice that it went away.
    async fn hold<R: AsyncRead + Unpin>(
        &mut self,
        hold: &Hold,
        reader: &mut R,
        buf: &mut BytesMut,
    ) -> Result<Answer, WireError> {
        let rule = hold.decided.policy.policy.rule(hold.rule);
        let Some(spec) = rule.approval.clone() else {
            return Ok(Answer::Refused(format!(
                "rule {:?} asks approval of no one",
                rule.name
            )));
        };
        let command = hold
            .decided
            .statements
            .iter()
            .map(|s| s.text.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        // A reason stated in a comment of the query is this request's own;
        // else the session's application_name's; else the environment's.
        let mut requester = Requester::of(&self.policy.policy, &self.session.workload);
        if let Some(reason) = hold
            .decided
            .analysed
            .iter()
            .find_map(|a| a.stated_reason.clone())
            .or_else(|| self.stated_reason.clone())
        {
            requester.reason = Some(reason);
        }
        let request = crate::approvals::NewRequest {
            requester,
            target: &self.session.target,
            rule: &rule.name,
            spec: spec.clone(),
            command: &command,
        };
        let approvals = &self.session.context.gate.approvals;
        let waiting = async |record: &RequestRecord| {
            let id = &record.id;
            self.notice(&format!(
                "rule {:?} needs approval for this statement; request {id} is waiting (up to {}) for {}. Approve with: interlock approvals approve {id}",
                rule.name,
                humantime::format_duration(spec.timeout),
                record.approvers.join(", "),
            ));
        };
        let cancelled = self.cancelled.clone();
        // Marks the session as holding while the request waits (a cancel
        // then withdraws it instead of going to the server).
        let _holding = cancelled.as_ref().map(|signal| Holding::new(signal));
        let gave_up = gave_up(cancelled.as_deref(), reader, buf);
        let recorder = &self.session.recorder;
        match conn::ask(approvals, recorder, request, waiting, gave_up).await {
            Ok(Asked::Approved(record)) => {
                let by = record.deciders();
                self.notice(&format!(
                    "request {} approved by {}",
                    record.id,
                    by.join(", ")
                ));
                self.cleared = Some(rule.name.clone());
                Ok(Answer::Cleared)
            }
            Ok(Asked::Refused(why)) => Ok(Answer::Refused(why)),
            Ok(Asked::GaveUp {
                why: GaveUp::Left, ..
            }) => Ok(Answer::Gone),
            Ok(Asked::GaveUp { id, why }) => Ok(Answer::Refused(format!(
                "{why}; approval request {id} withdrawn"
            ))),
            Err(ApprovalError::Record(error)) => Err(error.into()),
            Err(error) => {
                tracing::error!(%error, "cannot record an approval request");
                Ok(Answer::Refused(format!(
                    "approval needed, but the request cannot be recorded: {error}"
                )))
            }
        }
    }

    /// Answers a held message its request's refusal, in its protocol's
    /// way: a simple query gets the error now; an extended-protocol batch
    /// is dropped and raises it at its Flush or Sync.
    fn refuse(
        &mut self,
        frame: &Frame,
        hold: &Hold,
        message: &str,
        out: &mut BytesMut,
    ) -> Result<(), WireError> {
        let audits = if frame.tag == b'E' {
            VecDeque::from([self.record_one(&hold.decided, 0)?])
        } else {
            self.record(&hold.decided)?
        };
        for audit in audits {
            let (action, ..) = hold.decided.verdicts[audit.index];
            let outcome = match action {
                crate::policy::Action::Allow => StatementOutcome::NotRun,
                _ => StatementOutcome::Denied,
            };
            audit.finish(self.session, self.counts, outcome, None);
        }
        let denial = Denial {
            code: "42501",
            message: format!("statement not run: {message}"),
        };
        if frame.tag == b'E' {
            self.deny_batch(denial)
        } else {
            self.raise_denial(&denial, out, false);
            Ok(())
        }
    }

    /// Handles one client message: what goes upstream is added to `out`.
    pub(super) fn on_frame(
        &mut self,
        frame: &Frame,
        out: &mut BytesMut,
    ) -> Result<Step, WireError> {
        if self.denied_batch.is_some() {
            return Ok(self.in_denied_batch(frame, out));
        }
        match frame.tag {
            b'Q' => self.on_query(frame, out),
            b'P' => self.on_parse(frame, out),
            b'B' => self.on_bind(frame, out),
            b'D' => self.on_describe(frame, out),
            b'E' => self.on_execute(frame, out),
            b'C' => self.on_close(frame, out),
            b'F' => self.on_function_call(frame, out),
            b'S' if self.copying_in => {
                self.expect(Expect::SyncInCopy);
                Ok(forward(frame, out))
            }
            b'S' => {
                self.expect(Expect::Sync);
                Ok(forward(frame, out))
            }
            b'c' | b'f' => {
                self.copying_in = false;
                Ok(forward(frame, out))
            }
            _ => Ok(forward(frame, out)),
        }
    }

    /// The rest of a batch whose Parse or Bind was denied is dropped; the
    /// denial is raised at the client's next Flush or Sync.
    fn in_denied_batch(&mut self, frame: &Frame, out: &mut BytesMut) -> Step {
        let batch = self.denied_batch.as_mut().expect("in a denied batch");
        if matches!(frame.tag, b'H' | b'S') && !batch.raised {
            batch.raised = true;
            let denial = batch.denial.clone();
            self.raise_denial(&denial, out, true);
        }
        if frame.tag == b'S' {
            self.denied_batch = None;
            self.expect(Expect::Sync);
            out.extend_from_slice(&frame.bytes);
        }
        Step::Done
    }

    /// A simple query: decided, held, or forwarded with its audits.
    fn on_query(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<Step, WireError> {
        self.refresh();
        let sql = wire::query_text(frame.body())?;
        let decided = self.decide(sql);
        if let Some(denial) = &decided.denial {
            self.record_denial(&decided)?;
            self.raise_denial(denial, out, false);
            return Ok(Step::Done);
        }
        if let Some(hold) = self.gate(&decided)? {
            return Ok(Step::Hold(hold));
        }
        self.follow(&decided);
        let audits = self.record(&decided)?;
        self.expect(Expect::Query {
            audits,
            masks: self.masks(),
            hide_ready: false,
            raised: false,
        });
        out.extend_from_slice(&frame.bytes);
        self.repin(&decided, out);
        Ok(Step::Done)
    }

    /// Parse: decided now, raised at the batch's Sync if denied.
    fn on_parse(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<Step, WireError> {
        self.refresh();
        let (name, sql) = wire::parse_fields(frame.body())?;
        let decided = self.decide(sql);
        if let Some(denial) = &decided.denial {
            self.record_denial(&decided)?;
            return self.deny_batch(denial.clone()).map(|()| Step::Done);
        }
        if self.session.as_user.is_some() && resets_role(&decided) {
            return self
                .deny_batch(Denial {
                    code: "42501",
                    message: "DISCARD ALL would drop the role this session is pinned to; send it as a simple query (the agent then sets the role again)".into(),
                })
                .map(|()| Step::Done);
        }
        self.follow(&decided);
        if !self.prepared.contains_key(name) && self.prepared.len() >= MAX_PREPARED {
            return self
                .deny_batch(Denial {
                    code: "42501",
                    message: format!(
                        "more than {MAX_PREPARED} prepared statements in one session; close some first"
                    ),
                })
                .map(|()| Step::Done);
        }
        self.prepared.insert(name.to_owned(), decided);
        self.expect(Expect::Parse);
        Ok(forward(frame, out))
    }

    /// Bind: the prepared statement's decision, made again if the policy
    /// or the search path changed since it was prepared.
    fn on_bind(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<Step, WireError> {
        self.refresh();
        let (portal, statement) = wire::bind_names(frame.body())?;
        let mut decided = self.prepared.get(statement).cloned();
        // Prepared under an older policy or search path: decided
        // again now.
        if let Some(stale) = &decided
            && (!Arc::ptr_eq(&stale.policy, &self.policy) || stale.generation != self.generation)
        {
            let fresh = Arc::new(decide(
                self.session,
                &self.policy,
                stale.analysed.clone(),
                &self.names,
                self.generation,
                &self.masking,
            ));
            self.prepared.insert(statement.to_owned(), fresh.clone());
            decided = Some(fresh);
        }
        if let Some(decided) = decided.as_ref().filter(|d| d.denial.is_some()) {
            self.record_denial(decided)?;
            let denial = decided.denial.clone().expect("filtered");
            return self.deny_batch(denial).map(|()| Step::Done);
        }
        self.portals.insert(
            portal.to_owned(),
            Portal {
                decided,
                described: false,
            },
        );
        self.expect(Expect::Bind {
            portal: portal.to_owned(),
        });
        Ok(forward(frame, out))
    }

    /// Describe: a portal's row description is masked like its rows.
    fn on_describe(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<Step, WireError> {
        let (kind, name) = wire::target_name(frame.body(), "Describe")?;
        if kind == b'P' {
            if let Some(portal) = self.portals.get_mut(name) {
                portal.described = true;
            }
            self.expect(Expect::DescribePortal {
                portal: name.to_owned(),
                masks: self.masks(),
                hidden: false,
            });
        } else {
            self.expect(Expect::DescribeStatement);
        }
        Ok(forward(frame, out))
    }

    /// Execute: held if it needs approval, else recorded and forwarded
    /// (with a Describe of the agent's own when rows must be masked).
    fn on_execute(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<Step, WireError> {
        let portal_name = wire::execute_portal(frame.body())?;
        // Each execution of a statement that needs approval waits
        // for its own (prepared statements are not approved once
        // for all their executions).
        let held = self
            .portals
            .get(portal_name)
            .and_then(|p| p.decided.clone());
        if let Some(decided) = held
            && let Some(hold) = self.gate(&decided)?
        {
            return Ok(Step::Hold(hold));
        }
        let masks = self.masks();
        let portal = self.portals.get_mut(portal_name);
        let described = portal.as_ref().is_some_and(|p| p.described);
        let decided = portal.and_then(|p| {
            p.described = true;
            p.decided.clone()
        });
        self.copying_in = decided.as_ref().is_some_and(|d| {
            d.statements
                .first()
                .is_some_and(|s| s.kinds.contains(StatementKind::CopyFrom))
        });
        // Each execution is a statement of the record (an empty
        // one runs nothing and records nothing).
        let audit = match decided {
            Some(decided) if !decided.statements.is_empty() => Some(self.record_one(&decided, 0)?),
            _ => None,
        };
        // Rows are masked by their columns: when the client did not
        // describe the portal, the agent asks for itself.
        if masks.is_some() && !described {
            describe_portal(portal_name, out);
            self.expect(Expect::DescribePortal {
                portal: portal_name.to_owned(),
                masks: masks.clone(),
                hidden: true,
            });
        }
        self.expect(Expect::Execute {
            portal: portal_name.to_owned(),
            audit,
            masks,
        });
        Ok(forward(frame, out))
    }

    /// Close: the statement or portal is forgotten.
    fn on_close(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<Step, WireError> {
        let (kind, name) = wire::target_name(frame.body(), "Close")?;
        if kind == b'P' {
            self.portals.remove(name);
        } else {
            self.prepared.remove(name);
        }
        self.expect(Expect::Close);
        Ok(forward(frame, out))
    }

    /// A fast-path function call names a function by OID: it cannot be
    /// read as a statement, so it follows `unparsed`.
    fn on_function_call(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<Step, WireError> {
        self.refresh();
        let call: Arc<[Analysed]> = Arc::new([Analysed {
            parsed: Arc::new(Parsed {
                kinds: KindSet::from_iter([StatementKind::Call]),
                problem: Some("a fast-path call names its function by number".into()),
                unparsed: true,
                ..Parsed::default()
            }),
            text: "fast-path function call".into(),
            stated_reason: None,
        }]);
        let decided = Arc::new(decide(
            self.session,
            &self.policy,
            call,
            &self.names,
            self.generation,
            &self.masking,
        ));
        let denial = decided.denial.clone().or_else(|| {
            self.masks().map(|_| Denial {
                code: "42501",
                message:
                    "results are masked for this workload, and a fast-path call's result cannot be"
                        .into(),
            })
        });
        if let Some(denial) = denial {
            self.record_denial(&decided)?;
            self.raise_denial(&denial, out, false);
            return Ok(Step::Done);
        }
        if let Some(hold) = self.gate(&decided)? {
            return Ok(Step::Hold(hold));
        }
        let audits = self.record(&decided)?;
        self.expect(Expect::Query {
            audits,
            masks: None,
            hide_ready: false,
            raised: false,
        });
        Ok(forward(frame, out))
    }

    /// The decision on a query text (analysed by `prepare`).
    fn decide(&mut self, sql: &str) -> Arc<Decided> {
        self.decisions.get(
            sql,
            self.session,
            &self.policy,
            &self.masking,
            &self.names,
            self.generation,
        )
    }

    /// Analyses the query text of a Query or Parse before it is handled
    /// (large ones away from the async workers).
    async fn prepare(&mut self, frame: &Frame) -> Result<(), WireError> {
        let sql = match frame.tag {
            b'Q' => wire::query_text(frame.body())?,
            b'P' => wire::parse_fields(frame.body())?.1,
            _ => return Ok(()),
        };
        self.decisions.prepare(sql, self.session).await;
        Ok(())
    }

    /// Follows what an allowed query may do to name resolution: the
    /// session's search path as it may now be.
    fn follow(&mut self, decided: &Decided) {
        for analysed in decided.analysed.iter() {
            if self.names.apply(&analysed.parsed.effects) {
                self.generation += 1;
            }
            for effect in &analysed.parsed.effects {
                if let super::sql::Effect::StatedReason(reason) = effect {
                    self.stated_reason = Some(reason.clone());
                }
            }
        }
    }

    /// After a query that put the login role back (`DISCARD ALL`), the
    /// session's pinned role is set again before anything else the client
    /// sends reaches the server.
    fn repin(&self, decided: &Decided, out: &mut BytesMut) {
        let Some(role) = &self.session.as_user else {
            return;
        };
        if !resets_role(decided) {
            return;
        }
        let quoted = role.replace('"', "\"\"");
        let _ = postgres_protocol::message::frontend::query(&format!("SET ROLE \"{quoted}\""), out);
        self.expect(Expect::Repin);
    }

    /// Drops the rest of the batch; the denial is raised at Flush or Sync.
    fn deny_batch(&mut self, denial: Denial) -> Result<(), WireError> {
        self.denied_batch = Some(DeniedBatch {
            denial,
            raised: false,
        });
        Ok(())
    }
}

/// Relays the client's messages upstream until it terminates or closes.
pub async fn relay_client<R, W>(
    reader: &mut R,
    writer: &mut W,
    requests: &mut Requests<'_>,
    bytes_up: &AtomicU64,
    failed: &std::sync::atomic::AtomicBool,
) -> Result<(), WireError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let result = relay(reader, writer, requests, bytes_up).await;
    if result.is_err() {
        failed.store(true, Ordering::SeqCst);
    }
    // Terminate, end of stream or an error: the server sees the end of ours.
    let _ = writer.shutdown().await;
    result
}

async fn relay<R, W>(
    reader: &mut R,
    writer: &mut W,
    requests: &mut Requests<'_>,
    bytes_up: &AtomicU64,
) -> Result<(), WireError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(8 * 1024);
    // Frames a client sends together (Parse/Bind/Describe/Execute/Sync) go
    // upstream together: gathered, and written whenever no further complete
    // frame is already waiting, i.e. before the relay would block on a read.
    // Their statements are made durable first, in one group commit.
    let mut out = BytesMut::with_capacity(16 * 1024);
    'frames: loop {
        if (!wire::has_frame(&buf) || out.len() >= 64 * 1024) && !out.is_empty() {
            requests.flush(writer, &mut out).await?;
        }
        let Some(frame) = wire::read_frame(reader, &mut buf).await? else {
            break;
        };
        bytes_up.fetch_add(frame.bytes.len() as u64, Ordering::Relaxed);
        if frame.tag == b'X' {
            // Terminate: passed on, so the server ends the session cleanly.
            out.extend_from_slice(&frame.bytes);
            break;
        }
        requests.prepare(&frame).await?;
        let mut step = requests.on_frame(&frame, &mut out)?;
        while let Step::Hold(hold) = step {
            // What came before goes on; only this message waits.
            requests.flush(writer, &mut out).await?;
            step = match requests.hold(&hold, reader, &mut buf).await? {
                // Handled again: a reload meanwhile may decide it anew.
                // The clearance was for this message only, whatever it met.
                Answer::Cleared => {
                    let step = requests.on_frame(&frame, &mut out)?;
                    requests.cleared = None;
                    step
                }
                Answer::Refused(message) => {
                    requests.refuse(&frame, &hold, &message, &mut out)?;
                    Step::Done
                }
                Answer::Gone => break 'frames,
            }
        }
    }
    requests.flush(writer, &mut out).await
}

impl Requests<'_> {
    /// Sends what was gathered: once the records of statements that may
    /// change the target are on disk; the others' are made durable while
    /// they run, and their answers wait for that.
    async fn flush<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        out: &mut BytesMut,
    ) -> Result<(), WireError> {
        let recorder = &self.session.recorder;
        let read = self.pending_read.take();
        if let Some(ticket) = self.pending.take() {
            recorder
                .durable(ticket.max(read.unwrap_or_default()))
                .await?;
        } else if let Some(ticket) = read {
            // Raised before anything goes upstream: no answer to it can
            // reach the server side first.
            recorder.commit_soon(ticket);
            self.session.answers.raise(ticket);
        }
        writer.write_all(out).await?;
        out.clear();
        Ok(())
    }
}

/// Whether a query puts the session's login role back.
fn resets_role(decided: &Decided) -> bool {
    decided
        .analysed
        .iter()
        .any(|a| a.parsed.effects.contains(&super::sql::Effect::ResetRole))
}

/// A Describe of a portal, asked by the agent.
fn describe_portal(portal: &str, out: &mut BytesMut) {
    out.put_u8(b'D');
    out.put_i32((4 + 1 + portal.len() + 1) as i32);
    out.put_u8(b'P');
    out.put_slice(portal.as_bytes());
    out.put_u8(0);
}

/// A simple Query that makes the server raise the denial as SQLSTATE 42501.
/// The text only carries policy names and parsed identifiers; quotes are
/// doubled and `$` removed so it cannot end the dollar-quoted body.
pub fn raise(code: &str, denial: &str) -> BytesMut {
    let message = format!("interlock: {denial}")
        .replace('$', "")
        .replace('\'', "''");
    let code: String = code.chars().filter(char::is_ascii_alphanumeric).collect();
    let sql = format!(
        "DO $interlock$ BEGIN RAISE EXCEPTION USING ERRCODE = '{code}', MESSAGE = '{message}'; END $interlock$"
    );
    let mut buf = BytesMut::new();
    postgres_protocol::message::frontend::query(&sql, &mut buf).expect("no NUL in the denial");
    buf
}

/// Sets a session's `holding` flag for as long as it lives.
struct Holding<'a>(&'a super::cancel::CancelSignal);

impl<'a> Holding<'a> {
    fn new(signal: &'a super::cancel::CancelSignal) -> Self {
        signal
            .holding
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Self(signal)
    }
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.0
            .holding
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_cannot_be_broken_out_of() {
        let buf = raise(
            "42501",
            "rule \"x\" denies drop on public.a'b$interlock$; DROP TABLE t; --",
        );
        let text = wire::query_text(&buf[5..]).unwrap();
        assert!(text.starts_with("DO $interlock$ BEGIN RAISE EXCEPTION USING ERRCODE = '42501'"));
        assert_eq!(text.matches("$interlock$").count(), 2, "{text}");
        assert!(text.contains("public.a''binterlock;"), "{text}");
        let parsed = super::super::sql::analyze(text, Default::default());
        assert_eq!(parsed.len(), 1, "still one statement: {text}");
    }
}
