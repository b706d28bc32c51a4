//! `cargo xtask bench tcp`: the opaque TCP path measured three ways in one
//! run — a direct connection, through Interlock (real kernel redirect, real
//! agent, release build), and through `socat` (the relay a user would reach
//! for) — with the ratios printed. Nothing here asserts a timing.
//!
//! Scenarios, each against a loopback server in this process:
//! - `connect`: new connection, 64-byte request, 64-byte echo, close
//!   (16 client threads); connections per second.
//! - `rr`: one connection, 64-byte round trips; p50 and p99 latency.
//! - `stream`: one connection, 1 GiB upstream; MB/s.
use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};

use interlock_e2e::{Agent, TestCgroup};

use crate::{exec, workspace_root};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// PostgreSQL: direct vs PgBouncer (session pooling) vs Interlock.
    Postgres {
        /// Seconds per pgbench run.
        #[arg(long, default_value_t = 15)]
        seconds: u32,
        /// Rows of ~1 KiB in the streaming SELECT (1,000,000 ≈ 1 GB).
        #[arg(long, default_value_t = 1_000_000)]
        stream_rows: u64,
    },
    /// The session store: events/s with flush-before-forward, added
    /// latency per statement, shipping to Garage.
    Sessions {
        /// Statements per scenario.
        #[arg(long, default_value_t = 20_000)]
        statements: usize,
        /// Sessions recorded, then shipped.
        #[arg(long, default_value_t = 2_000)]
        ship_sessions: usize,
    },
    /// Deciding a PostgreSQL statement on its own: parse, resolve,
    /// evaluate, with and without analyses shared by shape.
    Statements {
        #[arg(long, default_value_t = 30_000)]
        count: usize,
    },
    /// SSH: direct vs `ssh -J` bastion vs Interlock (scp throughput,
    /// sequential connects).
    Ssh {
        /// MiB copied with scp.
        #[arg(long, default_value_t = 1024)]
        mib: usize,
        /// Sequential `ssh host true` runs.
        #[arg(long, default_value_t = 1000)]
        connects: usize,
    },
    /// HTTP: direct vs an nginx reverse proxy vs Interlock (keep-alive
    /// HTTPS requests/s and latency; MB/s of a 1 GiB download).
    Http {
        /// Seconds per wrk run.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// MiB downloaded.
        #[arg(long, default_value_t = 1024)]
        mib: u64,
    },
    /// One small durable write on the state directory's disk, by each way
    /// of making it durable (fdatasync, fsync, O_DSYNC, sync_file_range).
    Disk {
        #[arg(long, default_value = "/var/lib/interlock")]
        dir: std::path::PathBuf,
        #[arg(long, default_value_t = 2000)]
        writes: usize,
    },
    /// The durability promise under crashes: tests/durability.rs with
    /// `kill -9` of the release agent, many rounds in a row.
    Durability {
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
    /// Opaque TCP: direct vs Interlock vs socat.
    Tcp {
        /// Connections in the `connect` scenario.
        #[arg(long, default_value_t = 5000)]
        connections: usize,
        /// Round trips in the `rr` scenario.
        #[arg(long, default_value_t = 20000)]
        round_trips: usize,
        /// MiB sent in the `stream` scenario.
        #[arg(long, default_value_t = 1024)]
        stream_mib: usize,
    },
}

/// The load generator, run inside the benchmark cgroup (hidden command).
#[derive(Args)]
pub struct ClientArgs {
    mode: String,
    addr: SocketAddr,
    count: usize,
}

const PAYLOAD: usize = 64;
const CONNECT_THREADS: usize = 16;

pub fn run(args: BenchArgs) -> Result<()> {
    match args.what {
        Bench::Tcp {
            connections,
            round_trips,
            stream_mib,
        } => tcp(connections, round_trips, stream_mib),
        Bench::Postgres {
            seconds,
            stream_rows,
        } => crate::bench_postgres::run(seconds, stream_rows),
        Bench::Ssh { mib, connects } => crate::bench_ssh::run(mib, connects),
        Bench::Http { seconds, mib } => crate::bench_http::run(seconds, mib),
        Bench::Statements { count } => {
            prepare()?;
            let binary = std::env::var_os("INTERLOCK_BIN").expect("set by prepare");
            let out = Command::new(binary)
                .args(["bench-statements", "--count", &count.to_string()])
                .output()?;
            if !out.status.success() {
                bail!("bench-statements: {}", String::from_utf8_lossy(&out.stderr));
            }
            let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            println!("Deciding a PostgreSQL statement, {count} statements with new literals each:");
            for (key, what) in [
                ("analyse_us", "parse + walk, every statement"),
                ("shared_us", "parse + walk, analyses shared by shape"),
                ("decide_us", "shared analysis + names + policy"),
            ] {
                println!(
                    "  {what:<44} {:>8.2} µs",
                    report[key].as_f64().unwrap_or(f64::NAN)
                );
            }
            Ok(())
        }
        Bench::Sessions {
            statements,
            ship_sessions,
        } => crate::bench_sessions::run(statements, ship_sessions),
        Bench::Disk { dir, writes } => crate::bench_disk::run(&dir, writes),
        Bench::Durability { rounds } => {
            prepare()?;
            exec(
                crate::cargo()
                    .args(["test", "--package", "interlock-e2e", "--test", "durability"])
                    .args(["--", "--test-threads", "1", "--nocapture"])
                    .env("INTERLOCK_CRASH_ROUNDS", rounds.to_string()),
            )
        }
    }
}

/// Checks for root, installs what is missing and builds the release agent,
/// which the end-to-end harness (throwaway cgroup, the real binary attached
/// to it, cleanup on drop) then runs.
pub fn prepare() -> Result<()> {
    if output(Command::new("id").arg("-u")).trim() != "0" {
        bail!("the benchmark attaches eBPF programs: run it as root");
    }
    crate::setup::run()?;
    // An agent given in INTERLOCK_BIN is measured as it is (A/B runs
    // against another build); otherwise this tree's, in release.
    if std::env::var_os("INTERLOCK_BIN").is_some() {
        return Ok(());
    }
    exec(crate::cargo().args(["build", "--release", "--package", "interlock"]))?;
    let binary = workspace_root().join("target/release/interlock");
    // SAFETY: no other thread runs yet; the harness reads it when spawning.
    unsafe { std::env::set_var("INTERLOCK_BIN", &binary) };
    Ok(())
}

fn tcp(connections: usize, round_trips: usize, stream_mib: usize) -> Result<()> {
    prepare()?;
    // Twin servers: one reached directly, one protected by Interlock.
    let direct = Servers::start("127.0.0.20")?;
    let protected = Servers::start("127.0.0.21")?;
    let cgroup = TestCgroup::new("bench");
    let agent = Agent::start(
        &cgroup,
        "bench",
        &format!(
            "[[target]]\nname = \"echo\"\nprotocol = \"tcp\"\naddress = \"{}\"\n\
             [[target]]\nname = \"sink\"\nprotocol = \"tcp\"\naddress = \"{}\"\n\
             [[rule]]\nname = \"bench\"\nworkloads = [\"*\"]\ntargets = [\"echo\", \"sink\"]\ndecision = \"allow\"\n",
            protected.echo, protected.sink
        ),
    );
    let socat = Socat::start("127.0.0.22", &direct)?;

    let paths: [(&str, &Servers); 3] = [
        ("direct", &direct),
        ("interlock", &protected),
        ("socat", &socat.servers),
    ];
    let mut rows: Vec<(String, [f64; 3], bool)> = Vec::new();
    let mut connect = [0.0; 3];
    let mut p50 = [0.0; 3];
    let mut p99 = [0.0; 3];
    let mut stream = [0.0; 3];
    for (i, (name, servers)) in paths.iter().enumerate() {
        eprintln!("measuring {name}...");
        connect[i] = measure(&cgroup, "connect", servers.echo, connections)?[0];
        let rr = measure(&cgroup, "rr", servers.echo, round_trips)?;
        (p50[i], p99[i]) = (rr[0], rr[1]);
        stream[i] = measure(&cgroup, "stream", servers.sink, stream_mib)?[0];
    }
    rows.push((
        format!("connect+64B echo+close ({connections}), conn/s"),
        connect,
        true,
    ));
    rows.push((
        format!("64B round trip p50 ({round_trips}), us"),
        p50,
        false,
    ));
    rows.push((
        format!("64B round trip p99 ({round_trips}), us"),
        p99,
        false,
    ));
    rows.push((format!("stream {stream_mib} MiB, MB/s"), stream, true));

    let peak = agent.pid().map_or_else(|| "?".into(), peak_rss);
    let access_lines = agent.line_count();
    println!(
        "\nInterlock opaque TCP benchmark (loopback, release build, {} cores)",
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<42} {:>11} {:>11} {:>11} {:>17} {:>16}",
        "scenario", "direct", "interlock", "socat", "interlock/direct", "interlock/socat"
    );
    for (name, [d, i, s], higher_is_better) in &rows {
        // Ratios read as "fraction of the alternative's performance".
        let (vs_direct, vs_socat) = if *higher_is_better {
            (i / d, i / s)
        } else {
            (d / i, s / i)
        };
        println!("{name:<42} {d:>11.1} {i:>11.1} {s:>11.1} {vs_direct:>17.2} {vs_socat:>16.2}");
    }
    println!("(ratios: share of the other path's performance; 1.00 = as fast)");
    println!("agent: {access_lines} access lines written, peak RSS {peak}");
    Ok(())
}

/// Runs one scenario of the load generator.
pub fn load_client(args: ClientArgs) -> Result<()> {
    let values = match args.mode.as_str() {
        "connect" => vec![connect_rate(args.addr, args.count)?],
        "rr" => round_trips(args.addr, args.count)?,
        "stream" => vec![stream(args.addr, args.count)?],
        other => bail!("unknown mode {other}"),
    };
    println!(
        "{}",
        values
            .iter()
            .map(f64::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}

fn connect_rate(addr: SocketAddr, count: usize) -> Result<f64> {
    let started = Instant::now();
    let per_thread = count / CONNECT_THREADS;
    let workers: Vec<_> = (0..CONNECT_THREADS)
        .map(|_| {
            thread::spawn(move || -> std::io::Result<()> {
                let mut buf = [0u8; PAYLOAD];
                for _ in 0..per_thread {
                    let mut stream = TcpStream::connect(addr)?;
                    stream.write_all(&[7u8; PAYLOAD])?;
                    stream.read_exact(&mut buf)?;
                }
                Ok(())
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("client thread")?;
    }
    Ok((per_thread * CONNECT_THREADS) as f64 / started.elapsed().as_secs_f64())
}

fn round_trips(addr: SocketAddr, count: usize) -> Result<Vec<f64>> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let mut buf = [0u8; PAYLOAD];
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        stream.write_all(&[1u8; PAYLOAD])?;
        stream.read_exact(&mut buf)?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    Ok(vec![samples[count / 2], samples[count * 99 / 100]])
}

fn stream(addr: SocketAddr, mib: usize) -> Result<f64> {
    let mut stream = TcpStream::connect(addr)?;
    let chunk = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    for _ in 0..mib {
        stream.write_all(&chunk)?;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut total = [0u8; 8];
    stream.read_exact(&mut total)?;
    let secs = started.elapsed().as_secs_f64();
    if u64::from_be_bytes(total) != (mib as u64) << 20 {
        bail!(
            "sink counted {} bytes, sent {}",
            u64::from_be_bytes(total),
            mib << 20
        );
    }
    Ok((mib as f64 * 1.048_576) / secs)
}

/// An echo server (echoes each read) and a sink (counts to EOF, answers
/// with the count) on one loopback address.
struct Servers {
    echo: SocketAddr,
    sink: SocketAddr,
}

impl Servers {
    fn start(ip: &str) -> Result<Self> {
        let echo = serve(ip, |mut s| {
            let _ = s.set_nodelay(true);
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        })?;
        let sink = serve(ip, |mut s| {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            let _ = s.write_all(&total.to_be_bytes());
        })?;
        Ok(Self { echo, sink })
    }
}

fn serve(ip: &str, handle: fn(TcpStream)) -> Result<SocketAddr> {
    let listener = TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}"))?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            thread::spawn(move || handle(stream));
        }
    });
    Ok(addr)
}

/// Runs this program's `bench-client` inside the benchmark cgroup.
fn measure(cgroup: &TestCgroup, mode: &str, addr: SocketAddr, count: usize) -> Result<Vec<f64>> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"",
            cgroup.dir.display()
        ))
        .arg(std::env::current_exe()?)
        .args(["bench-client", mode, &addr.to_string(), &count.to_string()])
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("bench client {mode} against {addr} failed");
    }
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|v| v.parse::<f64>().context("client output"))
        .collect()
}

pub fn peak_rss(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .map_or_else(|| "?".into(), |v| v.trim().to_owned())
}

/// `socat` relaying to the direct servers, one process per listener.
struct Socat {
    servers: Servers,
    children: Vec<Child>,
}

impl Socat {
    fn start(ip: &str, to: &Servers) -> Result<Self> {
        let mut children = Vec::new();
        let mut relay = |target: SocketAddr| -> Result<SocketAddr> {
            let port = TcpListener::bind((ip, 0))?.local_addr()?.port();
            children.push(
                Command::new("socat")
                    .arg(format!(
                        "TCP4-LISTEN:{port},bind={ip},fork,reuseaddr,nodelay"
                    ))
                    .arg(format!("TCP4:{target},nodelay"))
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting socat")?,
            );
            let addr: SocketAddr = format!("{ip}:{port}").parse()?;
            for _ in 0..100 {
                if TcpStream::connect(addr).is_ok() {
                    return Ok(addr);
                }
                thread::sleep(Duration::from_millis(20));
            }
            bail!("socat did not listen on {addr}")
        };
        let echo = relay(to.echo)?;
        let sink = relay(to.sink)?;
        Ok(Self {
            servers: Servers { echo, sink },
            children,
        })
    }
}

impl Drop for Socat {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}
