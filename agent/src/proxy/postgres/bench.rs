//! `interlock bench-statements` (`cargo xtask bench statements`): what
//! deciding a statement costs on its own, without a server: analysis
//! (PostgreSQL's parser and the tree walk), name resolution and policy
//! evaluation, for statements that repeat with new literals — what a
//! simple-protocol client or an ORM sends.
use std::{sync::Arc, time::Instant};

use serde::Serialize;

use super::{
    names::{Names, SystemCatalog},
    sql::{self, Analyzer, Literals},
};
use crate::policy::{Action, KindSet, Pattern, Policy, Rule, SshRequests, StatementKind, TargetId};

#[derive(Serialize)]
pub struct Report {
    pub statements: usize,
    /// Parse and walk every statement.
    pub analyse_us: f64,
    /// The same, analyses shared by statement shape (fingerprint).
    pub shared_us: f64,
    /// Shared analysis, then names resolved and policy evaluated.
    pub decide_us: f64,
}

/// The statement mix: a pgbench read, an ORM-style join, an insert.
fn statement(i: usize) -> String {
    match i % 3 {
        0 => format!(
            "SELECT abalance FROM pgbench_accounts WHERE aid = {}",
            i * 7919 % 1_000_000
        ),
        1 => format!(
            "SELECT o.id, o.total, c.name FROM orders o JOIN customers c ON c.id = o.customer_id \
             WHERE o.created_at > '2026-01-{:02}' ORDER BY o.id LIMIT 50",
            i % 28 + 1
        ),
        _ => format!(
            "INSERT INTO events (kind, payload, at) VALUES ('k{}', '{{\"n\": {i}}}', now())",
            i % 10
        ),
    }
}

pub fn run(count: usize) -> Report {
    let texts: Vec<String> = (0..count).map(statement).collect();
    let per = |started: Instant| started.elapsed().as_secs_f64() * 1e6 / count as f64;

    let started = Instant::now();
    for text in &texts {
        std::hint::black_box(sql::analyze(text, Literals::Keep));
    }
    let analyse_us = per(started);

    let analyzer = Analyzer::new(1);
    let started = Instant::now();
    for text in &texts {
        std::hint::black_box(analyzer.analyze_here(text, Literals::Keep));
    }
    let shared_us = per(started);

    let catalog = SystemCatalog {
        relations: ["pg_class".to_owned()].into(),
        functions: [("now".to_owned(), false)].into(),
    };
    let names = Names::new(
        Arc::new(catalog),
        vec!["pg_catalog".into(), "public".into()],
        "app".into(),
    );
    let policy = Policy {
        rules: vec![Rule {
            name: "app".into(),
            description: None,
            workloads: None,
            targets: None,
            action: Action::Allow,
            statements: Some(KindSet::from_iter([
                StatementKind::Select,
                StatementKind::Insert,
            ])),
            tables: vec![Pattern::new("public.*").expect("a valid glob")],
            no_tables: false,
            enforce: true,
            functions: Vec::new(),
            allow_unparsed: false,
            as_user: None,
            masks: Vec::new(),
            approval: None,
            ssh: SshRequests::default(),
            http: Default::default(),
            kube: Default::default(),
        }],
        ..Policy::default()
    };
    let workload = crate::workload::Workload::default();
    let analyzer = Analyzer::new(1);
    let started = Instant::now();
    for text in &texts {
        for analysed in analyzer.analyze_here(text, Literals::Keep) {
            let statement = names.resolve(&analysed);
            let verdict =
                crate::policy::evaluate_statement(&policy, &workload, TargetId(0), &statement);
            std::hint::black_box(verdict);
        }
    }
    let decide_us = per(started);
    Report {
        statements: count,
        analyse_us,
        shared_us,
        decide_us,
    }
}
