//! Command-line interface: `run`, `policy check|explain`, `status`,
//! `reload`, `detach`, `demo`, `sessions …`, `fleet pull`, `approvals …`,
//! `grants …`, `request`, `completions`, `man`. `anyhow` lives here, at
//! the edge.
mod approvals;
mod ca;
mod kube;
mod sessions;
mod source;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use tracing_subscriber::{
    EnvFilter, Layer as _, filter, fmt::writer::BoxMakeWriter, layer::SubscriberExt as _,
    util::SubscriberInitExt as _,
};

use crate::{
    access::AccessLayer,
    admin::{self, Request},
    config::{Config, DEFAULT_CONFIG_PATH},
    daemon::Agent,
    intercept,
    policy::{self, evaluate},
    workload::{CgroupFs, ExeDigests, Workload, WorkloadResolver, container_id, systemd_unit},
};

#[derive(Parser)]
#[command(
    name = "interlock",
    version,
    about = "Least privilege on the data path of every host"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground (what the systemd unit starts).
    Run(ConfigArg),
    /// Check or explain policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Show the running agent: attach point, pins, targets, live connections.
    Status(AdminArgs),
    /// Ask the running agent to reload its configuration and policy.
    Reload(AdminArgs),
    /// Remove the kernel programs, links and pins (stops a running agent).
    Detach(AdminArgs),
    /// Run the agent end to end on an embedded demo target and policy.
    Demo(crate::demo::DemoArgs),
    /// The local CA that signs the certificates clients see over TLS.
    #[command(subcommand)]
    Ca(CaCommand),
    /// The SSH host key clients see.
    #[command(subcommand)]
    Ssh(SshCommand),
    /// Kubernetes targets: a kubeconfig for jobs.
    #[command(subcommand)]
    Kube(KubeCommand),
    /// Recorded sessions: list, show, replay, export, verify.
    #[command(subcommand)]
    Sessions(sessions::SessionsCommand),
    /// Sessions of many hosts, from object storage.
    #[command(subcommand)]
    Fleet(sessions::FleetCommand),
    /// Commands held for approval: list, approve, deny.
    #[command(subcommand)]
    Approvals(approvals::ApprovalsCommand),
    /// Standing permissions approvals granted: list, revoke.
    #[command(subcommand)]
    Grants(approvals::GrantsCommand),
    /// Ask up front for a time-bound grant under a `requestable` rule,
    /// and wait for the approvers' answer.
    Request(approvals::RequestArgs),
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (interlock.1, interlock-status.1, …) into a
    /// directory.
    Man {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Measures the session store on its own (`cargo xtask bench sessions`).
    #[command(hide = true)]
    BenchStore(sessions::BenchStoreArgs),
    /// Measures deciding a PostgreSQL statement on its own (`cargo xtask
    /// bench statements`).
    #[command(hide = true)]
    BenchStatements {
        #[arg(long, default_value_t = 30_000)]
        count: usize,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Print the CA certificate (PEM), to add to the host's trust store.
    Print(ConfigArg),
    /// Add the CA to the host's trust store (Debian/Ubuntu, RHEL), which
    /// curl, Go, Python's ssl and OpenSSL-based clients read. As root.
    Install(ConfigArg),
    /// Take the CA out of the host's trust store.
    Uninstall(ConfigArg),
    /// Print SSL_CERT_FILE, REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE and
    /// NODE_EXTRA_CA_CERTS for runtimes with bundles of their own.
    Env(ConfigArg),
}

#[derive(Subcommand)]
enum KubeCommand {
    /// Print a kubeconfig for a kubernetes target: the cluster's own
    /// server address (so the kernel redirect applies), the agent's CA,
    /// and no credential (the agent holds it).
    Config {
        /// The target's name.
        #[arg(long)]
        target: String,
        /// The context's default namespace.
        #[arg(long)]
        namespace: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
enum SshCommand {
    /// Print the lines for /etc/ssh/ssh_known_hosts that make clients trust
    /// the agent's host key for every SSH target (by name and address).
    KnownHosts(ConfigArg),
}

#[derive(Args)]
struct ConfigArg {
    /// Configuration file.
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
}

#[derive(Args)]
struct AdminArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Parse and validate a configuration (and its policy directory); with
    /// `--against-sessions`, replay recorded sessions through it and list
    /// what it would have refused.
    Check(CheckArgs),
    /// Show which rule decides for a workload on a target, and why.
    Explain(ExplainArgs),
    /// Suggest the narrowest rules that allow what recorded sessions did,
    /// each with its evidence (TOML for the policy directory).
    Suggest(SuggestArgs),
    /// Create a key to sign policy bundles with (0600); prints the public
    /// key for `[policy_source] trusted_keys`.
    Keygen(KeygenArgs),
    /// Sign policy files into a bundle for `[policy_source]`.
    Sign(SignArgs),
}

#[derive(Args)]
struct KeygenArgs {
    /// Where the private key goes (never overwritten).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct SignArgs {
    /// The private key (`interlock policy keygen`).
    #[arg(long)]
    key: PathBuf,
    /// Where the bundle goes (upload it as the source's `bundle`).
    #[arg(long)]
    out: PathBuf,
    /// What people call this bundle, recorded in every session started
    /// under it (a release name, a commit); the signing time by default.
    #[arg(long)]
    version: Option<String>,
    /// Must increase with every bundle (agents never go back); the signing
    /// time in milliseconds by default.
    #[arg(long)]
    serial: Option<u64>,
    /// Policy files, or directories whose `*.toml` files are taken.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
}

#[derive(Args)]
struct CheckArgs {
    path: PathBuf,
    /// A file of `[[workload]]` and `[[rule]]` tables whose rules replace
    /// the configuration's (what `policy suggest` writes).
    #[arg(long)]
    rules: Option<PathBuf>,
    /// A signed policy bundle, checked under the configuration's
    /// `[policy_source]` keys and loaded in place of the one in force.
    #[arg(long, conflicts_with = "rules")]
    bundle: Option<PathBuf>,
    /// Replay recorded sessions (`--from`, `--since`, `--workload`,
    /// `--target`) through the policy; exits 1 if it would refuse any of
    /// what went through.
    #[arg(long)]
    against_sessions: bool,
    #[command(flatten)]
    from: sessions::FromArgs,
    #[command(flatten)]
    filter: sessions::FilterArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SuggestArgs {
    #[command(flatten)]
    from: sessions::FromArgs,
    #[command(flatten)]
    filter: sessions::FilterArgs,
    /// Whom rules are for: the policy's workloads the callers matched, or
    /// their systemd units or executables.
    #[arg(long, value_enum, default_value = "workload")]
    by: crate::learn::suggest::GroupBy,
    /// Write each rule with `enforce = false`: what the rules would refuse
    /// is logged and passes, until the line is removed.
    #[arg(long)]
    rollout: bool,
    /// Compare with this configuration's policy: what its allow rules
    /// allowed that nothing used, rules and workloads nothing used.
    #[arg(long)]
    policy: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ExplainArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Target name.
    #[arg(long)]
    target: String,
    /// Take the workload from this live process.
    #[arg(long, conflicts_with_all = ["uid", "exe", "unit", "cgroup", "comm", "group"])]
    pid: Option<u32>,
    /// Describe the workload by hand instead:
    #[arg(long)]
    uid: Option<u32>,
    #[arg(long)]
    exe: Option<PathBuf>,
    #[arg(long)]
    unit: Option<String>,
    #[arg(long)]
    cgroup: Option<String>,
    #[arg(long)]
    comm: Option<String>,
    #[arg(long)]
    group: Vec<String>,
    #[arg(long)]
    json: bool,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo narrates on stdout; the agent's log and access log go to a
    // file it names.
    let log_file = match &cli.command {
        Command::Demo(_) => match crate::demo::open_log() {
            Ok(file) => Some(file),
            Err(error) => {
                eprintln!("interlock: {error:#}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    init_tracing(log_file);
    let code = match run(cli.command) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("interlock: {error:#}");
            ExitCode::FAILURE
        }
    };
    crate::access::flush();
    code
}

/// The operational log on stderr and the access log on stdout, or both
/// into `file`.
fn init_tracing(file: Option<std::fs::File>) {
    let filter =
        EnvFilter::try_from_env("INTERLOCK_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = file.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, access): (BoxMakeWriter, Box<dyn std::io::Write + Send>) = match file {
        Some(file) => match file.try_clone() {
            Ok(copy) => (
                BoxMakeWriter::new(std::sync::Mutex::new(file)),
                Box::new(copy),
            ),
            Err(_) => (BoxMakeWriter::new(std::io::sink), Box::new(std::io::sink())),
        },
        None => (
            BoxMakeWriter::new(std::io::stderr),
            Box::new(std::io::stdout()),
        ),
    };
    let human = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_target(false)
        .with_ansi(ansi)
        .with_filter(filter::filter_fn(|meta| meta.target() != "access"))
        .with_filter(filter);
    tracing_subscriber::registry()
        .with(human)
        .with(AccessLayer::spawn(access))
        .init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(ConfigArg { config }) => {
            let loaded = Config::load(&config)?;
            runtime()?.block_on(async {
                let agent = Agent::start(loaded, Some(config)).await?;
                agent.run_until_signal().await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(PolicyCommand::Check(args)) if args.against_sessions => {
            runtime()?.block_on(policy_replay(args))
        }
        Command::Policy(PolicyCommand::Check(args)) => policy_check(&args),
        Command::Policy(PolicyCommand::Keygen(args)) => policy_keygen(&args),
        Command::Policy(PolicyCommand::Sign(args)) => policy_sign(&args),
        Command::Policy(PolicyCommand::Suggest(args)) => runtime()?.block_on(policy_suggest(args)),
        Command::Policy(PolicyCommand::Explain(args)) => policy_explain(args),
        Command::Status(args) => {
            let data = call_agent(&args.config.config, Request::Status)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&data)?);
            } else {
                print_status(&data);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload(args) => {
            let data = call_agent(&args.config.config, Request::Reload)?;
            print_or_json(args.json, &data, "reloaded");
            Ok(ExitCode::SUCCESS)
        }
        Command::Detach(args) => detach(&args),
        Command::Demo(args) => crate::demo::run(args),
        Command::Sessions(command) => runtime()?.block_on(sessions::sessions(command)),
        Command::Fleet(command) => runtime()?.block_on(sessions::fleet(command)),
        Command::Approvals(command) => approvals::approvals(command),
        Command::Grants(command) => approvals::grants(command),
        Command::Request(args) => approvals::request(args),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            let mut command = Cli::command();
            clap_complete::generate(shell, &mut command, "interlock", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => {
            use clap::CommandFactory as _;
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchStore(args) => runtime()?.block_on(sessions::bench_store(args)),
        Command::BenchStatements { count } => {
            let report = crate::proxy::postgres::bench::run(count);
            println!("{}", serde_json::to_string(&report)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(CaCommand::Print(ConfigArg { config })) => {
            let state_dir = Config::load(&config)?.agent.state_dir;
            let pem = crate::tls::LocalCa::read_cert(&state_dir.join("ca")).with_context(|| {
                format!(
                    "no local CA in {} yet: it is created when the agent first starts",
                    state_dir.display()
                )
            })?;
            print!("{pem}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(CaCommand::Install(ConfigArg { config })) => {
            ca::install(&Config::load(&config)?)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(CaCommand::Uninstall(_)) => {
            ca::uninstall()?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(CaCommand::Env(ConfigArg { config })) => {
            ca::env(&Config::load(&config)?.agent.state_dir);
            Ok(ExitCode::SUCCESS)
        }
        Command::Kube(KubeCommand::Config {
            target,
            namespace,
            config: ConfigArg { config },
        }) => {
            let config = Config::load(&config)?;
            print!(
                "{}",
                kube::kubeconfig(&config, &target, namespace.as_deref())?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Ssh(SshCommand::KnownHosts(ConfigArg { config })) => {
            let config = Config::load(&config)?;
            let state_dir = &config.agent.state_dir;
            // Made here if the agent has not started yet, so an install can
            // trust it before the first connection.
            std::os::unix::fs::DirBuilderExt::mode(
                std::fs::DirBuilder::new().recursive(true),
                0o700,
            )
            .create(state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
            let key = crate::proxy::ssh::load_or_create_host_key(state_dir)
                .with_context(|| format!("the SSH host key in {}", state_dir.display()))?;
            let resolve = |host: &str, port: u16| {
                use std::net::ToSocketAddrs;
                (host, port)
                    .to_socket_addrs()
                    .map(|addrs| {
                        let mut ips: Vec<_> = addrs.map(|a| a.ip()).collect();
                        ips.sort();
                        ips.dedup();
                        ips
                    })
                    .unwrap_or_default()
            };
            for line in crate::proxy::ssh::known_hosts_lines(&config.policy, &key, resolve) {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn call_agent(config: &std::path::Path, request: Request) -> anyhow::Result<serde_json::Value> {
    let socket = crate::config::admin_socket_of(config);
    Ok(runtime()?.block_on(admin::call(&socket, &request))?)
}

fn print_or_json(json: bool, data: &serde_json::Value, word: &str) {
    if json {
        println!("{data}");
    } else {
        println!("{word}");
    }
}

fn detach(args: &AdminArgs) -> anyhow::Result<ExitCode> {
    let socket = crate::config::admin_socket_of(&args.config.config);
    let bpffs_dir = Config::load(&args.config.config)
        .map(|c| c.agent.bpffs_dir)
        .unwrap_or_else(|_| crate::config::AgentSettings::default().bpffs_dir);
    // A running agent holds its links open: ask it, so nothing stays attached.
    match runtime()?.block_on(admin::call(&socket, &Request::Detach)) {
        Ok(data) => print_or_json(args.json, &data, "detached (agent stopped)"),
        Err(admin::AdminError::Connect { .. }) => {
            let pins = intercept::pinned_links(&bpffs_dir);
            intercept::detach_pins(&bpffs_dir)
                .with_context(|| format!("removing pins under {}", bpffs_dir.display()))?;
            print_or_json(
                args.json,
                &json!({"detached": true, "links": pins}),
                &format!("detached ({} pinned links removed)", pins.len()),
            );
        }
        Err(error) => return Err(error.into()),
    }
    Ok(ExitCode::SUCCESS)
}

/// The configuration at `path`, with the rules of `rules` in place of its
/// own when given.
fn load_candidate(args: &CheckArgs) -> Result<Config, crate::config::ConfigError> {
    match (&args.rules, &args.bundle) {
        (Some(rules), _) => Config::load_with_rules(&args.path, rules),
        (None, Some(bundle)) => Config::load_with_bundle_file(&args.path, bundle),
        (None, None) => Config::load(&args.path),
    }
}

fn policy_keygen(args: &KeygenArgs) -> anyhow::Result<ExitCode> {
    let seed = crate::keyfile::create(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    println!("{}", crate::config::bundle::key_id(&key.verifying_key()));
    Ok(ExitCode::SUCCESS)
}

fn policy_sign(args: &SignArgs) -> anyhow::Result<ExitCode> {
    let seed = crate::keyfile::load(&args.key)
        .with_context(|| format!("reading the key {}", args.key.display()))?;
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let now = std::time::SystemTime::now();
    let signed_at = humantime::format_rfc3339_seconds(now).to_string();
    let serial = match args.serial {
        Some(serial) => serial,
        None => now
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
            .try_into()?,
    };
    let version = args.version.clone().unwrap_or_else(|| signed_at.clone());
    let manifest = crate::config::bundle::manifest_of(&args.paths, version, serial, signed_at)
        .map_err(anyhow::Error::msg)?;
    for file in &manifest.files {
        crate::config::check_bundle_file(&file.name, &file.text)?;
    }
    let bytes = crate::config::bundle::sign(&key, &manifest);
    std::fs::write(&args.out, bytes).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "{}: bundle {} (serial {}, {} files), signed by {}",
        args.out.display(),
        manifest.version,
        manifest.serial,
        manifest.files.len(),
        crate::config::bundle::key_id(&key.verifying_key())
    );
    Ok(ExitCode::SUCCESS)
}

async fn policy_suggest(args: SuggestArgs) -> anyhow::Result<ExitCode> {
    let sessions = sessions::recorded(&args.from, &args.filter).await?;
    let suggestion = crate::learn::suggest::suggest(&sessions, args.by, crate::sessions::now_us());
    let against = match &args.policy {
        Some(path) => Some(crate::learn::against::against(
            &Config::load(path)?.policy,
            &sessions,
        )),
        None => None,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "suggestion": suggestion,
                "against_policy": against,
            }))?
        );
    } else {
        let toml = suggestion.to_toml(args.rollout);
        match (&against, &args.policy) {
            (Some(against), Some(path)) => {
                // The comparison goes after the header, before the rules.
                let (head, rules) = toml.split_once("\n\n").unwrap_or((&toml, ""));
                print!(
                    "{head}\n{}\n{rules}",
                    against.to_comments(&path.display().to_string())
                );
            }
            _ => print!("{toml}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn policy_replay(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let config = load_candidate(&args)?;
    let sessions = sessions::recorded(&args.from, &args.filter).await?;
    let replayed = crate::learn::replay::replay(&config.policy, &sessions);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&replayed)?);
    } else {
        println!(
            "replayed {} decisions of {} sessions: {} would be refused",
            replayed.decisions,
            replayed.sessions,
            replayed.would_deny.len()
        );
        for refused in &replayed.would_deny {
            println!(
                "  {} ({}) {}: {} — {}",
                refused.session, refused.target, refused.what, refused.text, refused.reason
            );
        }
        for target in &replayed.unknown_targets {
            println!(
                "  sessions on target {target:?}, which the policy does not have, were skipped"
            );
        }
    }
    Ok(if replayed.would_deny.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn policy_check(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let (path, json) = (&args.path, args.json);
    match load_candidate(args) {
        Ok(config) => {
            let summary = json!({
                "valid": true,
                "files": config.sources,
                "bundle": config.bundle.as_ref().map(|b| b.info()),
                "mode": config.agent.mode,
                "targets": config.policy.targets.iter().map(|t| json!({"name": t.name, "protocol": t.protocol, "address": t.address.to_string()})).collect::<Vec<_>>(),
                "workloads": config.policy.workloads.iter().map(|w| &w.name).collect::<Vec<_>>(),
                "rules": config.policy.rules.iter().map(|r| json!({"name": r.name, "decision": r.action})).collect::<Vec<_>>(),
            });
            if json {
                println!("{summary}");
            } else {
                let bundle = config
                    .bundle
                    .as_ref()
                    .map(|b| {
                        format!(
                            ", bundle {} of {} files",
                            b.manifest.version,
                            b.manifest.files.len()
                        )
                    })
                    .unwrap_or_default();
                println!(
                    "{}: ok ({} files{bundle}, {} targets, {} workloads, {} rules, mode {})",
                    path.display(),
                    config.sources.len(),
                    config.policy.targets.len(),
                    config.policy.workloads.len(),
                    config.policy.rules.len(),
                    summary["mode"].as_str().unwrap_or("?"),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            if json {
                println!("{}", json!({"valid": false, "error": error.to_string()}));
            } else {
                eprintln!("{error}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

fn policy_explain(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config.config)?;
    let policy = &config.policy;
    let target = policy.target_id(&args.target).with_context(|| {
        format!(
            "no target named {:?} in {}",
            args.target,
            args.config.config.display()
        )
    })?;

    let workload = match args.pid {
        Some(pid) => {
            let cgroups = CgroupFs::discover().context("no cgroup v2 hierarchy found")?;
            WorkloadResolver::new(cgroups)
                .resolve_pid(pid)
                .with_context(|| format!("reading process {pid}"))?
        }
        None => described_workload(&args)?,
    };
    let verdict = evaluate(policy, &workload, target);
    let matching = policy::matching_workloads(policy, &workload);
    if args.json {
        println!(
            "{}",
            json!({"target": args.target, "workload": workload, "matching_workloads": matching, "verdict": {"action": verdict.action, "rule": policy.rule_name(verdict.rule), "reason": verdict.reason}, "mode": config.agent.mode})
        );
    } else {
        println!("target:    {}", args.target);
        println!(
            "workload:  pid {} uid {} ({}) exe {} unit {} cgroup {}",
            workload.pid,
            workload.uid,
            workload.user.as_deref().unwrap_or("-"),
            workload.exe.as_deref().unwrap_or("-"),
            workload.unit.as_deref().unwrap_or("-"),
            workload.cgroup.as_deref().unwrap_or("-")
        );
        println!(
            "matches:   {}",
            if matching.is_empty() {
                "no workload definition".to_owned()
            } else {
                matching.join(", ")
            }
        );
        println!(
            "decision:  {:?}{}",
            verdict.action,
            policy
                .rule_name(verdict.rule)
                .map(|r| format!(" by rule {r:?}"))
                .unwrap_or_default()
        );
        println!("why:       {}", verdict.reason);
        if let Some(description) = verdict
            .rule
            .and_then(|id| policy.rule(id).description.as_ref())
        {
            println!("rule says: {description}");
        }
    }
    // 0 allowed, 3 denied, 4 allowed once a person approves.
    Ok(match verdict.action {
        policy::Action::Allow => ExitCode::SUCCESS,
        policy::Action::Deny => ExitCode::from(3),
        policy::Action::Approve => ExitCode::from(4),
    })
}

fn described_workload(args: &ExplainArgs) -> anyhow::Result<Workload> {
    let uid = args.uid.unwrap_or(0);
    let exe_sha256 = match &args.exe {
        Some(exe) => Some(
            std::fs::File::open(exe)
                .and_then(|file| ExeDigests::default().digest(file))
                .with_context(|| format!("hashing {}", exe.display()))?,
        ),
        None => None,
    };
    let mut groups = args.group.clone();
    if groups.is_empty()
        && let Some(user) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
        && let Some(group) = nix::unistd::Group::from_gid(user.gid).ok().flatten()
    {
        groups.push(group.name);
    }
    let cgroup = args
        .cgroup
        .clone()
        .or_else(|| args.unit.as_ref().map(|u| format!("/system.slice/{u}")));
    Ok(Workload {
        uid,
        user: crate::workload::user_name(uid),
        groups,
        unit: args
            .unit
            .clone()
            .or_else(|| cgroup.as_deref().and_then(systemd_unit)),
        container: cgroup.as_deref().and_then(container_id),
        cgroup,
        comm: args
            .comm
            .clone()
            .or_else(|| {
                args.exe
                    .as_ref()
                    .and_then(|e| e.file_name())
                    .map(|n| n.to_string_lossy().chars().take(15).collect())
            })
            .unwrap_or_default(),
        exe: args.exe.as_ref().map(|e| e.display().to_string()),
        exe_sha256,
        live: false,
        ..Workload::default()
    })
}

pub(crate) fn print_status(data: &serde_json::Value) {
    let text = |value: &serde_json::Value| value.as_str().unwrap_or("-").to_owned();
    println!(
        "interlock {} (pid {}), mode {}, since {}",
        text(&data["version"]),
        data["pid"],
        text(&data["mode"]),
        text(&data["started"])
    );
    if let Some(i) = data.get("intercept") {
        println!(
            "kernel:      cgroup {}, {} programs pinned in {}, {} protected entries",
            text(&i["cgroup"]),
            i["pinned_links"].as_array().map_or(0, Vec::len),
            text(&i["bpffs_dir"]),
            i["protected_entries"]
        );
        println!(
            "ci jobs:     {}",
            if i["ci_job_capture"] == true {
                "read from the environment their runner passed at exec"
            } else {
                "read from /proc (exec capture unavailable)"
            }
        );
    }
    println!("listening:   port {}", data["listen_port"]);
    let targets = data["targets"].as_array().map_or(&[][..], Vec::as_slice);
    println!("targets:     {}", targets.len());
    for t in targets {
        let destinations: Vec<String> = t["destinations"]
            .as_array()
            .into_iter()
            .flatten()
            .map(text)
            .collect();
        println!(
            "  {:<20} {:<10} {} -> {}",
            text(&t["name"]),
            text(&t["protocol"]),
            text(&t["address"]),
            destinations.join(", ")
        );
    }
    let sessions = &data["sessions"];
    println!(
        "sessions:    {} of {} in {}{}",
        human_bytes(sessions["used_bytes"].as_u64().unwrap_or(0)),
        human_bytes(sessions["max_store_bytes"].as_u64().unwrap_or(0)),
        text(&sessions["store"]),
        sessions["refusing"]
            .as_str()
            .map(|e| format!(", REFUSING NEW SESSIONS: {e}"))
            .unwrap_or_default()
    );
    let backlog = &sessions["backlog"];
    let shipping = match (
        sessions["shipper"].as_str(),
        sessions["backlog_error"].as_str(),
    ) {
        (None, _) => "not configured".to_owned(),
        (Some(url), Some(error)) => format!("{url}, backlog unknown: {error}"),
        (Some(url), None) => format!(
            "{url}, backlog {} sessions ({}), oldest {}{}",
            backlog["sessions"],
            human_bytes(backlog["bytes"].as_u64().unwrap_or(0)),
            backlog["oldest_age_s"]
                .as_u64()
                .map_or("-".into(), |s| format!("{s} s ago")),
            backlog["last_error"]
                .as_str()
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        ),
    };
    println!("shipping:    {shipping}");
    let approvals = &data["approvals"];
    println!(
        "approvals:   {} pending, {} active grants; webhook {}, callback {}",
        approvals["pending"],
        approvals["grants"],
        approvals["webhook"].as_str().unwrap_or("off"),
        approvals["callback"].as_str().unwrap_or("off"),
    );
    let source = &data["policy_source"];
    if !source.is_null() {
        let bundle = &source["bundle"];
        let running = match bundle["version"].as_str() {
            Some(version) => format!("bundle {version} (serial {})", bundle["serial"]),
            None => "no bundle yet".into(),
        };
        let check = &source["check"];
        let last = match (check["last_outcome"].as_str(), check["error"].as_str()) {
            (None, _) => "not checked yet".into(),
            (Some(outcome), None) => format!("last check {outcome}"),
            (Some(outcome), Some(error)) => format!("last check {outcome}: {error}"),
        };
        println!(
            "policy:      {running} from {}; {last}",
            text(&source["url"])
        );
    }
    let live = data["connections"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    println!(
        "connections: {} live, {} accepted since start",
        live.len(),
        data["accepted"]
    );
    for c in live {
        println!(
            "  {} {} -> {} pid {} ({} ms)",
            text(&c["session_id"]),
            text(&c["client"]),
            text(&c["target"]),
            c["pid"],
            c["age_ms"]
        );
    }
}

/// `1.5 GiB`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ => format!("{value:.1} {}", UNITS[unit]),
    }
}
