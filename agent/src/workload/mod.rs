//! Who is calling: the workload behind an intercepted connection, from the
//! kernel's record at `connect()` enriched from `/proc`.
//!
//! The kernel record (tgid, uid, gid, cgroup id, comm) is the ground truth; it
//! was captured in the caller's own context and cannot be forged by the
//! client. `/proc` adds what the kernel record cannot carry (exe, command
//! line, parents), and is only trusted when the process there is provably the
//! one that connected (see [`procfs::ProcessSnapshot::read`]).
mod cgroup;
mod exe_digest;
mod exec_env;
pub mod job;
mod procfs;
mod resolver;

pub use cgroup::{CgroupFs, container_id, systemd_unit};
pub use exe_digest::ExeDigests;
pub use exec_env::ExecEnvs;
pub use job::{JobContext, is_runner};
pub use resolver::{WorkloadResolver, user_name};

use serde::{Deserialize, Serialize};

/// The identity policy matches on and the access log records (and, read
/// back from a session record, what learning decides for).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Workload {
    pub pid: u32,
    pub uid: u32,
    /// User name of `uid`, when it has one.
    pub user: Option<String>,
    pub gid: u32,
    /// Names of the primary and supplementary groups.
    pub groups: Vec<String>,
    /// cgroup v2 path relative to the cgroup root, e.g. `/system.slice/gitlab-runner.service`.
    pub cgroup: Option<String>,
    /// The innermost systemd unit in the cgroup path (`*.service`, `*.scope`).
    pub unit: Option<String>,
    /// Container id from docker/containerd/podman/kubepods cgroup paths.
    pub container: Option<String>,
    /// `comm` as the kernel saw it at connect.
    pub comm: String,
    pub exe: Option<String>,
    /// Hex SHA-256 of the executable's contents.
    pub exe_sha256: Option<String>,
    pub cmdline: Vec<String>,
    /// Parent processes, nearest first, up to pid 1.
    pub parents: Vec<ParentProcess>,
    /// The CI job it runs in, from the process its runner started.
    pub job: Option<JobContext>,
    /// Why, as the caller states it (`INTERLOCK_REASON` in its own
    /// environment): self-declared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// False when the process had exited (or its pid was reused) before it
    /// could be inspected: only the kernel-recorded fields are set.
    pub live: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentProcess {
    pub pid: u32,
    pub exe: Option<String>,
}

/// What the kernel recorded about the caller at `connect()`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KernelIdentity {
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    pub comm: String,
    /// CLOCK_BOOTTIME at connect, ns.
    #[serde(skip)]
    pub connect_boot_ns: u64,
}
