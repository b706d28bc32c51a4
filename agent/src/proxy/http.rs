//! HTTP: the agent is the server the client meant to reach (over TLS with
//! a certificate from the local CA when the client speaks TLS; HTTP/2 or
//! HTTP/1.1 by ALPN) and a client of the real one. Every request is read in
//! one spelling, decided under the live policy and recorded before anything
//! of it goes upstream; the held credential replaces the client's.
//!
//! ```text
//! client ──h2/h1──▶ hyper server (one per connection); for each request:
//!                     read method, path, host (non-canonical: 400)
//!                     decide → record, durable → deny: 403 JSON
//!                                               approve: held for a person
//!                                               allow: forward
//!                   ──h1──▶ server (a few pooled connections per client
//!                           connection, TLS verified as the target says)
//!                   ◀── response streamed back as it comes; its status and
//!                       bytes recorded when it ends
//! ```
use std::{
    borrow::Cow,
    convert::Infallible,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use async_compression::tokio::bufread::{GzipDecoder, ZlibDecoder};
use bytes::Bytes;
use futures::TryStreamExt;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Version, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{
    BodyDataStream, BodyExt, Either, Full, StreamBody, combinators::UnsyncBoxBody,
};
use hyper::{
    body::Incoming,
    client::conn::{http1::SendRequest, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_util::io::{ReaderStream, StreamReader};

use super::{Decision, ProxyContext, spdy, websocket};
use crate::{
    access::{ByteCounters, Outcome},
    addr::OrigDstAddr,
    approvals::{ApprovalError, NewRequest, Requester},
    conn::{self, Admitted, Asked},
    masking::{
        MaskSet, StreamMask,
        json::{JsonMask, Selector},
    },
    policy::{
        Action, ActivePolicy, HttpCredential, HttpRequest, MaskSelects, Strategy, UpstreamTls,
        Verdict,
    },
    sessions::{Event, Recorder},
    workload::Workload,
};

type Body = UnsyncBoxBody<Bytes, BoxError>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Polled = Poll<Option<Result<Frame<Bytes>, BoxError>>>;

/// Which body a recorded chunk is of.
#[derive(Clone, Copy)]
enum Direction {
    /// The client's request body.
    Input,
    /// The server's response body.
    Output,
}

/// Idle upstream connections kept per client connection.
const IDLE_UPSTREAMS: usize = 4;

/// Headers of one hop, never passed on (RFC 9110 §7.6.1), and the
/// client's credentials for a proxy.
const HOP_HEADERS: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub async fn serve(context: Arc<ProxyContext>, admitted: Admitted) {
    let Admitted {
        mut conn,
        stream,
        orig_dst,
        workload,
        active,
        target,
        recorder,
        ..
    } = admitted;
    let target = active.policy.target(target);
    let upstream = match Upstream::new(&context, target, orig_dst) {
        Ok(upstream) => upstream,
        Err(why) => {
            super::reset(stream);
            return conn.end(Outcome::Error, Some(why));
        }
    };
    let connection = Arc::new(Connection {
        target: target.name.clone(),
        credential: target.http.clone(),
        kubernetes: target.protocol == crate::policy::Protocol::Kubernetes,
        context: context.clone(),
        workload,
        recorder,
        bytes: conn.bytes().clone(),
        upstream,
        requests: AtomicU64::new(0),
        failure: parking_lot::Mutex::new(None),
        relays: parking_lot::Mutex::new(Vec::new()),
    });
    let served = if speaks_tls(&stream).await {
        match &context.tls {
            None => Err("the client asked for TLS and the agent has no CA".to_owned()),
            Some(ca) => match ca
                .accept(stream, orig_dst.0.ip(), crate::tls::Alpn::Http)
                .await
            {
                Ok(tls) => serve_connection(tls, connection.clone()).await,
                Err(error) => Err(error.to_string()),
            },
        }
    } else {
        serve_connection(stream, connection.clone()).await
    };
    let relays = std::mem::take(&mut *connection.relays.lock());
    for relay in relays {
        let _ = relay.await;
    }
    let failure = connection.failure.lock().take();
    match (failure, served) {
        (Some(why), _) => conn.end(Outcome::Error, Some(why)),
        (None, Ok(())) => conn.end(Outcome::Closed, None),
        (None, Err(why)) => conn.end(Outcome::Error, Some(why)),
    }
}

/// Whether the client's first byte opens a TLS handshake (a record of
/// type 22); anything else is read as plain HTTP.
async fn speaks_tls(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(stream.peek(&mut first).await, Ok(1) if first[0] == 0x16)
}

/// Serves the client's requests, HTTP/2 or HTTP/1.1, until it leaves.
async fn serve_connection<S>(io: S, connection: Arc<Connection>) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let connection = connection.clone();
        async move { Ok::<_, Infallible>(connection.handle(request).await) }
    });
    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
        .map_err(|error| error.to_string())
}

/// What every request of a client connection shares.
struct Connection {
    context: Arc<ProxyContext>,
    /// Requests are decided under the policy live when they come, by
    /// this target name.
    target: String,
    credential: Option<Arc<HttpCredential>>,
    /// Requests are read as kube-apiserver reads them too.
    kubernetes: bool,
    workload: Arc<Workload>,
    recorder: Arc<Recorder>,
    bytes: Arc<ByteCounters>,
    upstream: Upstream,
    requests: AtomicU64,
    /// Why the session cannot go on (its record failed).
    failure: parking_lot::Mutex<Option<String>>,
    /// Upgraded streams still being copied: the session ends after them.
    relays: parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// A request as read and decided.
struct Reading {
    decision: Decision,
    /// On a Kubernetes target: the request as kube-apiserver reads it.
    kube: Option<crate::policy::kube::KubeRequest>,
    /// It has one reading (else it is refused with 400).
    read: bool,
    /// Refused, by policy or for having no one reading.
    denied: bool,
    /// Held for a person's answer.
    held: bool,
    /// How forwarding treats the answer.
    answering: Answering,
}

/// JSON selectors, each with the JSON text that replaces what it picks.
type JsonSelectors = Vec<(Selector, Cow<'static, str>)>;

/// What forwarding does to an allowed request's answer.
struct Answering {
    /// JSON values masked as the answer streams (a Kubernetes Secret's,
    /// the workload's `json` masks), each with its replacement.
    json_masks: JsonSelectors,
    /// The workload's `pattern` and `regex` masks: applied to a JSON
    /// answer's strings, keys and numbers, or to a text answer.
    patterns: Option<Arc<MaskSet>>,
    /// What a Kubernetes exec, attach or port-forward upgrades to.
    stream: KubeStream,
}

/// A Kubernetes request whose upgraded stream is read as it is relayed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KubeStream {
    None,
    /// An exec or attach: a terminal's.
    Terminal,
    /// A port-forward: connections to the pod's ports.
    PortForward,
}

/// How an upgraded stream is read as it is relayed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Relayed {
    /// Copied as it is.
    Opaque,
    /// A terminal in the stream protocol, recorded as one.
    Terminal,
    /// A port-forward in SPDY, bare or tunnelled in a WebSocket: each
    /// connection recorded with its port and bytes.
    PortForward { tunnelled: bool },
}

impl Connection {
    /// One request: read, decided, recorded, then refused, held or
    /// forwarded.
    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        if let Some(why) = self.failure.lock().clone() {
            return unavailable(&why);
        }
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let host = request_host(&request);
        let reading = self.read(&request, &host);
        let ticket = match self.record_request(n, &request, &host, &reading) {
            Ok(ticket) => ticket,
            Err(error) => return self.fail(format!("the session cannot be recorded: {error}")),
        };
        let Reading {
            decision,
            read,
            denied,
            held,
            answering,
            ..
        } = reading;
        // A request that passes straight on and cannot change anything (a
        // safe method: GET, HEAD, OPTIONS) goes up while its record is
        // flushed, and its answer waits for the record; every other one
        // goes up only once its record is on disk (docs/SESSIONS.md).
        if read
            && !denied
            && !held
            && request.method().is_safe()
            && !request.headers().contains_key(header::UPGRADE)
            && never_relayed(&request).is_none()
        {
            let (recorded, response) = tokio::join!(
                self.recorder.durable(ticket),
                self.forward(n, request, answering)
            );
            return match recorded {
                Ok(()) => response,
                Err(error) => self.fail(format!("the session cannot be recorded: {error}")),
            };
        }
        if let Err(error) = self.recorder.durable(ticket).await {
            return self.fail(format!("the session cannot be recorded: {error}"));
        }
        let grpc = is_grpc(request.headers());
        if !read {
            return self.refusal(StatusCode::BAD_REQUEST, &decision, grpc);
        }
        if denied {
            return self.refusal(StatusCode::FORBIDDEN, &decision, grpc);
        }
        if held {
            let command = format!(
                "{} {} (host {host})",
                request.method(),
                request.uri().path()
            );
            if let Err(response) = self.approval(&decision, &command, grpc).await {
                return response;
            }
        }
        if let Some(why) = never_relayed(&request) {
            return json(
                StatusCode::NOT_IMPLEMENTED,
                &serde_json::json!({
                    "error": format!("interlock: {why}"),
                    "session_id": self.recorder.id().to_string(),
                }),
            );
        }
        self.forward(n, request, answering).await
    }

    /// Reads the request in one spelling (as kube-apiserver does, on a
    /// Kubernetes target) and decides it under the live policy.
    fn read(&self, request: &Request<Incoming>, host: &str) -> Reading {
        let method = request.method().as_str();
        let (path, query) = (request.uri().path(), request.uri().query());
        let active = self.context.gate.active.load_full();
        let reading = if self.kubernetes {
            HttpRequest::read_kube(method, path, query, host)
        } else {
            HttpRequest::read(method, path, host)
        };
        let (mut json_masks, mut patterns) = (Vec::new(), None);
        let (decision, kube, read) = match reading {
            Err(unreadable) => (
                Decision::new(
                    Verdict::refused(unreadable.to_string()),
                    active,
                    &self.workload,
                    None,
                ),
                None,
                false,
            ),
            Ok(read) => {
                let decision = self.decide(&read, active);
                (json_masks, patterns) = self.masks(&decision.active, &read);
                (decision, read.kube, true)
            }
        };
        let verdict = &decision.verdict;
        // What cannot be read is refused even in audit mode.
        let denied = verdict.action == Action::Deny && (decision.enforced() || !read);
        let held = verdict.action == Action::Approve && decision.enforced();
        let mask_secrets = kube.as_ref().is_some_and(|kube| {
            kube.is_resource && kube.group.is_empty() && kube.resource == "secrets"
        }) && !verdict
            .rule
            .is_some_and(|id| decision.active.policy.rule(id).kube.reveal_secrets);
        let stream = match kube.as_ref().map(|kube| kube.verb.as_str()) {
            Some("exec" | "attach") => KubeStream::Terminal,
            Some("portforward") => KubeStream::PortForward,
            _ => KubeStream::None,
        };
        if mask_secrets {
            json_masks.extend(JsonMask::secret_selectors());
        }
        Reading {
            decision,
            kube,
            read,
            denied,
            held,
            answering: Answering {
                json_masks,
                patterns,
                stream,
            },
        }
    }

    /// The masks on the answer to `request`: `json` ones, each with what
    /// replaces the values it picks, and the value patterns.
    fn masks(
        &self,
        active: &ActivePolicy,
        request: &HttpRequest,
    ) -> (JsonSelectors, Option<Arc<MaskSet>>) {
        let Some(target) = active.policy.target_id(&self.target) else {
            return (Vec::new(), None);
        };
        let (mut json, mut patterns) = (Vec::new(), Vec::new());
        for mask in crate::policy::http_masks_for(&active.policy, &self.workload, target, request) {
            match &mask.selects {
                MaskSelects::Json(selector) => {
                    let with = match mask.strategy {
                        Strategy::Null => "null",
                        _ => "\"****\"",
                    };
                    json.push((selector.clone(), Cow::Borrowed(with)));
                }
                // Patterns and regexes (column masks are refused on HTTP
                // targets at load).
                _ => patterns.push(mask),
            }
        }
        // Only column masks can fail to compile: none are here.
        let patterns = (!patterns.is_empty())
            .then(|| {
                MaskSet::compile(
                    &patterns,
                    &Default::default(),
                    self.context.mask_key.clone(),
                )
                .ok()
            })
            .flatten()
            .map(Arc::new);
        (json, patterns)
    }

    /// Appends the request's event (and, with `access_log_statements`,
    /// its access line); the ticket says when it is on disk.
    fn record_request(
        &self,
        n: u64,
        request: &Request<Incoming>,
        host: &str,
        reading: &Reading,
    ) -> Result<crate::sessions::Ticket, crate::sessions::StoreError> {
        let decision = &reading.decision;
        let event = Event::HttpRequest {
            n,
            method: request.method().as_str(),
            path: request.uri().path(),
            query: request.uri().query(),
            host,
            kube: reading.kube.as_ref(),
            decision: decision.verdict.action,
            enforced: decision.enforced() || !reading.read,
            rule: decision.rule_name(),
            reason: &decision.verdict.reason,
        };
        let ticket = self.recorder.append(&event)?;
        if self.context.pg.statement_lines {
            crate::access::write_line(&RequestLine {
                event: "http_request",
                time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
                session_id: self.recorder.id().to_string(),
                target: &self.target,
                request: &event,
            });
        }
        self.recorder.count_statement(reading.denied);
        Ok(ticket)
    }

    /// Decides a readable request under `active`.
    fn decide(&self, request: &HttpRequest, active: Arc<ActivePolicy>) -> Decision {
        let target = active.policy.target_id(&self.target);
        let verdict = match target {
            Some(target) => {
                crate::policy::evaluate_http(&active.policy, &self.workload, target, request)
            }
            None => Verdict::refused(format!(
                "target {:?} is no longer in the policy",
                self.target
            )),
        };
        Decision::new(verdict, active, &self.workload, target)
    }

    /// Holds the request until a person answers; the client just waits.
    /// If it leaves, its connection ends and the request is withdrawn.
    async fn approval(
        &self,
        decision: &Decision,
        command: &str,
        grpc: bool,
    ) -> Result<(), Response<Body>> {
        let policy = &decision.active.policy;
        let forbidden = |why: String| {
            let refused = Decision::new(
                Verdict::refused(why),
                decision.active.clone(),
                &self.workload,
                None,
            );
            self.refusal(StatusCode::FORBIDDEN, &refused, grpc)
        };
        let Some(rule) = decision.verdict.rule.map(|id| policy.rule(id)) else {
            return Err(forbidden("the approving rule is gone".into()));
        };
        let Some(spec) = rule.approval.clone() else {
            return Err(forbidden("the rule asks no one".into()));
        };
        let requester = Requester::of(policy, &self.workload);
        let approvals = &self.context.gate.approvals;
        match approvals.use_grant(&self.recorder, &requester, &self.target, &rule.name, |_| {
            false
        }) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(error) => return Err(self.fail(format!("the session cannot be recorded: {error}"))),
        }
        let request = NewRequest {
            requester,
            target: &self.target,
            rule: &rule.name,
            spec,
            command,
        };
        let waiting = async |_: &crate::approvals::RequestRecord| {};
        let gave_up = std::future::pending::<&str>();
        match conn::ask(approvals, &self.recorder, request, waiting, gave_up).await {
            Ok(Asked::Approved(_)) => Ok(()),
            Ok(Asked::Refused(why)) => Err(forbidden(why)),
            Ok(Asked::GaveUp { id, why }) => {
                Err(forbidden(format!("{why}; request {id} withdrawn")))
            }
            Err(ApprovalError::Record(error)) => {
                Err(self.fail(format!("the session cannot be recorded: {error}")))
            }
            Err(error) => Err(forbidden(format!(
                "approval needed, but the request cannot be recorded: {error}"
            ))),
        }
    }

    /// Sends an allowed request upstream, with the held credential, and
    /// streams the answer back.
    async fn forward(
        self: &Arc<Self>,
        n: u64,
        mut request: Request<Incoming>,
        answering: Answering,
    ) -> Response<Body> {
        let Answering {
            json_masks,
            patterns,
            stream,
        } = answering;
        let masks = !json_masks.is_empty() || patterns.is_some();
        let started = Instant::now();
        // A protocol upgrade (WebSocket, SPDY: exec, attach, port-forward):
        // once the server agrees, both connections become one stream.
        let upgrade = request.headers().get(header::UPGRADE).cloned();
        let client_side = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        let client_http2 = parts.version == Version::HTTP_2;
        // The authority (HTTP/2's, or an absolute URL's) is the host the
        // request was decided for: it replaces any Host header, as a
        // server reading the URL would ignore that header (RFC 9112 §3.2.2).
        if let Some(authority) = parts.uri.authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, host);
        }
        // `TE: trailers` says the client takes trailers (gRPC's status
        // comes in them); they are relayed, so it goes on.
        let trailers = parts
            .headers
            .get_all(header::TE)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.contains("trailers")));
        drop_hop_headers(&mut parts.headers);
        keep_upgrade(&mut parts.headers, upgrade.as_ref());
        if trailers {
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        if masks {
            // An answer to mask comes uncompressed; as JSON when JSON values
            // are masked, and from Kubernetes (not protobuf or CBOR).
            if !json_masks.is_empty() || self.kubernetes {
                parts
                    .headers
                    .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
            }
            parts.headers.remove(header::ACCEPT_ENCODING);
        }
        if let Some(held) = &self.credential {
            parts.headers.remove(header::AUTHORIZATION);
            parts.headers.insert(held.name.clone(), held.value.clone());
        }
        let head = parts.method == http::Method::HEAD;
        let body = Uploaded {
            inner: Some(body),
            connection: self.clone(),
        };
        // The client's protocol upstream: HTTP/2 (as gRPC needs) when the
        // client spoke it and the server offers it (ALPN); an upgrade, or
        // an HTTP/1.1 client, over HTTP/1.1.
        let http1_only = upgrade.is_some() || !client_http2;
        // A safe request without a body that fails on a connection the
        // server was closing (an HTTP/2 GOAWAY, a keep-alive connection
        // closed as it was reused) is sent once more on a new one: it
        // changed nothing, and nginx's proxy_next_upstream does the same.
        let again = (parts.method.is_safe() && upgrade.is_none() && body.is_end_stream())
            .then(|| parts.clone());
        let answer = match (self.send_upstream(parts, body, http1_only).await, again) {
            (Err((why, true)), Some(again)) => {
                tracing::debug!(%why, "sending a safe request again on a new connection");
                self.upstream.forget_http2();
                let body = Uploaded {
                    inner: None,
                    connection: self.clone(),
                };
                self.send_upstream(again, body, http1_only).await
            }
            (answer, _) => answer,
        }
        .map_err(|(why, _)| why);
        match answer {
            Ok(mut response) => {
                if let (StatusCode::SWITCHING_PROTOCOLS, Some(client_side)) =
                    (response.status(), client_side)
                {
                    let server_side = hyper::upgrade::on(&mut response);
                    let relayed =
                        relayed(stream, response.headers(), self.recorder.records_output());
                    self.relay_upgraded(n, started, client_side, server_side, relayed);
                    let (mut parts, _) = response.into_parts();
                    let upgrade = parts.headers.get(header::UPGRADE).cloned();
                    drop_hop_headers(&mut parts.headers);
                    keep_upgrade(&mut parts.headers, upgrade.as_ref());
                    if let Some(scrub) = self.scrub() {
                        scrub.headers(&mut parts.headers);
                    }
                    return Response::from_parts(parts, empty());
                }
                let (mut parts, body) = response.into_parts();
                drop_hop_headers(&mut parts.headers);
                let bodiless = head
                    || matches!(parts.status.as_u16(), 204 | 304)
                    || parts
                        .headers
                        .get(header::CONTENT_LENGTH)
                        .is_some_and(|l| l == "0");
                let mut decode = None;
                let mut text_mask = None;
                let json_mask = if masks && !bodiless {
                    let kind = match maskable(&parts.headers, json_masks.is_empty()) {
                        Ok((kind, encoding)) => {
                            // A server may compress despite the request:
                            // the answer is decoded, masked, and goes
                            // down uncompressed.
                            if encoding.is_some() {
                                parts.headers.remove(header::CONTENT_ENCODING);
                            }
                            decode = encoding;
                            kind
                        }
                        Err(why) => {
                            let why = format!(
                                "an answer with masked values that cannot be masked ({why})"
                            );
                            self.record_response(n, Some(502), 0, 0, started, Some(&why));
                            return json(
                                StatusCode::BAD_GATEWAY,
                                &serde_json::json!({ "error": format!("interlock: {why}") }),
                            );
                        }
                    };
                    // Masked values change the body's length.
                    parts.headers.remove(header::CONTENT_LENGTH);
                    match (kind, patterns) {
                        (Readable::Json, Some(patterns)) => {
                            Some(JsonMask::new(json_masks).scanning(patterns))
                        }
                        (Readable::Json, None) => Some(JsonMask::new(json_masks)),
                        (Readable::Text, patterns) => {
                            text_mask = patterns.map(StreamMask::new);
                            None
                        }
                    }
                } else {
                    None
                };
                let scrub = self.scrub();
                if let Some(scrub) = &scrub {
                    scrub.headers(&mut parts.headers);
                }
                let body = Downloaded {
                    inner: match decode {
                        Some(encoding) => Either::Right(decoded(body, encoding)),
                        None => Either::Left(body),
                    },
                    n,
                    status: parts.status.as_u16(),
                    started,
                    bytes: 0,
                    ended: false,
                    error: None,
                    scrub,
                    json_mask,
                    text_mask,
                    pending: None,
                    connection: self.clone(),
                };
                Response::from_parts(parts, body.boxed_unsync())
            }
            Err(why) => {
                tracing::warn!(%why, "request failed upstream");
                self.record_response(n, None, 0, 0, started, Some(&why));
                json(
                    StatusCode::BAD_GATEWAY,
                    &serde_json::json!({
                        "error": format!("interlock: {why}"),
                        "session_id": self.recorder.id().to_string(),
                    }),
                )
            }
        }
    }

    /// Sends a request on an upstream connection: HTTP/1.1 with the
    /// origin as its target, or HTTP/2 with the host as `:authority`.
    /// An error says why, and whether the connection was a reused one.
    async fn send_upstream(
        &self,
        mut parts: http::request::Parts,
        body: Uploaded,
        http1_only: bool,
    ) -> Result<Response<Incoming>, (String, bool)> {
        let origin = parts.uri.path_and_query().map_or("/", |o| o.as_str());
        let (sender, reused) = self
            .upstream
            .sender(http1_only)
            .await
            .map_err(|why| (why, false))?;
        let failed = |why: String| (why, reused);
        match sender {
            Sender::Http1(mut sender) => {
                parts.uri = origin.parse().unwrap_or_default();
                parts.version = Version::HTTP_11;
                let sent = sender.send_request(Request::from_parts(parts, body)).await;
                self.upstream.give_back(sender);
                sent.map_err(|e| failed(format!("the server failed the request: {e}")))
            }
            Sender::Http2(mut sender) => {
                let authority = parts
                    .headers
                    .remove(header::HOST)
                    .and_then(|h| h.to_str().ok().map(str::to_owned))
                    .unwrap_or_default();
                parts.uri = http::Uri::builder()
                    .scheme("https")
                    .authority(authority)
                    .path_and_query(origin)
                    .build()
                    .unwrap_or_default();
                parts.version = Version::HTTP_2;
                sender
                    .ready()
                    .await
                    .map_err(|e| failed(format!("HTTP/2 to the server: {e}")))?;
                sender
                    .send_request(Request::from_parts(parts, body))
                    .await
                    .map_err(|e| failed(format!("the server failed the request: {e}")))
            }
        }
    }

    /// What blanks the held credential out of an answer, if there is one.
    fn scrub(&self) -> Option<Scrub> {
        self.credential
            .as_ref()
            .and_then(|held| Scrub::new(held.secret.clone()))
    }

    /// Copies both ways between the client's and the server's upgraded
    /// connections until both end; the request's `http_response` (status
    /// 101) is recorded then, with the bytes that went down. A terminal's
    /// stream or a port-forward's is read as it passes and recorded.
    fn relay_upgraded(
        self: &Arc<Self>,
        n: u64,
        started: Instant,
        client: hyper::upgrade::OnUpgrade,
        server: hyper::upgrade::OnUpgrade,
        relayed: Relayed,
    ) {
        let connection = self.clone();
        let relay = tokio::spawn(async move {
            let relayed = async {
                let (client, server) = tokio::try_join!(client, server)
                    .map_err(|e| format!("the upgrade failed: {e}"))?;
                let (mut client, mut server) = (TokioIo::new(client), TokioIo::new(server));
                match relayed {
                    Relayed::Terminal => connection.relay_terminal(client, server).await,
                    Relayed::PortForward { tunnelled } => {
                        connection
                            .relay_port_forward(n, client, server, tunnelled)
                            .await
                    }
                    Relayed::Opaque => tokio::io::copy_bidirectional(&mut client, &mut server)
                        .await
                        .map_err(|e| format!("the upgraded stream failed: {e}")),
                }
            }
            .await;
            let (down, error) = match relayed {
                Ok((up, down)) => {
                    connection.bytes.up.fetch_add(up, Ordering::Relaxed);
                    connection.bytes.down.fetch_add(down, Ordering::Relaxed);
                    (down, None)
                }
                Err(why) => (0, Some(why)),
            };
            connection.record_response(n, Some(101), down, 0, started, error.as_deref());
        });
        self.relays.lock().push(relay);
    }

    /// Relays an exec's or attach's stream unchanged while recording it
    /// as a terminal: stdin as `input`, stdout and stderr as `output`,
    /// each resize as `terminal`, the command's end as `exit`. What cannot
    /// be read or recorded ends the stream: nothing passes unrecorded.
    async fn relay_terminal<C, S>(&self, client: C, server: S) -> Result<(u64, u64), String>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        S: AsyncRead + AsyncWrite + Unpin,
    {
        use websocket::{ERROR, Piece, RESIZE, STDERR, STDIN, STDOUT};
        let (mut client_in, mut client_out) = tokio::io::split(client);
        let (mut server_in, mut server_out) = tokio::io::split(server);
        let recorder = &self.recorder;
        let up = relay_read(
            &mut client_in,
            &mut server_out,
            frames(|piece| match piece {
                Piece::Data {
                    stream: STDIN,
                    bytes,
                } => recorder.append(&Event::Input { data: bytes }).map(drop),
                Piece::Message {
                    stream: RESIZE,
                    bytes,
                } => match websocket::terminal_size(bytes) {
                    Some((cols, rows)) => recorder
                        .append(&Event::Terminal {
                            channel: 0,
                            term: None,
                            cols,
                            rows,
                        })
                        .map(drop),
                    None => Ok(()),
                },
                _ => Ok(()),
            }),
        );
        let down = relay_read(
            &mut server_in,
            &mut client_out,
            frames(|piece| match piece {
                Piece::Data {
                    stream: STDOUT | STDERR,
                    bytes,
                } => recorder.append(&Event::Output { data: bytes }).map(drop),
                Piece::Message {
                    stream: ERROR,
                    bytes,
                } => recorder
                    .append(&Event::Exit {
                        channel: 0,
                        status: websocket::exit_status(bytes),
                        signal: None,
                    })
                    .map(drop),
                _ => Ok(()),
            }),
        );
        tokio::try_join!(up, down)
    }

    /// Relays a port-forward's SPDY unchanged while recording each of its
    /// connections as it ends (`port_forward`: port, bytes each way, the
    /// server's error); those still open at the end are recorded then.
    /// What cannot be read or recorded ends the stream.
    async fn relay_port_forward<C, S>(
        &self,
        n: u64,
        client: C,
        server: S,
        tunnelled: bool,
    ) -> Result<(u64, u64), String>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut client_in, mut client_out) = tokio::io::split(client);
        let (mut server_in, mut server_out) = tokio::io::split(server);
        let forwards = parking_lot::Mutex::new(spdy::Forwards::default());
        let record = |forwarded: spdy::Forwarded| {
            self.recorder
                .append(&Event::PortForward {
                    n,
                    port: forwarded.port,
                    request: forwarded.request.as_deref(),
                    up: forwarded.up,
                    down: forwarded.down,
                    error: forwarded.error.as_deref(),
                })
                .map(drop)
                .map_err(|error| format!("the session cannot be recorded: {error}"))
        };
        let direction = |side: spdy::Side| {
            let mut tunnel = tunnelled.then(websocket::FrameReader::raw);
            let mut reader = spdy::SpdyReader::default();
            let (forwards, record) = (&forwards, &record);
            move |bytes: &[u8]| -> Result<(), String> {
                let mut failed = None;
                let mut spdy_bytes = |bytes: &[u8]| {
                    let read = reader.feed(bytes, &mut |piece| {
                        if failed.is_some() {
                            return;
                        }
                        match forwards.lock().piece(side, piece) {
                            Ok(Some(forwarded)) => failed = record(forwarded).err(),
                            Ok(None) => {}
                            Err(error) => failed = Some(error.to_string()),
                        }
                    });
                    if let Err(error) = read {
                        failed.get_or_insert(error.to_string());
                    }
                };
                match &mut tunnel {
                    Some(frames) => frames
                        .feed(bytes, &mut |piece| {
                            if let websocket::Piece::Data { bytes, .. } = piece {
                                spdy_bytes(bytes);
                            }
                        })
                        .map_err(|e| format!("the port-forward's WebSocket cannot be read: {e}"))?,
                    None => spdy_bytes(bytes),
                }
                match failed {
                    Some(why) => Err(format!("the port-forward cannot be read: {why}")),
                    None => Ok(()),
                }
            }
        };
        let up = relay_read(
            &mut client_in,
            &mut server_out,
            direction(spdy::Side::Client),
        );
        let down = relay_read(
            &mut server_in,
            &mut client_out,
            direction(spdy::Side::Server),
        );
        let relayed = tokio::try_join!(up, down);
        let rest = forwards.lock().rest();
        for forwarded in rest {
            record(forwarded)?;
        }
        relayed
    }

    /// A body's chunk, with `record = "full"`; an error says the session
    /// cannot be recorded (and ends it).
    fn record_body(&self, which: Direction, data: &[u8]) -> Result<(), String> {
        if !self.recorder.records_output() || data.is_empty() {
            return Ok(());
        }
        let event = match which {
            Direction::Input => Event::Input { data },
            Direction::Output => Event::Output { data },
        };
        self.recorder.append(&event).map(drop).map_err(|error| {
            let why = format!("the session cannot be recorded: {error}");
            self.failure.lock().get_or_insert(why.clone());
            why
        })
    }

    fn record_response(
        &self,
        n: u64,
        status: Option<u16>,
        bytes: u64,
        masked: u64,
        started: Instant,
        error: Option<&str>,
    ) {
        let event = Event::HttpResponse {
            n,
            status,
            bytes,
            masked,
            duration_us: started.elapsed().as_micros() as u64,
            error,
        };
        if let Err(error) = self.recorder.append(&event) {
            self.failure
                .lock()
                .get_or_insert(format!("the session cannot be recorded: {error}"));
        }
    }

    /// Ends the session because its record failed: this request and every
    /// later one get 503.
    fn fail(&self, why: String) -> Response<Body> {
        tracing::error!(%why, "session ended: it cannot be recorded");
        self.failure.lock().get_or_insert(why.clone());
        unavailable(&why)
    }
}

/// The access line of a request: the session event, with whose it is.
#[derive(serde::Serialize)]
struct RequestLine<'a> {
    event: &'static str,
    time: String,
    session_id: String,
    target: &'a str,
    #[serde(flatten)]
    request: &'a Event<'a>,
}

/// What the agent does not pass on, whatever the policy: TRACE, whose
/// answer echoes the request as the server got it (the held credential
/// with it); CONNECT, which it does not relay yet.
fn never_relayed(request: &Request<Incoming>) -> Option<&'static str> {
    if request.method() == http::Method::TRACE {
        return Some("TRACE is never relayed (its answer would echo the held credential)");
    }
    if request.method() == http::Method::CONNECT {
        return Some("CONNECT is not relayed");
    }
    None
}

/// A body with nothing in it.
fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A gRPC call (its refusals are gRPC statuses).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|kind| kind.starts_with("application/grpc"))
}

/// How a compressed answer is decoded to be masked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    Gzip,
    /// HTTP's `deflate`: the zlib format (RFC 9110 §8.4.1.2).
    Deflate,
}

/// How an answer is read to be masked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Readable {
    /// One JSON value at a time.
    Json,
    /// As text, by the value patterns alone.
    Text,
}

/// How an answer can be masked (`text`: it may be read as text, as no
/// JSON values are masked), and how it must be decoded first; why not,
/// for one in another encoding or of another type.
fn maskable(headers: &HeaderMap, text: bool) -> Result<(Readable, Option<Encoding>), String> {
    let kind = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let essence = kind.split(';').next().unwrap_or("").trim();
    let readable = if essence.contains("json") {
        Readable::Json
    } else if text && is_text(essence) {
        Readable::Text
    } else {
        return Err(format!("content type {kind:?}"));
    };
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim());
    let encoding = match encoding {
        None => None,
        Some(e) if e.eq_ignore_ascii_case("identity") => None,
        Some(e) if e.eq_ignore_ascii_case("gzip") || e.eq_ignore_ascii_case("x-gzip") => {
            Some(Encoding::Gzip)
        }
        Some(e) if e.eq_ignore_ascii_case("deflate") => Some(Encoding::Deflate),
        Some(e) => return Err(format!("content encoding {e}")),
    };
    Ok((readable, encoding))
}

/// A media type that is text people or programs read as characters
/// (logs, metrics, markup, configuration), which patterns can scan.
fn is_text(essence: &str) -> bool {
    let Some((top, sub)) = essence.split_once('/') else {
        return false;
    };
    top == "text"
        || top == "application"
            && (matches!(
                sub,
                "xml" | "yaml" | "x-yaml" | "javascript" | "x-www-form-urlencoded"
            ) || sub.ends_with("+xml")
                || sub.ends_with("+yaml"))
}

/// The most a decoded answer's frame holds: a small body that inflates
/// a thousandfold is decoded one frame of this at a time, as the client
/// takes it.
const DECODED_FRAME: usize = 32 * 1024;

/// A compressed body, decoded as it streams.
fn decoded<B>(body: B, encoding: Encoding) -> Body
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let compressed =
        StreamReader::new(BodyDataStream::new(body).map_err(|e| io::Error::other(e.into())));
    fn frames<R>(decoder: R) -> Body
    where
        R: tokio::io::AsyncRead + Send + 'static,
    {
        let stream = ReaderStream::with_capacity(decoder, DECODED_FRAME)
            .map_ok(Frame::data)
            .map_err(BoxError::from);
        StreamBody::new(stream).boxed_unsync()
    }
    match encoding {
        Encoding::Gzip => {
            let mut decoder = GzipDecoder::new(compressed);
            // Concatenated members are one body, as for `gzip -d`.
            decoder.multiple_members(true);
            frames(decoder)
        }
        Encoding::Deflate => frames(ZlibDecoder::new(compressed)),
    }
}

/// A terminal's direction: WebSocket frames, each piece to `record`.
fn frames(
    mut record: impl FnMut(websocket::Piece<'_>) -> Result<(), crate::sessions::StoreError>,
) -> impl FnMut(&[u8]) -> Result<(), String> {
    let mut reader = websocket::FrameReader::default();
    move |bytes| {
        let mut failed = None;
        reader
            .feed(bytes, &mut |piece| {
                if failed.is_none()
                    && let Err(error) = record(piece)
                {
                    failed = Some(format!("the session cannot be recorded: {error}"));
                }
            })
            .map_err(|e| format!("the terminal's stream cannot be read: {e}"))?;
        failed.map_or(Ok(()), Err)
    }
}

/// How a Kubernetes request's upgraded stream is read, from the server's
/// `101`: a terminal only in the stream protocol (and with `record =
/// "full"`, as it records what was typed); a port-forward in SPDY, bare
/// or tunnelled.
fn relayed(stream: KubeStream, headers: &HeaderMap, records_output: bool) -> Relayed {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase()
    };
    let protocol = text(header::SEC_WEBSOCKET_PROTOCOL);
    match stream {
        KubeStream::Terminal
            if records_output
                && protocol.ends_with("channel.k8s.io")
                && !protocol.starts_with("base64") =>
        {
            Relayed::Terminal
        }
        KubeStream::PortForward if protocol.starts_with("spdy/3.1+") => {
            Relayed::PortForward { tunnelled: true }
        }
        KubeStream::PortForward if text(header::UPGRADE) == "spdy/3.1" => {
            Relayed::PortForward { tunnelled: false }
        }
        _ => Relayed::Opaque,
    }
}

/// Copies one direction of an upgraded stream, handing what passes to
/// `read` before it goes on (an error ends the stream); at the end, the
/// other side's writing half is shut. Returns the bytes copied.
async fn relay_read<R, W>(
    from: &mut R,
    to: &mut W,
    mut read: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<u64, String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 << 10];
    let mut copied = 0u64;
    loop {
        let n = from
            .read(&mut buf)
            .await
            .map_err(|e| format!("the upgraded stream failed: {e}"))?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(copied);
        }
        read(&buf[..n])?;
        // Flushed at once: a terminal's keystrokes and a forwarded
        // connection's bytes must not wait in a TLS buffer.
        async {
            to.write_all(&buf[..n]).await?;
            to.flush().await
        }
        .await
        .map_err(|e: std::io::Error| format!("the upgraded stream failed: {e}"))?;
        copied += n as u64;
    }
}

/// An upgrade's own two headers, which `drop_hop_headers` takes out.
fn keep_upgrade(headers: &mut HeaderMap, upgrade: Option<&HeaderValue>) {
    if let Some(protocol) = upgrade {
        headers.insert(header::UPGRADE, protocol.clone());
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// The host the client named: the URL's authority (HTTP/2's, or an
/// absolute URL's), else the Host header. Two Host headers have no one
/// reading: none is returned, and the request is refused.
fn request_host(request: &Request<Incoming>) -> String {
    if let Some(authority) = request.uri().authority() {
        return authority.as_str().to_owned();
    }
    let mut hosts = request.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(host), None) => host.to_str().unwrap_or(" ").to_owned(),
        (None, _) => String::new(),
        (Some(_), Some(_)) => " (two Host headers)".to_owned(),
    }
}

fn drop_hop_headers(headers: &mut HeaderMap) {
    // Headers the Connection header names are of this hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in HOP_HEADERS.iter().chain(&named) {
        headers.remove(name);
    }
}

impl Connection {
    /// A refused request's answer: which rule, and why, as JSON; for a
    /// Kubernetes client, as the API's own `Status`, which kubectl prints
    /// as `Error from server (Forbidden): …`.
    fn refusal(&self, status: StatusCode, decision: &Decision, grpc: bool) -> Response<Body> {
        let session = self.recorder.id().to_string();
        let rule = decision.rule_name();
        let reason = &decision.verdict.reason;
        let by = rule.map_or_else(String::new, |r| format!(" (rule {r:?})"));
        if grpc {
            // A gRPC client reads a status, not a page: PERMISSION_DENIED
            // (7) or INVALID_ARGUMENT (3), in a trailers-only answer.
            let code = if status == StatusCode::FORBIDDEN {
                "7"
            } else {
                "3"
            };
            // grpc-message is percent-encoded (gRPC over HTTP/2 spec).
            let mut message = String::new();
            for b in format!("interlock: {reason}{by}; session {session}").bytes() {
                match b {
                    b' '..=b'~' if b != b'%' => message.push(char::from(b)),
                    _ => message.push_str(&format!("%{b:02X}")),
                }
            }
            let mut response = Response::new(empty());
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert("grpc-status", HeaderValue::from_static(code));
            if let Ok(message) = HeaderValue::from_str(&message) {
                headers.insert("grpc-message", message);
            }
            return response;
        }
        if self.kubernetes {
            return json(
                status,
                &serde_json::json!({
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Failure",
                    "message": format!("interlock: {reason}{by}; session {session}"),
                    "reason": if status == StatusCode::FORBIDDEN { "Forbidden" } else { "BadRequest" },
                    "code": status.as_u16(),
                }),
            );
        }
        json(
            status,
            &serde_json::json!({
                "error": "interlock: request refused",
                "rule": rule,
                "reason": reason,
                "session_id": session,
            }),
        )
    }
}

fn unavailable(why: &str) -> Response<Body> {
    let mut response = json(
        StatusCode::SERVICE_UNAVAILABLE,
        &serde_json::json!({ "error": format!("interlock: {why}") }),
    );
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let body = Full::new(Bytes::from(body.to_string()))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The upstream side: connections to the original destination, made as
/// the target says (TLS verified against its CAs, or plain).
struct Upstream {
    orig_dst: OrigDstAddr,
    kernel: Arc<dyn crate::intercept::Interception>,
    tls: Option<UpstreamTlsConnectors>,
    idle: Arc<parking_lot::Mutex<Vec<SendRequest<Uploaded>>>>,
    /// The HTTP/2 connection requests share, once the server chose it.
    http2: parking_lot::Mutex<Option<http2::SendRequest<Uploaded>>>,
}

/// TLS to the server: offering HTTP/2 and HTTP/1.1, or HTTP/1.1 alone
/// (for upgrades), for the server's name.
struct UpstreamTlsConnectors {
    any: tokio_rustls::TlsConnector,
    http1: tokio_rustls::TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
}

/// A connection's way to send a request.
enum Sender {
    Http1(SendRequest<Uploaded>),
    Http2(http2::SendRequest<Uploaded>),
}

impl Upstream {
    fn new(
        context: &ProxyContext,
        target: &crate::policy::Target,
        orig_dst: OrigDstAddr,
    ) -> Result<Self, String> {
        let tls = match target.tls {
            UpstreamTls::Disable => None,
            mode => {
                let configs = crate::tls::upstream_http_configs(
                    mode,
                    target.tls_ca_file.as_deref(),
                    target.client_identity.as_deref(),
                )
                .map_err(|e| e.to_string())?;
                let name = super::upstream_name(target, &orig_dst);
                let name = rustls::pki_types::ServerName::try_from(name.clone())
                    .map_err(|_| format!("{name:?} is not a server name"))?;
                Some(UpstreamTlsConnectors {
                    any: tokio_rustls::TlsConnector::from(configs.any),
                    http1: tokio_rustls::TlsConnector::from(configs.http1),
                    name,
                })
            }
        };
        Ok(Self {
            orig_dst,
            kernel: context.gate.kernel.clone(),
            tls,
            idle: Arc::default(),
            http2: parking_lot::Mutex::default(),
        })
    }

    /// The shared HTTP/2 connection, an idle HTTP/1.1 one, or a new one
    /// (`http1_only`: an upgrade, or a client that spoke HTTP/1.1); and
    /// whether it was in use before.
    async fn sender(&self, http1_only: bool) -> Result<(Sender, bool), String> {
        if !http1_only
            && let Some(shared) = self.http2.lock().as_ref()
            && !shared.is_closed()
        {
            return Ok((Sender::Http2(shared.clone()), true));
        }
        while let Some(sender) = self.idle.lock().pop() {
            if sender.is_ready() {
                return Ok((Sender::Http1(sender), true));
            }
        }
        self.connect(http1_only).await.map(|sender| (sender, false))
    }

    /// A new connection to the server.
    async fn connect(&self, http1_only: bool) -> Result<Sender, String> {
        let dst = self.orig_dst;
        let tcp = super::tcp::connect_upstream(dst, &*self.kernel)
            .await
            .map_err(|e| format!("connecting to {}: {e}", dst.0))?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return handshake(tcp).await.map(Sender::Http1);
        };
        let connector = if http1_only { &tls.http1 } else { &tls.any };
        let stream = connector
            .connect(tls.name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS to {}: {e}", dst.0))?;
        if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
            return handshake(stream).await.map(Sender::Http1);
        }
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP/2 to the server: {e}"))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream HTTP/2 connection ended");
            }
        });
        *self.http2.lock() = Some(sender.clone());
        Ok(Sender::Http2(sender))
    }

    /// Drops the shared HTTP/2 connection after a failure on it: the next
    /// request opens a new one.
    fn forget_http2(&self) {
        self.http2.lock().take();
    }

    /// Keeps a connection for the next request once its answer has been
    /// read to the end.
    fn give_back(&self, mut sender: SendRequest<Uploaded>) {
        let idle = self.idle.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                let mut idle = idle.lock();
                if idle.len() < IDLE_UPSTREAMS {
                    idle.push(sender);
                }
            }
        });
    }
}

async fn handshake<S>(io: S) -> Result<SendRequest<Uploaded>, String>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP to the server: {e}"))?;
    tokio::spawn(async move {
        // An upgraded connection is handed to the relay, not closed.
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%error, "upstream HTTP connection ended");
        }
    });
    Ok(sender)
}

/// The client's request body on its way up, counted, and with `record =
/// "full"` recorded (`input` events): a chunk that cannot be recorded
/// fails the request instead of going up.
struct Uploaded {
    /// None: no body (a request sent again, which had none).
    inner: Option<Incoming>,
    connection: Arc<Connection>,
}

impl HttpBody for Uploaded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let connection = &self.connection;
            connection
                .bytes
                .up
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            if let Err(why) = connection.record_body(Direction::Input, data) {
                return Poll::Ready(Some(Err(why.into())));
            }
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Incoming::size_hint)
    }
}

/// The server's response body on its way down: the held credential
/// blanked out wherever it is echoed, counted; how it ended is recorded
/// when it is dropped (read to its end, or the client left).
struct Downloaded {
    /// As the server sent it, or decoded to be masked.
    inner: Either<Incoming, Body>,
    n: u64,
    status: u16,
    started: Instant,
    bytes: u64,
    ended: bool,
    error: Option<String>,
    scrub: Option<Scrub>,
    /// JSON values masked as they stream (a Kubernetes Secret's, `json`
    /// masks, value patterns in strings).
    json_mask: Option<JsonMask>,
    /// A text answer's values, masked by patterns as it streams.
    text_mask: Option<StreamMask>,
    /// A frame held back while the scrub's tail goes first.
    pending: Option<Frame<Bytes>>,
    connection: Arc<Connection>,
}

impl Downloaded {
    /// Counts a chunk, and with `record = "full"` records it (`output`
    /// events, after the scrub): a chunk that cannot be recorded ends the
    /// response with an error instead of reaching the client.
    fn count(&mut self, data: Bytes) -> Polled {
        let len = data.len() as u64;
        self.bytes += len;
        self.connection.bytes.down.fetch_add(len, Ordering::Relaxed);
        if let Err(why) = self.connection.record_body(Direction::Output, &data) {
            self.error = Some(why.clone());
            self.ended = true;
            return Poll::Ready(Some(Err(why.into())));
        }
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    /// At the body's end: what the masks and then the scrub held back.
    fn tail(&mut self) -> Bytes {
        let mut tail = Vec::new();
        if let Some(mask) = &mut self.json_mask {
            mask.finish(&mut tail);
        }
        if let Some(mask) = &mut self.text_mask {
            for (_, chunk) in mask.flush() {
                tail.extend_from_slice(&chunk);
            }
        }
        let Some(scrub) = &mut self.scrub else {
            return Bytes::from(tail);
        };
        let mut tail = scrub.push(Bytes::from(tail)).to_vec();
        tail.extend_from_slice(&scrub.finish());
        Bytes::from(tail)
    }
}

/// Masked chunks of text, as one.
fn joined(chunks: Vec<(Option<u32>, Bytes)>) -> Bytes {
    match <[_; 1]>::try_from(chunks) {
        Ok([(_, chunk)]) => chunk,
        Err(chunks) => chunks.into_iter().flat_map(|(_, c)| c).collect(),
    }
}

impl HttpBody for Downloaded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        if let Some(frame) = self.pending.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if self.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    let data = if let Some(mask) = &mut self.json_mask {
                        let mut masked = Vec::with_capacity(data.len());
                        mask.push(&data, &mut masked);
                        Bytes::from(masked)
                    } else if let Some(mask) = &mut self.text_mask {
                        joined(mask.push(None, &data))
                    } else {
                        data
                    };
                    let data = match &mut self.scrub {
                        Some(scrub) => scrub.push(data),
                        None => data,
                    };
                    self.count(data)
                }
                // Trailers: whatever the masks and the scrub hold back
                // goes first.
                Err(frame) => {
                    let tail = self.tail();
                    if tail.is_empty() {
                        Poll::Ready(Some(Ok(frame)))
                    } else {
                        self.pending = Some(frame);
                        self.count(tail)
                    }
                }
            },
            Poll::Ready(Some(Err(error))) => {
                self.error = Some(error.to_string());
                Poll::Ready(Some(Err(error)))
            }
            Poll::Ready(None) => {
                self.ended = true;
                let tail = self.tail();
                if tail.is_empty() {
                    Poll::Ready(None)
                } else {
                    self.count(tail)
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none()
            && (self.ended
                || (self.inner.is_end_stream()
                    && self.json_mask.is_none()
                    && self.text_mask.is_none()
                    && self.scrub.as_ref().is_none_or(Scrub::is_empty)))
    }

    fn size_hint(&self) -> SizeHint {
        // Masked values change the length.
        if self.json_mask.is_some() || self.text_mask.is_some() {
            return SizeHint::default();
        }
        self.inner.size_hint()
    }
}

/// Blanks out a secret wherever it appears in a stream of chunks, keeping
/// lengths (so `Content-Length` stays true): a chunk's end that could be
/// the start of the secret is held back until the next one shows whether
/// it is. A chunk with neither passes as it is, without a copy.
struct Scrub {
    secret: Arc<[u8]>,
    finder: memchr::memmem::Finder<'static>,
    tail: Vec<u8>,
}

/// Shorter secrets are not looked for: they would blank out ordinary text.
const SCRUB_MIN_LEN: usize = 8;

impl Scrub {
    fn new(secret: Arc<[u8]>) -> Option<Self> {
        (secret.len() >= SCRUB_MIN_LEN).then(|| Self {
            finder: memchr::memmem::Finder::new(&secret[..]).into_owned(),
            secret,
            tail: Vec::new(),
        })
    }

    fn push(&mut self, chunk: Bytes) -> Bytes {
        let mut data = if self.tail.is_empty() {
            chunk
        } else {
            let mut joined = std::mem::take(&mut self.tail);
            joined.extend_from_slice(&chunk);
            Bytes::from(joined)
        };
        if let Some(blanked) = self.blanked(&data) {
            data = Bytes::from(blanked);
        }
        let hold = self.overlap(&data);
        if hold > 0 {
            self.tail.extend_from_slice(&data[data.len() - hold..]);
            data.truncate(data.len() - hold);
        }
        data
    }

    /// The longest end of `data` that is a start of the secret.
    fn overlap(&self, data: &[u8]) -> usize {
        let longest = (self.secret.len() - 1).min(data.len());
        (1..=longest)
            .rev()
            .find(|&k| data[data.len() - k..] == self.secret[..k])
            .unwrap_or(0)
    }

    fn finish(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.tail))
    }

    fn is_empty(&self) -> bool {
        self.tail.is_empty()
    }
}

impl Scrub {
    /// `bytes` with the secret blanked out, if it is there.
    fn blanked(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        self.finder.find(bytes)?;
        let mut blanked = bytes.to_vec();
        for at in self.finder.find_iter(bytes) {
            blanked[at..at + self.secret.len()].fill(b'*');
        }
        Some(blanked)
    }

    /// The same for response headers.
    fn headers(&self, headers: &mut HeaderMap) {
        for value in headers.values_mut() {
            if let Some(blanked) = self.blanked(value.as_bytes())
                && let Ok(new) = HeaderValue::from_bytes(&blanked)
            {
                *value = new;
            }
        }
    }
}

impl Drop for Downloaded {
    fn drop(&mut self) {
        let ended = self.ended || self.inner.is_end_stream();
        let error = match (&self.error, ended) {
            (Some(error), _) => Some(error.as_str()),
            (None, true) => None,
            (None, false) => Some("the client stopped reading before the end"),
        };
        let masked = self.json_mask.as_ref().map_or(0, |mask| mask.masked);
        self.connection.record_response(
            self.n,
            Some(self.status),
            self.bytes,
            masked,
            self.started,
            error,
        );
    }
}

/// For the fuzz target: a server's body cut where the input says, through
/// the scrub, must come out as the whole body blanked at once would.
#[doc(hidden)]
pub fn fuzz_scrub(data: &[u8]) {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let secret: Arc<[u8]> = b"tok-1234tok".as_slice().into();
    let mut scrub = Scrub::new(secret.clone()).expect("long enough");
    let mut out = Vec::with_capacity(body.len());
    for chunk in body.chunks(usize::from(cut).max(1)) {
        out.extend_from_slice(&scrub.push(Bytes::copy_from_slice(chunk)));
    }
    out.extend_from_slice(&scrub.finish());
    let mut whole = Scrub::new(secret).expect("long enough");
    let mut want = whole.push(Bytes::copy_from_slice(body)).to_vec();
    want.extend_from_slice(&whole.finish());
    assert_eq!(out, want);
    assert!(memchr::memmem::find(&out, b"tok-1234tok").is_none());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The secret cut at every point across two chunks, and twice in one.
    #[test]
    fn an_echoed_secret_is_blanked_out_wherever_chunks_cut_it() {
        let secret: Arc<[u8]> = b"tok-123456".as_slice().into();
        let text = br#"{"auth": "Bearer tok-123456", "again": "tok-123456tok-12"}"#;
        let want = br#"{"auth": "Bearer **********", "again": "**********tok-12"}"#;
        for cut in 0..=text.len() {
            let mut scrub = Scrub::new(secret.clone()).unwrap();
            let mut out = Vec::new();
            out.extend_from_slice(&scrub.push(Bytes::copy_from_slice(&text[..cut])));
            out.extend_from_slice(&scrub.push(Bytes::copy_from_slice(&text[cut..])));
            out.extend_from_slice(&scrub.finish());
            assert_eq!(out, want, "cut at {cut}");
        }
        // Byte by byte.
        let mut scrub = Scrub::new(secret.clone()).unwrap();
        let mut out = Vec::new();
        for byte in text {
            out.extend_from_slice(&scrub.push(Bytes::copy_from_slice(&[*byte])));
        }
        out.extend_from_slice(&scrub.finish());
        assert_eq!(out, want);
        // A chunk without the secret passes without a copy.
        let mut scrub = Scrub::new(secret.clone()).unwrap();
        let plain = Bytes::from_static(b"nothing here");
        let passed = scrub.push(plain.clone());
        assert_eq!(passed.as_ptr(), plain.as_ptr());
        assert!(Scrub::new(b"short".as_slice().into()).is_none());

        let mut headers = HeaderMap::new();
        headers.insert("x-echo", HeaderValue::from_static("Bearer tok-123456"));
        Scrub::new(secret).unwrap().headers(&mut headers);
        assert_eq!(headers["x-echo"], "Bearer **********");
    }

    fn compressed(encoding: Encoding, text: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let level = flate2::Compression::default();
        match encoding {
            Encoding::Gzip => {
                let mut out = flate2::write::GzEncoder::new(Vec::new(), level);
                out.write_all(text).unwrap();
                out.finish().unwrap()
            }
            Encoding::Deflate => {
                let mut out = flate2::write::ZlibEncoder::new(Vec::new(), level);
                out.write_all(text).unwrap();
                out.finish().unwrap()
            }
        }
    }

    /// The frames of a body decoded from `chunks`.
    async fn frames_of(encoding: Encoding, chunks: Vec<Vec<u8>>) -> Result<Vec<Bytes>, String> {
        let chunks = chunks
            .into_iter()
            .map(|c| Ok::<_, Infallible>(Frame::data(Bytes::from(c))));
        let mut body = decoded(StreamBody::new(futures::stream::iter(chunks)), encoding);
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            frames.push(frame.into_data().unwrap());
        }
        Ok(frames)
    }

    /// Decoded whatever the chunks, in frames of at most DECODED_FRAME
    /// however far it inflates; a corrupt body ends in an error.
    #[tokio::test]
    async fn compressed_answers_are_decoded_in_bounded_frames() {
        let text = "{\"password\": \"x\"}\n".repeat(200_000);
        for encoding in [Encoding::Gzip, Encoding::Deflate] {
            let packed = compressed(encoding, text.as_bytes());
            assert!(packed.len() * 100 < text.len());
            for cut in [1, 7, 4096, packed.len()] {
                let chunks = packed.chunks(cut).map(<[u8]>::to_vec).collect();
                let frames = frames_of(encoding, chunks).await.unwrap();
                assert!(frames.iter().all(|f| f.len() <= DECODED_FRAME));
                assert_eq!(frames.concat(), text.as_bytes(), "{encoding:?} in {cut}s");
            }
            let mut corrupt = packed.clone();
            corrupt.truncate(packed.len() / 2);
            corrupt.extend_from_slice(&[0xff; 64]);
            assert!(
                frames_of(encoding, vec![corrupt]).await.is_err(),
                "{encoding:?}"
            );
        }
        // Two gzip members are one body.
        let mut two = compressed(Encoding::Gzip, b"[1,");
        two.extend(compressed(Encoding::Gzip, b"2]"));
        assert_eq!(
            frames_of(Encoding::Gzip, vec![two]).await.unwrap().concat(),
            b"[1,2]"
        );
    }

    #[test]
    fn json_or_text_in_a_known_encoding_is_maskable() {
        let answer = |kind: &'static str, encoding: Option<&'static str>, text: bool| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
            if let Some(e) = encoding {
                headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(e));
            }
            maskable(&headers, text)
        };
        let json = |encoding| answer("application/json", encoding, false);
        assert_eq!(json(None), Ok((Readable::Json, None)));
        assert_eq!(json(Some("identity")), Ok((Readable::Json, None)));
        assert_eq!(
            json(Some("GZIP")),
            Ok((Readable::Json, Some(Encoding::Gzip)))
        );
        assert_eq!(
            json(Some("x-gzip")),
            Ok((Readable::Json, Some(Encoding::Gzip)))
        );
        assert_eq!(
            json(Some("deflate")),
            Ok((Readable::Json, Some(Encoding::Deflate)))
        );
        assert!(json(Some("br")).is_err());
        assert!(json(Some("gzip, gzip")).is_err());
        assert_eq!(
            answer("application/x-ndjson", None, false),
            Ok((Readable::Json, None))
        );
        // Text is read by patterns alone: not when JSON values are masked
        // (JSON served as text would pass unmasked).
        assert!(answer("text/html", None, false).is_err());
        for kind in [
            "text/plain; charset=utf-8",
            "TEXT/HTML",
            "application/xml",
            "application/atom+xml",
            "application/yaml",
        ] {
            assert_eq!(
                answer(kind, None, true),
                Ok((Readable::Text, None)),
                "{kind}"
            );
        }
        for kind in [
            "application/vnd.kubernetes.protobuf",
            "application/octet-stream",
            "image/png",
            "",
        ] {
            assert!(answer(kind, None, true).is_err(), "{kind}");
        }
        assert!(answer("application/vnd.kubernetes.protobuf", Some("gzip"), false).is_err());
    }
}
