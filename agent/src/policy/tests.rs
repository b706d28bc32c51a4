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
        assert_eq!(verdict.rule.as_deref(), rule, "case {i}: {verdict:?}");
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
    assert!(evaluate(&policy, &w, TargetId(0)).allowed());
    w.uid = 0;
    assert!(
        !evaluate(&policy, &w, TargetId(0)).allowed(),
        "uid must also match"
    );
    w.uid = 1000;
    w.comm = "bash".into();
    assert!(
        !evaluate(&policy, &w, TargetId(0)).allowed(),
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
            evaluate(&policy, &full, TargetId(0)).allowed(),
            "{field} should match"
        );
        assert!(
            !evaluate(&policy, &Workload::default(), TargetId(0)).allowed(),
            "{field} should not match an empty identity"
        );
    }
}
