//! The HTTP callback: how a chat bot or ticket system answers requests.
//!
//! `[approvals] callback_listen` (plain HTTP: keep it on loopback or behind
//! a TLS-terminating proxy). Every call carries `Authorization: Bearer
//! <token>`; an answer is also signed (`x-interlock-timestamp`, and
//! `x-interlock-signature: sha256=<hex HMAC of "{timestamp}.{body}">`,
//! within five minutes), so a captured request cannot be replayed later or
//! altered. The answer names its approver (`"approver": "alice"`), which
//! the rule must list as `webhook:alice` (or `webhook:*`).
//!
//! - `GET /v1/approvals`: pending requests.
//! - `POST /v1/approvals/{id}` with `{"decision": "approve" | "deny",
//!   "approver": "...", "reason": "..."}`.
//!
//! Chat messages (`webhook_format = "slack"`) carry links instead, for a
//! person's browser: `/v1/links/{id}/{approve|deny}?expires=…&sig=…`,
//! signed for that request and decision until the request times out. A
//! GET shows the request and a form (a link preview or a prefetch changes
//! nothing); its POST answers, as approver `webhook:link` — whoever holds
//! the link, so a rule lists `webhook:link` only where the channel's
//! members are its approvers.
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use serde::Deserialize;
use tokio::net::TcpListener;

use super::{ApprovalError, Approvals, Caller};
use crate::policy::Secret;

/// Largest answer accepted.
const MAX_BODY: usize = 64 * 1024;
/// How far a signed answer's timestamp may be from now.
const MAX_SKEW_S: u64 = 300;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AnswerBody {
    decision: Decision,
    approver: String,
    reason: Option<String>,
}

#[derive(Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Decision {
    Approve,
    Deny,
}

/// Serves the callback until the task is dropped.
pub async fn serve(listener: TcpListener, approvals: Arc<Approvals>, token: Arc<Secret>) {
    crate::local_http::serve(listener, "approvals callback", move |request| {
        let (approvals, token) = (approvals.clone(), token.clone());
        async move { handle(request, &approvals, &token).await }
    })
    .await
}

async fn handle(
    request: Request<Incoming>,
    approvals: &Approvals,
    token: &Secret,
) -> Response<Full<Bytes>> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    if let Some(rest) = request.uri().path().strip_prefix(LINKS) {
        let rest = rest.to_owned();
        return link_answer(request, &rest, approvals, token).await;
    }
    let bearer = header("authorization");
    let presented = bearer.as_deref().and_then(|b| b.strip_prefix("Bearer "));
    if !presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.expose().as_bytes())) {
        return reply(StatusCode::UNAUTHORIZED, "a valid bearer token is needed");
    }
    let path = request.uri().path().to_owned();
    let id = path
        .strip_prefix("/v1/approvals")
        .map(|rest| rest.trim_matches('/'));
    match (request.method().clone(), id) {
        (Method::GET, Some("")) => {
            let pending = approvals.pending(
                &Caller::Callback {
                    name: String::new(),
                },
                true,
            );
            json(StatusCode::OK, &pending)
        }
        (Method::POST, Some(id)) if !id.is_empty() && !id.contains('/') => {
            let id = id.to_owned();
            let timestamp = header("x-interlock-timestamp").and_then(|t| t.parse::<u64>().ok());
            let signature = header("x-interlock-signature");
            post_answer(request, &id, timestamp, signature, approvals, token).await
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "use GET /v1/approvals or POST /v1/approvals/{id}",
        ),
    }
}

/// `POST /v1/approvals/{id}`: a signed answer from a chat bot or ticket
/// system.
async fn post_answer(
    request: Request<Incoming>,
    id: &str,
    timestamp: Option<u64>,
    signature: Option<String>,
    approvals: &Approvals,
    token: &Secret,
) -> Response<Full<Bytes>> {
    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the body is larger than 64 KiB or was cut off",
            );
        }
    };
    let now = super::now_ms() / 1000;
    let signed = match (
        timestamp,
        signature.as_deref().and_then(|s| s.strip_prefix("sha256=")),
    ) {
        (Some(ts), Some(sig)) => {
            ts.abs_diff(now) <= MAX_SKEW_S && super::notify::verify(token, ts, &body, sig)
        }
        _ => false,
    };
    if !signed {
        return reply(
            StatusCode::UNAUTHORIZED,
            "the answer must be signed: x-interlock-timestamp (unix seconds, within 5 minutes) and x-interlock-signature: sha256=<HMAC-SHA256 of \"{timestamp}.{body}\">",
        );
    }
    let answer: AnswerBody = match serde_json::from_slice(&body) {
        Ok(answer) => answer,
        Err(error) => {
            return reply(StatusCode::BAD_REQUEST, &format!("bad answer: {error}"));
        }
    };
    if answer.approver.is_empty() {
        return reply(StatusCode::BAD_REQUEST, "approver cannot be empty");
    }
    let caller = Caller::Callback {
        name: answer.approver,
    };
    match approvals.answer(
        id,
        &caller,
        answer.decision == Decision::Approve,
        answer.reason,
    ) {
        Ok(record) => json(StatusCode::OK, &record),
        Err(error) => {
            let status = match error {
                ApprovalError::NotFound(_) | ApprovalError::Ambiguous(_) => StatusCode::NOT_FOUND,
                ApprovalError::NotApprover { .. } | ApprovalError::OwnRequest { .. } => {
                    StatusCode::FORBIDDEN
                }
                ApprovalError::Again(_) => StatusCode::CONFLICT,
                ApprovalError::NoReason => StatusCode::BAD_REQUEST,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            tracing::warn!(%error, "callback answer refused");
            reply(status, &error.to_string())
        }
    }
}

const LINKS: &str = "/v1/links/";

/// The name answers through a link are given (`webhook:link` in a rule).
pub const LINK_APPROVER: &str = "link";

/// A link that answers request `id` with `decision` (`approve`, `deny`)
/// until `expires_s` (unix seconds).
pub fn link(base: &url::Url, token: &Secret, id: &str, decision: &str, expires_s: u64) -> String {
    let mut url = base.clone();
    url.set_path(&format!("{LINKS}{id}/{decision}"));
    url.query_pairs_mut()
        .append_pair("expires", &expires_s.to_string())
        .append_pair("sig", &link_signature(token, id, decision, expires_s));
    url.to_string()
}

fn link_signature(token: &Secret, id: &str, decision: &str, expires_s: u64) -> String {
    super::notify::sign(token, expires_s, format!("link.{id}.{decision}").as_bytes())
}

/// `GET`: the request and a form; `POST` (the form): the answer.
async fn link_answer(
    request: Request<Incoming>,
    rest: &str,
    approvals: &Approvals,
    token: &Secret,
) -> Response<Full<Bytes>> {
    let (id, decision) = match rest.split_once('/') {
        Some((id, decision @ ("approve" | "deny"))) if !id.is_empty() => (id.to_owned(), decision),
        _ => return page(StatusCode::NOT_FOUND, "No such link."),
    };
    let query: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let expires = query.get("expires").and_then(|e| e.parse::<u64>().ok());
    let valid = match (expires, query.get("sig")) {
        (Some(expires), Some(sig)) => {
            expires >= super::now_ms() / 1000
                && super::notify::verify(
                    token,
                    expires,
                    format!("link.{id}.{decision}").as_bytes(),
                    sig,
                )
        }
        _ => false,
    };
    if !valid {
        return page(
            StatusCode::UNAUTHORIZED,
            "This link is not valid, or it has expired.",
        );
    }
    let approve = decision == "approve";
    if request.method() == Method::GET {
        let Some(record) = approvals
            .pending(
                &Caller::Callback {
                    name: String::new(),
                },
                true,
            )
            .into_iter()
            .find(|r| r.id == id)
        else {
            return page(StatusCode::GONE, "This request is no longer pending.");
        };
        let reason_field = if approve {
            r#"<input name="reason" placeholder="note (optional)">"#
        } else {
            r#"<input name="reason" placeholder="why (required)" required>"#
        };
        let body = format!(
            "<p>{who} asks on {host}, target <b>{target}</b>, rule <b>{rule}</b> (grant: {grant}):</p><pre>{command}</pre>{reason}<form method=\"post\">{reason_field} <button type=\"submit\">{verb}</button></form>",
            who = html(&record.requester.describe()),
            host = html(&record.host),
            target = html(&record.target),
            rule = html(&record.rule),
            grant = html(&record.grant),
            command = html(&record.command),
            reason = record
                .requester
                .reason
                .as_deref()
                .map(|r| format!("<p>Stated reason: {}</p>", html(r)))
                .unwrap_or_default(),
            verb = if approve { "Approve" } else { "Deny" },
        );
        return page(StatusCode::OK, &body);
    }
    if request.method() != Method::POST {
        return page(StatusCode::METHOD_NOT_ALLOWED, "GET or POST.");
    }
    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return page(StatusCode::PAYLOAD_TOO_LARGE, "Too large."),
    };
    let reason = url::form_urlencoded::parse(&body)
        .find(|(key, _)| key == "reason")
        .map(|(_, value)| value.into_owned());
    let caller = Caller::Callback {
        name: LINK_APPROVER.into(),
    };
    match approvals.answer(&id, &caller, approve, reason) {
        Ok(record) => page(
            StatusCode::OK,
            &format!("Request {} is {}.", html(&record.id), record.state.as_str()),
        ),
        Err(error) => {
            tracing::warn!(%error, "link answer refused");
            let status = match error {
                ApprovalError::NotFound(_) => StatusCode::GONE,
                ApprovalError::NoReason => StatusCode::BAD_REQUEST,
                ApprovalError::Again(_) => StatusCode::CONFLICT,
                _ => StatusCode::FORBIDDEN,
            };
            page(status, &html(&error.to_string()))
        }
    }
}

fn html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn page(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let text = format!(
        "<!doctype html><meta charset=\"utf-8\"><title>Interlock approval</title><body>{body}</body>"
    );
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // Nothing of it is to be cached or framed.
    headers.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    headers.insert(
        "x-frame-options",
        hyper::header::HeaderValue::from_static("DENY"),
    );
    response
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn reply(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message }))
}
