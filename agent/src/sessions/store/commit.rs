//! Group commit: the `store-commit` thread writes every session's pending
//! chunk to sled, one insert per session, and makes one flush cover them
//! all; recorders that must wait for durability watch its generation.
use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use super::{StoreError, id_key, now_us};
use crate::sessions::{event::Event, format::encode_event};

#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Committed {
    pub(super) generation: u64,
    pub(super) failed: bool,
}

/// The group-commit state shared by recorders and the commit thread.
pub(super) struct Committer {
    /// Generation of the latest append.
    pub(super) written: AtomicU64,
    pub(super) wanted: Mutex<bool>,
    pub(super) wake: Condvar,
    pub(super) committed: watch::Sender<Committed>,
    pub(super) last_error: Mutex<Option<String>>,
    /// Set while the last flush failed: appends fail at once, so nothing
    /// passes on as if recorded while the store cannot write.
    pub(super) failing: AtomicBool,
    /// sled's size on disk and the free space of its filesystem,
    /// refreshed by the commit thread.
    pub(super) used_bytes: AtomicU64,
    pub(super) free_bytes: AtomicU64,
    pub(super) stop: AtomicBool,
    /// Sessions with pending lines.
    pub(super) dirty: Mutex<Vec<Arc<Mutex<Chain>>>>,
}

/// A session's pending chunk is written by the appender itself, without
/// waiting for the commit thread's next round, once it holds this much.
pub(super) const CHUNK_LIMIT: usize = 1 << 20;

/// Flushed at least this often when something is pending.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// New sessions are refused when the store's filesystem has less free.
pub(super) const MIN_FREE_BYTES: u64 = 256 * 1024;

pub(super) fn free_space(dir: &Path) -> Option<u64> {
    let stat = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(stat.blocks_available() as u64 * stat.fragment_size() as u64)
}

pub(super) fn commit_loop(db: sled::Db, dir: PathBuf, events: sled::Tree, commit: Arc<Committer>) {
    let mut measured = std::time::Instant::now();
    loop {
        {
            let mut wanted = commit.wanted.lock();
            if !*wanted {
                commit.wake.wait_for(&mut wanted, FLUSH_INTERVAL);
            }
            *wanted = false;
        }
        let stop = commit.stop.load(Ordering::SeqCst);
        let target = commit.written.load(Ordering::SeqCst);
        if target != commit.committed.borrow().generation {
            let dirty = std::mem::take(&mut *commit.dirty.lock());
            let written = dirty.iter().try_for_each(|chain| {
                let mut chain = chain.lock();
                chain.listed = false;
                chain.write(&events)
            });
            match written.and_then(|()| db.flush().map(drop)) {
                Ok(_) => {
                    commit.last_error.lock().take();
                    commit.failing.store(false, Ordering::SeqCst);
                    commit.committed.send_replace(Committed {
                        generation: target,
                        failed: false,
                    });
                }
                Err(error) => {
                    tracing::error!(%error, "session store flush failed");
                    *commit.last_error.lock() = Some(error.to_string());
                    commit.failing.store(true, Ordering::SeqCst);
                    commit.committed.send_modify(|c| c.failed = true);
                }
            }
        }
        if measured.elapsed() >= Duration::from_millis(500) || stop {
            measured = std::time::Instant::now();
            if let Ok(size) = db.size_on_disk() {
                commit.used_bytes.store(size, Ordering::Relaxed);
            }
            if let Some(free) = free_space(&dir) {
                commit.free_bytes.store(free, Ordering::Relaxed);
            }
        }
        if stop {
            return;
        }
    }
}

/// A session's hash chain and the lines not yet written to sled.
pub(super) struct Chain {
    pub(super) id: [u8; 16],
    pub(super) next_seq: u64,
    pub(super) prev: [u8; 32],
    /// Event lines from `pending_first` on, `\n`-separated.
    pub(super) pending: Vec<u8>,
    pub(super) pending_first: u64,
    /// On the commit thread's dirty list.
    pub(super) listed: bool,
}

impl Chain {
    pub(super) fn new(id: &ulid::Ulid, next_seq: u64, prev: [u8; 32]) -> Self {
        Self {
            id: id_key(id),
            next_seq,
            prev,
            pending: Vec::with_capacity(1024),
            pending_first: next_seq,
            listed: false,
        }
    }

    /// Encodes the next event into the pending chunk; returns its length.
    pub(super) fn push(&mut self, event: &Event<'_>) -> Result<u64, StoreError> {
        if self.pending.is_empty() {
            self.pending_first = self.next_seq;
        } else {
            self.pending.push(b'\n');
        }
        let start = self.pending.len();
        self.prev = encode_event(
            &mut self.pending,
            &self.prev,
            self.next_seq,
            now_us(),
            event,
        )?;
        self.next_seq += 1;
        Ok((self.pending.len() - start) as u64)
    }

    /// Writes the pending chunk to sled, keyed by its first seq.
    pub(super) fn write(&mut self, events: &sled::Tree) -> Result<(), sled::Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut key = [0u8; 24];
        key[..16].copy_from_slice(&self.id);
        key[16..].copy_from_slice(&self.pending_first.to_be_bytes());
        events.insert(key, self.pending.as_slice())?;
        self.pending.clear();
        if self.pending.capacity() > CHUNK_LIMIT {
            self.pending = Vec::with_capacity(1024);
        }
        Ok(())
    }
}
