//! Two real JSON APIs behind HTTP targets, with the clients CI jobs use
//! against them and no credential of their own: the Docker Distribution
//! registry (pushes allowed into one namespace only) and Prometheus
//! (queries allowed with a label masked, its admin API refused). Each
//! server accepts only the password the agent holds; the servers' own
//! state afterwards is the proof of what was and was not done.
use std::path::Path;

use interlock_e2e::*;
use serde_json::Value;

/// `curl` in the job's cgroup, with a credential of its own that must not
/// count; prints the body, then the status on the last line.
fn curl(job: &Path, agent: &Agent, extra: &str, url: &str) -> (u16, String) {
    let out = sh_in(
        job,
        &format!(
            "exec curl -sS --max-time 30 --cacert {ca} -u intruder:guess \
             -w '\\n%{{http_code}}\\n' {extra} '{url}'",
            ca = agent.workdir.join("state/ca/ca.pem").display(),
        ),
    );
    let text = stdout(&out);
    let (body, status) = text
        .trim_end()
        .rsplit_once('\n')
        .unwrap_or(("", text.trim()));
    (
        status.trim().parse().unwrap_or(0),
        format!("{body}{}", stderr(&out)),
    )
}

#[test]
fn a_registry_takes_pushes_into_one_namespace_with_the_held_password() {
    let name = "registry";
    let registry = registry(name);
    let mut cgroup = TestCgroup::new(name);
    let (job, _) = cgroup.child("ci-job.service");
    let policy = format!(
        r#"
[[target]]
name = "registry"
protocol = "http"
address = "127.0.0.1:{port}"
tls_ca_file = "{dir}/ca.pem"
[target.credential]
user = "{API_USER}"
password_file = {password:?}

[[workload]]
name = "ci-jobs"
unit = "ci-job.service"

[[rule]]
name = "ci-pulls"
workloads = ["ci-jobs"]
targets = ["registry"]
decision = "allow"
methods = ["GET", "HEAD"]
paths = ["/v2/", "/v2/**"]

[[rule]]
name = "ci-pushes-to-ci"
workloads = ["ci-jobs"]
targets = ["registry"]
decision = "allow"
methods = ["POST", "PUT", "PATCH"]
paths = ["/v2/ci/**"]
"#,
        port = registry.port,
        dir = registry.dir.display(),
        password = registry.password_file(),
    );
    let agent = Agent::start(&cgroup, name, &policy);
    let base = format!("https://127.0.0.1:{}", registry.port);
    let ca = agent.workdir.join("state/ca/ca.pem");
    let push = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/oci_push.py");

    // The job's push into its namespace: the registry, which wants the
    // password the job never had, takes it.
    let out = sh_in(
        &job,
        &format!(
            "exec /usr/bin/python3 {push} {base} ci/app v1 {}",
            ca.display()
        ),
    );
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let pushed = stdout(&out);
    let digest = pushed
        .lines()
        .find_map(|l| l.strip_prefix("pushed "))
        .expect("a digest")
        .trim()
        .to_owned();
    let (status, body) = curl(&job, &agent, "", &format!("{base}/v2/ci/app/tags/list"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["tags"],
        serde_json::json!(["v1"])
    );

    // Into another namespace: refused before the registry, by the default.
    let out = sh_in(
        &job,
        &format!(
            "exec /usr/bin/python3 {push} {base} prod/app v1 {}",
            ca.display()
        ),
    );
    assert!(!out.status.success());
    let refused = stdout(&out);
    assert!(
        refused.starts_with("POST 403") && refused.contains("no rule allows"),
        "{refused}"
    );
    // The same through the allowed namespace's spelling: a dot segment,
    // an encoded slash, a doubled slash. Each refused as unreadable.
    for path in [
        "/v2/ci/../prod/app/blobs/uploads/",
        "/v2/ci/..%2Fprod/app/blobs/uploads/",
        "/v2/ci//../prod/app/blobs/uploads/",
    ] {
        let (status, body) = curl(
            &job,
            &agent,
            "--path-as-is -X POST",
            &format!("{base}{path}"),
        );
        assert_eq!(status, 400, "{path}: {body}");
    }
    // Deleting what was pushed: no rule allows it.
    let (status, body) = curl(
        &job,
        &agent,
        "-X DELETE",
        &format!("{base}/v2/ci/app/manifests/{digest}"),
    );
    assert_eq!(status, 403, "{body}");

    // The registry's own view: ci/app:v1 and nothing else.
    let catalog: Value =
        serde_json::from_str(&registry.direct("https", "", "/v2/_catalog")).unwrap();
    assert_eq!(catalog["repositories"], serde_json::json!(["ci/app"]));
    let tags: Value =
        serde_json::from_str(&registry.direct("https", "", "/v2/ci/app/tags/list")).unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["v1"]));
}

#[test]
fn prometheus_queries_are_masked_and_its_admin_api_refused() {
    let name = "prometheus";
    let prometheus = prometheus(name);
    let mut cgroup = TestCgroup::new(name);
    let (job, _) = cgroup.child("ci-job.service");
    let policy = format!(
        r#"
[[target]]
name = "metrics"
protocol = "http"
address = "127.0.0.1:{port}"
tls = "disable"
[target.credential]
user = "{API_USER}"
password_file = {password:?}

[[workload]]
name = "ci-jobs"
unit = "ci-job.service"

[[rule]]
name = "ci-queries"
workloads = ["ci-jobs"]
targets = ["metrics"]
decision = "allow"
methods = ["GET", "POST"]
paths = ["/api/v1/query", "/api/v1/query_range", "/api/v1/labels"]
mask = [{{ json = "$.data.result[*].metric.password" }}]
"#,
        port = prometheus.port,
        password = prometheus.password_file(),
    );
    let agent = Agent::start(&cgroup, name, &policy);
    let base = format!("http://127.0.0.1:{}", prometheus.port);
    // A series with a label to mask, made up by the query itself.
    let query = "label_replace(up, \"password\", \"hunter2\", \"\", \"\")";
    let encoded = query
        .replace('%', "%25")
        .replace(' ', "%20")
        .replace('"', "%22")
        .replace(',', "%2C");

    // Three clients, no credential of their own: Node's fetch, Python's
    // urllib (a POSTed form) and requests (which asks for gzip).
    let node = format!(
        "exec node -e 'fetch(\"{base}/api/v1/query?query={encoded}\")\
         .then(r => r.text()).then(t => console.log(t))'"
    );
    let urllib = format!(
        "exec /usr/bin/python3 -c 'import urllib.request, urllib.parse, sys; \
         body = urllib.parse.urlencode({{\"query\": sys.argv[1]}}).encode(); \
         print(urllib.request.urlopen(\"{base}/api/v1/query\", body).read().decode())' '{query}'"
    );
    let requests = format!(
        "exec /usr/bin/python3 -c 'import requests, sys; \
         print(requests.get(\"{base}/api/v1/query\", params={{\"query\": sys.argv[1]}}).text)' \
         '{query}'"
    );
    for (client, script) in [("node", node), ("urllib", urllib), ("requests", requests)] {
        let out = sh_in(&job, &script);
        assert!(out.status.success(), "{client}: {}", stderr(&out));
        let answer: Value = serde_json::from_str(stdout(&out).trim())
            .unwrap_or_else(|e| panic!("{client}: {e}: {}", stdout(&out)));
        assert_eq!(answer["status"], "success", "{client}: {answer}");
        let result = answer["data"]["result"].as_array().unwrap();
        assert!(!result.is_empty(), "{client}: {answer}");
        for series in result {
            assert_eq!(series["metric"]["password"], "****", "{client}: {answer}");
            assert_eq!(series["metric"]["job"], "prometheus", "{client}: {answer}");
        }
    }

    // The admin API: deleting the series, a snapshot, cleaning tombstones.
    for path in [
        "/api/v1/admin/tsdb/delete_series?match[]=up",
        "/api/v1/admin/tsdb/snapshot",
        "/api/v1/admin/tsdb/clean_tombstones",
    ] {
        let (status, body) = curl(&job, &agent, "-g -X POST", &format!("{base}{path}"));
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("no rule allows"), "{path}: {body}");
    }
    // Prometheus's own view: `up` still there, no snapshot taken.
    let up: Value =
        serde_json::from_str(&prometheus.direct("http", "", "/api/v1/query?query=up")).unwrap();
    assert!(!up["data"]["result"].as_array().unwrap().is_empty(), "{up}");
    assert!(
        !prometheus.dir.join("data/snapshots").exists(),
        "a snapshot was taken"
    );
}

/// A gRPC service (grpcio, Debian's) behind an HTTP target: HTTP/2 both
/// ways, trailers (the call's status) relayed, the held token the only one
/// the service sees; a method no rule allows is refused with gRPC's own
/// PERMISSION_DENIED and never reaches the service.
#[test]
fn grpc_calls_are_decided_by_method_with_the_held_token() {
    require_root();
    let name = "grpc";
    let dir = std::env::temp_dir().join(format!("interlock-grpc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    upstream_certificates(&dir);
    let port = free_port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/grpc_echo.py");
    let d = dir.display();
    let _server = Service(
        std::process::Command::new("/usr/bin/python3")
            .args([script, "serve", &port.to_string()])
            .args([
                format!("{d}/server.pem"),
                format!("{d}/server.key"),
                format!("{d}/token"),
                format!("{d}/calls"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("server.err")).unwrap())
            .spawn()
            .expect("python3 with grpcio (`cargo xtask setup` installs python3-grpcio)"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the gRPC service did not start: {}",
            std::fs::read_to_string(dir.join("server.err")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut cgroup = TestCgroup::new(name);
    let (job, _) = cgroup.child("ci-job.service");
    let policy = format!(
        r#"
[[target]]
name = "echo"
protocol = "http"
address = "127.0.0.1:{port}"
tls_ca_file = "{d}/ca.pem"
[target.credential]
bearer_token_file = "{d}/token"

[[workload]]
name = "ci-jobs"
unit = "ci-job.service"

[[rule]]
name = "ci-says"
workloads = ["ci-jobs"]
targets = ["echo"]
decision = "allow"
methods = ["POST"]
paths = ["/test.Echo/Say"]
"#
    );
    let agent = Agent::start(&cgroup, name, &policy);
    let ca = agent.workdir.join("state/ca/ca.pem");
    let call = |method: &str, message: &str| {
        sh_in(
            &job,
            &format!(
                "exec /usr/bin/python3 {script} call {port} {} {method} '{message}'",
                ca.display()
            ),
        )
    };

    let out = call("Say", "hello");
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let answer: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(answer["message"], "hello");
    // The service answered only because the held token came; echoed
    // back, it is blanked out before the client sees it.
    assert_eq!(
        answer["authorization"],
        format!("Bearer {}", "*".repeat(HELD_TOKEN.len()))
    );

    let out = call("Drop", "everything");
    assert!(!out.status.success());
    let refused = stdout(&out);
    assert!(
        refused.starts_with("error PERMISSION_DENIED") && refused.contains("no rule allows"),
        "{refused}{}",
        stderr(&out)
    );
    // The service ran the allowed call only.
    let calls = std::fs::read_to_string(dir.join("calls")).unwrap_or_default();
    assert_eq!(calls, "Say hello\n");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A server process, stopped however the test ends.
struct Service(std::process::Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
