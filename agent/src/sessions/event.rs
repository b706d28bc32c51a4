//! The events a session records, as written (borrowed, so recording a
//! statement copies nothing before it is serialized). Readers take lines
//! as JSON values (`view.rs`): a newer agent's extra fields are kept.
use std::net::SocketAddr;

use serde::{Serialize, Serializer};

use crate::{
    policy::{Action, KindSet, RecordMode},
    workload::Workload,
};

#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event<'a> {
    /// Always event 0.
    SessionStart {
        schema: u32,
        session_id: &'a str,
        host: &'a str,
        protocol: &'a str,
        target: &'a str,
        client: SocketAddr,
        orig_dst: SocketAddr,
        workload: &'a Workload,
        /// The policy's workloads this caller matched.
        workloads: &'a [&'a str],
        record: RecordMode,
        /// The signed policy bundle in force at the start; left out when
        /// the policy is local files only.
        #[serde(skip_serializing_if = "Option::is_none")]
        policy_bundle: Option<&'a crate::policy::BundleInfo>,
    },
    /// The decision on the connection itself.
    Connection {
        decision: Action,
        enforced: bool,
        rule: Option<&'a str>,
        reason: &'a str,
        /// PostgreSQL: the role the admitting rule's `as_user` makes the
        /// session take; left out when none.
        #[serde(skip_serializing_if = "Option::is_none")]
        as_user: Option<&'a str>,
    },
    /// A command, recorded (and flushed) before it goes upstream.
    Statement {
        /// Statement number in the session, from 1.
        n: u64,
        text: &'a str,
        kinds: KindSet,
        tables: &'a [String],
        /// The functions it calls that are not allowed by default (those
        /// a rule must name); left out when none.
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        functions: &'a [&'a str],
        /// It could not be checked (it is then denied unless a rule says
        /// `unparsed = "allow"`); left out when it could.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        unparsed: bool,
        writes: bool,
        decision: Action,
        enforced: bool,
        rule: Option<&'a str>,
    },
    /// How statement `n` ended.
    Result {
        n: u64,
        outcome: StatementOutcome,
        rows: Option<u64>,
        cells_masked: u64,
        duration_us: Option<u64>,
    },
    /// A command held until a person approves it (`approvals`).
    ApprovalRequested {
        id: &'a str,
        rule: &'a str,
        command: &'a str,
        approvers: &'a [String],
        min_approvals: u32,
        timeout_s: u64,
        grant: &'a str,
        /// Why, as the caller stated it (self-declared).
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
    },
    /// How a held command's request ended: `approved`, `denied`,
    /// `timed_out`, `withdrawn`.
    ApprovalDecided {
        id: &'a str,
        outcome: &'a str,
        by: &'a [String],
        reason: Option<&'a str>,
        /// The grant an approval created, when the rule grants a duration.
        grant: Option<&'a str>,
    },
    /// A command let through without asking, by an earlier approval's grant.
    GrantUsed {
        grant: &'a str,
        rule: &'a str,
        /// The approval request that created the grant.
        request: &'a str,
        /// Asked up front: the statements it covers.
        #[serde(skip_serializing_if = "Option::is_none")]
        scope: Option<&'a crate::approvals::GrantScope>,
        /// Why, as the grant's asker stated it.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
        expires_ms: u64,
    },
    /// Bytes the server side sent the client (after masking), with
    /// `record = "full"`.
    Output {
        #[serde(serialize_with = "base64")]
        data: &'a [u8],
    },
    /// SSH: the user the client asked for, and how it authenticated (the
    /// agent accepts it; the caller is known from the kernel).
    SshLogin { user: &'a str, method: &'a str },
    /// SSH: a request (exec, shell, subsystem, forwarding) and its
    /// decision; recorded before anything of it goes upstream.
    SshRequest {
        channel: u32,
        request: &'a str,
        command: Option<&'a str>,
        decision: Action,
        enforced: bool,
        rule: Option<&'a str>,
        reason: &'a str,
    },
    /// SSH: a terminal's size, at pty-req (with `term`) and each resize.
    Terminal {
        channel: u32,
        term: Option<&'a str>,
        cols: u32,
        rows: u32,
    },
    /// What the client sent, with `record = "full"`: SSH, what it typed
    /// into a terminal; HTTP, request bodies.
    Input {
        #[serde(serialize_with = "base64")]
        data: &'a [u8],
    },
    /// SSH: how a channel's command ended.
    Exit {
        channel: u32,
        status: Option<u32>,
        signal: Option<&'a str>,
    },
    /// SSH: an SFTP operation (`open-read`, `open-write`, `opendir`,
    /// `close` with the bytes moved, `remove`, `rename`, `mkdir`, `rmdir`).
    Sftp {
        op: &'a str,
        path: &'a str,
        to: Option<&'a str>,
        read: Option<u64>,
        written: Option<u64>,
    },
    /// HTTP: a request and its decision; recorded before anything of it
    /// goes upstream.
    HttpRequest {
        /// Request number in the session, from 1.
        n: u64,
        method: &'a str,
        /// The path as the client sent it, and its query.
        path: &'a str,
        query: Option<&'a str>,
        host: &'a str,
        /// On a Kubernetes target: verb, group, version, resource,
        /// subresource, namespace and name, as kube-apiserver reads them.
        kube: Option<&'a crate::policy::kube::KubeRequest>,
        decision: Action,
        enforced: bool,
        rule: Option<&'a str>,
        reason: &'a str,
    },
    /// HTTP: how request `n` ended: the server's status (none when it never
    /// answered), the response body's bytes as they reached the client.
    HttpResponse {
        n: u64,
        status: Option<u16>,
        bytes: u64,
        /// Values masked in the body (a Kubernetes Secret's data).
        masked: u64,
        duration_us: u64,
        error: Option<&'a str>,
    },
    /// HTTP: a connection of request `n`'s Kubernetes port-forward, as it
    /// ended: the pod's port, the client's number for the connection,
    /// bytes each way, and what the server said went wrong.
    PortForward {
        n: u64,
        port: Option<u16>,
        request: Option<&'a str>,
        up: u64,
        down: u64,
        error: Option<&'a str>,
    },
    SessionEnd {
        outcome: &'a str,
        error: Option<&'a str>,
        bytes_up: u64,
        bytes_down: u64,
        statements: u64,
        denied: u64,
    },
}

fn base64<S: Serializer>(data: &&[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&base64::display::Base64Display::new(
        data,
        &base64::engine::general_purpose::STANDARD,
    ))
}

/// How a statement ended, for the audit line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StatementOutcome {
    Ok,
    /// The server reported an error.
    Error,
    /// An earlier statement of the same query or batch failed.
    NotRun,
    /// Denied by policy, or by a person asked to approve it: never sent.
    Denied,
}
