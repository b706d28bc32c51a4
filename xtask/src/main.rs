//! `cargo xtask <command>`: everything beyond plain cargo.
//!
//! | command   | what it does |
//! |-----------|--------------|
//! | `setup`   | installs what is missing (nightly rust-src, bpf-linker, cargo-fuzz, cargo-deb, cargo-generate-rpm, Garage, the apt packages the tests use); idempotent |
//! | `build`   | builds the agent with its kernel programs |
//! | `lint`    | rustfmt and clippy, user space and the eBPF crate |
//! | `test`    | setup, build, lint, unit tests, fuzzing (60 s a target), install check, package check, privileged end-to-end tests |
//! | `fuzz`    | the fuzz targets in `fuzz/` (or one: `fuzz TARGET`), each for `--secs` |
//! | `demo`    | setup, build, then `interlock demo` (the quick start) |
//! | `install` | the binary, the systemd unit and a default configuration |
//! | `package` | `.deb` and `.rpm` in `target/packages/` (`--check`: the `.deb` installed, upgraded, removed and purged with `dpkg --root` in a scratch root) |
//! | `bench`   | `bench tcp` (direct, Interlock, socat), `bench postgres` (direct, PgBouncer, Interlock), with ratios |
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod bench;
mod bench_disk;
mod bench_http;
mod bench_postgres;
mod bench_sessions;
mod bench_ssh;
mod install;
mod package;
mod setup;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install missing toolchain pieces and test dependencies.
    Setup,
    /// Build the agent (debug, or --release) with its eBPF programs.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// rustfmt --check and clippy -D warnings (user space and eBPF).
    Lint,
    /// Everything CI runs: setup, lint, unit tests, end-to-end tests.
    Test {
        /// Extra arguments for the end-to-end test binary (e.g. a test name).
        #[arg(trailing_var_arg = true)]
        e2e_args: Vec<String>,
    },
    /// Run each fuzz target (fuzz/), or one, for a while.
    Fuzz {
        /// One of the targets in fuzz/fuzz_targets; all when left out.
        target: Option<String>,
        #[arg(long, visible_alias = "secs", default_value_t = 60)]
        seconds: u32,
    },
    /// Run the agent end to end on its embedded demo configuration.
    Demo,
    /// Install the binary, systemd unit and default configuration.
    Install(install::InstallArgs),
    /// Build the .deb and .rpm packages (target/packages/).
    Package(package::PackageArgs),
    /// Benchmarks against a direct connection and the usual alternative.
    Bench(bench::BenchArgs),
    /// The benchmark's load generator (run inside the benchmark cgroup).
    #[command(hide = true)]
    BenchClient(bench::ClientArgs),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::run(),
        Task::Build { release } => build(release),
        Task::Lint => {
            setup::run()?;
            lint()
        }
        Task::Test { e2e_args } => test(&e2e_args),
        Task::Fuzz { target, seconds } => {
            setup::run()?;
            fuzz(target.as_deref(), seconds)
        }
        Task::Demo => {
            setup::run()?;
            build(false)?;
            exec(Command::new(workspace_root().join("target/debug/interlock")).arg("demo"))
        }
        Task::Install(args) => install::run(args),
        Task::Package(args) => package::run(args).map(drop),
        Task::Bench(args) => bench::run(args),
        Task::BenchClient(args) => bench::load_client(args),
    }
}

/// The fuzz targets of `fuzz/` (libFuzzer through cargo-fuzz, nightly),
/// each for `seconds`, from the committed seed corpus; what they find is
/// left in `fuzz/artifacts/`. The kernel programs are not part of what is
/// fuzzed, so their build is skipped.
fn fuzz(only: Option<&str>, seconds: u32) -> Result<()> {
    const TARGETS: [&str; 6] = [
        "postgres_frames",
        "sql",
        "ssh_channel",
        "command_line",
        "http_request",
        "config",
    ];
    if let Some(only) = only
        && !TARGETS.contains(&only)
    {
        bail!("no fuzz target {only:?}; the targets are {TARGETS:?}");
    }
    for target in TARGETS.into_iter().filter(|t| only.is_none_or(|o| o == *t)) {
        let work = std::env::temp_dir().join(format!("interlock-fuzz-{target}"));
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work)?;
        exec(
            Command::new("cargo")
                .current_dir(workspace_root())
                .args(["+nightly", "fuzz", "run", "--sanitizer", "none", target])
                .arg(&work)
                .arg(workspace_root().join("fuzz/corpus").join(target))
                .args([
                    "--",
                    &format!("-max_total_time={seconds}"),
                    // An input that takes this long is a finding (a hang).
                    "-timeout=10",
                    "-rss_limit_mb=4096",
                ])
                .env("AYA_BUILD_SKIP", "1"),
        )?;
        let _ = fs::remove_dir_all(&work);
    }
    Ok(())
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

pub fn exec(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn build(release: bool) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", "interlock"]);
    if release {
        cmd.arg("--release");
    }
    exec(&mut cmd)
}

fn lint() -> Result<()> {
    exec(cargo().args(["fmt", "--all", "--check"]))?;
    exec(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "interlock-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The kernel crate only builds for BPF, with nightly and build-std;
    // `rustup run` because the cargo running us is the toolchain's own.
    exec(
        Command::new("rustup")
            .args([
                "run",
                "nightly",
                "cargo",
                "clippy",
                "--package",
                "interlock-ebpf",
                "--release",
            ])
            .args([
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ])
            .current_dir(workspace_root()),
    )
}

/// Installs into a scratch root and checks the unit there with
/// `systemd-analyze verify` (which insists that ExecStart exists).
fn install_and_verify_unit() -> Result<()> {
    let root = std::env::temp_dir().join(format!("interlock-install-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    install::run(install::InstallArgs::staged(
        &root,
        &workspace_root().join("target/debug/interlock"),
    ))?;
    for installed in [
        "usr/local/bin/interlock",
        "etc/systemd/system/interlock.service",
        "etc/interlock/interlock.toml",
    ] {
        if !root.join(installed).is_file() {
            bail!("install did not put {installed} in place");
        }
    }
    let unit = fs::read_to_string(root.join("etc/systemd/system/interlock.service"))?;
    verify_unit(&root, &unit, "/usr/local/bin/interlock").context("the systemd unit")?;
    fs::remove_dir_all(&root)?;
    Ok(())
}

/// `systemd-analyze verify` on `unit` as installed under `root` (it
/// insists that ExecStart exists, so the binary's path is made `root`'s).
fn verify_unit(root: &Path, unit: &str, binary: &str) -> Result<()> {
    let staged = root.join("interlock.service");
    let in_root = root.join(binary.trim_start_matches('/'));
    fs::write(
        &staged,
        unit.replace(binary, &in_root.display().to_string()),
    )?;
    exec(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&staged)
            .env("SYSTEMD_LOG_LEVEL", "warning"),
    )
    .context("systemd-analyze verify")
}

fn test(e2e_args: &[String]) -> Result<()> {
    setup::run()?;
    build(false)?;
    lint()?;
    exec(cargo().args([
        "test",
        "--workspace",
        "--exclude",
        "interlock-e2e",
        "--exclude",
        "interlock-ebpf",
    ]))?;
    fuzz(None, 60)?;
    install_and_verify_unit()?;
    package::run(package::PackageArgs::of_profile("dev"))?;
    let binary = workspace_root().join("target/debug/interlock");
    if !fs::metadata(&binary).is_ok_and(|m| m.len() > 0) {
        bail!("{} is missing after the build", binary.display());
    }
    let mut e2e = cargo();
    e2e.args(["test", "--package", "interlock-e2e", "--"])
        .args(e2e_args);
    e2e.env("INTERLOCK_BIN", &binary);
    exec(&mut e2e)
}
