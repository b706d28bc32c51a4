//! The durability promise, checked by crashing the agent (`kill -9`) while
//! clients are busy, then restarting it and comparing what the target and
//! the client saw with what the recovered session records hold:
//!
//! - a PostgreSQL write reaches the server only once its statement is on
//!   disk: every row in the table has its `INSERT` in a record;
//! - a PostgreSQL read may run while its record is flushed, but its answer
//!   reaches the client only once the record is on disk: every answer
//!   `psql` printed has its `SELECT` in a record;
//! - an opaque TCP connection sends no byte upstream before its session's
//!   start is on disk: every marker the server received came from a client
//!   port that a recorded `session_start` names;
//! - an HTTP POST reaches nginx only once recorded, and a GET's answer
//!   reaches the client only once recorded: every POST in nginx's log and
//!   every answer curl printed has its `http_request`.
//!
//! Each test crashes the agent `INTERLOCK_CRASH_ROUNDS` times (2 by
//! default; `cargo xtask bench durability` runs 20), each time after a
//! different delay.
use std::{
    collections::{HashMap, HashSet},
    io::{BufRead, BufReader},
    net::TcpListener,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use interlock_e2e::*;
use serde_json::Value;

fn rounds() -> usize {
    std::env::var("INTERLOCK_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(2)
}

/// A delay of up to 600 ms after the client has done some work,
/// different each round: the crash lands at a different point of the
/// clients' work.
fn crash_delay(round: usize) -> Duration {
    use std::hash::{BuildHasher, RandomState};
    Duration::from_millis(RandomState::new().hash_one(round) % 600)
}

/// The events of every recorded session, kept across rounds: a session
/// of an earlier round has ended and is not read again.
#[derive(Default)]
struct Recorded(HashMap<String, Vec<Value>>);

impl Recorded {
    /// Every event of every recorded session (the agent running).
    fn events(&mut self, agent: &Agent) -> Vec<Value> {
        let out = agent.cli(&["sessions", "list", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        for line in stdout(&out).lines() {
            let Ok(session) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let id = session["id"].as_str().unwrap_or_default().to_owned();
            if self.0.contains_key(&id) {
                continue;
            }
            let shown = agent.cli(&["sessions", "show", &id, "--json"]);
            assert!(shown.status.success(), "{}", stderr(&shown));
            let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
            let events = shown["events"].as_array().cloned().unwrap_or_default();
            self.0.insert(id, events);
        }
        self.0.values().flatten().cloned().collect()
    }

    /// The recorded statements' texts.
    fn statements(&mut self, agent: &Agent) -> HashSet<String> {
        self.events(agent)
            .into_iter()
            .filter(|e| e["kind"] == "statement")
            .filter_map(|e| e["text"].as_str().map(str::to_owned))
            .collect()
    }
}

fn pg_policy(pg: &Postgres, secret: &std::path::Path) -> String {
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
name = "marks"
workloads = ["*"]
targets = ["db"]
decision = "allow"
statements = ["select", "insert"]
tables = ["public.marks"]
"#,
        addr = pg.addr,
        secret = secret.display().to_string(),
    )
}

/// A server with an empty `marks` table, and the agent in front of it
/// for the workload cgroup's `job.service`.
fn marks_db(name: &str, ip: &str) -> (Postgres, TestCgroup, std::path::PathBuf, Agent) {
    let pg = Postgres::start(name, ip);
    pg.admin_sql(
        "postgres",
        "CREATE ROLE app LOGIN PASSWORD 'crash-secret';
         CREATE TABLE marks (n int PRIMARY KEY);
         GRANT SELECT, INSERT ON marks TO app;",
    );
    let secret = pg.password_file("crash-secret");
    let mut cgroup = TestCgroup::new(name);
    let (job, _) = cgroup.child("job.service");
    let agent = Agent::start(&cgroup, name, &pg_policy(&pg, &secret));
    (pg, cgroup, job, agent)
}

/// Runs `client` (a shell script) in the job's cgroup; once `busy` says
/// the client has done some work (so the precondition never depends on the
/// machine's speed), crashes the agent after `delay`, waits for the client
/// to notice, restarts the agent.
fn crash_while(
    agent: &mut Agent,
    job: &std::path::Path,
    client: String,
    busy: impl Fn() -> bool,
    delay: Duration,
) -> std::process::Output {
    let job = job.to_owned();
    let client = thread::spawn(move || sh_in(&job, &client));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !busy() && !client.is_finished() && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(delay);
    agent.kill9();
    let out = client.join().unwrap();
    assert!(
        !out.status.success(),
        "the client should have lost its connection: {}",
        stderr(&out)
    );
    agent.spawn();
    out
}

fn lines_in(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().filter(|l| !l.is_empty()).count())
        .unwrap_or(0)
}

#[test]
fn postgres_writes_reach_the_server_only_once_recorded() {
    let (pg, _cgroup, job, mut agent) = marks_db("crash-writes", "127.0.0.77");
    let mut records = Recorded::default();
    for round in 0..rounds() {
        let first = round * 1_000_000;
        let client = format!(
            "seq {} {} | sed 's/.*/INSERT INTO marks VALUES (&);/' | \
             exec psql -X -w -q -h {} -p {} -U app -d postgres",
            first + 1,
            first + 999_999,
            pg.addr.ip(),
            pg.addr.port()
        );
        let count = format!("SELECT count(*) FROM marks WHERE n > {first}");
        let busy = || {
            pg.admin_sql("postgres", &count)
                .trim()
                .parse::<usize>()
                .unwrap_or(0)
                >= 10
        };
        let out = crash_while(&mut agent, &job, client, busy, crash_delay(round));
        let recorded = records.statements(&agent);
        let rows = pg.admin_sql(
            "postgres",
            &format!("SELECT n FROM marks WHERE n > {first} ORDER BY n"),
        );
        let rows: Vec<&str> = rows.split_whitespace().collect();
        assert!(
            rows.len() >= 10,
            "round {round}: only {} rows before the crash; psql: {}",
            rows.len(),
            stderr(&out)
        );
        let missing: Vec<&&str> = rows
            .iter()
            .filter(|n| !recorded.contains(&format!("INSERT INTO marks VALUES ({n})")))
            .collect();
        assert!(
            missing.is_empty(),
            "round {round}: rows on the server without a recorded statement: {missing:?} (of {})",
            rows.len()
        );
        eprintln!(
            "round {round}: {} rows, all recorded ({} statements recorded)",
            rows.len(),
            recorded.len()
        );
    }
}

#[test]
fn postgres_answers_reach_the_client_only_once_recorded() {
    let (pg, _cgroup, job, mut agent) = marks_db("crash-reads", "127.0.0.78");
    let mut records = Recorded::default();
    let answers =
        std::env::temp_dir().join(format!("interlock-crash-reads-{}", std::process::id()));
    for round in 0..rounds() {
        let first = round * 1_000_000;
        let client = format!(
            "seq {} {} | sed 's/.*/SELECT & AS mark;/' | \
             psql -X -w -q -t -A -h {} -p {} -U app -d postgres > {}",
            first + 1,
            first + 999_999,
            pg.addr.ip(),
            pg.addr.port(),
            answers.display()
        );
        let _ = std::fs::remove_file(&answers);
        let busy = || lines_in(&answers) >= 10;
        crash_while(&mut agent, &job, client, busy, crash_delay(round));
        let recorded = records.statements(&agent);
        let seen = std::fs::read_to_string(&answers).unwrap();
        let seen: Vec<&str> = seen.lines().filter(|l| !l.is_empty()).collect();
        assert!(
            seen.len() >= 10,
            "round {round}: only {} answers before the crash",
            seen.len()
        );
        let missing: Vec<&&str> = seen
            .iter()
            .filter(|n| !recorded.contains(&format!("SELECT {n} AS mark")))
            .collect();
        assert!(
            missing.is_empty(),
            "round {round}: answers the client got without a recorded statement: {missing:?} (of {})",
            seen.len()
        );
        eprintln!(
            "round {round}: {} answers, all recorded ({} statements recorded)",
            seen.len(),
            recorded.len()
        );
    }
    let _ = std::fs::remove_file(&answers);
}

/// A server that keeps the first line of every connection.
fn marker_server(bind: &str) -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind(bind).unwrap();
    let addr = listener.local_addr().unwrap();
    let markers: Arc<Mutex<Vec<String>>> = Arc::default();
    let kept = markers.clone();
    thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let kept = kept.clone();
            thread::spawn(move || {
                let mut line = String::new();
                if BufReader::new(stream).read_line(&mut line).is_ok() && !line.is_empty() {
                    kept.lock().unwrap().push(line.trim().to_owned());
                }
            });
        }
    });
    (addr, markers)
}

#[test]
fn tcp_bytes_go_upstream_only_once_the_session_is_recorded() {
    let (server, markers) = marker_server("127.0.0.79:0");
    let mut cgroup = TestCgroup::new("crash-tcp");
    let (job, _) = cgroup.child("job.service");
    let policy = format!(
        "[[target]]\nname = \"svc\"\nprotocol = \"tcp\"\naddress = \"{server}\"\n\n\
         [[rule]]\nname = \"svc\"\nworkloads = [\"*\"]\ntargets = [\"svc\"]\ndecision = \"allow\"\n"
    );
    let mut agent = Agent::start(&cgroup, "crash-tcp", &policy);
    let mut records = Recorded::default();
    // Connects again and again, each connection sending its own port;
    // stops once the agent is gone (connections refused).
    let program = format!(
        "import socket\n\
         failures = 0\n\
         while failures < 20:\n\
         \x20   s = socket.socket()\n\
         \x20   try:\n\
         \x20       s.connect(('{ip}', {port}))\n\
         \x20       s.sendall(b'%d\\n' % s.getsockname()[1])\n\
         \x20       s.shutdown(socket.SHUT_WR)\n\
         \x20       s.recv(1)\n\
         \x20   except OSError:\n\
         \x20       failures += 1\n\
         \x20   finally:\n\
         \x20       s.close()\n\
         raise SystemExit(1)\n",
        ip = server.ip(),
        port = server.port()
    );
    let path = std::env::temp_dir().join(format!("interlock-crash-tcp-{}.py", std::process::id()));
    std::fs::write(&path, program).unwrap();
    for round in 0..rounds() {
        markers.lock().unwrap().clear();
        let client = format!("exec /usr/bin/python3 {}", path.display());
        let busy = || markers.lock().unwrap().len() >= 10;
        crash_while(&mut agent, &job, client, busy, crash_delay(round));
        let recorded: HashSet<String> = records
            .events(&agent)
            .into_iter()
            .filter(|e| e["kind"] == "session_start")
            .filter_map(|e| {
                let client: std::net::SocketAddr = e["client"].as_str()?.parse().ok()?;
                Some(client.port().to_string())
            })
            .collect();
        let received = markers.lock().unwrap().clone();
        assert!(
            received.len() >= 10,
            "round {round}: only {} connections before the crash",
            received.len()
        );
        let missing: Vec<&String> = received.iter().filter(|p| !recorded.contains(*p)).collect();
        assert!(
            missing.is_empty(),
            "round {round}: bytes upstream from clients without a recorded session: {missing:?} (of {})",
            received.len()
        );
        eprintln!(
            "round {round}: {} connections reached the server, all recorded",
            received.len()
        );
    }
    let _ = std::fs::remove_file(&path);
}

/// HTTP: a POST reaches nginx only once its request is on disk; a GET may
/// go up while its record is flushed, but its answer reaches the client
/// only once the record is on disk.
#[test]
fn http_requests_reach_the_server_and_answers_the_client_only_once_recorded() {
    let nginx = Nginx::start("crash-http");
    let mut cgroup = TestCgroup::new("crash-http");
    let (job, _) = cgroup.child("job.service");
    let policy = format!(
        "[[target]]\nname = \"api\"\nprotocol = \"http\"\naddress = \"127.0.0.1:{port}\"\ntls_ca_file = {ca:?}\n\
         [target.credential]\nbearer_token_file = {token:?}\n\n\
         [[rule]]\nname = \"api\"\nworkloads = [\"*\"]\ntargets = [\"api\"]\ndecision = \"allow\"\n\
         methods = [\"GET\", \"POST\"]\npaths = [\"/api/v1/**\"]\n",
        port = nginx.port,
        ca = nginx.ca(),
        token = nginx.token_file(),
    );
    let mut agent = Agent::start(&cgroup, "crash-http", &policy);
    let mut records = Recorded::default();
    let answers = std::env::temp_dir().join(format!("interlock-crash-http-{}", std::process::id()));
    for round in 0..rounds() {
        let _ = std::fs::remove_file(&answers);
        let curl = format!(
            "curl -sS --fail --max-time 5 --cacert {}",
            agent.workdir.join("state/ca/ca.pem").display()
        );
        let base = format!("https://127.0.0.1:{}/api/v1", nginx.port);
        let client = format!(
            "i={first}; while true; do \
               {curl} -X POST -o /dev/null {base}/write/$i || exit 1; \
               {curl} {base}/read/$i >> {answers} || exit 1; \
               i=$((i+1)); done",
            first = round * 1_000_000,
            answers = answers.display(),
        );
        let posts = || {
            nginx
                .seen()
                .iter()
                .filter(|l| l.starts_with("POST "))
                .count()
        };
        let before = posts();
        let busy = || lines_in(&answers) >= 1 && posts() >= before + 5;
        crash_while(&mut agent, &job, client, busy, crash_delay(round));
        let recorded: HashSet<String> = records
            .events(&agent)
            .into_iter()
            .filter(|e| e["kind"] == "http_request")
            .filter_map(|e| e["path"].as_str().map(str::to_owned))
            .collect();
        let writes: Vec<String> = nginx
            .seen()
            .iter()
            .filter(|l| l.starts_with("POST "))
            .filter_map(|l| l.split(' ').nth(1).map(str::to_owned))
            .collect();
        let reads: Vec<String> = std::fs::read_to_string(&answers)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["uri"].as_str().map(str::to_owned))
            .collect();
        assert!(
            writes.len() >= 5 && !reads.is_empty(),
            "round {round}: only {} writes and {} answers before the crash",
            writes.len(),
            reads.len()
        );
        let missing: Vec<&String> = writes
            .iter()
            .chain(&reads)
            .filter(|p| !recorded.contains(*p))
            .collect();
        assert!(
            missing.is_empty(),
            "round {round}: requests that reached nginx, or answers the client got, without a record: {missing:?}"
        );
        eprintln!(
            "round {round}: {} writes reached nginx and {} answers the client, all recorded",
            writes.len(),
            reads.len()
        );
    }
    let _ = std::fs::remove_file(&answers);
}
