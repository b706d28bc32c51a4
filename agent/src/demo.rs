//! `interlock demo`: the whole data path on one host in a few seconds, with
//! an embedded configuration. Two small HTTP services stand in for
//! protected targets; `curl`, run in a throwaway cgroup, is redirected to
//! the agent, allowed to one and denied the other. When PostgreSQL is
//! installed, a throwaway cluster is a third target: `psql` in the cgroup
//! reads a table with a column masked, is refused a DELETE, and the
//! session is replayed from its record. The agent's own logs go to a file
//! (`open_log`), so the output is the demo's story alone.
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::Args;
use tokio::{io::AsyncWriteExt, net::TcpListener};

use crate::{config::Config, daemon::Agent, workload::CgroupFs};

#[derive(Args)]
pub struct DemoArgs {
    /// Keep the agent running after the demo requests (Ctrl-C to stop), so
    /// you can try `curl` from the demo cgroup yourself.
    #[arg(long)]
    keep: bool,
}

/// The embedded configuration; `{..}` fields are filled in at start.
const DEMO_CONFIG: &str = r#"
[agent]
mode = "enforce"
cgroup = "{cgroup_dir}"
listen_port = {listen_port}
bpffs_dir = "/sys/fs/bpf/interlock-demo-{id}"
admin_socket = "/run/interlock-demo-{id}/admin.sock"
state_dir = "/run/interlock-demo-{id}"

[[target]]
name = "demo-api"
protocol = "tcp"
address = "127.0.0.42:{api_port}"

[[target]]
name = "demo-secrets"
protocol = "tcp"
address = "127.0.0.43:{secrets_port}"

[[workload]]
name = "demo-clients"
cgroup = "{cgroup}"

[[rule]]
name = "demo-clients-use-api"
workloads = ["demo-clients"]
targets = ["demo-api"]
decision = "allow"

[[rule]]
name = "nobody-reads-secrets"
workloads = ["*"]
targets = ["demo-secrets"]
decision = "deny"
"#;

/// The PostgreSQL part, when a server is installed.
const DEMO_PG_CONFIG: &str = r#"
[[target]]
name = "demo-db"
protocol = "postgres"
address = "127.0.0.44:{pg_port}"
tls = "disable"
[target.credential]
user = "app"
password_file = "{pg_password_file}"

[[rule]]
name = "demo-clients-read-customers"
workloads = ["demo-clients"]
targets = ["demo-db"]
decision = "allow"
statements = ["select"]
tables = ["public.customers"]
mask = [{ column = "customers.email", strategy = "partial", keep = 4 }]
"#;

/// Where the agent's log and access log go while the demo runs.
pub fn log_path() -> PathBuf {
    std::env::temp_dir().join("interlock-demo.log")
}

pub fn open_log() -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = log_path();
    let _ = std::fs::remove_file(&path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(demo(args))
}

async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let id = std::process::id();
    let cgroups = CgroupFs::discover().context("no cgroup v2 hierarchy is mounted")?;
    let cgroup = format!("/interlock-demo-{id}");
    let cgroup_dir = cgroups.dir(&cgroup);
    std::fs::create_dir_all(&cgroup_dir)
        .with_context(|| format!("creating demo cgroup {}", cgroup_dir.display()))?;

    let api = serve_http("127.0.0.42:0", "hello from demo-api\n").await?;
    let secrets = serve_http("127.0.0.43:0", "top secret\n").await?;
    let listen_port = free_port().await?;
    let postgres = match DemoPostgres::start(id) {
        Ok(pg) => Some(pg),
        Err(why) => {
            println!("(PostgreSQL is left out: {why:#})");
            None
        }
    };
    let mut text = DEMO_CONFIG
        .replace("{cgroup_dir}", &cgroup_dir.display().to_string())
        .replace("{cgroup}", &cgroup)
        .replace("{listen_port}", &listen_port.to_string())
        .replace("{api_port}", &api.to_string())
        .replace("{secrets_port}", &secrets.to_string())
        .replace("{id}", &id.to_string());
    if let Some(pg) = &postgres {
        text.push_str(
            &DEMO_PG_CONFIG
                .replace("{pg_port}", &pg.port.to_string())
                .replace(
                    "{pg_password_file}",
                    &pg.password_file().display().to_string(),
                ),
        );
    }
    let config = Config::from_text("<embedded demo>", &text)?;
    // Whatever happens, the demo leaves no cgroup, pins or socket behind.
    let _cleanup = Cleanup {
        cgroup_dir: cgroup_dir.clone(),
        bpffs_dir: config.agent.bpffs_dir.clone(),
        run_dir: config.agent.state_dir.clone(),
    };
    let agent = Agent::start(config, None).await?;
    let listen: Vec<String> = agent.listen.iter().map(ToString::to_string).collect();
    println!(
        "== the agent is attached to {} and listens on {} ==\n   (its log and access log: {})\n",
        cgroup_dir.display(),
        listen.join(" and "),
        log_path().display()
    );

    println!("== TCP: the policy decides per connection ==");
    for (name, ip, port, why) in [
        (
            "demo-api",
            "127.0.0.42",
            api,
            "allowed: rule demo-clients-use-api",
        ),
        (
            "demo-secrets",
            "127.0.0.43",
            secrets,
            "denied: rule nobody-reads-secrets",
        ),
    ] {
        let url = format!("http://{ip}:{port}/");
        let shown = in_cgroup(&cgroup_dir, &format!("curl -sS --max-time 5 {url}"))
            .await
            .context("running curl (is it installed?)")?;
        println!("$ curl {url}     # {name}, {why}\n{shown}");
    }

    if let Some(pg) = &postgres {
        println!("== PostgreSQL: the policy decides per statement ==");
        println!(
            "   (the job holds no password: the agent logs in with the target's own credential)"
        );
        let psql = format!("psql -X -w -h 127.0.0.44 -p {} -U app -d postgres", pg.port);
        let (select, delete) = (
            "SELECT id, name, email FROM customers ORDER BY id",
            "DELETE FROM customers",
        );
        let shown = in_cgroup(&cgroup_dir, &format!("{psql} -c '{select}' -c '{delete}'")).await?;
        println!(
            "$ psql -c '{select}' -c '{delete}'\n   # one session: the SELECT is allowed with customers.email masked; no rule allows a DELETE\n{}\n",
            shown.trim_end()
        );
        let left = pg.sql("SELECT count(*) FROM customers")?;
        println!(
            "(the server, asked directly: {} customers, none deleted)\n",
            left.trim()
        );
    }

    // Let the sessions of all connections end before they are listed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sessions: Vec<crate::sessions::Summary> = serde_json::from_value(
        crate::admin::call(
            &agent.admin_socket,
            &crate::admin::Request::SessionsList {
                filter: Default::default(),
            },
        )
        .await?,
    )?;
    println!("== status (interlock status) ==");
    crate::cli::print_status(&agent.status());
    println!();
    let mut table = Vec::new();
    crate::sessions::view::print_list(&sessions, false, &mut table)?;
    println!(
        "== recorded sessions (interlock sessions list) ==\n{}",
        String::from_utf8_lossy(&table)
    );
    if postgres.is_some()
        && let Some(session) = sessions.iter().find(|s| s.protocol == "postgres")
    {
        let data = crate::admin::call(
            &agent.admin_socket,
            &crate::admin::Request::SessionLog {
                id: session.id.clone(),
            },
        )
        .await?;
        let lines: Vec<String> = serde_json::from_value(data["lines"].clone())?;
        let log = crate::sessions::view::SessionLog {
            lines: lines.into_iter().map(String::into_bytes).collect(),
        };
        let mut replayed = Vec::new();
        crate::sessions::view::replay(&log, 0.0, Duration::ZERO, &mut replayed)?;
        println!(
            "== a PostgreSQL session replayed (interlock sessions replay {}) ==\n{}",
            session.id,
            String::from_utf8_lossy(&replayed)
        );
    }

    if args.keep {
        println!(
            "agent running; try: sh -c 'echo $$ > {}/cgroup.procs; exec curl http://127.0.0.42:{api}/'  (Ctrl-C stops)",
            cgroup_dir.display()
        );
        tokio::signal::ctrl_c().await?;
    }
    agent.detach().await?;
    println!(
        "detached; the demo cgroup{} removed. The agent's log: {}",
        if postgres.is_some() {
            " and PostgreSQL cluster are"
        } else {
            " is"
        },
        log_path().display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `script` in the demo cgroup; what it printed, both streams.
async fn in_cgroup(cgroup_dir: &Path, script: &str) -> anyhow::Result<String> {
    let output = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec {script}",
            cgroup_dir.display()
        ))
        .output()
        .await?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

/// A throwaway PostgreSQL cluster on 127.0.0.44, run as the `postgres`
/// user, with a `customers` table the demo's role may read.
struct DemoPostgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
}

impl DemoPostgres {
    fn start(id: u32) -> anyhow::Result<Self> {
        let bin = Self::find_bin().context("no PostgreSQL server binaries (initdb, pg_ctl)")?;
        if nix::unistd::User::from_name("postgres")
            .ok()
            .flatten()
            .is_none()
        {
            bail!("no `postgres` user to run the server as");
        }
        if which("psql").is_none() {
            bail!("no psql on PATH");
        }
        let dir = std::env::temp_dir().join(format!("interlock-demo-pg-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let port = std::net::TcpListener::bind("127.0.0.44:0")?
            .local_addr()?
            .port();
        let pg = Self { bin, dir, port };
        output_of(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&pg.dir),
        )?;
        pg.as_postgres(&format!(
            "{}/initdb -D {}/data -U postgres --auth-local=trust --auth-host=scram-sha-256 >/dev/null",
            pg.bin.display(),
            pg.dir.display()
        ))?;
        pg.as_postgres(&format!(
            "{}/pg_ctl -D {d}/data -l {d}/log -w -o \"-c listen_addresses=127.0.0.44 -p {} -k {d}\" start >/dev/null",
            pg.bin.display(),
            pg.port,
            d = pg.dir.display()
        ))?;
        pg.sql(
            "CREATE ROLE app LOGIN PASSWORD 'demo-only-password'; \
             CREATE TABLE customers (id int PRIMARY KEY, name text, email text); \
             INSERT INTO customers VALUES (1, 'Ada', 'ada@example.com'), \
               (2, 'Grace', 'grace@example.org'), (3, 'Linus', 'linus@example.net'); \
             GRANT SELECT, DELETE ON customers TO app;",
        )?;
        // The agent reads credential files only when root-owned and 0600.
        let password = pg.password_file();
        std::fs::write(&password, "demo-only-password\n")?;
        std::fs::set_permissions(
            &password,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
        Ok(pg)
    }

    fn find_bin() -> Option<PathBuf> {
        let mut found: Vec<PathBuf> = ["/usr/lib/postgresql", "/usr"]
            .iter()
            .filter_map(|dir| std::fs::read_dir(dir).ok())
            .flatten()
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                path.starts_with("/usr/lib/postgresql") || name.starts_with("pgsql-")
            })
            .map(|path| path.join("bin"))
            .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
            .collect();
        // The newest server installed (versions sort by number).
        found.sort_by_key(|bin| {
            bin.parent()
                .and_then(|p| p.file_name())
                .and_then(|n| n.to_str())
                .map(|n| n.trim_start_matches("pgsql-").parse::<u32>().unwrap_or(0))
        });
        found.pop()
    }

    fn password_file(&self) -> PathBuf {
        self.dir.join("app.password")
    }

    fn as_postgres(&self, script: &str) -> anyhow::Result<String> {
        output_of(Command::new("runuser").args(["-u", "postgres", "--", "sh", "-c", script]))
    }

    /// SQL as the superuser, over the cluster's own socket.
    fn sql(&self, sql: &str) -> anyhow::Result<String> {
        output_of(
            Command::new("runuser")
                .args(["-u", "postgres", "--", "psql", "-X", "-q", "-t", "-A"])
                .args(["-v", "ON_ERROR_STOP=1", "-d", "postgres", "-p"])
                .arg(self.port.to_string())
                .arg("-h")
                .arg(&self.dir)
                .args(["-c", sql]),
        )
    }
}

impl Drop for DemoPostgres {
    fn drop(&mut self) {
        let _ = self.as_postgres(&format!(
            "{}/pg_ctl -D {}/data -m immediate -w stop >/dev/null 2>&1",
            self.bin.display(),
            self.dir.display()
        ));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn output_of(command: &mut Command) -> anyhow::Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.is_file())
}

/// A one-line HTTP responder standing in for a protected service.
async fn serve_http(addr: &str, body: &'static str) -> anyhow::Result<u16> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    Ok(port)
}

async fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port())
}

struct Cleanup {
    cgroup_dir: PathBuf,
    bpffs_dir: PathBuf,
    run_dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = crate::intercept::detach_pins(&self.bpffs_dir);
        let _ = std::fs::remove_dir_all(&self.run_dir);
        let _ = std::fs::remove_dir(&self.cgroup_dir);
    }
}
