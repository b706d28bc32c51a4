//! A recorded session as learning reads it: the caller, the target, and
//! each statement, SSH request or HTTP request with its decision. Events
//! learning does not need (results, output, terminals) are passed over.
use serde_json::Value;

use crate::{policy::StatementKind, sessions::view::SessionLog, workload::Workload};

pub struct Recorded {
    pub id: String,
    pub protocol: String,
    pub target: String,
    pub workload: Workload,
    /// The policy's workloads the caller matched when it was recorded.
    pub workloads: Vec<String>,
    pub start_us: u64,
    /// The decision on the connection.
    pub connection: Option<Decided>,
    /// SSH: the user the client logged in as.
    pub ssh_user: Option<String>,
    /// PostgreSQL: the role the session took (`as_user`).
    pub as_user: Option<String>,
    pub did: Vec<Did>,
}

/// How something was decided when it was recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decided {
    /// `allow`, `deny` or `approve`.
    pub decision: String,
    /// False in audit mode: it went through whatever the decision.
    pub enforced: bool,
    pub rule: Option<String>,
}

impl Decided {
    fn of(event: &Value) -> Self {
        Self {
            decision: event["decision"].as_str().unwrap_or("deny").to_owned(),
            enforced: event["enforced"].as_bool().unwrap_or(true),
            rule: event["rule"].as_str().map(str::to_owned),
        }
    }

    /// It reached the target without anyone asked: allowed, or only
    /// audited. (A held command that was approved stays with its approval
    /// rule: it is not learned as something to allow.)
    pub fn ran(&self) -> bool {
        self.decision == "allow" || !self.enforced
    }
}

/// One thing a session did.
pub struct Did {
    pub time_us: u64,
    pub decided: Decided,
    pub what: What,
}

pub enum What {
    Statement {
        n: u64,
        text: String,
        kinds: Vec<StatementKind>,
        tables: Vec<String>,
        /// Functions a rule must name (not allowed by default).
        functions: Vec<String>,
        unparsed: bool,
    },
    Ssh {
        /// `exec`, `shell`, `subsystem`, `forward`, …
        request: String,
        command: Option<String>,
    },
    Http {
        n: u64,
        method: String,
        path: String,
        query: Option<String>,
        host: String,
        /// On a Kubernetes target, the request as kube-apiserver reads it.
        kube: Option<Value>,
    },
}

impl Recorded {
    /// Reads a session's record; `None` for one without a start (not a
    /// session record).
    pub fn read(log: &SessionLog) -> Option<Self> {
        let mut session: Option<Self> = None;
        for event in log.events() {
            let time_us = event["time_us"].as_u64().unwrap_or(0);
            let text = |key: &str| event[key].as_str().unwrap_or("").to_owned();
            let strings = |key: &str| -> Vec<String> {
                event[key]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            if event["kind"] == "session_start" {
                session = Some(Self {
                    id: text("session_id"),
                    protocol: text("protocol"),
                    target: text("target"),
                    workload: serde_json::from_value(event["workload"].clone()).unwrap_or_default(),
                    workloads: strings("workloads"),
                    start_us: time_us,
                    connection: None,
                    ssh_user: None,
                    as_user: None,
                    did: Vec::new(),
                });
                continue;
            }
            let Some(session) = session.as_mut() else {
                continue;
            };
            let what = match event["kind"].as_str().unwrap_or("") {
                "connection" => {
                    session.connection = Some(Decided::of(&event));
                    session.as_user = event["as_user"].as_str().map(str::to_owned);
                    continue;
                }
                "ssh_login" => {
                    session.ssh_user = Some(text("user"));
                    continue;
                }
                "statement" => What::Statement {
                    n: event["n"].as_u64().unwrap_or(0),
                    text: text("text"),
                    kinds: text("kinds")
                        .split('+')
                        .filter_map(|k| serde_json::from_value(Value::from(k)).ok())
                        .collect(),
                    tables: strings("tables"),
                    functions: strings("functions"),
                    unparsed: event["unparsed"].as_bool().unwrap_or(false),
                },
                "ssh_request" => What::Ssh {
                    request: text("request"),
                    command: event["command"].as_str().map(str::to_owned),
                },
                "http_request" => What::Http {
                    n: event["n"].as_u64().unwrap_or(0),
                    method: text("method"),
                    path: text("path"),
                    query: event["query"].as_str().map(str::to_owned),
                    host: text("host"),
                    kube: event.get("kube").filter(|k| k.is_object()).cloned(),
                },
                _ => continue,
            };
            session.did.push(Did {
                time_us,
                decided: Decided::of(&event),
                what,
            });
        }
        session
    }
}
