//! Interception: the kernel programs that redirect connects, and the lookup
//! that tells the agent, on accept, where a connection was going and who
//! opened it.
mod ebpf;
pub mod preflight;

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

/// "Where was this connection going, and who opened it?" Backed by the
/// kernel's peer table in production and by [`OrigDstTable`] in tests.
/// The answer is given once: the entry is consumed.
pub trait OrigDst: Send + Sync + 'static {
    fn take(&self, client: ClientAddr) -> Option<Intercepted>;
}

impl OrigDst for Interceptor {
    fn take(&self, client: ClientAddr) -> Option<Intercepted> {
        self.take_record(client)
            .map(|record| Intercepted::from(&record))
    }
}

#[cfg(test)]
use std::{collections::HashMap, sync::Mutex};

/// An in-memory [`OrigDst`] for tests without a kernel.
#[cfg(test)]
#[derive(Default)]
pub struct OrigDstTable(Mutex<HashMap<ClientAddr, Intercepted>>);

#[cfg(test)]
impl OrigDstTable {
    pub fn insert(&self, client: ClientAddr, intercepted: Intercepted) {
        self.0.lock().expect("table").insert(client, intercepted);
    }
}

#[cfg(test)]
impl OrigDst for OrigDstTable {
    fn take(&self, client: ClientAddr) -> Option<Intercepted> {
        self.0.lock().expect("table").remove(&client)
    }
}
