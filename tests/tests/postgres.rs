//! PostgreSQL through the agent: a real PostgreSQL 15, real `psql` and
//! `pgbench` in the workload cgroup, the password held by the agent only.
use interlock_e2e::*;

const SETUP: &str = "
    CREATE ROLE app LOGIN PASSWORD 'app-secret-1';
    CREATE TABLE orders (id int PRIMARY KEY, customer text, total numeric);
    INSERT INTO orders SELECT g, 'customer ' || g, g * 10 FROM generate_series(1, 100) g;
    CREATE TABLE events (id serial PRIMARY KEY, what text);
    GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON orders, events TO app;
    GRANT USAGE ON SEQUENCE events_id_seq TO app;
    GRANT CREATE ON SCHEMA public TO app;
";

fn policy(pg: &Postgres, secret: &std::path::Path) -> String {
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

[[workload]]
name = "ci-jobs"
unit = "ci-job.service"

[[rule]]
name = "ci-reads-orders"
workloads = ["ci-jobs"]
targets = ["orders-db"]
decision = "allow"
statements = ["select", "set", "show", "transaction"]
tables = ["public.*"]

[[rule]]
name = "ci-writes-events"
workloads = ["ci-jobs"]
targets = ["orders-db"]
decision = "allow"
statements = ["insert"]
tables = ["public.events"]

[[rule]]
name = "never-copy-to-programs"
workloads = ["*"]
targets = ["orders-db"]
decision = "deny"
statements = ["copy_program"]
"#,
        addr = pg.addr,
        secret = secret.display().to_string(),
    )
}

/// psql in the job's cgroup: no password anywhere (-w: never prompt), any
/// user name (the agent logs in as its own role).
fn psql(job: &std::path::Path, pg: &Postgres, sql: &str) -> std::process::Output {
    let script = sql.replace('\'', r"'\''");
    sh_in(
        job,
        &format!(
            "unset PGPASSWORD PGPASSFILE; exec psql -X -w -q -t -A -v ON_ERROR_STOP=0 -h {} -p {} -U someone -d postgres -c '{script}'",
            pg.addr.ip(),
            pg.addr.port()
        ),
    )
}

#[test]
fn statements_are_decided_and_the_password_stays_with_the_agent() {
    let pg = Postgres::start("stmts", "127.0.0.30");
    pg.admin_sql("postgres", SETUP);
    let secret = pg.password_file("app-secret-1");
    let mut cgroup = TestCgroup::new("pg-stmts");
    let (job, _) = cgroup.child("ci-job.service");
    let agent = Agent::start(&cgroup, "pg-stmts", &policy(&pg, &secret));

    // Allowed: a read. The client gave no password and asked for "someone".
    let out = psql(&job, &pg, "SELECT count(*), current_user FROM orders");
    assert!(out.status.success(), "{}\n{}", stderr(&out), agent.stderr());
    assert_eq!(stdout(&out), "100|app\n");

    // Denied, with SQLSTATE 42501 naming why; nothing ran.
    let denied = [
        ("DROP TABLE orders", "no rule allows drop on public.orders"),
        (
            "SELECT 1; DROP TABLE orders",
            "no rule allows drop on public.orders",
        ),
        (
            "/**/dRoP /* x */ TABLE orders",
            "no rule allows drop on public.orders",
        ),
        (
            "WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d",
            "no rule allows select+delete",
        ),
        (
            "COPY orders TO PROGRAM 'touch /tmp/interlock-pwned'",
            "never-copy-to-programs",
        ),
        (
            "DO $$ BEGIN DELETE FROM orders; END $$",
            "no rule allows delete+do on public.orders",
        ),
        (
            "INSERT INTO orders VALUES (1000, 'x', 1)",
            "no rule allows insert on public.orders",
        ),
        (
            "SELECT * FROM pg_catalog.pg_authid",
            "no rule allows select on pg_catalog.pg_authid",
        ),
    ];
    for (sql, why) in denied {
        let out = psql(&job, &pg, sql);
        let err = stderr(&out);
        assert!(
            err.contains("interlock: statement denied") && err.contains(why),
            "{sql}: {err}"
        );
        assert!(
            err.contains("42501") || err.contains("ERROR"),
            "{sql}: {err}"
        );
    }
    assert_eq!(
        pg.admin_sql("postgres", "SELECT count(*) FROM orders")
            .trim(),
        "100",
        "no denied statement ran"
    );
    assert!(!std::path::Path::new("/tmp/interlock-pwned").exists());

    // Allowed write where the policy says so.
    let out = psql(&job, &pg, "INSERT INTO events (what) VALUES ('deployed')");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        pg.admin_sql("postgres", "SELECT what FROM events").trim(),
        "deployed"
    );

    // Inside a transaction a denial fails the transaction, as the server
    // would: the next statement is refused with 25P02. (psql reading a
    // script sends each statement as its own Query.)
    let out = sh_in(
        &job,
        &format!(
            "printf 'BEGIN;\nSELECT 1;\nDROP TABLE orders;\nSELECT 2;\nROLLBACK;\n' | psql -X -w -q -h {} -p {} -U someone -d postgres",
            pg.addr.ip(),
            pg.addr.port()
        ),
    );
    let err = stderr(&out);
    assert!(err.contains("statement denied"), "{err}");
    assert!(
        err.contains("current transaction is aborted"),
        "transaction state must be E: {err}"
    );

    // A workload outside the job's unit is not even allowed to connect.
    let out = sh_in(
        &cgroup.dir,
        &format!(
            "exec psql -X -w -h {} -p {} -U x -d postgres -c 'SELECT 1'",
            pg.addr.ip(),
            pg.addr.port()
        ),
    );
    assert!(!out.status.success());

    // 11 sessions of the job (statements decided inside), 1 refused outright.
    let lines = agent.wait_access_lines(12);
    let allowed = lines.iter().filter(|l| l["decision"] == "allow").count();
    assert_eq!((lines.len(), allowed), (12, 11), "{lines:#?}");
    let denied_statements: u64 = lines
        .iter()
        .filter_map(|l| l["statements"]["denied"].as_u64())
        .sum();
    assert!(denied_statements >= 9, "{lines:#?}");
    // Statements are in the session record; the access log has none of
    // them unless `access_log_statements` asks (tests/masking.rs does).
    assert_eq!(agent.statement_lines().len(), 0);
    assert!(
        !agent.stderr().contains("app-secret-1"),
        "the secret never reaches a log"
    );
}

#[test]
fn extended_and_prepared_protocol_with_pgbench() {
    let (pg, cgroup, agent) = behind_agent(
        "pgbench",
        "127.0.0.31",
        &["select", "set", "show", "transaction"],
    );
    // pgbench's tables, created over the private socket as the superuser.
    let pgbench_init = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--", "sh", "-c"])
        .arg(format!(
            "pgbench -q -i -s 1 -h {} -p {} postgres 2>&1",
            pg.socket_dir().display(),
            pg.addr.port()
        ))
        .output()
        .unwrap();
    assert!(pgbench_init.status.success(), "{}", stdout(&pgbench_init));
    pg.admin_sql(
        "postgres",
        "GRANT SELECT ON ALL TABLES IN SCHEMA public TO app",
    );
    for mode in ["extended", "prepared"] {
        let out = cgroup.sh(&format!(
            "exec pgbench -n -S -c 2 -t 50 -M {mode} -h {} -p {} -U anyone postgres",
            pg.addr.ip(),
            pg.addr.port()
        ));
        assert!(
            out.status.success(),
            "pgbench -M {mode}: {}{}\n{}",
            stdout(&out),
            stderr(&out),
            agent.stderr()
        );
        assert!(
            stdout(&out).contains("number of transactions actually processed: 100/100"),
            "{}",
            stdout(&out)
        );
    }
    // A write through the extended protocol is refused and runs nowhere.
    let script = std::env::temp_dir().join(format!("interlock-pgbench-{}.sql", std::process::id()));
    std::fs::write(&script, "DELETE FROM pgbench_accounts WHERE aid = 1;\n").unwrap();
    let out = cgroup.sh(&format!(
        "exec pgbench -n -t 1 -M extended -f {} -h {} -p {} -U anyone postgres",
        script.display(),
        pg.addr.ip(),
        pg.addr.port()
    ));
    let _ = std::fs::remove_file(&script);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("statement denied"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        pg.admin_sql(
            "postgres",
            "SELECT count(*) FROM pgbench_accounts WHERE aid = 1"
        )
        .trim(),
        "1"
    );

    // A client that sends Parse and Flush, and waits for the answer before
    // its Sync, gets the denial at once; the session then goes on.
    let out = pgwire(
        &cgroup.dir,
        pg.addr,
        "parse-flush",
        "DELETE FROM pgbench_accounts WHERE aid = 2",
    );
    assert_eq!(
        stdout(&out).lines().collect::<Vec<_>>()[..],
        [
            "answer E",
            "ERROR 42501 interlock: statement denied: no rule allows delete on public.pgbench_accounts (target \"db\")",
            "ready",
            "42"
        ][..],
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
}

#[test]
fn cancel_reaches_the_server_and_upstream_down_is_a_clear_error() {
    let (pg, cgroup, agent) = behind_agent("cancel", "127.0.0.32", &["select"]);
    // psql cancels the running query on SIGINT (Ctrl-C) through a new
    // connection carrying the cancel key: through the agent too.
    let started = std::time::Instant::now();
    let out = cgroup.sh(&format!(
        "psql -X -w -h {} -p {} -U x -d postgres -c 'SELECT pg_sleep(30)' & pid=$!; sleep 1; kill -INT $pid; wait $pid",
        pg.addr.ip(),
        pg.addr.port()
    ));
    assert!(
        stderr(&out).contains("canceling statement due to user request"),
        "{}\n{}",
        stderr(&out),
        agent.stderr()
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "the sleep was cancelled, not waited out"
    );

    // The server goes away: the client is told in its own protocol.
    let addr = pg.addr;
    drop(pg);
    let out = cgroup.sh(&format!(
        "exec psql -X -w -h {} -p {} -U x -d postgres -c 'SELECT 1'",
        addr.ip(),
        addr.port()
    ));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("interlock: cannot reach target \"db\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn tls_clients_and_a_malformed_startup() {
    let (pg, cgroup, agent) = behind_agent("tls", "127.0.0.33", &["select"]);
    // The CA a host would trust, printed by the CLI.
    let ca = agent.cli(&["ca", "print"]);
    assert!(ca.status.success(), "{}", stderr(&ca));
    let ca_file = agent.workdir.join("ca.pem");
    std::fs::write(&ca_file, &ca.stdout).unwrap();

    for sslmode in [
        "require".to_owned(),
        format!("verify-full sslrootcert={}", ca_file.display()),
    ] {
        let out = cgroup.sh(&format!(
            "exec psql -X -w -t -A \"host={} port={} user=x dbname=postgres sslmode={sslmode}\" -c 'SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()'",
            pg.addr.ip(),
            pg.addr.port()
        ));
        // The client's TLS ends at the agent; upstream is plain on loopback.
        assert!(
            out.status.success(),
            "sslmode={sslmode}: {}\n{}",
            stderr(&out),
            agent.stderr()
        );
        assert_eq!(stdout(&out), "f\n", "sslmode={sslmode}");
    }

    // Garbage instead of a startup packet: a FATAL error naming the
    // problem, and the agent carries on.
    let script = format!(
        "import socket; s = socket.create_connection((\"{}\", {})); s.sendall(bytes([0, 0, 0, 12, 0, 9, 9, 9, 1, 2, 3, 4])); print(s.recv(4096))",
        pg.addr.ip(),
        pg.addr.port()
    );
    let out = cgroup.sh(&format!("exec /usr/bin/python3 -c '{script}'"));
    let reply = stdout(&out);
    assert!(
        reply.contains("SFATAL")
            && reply.contains("08P01")
            && reply.contains("unsupported protocol"),
        "{reply}"
    );
    let out = cgroup.sh(&format!(
        "exec psql -X -w -h {} -p {} -U x -d postgres -c 'SELECT 1'",
        pg.addr.ip(),
        pg.addr.port()
    ));
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A cluster of the test's own with a role `app` whose password only the
/// agent holds, and an agent whose one rule lets any workload run
/// `statements` on it (and call `pg_sleep`, which the cancel test runs).
fn behind_agent(name: &str, ip: &str, statements: &[&str]) -> (Postgres, TestCgroup, Agent) {
    let pg = Postgres::start(name, ip);
    let password = format!("{name}-secret");
    pg.admin_sql(
        "postgres",
        &format!("CREATE ROLE app LOGIN PASSWORD '{password}'"),
    );
    let secret = pg.password_file(&password);
    let cgroup = TestCgroup::new(&format!("pg-{name}"));
    let statements: Vec<String> = statements.iter().map(|s| format!("{s:?}")).collect();
    let agent = Agent::start(
        &cgroup,
        &format!("pg-{name}"),
        &format!(
            "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = \"{}\"\ntls = \"disable\"\n\
             [target.credential]\nuser = \"app\"\npassword_file = {:?}\n\
             [[rule]]\nname = \"reads\"\nworkloads = [\"*\"]\ntargets = [\"db\"]\ndecision = \"allow\"\n\
             statements = [{}]\nfunctions = [\"pg_catalog.pg_sleep\"]\n",
            pg.addr,
            secret.display().to_string(),
            statements.join(", ")
        ),
    );
    (pg, cgroup, agent)
}

#[test]
fn upstream_tls_is_verified_against_the_targets_ca() {
    let pg = Postgres::start_with("up-tls", "127.0.0.34", true);
    pg.admin_sql("postgres", "CREATE ROLE app LOGIN PASSWORD 'up-tls-secret'");
    let secret = pg.password_file("up-tls-secret");
    let cgroup = TestCgroup::new("pg-up-tls");
    let policy = |tls: &str, ca: &std::path::Path| {
        format!(
            "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = \"{}\"\ntls = \"{tls}\"\ntls_ca_file = {:?}\n\
             [target.credential]\nuser = \"app\"\npassword_file = {:?}\n\
             [[rule]]\nname = \"reads\"\nworkloads = [\"*\"]\ntargets = [\"db\"]\ndecision = \"allow\"\nstatements = [\"select\"]\n",
            pg.addr,
            ca.display().to_string(),
            secret.display().to_string()
        )
    };
    let agent = Agent::start(&cgroup, "pg-up-tls", &policy("verify-full", &pg.ca_file()));
    let ssl_in_use = || {
        cgroup.sh(&format!(
            "exec psql -X -w -t -A -h {} -p {} -U x -d postgres -c 'SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()'",
            pg.addr.ip(),
            pg.addr.port()
        ))
    };
    // The client speaks plain (sslmode=prefer against an agent that offers
    // TLS would pick TLS; here the point is the upstream leg): the server
    // sees an encrypted connection from the agent.
    let out = ssl_in_use();
    assert!(out.status.success(), "{}\n{}", stderr(&out), agent.stderr());
    assert_eq!(
        stdout(&out),
        "t\n",
        "the agent's upstream connection uses TLS"
    );

    // A CA that did not sign the server's certificate: refused, clearly.
    let wrong_ca = agent.workdir.join("state/ca/ca.pem");
    agent.write_policy(&policy("verify-full", &wrong_ca));
    assert!(agent.cli(&["reload"]).status.success());
    let out = ssl_in_use();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot secure the connection to target \"db\""),
        "{}",
        stderr(&out)
    );

    // `require` encrypts without checking who answers.
    agent.write_policy(&policy("require", &wrong_ca));
    assert!(agent.cli(&["reload"]).status.success());
    let out = ssl_in_use();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "t\n");
}

#[test]
fn as_user_gives_the_session_the_rules_role() {
    let pg = Postgres::start("as-user", "127.0.0.35");
    pg.admin_sql(
        "postgres",
        "CREATE ROLE app LOGIN PASSWORD 'as-user-secret'; CREATE ROLE reader NOLOGIN; GRANT reader TO app;",
    );
    let secret = pg.password_file("as-user-secret");
    let cgroup = TestCgroup::new("pg-as-user");
    let agent = Agent::start(
        &cgroup,
        "pg-as-user",
        &format!(
            "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = \"{}\"\ntls = \"disable\"\n\
             [target.credential]\nuser = \"app\"\npassword_file = {:?}\n\
             [[rule]]\nname = \"read-as-reader\"\nworkloads = [\"*\"]\ntargets = [\"db\"]\ndecision = \"allow\"\n\
             as_user = \"reader\"\nstatements = [\"select\", \"set\", \"reset\"]\n",
            pg.addr,
            secret.display().to_string()
        ),
    );
    let psql = |sql: &str| {
        cgroup.sh(&format!(
            "exec psql -X -w -t -A -h {} -p {} -U x -d postgres -c '{sql}'",
            pg.addr.ip(),
            pg.addr.port()
        ))
    };
    let out = psql("SELECT current_user, session_user");
    assert!(out.status.success(), "{}\n{}", stderr(&out), agent.stderr());
    assert_eq!(
        stdout(&out),
        "reader|app\n",
        "the rule's role, on the held login"
    );
    // The role cannot be shed: RESET ROLE is not an ordinary reset.
    let out = psql("RESET ROLE");
    assert!(
        stderr(&out).contains("statement denied"),
        "{}",
        stderr(&out)
    );
    // A pool's DISCARD ALL is a reset: the agent sets the role again right
    // after it, before the client's next statement.
    let out = cgroup.sh(&format!(
        "printf 'DISCARD ALL;\nSELECT current_user;\n' | psql -X -w -q -t -A -h {} -p {} -U x -d postgres",
        pg.addr.ip(),
        pg.addr.port()
    ));
    assert_eq!(
        stdout(&out),
        "reader\n",
        "{}\n{}",
        stderr(&out),
        agent.stderr()
    );
}

#[test]
fn copy_in_and_out_and_notifications_pass_through() {
    let (pg, cgroup, agent) = behind_agent(
        "copy",
        "127.0.0.36",
        &[
            "select",
            "copy_from",
            "copy_to",
            "listen",
            "notify",
            "transaction",
        ],
    );
    pg.admin_sql(
        "postgres",
        "CREATE TABLE items (id int, name text); GRANT SELECT, INSERT ON items TO app",
    );
    let psql = |script: &str| {
        cgroup.sh(&format!(
            "printf '{script}' | psql -X -w -q -t -A -h {} -p {} -U x -d postgres",
            pg.addr.ip(),
            pg.addr.port()
        ))
    };
    // COPY FROM STDIN: the rows flow client → server through the agent.
    let out = psql("\\\\copy items FROM STDIN\\n1\\tone\\n2\\ttwo\\n\\\\.\\n");
    assert!(out.status.success(), "{}\n{}", stderr(&out), agent.stderr());
    assert_eq!(
        pg.admin_sql("postgres", "SELECT count(*) FROM items")
            .trim(),
        "2"
    );
    // COPY TO STDOUT: server → client.
    let out = psql("COPY items TO STDOUT WITH (FORMAT csv);\\n");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "1,one\n2,two\n");
    // LISTEN/NOTIFY: the notification reaches the listening client.
    let out = psql("LISTEN jobs;\\nNOTIFY jobs;\\nSELECT 1;\\n");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("Asynchronous notification \"jobs\" received"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
}
