//! Job roots' environments as their runners passed them to `execve`,
//! captured in the kernel (`ebpf-programs`: `interlock_job_exec`). A job
//! can replace its first process with another environment (`exec env
//! CI_COMMIT_REF_NAME=main …`), after which `/proc` shows what it chose;
//! the capture keeps what the runner said.
use std::collections::{HashMap, VecDeque};

use interlock_common::{EXEC_ENV_END, EXEC_ENV_VALUE, ExecEnvVar};
use parking_lot::Mutex;

/// Captures kept (the oldest go first): one per job started.
const MAX_CAPTURES: usize = 4_096;
/// Bytes kept per capture.
const MAX_BYTES: usize = 256 * 1024;

/// One job root's environment at its first exec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capture {
    /// `CLOCK_BOOTTIME` at the exec: a process started later under the
    /// same pid is not this one.
    pub exec_boot_ns: u64,
    /// `KEY=VALUE\0…`, as `/proc/<pid>/environ` spells it.
    pub block: Vec<u8>,
    /// Every variable arrived, whole.
    pub complete: bool,
}

#[derive(Default)]
struct Captures {
    done: HashMap<u32, Capture>,
    order: VecDeque<u32>,
    /// Being received: the variables so far, and the next index expected.
    partial: HashMap<u32, (Capture, u16)>,
}

/// The captures, by pid.
#[derive(Default)]
pub struct ExecEnvs {
    captures: Mutex<Captures>,
}

impl std::fmt::Debug for ExecEnvs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExecEnvs({} captures)", self.captured())
    }
}

impl ExecEnvs {
    /// Takes one ring-buffer record.
    pub fn take(&self, bytes: &[u8]) {
        if bytes.len() < std::mem::size_of::<ExecEnvVar>() {
            return;
        }
        // SAFETY: the kernel wrote a whole `ExecEnvVar` (checked above);
        // any bit pattern is a valid one.
        let var: ExecEnvVar = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let mut captures = self.captures.lock();
        if var.index == EXEC_ENV_END {
            let Some((mut capture, next)) = captures.partial.remove(&var.tgid) else {
                if var.len == 0 {
                    captures.insert(
                        var.tgid,
                        Capture {
                            exec_boot_ns: var.exec_boot_ns,
                            block: Vec::new(),
                            complete: var.truncated == 0,
                        },
                    );
                }
                return;
            };
            capture.complete &= var.truncated == 0 && next == var.len;
            captures.insert(var.tgid, capture);
            return;
        }
        let entry = captures.partial.entry(var.tgid).or_default();
        if var.index == 0 || entry.0.exec_boot_ns != var.exec_boot_ns {
            *entry = (
                Capture {
                    exec_boot_ns: var.exec_boot_ns,
                    block: Vec::new(),
                    complete: true,
                },
                0,
            );
        }
        let (capture, next) = entry;
        // A record lost in between (a full ring) makes it incomplete.
        capture.complete &= var.index == *next && var.truncated == 0;
        *next = var.index.saturating_add(1);
        let len = usize::from(var.len).min(EXEC_ENV_VALUE);
        // A variable cut short is left out: a prefix of a branch name
        // could match a pattern the whole name does not.
        if var.truncated != 0 {
            return;
        }
        if capture.block.len() + len < MAX_BYTES {
            capture.block.extend_from_slice(&var.data[..len]);
            capture.block.push(0);
        } else {
            capture.complete = false;
        }
        if captures.partial.len() > MAX_CAPTURES {
            captures.partial.clear();
        }
    }

    /// The capture of `pid`, if it was exec'd after `started_boot_ns` (the
    /// process's own start: pid reuse cannot lend another's).
    pub fn of(&self, pid: u32, started_boot_ns: u64) -> Option<Capture> {
        let captures = self.captures.lock();
        captures
            .done
            .get(&pid)
            .filter(|c| c.exec_boot_ns >= started_boot_ns)
            .cloned()
    }

    /// Captures kept.
    pub fn captured(&self) -> usize {
        self.captures.lock().done.len()
    }
}

impl Captures {
    fn insert(&mut self, pid: u32, capture: Capture) {
        if self.done.insert(pid, capture).is_none() {
            self.order.push_back(pid);
        }
        while self.order.len() > MAX_CAPTURES {
            if let Some(oldest) = self.order.pop_front() {
                self.done.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tgid: u32, index: u16, text: &str, truncated: u32) -> Vec<u8> {
        let mut var = ExecEnvVar {
            tgid,
            index,
            len: text.len() as u16,
            exec_boot_ns: 1_000,
            truncated,
            _pad: 0,
            data: [0; EXEC_ENV_VALUE],
        };
        var.data[..text.len()].copy_from_slice(text.as_bytes());
        // SAFETY: a plain `repr(C)` value, read as its bytes.
        unsafe {
            std::slice::from_raw_parts(
                (&raw const var).cast::<u8>(),
                std::mem::size_of::<ExecEnvVar>(),
            )
        }
        .to_vec()
    }

    fn end(tgid: u32, count: u16, truncated: u32) -> Vec<u8> {
        let mut bytes = record(tgid, EXEC_ENV_END, "", truncated);
        bytes[6..8].copy_from_slice(&count.to_ne_bytes());
        bytes
    }

    #[test]
    fn a_capture_is_kept_whole_and_only_for_its_own_process() {
        let envs = ExecEnvs::default();
        envs.take(&record(7, 0, "CI_COMMIT_REF_NAME=feature", 0));
        envs.take(&record(7, 1, "CI_PROJECT_PATH=group/app", 0));
        assert!(envs.of(7, 0).is_none(), "not before its end");
        envs.take(&end(7, 2, 0));
        let capture = envs.of(7, 500).unwrap();
        assert!(capture.complete);
        assert_eq!(
            capture.block,
            b"CI_COMMIT_REF_NAME=feature\0CI_PROJECT_PATH=group/app\0"
        );
        // A process that started after the exec has the pid, not the capture.
        assert!(envs.of(7, 2_000).is_none());
    }

    #[test]
    fn a_variable_cut_short_is_left_out() {
        let envs = ExecEnvs::default();
        envs.take(&record(6, 0, "CI_COMMIT_REF_NAME=release/a", 1));
        envs.take(&record(6, 1, "CI_PROJECT_PATH=group/app", 0));
        envs.take(&end(6, 2, 0));
        let capture = envs.of(6, 0).unwrap();
        assert!(!capture.complete);
        assert_eq!(capture.block, b"CI_PROJECT_PATH=group/app\0");
    }

    #[test]
    fn a_gap_or_a_cut_makes_a_capture_incomplete() {
        let envs = ExecEnvs::default();
        envs.take(&record(8, 0, "A=1", 0));
        envs.take(&record(8, 2, "C=3", 0));
        envs.take(&end(8, 3, 0));
        assert!(!envs.of(8, 0).unwrap().complete);
        envs.take(&record(9, 0, "A=1", 0));
        envs.take(&end(9, 1, 1));
        assert!(!envs.of(9, 0).unwrap().complete);
        assert_eq!(envs.captured(), 2);
    }
}
