//! Statements of a session: what policy decided for a query text (cached
//! per session), and the audit line each statement gets once it has run.
use crate::masking::MaskSet;
use crate::sessions::StatementOutcome;
use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    time::{Instant, SystemTime},
};

use crate::{
    access::StatementLine,
    policy::{
        Action, ActivePolicy, Policy, RuleId, StatementInfo, StatementKind, TargetId,
        evaluate_statement,
    },
    sessions::{Event, StoreError, Ticket},
};

use super::{
    Session, StatementCounts,
    names::Names,
    sql::{self, Analysed},
};

/// The masks a session applies, as of one policy.
#[derive(Clone)]
pub enum Masking {
    Off,
    On(Arc<MaskSet>),
    /// The policy now masks a table column this session did not look up
    /// (it was reloaded since): every statement is refused until the client
    /// reconnects, rather than a result going out unmasked.
    Unresolved(Arc<str>),
}

impl Masking {
    pub fn set(&self) -> Option<&Arc<MaskSet>> {
        match self {
            Masking::On(set) => Some(set),
            _ => None,
        }
    }
}

/// Policy's answer for one query text, under one policy and one state of
/// the session's names.
pub struct Decided {
    /// The policy decided under; a reload makes a new one.
    pub policy: Arc<ActivePolicy>,
    /// The session's names generation decided under.
    pub generation: u64,
    /// The statements as parsed (session-independent).
    pub analysed: Arc<[Analysed]>,
    /// The statements as this session's names resolve them.
    pub statements: Arc<[StatementInfo]>,
    /// Per statement: the action, the deciding rule (index in the
    /// policy's rules), and whether the action is applied (the agent
    /// enforces and no rule in rollout decided it).
    pub verdicts: Box<[(Action, Option<RuleId>, bool)]>,
    /// Set when a statement is denied and enforcement is on: the SQLSTATE
    /// and message the client gets. None of the query runs.
    pub denial: Option<Denial>,
    /// Set when a statement needs approval (enforcement on, nothing
    /// denied): the asking rule. The whole query waits for one answer.
    pub approval: Option<RuleId>,
    /// No statement of it can change the target
    /// ([`StatementInfo::reads_only`]): it may go upstream while its
    /// record is being made durable.
    pub reads_only: bool,
}

/// Why a query does not run, as the client is told.
#[derive(Clone, Debug)]
pub struct Denial {
    /// `42501` (insufficient privilege) or `54000` (too large).
    pub code: &'static str,
    pub message: String,
}

impl Decided {
    pub fn rule_name(&self, index: usize) -> Option<&str> {
        let (_, rule, _) = self.verdicts.get(index)?;
        self.policy.policy.rule_name(*rule)
    }
}

/// Decisions by query text, per session: clients that repeat a statement
/// (the extended protocol re-sends Parse; ORMs repeat queries) pay a hash
/// lookup instead of an analysis and an evaluation. An entry made under an
/// older policy or names generation is decided again (the parse is kept).
#[derive(Default)]
pub struct DecisionCache(HashMap<String, Entry>);

struct Entry {
    analysed: Arc<[Analysed]>,
    decided: Option<Arc<Decided>>,
}

impl DecisionCache {
    const MAX_ENTRIES: usize = 256;

    /// Makes sure `sql` is analysed (off the async workers when large);
    /// statements over the size limit are not parsed at all.
    pub async fn prepare(&mut self, sql: &str, session: &Session) {
        if self.0.contains_key(sql) {
            return;
        }
        let limit = session.context.pg.max_statement_bytes;
        let analysed: Arc<[Analysed]> = if sql.len() > limit {
            Arc::new([sql::Analysed {
                parsed: Arc::new(sql::Parsed {
                    problem: Some(format!(
                        "it is {} bytes, over the agent's limit of {limit} ([agent] max_statement_bytes)",
                        sql.len()
                    )),
                    too_large: true,
                    unparsed: true,
                    ..Default::default()
                }),
                text: format!("<statement of {} bytes, over the size limit>", sql.len()),
                stated_reason: None,
            }])
        } else {
            session
                .context
                .pg
                .analyzer
                .analyze(sql, session.context.literals)
                .await
                .into()
        };
        if self.0.len() >= Self::MAX_ENTRIES {
            self.0.clear();
        }
        self.0.insert(
            sql.to_owned(),
            Entry {
                analysed,
                decided: None,
            },
        );
    }

    /// The decision on `sql` (analysed by [`prepare`](Self::prepare)).
    pub fn get(
        &mut self,
        sql: &str,
        session: &Session,
        policy: &Arc<ActivePolicy>,
        masking: &Masking,
        names: &Names,
        generation: u64,
    ) -> Arc<Decided> {
        let entry = match self.0.get_mut(sql) {
            Some(entry) => entry,
            // Not prepared (it cannot happen on the relay's path): analysed
            // here, on the calling thread.
            None => {
                let analysed: Arc<[Analysed]> = sql::analyze(sql, session.context.literals).into();
                self.0.entry(sql.to_owned()).or_insert(Entry {
                    analysed,
                    decided: None,
                })
            }
        };
        if let Some(hit) = &entry.decided
            && Arc::ptr_eq(&hit.policy, policy)
            && hit.generation == generation
        {
            return hit.clone();
        }
        let decided = Arc::new(decide(
            session,
            policy,
            entry.analysed.clone(),
            names,
            generation,
            masking,
        ));
        entry.decided = Some(decided.clone());
        decided
    }
}

/// Decides every statement of a query; the query is denied as a whole if
/// any statement is (and enforcement is on), so that none of it runs.
pub fn decide(
    session: &Session,
    policy: &Arc<ActivePolicy>,
    analysed: Arc<[Analysed]>,
    names: &Names,
    generation: u64,
    masking: &Masking,
) -> Decided {
    let statements: Arc<[StatementInfo]> = analysed.iter().map(|a| names.resolve(a)).collect();
    let target = policy.policy.target_id(&session.target);
    let mut denial = None;
    let mut approval: Option<RuleId> = None;
    let mut verdicts = Vec::with_capacity(statements.len());
    for (statement, analysed) in statements.iter().zip(analysed.iter()) {
        let (action, rule, reason) = match (target, masking) {
            // The target left the policy since the session began.
            (None, _) => (
                Action::Deny,
                None,
                "the target is no longer in the policy".into(),
            ),
            (Some(_), Masking::Unresolved(why)) => (Action::Deny, None, why.to_string()),
            (Some(id), _) => decide_one(session, &policy.policy, id, statement, masking),
        };
        let enforced = policy.enforce
            && target.is_none_or(|id| policy.policy.enforces(rule, &session.workload, id));
        // A statement over the size limit is refused even in audit mode:
        // it is never parsed, so it is never checked.
        let too_large = analysed.parsed.too_large;
        if action == Action::Deny && (enforced || target.is_none() || too_large) && denial.is_none()
        {
            // Written for the person reading it: which rule, what of the
            // statement, where.
            let target = &session.target;
            let denied_by_rule =
                rule.is_some_and(|id| policy.policy.rule(id).action == Action::Deny);
            let message = match policy.policy.rule_name(rule) {
                Some(name) if denied_by_rule && statement.parsed && !statement.changes_role => {
                    format!(
                        "statement denied by rule {name:?}: {} is not allowed (target {target:?})",
                        crate::policy::statement_what(statement)
                    )
                }
                Some(name) => {
                    format!("statement denied by rule {name:?}: {reason} (target {target:?})")
                }
                None => format!("statement denied: {reason} (target {target:?})"),
            };
            let code = if too_large { "54000" } else { "42501" };
            denial = Some(Denial { code, message });
        }
        if action == Action::Approve && enforced && denial.is_none() {
            match (approval, rule) {
                (None, Some(asking)) => approval = Some(asking),
                (Some(first), Some(asking)) if first != asking => {
                    denial = Some(Denial {
                        code: "42501",
                        message: format!(
                            "statements of this query need approval under rules {:?} and {:?}; send them one at a time",
                            policy.policy.rule(first).name,
                            policy.policy.rule(asking).name
                        ),
                    });
                }
                _ => {}
            }
        }
        verdicts.push((action, rule, enforced));
    }
    Decided {
        policy: policy.clone(),
        generation,
        analysed,
        reads_only: statements.iter().all(StatementInfo::reads_only),
        statements,
        verdicts: verdicts.into(),
        approval: approval.filter(|_| denial.is_none()),
        denial,
    }
}

/// One statement's decision under the policy, with what masking adds: a
/// statement that would read masked values in a way masks cannot follow
/// is denied.
fn decide_one(
    session: &Session,
    policy: &Policy,
    id: TargetId,
    statement: &StatementInfo,
    masking: &Masking,
) -> (Action, Option<RuleId>, String) {
    let verdict = evaluate_statement(policy, &session.workload, id, statement);
    let rule = verdict.rule;
    let walked_around = || {
        let masks = crate::policy::masks_for(policy, &session.workload, id);
        if masks.iter().all(|m| m.expressions_allowed) {
            return None;
        }
        let view = masking.set().and_then(|set| {
            set.views
                .iter()
                .find(|(view, _)| statement.tables.contains(view))
        });
        if let Some((view, column)) = view {
            return Some(format!(
                "{view} is a view that reads the masked column {column}, and its columns cannot be masked as that column; select from the table"
            ));
        }
        crate::policy::walked_around(&masks, statement)
    };
    if verdict.action != Action::Deny
        && masking.set().is_some()
        && statement.kinds.contains(StatementKind::CopyTo)
    {
        // COPY output is not rows the agent can mask.
        let why =
            "results are masked for this workload, and COPY ... TO output cannot be; use SELECT";
        (Action::Deny, rule, why.into())
    } else if verdict.action != Action::Deny
        && masking.set().is_some()
        && let Some(why) = walked_around()
    {
        (Action::Deny, rule, why)
    } else if verdict.action == Action::Deny {
        (Action::Deny, rule, verdict.reason(policy, statement))
    } else {
        (verdict.action, rule, String::new())
    }
}

/// One statement on its way through the server: written as an audit line
/// when it completes (or fails, or is skipped).
pub struct Audit {
    pub decided: Arc<Decided>,
    pub index: usize,
    /// Its number in the session's record.
    pub n: u64,
    started: Instant,
    time: SystemTime,
    pub rows: u64,
    pub masked: u64,
}

impl Audit {
    /// Records statement `index` of `decided` in the session (its
    /// `statement` event) and starts its audit.
    pub fn record(
        session: &Session,
        decided: &Arc<Decided>,
        index: usize,
    ) -> Result<(Self, Ticket), StoreError> {
        let recorder = &session.recorder;
        let n = recorder.next_statement();
        let statement = &decided.statements[index];
        let (action, _, enforced) = decided.verdicts[index];
        // Only functions a rule must name: most statements call none.
        let functions: Vec<&str> = statement
            .functions
            .iter()
            .filter(|f| !crate::policy::functions::covered(&[], f))
            .map(|f| f.name.as_str())
            .collect();
        let ticket = recorder.append(&Event::Statement {
            n,
            text: &statement.text,
            kinds: statement.kinds,
            tables: &statement.tables,
            functions: &functions,
            unparsed: !statement.parsed,
            writes: statement.writes(),
            decision: action,
            enforced,
            rule: decided.rule_name(index),
        })?;
        recorder.count_statement(action == Action::Deny);
        let audit = Self {
            decided: decided.clone(),
            index,
            n,
            started: Instant::now(),
            time: SystemTime::now(),
            rows: 0,
            masked: 0,
        };
        Ok((audit, ticket))
    }

    /// Writes the statement's audit line and counts its decision.
    pub fn finish(
        self,
        session: &Session,
        counts: &StatementCounts,
        outcome: StatementOutcome,
        completion: Option<&[u8]>,
    ) {
        let Some(statement) = self.decided.statements.get(self.index) else {
            return;
        };
        let (action, _, enforced) = self.decided.verdicts[self.index];
        if action == Action::Deny || outcome == StatementOutcome::Denied {
            counts.denied.fetch_add(1, Ordering::Relaxed);
        } else {
            counts.allowed.fetch_add(1, Ordering::Relaxed);
        }
        // The server's count (`UPDATE 3`, `SELECT 5`) where it gives one,
        // else the rows that went by.
        let rows = completion
            .and_then(|tag| tag.rsplit(|b| *b == b' ').next())
            .and_then(|n| std::str::from_utf8(n).ok()?.parse().ok())
            .unwrap_or(self.rows);
        let ran = matches!(outcome, StatementOutcome::Ok | StatementOutcome::Error);
        let duration = self.started.elapsed();
        // Not waited for: the statement itself was durable before it ran.
        if let Err(error) = session.recorder.append(&Event::Result {
            n: self.n,
            outcome,
            rows: ran.then_some(rows),
            cells_masked: self.masked,
            duration_us: ran.then_some(duration.as_micros() as u64),
        }) {
            tracing::error!(%error, "cannot record a statement's result");
        }
        if !session.context.pg.statement_lines {
            return;
        }
        StatementLine {
            event: "statement",
            time: humantime::format_rfc3339_millis(self.time).to_string(),
            session_id: &session.session_id,
            target: &session.target,
            statement: &statement.text,
            kinds: statement.kinds,
            tables: &statement.tables,
            writes: statement.writes(),
            decision: action,
            enforced,
            rule: self.decided.rule_name(self.index),
            outcome,
            rows: ran.then_some(rows),
            cells_masked: self.masked,
            duration_ms: ran.then_some(duration.as_secs_f64() * 1000.0),
        }
        .write();
    }
}
