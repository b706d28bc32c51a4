//! Just-in-time approval with real clients: `psql` in a workload cgroup runs
//! statements an `approve` rule holds; other uids answer with the real CLI
//! over the admin socket, or a chat bot through the HTTP callback; a real
//! HTTPS server receives the webhook.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use interlock_e2e::*;
use serde_json::Value;

const SETUP: &str = "
    CREATE ROLE app LOGIN PASSWORD 'app-secret-5';
    CREATE TABLE orders (id int PRIMARY KEY, total numeric);
    INSERT INTO orders SELECT g, g * 10 FROM generate_series(1, 100) g;
    CREATE TABLE events (id serial PRIMARY KEY, what text);
    GRANT SELECT, INSERT, UPDATE, DELETE ON orders, events TO app;
    GRANT USAGE ON SEQUENCE events_id_seq TO app;
";

/// The workload runs as `nobody`; approvers are uids with no account.
const REQUESTER: u32 = 65534;
const ONCALL: u32 = 5001;
const STRANGER: u32 = 5003;
/// Approves as a member of the `users` group (gid 100), by group.
const GROUP_MEMBER: u32 = 5004;
const USERS_GID: u32 = 100;
/// `daemon` (uid 1), named as an approver by user name.
const DAEMON: u32 = 1;
const TOKEN: &str = "callback-token-for-tests";

fn policy(
    pg: &Postgres,
    secret: &Path,
    webhook_port: u16,
    callback_port: u16,
    dir: &Path,
) -> String {
    let token_file = dir.join("approvals.token");
    std::fs::write(&token_file, TOKEN).unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    format!(
        r#"
[approvals]
webhook_url = "https://127.0.0.1:{webhook_port}/hook"
webhook_ca_file = {ca:?}
callback_listen = "127.0.0.1:{callback_port}"
token_file = {token:?}

[[target]]
name = "prod-db"
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
name = "ci-works-on-prod"
workloads = ["ci-jobs"]
targets = ["prod-db"]
decision = "allow"
statements = ["select", "insert", "update", "delete", "transaction"]
tables = ["public.*"]

[[rule]]
name = "deletes-need-oncall"
workloads = ["ci-jobs"]
targets = ["prod-db"]
decision = "approve"
statements = ["delete"]
tables = ["public.orders"]
approvers = ["uid:{ONCALL}", "uid:{REQUESTER}", "group:users"]
timeout = "2m"

[[rule]]
name = "updates-time-out"
workloads = ["ci-jobs"]
targets = ["prod-db"]
decision = "approve"
statements = ["update"]
approvers = ["uid:{ONCALL}"]
timeout = "2s"

[[rule]]
name = "event-writes-for-30m"
workloads = ["ci-jobs"]
targets = ["prod-db"]
decision = "approve"
statements = ["insert"]
tables = ["public.events"]
approvers = ["uid:{ONCALL}", "daemon", "webhook:chatops"]
grant = "30m"
"#,
        addr = pg.addr,
        secret = secret.display().to_string(),
        ca = dir.join("ca.pem").display().to_string(),
        token = token_file.display().to_string(),
    )
}

/// `psql -c` for each statement, as `nobody` in the job's cgroup, started
/// in the background.
fn psql(job: &Path, pg: &Postgres, statements: &[&str]) -> Child {
    let commands: String = statements
        .iter()
        .map(|s| format!(" -c '{}'", s.replace('\'', r"'\''")))
        .collect();
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs || exit 99\nunset PGPASSWORD PGPASSFILE; exec setpriv --reuid={REQUESTER} --regid={REQUESTER} --clear-groups psql -X -w -q -t -A -v ON_ERROR_STOP=0 -h {} -p {} -U someone -d postgres{commands}",
            job.display(),
            pg.addr.ip(),
            pg.addr.port()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn psql")
}

fn finish(child: Child) -> (i32, String, String) {
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        stdout(&output),
        stderr(&output),
    )
}

/// The CLI as another uid (no account: `interlock` needs none).
fn cli_as(agent: &Agent, uid: u32, args: &[&str]) -> std::process::Output {
    cli_as_ids(agent, uid, uid, args)
}

fn cli_as_ids(agent: &Agent, uid: u32, gid: u32, args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args([
            format!("--reuid={uid}"),
            format!("--regid={gid}"),
            "--clear-groups".into(),
        ])
        .arg(interlock_bin())
        .args(args)
        .arg("--config")
        .arg(&agent.config)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `interlock approvals list --json` (with `extra`), as a list.
fn approvals_list(agent: &Agent, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["approvals", "list", "--json"];
    args.extend_from_slice(extra);
    let out = agent.cli(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    match serde_json::from_str(&stdout(&out)).unwrap() {
        Value::Array(list) => list,
        other => panic!("not a list: {other}"),
    }
}

fn pending(agent: &Agent) -> Vec<Value> {
    approvals_list(agent, &[])
}

/// Waits for a pending request for `command` and returns it.
fn wait_request(agent: &Agent, command: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(request) = pending(agent)
            .into_iter()
            .find(|r| r["command"].as_str().is_some_and(|c| c.contains(command)))
        {
            return request;
        }
        assert!(
            Instant::now() < deadline,
            "no pending request for {command:?}:\n{}",
            agent.stderr()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn history(agent: &Agent) -> Vec<Value> {
    approvals_list(agent, &["--all"])
}

fn state_of(agent: &Agent, id: &str) -> String {
    history(agent)
        .iter()
        .find(|r| r["id"] == id)
        .map(|r| r["state"].as_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// A CA and a certificate for 127.0.0.1, and the HTTPS webhook receiver.
struct Webhook {
    child: Child,
    out: PathBuf,
}

impl Webhook {
    fn start(dir: &Path, port: u16, fail_first: u32) -> Self {
        let d = dir.display();
        let certs = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cd {d} && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=webhook-test-ca 2>/dev/null \
                 && openssl req -newkey rsa:2048 -nodes -keyout hook.key -out hook.csr -subj /CN=127.0.0.1 2>/dev/null \
                 && printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > ext.cnf \
                 && openssl x509 -req -in hook.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out hook.pem -days 2 -extfile ext.cnf 2>/dev/null"
            ))
            .status()
            .unwrap();
        assert!(certs.success(), "openssl failed");
        let out = dir.join("webhook.jsonl");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/webhook.py");
        let child = Command::new("/usr/bin/python3")
            .arg(script)
            .arg(port.to_string())
            .arg(dir.join("hook.pem"))
            .arg(dir.join("hook.key"))
            .arg(&out)
            .arg(TOKEN)
            .arg(fail_first.to_string())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Self { child, out }
    }

    fn payloads(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits for the payload of `event` about request `id`.
    fn wait_for(&self, event: &str, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(p) = self
                .payloads()
                .into_iter()
                .find(|p| p["payload"]["event"] == event && p["payload"]["request"]["id"] == id)
            {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "no webhook {event} for {id}: {:?}",
                self.payloads()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An answer through the HTTP callback, signed as a chat bot would.
fn callback(port: u16, id: &str, body: &str, token: &str, sign_with: &str) -> (u16, String) {
    let script = format!(
        "ts=$(date +%s); body='{body}'; sig=$(printf '%s.%s' \"$ts\" \"$body\" | openssl dgst -sha256 -hmac '{sign_with}' -r | cut -d' ' -f1); \
         curl -sS -o /dev/stdout -w '\\n%{{http_code}}' -X POST http://127.0.0.1:{port}/v1/approvals/{id} \
           -H 'Authorization: Bearer {token}' -H \"x-interlock-timestamp: $ts\" -H \"x-interlock-signature: sha256=$sig\" \
           -H 'content-type: application/json' --data \"$body\""
    );
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    let text = stdout(&out);
    let (body, code) = text
        .trim_end()
        .rsplit_once('\n')
        .unwrap_or(("", text.trim()));
    (code.parse().unwrap_or(0), body.to_owned())
}

/// One agent, PostgreSQL server, webhook receiver and callback of a test's
/// own.
struct Setup {
    pg: Postgres,
    _cgroup: TestCgroup,
    job: PathBuf,
    dir: PathBuf,
    webhook: Webhook,
    callback_port: u16,
    agent: Agent,
}

fn setup(name: &str, ip: &str) -> Setup {
    setup_with(name, ip, |policy| policy)
}

/// [`setup`] with the policy changed by `tweak`.
fn setup_with(name: &str, ip: &str, tweak: fn(String) -> String) -> Setup {
    let pg = Postgres::start(name, ip);
    pg.admin_sql("postgres", SETUP);
    let secret = pg.password_file("app-secret-5");
    let mut cgroup = TestCgroup::new(name);
    let (job, _) = cgroup.child("ci-job.service");
    let dir = std::env::temp_dir().join(format!("interlock-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let webhook_port = free_port();
    let callback_port = free_port();
    // The first notification fails: it must arrive anyway, retried.
    let webhook = Webhook::start(&dir, webhook_port, 1);
    let agent = Agent::start(
        &cgroup,
        name,
        &tweak(policy(&pg, &secret, webhook_port, callback_port, &dir)),
    );
    Setup {
        pg,
        _cgroup: cgroup,
        job,
        dir,
        webhook,
        callback_port,
        agent,
    }
}

/// A held DELETE waits for a person: the requester cannot approve itself,
/// a stranger or root cannot approve at all, the on-call uid can; a
/// denial and a timeout reach the client; each step is in the session,
/// the access log and the webhook.
#[test]
fn approvers_approve_deny_and_time_out() {
    let Setup {
        pg,
        job,
        webhook,
        agent,
        ..
    } = &setup("approvals", "127.0.0.60");
    // 1. A DELETE waits; the requester cannot approve itself, a stranger
    //    cannot approve at all, the on-call uid can.
    let client = psql(
        job,
        pg,
        &[
            "DELETE FROM orders WHERE id = 1",
            "SELECT count(*) FROM orders",
        ],
    );
    let request = wait_request(agent, "DELETE FROM orders WHERE id = 1");
    let id = request["id"].as_str().unwrap().to_owned();
    assert_eq!(request["rule"], "deletes-need-oncall");
    assert_eq!(request["target"], "prod-db");
    assert_eq!(request["requester"]["uid"], REQUESTER);
    assert_eq!(request["requester"]["workloads"][0], "ci-jobs");
    assert!(
        request["requester"]["exe"]
            .as_str()
            .unwrap()
            .ends_with("psql")
    );
    assert_eq!(
        pg.admin_sql("postgres", "SELECT count(*) FROM orders WHERE id = 1")
            .trim(),
        "1"
    );

    // Anyone may list, but only sees what they may answer.
    let out = cli_as(agent, STRANGER, &["approvals", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("no pending requests"),
        "{}",
        stdout(&out)
    );
    let out = cli_as(agent, ONCALL, &["approvals", "list"]);
    let listed = stdout(&out);
    assert!(
        listed.contains(&id) && listed.contains("DELETE FROM orders WHERE id = 1"),
        "{listed}"
    );
    assert!(
        listed.contains("nobody (uid 65534)") && listed.contains("age"),
        "{listed}"
    );

    let out = cli_as(agent, REQUESTER, &["approvals", "approve", &id]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot answer for its own workload"),
        "{}",
        stderr(&out)
    );
    let out = cli_as(agent, STRANGER, &["approvals", "approve", &id]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is not an approver"),
        "{}",
        stderr(&out)
    );
    // Root administers the agent, but is not an approver of this rule.
    let out = agent.cli(&["approvals", "approve", &id]);
    assert!(
        stderr(&out).contains("is not an approver"),
        "{}",
        stderr(&out)
    );
    assert_eq!(state_of(agent, &id), "pending");

    let out = cli_as(
        agent,
        ONCALL,
        &["approvals", "approve", &id, "--reason", "ticket OPS-1"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let (code, out, err) = finish(client);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(out.trim(), "99", "the DELETE ran, then the session went on");
    assert!(
        err.contains(&format!("request {id} is waiting")),
        "the NOTICE: {err}"
    );
    assert!(err.contains("approved by uid:5001"), "{err}");
    assert_eq!(
        pg.admin_sql("postgres", "SELECT count(*) FROM orders WHERE id = 1")
            .trim(),
        "0"
    );

    // 2. Denied: the client gets 42501 naming who and why; the session goes on.
    let client = psql(
        job,
        pg,
        &[
            "DELETE FROM orders WHERE id = 2",
            "SELECT count(*) FROM orders",
        ],
    );
    let denied_id = wait_request(agent, "id = 2")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = cli_as(agent, ONCALL, &["approvals", "deny", &denied_id]);
    assert!(!out.status.success(), "a denial needs a reason");
    // Denied by a member of an approving group.
    let out = cli_as_ids(
        agent,
        GROUP_MEMBER,
        USERS_GID,
        &[
            "approvals",
            "deny",
            &denied_id,
            "--reason",
            "not during the freeze",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let (_, out, err) = finish(client);
    assert_eq!(out.trim(), "99", "{out}\n{err}");
    assert!(
        err.contains(&format!(
            "approval request {denied_id} was denied by uid:5004: not during the freeze"
        )),
        "{err}"
    );
    assert_eq!(
        pg.admin_sql("postgres", "SELECT count(*) FROM orders WHERE id = 2")
            .trim(),
        "1"
    );

    // 3. Timed out after the rule's 2 s.
    let client = psql(
        job,
        pg,
        &["UPDATE orders SET total = 0 WHERE id = 3", "SELECT 1"],
    );
    let (_, out, err) = finish(client);
    assert_eq!(out.trim(), "1", "{err}");
    assert!(
        err.contains("timed out after 2s with 0 of 1 approvals"),
        "{err}"
    );
    assert_eq!(
        pg.admin_sql("postgres", "SELECT total FROM orders WHERE id = 3")
            .trim(),
        "30"
    );

    for (event, request) in [
        ("approval.pending", &id),
        ("approval.approved", &id),
        ("approval.denied", &denied_id),
    ] {
        let delivered = webhook.wait_for(event, request);
        assert_eq!(delivered["signature_ok"], true, "{delivered}");
        assert!(
            delivered["payload"]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        );
    }
    let first = webhook.wait_for("approval.pending", &id);
    assert!(
        first["payload"]["text"]
            .as_str()
            .unwrap()
            .contains(&format!("interlock approvals approve {id}"))
    );

    // 8. Records: events in the session (signed and shipped with it) and
    //    lines in the access log.
    let sessions = agent.cli(&[
        "sessions",
        "show",
        request["session_id"].as_str().unwrap(),
        "--json",
    ]);
    let shown = stdout(&sessions);
    assert!(
        shown.contains("\"approval_requested\"") && shown.contains("\"approval_decided\""),
        "{shown}"
    );
    assert!(
        shown.contains("ticket OPS-1"),
        "the approver's reason is recorded: {shown}"
    );
    let verify = agent.cli(&[
        "sessions",
        "verify",
        request["session_id"].as_str().unwrap(),
    ]);
    assert!(verify.status.success(), "{}", stderr(&verify));
    let lines = agent.all_lines();
    let approval_lines: Vec<&Value> = lines.iter().filter(|l| l["event"] == "approval").collect();
    for state in ["pending", "approved", "denied", "timed_out"] {
        assert!(
            approval_lines.iter().any(|l| l["state"] == state),
            "no {state} line: {approval_lines:?}"
        );
    }
}

/// While one session waits, others run at full speed; a cancel (psql's
/// Ctrl-C) or a client that leaves withdraws its request.
#[test]
fn a_held_statement_slows_no_one_and_its_client_can_withdraw_it() {
    let Setup {
        pg,
        job,
        dir,
        webhook,
        agent,
        ..
    } = &setup("approvals-wait", "127.0.0.64");
    // 4. While one session waits, another runs SELECTs at full speed:
    //    measured against the same run with nothing held, and printed.
    let reads_tps = || {
        let reads = sh_in(
            job,
            &format!(
                "printf 'SELECT count(*) FROM orders;\\n' > {dir}/select.sql; \
                 exec pgbench -n -T 3 -c 1 -f {dir}/select.sql -h {} -p {} -U someone postgres",
                pg.addr.ip(),
                pg.addr.port(),
                dir = dir.display(),
            ),
        );
        assert!(reads.status.success(), "{}", stderr(&reads));
        let report = stdout(&reads);
        report
            .lines()
            .find_map(|l| l.strip_prefix("tps = "))
            .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{report}"))
    };
    let alone = reads_tps();
    let waiting = psql(job, pg, &["DELETE FROM orders WHERE id = 4"]);
    let waiting_id = wait_request(agent, "id = 4")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let beside = reads_tps();
    println!(
        "SELECT sessions through the agent: {alone:.0} TPS alone, {beside:.0} TPS while a DELETE waits for approval ({:.2}x)",
        beside / alone
    );
    assert_eq!(
        state_of(agent, &waiting_id),
        "pending",
        "it waited all along"
    );

    // 5. Ctrl-C in psql (a cancel request) withdraws a held statement; so
    //    does a client that leaves while it waits.
    let cancelled = psql(job, pg, &["DELETE FROM orders WHERE id = 6"]);
    let cancelled_id = wait_request(agent, "id = 6")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // SAFETY: signalling a child of ours (sh exec'd setpriv exec'd psql).
    unsafe { libc::kill(cancelled.id() as i32, libc::SIGINT) };
    let (_, _, err) = finish(cancelled);
    assert!(err.contains("the client cancelled the statement"), "{err}");
    assert_eq!(state_of(agent, &cancelled_id), "withdrawn");
    assert_eq!(
        pg.admin_sql("postgres", "SELECT count(*) FROM orders WHERE id = 6")
            .trim(),
        "1"
    );

    // SAFETY: signalling a child of ours.
    unsafe { libc::kill(waiting.id() as i32, libc::SIGKILL) };
    let _ = finish(waiting);
    let deadline = Instant::now() + Duration::from_secs(10);
    while state_of(agent, &waiting_id) != "withdrawn" {
        assert!(
            Instant::now() < deadline,
            "not withdrawn: {:?}",
            history(agent)
        );
        thread::sleep(Duration::from_millis(100));
    }

    webhook.wait_for("approval.withdrawn", &waiting_id);
    let lines = agent.all_lines();
    assert!(
        lines
            .iter()
            .any(|l| l["event"] == "approval" && l["state"] == "withdrawn"),
        "{lines:?}"
    );
}

/// A chat bot approves through the signed callback; the rule's grant lets
/// the workload's next statements through, survives a restart (a request
/// held when the agent died is abandoned), and ends when revoked.
#[test]
fn a_callback_grant_outlives_a_restart_until_revoked() {
    let Setup {
        pg,
        job,
        webhook,
        callback_port,
        agent,
        ..
    } = &mut setup("approvals-grant", "127.0.0.65");
    let callback_port = *callback_port;
    // 6. A chat bot approves through the callback; the rule grants 30 minutes.
    let client = psql(job, pg, &["INSERT INTO events (what) VALUES ($$first$$)"]);
    let grant_request = wait_request(agent, "first")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let approve = r#"{"decision":"approve","approver":"chatops","reason":"OPS-2"}"#;
    let (code, body) = callback(callback_port, &grant_request, approve, "wrong-token", TOKEN);
    assert_eq!(code, 401, "{body}");
    let (code, body) = callback(callback_port, &grant_request, approve, TOKEN, "wrong-key");
    assert_eq!(code, 401, "unsigned answers are refused: {body}");
    let stranger = r#"{"decision":"approve","approver":"mallory"}"#;
    let (code, body) = callback(callback_port, &grant_request, stranger, TOKEN, TOKEN);
    assert_eq!(code, 403, "{body}");
    let (code, body) = callback(callback_port, &grant_request, approve, TOKEN, TOKEN);
    assert_eq!(code, 200, "{body}");
    let answered: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answered["state"], "approved");
    let grant = answered["grant_id"].as_str().unwrap().to_owned();
    let (code, _, err) = finish(client);
    assert_eq!(code, 0, "{err}");

    // The next INSERT of the same workload goes through without asking.
    let client = psql(job, pg, &["INSERT INTO events (what) VALUES ($$second$$)"]);
    let (code, _, err) = finish(client);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("waiting"), "a grant lets it through: {err}");
    let out = agent.cli(&["grants", "list", "--json"]);
    let grants: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(grants.as_array().unwrap().len(), 1, "{grants}");
    assert_eq!(grants[0]["id"], grant.as_str());
    assert_eq!(grants[0]["rule"], "event-writes-for-30m");

    let out = agent.cli(&["status"]);
    assert!(
        stdout(&out).contains("0 pending, 1 active grants"),
        "{}",
        stdout(&out)
    );

    webhook.wait_for("approval.approved", &grant_request);
    assert!(
        agent
            .all_lines()
            .iter()
            .any(|l| l["event"] == "grant" && l["change"] == "granted")
    );

    // 9. Restart: a request held when the agent dies is abandoned; the
    //    grant survives, and stops after `grants revoke`.
    let held = psql(job, pg, &["DELETE FROM orders WHERE id = 5"]);
    let lost = wait_request(agent, "id = 5")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    agent.kill9();
    let (code, _, err) = finish(held);
    assert_ne!(code, 0, "the held client was disconnected: {err}");
    agent.spawn();
    assert_eq!(state_of(agent, &lost), "abandoned");
    let out = agent.cli(&["grants", "list"]);
    assert!(stdout(&out).contains(&grant), "{}", stdout(&out));
    let out = cli_as(agent, STRANGER, &["grants", "revoke", &grant]);
    assert!(!out.status.success(), "a stranger cannot revoke");
    // Revoked by an approver named by user name.
    let out = cli_as(
        agent,
        DAEMON,
        &["grants", "revoke", &grant, "--reason", "done"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let client = psql(job, pg, &["INSERT INTO events (what) VALUES ($$third$$)"]);
    let asked = wait_request(agent, "third")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        state_of(agent, &asked),
        "pending",
        "asked again after the revoke"
    );
    // A graceful stop tells the held client before it goes.
    agent.terminate();
    let (_, _, err) = finish(client);
    assert!(err.contains("abandoned"), "{err}");
    assert_eq!(
        pg.admin_sql("postgres", "SELECT count(*) FROM events")
            .trim(),
        "2"
    );
}

/// `require_reason`: a DELETE without a stated reason is refused at once,
/// saying how to give one, and nobody is asked; with `INTERLOCK_REASON` in
/// the client's environment it is held, the approver sees the reason
/// (marked as the caller's own), and the session records it.
#[test]
fn a_reason_is_asked_for_then_shown_to_the_approver_and_recorded() {
    let Setup { pg, job, agent, .. } = &setup_with("approvals-reason", "127.0.0.93", |policy| {
        policy.replace(
            "timeout = \"2m\"",
            "timeout = \"2m\"\nrequire_reason = true",
        )
    });
    let delete_sql = |reason: Option<&str>, sql: &str| {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs || exit 99\nexec setpriv --reuid={REQUESTER} --regid={REQUESTER} --clear-groups psql -X -w -q -t -A -h {} -p {} -U someone -d postgres -c '{sql}'",
                job.display(),
                pg.addr.ip(),
                pg.addr.port()
            ))
            .env_remove("INTERLOCK_REASON")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(reason) = reason {
            command.env("INTERLOCK_REASON", reason);
        }
        command.spawn().unwrap()
    };
    let delete = |reason: Option<&str>| delete_sql(reason, "DELETE FROM orders WHERE id = 2");
    let (code, _, err) = finish(delete(None));
    assert_ne!(code, 0);
    assert!(
        err.contains("needs a stated reason") && err.contains("INTERLOCK_REASON"),
        "{err}"
    );
    assert!(
        pending(agent).is_empty(),
        "nobody is asked without a reason"
    );
    assert_eq!(
        pg.admin_sql("postgres", "SELECT count(*) FROM orders WHERE id = 2")
            .trim(),
        "1"
    );

    let client = delete(Some("INC-4211 cleanup"));
    let request = wait_request(agent, "DELETE FROM orders WHERE id = 2");
    assert_eq!(request["requester"]["reason"], "INC-4211 cleanup");
    let id = request["id"].as_str().unwrap().to_owned();
    let out = cli_as(agent, ONCALL, &["approvals", "list"]);
    assert!(
        stdout(&out).contains("reason    INC-4211 cleanup (stated by the caller)"),
        "{}",
        stdout(&out)
    );
    let out = cli_as(agent, ONCALL, &["approvals", "approve", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (code, _, err) = finish(client);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        pg.admin_sql("postgres", "SELECT count(*) FROM orders WHERE id = 2")
            .trim(),
        "0"
    );
    // Recorded with the request, and with the caller.
    let events = agent.session_events();
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "approval_requested" && e["reason"] == "INC-4211 cleanup"),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "session_start" && e["workload"]["reason"] == "INC-4211 cleanup")
    );

    // A PostgreSQL client may state it in a comment of the query instead.
    let client = delete_sql(
        None,
        "/* reason: INC-99 stale order */ DELETE FROM orders WHERE id = 3",
    );
    let request = wait_request(agent, "DELETE FROM orders WHERE id = 3");
    assert_eq!(request["requester"]["reason"], "INC-99 stale order");
    let id = request["id"].as_str().unwrap().to_owned();
    let out = cli_as(
        agent,
        ONCALL,
        &["approvals", "deny", &id, "--reason", "not now"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let (code, _, err) = finish(client);
    assert_ne!(code, 0);
    assert!(err.contains("not now"), "{err}");

    // Or in its application_name, with no change to the query
    // (`PGAPPNAME`, libpq's own variable, sent at startup).
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs || exit 99\nexec setpriv --reuid={REQUESTER} --regid={REQUESTER} --clear-groups psql -X -w -q -t -A -h {} -p {} -U someone -d postgres -c 'DELETE FROM orders WHERE id = 4'",
            job.display(),
            pg.addr.ip(),
            pg.addr.port()
        ))
        .env_remove("INTERLOCK_REASON")
        .env("PGAPPNAME", "reason: INC-7 by appname")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let client = command.spawn().unwrap();
    let request = wait_request(agent, "DELETE FROM orders WHERE id = 4");
    assert_eq!(request["requester"]["reason"], "INC-7 by appname");
    let id = request["id"].as_str().unwrap().to_owned();
    let out = cli_as(agent, ONCALL, &["approvals", "approve", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(finish(client).0, 0);
}

/// `interlock request`, run by the job itself, asks up front for 3 s of
/// deletes on one table under a `requestable` rule: a wider request is
/// refused before anyone is asked; the approver sees scope, duration and
/// reason; once approved, deletes on that table go through without
/// asking, while a query that also deletes elsewhere is held as before;
/// after 3 s the same delete is held again. The grant and its use are in
/// the records.
#[test]
fn a_grant_asked_up_front_covers_its_scope_for_its_time() {
    let Setup { pg, job, agent, .. } = &setup_with("approvals-request", "127.0.0.94", |policy| {
        policy
            .replace(
                "statements = [\"delete\"]\ntables = [\"public.orders\"]",
                "statements = [\"delete\"]\ntables = [\"public.*\"]\nrequestable = true\nmax_duration = \"1m\"",
            )
            .replace("timeout = \"2m\"", "timeout = \"20s\"")
    });
    let request = |args: &[&str]| {
        let quoted: Vec<String> = args
            .iter()
            .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
            .collect();
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs || exit 99\nexec setpriv --reuid={REQUESTER} --regid={REQUESTER} --clear-groups {} request --config {} {}",
                job.display(),
                interlock_bin().display(),
                agent.config.display(),
                quoted.join(" ")
            ))
            .env_remove("INTERLOCK_REASON")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let orders_left = |ids: &str| {
        pg.admin_sql(
            "postgres",
            &format!("SELECT count(*) FROM orders WHERE id IN ({ids})"),
        )
        .trim()
        .to_owned()
    };

    // Wider than the rule, longer than it allows, or without a reason:
    // refused at once, and nobody is asked.
    for (args, expected) in [
        (
            &[
                "--target",
                "prod-db",
                "--statements",
                "delete",
                "--tables",
                "public.orders",
                "--for",
                "2h",
                "--reason",
                "r",
            ][..],
            "grants at most 1m",
        ),
        (
            &[
                "--target",
                "prod-db",
                "--statements",
                "drop",
                "--tables",
                "public.orders",
                "--for",
                "3s",
                "--reason",
                "r",
            ][..],
            "not about drop statements",
        ),
        (
            &[
                "--target",
                "prod-db",
                "--statements",
                "delete",
                "--tables",
                "other.orders",
                "--for",
                "3s",
                "--reason",
                "r",
            ][..],
            "not about table other.orders",
        ),
        (
            &[
                "--target",
                "prod-db",
                "--statements",
                "delete",
                "--tables",
                "public.orders",
                "--for",
                "3s",
            ][..],
            "needs a reason",
        ),
    ] {
        let (code, _, err) = finish(request(args));
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    // Asking for another workload is for admins and the rule's approvers.
    let out = cli_as(
        agent,
        STRANGER,
        &[
            "request",
            "--target",
            "prod-db",
            "--for",
            "3s",
            "--reason",
            "r",
            "--workload",
            "ci-jobs",
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("only admins and approvers"),
        "{}",
        stderr(&out)
    );
    assert!(pending(agent).is_empty(), "nobody is asked");

    // The job asks; the approver sees what, for how long, and why.
    let asking = request(&[
        "--target",
        "prod-db",
        "--statements",
        "delete",
        "--tables",
        "public.orders",
        "--for",
        "3s",
        "--reason",
        "INC-4211 cleanup",
    ]);
    let asked = wait_request(agent, "grant: delete on public.orders, for 3s");
    assert_eq!(asked["up_front"], true);
    assert_eq!(asked["rule"], "deletes-need-oncall");
    assert_eq!(asked["requester"]["reason"], "INC-4211 cleanup");
    assert_eq!(asked["scope"]["tables"][0], "public.orders");
    let id = asked["id"].as_str().unwrap().to_owned();
    let listed = stdout(&cli_as(agent, ONCALL, &["approvals", "list"]));
    assert!(
        listed.contains("INC-4211 cleanup")
            && listed.contains("grant: delete on public.orders, for 3s"),
        "{listed}"
    );
    let out = cli_as(agent, ONCALL, &["approvals", "approve", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (code, out, err) = finish(asking);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("granted: grant"), "{out}");
    let granted_at = Instant::now();
    let grants = stdout(&agent.cli(&["grants", "list"]));
    assert!(
        grants.contains("expires in") && grants.contains("covers delete on public.orders"),
        "{grants}"
    );

    // In scope: through without asking.
    let (code, _, err) = finish(psql(job, pg, &["DELETE FROM orders WHERE id = 5"]));
    assert!(
        granted_at.elapsed() < Duration::from_secs(3),
        "the machine is too slow to use a 3 s grant in time"
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(orders_left("5"), "0");

    // Out of scope in the same query (a second table, by a CTE): held.
    for sql in [
        "DELETE FROM orders WHERE id = 7; DELETE FROM events",
        "WITH gone AS (DELETE FROM events RETURNING id) DELETE FROM orders WHERE id = 8 OR id IN (SELECT id FROM gone)",
    ] {
        let client = psql(job, pg, &[sql]);
        let held = wait_request(agent, sql);
        let held_id = held["id"].as_str().unwrap().to_owned();
        let out = cli_as(
            agent,
            ONCALL,
            &[
                "approvals",
                "deny",
                &held_id,
                "--reason",
                "outside the grant",
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let (code, _, err) = finish(client);
        assert_ne!(code, 0);
        assert!(err.contains("outside the grant"), "{err}");
    }
    assert_eq!(orders_left("7, 8"), "2");

    // Expired: the same delete is held again.
    thread::sleep(Duration::from_secs(3).saturating_sub(granted_at.elapsed()));
    let client = psql(job, pg, &["DELETE FROM orders WHERE id = 6"]);
    let held = wait_request(agent, "DELETE FROM orders WHERE id = 6");
    let out = cli_as(
        agent,
        ONCALL,
        &[
            "approvals",
            "deny",
            held["id"].as_str().unwrap(),
            "--reason",
            "expired",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_ne!(finish(client).0, 0);
    assert_eq!(orders_left("6"), "1");

    // The grant, and its one use, in the records.
    let all: Value =
        serde_json::from_str(&stdout(&agent.cli(&["grants", "list", "--all", "--json"]))).unwrap();
    let grant = all
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["request_id"] == id.as_str())
        .expect("the grant is on record");
    assert_eq!(grant["scope"]["statements"][0], "delete");
    let used: Vec<Value> = agent
        .session_events()
        .into_iter()
        .filter(|e| e["kind"] == "grant_used")
        .collect();
    assert_eq!(used.len(), 1, "{used:?}");
    assert_eq!(used[0]["grant"], grant["id"]);
    assert_eq!(used[0]["request"], id.as_str());
    assert_eq!(used[0]["reason"], "INC-4211 cleanup");
}

/// `webhook_format = "slack"`: the message carries the request's details
/// and signed approve/deny links to the callback. Opening a link (as a
/// link preview would) changes nothing; a tampered link is refused; a
/// denial through its link needs a reason; the approve form answers as
/// `webhook:link`, and the held DELETE goes on.
#[test]
fn a_slack_message_links_to_an_answer_form() {
    let Setup {
        pg,
        job,
        webhook,
        agent,
        ..
    } = &setup_with("approvals-slack", "127.0.0.95", |policy| {
        policy
            .replace("[approvals]\n", "[approvals]\nwebhook_format = \"slack\"\n")
            .replace("\"group:users\"]", "\"group:users\", \"webhook:link\"]")
    });
    let client = psql(
        job,
        pg,
        &["/* reason: INC-12 */ DELETE FROM orders WHERE id = 9"],
    );
    let request = wait_request(agent, "DELETE FROM orders WHERE id = 9");
    let id = request["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    let message = loop {
        if let Some(p) = webhook.payloads().into_iter().find(|p| {
            p["payload"]["blocks"].to_string().contains(&id)
                && p["payload"]["blocks"][1]["type"] == "actions"
        }) {
            break p["payload"].clone();
        }
        assert!(Instant::now() < deadline, "{:?}", webhook.payloads());
        thread::sleep(Duration::from_millis(100));
    };
    let details = message["blocks"][0]["text"]["text"].as_str().unwrap();
    assert!(
        details.contains("INC-12") && details.contains("deletes-need-oncall"),
        "{details}"
    );
    let buttons = &message["blocks"][1]["elements"];
    let approve = buttons[0]["url"].as_str().unwrap().to_owned();
    let deny = buttons[1]["url"].as_str().unwrap().to_owned();
    assert!(
        approve.contains(&format!("/v1/links/{id}/approve?")),
        "{approve}"
    );

    let curl = |args: &[&str]| {
        let out = Command::new("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .unwrap();
        let text = stdout(&out);
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.to_owned(), body.to_owned())
    };
    // Opening it shows the request and changes nothing.
    let (code, page) = curl(&[&approve]);
    assert_eq!(code, "200", "{page}");
    assert!(
        page.contains("DELETE FROM orders WHERE id = 9") && page.contains("<form"),
        "{page}"
    );
    assert_eq!(state_of(agent, &id), "pending");
    // A link for another decision, or signed for another request, is refused.
    let forged = approve.replace("/approve?", "/deny?");
    assert_eq!(curl(&["-X", "POST", "-d", "reason=x", &forged]).0, "401");
    let other = approve.replace(&id[..4], "0000");
    assert_eq!(curl(&["-X", "POST", &other]).0, "401");
    // A denial needs its reason.
    assert_eq!(curl(&["-X", "POST", "-d", "reason=", &deny]).0, "400");
    assert_eq!(state_of(agent, &id), "pending");

    let (code, page) = curl(&["-X", "POST", "-d", "reason=looks+fine", &approve]);
    assert_eq!(code, "200", "{page}");
    assert!(page.contains("approved"), "{page}");
    let (code, _, err) = finish(client);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        pg.admin_sql("postgres", "SELECT count(*) FROM orders WHERE id = 9")
            .trim(),
        "0"
    );
    let decided = agent
        .session_events()
        .into_iter()
        .find(|e| e["kind"] == "approval_decided" && e["id"] == id.as_str())
        .expect("the decision is recorded");
    assert_eq!(decided["by"][0], "webhook:link");
    // Used once, the link answers no more.
    assert_ne!(curl(&["-X", "POST", &approve]).0, "200");
}
