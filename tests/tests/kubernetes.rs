//! Kubernetes targets with real `kubectl` in a job's cgroup, using the
//! kubeconfig `interlock kube config` writes (the cluster's own address,
//! the agent's CA, no credential). The cluster is a stand-in
//! (`scripts/kube_apiserver.py`: discovery, pods, secrets, a log), since a
//! real kube-apiserver cannot be installed from the package registries
//! here; it accepts only the token the agent holds. Rules name verbs,
//! resources and namespaces as RBAC does, read from each request as
//! kube-apiserver reads it.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use interlock_e2e::*;
use serde_json::Value;

const ONCALL: u32 = 5001;

struct StandIn {
    dir: PathBuf,
    port: u16,
    child: Child,
}

impl StandIn {
    fn start(name: &str) -> Self {
        require_root();
        let dir =
            std::env::temp_dir().join(format!("interlock-kube-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        upstream_certificates(&dir);
        let port = free_port();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kube_apiserver.py");
        let child = Command::new("/usr/bin/python3")
            .arg(script)
            .arg(port.to_string())
            .arg(dir.join("server.pem"))
            .arg(dir.join("server.key"))
            .arg(HELD_TOKEN)
            .arg(dir.join("requests.log"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the stand-in did not start");
            thread::sleep(Duration::from_millis(20));
        }
        Self { dir, port, child }
    }

    /// `METHOD PATH AUTHORIZATION`, one a line, as the stand-in got them.
    fn seen(&self) -> Vec<String> {
        fs::read_to_string(self.dir.join("requests.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn policy(cluster: &StandIn) -> String {
    format!(
        r#"
[[target]]
name = "cluster"
protocol = "kubernetes"
address = "127.0.0.1:{port}"
tls_ca_file = {ca:?}
[target.credential]
bearer_token_file = {token:?}

[[workload]]
name = "ci-jobs"
unit = "ci-job.service"

[[rule]]
name = "ci-reads-its-pods"
workloads = ["ci-jobs"]
targets = ["cluster"]
decision = "allow"
verbs = ["get", "list", "watch"]
resources = ["pods", "pods/log"]
namespaces = ["ci"]

[[rule]]
name = "exec-needs-oncall"
workloads = ["ci-jobs"]
targets = ["cluster"]
decision = "approve"
verbs = ["exec"]
resources = ["pods/exec"]
namespaces = ["ci"]
approvers = ["uid:{ONCALL}"]
timeout = "2m"

[[rule]]
name = "no-deletes"
workloads = ["ci-jobs"]
targets = ["cluster"]
decision = "deny"
verbs = ["delete", "deletecollection"]
"#,
        port = cluster.port,
        ca = cluster.dir.join("ca.pem").display().to_string(),
        token = cluster.dir.join("token").display().to_string(),
    )
}

#[test]
fn kubectl_is_decided_by_verb_resource_and_namespace() {
    let name = "kubectl";
    let cluster = StandIn::start(name);
    let mut cgroup = TestCgroup::new(name);
    let (job, _) = cgroup.child("ci-job.service");
    let agent = Agent::start(&cgroup, name, &policy(&cluster));

    let out = agent.cli(&["kube", "config", "--target", "cluster", "--namespace", "ci"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let kubeconfig: Value = serde_json::from_slice(&out.stdout).unwrap();
    let server = &kubeconfig["clusters"][0]["cluster"];
    assert_eq!(
        server["server"],
        format!("https://127.0.0.1:{}", cluster.port)
    );
    assert!(server.get("insecure-skip-tls-verify").is_none());
    let path = agent.workdir.join("kubeconfig");
    fs::write(&path, &out.stdout).unwrap();
    let kubectl = |args: &str| {
        sh_in(
            &job,
            &format!(
                "export HOME={home}; exec kubectl --kubeconfig {path} --request-timeout 20s {args}",
                home = agent.workdir.display(),
                path = path.display()
            ),
        )
    };

    // Allowed: list, get and a log in the job's namespace.
    let out = kubectl("get pods -o name");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "pod/web");
    let out = kubectl("get pod web -o jsonpath={.status.phase}");
    assert_eq!(stdout(&out).trim(), "Running", "{}", stderr(&out));
    let out = kubectl("logs web");
    assert!(stdout(&out).contains("line 1"), "{}", stderr(&out));

    // Refused, with the Kubernetes API's own Forbidden naming why.
    for (args, why) in [
        (
            "get secrets",
            "no rule allows list secrets in namespace \"ci\"",
        ),
        (
            "get pods -n prod",
            "no rule allows list pods in namespace \"prod\"",
        ),
        ("delete pod web", "rule \"no-deletes\""),
    ] {
        let out = kubectl(args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args}: {}", stdout(&out));
        assert!(
            err.contains("Forbidden") && err.contains(why),
            "{args}: {err}"
        );
    }

    // The stand-in saw the allowed requests only, each with the held token.
    let seen = cluster.seen();
    assert!(!seen.is_empty());
    for line in &seen {
        assert!(line.ends_with(&format!("Bearer {HELD_TOKEN}")), "{line}");
        assert!(
            !line.starts_with("DELETE") && !line.contains("secrets") && !line.contains("/prod/"),
            "{line}"
        );
    }

    // Each request recorded with its Kubernetes attributes.
    let kube: Vec<(Value, Value)> = agent
        .session_events()
        .into_iter()
        .filter(|e| e["kind"] == "http_request" && e["kube"]["is_resource"] == true)
        .map(|e| (e["kube"].clone(), e["decision"].clone()))
        .collect();
    let delete = kube
        .iter()
        .find(|(k, _)| k["verb"] == "delete")
        .expect("the delete is recorded");
    assert_eq!(
        (
            &delete.0["resource"],
            &delete.0["name"],
            &delete.0["namespace"],
            &delete.1
        ),
        (
            &Value::from("pods"),
            &Value::from("web"),
            &Value::from("ci"),
            &Value::from("deny")
        )
    );
    assert!(
        kube.iter()
            .any(|(k, d)| k["verb"] == "list" && k["resource"] == "pods" && d == "allow"),
        "{kube:?}"
    );
}

/// An exec upgrade (WebSocket or SPDY alike) through the agent, from a raw
/// client in the job's cgroup: prints the status line, then what came back
/// for the bytes it sent.
fn exec_upgrade(job: &Path, agent: &Agent, port: u16, namespace: &str) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {job}/cgroup.procs || exit 99\nexec /usr/bin/python3 -c '
import socket, ssl
context = ssl.create_default_context(cafile=\"{ca}\")
with socket.create_connection((\"127.0.0.1\", {port})) as raw:
    with context.wrap_socket(raw, server_hostname=\"127.0.0.1\") as tls:
        tls.sendall(b\"POST /api/v1/namespaces/{namespace}/pods/web/exec?command=sh HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nUpgrade: SPDY/3.1\\r\\nConnection: Upgrade\\r\\nContent-Length: 0\\r\\n\\r\\n\")
        head = b\"\"
        while b\"\\r\\n\\r\\n\" not in head:
            chunk = tls.recv(1)
            if not chunk:
                break
            head += chunk
        print(head.decode().split(\"\\r\\n\")[0], flush=True)
        if b\" 101 \" in head:
            for word in [b\"echo\", b\" hello\"]:
                tls.sendall(word)
                print(tls.recv(100).decode(), flush=True)
'",
            job = job.display(),
            ca = agent.workdir.join("state/ca/ca.pem").display(),
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `exec` is its own verb: held until the on-call approves, then the
/// upgraded stream is relayed both ways; in another namespace, refused.
#[test]
fn an_exec_is_held_then_its_upgraded_stream_relayed() {
    let name = "kube-exec";
    let cluster = StandIn::start(name);
    let mut cgroup = TestCgroup::new(name);
    let (job, _) = cgroup.child("ci-job.service");
    let agent = Agent::start(&cgroup, name, &policy(&cluster));

    let refused = exec_upgrade(&job, &agent, cluster.port, "prod")
        .wait_with_output()
        .unwrap();
    assert!(
        stdout(&refused).starts_with("HTTP/1.1 403"),
        "{}",
        stderr(&refused)
    );

    let held = exec_upgrade(&job, &agent, cluster.port, "ci");
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        let out = agent.cli(&["approvals", "list", "--json"]);
        let list: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if let Some(id) = list
            .as_array()
            .and_then(|l| l.first())
            .and_then(|r| r["id"].as_str())
        {
            break id.to_owned();
        }
        assert!(Instant::now() < deadline, "no request: {}", agent.stderr());
        thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !cluster.seen().iter().any(|l| l.contains("/exec")),
        "nothing reached the cluster while held"
    );
    let out = Command::new("setpriv")
        .args([
            format!("--reuid={ONCALL}"),
            format!("--regid={ONCALL}"),
            "--clear-groups".into(),
        ])
        .arg(interlock_bin())
        .args(["approvals", "approve", &id, "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = held.wait_with_output().unwrap();
    let lines: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    assert_eq!(
        lines,
        ["HTTP/1.1 101 Switching Protocols", "echo", " hello"],
        "{}",
        stderr(&out)
    );
    let seen = cluster.seen();
    let exec: Vec<&String> = seen.iter().filter(|l| l.contains("/exec")).collect();
    assert_eq!(exec.len(), 1, "{seen:#?}");
    assert!(exec[0].starts_with("POST /api/v1/namespaces/ci/pods/web/exec"));
    assert!(exec[0].ends_with(&format!("Bearer {HELD_TOKEN}")));
}

/// `kubectl exec` in the stream protocol (WebSocket, `v5.channel.k8s.io`)
/// with `record = "full"`: recorded as a terminal — what went in, what
/// came out, how it ended — and replayed as it was.
#[test]
fn kubectl_exec_is_recorded_as_a_terminal_and_replays() {
    let name = "kube-exec-rec";
    let cluster = StandIn::start(name);
    let mut cgroup = TestCgroup::new(name);
    let (job, _) = cgroup.child("ci-job.service");
    let policy = policy(&cluster)
        .replace(
            "protocol = \"kubernetes\"",
            "protocol = \"kubernetes\"\nrecord = \"full\"",
        )
        .replace(
            "verbs = [\"get\", \"list\", \"watch\"]",
            "verbs = [\"get\", \"list\", \"watch\", \"exec\"]",
        )
        .replace(
            "resources = [\"pods\", \"pods/log\"]",
            "resources = [\"pods\", \"pods/log\", \"pods/exec\"]",
        )
        .replace(
            "namespaces = [\"ci\"]\napprovers",
            "namespaces = [\"nowhere\"]\napprovers",
        );
    let agent = Agent::start(&cgroup, name, &policy);
    let path = agent.workdir.join("kubeconfig");
    let out = agent.cli(&["kube", "config", "--target", "cluster", "--namespace", "ci"]);
    fs::write(&path, &out.stdout).unwrap();

    let out = sh_in(
        &job,
        &format!(
            "export HOME={home}; printf 'echo hello-from-the-pod\\nexit 3\\n' | \
             exec kubectl --kubeconfig {path} --request-timeout 20s exec -i web -- sh",
            home = agent.workdir.display(),
            path = path.display()
        ),
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "echo hello-from-the-pod\n",
        "{}",
        stderr(&out)
    );
    let upgrade = cluster
        .seen()
        .into_iter()
        .find(|l| l.contains("/exec"))
        .expect("the exec reached the cluster");
    assert!(
        upgrade.starts_with("GET /api/v1/namespaces/ci/pods/web/exec"),
        "{upgrade}"
    );

    let out = agent.cli(&["sessions", "list", "--json"]);
    let exec = stdout(&out)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .map(|id| {
            let shown = agent.cli(&["sessions", "show", &id, "--json"]);
            (id, serde_json::from_slice::<Value>(&shown.stdout).unwrap())
        })
        .find(|(_, shown)| {
            shown["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["kube"]["verb"] == "exec")
        });
    let (exec, shown) = exec.expect("the exec's session");
    let events = shown["events"].as_array().unwrap();
    let decoded = |kind: &str| -> String {
        events
            .iter()
            .filter(|e| e["kind"] == kind)
            .map(|e| {
                let data = base64::Engine::decode(
                    &base64::engine::general_purpose::STANDARD,
                    e["data"].as_str().unwrap(),
                )
                .unwrap();
                String::from_utf8(data).unwrap()
            })
            .collect()
    };
    assert_eq!(
        decoded("input"),
        "echo hello-from-the-pod\nexit 3\n",
        "{events:#?}"
    );
    assert_eq!(
        decoded("output"),
        "echo hello-from-the-pod\n",
        "{events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "exit" && e["status"] == 3),
        "{events:#?}"
    );
    let out = agent.cli(&["sessions", "replay", &exec, "--speed", "0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("echo hello-from-the-pod"),
        "{}",
        stdout(&out)
    );
    let out = agent.cli(&["sessions", "verify", &exec]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// `kubectl logs -f` stays open as long as the server streams (70 s, a
/// line every 10 s): the agent cuts no idle stream.
#[test]
fn a_followed_log_streams_past_a_minute() {
    let name = "kube-follow";
    let cluster = StandIn::start(name);
    let mut cgroup = TestCgroup::new(name);
    let (job, _) = cgroup.child("ci-job.service");
    let agent = Agent::start(&cgroup, name, &policy(&cluster));
    let out = agent.cli(&["kube", "config", "--target", "cluster", "--namespace", "ci"]);
    let path = agent.workdir.join("kubeconfig");
    fs::write(&path, &out.stdout).unwrap();
    let started = Instant::now();
    let out = sh_in(
        &job,
        &format!(
            "export HOME={home}; exec kubectl --kubeconfig {path} logs -f web",
            home = agent.workdir.display(),
            path = path.display()
        ),
    );
    let took = started.elapsed();
    let lines: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    assert_eq!(
        lines,
        (0..8).map(|n| format!("follow {n}")).collect::<Vec<_>>(),
        "{}",
        stderr(&out)
    );
    assert!(took > Duration::from_secs(65), "{took:?}");
}

/// Secrets a rule allows come with their values masked as they stream
/// (one object, a list, the last-applied annotation), unless the rule says
/// `reveal_secrets = true`.
#[test]
fn secret_values_are_masked_unless_a_rule_reveals_them() {
    let name = "kube-secrets";
    let cluster = StandIn::start(name);
    let mut cgroup = TestCgroup::new(name);
    let (job, _) = cgroup.child("ci-job.service");
    let policy = format!(
        "{}\n[[rule]]\nname = \"ci-reads-its-secret\"\nworkloads = [\"ci-jobs\"]\ntargets = [\"cluster\"]\n\
         decision = \"allow\"\nverbs = [\"get\", \"list\"]\nresources = [\"secrets\"]\nnamespaces = [\"ci\"]\nnames = [\"web\"]\n\n\
         [[rule]]\nname = \"ci-reads-tls-in-clear\"\nworkloads = [\"ci-jobs\"]\ntargets = [\"cluster\"]\n\
         decision = \"allow\"\nverbs = [\"get\"]\nresources = [\"secrets\"]\nnamespaces = [\"ci\"]\nnames = [\"tls\"]\nreveal_secrets = true\n",
        policy(&cluster)
    );
    let agent = Agent::start(&cgroup, name, &policy);
    let out = agent.cli(&["kube", "config", "--target", "cluster", "--namespace", "ci"]);
    let path = agent.workdir.join("kubeconfig");
    fs::write(&path, &out.stdout).unwrap();
    let kubectl = |args: &str| -> Value {
        let out = sh_in(
            &job,
            &format!(
                "export HOME={home}; exec kubectl --kubeconfig {path} {args} -o json",
                home = agent.workdir.display(),
                path = path.display()
            ),
        );
        assert!(out.status.success(), "{args}: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let web = kubectl("get secret web");
    assert_eq!(web["data"]["password"], "KioqKg==", "{web}");
    assert_eq!(web["metadata"]["name"], "web");
    let listed = kubectl("get secrets --field-selector metadata.name=web");
    assert_eq!(
        listed["items"][0]["data"]["password"], "KioqKg==",
        "{listed}"
    );
    let tls = kubectl("get secret tls");
    assert_eq!(tls["data"]["password"], "aHVudGVyMg==", "{tls}");
}

/// `kubectl port-forward` through the agent, in both of kubectl's
/// framings: SPDY tunnelled in a WebSocket (its default) and bare SPDY
/// (`KUBECTL_PORT_FORWARD_WEBSOCKETS=false`). Each forwarded connection is
/// recorded as it ends, with its port and the bytes it carried each way;
/// one the pod refuses, with the server's reason.
#[test]
fn kubectl_port_forward_records_each_connection() {
    use std::io::{Read, Write};
    let name = "kube-portforward";
    let cluster = StandIn::start(name);
    let mut cgroup = TestCgroup::new(name);
    let (job, _) = cgroup.child("ci-job.service");
    let policy = policy(&cluster)
        .replace(
            "verbs = [\"get\", \"list\", \"watch\"]",
            "verbs = [\"get\", \"list\", \"watch\", \"portforward\"]",
        )
        .replace(
            "resources = [\"pods\", \"pods/log\"]",
            "resources = [\"pods\", \"pods/log\", \"pods/portforward\"]",
        );
    let agent = Agent::start(&cgroup, name, &policy);
    let out = agent.cli(&["kube", "config", "--target", "cluster", "--namespace", "ci"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let kubeconfig = agent.workdir.join("kubeconfig");
    fs::write(&kubeconfig, &out.stdout).unwrap();

    // The `port_forward` events of sessions not seen before.
    let mut earlier = Vec::new();
    let forwarded = |earlier: &Vec<String>| -> Vec<Value> {
        agent
            .session_ids()
            .iter()
            .filter(|id| !earlier.contains(*id))
            .flat_map(|id| agent.session_events_of(id))
            .filter(|e| e["kind"] == "port_forward")
            .collect()
    };
    for (framing, env, method) in [
        ("websocket", "", "GET"),
        ("spdy", "KUBECTL_PORT_FORWARD_WEBSOCKETS=false", "POST"),
    ] {
        let (echo, refused) = (free_port(), free_port());
        let mut kubectl = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {job}/cgroup.procs || exit 99\n\
                 export HOME={home} {env}\n\
                 exec kubectl --kubeconfig {config} port-forward pod/web {echo}:8080 {refused}:1",
                job = job.display(),
                home = agent.workdir.display(),
                config = kubeconfig.display(),
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let connect = |port: u16| {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match std::net::TcpStream::connect(("127.0.0.1", port)) {
                    Ok(stream) => break stream,
                    Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
                    Err(e) => panic!("kubectl port-forward does not listen on {port}: {e}"),
                }
            }
        };
        // Two connections to the pod's echo port: what goes up comes back.
        for payload in [b"hello".to_vec(), vec![b'x'; 200_000]] {
            let mut stream = connect(echo);
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            stream.write_all(&payload).unwrap();
            stream.shutdown(std::net::Shutdown::Write).unwrap();
            let mut back = Vec::new();
            stream.read_to_end(&mut back).unwrap();
            assert_eq!(back.len(), payload.len(), "{framing}");
            assert!(back == payload, "{framing}: the echo differs");
        }
        // A connection the pod refuses: closed without a byte.
        let mut stream = connect(refused);
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut back = Vec::new();
        let _ = stream.read_to_end(&mut back);
        assert!(back.is_empty(), "{framing}");

        // Recorded as each ended (the refused one once kubectl is gone,
        // if not before).
        let deadline = Instant::now() + Duration::from_secs(10);
        while forwarded(&earlier).len() < 2 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
        }
        let _ = kubectl.kill();
        let _ = kubectl.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while forwarded(&earlier).len() < 3 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
        }
        let events = forwarded(&earlier);
        let counts: Vec<(u64, u64, u64)> = events
            .iter()
            .map(|e| {
                (
                    e["port"].as_u64().unwrap_or(0),
                    e["up"].as_u64().unwrap(),
                    e["down"].as_u64().unwrap(),
                )
            })
            .collect();
        assert!(counts.contains(&(8080, 5, 5)), "{framing}: {events:?}");
        assert!(
            counts.contains(&(8080, 200_000, 200_000)),
            "{framing}: {events:?}"
        );
        let refusal = events
            .iter()
            .find(|e| e["port"] == 1)
            .unwrap_or_else(|| panic!("{framing}: {events:?}"));
        assert!(
            refusal["error"]
                .as_str()
                .is_some_and(|e| e.contains("connection refused")),
            "{refusal}"
        );
        assert!(
            cluster.seen().iter().any(|l| l.starts_with(&format!(
                "{method} /api/v1/namespaces/ci/pods/web/portforward"
            ))),
            "{framing}: {:?}",
            cluster.seen()
        );
        earlier = agent.session_ids();
    }

    // `sessions show` prints each connection.
    let shown: String = agent
        .session_ids()
        .iter()
        .map(|id| stdout(&agent.cli(&["sessions", "show", id])))
        .collect();
    assert!(
        shown.contains(
            "port-forward to port 8080 (connection 1): 200000 bytes up, 200000 bytes down"
        ),
        "{shown}"
    );
}
