//! SSH command lines decided as the remote shell reads them: a deny rule on
//! `rm` against every way a workload might hide it, with the real OpenSSH
//! client and server, and the server's files checked after each attempt.
use std::path::Path;

use interlock_e2e::*;

const HOST: &str = "127.0.0.72";

fn policy(sshd: &Sshd, known_hosts: &Path) -> String {
    format!(
        r#"
[[target]]
name = "box"
protocol = "ssh"
address = "{HOST}:22"
known_hosts = {known_hosts:?}
[target.credential]
user = "{SSH_USER}"
private_key_file = {key:?}

[[rule]]
name = "may-look"
workloads = ["*"]
targets = ["box"]
decision = "allow"
commands = ["echo *", "ls *", "cat *", "true", "xargs echo *", "git-upload-pack *"]

[[rule]]
name = "never-rm"
workloads = ["*"]
targets = ["box"]
decision = "deny"
commands = ["rm *"]
"#,
        key = sshd.client_key(),
    )
}

#[test]
fn a_denied_command_is_refused_however_it_is_written() {
    let sshd = Sshd::start("commands", &[HOST]);
    let known_hosts = sshd.known_hosts(&[HOST]);
    let cgroup = TestCgroup::new("sshcmd");
    let agent = Agent::start(&cgroup, "sshcmd", &policy(&sshd, &known_hosts));
    let config = ssh_client_config(&agent);
    // What the workload wants gone, owned by the SSH user.
    let keep = format!("/tmp/interlock-keep-{}", std::process::id());
    std::fs::create_dir_all(format!("{keep}/sub")).unwrap();
    std::fs::write(format!("{keep}/sub/file"), "still here\n").unwrap();
    let out = std::process::Command::new("chown")
        .args(["-R", SSH_USER, &keep])
        .output()
        .unwrap();
    assert!(out.status.success());
    let ssh = |line: &str| {
        let quoted = line.replace('\'', r"'\''");
        cgroup.sh(&format!(
            "ssh -F {} {HOST} '{quoted}'; echo \"status=$?\"",
            config.display()
        ))
    };

    let k = &keep;
    for line in [
        format!("rm -rf {k}"),
        format!("rm -r -f {k}"),
        format!("rm -fr {k}"),
        format!("rm --recursive --force {k}"),
        format!("rm {k}/sub/file"),
        format!("/bin/rm -rf {k}"),
        format!("r''m -rf {k}"),
        format!("\\rm -rf {k}"),
        format!("sh -c 'rm -rf {k}'"),
        format!("bash -lc \"rm -rf {k}\""),
        format!("sh -c \"sh -c 'rm -rf {k}'\""),
        format!("echo $(rm -rf {k})"),
        format!("echo `rm -rf {k}`"),
        format!("true; rm -rf {k}"),
        format!("true && rm -rf {k}"),
        format!("false || rm -rf {k}"),
        format!("echo {k} | xargs rm -rf"),
        format!("env X=1 rm -rf {k}"),
        format!("sudo rm -rf {k}"),
        format!("timeout 5 nice -n 1 nohup rm -rf {k}"),
        format!("find {k} -exec rm -rf {{}} +"),
        format!("(cd /tmp && rm -rf {k})"),
        format!("for d in {k}; do rm -rf $d; done"),
        format!("f() {{ rm -rf {k}; }}; f"),
        // A command name only known when it runs may be `rm`.
        format!("$(echo rm) -rf {k}"),
        format!("$X -rf {k}"),
    ] {
        let out = ssh(&line);
        assert_eq!(
            stdout(&out),
            "status=126\n",
            "{line}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        let said = stderr(&out);
        assert!(
            said.contains("never-rm") && said.contains("`") && said.contains("rm"),
            "{line}: the refusal names the rule and the part: {said}"
        );
        assert_eq!(
            std::fs::read_to_string(format!("{k}/sub/file")).unwrap(),
            "still here\n",
            "{line} removed the file"
        );
    }

    // What cannot be known before it runs is refused, saying why.
    for (line, why) in [
        (format!("eval 'rm -rf {k}'"), "eval runs text"),
        (format!("sh -c \"$X\" ; echo {k}"), "built at run time"),
        (format!("echo x > {k}/sub/file"), "writes to a file"),
        ("bash".to_owned(), "reads its commands from its input"),
    ] {
        let out = ssh(&line);
        assert_eq!(stdout(&out), "status=126\n", "{line}: {}", stderr(&out));
        assert!(stderr(&out).contains(why), "{line}: {}", stderr(&out));
    }
    assert_eq!(
        std::fs::read_to_string(format!("{k}/sub/file")).unwrap(),
        "still here\n"
    );

    // Allowed commands still run, also through shells and pipes.
    let out = ssh(&format!("ls {k}/sub && sh -c 'echo a; echo b' | cat"));
    assert_eq!(stdout(&out), "file\na\nb\nstatus=0\n", "{}", stderr(&out));
    let out = ssh(&format!("echo {k} | xargs echo seen"));
    assert_eq!(
        stdout(&out),
        format!("seen {k}\nstatus=0\n"),
        "{}",
        stderr(&out)
    );

    // git clone: git-upload-pack with its quoted path.
    let repo = format!("/tmp/interlock-sshcmd-repo-{}.git", std::process::id());
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "git init -q --bare {repo} && chown -R {SSH_USER} {repo}"
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let work = agent.workdir.join("clone");
    let out = cgroup.sh(&format!(
        "GIT_SSH_COMMAND='ssh -F {}' git clone -q ssh://{HOST}{repo} {} 2>&1",
        config.display(),
        work.display()
    ));
    assert!(
        out.status.success(),
        "git clone: {}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(work.join(".git").exists());

    let _ = std::fs::remove_dir_all(&keep);
    let _ = std::fs::remove_dir_all(&repo);
}

#[test]
fn scp_and_exec_over_one_multiplexed_connection() {
    const MUX: &str = "127.0.0.74";
    let sshd = Sshd::start("mux", &[MUX]);
    let known_hosts = sshd.known_hosts(&[MUX]);
    let cgroup = TestCgroup::new("sshmux");
    let agent = Agent::start(
        &cgroup,
        "sshmux",
        &policy(&sshd, &known_hosts).replace(HOST, MUX).replace(
            "\"git-upload-pack *\"]",
            "\"git-upload-pack *\"]\nsubsystems = [\"sftp\"]",
        ),
    );
    let config = ssh_client_config(&agent);
    let dir = agent.workdir.clone();
    let control = dir.join("ctl");
    let source = dir.join("payload");
    std::fs::write(&source, "x".repeat(100_000)).unwrap();
    let opts = format!(
        "-F {} -o ControlPath={} -o ControlMaster=no",
        config.display(),
        control.display()
    );
    // The master: one SSH connection through the agent, kept open.
    let out = cgroup.sh(&format!(
        "ssh -F {} -o ControlMaster=yes -o ControlPath={} -o ControlPersist=300 -fN {MUX}",
        config.display(),
        control.display()
    ));
    assert!(out.status.success(), "master: {}", stderr(&out));

    let remote = format!("/tmp/interlock-mux-{}", std::process::id());
    let mut failures = Vec::new();
    // 50 in a row, then 50 more five at a time: channels opening and
    // closing beside each other on the one connection.
    for i in 0..50 {
        let out = cgroup.sh(&format!(
            "scp -q {opts} {} {MUX}:{remote}-{i}; echo scp=$?; ssh {opts} {MUX} 'cat {remote}-{i}' | wc -c",
            source.display()
        ));
        if !out.status.success() || !stdout(&out).contains("scp=0\n100000") {
            failures.push(format!("run {i}: {}{}", stdout(&out), stderr(&out)));
        }
    }
    for round in 0..10 {
        let script: String = (0..5)
            .map(|j| {
                let i = 50 + round * 5 + j;
                format!(
                    "(scp -q {opts} {} {MUX}:{remote}-{i}; echo scp=$?; ssh {opts} {MUX} 'cat {remote}-{i}' | wc -c) > {d}/out-{i} 2>&1 &\n",
                    source.display(),
                    d = dir.display()
                )
            })
            .collect();
        let out = cgroup.sh(&format!("{script}wait"));
        assert!(out.status.success());
        for j in 0..5 {
            let i = 50 + round * 5 + j;
            let printed = std::fs::read_to_string(dir.join(format!("out-{i}"))).unwrap();
            if !printed.contains("scp=0\n100000") {
                failures.push(format!("run {i} (parallel): {printed}"));
            }
        }
    }
    let _ = cgroup.sh(&format!("ssh {opts} -O exit {MUX}"));
    for i in 0..100 {
        let _ = std::fs::remove_file(format!("{remote}-{i}"));
    }
    assert!(
        failures.is_empty(),
        "{} of 100 failed: {failures:#?}",
        failures.len()
    );
}

/// A reload reaches an SSH connection that is already open: each new
/// request on it is decided under the policy live when it comes, both
/// ways (a command allowed before is refused after, and the reverse), and
/// a mask added by the reload covers the next command's output.
#[test]
fn a_reload_reaches_a_running_ssh_connection() {
    const RELOAD: &str = "127.0.0.75";
    let sshd = Sshd::start("reload", &[RELOAD]);
    let known_hosts = sshd.known_hosts(&[RELOAD]);
    let cgroup = TestCgroup::new("sshreload");
    let before = policy(&sshd, &known_hosts).replace(HOST, RELOAD);
    let agent = Agent::start(&cgroup, "sshreload", &before);
    let config = ssh_client_config(&agent);
    let control = agent.workdir.join("ctl");
    let out = cgroup.sh(&format!(
        "ssh -F {} -o ControlMaster=yes -o ControlPath={} -o ControlPersist=300 -fN {RELOAD}",
        config.display(),
        control.display()
    ));
    assert!(out.status.success(), "master: {}", stderr(&out));
    let ssh = |line: &str| {
        let out = cgroup.sh(&format!(
            "ssh -F {} -o ControlPath={} -o ControlMaster=no {RELOAD} '{line}'; echo \"status=$?\"",
            config.display(),
            control.display()
        ));
        (stdout(&out), stderr(&out))
    };
    let secret = "AKIAIOSFODNN7EXAMPLE";
    let (out, _) = ssh(&format!("echo {secret}"));
    assert!(out.contains(&format!("{secret}\nstatus=0")), "{out}");
    let (out, err) = ssh("id -un");
    assert!(out.contains("status=126"), "not allowed yet: {out}{err}");

    // `echo` leaves the allow rule, `id` joins it, API keys get masked.
    let after = before
        .replace("commands = [\"echo *\", ", "commands = [\"id *\", ")
        .replace(
            "decision = \"allow\"\n",
            "decision = \"allow\"\nmask = [{ pattern = \"api_key\" }]\n",
        );
    assert_ne!(after, before);
    agent.write_policy(&after);
    let reload = agent.cli(&["reload"]);
    assert!(reload.status.success(), "{}", stderr(&reload));

    let (out, err) = ssh("echo still-allowed");
    assert!(
        out.contains("status=126"),
        "echo is no longer allowed: {out}"
    );
    assert!(!out.contains("still-allowed"), "{out}");
    assert!(err.contains("no rule allows"), "{err}");
    let (out, err) = ssh("id -un");
    assert!(out.contains(&format!("{SSH_USER}\nstatus=0")), "{out}{err}");
    let (out, _) = ssh(&format!("ls /nonexistent-{secret} 2>&1"));
    assert!(
        out.contains("/nonexistent-****"),
        "masked after the reload: {out}"
    );
    assert!(!out.contains(secret), "{out}");

    // All of it on the one connection the client opened first.
    let _ = cgroup.sh(&format!(
        "ssh -F {} -o ControlPath={} -O exit {RELOAD}",
        config.display(),
        control.display()
    ));
    let connections = agent.wait_access_lines(1);
    let admitted = connections
        .iter()
        .filter(|line| line["target"] == "box")
        .count();
    assert_eq!(admitted, 1, "one SSH connection: {connections:#?}");
}

/// The session's record fails mid-way (a full disk under the store): the
/// SSH client is told why on stderr and disconnected, output stops, the
/// agent stays up and refuses new sessions until there is room.
#[test]
fn a_record_that_fails_ends_the_ssh_session() {
    const DISK: &str = "127.0.0.76";
    // The agent's state_dir on a 3 MiB tmpfs: a real ENOSPC.
    let _disk = SmallDisk::for_agent("sshdisk");
    let sshd = Sshd::start("disk", &[DISK]);
    let known_hosts = sshd.known_hosts(&[DISK]);
    let cgroup = TestCgroup::new("sshdisk");
    let full = policy(&sshd, &known_hosts).replace(HOST, DISK).replace(
        "[target.credential]",
        "record = \"full\"\n[target.credential]",
    );
    let agent = Agent::start(&cgroup, "sshdisk", &full);
    let config = ssh_client_config(&agent);

    // Output without end, every byte of it recorded: the disk fills.
    let out = cgroup.sh(&format!(
        "{{ timeout 60 ssh -F {} {DISK} 'cat /dev/zero'; echo \"status=$?\" >&2; }} | wc -c",
        config.display()
    ));
    let (printed, err) = (stdout(&out), stderr(&out));
    assert!(
        err.contains("the session cannot be recorded"),
        "the client is told why: {printed}{err}\n{}",
        agent.stderr()
    );
    assert!(
        !err.contains("status=124"),
        "it ended, not timed out: {err}"
    );
    let received: u64 = printed.lines().next().unwrap().trim().parse().unwrap();
    assert!(
        received < 8 << 20,
        "output stopped with the record: {received} bytes"
    );

    // The agent is up; a new session is refused, not served unrecorded.
    assert!(agent.cli(&["status"]).status.success());
    let out = cgroup.sh(&format!(
        "ssh -F {} {DISK} 'echo unrecorded'; echo \"status=$?\"",
        config.display()
    ));
    assert!(!stdout(&out).contains("unrecorded"), "{}", stdout(&out));
    let ended = agent
        .access_lines()
        .into_iter()
        .find(|line| line["outcome"] == "error")
        .unwrap_or_else(|| panic!("{:?}", agent.access_lines()));
    assert!(
        ended["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot be recorded")),
        "{ended}"
    );
}
