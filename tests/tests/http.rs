//! HTTP targets with real parts: `curl` in a job's cgroup, with a token of
//! its own that must never count, reaches a real nginx over HTTPS (HTTP/2
//! and HTTP/1.1) through the agent, which holds the token nginx accepts.
//! Every request is decided by method, path and host; what a workload
//! would try to get around a path rule (dot segments, encoded dots and
//! slashes, doubled slashes, needless escapes, a lower-case method) is
//! refused before it reaches nginx, whose own log is the proof.
use std::{
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use interlock_e2e::*;
use serde_json::Value;

const ONCALL: u32 = 5001;

fn policy(nginx: &Nginx) -> String {
    policy_recording(nginx, "commands")
}

fn policy_recording(nginx: &Nginx, record: &str) -> String {
    format!(
        r#"
[[target]]
name = "api"
protocol = "http"
address = "127.0.0.1:{port}"
tls_ca_file = {ca:?}
record = "{record}"
[target.credential]
bearer_token_file = {token:?}

[[workload]]
name = "ci-jobs"
unit = "ci-job.service"

[[rule]]
name = "ci-reads-the-api"
workloads = ["ci-jobs"]
targets = ["api"]
decision = "allow"
methods = ["GET", "HEAD"]
paths = ["/api/v1/**", "/big"]

[[rule]]
name = "echo-takes-any-method"
workloads = ["ci-jobs"]
targets = ["api"]
decision = "allow"
paths = ["/api/v1/echo"]

[[rule]]
name = "no-deletes"
workloads = ["ci-jobs"]
targets = ["api"]
decision = "deny"
methods = ["DELETE"]

[[rule]]
name = "deploys-need-oncall"
workloads = ["ci-jobs"]
targets = ["api"]
decision = "approve"
methods = ["POST"]
paths = ["/api/v1/deploy"]
approvers = ["uid:{ONCALL}"]
timeout = "2m"
"#,
        port = nginx.port,
        ca = nginx.ca(),
        token = nginx.token_file(),
    )
}

/// The client's own token: nginx must never see it.
const CLIENT_TOKEN: &str = "client-token-should-not-pass";

/// `curl` in the job's cgroup with the client's token, trusting the
/// agent's CA; `extra` goes before the URL. Prints the body, then
/// `status version` on the last line.
fn curl_command(agent: &Agent, extra: &str, url: &str) -> String {
    format!(
        "exec curl -sS --max-time 60 --cacert {ca} -H 'Authorization: Bearer {CLIENT_TOKEN}' \
         -w '\\n%{{http_code}} %{{http_version}}\\n' {extra} '{url}'",
        ca = agent.workdir.join("state/ca/ca.pem").display(),
    )
}

struct Answer {
    status: u16,
    version: String,
    body: String,
    all: String,
}

fn answer(out: &Output) -> Answer {
    let text = stdout(out);
    let (body, last) = text
        .trim_end()
        .rsplit_once('\n')
        .unwrap_or(("", text.trim()));
    let mut last = last.split_whitespace();
    Answer {
        status: last.next().and_then(|s| s.parse().ok()).unwrap_or(0),
        version: last.next().unwrap_or("").to_owned(),
        body: body.to_owned(),
        all: format!("{text}{}", stderr(out)),
    }
}

fn curl(job: &std::path::Path, agent: &Agent, extra: &str, url: &str) -> Answer {
    answer(&sh_in(job, &curl_command(agent, extra, url)))
}

fn json(answer: &Answer) -> Value {
    serde_json::from_str(&answer.body).unwrap_or_else(|e| panic!("{e}: not JSON: {:?}", answer.all))
}

#[test]
fn http_requests_are_decided_one_by_one_with_the_held_token() {
    require_root();
    let name = "http-requests";
    let nginx = Nginx::start(name);
    let mut cgroup = TestCgroup::new(name);
    let (job, _) = cgroup.child("ci-job.service");
    // Clients also call the target api.test: a name the local CA may
    // vouch for besides the target's address.
    let agent = Agent::start_with(&cgroup, name, "ca_names = [\"api.test\"]", &policy(&nginx));
    let base = format!("https://127.0.0.1:{}", nginx.port);

    // Allowed, over HTTP/2 (curl's choice by ALPN) and HTTP/1.1: nginx
    // answers, having seen the held token only.
    let got = curl(&job, &agent, "", &format!("{base}/api/v1/items"));
    assert_eq!(
        (got.status, got.version.as_str()),
        (200, "2"),
        "{}",
        got.all
    );
    assert_eq!(json(&got)["uri"], "/api/v1/items");
    let got = curl(
        &job,
        &agent,
        "--http1.1",
        &format!("{base}/api/v1/items?page=2"),
    );
    assert_eq!(
        (got.status, got.version.as_str()),
        (200, "1.1"),
        "{}",
        got.all
    );
    assert_eq!(json(&got)["uri"], "/api/v1/items?page=2");
    assert!(
        !got.all.contains(HELD_TOKEN),
        "the held token reached the client"
    );
    // Upstream, the agent speaks what the client spoke: HTTP/2 (which
    // nginx offers) for the first, HTTP/1.1 for the second.
    let protocols = nginx.protocols();
    assert!(
        protocols.contains(&"HTTP/2.0 GET /api/v1/items".to_owned())
            && protocols.contains(&"HTTP/1.1 GET /api/v1/items?page=2".to_owned()),
        "{protocols:?}"
    );
    // A client speaking plain HTTP to the HTTPS target: the agent's hop up
    // is TLS all the same.
    let got = curl(
        &job,
        &agent,
        "",
        &format!("http://127.0.0.1:{}/api/v1/plain", nginx.port),
    );
    assert_eq!(got.status, 200, "{}", got.all);
    // The name the client used is the certificate's (SNI) and the Host.
    let got = curl(
        &job,
        &agent,
        &format!("--resolve api.test:{0}:127.0.0.1", nginx.port),
        &format!("https://api.test:{}/api/v1/named", nginx.port),
    );
    assert_eq!(got.status, 200, "{}", got.all);
    assert_eq!(json(&got)["host"], "api.test");
    // Any other name: the CA is constrained to the target's address and
    // `ca_names`, so curl (OpenSSL) refuses the certificate it is given.
    let got = curl(
        &job,
        &agent,
        &format!("--resolve bank.example:{0}:127.0.0.1", nginx.port),
        &format!("https://bank.example:{}/api/v1/named", nginx.port),
    );
    assert_eq!(got.status, 0, "{}", got.all);
    assert!(
        got.all.contains("certificate") || got.all.contains("SSL"),
        "{}",
        got.all
    );

    // An endpoint that echoes what it got: the held token comes back
    // blanked out, in the body and in a header.
    let got = curl(&job, &agent, "-i", &format!("{base}/api/v1/echo"));
    assert_eq!(got.status, 200, "{}", got.all);
    assert!(!got.all.contains(HELD_TOKEN), "{}", got.all);
    assert!(
        got.all
            .contains(&format!("Bearer {}", "*".repeat(HELD_TOKEN.len()))),
        "{}",
        got.all
    );
    // TRACE would echo the request as nginx got it: never relayed.
    let got = curl(&job, &agent, "-X TRACE", &format!("{base}/api/v1/echo"));
    assert_eq!(got.status, 501, "{}", got.all);

    // Denied: by the deny rule, and by no rule; 403 naming the rule.
    let got = curl(&job, &agent, "-X DELETE", &format!("{base}/api/v1/items/3"));
    assert_eq!(got.status, 403, "{}", got.all);
    assert_eq!(json(&got)["rule"], "no-deletes");
    let got = curl(&job, &agent, "", &format!("{base}/admin/users"));
    assert_eq!(got.status, 403, "{}", got.all);
    assert_eq!(json(&got)["rule"], Value::Null);
    assert!(
        json(&got)["reason"]
            .as_str()
            .unwrap()
            .contains("no rule allows GET /admin/users"),
        "{}",
        got.body
    );

    // Other spellings of a path the allow rule does not cover: each would
    // reach /admin on a server that normalises; each is refused (400).
    for (extra, path) in [
        ("--path-as-is", "/api/v1/../../admin/users"),
        ("--path-as-is", "/api/v1/./../../admin"),
        ("", "/api/v1/%2e%2e/%2e%2e/admin"),
        ("", "/api/v1/%2E%2E/%2E%2E/admin"),
        ("", "/api/v1%2F..%2F..%2Fadmin"),
        ("--path-as-is", "/api/v1//../admin"),
        ("", "/api/v1/..;/..;/admin"),
        ("", "/%61pi/v1/items"),
        ("", "/api/v1/items%5C..%5Cadmin"),
    ] {
        let got = curl(&job, &agent, extra, &format!("{base}{path}"));
        assert_eq!(got.status, 400, "{path}: {}", got.all);
    }
    // A request must name one host: two Host headers, or none, are 400.
    for head in [
        "GET /api/v1/items HTTP/1.1\\r\\nHost: api.test\\r\\nHost: admin.test\\r\\n",
        "GET /api/v1/items HTTP/1.0\\r\\n",
    ] {
        let status = raw_request(&job, &agent, nginx.port, head);
        assert!(status.contains(" 400 Bad Request"), "{head}: {status}");
    }
    // An absolute URL names the host decided, and it is the one sent.
    let status = raw_request(
        &job,
        &agent,
        nginx.port,
        &format!(
            "GET https://api.test:{}/api/v1/absolute HTTP/1.1\\r\\nHost: admin.test\\r\\n",
            nginx.port
        ),
    );
    assert!(status.contains("\"host\": \"api.test\""), "{status}");
    // Methods are case-sensitive on some servers and not on others.
    let got = curl(&job, &agent, "-X delete", &format!("{base}/api/v1/items/3"));
    assert_eq!(got.status, 400, "{}", got.all);

    // A 100 MB download streams through.
    let got = curl(
        &job,
        &agent,
        "-o /dev/null -w '%{size_download}\\n'",
        &format!("{base}/big"),
    );
    assert!(got.all.contains("104857600"), "{}", got.all);

    // nginx saw the allowed requests only, each with the held token.
    let seen = nginx.seen_at_least(7);
    assert_eq!(seen.len(), 7, "{seen:#?}");
    for line in &seen {
        assert!(line.ends_with(&format!("Bearer {HELD_TOKEN}")), "{line}");
        assert!(
            !line.contains("admin") && !line.contains("DELETE"),
            "{line}"
        );
    }

    // Recorded: one event per request, its decision, and how it ended.
    let events = http_events(&agent);
    let requests: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "http_request")
        .collect();
    assert_eq!(requests.len(), 22, "{requests:#?}");
    let denied = requests
        .iter()
        .find(|e| e["method"] == "DELETE" && e["path"] == "/api/v1/items/3")
        .unwrap();
    assert_eq!(
        (&denied["decision"], &denied["rule"]),
        (&Value::from("deny"), &Value::from("no-deletes"))
    );
    let big = events
        .iter()
        .find(|e| e["kind"] == "http_response" && e["bytes"] == 104857600)
        .expect("the download's response is recorded with its bytes");
    assert_eq!(big["status"], 200);
    for event in &events {
        assert!(!event.to_string().contains(HELD_TOKEN), "{event}");
    }

    // 40 requests at once on one HTTP/2 connection, which the agent
    // multiplexes on one upstream connection that nginx closes (GOAWAY)
    // every 5: the requests caught in a close go again on a new one.
    let urls: String = (0..40)
        .map(|i| format!(" -o /dev/null '{base}/api/v1/items?burst={i}'"))
        .collect();
    let out = sh_in(
        &job,
        &format!(
            "exec curl -sS --max-time 60 --cacert {ca} --parallel --parallel-max 40 \
             -w '%{{http_code}}\n'{urls}",
            ca = agent.workdir.join("state/ca/ca.pem").display(),
        ),
    );
    let codes = stdout(&out);
    assert_eq!(
        codes.lines().filter(|c| *c == "200").count(),
        40,
        "{codes}{}",
        stderr(&out)
    );
    // nginx ran each of them once.
    let seen = nginx.seen_at_least(47);
    let burst: std::collections::BTreeSet<_> =
        seen.iter().filter(|l| l.contains("?burst=")).collect();
    assert_eq!(burst.len(), 40, "{seen:#?}");
    assert_eq!(seen.len(), 47, "{seen:#?}");
}

/// Sends a request head (lines joined by `\\r\\n`, as Python reads them)
/// over TLS from the job's cgroup, as written: what curl would not send.
/// Returns the answer's status line and body.
fn raw_request(job: &std::path::Path, agent: &Agent, port: u16, head: &str) -> String {
    let out = sh_in(
        job,
        &format!(
            "exec /usr/bin/python3 -c '
import socket, ssl
context = ssl.create_default_context(cafile=\"{ca}\")
with socket.create_connection((\"127.0.0.1\", {port})) as raw:
    with context.wrap_socket(raw, server_hostname=\"api.test\") as tls:
        tls.sendall(b\"{head}Connection: close\\r\\n\\r\\n\")
        answer = b\"\"
        while chunk := tls.recv(65536):
            answer += chunk
lines = answer.decode().split(\"\\r\\n\")
print(lines[0], lines[-1])
'",
            ca = agent.workdir.join("state/ca/ca.pem").display(),
        ),
    );
    format!("{}{}", stdout(&out), stderr(&out))
}

/// Every HTTP event of every session of the agent, in order.
fn http_events(agent: &Agent) -> Vec<Value> {
    http_events_of(agent, &["http_request", "http_response"])
}

/// The events of these kinds of every session of the agent, in order.
fn http_events_of(agent: &Agent, kinds: &[&str]) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut events = Vec::new();
    while events.is_empty() && Instant::now() < deadline {
        let out = agent.cli(&["sessions", "list", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        for session in stdout(&out).lines().filter(|l| !l.trim().is_empty()) {
            let session: Value = serde_json::from_str(session).unwrap();
            let id = session["id"].as_str().unwrap();
            let shown = agent.cli(&["sessions", "show", id, "--json"]);
            let shown: Value = serde_json::from_str(&stdout(&shown)).unwrap();
            events.extend(shown["events"].as_array().unwrap().iter().cloned());
        }
        events.retain(|e| e["kind"].as_str().is_some_and(|k| kinds.contains(&k)));
        if events.is_empty() {
            thread::sleep(Duration::from_millis(100));
        }
    }
    events
}

fn spawn_curl(job: &std::path::Path, agent: &Agent, extra: &str, url: &str) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs || exit 99\n{}",
            job.display(),
            curl_command(agent, extra, url)
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn pending_id(agent: &Agent, command: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = agent.cli(&["approvals", "list", "--json"]);
        let list: Value = serde_json::from_str(&stdout(&out)).unwrap_or(Value::Null);
        if let Some(request) = list
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["command"].as_str().is_some_and(|c| c.contains(command)))
        {
            return request["id"].as_str().unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no request for {command}: {}",
            agent.stderr()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn oncall(agent: &Agent, args: &[&str]) {
    let out = Command::new("setpriv")
        .args([
            format!("--reuid={ONCALL}"),
            format!("--regid={ONCALL}"),
            "--clear-groups".into(),
        ])
        .arg(interlock_bin())
        .args(args)
        .arg("--config")
        .arg(&agent.config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A POST an approve rule holds: the client waits; approved, it reaches
/// nginx; denied, it gets 403 and nginx never sees it.
#[test]
fn a_held_http_request_waits_for_a_person() {
    require_root();
    let name = "http-approval";
    let nginx = Nginx::start(name);
    let mut cgroup = TestCgroup::new(name);
    let (job, _) = cgroup.child("ci-job.service");
    // Bodies recorded too, and a line per request in the access log.
    let agent = Agent::start_with(
        &cgroup,
        name,
        "access_log_statements = true",
        &policy_recording(&nginx, "full"),
    );
    let url = format!("https://127.0.0.1:{}/api/v1/deploy", nginx.port);

    let held = spawn_curl(&job, &agent, "-X POST -d '{\"v\":1}'", &url);
    let id = pending_id(&agent, "POST /api/v1/deploy");
    assert!(nginx.seen().is_empty(), "nothing reached nginx while held");
    oncall(&agent, &["approvals", "approve", &id]);
    let got = answer(&held.wait_with_output().unwrap());
    assert_eq!(got.status, 200, "{}", got.all);
    assert_eq!(json(&got)["method"], "POST");
    assert_eq!(nginx.seen_at_least(1).len(), 1);

    let held = spawn_curl(&job, &agent, "-X POST -d '{\"v\":2}'", &url);
    let id = pending_id(&agent, "POST /api/v1/deploy");
    oncall(&agent, &["approvals", "deny", &id, "--reason", "not today"]);
    let got = answer(&held.wait_with_output().unwrap());
    assert_eq!(got.status, 403, "{}", got.all);
    assert!(got.body.contains("not today"), "{}", got.body);
    assert_eq!(nginx.seen().len(), 1, "the denied POST never reached nginx");

    let lines: Vec<Value> = agent
        .all_lines()
        .into_iter()
        .filter(|l| l["event"] == "http_request")
        .collect();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert_eq!(
        (
            &lines[0]["method"],
            &lines[0]["path"],
            &lines[0]["decision"]
        ),
        (
            &Value::from("POST"),
            &Value::from("/api/v1/deploy"),
            &Value::from("approve")
        )
    );

    // `record = "full"`: the approved POST's body and its answer.
    use base64::Engine;
    let bodies: Vec<(String, String)> = http_events_of(&agent, &["input", "output"])
        .iter()
        .map(|e| {
            let data = base64::engine::general_purpose::STANDARD
                .decode(e["data"].as_str().unwrap())
                .unwrap();
            (
                e["kind"].as_str().unwrap().to_owned(),
                String::from_utf8_lossy(&data).into_owned(),
            )
        })
        .collect();
    assert!(
        bodies.contains(&("input".into(), "{\"v\":1}".into())),
        "{bodies:?}"
    );
    assert!(
        bodies
            .iter()
            .any(|(kind, body)| kind == "output" && body.contains("\"method\": \"POST\"")),
        "{bodies:?}"
    );
    assert!(
        !bodies.iter().any(|(_, body)| body.contains("\"v\":2")),
        "the denied POST's body never went up: {bodies:?}"
    );
}

/// Takes the CA out of the host's trust store however the test ends.
struct Installed<'a>(&'a Agent);

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        let out = self.0.cli(&["ca", "uninstall"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

/// After `interlock ca install`, clients that read the host's trust store
/// need nothing (curl, Python's urllib); those with bundles of their own
/// (Python requests, Node) need the variables `interlock ca env` prints.
/// None has a token: the agent's is the one nginx sees.
#[test]
fn clients_trust_the_agent_once_its_ca_is_installed() {
    require_root();
    let name = "http-trust";
    let nginx = Nginx::start(name);
    let mut cgroup = TestCgroup::new(name);
    let (job, _) = cgroup.child("ci-job.service");
    let agent = Agent::start(&cgroup, name, &policy(&nginx));
    let out = agent.cli(&["ca", "install"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let _installed = Installed(&agent);
    let env = agent.cli(&["ca", "env"]);
    assert!(env.status.success(), "{}", stderr(&env));
    let exports: String = stdout(&env)
        .lines()
        .map(|line| format!("export {line}\n"))
        .collect();
    let url = format!("https://127.0.0.1:{}/api/v1/items", nginx.port);
    for (client, script) in [
        (
            "curl",
            format!("curl -sS -o /dev/null -w '%{{http_code}}' {url}"),
        ),
        (
            "urllib",
            format!(
                "/usr/bin/python3 -c 'import urllib.request; print(urllib.request.urlopen(\"{url}\").status)'"
            ),
        ),
        (
            "requests",
            format!(
                "{exports}/usr/bin/python3 -c 'import requests; print(requests.get(\"{url}\").status_code)'"
            ),
        ),
        (
            "node fetch",
            format!("{exports}node -e 'fetch(\"{url}\").then(r => console.log(r.status))'"),
        ),
    ] {
        let out = sh_in(&job, &script);
        assert_eq!(
            stdout(&out).trim(),
            "200",
            "{client}: {}{}",
            stdout(&out),
            stderr(&out)
        );
    }
    let seen = nginx.seen_at_least(4);
    assert_eq!(seen.len(), 4, "{seen:#?}");
    assert!(seen.iter().all(|l| l.ends_with(HELD_TOKEN)), "{seen:#?}");
}

/// A client certificate held by the agent (as a Kubernetes API server
/// authenticates a deployer): nginx sees it verified; the job has none.
#[test]
fn the_agent_presents_the_client_certificate_it_holds() {
    require_root();
    let name = "http-mtls";
    let nginx = Nginx::start(name);
    let mut cgroup = TestCgroup::new(name);
    let (job, _) = cgroup.child("ci-job.service");
    let d = nginx.dir.display();
    let policy = policy(&nginx).replace(
        "[target.credential]\n",
        &format!(
            "[target.credential]\nclient_certificate_file = \"{d}/client.pem\"\nclient_key_file = \"{d}/client.key\"\n"
        ),
    );
    let agent = Agent::start(&cgroup, name, &policy);
    let got = curl(
        &job,
        &agent,
        "",
        &format!("https://127.0.0.1:{}/api/v1/whoami", nginx.port),
    );
    assert_eq!(got.status, 200, "{}", got.all);
    assert_eq!(json(&got)["verified"], "SUCCESS", "{}", got.body);
    assert_eq!(json(&got)["subject"], "CN=ci-deployer", "{}", got.body);
}

/// `json` masks on an allow rule: a 100,000-item list streams through
/// with every `password` redacted and every item's `token` nulled, the
/// rest as it was, and the agent's memory flat (nothing held whole).
#[test]
fn json_masks_apply_to_a_streamed_list_with_flat_memory() {
    let name = "http-json-mask";
    let nginx = Nginx::start(name);
    let mut cgroup = TestCgroup::new(name);
    let (job, _) = cgroup.child("ci-job.service");
    let policy = policy(&nginx).replace(
        "paths = [\"/api/v1/**\", \"/big\"]\n",
        "paths = [\"/api/v1/**\", \"/big\"]\n\
         mask = [{ json = \"password\" }, { json = \"$.items[*].token\", strategy = \"null\" }]\n",
    );
    let agent = Agent::start(&cgroup, name, &policy);
    let filler = "x".repeat(300);
    let mut doc = String::from("{\"kind\": \"UserList\", \"items\": [");
    for n in 0..100_000 {
        if n > 0 {
            doc.push_str(",\n");
        }
        doc.push_str(&format!(
            r#"{{"name": "user-{n}", "password": "pw-{n}", "token": {n}, "auth": {{"password": ["a", 1]}}, "bio": "{filler}"}}"#
        ));
    }
    doc.push_str("], \"token\": \"top-level-kept\"}");
    let pid = agent.pid().expect("agent runs");
    // Fetches the list from `path` and checks every value; returns how
    // much the agent's peak memory grew meanwhile.
    let fetch_masked = |path: &str| {
        let peak_before = peak_rss_kib(pid);
        let got = curl(
            &job,
            &agent,
            "",
            &format!("https://127.0.0.1:{}{path}", nginx.port),
        );
        assert_eq!(got.status, 200, "{}", &got.all[..got.all.len().min(500)]);
        let value = json(&got);
        let items = value["items"].as_array().unwrap();
        assert_eq!(items.len(), 100_000);
        for (n, item) in items.iter().enumerate() {
            assert_eq!(item["name"], format!("user-{n}"));
            assert_eq!(item["password"], "****");
            assert_eq!(item["token"], Value::Null);
            assert_eq!(
                item["auth"]["password"],
                serde_json::json!(["****", "****"])
            );
            assert_eq!(item["bio"].as_str().map(str::len), Some(300));
        }
        assert_eq!(
            value["token"], "top-level-kept",
            "a path masks only where it leads"
        );
        peak_rss_kib(pid).saturating_sub(peak_before)
    };
    let grown_kib = fetch_masked(&nginx.json(doc.as_bytes()));
    assert!(
        grown_kib < 64 * 1024,
        "the agent grew {grown_kib} KiB for a {} MB answer",
        doc.len() >> 20
    );
    // Recorded: the values masked, counted on the response.
    let response = http_events_of(&agent, &["http_response"])
        .into_iter()
        .find(|e| e["bytes"].as_u64().is_some_and(|b| b > 1 << 20))
        .expect("the list's response");
    assert_eq!(response["masked"], 400_000, "{response}");

    // A server that compresses although the agent asked for no encoding:
    // the answer is decoded as it streams, masked, and goes down plain,
    // with the agent's memory as flat (the list inflates 40-fold).
    let packed = nginx.json_gzip(doc.as_bytes());
    let compressed = std::fs::metadata(nginx.dir.join("www/packed.json.gz"))
        .unwrap()
        .len();
    let grown_kib = fetch_masked(&packed);
    assert!(
        grown_kib < 64 * 1024,
        "the agent grew {grown_kib} KiB for a {} MB answer sent as {} KB of gzip",
        doc.len() >> 20,
        compressed >> 10
    );
    let seen = nginx.seen_at_least(2);
    assert!(
        seen.iter()
            .any(|line| line.starts_with("GET /api/v1/packed ")),
        "{seen:?}"
    );

    // An answer the masks cannot read (HTML) is refused, not passed on.
    let got = curl(
        &job,
        &agent,
        "",
        &format!("https://127.0.0.1:{}/api/v1/page", nginx.port),
    );
    assert_eq!(got.status, 502, "{}", got.all);
    assert!(!got.all.contains("hunter2"), "{}", got.all);
    assert!(got.body.contains("text/html"), "{}", got.all);
}

/// `pattern` and `regex` masks on an allow rule: they find values by
/// what they look like in a JSON answer's strings, keys and numbers (as
/// they read unescaped) and in a text answer, as both stream; the
/// recorded bodies are the masked ones; an answer they cannot read
/// (bytes) is refused.
#[test]
fn value_patterns_mask_json_and_text_answers() {
    let name = "http-patterns";
    let nginx = Nginx::start(name);
    let mut cgroup = TestCgroup::new(name);
    let (job, _) = cgroup.child("ci-job.service");
    let policy = policy_recording(&nginx, "full").replace(
        "paths = [\"/api/v1/**\", \"/big\"]\n",
        "paths = [\"/api/v1/**\", \"/big\"]\n\
         mask = [{ pattern = \"email\" }, { pattern = \"card_number\", strategy = \"null\" }, { regex = \"tok-[0-9]+\" }]\n",
    );
    let agent = Agent::start(&cgroup, name, &policy);
    let url = |path: &str| format!("https://127.0.0.1:{}{path}", nginx.port);

    // JSON: 20,000 items; an `@` escaped as a server may write it, a
    // card number as a JSON number, an e-mail address as a key.
    let mut doc = String::from("{\"items\": [");
    for n in 0..20_000 {
        if n > 0 {
            doc.push(',');
        }
        doc.push_str(&format!(
            r#"{{"n": {n}, "mail": "user{n}\u0040example.com", "note": "ticket tok-{n} \"urgent\"", "card": 4111111111111111, "by": {{"ann{n}@example.com": "owner"}}}}"#
        ));
    }
    doc.push_str("]}");
    let got = curl(&job, &agent, "", &url(&nginx.json(doc.as_bytes())));
    assert_eq!(got.status, 200, "{}", &got.all[..got.all.len().min(500)]);
    assert!(!got.body.contains("example.com"), "an address passed");
    assert!(!got.body.contains("tok-"), "a token passed");
    assert!(
        !got.body.contains("4111111111111111"),
        "a card number passed"
    );
    let value = json(&got);
    let items = value["items"].as_array().unwrap();
    assert_eq!(items.len(), 20_000);
    for (n, item) in items.iter().enumerate() {
        assert_eq!(item["n"], n);
        assert_eq!(item["mail"], "****");
        assert_eq!(item["note"], "ticket **** \"urgent\"");
        assert_eq!(item["card"], Value::Null);
        assert_eq!(item["by"], serde_json::json!({"****": "owner"}));
    }

    // Text: a log, each line carrying an address and a token.
    let mut log = String::new();
    for n in 0..5_000 {
        log.push_str(&format!(
            "2026-11-30T10:00:00Z job {n}: mailed ops{n}@example.com with tok-{n}, card 4111 1111 1111 1111 done\n"
        ));
    }
    let got = curl(&job, &agent, "", &url(&nginx.text(log.as_bytes())));
    assert_eq!(got.status, 200, "{}", &got.all[..got.all.len().min(500)]);
    let lines: Vec<&str> = got.body.lines().collect();
    assert_eq!(
        lines.len(),
        5_000,
        "{}",
        &got.body[..got.body.len().min(500)]
    );
    for (n, line) in lines.iter().enumerate() {
        assert_eq!(
            *line,
            format!("2026-11-30T10:00:00Z job {n}: mailed **** with ****, card **** done")
        );
    }

    // Recorded after masking: nothing the masks found is in the session.
    use base64::Engine;
    let recorded: Vec<u8> = http_events_of(&agent, &["output"])
        .iter()
        .flat_map(|e| {
            base64::engine::general_purpose::STANDARD
                .decode(e["data"].as_str().unwrap())
                .unwrap()
        })
        .collect();
    let recorded = String::from_utf8_lossy(&recorded);
    assert!(
        recorded.contains("mailed **** with ****"),
        "the log was not recorded"
    );
    assert!(!recorded.contains("example.com"), "an address was recorded");
    assert!(!recorded.contains("tok-1"), "a token was recorded");

    // Bytes the patterns cannot read as text are refused, not passed on.
    let got = curl(&job, &agent, "", &url("/api/v1/blob"));
    assert_eq!(got.status, 502, "{}", got.all);
    assert!(got.body.contains("cannot be masked"), "{}", got.all);
    assert!(!got.all.contains("4111"), "{}", got.all);
}
