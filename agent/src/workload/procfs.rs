//! Reading a process from `/proc`, guarded against pid reuse.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// The fields of `/proc/PID/stat` the resolver needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    pub ppid: u32,
    /// Start time in clock ticks since boot (CLOCK_BOOTTIME based).
    pub start_ticks: u64,
}

impl ProcStat {
    /// Parses `/proc/PID/stat`. The command name may hold spaces and
    /// parentheses, so fields are counted after the last `)`.
    pub fn parse(text: &str) -> Option<Self> {
        let rest = &text[text.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // fields[0] is field 3 (state); ppid is field 4, starttime field 22.
        Some(Self {
            ppid: fields.get(1)?.parse().ok()?,
            start_ticks: fields.get(19)?.parse().ok()?,
        })
    }

    pub fn start_boot_ns(&self) -> u64 {
        self.start_ticks
            .saturating_mul(1_000_000_000 / clock_ticks_per_second())
    }
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// What `/proc` says about one live process.
#[derive(Clone, Debug, Default)]
pub struct ProcessSnapshot {
    pub exe: Option<PathBuf>,
    pub cmdline: Vec<String>,
    /// cgroup v2 path from `/proc/PID/cgroup` (`0::/path`).
    pub cgroup: Option<String>,
    /// Supplementary group ids from `/proc/PID/status`.
    pub groups: Vec<u32>,
    pub ppid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("process has exited")]
    Gone,
    #[error("pid was reused by a process started after the connect")]
    Reused,
    #[error("reading /proc: {0}")]
    Io(#[from] io::Error),
}

pub struct Proc<'a> {
    root: &'a Path,
    pid: u32,
}

impl<'a> Proc<'a> {
    pub fn new(root: &'a Path, pid: u32) -> Self {
        Self { root, pid }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.root.join(self.pid.to_string()).join(file)
    }

    pub fn stat(&self) -> Result<ProcStat, SnapshotError> {
        let text = fs::read_to_string(self.path("stat")).map_err(gone)?;
        ProcStat::parse(&text)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed stat").into())
    }

    /// The environment of the program it runs (`/proc/PID/environ`), its
    /// first MiB: a caller's environment is its own to make large.
    pub fn environ(&self) -> io::Result<Vec<u8>> {
        use io::Read;
        let mut environ = Vec::new();
        fs::File::open(self.path("environ"))?
            .take(1 << 20)
            .read_to_end(&mut environ)?;
        Ok(environ)
    }

    pub fn exe(&self) -> Option<PathBuf> {
        fs::read_link(self.path("exe")).ok()
    }

    /// Opens the executable itself (works even if the file was deleted or
    /// replaced since the process started).
    pub fn open_exe(&self) -> io::Result<fs::File> {
        fs::File::open(self.path("exe"))
    }

    /// Reads the process if, and only if, it is the process that connected
    /// at `connect_boot_ns`: its start time must not be later than the
    /// connect, and must be the same before and after reading (else the pid
    /// was recycled while we read).
    pub fn snapshot(&self, connect_boot_ns: Option<u64>) -> Result<ProcessSnapshot, SnapshotError> {
        let before = self.stat()?;
        // /proc reports whole clock ticks, so allow one tick of rounding.
        let tick_ns = 1_000_000_000 / clock_ticks_per_second();
        if connect_boot_ns.is_some_and(|at| before.start_boot_ns() > at.saturating_add(tick_ns)) {
            return Err(SnapshotError::Reused);
        }
        let cmdline = fs::read(self.path("cmdline")).map_err(gone)?;
        let cgroup = fs::read_to_string(self.path("cgroup")).map_err(gone)?;
        let status = fs::read_to_string(self.path("status")).map_err(gone)?;
        let snapshot = ProcessSnapshot {
            exe: self.exe(),
            cmdline: cmdline
                .split(|b| *b == 0)
                .filter(|arg| !arg.is_empty())
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect(),
            cgroup: cgroup
                .lines()
                .find_map(|line| line.strip_prefix("0::"))
                .map(str::to_owned),
            groups: status
                .lines()
                .find_map(|line| line.strip_prefix("Groups:"))
                .map(|ids| {
                    ids.split_whitespace()
                        .filter_map(|g| g.parse().ok())
                        .collect()
                })
                .unwrap_or_default(),
            ppid: before.ppid,
        };
        if self.stat()? != before {
            return Err(SnapshotError::Reused);
        }
        Ok(snapshot)
    }
}

fn gone(e: io::Error) -> SnapshotError {
    // ESRCH shows up when the task exits between open and read.
    if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) {
        SnapshotError::Gone
    } else {
        SnapshotError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_odd_comm() {
        let text = "1234 (a) b (c)) S 77 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 100 18446744073709551615";
        let stat = ProcStat::parse(text).unwrap();
        assert_eq!(stat.ppid, 77);
        assert_eq!(stat.start_ticks, 98765);
        assert!(ProcStat::parse("garbage").is_none());
    }

    #[test]
    fn own_process_is_readable_and_not_reused() {
        let pid = std::process::id();
        let proc = Proc::new(Path::new("/proc"), pid);
        let snap = proc.snapshot(Some(u64::MAX / 2)).unwrap();
        assert!(snap.exe.is_some());
        assert!(!snap.cmdline.is_empty());
        // A connect "before boot" cannot have been made by this process.
        assert!(matches!(proc.snapshot(Some(0)), Err(SnapshotError::Reused)));
    }
}
