//! `policy suggest --policy FILE`: the current policy against what the
//! recorded sessions did. For each allow rule, what it was used for and
//! what it allows that nothing used (the kinds and table globs of a
//! statement rule); the allow rules nothing used; the workloads with no
//! sessions. (What was refused is the suggestion's own "not learned" list.)
use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{
    recorded::{Recorded, What},
    shapes,
};
use crate::policy::{Action, Policy};

#[derive(Debug, Default, Serialize)]
pub struct Against {
    pub rules: Vec<RuleUse>,
    /// Allow rules that decided nothing in the sessions.
    pub unused_rules: Vec<String>,
    /// Workloads of the policy no session's caller matched.
    pub idle_workloads: Vec<String>,
}

/// What one allow rule was used for.
#[derive(Debug, Default, Serialize)]
pub struct RuleUse {
    pub rule: String,
    /// Connections, statements and requests it allowed.
    pub decisions: u64,
    pub kinds_used: BTreeSet<String>,
    /// Statement kinds it allows that no statement used (none when it
    /// allows any kind).
    pub kinds_unused: Option<Vec<String>>,
    pub tables_used: BTreeSet<String>,
    /// Its table globs no statement's table matched.
    pub table_globs_unused: Vec<String>,
    /// SSH command lines it allowed.
    pub commands: u64,
    /// HTTP requests it allowed, as method and path template.
    pub requests: BTreeSet<String>,
}

/// Compares `policy` with what `sessions` did.
pub fn against(policy: &Policy, sessions: &[Recorded]) -> Against {
    let mut uses: BTreeMap<String, RuleUse> = BTreeMap::new();
    let mut active_workloads = BTreeSet::new();
    for session in sessions {
        active_workloads.extend(session.workloads.iter().cloned());
        let Some(connection) = &session.connection else {
            continue;
        };
        if let (true, Some(rule)) = (connection.decision == "allow", &connection.rule) {
            uses.entry(rule.clone()).or_default().decisions += 1;
        }
        for did in &session.did {
            let Some(rule) = &did.decided.rule else {
                continue;
            };
            if did.decided.decision != "allow" {
                continue;
            }
            let used = uses.entry(rule.clone()).or_default();
            used.decisions += 1;
            match &did.what {
                What::Statement { kinds, tables, .. } => {
                    used.kinds_used
                        .extend(kinds.iter().map(|k| k.as_str().to_owned()));
                    used.tables_used.extend(tables.iter().cloned());
                }
                What::Ssh { .. } => used.commands += 1,
                What::Http { method, path, .. } => {
                    used.requests
                        .insert(format!("{method} {}", shapes::path_template(path)));
                }
            }
        }
    }
    let mut out = Against::default();
    for rule in policy.rules.iter().filter(|r| r.action == Action::Allow) {
        let Some(mut used) = uses.remove(&rule.name) else {
            out.unused_rules.push(rule.name.clone());
            continue;
        };
        used.rule = rule.name.clone();
        used.kinds_unused = rule.statements.map(|allowed| {
            allowed
                .iter()
                .map(|k| k.as_str().to_owned())
                .filter(|k| !used.kinds_used.contains(k))
                .collect()
        });
        used.table_globs_unused = rule
            .tables
            .iter()
            .filter(|glob| !used.tables_used.iter().any(|t| glob.matches(t)))
            .map(|glob| glob.as_str().to_owned())
            .collect();
        out.rules.push(used);
    }
    out.idle_workloads = policy
        .workloads
        .iter()
        .map(|w| w.name.clone())
        .filter(|name| !active_workloads.contains(name))
        .collect();
    out
}

impl Against {
    /// As comments for the head of a suggestion.
    pub fn to_comments(&self, file: &str) -> String {
        let mut out = format!("#\n# Against the current policy ({file}):\n");
        for used in &self.rules {
            let mut unused = Vec::new();
            match &used.kinds_unused {
                Some(kinds) if !kinds.is_empty() => {
                    unused.push(format!("statements {}", kinds.join(", ")))
                }
                Some(_) => {}
                None if !used.kinds_used.is_empty() => unused.push(format!(
                    "any statement kind but {}",
                    used.kinds_used
                        .iter()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                None => {}
            }
            if !used.table_globs_unused.is_empty() {
                unused.push(format!("tables {}", used.table_globs_unused.join(", ")));
            }
            let never = if unused.is_empty() {
                String::new()
            } else {
                format!("; allows, never used: {}", unused.join("; "))
            };
            out.push_str(&format!(
                "#   rule {:?} allowed {} times{never}\n",
                used.rule, used.decisions
            ));
        }
        for rule in &self.unused_rules {
            out.push_str(&format!("#   rule {rule:?} allowed nothing\n"));
        }
        for workload in &self.idle_workloads {
            out.push_str(&format!("#   workload {workload:?} had no sessions\n"));
        }
        out
    }
}
