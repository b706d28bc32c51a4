//! `interlock policy check --against-sessions`: recorded sessions run
//! through a candidate policy, each connection, statement, SSH request and
//! HTTP request decided as the agent would decide it now, from what the
//! record says it was (its kinds, tables and functions; its command line;
//! its method, path and host). What the candidate would refuse that went
//! through is reported, as if the candidate were enforced (whatever its
//! `mode`).
use serde::Serialize;

use super::recorded::{Recorded, What};
use crate::policy::{
    self, Action, Builtin, CommandLine, FunctionRef, HttpRequest, Policy, SshRequest, StatementInfo,
};

/// Something that went through then and the candidate would refuse.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct WouldDeny {
    pub session: String,
    pub target: String,
    /// `connection`, `statement N`, `ssh exec`, `request N`.
    pub what: String,
    /// The command, statement or request, as recorded.
    pub text: String,
    pub reason: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Replayed {
    pub sessions: u64,
    /// Decisions replayed (connections and commands that went through).
    pub decisions: u64,
    pub would_deny: Vec<WouldDeny>,
    /// Sessions on targets the candidate does not have.
    pub unknown_targets: Vec<String>,
}

/// Replays `sessions` through `policy`.
pub fn replay(policy: &Policy, sessions: &[Recorded]) -> Replayed {
    let mut out = Replayed::default();
    for session in sessions {
        out.sessions += 1;
        let Some(connection) = &session.connection else {
            continue;
        };
        if !connection.ran() {
            continue;
        }
        let Some(target) = policy.target_id(&session.target) else {
            if !out.unknown_targets.contains(&session.target) {
                out.unknown_targets.push(session.target.clone());
            }
            continue;
        };
        let workload = &session.workload;
        let refused = |what: String, text: String, reason: String| WouldDeny {
            session: session.id.clone(),
            target: session.target.clone(),
            what,
            text,
            reason,
        };
        out.decisions += 1;
        let verdict = policy::evaluate(policy, workload, target);
        if verdict.action != Action::Allow {
            out.would_deny
                .push(refused("connection".into(), String::new(), verdict.reason));
            continue;
        }
        for did in session.did.iter().filter(|d| d.decided.ran()) {
            out.decisions += 1;
            let (what, text, action, reason) = match &did.what {
                What::Statement {
                    n,
                    text,
                    kinds,
                    tables,
                    functions,
                    unparsed,
                } => {
                    let info = StatementInfo {
                        kinds: kinds.iter().copied().collect(),
                        tables: tables.clone(),
                        // Recorded are those no default allows.
                        functions: functions
                            .iter()
                            .map(|name| FunctionRef {
                                name: name.clone(),
                                builtin: Builtin::No,
                            })
                            .collect(),
                        parsed: !unparsed,
                        text: text.clone(),
                        ..StatementInfo::default()
                    };
                    let verdict = policy::evaluate_statement(policy, workload, target, &info);
                    (
                        format!("statement {n}"),
                        text.clone(),
                        verdict.action,
                        verdict.reason(policy, &info),
                    )
                }
                What::Ssh { request, command } => {
                    let user = session.ssh_user.as_deref().unwrap_or("");
                    let line;
                    let asked = match (request.as_str(), command.as_deref()) {
                        ("exec", Some(text)) => {
                            line = CommandLine::parse(text);
                            SshRequest::Exec(&line)
                        }
                        ("shell", _) => SshRequest::Shell,
                        ("subsystem", Some(name)) => SshRequest::Subsystem(name),
                        // Forwards and the rest are not replayed yet.
                        _ => {
                            out.decisions -= 1;
                            continue;
                        }
                    };
                    let verdict = policy::evaluate_ssh(policy, workload, target, user, &asked);
                    (
                        format!("ssh {request}"),
                        command.clone().unwrap_or_default(),
                        verdict.action,
                        verdict.reason,
                    )
                }
                What::Http {
                    n,
                    method,
                    path,
                    query,
                    host,
                    kube,
                } => {
                    let read = if kube.is_some() {
                        HttpRequest::read_kube(method, path, query.as_deref(), host)
                    } else {
                        HttpRequest::read(method, path, host)
                    };
                    let (action, reason) = match read {
                        Ok(request) => {
                            let verdict = policy::evaluate_http(policy, workload, target, &request);
                            (verdict.action, verdict.reason)
                        }
                        Err(unreadable) => (Action::Deny, unreadable.to_string()),
                    };
                    (
                        format!("request {n}"),
                        format!("{method} {path}"),
                        action,
                        reason,
                    )
                }
            };
            if action != Action::Allow {
                out.would_deny.push(refused(what, text, reason));
            }
        }
    }
    out
}
