//! The agent's life: fail closed when it dies, take over on restart,
//! detach cleanly; reloads that keep the old policy on a bad file.
use std::{thread, time::Duration};

use interlock_e2e::*;

fn allow_policy(server: &Server) -> String {
    format!(
        "[[target]]\nname = \"svc\"\nprotocol = \"tcp\"\naddress = \"{}\"\n\n[[rule]]\nname = \"allow-svc\"\nworkloads = [\"*\"]\ntargets = [\"svc\"]\ndecision = \"allow\"\n",
        server.addr
    )
}

fn curl(cgroup: &TestCgroup, server: &Server) -> std::process::Output {
    cgroup.sh(&format!("exec curl -sS --max-time 10 {}", server.url()))
}

#[test]
fn kill9_fails_closed_restart_takes_over_detach_goes_direct() {
    let server = Server::http("127.0.0.6:0", "svc\n");
    let cgroup = TestCgroup::new("lifecycle");
    let mut agent = Agent::start(&cgroup, "lifecycle", &allow_policy(&server));

    let out = curl(&cgroup, &server);
    assert!(out.status.success(), "{}\n{}", stderr(&out), agent.stderr());
    assert_eq!(agent.wait_access_lines(1).len(), 1);
    assert_eq!(server.connections(), 1);

    // kill -9: the pinned programs keep redirecting to a closed port.
    agent.kill9();
    let out = curl(&cgroup, &server);
    assert!(
        !out.status.success(),
        "with the agent down the connection must fail"
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl: couldn't connect (refused): {}",
        stderr(&out)
    );
    assert_eq!(
        server.connections(),
        1,
        "nothing went direct while the agent was down"
    );

    // Restart: the new agent takes over the pins and intercepts again.
    agent.spawn();
    let out = curl(&cgroup, &server);
    assert!(out.status.success(), "{}\n{}", stderr(&out), agent.stderr());
    assert_eq!(server.connections(), 2);
    assert_eq!(agent.wait_access_lines(2).len(), 2);

    // SIGTERM is graceful, and pins stay: still fail closed.
    assert!(agent.terminate().success(), "{}", agent.stderr());
    assert_eq!(curl(&cgroup, &server).status.code(), Some(7));
    assert!(agent.bpffs_dir.join("links").exists());

    // detach: programs, links and pins go; connections go direct.
    let out = agent.cli(&["detach"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!agent.bpffs_dir.exists(), "pins removed");
    let out = curl(&cgroup, &server);
    assert!(
        out.status.success(),
        "after detach the connection goes direct: {}",
        stderr(&out)
    );
    assert_eq!(server.connections(), 3);
    assert_eq!(
        agent.access_lines().len(),
        2,
        "and the agent saw nothing of it"
    );
}

#[test]
fn detach_of_a_running_agent_stops_it() {
    let server = Server::http("127.0.0.9:0", "svc\n");
    let cgroup = TestCgroup::new("detach-live");
    let mut agent = Agent::start(&cgroup, "detach-live", &allow_policy(&server));
    let out = agent.cli(&["detach"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(agent.terminate().success() || !agent.bpffs_dir.exists());
    assert!(!agent.bpffs_dir.exists());
    assert!(curl(&cgroup, &server).status.success());
    assert_eq!(server.connections(), 1);
}

#[test]
fn reload_applies_good_files_and_keeps_the_old_policy_on_bad_ones() {
    let server = Server::http("127.0.0.10:0", "svc\n");
    let cgroup = TestCgroup::new("reload");
    let agent = Agent::start(&cgroup, "reload", &allow_policy(&server));
    assert!(curl(&cgroup, &server).status.success());

    // A broken file: unknown workload in a rule, on a known line and column.
    let good = std::fs::read_to_string(&agent.config).unwrap();
    let broken = format!(
        "{good}\n[[rule]]\nname = \"typo\"\nworkloads = [\"ci-jbos\"]\ntargets = [\"svc\"]\ndecision = \"deny\"\n"
    );
    let line = broken
        .lines()
        .position(|l| l.starts_with("workloads = [\"ci-jbos\"]"))
        .unwrap()
        + 1;
    agent.write_raw(&broken);
    let out = agent.cli(&["reload"]);
    assert!(!out.status.success(), "reload of a broken file must fail");
    let location = format!("interlock.toml:{line}:14: unknown workload \"ci-jbos\"");
    assert!(
        stderr(&out).contains(&location),
        "expected {location:?} in: {}",
        stderr(&out)
    );
    // The file watcher sees it too, and logs the same location.
    wait_for(
        || agent.stderr().contains(&location),
        "the watcher's reload error",
    );
    assert!(
        curl(&cgroup, &server).status.success(),
        "the old policy still allows"
    );

    // `policy check` says the same thing.
    let check = std::process::Command::new(interlock_bin())
        .args(["policy", "check"])
        .arg(&agent.config)
        .output()
        .unwrap();
    assert!(!check.status.success());
    assert!(stderr(&check).contains(&location), "{}", stderr(&check));

    // A good file that denies: applied by the watcher, with no command.
    agent.write_raw(&good.replace("decision = \"allow\"", "decision = \"deny\""));
    wait_for(
        || !curl(&cgroup, &server).status.success(),
        "the deny to take effect",
    );
    // The reset reaches the client just before the agent writes the line.
    wait_for(
        || {
            agent
                .access_lines()
                .last()
                .is_some_and(|l| l["decision"] == "deny")
        },
        "the deny's access line",
    );
    let lines = agent.access_lines();
    assert_eq!(
        lines.last().unwrap()["rule"],
        "allow-svc",
        "same rule name, now a deny"
    );

    // SIGHUP reloads as well.
    agent.write_raw(&good);
    agent.sighup();
    wait_for(
        || curl(&cgroup, &server).status.success(),
        "SIGHUP reload to allow again",
    );

    // A target removed by reload is no longer intercepted at all.
    agent.write_policy("[[target]]\nname = \"other\"\nprotocol = \"tcp\"\naddress = \"127.0.0.10:1\"\n[[rule]]\nname = \"r\"\nworkloads = [\"*\"]\ntargets = [\"other\"]\ndecision = \"deny\"\n");
    let out = agent.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let before = agent.access_lines().len();
    assert!(curl(&cgroup, &server).status.success());
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        agent.access_lines().len(),
        before,
        "unprotected now: the agent saw nothing"
    );
}

fn wait_for(mut condition: impl FnMut() -> bool, what: &str) {
    for _ in 0..100 {
        if condition() {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn shutdown_writes_the_access_line_of_a_connection_it_cancels() {
    let server = Server::echo("127.0.0.11:0");
    let cgroup = TestCgroup::new("shutdown");
    let mut agent = Agent::start(&cgroup, "shutdown", &allow_policy(&server));
    // A client that connects and holds the connection open.
    let mut holder = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec /usr/bin/python3 -c 'import socket,time; s=socket.create_connection((\"127.0.0.11\", {})); s.sendall(b\"held\"); print(\"open\", flush=True); time.sleep(60)'",
            cgroup.dir.display(),
            server.addr.port()
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    assert_eq!(first, "open\n");
    wait_for(
        || server.connections() == 1,
        "the held connection to reach the server",
    );
    assert!(
        agent.access_lines().is_empty(),
        "no line before the connection ends"
    );

    // SIGTERM: drain, then cancel; the cancelled connection still logs.
    assert!(agent.terminate().success(), "{}", agent.stderr());
    let lines = agent.wait_access_lines(1);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["outcome"], "cancelled");
    assert_eq!(lines[0]["bytes_up"], 4);
    holder.kill().unwrap();
    holder.wait().unwrap();
}
