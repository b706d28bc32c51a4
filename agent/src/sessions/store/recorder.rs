//! A session's recorder: appends its events (in memory, durable at the
//! next group commit, or awaited), counts its statements, ends it.
use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use parking_lot::Mutex;

use super::{
    Outbox, Store, StoreError, Summary, Ticket,
    commit::{CHUNK_LIMIT, Chain},
    id_key, now_us,
};
use crate::sessions::event::Event;

/// Records one session. Shared by the directions of a connection.
pub struct Recorder {
    pub(super) store: Arc<Store>,
    pub(super) id: ulid::Ulid,
    pub(super) record_output: bool,
    pub(super) chain: Arc<Mutex<Chain>>,
    pub(super) summary: Mutex<Summary>,
    pub(super) statements: AtomicU64,
    pub(super) finished: AtomicBool,
    /// The session's decision counters (allowed, denied), taken once.
    pub(super) metrics: std::sync::OnceLock<(
        prometheus_client::metrics::counter::Counter,
        prometheus_client::metrics::counter::Counter,
    )>,
}

impl Recorder {
    pub fn id(&self) -> ulid::Ulid {
        self.id
    }

    /// Whether the server's output is recorded (`record = "full"`).
    pub fn records_output(&self) -> bool {
        self.record_output
    }

    /// The next statement number.
    pub fn next_statement(&self) -> u64 {
        self.statements.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Appends an event; it is durable once [`Recorder::durable`] of the
    /// returned ticket (or a later one) returns.
    pub fn append(&self, event: &Event<'_>) -> Result<Ticket, StoreError> {
        self.store.writable()?;
        let bytes = {
            let mut chain = self.chain.lock();
            let bytes = chain.push(event)?;
            if !chain.listed {
                chain.listed = true;
                self.store.commit.dirty.lock().push(self.chain.clone());
            }
            if chain.pending.len() >= CHUNK_LIMIT {
                // Output streaming in: committed now, so a session holds
                // about this much in memory at most, whatever it records.
                self.store.request_commit();
            }
            bytes
        };
        self.summary.lock().bytes += bytes;
        Ok(Ticket(
            self.store.commit.written.fetch_add(1, Ordering::SeqCst) + 1,
        ))
    }

    /// Starts making everything appended up to `ticket` durable without
    /// waiting: a group commit is asked for.
    pub fn commit_soon(&self, ticket: Ticket) {
        if self.store.commit.synced.load(Ordering::SeqCst) < ticket.0 {
            self.store.request_commit();
        }
    }

    /// Waits until everything appended up to `ticket` is on disk.
    pub async fn durable(&self, ticket: Ticket) -> Result<(), StoreError> {
        let commit = &self.store.commit;
        if commit.synced.load(Ordering::SeqCst) >= ticket.0 {
            return Ok(());
        }
        self.store.request_commit();
        let mut seen = commit.committed.subscribe();
        loop {
            // Whoever the commit thread wakes tells the others.
            commit.publish();
            let state = *seen.borrow_and_update();
            if state.generation >= ticket.0 {
                return Ok(());
            }
            if state.failed {
                let error = commit.last_error.lock().clone();
                return Err(StoreError::Flush(
                    error.unwrap_or_else(|| "the store is closed".into()),
                ));
            }
            tokio::select! {
                changed = seen.changed() => if changed.is_err() {
                    return Err(StoreError::Flush("the store is closed".into()));
                },
                () = commit.released.notified() => {}
            }
        }
    }

    pub(super) fn put_summary(&self) -> Result<(), StoreError> {
        let summary = self.summary.lock();
        self.store
            .sessions
            .insert(id_key(&self.id), serde_json::to_vec(&*summary)?)?;
        Ok(())
    }

    pub fn count_statement(&self, denied: bool) {
        let mut summary = self.summary.lock();
        summary.statements += 1;
        summary.denied += u64::from(denied);
        let (allowed, refused) = self.metrics.get_or_init(|| {
            let kind = match summary.protocol.as_str() {
                "postgres" => "statement",
                "ssh" => "ssh_request",
                _ => "http_request",
            };
            let metrics = crate::metrics::get();
            (
                metrics.decision(&summary.target, kind, "allow"),
                metrics.decision(&summary.target, kind, "deny"),
            )
        });
        match denied {
            true => refused.inc(),
            false => allowed.inc(),
        };
    }

    /// Ends the session: its `session_end` event, the seal, the summary,
    /// and a place in the outbox. Later calls do nothing.
    pub fn finish(&self, outcome: &str, error: Option<&str>, bytes_up: u64, bytes_down: u64) {
        if self.finished.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Err(error) = self.try_finish(outcome, error, bytes_up, bytes_down) {
            tracing::error!(%error, session = %self.id, "cannot end the session's record; it is sealed at the next start");
        }
    }

    fn try_finish(
        &self,
        outcome: &str,
        error: Option<&str>,
        bytes_up: u64,
        bytes_down: u64,
    ) -> Result<(), StoreError> {
        self.store.writable()?;
        let (statements, denied) = {
            let summary = self.summary.lock();
            (summary.statements, summary.denied)
        };
        let mut chain = self.chain.lock();
        let bytes = chain.push(&Event::SessionEnd {
            outcome,
            error,
            bytes_up,
            bytes_down,
            statements,
            denied,
        })?;
        // sled must not meet a full disk (see `commit::check_room`).
        super::commit::check_room(&self.store.path, chain.unwritten_bytes())?;
        // Into sled, after its logged chunks, before the outbox entry
        // that lets the shipper read it. Durable at sled's next flush
        // (within a second); a crash before that seals the session as
        // interrupted at the next start, from what the log kept.
        chain.write(&self.store.events)?;
        self.store.seal(&self.id, &chain)?;
        {
            let mut summary = self.summary.lock();
            summary.bytes += bytes;
            summary.outcome = outcome.to_owned();
            summary.end_us = Some(now_us());
            summary.events = chain.next_seq;
        }
        drop(chain);
        self.put_summary()?;
        self.store
            .outbox
            .insert(id_key(&self.id), serde_json::to_vec(&Outbox::default())?)?;
        self.store.live.lock().remove(&self.id);
        self.store.logged.lock().remove(&self.id);
        self.store.commit.written.fetch_add(1, Ordering::SeqCst);
        self.store.request_commit();
        self.store.ship_wake.notify_one();
        Ok(())
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // A connection task cancelled at shutdown still ends its record.
        self.finish("cancelled", None, 0, 0);
    }
}
