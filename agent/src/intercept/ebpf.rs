//! Loading, attaching and pinning the kernel programs, and their maps.
//!
//! Pins live under `bpffs_dir`: `links/<program>` keep the programs attached
//! while the agent is down (connections to protected targets are then
//! refused, never sent direct), and `maps/<map>` keep the tables, so a
//! restarted agent reuses them and replaces the links without a gap.
use std::{
    collections::HashSet,
    fs, io,
    path::{Path, PathBuf},
};

use parking_lot::Mutex;

use aya::{
    EbpfLoader,
    maps::{
        Array, HashMap, MapData, MapError,
        lpm_trie::{Key, LpmTrie},
    },
    pin::PinError,
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use interlock_common::{
    ConnRecord, MAP_LAYOUT_VERSION, PeerKey, RedirectConfig, TargetKey, TargetValue, maps, programs,
};
use serde::Serialize;

use super::Unadmitted;
use crate::addr::ClientAddr;

/// The kernel object built from `ebpf-programs/` (empty in a stub build).
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interlock-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error(
        "this binary was built without its eBPF programs (bpf-linker was missing); run `cargo xtask setup` and rebuild"
    )]
    NoPrograms,
    #[error("cannot open cgroup {}: {cause}", path.display())]
    Cgroup { path: PathBuf, cause: io::Error },
    #[error("bpffs directory {}: {cause}", path.display())]
    PinDir { path: PathBuf, cause: io::Error },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {cause}")]
    Program {
        name: &'static str,
        cause: ProgramError,
    },
    #[error("pinning {}: {cause}", path.display())]
    Pin { path: PathBuf, cause: PinError },
    #[error("replacing the pinned link {}: {cause}", path.display())]
    Link { path: PathBuf, cause: LinkError },
    #[error("map {name}: {cause}")]
    Map { name: &'static str, cause: MapError },
    #[error("reading the agent's network namespace cookie (SO_NETNS_COOKIE, Linux 5.14+): {0}")]
    Namespace(io::Error),
    #[error("the eBPF object has no map or program named {0}")]
    Missing(&'static str),
}

pub struct AttachOptions {
    pub cgroup_dir: PathBuf,
    pub bpffs_dir: PathBuf,
    pub redirect: RedirectConfig,
    /// `CLOCK_BOOTTIME` before the agent's listeners were bound: records of
    /// earlier connects belong to no connection this agent will accept.
    pub started_boot_ns: u64,
    /// CI runners' executables (base names or paths), for job capture.
    pub ci_runners: Vec<String>,
}

/// A record older than this at accept is not trusted (the agent accepts
/// within milliseconds; only a stalled agent takes seconds).
const MAX_RECORD_AGE_NS: u64 = 60 * 1_000_000_000;

/// The attached programs and the agent's handles on their maps.
pub struct Interceptor {
    cgroup_dir: PathBuf,
    bpffs_dir: PathBuf,
    links: Mutex<Vec<PinnedLink>>,
    protected: Mutex<LpmTrie<MapData, TargetKey, TargetValue>>,
    by_peer: Mutex<HashMap<MapData, PeerKey, ConnRecord>>,
    agent_sockets: Mutex<HashMap<MapData, u64, u8>>,
    /// The agent's network namespace: the only one its listeners serve.
    netns_cookie: u64,
    /// The CI-job tracepoints, when they could attach.
    jobs: Mutex<Option<super::jobs::JobTracing>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct InterceptStatus {
    pub cgroup: PathBuf,
    pub bpffs_dir: PathBuf,
    pub programs: Vec<&'static str>,
    pub pinned_links: Vec<PathBuf>,
    pub protected_entries: usize,
    /// Redirected connects not taken yet (none: the table is unreadable).
    pub pending_redirects: Option<usize>,
    /// The CI-job tracepoints are attached: jobs are read from what their
    /// runner passed at exec.
    pub ci_job_capture: bool,
}

fn links_dir(bpffs_dir: &Path) -> PathBuf {
    bpffs_dir.join("links")
}

fn maps_root(bpffs_dir: &Path) -> PathBuf {
    bpffs_dir.join("maps")
}

/// `maps/v<layout>`: see [`MAP_LAYOUT_VERSION`].
fn maps_dir(bpffs_dir: &Path) -> PathBuf {
    maps_root(bpffs_dir).join(format!("v{MAP_LAYOUT_VERSION}"))
}

const MAP_NAMES: [&str; 6] = [
    maps::PROTECTED,
    maps::CONFIG,
    maps::BY_COOKIE,
    maps::BY_PEER,
    maps::ORIG_BY_LOCAL,
    maps::AGENT_SOCKETS,
];

impl Interceptor {
    /// Loads the programs, attaches them to the cgroup and pins them,
    /// taking over (and then releasing) the links a previous agent pinned.
    pub fn attach(options: AttachOptions) -> Result<Self, InterceptError> {
        if EBPF_OBJECT.is_empty() {
            return Err(InterceptError::NoPrograms);
        }
        let AttachOptions {
            cgroup_dir,
            bpffs_dir,
            redirect,
            started_boot_ns,
            ci_runners,
        } = options;
        let (links_dir, maps_dir) = (links_dir(&bpffs_dir), maps_dir(&bpffs_dir));
        for dir in [&links_dir, &maps_dir] {
            fs::create_dir_all(dir).map_err(|cause| InterceptError::PinDir {
                path: dir.clone(),
                cause,
            })?;
        }

        let map_pins: Vec<(&str, PathBuf)> = MAP_NAMES
            .iter()
            .map(|name| (*name, maps_dir.join(name)))
            .collect();
        let offsets = super::jobs::offsets();
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_pins {
            loader.map_pin_path(name, path.as_path());
        }
        if let Ok(offsets) = &offsets {
            super::jobs::set_offsets(&mut loader, offsets);
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;

        let take = |ebpf: &mut aya::Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(InterceptError::Missing(name))
        };
        let map_err = |name: &'static str| move |cause| InterceptError::Map { name, cause };
        // Configure before attaching: the programs do nothing until enabled.
        let mut config: Array<MapData, RedirectConfig> =
            Array::try_from(take(&mut ebpf, maps::CONFIG)?).map_err(map_err(maps::CONFIG))?;
        config.set(0, redirect, 0).map_err(map_err(maps::CONFIG))?;
        let protected = LpmTrie::try_from(take(&mut ebpf, maps::PROTECTED)?)
            .map_err(map_err(maps::PROTECTED))?;
        let mut by_peer =
            HashMap::try_from(take(&mut ebpf, maps::BY_PEER)?).map_err(map_err(maps::BY_PEER))?;
        let mut agent_sockets = HashMap::try_from(take(&mut ebpf, maps::AGENT_SOCKETS)?)
            .map_err(map_err(maps::AGENT_SOCKETS))?;
        // Pinned maps outlive an agent: what an earlier one left is
        // accounted for by nobody now.
        let stale = clear_stale(&mut by_peer, &mut agent_sockets, started_boot_ns);
        if stale > 0 {
            tracing::info!(
                records = stale,
                "cleared interception records of an earlier agent"
            );
        }
        let netns_cookie = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|socket| super::netns_cookie(&socket))
            .map_err(InterceptError::Namespace)?;

        let links = attach_programs(&mut ebpf, &cgroup_dir, &links_dir)?;
        // Job capture is best effort: without it, a job's context is read
        // from /proc (and says so).
        let jobs = offsets
            .map_err(|e| e.to_string())
            .and_then(|_| super::jobs::attach(&mut ebpf, &ci_runners));
        let jobs = match jobs {
            Ok(jobs) => Some(jobs),
            Err(error) => {
                tracing::warn!(%error, "CI job capture at exec is off; job context is read from /proc");
                None
            }
        };

        remove_stale_map_layouts(&bpffs_dir);
        Ok(Self {
            cgroup_dir,
            bpffs_dir,
            links: Mutex::new(links),
            protected: Mutex::new(protected),
            by_peer: Mutex::new(by_peer),
            agent_sockets: Mutex::new(agent_sockets),
            netns_cookie,
            jobs: Mutex::new(jobs),
        })
    }

    /// The ring job roots' environments come through (once).
    pub fn take_exec_ring(&self) -> Option<aya::maps::RingBuf<MapData>> {
        self.jobs.lock().as_mut()?.ring.take()
    }

    /// Whether the CI-job tracepoints are attached.
    pub fn captures_jobs(&self) -> bool {
        self.jobs.lock().is_some()
    }

    /// Makes the kernel's protected set exactly `keys`: new entries first,
    /// then stale ones, so a destination in both sets is never unprotected.
    pub fn set_targets(&self, keys: &[(u32, TargetKey)]) -> Result<(), InterceptError> {
        let map_err = |cause| InterceptError::Map {
            name: maps::PROTECTED,
            cause,
        };
        let mut trie = self.protected.lock();
        let wanted: HashSet<(u32, [u8; 2], [u8; 16])> =
            keys.iter().map(|(p, k)| (*p, k.port, k.addr)).collect();
        for (prefix, key) in keys {
            trie.insert(&Key::new(*prefix, *key), TargetValue { flags: 0 }, 0)
                .map_err(map_err)?;
        }
        let stale: Vec<Key<TargetKey>> = trie
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(&(k.prefix_len(), k.data().port, k.data().addr)))
            .collect();
        for key in stale {
            trie.remove(&key).map_err(map_err)?;
        }
        Ok(())
    }

    /// Takes (reads and deletes) the kernel's record for an accepted client,
    /// and returns it only if it is the record of the client socket on the
    /// other end, made in this network namespace, recently.
    pub fn take_record(
        &self,
        client: ClientAddr,
        listener: std::net::SocketAddr,
    ) -> Result<ConnRecord, Unadmitted> {
        let key = client.peer_key();
        let record = {
            let mut by_peer = self.by_peer.lock();
            let record = by_peer.get(&key, 0).map_err(|_| Unadmitted::NoRecord)?;
            // Taken whatever follows: a record that does not match the socket
            // on this address now belongs to a socket that is gone.
            let _ = by_peer.remove(&key);
            record
        };
        let cookie = super::peer::client_cookie(client.0, listener)
            .map_err(|error| Unadmitted::Lookup(error.to_string()))?
            .ok_or(Unadmitted::ClientGone)?;
        check_record(&record, cookie, self.netns_cookie, super::boot_time_ns())?;
        Ok(record)
    }

    /// See [`super::Interception::exempt`].
    pub fn exempt_socket(&self, cookie: u64) -> io::Result<()> {
        self.agent_sockets
            .lock()
            .insert(cookie, 1, 0)
            .map_err(|error| io::Error::other(error.to_string()))
    }

    pub fn release_socket(&self, cookie: u64) {
        let _ = self.agent_sockets.lock().remove(&cookie);
    }

    pub fn status(&self) -> InterceptStatus {
        let protected_entries = self.protected.lock().keys().count();
        InterceptStatus {
            cgroup: self.cgroup_dir.clone(),
            bpffs_dir: self.bpffs_dir.clone(),
            programs: programs::ALL.to_vec(),
            pinned_links: programs::ALL
                .iter()
                .map(|p| links_dir(&self.bpffs_dir).join(p))
                .collect(),
            protected_entries,
            pending_redirects: self.pending_redirects(),
            ci_job_capture: self.captures_jobs(),
        }
    }

    /// Redirected connects not taken by the agent yet (the connection
    /// table `BY_PEER`, of `CONN_TABLE_ENTRIES`), counted on a handle of
    /// its own from the pin, so admissions never wait for the count.
    /// Near zero while the agent keeps up.
    pub fn pending_redirects(&self) -> Option<usize> {
        let pin = maps_dir(&self.bpffs_dir).join(maps::BY_PEER);
        let map = aya::maps::Map::from_map_data(MapData::from_pin(pin).ok()?).ok()?;
        let table: HashMap<MapData, PeerKey, ConnRecord> = HashMap::try_from(map).ok()?;
        Some(table.keys().filter(Result::is_ok).count())
    }

    /// Detaches everything: unpins links (the kernel detaches them once the
    /// last reference goes) and removes the map pins.
    pub fn detach(&self) -> io::Result<()> {
        let links = std::mem::take(&mut *self.links.lock());
        for link in links {
            drop(link.unpin()?);
        }
        detach_pins(&self.bpffs_dir)
    }
}

/// Whether `record` is the record of the client socket with `cookie`, made
/// in the agent's namespace no more than [`MAX_RECORD_AGE_NS`] ago.
fn check_record(
    record: &ConnRecord,
    cookie: u64,
    netns_cookie: u64,
    now_boot_ns: u64,
) -> Result<(), Unadmitted> {
    if record.cookie != cookie {
        return Err(Unadmitted::OtherSocket);
    }
    if record.netns_cookie != netns_cookie {
        return Err(Unadmitted::OtherNamespace);
    }
    let age = now_boot_ns.saturating_sub(record.connect_boot_ns);
    if age > MAX_RECORD_AGE_NS {
        return Err(Unadmitted::Expired(age / 1_000_000_000));
    }
    Ok(())
}

/// Deletes peer records made before `started_boot_ns` and every exemption
/// (the sockets it named belonged to an agent that is gone); returns how
/// many there were.
fn clear_stale(
    by_peer: &mut HashMap<MapData, PeerKey, ConnRecord>,
    agent_sockets: &mut HashMap<MapData, u64, u8>,
    started_boot_ns: u64,
) -> usize {
    let stale: Vec<PeerKey> = by_peer
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, record)| record.connect_boot_ns < started_boot_ns)
        .map(|(key, _)| key)
        .collect();
    let exemptions: Vec<u64> = agent_sockets.keys().filter_map(Result::ok).collect();
    for key in &stale {
        let _ = by_peer.remove(key);
    }
    for cookie in &exemptions {
        let _ = agent_sockets.remove(cookie);
    }
    stale.len() + exemptions.len()
}

/// Attaches every program to the cgroup and pins its link, releasing the
/// previous agent's link of the same program only once the new one is
/// live (no moment without interception).
fn attach_programs(
    ebpf: &mut aya::Ebpf,
    cgroup_dir: &Path,
    links_dir: &Path,
) -> Result<Vec<PinnedLink>, InterceptError> {
    let cgroup = fs::File::open(cgroup_dir).map_err(|cause| InterceptError::Cgroup {
        path: cgroup_dir.to_owned(),
        cause,
    })?;
    let mut links = Vec::new();
    for name in programs::ALL {
        let program = ebpf
            .program_mut(name)
            .ok_or(InterceptError::Missing(name))?;
        let prog_err = |cause| InterceptError::Program { name, cause };
        let link_err = |cause| InterceptError::Link {
            path: links_dir.join(name),
            cause,
        };
        // The two program types share no trait for load/attach/take_link.
        // Links are created with BPF_LINK_CREATE, which always stacks
        // cgroup programs (`Single` is the mode aya accepts for it).
        macro_rules! attach_as {
            ($program_type:ty) => {{
                let prog: &mut $program_type = program.try_into().map_err(prog_err)?;
                prog.load().map_err(prog_err)?;
                let id = prog
                    .attach(&cgroup, CgroupAttachMode::Single)
                    .map_err(prog_err)?;
                FdLink::try_from(prog.take_link(id).map_err(prog_err)?).map_err(link_err)?
            }};
        }
        let link = if name == programs::SOCKOPS {
            attach_as!(SockOps)
        } else {
            attach_as!(CgroupSockAddr)
        };
        // The new link is live; only now release the previous agent's.
        let pin = links_dir.join(name);
        release_pinned_link(&pin)?;
        links.push(
            link.pin(&pin)
                .map_err(|cause| InterceptError::Pin { path: pin, cause })?,
        );
    }
    Ok(links)
}

/// Releases a link pinned by an earlier agent, if any.
fn release_pinned_link(pin: &Path) -> Result<(), InterceptError> {
    if !pin.exists() {
        return Ok(());
    }
    let old = PinnedLink::from_pin(pin).map_err(|cause| InterceptError::Link {
        path: pin.to_owned(),
        cause,
    })?;
    old.unpin().map_err(|cause| InterceptError::PinDir {
        path: pin.to_owned(),
        cause,
    })?;
    Ok(())
}

/// Removes every pin under `bpffs_dir` (links first, so programs detach),
/// for `interlock detach` with the agent stopped. Missing pins are fine.
pub fn detach_pins(bpffs_dir: &Path) -> io::Result<()> {
    for dir in [
        links_dir(bpffs_dir),
        maps_root(bpffs_dir),
        bpffs_dir.to_owned(),
    ] {
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Removes maps pinned with another layout version: their programs were
/// just released, nothing uses them any more.
fn remove_stale_map_layouts(bpffs_dir: &Path) {
    let current = maps_dir(bpffs_dir);
    let Ok(entries) = fs::read_dir(maps_root(bpffs_dir)) else {
        return;
    };
    for stale in entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| *p != current)
    {
        if let Err(error) = fs::remove_dir_all(&stale) {
            tracing::warn!(path = %stale.display(), %error, "cannot remove stale map pins");
        }
    }
}

/// Whether pinned links exist (the agent has attached and not detached).
pub fn pinned_links(bpffs_dir: &Path) -> Vec<PathBuf> {
    programs::ALL
        .iter()
        .map(|p| links_dir(bpffs_dir).join(p))
        .filter(|p| p.exists())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(cookie: u64, netns_cookie: u64, connect_boot_ns: u64) -> ConnRecord {
        ConnRecord {
            cookie,
            orig_addr: [0; 16],
            orig_port: 5432,
            orig_family: interlock_common::AF_INET,
            tgid: 1,
            uid: 0,
            gid: 0,
            cgroup_id: 1,
            netns_cookie,
            connect_boot_ns,
            comm: [0; 16],
        }
    }

    #[test]
    fn a_record_admits_only_its_own_socket_in_its_namespace_while_fresh() {
        let now = 100 * 1_000_000_000;
        assert_eq!(check_record(&record(7, 1, now - 5), 7, 1, now), Ok(()));
        assert_eq!(
            check_record(&record(7, 1, now), 8, 1, now),
            Err(Unadmitted::OtherSocket)
        );
        assert_eq!(
            check_record(&record(7, 2, now), 7, 1, now),
            Err(Unadmitted::OtherNamespace)
        );
        assert_eq!(
            check_record(&record(7, 1, now - MAX_RECORD_AGE_NS - 1), 7, 1, now),
            Err(Unadmitted::Expired(60))
        );
    }
}
