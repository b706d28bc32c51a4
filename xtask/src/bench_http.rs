//! `cargo xtask bench http`: small JSON GETs over keep-alive HTTPS (`wrk`,
//! 8 connections) and a 1 GiB download (`curl`), against one real nginx,
//! three ways in one run: direct (the client holding the token), through
//! an nginx reverse proxy (`proxy_pass` with TLS both sides and the token
//! added: what a user would reach for to put a hop in front of an API),
//! and through Interlock (kernel redirect, release agent, token held by
//! the agent, every request decided and recorded). Ratios against direct
//! are printed; nothing asserts a timing.
use std::{fs, process::Command};

use anyhow::{Context as _, Result, bail};
use interlock_e2e::{Agent, HELD_TOKEN, Nginx, TestCgroup, free_port, sh_in};

pub fn run(seconds: u32, mib: u64) -> Result<()> {
    crate::bench::prepare()?;
    let nginx = Nginx::steady("bench");
    let download = nginx.file("-download", mib << 20);
    let proxy = ReverseProxy::start(&nginx)?;
    let cgroup = TestCgroup::new("bench-http");
    let policy = format!(
        "[[target]]\nname = \"api\"\nprotocol = \"http\"\naddress = \"127.0.0.1:{port}\"\ntls_ca_file = {ca:?}\n\
         [target.credential]\nbearer_token_file = {token:?}\n\
         [[rule]]\nname = \"bench\"\nworkloads = [\"*\"]\ntargets = [\"api\"]\ndecision = \"allow\"\n\
         methods = [\"GET\"]\npaths = [\"/api/v1/**\", \"{download}\"]\n",
        port = nginx.port,
        ca = nginx.ca(),
        token = nginx.token_file(),
    );
    let agent = Agent::start(&cgroup, "bench-http", &policy);
    let agent_ca = agent.workdir.join("state/ca/ca.pem").display().to_string();
    let token = format!("-H 'Authorization: Bearer {HELD_TOKEN}'");
    // (name, port, CA the client trusts, header it sends, through the agent)
    let paths = [
        ("direct", nginx.port, nginx.ca(), token.as_str(), false),
        ("nginx proxy", proxy.port, nginx.ca(), "", false),
        ("interlock", nginx.port, agent_ca, "", true),
    ];
    println!(
        "http: wrk -c 8 -t 2 for {seconds} s of GET /api/v1/items (keep-alive HTTPS), curl of {mib} MiB"
    );
    println!(
        "{:<12} {:>10} {:>7} {:>9} {:>9} {:>10} {:>7}",
        "path", "req/s", "ratio", "p50 ms", "p99 ms", "MB/s", "ratio"
    );
    let mut direct = (0.0, 0.0);
    for (name, port, ca, header, intercepted) in paths {
        let run = |script: &str| -> Result<String> {
            let out = if intercepted {
                sh_in(&cgroup.dir, script)
            } else {
                Command::new("sh").arg("-c").arg(script).output()?
            };
            if !out.status.success() {
                bail!("{name}: {script}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let url = format!("https://127.0.0.1:{port}");
        let wrk = run(&format!(
            "wrk -t 2 -c 8 -d {seconds}s --latency {header} {url}/api/v1/items"
        ))?;
        let report = WrkReport::parse(&wrk).with_context(|| format!("{name}: wrk said:\n{wrk}"))?;
        let speed = run(&format!(
            "curl -sS --fail --http1.1 --cacert {ca} {header} -o /dev/null -w '%{{speed_download}}' {url}{download}"
        ))?;
        let mbps = speed.trim().parse::<f64>().unwrap_or(f64::NAN) / 1e6;
        if name == "direct" {
            direct = (report.requests, mbps);
        }
        println!(
            "{name:<12} {:>10.0} {:>6.2}x {:>9.2} {:>9.2} {mbps:>10.1} {:>6.2}x",
            report.requests,
            report.requests / direct.0,
            report.p50_ms,
            report.p99_ms,
            mbps / direct.1
        );
    }
    println!(
        "agent peak RSS: {}",
        crate::bench::peak_rss(agent.pid().unwrap_or(0))
    );
    Ok(())
}

/// What `wrk --latency` printed.
struct WrkReport {
    requests: f64,
    p50_ms: f64,
    p99_ms: f64,
}

impl WrkReport {
    fn parse(text: &str) -> Option<Self> {
        let field = |prefix: &str| {
            text.lines()
                .map(str::trim)
                .find_map(|l| l.strip_prefix(prefix))
                .map(str::trim)
        };
        let errors = field("Non-2xx or 3xx responses:");
        if let Some(errors) = errors {
            eprintln!("wrk: {errors} responses were not 2xx");
        }
        Some(Self {
            requests: field("Requests/sec:")?.parse().ok()?,
            p50_ms: millis(field("50%")?)?,
            p99_ms: millis(field("99%")?)?,
        })
    }
}

/// `123.45us`, `1.23ms`, `1.02s` as milliseconds.
fn millis(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => number / 1000.0,
        "ms" => number,
        "s" => number * 1000.0,
        "m" => number * 60_000.0,
        _ => return None,
    })
}

/// nginx as a TLS-terminating reverse proxy in front of the upstream
/// nginx: its certificate, keep-alive upstream connections, the server's
/// certificate verified, the token added.
struct ReverseProxy {
    port: u16,
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl ReverseProxy {
    fn start(upstream: &Nginx) -> Result<Self> {
        let port = free_port();
        let dir = upstream.dir.join("proxy");
        fs::create_dir_all(&dir)?;
        let d = dir.display();
        let u = upstream.dir.display();
        fs::write(
            dir.join("nginx.conf"),
            format!(
                r#"daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/temp;
    upstream api {{
        server 127.0.0.1:{upstream_port};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {u}/server.pem;
        ssl_certificate_key {u}/server.key;
        location / {{
            proxy_pass https://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {HELD_TOKEN}";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {u}/ca.pem;
            proxy_ssl_name api.test;
            proxy_ssl_session_reuse on;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"#,
                upstream_port = upstream.port,
            ),
        )?;
        let child = Command::new("/usr/sbin/nginx")
            .args(["-c", &format!("{d}/nginx.conf"), "-p", &d.to_string()])
            .spawn()
            .context("starting the nginx reverse proxy")?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if std::time::Instant::now() > deadline {
                bail!(
                    "the nginx reverse proxy did not start: {}",
                    fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(Self { port, child, dir })
    }
}

impl Drop for ReverseProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
