//! A throwaway OpenSSH server, and a client configuration for the agent.
use super::*;

/// A real OpenSSH server of the test's own (Debian's `sshd`), on port 22 of
/// the given loopback addresses, with its own host key, and one user
/// (`deploy`, created if missing) who logs in only with the key in
/// [`Sshd::client_key`]: the key the agent holds, never the client.
pub struct Sshd {
    pub dir: PathBuf,
    child: Child,
}

pub const SSH_USER: &str = "deploy";

impl Sshd {
    pub fn start(name: &str, ips: &[&str]) -> Self {
        require_root();
        assert!(
            Path::new("/usr/sbin/sshd").exists(),
            "OpenSSH's server is missing (`cargo xtask setup` installs openssh-server)"
        );
        if !Command::new("id")
            .arg(SSH_USER)
            .output()
            .unwrap()
            .status
            .success()
        {
            run_ok(Command::new("useradd").args(["-m", "-s", "/bin/sh", SSH_USER]));
        }
        // No password, but not locked: sshd without PAM refuses locked
        // accounts even with a good key.
        run_ok(Command::new("usermod").args(["-p", "*", SSH_USER]));
        let dir =
            std::env::temp_dir().join(format!("interlock-sshd-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::create_dir_all("/run/sshd").unwrap();
        let d = dir.display();
        run_ok(Command::new("sh").arg("-c").arg(format!(
            "ssh-keygen -q -t ed25519 -N '' -f {d}/host_key && ssh-keygen -q -t ed25519 -N '' -f {d}/client_key \
             && cp {d}/client_key.pub {d}/authorized_keys && chmod 644 {d}/authorized_keys"
        )));
        let listen: String = ips
            .iter()
            .map(|ip| format!("ListenAddress {ip}:22\n"))
            .collect();
        fs::write(
            dir.join("sshd_config"),
            format!(
                "{listen}HostKey {d}/host_key\nPidFile {d}/sshd.pid\nAuthorizedKeysFile {d}/authorized_keys\n\
                 StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 PermitRootLogin no\nAllowTcpForwarding yes\nAcceptEnv LANG LC_*\n\
                 Subsystem sftp /usr/lib/openssh/sftp-server\nLogLevel VERBOSE\n"
            ),
        )
        .unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("sshd.log")).unwrap())
            .spawn()
            .expect("start sshd");
        let deadline = Instant::now() + Duration::from_secs(10);
        for ip in ips {
            while std::net::TcpStream::connect((*ip, 22)).is_err() {
                assert!(Instant::now() < deadline, "sshd did not listen on {ip}:22");
                thread::sleep(Duration::from_millis(50));
            }
        }
        Self { dir, child }
    }

    /// The private key the agent logs in with (root, 0600).
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client_key")
    }

    /// A known_hosts file naming the server's key for these addresses.
    pub fn known_hosts(&self, ips: &[&str]) -> PathBuf {
        let key = fs::read_to_string(self.dir.join("host_key.pub")).unwrap();
        let key: Vec<&str> = key.split_whitespace().take(2).collect();
        let path = self.dir.join("upstream_known_hosts");
        fs::write(&path, format!("{} {}\n", ips.join(","), key.join(" "))).unwrap();
        path
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }
}

/// An `ssh_config` for clients in a workload: it trusts the agent's host
/// key (as `interlock ssh known-hosts` prints it) and has no key of its own.
pub fn ssh_client_config(agent: &Agent) -> PathBuf {
    let out = agent.cli(&["ssh", "known-hosts"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = &agent.workdir;
    fs::write(dir.join("known_hosts"), stdout(&out)).unwrap();
    let config = dir.join("ssh_config");
    fs::write(
        &config,
        format!(
            "Host *\n  GlobalKnownHostsFile {}\n  UserKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n  \
             BatchMode yes\n  IdentityFile /dev/null\n  LogLevel ERROR\n",
            dir.join("known_hosts").display()
        ),
    )
    .unwrap();
    config
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
