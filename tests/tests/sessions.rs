//! Sessions end to end: real `psql` runs through the agent are recorded in
//! its store, shipped to a real Garage, pulled back with `fleet pull` and
//! verified; Garage outages, `kill -9` of the agent mid-burst, tampered
//! objects and a full store.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use interlock_e2e::*;
use serde_json::Value;

const SETUP: &str = "
    CREATE ROLE app LOGIN PASSWORD 'sessions-secret';
    CREATE TABLE events (id int, note text);
    GRANT SELECT, INSERT ON events TO app;
";

fn policy(pg: &Postgres, secret: &Path, sections: &str) -> String {
    format!(
        r#"{sections}
[[target]]
name = "db"
protocol = "postgres"
address = "{addr}"
tls = "disable"
record = "full"
[target.credential]
user = "app"
password_file = {secret:?}

[[workload]]
name = "ci"
unit = "job.service"

[[rule]]
name = "ci-reads-and-writes"
workloads = ["ci"]
targets = ["db"]
decision = "allow"
statements = ["select", "insert"]
functions = ["pg_catalog.pg_sleep"]
"#,
        addr = pg.addr,
        secret = secret.display().to_string(),
    )
}

fn start(name: &str, ip: &str, sections: &str) -> (Postgres, TestCgroup, PathBuf, Agent) {
    let pg = Postgres::start(name, ip);
    pg.admin_sql("postgres", SETUP);
    let secret = pg.password_file("sessions-secret");
    let mut cgroup = TestCgroup::new(&format!("sess-{name}"));
    let (job, _) = cgroup.child("job.service");
    let agent = Agent::start(
        &cgroup,
        &format!("sess-{name}"),
        &policy(&pg, &secret, sections),
    );
    (pg, cgroup, job, agent)
}

fn psql(job: &Path, pg: &Postgres, sql: &str) -> std::process::Output {
    let script = sql.replace('\'', r"'\''");
    sh_in(
        job,
        &format!(
            "PGSSLMODE=disable exec psql -X -w -q -t -A -v ON_ERROR_STOP=1 -h {} -p {} -U anyone -d postgres -c '{script}'",
            pg.addr.ip(),
            pg.addr.port()
        ),
    )
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn list(agent: &Agent, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["sessions", "list", "--json"];
    args.extend_from_slice(extra);
    let out = agent.cli(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    json_lines(&stdout(&out))
}

fn status(agent: &Agent) -> Value {
    let out = agent.cli(&["status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).unwrap()
}

fn backlog(agent: &Agent) -> u64 {
    status(agent)["sessions"]["backlog"]["sessions"]
        .as_u64()
        .expect("a backlog in status")
}

fn wait_shipped(agent: &Agent, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left = backlog(agent);
        if left == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{left} sessions still unshipped after {within:?}: {}\n{}",
            status(agent)["sessions"],
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sessions ended by the agent (the list shows them once sealed).
fn wait_sessions(agent: &Agent, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sessions: Vec<Value> = list(agent, &[])
            .into_iter()
            .filter(|s| s["outcome"] != "live")
            .collect();
        if sessions.len() >= n || Instant::now() > deadline {
            return sessions;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn interlock(args: &[&str]) -> std::process::Output {
    std::process::Command::new(interlock_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn id(session: &Value) -> &str {
    session["id"].as_str().unwrap()
}

#[test]
fn sessions_are_recorded_shipped_pulled_and_verified() {
    let garage = Garage::start("ship");
    let (pg, _cgroup, job, agent) = start("ship", "127.0.0.50", &garage.shipper_section("fleet"));

    let out = psql(&job, &pg, "INSERT INTO events VALUES (1, 'one')");
    assert!(out.status.success(), "{}\n{}", stderr(&out), agent.stderr());
    let out = psql(&job, &pg, "SELECT id, note FROM events");
    assert_eq!(stdout(&out).trim(), "1|one", "{}", stderr(&out));
    let out = psql(&job, &pg, "DELETE FROM events");
    assert!(!out.status.success(), "DELETE is not allowed");

    // Recorded locally: three sessions, filters work.
    let sessions = wait_sessions(&agent, 3);
    assert_eq!(sessions.len(), 3, "{sessions:?}");
    let denied = list(&agent, &["--decision", "denied"]);
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0]["denied"], 1);
    assert_eq!(list(&agent, &["--workload", "ci"]).len(), 3);
    assert_eq!(list(&agent, &["--workload", "nobody"]).len(), 0);
    assert_eq!(list(&agent, &["--target", "db", "--since", "1h"]).len(), 3);

    // `show`: every event, with decisions, rows and the output.
    let out = agent.cli(&["sessions", "show", id(&sessions[0]), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let events = shown["events"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"session_start"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"session_end"), "{kinds:?}");
    let statement = events.iter().find(|e| e["kind"] == "statement").unwrap();
    assert!(
        statement["text"]
            .as_str()
            .unwrap()
            .contains("INSERT INTO events"),
        "{statement}"
    );
    assert_eq!(statement["decision"], "allow");
    assert_eq!(statement["rule"], "ci-reads-and-writes");
    let result = events.iter().find(|e| e["kind"] == "result").unwrap();
    assert_eq!(
        (result["outcome"].as_str(), result["rows"].as_u64()),
        (Some("ok"), Some(1))
    );
    assert!(
        kinds.contains(&"output"),
        "record = \"full\" keeps the output: {kinds:?}"
    );
    assert_eq!(shown["summary"]["workloads"][0], "ci");

    // Shipped: one object per session, in the documented layout.
    wait_shipped(&agent, Duration::from_secs(30));
    let host = sessions[0]["host"].as_str().unwrap().to_owned();
    let keys = garage.list("fleet/");
    assert!(
        keys.contains(&format!("fleet/host={host}/host-key.json")),
        "{keys:?}"
    );
    for session in &sessions {
        let date = &humantime::format_rfc3339(
            std::time::UNIX_EPOCH + Duration::from_micros(session["start_us"].as_u64().unwrap()),
        )
        .to_string()[..10];
        let key = format!("fleet/host={host}/date={date}/{}.jsonl.zst", id(session));
        assert_eq!(
            keys.iter().filter(|k| **k == key).count(),
            1,
            "{key} in {keys:?}"
        );
    }

    // Pulled back: exactly what was recorded, verified.
    let pulled = agent.workdir.join("pulled");
    let credentials = garage.credentials_file();
    let pull = |to: &Path| {
        interlock(&[
            "fleet",
            "pull",
            "--from",
            "s3://sessions/fleet",
            "--endpoint",
            &garage.endpoint,
            "--region",
            "garage",
            "--credentials-file",
            credentials.to_str().unwrap(),
            "--to",
            to.to_str().unwrap(),
        ])
    };
    let out = pull(&pulled);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("pulled 3 sessions"),
        "{}",
        stdout(&out)
    );
    let from = pulled.to_str().unwrap();
    for session in &sessions {
        let exported = agent.cli(&["sessions", "export", id(session)]);
        assert!(exported.status.success(), "{}", stderr(&exported));
        let date = &humantime::format_rfc3339(
            std::time::UNIX_EPOCH + Duration::from_micros(session["start_us"].as_u64().unwrap()),
        )
        .to_string()[..10];
        let file = pulled.join(format!("host={host}/date={date}/{}.jsonl", id(session)));
        assert_eq!(
            std::fs::read(&file).unwrap(),
            exported.stdout,
            "{}",
            file.display()
        );
        let out = interlock(&["sessions", "verify", file.to_str().unwrap()]);
        assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    }
    let out = interlock(&["sessions", "list", "--from", from, "--json"]);
    assert_eq!(json_lines(&stdout(&out)).len(), 3, "{}", stderr(&out));
    // Straight from the bucket, too.
    let out = interlock(&[
        "sessions",
        "list",
        "--from",
        "s3://sessions/fleet",
        "--endpoint",
        &garage.endpoint,
        "--region",
        "garage",
        "--credentials-file",
        credentials.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(json_lines(&stdout(&out)).len(), 3, "{}", stderr(&out));
    // Filters apply to what is pulled.
    let out = interlock(&[
        "fleet",
        "pull",
        "--from",
        "s3://sessions/fleet",
        "--endpoint",
        &garage.endpoint,
        "--region",
        "garage",
        "--credentials-file",
        credentials.to_str().unwrap(),
        "--host",
        &host,
        "--workload",
        "nobody",
        "--to",
        agent.workdir.join("none").to_str().unwrap(),
    ]);
    assert!(
        stdout(&out).contains("pulled 0 sessions") && stdout(&out).contains("3 filtered out"),
        "{}",
        stdout(&out)
    );
    let out = interlock(&[
        "sessions",
        "list",
        "--from",
        from,
        "--decision",
        "denied",
        "--json",
    ]);
    assert_eq!(json_lines(&stdout(&out)).len(), 1);
    let out = interlock(&[
        "sessions",
        "replay",
        id(&denied[0]),
        "--from",
        from,
        "--speed",
        "0",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let transcript = stdout(&out);
    assert!(
        transcript.contains("DELETE FROM events [deny"),
        "the transcript shows the denied statement:\n{transcript}"
    );
    let out = interlock(&[
        "sessions",
        "export",
        id(&sessions[1]),
        "--from",
        from,
        "--format",
        "asciicast",
    ]);
    let cast = json_lines(&stdout(&out));
    assert_eq!(cast[0]["version"], 2, "asciicast v2 header");
    assert!(
        cast[1..]
            .iter()
            .all(|e| e[1] == "o" && e[0].as_f64().is_some())
    );
    assert!(stdout(&out).contains("SELECT id, note FROM events"));

    // Tampered: one byte changed, one event removed; the verifier names it.
    let file = interlock_e2e_file(&pulled, &host, &sessions[0]);
    let original = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    let statement_at = lines
        .iter()
        .position(|l| l.contains("\"kind\":\"statement\""))
        .unwrap();
    let mut changed_lines = lines.clone();
    let altered = lines[statement_at].replacen("VALUES (1, 'one')", "VALUES (2, 'one')", 1);
    assert_ne!(altered, lines[statement_at]);
    changed_lines[statement_at] = &altered;
    let changed = changed_lines.join("\n");
    let tampered = agent.workdir.join("tampered.jsonl");
    std::fs::write(&tampered, &changed).unwrap();
    let out = interlock(&["sessions", "verify", tampered.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!(
            "event {statement_at} (line {}) was altered",
            statement_at + 1
        )),
        "{}",
        stderr(&out)
    );
    let mut removed = lines.clone();
    removed.remove(statement_at);
    std::fs::write(&tampered, removed.join("\n")).unwrap();
    let out = interlock(&["sessions", "verify", tampered.to_str().unwrap()]);
    assert!(
        stderr(&out).contains(&format!("event {statement_at} is missing")),
        "{}",
        stderr(&out)
    );

    // A tampered object in the bucket fails the pull, naming the event.
    let object = format!(
        "fleet/host={host}/date={}/{}.jsonl.zst",
        file.parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .trim_start_matches("date="),
        id(&sessions[0])
    );
    garage.put(&object, &zstd_compress(changed.as_bytes()));
    let out = pull(&agent.workdir.join("pulled-again"));
    assert!(!out.status.success(), "a tampered object fails the pull");
    assert!(
        stderr(&out).contains(&format!(
            "event {statement_at} (line {}) was altered",
            statement_at + 1
        )),
        "{}",
        stderr(&out)
    );
}

fn interlock_e2e_file(pulled: &Path, host: &str, session: &Value) -> PathBuf {
    let date = &humantime::format_rfc3339(
        std::time::UNIX_EPOCH + Duration::from_micros(session["start_us"].as_u64().unwrap()),
    )
    .to_string()[..10];
    pulled.join(format!("host={host}/date={date}/{}.jsonl", id(session)))
}

fn zstd_compress(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).unwrap()
}

#[test]
fn an_outage_of_the_store_delays_shipping_and_loses_nothing() {
    let mut garage = Garage::start("outage");
    let (pg, _cgroup, job, agent) = start("outage", "127.0.0.51", &garage.shipper_section("out"));
    garage.stop();
    for i in 0..5 {
        let out = psql(
            &job,
            &pg,
            &format!("INSERT INTO events VALUES ({i}, 'outage')"),
        );
        assert!(
            out.status.success(),
            "recording goes on while the store is down: {}",
            stderr(&out)
        );
    }
    let sessions = wait_sessions(&agent, 5);
    assert_eq!(sessions.len(), 5);
    std::thread::sleep(Duration::from_secs(2));
    let during = status(&agent)["sessions"]["backlog"].clone();
    assert_eq!(during["sessions"], 5, "{during}");
    assert!(during["bytes"].as_u64().unwrap() > 0, "{during}");
    assert!(during["last_error"].is_string(), "{during}");

    garage.resume();
    wait_shipped(&agent, Duration::from_secs(90));
    let keys = garage.list("out/");
    for session in &sessions {
        let n = keys
            .iter()
            .filter(|k| k.ends_with(&format!("/{}.jsonl.zst", id(session))))
            .count();
        assert_eq!(n, 1, "{} arrived exactly once: {keys:?}", id(session));
    }
    assert_eq!(
        keys.iter().filter(|k| k.ends_with(".jsonl.zst")).count(),
        5,
        "{keys:?}"
    );
}

#[test]
fn kill_9_mid_burst_keeps_every_forwarded_statement() {
    let garage = Garage::start("kill");
    let (pg, _cgroup, job, mut agent) =
        start("kill", "127.0.0.52", &garage.shipper_section("kill"));
    // One session sending INSERTs one after another, as fast as psql can.
    let script = format!(
        "seq 1 1000000 | sed \"s/.*/INSERT INTO events VALUES (&, 'burst');/\" | \
         exec psql -X -w -q -h {} -p {} -U anyone -d postgres >/dev/null 2>&1",
        pg.addr.ip(),
        pg.addr.port()
    );
    let mut burst = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && {script}",
            job.display()
        ))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while pg
        .admin_sql("postgres", "SELECT count(*) FROM events")
        .trim()
        .parse::<u64>()
        .unwrap()
        < 300
    {
        assert!(
            Instant::now() < deadline,
            "the burst did not start: {}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.kill9();
    let _ = burst.wait();
    let forwarded: BTreeSet<u64> = pg
        .admin_sql("postgres", "SELECT id FROM events WHERE note = 'burst'")
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert!(forwarded.len() >= 300);

    // With the agent down, the CLI reads its store directly, as it is.
    let down = list(&agent, &[]);
    assert_eq!(down.len(), 1, "{down:?}");
    assert_eq!(down[0]["outcome"], "live", "not ended: the agent died");

    agent.spawn();
    let sessions = list(&agent, &[]);
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0]["outcome"], "interrupted", "sealed at restart");
    let out = agent.cli(&["sessions", "show", id(&sessions[0]), "--json"]);
    let shown: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let recorded: BTreeSet<u64> = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "statement")
        .filter_map(|e| {
            let text = e["text"].as_str()?;
            text.split("VALUES (")
                .nth(1)?
                .split(',')
                .next()?
                .trim()
                .parse()
                .ok()
        })
        .collect();
    let missing: Vec<_> = forwarded.difference(&recorded).collect();
    assert!(
        missing.is_empty(),
        "{} statements ran on the server but are not in the store (first: {:?}); {} recorded",
        missing.len(),
        missing.first(),
        recorded.len()
    );
    let exported = agent.workdir.join("interrupted.jsonl");
    std::fs::write(
        &exported,
        agent.cli(&["sessions", "export", id(&sessions[0])]).stdout,
    )
    .unwrap();
    let out = interlock(&["sessions", "verify", exported.to_str().unwrap()]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));

    // Shipping resumes after the restart.
    wait_shipped(&agent, Duration::from_secs(30));
    let keys = garage.list("kill/");
    assert!(
        keys.iter()
            .any(|k| k.ends_with(&format!("/{}.jsonl.zst", id(&sessions[0])))),
        "{keys:?}"
    );
}

#[test]
fn a_full_store_refuses_new_sessions_and_drops_nothing() {
    // The shipper points at a port nobody listens on: nothing leaves.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let credentials =
        std::env::temp_dir().join(format!("interlock-dead-s3-{}.toml", std::process::id()));
    std::fs::write(
        &credentials,
        "access_key_id = \"GK0\"\nsecret_access_key = \"x\"\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &credentials,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let sections = format!(
        "[sessions]\nmax_store_bytes = \"3MiB\"\n\n[shipper]\nurl = \"s3://sessions/full\"\nendpoint = \"{dead}\"\nregion = \"garage\"\ncredentials_file = {:?}\n",
        credentials.display().to_string()
    );
    let (pg, _cgroup, job, agent) = start("full", "127.0.0.53", &sections);
    pg.admin_sql(
        "postgres",
        "INSERT INTO events SELECT g, repeat('x', 200) FROM generate_series(1, 2000) g",
    );

    let mut recorded = 0;
    let mut refusal = None;
    for _ in 0..400 {
        let out = psql(&job, &pg, "SELECT * FROM events");
        if out.status.success() {
            recorded += 1;
        } else {
            refusal = Some(stderr(&out));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let refusal = refusal.expect("the store never filled up");
    assert!(refusal.contains("session store is full"), "{refusal}");
    assert!(recorded > 0);
    std::fs::remove_file(&credentials).ok();

    // Every session that ran is still there, sealed, and waiting to ship.
    let sessions = wait_sessions(&agent, recorded);
    let ran: Vec<_> = sessions
        .iter()
        .filter(|s| s["outcome"] == "closed")
        .collect();
    assert_eq!(ran.len(), recorded, "{sessions:?}");
    let status = status(&agent);
    assert!(
        status["sessions"]["refusing"]
            .as_str()
            .unwrap()
            .contains("full"),
        "{status}"
    );
    assert!(status["sessions"]["backlog"]["sessions"].as_u64().unwrap() >= recorded as u64);
    let out = agent.cli(&["status"]);
    assert!(
        stdout(&out).contains("REFUSING NEW SESSIONS"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn a_long_session_ships_in_parts_while_it_runs() {
    let garage = Garage::start("parts");
    let sections = format!(
        "{}part_interval = \"1s\"\n",
        garage.shipper_section("parts")
    );
    let (pg, _cgroup, job, agent) = start("parts", "127.0.0.54", &sections);
    let out = psql(&job, &pg, "SELECT 1; SELECT pg_sleep(4); SELECT 2");
    assert!(out.status.success(), "{}", stderr(&out));
    let sessions = wait_sessions(&agent, 1);
    wait_shipped(&agent, Duration::from_secs(30));
    let session = id(&sessions[0]);
    let keys = garage.list("parts/");
    let part = keys
        .iter()
        .find(|k| k.ends_with(&format!("/{session}.part1.jsonl.zst")))
        .unwrap_or_else(|| {
            panic!(
                "no part of {session} while it ran: {keys:?}\n{}",
                agent.stderr()
            )
        });
    let part = zstd::decode_all(&*garage.get(part)).unwrap();
    let whole = agent.cli(&["sessions", "export", session]).stdout;
    assert!(
        !part.is_empty() && whole.starts_with(&part),
        "a part is a prefix of the session"
    );
    assert!(
        String::from_utf8_lossy(&part).contains("pg_sleep"),
        "the running statement is in it"
    );
}

#[test]
fn a_full_disk_ends_sessions_cleanly_and_refuses_new_ones() {
    // The agent's state_dir on a 3 MiB tmpfs: a real ENOSPC.
    let _disk = SmallDisk::for_agent("sess-disk");
    let (pg, _cgroup, job, agent) = start("disk", "127.0.0.55", "");
    pg.admin_sql(
        "postgres",
        "INSERT INTO events SELECT g, repeat('x', 500) FROM generate_series(1, 2000) g",
    );

    let mut ok = 0;
    let mut failure = None;
    for _ in 0..200 {
        let out = psql(&job, &pg, "SELECT * FROM events");
        if out.status.success() {
            ok += 1;
        } else {
            failure = Some(stderr(&out));
            break;
        }
    }
    let failure = failure.expect("the disk never filled up");
    // The commit thread measures free space twice a second.
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        failure.contains("session store") && failure.contains("No space left on device"),
        "a clear error: {failure}\n{}",
        agent.stderr()
    );
    assert!(ok > 0);
    // The agent is still up and says why it refuses.
    let status = status(&agent);
    let admitting = status["sessions"]["refusing"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let disk_full = |text: &str| {
        text.contains("disk holding the session store is full")
            || text.contains("No space left on device")
    };
    assert!(disk_full(&admitting), "{status}");
    let out = psql(&job, &pg, "SELECT 1");
    assert!(!out.status.success());
    assert!(disk_full(&stderr(&out)), "{}", stderr(&out));
    // Every session that ran is on record with its statement. The one
    // that met the full disk is too, unless it was refused as it started
    // (its start could not be recorded, so nothing of it ran). One that
    // ended as the disk filled may not have its end written (sled is not
    // given what the disk has no room for): it stays `live` until the
    // next start seals it as interrupted. Those that ended are sealed and
    // verify.
    wait_sessions(&agent, ok);
    let all = list(&agent, &[]);
    assert!(all.len() == ok + 1 || all.len() == ok, "{ok} ran: {all:?}");
    for session in &all[..ok] {
        let id = session["id"].as_str().unwrap();
        let shown = stdout(&agent.cli(&["sessions", "show", id, "--json"]));
        assert!(shown.contains("SELECT * FROM events"), "{id}: {shown}");
        if session["outcome"] == "closed" {
            let verify = agent.cli(&["sessions", "verify", id]);
            assert!(verify.status.success(), "{}", stderr(&verify));
        } else {
            assert_eq!(session["outcome"], "live", "{session}");
        }
    }
}
