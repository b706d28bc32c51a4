//! `interlock bench-store` (hidden; driven by `cargo xtask bench sessions`):
//! the store measured on its own. Sessions record statements as the
//! PostgreSQL proxy does (a `statement` event waited on before it would go
//! upstream, a `result` event not waited on), then ship to a bucket.
use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{Bucket, Event, Store, Summary, ship};
use crate::policy::{Action, KindSet, RecordMode, StatementKind};

#[derive(Serialize)]
pub struct StoreReport {
    pub sessions: usize,
    pub statements: usize,
    pub durable: bool,
    pub events_per_s: f64,
    /// Per statement: append and, when durable, the wait for its flush.
    pub p50_us: f64,
    pub p99_us: f64,
    pub seconds: f64,
}

#[derive(Serialize)]
pub struct ShipReport {
    pub sessions: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub sessions_per_s: f64,
    pub mb_per_s: f64,
}

pub async fn record(
    dir: &Path,
    sessions: usize,
    statements: usize,
    durable: bool,
) -> anyhow::Result<(Arc<Store>, StoreReport)> {
    let store = Store::open(
        &dir.join("sessions"),
        &dir.join("host.key"),
        "bench".into(),
        u64::MAX,
    )?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..sessions {
        let store = store.clone();
        tasks.spawn(async move { one_session(&store, statements, durable).await });
    }
    let mut latencies = Vec::with_capacity(sessions * statements);
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done??);
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    let report = StoreReport {
        sessions,
        statements,
        durable,
        // Per session: start, connection, end; per statement: two.
        events_per_s: (sessions * (statements * 2 + 3)) as f64 / seconds,
        p50_us: at(0.50),
        p99_us: at(0.99),
        seconds,
    };
    Ok((store, report))
}

async fn one_session(
    store: &Arc<Store>,
    statements: usize,
    durable: bool,
) -> anyhow::Result<Vec<Duration>> {
    let id = ulid::Ulid::new();
    let workload = crate::workload::Workload {
        comm: "pgbench".into(),
        exe: Some("/usr/lib/postgresql/15/bin/pgbench".into()),
        ..Default::default()
    };
    let summary = Summary {
        id: id.to_string(),
        outcome: "live".into(),
        ..Summary::default()
    };
    let start = Event::SessionStart {
        schema: super::format::SCHEMA_VERSION,
        session_id: &summary.id.clone(),
        host: "bench",
        protocol: "postgres",
        target: "db",
        client: "127.0.0.1:50000".parse()?,
        orig_dst: "127.0.0.40:5432".parse()?,
        workload: &workload,
        workloads: &["bench"],
        record: RecordMode::Commands,
        policy_bundle: None,
    };
    let connection = Event::Connection {
        decision: Action::Allow,
        enforced: true,
        rule: Some("bench-reads"),
        reason: "allowed",
        as_user: None,
    };
    let (recorder, ticket) = store.begin(id, summary, &start, &connection, false)?;
    recorder.durable(ticket).await?;
    let tables = ["public.pgbench_accounts".to_owned()];
    let mut latencies = Vec::with_capacity(statements);
    for _ in 0..statements {
        let started = Instant::now();
        let n = recorder.next_statement();
        let ticket = recorder.append(&Event::Statement {
            n,
            text: "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            kinds: KindSet::from_iter([StatementKind::Select]),
            tables: &tables,
            functions: &[],
            unparsed: false,
            writes: false,
            decision: Action::Allow,
            enforced: true,
            rule: Some("bench-reads"),
        })?;
        if durable {
            recorder.durable(ticket).await?;
        }
        latencies.push(started.elapsed());
        recorder.append(&Event::Result {
            n,
            outcome: crate::sessions::StatementOutcome::Ok,
            rows: Some(1),
            cells_masked: 0,
            duration_us: Some(150),
        })?;
    }
    recorder.finish("closed", None, 0, 0);
    Ok(latencies)
}

pub async fn ship(store: &Arc<Store>, bucket: &Bucket) -> anyhow::Result<ShipReport> {
    let started = Instant::now();
    let (sessions, bytes) = ship::drain(store, bucket).await?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(ShipReport {
        sessions,
        bytes,
        seconds,
        sessions_per_s: sessions as f64 / seconds,
        mb_per_s: bytes as f64 / 1e6 / seconds,
    })
}
