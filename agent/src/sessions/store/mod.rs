//! The local session store: sled under `state_dir/sessions`, one tree per
//! record kind, keys big-endian so that sessions (ULIDs) and their events
//! iterate in order.
//!
//! | tree | key | value |
//! |---|---|---|
//! | `sessions` | session id (16) | [`Summary`] (JSON) |
//! | `events` | session id (16) ‖ seq of its first line (u64) | event lines, `\n`-separated |
//! | `seals` | session id | the seal's line |
//! | `outbox` | session id | [`Outbox`] entry: to be shipped |
//! | `shipped` | session id | when it was shipped (unix ms) |
//!
//! Durability is group commit. A recorder appends an event by encoding its
//! line into the session's pending chunk, in memory, without waiting. The
//! `store-commit` thread writes every session's pending chunk into the
//! commit log (`log.rs`) and makes one `fdatasync` cover them all; the
//! chunks reach sled later, off the waiters' path (`commit.rs`). A caller
//! that must not go on before its events are on disk waits for
//! [`Recorder::durable`]; whatever else is pending is committed every
//! 100 ms.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use parking_lot::{Condvar, Mutex};

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

mod commit;
mod log;
mod recorder;

use commit::{Chain, Committed, Committer, MIN_FREE_BYTES, commit_loop, free_space};
pub use recorder::Recorder;

use super::{
    event::Event,
    format::{Seal, chain_start, line_hash},
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("session store {}: {cause}", path.display())]
    Open { path: PathBuf, cause: sled::Error },
    #[error("session store: {0}")]
    Sled(#[from] sled::Error),
    #[error("session store commit log {}: {cause}", path.display())]
    Log {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("session store cannot write to disk: {0}")]
    Flush(String),
    #[error(
        "the session store is full ({used} of max_store_bytes {max}): new sessions are refused until recorded sessions are shipped"
    )]
    Full { used: u64, max: u64 },
    #[error(
        "the disk holding the session store is full ({free} bytes free): new sessions are refused until space is freed"
    )]
    DiskFull { free: u64 },
    #[error("session store: cannot encode an event: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("no session {0}")]
    NotFound(String),
    #[error("host key {}: {cause}", path.display())]
    Key {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// One row per session, for listing without reading its events.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    pub id: String,
    pub host: String,
    pub start_us: u64,
    pub end_us: Option<u64>,
    pub protocol: String,
    pub target: String,
    pub orig_dst: String,
    pub workloads: Vec<String>,
    pub uid: u32,
    pub user: Option<String>,
    pub unit: Option<String>,
    pub exe: Option<String>,
    pub pid: u32,
    pub decision: String,
    pub rule: Option<String>,
    /// `live` until the session ends; then how it ended.
    pub outcome: String,
    pub statements: u64,
    pub denied: u64,
    pub events: u64,
    /// Bytes of its event lines.
    pub bytes: u64,
    /// The CI job the caller runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<crate::workload::JobContext>,
}

/// A session waiting to be shipped.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Outbox {
    pub attempts: u32,
    /// Not before (unix ms).
    pub next_ms: u64,
    pub last_error: Option<String>,
}

pub struct Store {
    path: PathBuf,
    db: sled::Db,
    pub(super) sessions: sled::Tree,
    pub(super) events: sled::Tree,
    pub(super) seals: sled::Tree,
    pub(super) outbox: sled::Tree,
    pub(super) shipped: sled::Tree,
    commit: Arc<Committer>,
    commit_thread: Mutex<Option<JoinHandle<()>>>,
    pub host: String,
    key: SigningKey,
    pub max_bytes: u64,
    /// Woken when a session is put in the outbox.
    pub ship_wake: Notify,
    /// Sessions still running, and how far they were shipped in parts.
    live: Mutex<HashMap<ulid::Ulid, Parts>>,
    /// Sessions whose last lines may be in the commit log only, not yet
    /// in sled: readers take them from the chain.
    logged: Mutex<HashMap<ulid::Ulid, std::sync::Weak<Mutex<Chain>>>>,
}

/// A running session's parts: `part` shipped so far, covering events
/// before `next_seq`, the last one at `since`.
#[derive(Clone, Copy, Debug)]
pub struct Parts {
    pub part: u32,
    pub next_seq: u64,
    pub since: std::time::Instant,
}

/// The commit log, in the store's directory beside sled's files.
const LOG_FILE: &str = "commit.v2.log";

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The `events` key of the chunk whose first line is `first`.
fn event_key(id: &[u8; 16], first: u64) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..16].copy_from_slice(id);
    key[16..].copy_from_slice(&first.to_be_bytes());
    key
}

fn id_key(id: &ulid::Ulid) -> [u8; 16] {
    id.0.to_be_bytes()
}

pub fn parse_id(text: &str) -> Result<ulid::Ulid, StoreError> {
    ulid::Ulid::from_string(text).map_err(|_| StoreError::NotFound(text.to_owned()))
}

impl Store {
    /// Opens (or creates) the store in `dir` and the host key next to it,
    /// then closes what a crash left open: sessions still `live` are ended
    /// as `interrupted` and sealed, ended ones missing from the outbox are
    /// put back in it.
    pub fn open(
        dir: &Path,
        key_path: &Path,
        host: String,
        max_bytes: u64,
    ) -> Result<Arc<Self>, StoreError> {
        let (store, replayed) = Self::open_with_log(dir, key_path, host, max_bytes)?;
        store.replay(replayed)?;
        store.recover()?;
        // Everything the log held is in sled, flushed, now.
        store
            .commit
            .log
            .lock()
            .restart_both()
            .map_err(|cause| StoreError::Log {
                path: dir.join(LOG_FILE),
                cause,
            })?;
        Ok(store)
    }

    /// Opens the store as the agent left it (the CLI reading a stopped
    /// agent's sessions): the commit log's records are put back into sled,
    /// as the agent's next start does again (replaying twice changes
    /// nothing), but sessions are not sealed: that is the agent's job.
    pub fn open_as_is(
        dir: &Path,
        key_path: &Path,
        host: String,
        max_bytes: u64,
    ) -> Result<Arc<Self>, StoreError> {
        let (store, replayed) = Self::open_with_log(dir, key_path, host, max_bytes)?;
        store.replay(replayed)?;
        Ok(store)
    }

    fn open_with_log(
        dir: &Path,
        key_path: &Path,
        host: String,
        max_bytes: u64,
    ) -> Result<(Arc<Self>, Vec<log::Replayed>), StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(4 * 1024 * 1024)
            .flush_every_ms(None)
            .open()
            .map_err(|cause| StoreError::Open {
                path: dir.to_owned(),
                cause,
            })?;
        let key = crate::keyfile::load_or_create(key_path).map_err(|cause| StoreError::Key {
            path: key_path.to_owned(),
            cause,
        })?;
        let log_path = dir.join(LOG_FILE);
        let log_error = |cause| StoreError::Log {
            path: log_path.clone(),
            cause,
        };
        let room = free_space(dir).unwrap_or(u64::MAX).min(max_bytes);
        let (log, replayed) = log::CommitLog::open(&log_path, room).map_err(log_error)?;
        let log_file = log.sync_handle().map_err(log_error)?;
        let commit = Arc::new(Committer {
            written: AtomicU64::new(0),
            wanted: Mutex::new(false),
            wake: Condvar::new(),
            synced: AtomicU64::new(0),
            released: Notify::new(),
            committed: watch::channel(Committed::default()).0,
            last_error: Mutex::new(None),
            failing: AtomicBool::new(false),
            used_bytes: AtomicU64::new(db.size_on_disk().unwrap_or(0)),
            free_bytes: AtomicU64::new(free_space(dir).unwrap_or(u64::MAX)),
            stop: AtomicBool::new(false),
            dirty: Mutex::new(Vec::new()),
            log: Mutex::new(log),
        });
        let store = Arc::new(Self {
            path: dir.to_owned(),
            sessions: db.open_tree("sessions")?,
            events: db.open_tree("events")?,
            seals: db.open_tree("seals")?,
            outbox: db.open_tree("outbox")?,
            shipped: db.open_tree("shipped")?,
            db: db.clone(),
            commit: commit.clone(),
            commit_thread: Mutex::new(None),
            host,
            key: SigningKey::from_bytes(&key),
            max_bytes,
            ship_wake: Notify::new(),
            live: Mutex::new(HashMap::new()),
            logged: Mutex::new(HashMap::new()),
        });
        let events = store.events.clone();
        let dir = dir.to_owned();
        let thread = std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || commit_loop(db, dir, events, commit, log_file))
            .expect("spawn the store commit thread");
        *store.commit_thread.lock() = Some(thread);
        Ok((store, replayed))
    }

    /// Puts the commit log's records back into sled: what was durable when
    /// the agent stopped, whether or not sled had flushed it.
    fn replay(&self, records: Vec<log::Replayed>) -> Result<(), StoreError> {
        let count = records.len();
        for record in records {
            match record.kind {
                log::Kind::Chunk => {
                    self.events
                        .insert(event_key(&record.id, record.first_seq), record.payload)?;
                }
                // A later summary (the session's end) may be in sled
                // already: the one of its start never replaces it.
                log::Kind::Summary => {
                    let _ = self.sessions.compare_and_swap(
                        record.id,
                        None as Option<&[u8]>,
                        Some(record.payload),
                    )?;
                }
            }
        }
        if count > 0 {
            tracing::info!(records = count, "replayed the session store's commit log");
        }
        Ok(())
    }

    /// The database, for other records kept beside the sessions (approval
    /// requests and grants): one store, one flush.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn public_key(&self) -> String {
        hex::encode(self.key.verifying_key().as_bytes())
    }

    /// Whether a new session may start: refused when the store is over
    /// its quota or the disk refuses writes, so nothing recorded is lost.
    pub fn admit(&self) -> Result<(), StoreError> {
        if let Some(error) = self.commit.last_error.lock().clone() {
            return Err(StoreError::Flush(error));
        }
        let free = self.commit.free_bytes.load(Ordering::Relaxed);
        if free < MIN_FREE_BYTES {
            return Err(StoreError::DiskFull { free });
        }
        let used = self.commit.used_bytes.load(Ordering::Relaxed);
        if used >= self.max_bytes {
            return Err(StoreError::Full {
                used,
                max: self.max_bytes,
            });
        }
        Ok(())
    }

    /// Flushes now and waits for it (at shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map(drop)
            .map_err(|e| StoreError::Flush(e.to_string()))
    }

    pub fn used_bytes(&self) -> u64 {
        self.commit.used_bytes.load(Ordering::Relaxed)
    }

    /// Starts recording a session: `start` (its `session_start` event)
    /// and the connection decision.
    pub fn begin(
        self: &Arc<Self>,
        id: ulid::Ulid,
        summary: Summary,
        start: &Event<'_>,
        connection: &Event<'_>,
        record_output: bool,
    ) -> Result<(Recorder, Ticket), StoreError> {
        let recorder = Recorder {
            store: self.clone(),
            id,
            record_output,
            chain: Arc::new(Mutex::new(Chain::new(&id, 0, chain_start(&summary.id)))),
            summary: Mutex::new(summary),
            statements: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            metrics: std::sync::OnceLock::new(),
        };
        {
            // In sled and in the log under one lock (see `commit::index`):
            // the session is found after a crash with its first events.
            let mut log = self.commit.log.lock();
            let summary = serde_json::to_vec(&*recorder.summary.lock())?;
            self.sessions.insert(id_key(&id), summary.as_slice())?;
            log.push(log::Kind::Summary, &id_key(&id), 0, &summary);
        }
        self.logged
            .lock()
            .insert(id, Arc::downgrade(&recorder.chain));
        self.live.lock().insert(
            id,
            Parts {
                part: 0,
                next_seq: 0,
                since: std::time::Instant::now(),
            },
        );
        recorder.append(start)?;
        let ticket = recorder.append(connection)?;
        Ok((recorder, ticket))
    }

    fn recover(&self) -> Result<(), StoreError> {
        for entry in self.sessions.iter() {
            let (key, value) = entry?;
            let Ok(mut summary) = serde_json::from_slice::<Summary>(&value) else {
                continue;
            };
            if summary.outcome == "live" {
                let id = parse_id(&summary.id)?;
                let mut prefix = [0u8; 16];
                prefix.copy_from_slice(&key);
                let (next_seq, prev) = match self.events.scan_prefix(prefix).last() {
                    Some(last) => {
                        let (k, chunk) = last?;
                        let first = u64::from_be_bytes(k[16..24].try_into().expect("24-byte key"));
                        let lines = chunk.split(|b| *b == b'\n').count() as u64;
                        let last_line = chunk.rsplit(|b| *b == b'\n').next().unwrap_or_default();
                        (first + lines, line_hash(last_line).unwrap_or_default())
                    }
                    None => (0, chain_start(&summary.id)),
                };
                let mut chain = Chain::new(&id, next_seq, prev);
                let end = Event::SessionEnd {
                    outcome: "interrupted",
                    error: Some("the agent stopped before the session ended"),
                    bytes_up: 0,
                    bytes_down: 0,
                    statements: summary.statements,
                    denied: summary.denied,
                };
                summary.bytes += chain.push(&end)?;
                chain.write(&self.events)?;
                summary.outcome = "interrupted".into();
                summary.end_us = Some(now_us());
                summary.events = chain.next_seq;
                self.seal(&id, &chain)?;
                self.sessions.insert(&key, serde_json::to_vec(&summary)?)?;
                tracing::warn!(session = %summary.id, events = chain.next_seq, "sealed a session the agent did not end (interrupted)");
            }
            if !self.shipped.contains_key(&key)?
                && !self.outbox.contains_key(&key)?
                && summary.outcome != "live"
            {
                self.outbox
                    .insert(key, serde_json::to_vec(&Outbox::default())?)?;
            }
        }
        self.db.flush()?;
        Ok(())
    }

    fn seal(&self, id: &ulid::Ulid, chain: &Chain) -> Result<(), StoreError> {
        let seal = Seal::sign(
            &self.key,
            &self.host,
            &id.to_string(),
            chain.next_seq,
            &chain.prev,
        );
        self.seals.insert(id_key(id), serde_json::to_vec(&seal)?)?;
        Ok(())
    }

    /// Fails while the last commit failed: nothing is written, in the log
    /// or in sled, while the store cannot write.
    fn writable(&self) -> Result<(), StoreError> {
        if self.commit.failing.load(Ordering::Relaxed) {
            let error = self.commit.last_error.lock().clone();
            return Err(StoreError::Flush(
                error.unwrap_or_else(|| "the last commit failed".into()),
            ));
        }
        Ok(())
    }

    fn request_commit(&self) {
        *self.commit.wanted.lock() = true;
        self.commit.wake.notify_one();
    }

    /// Summaries, oldest first, from `since_ms` (unix ms) on.
    pub fn summaries(&self, since_ms: u64) -> Result<Vec<Summary>, StoreError> {
        let from = ulid::Ulid::from_parts(since_ms, 0);
        let mut out = Vec::new();
        for entry in self.sessions.range(id_key(&from)..) {
            let (_, value) = entry?;
            if let Ok(summary) = serde_json::from_slice(&value) {
                out.push(summary);
            }
        }
        Ok(out)
    }

    pub fn summary(&self, id: &ulid::Ulid) -> Result<Summary, StoreError> {
        let value = self
            .sessions
            .get(id_key(id))?
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        Ok(serde_json::from_slice(&value)?)
    }

    /// A session's lines: every event written so far, then its seal once
    /// it has ended.
    pub fn lines(&self, id: &ulid::Ulid) -> Result<Vec<Vec<u8>>, StoreError> {
        let key = id_key(id);
        if !self.sessions.contains_key(key)? {
            return Err(StoreError::NotFound(id.to_string()));
        }
        let (mut lines, _) = self.lines_from(id, 0)?;
        if let Some(seal) = self.seals.get(key)? {
            lines.push(seal.to_vec());
        }
        Ok(lines)
    }

    /// Running sessions whose last part (or start) is `interval` old.
    pub fn parts_due(&self, interval: Duration) -> Vec<(ulid::Ulid, Parts)> {
        self.live
            .lock()
            .iter()
            .filter(|(_, parts)| parts.since.elapsed() >= interval)
            .map(|(id, parts)| (*id, *parts))
            .collect()
    }

    /// Notes a part shipped (if the session still runs).
    pub fn part_shipped(&self, id: &ulid::Ulid, part: u32, next_seq: u64) {
        if let Some(parts) = self.live.lock().get_mut(id) {
            *parts = Parts {
                part,
                next_seq,
                since: std::time::Instant::now(),
            };
        }
    }

    /// Event lines of a session written so far, from seq `from` on, and
    /// the seq after the last.
    pub fn lines_from(
        &self,
        id: &ulid::Ulid,
        from: u64,
    ) -> Result<(Vec<Vec<u8>>, u64), StoreError> {
        let id_key = id_key(id);
        let key = |seq: u64| event_key(&id_key, seq);
        // Locked first: lines leave the chain's memory only once in sled,
        // so each is read from one place or the other.
        let chain = self
            .logged
            .lock()
            .get(id)
            .and_then(std::sync::Weak::upgrade);
        let chain = chain.as_ref().map(|chain| chain.lock());
        // The chunk holding `from` starts at or before it.
        let start: sled::IVec = match self.events.range(key(0)..=key(from)).next_back() {
            Some(entry) => entry?.0,
            None => key(from).as_slice().into(),
        };
        let end: sled::IVec = key(u64::MAX).as_slice().into();
        // By seq: the lines in memory may come before those in sled (a
        // half the indexer could not put in yet, then a session's end
        // written to sled directly) as well as after them.
        let mut by_seq = std::collections::BTreeMap::new();
        for entry in self.events.range(start..=end) {
            let (chunk_key, chunk) = entry?;
            let first = u64::from_be_bytes(chunk_key[16..24].try_into().expect("24-byte key"));
            for (i, line) in chunk.split(|b| *b == b'\n').enumerate() {
                let seq = first + i as u64;
                if seq >= from {
                    by_seq.insert(seq, line.to_vec());
                }
            }
        }
        if let Some(chain) = chain {
            let indexing = chain.indexing.iter().flat_map(|pieces| pieces.lines());
            for (seq, line) in indexing.chain(chain.unindexed.lines()) {
                if seq >= from {
                    by_seq.entry(seq).or_insert_with(|| line.to_vec());
                }
            }
        }
        let next = by_seq.last_key_value().map_or(from, |(seq, _)| seq + 1);
        let lines = by_seq.into_values().collect();
        Ok((lines, next))
    }

    /// Removes a session entirely (pruning after shipping).
    pub fn remove(&self, id: &ulid::Ulid) -> Result<(), StoreError> {
        self.logged.lock().remove(id);
        let key = id_key(id);
        let mut batch = sled::Batch::default();
        for event in self.events.scan_prefix(key).keys() {
            batch.remove(event?);
        }
        self.events.apply_batch(batch)?;
        self.seals.remove(key)?;
        self.shipped.remove(key)?;
        self.sessions.remove(key)?;
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.commit.stop.store(true, Ordering::SeqCst);
        self.request_commit();
        if let Some(thread) = self.commit_thread.lock().take() {
            let _ = thread.join();
        }
    }
}

/// A point in the store's history: durable once committed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

/// The latest of the tickets raised into it, shared by the two directions
/// of a connection: what must be durable before the next answer goes to
/// the client.
#[derive(Debug, Default)]
pub struct TicketMark(std::sync::atomic::AtomicU64);

impl TicketMark {
    pub fn raise(&self, ticket: Ticket) {
        self.0.fetch_max(ticket.0, Ordering::SeqCst);
    }

    pub fn get(&self) -> Ticket {
        Ticket(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sessions::{format, view::SessionLog};

    fn open(dir: &Path) -> Arc<Store> {
        Store::open(
            &dir.join("sessions"),
            &dir.join("host.key"),
            "host-a".into(),
            u64::MAX,
        )
        .unwrap()
    }

    pub(crate) fn begin(store: &Arc<Store>) -> (Recorder, Ticket) {
        let id = ulid::Ulid::new();
        let summary = Summary {
            id: id.to_string(),
            outcome: "live".into(),
            ..Summary::default()
        };
        let start = Event::Output { data: b"start" };
        let connection = Event::Output {
            data: b"connection",
        };
        store
            .begin(id, summary, &start, &connection, false)
            .unwrap()
    }

    /// The seqs of a session's lines from `from` on, and the next seq.
    fn seqs(store: &Store, id: &ulid::Ulid, from: u64) -> (Vec<u64>, u64) {
        let (lines, next) = store.lines_from(id, from).unwrap();
        let seqs = lines
            .iter()
            .map(|l| {
                serde_json::from_slice::<serde_json::Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        (seqs, next)
    }

    fn verify(store: &Store, id: &ulid::Ulid) -> Result<format::Verified, format::VerifyError> {
        let lines = store.lines(id).unwrap();
        format::verify(lines.iter().map(|l| l.as_ref()), None)
    }

    #[tokio::test]
    async fn statements_are_durable_when_waited_for_and_sessions_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (recorder, ticket) = begin(&store);
        recorder.durable(ticket).await.unwrap();
        // Many sessions waiting at once share flushes.
        let mut waits = Vec::new();
        for _ in 0..64 {
            let (recorder, ticket) = begin(&store);
            waits.push(async move {
                recorder.durable(ticket).await.unwrap();
                recorder
            });
        }
        let recorders = futures::future::join_all(waits).await;
        assert_eq!(store.summaries(0).unwrap().len(), 65);
        recorder.finish("closed", None, 1, 2);
        // The session_start here is not a real one, so verification stops
        // at the first event; its seal is there and says so.
        let lines = store.lines(&recorder.id).unwrap();
        assert_eq!(lines.len(), 4, "start, connection, end, seal");
        assert!(matches!(
            verify(&store, &recorder.id),
            Err(format::VerifyError::Unreadable { seq: 0, .. })
        ));
        drop(recorders);
        // Dropped recorders end as cancelled and all wait in the outbox.
        assert_eq!(store.outbox.len(), 65);
    }

    /// The commit thread wakes one waiter per commit, which releases the
    /// others: sessions waiting on several workers, each again and again,
    /// are all released every time (a lost wake-up would hang a round
    /// until the deadline).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_waiter_is_released_by_the_commit_that_covers_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let sessions = (0..16)
            .map(|_| {
                let (recorder, _) = begin(&store);
                tokio::spawn(async move {
                    for n in 0..200u64 {
                        let ticket = recorder
                            .append(&Event::Input {
                                data: format!("SELECT {n}").as_bytes(),
                            })
                            .unwrap();
                        recorder.durable(ticket).await.unwrap();
                        let synced = recorder.store.commit.synced.load(Ordering::SeqCst);
                        assert!(synced >= ticket.0, "released before its commit");
                    }
                })
            })
            .collect::<Vec<_>>();
        let all = futures::future::try_join_all(sessions);
        tokio::time::timeout(std::time::Duration::from_secs(60), all)
            .await
            .expect("a waiter was never released")
            .unwrap();
    }

    #[test]
    fn a_session_left_live_is_sealed_as_interrupted_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let id = ulid::Ulid::new();
        {
            let store = open(dir.path());
            let summary = Summary {
                id: id.to_string(),
                outcome: "live".into(),
                ..Summary::default()
            };
            let workload = crate::workload::Workload::default();
            let start = Event::SessionStart {
                schema: format::SCHEMA_VERSION,
                session_id: &summary.id.clone(),
                host: "host-a",
                protocol: "postgres",
                target: "db",
                client: "127.0.0.1:1".parse().unwrap(),
                orig_dst: "127.0.0.1:2".parse().unwrap(),
                workload: &workload,
                workloads: &[],
                record: crate::policy::RecordMode::Commands,
                policy_bundle: None,
            };
            let connection = Event::Output { data: b"" };
            let (recorder, _) = store
                .begin(id, summary, &start, &connection, false)
                .unwrap();
            store.flush().unwrap();
            // A crash: the recorder never ends the session.
            recorder.finished.store(true, Ordering::SeqCst);
        }
        let store = open(dir.path());
        let summary = store.summary(&id).unwrap();
        assert_eq!(summary.outcome, "interrupted");
        let verified = verify(&store, &id).unwrap();
        assert_eq!(verified.events, 3);
        let log = SessionLog {
            lines: store
                .lines(&id)
                .unwrap()
                .iter()
                .map(|l| l.to_vec())
                .collect(),
        };
        assert_eq!(log.summary().outcome, "interrupted");
        assert!(store.outbox.contains_key(id.0.to_be_bytes()).unwrap());
    }

    #[tokio::test]
    async fn what_the_commit_log_made_durable_is_recovered_without_sled() {
        let crashed = tempfile::tempdir().unwrap();
        let (live, ended) = {
            let store = open(crashed.path());
            let (live, _) = begin(&store);
            let ticket = live.append(&Event::Output { data: b"durable" }).unwrap();
            live.durable(ticket).await.unwrap();
            let (ended, ticket) = begin(&store);
            ended.durable(ticket).await.unwrap();
            ended.finish("closed", None, 1, 2);
            let later = live.append(&Event::Output { data: b"durable" }).unwrap();
            live.durable(later).await.unwrap();
            // Made durable by the log alone: the log is copied beside a
            // fresh host key, as if sled had never flushed.
            let copy = crashed.path().join("copy");
            std::fs::create_dir_all(copy.join("sessions")).unwrap();
            std::fs::copy(
                crashed.path().join("sessions").join(LOG_FILE),
                copy.join("sessions").join(LOG_FILE),
            )
            .unwrap();
            live.finished.store(true, Ordering::SeqCst);
            (live.id, ended.id)
        };
        let store = open(&crashed.path().join("copy"));
        let summary = store.summary(&live).unwrap();
        assert_eq!(summary.outcome, "interrupted");
        let lines = store.lines(&live).unwrap();
        // start, connection, two outputs, the interrupted end, the seal
        assert_eq!(lines.len(), 6, "{lines:?}");
        // The other's end went to sled only, which never flushed: it is
        // found with what the log kept, and sealed as interrupted.
        assert_eq!(store.summary(&ended).unwrap().outcome, "interrupted");
        assert_eq!(store.lines(&ended).unwrap().len(), 4);
        assert!(store.outbox.contains_key(id_key(&ended)).unwrap());
    }

    #[tokio::test]
    async fn logged_lines_are_read_before_they_reach_sled() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (recorder, _) = begin(&store);
        let ticket = recorder.append(&Event::Output { data: b"x" }).unwrap();
        recorder.durable(ticket).await.unwrap();
        // Durable in the log; sled gets it within a second.
        let (lines, next) = store.lines_from(&recorder.id, 0).unwrap();
        assert_eq!((lines.len(), next), (3, 3));
        let (lines, next) = store.lines_from(&recorder.id, 2).unwrap();
        assert_eq!((lines.len(), next), (1, 3));
    }

    #[tokio::test]
    async fn events_written_in_chunks_read_back_in_order_from_any_seq() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (recorder, ticket) = begin(&store);
        recorder.durable(ticket).await.unwrap();
        // What was logged reaches sled as one chunk, within a second:
        // seqs 0..3, then 3..8.
        let chunks = || {
            store
                .events
                .scan_prefix(recorder.id.0.to_be_bytes())
                .count()
        };
        let wait_chunks = async |n| {
            let waited = std::time::Instant::now();
            while chunks() < n && waited.elapsed() < Duration::from_secs(3) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(chunks(), n);
        };
        for (batch, indexed) in [(vec![1], 1), (vec![3, 2], 2)] {
            for events in batch {
                let mut last = None;
                for _ in 0..events {
                    last = Some(recorder.append(&Event::Output { data: b"x" }).unwrap());
                }
                recorder.durable(last.unwrap()).await.unwrap();
            }
            wait_chunks(indexed).await;
        }
        let seqs = |from| seqs(&store, &recorder.id, from);
        assert_eq!(seqs(0), ((0..8).collect(), 8));
        assert_eq!(seqs(4), ((4..8).collect(), 8), "from inside a chunk");
        assert_eq!(seqs(3), ((3..8).collect(), 8), "from a chunk's start");
        assert_eq!(seqs(8), (vec![], 8));
    }

    #[tokio::test]
    async fn logged_lines_go_into_sled_as_small_pieces_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (recorder, ticket) = begin(&store);
        recorder.durable(ticket).await.unwrap();
        // 40 commits of ~300 bytes: several pieces.
        for _ in 0..40 {
            let ticket = recorder
                .append(&Event::Output { data: &[b'x'; 200] })
                .unwrap();
            recorder.durable(ticket).await.unwrap();
        }
        let seqs = || seqs(&store, &recorder.id, 0);
        let all = ((0..42).collect::<Vec<u64>>(), 42);
        assert_eq!(seqs(), all, "read from the log's pieces");
        let waited = std::time::Instant::now();
        while store
            .events
            .scan_prefix(recorder.id.0.to_be_bytes())
            .count()
            < 2
            && waited.elapsed() < Duration::from_secs(3)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let values: Vec<_> = store
            .events
            .scan_prefix(recorder.id.0.to_be_bytes())
            .values()
            .map(Result::unwrap)
            .collect();
        assert!(values.len() > 2, "{} values", values.len());
        // A piece is closed once it holds `PIECE_BYTES`: one chunk more
        // at most.
        assert!(values.iter().all(|v| v.len() < 2 * 1024), "{values:?}");
        assert_eq!(seqs(), all, "read from sled");
    }

    #[tokio::test]
    async fn a_small_log_swaps_halves_and_overflows_into_sled_losing_nothing() {
        let dir = tempfile::tempdir().unwrap();
        // A 1 MiB quota: a 256 KiB log, halves of 128 KiB.
        let open_small = || {
            Store::open(
                &dir.path().join("sessions"),
                &dir.path().join("host.key"),
                "host-a".into(),
                1 << 20,
            )
            .unwrap()
        };
        let store = open_small();
        let (recorder, ticket) = begin(&store);
        recorder.durable(ticket).await.unwrap();
        let output = [b'x'; 200];
        // Small commits: the halves swap several times.
        for _ in 0..2_000 {
            let ticket = recorder.append(&Event::Output { data: &output }).unwrap();
            recorder.durable(ticket).await.unwrap();
        }
        // One commit bigger than a half.
        let mut last = None;
        for _ in 0..1_000 {
            last = Some(recorder.append(&Event::Output { data: &output }).unwrap());
        }
        recorder.durable(last.unwrap()).await.unwrap();
        let id = recorder.id;
        let expected: Vec<u64> = (0..3_002).collect();
        let seqs = |store: &Store| seqs(store, &id, 0).0;
        assert!(seqs(&store) == expected, "every line, in order");
        // A crash: the recorder never ends the session.
        recorder.finished.store(true, Ordering::SeqCst);
        drop(recorder);
        drop(store);
        let store = open_small();
        let mut expected = expected;
        expected.push(3_002);
        assert!(
            seqs(&store) == expected,
            "nothing lost, and the interrupted end added"
        );
    }

    #[test]
    fn a_store_over_quota_refuses_new_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            &dir.path().join("s"),
            &dir.path().join("k"),
            "h".into(),
            1024,
        )
        .unwrap();
        let (recorder, ticket) = begin(&store);
        futures::executor::block_on(recorder.durable(ticket)).unwrap();
        // The commit thread measures the store twice a second.
        std::thread::sleep(Duration::from_millis(700));
        assert!(matches!(
            store.admit(),
            Err(StoreError::Full { max: 1024, .. })
        ));
    }
}
