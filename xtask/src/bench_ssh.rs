//! `cargo xtask bench ssh`: `scp` of 1 GiB and 1,000 sequential `ssh host
//! true`, against one real OpenSSH server, three ways in one run: direct
//! (the client holding the key), through an SSH bastion with `ssh -J` (the
//! tool a user would reach for to put a hop in front of servers), and
//! through Interlock (kernel redirect, release agent, key held by the
//! agent, policy and recording on). Ratios against direct are printed;
//! nothing asserts a timing.
use std::{fs, process::Command, time::Instant};

use anyhow::{Result, bail};
use interlock_e2e::{Agent, SSH_USER, Sshd, TestCgroup, sh_in};

const SERVER: &str = "127.0.0.80";
const BASTION: &str = "127.0.0.81";

pub fn run(mib: usize, connects: usize) -> Result<()> {
    crate::bench::prepare()?;
    let sshd = Sshd::start("bench", &[SERVER, BASTION]);
    let known = sshd.known_hosts(&[SERVER, BASTION]);
    let cgroup = TestCgroup::new("bench-ssh");
    let policy = format!(
        "[[target]]\nname = \"app\"\nprotocol = \"ssh\"\naddress = \"{SERVER}:22\"\nknown_hosts = {known:?}\n\
         [target.credential]\nuser = \"{SSH_USER}\"\nprivate_key_file = {key:?}\n\
         [[rule]]\nname = \"bench\"\nworkloads = [\"*\"]\ntargets = [\"app\"]\ndecision = \"allow\"\n\
         commands = [\"true\"]\nsubsystems = [\"sftp\"]\n",
        key = sshd.client_key(),
    );
    let agent = Agent::start(&cgroup, "bench-ssh", &policy);
    let dir = agent.workdir.clone();
    let out = agent.cli(&["ssh", "known-hosts"]);
    fs::write(
        dir.join("known_hosts"),
        [out.stdout, fs::read(&known)?].concat(),
    )?;
    let base = format!(
        "Host *\n  GlobalKnownHostsFile {}\n  UserKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n  \
         BatchMode yes\n  LogLevel ERROR\n  User {SSH_USER}\n",
        dir.join("known_hosts").display()
    );
    // Direct and through the bastion the client holds the key; through
    // Interlock it has none.
    fs::write(
        dir.join("with_key"),
        format!("{base}  IdentityFile {}\n", sshd.client_key().display()),
    )?;
    fs::write(
        dir.join("no_key"),
        format!("{base}  IdentityFile /dev/null\n"),
    )?;

    let file = dir.join("payload.bin");
    let status = Command::new("head")
        .args(["-c", &(mib << 20).to_string(), "/dev/urandom"])
        .stdout(fs::File::create(&file)?)
        .status()?;
    if !status.success() {
        bail!("writing the payload");
    }
    let paths = [
        ("direct", "with_key", "", false),
        ("ssh -J bastion", "with_key", "-J BASTION", false),
        ("interlock", "no_key", "", true),
    ];
    println!("ssh: scp of {mib} MiB, {connects} sequential `ssh host true`");
    println!(
        "{:<16} {:>10} {:>8} {:>14} {:>8}",
        "path", "scp MB/s", "ratio", "connect ms", "ratio"
    );
    let mut direct = (0.0, 0.0);
    for (name, config, jump, intercepted) in paths {
        let ssh = format!(
            "-F {} {}",
            dir.join(config).display(),
            jump.replace("BASTION", &format!("{SSH_USER}@{BASTION}"))
        );
        let remote = format!("/tmp/interlock-bench-ssh-{}", std::process::id());
        let run = |script: &str| -> Result<f64> {
            let started = Instant::now();
            let out = if intercepted {
                sh_in(&cgroup.dir, script)
            } else {
                Command::new("sh").arg("-c").arg(script).output()?
            };
            if !out.status.success() {
                bail!("{name}: {script}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(started.elapsed().as_secs_f64())
        };
        let secs = run(&format!(
            "scp -q {ssh} {} {SERVER}:{remote}",
            file.display()
        ))?;
        let _ = fs::remove_file(&remote);
        let mbps = (mib << 20) as f64 / 1e6 / secs;
        let total = run(&format!(
            "i=0; while [ $i -lt {connects} ]; do ssh {ssh} {SERVER} true || exit 1; i=$((i+1)); done"
        ))?;
        let connect_ms = total * 1000.0 / connects as f64;
        if name == "direct" {
            direct = (mbps, connect_ms);
        }
        println!(
            "{name:<16} {mbps:>10.1} {:>7.2}x {connect_ms:>14.2} {:>7.2}x",
            mbps / direct.0,
            connect_ms / direct.1
        );
    }
    println!(
        "agent peak RSS: {}",
        crate::bench::peak_rss(agent.pid().unwrap_or(0))
    );
    Ok(())
}
