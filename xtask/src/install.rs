//! `cargo xtask install`: the binary, the systemd unit and a default
//! configuration (never overwriting an existing one).
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};
use clap::Args;

use crate::{exec, workspace_root};

#[derive(Args)]
pub struct InstallArgs {
    /// Install under this root instead of / (packaging, tests).
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Use an already built binary instead of building a release one.
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Also trust the agent's SSH host key for every SSH target host-wide:
    /// write `interlock ssh known-hosts` into /etc/ssh/ssh_known_hosts
    /// (lines the agent added before are replaced, others kept).
    #[arg(long)]
    ssh_known_hosts: bool,
}

impl InstallArgs {
    pub fn staged(root: &Path, binary: &Path) -> Self {
        Self {
            root: root.to_owned(),
            binary: Some(binary.to_owned()),
            ssh_known_hosts: false,
        }
    }
}

pub fn run(args: InstallArgs) -> Result<()> {
    let binary = match args.binary {
        Some(binary) => binary,
        None => {
            exec(crate::cargo().args(["build", "--release", "--package", "interlock"]))?;
            workspace_root().join("target/release/interlock")
        }
    };
    let root = &args.root;
    let at = |path: &str| root.join(path.trim_start_matches('/'));

    copy(&binary, &at("/usr/local/bin/interlock"), 0o755)?;
    copy(
        &workspace_root().join("systemd/interlock.service"),
        &at("/etc/systemd/system/interlock.service"),
        0o644,
    )?;
    let config = at("/etc/interlock/interlock.toml");
    if config.exists() {
        eprintln!("kept existing {}", config.display());
    } else {
        copy(
            &workspace_root().join("systemd/interlock.toml"),
            &config,
            0o640,
        )?;
    }
    fs::create_dir_all(at("/etc/interlock/policy.d"))?;
    if args.ssh_known_hosts {
        trust_ssh_host_key(
            &at("/usr/local/bin/interlock"),
            &config,
            &at("/etc/ssh/ssh_known_hosts"),
        )?;
    }

    let systemd_running = Path::new("/run/systemd/system").exists();
    if args.root == Path::new("/") && systemd_running {
        exec(Command::new("systemctl").arg("daemon-reload"))?;
        eprintln!("installed; start with: systemctl enable --now interlock");
    } else {
        eprintln!(
            "installed under {} (systemd is not running here: enable the unit on the target host)",
            root.display()
        );
    }
    Ok(())
}

/// Replaces the agent's lines (comment `interlock:TARGET`) in a
/// known_hosts file with what `interlock ssh known-hosts` prints now.
fn trust_ssh_host_key(binary: &Path, config: &Path, known_hosts: &Path) -> Result<()> {
    let out = Command::new(binary)
        .args(["ssh", "known-hosts", "--config"])
        .arg(config)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "interlock ssh known-hosts: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let existing = fs::read_to_string(known_hosts).unwrap_or_default();
    let mut text: String = existing
        .lines()
        .filter(|line| {
            !line
                .split_whitespace()
                .nth(3)
                .is_some_and(|c| c.starts_with("interlock:"))
        })
        .map(|line| format!("{line}\n"))
        .collect();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    if let Some(parent) = known_hosts.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(known_hosts, text)?;
    fs::set_permissions(known_hosts, fs::Permissions::from_mode(0o644))?;
    eprintln!(
        "trusted the agent's SSH host key in {}",
        known_hosts.display()
    );
    Ok(())
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    // Write beside, then rename: a running binary is replaced, not rewritten.
    let staged = to.with_extension("interlock-new");
    fs::copy(from, &staged)
        .with_context(|| format!("copying {} to {}", from.display(), staged.display()))?;
    fs::set_permissions(&staged, fs::Permissions::from_mode(mode))?;
    fs::rename(&staged, to)?;
    eprintln!("installed {}", to.display());
    Ok(())
}
