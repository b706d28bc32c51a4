//! Types shared by the kernel programs (`ebpf-programs/`) and the agent.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding, so both
//! sides agree on the layout byte for byte. Addresses are always 16 bytes:
//! IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`), which lets one LPM trie and
//! one peer table serve both families, and makes `connect6` to an
//! IPv4-mapped destination match the same target as `connect4`.
#![no_std]

/// Names of the maps, as the kernel object declares them.
pub mod maps {
    /// Hash `[u8; RUNNER_NAME_LEN]` (a runner's comm: its executable's
    /// base name cut at 15 bytes, zero-padded) -> u8, written by the agent.
    pub const RUNNER_NAMES: &str = "INTERLOCK_RUNNER_NAMES";
    /// LRU hash `tgid -> u8`: running CI runners (by exec, or found by
    /// the agent at start).
    pub const RUNNERS: &str = "INTERLOCK_RUNNERS";
    /// LRU hash `pid -> u8`: processes a runner forked, until their first
    /// exec.
    pub const JOB_ROOTS: &str = "INTERLOCK_JOB_ROOTS";
    /// Ring buffer of `ExecEnvVar`: each job root's environment as its
    /// runner passed it to `execve`.
    pub const EXEC_ENV: &str = "INTERLOCK_EXEC_ENV";
    /// LPM trie `TargetKey -> TargetValue`: the protected destinations.
    pub const PROTECTED: &str = "INTERLOCK_PROTECTED";
    /// Array with one `RedirectConfig`.
    pub const CONFIG: &str = "INTERLOCK_CONFIG";
    /// LRU hash `socket cookie -> ConnRecord`, written by `connect4/6`.
    pub const BY_COOKIE: &str = "INTERLOCK_BY_COOKIE";
    /// LRU hash `PeerKey -> ConnRecord`, written by `sockops`, read (and
    /// deleted) by the agent on accept.
    pub const BY_PEER: &str = "INTERLOCK_BY_PEER";
    /// LRU hash `PeerKey -> OrigDst`: where each redirected socket was
    /// going, by its local `(address, port)`. `getpeername` on an MPTCP
    /// socket finds it here (its cookie is not its TCP subflow's).
    pub const ORIG_BY_LOCAL: &str = "INTERLOCK_ORIG_BY_LOCAL";
    /// LRU hash `socket cookie -> u8`: the agent's own upstream sockets,
    /// registered by the agent between `socket()` and `connect()`.
    pub const AGENT_SOCKETS: &str = "INTERLOCK_AGENT_SOCKETS";
}

/// Names of the programs, as the kernel object declares them.
pub mod programs {
    /// Tracepoints (not pinned: they capture only while the agent runs).
    pub const RUNNER_EXEC: &str = "interlock_runner_exec";
    pub const RUNNER_FORK: &str = "interlock_runner_fork";
    pub const JOB_EXEC: &str = "interlock_job_exec";
    pub const CONNECT4: &str = "interlock_connect4";
    pub const CONNECT6: &str = "interlock_connect6";
    pub const GETPEERNAME4: &str = "interlock_getpeername4";
    pub const GETPEERNAME6: &str = "interlock_getpeername6";
    pub const SOCKOPS: &str = "interlock_sockops";
    pub const ALL: [&str; 5] = [CONNECT4, CONNECT6, GETPEERNAME4, GETPEERNAME6, SOCKOPS];
}

/// Version of the map layouts below. Maps are pinned under a directory
/// named after it, so an agent whose layouts differ never reuses (and
/// misreads) maps pinned by another; bump it with any layout change.
pub const MAP_LAYOUT_VERSION: u32 = 2;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Bits of `TargetKey` taken by the port; an LPM prefix length is
/// `PORT_PREFIX_BITS + address prefix bits` (IPv4 prefixes add 96 for the
/// `::ffff:0:0/96` mapping).
pub const PORT_PREFIX_BITS: u32 = 16;
pub const IPV4_MAPPED_PREFIX_BITS: u32 = 96;

/// Entries in the connection tables; sized for bursts of connects that the
/// agent has not yet accepted (LRU, so a stall can never wedge the kernel).
pub const CONN_TABLE_ENTRIES: u32 = 65_536;
/// Protected `address:port` entries (exact addresses and CIDRs).
pub const PROTECTED_ENTRIES: u32 = 16_384;
/// The agent's upstream sockets between `socket()` and the end of
/// `connect()`: one per connect in flight.
pub const AGENT_SOCKET_ENTRIES: u32 = 4_096;

/// Runner names compared, and the longest name.
pub const RUNNER_NAME_ENTRIES: u32 = 32;
pub const RUNNER_NAME_LEN: usize = 16;
pub const RUNNER_ENTRIES: u32 = 1_024;
pub const JOB_ROOT_ENTRIES: u32 = 8_192;
/// Variables captured per exec, and bytes per variable (`KEY=VALUE`).
pub const EXEC_ENV_VARS: u32 = 512;
pub const EXEC_ENV_VALUE: usize = 480;
/// `ExecEnvVar::index` of the record that ends a capture (`len`: the
/// variables sent, `truncated` set when there were more).
pub const EXEC_ENV_END: u16 = u16::MAX;

/// One variable of a job root's environment at its first exec.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecEnvVar {
    pub tgid: u32,
    pub index: u16,
    /// Bytes of `data` used (the string read, without its NUL).
    pub len: u16,
    /// `CLOCK_BOOTTIME` at the exec.
    pub exec_boot_ns: u64,
    /// Non-zero when the value did not fit, or (end record) variables were
    /// left out.
    pub truncated: u32,
    pub _pad: u32,
    pub data: [u8; EXEC_ENV_VALUE],
}

/// Returns the IPv4-mapped IPv6 form of an IPv4 address in network order.
pub const fn ipv4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// Whether a 16-byte address is IPv4-mapped.
pub fn is_ipv4_mapped(addr: &[u8; 16]) -> bool {
    addr[..10].iter().all(|b| *b == 0) && addr[10] == 0xff && addr[11] == 0xff
}

/// Key of the protected-destination LPM trie: the port first, so that
/// `prefix_len = 16 + n` means "this port, and the first n address bits".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetKey {
    /// Destination port, big-endian.
    pub port: [u8; 2],
    /// Destination address, IPv6 or IPv4-mapped, network order.
    pub addr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetValue {
    /// Reserved for per-target kernel behaviour; zero today.
    pub flags: u32,
}

/// Where intercepted connections go.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedirectConfig {
    /// The agent's IPv4 listener address (network order).
    pub listener_v4: [u8; 4],
    /// The agent's listener port (host order), the same for both families.
    pub listener_port: u16,
    pub _pad: u16,
    /// The agent's IPv6 listener address (network order).
    pub listener_v6: [u8; 16],
    /// Non-zero once the agent has written the configuration.
    pub enabled: u32,
}

/// The client's end of an intercepted connection, as the agent sees its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// IPv6 or IPv4-mapped address, network order.
    pub addr: [u8; 16],
    /// Port, host order.
    pub port: u16,
    pub _pad: [u8; 2],
}

/// Where a redirected connection was going.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv6 or IPv4-mapped address, network order.
    pub addr: [u8; 16],
    /// Port, host order.
    pub port: u16,
    pub _pad: [u8; 2],
}

/// What the kernel knew at `connect()`: where the connection was going and
/// who asked. This is the workload's identity even if it exits at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnRecord {
    /// Cookie of the client's socket: the agent admits an accepted
    /// connection only if its peer is this very socket, so a record can
    /// never be borrowed by another socket bound to the same address.
    pub cookie: u64,
    /// Original destination address (IPv6 or IPv4-mapped), network order.
    pub orig_addr: [u8; 16],
    /// Original destination port, host order.
    pub orig_port: u16,
    /// Family the client used: `AF_INET` or `AF_INET6`.
    pub orig_family: u16,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    /// `CLOCK_BOOTTIME` at connect, in ns: a process whose start time is later
    /// than this is a reused pid, not the caller.
    pub connect_boot_ns: u64,
    pub comm: [u8; 16],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, and have no implicit
    // padding (every gap is an explicit field).
    unsafe impl aya::Pod for super::TargetKey {}
    unsafe impl aya::Pod for super::TargetValue {}
    unsafe impl aya::Pod for super::RedirectConfig {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::ConnRecord {}
    unsafe impl aya::Pod for super::OrigDst {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<TargetKey>(), 18);
        assert_eq!(size_of::<TargetValue>(), 4);
        assert_eq!(size_of::<RedirectConfig>(), 28);
        assert_eq!(size_of::<PeerKey>(), 20);
        assert_eq!(size_of::<ConnRecord>(), 80);
        assert_eq!(size_of::<OrigDst>(), 20);
    }

    #[test]
    fn ipv4_mapping_roundtrips() {
        let mapped = ipv4_mapped([127, 0, 0, 2]);
        assert!(is_ipv4_mapped(&mapped));
        assert_eq!(&mapped[12..], &[127, 0, 0, 2]);
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        assert!(!is_ipv4_mapped(&v6));
    }
}
