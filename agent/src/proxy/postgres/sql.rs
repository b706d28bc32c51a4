//! SQL analysis with `sqlparser` (PostgreSQL dialect): what each statement
//! of a query string does. Comments, case and quoting tricks disappear in
//! the parse; nested statements (data-modifying CTEs, EXPLAIN ANALYZE,
//! PREPARE) are walked, so a write cannot hide inside a read.
use std::ops::ControlFlow;

use sqlparser::{
    ast::{
        CopyTarget, Expr, ObjectName, ObjectNamePart, Query, SetExpr, Statement, Value, Visit,
        Visitor,
    },
    dialect::PostgreSqlDialect,
    parser::Parser,
};

use crate::policy::{KindSet, StatementInfo, StatementKind};

/// What the audit text of a statement keeps of its literal values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Literals {
    #[default]
    Keep,
    /// Every literal becomes `?` (`WHERE email = ?`).
    Redact,
}

/// Analyses every statement of `sql`. Text that does not parse yields one
/// unparsed statement (denied by policy): a query is never split by hand.
pub fn analyze(sql: &str, literals: Literals) -> Vec<StatementInfo> {
    match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(statements) if !statements.is_empty() => statements
            .into_iter()
            .map(|s| analyze_statement(s, literals))
            .collect(),
        // An empty query (only comments or `;`) runs nothing.
        Ok(_) => Vec::new(),
        Err(_) => vec![StatementInfo {
            text: unparsed_text(sql, literals),
            ..StatementInfo::default()
        }],
    }
}

/// The audit text of a statement that did not parse: its literals cannot
/// be found, so when they must not be kept, or it may carry a password,
/// only its size is.
fn unparsed_text(sql: &str, literals: Literals) -> String {
    if literals == Literals::Redact || sql.to_ascii_lowercase().contains("password") {
        format!("<unparsed statement of {} bytes, text withheld>", sql.len())
    } else {
        clip(sql)
    }
}

/// Statements whose literals may be passwords: redacted whatever the
/// setting, so a secret never reaches the audit log.
fn holds_password(statement: &Statement) -> bool {
    matches!(
        statement,
        Statement::CreateRole(_)
            | Statement::AlterRole { .. }
            | Statement::CreateUser(_)
            | Statement::AlterUser(_)
    )
}

fn redact_literals(statement: &mut Statement) {
    let _ = sqlparser::ast::visit_expressions_mut(statement, |expr| {
        if let Expr::Value(value) = expr {
            value.value = Value::Placeholder("?".into());
        }
        ControlFlow::<()>::Continue(())
    });
}

fn analyze_statement(mut statement: Statement, literals: Literals) -> StatementInfo {
    let mut walker = Walker::default();
    let _ = statement.visit(&mut walker);
    let mut tables: Vec<String> = walker
        .relations
        .iter()
        .filter(|(name, qualified)| *qualified || !walker.ctes.contains(name))
        .map(|(name, _)| name.clone())
        .collect();
    tables.sort();
    tables.dedup();
    if literals == Literals::Redact || holds_password(&statement) {
        redact_literals(&mut statement);
    }
    StatementInfo {
        kinds: walker.kinds,
        tables,
        parsed: true,
        text: clip(&statement.to_string()),
    }
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

#[derive(Default)]
struct Walker {
    kinds: KindSet,
    /// (normalised name, whether it was schema-qualified)
    relations: Vec<(String, bool)>,
    /// CTE names as `public.name`, to tell them from tables.
    ctes: Vec<String>,
}

impl Visitor for Walker {
    type Break = ();

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
        self.kinds.insert(kind_of(statement));
        // sqlparser does not visit the names of dropped objects as
        // relations; they are what a DROP touches.
        if let Statement::Drop { names, .. } = statement {
            self.relations.extend(names.iter().map(table_name));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            self.ctes.extend(
                with.cte_tables
                    .iter()
                    .map(|cte| format!("public.{}", ident(&cte.alias.name))),
            );
        }
        // SELECT ... INTO creates a table.
        if let SetExpr::Select(select) = query.body.as_ref()
            && select.into.is_some()
        {
            self.kinds.insert(StatementKind::Create);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        self.relations.push(table_name(relation));
        ControlFlow::Continue(())
    }
}

/// The kind of one statement (nested ones are visited on their own).
fn kind_of(statement: &Statement) -> StatementKind {
    use StatementKind as K;
    match statement {
        Statement::Query(_) => K::Select,
        Statement::Insert(_) => K::Insert,
        Statement::Update(_) => K::Update,
        Statement::Delete(_) => K::Delete,
        Statement::Merge(_) => K::Merge,
        Statement::Copy { to, target, .. } => match (to, target) {
            (_, CopyTarget::Program { .. }) => K::CopyProgram,
            (true, _) => K::CopyTo,
            (false, _) => K::CopyFrom,
        },
        // Everything else is named by its leading keyword, which the AST's
        // canonical rendering always puts first.
        other => {
            let text = other.to_string();
            let keyword = text
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_ascii_uppercase();
            match keyword.as_str() {
                "CREATE" => K::Create,
                "ALTER" | "COMMENT" => K::Alter,
                "DROP" => K::Drop,
                "TRUNCATE" => K::Truncate,
                "GRANT" => K::Grant,
                "REVOKE" => K::Revoke,
                // Changing search_path or the role changes what names and
                // privileges mean: not an ordinary `set`.
                "SET" if changes_resolution(&text) => K::Other,
                "SET" => K::Set,
                "RESET" | "DISCARD" if changes_resolution(&text) => K::Other,
                "RESET" | "DISCARD" => K::Reset,
                "SHOW" => K::Show,
                "BEGIN" | "START" | "COMMIT" | "ROLLBACK" | "SAVEPOINT" | "RELEASE" | "END"
                | "ABORT" => K::Transaction,
                "CALL" => K::Call,
                "DO" => K::Do,
                "EXECUTE" => K::Execute,
                "PREPARE" | "DEALLOCATE" => K::Prepare,
                "EXPLAIN" => K::Explain,
                "LISTEN" | "UNLISTEN" => K::Listen,
                "NOTIFY" => K::Notify,
                "VACUUM" => K::Vacuum,
                "ANALYZE" => K::Analyze,
                "DECLARE" | "FETCH" | "CLOSE" | "MOVE" => K::Select,
                _ => K::Other,
            }
        }
    }
}

fn changes_resolution(set: &str) -> bool {
    let lower = set.to_ascii_lowercase();
    // `RESET ALL` and `DISCARD ALL` put the role back too.
    [
        "search_path",
        "role",
        "session authorization",
        "session_authorization",
        " all",
    ]
    .iter()
    .any(|name| lower.contains(name))
}

fn ident(ident: &sqlparser::ast::Ident) -> String {
    // Unquoted identifiers fold to lower case, as PostgreSQL does.
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_lowercase()
    }
}

/// `schema.table`; `db.schema.table` keeps the last two; unqualified names
/// are taken as `public.` (search_path is not known to the proxy).
fn table_name(name: &ObjectName) -> (String, bool) {
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|part| match part {
            ObjectNamePart::Identifier(i) => ident(i),
            other => other.to_string(),
        })
        .collect();
    match parts.as_slice() {
        [table] => (format!("public.{table}"), false),
        [.., schema, table] => (format!("{schema}.{table}"), true),
        [] => (String::new(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use StatementKind as K;

    fn kinds(sql: &str) -> Vec<Vec<StatementKind>> {
        analyze(sql, Literals::Keep)
            .iter()
            .map(|s| s.kinds.iter().collect())
            .collect()
    }

    #[test]
    fn kinds_of_statements() {
        let cases: &[(&str, &[&[StatementKind]])] = &[
            ("SELECT * FROM orders", &[&[K::Select]]),
            ("select 1; DROP TABLE t", &[&[K::Select], &[K::Drop]]),
            ("/* hi */ dRoP /**/ TABLE t", &[&[K::Drop]]),
            (
                "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
                &[&[K::Select, K::Delete]],
            ),
            (
                "WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x",
                &[&[K::Select, K::Insert]],
            ),
            ("EXPLAIN ANALYZE DELETE FROM t", &[&[K::Delete, K::Explain]]),
            (
                "PREPARE p AS UPDATE t SET a = 1",
                &[&[K::Update, K::Prepare]],
            ),
            ("COPY t TO STDOUT", &[&[K::CopyTo]]),
            ("COPY t FROM STDIN", &[&[K::CopyFrom]]),
            ("COPY t TO PROGRAM 'curl evil'", &[&[K::CopyProgram]]),
            ("COPY (SELECT 1) TO PROGRAM 'sh'", &[&[K::CopyProgram]]),
            ("SELECT a INTO new_t FROM t", &[&[K::Select, K::Create]]),
            ("BEGIN", &[&[K::Transaction]]),
            ("COMMIT", &[&[K::Transaction]]),
            ("SET work_mem = '64MB'", &[&[K::Set]]),
            ("SET search_path = private, public", &[&[K::Other]]),
            ("SET ROLE admin", &[&[K::Other]]),
            ("SET SESSION AUTHORIZATION admin", &[&[K::Other]]),
            ("RESET ROLE", &[&[K::Other]]),
            ("RESET ALL", &[&[K::Other]]),
            ("DISCARD ALL", &[&[K::Other]]),
            ("RESET work_mem", &[&[K::Reset]]),
            ("SHOW work_mem", &[&[K::Show]]),
            ("TRUNCATE t", &[&[K::Truncate]]),
            ("GRANT SELECT ON t TO u", &[&[K::Grant]]),
            ("CREATE TABLE x (a int)", &[&[K::Create]]),
            ("ALTER TABLE x ADD COLUMN b int", &[&[K::Alter]]),
            ("LISTEN ch", &[&[K::Listen]]),
            ("NOTIFY ch", &[&[K::Notify]]),
            ("VACUUM t", &[&[K::Vacuum]]),
            ("INSERT INTO t VALUES (1) RETURNING a", &[&[K::Insert]]),
            (
                "MERGE INTO t USING s ON t.a = s.a WHEN MATCHED THEN DELETE",
                &[&[K::Merge]],
            ),
            ("", &[]),
        ];
        for (sql, expected) in cases {
            let expected: Vec<Vec<StatementKind>> = expected
                .iter()
                .map(|k| {
                    let mut k = k.to_vec();
                    k.sort_by_key(|k| *k as u32);
                    k
                })
                .collect();
            assert_eq!(kinds(sql), expected, "{sql}");
        }
    }

    #[test]
    fn unparsable_text_is_one_unparsed_statement() {
        for sql in [
            "DO $$ BEGIN PERFORM 1; END $$",
            "SELEC 1",
            "SELECT 1; garbage garbage",
        ] {
            let analysed = analyze(sql, Literals::Keep);
            assert_eq!(analysed.len(), 1, "{sql}");
            assert!(!analysed[0].parsed, "{sql}");
        }
    }

    #[test]
    fn tables_are_normalised_and_ctes_are_not_tables() {
        let tables = |sql: &str| analyze(sql, Literals::Keep).remove(0).tables;
        assert_eq!(
            tables("SELECT * FROM Orders o JOIN sales.\"Items\" i ON true"),
            ["public.orders", "sales.Items"]
        );
        assert_eq!(
            tables("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d"),
            ["public.t"]
        );
        assert_eq!(
            tables("SELECT * FROM (SELECT * FROM a) s WHERE x IN (SELECT y FROM b.c)"),
            ["b.c", "public.a"]
        );
        assert_eq!(
            tables("UPDATE mydb.public.t SET a = 1 FROM u"),
            ["public.t", "public.u"]
        );
        assert_eq!(tables("DROP TABLE orders, s.x"), ["public.orders", "s.x"]);
        assert_eq!(tables("TRUNCATE a"), ["public.a"]);
        assert_eq!(tables("ALTER TABLE a ADD COLUMN b int"), ["public.a"]);
        assert!(analyze("SELECT * FROM t", Literals::Keep).remove(0).parsed);
        assert!(analyze("DELETE FROM t", Literals::Keep).remove(0).writes());
        assert!(!analyze("SELECT 1", Literals::Keep).remove(0).writes());
    }

    #[test]
    fn literals_are_redacted_on_request_and_passwords_always() {
        let text = |sql: &str, literals| analyze(sql, literals).remove(0).text;
        assert_eq!(
            text(
                "SELECT * FROM t WHERE email = 'a@b.c' AND id > 4",
                Literals::Redact
            ),
            "SELECT * FROM t WHERE email = ? AND id > ?"
        );
        assert!(text("SELECT 'kept'", Literals::Keep).contains("'kept'"));
        for sql in [
            "CREATE ROLE x LOGIN PASSWORD 'hunter2'",
            "ALTER ROLE x WITH PASSWORD 'hunter2'",
            "ALTER USER x PASSWORD 'hunter2'",
            "alter role x password 'hunter2' garbage here",
        ] {
            let kept = text(sql, Literals::Keep);
            assert!(!kept.contains("hunter2"), "{sql}: {kept}");
        }
        assert_eq!(
            text("SELEKT 'x'", Literals::Redact),
            "<unparsed statement of 10 bytes, text withheld>"
        );
    }
}
