//! A held command's wait, from the side of the connection that holds it.
use std::{sync::Arc, time::Instant};

use tokio::sync::oneshot;

use super::{Approvals, RequestRecord, RequestState};
use crate::sessions::{Event, Recorder, StoreError};

/// A held command's wait. Dropping it before it ends withdraws the
/// request (as [`Held::withdraw`] does, with a reason).
pub struct Held {
    pub(super) approvals: Arc<Approvals>,
    pub(super) recorder: Arc<Recorder>,
    pub(super) record: RequestRecord,
    pub(super) wait: Option<oneshot::Receiver<RequestRecord>>,
    pub(super) deadline: Instant,
}

impl Held {
    pub fn record(&self) -> &RequestRecord {
        &self.record
    }

    /// Waits for the outcome (approved, denied, or timed out) and records
    /// it in the session.
    pub async fn outcome(&mut self) -> Result<RequestRecord, StoreError> {
        let Some(wait) = self.wait.as_mut() else {
            return Ok(self.record.clone());
        };
        let deadline = tokio::time::Instant::from_std(self.deadline);
        let outcome = match tokio::time::timeout_at(deadline, &mut *wait).await {
            Ok(Ok(record)) => record,
            // Timed out; an answer racing the deadline still wins.
            _ => match self
                .approvals
                .resolve(&self.record.id, RequestState::TimedOut)
            {
                Some(record) => record,
                None => wait.try_recv().unwrap_or_else(|_| self.record.clone()),
            },
        };
        self.wait = None;
        self.record = outcome.clone();
        record_outcome(&self.recorder, &outcome, None)?;
        Ok(outcome)
    }

    /// Withdraws the request (the client cancelled or went away), and
    /// records why in the session.
    pub fn withdraw(mut self, why: &str) -> Result<RequestRecord, StoreError> {
        self.wait = None;
        let record = self
            .approvals
            .resolve(&self.record.id, RequestState::Withdrawn)
            .unwrap_or_else(|| RequestRecord {
                state: RequestState::Withdrawn,
                ..self.record.clone()
            });
        record_outcome(&self.recorder, &record, Some(why))?;
        Ok(record)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.wait.is_some()
            && let Some(record) = self
                .approvals
                .resolve(&self.record.id, RequestState::Withdrawn)
        {
            let _ = record_outcome(&self.recorder, &record, Some("the wait was dropped"));
        }
    }
}

/// A request's end as an event of its session; `reason` when the client
/// ended it, else the answers' last reason.
pub(super) fn record_outcome(
    recorder: &Recorder,
    record: &RequestRecord,
    reason: Option<&str>,
) -> Result<(), StoreError> {
    let by = match record.state {
        RequestState::Withdrawn => Vec::new(),
        _ => record.deciders(),
    };
    recorder.append(&Event::ApprovalDecided {
        id: &record.id,
        outcome: record.state.as_str(),
        by: &by,
        reason: reason.or_else(|| {
            record
                .answers
                .iter()
                .rev()
                .find_map(|a| a.reason.as_deref())
        }),
        grant: record.grant_id.as_deref(),
    })?;
    Ok(())
}
