//! A throwaway nginx (Debian's) serving HTTPS with a certificate from a CA
//! of the test's own, and accepting only one bearer token: the one the
//! agent holds, never the client.
use super::*;

pub struct Nginx {
    pub dir: PathBuf,
    pub port: u16,
    child: Child,
}

/// The token nginx accepts; written to a 0600 file for the agent.
pub const HELD_TOKEN: &str = "held-token-7c1e";

impl Nginx {
    /// An nginx that closes each kept connection after 5 requests, as busy
    /// servers do, so tests meet requests in flight on a closing one.
    pub fn start(name: &str) -> Self {
        Self::start_closing_after(name, 5)
    }

    /// An nginx that keeps connections as long as its default (1,000
    /// requests), for benchmarks: what is measured is the proxy, not
    /// handshakes.
    pub fn steady(name: &str) -> Self {
        Self::start_closing_after(name, 1000)
    }

    fn start_closing_after(name: &str, keepalive_requests: u32) -> Self {
        require_root();
        assert!(
            Path::new("/usr/sbin/nginx").exists(),
            "nginx is missing (`cargo xtask setup` installs it)"
        );
        let dir =
            std::env::temp_dir().join(format!("interlock-nginx-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        upstream_certificates(&dir);
        // 100 MB to stream.
        fs::create_dir_all(dir.join("www")).unwrap();
        let big = fs::File::create(dir.join("www/big")).unwrap();
        big.set_len(100 << 20).unwrap();
        let port = free_port();
        fs::write(
            dir.join("nginx.conf"),
            format!(
                r#"daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{}}
http {{
    log_format seen '$request_method $request_uri $http_authorization';
    access_log {d}/access.log seen;
    log_format protocol '$server_protocol $request_method $request_uri';
    access_log {d}/protocol.log protocol;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {d}/server.pem;
        ssl_certificate_key {d}/server.key;
        ssl_client_certificate {d}/ca.pem;
        ssl_verify_client optional;
        default_type application/json;
        # A connection closed (HTTP/2: GOAWAY) every N requests.
        keepalive_requests {keepalive_requests};
        if ($http_authorization != "Bearer {HELD_TOKEN}") {{
            return 401 '{{"error": "unauthorized"}}\n';
        }}
        location /big {{
            root {d}/www;
        }}
        # A JSON document written by the test (`Nginx::json`).
        location /api/v1/users {{
            alias {d}/www/users.json;
        }}
        # The same, sent gzip-compressed whatever the client accepts
        # (`Nginx::json_gzip`).
        location /api/v1/packed {{
            gzip_static always;
            alias {d}/www/packed.json;
        }}
        # A text document written by the test (`Nginx::text`).
        location /api/v1/log {{
            default_type text/plain;
            alias {d}/www/log.txt;
        }}
        # Bytes that are neither JSON nor text, with a card number in them.
        location /api/v1/blob {{
            default_type application/octet-stream;
            return 200 'card 4111 1111 1111 1111\n';
        }}
        # A page that is not JSON, with a secret in it.
        location /api/v1/page {{
            default_type text/html;
            return 200 '<p>password: hunter2</p>\n';
        }}
        # Who presented a client certificate.
        location /api/v1/whoami {{
            return 200 '{{"verified": "$ssl_client_verify", "subject": "$ssl_client_s_dn"}}\n';
        }}
        # An endpoint that echoes the credential it got, body and header.
        location /api/v1/echo {{
            add_header X-Seen-Authorization $http_authorization;
            return 200 '{{"authorization": "$http_authorization"}}\n';
        }}
        location / {{
            return 200 '{{"method": "$request_method", "uri": "$request_uri", "host": "$host"}}\n';
        }}
    }}
}}
"#
            ),
        )
        .unwrap();
        let child = Command::new("/usr/sbin/nginx")
            .args(["-c", &format!("{d}/nginx.conf"), "-p", &d.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not start: {}",
                fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(20));
        }
        Self { dir, port, child }
    }

    /// The requests nginx received: `METHOD URI AUTHORIZATION`, one a line.
    pub fn seen(&self) -> Vec<String> {
        fs::read_to_string(self.dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The requests nginx received as `PROTOCOL METHOD URI`: which HTTP
    /// version reached it.
    pub fn protocols(&self) -> Vec<String> {
        fs::read_to_string(self.dir.join("protocol.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// A sparse file of `bytes` served at `/big<suffix>`.
    pub fn file(&self, suffix: &str, bytes: u64) -> String {
        let file = fs::File::create(self.dir.join(format!("www/big{suffix}"))).unwrap();
        file.set_len(bytes).unwrap();
        format!("/big{suffix}")
    }

    /// Serves `text` as the JSON document at `/api/v1/users`.
    pub fn json(&self, text: &[u8]) -> String {
        fs::write(self.dir.join("www/users.json"), text).unwrap();
        "/api/v1/users".into()
    }

    /// Serves `text` as the plain-text document at `/api/v1/log`.
    pub fn text(&self, text: &[u8]) -> String {
        fs::write(self.dir.join("www/log.txt"), text).unwrap();
        "/api/v1/log".into()
    }

    /// Serves `text` gzip-compressed at `/api/v1/packed`, with
    /// `Content-Encoding: gzip` even to a client that asked for none.
    pub fn json_gzip(&self, text: &[u8]) -> String {
        let plain = self.dir.join("www/packed.json");
        fs::write(&plain, text).unwrap();
        let gzip = Command::new("gzip")
            .args(["-kf", "-6"])
            .arg(&plain)
            .status()
            .expect("run gzip");
        assert!(gzip.success());
        "/api/v1/packed".into()
    }

    /// The requests nginx received, once there are at least `n` (nginx
    /// writes a request's line as it finishes it, which can be just after
    /// the client has its answer), or after 5 s.
    pub fn seen_at_least(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let seen = self.seen();
            if seen.len() >= n || Instant::now() > deadline {
                return seen;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn ca(&self) -> String {
        self.dir.join("ca.pem").display().to_string()
    }

    pub fn token_file(&self) -> String {
        self.dir.join("token").display().to_string()
    }
}

/// In `dir`: a CA of the test's own (`ca.pem`), a server certificate for
/// api.test and 127.0.0.1 (`server.pem`, `server.key`), a client
/// certificate (`client.pem`, `client.key`, CN ci-deployer), and the token
/// the server accepts in a 0600 file (`token`).
pub fn upstream_certificates(dir: &Path) {
    let d = dir.display();
    run_ok(Command::new("sh").arg("-c").arg(format!(
        "cd {d} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
           -subj '/CN=test upstream CA' -keyout ca.key -out ca.pem 2>/dev/null \
         && openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj '/CN=api.test' \
           -keyout server.key -out server.csr 2>/dev/null \
         && printf 'subjectAltName=DNS:api.test,IP:127.0.0.1\\n' > san.ext \
         && openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
           -extfile san.ext -out server.pem 2>/dev/null \
         && openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj '/CN=ci-deployer' \
           -keyout client.key -out client.csr 2>/dev/null \
         && printf 'extendedKeyUsage=clientAuth\\n' > client.ext \
         && openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
           -extfile client.ext -out client.pem 2>/dev/null && chmod 600 client.key"
    )));
    let token_file = dir.join("token");
    fs::write(&token_file, HELD_TOKEN).unwrap();
    fs::set_permissions(&token_file, fs::Permissions::from_mode(0o600)).unwrap();
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
