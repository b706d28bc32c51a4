//! A throwaway Garage (S3-compatible) store, and what tests read of it.
use super::*;

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
