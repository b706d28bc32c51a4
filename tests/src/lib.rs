//! Harness for the end-to-end tests: throwaway cgroups, the real `interlock`
//! binary run as a daemon inside them, loopback servers, and real clients
//! (`curl`, `python3`, `nc`) started inside the cgroup.
//!
//! Everything here panics with context instead of returning errors: a
//! failing step should say what it was doing. The tests need root (they
//! attach eBPF programs); without it they fail, loudly, with a reason.
use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// The agent binary under test (`cargo xtask test` sets INTERLOCK_BIN).
pub fn interlock_bin() -> PathBuf {
    let path = std::env::var_os("INTERLOCK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/interlock"));
    assert!(
        fs::metadata(&path).is_ok_and(|m| m.len() > 0),
        "{} is missing: build it first (`cargo xtask test` does)",
        path.display()
    );
    path
}

/// Fails the test (never skips it) when not running as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "end-to-end tests attach eBPF programs to cgroups and need root; run `sudo cargo xtask test`"
    );
}

/// The cgroup v2 mount point, from /proc/self/mountinfo.
pub fn cgroup_root() -> PathBuf {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    mountinfo
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.starts_with("cgroup2 ") {
                left.split_whitespace().nth(4).map(PathBuf::from)
            } else {
                None
            }
        })
        .expect("a cgroup v2 hierarchy must be mounted")
}

/// A throwaway cgroup; its processes are killed and it is removed on drop.
pub struct TestCgroup {
    pub dir: PathBuf,
    /// Path relative to the cgroup root, as /proc/PID/cgroup shows it.
    pub path: String,
    children: Vec<PathBuf>,
}

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        require_root();
        let path = format!("/interlock-e2e-{name}-{}", std::process::id());
        let dir = cgroup_root().join(path.trim_start_matches('/'));
        fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
        Self {
            dir,
            path,
            children: Vec::new(),
        }
    }

    /// A nested cgroup (e.g. `ci-job.service`), removed with its parent.
    pub fn child(&mut self, name: &str) -> (PathBuf, String) {
        let dir = self.dir.join(name);
        fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
        self.children.push(dir.clone());
        (dir, format!("{}/{name}", self.path))
    }

    /// Runs `script` with `sh` inside this cgroup (or a child's directory).
    pub fn sh(&self, script: &str) -> Output {
        sh_in(&self.dir, script)
    }
}

/// Runs `script` with `sh` after moving the shell into `cgroup_dir`.
pub fn sh_in(cgroup_dir: &Path, script: &str) -> Output {
    let wrapped = format!(
        "echo $$ > {}/cgroup.procs || exit 99\n{script}",
        cgroup_dir.display()
    );
    let output = Command::new("sh")
        .arg("-c")
        .arg(wrapped)
        .stdin(Stdio::null())
        .output()
        .expect("spawn sh");
    assert_ne!(
        output.status.code(),
        Some(99),
        "could not join cgroup {}",
        cgroup_dir.display()
    );
    output
}

fn kill_and_remove(dir: &Path) {
    for _ in 0..50 {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() {
            break;
        }
        for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
            // SAFETY: sending a signal has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = fs::remove_dir(dir);
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for child in self.children.iter().rev() {
            kill_and_remove(child);
        }
        kill_and_remove(&self.dir);
    }
}

/// A TCP port free on loopback right now and never handed out before in
/// this process (tests run in parallel threads). It is taken below the
/// kernel's ephemeral range (32768 and up): a port found free there can
/// be taken by any outgoing connection before the server it is for binds
/// it.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    let mut given = GIVEN.lock().unwrap();
    for n in 0.. {
        let port = 20_000 + ((seed.wrapping_add(n * 7_919)) % 12_000) as u16;
        let ipv6_free = match TcpListener::bind(("::1", port)) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::AddrNotAvailable,
        };
        if !given.contains(&port) && ipv6_free && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    unreachable!()
}

/// The real agent, run as `interlock run --config` inside a test cgroup.
pub struct Agent {
    child: Option<Child>,
    pub config: PathBuf,
    pub workdir: PathBuf,
    pub bpffs_dir: PathBuf,
    cgroup_dir: PathBuf,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
}

impl Agent {
    /// Writes a configuration (the `[agent]` section is generated; `policy`
    /// holds targets, workloads and rules), starts the agent and waits
    /// until its admin socket answers.
    pub fn start(cgroup: &TestCgroup, name: &str, policy: &str) -> Self {
        Self::start_with(cgroup, name, "", policy)
    }

    /// [`Agent::start`] with more `[agent]` settings (lines of TOML).
    pub fn start_with(cgroup: &TestCgroup, name: &str, settings: &str, policy: &str) -> Self {
        let workdir =
            std::env::temp_dir().join(format!("interlock-e2e-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&workdir);
        fs::create_dir_all(&workdir).unwrap();
        let bpffs_dir = PathBuf::from(format!(
            "/sys/fs/bpf/interlock-e2e-{name}-{}",
            std::process::id()
        ));
        let config = workdir.join("interlock.toml");
        let mut agent = Self {
            child: None,
            config,
            workdir,
            bpffs_dir,
            cgroup_dir: cgroup.dir.clone(),
            stdout: Arc::default(),
            stderr: Arc::default(),
        };
        fs::write(agent.workdir.join("settings"), settings).unwrap();
        agent.write_policy(policy);
        agent.spawn();
        agent
    }

    /// Rewrites the configuration file with a new policy (same `[agent]`).
    pub fn write_policy(&self, policy: &str) {
        let port = self.listen_port();
        let settings = fs::read_to_string(self.workdir.join("settings")).unwrap_or_default();
        // Enforcing, unless the settings say otherwise.
        let mode = if settings.contains("mode =") {
            ""
        } else {
            "mode = \"enforce\"\n"
        };
        let text = format!(
            "[agent]\n{mode}cgroup = {:?}\nlisten_port = {port}\nbpffs_dir = {:?}\nadmin_socket = {:?}\nstate_dir = {:?}\n{settings}\n\n{policy}",
            self.cgroup_dir.display().to_string(),
            self.bpffs_dir.display().to_string(),
            self.admin_socket().display().to_string(),
            self.workdir.join("state").display().to_string(),
        );
        // Write beside and rename, as editors and config management do, so
        // the agent never reads half a file.
        let staged = self.workdir.join("interlock.toml.new");
        fs::write(&staged, text).unwrap();
        fs::rename(&staged, &self.config).unwrap();
    }

    /// Writes raw text as the configuration file (for broken configs).
    pub fn write_raw(&self, text: &str) {
        let staged = self.workdir.join("interlock.toml.new");
        fs::write(&staged, text).unwrap();
        fs::rename(&staged, &self.config).unwrap();
    }

    pub fn listen_port(&self) -> u16 {
        let port_file = self.workdir.join("port");
        if let Ok(port) = fs::read_to_string(&port_file) {
            return port.trim().parse().unwrap();
        }
        let port = free_port();
        fs::write(&port_file, port.to_string()).unwrap();
        port
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.workdir.join("admin.sock")
    }

    /// (Re)starts the agent process inside the cgroup and waits for it.
    pub fn spawn(&mut self) {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"",
                self.cgroup_dir.display()
            ))
            .arg(interlock_bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .env("INTERLOCK_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn interlock");
        let stdout = child.stdout.take().unwrap();
        let lines = self.stdout.clone();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let log = self.stderr.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                log.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "interlock exited during start-up ({status}):\n{}",
                    self.stderr()
                );
            }
            if self.cli(&["status", "--json"]).status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "interlock did not become ready:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kill -9`: no cleanup runs, the pins stay.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM, then wait: the graceful path.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap()
    }

    pub fn sighup(&self) {
        let child = self.child.as_ref().expect("agent running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    }

    /// Runs the CLI against this agent's configuration.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(interlock_bin());
        cmd.args(args).arg("--config").arg(&self.config);
        cmd.stdin(Stdio::null())
            .output()
            .expect("run interlock CLI")
    }

    /// The ids of the agent's sessions, in the order `sessions list` gives.
    pub fn session_ids(&self) -> Vec<String> {
        let out = self.cli(&["sessions", "list", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let summary: Value = serde_json::from_str(l).unwrap();
                summary["id"].as_str().unwrap().to_owned()
            })
            .collect()
    }

    /// One session's events, as `sessions show --json` gives them.
    pub fn session_events_of(&self, id: &str) -> Vec<Value> {
        let out = self.cli(&["sessions", "show", id, "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
        shown["events"].as_array().cloned().unwrap_or_default()
    }

    /// Every event of every session of the agent.
    pub fn session_events(&self) -> Vec<Value> {
        self.session_ids()
            .iter()
            .flat_map(|id| self.session_events_of(id))
            .collect()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The agent's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How many access-log lines so far, of any kind (without parsing them).
    pub fn line_count(&self) -> usize {
        self.stdout.lock().unwrap().len()
    }

    /// Every access-log line so far, parsed (connections and statements).
    pub fn all_lines(&self) -> Vec<Value> {
        self.stdout
            .lock()
            .unwrap()
            .iter()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("access line is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// The connection lines so far (one per connection).
    pub fn access_lines(&self) -> Vec<Value> {
        self.all_lines()
            .into_iter()
            .filter(|l| l["event"] == "connection")
            .collect()
    }

    /// The statement lines so far (PostgreSQL sessions).
    pub fn statement_lines(&self) -> Vec<Value> {
        self.all_lines()
            .into_iter()
            .filter(|l| l["event"] == "statement")
            .collect()
    }

    /// Waits until at least `n` connection lines exist, then returns them.
    pub fn wait_access_lines(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let lines = self.access_lines();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} access lines, have {}:\n{}",
                lines.len(),
                self.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        // Every line the agent wrote keeps to the documented schema (not
        // checked when the test already failed: its own panic says more).
        if !std::thread::panicking() {
            for line in self.stdout.lock().unwrap().iter() {
                if let Err(error) = check_access_line(line) {
                    panic!(
                        "an access line does not keep to docs/access-log.schema.json: {error}\n{line}"
                    );
                }
            }
        }
        let _ = Command::new(interlock_bin())
            .arg("detach")
            .arg("--config")
            .arg(&self.config)
            .output();
        let _ = fs::remove_dir_all(&self.bpffs_dir);
        let _ = fs::remove_dir_all(&self.workdir);
    }
}

/// A loopback server that records who connected.
pub struct Server {
    pub addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Server {
    /// Answers any request with an HTTP 200 carrying `body`.
    pub fn http(bind: &str, body: &'static str) -> Self {
        Self::spawn(bind, move |mut stream| {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes());
        })
    }

    /// Reads to EOF, then writes everything back and closes.
    pub fn echo(bind: &str) -> Self {
        Self::spawn(bind, |mut stream| {
            let mut buf = Vec::new();
            if stream.read_to_end(&mut buf).is_ok() {
                let _ = stream.write_all(&buf);
            }
        })
    }

    fn spawn(
        bind: &str,
        handle: impl Fn(std::net::TcpStream) + Send + Sync + Copy + 'static,
    ) -> Self {
        let listener = TcpListener::bind(bind).unwrap_or_else(|e| panic!("binding {bind}: {e}"));
        let addr = listener.local_addr().unwrap();
        let peers: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let seen = peers.clone();
        thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                if let Ok(peer) = stream.peer_addr() {
                    seen.lock().unwrap().push(peer);
                }
                thread::spawn(move || handle(stream));
            }
        });
        Self { addr, peers }
    }

    /// How many connections reached this server.
    pub fn connections(&self) -> usize {
        self.peers.lock().unwrap().len()
    }

    /// `http://addr/` (with brackets for IPv6).
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &str) -> String {
    use sha2::Digest as _;
    let bytes = fs::read(path).unwrap();
    sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Makes the admin socket world-connectable, to test SO_PEERCRED itself.
pub fn open_socket_to_everyone(path: &Path) {
    fs::set_permissions(path, fs::Permissions::from_mode(0o666)).unwrap();
    let mut dir = path.parent();
    while let Some(d) = dir {
        if d == Path::new("/") || d == std::env::temp_dir() {
            break;
        }
        let mode = fs::metadata(d).unwrap().permissions().mode();
        fs::set_permissions(d, fs::Permissions::from_mode(mode | 0o011)).unwrap();
        dir = d.parent();
    }
}

/// Runs `tests/scripts/pgwire.py` (a bare PostgreSQL protocol client, for
/// message sequences libpq never sends) in a cgroup.
pub fn pgwire(cgroup_dir: &Path, addr: SocketAddr, mode: &str, sql: &str) -> Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pgwire.py");
    sh_in(
        cgroup_dir,
        &format!(
            "exec /usr/bin/python3 {script} {} {} {mode} \"{sql}\"",
            addr.ip(),
            addr.port()
        ),
    )
}

/// A process's peak resident memory (`VmHWM`), in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub(crate) fn as_postgres(script: &str) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--", "sh", "-c", script]);
    cmd
}

pub(crate) fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        stdout(&out),
        stderr(&out)
    );
}

/// A 3 MiB tmpfs mounted where the agent started as `agent_name` keeps its
/// state (`Agent::start` leaves the mount in place): a disk that really
/// fills up. Unmounted on drop.
pub struct SmallDisk(PathBuf);

impl SmallDisk {
    pub fn for_agent(agent_name: &str) -> Self {
        let state = std::env::temp_dir().join(format!(
            "interlock-e2e-{agent_name}-{}/state",
            std::process::id()
        ));
        fs::create_dir_all(&state).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs"])
            .arg(&state)
            .status()
            .unwrap();
        assert!(mounted.success(), "mount tmpfs");
        Self(state)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

mod apis;
mod garage;
mod nginx;
mod postgres;
mod sshd;

pub use apis::{API_USER, ApiServer, prometheus, registry};
pub use garage::Garage;
pub use nginx::{HELD_TOKEN, Nginx, upstream_certificates};
pub use postgres::Postgres;
pub use sshd::{SSH_USER, Sshd, ssh_client_config};

/// Checks one access line against `docs/access-log.schema.json`.
pub fn check_access_line(line: &str) -> Result<(), String> {
    static SCHEMA: std::sync::OnceLock<jsonschema::Validator> = std::sync::OnceLock::new();
    let validator = SCHEMA.get_or_init(|| {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/access-log.schema.json"
        );
        let schema: Value = serde_json::from_str(&fs::read_to_string(path).expect("the schema"))
            .expect("the schema is JSON");
        jsonschema::validator_for(&schema).expect("the schema compiles")
    });
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    match errors.is_empty() {
        true => Ok(()),
        false => Err(errors.join("; ")),
    }
}
