//! Two real JSON APIs from Debian's packages, each accepting only a
//! password the agent holds (HTTP Basic, bcrypt-checked by the server):
//! the Docker Distribution registry over HTTPS, and Prometheus over plain
//! HTTP with its admin API on.
use super::*;

/// The user both servers accept, with the password in `password_file()`.
pub const API_USER: &str = "ci";

/// A server's directory, port and process; killed and removed on drop.
pub struct ApiServer {
    pub dir: PathBuf,
    pub port: u16,
    child: Child,
}

impl ApiServer {
    /// A 0600 file holding the password the server accepts.
    pub fn password_file(&self) -> String {
        self.dir.join("password").display().to_string()
    }

    /// `curl` straight to the server with the password: the test's view of
    /// its state, never through the agent.
    pub fn direct(&self, scheme: &str, extra: &str, path: &str) -> String {
        let password = fs::read_to_string(self.password_file()).unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "curl -sS --max-time 20 --cacert {d}/ca.pem -u {API_USER}:{password} {extra} \
                 '{scheme}://127.0.0.1:{port}{path}'",
                d = self.dir.display(),
                port = self.port,
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    }

    fn start(name: &str, program: &str, args: &[String], dir: PathBuf, port: u16) -> Self {
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("server.log")).unwrap())
            .stderr(fs::File::create(dir.join("server.err")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        let server = Self { dir, port, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{name} did not start: {}",
                fs::read_to_string(server.dir.join("server.err")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(50));
        }
        server
    }
}

/// A fresh directory with the test CA's certificates, the password file
/// and its bcrypt `htpasswd` line.
fn server_dir(kind: &str, name: &str, program: &str) -> PathBuf {
    require_root();
    assert!(
        Path::new(program).exists(),
        "{program} is missing (`cargo xtask setup` installs it)"
    );
    assert!(
        Path::new("/usr/bin/htpasswd").exists(),
        "htpasswd is missing (`cargo xtask setup` installs apache2-utils)"
    );
    let dir = std::env::temp_dir().join(format!("interlock-{kind}-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    upstream_certificates(&dir);
    let password = format!("held-password-{}", std::process::id());
    let password_file = dir.join("password");
    fs::write(&password_file, &password).unwrap();
    fs::set_permissions(&password_file, fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new("htpasswd")
        .args(["-nbB", API_USER, &password])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    fs::write(dir.join("htpasswd"), &out.stdout).unwrap();
    dir
}

/// The Docker Distribution registry (`docker-registry`), HTTPS with the
/// test CA's certificate, `htpasswd` auth, deletes enabled.
pub fn registry(name: &str) -> ApiServer {
    let program = "/usr/bin/docker-registry";
    let dir = server_dir("registry", name, program);
    let port = free_port();
    let d = dir.display();
    fs::write(
        dir.join("config.yml"),
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {d}/data\n  \
             delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  tls:\n    \
             certificate: {d}/server.pem\n    key: {d}/server.key\nauth:\n  htpasswd:\n    \
             realm: registry\n    path: {d}/htpasswd\n"
        ),
    )
    .unwrap();
    let args = ["serve".into(), format!("{d}/config.yml")];
    ApiServer::start("docker-registry", program, &args, dir, port)
}

/// Prometheus, plain HTTP with Basic auth (its `--web.config.file`),
/// scraping itself every second, the admin API on; ready once it has a
/// sample of `up`.
pub fn prometheus(name: &str) -> ApiServer {
    let program = "/usr/bin/prometheus";
    let dir = server_dir("prometheus", name, program);
    let port = free_port();
    let d = dir.display();
    let htpasswd = fs::read_to_string(dir.join("htpasswd")).unwrap();
    let hash = htpasswd.trim().split_once(':').unwrap().1.to_owned();
    fs::write(
        dir.join("web.yml"),
        format!("basic_auth_users:\n  {API_USER}: '{hash}'\n"),
    )
    .unwrap();
    fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: prometheus\n    \
             basic_auth:\n      username: {API_USER}\n      password_file: {d}/password\n    \
             static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .unwrap();
    let args = [
        format!("--config.file={d}/prometheus.yml"),
        format!("--web.config.file={d}/web.yml"),
        format!("--web.listen-address=127.0.0.1:{port}"),
        format!("--storage.tsdb.path={d}/data"),
        "--web.enable-admin-api".into(),
    ];
    let server = ApiServer::start("prometheus", program, &args, dir, port);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server
        .direct("http", "", "/api/v1/query?query=up")
        .contains("\"value\"")
    {
        assert!(Instant::now() < deadline, "prometheus has no sample of up");
        thread::sleep(Duration::from_millis(200));
    }
    server
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
