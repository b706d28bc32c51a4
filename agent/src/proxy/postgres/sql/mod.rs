//! SQL analysis with PostgreSQL's own parser (libpg_query, through the
//! `pg_query` crate): what each statement of a query string does. What
//! PostgreSQL accepts parses here, comments and quoting tricks disappear in
//! the tree, and nested statements (data-modifying CTEs, EXPLAIN ANALYZE,
//! PREPARE, COPY (query)) are walked, so a write cannot hide inside a read.
//!
//! Parsing costs tens of microseconds, and a hostile statement far more, so:
//! - analyses are shared by statement shape ([`Analyzer`]): two statements
//!   that differ only in literals (`pg_query::fingerprint`, relation names
//!   kept whole) are parsed once, unless literals change their meaning
//!   (`SET search_path`, `set_config`);
//! - statements above [`INLINE_BYTES`] are parsed on the analyser's own
//!   threads, never on the async workers that serve other clients.
mod lean;
mod plpgsql;
mod tree;

use std::{collections::HashMap, sync::Arc};

use parking_lot::Mutex;

pub use tree::{Effect, Name, Parsed, labelled_reason};

/// What the audit text of a statement keeps of its literal values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Literals {
    #[default]
    Keep,
    /// Every literal becomes a `$n` placeholder (`WHERE email = $1`).
    Redact,
}

/// One statement of a query: what it does, and its text for the record.
#[derive(Clone, Debug)]
pub struct Analysed {
    pub parsed: Arc<Parsed>,
    pub text: String,
    /// Why, as a comment before it states (`/* reason: … */`). Kept here,
    /// not in the shared `Parsed`: two queries of one shape differ in it.
    pub stated_reason: Option<String>,
}

/// Statements up to this size are parsed where they arrive (a few tens of
/// microseconds); larger ones on the analyser's threads.
pub const INLINE_BYTES: usize = 2048;

/// Analyses every statement of `sql`. Text that does not parse yields one
/// statement with a problem (denied by policy): a query is never split by
/// hand. Empty and comment-only text yields none, as PostgreSQL runs none.
pub fn analyze(sql: &str, literals: Literals) -> Vec<Analysed> {
    // libpg_query's own code is C; a panic in the crate's Rust side must
    // cost this statement, not the connection's task.
    std::panic::catch_unwind(|| analyze_unguarded(sql, literals)).unwrap_or_else(|_| {
        vec![unparsed(
            sql,
            literals,
            "the SQL parser failed on it".into(),
        )]
    })
}

fn analyze_unguarded(sql: &str, literals: Literals) -> Vec<Analysed> {
    let result = match pg_query::parse(sql, 0) {
        Ok(result) => result,
        Err(error) => return vec![unparsed(sql, literals, parse_problem(&error))],
    };
    let statements = &result.protobuf.stmts;
    // A comment stating a reason lies before its statement's text (the
    // parser's locations start at the first token): it is looked for from
    // the end of the statement before.
    let mut from = 0;
    statements
        .iter()
        .map(|raw| {
            let tree = raw.stmt.as_ref().map(lean::Lean::of).unwrap_or_default();
            let parsed = tree::walk(&tree);
            let end = statement_end(sql, raw.stmt_location, raw.stmt_len);
            let reason = sql.get(from..end).and_then(stated_reason);
            from = end;
            let text = statement_text(sql, raw.stmt_location, raw.stmt_len);
            let text = audit_text(text, literals, parsed.holds_password);
            Analysed {
                parsed: Arc::new(parsed),
                text,
                stated_reason: reason,
            }
        })
        .collect()
}

/// The reason a query states in a comment, `/* reason: INC-42 cleanup */`
/// or `-- reason: …`, as PostgreSQL's own scanner finds comments (text
/// inside a string literal is not one); cut at 512 characters. Text with
/// no comment is not scanned.
pub fn stated_reason(sql: &str) -> Option<String> {
    if !sql.contains("/*") && !sql.contains("--") {
        return None;
    }
    let tokens = pg_query::scan_tokens(sql).ok()?;
    tokens.iter().find_map(|token| {
        let comment = match pg_query::protobuf::Token::try_from(token.token) {
            Ok(pg_query::protobuf::Token::CComment) => sql
                .get(token.start as usize..token.end as usize)?
                .strip_prefix("/*")?
                .strip_suffix("*/")?,
            Ok(pg_query::protobuf::Token::SqlComment) => sql
                .get(token.start as usize..token.end as usize)?
                .strip_prefix("--")?,
            _ => return None,
        };
        labelled_reason(comment)
    })
}

fn parse_problem(error: &pg_query::Error) -> String {
    match error {
        pg_query::Error::Decode(_) => "it nests expressions deeper than the agent analyses (about 45 levels); write it flatter or split it".into(),
        pg_query::Error::Parse(message) if message.contains("stack depth") || message.contains("memory exhausted") => {
            format!("it is nested too deeply to analyse ({message})")
        }
        pg_query::Error::Parse(message) => format!("it does not parse: {message}"),
        other => format!("it cannot be analysed: {other}"),
    }
}

/// One statement's slice of the query text (PostgreSQL's locations are
/// byte offsets; a length of 0 means "to the end").
fn statement_text(sql: &str, location: i32, len: i32) -> &str {
    let start = usize::try_from(location).unwrap_or(0).min(sql.len());
    let end = statement_end(sql, location, len);
    sql.get(start..end).unwrap_or(sql).trim()
}

fn statement_end(sql: &str, location: i32, len: i32) -> usize {
    let start = usize::try_from(location).unwrap_or(0).min(sql.len());
    match usize::try_from(len) {
        Ok(len) if len > 0 => start.saturating_add(len).min(sql.len()),
        _ => sql.len(),
    }
}

/// The text a statement is recorded with: as sent, or with literals
/// replaced (when asked, and always where they may be passwords).
fn audit_text(text: &str, literals: Literals, holds_password: bool) -> String {
    if literals == Literals::Keep && !holds_password {
        return clip(text);
    }
    match pg_query::normalize(text) {
        Ok(normalized) => clip(&normalized),
        Err(_) => withheld(text),
    }
}

fn unparsed(sql: &str, literals: Literals, problem: String) -> Analysed {
    let text = if literals == Literals::Redact || sql.to_ascii_lowercase().contains("password") {
        withheld(sql)
    } else {
        clip(sql.trim())
    };
    Analysed {
        parsed: Arc::new(Parsed {
            problem: Some(problem),
            unparsed: true,
            ..Parsed::default()
        }),
        text,
        stated_reason: None,
    }
}

/// The audit text of a statement whose literals cannot be found.
fn withheld(sql: &str) -> String {
    format!("<unparsed statement of {} bytes, text withheld>", sql.len())
}

fn clip(text: &str) -> String {
    let max = crate::access::MAX_STATEMENT_TEXT;
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Analyses shared by every session: single statements by shape.
pub struct Analyzer {
    by_shape: Mutex<HashMap<u64, Arc<Parsed>>>,
    pool: pool::Pool,
}

impl Analyzer {
    const MAX_SHAPES: usize = 10_000;

    pub fn new(threads: usize) -> Self {
        Self {
            by_shape: Mutex::default(),
            pool: pool::Pool::new(threads),
        }
    }

    /// Analyses `sql` (see [`analyze`]), parsing a statement shape once.
    pub async fn analyze(self: &Arc<Self>, sql: &str, literals: Literals) -> Vec<Analysed> {
        if sql.len() <= INLINE_BYTES {
            return self.analyze_here(sql, literals);
        }
        let this = self.clone();
        let sql = sql.to_owned();
        self.pool
            .run(move || this.analyze_here(&sql, literals))
            .await
            .unwrap_or_else(|| {
                vec![unparsed(
                    "",
                    literals,
                    "the SQL analyser is shutting down".into(),
                )]
            })
    }

    /// The same, on the calling thread.
    pub fn analyze_here(&self, sql: &str, literals: Literals) -> Vec<Analysed> {
        let shape = pg_query::fingerprint(sql, 0, pg_query::FingerprintOptions::FULL_RELNAME)
            .ok()
            .map(|f| f.value);
        let cached = shape.and_then(|shape| self.shapes().get(&shape).cloned());
        if let Some(parsed) = cached {
            let text = audit_text(
                sql.trim().trim_end_matches(';').trim_end(),
                literals,
                parsed.holds_password,
            );
            return vec![Analysed {
                parsed,
                text,
                stated_reason: stated_reason(sql),
            }];
        }
        let analysed = analyze(sql, literals);
        if let (Some(shape), [one]) = (shape, analysed.as_slice())
            && !one.parsed.literal_sensitive
            && one.parsed.problem.is_none()
        {
            let mut shapes = self.shapes();
            if shapes.len() >= Self::MAX_SHAPES {
                shapes.clear();
            }
            shapes.insert(shape, one.parsed.clone());
        }
        analysed
    }

    fn shapes(&self) -> parking_lot::MutexGuard<'_, HashMap<u64, Arc<Parsed>>> {
        self.by_shape.lock()
    }
}

mod pool {
    //! A few threads of their own for large statements: a multi-megabyte
    //! statement takes seconds to parse, which must not stall the async
    //! workers. Bounded: a full queue makes senders wait.
    use std::sync::Arc;

    use parking_lot::Mutex;
    use tokio::sync::{mpsc, oneshot};

    type Job = Box<dyn FnOnce() + Send>;

    pub struct Pool {
        jobs: mpsc::Sender<Job>,
    }

    /// libpg_query checks its own recursion against a stack budget; the
    /// walk over its tree is bounded by the decoder's depth limit. This
    /// leaves ample room for both.
    const STACK_BYTES: usize = 16 * 1024 * 1024;

    impl Pool {
        pub fn new(threads: usize) -> Self {
            let (jobs, rx) = mpsc::channel::<Job>(64);
            let rx = Arc::new(Mutex::new(rx));
            for i in 0..threads.max(1) {
                let rx = rx.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("sql-analyse-{i}"))
                    .stack_size(STACK_BYTES)
                    .spawn(move || {
                        loop {
                            let job = rx.lock().blocking_recv();
                            match job {
                                Some(job) => job(),
                                None => break,
                            }
                        }
                    });
                if let Err(error) = spawned {
                    tracing::error!(%error, "cannot start an SQL analyser thread");
                }
            }
            Self { jobs }
        }

        /// Runs `job` on a pool thread; None if the pool is gone.
        pub async fn run<T: Send + 'static>(
            &self,
            job: impl FnOnce() -> T + Send + 'static,
        ) -> Option<T> {
            let (tx, rx) = oneshot::channel();
            let job: Job = Box::new(move || {
                let _ = tx.send(job());
            });
            self.jobs.send(job).await.ok()?;
            rx.await.ok()
        }
    }
}

#[cfg(test)]
mod tests;
