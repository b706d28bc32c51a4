//! The webhook: each new request and each outcome is POSTed as JSON to
//! `[approvals] webhook_url` (HTTPS, rustls), signed with the shared token
//! when there is one: the request record with a one-line `text`, or with
//! `webhook_format = "slack"` an incoming-webhook message whose blocks
//! give the details and, with a callback, approve and deny links.
//!
//! One sender delivers in order (a request's outcome never arrives before
//! the request), retrying each payload with backoff; a payload that still
//! fails is logged and dropped, never blocking a held command.
use std::{sync::Arc, time::Duration};

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::mpsc;

use super::{RequestRecord, RequestState};
use crate::config::{ApprovalSettings, WebhookFormat};
use crate::policy::Secret;

/// Tries per payload, and the first wait between them (doubling).
const ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Payloads waiting beyond this are dropped (and logged).
const QUEUE: usize = 1024;

#[derive(Clone)]
pub struct Notifier {
    queue: mpsc::Sender<Vec<u8>>,
    format: WebhookFormat,
    /// The callback's address and key, for links in chat messages.
    links: Option<(url::Url, Arc<Secret>)>,
}

#[derive(Serialize)]
struct Payload<'a> {
    /// `approval.requested`, `approval.approved`, ...
    event: String,
    /// One line for chat (Slack's `text`).
    text: String,
    request: &'a RequestRecord,
}

impl Notifier {
    /// Starts the sender (on the current runtime) when a webhook is set.
    pub fn start(settings: &ApprovalSettings) -> Result<Option<Self>, String> {
        let Some(url) = settings.webhook_url.clone() else {
            return Ok(None);
        };
        let tls = crate::tls::upstream_config(
            crate::policy::UpstreamTls::VerifyFull,
            settings.webhook_ca_file.as_deref(),
        )
        .map_err(|e| format!("webhook TLS: {e}"))?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured((*tls).clone())
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("webhook client: {e}"))?;
        let (queue, payloads) = mpsc::channel(QUEUE);
        tokio::spawn(deliver(client, url, settings.token.clone(), payloads));
        let links = settings.callback_url.clone().zip(settings.token.clone());
        Ok(Some(Self {
            queue,
            format: settings.webhook_format,
            links,
        }))
    }

    pub fn send(&self, record: &RequestRecord) {
        let body = match self.format {
            WebhookFormat::Json => serde_json::to_vec(&Payload {
                event: format!("approval.{}", record.state.as_str()),
                text: chat_text(record),
                request: record,
            }),
            WebhookFormat::Slack => serde_json::to_vec(&self.slack_message(record)),
        };
        match body {
            Ok(body) => {
                if self.queue.try_send(body).is_err() {
                    tracing::error!(id = %record.id, "webhook queue full; notification dropped");
                }
            }
            Err(error) => tracing::error!(%error, "cannot serialise a webhook payload"),
        }
    }
}

async fn deliver(
    client: reqwest::Client,
    url: url::Url,
    token: Option<Arc<Secret>>,
    mut payloads: mpsc::Receiver<Vec<u8>>,
) {
    while let Some(body) = payloads.recv().await {
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=ATTEMPTS {
            let timestamp = super::now_ms() / 1000;
            let mut request = client
                .post(url.clone())
                .header("content-type", "application/json")
                .header("x-interlock-timestamp", timestamp.to_string());
            if let Some(token) = &token {
                request = request.header(
                    "x-interlock-signature",
                    format!("sha256={}", sign(token, timestamp, &body)),
                );
            }
            let error = match request.body(body.clone()).send().await {
                Ok(response) if response.status().is_success() => break,
                Ok(response) => {
                    let status = response.status();
                    // The receiver refused the payload itself: sending it
                    // again would not help.
                    if status.is_client_error() && !matches!(status.as_u16(), 408 | 429) {
                        tracing::error!(%status, "webhook refused a notification");
                        break;
                    }
                    format!("HTTP {status}")
                }
                Err(error) => error.to_string(),
            };
            if attempt == ATTEMPTS {
                tracing::error!(%error, attempts = ATTEMPTS, "webhook unreachable; notification dropped");
            } else {
                tracing::warn!(%error, attempt, "webhook failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
    }
}

/// Hex HMAC-SHA256 of `"{timestamp}.{body}"` under the shared token: what
/// `x-interlock-signature` carries both ways.
pub fn sign(token: &Secret, timestamp: u64, body: &[u8]) -> String {
    hex::encode(mac(token, timestamp, body).finalize().into_bytes())
}

/// Whether `signature` (hex) signs `body` at `timestamp`; constant time.
pub fn verify(token: &Secret, timestamp: u64, body: &[u8], signature: &str) -> bool {
    let Ok(bytes) = hex::decode(signature) else {
        return false;
    };
    mac(token, timestamp, body).verify_slice(&bytes).is_ok()
}

fn mac(token: &Secret, timestamp: u64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(token.expose().as_bytes()).expect("any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

impl Notifier {
    /// A Slack incoming-webhook message (Block Kit): the line, the
    /// details an approver decides on, and link buttons while pending.
    fn slack_message(&self, record: &RequestRecord) -> serde_json::Value {
        let text = chat_text(record);
        let mut details = vec![format!("*{}*", mrkdwn(&text))];
        if record.state == RequestState::Pending {
            let who = &record.requester;
            details.push(format!("*Who:* {}", mrkdwn(&who.describe())));
            if let Some(reason) = &who.reason {
                details.push(format!("*Reason (stated):* {}", mrkdwn(reason)));
            }
            details.push(format!(
                "*Target:* {}   *Rule:* {}   *Grant:* {}",
                mrkdwn(&record.target),
                mrkdwn(&record.rule),
                mrkdwn(&record.grant)
            ));
            details.push(format!(
                "*Command:*\n```{}```",
                mrkdwn(&record.command).replace("```", "'''")
            ));
        }
        let mut blocks = vec![serde_json::json!({
            "type": "section",
            "text": {"type": "mrkdwn", "text": details.join("\n")},
        })];
        if let (RequestState::Pending, Some((base, token))) = (record.state, &self.links) {
            let expires = record.expires_ms / 1000;
            let link = |decision| super::callback::link(base, token, &record.id, decision, expires);
            blocks.push(serde_json::json!({
                "type": "actions",
                "elements": [
                    {"type": "button", "style": "primary", "text": {"type": "plain_text", "text": "Approve"}, "url": link("approve")},
                    {"type": "button", "style": "danger", "text": {"type": "plain_text", "text": "Deny"}, "url": link("deny")},
                ],
            }));
        }
        serde_json::json!({ "text": text, "blocks": blocks })
    }
}

/// Slack's mrkdwn escapes: `&`, `<`, `>`.
fn mrkdwn(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn chat_text(record: &RequestRecord) -> String {
    let who = record.requester.describe();
    let approvals = record.answers.iter().filter(|a| a.approve).count();
    match record.state {
        RequestState::Pending if approvals > 0 => format!(
            "Request {} on {}: {approvals} of {} approvals ({}); waiting for more: `{}`",
            record.id,
            record.host,
            record.min_approvals,
            record.deciders().join(", "),
            record.command
        ),
        RequestState::Pending => format!(
            "Approval needed on {host}: {who} wants to run on target {target} (rule {rule}): `{command}` — `interlock approvals approve {id}` or `interlock approvals deny {id} --reason ...` (expires in {timeout})",
            host = record.host,
            target = record.target,
            rule = record.rule,
            command = record.command,
            id = record.id,
            timeout = humantime::format_duration(Duration::from_secs(
                record.expires_ms.saturating_sub(record.created_ms) / 1000
            )),
        ),
        RequestState::Approved => format!(
            "Approved on {}: request {} by {}: `{}`",
            record.host,
            record.id,
            record.deciders().join(", "),
            record.command
        ),
        _ => format!("{}: `{}`", record.refusal(), record.command),
    }
}
