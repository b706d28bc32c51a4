//! Interception: the kernel programs that redirect connects, and the lookup
//! that tells the agent, on accept, where a connection was going and who
//! opened it.
mod ebpf;
pub mod jobs;
mod peer;
pub mod preflight;

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd},
};

pub use ebpf::{AttachOptions, Interceptor, detach_pins, pinned_links};

use interlock_common::ConnRecord;

use crate::{
    addr::{ClientAddr, OrigDstAddr, ip_from_kernel},
    workload::KernelIdentity,
};

/// What interception knows about an accepted connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intercepted {
    pub orig_dst: OrigDstAddr,
    pub kernel: KernelIdentity,
}

impl From<&ConnRecord> for Intercepted {
    fn from(record: &ConnRecord) -> Self {
        let comm_len = record
            .comm
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(record.comm.len());
        Self {
            orig_dst: OrigDstAddr(std::net::SocketAddr::new(
                ip_from_kernel(record.orig_addr),
                record.orig_port,
            )),
            kernel: KernelIdentity {
                tgid: record.tgid,
                uid: record.uid,
                gid: record.gid,
                cgroup_id: record.cgroup_id,
                netns_cookie: record.netns_cookie,
                comm: String::from_utf8_lossy(&record.comm[..comm_len]).into_owned(),
                connect_boot_ns: record.connect_boot_ns,
            },
        }
    }
}

/// Why an accepted connection was not admitted: each is reset and logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unadmitted {
    #[error("no interception record for this client")]
    NoRecord,
    #[error("the interception record for this address belongs to another socket")]
    OtherSocket,
    #[error("the client's socket is gone")]
    ClientGone,
    #[error("the interception record comes from another network namespace")]
    OtherNamespace,
    #[error("the interception record is {0} s old")]
    Expired(u64),
    #[error("cannot look up the client's socket: {0}")]
    Lookup(String),
}

/// The kernel side of interception, as the proxy uses it. Backed by the
/// eBPF maps in production and by [`OrigDstTable`] in tests.
pub trait Interception: Send + Sync + 'static {
    /// "Where was this connection going, and who opened it?", answered only
    /// with the record of the very socket on the other end of `client`,
    /// and only once: the record is consumed.
    fn admit(&self, client: ClientAddr, listener: SocketAddr) -> Result<Intercepted, Unadmitted>;
    /// Lets one of the agent's own sockets (by cookie) connect to a
    /// protected destination without being redirected.
    fn exempt(&self, cookie: u64) -> io::Result<()>;
    /// Ends [`Interception::exempt`] once the connect is over.
    fn release(&self, cookie: u64);
}

impl Interception for Interceptor {
    fn admit(&self, client: ClientAddr, listener: SocketAddr) -> Result<Intercepted, Unadmitted> {
        self.take_record(client, listener)
            .map(|record| Intercepted::from(&record))
    }

    fn exempt(&self, cookie: u64) -> io::Result<()> {
        self.exempt_socket(cookie)
    }

    fn release(&self, cookie: u64) {
        self.release_socket(cookie)
    }
}

/// A socket's cookie (`SO_COOKIE`): the kernel's number for it, unique
/// until reboot and never reused.
pub fn socket_cookie(socket: &impl AsFd) -> io::Result<u64> {
    socket_option_u64(socket, libc::SO_COOKIE)
}

/// The cookie of the network namespace a socket lives in.
pub fn netns_cookie(socket: &impl AsFd) -> io::Result<u64> {
    socket_option_u64(socket, libc::SO_NETNS_COOKIE)
}

fn socket_option_u64(socket: &impl AsFd, option: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `value` and `len` outlive the call and describe an 8-byte buffer.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// `CLOCK_BOOTTIME` in ns, the clock of a record's `connect_boot_ns`.
pub fn boot_time_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
use {parking_lot::Mutex, std::collections::HashMap};

/// An in-memory [`Interception`] for tests without a kernel.
#[cfg(test)]
#[derive(Default)]
pub struct OrigDstTable(Mutex<HashMap<ClientAddr, Intercepted>>);

#[cfg(test)]
impl OrigDstTable {
    pub fn insert(&self, client: ClientAddr, intercepted: Intercepted) {
        self.0.lock().insert(client, intercepted);
    }
}

#[cfg(test)]
impl Interception for OrigDstTable {
    fn admit(&self, client: ClientAddr, _: SocketAddr) -> Result<Intercepted, Unadmitted> {
        self.0.lock().remove(&client).ok_or(Unadmitted::NoRecord)
    }

    fn exempt(&self, _: u64) -> io::Result<()> {
        Ok(())
    }

    fn release(&self, _: u64) {}
}
