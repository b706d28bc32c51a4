//! Interception on the real kernel: redirect, decide, identify, pass
//! everything else untouched.
use interlock_e2e::*;
use serde_json::Value;

fn lines_for<'a>(lines: &'a [Value], target: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["target"] == target).collect()
}

#[test]
fn allowed_denied_and_unprotected_with_kernel_identity() {
    let allowed = Server::http("127.0.0.2:0", "allowed body\n");
    let denied = Server::http("127.0.0.3:0", "secret body\n");
    let unprotected = Server::http("127.0.0.4:0", "plain body\n");
    let mut cgroup = TestCgroup::new("basic");
    let (job_dir, job_path) = cgroup.child("ci-job.service");
    let agent = Agent::start(
        &cgroup,
        "basic",
        &format!(
            r#"
[[target]]
name = "cache"
protocol = "tcp"
address = "{allowed}"

[[target]]
name = "secrets"
protocol = "tcp"
address = "{denied}"

[[workload]]
name = "ci-jobs"
unit = "ci-job.service"

[[rule]]
name = "ci-may-use-cache"
workloads = ["ci-jobs"]
targets = ["cache"]
decision = "allow"

[[rule]]
name = "nobody-reads-secrets"
workloads = ["*"]
targets = ["secrets"]
decision = "deny"
"#,
            allowed = allowed.addr,
            denied = denied.addr,
        ),
    );

    // Allowed: curl, run as `nobody` in a `ci-job.service` cgroup.
    let out = sh_in(
        &job_dir,
        &format!(
            "exec setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/curl -sS --max-time 10 {}",
            allowed.url()
        ),
    );
    assert!(
        out.status.success(),
        "curl through the agent failed: {}\nagent:\n{}",
        stderr(&out),
        agent.stderr()
    );
    assert_eq!(stdout(&out), "allowed body\n");
    let lines = agent.wait_access_lines(1);
    assert_eq!(
        lines.len(),
        1,
        "one connection, one access line (the agent's upstream was not looped back): {lines:#?}"
    );
    assert_eq!(
        allowed.connections(),
        1,
        "the upstream saw exactly the agent's one connection"
    );
    let line = &lines[0];
    assert_eq!(line["decision"], "allow");
    assert_eq!(line["rule"], "ci-may-use-cache");
    assert_eq!(line["outcome"], "closed");
    assert_eq!(line["orig_dst"], allowed.addr.to_string());
    assert!(
        line["bytes_up"].as_u64().unwrap() > 0 && line["bytes_down"].as_u64().unwrap() > 0,
        "{line}"
    );
    let workload = &line["workload"];
    assert_eq!(workload["uid"], 65534);
    assert_eq!(workload["user"], "nobody");
    assert_eq!(workload["comm"], "curl");
    assert_eq!(workload["exe"], "/usr/bin/curl");
    assert_eq!(workload["exe_sha256"], sha256_file("/usr/bin/curl"));
    assert_eq!(workload["cgroup"], job_path);
    assert_eq!(workload["unit"], "ci-job.service");
    assert_eq!(workload["live"], true);
    assert!(
        workload["cmdline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == &Value::from(allowed.url()))
    );
    assert!(
        !workload["parents"].as_array().unwrap().is_empty(),
        "parent chain: {workload}"
    );

    // Denied by rule: reset at once, nothing reaches the server.
    let out = sh_in(
        &job_dir,
        &format!("exec curl -sS --max-time 10 {}", denied.url()),
    );
    assert!(!out.status.success(), "a denied connection must fail");
    // The agent resets right after the handshake: curl sees the reset while
    // reading (56) or, when it lands first, when it checks the connect (7).
    assert!(
        matches!(out.status.code(), Some(56) | Some(7)),
        "curl should see a reset: {}",
        stderr(&out)
    );
    assert_eq!(denied.connections(), 0);
    let lines = agent.wait_access_lines(2);
    let deny = lines_for(&lines, "secrets");
    assert_eq!(deny.len(), 1);
    assert_eq!(deny[0]["decision"], "deny");
    assert_eq!(deny[0]["rule"], "nobody-reads-secrets");
    assert_eq!(deny[0]["outcome"], "denied");

    // Not named by any rule for this workload: default deny.
    let out = sh_in(
        &cgroup.dir,
        &format!("exec curl -sS --max-time 10 {}", allowed.url()),
    );
    assert!(
        !out.status.success(),
        "outside ci-job.service the cache is denied by default"
    );
    let lines = agent.wait_access_lines(3);
    assert_eq!(lines[2]["decision"], "deny");
    assert_eq!(lines[2]["rule"], Value::Null);

    // Unprotected: untouched, not even seen by the agent.
    let out = sh_in(
        &job_dir,
        &format!("exec curl -sS --max-time 10 {}", unprotected.url()),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "plain body\n");
    assert_eq!(unprotected.connections(), 1);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        agent.access_lines().len(),
        3,
        "the agent never saw the unprotected connection"
    );
}

#[test]
fn ipv6_ipv4_mapped_and_getpeername() {
    let v6 = Server::http("[::1]:0", "six\n");
    let v4 = Server::http("127.0.0.5:0", "four\n");
    let cgroup = TestCgroup::new("ipv6");
    let agent = Agent::start(
        &cgroup,
        "ipv6",
        &format!(
            r#"
[[target]]
name = "v6"
protocol = "tcp"
address = "{v6}"

[[target]]
name = "v4"
protocol = "tcp"
address = "{v4}"

[[rule]]
name = "anyone"
workloads = ["*"]
targets = ["v6", "v4"]
decision = "allow"
"#,
            v6 = v6.addr,
            v4 = v4.addr,
        ),
    );
    // A real client in Python: three connects, each printing what
    // getpeername() says and what the server sent.
    let script = format!(
        r#"
import socket
def fetch(family, addr):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(addr)
    peer = s.getpeername()
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    print(peer[0], peer[1], data.split(b"\r\n\r\n", 1)[1].decode().strip())
fetch(socket.AF_INET6, ("::1", {p6}))
fetch(socket.AF_INET6, ("::ffff:127.0.0.5", {p4}))
fetch(socket.AF_INET, ("127.0.0.5", {p4}))
"#,
        p6 = v6.addr.port(),
        p4 = v4.addr.port(),
    );
    let out = cgroup.sh(&format!("exec /usr/bin/python3 -c '{script}'"));
    assert!(
        out.status.success(),
        "python client failed: {}\nagent:\n{}",
        stderr(&out),
        agent.stderr()
    );
    let expected = format!(
        "::1 {p6} six\n::ffff:127.0.0.5 {p4} four\n127.0.0.5 {p4} four\n",
        p6 = v6.addr.port(),
        p4 = v4.addr.port()
    );
    assert_eq!(
        stdout(&out),
        expected,
        "getpeername() shows the original destination"
    );
    let lines = agent.wait_access_lines(3);
    assert_eq!(lines_for(&lines, "v6").len(), 1);
    assert_eq!(
        lines_for(&lines, "v4").len(),
        2,
        "IPv4-mapped and plain IPv4 are one target"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["decision"] == "allow" && l["outcome"] == "closed"),
        "{lines:#?}"
    );
    assert_eq!(lines_for(&lines, "v6")[0]["orig_dst"], v6.addr.to_string());
    assert_eq!(v6.connections() + v4.connections(), 3);
}

#[test]
fn status_and_admin_authorization() {
    let server = Server::http("127.0.0.8:0", "ok\n");
    let cgroup = TestCgroup::new("status");
    let agent = Agent::start(
        &cgroup,
        "status",
        &format!(
            "[[target]]\nname = \"svc\"\nprotocol = \"tcp\"\naddress = \"{}\"\n[[rule]]\nname = \"r\"\nworkloads = [\"*\"]\ntargets = [\"svc\"]\ndecision = \"allow\"\n",
            server.addr
        ),
    );
    let out = agent.cli(&["status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        status["intercept"]["cgroup"],
        cgroup.dir.display().to_string()
    );
    assert_eq!(status["intercept"]["programs"].as_array().unwrap().len(), 5);
    for link in status["intercept"]["pinned_links"].as_array().unwrap() {
        assert!(
            std::path::Path::new(link.as_str().unwrap()).exists(),
            "pinned link {link} exists"
        );
    }
    assert_eq!(status["targets"][0]["name"], "svc");
    assert_eq!(status["intercept"]["protected_entries"], 1);
    // Every redirected connect so far was taken (read from the pinned table).
    assert_eq!(status["intercept"]["pending_redirects"], 0, "{status}");

    let text = agent.cli(&["status"]);
    assert!(
        stdout(&text)
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["svc", "tcp"])),
        "{}",
        stdout(&text)
    );

    // Garbage on the admin socket gets an error, and the agent carries on.
    {
        use std::io::{BufRead, Write};
        let mut admin = std::os::unix::net::UnixStream::connect(agent.admin_socket()).unwrap();
        admin
            .write_all(b"{\"command\": \"format_disk\"}\n\x00\xff garbage\n")
            .unwrap();
        let mut reader = std::io::BufReader::new(admin);
        for _ in 0..2 {
            let mut reply = String::new();
            reader.read_line(&mut reply).unwrap();
            let reply: Value = serde_json::from_str(&reply).unwrap();
            assert_eq!(reply["result"], "error");
            assert!(
                reply["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("bad request"),
                "{reply}"
            );
        }
    }
    assert!(agent.cli(&["status"]).status.success());

    // SO_PEERCRED: even with the socket opened to everyone, a non-admin
    // uid is refused by the agent itself.
    open_socket_to_everyone(&agent.admin_socket());
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(interlock_bin())
        .args(["status", "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not allowed to administer"),
        "{}",
        stderr(&out)
    );
}
