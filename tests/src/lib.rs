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

/// A free TCP port on loopback (bound and released).
/// A port free right now and never handed out before in this process:
/// tests run in parallel threads, and the kernel may offer a port it just
/// gave one test to another before the first has bound it.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
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
        agent.write_policy(policy);
        agent.spawn();
        agent
    }

    /// Rewrites the configuration file with a new policy (same `[agent]`).
    pub fn write_policy(&self, policy: &str) {
        let port = self.listen_port();
        let text = format!(
            "[agent]\nmode = \"enforce\"\ncgroup = {:?}\nlisten_port = {port}\nbpffs_dir = {:?}\nadmin_socket = {:?}\nstate_dir = {:?}\n\n{policy}",
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

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A real PostgreSQL 15 cluster of the test's own, on a loopback address,
/// with SCRAM-SHA-256 for TCP logins and trust on its private Unix socket
/// (which only the harness uses, to set up and inspect).
pub struct Postgres {
    pub addr: SocketAddr,
    dir: PathBuf,
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

impl Postgres {
    pub fn start(name: &str, ip: &str) -> Self {
        Self::start_with(name, ip, false)
    }

    /// With `tls`, the server also speaks TLS, with a certificate for `ip`
    /// from a CA of the test's own (see [`Postgres::ca_file`]).
    pub fn start_with(name: &str, ip: &str, tls: bool) -> Self {
        require_root();
        assert!(
            Path::new(PG_BIN).join("postgres").exists(),
            "PostgreSQL 15 server binaries are missing in {PG_BIN} (`cargo xtask setup` installs them)"
        );
        let dir = std::env::temp_dir().join(format!("interlock-pg-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        run_ok(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir),
        );
        let data = dir.join("data");
        run_ok(&mut as_postgres(&format!(
            "{PG_BIN}/initdb -D {} -U postgres --auth-local=trust --auth-host=scram-sha-256 >/dev/null",
            data.display()
        )));
        let mut options = format!("-c listen_addresses={ip} -p {port} -k {}", dir.display());
        if tls {
            let d = dir.display();
            run_ok(&mut as_postgres(&format!(
                "cd {d} && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=interlock-test-ca 2>/dev/null \
                 && openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN={ip} 2>/dev/null \
                 && printf 'subjectAltName=IP:{ip}\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > ext.cnf \
                 && openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile ext.cnf 2>/dev/null \
                 && chmod 600 server.key"
            )));
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={d}/server.crt -c ssl_key_file={d}/server.key"
            ));
        }
        run_ok(&mut as_postgres(&format!(
            "{PG_BIN}/pg_ctl -D {} -l {}/log -w -o \"{options}\" start >/dev/null",
            data.display(),
            dir.display(),
        )));
        Self { addr, dir }
    }

    /// Runs SQL as the superuser over the private socket; returns stdout.
    pub fn admin_sql(&self, database: &str, sql: &str) -> String {
        let out = Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                "psql",
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .args([
                "-h",
                &self.dir.display().to_string(),
                "-p",
                &self.addr.port().to_string(),
                "-d",
                database,
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "admin SQL failed: {sql}\n{}",
            stderr(&out)
        );
        stdout(&out)
    }

    /// The CA that signed the server's certificate (with `start_with(.., true)`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The directory of its Unix socket (for tools run as `postgres`).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// Writes a password file the way the agent insists on (root, 0600).
    pub fn password_file(&self, password: &str) -> PathBuf {
        let path = self.dir.join("secret");
        fs::write(&path, format!("{password}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        path
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(&format!(
            "{PG_BIN}/pg_ctl -D {}/data -m immediate -w stop >/dev/null 2>&1",
            self.dir.display()
        ))
        .output();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn as_postgres(script: &str) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--", "sh", "-c", script]);
    cmd
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        stdout(&out),
        stderr(&out)
    );
}

/// A real Garage (S3-compatible object store) of the test's own, single
/// node on loopback, with one bucket and one access key.
pub struct Garage {
    /// `http://127.0.0.1:PORT`, the S3 API.
    pub endpoint: String,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
    dir: PathBuf,
    config: PathBuf,
    s3_port: u16,
    child: Option<Child>,
}

impl Garage {
    pub fn start(name: &str) -> Self {
        require_root();
        assert!(
            Command::new("garage")
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "garage is not on PATH (`cargo xtask setup` installs it)"
        );
        let dir =
            std::env::temp_dir().join(format!("interlock-garage-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let (rpc, s3, admin) = (free_port(), free_port(), free_port());
        let config = dir.join("garage.toml");
        let secret: String = (0..32)
            .map(|i| format!("{:02x}", (i * 37 + 11) % 256))
            .collect();
        fs::write(
            &config,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
                 [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n\
                 [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let mut garage = Self {
            endpoint: format!("http://127.0.0.1:{s3}"),
            bucket: "sessions".into(),
            key_id: String::new(),
            secret: String::new(),
            dir,
            config,
            s3_port: s3,
            child: None,
        };
        garage.resume();
        let node = garage.cli(&["node", "id", "-q"]);
        let node = node.trim().split('@').next().unwrap().to_owned();
        garage.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        garage.cli(&["layout", "apply", "--version", "1"]);
        garage.cli(&["bucket", "create", "sessions"]);
        let created = garage.cli(&["key", "create", "interlock-test"]);
        let field = |name: &str| {
            created
                .lines()
                .find(|l| l.trim_start().starts_with(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
                .unwrap_or_else(|| panic!("no {name} in `garage key create` output:\n{created}"))
        };
        garage.key_id = field("Key ID");
        garage.secret = field("Secret key");
        garage.cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            "sessions",
            "--key",
            "interlock-test",
        ]);
        garage
    }

    /// Runs the `garage` CLI against this node; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new("garage")
                .arg("-c")
                .arg(&self.config)
                .args(args)
                .output()
                .unwrap();
            if out.status.success() {
                return stdout(&out);
            }
            assert!(
                Instant::now() < deadline,
                "garage {args:?} failed:\n{}{}",
                stdout(&out),
                stderr(&out)
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops the server (kill -9): the store is down until [`Garage::resume`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// (Re)starts the server on its data and ports, and waits for its S3 API.
    pub fn resume(&mut self) {
        let log = fs::File::create(self.dir.join("garage.log")).unwrap();
        let child = Command::new("garage")
            .arg("-c")
            .arg(&self.config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start garage");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.s3_port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "garage did not listen:\n{}",
                fs::read_to_string(self.dir.join("garage.log")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// A credentials file as the agent wants it (0600).
    pub fn credentials_file(&self) -> PathBuf {
        let path = self.dir.join("s3-credentials.toml");
        fs::write(
            &path,
            format!(
                "access_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
                self.key_id, self.secret
            ),
        )
        .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    /// `[shipper]` for the agent, under `prefix`.
    pub fn shipper_section(&self, prefix: &str) -> String {
        format!(
            "[shipper]\nurl = \"s3://{}/{prefix}\"\nendpoint = \"{}\"\nregion = \"garage\"\ncredentials_file = {:?}\n",
            self.bucket,
            self.endpoint,
            self.credentials_file().display().to_string()
        )
    }

    /// Object keys under `prefix`, listed with curl's own SigV4 (not the
    /// agent's S3 client).
    pub fn list(&self, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = format!(
                "{}/{}?list-type=2&prefix={}",
                self.endpoint,
                self.bucket,
                urlencode(prefix)
            );
            if let Some(token) = &token {
                url.push_str(&format!("&continuation-token={}", urlencode(token)));
            }
            let body = String::from_utf8(self.curl(&url)).unwrap();
            keys.extend(xml_values(&body, "Key"));
            token = xml_values(&body, "NextContinuationToken")
                .into_iter()
                .next();
            if token.is_none() {
                return keys;
            }
        }
    }

    /// An object's bytes.
    pub fn get(&self, key: &str) -> Vec<u8> {
        self.curl(&self.object_url(key))
    }

    /// SigV4 signs the path as encoded: `=` in `host=…` goes as `%3D`.
    fn object_url(&self, key: &str) -> String {
        let path: Vec<String> = key.split('/').map(urlencode).collect();
        format!("{}/{}/{}", self.endpoint, self.bucket, path.join("/"))
    }

    /// Writes an object (as someone with the bucket's key could).
    pub fn put(&self, key: &str, bytes: &[u8]) {
        let file = self.dir.join("upload");
        fs::write(&file, bytes).unwrap();
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--aws-sigv4", "aws:amz:garage:s3"])
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "--user"])
            .arg(format!("{}:{}", self.key_id, self.secret))
            .arg("-T")
            .arg(&file)
            .arg(self.object_url(key))
            .output()
            .unwrap();
        assert!(out.status.success(), "curl PUT {key}: {}", stderr(&out));
    }

    fn curl(&self, url: &str) -> Vec<u8> {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--aws-sigv4", "aws:amz:garage:s3"])
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "--user"])
            .arg(format!("{}:{}", self.key_id, self.secret))
            .arg(url)
            .output()
            .unwrap();
        assert!(out.status.success(), "curl {url}: {}", stderr(&out));
        out.stdout
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn xml_values(body: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    body.split(&open)
        .skip(1)
        .filter_map(|rest| rest.split(&close).next())
        .map(|v| v.replace("&amp;", "&"))
        .collect()
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

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
