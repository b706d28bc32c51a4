//! Turns a kernel record into a [`Workload`].
use std::path::PathBuf;

use nix::unistd::{Gid, Group, Uid, User};

use super::{
    JobContext, KernelIdentity, ParentProcess, Workload,
    cgroup::{CgroupFs, container_id, systemd_unit},
    exe_digest::ExeDigests,
    job,
    procfs::{Proc, SnapshotError},
};

/// Resolves workloads; shared by every connection (caches inside).
/// Blocking: callers on the async path use `spawn_blocking`.
#[derive(Debug)]
pub struct WorkloadResolver {
    proc_root: PathBuf,
    cgroups: CgroupFs,
    digests: ExeDigests,
    /// CI runners, by executable base name or path: their children are
    /// jobs, whose environment says which.
    runners: Vec<String>,
    /// Job roots' environments as captured at exec, when the kernel
    /// captures them.
    exec_envs: Option<std::sync::Arc<super::ExecEnvs>>,
}

/// Parent chains stop here even if pid 1 is further away.
const MAX_PARENTS: usize = 32;

impl WorkloadResolver {
    pub fn new(cgroups: CgroupFs) -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            cgroups,
            digests: ExeDigests::default(),
            runners: super::job::DEFAULT_RUNNERS.map(String::from).into(),
            exec_envs: None,
        }
    }

    /// Reads jobs from the environments captured at exec.
    pub fn with_exec_envs(mut self, envs: std::sync::Arc<super::ExecEnvs>) -> Self {
        self.exec_envs = Some(envs);
        self
    }

    /// Knows these CI runners (instead of the defaults).
    pub fn with_ci_runners(mut self, runners: Vec<String>) -> Self {
        self.runners = runners;
        self
    }

    /// The workload behind an intercepted connection. The kernel's fields
    /// always stand; `/proc` fills in the rest only if the process there is
    /// still the caller.
    pub fn resolve(&self, kernel: &KernelIdentity) -> Workload {
        let proc = Proc::new(&self.proc_root, kernel.tgid);
        let snapshot = match proc.snapshot(Some(kernel.connect_boot_ns)) {
            Ok(snapshot) => Some(snapshot),
            Err(SnapshotError::Gone | SnapshotError::Reused) => None,
            Err(error) => {
                tracing::warn!(pid = kernel.tgid, %error, "cannot inspect the calling process");
                None
            }
        };
        let cgroup = self.cgroups.path_of(
            kernel.cgroup_id,
            snapshot.as_ref().and_then(|s| s.cgroup.as_deref()),
        );
        let mut workload = Workload {
            pid: kernel.tgid,
            uid: kernel.uid,
            user: user_name(kernel.uid),
            gid: kernel.gid,
            groups: group_names(kernel.gid, &[]),
            unit: cgroup.as_deref().and_then(systemd_unit),
            container: cgroup.as_deref().and_then(container_id),
            cgroup,
            comm: kernel.comm.clone(),
            live: false,
            ..Workload::default()
        };
        if let Some(snapshot) = snapshot {
            workload.live = true;
            workload.groups = group_names(kernel.gid, &snapshot.groups);
            workload.exe = snapshot.exe.as_ref().map(|p| p.display().to_string());
            workload.exe_sha256 = proc.open_exe().and_then(|f| self.digests.digest(f)).ok();
            workload.cmdline = snapshot.cmdline;
            workload.parents = self.parents(snapshot.ppid);
            workload.job = self.job(&workload);
            workload.reason = proc
                .environ()
                .ok()
                .and_then(|environ| job::stated_reason(&environ));
        }
        workload
    }

    /// The job of the caller or its nearest ancestor whose parent is a CI
    /// runner, from that process's environment.
    fn job(&self, workload: &Workload) -> Option<JobContext> {
        // Each process of the chain, caller first, beside its parent.
        let processes = std::iter::once((workload.pid, workload.exe.as_deref()))
            .chain(workload.parents.iter().map(|p| (p.pid, p.exe.as_deref())));
        let parents = workload.parents.iter().map(|p| p.exe.as_deref());
        let ((pid, exe), _) = processes
            .zip(parents)
            .find(|(_, parent)| parent.is_some_and(|exe| job::is_runner(exe, &self.runners)))?;
        let proc = Proc::new(&self.proc_root, pid);
        // What the runner passed at exec, when the kernel caught it: the
        // job may have replaced the process with another environment since.
        let captured = self.exec_envs.as_ref().and_then(|envs| {
            let started = proc.stat().ok()?.start_boot_ns();
            envs.of(pid, started)
        });
        let (environ, from_exec) = match captured {
            Some(capture) => (capture.block, true),
            None => (proc.environ().ok()?, false),
        };
        let mut context = JobContext::from_environment(job::environment(&environ))?;
        context.from_pid = pid;
        context.from_exe = exe.map(str::to_owned);
        context.from_exec = from_exec;
        Some(context)
    }

    /// A workload for a live pid (for `policy explain --pid`).
    pub fn resolve_pid(&self, pid: u32) -> Result<Workload, SnapshotError> {
        let proc = Proc::new(&self.proc_root, pid);
        let status = std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("status"))
            .map_err(|_| SnapshotError::Gone)?;
        let field = |name: &str| -> u32 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(u32::MAX)
        };
        let comm = std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("comm"))
            .map(|c| c.trim_end().to_owned())
            .unwrap_or_default();
        let snapshot = proc.snapshot(None)?;
        let cgroup_id = snapshot
            .cgroup
            .as_deref()
            .and_then(|p| self.cgroups.id_of(p))
            .unwrap_or_default();
        let kernel = KernelIdentity {
            tgid: pid,
            uid: field("Uid:"),
            gid: field("Gid:"),
            cgroup_id,
            comm,
            netns_cookie: 0,
            connect_boot_ns: u64::MAX,
        };
        Ok(self.resolve(&kernel))
    }

    fn parents(&self, mut pid: u32) -> Vec<ParentProcess> {
        let mut parents = Vec::new();
        while pid != 0 && parents.len() < MAX_PARENTS {
            let proc = Proc::new(&self.proc_root, pid);
            parents.push(ParentProcess {
                pid,
                exe: proc.exe().map(|p| p.display().to_string()),
            });
            if pid == 1 {
                break;
            }
            match proc.stat() {
                Ok(stat) => pid = stat.ppid,
                Err(_) => break,
            }
        }
        parents
    }
}

pub fn user_name(uid: u32) -> Option<String> {
    User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// Names of the primary group and the supplementary groups (ids without a
/// name are kept as numbers, so a policy can still name them).
fn group_names(gid: u32, supplementary: &[u32]) -> Vec<String> {
    let mut ids = vec![gid];
    ids.extend(supplementary.iter().copied().filter(|g| *g != gid));
    ids.into_iter()
        .map(|g| {
            Group::from_gid(Gid::from_raw(g))
                .ok()
                .flatten()
                .map_or_else(|| g.to_string(), |group| group.name)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exited_process_is_still_identified_by_the_kernel_record() {
        let resolver = WorkloadResolver::new(CgroupFs::new("/nonexistent".into()));
        // pid_max is at most 2^22: this pid cannot exist.
        let kernel = KernelIdentity {
            tgid: 1 << 23,
            uid: 0,
            gid: 0,
            cgroup_id: 1,
            comm: "gone".into(),
            ..Default::default()
        };
        let workload = resolver.resolve(&kernel);
        assert!(!workload.live);
        assert_eq!(
            (workload.pid, workload.uid, workload.comm.as_str()),
            (1 << 23, 0, "gone")
        );
        assert_eq!(workload.user.as_deref(), Some("root"));
        assert!(workload.exe.is_none() && workload.cmdline.is_empty());
    }

    #[test]
    fn a_pid_started_after_the_connect_is_not_trusted() {
        let resolver = WorkloadResolver::new(CgroupFs::new("/nonexistent".into()));
        let me = std::process::id();
        // A connect at boot time 0 predates this process: its pid was "reused".
        let kernel = KernelIdentity {
            tgid: me,
            uid: 4242,
            comm: "caller".into(),
            connect_boot_ns: 0,
            ..Default::default()
        };
        let workload = resolver.resolve(&kernel);
        assert!(
            !workload.live,
            "/proc must not lend this process's identity"
        );
        assert_eq!(workload.uid, 4242);
        assert!(workload.exe.is_none());
        // The same pid, connecting now, is trusted.
        let kernel = KernelIdentity {
            connect_boot_ns: u64::MAX / 2,
            ..kernel
        };
        assert!(resolver.resolve(&kernel).live);
    }
}
