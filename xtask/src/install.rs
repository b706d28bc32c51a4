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
}

impl InstallArgs {
    pub fn staged(root: &Path, binary: &Path) -> Self {
        Self {
            root: root.to_owned(),
            binary: Some(binary.to_owned()),
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
