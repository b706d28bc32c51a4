use serde_json::{Value, json};

use super::{
    Recorded,
    replay::replay,
    suggest::{GroupBy, suggest},
};
use crate::{config::Config, sessions::view::SessionLog};

/// A day after the sessions below.
const NOW: u64 = 1_000_000 + 86_400 * 1_000_000;

/// A session's record from its events (`time_us` counts up from `start`).
fn session(id: &str, protocol: &str, target: &str, events: &[Value]) -> Recorded {
    let mut lines = vec![json!({
        "kind": "session_start", "session_id": id, "protocol": protocol, "target": target,
        "workload": {"uid": 1000, "user": "ci", "unit": "ci.service", "comm": "psql"},
        "workloads": ["ci"], "time_us": 1_000_000,
    })];
    lines.push(json!({"kind": "connection", "decision": "allow", "enforced": false, "rule": null}));
    for (i, event) in events.iter().enumerate() {
        let mut event = event.clone();
        event["time_us"] = json!(1_000_000 + i as u64 * 1000);
        event
            .as_object_mut()
            .unwrap()
            .entry("decision")
            .or_insert(json!("allow"));
        event
            .as_object_mut()
            .unwrap()
            .entry("enforced")
            .or_insert(json!(false));
        lines.push(event);
    }
    let text: Vec<u8> = lines
        .iter()
        .flat_map(|l| format!("{l}\n").into_bytes())
        .collect();
    Recorded::read(&SessionLog::parse(&text)).expect("a session")
}

fn statement(n: u64, text: &str, kinds: &str, tables: &[&str]) -> Value {
    json!({"kind": "statement", "n": n, "text": text, "kinds": kinds, "tables": tables})
}

/// The configuration the suggestion goes with: a PostgreSQL, an SSH and
/// an HTTP target, and the workload the sessions matched.
fn config_with(rules: &str) -> (Config, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("pw");
    std::fs::write(&secret, "s3cret\n").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let main = format!(
        r#"
[[target]]
name = "db"
protocol = "postgres"
address = "10.0.0.5:5432"
[target.credential]
user = "app"
password_file = {secret:?}

[[target]]
name = "deploy-host"
protocol = "ssh"
address = "10.0.0.6:22"
host_key_fingerprint = "SHA256:0123456789abcdefghijklmnopqrstuvwxyzABCDE"
[target.credential]
user = "deploy"
password_file = {secret:?}

[[target]]
name = "api"
protocol = "http"
address = "10.0.0.7:443"

[[workload]]
name = "ci"
unit = "ci.service"
"#
    );
    let config = Config::from_text("learned.toml", &format!("{main}\n{rules}"))
        .unwrap_or_else(|e| panic!("{e}\n{rules}"));
    (config, dir)
}

#[test]
fn postgres_rules_allow_exactly_the_kinds_tables_and_functions_seen() {
    let learned = vec![
        session(
            "s1",
            "postgres",
            "db",
            &[
                statement(1, "BEGIN", "transaction", &[]),
                statement(
                    2,
                    "SELECT * FROM orders WHERE id = 7",
                    "select",
                    &["public.orders"],
                ),
                statement(
                    3,
                    "SELECT name FROM customers",
                    "select",
                    &["public.customers"],
                ),
                json!({"kind": "statement", "n": 4, "text": "INSERT INTO orders VALUES (nextval('s'), 1)",
                   "kinds": "insert", "tables": ["public.orders"], "functions": ["pg_catalog.nextval"]}),
                statement(5, "SELECT 1", "select", &[]),
                statement(6, "SET search_path = public", "set", &[]),
                statement(7, "COMMIT", "transaction", &[]),
            ],
        ),
        session(
            "s2",
            "postgres",
            "db",
            &[
                statement(
                    1,
                    "SELECT * FROM orders WHERE id = 8",
                    "select",
                    &["public.orders"],
                ),
                // Refused while enforced: listed, never learned.
                json!({"kind": "statement", "n": 2, "text": "DELETE FROM orders", "kinds": "delete",
                   "tables": ["public.orders"], "decision": "deny", "enforced": true, "rule": null}),
            ],
        ),
    ];
    let suggestion = suggest(&learned, GroupBy::Workload, NOW);
    let toml = suggestion.to_toml(false);
    let rules: Vec<(&str, String)> = suggestion
        .rules
        .iter()
        .map(|r| (r.name.as_str(), serde_json::to_string(&r.keys).unwrap()))
        .collect();
    assert_eq!(
        rules,
        [
            ("ci-db-insert", r#"[["statements",["insert"]],["tables",["public.orders"]],["functions",["pg_catalog.nextval"]]]"#.to_owned()),
            ("ci-db-select", r#"[["statements",["select"]],["tables",["public.customers","public.orders"]]]"#.to_owned()),
            ("ci-db-no-tables", r#"[["statements",["set","transaction"]],["tables",[]]]"#.to_owned()),
        ],
        "{toml}"
    );
    // Evidence: counts, literals redacted, the sessions.
    let select = &suggestion.rules[1].evidence;
    assert_eq!(select.count, 4);
    assert_eq!(select.sessions.len(), 2);
    assert!(
        select.examples[0].contains("id = $1"),
        "{:?}",
        select.examples
    );
    assert!(
        toml.contains("# e.g. SELECT * FROM orders WHERE id = $1"),
        "{toml}"
    );
    assert!(
        toml.contains("DELETE FROM orders — deny (rule none)"),
        "{toml}"
    );
    // The same output from the same sessions.
    assert_eq!(
        suggest(&learned, GroupBy::Workload, NOW).to_toml(false),
        toml
    );

    // Loaded with the configuration, it refuses none of what it came from...
    let (config, _dir) = config_with(&toml);
    let replayed = replay(&config.policy, &learned);
    assert_eq!(replayed.would_deny, [], "{toml}");
    assert_eq!(replayed.decisions, 2 + 8);
    // ...and exactly what it did not see.
    let outliers = vec![session(
        "s3",
        "postgres",
        "db",
        &[
            statement(1, "SELECT * FROM orders", "select", &["public.orders"]),
            statement(
                2,
                "UPDATE orders SET total = 0",
                "update",
                &["public.orders"],
            ),
            statement(3, "SELECT * FROM secrets", "select", &["public.secrets"]),
            json!({"kind": "statement", "n": 4, "text": "SELECT pg_sleep(1)", "kinds": "select",
               "tables": [], "functions": ["pg_catalog.pg_sleep"]}),
        ],
    )];
    let refused: Vec<String> = replay(&config.policy, &outliers)
        .would_deny
        .into_iter()
        .map(|d| d.what)
        .collect();
    assert_eq!(refused, ["statement 2", "statement 3", "statement 4"]);
}

#[test]
fn ssh_commands_become_patterns_of_what_varied() {
    let exec = |line: &str| json!({"kind": "ssh_request", "channel": 0, "request": "exec", "command": line});
    let login = json!({"kind": "ssh_login", "user": "deploy", "method": "publickey"});
    let learned: Vec<Recorded> = ["v1.4.0", "v1.4.1", "v1.5.0"]
        .iter()
        .enumerate()
        .map(|(i, version)| {
            session(
                &format!("s{i}"),
                "ssh",
                "deploy-host",
                &[
                    login.clone(),
                    exec(&format!(
                        "sh -c './deploy.sh {version} --env staging && systemctl restart app'"
                    )),
                    exec(&format!("cat /srv/releases/{version}/NOTES")),
                ],
            )
        })
        .collect();
    let suggestion = suggest(&learned, GroupBy::Workload, NOW);
    let toml = suggestion.to_toml(false);
    assert_eq!(suggestion.rules.len(), 1, "{toml}");
    assert_eq!(
        serde_json::to_string(&suggestion.rules[0].keys).unwrap(),
        r#"[["users",["deploy"]],["commands",["./deploy.sh * --env staging","cat /srv/releases/*/NOTES","systemctl restart app"]]]"#,
        "{toml}"
    );
    // Each pattern says which commands it came from.
    assert!(
        toml.contains("#   ./deploy.sh * --env staging <- ./deploy.sh v1.4.0 --env staging | ./deploy.sh v1.4.1 --env staging\n"),
        "{toml}"
    );
    let (config, _dir) = config_with(&toml);
    assert_eq!(replay(&config.policy, &learned).would_deny, []);
    // Another version passes; another command or environment does not.
    let later = vec![session(
        "s9",
        "ssh",
        "deploy-host",
        &[
            login.clone(),
            exec("./deploy.sh v2.0.0 --env staging"),
            exec("./deploy.sh v2.0.0 --env production"),
            exec("rm -rf /srv/releases"),
        ],
    )];
    let refused: Vec<String> = replay(&config.policy, &later)
        .would_deny
        .into_iter()
        .map(|d| d.text)
        .collect();
    assert_eq!(
        refused,
        [
            "./deploy.sh v2.0.0 --env production",
            "rm -rf /srv/releases"
        ]
    );
}

#[test]
fn http_rules_take_methods_by_path_with_ids_as_globs() {
    let request = |n: u64, method: &str, path: &str| json!({"kind": "http_request", "n": n, "method": method, "path": path, "query": null, "host": "api.test"});
    let learned = vec![session(
        "h1",
        "http",
        "api",
        &[
            request(1, "GET", "/api/v1/items/17"),
            request(2, "GET", "/api/v1/items/18"),
            request(3, "GET", "/api/v1/items"),
            request(4, "POST", "/api/v1/items"),
        ],
    )];
    let suggestion = suggest(&learned, GroupBy::Workload, NOW);
    let toml = suggestion.to_toml(false);
    let rules: Vec<String> = suggestion
        .rules
        .iter()
        .map(|r| serde_json::to_string(&r.keys).unwrap())
        .collect();
    assert_eq!(
        rules,
        [
            r#"[["methods",["GET"]],["paths",["/api/v1/items/*"]]]"#,
            r#"[["methods",["GET","POST"]],["paths",["/api/v1/items"]]]"#,
        ],
        "{toml}"
    );
    let (config, _dir) = config_with(&toml);
    assert_eq!(replay(&config.policy, &learned).would_deny, []);
    let later = vec![session(
        "h2",
        "http",
        "api",
        &[
            request(1, "GET", "/api/v1/items/99"),
            request(2, "DELETE", "/api/v1/items/99"),
            request(3, "GET", "/api/v1/users"),
        ],
    )];
    let refused: Vec<String> = replay(&config.policy, &later)
        .would_deny
        .into_iter()
        .map(|d| d.text)
        .collect();
    assert_eq!(refused, ["DELETE /api/v1/items/99", "GET /api/v1/users"]);
}

#[test]
fn callers_are_grouped_by_workload_unit_or_executable() {
    let mut other = session("u1", "tcp", "db", &[]);
    other.workloads.clear();
    other.workload.unit = Some("backup.service".into());
    let suggestion = suggest(&[other], GroupBy::Workload, NOW);
    let toml = suggestion.to_toml(false);
    assert!(
        toml.contains("[[workload]]\nname = \"unit-backup-service\"\nunit = \"backup.service\""),
        "{toml}"
    );
    assert!(
        toml.contains("workloads = [\"unit-backup-service\"]"),
        "{toml}"
    );
}

#[test]
fn saturation_says_how_long_nothing_new_was_seen() {
    const DAY: u64 = 86_400 * 1_000_000;
    let at = |mut session: Recorded, day: u64| {
        for did in &mut session.did {
            did.time_us += day * DAY;
        }
        session
    };
    let read = |n: u64, table: &str| statement(n, "SELECT 1", "select", &[table]);
    let sessions = vec![
        at(
            session(
                "d0",
                "postgres",
                "db",
                &[read(1, "public.a"), read(2, "public.b")],
            ),
            0,
        ),
        at(
            session(
                "d1",
                "postgres",
                "db",
                &[read(1, "public.a"), read(2, "public.c")],
            ),
            1,
        ),
        at(session("d2", "postgres", "db", &[read(1, "public.c")]), 2),
        at(session("d3", "postgres", "db", &[read(1, "public.b")]), 3),
    ];
    let suggestion = suggest(&sessions, GroupBy::Workload, 1_000_000 + 4 * DAY);
    let s = &suggestion.saturation[0];
    assert_eq!(s.behaviours, 3);
    let new: Vec<u64> = s.new_per_day.iter().map(|(_, n)| *n).collect();
    assert_eq!(new, [2, 1, 0, 0]);
    assert_eq!(s.stable_days, 2);
    let toml = suggestion.to_toml(false);
    assert!(
        toml.contains("ci on db: 3 behaviours; 1970-01-01: 2, 1970-01-02: 1, 1970-01-03: 0, 1970-01-04: 0 — stable for 2 days"),
        "{toml}"
    );
    // A new behaviour today: still learning.
    let mut more = sessions;
    more.push(at(
        session("d4", "postgres", "db", &[read(1, "public.d")]),
        4,
    ));
    let suggestion = suggest(&more, GroupBy::Workload, 1_000_000 + 4 * DAY + 1000);
    assert_eq!(suggestion.saturation[0].stable_days, 0);
    assert!(suggestion.to_toml(false).contains("— still learning"));
}

#[test]
fn the_current_policy_is_compared_with_what_was_used() {
    let broad = r#"
[[workload]]
name = "nightly"
unit = "nightly.service"

[[rule]]
name = "ci-writes-everything"
workloads = ["ci"]
targets = ["db"]
decision = "allow"
statements = ["select", "insert", "update", "delete"]
tables = ["public.*", "audit.*"]

[[rule]]
name = "nightly-reads"
workloads = ["nightly"]
targets = ["db"]
decision = "allow"
statements = ["select"]
"#;
    let (config, _dir) = config_with(broad);
    let decided = |mut event: Value| {
        event["decision"] = json!("allow");
        event["enforced"] = json!(true);
        event["rule"] = json!("ci-writes-everything");
        event
    };
    let sessions = vec![session(
        "p1",
        "postgres",
        "db",
        &[
            decided(statement(
                1,
                "SELECT * FROM orders",
                "select",
                &["public.orders"],
            )),
            decided(statement(
                2,
                "INSERT INTO orders VALUES (1)",
                "insert",
                &["public.orders"],
            )),
        ],
    )];
    let against = super::against::against(&config.policy, &sessions);
    assert_eq!(against.rules.len(), 1);
    let used = &against.rules[0];
    assert_eq!(used.decisions, 2);
    assert_eq!(
        used.kinds_unused.as_deref(),
        Some(&["update".to_owned(), "delete".to_owned()][..])
    );
    assert_eq!(used.table_globs_unused, ["audit.*"]);
    assert_eq!(against.unused_rules, ["nightly-reads"]);
    assert_eq!(against.idle_workloads, ["nightly"]);
    let comments = against.to_comments("interlock.toml");
    assert!(
        comments.contains("rule \"ci-writes-everything\" allowed 2 times; allows, never used: statements update, delete; tables audit.*"),
        "{comments}"
    );
    assert!(
        comments.contains("rule \"nightly-reads\" allowed nothing"),
        "{comments}"
    );
    assert!(
        comments.contains("workload \"nightly\" had no sessions"),
        "{comments}"
    );
}

#[test]
fn the_role_a_session_took_is_kept() {
    let mut learned = session(
        "r1",
        "postgres",
        "db",
        &[statement(1, "SELECT 1 FROM t", "select", &["public.t"])],
    );
    learned.as_user = Some("reporting".into());
    let toml = suggest(&[learned], GroupBy::Workload, NOW).to_toml(false);
    assert!(toml.contains("as_user = \"reporting\"\n"), "{toml}");
    let (config, _dir) = config_with(&toml);
    assert_eq!(config.policy.rules[0].as_user.as_deref(), Some("reporting"));
    // Two roles: left out, and said why.
    let mut other = session("r2", "postgres", "db", &[]);
    other.as_user = Some("writer".into());
    let mut first = session("r3", "postgres", "db", &[]);
    first.as_user = Some("reporting".into());
    let toml = suggest(&[first, other], GroupBy::Workload, NOW).to_toml(false);
    assert!(!toml.contains("as_user ="), "{toml}");
    assert!(toml.contains("took the roles reporting, writer"), "{toml}");
}
