//! `cargo xtask bench postgres`: pgbench select-only and TPC-B-like (8
//! clients) and a ~1 GB streaming SELECT, direct vs PgBouncer in session pooling (the
//! PostgreSQL proxy a user would reach for) vs Interlock with statement
//! policy on, without and with masking, in one run against one real
//! PostgreSQL 15.
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use interlock_e2e::{Agent, Postgres, TestCgroup, free_port, sh_in};

const PASSWORD: &str = "bench-password";

pub fn run(seconds: u32, stream_rows: u64) -> Result<()> {
    crate::bench::prepare()?;
    let pg = Postgres::start("bench", "127.0.0.40");
    pg.admin_sql(
        "postgres",
        &format!("CREATE ROLE app LOGIN PASSWORD '{PASSWORD}'"),
    );
    let init = Command::new("runuser")
        .args([
            "-u", "postgres", "--", "pgbench", "-q", "-i", "-s", "10", "-h",
        ])
        .arg(pg.socket_dir())
        .args(["-p", &pg.addr.port().to_string(), "postgres"])
        .output()?;
    if !init.status.success() {
        bail!("pgbench -i: {}", String::from_utf8_lossy(&init.stderr));
    }
    pg.admin_sql(
        "postgres",
        "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO app",
    );

    let secret = pg.password_file(PASSWORD);
    let policy = |masks: &str| {
        format!(
            "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = \"{}\"\ntls = \"disable\"\n\
             [target.credential]\nuser = \"app\"\npassword_file = {:?}\n\
             [[rule]]\nname = \"bench-reads\"\nworkloads = [\"*\"]\ntargets = [\"db\"]\ndecision = \"allow\"\n\
             statements = [\"select\", \"set\", \"show\", \"transaction\", \"insert\", \"update\"]\ntables = [\"public.*\", \"pg_catalog.*\"]\n{masks}",
            pg.addr,
            secret.display().to_string()
        )
    };
    let cgroup = TestCgroup::new("bench-pg");
    let agent = Agent::start(&cgroup, "bench-pg", &policy(""));
    // Masking on: a catalog-resolved column and a pattern that scans every
    // value of every row.
    let masked_cgroup = TestCgroup::new("bench-pg-mask");
    let masked_agent = Agent::start(
        &masked_cgroup,
        "bench-pg-mask",
        &policy(
            "mask = [{ column = \"pgbench_accounts.filler\" }, { pattern = \"email\", strategy = \"hash\" }]\n",
        ),
    );
    let bouncer = PgBouncer::start(&pg)?;

    // (name, host, port, the agent's cgroup to run in)
    let paths = [
        ("direct", pg.addr.ip().to_string(), pg.addr.port(), None),
        ("pgbouncer", bouncer.host.clone(), bouncer.port, None),
        (
            "interlock",
            pg.addr.ip().to_string(),
            pg.addr.port(),
            Some(&cgroup),
        ),
        (
            "interlock, masking on",
            pg.addr.ip().to_string(),
            pg.addr.port(),
            Some(&masked_cgroup),
        ),
    ];
    let mut tps = Vec::new();
    let mut tps_simple = Vec::new();
    let mut tps_writes = Vec::new();
    let mut latency = Vec::new();
    let mut stream = Vec::new();
    for (name, host, port, intercepted) in &paths {
        eprintln!("measuring {name}...");
        let client_env = if intercepted.is_some() {
            String::new()
        } else {
            format!("PGPASSWORD={PASSWORD} ")
        };
        let cmd = format!(
            "{client_env}pgbench -n -S -c 8 -j 2 -T {seconds} -M extended -h {host} -p {port} -U app postgres 2>&1"
        );
        let out = run_where(*intercepted, &cmd)?;
        let value = |prefix: &str| -> Result<f64> {
            out.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no {prefix:?} in pgbench output:\n{out}"))
        };
        tps.push(value("tps = ")?);
        latency.push(value("latency average = ")?);
        // The simple protocol sends each statement as text with its
        // literal: every one is a new text to the agent (analyses shared
        // by statement shape).
        let out = run_where(*intercepted, &cmd.replace("-M extended", "-M simple"))?;
        tps_simple.push(
            out.lines()
                .find_map(|l| l.strip_prefix("tps = "))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no tps in pgbench output:\n{out}"))?,
        );
        // TPC-B-like: three UPDATEs, a SELECT and an INSERT in a
        // transaction; every write durable before it goes upstream.
        let out = run_where(*intercepted, &cmd.replace(" -S ", " "))?;
        tps_writes.push(
            out.lines()
                .find_map(|l| l.strip_prefix("tps = "))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no tps in pgbench output:\n{out}"))?,
        );

        let sql = format!("SELECT repeat('x', 1000) FROM generate_series(1, {stream_rows})");
        let started = Instant::now();
        let out = run_where(
            *intercepted,
            &format!(
                "{client_env}psql -X -w -q -t -A -h {host} -p {port} -U app -d postgres -c \"{sql}\" | wc -c"
            ),
        )?;
        let bytes: f64 = out
            .trim()
            .parse()
            .with_context(|| format!("psql output: {out}"))?;
        stream.push(bytes / 1e6 / started.elapsed().as_secs_f64());
    }
    let peak = |agent: &Agent| {
        agent
            .pid()
            .map_or_else(|| "?".into(), crate::bench::peak_rss)
    };

    println!(
        "\nInterlock PostgreSQL benchmark (PostgreSQL 15, pgbench scale 10, {} cores)",
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<44} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "scenario",
        "direct",
        "pgbouncer",
        "interlock",
        "+masking",
        "il/direct",
        "il/bouncer",
        "+m/direct"
    );
    let row = |name: &str, v: &[f64], higher_is_better: bool| {
        let (d, b, i, m) = (v[0], v[1], v[2], v[3]);
        let ratio = |x: f64, of: f64| if higher_is_better { x / of } else { of / x };
        println!(
            "{name:<44} {d:>10.1} {b:>10.1} {i:>10.1} {m:>10.1} {:>10.2} {:>10.2} {:>10.2}",
            ratio(i, d),
            ratio(i, b),
            ratio(m, d)
        );
    };
    row(
        &format!("pgbench -S -M extended, 8 clients, {seconds} s: TPS"),
        &tps,
        true,
    );
    row("  latency average, ms", &latency, false);
    row(
        &format!("pgbench -S -M simple, 8 clients, {seconds} s: TPS"),
        &tps_simple,
        true,
    );
    row(
        &format!("pgbench TPC-B-like -M extended, 8 clients, {seconds} s: TPS"),
        &tps_writes,
        true,
    );
    row(
        &format!("SELECT {stream_rows} rows of 1 KB, MB/s"),
        &stream,
        true,
    );
    println!("(ratios: share of the other path's performance; 1.00 = as fast)");
    println!(
        "interlock: statement policy on (every statement parsed, decided and audited); peak RSS {}",
        peak(&agent)
    );
    println!(
        "+masking: a catalog-resolved column mask and an e-mail pattern hashing matches in every value; peak RSS {}",
        peak(&masked_agent)
    );
    Ok(())
}

/// Runs a shell command in an agent's cgroup (intercepted) or outside it.
fn run_where(cgroup: Option<&TestCgroup>, script: &str) -> Result<String> {
    let out = match cgroup {
        Some(cgroup) => sh_in(&cgroup.dir, script),
        None => Command::new("sh").arg("-c").arg(script).output()?,
    };
    if !out.status.success() {
        bail!(
            "{script}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// PgBouncer in session pooling, logging in to the server as `app`.
struct PgBouncer {
    host: String,
    port: u16,
    child: Child,
    dir: std::path::PathBuf,
}

impl PgBouncer {
    fn start(pg: &Postgres) -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("interlock-bench-pgbouncer-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let host = "127.0.0.41".to_owned();
        let port = free_port();
        fs::write(dir.join("users.txt"), format!("\"app\" \"{PASSWORD}\"\n"))?;
        fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\npostgres = host={} port={} dbname=postgres\n\n[pgbouncer]\nlisten_addr = {host}\nlisten_port = {port}\n\
                 unix_socket_dir =\nauth_type = plain\nauth_file = {}/users.txt\npool_mode = session\nmax_client_conn = 100\n\
                 default_pool_size = 20\nlogfile = {}/pgbouncer.log\n",
                pg.addr.ip(),
                pg.addr.port(),
                dir.display(),
                dir.display()
            ),
        )?;
        Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()?;
        fs::set_permissions(dir.join("users.txt"), fs::Permissions::from_mode(0o600))?;
        let child = Command::new("runuser")
            .args(["-u", "postgres", "--", "pgbouncer"])
            .arg(dir.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting pgbouncer")?;
        for _ in 0..100 {
            if std::net::TcpStream::connect((host.as_str(), port)).is_ok() {
                return Ok(Self {
                    host,
                    port,
                    child,
                    dir,
                });
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!("pgbouncer did not listen on {host}:{port}")
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // runuser forwards the signal to pgbouncer.
        let _ = self.child.kill();
        let _ = Command::new("pkill")
            .args(["-f", &self.dir.join("pgbouncer.ini").display().to_string()])
            .status();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
