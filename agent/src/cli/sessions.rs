//! `interlock sessions …` and `interlock fleet pull`.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};

use super::source::Source;
use crate::{
    config::{Config, DEFAULT_CONFIG_PATH},
    sessions::{
        Bucket, ShipperSettings,
        fleet::{self, PullOptions},
        view::{self, Filter, SessionLog},
    },
};

#[derive(Subcommand)]
pub enum SessionsCommand {
    /// Recorded sessions, oldest first.
    List {
        #[command(flatten)]
        from: FromArgs,
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long)]
        json: bool,
    },
    /// A session's metadata and every event.
    Show {
        id: String,
        #[command(flatten)]
        from: FromArgs,
        #[arg(long)]
        json: bool,
    },
    /// Play a session back: terminal output as it was, a PostgreSQL
    /// session as a transcript of statements, decisions and results.
    Replay {
        id: String,
        #[command(flatten)]
        from: FromArgs,
        /// How many times faster than it happened; 0 does not wait.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Longest pause kept between two events.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        max_idle: Duration,
    },
    /// Write a session as JSONL (as recorded, verifiable) or asciicast v2.
    Export {
        id: String,
        #[command(flatten)]
        from: FromArgs,
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
    },
    /// Check a session's hash chain and signature; names the first bad event.
    Verify {
        /// A session id, or a file (`.jsonl` or `.jsonl.zst`).
        session: String,
        #[command(flatten)]
        from: FromArgs,
        /// The ed25519 public key (hex) the host publishes; without it the
        /// key in the seal is only checked for consistency.
        #[arg(long)]
        key: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    Jsonl,
    Asciicast,
}

#[derive(Subcommand)]
pub enum FleetCommand {
    /// Download, verify and index the sessions of many hosts.
    Pull {
        /// `s3://bucket/prefix` (or `file:///dir`).
        #[arg(long)]
        from: String,
        #[command(flatten)]
        bucket: BucketArgs,
        #[arg(long)]
        host: Option<String>,
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long)]
        to: PathBuf,
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

#[derive(Args)]
pub struct FromArgs {
    /// Read from a pulled directory or a bucket (`s3://…`) instead of the
    /// local agent.
    #[arg(long)]
    from: Option<String>,
    #[command(flatten)]
    bucket: BucketArgs,
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
}

/// How to reach a bucket; defaults come from `[shipper]`, then `AWS_*`.
#[derive(Args)]
pub struct BucketArgs {
    #[arg(long)]
    endpoint: Option<String>,
    #[arg(long)]
    region: Option<String>,
    #[arg(long)]
    credentials_file: Option<PathBuf>,
}

#[derive(Args)]
pub struct FilterArgs {
    /// Only sessions started this long ago or later (`1h`, `7d`).
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// A policy workload name, or a user, unit or executable path.
    #[arg(long)]
    workload: Option<String>,
    #[arg(long)]
    target: Option<String>,
    /// `denied` (the connection or any statement) or `allowed`.
    #[arg(long)]
    decision: Option<String>,
    /// A glob on the CI job's project (`group/*`).
    #[arg(long)]
    ci_project: Option<String>,
    /// A glob on the CI job's branch or tag.
    #[arg(long)]
    ci_ref: Option<String>,
}

impl FilterArgs {
    fn filter(&self) -> Filter {
        let since_ms = self.since.map_or(0, |since| {
            (crate::sessions::now_us() / 1000).saturating_sub(since.as_millis() as u64)
        });
        Filter {
            since_ms,
            workload: self.workload.clone(),
            target: self.target.clone(),
            decision: self.decision.clone(),
            ci_project: self.ci_project.clone(),
            ci_ref: self.ci_ref.clone(),
        }
    }
}

fn shipper_settings(config: Option<&Config>, url: &str, args: &BucketArgs) -> ShipperSettings {
    let base = config.and_then(|c| c.shipper.clone()).unwrap_or_default();
    ShipperSettings {
        url: url.to_owned(),
        endpoint: args.endpoint.clone().or(base.endpoint),
        region: args.region.clone().or(base.region),
        credentials_file: args.credentials_file.clone().or(base.credentials_file),
        ..base
    }
}

/// Every session the filter lets through, read back for learning.
pub async fn recorded(
    from: &FromArgs,
    filter: &FilterArgs,
) -> anyhow::Result<Vec<crate::learn::Recorded>> {
    let source = open(from).await?;
    let mut sessions = Vec::new();
    for summary in source.list(&filter.filter()).await? {
        let log = source.log(&summary.id).await?;
        if let Some(session) = crate::learn::Recorded::read(&log) {
            sessions.push(session);
        }
    }
    Ok(sessions)
}

async fn open(from: &FromArgs) -> anyhow::Result<Source> {
    let config = Config::load(&from.config).ok();
    let socket = crate::config::admin_socket_of(&from.config);
    let state_dir = config.as_ref().map_or_else(
        || crate::config::AgentSettings::default().state_dir,
        |c| c.agent.state_dir.clone(),
    );
    let shipper = shipper_settings(
        config.as_ref(),
        from.from.as_deref().unwrap_or(""),
        &from.bucket,
    );
    Source::open(from.from.as_deref(), &socket, &state_dir, &shipper).await
}

pub async fn sessions(command: SessionsCommand) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    match command {
        SessionsCommand::List { from, filter, json } => {
            let list = open(&from).await?.list(&filter.filter()).await?;
            view::print_list(&list, json, &mut stdout)?;
        }
        SessionsCommand::Show { id, from, json } => {
            let log = open(&from).await?.log(&id).await?;
            view::show(&log, json, &mut stdout)?;
        }
        SessionsCommand::Replay {
            id,
            from,
            speed,
            max_idle,
        } => {
            let log = open(&from).await?.log(&id).await?;
            view::replay(&log, speed, max_idle, &mut stdout)?;
        }
        SessionsCommand::Export { id, from, format } => {
            let log = open(&from).await?.log(&id).await?;
            match format {
                ExportFormat::Jsonl => view::export_jsonl(&log, &mut stdout)?,
                ExportFormat::Asciicast => view::export_asciicast(&log, &mut stdout)?,
            }
        }
        SessionsCommand::Verify { session, from, key } => {
            let path = std::path::Path::new(&session);
            let log = if path.is_file() {
                let bytes = std::fs::read(path).with_context(|| format!("reading {session}"))?;
                let text = if session.ends_with(".zst") {
                    zstd::decode_all(&*bytes).with_context(|| format!("decompressing {session}"))?
                } else {
                    bytes
                };
                SessionLog::parse(&text)
            } else {
                open(&from).await?.log(&session).await?
            };
            drop(stdout);
            return Ok(match log.verify(key.as_deref()) {
                Ok(verified) => {
                    println!(
                        "ok: session {} from host {}: {} events, chain and signature valid (key {})",
                        verified.session_id, verified.host, verified.events, verified.public_key
                    );
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("FAILED: {session}: {error}");
                    ExitCode::FAILURE
                }
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn fleet(command: FleetCommand) -> anyhow::Result<ExitCode> {
    let FleetCommand::Pull {
        from,
        bucket,
        host,
        filter,
        to,
        config,
    } = command;
    let config = Config::load(&config).ok();
    let settings = shipper_settings(config.as_ref(), &from, &bucket);
    let bucket = Bucket::open(&settings)?;
    let options = PullOptions {
        host,
        filter: filter.filter(),
        to: to.clone(),
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let report = fleet::pull(&bucket, &options).await?;
    println!(
        "pulled {} sessions ({} bytes), {} unchanged, {} filtered out, {} failed verification into {}",
        report.pulled,
        report.bytes,
        report.unchanged,
        report.filtered,
        report.failed.len(),
        to.display()
    );
    for (session, why) in &report.failed {
        eprintln!("FAILED {session}: {why}");
    }
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[derive(Args)]
pub struct BenchStoreArgs {
    /// An empty directory for the store.
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value_t = 1)]
    sessions: usize,
    /// Statements per session.
    #[arg(long, default_value_t = 10_000)]
    statements: usize,
    /// Skip the wait for each statement's flush (for comparison).
    #[arg(long)]
    no_wait: bool,
    /// Then ship everything here (`s3://…`), timing it.
    #[arg(long)]
    ship: Option<String>,
    #[command(flatten)]
    bucket: BucketArgs,
}

pub async fn bench_store(args: BenchStoreArgs) -> anyhow::Result<ExitCode> {
    let (store, report) =
        crate::sessions::bench::record(&args.dir, args.sessions, args.statements, !args.no_wait)
            .await?;
    println!("{}", serde_json::to_string(&report)?);
    if let Some(url) = &args.ship {
        let bucket = Bucket::open(&shipper_settings(None, url, &args.bucket))?;
        let report = crate::sessions::bench::ship(&store, &bucket).await?;
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(ExitCode::SUCCESS)
}
