//! The CI-job tracepoints (`interlock_runner_exec` on
//! `sched_process_exec`, `interlock_runner_fork` on `sched_process_fork`,
//! `interlock_job_exec` on `sys_enter_execve`): the kernel sends each
//! job root's environment as its runner passed it (see
//! `workload::exec_env`). They watch the whole host, not the workloads'
//! cgroup (a runner may live anywhere), and do nothing for a process
//! that is neither a runner nor a runner's child.
//!
//! They are not pinned: without the agent nobody reads what they send.
use std::{fs, io, path::Path};

use aya::{
    EbpfLoader,
    maps::{HashMap, MapData, RingBuf},
    programs::{TracePoint, trace_point::TracePointLink},
};
use interlock_common::{RUNNER_NAME_LEN, maps, programs};

const TRACEFS: &str = "/sys/kernel/tracing";

/// The tracepoints' links, and the ring the environments come through.
pub struct JobTracing {
    _links: Vec<TracePointLink>,
    pub ring: Option<RingBuf<MapData>>,
}

/// Where the tracepoints' fields sit on this kernel: `child_pid` of
/// `sched_process_fork` (it moved between kernels), and `envp`
/// of `sys_enter_execve`. Set in the programs before they load.
#[derive(Clone, Copy, Debug)]
pub struct Offsets {
    pub fork_child_pid: u32,
    pub execve_envp: u32,
}

/// The offsets on this kernel, from the tracepoints' formats (tracefs is
/// mounted if it is not).
pub fn offsets() -> io::Result<Offsets> {
    mount_tracefs()?;
    let events = Path::new(TRACEFS).join("events");
    let fork = fs::read_to_string(events.join("sched/sched_process_fork/format"))?;
    let execve = fs::read_to_string(events.join("syscalls/sys_enter_execve/format"))?;
    let offset = |format: &str, field: &str| {
        field_offset(format, field)
            .ok_or_else(|| io::Error::other(format!("no field {field} in a tracepoint's format")))
    };
    Ok(Offsets {
        fork_child_pid: offset(&fork, "child_pid")?,
        execve_envp: offset(&execve, "envp")?,
    })
}

/// Sets the offsets in the programs.
pub fn set_offsets<'a>(loader: &mut EbpfLoader<'a>, offsets: &'a Offsets) {
    loader.override_global("FORK_CHILD_PID_OFFSET", &offsets.fork_child_pid, true);
    loader.override_global("EXECVE_ENVP_OFFSET", &offsets.execve_envp, true);
}

/// tracefs where aya looks for tracepoints, mounted if it is not.
fn mount_tracefs() -> io::Result<()> {
    if Path::new(TRACEFS).join("events").exists() {
        return Ok(());
    }
    nix::mount::mount(
        Some("tracefs"),
        TRACEFS,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(io::Error::from)
}

/// `field:pid_t child_pid; offset:20; size:4; signed:1;` → 20.
fn field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let (declaration, rest) = line.trim().strip_prefix("field:")?.split_once(';')?;
        let name = declaration.rsplit([' ', '*']).next()?;
        if name != field {
            return None;
        }
        rest.split(';')
            .find_map(|part| part.trim().strip_prefix("offset:"))?
            .parse()
            .ok()
    })
}

/// Loads and attaches the tracepoints, tells them the runners' names, and
/// marks runners already running (found in `/proc`).
pub fn attach(ebpf: &mut aya::Ebpf, runners: &[String]) -> Result<JobTracing, String> {
    let mut names: HashMap<MapData, [u8; RUNNER_NAME_LEN], u8> = ebpf
        .take_map(maps::RUNNER_NAMES)
        .ok_or("no runner names map")?
        .try_into()
        .map_err(|e| format!("runner names: {e}"))?;
    for runner in runners {
        // The kernel's comm: the base name, cut at 15 bytes.
        let base = runner.rsplit('/').next().unwrap_or(runner).as_bytes();
        let base = &base[..base.len().min(RUNNER_NAME_LEN - 1)];
        if base.is_empty() {
            continue;
        }
        let mut key = [0u8; RUNNER_NAME_LEN];
        key[..base.len()].copy_from_slice(base);
        names
            .insert(key, 1, 0)
            .map_err(|e| format!("runner names: {e}"))?;
    }
    let mut running: HashMap<MapData, u32, u8> = ebpf
        .take_map(maps::RUNNERS)
        .ok_or("no runners map")?
        .try_into()
        .map_err(|e| format!("runners: {e}"))?;
    for pid in running_runners(runners) {
        let _ = running.insert(pid, 1, 0);
    }
    let ring = RingBuf::try_from(ebpf.take_map(maps::EXEC_ENV).ok_or("no ring")?)
        .map_err(|e| format!("exec ring: {e}"))?;
    let mut links = Vec::new();
    for (name, category, event) in [
        (programs::RUNNER_EXEC, "sched", "sched_process_exec"),
        (programs::RUNNER_FORK, "sched", "sched_process_fork"),
        (programs::JOB_EXEC, "syscalls", "sys_enter_execve"),
    ] {
        let program: &mut TracePoint = ebpf
            .program_mut(name)
            .ok_or(format!("no program {name}"))?
            .try_into()
            .map_err(|e| format!("{name}: {e}"))?;
        program.load().map_err(|e| format!("{name}: {e}"))?;
        let id = program
            .attach(category, event)
            .map_err(|e| format!("{name}: {e}"))?;
        links.push(program.take_link(id).map_err(|e| format!("{name}: {e}"))?);
    }
    Ok(JobTracing {
        _links: links,
        ring: Some(ring),
    })
}

/// Processes whose executable is a runner.
fn running_runners(runners: &[String]) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| crate::workload::is_runner(&exe.display().to_string(), runners))
        })
        .collect()
}

/// Reads environments off the ring into `envs` until the task is dropped.
pub async fn collect(ring: RingBuf<MapData>, envs: std::sync::Arc<crate::workload::ExecEnvs>) {
    // SAFETY: the ring owns its fd, and the AsyncFd owns the ring.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    };
    let mut ring = match registered {
        Ok(ring) => ring,
        Err(error) => {
            tracing::warn!(%error, "cannot poll the exec ring; CI jobs are read from /proc");
            return;
        }
    };
    loop {
        let mut guard = match ring.readable_mut().await {
            Ok(guard) => guard,
            Err(error) => {
                tracing::warn!(%error, "polling the exec ring failed");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            envs.take(&item);
        }
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_read_from_either_format() {
        let new = "\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        let old = "\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;\n\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        let execve = "\tfield:const char * filename;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:const char *const * envp;\toffset:32;\tsize:8;\tsigned:0;\n";
        assert_eq!(field_offset(new, "child_pid"), Some(20));
        assert_eq!(field_offset(old, "child_pid"), Some(44));
        assert_eq!(field_offset(execve, "envp"), Some(32));
        assert_eq!(field_offset(execve, "argv"), None);
    }
}
