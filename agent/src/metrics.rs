//! Prometheus metrics (`prometheus-client`, OpenMetrics text), served on
//! `[agent] metrics_listen` when set. Labels are bounded: target,
//! protocol, decision, outcome, statement kind — never a pid, an
//! executable, SQL or a path.
//!
//! Counters are counted where things happen (one atomic add on a counter
//! handle a session keeps); gauges are read from the agent when scraped.
use std::sync::OnceLock;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub target: String,
    pub protocol: &'static str,
    pub decision: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub target: String,
    /// `statement` (SQL), `http_request`, `ssh_request`.
    pub kind: &'static str,
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// Values read from the agent at each scrape.
#[derive(Default)]
pub struct Gauges {
    pub approvals_pending: Gauge,
    pub grants_active: Gauge,
    pub store_bytes: Gauge,
    pub store_max_bytes: Gauge,
    pub store_admitting: Gauge,
    pub backlog_sessions: Gauge,
    pub backlog_bytes: Gauge,
    pub backlog_oldest_seconds: Gauge,
    pub protected_entries: Gauge,
    pub pending_redirects: Gauge,
    pub programs_attached: Gauge,
    pub ci_job_capture: Gauge,
    pub live_connections: Gauge,
    pub bundle_serial: Gauge,
}

pub struct Metrics {
    registry: Registry,
    pub connections: Family<ConnectionLabels, Counter>,
    pub decisions: Family<DecisionLabels, Counter>,
    pub approvals: Family<OutcomeLabels, Counter>,
    pub reloads: Family<OutcomeLabels, Counter>,
    pub bundle_checks: Family<OutcomeLabels, Counter>,
    pub shipping_errors: Counter,
    pub store_flush_seconds: Histogram,
    pub gauges: Gauges,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("interlock");
        let connections = Family::<ConnectionLabels, Counter>::default();
        registry.register(
            "connections",
            "Intercepted connections that ended, by target, protocol, decision and outcome",
            connections.clone(),
        );
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Statements and requests decided, by target, kind and decision (as enforced)",
            decisions.clone(),
        );
        let approvals = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "approvals",
            "Approval requests that ended, by outcome",
            approvals.clone(),
        );
        let reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy reloads, by outcome (ok, failed)",
            reloads.clone(),
        );
        let bundle_checks = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "policy_bundle_checks",
            "Checks of [policy_source], by outcome (applied, unchanged, refused, unreachable)",
            bundle_checks.clone(),
        );
        let shipping_errors = Counter::default();
        registry.register(
            "shipping_errors",
            "Failed uploads of sessions to object storage",
            shipping_errors.clone(),
        );
        // 100 µs .. ~3 s.
        let store_flush_seconds = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 16),
        );
        registry.register(
            "store_flush_seconds",
            "Session store group commits: time to make a batch durable",
            store_flush_seconds.clone(),
        );
        let gauges = Gauges::default();
        for (name, help, gauge) in [
            (
                "approvals_pending",
                "Approval requests waiting",
                &gauges.approvals_pending,
            ),
            ("grants_active", "Grants in force", &gauges.grants_active),
            (
                "store_bytes",
                "Bytes the session store takes",
                &gauges.store_bytes,
            ),
            (
                "store_max_bytes",
                "The session store's limit",
                &gauges.store_max_bytes,
            ),
            (
                "store_admitting",
                "1 when new sessions are admitted (the store can record them)",
                &gauges.store_admitting,
            ),
            (
                "shipping_backlog_sessions",
                "Sessions waiting to ship",
                &gauges.backlog_sessions,
            ),
            (
                "shipping_backlog_bytes",
                "Bytes waiting to ship",
                &gauges.backlog_bytes,
            ),
            (
                "shipping_backlog_oldest_seconds",
                "Age of the oldest session waiting to ship",
                &gauges.backlog_oldest_seconds,
            ),
            (
                "kernel_protected_entries",
                "Entries in the kernel's protected-destination map",
                &gauges.protected_entries,
            ),
            (
                "kernel_pending_redirects",
                "Redirected connects the agent has not taken yet (kernel connection table, 65,536 entries)",
                &gauges.pending_redirects,
            ),
            (
                "kernel_programs_attached",
                "Kernel programs pinned and attached to the workloads' cgroup",
                &gauges.programs_attached,
            ),
            (
                "ci_job_capture",
                "1 when CI jobs are read from the environment their runner passed at exec",
                &gauges.ci_job_capture,
            ),
            (
                "connections_live",
                "Connections open now",
                &gauges.live_connections,
            ),
            (
                "policy_bundle_serial",
                "Serial of the signed policy bundle in force (0: none)",
                &gauges.bundle_serial,
            ),
        ] {
            registry.register(name, help, gauge.clone());
        }
        // Outcomes are known in advance: their series exist from the start
        // (at 0), so `increase()` sees the first one.
        for outcome in ["approved", "denied", "timed_out", "withdrawn", "abandoned"] {
            let _ = approvals.get_or_create(&OutcomeLabels { outcome });
        }
        for outcome in ["ok", "failed"] {
            let _ = reloads.get_or_create(&OutcomeLabels { outcome });
        }
        for outcome in ["applied", "unchanged", "refused", "unreachable"] {
            let _ = bundle_checks.get_or_create(&OutcomeLabels { outcome });
        }
        let build = Family::<Vec<(String, String)>, Gauge>::default();
        build
            .get_or_create(&vec![("version".into(), env!("CARGO_PKG_VERSION").into())])
            .set(1);
        registry.register("build_info", "The agent's version", build);
        Self {
            registry,
            connections,
            decisions,
            approvals,
            reloads,
            bundle_checks,
            shipping_errors,
            store_flush_seconds,
            gauges,
        }
    }

    /// The text a scrape gets.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(%error, "cannot encode the metrics");
        }
        text
    }

    /// The counter of one kind of decision on one target (a session takes
    /// its handles once; counting is then an atomic add).
    pub fn decision(&self, target: &str, kind: &'static str, decision: &'static str) -> Counter {
        self.decisions
            .get_or_create(&DecisionLabels {
                target: target.to_owned(),
                kind,
                decision,
            })
            .clone()
    }
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Serves `GET /metrics` on `listener` until the task is dropped;
/// `refresh` reads the gauges first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    refresh: impl Fn() + Clone + Send + Sync + 'static,
) {
    crate::local_http::serve(listener, "metrics", move |request: Request<Incoming>| {
        let response = answer(&request, &refresh);
        async move { response }
    })
    .await
}

fn answer(request: &Request<Incoming>, refresh: &impl Fn()) -> Response<Full<Bytes>> {
    let (status, body, kind) = match request.uri().path() {
        "/metrics" => {
            refresh();
            (
                StatusCode::OK,
                get().encode(),
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        }
        _ => (
            StatusCode::NOT_FOUND,
            "metrics are at /metrics\n".to_owned(),
            "text/plain; charset=utf-8",
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(kind),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let metrics = Metrics::new();
        metrics.decision("db", "statement", "deny").inc();
        metrics
            .connections
            .get_or_create(&ConnectionLabels {
                target: "db".into(),
                protocol: "postgres",
                decision: "allow",
                outcome: "closed",
            })
            .inc();
        metrics.store_flush_seconds.observe(0.002);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry).unwrap();
        for expected in [
            "interlock_decisions_total{target=\"db\",kind=\"statement\",decision=\"deny\"} 1",
            "interlock_connections_total{target=\"db\",protocol=\"postgres\",decision=\"allow\",outcome=\"closed\"} 1",
            "interlock_store_flush_seconds_count 1",
            "interlock_build_info{version=",
            "# EOF",
        ] {
            assert!(text.contains(expected), "{expected} in:\n{text}");
        }
    }
}
