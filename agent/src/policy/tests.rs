//! Table-driven tests of the evaluation order.
use super::*;
use crate::config::Config;

const POLICY: &str = r#"
[[target]]
name = "cache"
protocol = "tcp"
address = "10.1.2.3:7000"

[[target]]
name = "prod-db"
protocol = "tcp"
address = "10.9.0.0/16:5432"

[[workload]]
name = "ci-jobs"
unit = "gitlab-runner*.service"

[[workload]]
name = "curl"
exe = "/usr/bin/curl"

[[workload]]
name = "ops"
group = "ops"

[[workload]]
name = "root"
uid = 0

[[rule]]
name = "ci-may-use-cache"
workloads = ["ci-jobs"]
targets = ["cache"]
decision = "allow"

[[rule]]
name = "no-curl-anywhere"
workloads = ["curl"]
targets = ["*"]
decision = "deny"

[[rule]]
name = "ops-use-everything"
workloads = ["ops", "root"]
targets = ["*"]
decision = "allow"
"#;

fn workload(unit: Option<&str>, exe: &str, uid: u32, groups: &[&str]) -> Workload {
    Workload {
        uid,
        unit: unit.map(str::to_owned),
        exe: Some(exe.to_owned()),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        comm: "test".into(),
        ..Workload::default()
    }
}

#[test]
fn deny_first_then_allow_then_default_deny() {
    let policy = Config::from_text("policy.toml", POLICY).unwrap().policy;
    let cache = TargetId(0);
    let db = TargetId(1);
    let cases = [
        // (workload, target, expected action, expected rule)
        (
            workload(
                Some("gitlab-runner.service"),
                "/usr/bin/make",
                1000,
                &["ci"],
            ),
            cache,
            Action::Allow,
            Some("ci-may-use-cache"),
        ),
        (
            workload(
                Some("gitlab-runner-2.service"),
                "/usr/bin/make",
                1000,
                &["ci"],
            ),
            cache,
            Action::Allow,
            Some("ci-may-use-cache"),
        ),
        // The runner may use the cache, but not with curl: deny wins.
        (
            workload(
                Some("gitlab-runner.service"),
                "/usr/bin/curl",
                1000,
                &["ci"],
            ),
            cache,
            Action::Deny,
            Some("no-curl-anywhere"),
        ),
        // Not named by any allow for prod-db: default deny.
        (
            workload(
                Some("gitlab-runner.service"),
                "/usr/bin/psql",
                1000,
                &["ci"],
            ),
            db,
            Action::Deny,
            None,
        ),
        (
            workload(None, "/usr/bin/psql", 1000, &["ops"]),
            db,
            Action::Allow,
            Some("ops-use-everything"),
        ),
        (
            workload(None, "/usr/bin/psql", 0, &["root"]),
            db,
            Action::Allow,
            Some("ops-use-everything"),
        ),
        // Even root is denied curl: explicit deny beats any allow.
        (
            workload(None, "/usr/bin/curl", 0, &["root"]),
            db,
            Action::Deny,
            Some("no-curl-anywhere"),
        ),
        (
            workload(Some("cron.service"), "/usr/bin/make", 1000, &["users"]),
            cache,
            Action::Deny,
            None,
        ),
    ];
    for (i, (w, target, action, rule)) in cases.into_iter().enumerate() {
        let verdict = evaluate(&policy, &w, target);
        assert_eq!(verdict.action, action, "case {i}: {verdict:?}");
        assert_eq!(
            policy.rule_name(verdict.rule),
            rule,
            "case {i}: {verdict:?}"
        );
        assert!(
            verdict.reason.contains(&policy.targets[target.0].name),
            "case {i}: reason names the target"
        );
    }
}

#[test]
fn selector_fields_are_anded_and_values_ored() {
    let policy = Config::from_text(
        "p.toml",
        r#"
[[target]]
name = "t"
protocol = "tcp"
address = "10.0.0.1:1"

[[workload]]
name = "w"
uid = [1000, 1001]
comm = ["python3", "curl"]

[[rule]]
name = "r"
workloads = ["w"]
targets = ["t"]
decision = "allow"
"#,
    )
    .unwrap()
    .policy;
    let mut w = Workload {
        uid: 1001,
        comm: "curl".into(),
        ..Workload::default()
    };
    assert!((evaluate(&policy, &w, TargetId(0)).action == Action::Allow));
    w.uid = 0;
    assert!(
        !(evaluate(&policy, &w, TargetId(0)).action == Action::Allow),
        "uid must also match"
    );
    w.uid = 1000;
    w.comm = "bash".into();
    assert!(
        !(evaluate(&policy, &w, TargetId(0)).action == Action::Allow),
        "comm must also match"
    );
    assert_eq!(
        matching_workloads(
            &policy,
            &Workload {
                uid: 1000,
                comm: "python3".into(),
                ..Workload::default()
            }
        ),
        ["w"]
    );
}

#[test]
fn every_selector_field_matches_its_identity_field() {
    let digest = "a".repeat(64);
    let container = "b".repeat(64);
    let full = Workload {
        pid: 42,
        uid: 1000,
        user: Some("runner".into()),
        gid: 1000,
        groups: vec!["runner".into(), "docker".into()],
        cgroup: Some(format!("/system.slice/docker-{container}.scope")),
        unit: Some(format!("docker-{container}.scope")),
        container: Some(container.clone()),
        comm: "psql".into(),
        exe: Some("/usr/bin/psql".into()),
        exe_sha256: Some(digest.clone()),
        ..Workload::default()
    };
    let fields = [
        "unit = \"docker-*.scope\"".into(),
        "uid = 1000".into(),
        "user = \"runner\"".into(),
        "group = \"docker\"".into(),
        "exe = \"/usr/bin/*\"".into(),
        format!("exe_sha256 = \"{}\"", digest.to_uppercase()),
        "cgroup = \"/system.slice\"".into(),
        format!("container = \"{}\"", &container),
        "comm = \"psql\"".into(),
    ];
    for field in fields {
        let text = format!(
            "[[target]]\nname = \"t\"\nprotocol = \"tcp\"\naddress = \"10.0.0.1:1\"\n[[workload]]\nname = \"w\"\n{field}\n[[rule]]\nname = \"r\"\nworkloads = [\"w\"]\ntargets = [\"t\"]\ndecision = \"allow\"\n"
        );
        let policy = Config::from_text("p.toml", &text).unwrap().policy;
        assert!(
            (evaluate(&policy, &full, TargetId(0)).action == Action::Allow),
            "{field} should match"
        );
        assert!(
            !(evaluate(&policy, &Workload::default(), TargetId(0)).action == Action::Allow),
            "{field} should not match an empty identity"
        );
    }
}

const SQL_POLICY: &str = r#"
[[target]]
name = "db"
protocol = "postgres"
address = "10.0.0.5:5432"
[target.credential]
user = "app"
password_file = "PASSWORD_FILE"

[[workload]]
name = "ci"
unit = "ci.service"

[[rule]]
name = "reads"
workloads = ["ci"]
targets = ["db"]
decision = "allow"
statements = ["select", "transaction"]
tables = ["public.*"]

[[rule]]
name = "event-writes"
workloads = ["ci"]
targets = ["db"]
decision = "allow"
statements = ["insert", "select"]
tables = ["public.events"]

[[rule]]
name = "no-deletes"
workloads = ["*"]
targets = ["db"]
decision = "deny"
statements = ["delete", "truncate"]
"#;

fn sql_policy() -> (Policy, tempfile::TempDir) {
    sql_policy_from(SQL_POLICY)
}

/// Loads an SQL policy whose `PASSWORD_FILE` is a fresh 0600 file (owned by
/// the test's user: these tests run as root, as the agent does).
fn sql_policy_from(text: &str) -> (Policy, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("pw");
    std::fs::write(&secret, "s3cret\n").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let text = text.replace("PASSWORD_FILE", &secret.display().to_string());
    (Config::from_text("sql.toml", &text).unwrap().policy, dir)
}

fn statement(kinds: &[StatementKind], tables: &[&str]) -> StatementInfo {
    StatementInfo {
        kinds: kinds.iter().copied().collect(),
        tables: tables.iter().map(|t| t.to_string()).collect(),
        parsed: true,
        ..StatementInfo::default()
    }
}

/// `enforce = false` puts a rule in rollout: what it decides, and the
/// default deny of the workload it allows on that target, is not applied;
/// other workloads, targets and rules are as before.
#[test]
fn rules_in_rollout_are_not_enforced_nor_the_default_deny_they_stand_for() {
    use StatementKind as K;
    let text = SQL_POLICY
        .replace(
            "name = \"event-writes\"",
            "name = \"event-writes\"\nenforce = false",
        )
        .replace(
            "name = \"no-deletes\"",
            "name = \"no-deletes\"\nenforce = false",
        );
    let (policy, _dir) = sql_policy_from(&text);
    let ci = Workload {
        unit: Some("ci.service".into()),
        ..Workload::default()
    };
    let other = Workload {
        unit: Some("other.service".into()),
        ..Workload::default()
    };
    let db = TargetId(0);
    let verdict = |workload: &Workload, info: &StatementInfo| {
        let verdict = evaluate_statement(&policy, workload, db, info);
        (verdict.action, policy.enforces(verdict.rule, workload, db))
    };
    // Decided by a rule in rollout: not applied.
    assert_eq!(
        verdict(&ci, &statement(&[K::Delete], &["public.events"])),
        (Action::Deny, false)
    );
    // The default deny, for a workload an allow rule in rollout is for.
    assert_eq!(
        verdict(&ci, &statement(&[K::Update], &["audit.log"])),
        (Action::Deny, false)
    );
    // An enforced rule decides as before.
    assert_eq!(
        verdict(&ci, &statement(&[K::Select], &["public.orders"])),
        (Action::Allow, true)
    );
    // Another workload's default deny is applied.
    assert_eq!(
        verdict(&other, &statement(&[K::Update], &["audit.log"])),
        (Action::Deny, true)
    );
}

/// `tables = []` on an allow rule is no table at all: `SELECT 1` and
/// `SHOW` pass, a SELECT of any table does not; on a deny rule it is
/// refused at load.
#[test]
fn an_empty_table_list_allows_only_statements_without_tables() {
    use StatementKind as K;
    let text = SQL_POLICY.replace(
        "statements = [\"insert\", \"select\"]\ntables = [\"public.events\"]",
        "statements = [\"select\", \"show\"]\ntables = []",
    );
    let (policy, _dir) = sql_policy_from(&text);
    let ci = Workload {
        unit: Some("ci.service".into()),
        ..Workload::default()
    };
    let db = TargetId(0);
    let rule = |info: &StatementInfo| {
        let verdict = evaluate_statement(&policy, &ci, db, info);
        (verdict.action, policy.rule_name(verdict.rule))
    };
    assert_eq!(
        rule(&statement(&[K::Show], &[])),
        (Action::Allow, Some("event-writes"))
    );
    // `reads` (public.*) comes first for a select of public.orders; one of
    // another schema is covered by neither.
    assert_eq!(
        rule(&statement(&[K::Select], &["audit.log"])),
        (Action::Deny, None)
    );
    let denied = SQL_POLICY.replace(
        "statements = [\"delete\", \"truncate\"]",
        "statements = [\"delete\", \"truncate\"]\ntables = []",
    );
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("pw");
    std::fs::write(&secret, "s3cret\n").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let error = Config::from_text(
        "sql.toml",
        &denied.replace("PASSWORD_FILE", &secret.display().to_string()),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("tables = [] (statements that touch no table) applies to allow rules"),
        "{error}"
    );
}

#[test]
fn statements_need_every_kind_and_table_allowed_and_any_deny_hits() {
    use StatementKind as K;
    let (policy, _dir) = sql_policy();
    let ci = Workload {
        unit: Some("ci.service".into()),
        ..Workload::default()
    };
    let db = TargetId(0);
    let cases = [
        (
            statement(&[K::Select], &["public.orders"]),
            Action::Allow,
            Some("reads"),
        ),
        (statement(&[K::Select], &["audit.log"]), Action::Deny, None),
        (
            statement(&[K::Insert], &["public.events"]),
            Action::Allow,
            Some("event-writes"),
        ),
        (
            statement(&[K::Insert], &["public.orders"]),
            Action::Deny,
            None,
        ),
        // A write hidden under a read needs the write allowed too.
        (
            statement(&[K::Select, K::Insert], &["public.events"]),
            Action::Allow,
            Some("event-writes"),
        ),
        (
            statement(&[K::Select, K::Update], &["public.orders"]),
            Action::Deny,
            None,
        ),
        // A deny about deletes catches a DELETE hidden in a CTE.
        (
            statement(&[K::Select, K::Delete], &["public.events"]),
            Action::Deny,
            Some("no-deletes"),
        ),
        (
            statement(&[K::Transaction], &[]),
            Action::Allow,
            Some("reads"),
        ),
        (StatementInfo::default(), Action::Deny, None),
    ];
    for (i, (info, action, rule)) in cases.into_iter().enumerate() {
        let verdict = evaluate_statement(&policy, &ci, db, &info);
        assert_eq!(
            (verdict.action, policy.rule_name(verdict.rule)),
            (action, rule),
            "case {i}: {verdict:?}"
        );
        assert!(!verdict.reason(&policy, &info).is_empty());
    }
    // An unparsed statement is denied... unless an allow rule waives that.
    let (waived, _dir) = sql_policy_from(
        &SQL_POLICY.replace("name = \"reads\"", "name = \"reads\"\nunparsed = \"allow\""),
    );
    let verdict = evaluate_statement(&waived, &ci, db, &StatementInfo::default());
    assert_eq!(
        (verdict.action, waived.rule_name(verdict.rule)),
        (Action::Allow, Some("reads"))
    );
    let other = evaluate_statement(&waived, &Workload::default(), db, &StatementInfo::default());
    assert_eq!(
        other.action,
        Action::Deny,
        "the waiver is the rule's, for its workloads only"
    );

    // Statement-level denies do not refuse the connection; allows admit it.
    assert_eq!(
        policy.rule_name(evaluate(&policy, &ci, db).rule),
        Some("reads")
    );
    assert!(!(evaluate(&policy, &Workload::default(), db).action == Action::Allow));
}

#[test]
fn approve_rules_sit_between_deny_and_allow() {
    use StatementKind as K;
    let text = format!(
        "{SQL_POLICY}{}",
        r#"
[[rule]]
name = "event-deletes-need-approval"
workloads = ["ci"]
targets = ["db"]
decision = "approve"
statements = ["delete", "insert"]
tables = ["public.events"]
approvers = ["alice", "group:oncall", "uid:1001", "webhook:*"]
min_approvals = 2
timeout = "90s"
grant = "30m"
"#
    );
    // A deny about deletes still wins over the approval.
    let (policy, _dir) = sql_policy_from(&text);
    let ci = Workload {
        unit: Some("ci.service".into()),
        ..Workload::default()
    };
    let db = TargetId(0);
    let delete = statement(&[K::Delete], &["public.events"]);
    assert_eq!(
        policy.rule_name(evaluate_statement(&policy, &ci, db, &delete).rule),
        Some("no-deletes")
    );
    // An insert the allow rule covers now needs approval first.
    let insert = statement(&[K::Insert], &["public.events"]);
    let verdict = evaluate_statement(&policy, &ci, db, &insert);
    assert_eq!(
        (verdict.action, policy.rule_name(verdict.rule)),
        (Action::Approve, Some("event-deletes-need-approval"))
    );
    assert!(verdict.reason(&policy, &insert).contains("needs approval"));
    // Reads are untouched.
    let read = statement(&[K::Select], &["public.events"]);
    assert_eq!(
        evaluate_statement(&policy, &ci, db, &read).action,
        Action::Allow
    );

    let spec = policy.rules[3].approval.as_ref().unwrap();
    assert_eq!(spec.min_approvals, 2);
    assert_eq!(spec.timeout, std::time::Duration::from_secs(90));
    assert_eq!(
        spec.grant,
        GrantSpec::For(std::time::Duration::from_secs(1800))
    );
    let names: Vec<String> = spec.approvers.iter().map(|a| a.to_string()).collect();
    assert_eq!(names, ["alice", "group:oncall", "uid:1001", "webhook:*"]);
    // Without statements, an approve rule asks for every statement, and
    // the connection is admitted to ask them.
    let every = text.replace(
        "statements = [\"delete\", \"insert\"]\ntables = [\"public.events\"]\n",
        "",
    );
    let (policy, _dir) = sql_policy_from(&every);
    assert_eq!(evaluate(&policy, &ci, db).action, Action::Approve);
    assert_eq!(
        evaluate_statement(&policy, &ci, db, &read).action,
        Action::Approve
    );
}

#[test]
fn secrets_are_never_printed() {
    let (policy, _dir) = sql_policy();
    let credential = policy.targets[0].credential.as_ref().unwrap();
    assert_eq!(credential.password.expose(), "s3cret");
    assert!(!format!("{policy:?}").contains("s3cret"));
}

const SSH_POLICY: &str = r#"
[[target]]
name = "app-1"
protocol = "ssh"
address = "10.0.0.7:22"
host_key_fingerprint = "SHA256:0123456789abcdefghijklmnopqrstuvwxyzABCDE"
[target.credential]
user = "deploy"
password_file = "PASSWORD_FILE"

[[workload]]
name = "ci-jobs"
unit = "gitlab-runner*.service"

[[rule]]
name = "ci-may-restart"
workloads = ["ci-jobs"]
targets = ["app-1"]
decision = "allow"
commands = ["systemctl restart app*", "journalctl -u app *"]
subsystems = ["sftp"]
forward = ["db.internal:5432"]
env = ["GIT_*"]
users = ["deploy"]

[[rule]]
name = "no-sudo"
workloads = ["*"]
targets = ["*"]
decision = "deny"
commands = ["** sudo **", "rm -rf *"]

[[rule]]
name = "shell-needs-oncall"
workloads = ["ci-jobs"]
targets = ["app-1"]
decision = "approve"
shell = true
approvers = ["uid:5001"]
"#;

#[test]
fn ssh_requests_follow_deny_approve_allow() {
    let (policy, _dir) = sql_policy_from(SSH_POLICY);
    let ci = workload(Some("gitlab-runner-7.service"), "/usr/bin/ssh", 999, &[]);
    let app = TargetId(0);
    let exec = |user: &str, line: &str| {
        let line = CommandLine::parse(line);
        evaluate_ssh(&policy, &ci, app, user, &SshRequest::Exec(&line))
    };
    let decided = |v: Verdict| (v.action, policy.rule_name(v.rule).map(str::to_owned));
    assert_eq!(
        decided(exec("deploy", "systemctl restart app-web")),
        (Action::Allow, Some("ci-may-restart".into()))
    );
    // Another SSH user: the allow rule does not apply.
    assert_eq!(
        decided(exec("root", "systemctl restart app")),
        (Action::Deny, None)
    );
    // Not among the patterns, compound, or caught by the deny rule.
    assert_eq!(
        decided(exec("deploy", "systemctl stop app")).0,
        Action::Deny
    );
    assert_eq!(
        decided(exec("deploy", "systemctl restart app; reboot")),
        (Action::Deny, None)
    );
    assert_eq!(
        decided(exec("deploy", "journalctl -u app && sudo reboot")),
        (Action::Deny, Some("no-sudo".into()))
    );
    // Commands inside shells and wrappers are decided each.
    assert_eq!(
        decided(exec(
            "deploy",
            "sh -c 'systemctl restart app-web && journalctl -u app'"
        )),
        (Action::Allow, Some("ci-may-restart".into()))
    );
    let hidden = exec("deploy", "bash -lc 'journalctl -u app; nohup rm -r -f /'");
    assert_eq!(hidden.action, Action::Deny);
    assert!(hidden.reason.contains("`rm -r -f /`"), "{}", hidden.reason);
    assert_eq!(
        decided(exec("deploy", "/usr/bin/sudo systemctl restart app")),
        (Action::Deny, Some("no-sudo".into()))
    );
    let unknowable = exec("deploy", "eval systemctl restart app");
    assert_eq!(decided(unknowable.clone()), (Action::Deny, None));
    assert!(
        unknowable.reason.contains("eval runs text"),
        "{}",
        unknowable.reason
    );
    let partly = exec("deploy", "systemctl restart app; reboot");
    assert!(
        partly.reason.contains("no rule allows `reboot`"),
        "{}",
        partly.reason
    );
    let shell = evaluate_ssh(&policy, &ci, app, "deploy", &SshRequest::Shell);
    assert_eq!(
        decided(shell),
        (Action::Approve, Some("shell-needs-oncall".into()))
    );
    let sftp = evaluate_ssh(&policy, &ci, app, "deploy", &SshRequest::Subsystem("sftp"));
    assert_eq!(sftp.action, Action::Allow);
    let forward = |host: &str, port: u16| {
        evaluate_ssh(
            &policy,
            &ci,
            app,
            "deploy",
            &SshRequest::Forward { host, port },
        )
        .action
    };
    assert_eq!(forward("db.internal", 5432), Action::Allow);
    assert_eq!(forward("db.internal", 22), Action::Deny);
    assert_eq!(forward("10.0.0.1", 5432), Action::Deny);
    assert!(ssh_env_allowed(&policy, &ci, app, "deploy", "LC_ALL"));
    assert!(ssh_env_allowed(&policy, &ci, app, "deploy", "GIT_PROTOCOL"));
    assert!(!ssh_env_allowed(&policy, &ci, app, "deploy", "LD_PRELOAD"));
    assert!(ssh_pty_allowed(&policy, &ci, app, "deploy"));
    // The connection itself is admitted: requests are decided one by one.
    assert_eq!(evaluate(&policy, &ci, app).action, Action::Allow);
}
