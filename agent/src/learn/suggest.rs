//! `interlock policy suggest`: the narrowest rules that allow what the
//! recorded sessions did, per caller and target, each with its evidence.
//!
//! What ran (allowed, or passed in audit mode) is learned; what was
//! refused is listed, never added. Per protocol:
//! - PostgreSQL: a rule per set of statement kinds seen together, with
//!   exactly the tables and the functions (those a rule must name) they
//!   touched; statements that touch no table share one rule with
//!   `tables = []`. Unparsed statements are listed, not allowed.
//! - SSH: per login user, the commands as patterns (fixed words stay, what
//!   varies becomes a glob: `shapes`), shells and subsystems.
//! - HTTP: methods by path, ids in paths as globs; Kubernetes: verbs by
//!   resource and namespace.
//! - Opaque TCP: the target.
//!
//! Output is deterministic: callers, targets and rules in a stable order,
//! names derived from what they allow.
use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{
    recorded::{Recorded, What},
    shapes,
};
use crate::policy::{CommandLine, shell::Word};

/// Whom suggested rules are for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupBy {
    /// The policy's workloads the caller matched (else its unit, its
    /// executable, its user, in that order).
    #[default]
    Workload,
    /// The caller's systemd unit.
    Unit,
    /// The caller's executable.
    Exe,
}

/// A caller as suggested rules name it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Caller {
    /// A workload the policy defines.
    Workload(String),
    Unit(String),
    Exe(String),
    User(String),
    Uid(u32),
}

impl Caller {
    fn of(session: &Recorded, by: GroupBy) -> Self {
        let workload = &session.workload;
        let named = || session.workloads.first().cloned().map(Self::Workload);
        let unit = || workload.unit.clone().map(Self::Unit);
        let exe = || workload.exe.clone().map(Self::Exe);
        let user = || workload.user.clone().map(Self::User);
        let found = match by {
            GroupBy::Workload => named().or_else(unit).or_else(exe).or_else(user),
            GroupBy::Unit => unit().or_else(exe).or_else(user),
            GroupBy::Exe => exe().or_else(unit).or_else(user),
        };
        found.unwrap_or(Self::Uid(workload.uid))
    }

    /// The workload name rules use.
    pub fn name(&self) -> String {
        match self {
            Self::Workload(name) => name.clone(),
            Self::Unit(unit) => format!("unit-{}", slug(unit)),
            Self::Exe(exe) => format!("exe-{}", slug(exe)),
            Self::User(user) => format!("user-{}", slug(user)),
            Self::Uid(uid) => format!("uid-{uid}"),
        }
    }

    /// The `[[workload]]` a suggestion must define for it (none for one
    /// the policy has).
    fn definition(&self) -> Option<(&'static str, String)> {
        match self {
            Self::Workload(_) => None,
            Self::Unit(unit) => Some(("unit", unit.clone())),
            Self::Exe(exe) => Some(("exe", exe.clone())),
            Self::User(user) => Some(("user", user.clone())),
            Self::Uid(uid) => Some(("uid", uid.to_string())),
        }
    }
}

/// What a rule rests on.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Evidence {
    pub count: u64,
    pub first_us: u64,
    pub last_us: u64,
    /// Up to two, literals redacted.
    pub examples: Vec<String>,
    /// The sessions it came from.
    pub sessions: BTreeSet<String>,
}

const EXAMPLES: usize = 2;
/// Sessions named in a rule's comment; the rest are counted.
const SESSIONS_SHOWN: usize = 3;

impl Evidence {
    fn add(&mut self, time_us: u64, session: &str, example: impl FnOnce() -> String) {
        self.count += 1;
        self.first_us = if self.count == 1 {
            time_us
        } else {
            self.first_us.min(time_us)
        };
        self.last_us = self.last_us.max(time_us);
        if self.examples.len() < EXAMPLES {
            let example = example();
            if !self.examples.contains(&example) {
                self.examples.push(example);
            }
        }
        if !self.sessions.contains(session) {
            self.sessions.insert(session.to_owned());
        }
    }

    fn merge(&mut self, other: &Evidence) {
        if other.count == 0 {
            return;
        }
        self.first_us = if self.count == 0 {
            other.first_us
        } else {
            self.first_us.min(other.first_us)
        };
        self.count += other.count;
        self.last_us = self.last_us.max(other.last_us);
        for example in &other.examples {
            if self.examples.len() < EXAMPLES && !self.examples.contains(example) {
                self.examples.push(example.clone());
            }
        }
        self.sessions.extend(other.sessions.iter().cloned());
    }
}

/// One suggested rule: keys in the order they are written.
#[derive(Debug, Serialize)]
pub struct SuggestedRule {
    pub name: String,
    pub caller: Caller,
    pub target: String,
    pub keys: Vec<(String, Value)>,
    pub evidence: Evidence,
    /// SSH: each command pattern with the commands it came from (two).
    pub patterns_from: Vec<(String, Vec<String>)>,
}

/// A rule key's value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Value {
    Bool(bool),
    Text(String),
    List(Vec<String>),
}

/// What was refused, or could not be learned: shown, never added.
#[derive(Debug, Serialize)]
pub struct Unlearned {
    pub caller: Caller,
    pub target: String,
    pub what: String,
    pub why: String,
    pub evidence: Evidence,
}

#[derive(Debug, Default, Serialize)]
pub struct Suggestion {
    /// Workloads to define: name, field, value.
    pub workloads: Vec<(String, &'static str, String)>,
    pub rules: Vec<SuggestedRule>,
    pub unlearned: Vec<Unlearned>,
    pub saturation: Vec<Saturation>,
    pub sessions: u64,
}

/// What one caller did on one target.
#[derive(Default)]
struct Observed {
    protocol: String,
    connections: Evidence,
    /// By the statement kinds seen together.
    statements: BTreeMap<Vec<&'static str>, Statements>,
    /// SSH, per login user: commands (words) with their time, session and
    /// line; shells; subsystems.
    ssh: BTreeMap<String, SshSeen>,
    /// HTTP: path template → methods, evidence.
    http: BTreeMap<String, (BTreeSet<String>, Evidence)>,
    /// Kubernetes: (namespace, resource) → verbs, evidence.
    kube: BTreeMap<(String, String), (BTreeSet<String>, Evidence)>,
    unlearned: BTreeMap<(String, String), Evidence>,
    /// PostgreSQL: the roles the sessions took (`as_user`).
    as_users: BTreeSet<String>,
    /// Each distinct behaviour (what a rule must allow: kinds with tables
    /// and functions, a command's shape, a method and path) and when it
    /// was first seen; and the days anything was seen.
    behaviours: BTreeMap<String, u64>,
    active_days: BTreeSet<String>,
}

impl Observed {
    fn behaviour(&mut self, key: String, time_us: u64) {
        self.active_days.insert(day(time_us));
        self.behaviours
            .entry(key)
            .and_modify(|first| *first = (*first).min(time_us))
            .or_insert(time_us);
    }
}

/// Whether a caller's behaviour on a target has stopped growing: how
/// many distinct behaviours were first seen each day it was active.
#[derive(Debug, Serialize)]
pub struct Saturation {
    pub caller: Caller,
    pub target: String,
    pub behaviours: usize,
    pub new_per_day: Vec<(String, u64)>,
    pub last_new_us: u64,
    /// Whole days since a new behaviour was last seen: 0 is still learning.
    pub stable_days: u64,
}

const DAY_US: u64 = 86_400 * 1_000_000;

/// The UTC date of a time.
fn day(us: u64) -> String {
    time(us)[..10].to_owned()
}

/// Statements of one set of kinds: the tables they touched, the
/// functions a rule must name that they called.
#[derive(Default)]
struct Statements {
    tables: BTreeSet<String>,
    functions: BTreeSet<String>,
    evidence: Evidence,
}

#[derive(Default)]
struct SshSeen {
    commands: Vec<(Vec<String>, u64, String, String)>,
    shell: Evidence,
    subsystems: BTreeMap<String, Evidence>,
}

/// Suggests rules for what `sessions` did; `now_us` is when, for how long
/// behaviour has been stable.
pub fn suggest(sessions: &[Recorded], by: GroupBy, now_us: u64) -> Suggestion {
    let mut observed: BTreeMap<(Caller, String), Observed> = BTreeMap::new();
    for session in sessions {
        let seen = observed
            .entry((Caller::of(session, by), session.target.clone()))
            .or_default();
        seen.protocol.clone_from(&session.protocol);
        let Some(connection) = &session.connection else {
            continue;
        };
        if !connection.ran() {
            seen.unlearned
                .entry(("connection".into(), "refused".into()))
                .or_default()
                .add(session.start_us, &session.id, || "connect".into());
            continue;
        }
        seen.connections
            .add(session.start_us, &session.id, || "connect".into());
        if let Some(role) = &session.as_user {
            seen.as_users.insert(role.clone());
        }
        for did in &session.did {
            observe(seen, session, did);
        }
    }
    let mut suggestion = Suggestion {
        sessions: sessions.len() as u64,
        ..Suggestion::default()
    };
    let mut names = BTreeSet::new();
    for ((caller, target), seen) in &observed {
        if let Some((field, value)) = caller.definition()
            && !suggestion
                .workloads
                .iter()
                .any(|(n, _, _)| *n == caller.name())
        {
            suggestion.workloads.push((caller.name(), field, value));
        }
        for ((what, why), evidence) in &seen.unlearned {
            suggestion.unlearned.push(Unlearned {
                caller: caller.clone(),
                target: target.clone(),
                what: what.clone(),
                why: why.clone(),
                evidence: evidence.clone(),
            });
        }
        if seen.connections.count == 0 {
            continue;
        }
        if let Some(&last_new_us) = seen.behaviours.values().max() {
            let new_per_day = seen
                .active_days
                .iter()
                .map(|d| {
                    let new = seen.behaviours.values().filter(|t| day(**t) == *d).count();
                    (d.clone(), new as u64)
                })
                .collect();
            suggestion.saturation.push(Saturation {
                caller: caller.clone(),
                target: target.clone(),
                behaviours: seen.behaviours.len(),
                new_per_day,
                last_new_us,
                stable_days: now_us.saturating_sub(last_new_us) / DAY_US,
            });
        }
        if seen.as_users.len() > 1 {
            suggestion.unlearned.push(Unlearned {
                caller: caller.clone(),
                target: target.clone(),
                what: "as_user".into(),
                why: format!(
                    "its sessions took the roles {}: rules leave as_user out",
                    seen.as_users.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
                evidence: seen.connections.clone(),
            });
        }
        let drafts = match seen.protocol.as_str() {
            "postgres" => postgres_rules(seen),
            "ssh" => ssh_rules(seen),
            "http" | "kubernetes" => http_rules(seen),
            _ => vec![Draft::new("connect", Vec::new(), seen.connections.clone())],
        };
        for draft in drafts {
            let base = slug(&format!("{}-{target}-{}", caller.name(), draft.label));
            let mut name = base.clone();
            let mut n = 2;
            while !names.insert(name.clone()) {
                name = format!("{base}-{n}");
                n += 1;
            }
            suggestion.rules.push(SuggestedRule {
                name,
                caller: caller.clone(),
                target: target.clone(),
                keys: draft.keys,
                evidence: draft.evidence,
                patterns_from: draft.patterns_from,
            });
        }
    }
    suggestion
}

/// A rule before it is named.
struct Draft {
    /// What it allows, for its name.
    label: String,
    keys: Vec<(String, Value)>,
    evidence: Evidence,
    patterns_from: Vec<(String, Vec<String>)>,
}

impl Draft {
    fn new(label: &str, keys: Vec<(String, Value)>, evidence: Evidence) -> Self {
        Self {
            label: label.to_owned(),
            keys,
            evidence,
            patterns_from: Vec::new(),
        }
    }
}

fn list(items: &BTreeSet<String>) -> Value {
    Value::List(items.iter().cloned().collect())
}

/// A rule per set of statement kinds seen together, with its tables and
/// functions; kinds seen only without tables share one `tables = []`
/// rule (which, with no statement at all, admits the connection and
/// allows none). The role the sessions took (`as_user`) is kept on each:
/// sessions that took different roles are listed, not merged.
fn postgres_rules(seen: &Observed) -> Vec<Draft> {
    let mut drafts = postgres_statement_rules(seen);
    if let [role] = &seen.as_users.iter().collect::<Vec<_>>()[..] {
        for draft in &mut drafts {
            draft
                .keys
                .push(("as_user".into(), Value::Text((*role).clone())));
        }
    }
    drafts
}

fn postgres_statement_rules(seen: &Observed) -> Vec<Draft> {
    let mut drafts = Vec::new();
    let (mut tableless, mut tableless_kinds) = (Statements::default(), BTreeSet::new());
    for (kinds, statements) in &seen.statements {
        let names: BTreeSet<String> = kinds.iter().map(|k| (*k).to_owned()).collect();
        if statements.tables.is_empty() {
            tableless_kinds.extend(names);
            tableless
                .functions
                .extend(statements.functions.iter().cloned());
            tableless.evidence.merge(&statements.evidence);
            continue;
        }
        let mut keys = vec![
            ("statements".into(), list(&names)),
            ("tables".into(), list(&statements.tables)),
        ];
        if !statements.functions.is_empty() {
            keys.push(("functions".into(), list(&statements.functions)));
        }
        let label = names.iter().cloned().collect::<Vec<_>>().join("-");
        drafts.push(Draft::new(&label, keys, statements.evidence.clone()));
    }
    if !tableless_kinds.is_empty() || seen.statements.is_empty() {
        let mut keys = vec![
            ("statements".into(), list(&tableless_kinds)),
            ("tables".into(), Value::List(Vec::new())),
        ];
        if !tableless.functions.is_empty() {
            keys.push(("functions".into(), list(&tableless.functions)));
        }
        let evidence = if seen.statements.is_empty() {
            seen.connections.clone()
        } else {
            tableless.evidence
        };
        drafts.push(Draft::new("no-tables", keys, evidence));
    }
    drafts
}

/// Per SSH login user: the commands as patterns (each with the commands
/// it came from), shells, subsystems.
fn ssh_rules(seen: &Observed) -> Vec<Draft> {
    let mut drafts = Vec::new();
    for (user, ssh) in &seen.ssh {
        let mut keys = vec![("users".into(), Value::List(vec![user.clone()]))];
        let mut evidence = Evidence::default();
        let commands: Vec<Vec<String>> = ssh.commands.iter().map(|(w, ..)| w.clone()).collect();
        let (mut patterns, mut patterns_from) = (Vec::new(), Vec::new());
        for (words, from) in shapes::command_patterns(&commands) {
            let pattern = words
                .iter()
                .map(|w| shapes::pattern_word(w))
                .collect::<Vec<_>>()
                .join(" ");
            let mut examples: Vec<String> = Vec::new();
            for &i in &from {
                let (words, time, session, line) = &ssh.commands[i];
                evidence.add(*time, session, || line.clone());
                let command = words.join(" ");
                if examples.len() < EXAMPLES && !examples.contains(&command) {
                    examples.push(command);
                }
            }
            patterns_from.push((pattern.clone(), examples));
            patterns.push(pattern);
        }
        if !patterns.is_empty() {
            keys.push(("commands".into(), Value::List(patterns)));
        }
        if ssh.shell.count > 0 {
            keys.push(("shell".into(), Value::Bool(true)));
            evidence.merge(&ssh.shell);
        }
        if !ssh.subsystems.is_empty() {
            keys.push((
                "subsystems".into(),
                Value::List(ssh.subsystems.keys().cloned().collect()),
            ));
            for seen in ssh.subsystems.values() {
                evidence.merge(seen);
            }
        }
        if keys.len() == 1 {
            // Logged in, asked for nothing.
            evidence.merge(&seen.connections);
            keys.push(("commands".into(), Value::List(Vec::new())));
        }
        drafts.push(Draft {
            patterns_from,
            ..Draft::new(user, keys, evidence)
        });
    }
    drafts
}

/// HTTP: paths with the same methods share a rule; Kubernetes: resources
/// with the same verbs in one namespace share a rule.
fn http_rules(seen: &Observed) -> Vec<Draft> {
    let mut drafts = Vec::new();
    let mut by_methods: BTreeMap<Vec<String>, (Vec<String>, Evidence)> = BTreeMap::new();
    for (path, (methods, evidence)) in &seen.http {
        let entry = by_methods
            .entry(methods.iter().cloned().collect())
            .or_default();
        entry.0.push(path.clone());
        entry.1.merge(evidence);
    }
    for (methods, (paths, evidence)) in by_methods {
        let label = methods.join("-").to_ascii_lowercase();
        let keys = vec![
            ("methods".into(), Value::List(methods)),
            ("paths".into(), Value::List(paths)),
        ];
        drafts.push(Draft::new(&label, keys, evidence));
    }
    let mut by_verbs: BTreeMap<(String, Vec<String>), (Vec<String>, Evidence)> = BTreeMap::new();
    for ((namespace, resource), (verbs, evidence)) in &seen.kube {
        let entry = by_verbs
            .entry((namespace.clone(), verbs.iter().cloned().collect()))
            .or_default();
        entry.0.push(resource.clone());
        entry.1.merge(evidence);
    }
    for ((namespace, verbs), (resources, evidence)) in by_verbs {
        let mut keys = vec![
            ("verbs".into(), Value::List(verbs.clone())),
            ("resources".into(), Value::List(resources)),
        ];
        let label = if namespace.is_empty() {
            verbs.join("-")
        } else {
            keys.push(("namespaces".into(), Value::List(vec![namespace.clone()])));
            format!("{}-in-{namespace}", verbs.join("-"))
        };
        drafts.push(Draft::new(&label, keys, evidence));
    }
    if drafts.is_empty() {
        // Connected, asked for nothing.
        let keys = vec![("methods".into(), Value::List(Vec::new()))];
        drafts.push(Draft::new("connect", keys, seen.connections.clone()));
    }
    drafts
}

/// One thing a session did, into what its caller is seen doing.
fn observe(seen: &mut Observed, session: &Recorded, did: &super::Did) {
    let (time, id) = (did.time_us, session.id.as_str());
    if !did.decided.ran() {
        let what = match &did.what {
            What::Statement { text, .. } => redacted_sql(text),
            What::Ssh { request, command } => command.clone().unwrap_or_else(|| request.clone()),
            What::Http { method, path, .. } => format!("{method} {path}"),
        };
        let why = format!(
            "{} (rule {})",
            did.decided.decision,
            did.decided.rule.as_deref().unwrap_or("none")
        );
        seen.unlearned
            .entry((what.clone(), why))
            .or_default()
            .add(time, id, || what);
        return;
    }
    match &did.what {
        What::Statement {
            text,
            kinds,
            tables,
            functions,
            unparsed,
            ..
        } => {
            if *unparsed {
                let what = redacted_sql(text);
                seen.unlearned
                    .entry((
                        what.clone(),
                        "unparsed: a rule would need unparsed = \"allow\"".into(),
                    ))
                    .or_default()
                    .add(time, id, || what);
                return;
            }
            let mut kinds: Vec<&'static str> = kinds.iter().map(|k| k.as_str()).collect();
            kinds.sort_unstable();
            kinds.dedup();
            seen.behaviour(
                format!(
                    "{}|{}|{}",
                    kinds.join("+"),
                    tables.join(","),
                    functions.join(",")
                ),
                time,
            );
            let entry = seen.statements.entry(kinds).or_default();
            entry.tables.extend(tables.iter().cloned());
            entry.functions.extend(functions.iter().cloned());
            entry.evidence.add(time, id, || redacted_sql(text));
        }
        What::Ssh { request, command } => {
            let user = session.ssh_user.clone().unwrap_or_default();
            match (request.as_str(), command) {
                ("exec", Some(line)) => {
                    for words in commanded(line) {
                        // Its shape: ids and numbers as `*`.
                        let shape: Vec<&str> = words
                            .iter()
                            .map(|w| if shapes::is_id(w) { "*" } else { w.as_str() })
                            .collect();
                        seen.behaviour(format!("{user}|{}", shape.join(" ")), time);
                        let ssh = seen.ssh.entry(user.clone()).or_default();
                        ssh.commands
                            .push((words, time, id.to_owned(), line.clone()));
                    }
                    return;
                }
                _ => seen.behaviour(format!("{user}|{request}|{command:?}"), time),
            }
            let ssh = seen.ssh.entry(user).or_default();
            match (request.as_str(), command) {
                ("shell", _) => ssh.shell.add(time, id, || "shell".into()),
                ("subsystem", Some(name)) => {
                    ssh.subsystems
                        .entry(name.clone())
                        .or_default()
                        .add(time, id, || name.clone())
                }
                _ => {
                    let what = command.clone().unwrap_or_else(|| request.clone());
                    seen.unlearned
                        .entry((what.clone(), format!("{request}: not learned yet")))
                        .or_default()
                        .add(time, id, || what);
                }
            }
        }
        What::Http {
            method,
            path,
            query,
            host,
            kube,
            ..
        } => {
            let example = || format!("{method} {path}");
            // What every Kubernetes client reads first is allowed anyway.
            if kube.is_some() && is_discovery(method, path, query.as_deref(), host) {
                return;
            }
            seen.behaviour(
                match kube {
                    Some(kube) if kube["is_resource"] == true => format!(
                        "{}|{}|{}|{}|{}",
                        kube["verb"],
                        kube["group"],
                        kube["resource"],
                        kube["subresource"],
                        kube["namespace"]
                    ),
                    _ => format!("{method} {}", shapes::path_template(path)),
                },
                time,
            );
            match kube {
                Some(kube) if kube["is_resource"] == true => {
                    let text = |key: &str| kube[key].as_str().unwrap_or("");
                    let resource = [text("group"), text("resource")]
                        .into_iter()
                        .filter(|p| !p.is_empty())
                        .collect::<Vec<_>>()
                        .join("/");
                    let resource = match text("subresource") {
                        "" => resource,
                        sub => format!("{resource}/{sub}"),
                    };
                    let entry = seen
                        .kube
                        .entry((text("namespace").to_owned(), resource))
                        .or_default();
                    entry.0.insert(text("verb").to_owned());
                    entry.1.add(time, id, example);
                }
                _ => {
                    let entry = seen.http.entry(shapes::path_template(path)).or_default();
                    entry.0.insert(method.clone());
                    entry.1.add(time, id, example);
                }
            }
        }
    }
}

/// A Kubernetes request every client makes to find its way, which the
/// policy allows unless denied.
fn is_discovery(method: &str, path: &str, query: Option<&str>, host: &str) -> bool {
    crate::policy::HttpRequest::read_kube(method, path, query, host).is_ok_and(|request| {
        request
            .kube
            .as_ref()
            .is_some_and(|kube| crate::policy::kube::is_discovery(method, &request.path, kube))
    })
}

/// The commands of a recorded line an allow rule must name, as words:
/// not a shell given a script or another transparent runner, nor one run
/// by a wrapper that is named (a pattern for `sudo …` covers what it runs).
fn commanded(line: &str) -> Vec<Vec<String>> {
    let parsed = CommandLine::parse(line);
    parsed
        .commands
        .iter()
        .filter(|command| {
            !command.transparent
                && command
                    .run_by
                    .is_none_or(|runner| parsed.commands[runner].transparent)
        })
        .map(|command| {
            command
                .words
                .iter()
                .map(|word| match word {
                    Word::Static(text) => text.clone(),
                    Word::Dynamic { text, .. } => text.clone(),
                })
                .collect()
        })
        .collect()
}

/// A statement's text with its literals as `$n`, as PostgreSQL's own
/// normaliser writes it; withheld when it does not parse.
fn redacted_sql(text: &str) -> String {
    match pg_query::normalize(text) {
        Ok(normalized) => normalized,
        Err(_) => "(text withheld: it does not parse)".into(),
    }
}

/// A name made of what a rule allows: lower case, words joined by `-`.
fn slug(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.trim_end_matches('-').to_owned()
}

impl Suggestion {
    /// The suggestion as a policy file: the workloads it needs, then each
    /// rule with its evidence as comments; what was not learned at the end.
    /// `rollout`: each rule with `enforce = false`, so what it would refuse
    /// is logged and passes until it is removed.
    pub fn to_toml(&self, rollout: bool) -> String {
        let mut out = format!(
            "# Suggested by `interlock policy suggest` from {} sessions.\n\
             # Each rule allows what was seen, no more; check it with\n\
             # `interlock policy check --against-sessions` before enforcing.\n",
            self.sessions
        );
        if !self.saturation.is_empty() {
            out.push_str(
                "#\n# New behaviours first seen per day (enforce once they stop growing):\n",
            );
            for s in &self.saturation {
                let days: Vec<String> = s
                    .new_per_day
                    .iter()
                    .map(|(day, new)| format!("{day}: {new}"))
                    .collect();
                let state = match s.stable_days {
                    0 => "still learning".to_owned(),
                    1 => "stable for 1 day".to_owned(),
                    n => format!("stable for {n} days"),
                };
                out.push_str(&format!(
                    "#   {} on {}: {} behaviours; {} — {state}\n",
                    s.caller.name(),
                    s.target,
                    s.behaviours,
                    days.join(", ")
                ));
            }
        }
        for (name, field, value) in &self.workloads {
            out.push_str(&format!(
                "\n[[workload]]\nname = {}\n{field} = {}\n",
                quoted(name),
                if *field == "uid" {
                    value.clone()
                } else {
                    quoted(value)
                }
            ));
        }
        for rule in &self.rules {
            let e = &rule.evidence;
            let mut shown: Vec<&str> = e
                .sessions
                .iter()
                .take(SESSIONS_SHOWN)
                .map(String::as_str)
                .collect();
            if e.sessions.len() > SESSIONS_SHOWN {
                shown.push("…");
            }
            out.push_str(&format!(
                "\n# seen {} times, {} to {}, in {} sessions ({})\n",
                e.count,
                time(e.first_us),
                time(e.last_us),
                e.sessions.len(),
                shown.join(", ")
            ));
            for example in &e.examples {
                out.push_str(&format!("# e.g. {}\n", one_line(example)));
            }
            for (pattern, examples) in &rule.patterns_from {
                out.push_str(&format!(
                    "#   {pattern} <- {}\n",
                    examples
                        .iter()
                        .map(|e| one_line(e))
                        .collect::<Vec<_>>()
                        .join(" | ")
                ));
            }
            out.push_str(&format!(
                "[[rule]]\nname = {}\nworkloads = [{}]\ntargets = [{}]\ndecision = \"allow\"\n",
                quoted(&rule.name),
                quoted(&rule.caller.name()),
                quoted(&rule.target)
            ));
            if rollout {
                out.push_str("enforce = false\n");
            }
            for (key, value) in &rule.keys {
                let value = match value {
                    Value::Bool(b) => b.to_string(),
                    Value::Text(text) => quoted(text),
                    Value::List(items) => format!(
                        "[{}]",
                        items
                            .iter()
                            .map(|i| quoted(i))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                out.push_str(&format!("{key} = {value}\n"));
            }
        }
        if !self.unlearned.is_empty() {
            out.push_str(
                "\n# Not learned (refused, held, or not readable); add by hand if wanted:\n",
            );
            for u in &self.unlearned {
                out.push_str(&format!(
                    "#   {} on {}: {} — {} ({} times)\n",
                    u.caller.name(),
                    u.target,
                    one_line(&u.what),
                    u.why,
                    u.evidence.count
                ));
            }
        }
        out
    }
}

/// A TOML basic string (JSON's escaping is TOML's).
fn quoted(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}

fn one_line(text: &str) -> String {
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() > 160 {
        format!("{}…", line.chars().take(160).collect::<String>())
    } else {
        line
    }
}

fn time(us: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_micros(us))
        .to_string()
}
