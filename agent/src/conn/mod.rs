//! The stage every connection goes through, whatever its protocol.
//!
//! ```text
//! accept ─▶ admit (admit.rs): kernel record → workload → target → decision
//!                             → session start durable
//!         ─▶ the target's protocol (proxy::tcp | proxy::ssh | proxy::postgres)
//!              asks a person through `ask` (hold.rs) when a rule says so
//!         ─▶ Conn dropped: its end written once, to the access line and to
//!            the session record, with the same outcome
//! ```
mod admit;
mod hold;
mod registry;

pub use admit::{Admitted, Gate, Refusal, Refused, admit};
pub use hold::{Asked, ask};
pub use registry::ConnRegistry;

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use crate::{
    access::{AccessRecord, ByteCounters, Outcome, StatementCounts},
    sessions::Recorder,
};

/// One connection: its access record and, once admitted, its session
/// record. Whatever ends it (its protocol, a refusal, the task being
/// cancelled at shutdown), dropping it writes both ends, once, alike.
pub struct Conn {
    access: AccessRecord,
    recorder: Option<Arc<Recorder>>,
}

impl Conn {
    pub fn new(session_id: ulid::Ulid, client: SocketAddr) -> Self {
        Self {
            access: AccessRecord::new(session_id, client),
            recorder: None,
        }
    }

    /// How the connection ended; a later call replaces an earlier one.
    pub fn end(&mut self, outcome: Outcome, error: Option<String>) {
        self.access.finish(outcome, error);
    }

    /// Why it was decided as it was, or refused.
    pub fn set_reason(&mut self, reason: String) {
        self.access.reason = Some(reason);
    }

    /// Ends it as refused for `why`: the outcome, and the reason or error
    /// its access line gives.
    pub fn refuse(&mut self, why: &Refusal) {
        let error = match why {
            Refusal::Unresolved(_) | Refusal::Unrecordable(_) => Some(why.to_string()),
            _ => None,
        };
        match why {
            // The decision's reason is already the access line's.
            Refusal::Unresolved(_) | Refusal::Denied(_) => {}
            _ => self.set_reason(why.to_string()),
        }
        self.end(why.outcome(), error);
    }

    /// Bytes each way, counted by the protocol's copy loops.
    pub fn bytes(&self) -> &Arc<ByteCounters> {
        &self.access.bytes
    }

    /// Statement decisions, for protocols that decide statements; they
    /// appear in the access line.
    pub fn count_statements(&mut self) -> Arc<StatementCounts> {
        self.access
            .statements
            .get_or_insert_with(Default::default)
            .clone()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let access = &self.access;
        if let Some(recorder) = &self.recorder {
            recorder.finish(
                access.outcome.as_str(),
                access.error.as_deref(),
                access.bytes.up.load(Ordering::Relaxed),
                access.bytes.down.load(Ordering::Relaxed),
            );
        }
        access.write();
    }
}

#[cfg(test)]
mod tests;
