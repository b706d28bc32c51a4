//! Enforcement against a workload that tries to get around it: borrowing
//! another socket's interception record, imitating the agent's own sockets.
use std::time::Duration;

use interlock_e2e::*;
use serde_json::Value;

/// The victim: uid 4242, `connects` connections from ports it binds first,
/// printed one a line. `then` is Python run on each connected socket.
fn victim(port_count: usize, target: std::net::SocketAddr, then: &str) -> String {
    format!(
        "exec setpriv --reuid=4242 --regid=4242 --clear-groups /usr/bin/python3 -c '
import socket, struct
for _ in range({port_count}):
    s = socket.socket()
    s.bind((\"127.0.0.1\", 0))
    print(s.getsockname()[1], flush=True)
    try:
        s.connect((\"{ip}\", {port}))
        {then}
    except OSError:
        pass
'",
        ip = target.ip(),
        port = target.port(),
    )
}

/// The borrower: `nobody`, binding each of `ports` in turn and connecting
/// straight to the agent's listener; prints what the agent answered.
fn borrower(ports: &[u16], listener_port: u16) -> String {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        "exec setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/python3 -c '
import socket
for port in [{ports}]:
    s = socket.socket()
    s.settimeout(5)
    try:
        s.bind((\"127.0.0.1\", port))
        s.connect((\"127.0.0.1\", {listener_port}))
        s.sendall(b\"GET / HTTP/1.0\\r\\n\\r\\n\")
        print(port, repr(s.recv(100)), flush=True)
    except OSError as e:
        print(port, type(e).__name__, flush=True)
'",
        ports = ports.join(", "),
    )
}

fn ports_of(out: &std::process::Output) -> Vec<u16> {
    stdout(out)
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

fn assert_nobody_borrowed(lines: &[Value], server: &Server) {
    assert_eq!(server.connections(), 0, "nothing reached the target");
    for line in lines {
        assert_eq!(line["outcome"], "rejected", "{line}");
        assert!(line["workload"].is_null(), "no identity was lent: {line}");
    }
}

#[test]
fn interception_records_are_bound_to_their_socket() {
    let server = Server::http("127.0.0.21:0", "secret\n");
    let cgroup = TestCgroup::new("borrow");
    let mut agent = Agent::start(
        &cgroup,
        "borrow",
        &format!(
            "[[target]]\nname = \"svc\"\nprotocol = \"tcp\"\naddress = \"{}\"\n\n\
             [[rule]]\nname = \"only-4242\"\nworkloads = [\"victim\"]\ntargets = [\"svc\"]\ndecision = \"allow\"\n\n\
             [[workload]]\nname = \"victim\"\nuid = 4242\n",
            server.addr
        ),
    );
    let listener_port = agent.listen_port();

    // 1. Connects made while the agent is down fail (closed), and leave
    //    nothing behind for the restarted agent.
    agent.kill9();
    let out = cgroup.sh(&victim(20, server.addr, "pass"));
    assert!(out.status.success(), "{}", stderr(&out));
    let ports = ports_of(&out);
    assert_eq!(ports.len(), 20);
    assert_eq!(
        server.connections(),
        0,
        "fail closed while the agent is down"
    );
    agent.spawn();
    let before = agent.access_lines().len();
    let out = cgroup.sh(&borrower(&ports, listener_port));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !stdout(&out).contains("secret"),
        "no borrower was served: {}",
        stdout(&out)
    );
    let lines = agent.wait_access_lines(before + ports.len());
    assert_nobody_borrowed(&lines[before..], &server);

    // 2. With the agent stalled, the victim's connects complete in the
    //    kernel's backlog and are reset by the victim before the agent
    //    accepts them: their records stay, and the borrower, on the same
    //    ports, gets the other socket's record. The cookie refuses it.
    let pid = agent.pid().unwrap() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let out = cgroup.sh(&victim(
        5,
        server.addr,
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack(\"ii\", 1, 0)); s.close()",
    ));
    let ports = ports_of(&out);
    assert_eq!(ports.len(), 5, "{}", stderr(&out));
    let borrowing = std::thread::spawn({
        let script = borrower(&ports, listener_port);
        let dir = cgroup.dir.clone();
        move || sh_in(&dir, &script)
    });
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let out = borrowing.join().unwrap();
    assert!(!stdout(&out).contains("secret"), "{}", stdout(&out));
    let before = lines.len();
    let lines = agent.wait_access_lines(before + ports.len());
    let borrowed: Vec<&Value> = lines[before..].iter().collect();
    assert!(
        borrowed.iter().any(|l| l["reason"]
            .as_str()
            .unwrap_or("")
            .contains("another socket")),
        "the victim's records were there and refused: {borrowed:?}"
    );
    assert_nobody_borrowed(&lines[before..], &server);

    // The victim itself is still served.
    let out = cgroup.sh(&format!(
        "exec setpriv --reuid=4242 --regid=4242 --clear-groups curl -sS --max-time 10 {}",
        server.url()
    ));
    assert_eq!(stdout(&out), "secret\n", "{}", stderr(&out));
}

#[test]
fn network_capabilities_and_the_old_mark_do_not_bypass_interception() {
    let server = Server::http("127.0.0.22:0", "secret\n");
    let cgroup = TestCgroup::new("netcaps");
    let agent = Agent::start(
        &cgroup,
        "netcaps",
        &format!(
            "[[target]]\nname = \"svc\"\nprotocol = \"tcp\"\naddress = \"{}\"\n\n\
             [[rule]]\nname = \"nobody\"\nworkloads = [\"*\"]\ntargets = [\"svc\"]\ndecision = \"deny\"\n",
            server.addr
        ),
    );
    // CAP_NET_RAW lets a process set SO_MARK (Linux 5.17+); with
    // CAP_NET_ADMIN too it can set any mark, including the one the agent
    // once used for its own sockets.
    let out = cgroup.sh(&format!(
        "exec setpriv --reuid=65534 --regid=65534 --clear-groups \
         --inh-caps=+net_raw,+net_admin --ambient-caps=+net_raw,+net_admin /usr/bin/python3 -c '
import socket, struct
for mark in (0x1d7c0001, 1, 0xffffffff):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, struct.pack(\"I\", mark))
    s.settimeout(5)
    try:
        s.connect((\"{ip}\", {port}))
        s.sendall(b\"GET / HTTP/1.0\\r\\n\\r\\n\")
        print(hex(mark), repr(s.recv(100)), flush=True)
    except OSError as e:
        print(hex(mark), type(e).__name__, flush=True)
'",
        ip = server.addr.ip(),
        port = server.addr.port(),
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    assert_eq!(printed.lines().count(), 3, "{printed}");
    assert!(!printed.contains("secret"), "{printed}");
    assert_eq!(server.connections(), 0, "nothing went direct");
    let lines = agent.wait_access_lines(3);
    for line in &lines {
        assert_eq!(line["decision"], "deny", "{line}");
        assert_eq!(line["workload"]["uid"], 65534, "{line}");
    }
}

#[test]
fn mptcp_clients_are_intercepted_and_see_the_original_destination() {
    let server = Server::http("127.0.0.23:0", "served\n");
    let cgroup = TestCgroup::new("mptcp");
    let agent = Agent::start(
        &cgroup,
        "mptcp",
        &format!(
            "[[target]]\nname = \"svc\"\nprotocol = \"tcp\"\naddress = \"{}\"\n\n\
             [[rule]]\nname = \"all\"\nworkloads = [\"*\"]\ntargets = [\"svc\"]\ndecision = \"allow\"\n",
            server.addr
        ),
    );
    let out = cgroup.sh(&format!(
        "exec /usr/bin/python3 -c '
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
s.settimeout(5)
try:
    s.connect((\"{ip}\", {port}))
    print(s.getpeername(), flush=True)
    s.sendall(b\"GET / HTTP/1.0\\r\\n\\r\\n\")
    print(repr(s.recv(200)), flush=True)
except OSError as e:
    print(type(e).__name__, e, flush=True)
'",
        ip = server.addr.ip(),
        port = server.addr.port(),
    ));
    let printed = stdout(&out);
    let expected = format!("('{}', {})", server.addr.ip(), server.addr.port());
    assert_eq!(
        printed.lines().next(),
        Some(expected.as_str()),
        "getpeername shows the original destination: {printed}{}",
        stderr(&out)
    );
    assert!(printed.contains("served"), "{printed}");
    let lines = agent.wait_access_lines(1);
    assert_eq!(lines[0]["decision"], "allow");
    assert_eq!(lines[0]["workload"]["comm"], "python3");
}
