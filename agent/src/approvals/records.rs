//! What approvals are made of: requests and where they stand, who asked,
//! who answered, grants, and who may answer.
use serde::{Deserialize, Serialize};

use std::time::Duration;

use crate::{
    policy::{Approver, Pattern, Policy, StatementInfo, StatementKind, functions},
    workload::Workload,
};

/// Where a request stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    Pending,
    Approved,
    Denied,
    TimedOut,
    /// The client went away while it waited.
    Withdrawn,
    /// The agent stopped while it waited.
    Abandoned,
}

impl RequestState {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestState::Pending => "pending",
            RequestState::Approved => "approved",
            RequestState::Denied => "denied",
            RequestState::TimedOut => "timed_out",
            RequestState::Withdrawn => "withdrawn",
            RequestState::Abandoned => "abandoned",
        }
    }
}

/// Who asked: what an approver needs to judge the request.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Requester {
    pub uid: u32,
    pub user: Option<String>,
    pub pid: u32,
    pub unit: Option<String>,
    pub cgroup: Option<String>,
    pub exe: Option<String>,
    /// The policy's workloads it matched.
    pub workloads: Vec<String>,
    /// The CI job it runs in, as its runner described it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<crate::workload::JobContext>,
    /// Why, as the caller stated it (self-declared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Requester {
    /// The caller, and the policy's workloads it matches.
    pub fn of(policy: &Policy, workload: &Workload) -> Self {
        Self {
            uid: workload.uid,
            user: workload.user.clone(),
            pid: workload.pid,
            unit: workload.unit.clone(),
            cgroup: workload.cgroup.clone(),
            exe: workload.exe.clone(),
            workloads: crate::policy::matching_workloads(policy, workload)
                .into_iter()
                .map(str::to_owned)
                .collect(),
            job: workload.job.clone(),
            reason: workload.reason.clone(),
        }
    }

    /// What "the same workload" means for a grant: the same uid in the same
    /// cgroup (a CI job's scope, a service's unit).
    pub(super) fn grant_key(&self) -> String {
        format!("{}@{}", self.uid, self.cgroup.as_deref().unwrap_or("-"))
    }

    pub(super) fn describe(&self) -> String {
        let who = match &self.user {
            Some(user) => format!("{user} (uid {})", self.uid),
            None => format!("uid {}", self.uid),
        };
        let place = self
            .unit
            .as_deref()
            .or(self.cgroup.as_deref())
            .unwrap_or("-");
        let exe = self.exe.as_deref().unwrap_or("?");
        let job = self.job.as_ref().map(describe_job).unwrap_or_default();
        let reason = self
            .reason
            .as_ref()
            .map(|r| format!(", stating {r:?}"))
            .unwrap_or_default();
        format!("{who} in {place}, {exe} (pid {}){job}{reason}", self.pid)
    }
}

/// `, job 77 of group/app on main by ann (URL)`.
pub fn describe_job(job: &crate::workload::JobContext) -> String {
    let mut text = format!(", {} job {}", job.ci, job.job.as_deref().unwrap_or("?"));
    if let Some(project) = &job.project {
        text.push_str(&format!(" of {project}"));
    }
    if let Some(git_ref) = &job.git_ref {
        text.push_str(&format!(" on {git_ref}"));
    }
    if let Some(actor) = &job.actor {
        text.push_str(&format!(" by {actor}"));
    }
    if let Some(url) = &job.url {
        text.push_str(&format!(" ({url})"));
    }
    text
}

/// One answer to a request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Answer {
    pub by: String,
    pub approve: bool,
    pub reason: Option<String>,
    pub at_ms: u64,
}

/// A request, as stored, listed and sent to the webhook.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RequestRecord {
    pub id: String,
    /// The session whose command is held; empty for a grant asked up front.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub session_id: String,
    pub host: String,
    pub state: RequestState,
    pub target: String,
    pub rule: String,
    /// The exact command held.
    pub command: String,
    pub requester: Requester,
    pub approvers: Vec<String>,
    pub min_approvals: u32,
    /// `once` or the grant's duration.
    pub grant: String,
    pub created_ms: u64,
    pub expires_ms: u64,
    #[serde(default)]
    pub answers: Vec<Answer>,
    pub decided_ms: Option<u64>,
    /// The grant an approval created, when the rule grants a duration.
    pub grant_id: Option<String>,
    /// Asked up front (`interlock request`) for a grant, not for a held
    /// command: `command` describes the grant.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub up_front: bool,
    /// What the grant asked for covers, when narrower than the rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<GrantScope>,
    /// Asked by a person for every caller of this policy workload, rather
    /// than for the asking process's own workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_workload: Option<String>,
}

impl RequestRecord {
    /// Who said yes (or no, for a denial).
    pub fn deciders(&self) -> Vec<String> {
        let approve = self.state != RequestState::Denied;
        self.answers
            .iter()
            .filter(|a| a.approve == approve)
            .map(|a| a.by.clone())
            .collect()
    }

    /// Why it did not go through, for the client's error.
    pub fn refusal(&self) -> String {
        let denial = self.answers.iter().find(|a| !a.approve);
        match (self.state, denial) {
            (RequestState::Denied, Some(answer)) => format!(
                "approval request {} was denied by {}: {}",
                self.id,
                answer.by,
                answer.reason.as_deref().unwrap_or("no reason given")
            ),
            (RequestState::TimedOut, _) => format!(
                "approval request {} timed out after {} with {} of {} approvals",
                self.id,
                humantime::format_duration(Duration::from_secs(
                    (self.expires_ms - self.created_ms) / 1000
                )),
                self.answers.iter().filter(|a| a.approve).count(),
                self.min_approvals
            ),
            (state, _) => format!("approval request {} is {}", self.id, state.as_str()),
        }
    }
}

/// A standing permission an approval created.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GrantRecord {
    pub id: String,
    pub rule: String,
    pub target: String,
    pub requester: Requester,
    pub workload_key: String,
    pub request_id: String,
    pub approved_by: Vec<String>,
    /// The rule's approvers when granted: who may revoke it besides admins.
    pub approvers: Vec<String>,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub revoked: Option<Answer>,
    /// Asked up front: the statements it covers, when narrower than the
    /// rule (a statement outside it is held as usual).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<GrantScope>,
    /// Granted to every caller of this policy workload (asked by a
    /// person), instead of `workload_key`'s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
}

impl GrantRecord {
    pub(super) fn active(&self, now: u64) -> bool {
        self.revoked.is_none() && now < self.expires_ms
    }

    /// Whether the grant is `requester`'s: its own workload's (same uid in
    /// the same cgroup), or a policy workload it matches.
    pub(super) fn holder(&self, requester: &Requester, key: &str) -> bool {
        match &self.workload {
            Some(name) => requester.workloads.iter().any(|w| w == name),
            None => self.workload_key == key,
        }
    }
}

/// The SQL statements a grant asked for up front covers. It lets a
/// statement through as an allow rule would: every kind of it listed,
/// every table it touches matched, every function it calls a harmless
/// built-in or one of the rule's. Anything else its rule catches is held
/// for a person, as without the grant.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantScope {
    /// Empty: any kind the rule is about.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statements: Vec<StatementKind>,
    /// `schema.table` names (or the rule's own globs); empty: any table.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<String>,
    /// The rule's function globs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub functions: Vec<String>,
}

impl GrantScope {
    pub fn covers(&self, statement: &StatementInfo) -> bool {
        let globs = |list: &[String]| -> Vec<Pattern> {
            list.iter().filter_map(|g| Pattern::new(g).ok()).collect()
        };
        let (tables, functions) = (globs(&self.tables), globs(&self.functions));
        statement.parsed
            && (self.statements.is_empty()
                || statement.kinds.iter().all(|k| self.statements.contains(&k)))
            && (self.tables.is_empty()
                || statement
                    .tables
                    .iter()
                    .all(|t| tables.iter().any(|p| p.matches(t))))
            && statement
                .functions
                .iter()
                .all(|f| functions::covered(&functions, f))
    }

    /// `delete, update on public.orders`.
    pub fn describe(&self) -> String {
        let kinds = if self.statements.is_empty() {
            "any statement".to_owned()
        } else {
            let names: Vec<&str> = self.statements.iter().map(|k| k.as_str()).collect();
            names.join(", ")
        };
        let tables = if self.tables.is_empty() {
            "any table".to_owned()
        } else {
            self.tables.join(", ")
        };
        format!("{kinds} on {tables}")
    }
}

/// Who is answering.
#[derive(Clone, Debug)]
pub enum Caller {
    /// A process on the host, from SO_PEERCRED.
    Local { uid: u32, gid: u32 },
    /// A name an authenticated HTTP callback gives.
    Callback { name: String },
}

impl Caller {
    pub(super) fn name(&self) -> String {
        match self {
            Caller::Local { uid, .. } => crate::workload::user_name(*uid).map_or_else(
                || format!("uid:{uid}"),
                |name| format!("{name} (uid {uid})"),
            ),
            Caller::Callback { name } => format!("webhook:{name}"),
        }
    }

    pub(super) fn is(&self, approver: &Approver) -> bool {
        match (self, approver) {
            (Caller::Local { uid, gid }, Approver::Local(principal)) => {
                crate::principal::caller_matches(*uid, *gid, std::slice::from_ref(principal))
            }
            (Caller::Callback { name }, Approver::Callback(expected)) => {
                expected == "*" || expected == name
            }
            _ => false,
        }
    }
}
