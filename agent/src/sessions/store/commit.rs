//! Group commit: the `store-commit` thread moves every session's pending
//! chunk into the active half of the commit log (`log.rs`: one write for
//! them all), makes one `fdatasync` of it cover them all, and releases
//! the recorders waiting for that generation. The chunks go into sled
//! (the index the rest of the agent reads) off the waiters' path: when
//! the halves swap, the `store-index` thread puts the full half into
//! sled, flushes sled and starts the half over, while commits go on in
//! the other.
use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::{Condvar, Mutex};
use tokio::sync::{Notify, watch};

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
///
/// Waiters are released in two steps, so that a commit costs the commit
/// thread one wake-up however many sessions wait: it stores the
/// generation now on disk in `synced` and wakes one waiting task
/// (`released`); that task, on a runtime worker, publishes it to
/// `committed`, which wakes the others there (a local queue push each,
/// where a wake-up from a foreign thread is a syscall and, on few cores,
/// a preemption of the commit thread before its next sync).
pub(super) struct Committer {
    /// Generation of the latest append.
    pub(super) written: AtomicU64,
    pub(super) wanted: Mutex<bool>,
    pub(super) wake: Condvar,
    /// Generation of the latest successful commit.
    pub(super) synced: AtomicU64,
    /// Given to one waiter after each successful commit.
    pub(super) released: Notify,
    /// What waiters see: `synced` as published, and whether the store
    /// is failing.
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
        self.synced.store(generation, Ordering::SeqCst);
        self.released.notify_one();
    }

    /// Publishes the latest successful commit to every waiter; run by the
    /// waiter the commit thread woke.
    pub(super) fn publish(&self) {
        self.committed.send_if_modified(|seen| {
            let synced = self.synced.load(Ordering::SeqCst);
            let failed = self.failing.load(Ordering::SeqCst);
            let changed = synced > seen.generation || failed != seen.failed;
            seen.generation = seen.generation.max(synced);
            seen.failed = failed;
            changed
        });
    }
}

/// A session's pending chunk is committed at once, without waiting for
/// the commit thread's next round, once it holds this much.
pub(super) const CHUNK_LIMIT: usize = 1 << 20;

/// Committed at least this often when something is pending.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// The log's halves swap, and the indexer puts the full one into sled,
/// this often, or once this much is logged (or when the half is full).
/// Until sled is flushed the logged lines are held in memory twice over:
/// by their sessions, to go into sled, and by sled; the bytes bound that
/// memory however fast sessions record.
const INDEX_INTERVAL: Duration = Duration::from_secs(1);
const INDEX_BYTES: u64 = 1 << 20;

/// How long a commit that finds the active half full waits for the
/// indexer to free the other one, before it fails.
const FULL_WAIT: Duration = Duration::from_secs(2);
/// How long the store's stop waits for the indexer.
const STOP_WAIT: Duration = Duration::from_secs(10);

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
    indexer: Arc<Indexer>,
    /// The log's file, for `fdatasync`.
    log_file: std::fs::File,
    /// Sessions with chunks in the active half of the log, and their
    /// bytes.
    unindexed: Vec<Arc<Mutex<Chain>>>,
    unindexed_bytes: u64,
    handed_at: Instant,
    dir: PathBuf,
}

/// A full half of the log for the indexer: its sessions and their pieces.
struct Job {
    half: usize,
    pieces: Vec<(Arc<Mutex<Chain>>, Arc<Pieces>)>,
    bytes: u64,
}

/// The hand-over between the commit thread and the indexer.
#[derive(Default)]
struct Indexer {
    slot: Mutex<Slot>,
    /// Wakes the indexer: a job, or stop.
    wake: Condvar,
    /// Wakes the commit thread: a half was started over.
    done: Condvar,
}

#[derive(Default)]
struct Slot {
    job: Option<Job>,
    /// From a hand-over until its half is started over.
    busy: bool,
    stop: bool,
    /// Why the last job could not go into sled, while it cannot.
    failure: Option<String>,
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
        let started = std::time::Instant::now();
        let result = self.write_log().and_then(|()| {
            // Without holding the log: sessions may start meanwhile.
            self.log_file.sync_data().map_err(io_error)
        });
        crate::metrics::get()
            .store_flush_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => self.commit.succeed(target),
            Err(error) => self.commit.fail(&error),
        }
    }

    /// Writes the gathered records. When the active half is full, the
    /// writes move to the other half (once the indexer has started it
    /// over); when they fill more than a half, they go into sled here.
    fn write_log(&mut self) -> Result<(), StoreError> {
        {
            let mut log = self.commit.log.lock();
            if log.fits() {
                return log.write().map_err(io_error);
            }
        }
        self.wait_for_indexer(FULL_WAIT)?;
        self.hand_over();
        {
            let mut log = self.commit.log.lock();
            if log.fits() {
                return log.write().map_err(io_error);
            }
        }
        // More than a half in one round: the indexer was given all of its
        // chunks; once they are in sled, the records are dropped.
        self.wait_for_indexer(FULL_WAIT)?;
        self.index_here()
    }

    /// Waits until the other half is free (the indexer has started it
    /// over), at most `wait`; fails at once when the indexer cannot put
    /// it into sled (a full disk).
    fn wait_for_indexer(&self, wait: Duration) -> Result<(), StoreError> {
        let full = |why: String| {
            StoreError::Flush(format!(
                "the commit log is full and sled cannot take its records: {why}"
            ))
        };
        let deadline = Instant::now() + wait;
        let mut slot = self.indexer.slot.lock();
        loop {
            if self.commit.log.lock().other_is_free() {
                return Ok(());
            }
            if let Some(failure) = &slot.failure {
                return Err(full(failure.clone()));
            }
            if self
                .indexer
                .done
                .wait_until(&mut slot, deadline)
                .timed_out()
            {
                // Busy: most likely sled, stuck on a disk that filled
                // under it. Said as such when it has.
                return Err(full(match check_room(&self.dir, 0) {
                    Err(StoreError::Flush(why)) => why,
                    _ => "it is still busy".into(),
                }));
            }
        }
    }

    /// Moves the writes to the other half, if it is free, and gives the
    /// indexer what the full one holds.
    fn hand_over(&mut self) {
        let half = match self.commit.log.lock().swap() {
            Ok(Some(half)) => half,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%error, "cannot start the commit log's other half");
                return;
            }
        };
        let pieces = std::mem::take(&mut self.unindexed)
            .into_iter()
            .map(|chain| {
                let pieces = {
                    let mut locked = chain.lock();
                    let pieces = Arc::new(std::mem::take(&mut locked.unindexed));
                    locked.indexing = Some(pieces.clone());
                    pieces
                };
                (chain, pieces)
            })
            .collect();
        let job = Job {
            half,
            pieces,
            bytes: std::mem::take(&mut self.unindexed_bytes),
        };
        {
            let mut slot = self.indexer.slot.lock();
            slot.job = Some(job);
            slot.busy = true;
        }
        self.indexer.wake.notify_one();
        self.handed_at = Instant::now();
    }

    /// Everything in the active half into sled, on this thread, sled
    /// flushed and the gathered records dropped: for a round bigger than
    /// a half, and at stop. The log stays locked across the flush: a
    /// session starting meanwhile puts its summary in sled and the log
    /// under that lock, so it is either flushed or kept.
    fn index_here(&mut self) -> Result<(), StoreError> {
        check_room(&self.dir, self.unindexed_bytes)?;
        // A session whose chunks fail to go in stays listed.
        while let Some(chain) = self.unindexed.last() {
            chain.lock().index(&self.events)?;
            self.unindexed.pop();
        }
        self.unindexed_bytes = 0;
        let mut log = self.commit.log.lock();
        self.db.flush()?;
        log.drop_batch();
        log.restart_active().map_err(io_error)
    }
}

/// sled must never meet a full disk: it spins for ever in `insert` when
/// it cannot start a new segment. The store fails first.
pub(super) fn check_room(dir: &Path, bytes: u64) -> Result<(), StoreError> {
    let needed = bytes + SLED_HEADROOM;
    match free_space(dir) {
        Some(free) if free < needed => Err(StoreError::Flush(format!(
            "No space left on device ({free} bytes free, {needed} needed to move the commit log into sled)"
        ))),
        _ => Ok(()),
    }
}

/// The `store-index` thread: puts each full half's pieces into sled,
/// flushes sled, and starts the half over. On failure (a full disk) it
/// tries again every second; the log keeps everything meanwhile, and the
/// store fails only when the other half is full as well.
fn index_loop(
    db: sled::Db,
    events: sled::Tree,
    dir: PathBuf,
    commit: Arc<Committer>,
    indexer: Arc<Indexer>,
) {
    loop {
        let job = {
            let mut slot = indexer.slot.lock();
            loop {
                if let Some(job) = slot.job.take() {
                    break job;
                }
                if slot.stop {
                    return;
                }
                indexer.wake.wait(&mut slot);
            }
        };
        let index = || -> Result<(), StoreError> {
            check_room(&dir, job.bytes)?;
            for (chain, pieces) in &job.pieces {
                let id = chain.lock().id;
                for (first, piece) in pieces.iter() {
                    events.insert(event_key(&id, first), piece)?;
                }
            }
            db.flush()?;
            // In sled and flushed: readers find the lines there from now
            // on, and the half may start over.
            for (chain, pieces) in &job.pieces {
                let mut locked = chain.lock();
                if locked
                    .indexing
                    .as_ref()
                    .is_some_and(|p| Arc::ptr_eq(p, pieces))
                {
                    locked.indexing = None;
                }
            }
            commit.log.lock().restart(job.half).map_err(io_error)
        };
        while let Err(error) = index() {
            tracing::warn!(%error, "cannot move the commit log into sled yet");
            let mut slot = indexer.slot.lock();
            slot.failure = Some(match error {
                StoreError::Flush(why) => why,
                other => other.to_string(),
            });
            // A commit waiting for this half fails now, not at its deadline.
            indexer.done.notify_all();
            if slot.stop {
                return;
            }
            indexer.wake.wait_for(&mut slot, Duration::from_secs(1));
        }
        {
            let mut slot = indexer.slot.lock();
            slot.failure = None;
            slot.busy = false;
        }
        // The slot was locked by the waiter while it looked: the wake-up
        // cannot fall between its look and its wait.
        indexer.done.notify_all();
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
    let indexer = Arc::new(Indexer::default());
    let index_thread = {
        let (db, events, dir, commit, indexer) = (
            db.clone(),
            events.clone(),
            dir.clone(),
            commit.clone(),
            indexer.clone(),
        );
        std::thread::Builder::new()
            .name("store-index".into())
            .spawn(move || index_loop(db, events, dir, commit, indexer))
            .expect("spawn the store index thread")
    };
    let mut state = Committing {
        db,
        events,
        commit: commit.clone(),
        indexer: indexer.clone(),
        log_file,
        unindexed: Vec::new(),
        unindexed_bytes: 0,
        handed_at: Instant::now(),
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
        if target != commit.synced.load(Ordering::SeqCst) {
            state.commit(target);
        }
        // After the waiters are released: they needed the log, not sled.
        let due = state.unindexed_bytes >= INDEX_BYTES
            || (state.handed_at.elapsed() >= INDEX_INTERVAL && !state.unindexed.is_empty());
        if due && !stop {
            state.hand_over();
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
            // What the indexer holds, then the rest, into sled; what does
            // not make it stays in the log, replayed at the next start.
            // (A half left full by a crash, in a store opened as it was
            // left, has no job: it is replayed at the agent's next start.)
            let busy = indexer.slot.lock().busy;
            let finished = if busy {
                state.wait_for_indexer(STOP_WAIT)
            } else {
                Ok(())
            }
            .and_then(|()| state.index_here());
            if let Err(error) = finished {
                tracing::warn!(%error, "the commit log is left to be replayed at the next start");
            }
            indexer.slot.lock().stop = true;
            indexer.wake.notify_one();
            let _ = index_thread.join();
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
    /// Lines in the active half of the commit log.
    pub(super) unindexed: Pieces,
    /// Lines in the half the indexer is putting into sled.
    pub(super) indexing: Option<Arc<Pieces>>,
}

/// Logged chunks are joined into sled values of about this size, chosen
/// by measurement (docs/BENCHMARKS.md): sled holds the leaves it has not
/// flushed in memory, values and all, so bigger values cost memory
/// (64 sessions recording flat out: a 1 MiB value per session and second
/// peaked at 140 MB, 4 KiB pieces at 100–130 MB, 1 KiB at 55–70 MB), and
/// it rewrites a leaf (up to 16 values) bigger than a quarter of its
/// 512 KiB segment as a file of its own at every change. Smaller pieces
/// mean more inserts.
const PIECE_BYTES: usize = 1 << 10;

/// A session's logged lines, joined into pieces that each go into sled as
/// one value. A piece starts where a logged chunk does, so the chunks a
/// crash replays line up with the pieces: each replayed chunk replaces
/// or follows one.
#[derive(Default)]
pub(super) struct Pieces {
    lines: Vec<u8>,
    /// Where each piece starts in `lines`, and its first seq.
    starts: Vec<(usize, u64)>,
}

impl Pieces {
    pub(super) fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Adds a logged chunk: onto the last piece, or as a new one when
    /// that is full.
    fn push(&mut self, first: u64, chunk: &[u8]) {
        match self.starts.last() {
            Some(&(start, _)) if self.lines.len() - start < PIECE_BYTES => self.lines.push(b'\n'),
            _ => self.starts.push((self.lines.len(), first)),
        }
        self.lines.extend_from_slice(chunk);
    }

    /// Each piece's first seq and its lines.
    fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.starts.iter().enumerate().map(|(i, &(start, first))| {
            let end = self
                .starts
                .get(i + 1)
                .map_or(self.lines.len(), |&(next, _)| next);
            (first, &self.lines[start..end])
        })
    }

    /// Each line, with its seq.
    pub(super) fn lines(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.iter().flat_map(|(first, piece)| {
            piece
                .split(|b| *b == b'\n')
                .enumerate()
                .map(move |(n, line)| (first + n as u64, line))
        })
    }
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
            unindexed: Pieces::default(),
            indexing: None,
        }
    }

    /// Bytes of the session not yet in sled.
    pub(super) fn unwritten_bytes(&self) -> u64 {
        let indexing = self.indexing.as_ref().map_or(0, |p| p.lines.len());
        (self.pending.len() + self.unindexed.lines.len() + indexing) as u64
    }

    /// Moves the pending chunk, just logged, to the unindexed lines.
    fn log_pending(&mut self) {
        self.unindexed.push(self.pending_first, &self.pending);
        self.pending.clear();
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

    /// Puts the active half's lines into sled, a value per piece. (Those
    /// of the half being indexed are the indexer's.)
    pub(super) fn index(&mut self, events: &sled::Tree) -> Result<(), sled::Error> {
        for (first, piece) in self.unindexed.iter() {
            events.insert(event_key(&self.id, first), piece)?;
        }
        self.unindexed = Pieces::default();
        Ok(())
    }

    /// Writes everything of the session not yet in sled there (the
    /// indexer's pieces too: the same keys and values it puts in), the
    /// pending chunk last; durable at sled's next flush. Readers of an
    /// ended session find it all in sled.
    pub(super) fn write(&mut self, events: &sled::Tree) -> Result<(), sled::Error> {
        if let Some(pieces) = &self.indexing {
            for (first, piece) in pieces.iter() {
                events.insert(event_key(&self.id, first), piece)?;
            }
        }
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
