//! Learning a policy from what jobs did: a realistic job mix runs through
//! the agent in audit mode against a real PostgreSQL and a real OpenSSH
//! server (an application reading and writing two tables, a migration,
//! `pg_dump`, an `ssh` deploy running a fixed script with varying
//! arguments); `interlock policy suggest` turns the sessions into rules;
//! `policy check --against-sessions` finds nothing the rules would refuse,
//! then exactly the outliers run afterwards; enforced, the same jobs pass
//! again (with other values) and the outliers are refused, the database and
//! the server unchanged by them.
use std::{fs, path::Path};

use interlock_e2e::*;

const HOST: &str = "127.0.0.90";
const PG_IP: &str = "127.0.0.91";

const SETUP: &str = "
    CREATE ROLE app LOGIN PASSWORD 'learn-secret';
    CREATE TABLE orders (id serial PRIMARY KEY, customer int, status text);
    CREATE TABLE customers (id int PRIMARY KEY, name text);
    CREATE TABLE audit_log (id int, line text);
    INSERT INTO customers VALUES (1, 'Ann'), (2, 'Bob');
    INSERT INTO orders (customer, status) VALUES (1, 'new'), (2, 'new');
    GRANT ALL ON ALL TABLES IN SCHEMA public TO app;
    GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO app;
    GRANT CREATE ON SCHEMA public TO app;
";

/// Targets and the job's workload: no rules (what audit mode learns from).
fn targets(pg: &Postgres, secret: &Path, sshd: &Sshd, known_hosts: &Path) -> String {
    format!(
        r#"
[[target]]
name = "orders-db"
protocol = "postgres"
address = "{addr}"
tls = "disable"
[target.credential]
user = "app"
password_file = {secret:?}

[[target]]
name = "deploy-host"
protocol = "ssh"
address = "{HOST}:22"
known_hosts = {known_hosts:?}
[target.credential]
user = "{SSH_USER}"
private_key_file = {key:?}

[[workload]]
name = "ci-jobs"
unit = "ci-job.service"
"#,
        addr = pg.addr,
        key = sshd.client_key(),
    )
}

#[test]
fn a_learned_policy_lets_the_jobs_run_and_refuses_the_rest() {
    let pg = Postgres::start("learn", PG_IP);
    pg.admin_sql("postgres", SETUP);
    let secret = pg.password_file("learn-secret");
    let sshd = Sshd::start("learn", &[HOST]);
    let known_hosts = sshd.known_hosts(&[HOST]);
    let mut cgroup = TestCgroup::new("learn");
    let (job, _) = cgroup.child("ci-job.service");
    let targets = targets(&pg, &secret, &sshd, &known_hosts);
    let agent = Agent::start_with(&cgroup, "learn", "mode = \"audit\"\n", &targets);
    let ssh_config = ssh_client_config(&agent);

    // The deploy script on the server, and a file only an outlier touches.
    let scratch = std::env::temp_dir().join(format!("interlock-learn-{}", std::process::id()));
    fs::create_dir_all(&scratch).unwrap();
    let deploy = scratch.join("deploy.sh");
    fs::write(&deploy, "#!/bin/sh\necho \"deployed $1 to $3\"\n").unwrap();
    fs::set_permissions(&deploy, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let keep = scratch.join("keep");
    fs::write(&keep, "still here\n").unwrap();
    fs::set_permissions(
        &scratch,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();

    let psql = |sql: &str| {
        let script = agent.workdir.join("job.sql");
        fs::write(&script, sql).unwrap();
        sh_in(
            &job,
            &format!(
                "exec psql -X -w -q -t -A -v ON_ERROR_STOP=1 -h {} -p {} -U x -d postgres -f {}",
                pg.addr.ip(),
                pg.addr.port(),
                script.display()
            ),
        )
    };
    let ssh = |line: &str| {
        let quoted = line.replace('\'', r"'\''");
        sh_in(
            &job,
            &format!("exec ssh -F {} {HOST} '{quoted}'", ssh_config.display()),
        )
    };
    // The job mix, with values that vary from run to run.
    let jobs = |run: u32| {
        let app = format!(
            "BEGIN;\n\
             SELECT status FROM orders WHERE id = {run};\n\
             SELECT name FROM customers WHERE id = {run};\n\
             INSERT INTO orders (customer, status) VALUES ({run}, 'new');\n\
             UPDATE orders SET status = 'paid' WHERE id = {run};\n\
             COMMIT;\n"
        );
        let out = psql(&app);
        assert!(out.status.success(), "app run {run}: {}", stderr(&out));
        let migration = "CREATE TABLE IF NOT EXISTS shipments (id int, order_id int);\n\
                         CREATE INDEX IF NOT EXISTS shipments_order ON shipments (order_id);\n";
        let out = psql(migration);
        assert!(
            out.status.success(),
            "migration run {run}: {}",
            stderr(&out)
        );
        let out = sh_in(
            &job,
            &format!(
                "exec pg_dump -w -h {} -p {} -U x -d postgres -f /dev/null",
                pg.addr.ip(),
                pg.addr.port()
            ),
        );
        assert!(out.status.success(), "pg_dump run {run}: {}", stderr(&out));
        let version = format!("v1.{run}.0");
        let out = ssh(&format!("{} {version} --env staging", deploy.display()));
        assert!(out.status.success(), "deploy run {run}: {}", stderr(&out));
        assert_eq!(stdout(&out), format!("deployed {version} to staging\n"));
    };
    for run in 1..=3 {
        jobs(run);
    }

    // Suggested from those sessions.
    let out = agent.cli(&["policy", "suggest"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let learned = stdout(&out);
    let learned_file = agent.workdir.join("learned.toml");
    fs::write(&learned_file, &learned).unwrap();
    for expected in [
        "targets = [\"orders-db\"]",
        "statements = [\"select\"]",
        "\"public.orders\"",
        "statements = [\"insert\"]",
        "statements = [\"update\"]",
        "statements = [\"create\"]",
        "tables = []",
        &format!(
            "commands = [\"{}/deploy.sh * --env staging\"]",
            scratch.display()
        ),
        "# e.g. SELECT status FROM orders WHERE id = $1",
        "# seen 3 times",
        "in 3 sessions",
    ] {
        assert!(learned.contains(expected), "no {expected:?} in:\n{learned}");
    }
    assert!(!learned.contains("\"delete\""), "{learned}");
    // The same sessions, the same suggestion.
    assert_eq!(stdout(&agent.cli(&["policy", "suggest"])), learned);

    // The candidate loads, and would have refused none of what it came from.
    let config = agent.workdir.join("interlock.toml");
    let (config, rules) = (config.to_str().unwrap(), learned_file.to_str().unwrap());
    let out = agent.cli(&["policy", "check", config, "--rules", rules]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let out = agent.cli(&[
        "policy",
        "check",
        config,
        "--rules",
        rules,
        "--against-sessions",
    ]);
    assert!(
        out.status.success(),
        "{}{}\n{learned}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).contains(": 0 would be refused"),
        "{}",
        stdout(&out)
    );

    // Outliers, still in audit mode: they go through, and the replay
    // finds exactly them.
    let out = psql("SELECT count(*) FROM audit_log;\n");
    assert!(out.status.success(), "{}", stderr(&out));
    let out = ssh(&format!("cat {}", keep.display()));
    assert!(out.status.success(), "{}", stderr(&out));
    let out = agent.cli(&[
        "policy",
        "check",
        config,
        "--rules",
        rules,
        "--against-sessions",
        "--json",
    ]);
    assert!(!out.status.success(), "outliers were not found");
    let replayed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let refused: Vec<String> = replayed["would_deny"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        refused,
        [
            "SELECT count(*) FROM audit_log".to_owned(),
            format!("cat {}", keep.display())
        ],
        "{replayed}"
    );

    // Rolled out first: the agent enforces, the learned rules do not yet.
    // The jobs pass; an outlier passes too, recorded as what the rules
    // would refuse.
    let out = agent.cli(&["policy", "suggest", "--rollout"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rollout = stdout(&out);
    assert_eq!(
        rollout.matches("enforce = false\n").count(),
        learned.matches("[[rule]]").count()
    );
    fs::write(agent.workdir.join("settings"), "").unwrap();
    agent.write_policy(&format!("{targets}\n{rollout}"));
    let out = agent.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    jobs(4);
    // (Learned since: the audit-mode outliers above. Not this.)
    let out = psql("DELETE FROM audit_log WHERE id = 42;\n");
    assert!(out.status.success(), "in rollout: {}", stderr(&out));
    let would_refuse = agent
        .session_events()
        .into_iter()
        .find(|e| e["kind"] == "statement" && e["text"].as_str().unwrap_or("").contains("id = 42"))
        .expect("the outlier is recorded");
    assert_eq!(
        (&would_refuse["decision"], &would_refuse["enforced"]),
        (&serde_json::json!("deny"), &serde_json::json!(false)),
        "{would_refuse}"
    );

    // Enforced: the learned rules are the policy.
    agent.write_policy(&format!("{targets}\n{learned}"));
    let out = agent.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The jobs pass again, with other values.
    jobs(5);
    // What was never seen is refused, and changes nothing.
    let orders_before = pg.admin_sql("postgres", "SELECT count(*) FROM orders");
    let out = psql("DELETE FROM orders;\n");
    assert!(!out.status.success(), "a DELETE went through");
    assert!(stderr(&out).contains("denied"), "{}", stderr(&out));
    let out = psql("SELECT * FROM audit_log;\n");
    assert!(!out.status.success(), "an unseen table was read");
    assert_eq!(
        pg.admin_sql("postgres", "SELECT count(*) FROM orders"),
        orders_before
    );
    let out = ssh(&format!("rm -f {}", keep.display()));
    assert!(!out.status.success(), "an unseen command ran");
    let out = ssh(&format!("{} v9.9.9 --env production", deploy.display()));
    assert!(!out.status.success(), "a deploy to production ran");
    assert_eq!(fs::read_to_string(&keep).unwrap(), "still here\n");

    // Against the policy now live: each learned rule was used.
    let out = agent.cli(&["policy", "suggest", "--policy", config]);
    assert!(out.status.success(), "{}", stderr(&out));
    let compared = stdout(&out);
    assert!(
        compared.contains("# Against the current policy"),
        "{compared}"
    );
    assert!(
        compared.contains("#   rule \"ci-jobs-orders-db-update\" allowed "),
        "{compared}"
    );
    let _ = fs::remove_dir_all(&scratch);
}
