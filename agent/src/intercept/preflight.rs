//! Start-up checks, each with an error that says what to do.
use std::{fs, path::Path};

use crate::workload::CgroupFs;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("kernel {release} is not supported: Interlock needs Linux 5.15 or newer")]
    OldKernel { release: String },
    #[error(
        "no cgroup v2 hierarchy is mounted (looked for a cgroup2 entry in /proc/self/mountinfo); mount one with `mount -t cgroup2 none /sys/fs/cgroup`"
    )]
    NoCgroup2,
    #[error("cgroup {path} is not a directory of the cgroup v2 hierarchy at {root}")]
    NotInCgroup2 { path: String, root: String },
    #[error(
        "missing capabilities: {missing} (run as root, or grant them, e.g. AmbientCapabilities= in the systemd unit)"
    )]
    Capabilities { missing: String },
    #[error("bpffs is not mounted at /sys/fs/bpf and mounting it failed: {0}")]
    Bpffs(nix::Error),
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Parses "6.18.44-fc" or "5.15.0-91-generic" into (major, minor).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

pub fn check_kernel() -> Result<(), PreflightError> {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    match kernel_version(&release) {
        Some(version) if version >= (5, 15) => Ok(()),
        _ => Err(PreflightError::OldKernel { release }),
    }
}

pub fn check_cgroup(cgroups: Option<&CgroupFs>, dir: &Path) -> Result<(), PreflightError> {
    let cgroups = cgroups.ok_or(PreflightError::NoCgroup2)?;
    if !dir.starts_with(cgroups.root()) || !dir.join("cgroup.procs").exists() {
        return Err(PreflightError::NotInCgroup2 {
            path: dir.display().to_string(),
            root: cgroups.root().display().to_string(),
        });
    }
    Ok(())
}

/// Loading and attaching cgroup programs needs CAP_BPF (or CAP_SYS_ADMIN)
/// and CAP_NET_ADMIN; reading other processes' /proc entries needs
/// CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH.
pub fn check_capabilities() -> Result<(), PreflightError> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| effective & (1 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    for (cap, name) in [
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_PTRACE, "CAP_SYS_PTRACE"),
        (CAP_DAC_READ_SEARCH, "CAP_DAC_READ_SEARCH"),
    ] {
        if !has(cap) {
            missing.push(name);
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::Capabilities {
            missing: missing.join(", "),
        })
    }
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there.
pub fn ensure_bpffs() -> Result<(), PreflightError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounted = mountinfo.lines().any(|line| {
        line.split_once(" - ").is_some_and(|(left, right)| {
            right.starts_with("bpf ") && left.split_whitespace().nth(4) == Some("/sys/fs/bpf")
        })
    });
    if mounted {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        "/sys/fs/bpf",
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(PreflightError::Bpffs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_version("6.18.44-fc-v782"), Some((6, 18)));
        assert_eq!(kernel_version("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(kernel_version("5.4.0"), Some((5, 4)));
        assert!(kernel_version("5.4.0").unwrap() < (5, 15));
        assert_eq!(kernel_version("weird"), None);
    }
}
