//! Live connections, for `interlock status`. A guard removes its entry when
//! the connection ends, however it ends.
use std::{
    collections::HashMap,
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use parking_lot::Mutex;

use serde::Serialize;

use crate::addr::ClientAddr;

#[derive(Default)]
pub struct ConnRegistry {
    live: Mutex<HashMap<ulid::Ulid, Entry>>,
    accepted: AtomicU64,
}

struct Entry {
    client: ClientAddr,
    target: Option<String>,
    pid: Option<u32>,
    since: Instant,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct LiveConnection {
    pub session_id: String,
    pub client: String,
    pub target: Option<String>,
    pub pid: Option<u32>,
    pub age_ms: u64,
}

pub struct LiveGuard<'a> {
    registry: &'a ConnRegistry,
    id: ulid::Ulid,
}

impl ConnRegistry {
    pub fn open(&self, id: ulid::Ulid, client: ClientAddr) -> LiveGuard<'_> {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.live.lock().insert(
            id,
            Entry {
                client,
                target: None,
                pid: None,
                since: Instant::now(),
            },
        );
        LiveGuard { registry: self, id }
    }

    pub fn identify(&self, id: ulid::Ulid, target: &str, pid: u32) {
        if let Some(entry) = self.live.lock().get_mut(&id) {
            entry.target = Some(target.to_owned());
            entry.pid = Some(pid);
        }
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> Vec<LiveConnection> {
        let mut list: Vec<LiveConnection> = self
            .live
            .lock()
            .iter()
            .map(|(id, e)| LiveConnection {
                session_id: id.to_string(),
                client: e.client.to_string(),
                target: e.target.clone(),
                pid: e.pid,
                age_ms: e.since.elapsed().as_millis() as u64,
            })
            .collect();
        list.sort_by(|a, b| a.session_id.cmp(&b.session_id));
        list
    }
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.registry.live.lock().remove(&self.id);
    }
}
