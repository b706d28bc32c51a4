//! PostgreSQL policy means what PostgreSQL does: a workload with a
//! select-only policy on `public` tries every way around it that a real
//! server would allow (the role holds the privileges: only the agent stands
//! in the way). Each attempt is a row: the statement, what the server would
//! have done, what the agent must say; afterwards the database is checked
//! (nothing changed, nothing leaked) and the session record (the attempt is
//! there, with its text, denied).
use std::collections::HashMap;

use interlock_e2e::*;
use serde_json::Value;

const SETUP: &str = "
    CREATE ROLE app LOGIN PASSWORD 'policy-secret';
    CREATE TABLE customers (id int, email text, name text);
    INSERT INTO customers VALUES (1, 'ann@example.com', 'Ann');
    CREATE TABLE notes (id int, body text);
    INSERT INTO notes VALUES (1, 'keep me');
    CREATE SCHEMA private;
    CREATE TABLE private.secrets (id int, value text);
    INSERT INTO private.secrets VALUES (1, 'top-secret-value');
    CREATE FUNCTION wipe_notes() RETURNS bigint LANGUAGE sql
        AS 'WITH d AS (DELETE FROM public.notes RETURNING 1) SELECT count(*) FROM d';
    CREATE SEQUENCE counter;
    CREATE ROLE admin_role NOLOGIN;
    GRANT admin_role TO app;
    GRANT ALL ON ALL TABLES IN SCHEMA public TO app;
    GRANT CREATE ON SCHEMA public TO app;
    GRANT ALL ON SEQUENCE counter TO app;
    GRANT USAGE ON SCHEMA private TO app;
    GRANT ALL ON private.secrets TO app;
    GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_file(text) TO app;
";

fn policy(pg: &Postgres, secret: &std::path::Path) -> String {
    format!(
        r#"
[[target]]
name = "db"
protocol = "postgres"
address = "{addr}"
tls = "disable"
[target.credential]
user = "app"
password_file = {secret:?}

[[rule]]
name = "private-never"
workloads = ["*"]
targets = ["db"]
decision = "deny"
tables = ["private.*"]

[[rule]]
name = "no-activity"
workloads = ["*"]
targets = ["db"]
decision = "deny"
tables = ["pg_catalog.pg_stat_activity"]

[[rule]]
name = "reads"
workloads = ["*"]
targets = ["db"]
decision = "allow"
statements = ["select", "set", "show", "transaction", "reset", "copy_to", "copy_from"]
tables = ["public.*", "pg_catalog.*"]
"#,
        addr = pg.addr,
        secret = secret.display().to_string(),
    )
}

struct Attempt {
    /// What the workload sends (one psql -c: one simple Query).
    sql: String,
    /// What PostgreSQL alone would have done.
    server_would: &'static str,
    /// A piece of the agent's error.
    refusal: &'static str,
    /// A piece of the recorded statement text.
    recorded: String,
}

fn attempt(sql: &str, server_would: &'static str, refusal: &'static str) -> Attempt {
    Attempt {
        sql: sql.to_owned(),
        server_would,
        refusal,
        recorded: sql.chars().take(40).collect(),
    }
}

#[test]
fn bypass_attempts_are_refused_and_nothing_changes() {
    let pg = Postgres::start("policy", "127.0.0.60");
    pg.admin_sql("postgres", SETUP);
    let secret = pg.password_file("policy-secret");
    let cgroup = TestCgroup::new("pg-policy");
    let agent = Agent::start(&cgroup, "pg-policy", &policy(&pg, &secret));
    // Statements go in a file (psql -f: one Query per statement), since
    // some are larger than a command line may be.
    let script = agent.workdir.join("attempt.sql");
    let psql = |sql: &str| {
        std::fs::write(&script, format!("{sql};\n")).unwrap();
        cgroup.sh(&format!(
            "exec psql -X -w -q -t -A -h {} -p {} -U x -d postgres -f {}",
            pg.addr.ip(),
            pg.addr.port(),
            script.display()
        ))
    };

    // What the policy does allow works, catalog introspection included.
    let out = psql("SELECT name FROM customers");
    assert_eq!(
        stdout(&out),
        "Ann\n",
        "{}\n{}",
        stderr(&out),
        agent.stderr()
    );
    let out = psql("SELECT count(*) > 0 FROM pg_class WHERE relname = lower('CUSTOMERS')");
    assert_eq!(stdout(&out), "t\n", "{}", stderr(&out));

    let chain = format!("SELECT {}1", "1+".repeat(200_000));
    let deep = format!("SELECT {}1{}", "(".repeat(100_000), ")".repeat(100_000));
    let huge = format!("SELECT '{}'", "x".repeat(2 * 1024 * 1024));
    let attempts = [
        attempt(
            "SELECT wipe_notes()",
            "deletes every note",
            "public.wipe_notes",
        ),
        attempt(
            "SELECT lo_create(0)",
            "creates a large object",
            "pg_catalog.lo_create",
        ),
        attempt(
            "SELECT nextval('counter')",
            "advances the sequence",
            "pg_catalog.nextval",
        ),
        attempt(
            "SELECT pg_advisory_lock(42)",
            "takes a lock",
            "pg_catalog.pg_advisory_lock",
        ),
        attempt(
            "SELECT query_to_xml('select value from private.secrets', true, false, '')",
            "returns the secret",
            "pg_catalog.query_to_xml",
        ),
        attempt(
            "SELECT pg_read_file('/etc/hostname')",
            "reads a server file",
            "pg_catalog.pg_read_file",
        ),
        // Two statements: the path change is followed, the read refused.
        Attempt {
            recorded: "SELECT value FROM secrets".into(),
            ..attempt(
                "SELECT set_config('search_path', 'private', false); SELECT value FROM secrets",
                "returns the secret",
                "private.secrets",
            )
        },
        Attempt {
            recorded: "SELECT value FROM secrets".into(),
            ..attempt(
                "SET search_path = private; SELECT value FROM secrets",
                "returns the secret",
                "private.secrets",
            )
        },
        attempt(
            "SELECT set_config('role', 'admin_role', false)",
            "changes the role",
            "role is pinned",
        ),
        attempt("SET ROLE admin_role", "changes the role", "role is pinned"),
        attempt(
            "SELECT set_config(name, 'private', false) FROM (SELECT 'search_path' AS name) s",
            "changes the search path",
            "computed at run time",
        ),
        attempt(
            "COPY private.secrets TO STDOUT",
            "returns the secret",
            "private-never",
        ),
        attempt(
            "COPY (SELECT value FROM private.secrets) TO STDOUT",
            "returns the secret",
            "private-never",
        ),
        attempt(
            "COPY private.secrets FROM STDIN",
            "takes rows in",
            "private-never",
        ),
        attempt(
            "SELECT * FROM pg_stat_activity",
            "lists sessions",
            "pg_catalog.pg_stat_activity",
        ),
        attempt(
            "DELETE FROM notes",
            "deletes every note",
            "no rule allows delete",
        ),
        attempt(
            "WITH notes AS (SELECT 1) DELETE FROM notes",
            "deletes every note",
            "no rule allows select+delete on public.notes",
        ),
        attempt(
            "DO $$ BEGIN DELETE FROM notes; END $$",
            "deletes every note",
            "delete+do on public.notes",
        ),
        attempt(
            "DO $$ BEGIN EXECUTE 'DELETE FROM ' || 'notes'; END $$",
            "deletes every note",
            "built at run time",
        ),
        Attempt {
            recorded: "SELECT 1+1+1+1".into(),
            ..attempt(&chain, "computes a sum", "nested too deeply")
        },
        Attempt {
            recorded: "SELECT ((((".into(),
            ..attempt(&deep, "fails deep in its parser", "nested too deeply")
        },
        Attempt {
            recorded: "over the size limit".into(),
            ..attempt(&huge, "returns 2 MB", "over the agent's limit")
        },
    ];
    for attempt in &attempts {
        let out = psql(&attempt.sql);
        let err = stderr(&out);
        let short: String = attempt.sql.chars().take(60).collect();
        assert!(
            err.contains("interlock: statement denied") && err.contains(attempt.refusal),
            "{short} (the server alone {}): {err}\n{}",
            attempt.server_would,
            agent.stderr()
        );
        assert!(
            !stdout(&out).contains("top-secret-value"),
            "{short} leaked the secret"
        );
    }
    // The size limit answers in PostgreSQL's own terms; long, deep and huge
    // statements are refused in the extended protocol too, and the
    // session goes on.
    let out = pgwire(&cgroup.dir, pg.addr, "simple-tags", "@bytes:1100000");
    assert!(
        stdout(&out).contains("ERROR 54000"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    for (statement, code) in [
        ("@chain:200000", "42501"),
        ("@deep:100000", "42501"),
        ("@bytes:1100000", "54000"),
    ] {
        let out = pgwire(&cgroup.dir, pg.addr, "extended-tags", statement);
        let printed = stdout(&out);
        assert!(
            printed.contains(&format!("ERROR {code}")) && printed.trim_end().ends_with("42"),
            "{statement}: {printed}{}",
            stderr(&out)
        );
    }

    // Nothing changed on the server.
    let check = |sql: &str| pg.admin_sql("postgres", sql).trim().to_owned();
    assert_eq!(check("SELECT count(*) FROM notes"), "1");
    assert_eq!(check("SELECT count(*) FROM private.secrets"), "1");
    assert_eq!(check("SELECT count(*) FROM pg_largeobject_metadata"), "0");
    assert_eq!(check("SELECT is_called FROM counter"), "f");

    // Every attempt is in the record, with its text, denied.
    let recorded = statements(&agent);
    for attempt in &attempts {
        assert!(
            recorded
                .iter()
                .any(|(text, decision)| text.contains(&attempt.recorded) && decision == "deny"),
            "{:?} not recorded as denied: {recorded:?}",
            attempt.recorded
        );
    }

    // The agent kept serving: a parse that takes the parser a while runs
    // beside other clients (printed, not asserted: the figure is the
    // machine's), and an empty statement gets PostgreSQL's own answer.
    let out = pgwire(&cgroup.dir, pg.addr, "beside-large", "1000000");
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    eprintln!(
        "a 1 MB statement beside 20 SELECT 1 on another connection: {}",
        stdout(&out).replace('\n', ", ")
    );
    for mode in ["simple-tags", "extended-tags"] {
        for empty in ["", "  ;  -- nothing"] {
            let out = pgwire(&cgroup.dir, pg.addr, mode, empty);
            let printed = stdout(&out);
            let lines: Vec<&str> = printed.lines().map(str::trim).collect();
            let expected = if mode == "simple-tags" { "IZ" } else { "12IZ" };
            assert_eq!(
                lines,
                [expected, "42"],
                "{mode} {empty:?}: {}{}",
                stdout(&out),
                stderr(&out)
            );
        }
    }
    assert!(agent.pid().is_some(), "the agent is still running");
}

#[test]
fn the_tools_people_run_are_understood() {
    let pg = Postgres::start("policy-tools", "127.0.0.61");
    pg.admin_sql("postgres", SETUP);
    let secret = pg.password_file("policy-secret");
    let cgroup = TestCgroup::new("pg-policy-tools");
    let agent = Agent::start(
        &cgroup,
        "pg-policy-tools",
        &format!(
            "{}\n[[rule]]\nname = \"ddl\"\nworkloads = [\"*\"]\ntargets = [\"db\"]\ndecision = \"allow\"\n\
             statements = [\"create\", \"alter\", \"lock\", \"drop\", \"insert\", \"update\", \"select\"]\n\
             tables = [\"public.*\"]\nfunctions = [\"pg_catalog.nextval\", \"pg_catalog.setval\"]\n",
            policy(&pg, &secret)
        ),
    );
    let psql = |sql: &str| {
        let script = sql.replace('\'', r"'\''");
        cgroup.sh(&format!(
            "exec psql -X -w -q -t -A -v ON_ERROR_STOP=1 -h {} -p {} -U x -d postgres -c '{script}'",
            pg.addr.ip(),
            pg.addr.port()
        ))
    };
    // What pg_dump, pg_restore, pgbench and pools send, which a generic SQL
    // parser refused.
    for sql in [
        "CREATE SEQUENCE public.s2 START WITH 1 INCREMENT BY 1 NO MINVALUE NO MAXVALUE CACHE 1",
        "CREATE TABLE public.t2 (id int)",
        "ALTER SEQUENCE public.s2 OWNED BY public.t2.id",
        "SELECT * FROM public.t2 FOR NO KEY UPDATE",
        "SELECT pg_catalog.setval('public.s2', 5, true)",
        "SELECT pg_catalog.set_config('search_path', '', false)",
        "BEGIN; LOCK TABLE public.t2 IN ACCESS SHARE MODE; COMMIT",
        "UNLISTEN *; RESET ALL",
        "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL",
        "DISCARD ALL",
        "SELECT nextval('public.s2')",
    ] {
        let out = psql(sql);
        assert!(
            out.status.success(),
            "{sql}: {}\n{}",
            stderr(&out),
            agent.stderr()
        );
    }
    assert_eq!(
        pg.admin_sql("postgres", "SELECT last_value FROM s2").trim(),
        "6"
    );

    // COPY over the extended protocol (tokio-postgres copy_in sends a Sync
    // the server ignores while copying) completes as it does directly, and
    // the connection goes on.
    let out = cgroup.sh(&format!(
        "exec timeout 30 {} {} {} notes 1000",
        env!("CARGO_BIN_EXE_pg-copy-in"),
        pg.addr.ip(),
        pg.addr.port()
    ));
    assert_eq!(
        stdout(&out).trim(),
        "copied 1000 count 1001",
        "{}\n{}",
        stderr(&out),
        agent.stderr()
    );
    // A COPY that fails before copying starts: both Syncs are answered.
    let out = cgroup.sh(&format!(
        "exec timeout 30 {} {} {} no_such_table 10",
        env!("CARGO_BIN_EXE_pg-copy-in"),
        pg.addr.ip(),
        pg.addr.port()
    ));
    assert!(
        stderr(&out).contains("no_such_table") && !out.status.success(),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
}

/// Every statement event of every session: (text, decision).
fn statements(agent: &Agent) -> Vec<(String, String)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut seen: HashMap<String, Vec<(String, String)>> = HashMap::new();
    loop {
        let out = agent.cli(&["sessions", "list", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let sessions: Vec<Value> = stdout(&out)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        for session in &sessions {
            let id = session["id"].as_str().unwrap_or_default().to_owned();
            if seen.contains_key(&id) || session["outcome"] == "live" {
                continue;
            }
            let shown = agent.cli(&["sessions", "show", &id, "--json"]);
            let shown: Value = serde_json::from_slice(&shown.stdout).unwrap_or_default();
            let events = shown["events"].as_array().cloned().unwrap_or_default();
            let statements = events
                .iter()
                .filter(|e| e["kind"] == "statement")
                .map(|e| {
                    (
                        e["text"].as_str().unwrap_or_default().to_owned(),
                        e["decision"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect();
            seen.insert(id, statements);
        }
        if sessions.iter().all(|s| s["outcome"] != "live") || std::time::Instant::now() > deadline {
            return seen.into_values().flatten().collect();
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn masks_cannot_be_walked_around() {
    let pg = Postgres::start("policy-masks", "127.0.0.62");
    pg.admin_sql(
        "postgres",
        &format!(
            "{SETUP}
             CREATE VIEW customer_contacts AS SELECT id, email FROM customers;
             CREATE VIEW contacts_again AS SELECT * FROM customer_contacts;
             GRANT SELECT ON customer_contacts, contacts_again TO app;"
        ),
    );
    let secret = pg.password_file("policy-secret");
    let cgroup = TestCgroup::new("pg-policy-masks");
    let masked_rule = |extra: &str| {
        format!(
            "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = \"{}\"\ntls = \"disable\"\n\
             [target.credential]\nuser = \"app\"\npassword_file = {:?}\n\
             [[rule]]\nname = \"masked-reads\"\nworkloads = [\"*\"]\ntargets = [\"db\"]\ndecision = \"allow\"\n\
             statements = [\"select\", \"update\", \"insert\"]\ntables = [\"public.*\"]\n\
             mask = [{{ column = \"customers.email\", strategy = \"redact\" }}]\n{extra}",
            pg.addr,
            secret.display().to_string()
        )
    };
    let agent = Agent::start(&cgroup, "pg-policy-masks", &masked_rule(""));
    let psql = |sql: &str| {
        let script = sql.replace('\'', r"'\''");
        cgroup.sh(&format!(
            "exec psql -X -w -q -t -A -h {} -p {} -U x -d postgres -c '{script}'",
            pg.addr.ip(),
            pg.addr.port()
        ))
    };
    // A plain column is masked; using it to filter or sort is fine.
    let out = psql("SELECT email, name FROM customers");
    assert_eq!(
        stdout(&out),
        "****|Ann\n",
        "{}\n{}",
        stderr(&out),
        agent.stderr()
    );
    let out = psql("SELECT c.id FROM customers c WHERE lower(c.email) LIKE 'ann%' ORDER BY email");
    assert_eq!(stdout(&out), "1\n", "{}", stderr(&out));

    // Every way the value would leave without its table origin (each of
    // which PostgreSQL alone answers with the address) is refused.
    for (sql, how) in [
        ("SELECT lower(email) FROM customers", "in an expression"),
        ("SELECT email || '' FROM customers", "in an expression"),
        ("SELECT max(email) FROM customers", "in an expression"),
        (
            "SELECT email FROM customers UNION SELECT 'x'",
            "set operation",
        ),
        (
            "SELECT * FROM customers INTERSECT SELECT * FROM customers",
            "set operation",
        ),
        ("SELECT c FROM customers c", "whole-row"),
        ("SELECT ROW(c.*) FROM customers c", "in an expression"),
        ("SELECT row_to_json(customers) FROM customers", "whole-row"),
        (
            "SELECT x FROM (SELECT email AS x FROM customers) s",
            "subquery",
        ),
        (
            "WITH w AS (SELECT email FROM customers) SELECT * FROM w",
            "subquery",
        ),
        (
            "SELECT (SELECT email FROM customers LIMIT 1)",
            "in an expression",
        ),
        (
            "UPDATE customers SET name = name RETURNING email",
            "RETURNING",
        ),
        (
            "INSERT INTO notes SELECT id, email FROM customers",
            "copied into a table",
        ),
        (
            "SELECT * FROM customer_contacts",
            "view that reads the masked column",
        ),
        (
            "SELECT * FROM contacts_again",
            "view that reads the masked column",
        ),
    ] {
        let out = psql(sql);
        let err = stderr(&out);
        assert!(
            err.contains("column customers.email is masked")
                || err.contains("reads the masked column"),
            "{sql}: {err}\n{}",
            stdout(&out)
        );
        assert!(err.contains(how), "{sql}: {err}");
        assert!(!stdout(&out).contains("ann@example.com"), "{sql} leaked");
    }
    assert_eq!(
        pg.admin_sql("postgres", "SELECT count(*) FROM notes")
            .trim(),
        "1"
    );

    // A rule that opts in lets expressions through (the value leaves
    // unmasked, as documented).
    agent.write_policy(&masked_rule("mask_expressions = \"allow\"\n"));
    assert!(agent.cli(&["reload"]).status.success());
    let out = psql("SELECT lower(email) FROM customers");
    assert_eq!(stdout(&out), "ann@example.com\n", "{}", stderr(&out));
}
