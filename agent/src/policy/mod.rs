//! The policy core: pure data and ONE evaluation function, no I/O.
//!
//! The proxy only asks [`evaluate`] "may this workload use this target?";
//! the configuration loader builds a [`Policy`], the daemon swaps it
//! atomically on reload.
mod command;
pub mod functions;
mod http;
pub mod kube;
mod mask;
mod selector;
pub mod shell;
mod statement;
mod targets;

pub use command::{CommandLine, CommandPattern, Match};
#[doc(hidden)]
pub use http::fuzz as fuzz_http_request;
pub use http::{HttpRequest, HttpRequests};
pub use mask::{BuiltinPattern, ColumnName, Mask, MaskSelects, MaskSpec, Strategy, walked_around};
pub use selector::{Pattern, WorkloadSelector};
pub use statement::{Builtin, Exposure, FunctionRef, KindSet, StatementInfo, StatementKind};
pub use targets::{
    ClientIdentity, Credential, HostKeyCheck, HttpCredential, Protocol, RecordMode, Secret,
    SshAuth, SshUpstream, Target, TargetAddress, TargetId, TargetTable, UpstreamTls,
};

use serde::Serialize;

use crate::{principal::Principal, workload::Workload};

/// A loaded, validated policy: names are resolved to indices, so evaluation
/// never looks anything up by string.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub targets: Vec<Target>,
    pub workloads: Vec<NamedWorkload>,
    pub rules: Vec<Rule>,
}

/// A rule of one [`Policy`]: its index in `Policy::rules`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleId(pub usize);

impl Policy {
    pub fn rule(&self, id: RuleId) -> &Rule {
        &self.rules[id.0]
    }

    pub fn target(&self, id: TargetId) -> &Target {
        &self.targets[id.0]
    }

    /// The deciding rule's name, if a rule decided.
    pub fn rule_name(&self, id: Option<RuleId>) -> Option<&str> {
        id.map(|id| self.rule(id).name.as_str())
    }

    /// The rules with their ids.
    fn rules_by_id(&self) -> impl Iterator<Item = (RuleId, &Rule)> {
        self.rules.iter().enumerate().map(|(i, r)| (RuleId(i), r))
    }

    /// The target of that name.
    pub fn target_id(&self, name: &str) -> Option<TargetId> {
        self.targets
            .iter()
            .position(|t| t.name == name)
            .map(TargetId)
    }
}

#[derive(Clone, Debug)]
pub struct NamedWorkload {
    pub name: String,
    pub selector: WorkloadSelector,
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub name: String,
    pub description: Option<String>,
    /// Indices into `Policy::workloads`; `None` means any workload.
    pub workloads: Option<Vec<usize>>,
    /// Indices into `Policy::targets`; `None` means any target.
    pub targets: Option<Vec<TargetId>>,
    pub action: Action,
    /// Statement kinds the rule is about (SQL targets); `None`: any.
    pub statements: Option<KindSet>,
    /// `schema.table` globs the rule is about (SQL targets); empty: any.
    pub tables: Vec<Pattern>,
    /// An allow rule with `tables = []`: it covers only statements that
    /// touch no table (`SELECT 1`, `SHOW`, `BEGIN`).
    pub no_tables: bool,
    /// `enforce = false`: the rule is in rollout. What it refuses (or
    /// holds) is logged and passes; an allow rule in rollout does the same
    /// for the default deny of its workloads on its targets.
    pub enforce: bool,
    /// `schema.function` globs (SQL targets): an allow rule lets these be
    /// called besides the default built-ins; a deny or approve rule is
    /// about statements that call them.
    pub functions: Vec<Pattern>,
    /// An allow rule with `unparsed = "allow"` also lets through statements
    /// the parser cannot read (they cannot be checked; use sparingly).
    pub allow_unparsed: bool,
    /// SQL targets: the role the session takes (`SET ROLE`) after the
    /// agent logs in, when this rule admits the connection.
    pub as_user: Option<String>,
    /// SQL targets: values this rule's workloads see masked.
    pub masks: Vec<Mask>,
    /// `decision = "approve"`: who must say yes, and what a yes grants.
    pub approval: Option<std::sync::Arc<ApprovalSpec>>,
    /// SSH targets: which requests the rule is about.
    pub ssh: SshRequests,
    /// HTTP targets: which requests the rule is about.
    pub http: HttpRequests,
    /// Kubernetes targets: which API requests the rule is about.
    pub kube: kube::KubeRules,
}

/// The SSH fields of a rule. A rule with none of `commands`, `shell`,
/// `subsystems`, `forward` is about every exec, shell and subsystem request
/// (never about forwarding, which only a rule naming the destination
/// allows).
#[derive(Clone, Debug, Default)]
pub struct SshRequests {
    pub commands: Option<Vec<CommandPattern>>,
    pub shell: bool,
    pub subsystems: Vec<String>,
    /// `host:port` destinations of local port forwarding (`ssh -L`).
    pub forward: Vec<(Pattern, u16)>,
    /// The SSH users (as the client asked) the rule applies to; empty: any.
    pub users: Vec<Pattern>,
    /// Environment variables an allow rule passes on, besides `LANG` and
    /// `LC_*`.
    pub env: Vec<Pattern>,
    /// `pty = false`: sessions this rule applies to get no terminal.
    pub pty: Option<bool>,
}

impl SshRequests {
    fn is_scoped(&self) -> bool {
        self.commands.is_some()
            || self.shell
            || !self.subsystems.is_empty()
            || !self.forward.is_empty()
    }

    /// Whether the rule is about this request (not an exec: see
    /// [`SshRequests::hits`] and [`SshRequests::covers_line`]).
    fn covers(&self, request: &SshRequest) -> bool {
        match request {
            SshRequest::Forward { host, port } => self
                .forward
                .iter()
                .any(|(h, p)| *p == *port && h.matches(host)),
            _ if !self.is_scoped() => true,
            SshRequest::Shell => self.shell,
            SshRequest::Subsystem(name) => self.subsystems.iter().any(|s| s == name),
            SshRequest::Exec(line) => self.covers_line(line),
        }
    }

    /// For a deny or approve rule: the first command of the line it is
    /// about, if any.
    fn hits<'l>(&self, line: &'l CommandLine) -> Option<&'l shell::Command> {
        if !self.is_scoped() {
            return line.commands.first();
        }
        let patterns = self.commands.as_ref()?;
        line.commands
            .iter()
            .find(|c| patterns.iter().any(|p| p.matches(c, Match::Any)))
    }

    /// For an allow rule: whether it vouches for everything the line runs.
    /// A command is covered by a pattern, or by one that covers the wrapper
    /// or shell running it, or needs none (a shell running a script, whose
    /// commands are decided each); nothing of what cannot be known is.
    fn covers_line(&self, line: &CommandLine) -> bool {
        if !self.is_scoped() {
            return true;
        }
        self.commands.is_some()
            && line.unknown.is_empty()
            && !line.commands.is_empty()
            && (0..line.commands.len()).all(|i| self.covers_command(line, i))
    }

    fn covers_command(&self, line: &CommandLine, index: usize) -> bool {
        line.commands[index].transparent || self.vouches(line, index)
    }

    fn vouches(&self, line: &CommandLine, index: usize) -> bool {
        let Some(patterns) = &self.commands else {
            return false;
        };
        let command = &line.commands[index];
        patterns.iter().any(|p| p.matches(command, Match::Allow))
            || command
                .run_by
                .is_some_and(|runner| self.vouches(line, runner))
    }
}

/// A channel or global request on an SSH connection.
#[derive(Clone, Copy, Debug)]
pub enum SshRequest<'a> {
    Exec(&'a CommandLine),
    Shell,
    Subsystem(&'a str),
    /// Local port forwarding to this destination.
    Forward {
        host: &'a str,
        port: u16,
    },
}

impl std::fmt::Display for SshRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SshRequest::Exec(_) => f.write_str("this command"),
            SshRequest::Shell => f.write_str("an interactive shell"),
            SshRequest::Subsystem(name) => write!(f, "subsystem {name:?}"),
            SshRequest::Forward { host, port } => write!(f, "forwarding to {host}:{port}"),
        }
    }
}

/// What an `approve` rule asks for before a command goes on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ApprovalSpec {
    pub approvers: Vec<Approver>,
    /// Distinct approvers needed (a denial from any one ends the request).
    pub min_approvals: u32,
    /// How long the client waits for an answer.
    #[serde(with = "humantime_serde")]
    pub timeout: std::time::Duration,
    pub grant: GrantSpec,
    /// A request without a stated reason is refused at once, saying how
    /// to give one.
    pub require_reason: bool,
    /// `requestable = true`: the longest grant `interlock request` may ask
    /// for up front.
    #[serde(with = "humantime_serde")]
    pub requestable: Option<std::time::Duration>,
}

/// Who may answer: a local principal (by SO_PEERCRED on the admin socket)
/// or a name a chat bot or ticket system gives in an HTTP callback.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Approver {
    Local(Principal),
    /// `webhook:NAME`; `webhook:*` accepts any name the callback gives.
    Callback(String),
}

impl Approver {
    /// How an approver is written in a rule: `user`, `uid:N`,
    /// `group:NAME`, `webhook:NAME`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.strip_prefix("webhook:") {
            Some("") => Err("\"webhook:\" needs a name (or *)".into()),
            Some(name) => Ok(Approver::Callback(name.to_owned())),
            None => Principal::parse(text).map(Approver::Local),
        }
    }
}

impl std::fmt::Display for Approver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Approver::Local(principal) => principal.fmt(f),
            Approver::Callback(name) => write!(f, "webhook:{name}"),
        }
    }
}

/// What an approval lets through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum GrantSpec {
    /// That one command.
    Once,
    /// Every command of the same rule, by the same workload on the same
    /// target, until it expires.
    For(#[serde(with = "humantime_serde")] std::time::Duration),
}

impl std::fmt::Display for GrantSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GrantSpec::Once => f.write_str("once"),
            GrantSpec::For(d) => write!(f, "{}", humantime::format_duration(*d)),
        }
    }
}

impl Rule {
    /// A rule about particular statements decides statements, not
    /// connections.
    pub(crate) fn is_statement_level(&self) -> bool {
        self.statements.is_some()
            || !self.tables.is_empty()
            || self.no_tables
            || !self.functions.is_empty()
            || self.ssh.is_scoped()
            || !self.ssh.users.is_empty()
            || self.http.is_scoped()
            || self.kube.is_scoped()
    }

    /// An HTTP request is this rule's: its HTTP fields match, and on a
    /// Kubernetes target its Kubernetes fields do.
    fn covers_http(&self, request: &HttpRequest) -> bool {
        self.http.covers(request)
            && match &request.kube {
                Some(kube) => self.kube.covers(kube),
                None => !self.kube.is_scoped(),
            }
    }

    /// An allow covers a statement when every kind in it, every table it
    /// touches and every function it calls is allowed; a deny hits a
    /// statement when any kind, table or function it names is there. So a
    /// DELETE hidden in a CTE needs `delete` allowed, and is caught by a
    /// rule that denies `delete`.
    fn covers(&self, statement: &StatementInfo) -> bool {
        let table_matches = |t: &String| self.tables.iter().any(|p| p.matches(t));
        let function_matches = |f: &FunctionRef| self.functions.iter().any(|p| p.matches(&f.name));
        match self.action {
            Action::Allow => {
                self.statements
                    .is_none_or(|allowed| statement.kinds.is_subset(allowed))
                    && if self.no_tables {
                        statement.tables.is_empty()
                    } else {
                        self.tables.is_empty() || statement.tables.iter().all(table_matches)
                    }
                    && statement
                        .functions
                        .iter()
                        .all(|f| functions::covered(&self.functions, f))
            }
            // Approve is restrictive like deny: it catches any of its kinds,
            // tables or functions.
            Action::Deny | Action::Approve => {
                self.statements
                    .is_none_or(|denied| statement.kinds.intersects(denied))
                    && (self.tables.is_empty() || statement.tables.iter().any(table_matches))
                    && (self.functions.is_empty()
                        || statement.functions.iter().any(function_matches))
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
    /// Allowed once a person says yes (see `approvals`).
    Approve,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Approve => "approve",
        }
    }

    /// What a rule with this action does, in a reason's words.
    pub fn verb(self) -> &'static str {
        match self {
            Action::Allow => "allows",
            Action::Deny => "denies",
            Action::Approve => "needs approval for",
        }
    }
}

/// The outcome of [`evaluate`]: a decision is not an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub action: Action,
    /// The rule that decided; `None` for the default deny.
    pub rule: Option<RuleId>,
    pub reason: String,
}

impl Verdict {
    /// A refusal no rule made: the default deny, or what the agent never
    /// passes on whatever the policy.
    pub fn refused(reason: impl Into<String>) -> Self {
        Self {
            action: Action::Deny,
            rule: None,
            reason: reason.into(),
        }
    }

    pub fn denied(&self) -> bool {
        self.action == Action::Deny
    }
}

/// Decides whether `workload` may use `target`.
///
/// The order is the policy format's contract (docs/POLICY.md):
/// 1. "An explicit deny wins": the first deny rule naming this workload and
///    target decides, whatever allows exist.
/// 2. "Then approve": the first approve rule naming them; the connection
///    waits for a person (a SQL target admits it, and asks per statement).
/// 3. "Then allow": the first allow rule naming them decides.
/// 4. "A protected target no rule allows is denied" (fail closed).
///
/// Deny and approve rules about particular statements do not decide the
/// connection: [`evaluate_statement`] applies them to each statement.
pub fn evaluate(policy: &Policy, workload: &Workload, target: TargetId) -> Verdict {
    let target_name = &policy.target(target).name;
    for action in [Action::Deny, Action::Approve, Action::Allow] {
        if let Some((id, rule)) = policy
            .rules_by_id()
            .filter(|(_, rule)| rule.action == action)
            .filter(|(_, rule)| action == Action::Allow || !rule.is_statement_level())
            .find(|(_, rule)| applies(policy, rule, workload, target))
        {
            return Verdict {
                action,
                rule: Some(id),
                reason: format!(
                    "rule {:?} {} this workload on target {target_name:?}",
                    rule.name,
                    action.verb()
                ),
            };
        }
    }
    Verdict::refused(format!(
        "no rule allows this workload on protected target {target_name:?}"
    ))
}

/// Decides one statement on an allowed connection, in the same order:
/// 1. "An unparsed statement is denied" (it cannot be checked), unless an
///    allow rule for this workload and target says `unparsed = "allow"`.
/// 2. The first deny rule for this workload and target that hits the
///    statement wins.
/// 3. Then the first approve rule that hits it: it waits for a person.
/// 4. Then the first allow rule that covers it.
/// 5. Otherwise it is denied.
///
/// This runs for every statement, so it allocates nothing: the verdict
/// names the rule by id, and the reason is only written out on demand.
pub fn evaluate_statement(
    policy: &Policy,
    workload: &Workload,
    target: TargetId,
    statement: &StatementInfo,
) -> StatementVerdict {
    if statement.changes_role {
        return StatementVerdict {
            action: Action::Deny,
            rule: None,
        };
    }
    if !statement.parsed {
        let waiver = policy.rules_by_id().find(|(_, rule)| {
            rule.action == Action::Allow
                && rule.allow_unparsed
                && applies(policy, rule, workload, target)
        });
        return StatementVerdict {
            action: if waiver.is_some() {
                Action::Allow
            } else {
                Action::Deny
            },
            rule: waiver.map(|(id, _)| id),
        };
    }
    for action in [Action::Deny, Action::Approve, Action::Allow] {
        if let Some((id, _)) = policy
            .rules_by_id()
            .filter(|(_, rule)| rule.action == action)
            .find(|(_, rule)| applies(policy, rule, workload, target) && rule.covers(statement))
        {
            return StatementVerdict {
                action,
                rule: Some(id),
            };
        }
    }
    StatementVerdict {
        action: Action::Deny,
        rule: None,
    }
}

/// Decides one SSH request on an allowed connection, in the order of
/// [`evaluate`]: the first deny rule about it, then approve, then allow,
/// else denied. `user` is the SSH user the client asked for.
pub fn evaluate_ssh(
    policy: &Policy,
    workload: &Workload,
    target: TargetId,
    user: &str,
    request: &SshRequest,
) -> Verdict {
    if let SshRequest::Exec(line) = request {
        return evaluate_exec(policy, workload, target, user, line);
    }
    for action in [Action::Deny, Action::Approve, Action::Allow] {
        if let Some((id, rule)) = ssh_rules(policy, workload, target, user)
            .filter(|(_, rule)| rule.action == action)
            .find(|(_, rule)| rule.ssh.covers(request))
        {
            return Verdict {
                action,
                rule: Some(id),
                reason: format!("rule {:?} {} {request}", rule.name, action.verb()),
            };
        }
    }
    Verdict::refused(format!("no rule allows {request} for SSH user {user:?}"))
}

/// An exec request: a deny rule about any command of the line refuses it,
/// then an approve rule about any command holds it, then an allow rule
/// covering all of it lets it run. The reason names the part decided.
fn evaluate_exec(
    policy: &Policy,
    workload: &Workload,
    target: TargetId,
    user: &str,
    line: &CommandLine,
) -> Verdict {
    let rules = || ssh_rules(policy, workload, target, user);
    for action in [Action::Deny, Action::Approve] {
        if let Some((id, rule, command)) = rules()
            .filter(|(_, rule)| rule.action == action)
            .find_map(|(id, rule)| rule.ssh.hits(line).map(|command| (id, rule, command)))
        {
            return Verdict {
                action,
                rule: Some(id),
                reason: format!("rule {:?} {} `{command}`", rule.name, action.verb()),
            };
        }
    }
    if let Some((id, rule)) = rules()
        .filter(|(_, rule)| rule.action == Action::Allow)
        .find(|(_, rule)| rule.ssh.covers_line(line))
    {
        return Verdict {
            action: Action::Allow,
            rule: Some(id),
            reason: format!("rule {:?} allows this command", rule.name),
        };
    }
    let allows = |index: usize| {
        rules()
            .filter(|(_, rule)| rule.action == Action::Allow)
            .any(|(_, rule)| rule.ssh.covers_command(line, index))
    };
    let reason = if let Some(unknown) = line.unknown.first() {
        format!(
            "`{}` cannot be decided before it runs: {}",
            unknown.text, unknown.why
        )
    } else if let Some(index) = (0..line.commands.len()).find(|i| !allows(*i)) {
        format!(
            "no rule allows `{}` for SSH user {user:?}",
            line.commands[index]
        )
    } else if line.commands.is_empty() {
        "the command line runs no command".to_owned()
    } else {
        format!("no single rule allows every command of this line for SSH user {user:?}")
    };
    Verdict::refused(reason)
}

/// Decides one HTTP request on an allowed connection, in the order of
/// [`evaluate`]: the first deny rule about it, then approve, then allow,
/// else denied.
pub fn evaluate_http(
    policy: &Policy,
    workload: &Workload,
    target: TargetId,
    request: &HttpRequest,
) -> Verdict {
    let first = |action: Action| {
        policy
            .rules_by_id()
            .filter(|(_, rule)| rule.action == action)
            .find(|(_, rule)| applies(policy, rule, workload, target) && rule.covers_http(request))
            .map(|(id, rule)| Verdict {
                action,
                rule: Some(id),
                reason: format!("rule {:?} {} {request}", rule.name, action.verb()),
            })
    };
    if let Some(denied) = first(Action::Deny) {
        return denied;
    }
    // What every Kubernetes client reads to find its way is allowed unless
    // denied (kube-apiserver's `system:discovery`).
    if let Some(kube) = &request.kube
        && kube::is_discovery(request.method, &request.path, kube)
    {
        return Verdict {
            action: Action::Allow,
            rule: None,
            reason: format!("{request} is discovery, which every client reads"),
        };
    }
    first(Action::Approve)
        .or_else(|| first(Action::Allow))
        .unwrap_or_else(|| Verdict::refused(format!("no rule allows {request}")))
}

/// The rules that apply to this workload, target and SSH user.
fn ssh_rules<'p>(
    policy: &'p Policy,
    workload: &'p Workload,
    target: TargetId,
    user: &'p str,
) -> impl Iterator<Item = (RuleId, &'p Rule)> {
    policy.rules_by_id().filter(move |(_, rule)| {
        applies(policy, rule, workload, target)
            && (rule.ssh.users.is_empty() || rule.ssh.users.iter().any(|u| u.matches(user)))
    })
}

/// Whether an SSH session may set this environment variable: `LANG` and
/// `LC_*`, and what allow rules for it name.
pub fn ssh_env_allowed(
    policy: &Policy,
    workload: &Workload,
    target: TargetId,
    user: &str,
    name: &str,
) -> bool {
    name == "LANG"
        || name.starts_with("LC_")
        || ssh_rules(policy, workload, target, user)
            .filter(|(_, rule)| rule.action == Action::Allow)
            .any(|(_, rule)| rule.ssh.env.iter().any(|p| p.matches(name)))
}

/// Whether an SSH session may have a terminal: unless a rule for it says
/// `pty = false`.
pub fn ssh_pty_allowed(policy: &Policy, workload: &Workload, target: TargetId, user: &str) -> bool {
    !ssh_rules(policy, workload, target, user).any(|(_, rule)| rule.ssh.pty == Some(false))
}

/// The decision on one statement; see [`evaluate_statement`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatementVerdict {
    pub action: Action,
    /// The deciding rule; `None` for the default deny and for unparsed
    /// statements without a waiver.
    pub rule: Option<RuleId>,
}

impl StatementVerdict {
    /// Why, in words, for the client's error and the log.
    pub fn reason(&self, policy: &Policy, statement: &StatementInfo) -> String {
        if statement.changes_role {
            return "the session's role is pinned by the agent; it cannot be changed".into();
        }
        let what = statement_what(statement);
        match (policy.rule_name(self.rule), statement.parsed) {
            (_, false) => format!(
                "the statement cannot be checked: {}",
                statement.problem.as_deref().unwrap_or("it does not parse")
            ),
            (Some(rule), _) => format!("rule {rule:?} {} {what}", self.action.verb()),
            (None, _) => {
                let functions = statement
                    .functions
                    .iter()
                    .filter(|f| !functions::allowed_by_default(f))
                    .map(|f| f.name.as_str())
                    .collect::<Vec<_>>();
                if functions.is_empty() {
                    format!("no rule allows {what}")
                } else {
                    format!("no rule allows {what} calling {}", functions.join(", "))
                }
            }
        }
    }
}

/// `delete on public.orders`, or `listen` for a statement on no table.
pub fn statement_what(statement: &StatementInfo) -> String {
    if statement.tables.is_empty() {
        statement.kinds.to_string()
    } else {
        format!("{} on {}", statement.kinds, statement.tables.join(", "))
    }
}

/// Whether a rule names this workload and target.
pub(crate) fn applies(policy: &Policy, rule: &Rule, workload: &Workload, target: TargetId) -> bool {
    rule.targets
        .as_ref()
        .is_none_or(|ids| ids.contains(&target))
        && rule.workloads.as_ref().is_none_or(|ids| {
            ids.iter()
                .any(|&w| policy.workloads[w].selector.matches(workload))
        })
}

/// The masks on what `workload` reads from `target`: the target's own and
/// those of every allow rule for this workload and target. Masks add up:
/// another rule allowing the same statement never lifts one.
pub fn masks_for<'p>(policy: &'p Policy, workload: &Workload, target: TargetId) -> Vec<&'p Mask> {
    masks_of_rules(policy, workload, target, |_| true)
}

/// The masks on the answer to one HTTP request: the target's own and
/// those of every allow rule for this workload and target that covers the
/// request. Another rule allowing the same request never lifts one; a
/// rule's masks do not reach the requests it does not cover.
pub fn http_masks_for<'p>(
    policy: &'p Policy,
    workload: &Workload,
    target: TargetId,
    request: &HttpRequest,
) -> Vec<&'p Mask> {
    masks_of_rules(policy, workload, target, |rule| rule.covers_http(request))
}

fn masks_of_rules<'p>(
    policy: &'p Policy,
    workload: &Workload,
    target: TargetId,
    covers: impl Fn(&Rule) -> bool,
) -> Vec<&'p Mask> {
    // Rules without masks are passed over first: per HTTP request this
    // runs beside the decision, and most rules mask nothing.
    let rules = policy.rules.iter().filter(|rule| {
        !rule.masks.is_empty()
            && rule.action == Action::Allow
            && applies(policy, rule, workload, target)
            && covers(rule)
    });
    policy
        .target(target)
        .masks
        .iter()
        .chain(rules.flat_map(|rule| rule.masks.iter()))
        .collect()
}

impl Policy {
    /// Whether a decision by `rule` (none: the default deny) for this
    /// workload on `target` is applied, the agent's mode aside: not by a
    /// rule in rollout (`enforce = false`), nor the default deny where an
    /// allow rule for the workload and target is in rollout.
    pub fn enforces(&self, rule: Option<RuleId>, workload: &Workload, target: TargetId) -> bool {
        match rule {
            Some(id) => self.rule(id).enforce,
            None => !self.rules.iter().any(|rule| {
                !rule.enforce
                    && rule.action == Action::Allow
                    && applies(self, rule, workload, target)
            }),
        }
    }
}

/// Names of the workload definitions that match, for `policy explain`.
pub fn matching_workloads<'p>(policy: &'p Policy, workload: &Workload) -> Vec<&'p str> {
    policy
        .workloads
        .iter()
        .filter(|w| w.selector.matches(workload))
        .map(|w| w.name.as_str())
        .collect()
}

#[cfg(test)]
mod tests;

/// What the proxy decides with: the policy, its resolved destinations and
/// whether decisions are enforced. Swapped as one value on reload, so rules
/// and targets always change together.
#[derive(Clone, Debug, Default)]
pub struct ActivePolicy {
    pub policy: Policy,
    pub table: TargetTable,
    pub enforce: bool,
    /// The signed bundle whose files are part of `policy`, if any.
    pub bundle: Option<BundleInfo>,
}

/// A signed policy bundle (`[policy_source]`), as sessions and the status
/// name it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BundleInfo {
    pub version: String,
    pub serial: u64,
    /// `sha256:HEX` of the signed payload.
    pub digest: String,
    pub signed_at: String,
    /// The trusted key that signed it.
    pub signed_by: String,
}
