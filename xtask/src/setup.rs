//! Installs what the build and the tests need, skipping what is present.
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::exec;

/// Debian packages the end-to-end tests, the demo and the benchmark use as
/// real servers and clients (and `socat`, the relay the benchmark compares
/// against; OpenSSH's server and clients, `rsync` and `git` for SSH;
/// asyncpg, psycopg and SQLAlchemy as the PostgreSQL clients applications
/// use; `python3-venv` for Ansible's own environment; nginx as a real HTTPS
/// server behind an HTTP target, and Python `requests` as a client with a
/// CA bundle of its own; `wrk` for `bench http`; the Docker Distribution
/// registry and Prometheus as real JSON APIs behind HTTP targets, with
/// `htpasswd` for their bcrypt passwords; grpcio for a gRPC service and
/// client), and
/// what the build needs: `pg_query` compiles PostgreSQL's parser (C) and
/// generates its bindings with libclang.
const APT_PACKAGES: [&str; 27] = [
    "libclang-dev",
    "python3-venv",
    "clang",
    "python3-asyncpg",
    "python3-sqlalchemy",
    "curl",
    "python3",
    "socat",
    "util-linux",
    "systemd",
    "postgresql-15",
    "postgresql-client-15",
    "pgbouncer",
    "python3-psycopg",
    "python3-psycopg2",
    "openssh-server",
    "openssh-sftp-server",
    "openssh-client",
    "rsync",
    "git",
    "nginx",
    "python3-requests",
    "wrk",
    "docker-registry",
    "prometheus",
    "apache2-utils",
    "python3-grpcio",
];
const BPF_LINKER: &str = "bpf-linker@0.10.1";
const CARGO_FUZZ: &str = "cargo-fuzz@0.13.2";
/// The packagers `cargo xtask package` runs (about a minute each, once).
const CARGO_DEB: &str = "cargo-deb@3.8.0";
const CARGO_GENERATE_RPM: &str = "cargo-generate-rpm@0.21.1";
/// The S3-compatible store the session tests ship to (a real one, built
/// from crates.io: about 12 minutes on 2 cores, once).
const GARAGE: &str = "garage@2.5.0";
/// Ansible, as CI users install it (ansible-core from PyPI), in an
/// environment of its own; the SSH tests run it through the agent.
const ANSIBLE_VENV: &str = "/opt/interlock-test/ansible";
const ANSIBLE_CORE: &str = "ansible-core>=2.17,<2.18";

pub fn run() -> Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    apt_packages()?;
    ansible()?;
    cargo_fuzz()?;
    packagers()?;
    garage()
}

fn packagers() -> Result<()> {
    for (subcommand, krate) in [("deb", CARGO_DEB), ("generate-rpm", CARGO_GENERATE_RPM)] {
        if !succeeds(Command::new("cargo").args([subcommand, "--version"])) {
            exec(crate::cargo().args(["install", krate, "--locked"]))?;
        }
    }
    Ok(())
}

fn ansible() -> Result<()> {
    let bin = format!("{ANSIBLE_VENV}/bin");
    if succeeds(Command::new(format!("{bin}/ansible-playbook")).arg("--version")) {
        return Ok(());
    }
    exec(Command::new("/usr/bin/python3").args(["-m", "venv", ANSIBLE_VENV]))?;
    exec(Command::new(format!("{bin}/pip")).args(["install", "-q", ANSIBLE_CORE]))
}

/// libFuzzer's cargo front end, for the fuzz targets in `fuzz/`.
fn cargo_fuzz() -> Result<()> {
    if succeeds(Command::new("cargo").args(["fuzz", "--version"])) {
        return Ok(());
    }
    exec(crate::cargo().args(["install", CARGO_FUZZ, "--locked"]))
}

fn garage() -> Result<()> {
    if succeeds(Command::new("garage").arg("--version")) {
        return Ok(());
    }
    exec(crate::cargo().args(["install", GARAGE, "--locked"]))
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn nightly_rust_src() -> Result<()> {
    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        exec(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        exec(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    // 0.11+ needs a system LLVM newer than this toolchain's; 0.10.1 loads
    // the nightly toolchain's own LLVM.
    let version = output(Command::new("bpf-linker").arg("--version"));
    if version.contains("0.10.1") {
        return Ok(());
    }
    exec(crate::cargo().args(["install", BPF_LINKER, "--locked", "--force"]))
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .contains("install ok installed")
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !nix_is_root() {
        bail!("missing packages {missing:?}; install them with apt-get (as root)");
    }
    exec(Command::new("apt-get").arg("update").arg("-q")).context("apt-get update")?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn nix_is_root() -> bool {
    output(Command::new("id").arg("-u")).trim() == "0"
}
