//! Server → client: each response is matched to the client message that
//! asked for it, so the agent knows which result a row belongs to (to mask
//! it), when a statement completed (to audit it), and which responses are
//! its own to swallow.
//!
//! The client side pushes an [`Expect`] for every message that gets an
//! answer, before sending it on; this side takes them in order. Rows that
//! need no masking are never buffered whole: a DataRow or CopyData passes
//! through as its bytes arrive, and a read's worth of untouched frames goes
//! out in one write.
use crate::{masking::MaskSet, sessions::StatementOutcome};

use parking_lot::Mutex;
use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, atomic::AtomicU64, atomic::Ordering},
};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{
    Session, StatementCounts,
    rows::{MaskError, RowPlan},
    statements::Audit,
    wire::MAX_MESSAGE,
};

/// What the server will answer next, one entry per client message that
/// gets a response, in the order they were sent.
pub enum Expect {
    /// A simple Query (also a fast-path call, or a denial the agent sent in
    /// its place): results, then ReadyForQuery. `hide_ready` when the agent
    /// sent it in the middle of an extended-protocol batch, where the client
    /// expects no ReadyForQuery until its own Sync.
    Query {
        audits: VecDeque<Audit>,
        masks: Option<Arc<MaskSet>>,
        hide_ready: bool,
        /// The agent's own `RAISE` of a denial: its error goes to the
        /// client without the server's CONTEXT (a DO block the client
        /// never wrote).
        raised: bool,
    },
    Parse,
    Bind {
        portal: String,
    },
    DescribeStatement,
    /// `hidden`: the agent asked, to learn a portal's columns the client
    /// never described; the answer is not the client's.
    DescribePortal {
        portal: String,
        masks: Option<Arc<MaskSet>>,
        hidden: bool,
    },
    Execute {
        portal: String,
        audit: Option<Audit>,
        masks: Option<Arc<MaskSet>>,
    },
    Close,
    Sync,
    /// The agent's own `SET ROLE` after a `DISCARD ALL` (which put the
    /// login role back): nothing of its answer is the client's, and its
    /// failure ends the session.
    Repin,
    /// A Sync the client sent after the Execute of a `COPY … FROM STDIN`
    /// and before its CopyDone (tokio-postgres and others do): the server
    /// ignores it while in copy-in mode, and answers it as any Sync when
    /// the COPY failed before that mode began.
    SyncInCopy,
}

pub type Expected = Mutex<VecDeque<Expect>>;

/// A server message that answers nothing asked; `on_frame` names it.
const OUT_OF_STEP: ResponseError = ResponseError::OutOfStep('?');

#[derive(Debug, thiserror::Error)]
pub enum ResponseError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Mask(#[from] MaskError),
    #[error("server message {0:?} does not answer anything the client asked")]
    OutOfStep(char),
    #[error(
        "rows for a portal whose columns the agent does not know; refusing to pass them unmasked"
    )]
    UndescribedPortal,
    #[error("malformed server message: {0}")]
    Malformed(String),
    #[error(transparent)]
    Record(#[from] crate::sessions::StoreError),
    /// The store failed while the client had part of a message: it cannot
    /// be told in its protocol, only cut off.
    #[error("{0} (inside a message to the client)")]
    RecordInsideMessage(crate::sessions::StoreError),
    #[error("the session's role could not be set again after DISCARD ALL")]
    Unpinned,
}

/// Frames that may stream (unmasked rows, COPY data) pass as their bytes
/// arrive only when bigger than this (a read's size).
const STREAM_FROM: usize = 64 * 1024;

/// What to do with one response frame.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Act {
    Forward,
    /// The agent's own question's answer: not sent on.
    Drop,
    /// Rewritten (masked) into the output buffer.
    Replaced,
}

/// The server → client state of one session.
pub struct Responses<'s> {
    session: &'s Session,
    counts: &'s StatementCounts,
    expected: &'s Expected,
    /// The entry now being answered.
    active: Option<Expect>,
    /// After an error in an extended-protocol batch the server ignores
    /// everything up to the client's Sync: so does this side.
    skip_to_sync: bool,
    /// The server is (or was, since the last ReadyForQuery) in copy-in
    /// mode: the Syncs sent meanwhile get no answer.
    copy_in: bool,
    /// The masking plan of the result now streaming.
    plan: Option<Arc<RowPlan>>,
    /// Plans of portals described while masking is on, by portal name.
    portals: HashMap<String, Arc<RowPlan>>,
    /// NoticeResponses from the client side (a statement held for
    /// approval), written between two whole server messages.
    notices: tokio::sync::mpsc::UnboundedReceiver<BytesMut>,
}

/// Portal plans kept at most (named portals live until their transaction
/// ends, which this side does not track).
const MAX_PORTALS: usize = 1024;

impl<'s> Responses<'s> {
    pub fn new(
        session: &'s Session,
        counts: &'s StatementCounts,
        expected: &'s Expected,
        notices: tokio::sync::mpsc::UnboundedReceiver<BytesMut>,
    ) -> Self {
        Self {
            session,
            counts,
            expected,
            active: None,
            skip_to_sync: false,
            copy_in: false,
            plan: None,
            portals: HashMap::new(),
            notices,
        }
    }

    /// Waits until the statements sent upstream so far are on disk: the
    /// client sees no answer to a statement before its record is durable.
    async fn released(&self) -> Result<(), ResponseError> {
        let session = self.session;
        Ok(session.recorder.durable(session.answers.get()).await?)
    }

    /// Makes the next expected entry the active one, if none is.
    fn ensure_active(&mut self) {
        if self.active.is_none() {
            let mut expected = self.expected.lock();
            while let Some(mut next) = expected.pop_front() {
                if let Expect::SyncInCopy = next {
                    if self.copy_in && !self.skip_to_sync {
                        continue;
                    }
                    next = Expect::Sync;
                }
                if self.skip_to_sync && !matches!(next, Expect::Sync) {
                    self.discard(next);
                    continue;
                }
                self.skip_to_sync = false;
                if let Expect::Execute { portal, masks, .. } = &next {
                    self.plan = masks
                        .as_ref()
                        .and_then(|_| self.portals.get(portal).cloned());
                }
                self.active = Some(next);
                break;
            }
        }
    }

    /// Takes the active entry (the frame completes it).
    fn take_active(&mut self) -> Option<Expect> {
        self.ensure_active();
        self.plan = None;
        self.active.take()
    }

    /// An entry the server will not answer: its statements did not run.
    fn discard(&self, entry: Expect) {
        match entry {
            Expect::Query { audits, .. } => {
                for audit in audits {
                    audit.finish(self.session, self.counts, StatementOutcome::NotRun, None);
                }
            }
            Expect::Execute {
                audit: Some(audit), ..
            } => audit.finish(self.session, self.counts, StatementOutcome::NotRun, None),
            _ => {}
        }
    }

    /// Whether a frame may pass as its bytes arrive, without being held
    /// whole: rows that are not masked, and COPY data.
    fn streams(&mut self, tag: u8) -> Result<bool, ResponseError> {
        match tag {
            b'd' => Ok(true),
            b'D' => {
                self.ensure_active();
                let masked = match &self.active {
                    Some(Expect::Execute { masks: Some(_), .. }) if self.plan.is_none() => {
                        return Err(ResponseError::UndescribedPortal);
                    }
                    _ => self.plan.as_ref().is_some_and(|plan| plan.is_active()),
                };
                Ok(!masked)
            }
            _ => Ok(false),
        }
    }

    /// Handles one frame: `frame` is the whole frame, or `None` for a
    /// streamed one (see [`Self::streams`]). Masked rows are appended to
    /// `out`.
    pub(super) fn on_frame(
        &mut self,
        tag: u8,
        frame: Option<&[u8]>,
        out: &mut BytesMut,
    ) -> Result<Act, ResponseError> {
        let body = frame.map_or(&[][..], |f| &f[5..]);
        self.ensure_active();
        if let Some(Expect::Repin) = self.active {
            return match tag {
                b'E' => Err(ResponseError::Unpinned),
                b'Z' => {
                    self.active = None;
                    Ok(Act::Drop)
                }
                _ => Ok(Act::Drop),
            };
        }
        match tag {
            b'D' => self.on_data_row(frame, out),
            b'T' => self.on_row_description(body),
            b'n' => self.on_no_data(),
            b'C' | b'I' => self.on_complete(tag, body),
            b's' => match self.take_active().ok_or(OUT_OF_STEP)? {
                Expect::Execute { audit, .. } => {
                    if let Some(audit) = audit {
                        audit.finish(self.session, self.counts, StatementOutcome::Ok, None);
                    }
                    Ok(Act::Forward)
                }
                _ => Err(OUT_OF_STEP),
            },
            b'1' | b'2' | b'3' => {
                match (tag, self.take_active().ok_or(OUT_OF_STEP)?) {
                    (b'1', Expect::Parse) | (b'3', Expect::Close) => {}
                    (b'2', Expect::Bind { portal }) => {
                        self.portals.remove(&portal);
                    }
                    _ => return Err(OUT_OF_STEP),
                }
                Ok(Act::Forward)
            }
            // ParameterDescription: RowDescription or NoData follows.
            b't' => match &self.active {
                Some(Expect::DescribeStatement) => Ok(Act::Forward),
                _ => Err(OUT_OF_STEP),
            },
            b'E' => Ok(self.on_error(body, out)),
            // CopyInResponse: the Syncs the client sends until CopyDone are
            // ignored by the server.
            b'G' => {
                self.copy_in = true;
                Ok(Act::Forward)
            }
            b'Z' => self.on_ready(),
            // Notices, notifications, parameter changes, COPY and
            // function-call responses belong to whatever is running.
            _ => Ok(Act::Forward),
        }
        .map_err(|error| match error {
            ResponseError::OutOfStep(_) => ResponseError::OutOfStep(tag as char),
            other => other,
        })
    }

    /// DataRow: masked by the result's plan, counted in its audit.
    fn on_data_row(
        &mut self,
        frame: Option<&[u8]>,
        out: &mut BytesMut,
    ) -> Result<Act, ResponseError> {
        let masked = match (&self.plan, frame) {
            (Some(plan), Some(frame)) => match self.active.as_ref() {
                Some(
                    Expect::Query {
                        masks: Some(masks), ..
                    }
                    | Expect::Execute {
                        masks: Some(masks), ..
                    },
                ) => plan.mask_row(masks, frame, out)?,
                _ => return Err(OUT_OF_STEP),
            },
            _ => None,
        };
        let audit = match self.active.as_mut() {
            Some(Expect::Query { audits, .. }) => audits.front_mut(),
            Some(Expect::Execute { audit, .. }) => audit.as_mut(),
            _ => return Err(OUT_OF_STEP),
        };
        if let Some(audit) = audit {
            audit.rows += 1;
            audit.masked += u64::from(masked.unwrap_or(0));
        }
        Ok(if masked.is_some() {
            Act::Replaced
        } else {
            Act::Forward
        })
    }

    /// RowDescription: the plan that masks the rows that follow (a
    /// query's now, a portal's for its Execute).
    fn on_row_description(&mut self, body: &[u8]) -> Result<Act, ResponseError> {
        match self.take_active().ok_or(OUT_OF_STEP)? {
            Expect::Query {
                audits,
                masks,
                hide_ready,
                raised,
            } => {
                self.plan = masks
                    .as_ref()
                    .map(|m| RowPlan::new(m, body))
                    .transpose()?
                    .map(Arc::new);
                self.active = Some(Expect::Query {
                    audits,
                    masks,
                    hide_ready,
                    raised,
                });
                Ok(Act::Forward)
            }
            Expect::DescribeStatement => Ok(Act::Forward),
            Expect::DescribePortal {
                portal,
                masks,
                hidden,
            } => {
                if let Some(masks) = masks {
                    let plan = Arc::new(RowPlan::new(&masks, body)?);
                    if self.portals.len() >= MAX_PORTALS {
                        self.portals.clear();
                    }
                    self.portals.insert(portal, plan);
                }
                Ok(if hidden { Act::Drop } else { Act::Forward })
            }
            _ => Err(OUT_OF_STEP),
        }
    }

    /// NoData: the statement or portal returns no rows.
    fn on_no_data(&mut self) -> Result<Act, ResponseError> {
        match self.take_active().ok_or(OUT_OF_STEP)? {
            Expect::DescribeStatement => Ok(Act::Forward),
            Expect::DescribePortal { portal, hidden, .. } => {
                self.portals.remove(&portal);
                Ok(if hidden { Act::Drop } else { Act::Forward })
            }
            _ => Err(OUT_OF_STEP),
        }
    }

    /// CommandComplete or EmptyQueryResponse: the statement ran.
    fn on_complete(&mut self, tag: u8, body: &[u8]) -> Result<Act, ResponseError> {
        let tag_text = (tag == b'C').then(|| body.strip_suffix(&[0]).unwrap_or(body));
        match &mut self.active {
            Some(Expect::Query { audits, .. }) => {
                if let Some(audit) = audits.pop_front() {
                    audit.finish(self.session, self.counts, StatementOutcome::Ok, tag_text);
                }
                self.plan = None;
            }
            Some(Expect::Execute { .. }) => {
                if let Some(Expect::Execute {
                    audit: Some(audit), ..
                }) = self.take_active()
                {
                    audit.finish(self.session, self.counts, StatementOutcome::Ok, tag_text);
                }
            }
            _ => return Err(OUT_OF_STEP),
        }
        Ok(Act::Forward)
    }

    /// ErrorResponse: the statement failed, and what was to follow it in
    /// its query or batch does not run.
    fn on_error(&mut self, body: &[u8], out: &mut BytesMut) -> Act {
        if let Some(Expect::Query { raised: true, .. }) = &self.active
            && !body.is_empty()
        {
            super::wire::without_context(body, out);
            return Act::Replaced;
        }
        match &mut self.active {
            // The failing statement of a simple query; the rest of
            // it does not run. ReadyForQuery follows.
            Some(Expect::Query { audits, .. }) => {
                let mut audits = std::mem::take(audits);
                if let Some(failed) = audits.pop_front() {
                    failed.finish(self.session, self.counts, StatementOutcome::Error, None);
                }
                for audit in audits {
                    audit.finish(self.session, self.counts, StatementOutcome::NotRun, None);
                }
                self.plan = None;
            }
            // A failing commit at Sync: ReadyForQuery follows.
            Some(Expect::Sync) => {}
            // Extended protocol: the server now skips to Sync.
            Some(_) => {
                if let Some(Expect::Execute {
                    audit: Some(audit), ..
                }) = self.take_active()
                {
                    audit.finish(self.session, self.counts, StatementOutcome::Error, None);
                }
                self.skip_to_sync = true;
            }
            // Not an answer (a FATAL at server shutdown): passed on.
            None => {}
        }
        Act::Forward
    }

    /// ReadyForQuery: the query or batch is over.
    fn on_ready(&mut self) -> Result<Act, ResponseError> {
        let active = self.take_active();
        self.copy_in = false;
        let hide = match active.ok_or(OUT_OF_STEP)? {
            Expect::Query {
                audits, hide_ready, ..
            } => {
                for audit in audits {
                    audit.finish(self.session, self.counts, StatementOutcome::NotRun, None);
                }
                hide_ready
            }
            Expect::Sync => false,
            _ => return Err(OUT_OF_STEP),
        };
        Ok(if hide { Act::Drop } else { Act::Forward })
    }

    /// Statements still waiting when the session ends did not complete.
    pub fn finish(mut self) {
        if let Some(active) = self.active.take() {
            self.discard(active);
        }
        let rest: Vec<Expect> = self.expected.lock().drain(..).collect();
        for entry in rest {
            self.discard(entry);
        }
    }
}

/// Relays the server's messages to the client until the server closes.
pub async fn relay_server<R, W>(
    reader: &mut R,
    writer: &mut W,
    responses: &mut Responses<'_>,
    bytes_down: &AtomicU64,
    client_failed: &std::sync::atomic::AtomicBool,
) -> Result<(), ResponseError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    const READ_SIZE: usize = 64 * 1024;
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    let mut out = BytesMut::new();
    // Bytes of a streamed frame still to pass.
    let mut streaming = 0usize;
    // The client has part of a message.
    let mut sent_inside_message = false;
    loop {
        if buf.capacity() - buf.len() < READ_SIZE / 4 {
            buf.reserve(READ_SIZE);
        }
        // The client has only whole messages so far unless one is
        // streaming: a notice may go in between.
        let read = if streaming == 0 {
            tokio::select! {
                biased;
                read = reader.read_buf(&mut buf) => read?,
                Some(notice) = responses.notices.recv() => {
                    responses.released().await?;
                    writer.write_all(&notice).await?;
                    continue;
                }
            }
        } else {
            reader.read_buf(&mut buf).await?
        };
        if read == 0 {
            if buf.is_empty() && streaming == 0 {
                if !client_failed.load(Ordering::SeqCst) {
                    let _ = writer.shutdown().await;
                }
                return Ok(());
            }
            return Err(ResponseError::Malformed(
                "the server closed the connection inside a message".into(),
            ));
        }
        out.clear();
        let Handled {
            pos,
            passed,
            pending,
        } = handle_frames(responses, &buf, &mut out, &mut streaming)?;
        let sent = if out.is_empty() {
            &buf[passed..pos]
        } else {
            out.extend_from_slice(&buf[passed..pos]);
            &out[..]
        };
        // What the client saw (masked), with `record = "full"`.
        let recorder = &responses.session.recorder;
        let inside_message = |error: ResponseError| match error {
            ResponseError::Record(error) if sent_inside_message => {
                ResponseError::RecordInsideMessage(error)
            }
            error => error,
        };
        if recorder.records_output() && !sent.is_empty() {
            recorder
                .append(&crate::sessions::Event::Output { data: sent })
                .map_err(|e| inside_message(e.into()))?;
        }
        responses.released().await.map_err(inside_message)?;
        writer.write_all(sent).await?;
        sent_inside_message = streaming > 0;
        bytes_down.fetch_add(pos as u64, Ordering::Relaxed);
        buf.advance(pos);
        buf.reserve(pending.saturating_sub(buf.len()));
    }
}

/// How far [`handle_frames`] went in the read buffer: `buf[..passed]` is
/// passed on as it came (or was dropped), `buf[..pos]` handled; `pending`
/// is the length of a frame not yet whole.
struct Handled {
    pos: usize,
    passed: usize,
    pending: usize,
}

/// Handles the whole frames in `buf` (and the start of a streamed one),
/// masked rows and the agent's own answers' replacements going to `out`.
fn handle_frames(
    responses: &mut Responses<'_>,
    buf: &[u8],
    out: &mut BytesMut,
    streaming: &mut usize,
) -> Result<Handled, ResponseError> {
    let mut pos = 0;
    let mut passed = 0;
    let mut pending = 0;
    loop {
        if *streaming > 0 {
            let take = (*streaming).min(buf.len() - pos);
            pos += take;
            *streaming -= take;
            if *streaming > 0 {
                break;
            }
            continue;
        }
        let Some(header) = buf.get(pos..pos + 5) else {
            break;
        };
        let tag = header[0];
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let total = usize::try_from(len)
            .ok()
            .filter(|l| (4..=MAX_MESSAGE).contains(l))
            .ok_or_else(|| ResponseError::Malformed(format!("message length {len}")))?
            + 1;
        if responses.streams(tag)? {
            // A frame bigger than a read passes as its bytes arrive; a
            // smaller one once whole (not copied), so that what the client
            // has ends on a message boundary unless a frame is that big.
            let whole = buf.len() - pos >= total;
            if !whole && total <= STREAM_FROM {
                pending = total;
                break;
            }
            responses.on_frame(tag, None, out)?;
            if whole {
                pos += total;
            } else {
                *streaming = total;
            }
            continue;
        }
        let Some(frame) = buf.get(pos..pos + total) else {
            // Room for the whole frame is made once the handled bytes
            // are gone (reserving now could grow the buffer instead).
            pending = total;
            break;
        };
        if tag == b'D' {
            // A masked row may be rewritten: what precedes it goes first.
            out.extend_from_slice(&buf[passed..pos]);
            passed = pos;
        }
        match responses.on_frame(tag, Some(frame), out)? {
            Act::Forward => {}
            Act::Replaced => passed = pos + total,
            Act::Drop => {
                out.extend_from_slice(&buf[passed..pos]);
                passed = pos + total;
            }
        }
        pos += total;
    }
    Ok(Handled {
        pos,
        passed,
        pending,
    })
}
