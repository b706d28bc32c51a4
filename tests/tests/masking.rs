//! Masking through the agent: a real PostgreSQL 15 and real clients in the
//! workload cgroup (`psql` on the simple protocol, `psycopg` 3 on the
//! extended one with server-side parameters, `psycopg2` for COPY, and a
//! bare protocol client for what libpq never does).
use interlock_e2e::*;

const SETUP: &str = "
    CREATE ROLE app LOGIN PASSWORD 'mask-secret';
    CREATE TABLE customers (id int PRIMARY KEY, email text, phone text, card text,
                            tax_id text, note text, secret text);
    INSERT INTO customers VALUES
      (1, 'ann@example.com', '555-0101', '4111 1111 1111 1111', 'T-1',
       'token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln', 's1'),
      (2, 'bob@example.com', '555-0202', '5500 0000 0000 0004', 'T-1', 'plain', 's2');
    CREATE TABLE big (id int, payload text);
    GRANT SELECT, INSERT ON customers, big TO app;
";

fn policy(pg: &Postgres, secret: &std::path::Path) -> String {
    format!(
        r#"
[[target]]
name = "crm"
protocol = "postgres"
address = "{addr}"
tls = "disable"
mask = [{{ pattern = "jwt" }}]
[target.credential]
user = "app"
password_file = {secret:?}

[[rule]]
name = "ci-reads-crm"
workloads = ["*"]
targets = ["crm"]
decision = "allow"
statements = ["select", "insert", "copy_from", "copy_to", "set", "show", "transaction"]
mask = [
  {{ column = "customers.email", strategy = "redact" }},
  {{ column = "phone", strategy = "partial", keep = 2 }},
  {{ pattern = "card_number", strategy = "partial", keep = 4 }},
  {{ column = "customers.tax_id", strategy = "hash" }},
  {{ column = "public.customers.secret", strategy = "null" }},
]
"#,
        addr = pg.addr,
        secret = secret.display().to_string(),
    )
}

fn start(name: &str, ip: &str) -> (Postgres, TestCgroup, std::path::PathBuf, Agent) {
    let pg = Postgres::start(name, ip);
    pg.admin_sql("postgres", SETUP);
    let secret = pg.password_file("mask-secret");
    let mut cgroup = TestCgroup::new(&format!("pg-{name}"));
    let (job, _) = cgroup.child("job.service");
    // Statement lines are checked below: on, as a SIEM feed would have them.
    let agent = Agent::start_with(
        &cgroup,
        &format!("pg-{name}"),
        "access_log_statements = true",
        &policy(&pg, &secret),
    );
    (pg, cgroup, job, agent)
}

fn psql(job: &std::path::Path, pg: &Postgres, sql: &str) -> std::process::Output {
    let script = sql.replace('\'', r"'\''");
    sh_in(
        job,
        &format!(
            "exec psql -X -w -q -t -A -h {} -p {} -U anyone -d postgres -c '{script}'",
            pg.addr.ip(),
            pg.addr.port()
        ),
    )
}

/// Runs a Python program in the job's cgroup with the system's psycopg.
fn python(job: &std::path::Path, pg: &Postgres, program: &str) -> std::process::Output {
    let program = program
        .replace("HOST", &pg.addr.ip().to_string())
        .replace("PORT", &pg.addr.port().to_string());
    let path = std::env::temp_dir().join(format!("interlock-{}.py", pg.addr.ip()));
    std::fs::write(&path, program).unwrap();
    sh_in(job, &format!("exec /usr/bin/python3 {}", path.display()))
}

#[test]
fn columns_and_patterns_are_masked_in_both_protocols() {
    let (pg, _cgroup, job, agent) = start("mask", "127.0.0.40");

    // Simple protocol (psql): every strategy, by table column, by result
    // column name and by value pattern.
    let out = psql(
        &job,
        &pg,
        "SELECT id, email, phone, card, tax_id, note, secret FROM customers ORDER BY id",
    );
    assert!(out.status.success(), "{}\n{}", stderr(&out), agent.stderr());
    let rows: Vec<Vec<String>> = stdout(&out)
        .lines()
        .map(|l| l.split('|').map(str::to_owned).collect())
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        rows[0][..4],
        ["1", "****", "****01", "****1111"],
        "{rows:?}"
    );
    assert_eq!(rows[1][..4], ["2", "****", "****02", "****0004"]);
    let hash = &rows[0][4];
    assert!(
        hash.len() == 32 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
        "{hash}"
    );
    assert_eq!(&rows[1][4], hash, "equal values hash alike (joins work)");
    assert_eq!(rows[0][5], "token ****", "JWT masked by the target's mask");
    assert_eq!(rows[1][5], "plain");
    assert_eq!((rows[0][6].as_str(), rows[1][6].as_str()), ("", ""), "null");

    // A renamed column is still the table's column.
    let out = psql(
        &job,
        &pg,
        "SELECT email AS contact FROM customers WHERE id = 1",
    );
    assert_eq!(stdout(&out), "****\n", "{}", stderr(&out));

    // Extended protocol with server-side parameters (psycopg 3): text and
    // binary results, and a prepared statement run again and again.
    let out = python(
        &job,
        &pg,
        r#"
import psycopg
conn = psycopg.connect(host="HOST", port=PORT, user="anyone", dbname="postgres")
print(conn.execute("SELECT email, card, id FROM customers WHERE id = %s", (1,)).fetchall())
binary = conn.cursor(binary=True)
print(binary.execute("SELECT email, id FROM customers WHERE id = %s", (1,)).fetchall())
for _ in range(3):
    row = conn.execute("SELECT phone FROM customers WHERE id = %s", (2,), prepare=True).fetchone()
print(row)
"#,
    );
    assert!(out.status.success(), "{}\n{}", stderr(&out), agent.stderr());
    assert_eq!(
        stdout(&out),
        "[('****', '****1111', 1)]\n[(None, 1)]\n('****02',)\n",
        "binary values of masked columns become NULL"
    );

    // Parse/Bind/Execute with no Describe: the agent describes the portal
    // itself, and the client sees only its own answers.
    let out = pgwire(
        &job,
        pg.addr,
        "execute-undescribed",
        "SELECT email, phone FROM customers ORDER BY id",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "****|****01\n****|****02\n");

    // COPY: rows in are fine; rows out cannot be masked, so COPY TO is
    // refused while masks apply (psycopg2, the usual COPY client).
    let out = python(
        &job,
        &pg,
        r#"
import io, psycopg2
conn = psycopg2.connect(host="HOST", port=PORT, user="anyone", dbname="postgres")
cur = conn.cursor()
cur.copy_from(io.StringIO("3\tcat@example.com\n"), "customers", columns=("id", "email"))
conn.commit()
try:
    cur.copy_expert("COPY customers TO STDOUT", io.StringIO())
    print("copied")
except psycopg2.Error as e:
    print(e.pgcode, str(e).splitlines()[0])
"#,
    );
    assert!(out.status.success(), "{}\n{}", stderr(&out), agent.stderr());
    let text = stdout(&out);
    assert!(
        text.starts_with("42501 ") && text.contains("COPY ... TO output cannot be"),
        "{text}"
    );
    assert_eq!(
        pg.admin_sql("postgres", "SELECT email FROM customers WHERE id = 3")
            .trim(),
        "cat@example.com",
        "COPY FROM stored the real value"
    );

    // Each statement's audit line: rows, cells masked, duration.
    let lines = agent.statement_lines();
    let select = lines
        .iter()
        .find(|l| {
            l["statement"]
                .as_str()
                .is_some_and(|s| s.starts_with("SELECT id, email, phone"))
        })
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!(select["outcome"], "ok");
    assert_eq!(select["rows"], 2);
    assert_eq!(select["cells_masked"], 11, "{select}");
    assert!(select["duration_ms"].as_f64().is_some());
    let copy = lines
        .iter()
        .find(|l| l["kinds"] == "copy_to")
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!(
        (copy["outcome"].as_str(), copy["rows"].as_u64()),
        (Some("denied"), None)
    );
}

#[test]
fn a_large_result_streams_in_bounded_memory() {
    let (pg, _cgroup, job, agent) = start("stream", "127.0.0.41");
    // ~1 GB of rows, masked column included, all through the agent.
    let rows = 1_000_000;
    let sql = format!(
        "SELECT g AS id, repeat('x', 1000) AS payload, 'a@b.example' AS email FROM generate_series(1, {rows}) g"
    );
    let peak_before = peak_rss_kib(agent.pid().expect("agent runs"));
    let out = pgwire(&job, pg.addr, "stream", &sql);
    assert!(out.status.success(), "{}\n{}", stderr(&out), agent.stderr());
    assert_eq!(stdout(&out).trim(), rows.to_string());
    let peak_after = peak_rss_kib(agent.pid().unwrap());
    let grew_mib = (peak_after.saturating_sub(peak_before)) / 1024;
    eprintln!("agent peak RSS {peak_before} KiB before, {peak_after} KiB after a 1 GB result");
    assert!(
        grew_mib < 64,
        "the agent's peak RSS grew by {grew_mib} MiB streaming 1 GB"
    );
    // Audit lines are written by a batching thread: give it a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let line = loop {
        let found = agent
            .statement_lines()
            .into_iter()
            .find(|l| l["rows"] == rows);
        match found {
            Some(line) => break line,
            None if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(100))
            }
            None => panic!("the stream's audit line"),
        }
    };
    assert_eq!(line["cells_masked"], 0, "no mask names these columns");
}
