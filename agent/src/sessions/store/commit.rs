//! Group commit: the `store-commit` thread moves every session's pending
//! chunk into the commit log (`log.rs`: one write for them all), makes
//! one `fdatasync` of it cover them all, and releases the recorders
//! waiting for that generation. The chunks go into sled (the index the
//! rest of the agent reads) after that, off the waiters' path: about
//! once a second, before sled is flushed and the log starts over.
use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use super::{
    StoreError, event_key, id_key,
    log::{CommitLog, Kind},
    now_us,
};
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
    /// Set while the last commit failed: appends fail at once, so nothing
    /// passes on as if recorded while the store cannot write.
    pub(super) failing: AtomicBool,
    /// sled's size on disk and the free space of its filesystem,
    /// refreshed by the commit thread.
    pub(super) used_bytes: AtomicU64,
    pub(super) free_bytes: AtomicU64,
    pub(super) stop: AtomicBool,
    /// Sessions with pending lines.
    pub(super) dirty: Mutex<Vec<Arc<Mutex<Chain>>>>,
    /// Records gathered for the commit log. Locked after a chain, never
    /// before one.
    pub(super) log: Mutex<CommitLog>,
}

impl Committer {
    /// The store cannot write: appends fail at once, and every waiter is
    /// told, until a later commit succeeds.
    fn fail(&self, error: &StoreError) {
        tracing::error!(%error, "session store commit failed");
        *self.last_error.lock() = Some(error.to_string());
        self.failing.store(true, Ordering::SeqCst);
        self.committed.send_modify(|c| c.failed = true);
    }

    fn succeed(&self, generation: u64) {
        self.last_error.lock().take();
        self.failing.store(false, Ordering::SeqCst);
        self.committed.send_replace(Committed {
            generation,
            failed: false,
        });
    }
}

/// A session's pending chunk is committed at once, without waiting for
/// the commit thread's next round, once it holds this much.
pub(super) const CHUNK_LIMIT: usize = 1 << 20;

/// Committed at least this often when something is pending.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Logged chunks go into sled, sled is flushed and the log starts over
/// this often, or once this much is logged (and whenever the log is
/// full). Until then the logged lines are held in memory twice over: by
/// their sessions, to go into sled, and by sled, to be flushed. The
/// bytes bound that memory however fast sessions record.
const INDEX_INTERVAL: Duration = Duration::from_secs(1);
const INDEX_BYTES: u64 = 4 << 20;

/// Free space kept for sled beyond what it is given: one of its 512 KiB
/// segments.
const SLED_HEADROOM: u64 = 512 << 10;

/// New sessions are refused when the store's filesystem has less free.
pub(super) const MIN_FREE_BYTES: u64 = 256 * 1024;

pub(super) fn free_space(dir: &Path) -> Option<u64> {
    let stat = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(stat.blocks_available() as u64 * stat.fragment_size() as u64)
}

fn io_error(error: std::io::Error) -> StoreError {
    StoreError::Flush(error.to_string())
}

/// The commit thread's own state.
struct Committing {
    db: sled::Db,
    events: sled::Tree,
    commit: Arc<Committer>,
    /// The log's file, for `fdatasync`.
    log_file: std::fs::File,
    /// Sessions with logged chunks not yet in sled, and their bytes.
    unindexed: Vec<Arc<Mutex<Chain>>>,
    unindexed_bytes: u64,
    indexed_at: Instant,
    dir: PathBuf,
}

impl Committing {
    /// One group commit: every pending chunk into the log, one sync.
    fn commit(&mut self, target: u64) {
        let dirty = std::mem::take(&mut *self.commit.dirty.lock());
        for chain in dirty {
            let mut locked = chain.lock();
            locked.listed = false;
            if locked.pending.is_empty() {
                continue;
            }
            self.commit.log.lock().push(
                Kind::Chunk,
                &locked.id,
                locked.pending_first,
                &locked.pending,
            );
            if locked.unindexed.is_empty() {
                self.unindexed.push(chain.clone());
            }
            self.unindexed_bytes += locked.pending.len() as u64 + 1;
            locked.log_pending();
        }
        let result = self.write_log().and_then(|()| {
            // Without holding the log: sessions may start meanwhile.
            self.log_file.sync_data().map_err(io_error)
        });
        match result {
            Ok(()) => self.commit.succeed(target),
            Err(error) => self.commit.fail(&error),
        }
    }

    /// Writes the gathered records; when they do not fit, sled is brought
    /// up to date and flushed instead and the log starts over.
    fn write_log(&mut self) -> Result<(), StoreError> {
        {
            let mut log = self.commit.log.lock();
            if log.fits() {
                return log.write().map_err(io_error);
            }
        }
        self.index()?;
        let mut log = self.commit.log.lock();
        if !log.fits() {
            // More than the whole log in one round: it is all in sled,
            // which `index` flushed.
            log.drop_batch();
        }
        log.write().map_err(io_error)
    }

    /// Every logged chunk into sled, sled flushed, the log started over.
    /// The log stays locked across the flush: a session starting
    /// meanwhile puts its summary in sled and the log under that lock, so
    /// it is either flushed or kept for the new epoch.
    fn index(&mut self) -> Result<(), StoreError> {
        // sled must never meet a full disk: it spins for ever in `insert`
        // when it cannot start a new segment. The store fails first.
        let needed = self.unindexed_bytes + SLED_HEADROOM;
        if let Some(free) = free_space(&self.dir)
            && free < needed
        {
            return Err(StoreError::Flush(format!(
                "No space left on device ({free} bytes free, {needed} needed to move the commit log into sled)"
            )));
        }
        // A session whose chunks fail to go in stays listed: the log is
        // not started over while it holds something sled does not.
        while let Some(chain) = self.unindexed.last() {
            chain.lock().index(&self.events)?;
            self.unindexed.pop();
        }
        self.unindexed_bytes = 0;
        let mut log = self.commit.log.lock();
        self.db.flush()?;
        log.restart().map_err(io_error)?;
        self.indexed_at = Instant::now();
        Ok(())
    }
}

pub(super) fn commit_loop(
    db: sled::Db,
    dir: PathBuf,
    events: sled::Tree,
    commit: Arc<Committer>,
    log_file: std::fs::File,
) {
    let mut measured = Instant::now();
    // Preallocated: on the disk from the start, as part of the store.
    let log_size = log_file.metadata().map_or(0, |m| m.len());
    let mut state = Committing {
        db,
        events,
        commit: commit.clone(),
        log_file,
        unindexed: Vec::new(),
        unindexed_bytes: 0,
        indexed_at: Instant::now(),
        dir,
    };
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
            state.commit(target);
        }
        // After the waiters are released: they needed the log, not sled.
        let due = state.unindexed_bytes >= INDEX_BYTES
            || (state.indexed_at.elapsed() >= INDEX_INTERVAL && !state.unindexed.is_empty());
        if (due || stop)
            && let Err(error) = state.index()
        {
            // The log still holds it all: tried again in a second; the
            // store fails only once the log is full as well.
            tracing::warn!(%error, "cannot move the commit log into sled yet");
            state.indexed_at = Instant::now();
        }
        if measured.elapsed() >= Duration::from_millis(500) || stop {
            measured = Instant::now();
            if let Ok(size) = state.db.size_on_disk() {
                commit.used_bytes.store(size + log_size, Ordering::Relaxed);
            }
            if let Some(free) = free_space(&state.dir) {
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
    /// Lines in the commit log, not yet in sled: the chunks of several
    /// commits joined into pieces of about `PIECE_BYTES`, each to go in as
    /// one value.
    pub(super) unindexed: Vec<u8>,
    /// Where each piece starts in `unindexed`, and its first seq.
    pub(super) piece_starts: Vec<(usize, u64)>,
}

/// Logged chunks are joined into sled values of about this size, chosen
/// by measurement (docs/BENCHMARKS.md): sled holds the leaves it has not
/// flushed in memory, values and all, so bigger values cost memory
/// (64 sessions recording flat out: a 1 MiB value per session and second
/// peaked at 140 MB, 4 KiB pieces at 100–130 MB, 1 KiB at 55–70 MB), and
/// it rewrites a leaf (up to 16 values) bigger than a quarter of its
/// 512 KiB segment as a file of its own at every change. Smaller pieces
/// mean more inserts for the commit thread.
const PIECE_BYTES: usize = 1 << 10;

impl Chain {
    pub(super) fn new(id: &ulid::Ulid, next_seq: u64, prev: [u8; 32]) -> Self {
        Self {
            id: id_key(id),
            next_seq,
            prev,
            pending: Vec::with_capacity(1024),
            pending_first: next_seq,
            listed: false,
            unindexed: Vec::new(),
            piece_starts: Vec::new(),
        }
    }

    /// Moves the pending chunk (just logged) to the unindexed lines: onto
    /// the last piece, or as a new one when that is full. A piece starts
    /// where a logged chunk does, so the chunks a crash replays line up
    /// with the pieces: each replayed chunk replaces or follows one.
    fn log_pending(&mut self) {
        let last_start = self.piece_starts.last().map(|&(start, _)| start);
        match last_start {
            Some(start) if self.unindexed.len() - start < PIECE_BYTES => {
                self.unindexed.push(b'\n');
            }
            _ => self
                .piece_starts
                .push((self.unindexed.len(), self.pending_first)),
        }
        self.unindexed.extend_from_slice(&self.pending);
        self.pending.clear();
    }

    /// The unindexed pieces: each one's first seq and its lines.
    fn pieces(&self) -> impl Iterator<Item = (u64, &[u8])> {
        let starts = &self.piece_starts;
        starts.iter().enumerate().map(|(i, &(start, first))| {
            let end = starts
                .get(i + 1)
                .map_or(self.unindexed.len(), |&(next, _)| next);
            (first, &self.unindexed[start..end])
        })
    }

    /// The unindexed lines, each with its seq.
    pub(super) fn unindexed_lines(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.pieces().flat_map(|(first, piece)| {
            piece
                .split(|b| *b == b'\n')
                .enumerate()
                .map(move |(n, line)| (first + n as u64, line))
        })
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

    /// Puts the logged lines into sled, a value per piece. (After a crash
    /// the log's own chunks are replayed instead: each piece's first has
    /// the piece's key and replaces it, the others follow it.)
    pub(super) fn index(&mut self, events: &sled::Tree) -> Result<(), sled::Error> {
        for (first, piece) in self.pieces() {
            events.insert(event_key(&self.id, first), piece)?;
        }
        self.piece_starts.clear();
        self.unindexed.clear();
        if self.unindexed.capacity() > CHUNK_LIMIT {
            self.unindexed = Vec::new();
        }
        Ok(())
    }

    /// Writes the pending chunk to sled (after the logged ones), keyed by
    /// its first seq; durable at sled's next flush.
    pub(super) fn write(&mut self, events: &sled::Tree) -> Result<(), sled::Error> {
        self.index(events)?;
        if self.pending.is_empty() {
            return Ok(());
        }
        events.insert(self.key(self.pending_first), self.pending.as_slice())?;
        self.pending.clear();
        if self.pending.capacity() > CHUNK_LIMIT {
            self.pending = Vec::with_capacity(1024);
        }
        Ok(())
    }

    fn key(&self, first: u64) -> [u8; 24] {
        event_key(&self.id, first)
    }
}
