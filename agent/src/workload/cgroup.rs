//! cgroup v2: where it is mounted, id → path, and what a path says about
//! the workload (systemd unit, container).
use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use parking_lot::Mutex;

/// The cgroup v2 hierarchy of this host.
#[derive(Debug)]
pub struct CgroupFs {
    root: PathBuf,
    /// cgroup id → path, for processes that exited before we looked.
    by_id: Mutex<HashMap<u64, String>>,
}

impl CgroupFs {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            by_id: Mutex::new(HashMap::new()),
        }
    }

    /// Finds the cgroup2 mount in `/proc/self/mountinfo` (it is
    /// `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid).
    pub fn discover() -> Option<Self> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
        Self::mount_point(&mountinfo).map(Self::new)
    }

    pub fn mount_point(mountinfo: &str) -> Option<PathBuf> {
        mountinfo.lines().find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            (fstype == "cgroup2")
                .then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap_or("/")))
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The filesystem directory of a cgroup path such as `/system.slice`.
    pub fn dir(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// The cgroup id (inode number) of a cgroup path.
    pub fn id_of(&self, path: &str) -> Option<u64> {
        fs::metadata(self.dir(path)).ok().map(|m| m.ino())
    }

    /// The path of a cgroup id: `hint` (from /proc) when it still has that
    /// id, otherwise a walk of the hierarchy, cached.
    pub fn path_of(&self, id: u64, hint: Option<&str>) -> Option<String> {
        if let Some(hint) = hint
            && self.id_of(hint) == Some(id)
        {
            return Some(hint.to_owned());
        }
        if let Some(path) = self.by_id.lock().get(&id) {
            return Some(path.clone());
        }
        let path = self.walk_for(id)?;
        let mut cache = self.by_id.lock();
        if cache.len() > 4096 {
            cache.clear();
        }
        cache.insert(id, path.clone());
        Some(path)
    }

    fn walk_for(&self, id: u64) -> Option<String> {
        let mut stack = vec![self.root.clone()];
        let mut visited = 0;
        while let Some(dir) = stack.pop() {
            visited += 1;
            if visited > 100_000 {
                return None;
            }
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            if meta.ino() == id {
                let rel = dir.strip_prefix(&self.root).ok()?;
                return Some(format!("/{}", rel.display()));
            }
            if let Ok(entries) = fs::read_dir(&dir) {
                stack.extend(
                    entries
                        .filter_map(Result::ok)
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
        None
    }
}

/// The innermost systemd unit named by a cgroup path:
/// `/system.slice/gitlab-runner.service` → `gitlab-runner.service`.
pub fn systemd_unit(path: &str) -> Option<String> {
    path.rsplit('/')
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(str::to_owned)
}

/// The container id in docker, containerd, CRI-O, podman and kubepods paths:
/// `/docker/<id>`, `/system.slice/docker-<id>.scope`,
/// `.../cri-containerd-<id>.scope`, `.../crio-<id>.scope`,
/// `/machine.slice/libpod-<id>.scope`, `/kubepods/burstable/pod<uid>/<id>`.
pub fn container_id(path: &str) -> Option<String> {
    const PREFIXES: [&str; 5] = [
        "docker-",
        "cri-containerd-",
        "crio-",
        "libpod-",
        "containerd-",
    ];
    let runtime_path = ["docker", "containerd", "crio", "libpod", "kubepods"]
        .iter()
        .any(|r| path.contains(r));
    if !runtime_path {
        return None;
    }
    path.rsplit('/').find_map(|component| {
        let name = component.strip_suffix(".scope").unwrap_or(component);
        let id = PREFIXES
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .unwrap_or(name);
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn units_from_paths() {
        let cases = [
            (
                "/system.slice/gitlab-runner.service",
                Some("gitlab-runner.service"),
            ),
            (
                "/user.slice/user-1000.slice/session-3.scope",
                Some("session-3.scope"),
            ),
            ("/system.slice/ci.service/job-7", Some("ci.service")),
            ("/", None),
            ("/interlock-test/foo", None),
        ];
        for (path, unit) in cases {
            assert_eq!(systemd_unit(path).as_deref(), unit, "{path}");
        }
    }

    #[test]
    fn containers_from_paths() {
        let cases = [
            format!("/docker/{ID}"),
            format!("/system.slice/docker-{ID}.scope"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-pod1.slice/cri-containerd-{ID}.scope"
            ),
            format!("/kubepods/burstable/pod0000/{ID}"),
            format!("/machine.slice/libpod-{ID}.scope"),
            format!("/kubepods.slice/crio-{ID}.scope"),
        ];
        for path in cases {
            assert_eq!(container_id(&path).as_deref(), Some(ID), "{path}");
        }
        assert_eq!(container_id(&format!("/system.slice/{ID}")), None);
        assert_eq!(container_id("/docker/short"), None);
    }

    #[test]
    fn finds_cgroup2_mount() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            CgroupFs::mount_point(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            CgroupFs::mount_point("1 0 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }
}
