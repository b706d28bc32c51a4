//! The approval hold, one for every protocol: a command (a connection, an
//! SSH request, a SQL statement) waits here for a person's answer. The
//! protocol supplies only what to tell its client while it waits, and how
//! to notice that the client gave up.
use std::{fmt::Display, future::Future, sync::Arc};

use crate::{
    approvals::{ApprovalError, Approvals, NewRequest, RequestRecord, RequestState},
    sessions::Recorder,
};

/// How a hold ended.
#[derive(Debug)]
pub enum Asked<W> {
    /// A person (or enough of them) said yes.
    Approved(Box<RequestRecord>),
    /// Denied, or nobody answered in time: why, for the client.
    Refused(String),
    /// The client gave up first (`why`, as `gave_up` said it); the
    /// request was withdrawn.
    GaveUp { id: String, why: W },
}

/// Holds `request` of `recorder`'s session until it is answered, times
/// out, or `gave_up` resolves (then the request is withdrawn). `waiting`
/// is called once the request is durable, to tell the client.
///
/// An error means the session cannot record the request or its outcome
/// ([`ApprovalError::Record`]: the session ends, in every protocol), or the
/// approval records failed (the command is refused).
pub async fn ask<W: Display>(
    approvals: &Arc<Approvals>,
    recorder: &Arc<Recorder>,
    request: NewRequest<'_>,
    waiting: impl AsyncFnOnce(&RequestRecord),
    gave_up: impl Future<Output = W>,
) -> Result<Asked<W>, ApprovalError> {
    if request.spec.require_reason && request.requester.reason.is_none() {
        return Ok(Asked::Refused(format!(
            "rule {:?} needs a stated reason before anyone is asked: run the client with INTERLOCK_REASON=\"why\" in its environment (PostgreSQL: or a /* reason: why */ comment, or application_name 'reason: why')",
            request.rule
        )));
    }
    let mut held = approvals.hold(recorder, request).await?;
    let id = held.record().id.clone();
    tracing::info!(%id, rule = %held.record().rule, "held for approval");
    waiting(held.record()).await;
    tokio::pin!(gave_up);
    let record = tokio::select! {
        record = held.outcome() => record?,
        why = &mut gave_up => {
            held.withdraw(&why.to_string())?;
            tracing::info!(%id, %why, "approval request withdrawn");
            return Ok(Asked::GaveUp { id, why });
        }
    };
    if record.state == RequestState::Approved {
        tracing::info!(%id, by = ?record.deciders(), "approved");
        Ok(Asked::Approved(Box::new(record)))
    } else {
        tracing::info!(%id, state = record.state.as_str(), "refused");
        Ok(Asked::Refused(record.refusal()))
    }
}
