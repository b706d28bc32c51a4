//! `interlock demo`: the whole data path on one host in a few seconds, with
//! an embedded configuration. Two small HTTP services stand in for protected
//! targets; `curl`, run in a throwaway cgroup, is redirected to the agent,
//! allowed to one and denied the other; the access log shows both.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
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
    let text = DEMO_CONFIG
        .replace("{cgroup_dir}", &cgroup_dir.display().to_string())
        .replace("{cgroup}", &cgroup)
        .replace("{listen_port}", &listen_port.to_string())
        .replace("{api_port}", &api.to_string())
        .replace("{secrets_port}", &secrets.to_string())
        .replace("{id}", &id.to_string());
    let config = Config::from_text("<embedded demo>", &text)?;
    // Whatever happens, the demo leaves no cgroup, pins or socket behind.
    let _cleanup = Cleanup {
        cgroup_dir: cgroup_dir.clone(),
        bpffs_dir: config.agent.bpffs_dir.clone(),
        run_dir: config.agent.state_dir.clone(),
    };
    let agent = Agent::start(config, None).await?;
    let listen: Vec<String> = agent.listen.iter().map(ToString::to_string).collect();
    eprintln!(
        "\n== agent attached to {}, listening on {}, admin socket {}; access log lines follow on stdout ==\n",
        cgroup_dir.display(),
        listen.join(" and "),
        agent.admin_socket.display()
    );

    for (name, port) in [("demo-api", api), ("demo-secrets", secrets)] {
        let ip = if name == "demo-api" {
            "127.0.0.42"
        } else {
            "127.0.0.43"
        };
        let url = format!("http://{ip}:{port}/");
        let output = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec curl -sS --max-time 5 {url}",
                cgroup_dir.display()
            ))
            .output()
            .await
            .context("running curl (is it installed?)")?;
        eprintln!(
            "$ curl {url}   # target {name}\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Let the access lines of both connections land before the summary.
    tokio::time::sleep(Duration::from_millis(200)).await;
    eprintln!(
        "== status ==\n{}",
        serde_json::to_string_pretty(&agent.status())?
    );
    let sessions: Vec<crate::sessions::Summary> = serde_json::from_value(
        crate::admin::call(
            &agent.admin_socket,
            &crate::admin::Request::SessionsList {
                filter: Default::default(),
            },
        )
        .await?,
    )?;
    let mut table = Vec::new();
    crate::sessions::view::print_list(&sessions, false, &mut table)?;
    eprintln!(
        "== recorded sessions (interlock sessions list) ==\n{}",
        String::from_utf8_lossy(&table)
    );

    if args.keep {
        eprintln!(
            "\nagent running; try: sh -c 'echo $$ > {}/cgroup.procs; exec curl http://127.0.0.42:{api}/'  (Ctrl-C stops)",
            cgroup_dir.display()
        );
        tokio::signal::ctrl_c().await?;
    }
    agent.detach().await?;
    eprintln!("detached; demo cgroup removed");
    Ok(ExitCode::SUCCESS)
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
