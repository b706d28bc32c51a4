//! Grants asked for up front (`interlock request`): which `requestable`
//! rule may grant what was asked, and the scope that says exactly that.
//! A request is never wider than its rule: each statement kind it names is
//! one of the rule's, each table one the rule is about, its duration at
//! most the rule's `max_duration`.
use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use super::{ApprovalError, Caller, GrantAsk, GrantScope, Requester};
use crate::{
    policy::{Action, Approver, Policy, Protocol, Rule, StatementKind, TargetId},
    workload::Workload,
};

/// What a caller asks for.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Wish {
    pub target: String,
    /// The rule to ask under; none: the first requestable rule that can
    /// grant the rest.
    pub rule: Option<String>,
    /// SQL targets: the statement kinds; empty: all the rule is about.
    #[serde(default)]
    pub statements: Vec<StatementKind>,
    /// SQL targets: `schema.table` names; empty: all the rule is about.
    #[serde(default)]
    pub tables: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    pub reason: Option<String>,
    /// A person asking for every caller of this policy workload.
    pub for_workload: Option<String>,
}

/// Checks `wish`, asked by `workload` (the asking process), against the
/// policy: the grant request to put to the rule's approvers, or why not.
pub fn check(
    policy: &Policy,
    workload: &Workload,
    caller: &Caller,
    admin: bool,
    wish: Wish,
) -> Result<GrantAsk, ApprovalError> {
    let refuse = |why: String| ApprovalError::NotRequestable(why);
    let target = policy.target_id(&wish.target).ok_or_else(|| {
        let names: Vec<&str> = policy.targets.iter().map(|t| t.name.as_str()).collect();
        refuse(format!(
            "no target {:?} (targets: {})",
            wish.target,
            names.join(", ")
        ))
    })?;
    let reason = wish
        .reason
        .clone()
        .or_else(|| workload.reason.clone())
        .filter(|r| !r.trim().is_empty())
        .ok_or_else(|| {
            refuse(
                "a request needs a reason approvers can judge: --reason \"…\" (or INTERLOCK_REASON in the environment)"
                    .into(),
            )
        })?;
    let for_workload = match &wish.for_workload {
        Some(name) => Some(
            policy
                .workloads
                .iter()
                .position(|w| &w.name == name)
                .ok_or_else(|| refuse(format!("no workload {name:?} in the policy")))?,
        ),
        None => None,
    };
    let mut refusals = Vec::new();
    for rule in &policy.rules {
        if wish.rule.as_ref().is_some_and(|name| name != &rule.name) {
            continue;
        }
        // Rules that cannot be asked under are named only when asked for.
        let named = wish.rule.is_some();
        let Some(spec) = rule
            .approval
            .as_ref()
            .filter(|_| rule.action == Action::Approve)
        else {
            if named {
                refusals.push(format!("rule {:?} does not ask for approval", rule.name));
            }
            continue;
        };
        let Some(max) = spec.requestable else {
            if named {
                refusals.push(format!("rule {:?} is not requestable", rule.name));
            }
            continue;
        };
        let applies = match for_workload {
            Some(index) => {
                rule.targets
                    .as_ref()
                    .is_none_or(|ids| ids.contains(&target))
                    && rule
                        .workloads
                        .as_ref()
                        .is_none_or(|ids| ids.contains(&index))
            }
            None => crate::policy::applies(policy, rule, workload, target),
        };
        if !applies {
            refusals.push(format!(
                "rule {:?} is not about {} on target {:?}",
                rule.name,
                wish.for_workload
                    .as_deref()
                    .map_or("this workload".to_owned(), |w| format!("workload {w:?}")),
                wish.target
            ));
            continue;
        }
        if wish.duration > max {
            refusals.push(format!(
                "rule {:?} grants at most {}",
                rule.name,
                humantime::format_duration(max)
            ));
            continue;
        }
        let scope = match narrow(policy, rule, target, &wish) {
            Ok(scope) => scope,
            Err(why) => {
                refusals.push(why);
                continue;
            }
        };
        if for_workload.is_some() && !admin && !may_answer(caller, &spec.approvers) {
            return Err(refuse(format!(
                "only admins and approvers of rule {:?} may ask for another workload",
                rule.name
            )));
        }
        let mut requester = Requester::of(policy, workload);
        requester.reason = Some(reason);
        return Ok(GrantAsk {
            requester,
            target: wish.target,
            rule: rule.name.clone(),
            spec: Arc::clone(spec),
            duration: wish.duration,
            scope,
            for_workload: wish.for_workload,
        });
    }
    Err(refuse(match (&wish.rule, refusals.is_empty()) {
        (Some(name), true) => format!("no rule {name:?}"),
        (None, true) => "no rule of the policy is requestable".into(),
        _ => format!("nothing can grant this: {}", refusals.join("; ")),
    }))
}

fn may_answer(caller: &Caller, approvers: &[Approver]) -> bool {
    approvers.iter().any(|a| caller.is(a))
}

/// The scope of a grant asked for `wish` under `rule`: none when it asks
/// for all the rule is about; an error when it asks for more.
fn narrow(
    policy: &Policy,
    rule: &Rule,
    target: TargetId,
    wish: &Wish,
) -> Result<Option<GrantScope>, String> {
    if wish.statements.is_empty() && wish.tables.is_empty() {
        return Ok(None);
    }
    let name = &rule.name;
    if policy.target(target).protocol != Protocol::Postgres || !rule.is_statement_level() {
        return Err(format!(
            "rule {name:?} is not about SQL statements: a grant of it covers all it is about, so leave out statements and tables"
        ));
    }
    for kind in &wish.statements {
        if let Some(kinds) = rule.statements
            && !kinds.contains(*kind)
        {
            let listed: Vec<&str> = kinds.iter().map(StatementKind::as_str).collect();
            return Err(format!(
                "rule {name:?} is not about {kind} statements (only {})",
                listed.join(", ")
            ));
        }
    }
    for table in &wish.tables {
        let listed = || {
            let globs: Vec<&str> = rule.tables.iter().map(|p| p.as_str()).collect();
            globs.join(", ")
        };
        if rule.tables.iter().any(|p| p.as_str() == table) {
            continue;
        }
        if table.contains(['*', '?', '[', '{']) {
            if rule.tables.is_empty() {
                crate::policy::Pattern::new(table)
                    .map_err(|e| format!("table pattern {table:?}: {e}"))?;
                continue;
            }
            return Err(format!(
                "{table:?} is a pattern rule {name:?} does not list: name tables as schema.table, or use one of its patterns ({})",
                listed()
            ));
        }
        if !table.contains('.') {
            return Err(format!(
                "name the table as schema.table (\"public.{table}\"), as the server resolves it"
            ));
        }
        if !rule.tables.is_empty() && !rule.tables.iter().any(|p| p.matches(table)) {
            return Err(format!(
                "rule {name:?} is not about table {table} (only {})",
                listed()
            ));
        }
    }
    let statements = if wish.statements.is_empty() {
        rule.statements
            .map(|k| k.iter().collect())
            .unwrap_or_default()
    } else {
        wish.statements.clone()
    };
    let tables = if wish.tables.is_empty() {
        rule.tables.iter().map(|p| p.as_str().to_owned()).collect()
    } else {
        wish.tables.clone()
    };
    Ok(Some(GrantScope {
        statements,
        tables,
        functions: rule
            .functions
            .iter()
            .map(|p| p.as_str().to_owned())
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::Config,
        policy::{Builtin, FunctionRef, StatementInfo},
    };

    const POLICY: &str = r#"
[[target]]
name = "orders-db"
protocol = "postgres"
address = "127.0.0.1:5432"
tls = "disable"
[target.credential]
user = "app"
password_file = "SECRET"

[[target]]
name = "cache"
protocol = "tcp"
address = "127.0.0.1:6379"

[[workload]]
name = "ci"
uid = 1000

[[rule]]
name = "cleanup"
workloads = ["ci"]
targets = ["orders-db"]
decision = "approve"
statements = ["delete", "update"]
tables = ["public.*"]
approvers = ["uid:5001"]
requestable = true
max_duration = "1h"

[[rule]]
name = "cache-access"
workloads = ["ci"]
targets = ["cache"]
decision = "approve"
approvers = ["uid:5001"]
requestable = true
max_duration = "10m"
"#;

    fn wish(target: &str, statements: &[StatementKind], tables: &[&str], minutes: u64) -> Wish {
        Wish {
            target: target.into(),
            rule: None,
            statements: statements.to_vec(),
            tables: tables.iter().map(|t| t.to_string()).collect(),
            duration: Duration::from_secs(minutes * 60),
            reason: Some("INC-1".into()),
            for_workload: None,
        }
    }

    fn ci() -> Workload {
        Workload {
            uid: 1000,
            ..Workload::default()
        }
    }

    fn check_as(workload: &Workload, wish: Wish) -> Result<GrantAsk, String> {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "pw").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let text = POLICY.replace("SECRET", &secret.display().to_string());
        let config = Config::from_text("policy.toml", &text).unwrap();
        let caller = Caller::Local {
            uid: 1000,
            gid: 1000,
        };
        check(&config.policy, workload, &caller, false, wish).map_err(|e| e.to_string())
    }

    #[test]
    fn a_request_within_its_rule_gets_exactly_the_scope_it_asked_for() {
        use StatementKind::*;
        let ask = check_as(&ci(), wish("orders-db", &[Delete], &["public.orders"], 30)).unwrap();
        assert_eq!(ask.rule, "cleanup");
        let scope = ask.scope.unwrap();
        assert_eq!(scope.statements, vec![Delete]);
        assert_eq!(scope.tables, vec!["public.orders".to_owned()]);
        // Unnamed dimensions are the rule's.
        let ask = check_as(&ci(), wish("orders-db", &[], &["public.orders"], 30)).unwrap();
        assert_eq!(ask.scope.unwrap().statements, vec![Update, Delete]);
        // Nothing narrowed: the whole rule, no scope.
        let ask = check_as(&ci(), wish("cache", &[], &[], 5)).unwrap();
        assert_eq!(ask.rule, "cache-access");
        assert!(ask.scope.is_none());
    }

    #[test]
    fn a_request_wider_than_its_rule_is_refused_saying_why() {
        use StatementKind::*;
        for (wish, expected) in [
            (wish("orders-db", &[Drop], &[], 5), "not about drop"),
            (
                wish("orders-db", &[Delete], &["secret.keys"], 5),
                "not about table secret.keys",
            ),
            (
                wish("orders-db", &[Delete], &["*.orders"], 5),
                "a pattern rule",
            ),
            (wish("orders-db", &[Delete], &["orders"], 5), "schema.table"),
            (wish("orders-db", &[Delete], &[], 61), "grants at most 1h"),
            (wish("cache", &[Delete], &[], 5), "not about SQL statements"),
            (wish("nowhere", &[], &[], 5), "no target"),
        ] {
            let error = check_as(&ci(), wish).map(|a| a.rule).expect_err(expected);
            assert!(error.contains(expected), "{error}");
        }
        let stranger = Workload {
            uid: 2000,
            ..Workload::default()
        };
        let error = check_as(&stranger, wish("orders-db", &[Delete], &[], 5)).unwrap_err();
        assert!(error.contains("not about this workload"), "{error}");
        let mut unexplained = wish("orders-db", &[Delete], &[], 5);
        unexplained.reason = Some("  ".into());
        assert!(
            check_as(&ci(), unexplained)
                .unwrap_err()
                .contains("needs a reason")
        );
    }

    #[test]
    fn a_scope_covers_a_statement_as_an_allow_rule_would() {
        use StatementKind::*;
        let scope = GrantScope {
            statements: vec![Delete],
            tables: vec!["public.orders".into()],
            functions: Vec::new(),
        };
        let statement =
            |kinds: &[StatementKind], tables: &[&str], function: Option<&str>| StatementInfo {
                kinds: kinds.iter().copied().collect(),
                tables: tables.iter().map(|t| t.to_string()).collect(),
                functions: function
                    .map(|name| FunctionRef {
                        name: name.into(),
                        builtin: Builtin::No,
                    })
                    .into_iter()
                    .collect(),
                parsed: true,
                ..StatementInfo::default()
            };
        assert!(scope.covers(&statement(&[Delete], &["public.orders"], None)));
        assert!(!scope.covers(&statement(
            &[Delete],
            &["public.orders", "public.events"],
            None
        )));
        assert!(!scope.covers(&statement(&[Delete, Select], &["public.orders"], None)));
        assert!(!scope.covers(&statement(
            &[Delete],
            &["public.orders"],
            Some("public.wipe")
        )));
        assert!(!scope.covers(&StatementInfo {
            parsed: false,
            ..statement(&[Delete], &["public.orders"], None)
        }));
    }
}
