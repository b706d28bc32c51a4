//! SSH through the agent with the real OpenSSH client tools (`ssh`, `scp`,
//! `sftp`, `rsync`, `git`) in a workload cgroup, and Debian's real `sshd`
//! upstream: the client trusts the agent's host key through a known_hosts
//! file `interlock ssh known-hosts` wrote, has no key of its own, and the
//! agent logs in with the key it holds.
use std::{
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use interlock_e2e::*;
use serde_json::Value;

const APP: &str = "127.0.0.70";
/// The same server under another target whose pinned key is wrong.
const IMPOSTOR: &str = "127.0.0.71";
const ONCALL: u32 = 5001;

fn policy(sshd: &Sshd, known_hosts: &Path) -> String {
    format!(
        r#"
[[target]]
name = "app-1"
protocol = "ssh"
address = "{APP}:22"
known_hosts = {known_hosts:?}
record = "full"
mask = [{{ pattern = "api_key" }}]
[target.credential]
user = "{SSH_USER}"
private_key_file = {key:?}

[[target]]
name = "app-2"
protocol = "ssh"
address = "{IMPOSTOR}:22"
host_key_fingerprint = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
[target.credential]
user = "{SSH_USER}"
private_key_file = {key:?}

[[workload]]
name = "ci-jobs"
unit = "ci-job.service"

[[rule]]
name = "ci-may-run"
workloads = ["ci-jobs"]
targets = ["app-1", "app-2"]
decision = "allow"
commands = ["echo *", "true", "exit *", "printf *", "cat *", "sha256sum *",
            "git-upload-pack *", "git-receive-pack *", "rsync --server *", "uname *",
            "sleep *"]
shell = true
subsystems = ["sftp"]
# A rule's value mask adds to the target's (a column mask here, which
# SSH output cannot honour, is refused when the policy loads).
mask = [{{ pattern = "jwt" }}]

[[rule]]
name = "never-destroy"
workloads = ["*"]
targets = ["*"]
decision = "deny"
commands = ["rm -rf *", "** sudo **", "touch /tmp/interlock-ssh-denied*"]

[[rule]]
name = "uname-needs-oncall"
workloads = ["ci-jobs"]
targets = ["app-1"]
decision = "approve"
commands = ["uname *"]
approvers = ["uid:{ONCALL}"]
timeout = "1m"
"#,
        key = sshd.client_key(),
    )
}

/// Runs a shell script in the workload cgroup, with `$SSH` the ssh
/// command line the tools use.
fn client(job: &Path, config: &Path, script: &str) -> std::process::Output {
    sh_in(
        job,
        &format!(
            "export SSH='ssh -F {}'; export GIT_SSH_COMMAND=\"$SSH\"\n{script}",
            config.display()
        ),
    )
}

fn sessions(agent: &Agent) -> Vec<Value> {
    let out = agent.cli(&["sessions", "list", "--json", "--target", "app-1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn events(agent: &Agent, id: &str) -> Vec<Value> {
    let out = agent.cli(&["sessions", "show", id, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown: Value = serde_json::from_str(&stdout(&out)).unwrap();
    shown["events"].as_array().unwrap().clone()
}

/// Every event of every app-1 session so far.
fn all_events(agent: &Agent) -> Vec<Value> {
    sessions(agent)
        .iter()
        .flat_map(|s| events(agent, s["id"].as_str().unwrap()))
        .collect()
}

/// The tests of this file share the servers' addresses: one at a time,
/// each with its own server and agent (a failed one does not stop the
/// others).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// An upstream sshd on APP and IMPOSTOR, and an agent in a workload cgroup.
struct Setup {
    _serial: std::sync::MutexGuard<'static, ()>,
    sshd: Sshd,
    _cgroup: TestCgroup,
    job: std::path::PathBuf,
    agent: Agent,
    config: std::path::PathBuf,
}

fn setup(name: &str) -> Setup {
    let serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    require_root();
    for tool in ["ssh", "scp", "sftp", "rsync", "git"] {
        assert!(
            Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {tool}"))
                .output()
                .unwrap()
                .status
                .success(),
            "{tool} is missing (`cargo xtask setup` installs it)"
        );
    }
    let sshd = Sshd::start(name, &[APP, IMPOSTOR]);
    let upstream_known_hosts = sshd.known_hosts(&[APP, IMPOSTOR]);
    let mut cgroup = TestCgroup::new(name);
    let (job, _) = cgroup.child("ci-job.service");
    // A line per request in the access log too (a SIEM's view).
    let agent = Agent::start_with(
        &cgroup,
        name,
        "access_log_statements = true",
        &policy(&sshd, &upstream_known_hosts),
    );
    let config = ssh_client_config(&agent);
    Setup {
        _serial: serial,
        sshd,
        _cgroup: cgroup,
        job,
        agent,
        config,
    }
}

/// Commands, their exit statuses, refusals (nothing runs upstream), masked
/// output and an interactive shell; each in the session record, and the
/// shell replayed.
#[test]
fn commands_statuses_refusals_masks_and_a_shell() {
    let Setup {
        sshd,
        job,
        agent,
        config,
        ..
    } = &setup("ssh");
    // The host-level trust: what `interlock ssh known-hosts` prints.
    let out = agent.cli(&["ssh", "known-hosts"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = stdout(&out);
    assert!(
        lines
            .lines()
            .any(|l| l.starts_with(&format!("{APP} ssh-ed25519 "))),
        "{lines}"
    );
    let key_mode = std::fs::metadata(agent.workdir.join("state/ssh_host_ed25519.key"))
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap();
    assert_eq!(key_mode, 0o600, "the host key file is private");

    // A command, with no key of the client's own.
    let out = client(job, config, &format!("$SSH {SSH_USER}@{APP} 'echo ok'"));
    assert_eq!(
        stdout(&out),
        "ok\n",
        "{}\nsshd: {}",
        stderr(&out),
        sshd.log()
    );
    assert!(out.status.success());

    // Exit statuses pass through exactly.
    let out = client(
        job,
        config,
        &format!("$SSH {APP} 'exit 3'; echo \"status=$?\""),
    );
    assert_eq!(stdout(&out), "status=3\n", "{}", stderr(&out));

    // Denied: a message on stderr, status 126, and nothing ran upstream.
    let marker = format!("/tmp/interlock-ssh-denied-{}", std::process::id());
    let out = client(
        job,
        config,
        &format!("$SSH {APP} 'touch {marker}'; echo \"status=$?\""),
    );
    assert_eq!(stdout(&out), "status=126\n", "{}", stderr(&out));
    assert!(stderr(&out).contains("never-destroy"), "{}", stderr(&out));
    assert!(!Path::new(&marker).exists(), "the denied command ran");
    // An allowed command cannot smuggle another one.
    let out = client(
        job,
        config,
        &format!("$SSH {APP} 'echo hi; touch {marker}'; echo \"status=$?\""),
    );
    assert_eq!(stdout(&out), "status=126\n", "{}", stderr(&out));
    let out = client(
        job,
        config,
        &format!("$SSH {APP} 'echo $(id)'; echo \"status=$?\""),
    );
    assert_eq!(stdout(&out), "status=126\n", "{}", stderr(&out));
    assert!(!Path::new(&marker).exists(), "a compound command ran");

    // Output is masked, even split across packets (printf writes it whole,
    // the masks' look-behind is unit-tested with every split).
    let out = client(
        job,
        config,
        &format!("$SSH {APP} 'printf \"key=AKIAABCDEFGHIJKLMNOP end\\n\"'"),
    );
    assert_eq!(stdout(&out), "key=**** end\n", "{}", stderr(&out));

    // An interactive shell through a pty, driven by a script.
    let out = client(
        job,
        config,
        &format!(
            "(sleep 1; printf 'echo hello-from-$((6*7))\\n'; sleep 1; printf 'exit 5\\n') | $SSH -tt {APP}; echo \"status=$?\""
        ),
    );
    let text = stdout(&out);
    assert!(text.contains("hello-from-42"), "{text}\n{}", stderr(&out));
    assert!(text.ends_with("status=5\n"), "{text}");

    // The record: commands, decisions, exit statuses.
    thread::sleep(Duration::from_millis(500));
    let all = all_events(agent);
    let requests: Vec<&Value> = all.iter().filter(|e| e["kind"] == "ssh_request").collect();
    assert!(
        requests
            .iter()
            .any(|e| e["command"] == "echo ok" && e["decision"] == "allow"),
        "{requests:?}"
    );
    assert!(
        requests.iter().any(|e| e["command"]
            .as_str()
            .is_some_and(|c| c.starts_with("touch"))
            && e["decision"] == "deny"
            && e["rule"] == "never-destroy"),
        "{requests:?}"
    );
    assert!(all.iter().any(|e| e["kind"] == "exit" && e["status"] == 3));
    assert!(
        all.iter()
            .any(|e| e["kind"] == "exit" && e["status"] == 126)
    );
    assert!(all.iter().any(|e| e["kind"] == "ssh_login"));

    // The shell session replays and exports to asciicast.
    let shell = sessions(agent)
        .into_iter()
        .find(|s| {
            events(agent, s["id"].as_str().unwrap())
                .iter()
                .any(|e| e["kind"] == "ssh_request" && e["request"] == "shell")
        })
        .expect("the shell session");
    let shell_id = shell["id"].as_str().unwrap();
    let out = agent.cli(&["sessions", "replay", shell_id, "--speed", "0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("hello-from-42"), "{}", stdout(&out));
    let out = agent.cli(&["sessions", "export", shell_id, "--format", "asciicast"]);
    let cast = stdout(&out);
    let header: Value = serde_json::from_str(cast.lines().next().unwrap()).unwrap();
    assert_eq!(header["version"], 2);
    assert!(cast.contains("hello-from-42"));
    let out = agent.cli(&["sessions", "verify", shell_id]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Access lines: one per connection, and one per request.
    let lines = agent.all_lines();
    assert!(
        lines
            .iter()
            .any(|l| l["event"] == "ssh_request" && l["decision"] == "deny")
    );
}

/// scp and sftp (100 MB each way), rsync and git, byte for byte; SFTP
/// operations in the record.
#[test]
fn file_transfers_byte_for_byte() {
    let Setup {
        job, agent, config, ..
    } = &setup("ssh-files");
    let dir = agent.workdir.clone();
    // scp and sftp, 100 MB each way, byte for byte.
    let big = dir.join("big.bin");
    let status = Command::new("head")
        .args(["-c", "100000000", "/dev/urandom"])
        .stdout(std::fs::File::create(&big).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    let want = sha256_file(big.to_str().unwrap());
    let remote = format!("/tmp/interlock-ssh-big-{}", std::process::id());
    let d = dir.display();
    let out = client(
        job,
        config,
        &format!(
            "scp -q -F {c} {b} {APP}:{remote} && scp -q -F {c} {APP}:{remote} {d}/back.bin",
            c = config.display(),
            b = big.display()
        ),
    );
    assert!(out.status.success(), "scp: {}", stderr(&out));
    assert_eq!(sha256_file(&remote), want, "uploaded by scp");
    assert_eq!(
        sha256_file(&format!("{d}/back.bin")),
        want,
        "downloaded by scp"
    );
    std::fs::write(
        dir.join("sftp.batch"),
        format!("put {d}/big.bin {remote}.sftp\nget {remote}.sftp {d}/back2.bin\nrename {remote}.sftp {remote}.moved\nrm {remote}.moved\n"),
    )
    .unwrap();
    let out = client(
        job,
        config,
        &format!("sftp -q -F {} -b {d}/sftp.batch {APP}", config.display()),
    );
    assert!(
        out.status.success(),
        "sftp: {}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(
        sha256_file(&format!("{d}/back2.bin")),
        want,
        "downloaded by sftp"
    );
    assert!(!Path::new(&format!("{remote}.moved")).exists());

    // rsync over ssh.
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(tree.join("sub/b.txt"), "beta\n").unwrap();
    let dest = format!("/tmp/interlock-ssh-rsync-{}", std::process::id());
    let out = client(
        job,
        config,
        &format!("rsync -a -e \"$SSH\" {}/ {APP}:{dest}/", tree.display()),
    );
    assert!(out.status.success(), "rsync: {}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(format!("{dest}/sub/b.txt")).unwrap(),
        "beta\n"
    );

    // git clone and push over ssh to a bare repository.
    let repo = format!("/tmp/interlock-ssh-repo-{}.git", std::process::id());
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "git init -q --bare {repo} && chown -R {SSH_USER} {repo}"
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = client(
        job,
        config,
        &format!(
            "cd {d} && git clone -q ssh://{APP}{repo} work 2>&1 && cd work \
             && git -c user.name=ci -c user.email=ci@example.com commit -q --allow-empty -m first \
             && git push -q origin HEAD:main 2>&1 && git ls-remote origin"
        ),
    );
    assert!(
        out.status.success(),
        "git: {}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("refs/heads/main"), "{}", stdout(&out));

    thread::sleep(Duration::from_millis(500));
    let all = all_events(agent);
    assert!(
        all.iter().any(|e| e["kind"] == "sftp"
            && e["op"] == "open-write"
            && e["path"] == format!("{remote}.sftp")),
        "no sftp open-write event"
    );
    assert!(
        all.iter()
            .any(|e| e["kind"] == "sftp" && e["op"] == "rename")
    );
    assert!(
        all.iter()
            .any(|e| e["kind"] == "sftp" && e["op"] == "close" && e["written"] == 100_000_000)
    );
    let _ = std::fs::remove_file(&remote);
    let _ = std::fs::remove_dir_all(&dest);
    let _ = std::fs::remove_dir_all(&repo);
}

/// Port forwarding is refused unless a rule names the destination; a
/// server with the wrong key is refused; an exec an approve rule holds
/// runs once the on-call approves it.
#[test]
fn forwarding_host_keys_and_a_held_exec() {
    let Setup {
        job, agent, config, ..
    } = &setup("ssh-held");
    // Port forwarding is refused by default.
    let out = client(
        job,
        config,
        &format!("$SSH -W 127.0.0.1:22 {APP} </dev/null; echo \"status=$?\""),
    );
    assert!(
        stdout(&out).ends_with("status=255\n"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("forwarding failed"),
        "{}",
        stderr(&out)
    );

    // A server whose key is not the one configured is refused, and the
    // user reads why in their terminal.
    let out = client(
        job,
        config,
        &format!("$SSH {IMPOSTOR} 'echo ok'; echo \"status=$?\""),
    );
    assert_eq!(stdout(&out), "status=255\n", "{}", stderr(&out));
    assert!(stderr(&out).contains("host key"), "{}", stderr(&out));

    // An exec an approve rule holds, until the on-call approves it.
    let held = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec ssh -F {} {APP} 'uname -n'",
            job.display(),
            config.display()
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        let out = agent.cli(&["approvals", "list", "--json"]);
        let pending: Value = serde_json::from_str(stdout(&out).trim()).unwrap_or(Value::Null);
        if let Some(id) = pending
            .as_array()
            .and_then(|a| a.first())
            .and_then(|r| r["id"].as_str())
        {
            break id.to_owned();
        }
        assert!(Instant::now() < deadline, "no approval request appeared");
        thread::sleep(Duration::from_millis(200));
    };
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            &ONCALL.to_string(),
            "--regid",
            "65534",
            "--clear-groups",
        ])
        .arg(interlock_bin())
        .args(["approvals", "approve", &id, "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "approve: {}", stderr(&out));
    let out = held.wait_with_output().unwrap();
    assert!(out.status.success(), "held exec: {}", stderr(&out));
    assert!(!stdout(&out).trim().is_empty(), "uname printed nothing");
    assert!(stderr(&out).contains(&id), "{}", stderr(&out));

    thread::sleep(Duration::from_millis(500));
    let all = all_events(agent);
    assert!(
        all.iter().any(|e| e["kind"] == "ssh_request"
            && e["request"] == "forward"
            && e["decision"] == "deny"),
        "{all:?}"
    );
    assert!(
        all.iter()
            .any(|e| e["kind"] == "approval_decided" && e["outcome"] == "approved")
    );
}
