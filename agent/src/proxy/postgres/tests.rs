//! Both sides of a session without sockets: client messages through
//! [`Requests`], server messages through [`Responses`], with a real policy
//! and session store.
use std::sync::{Arc, atomic::Ordering};

use bytes::{BufMut, Bytes, BytesMut};

use super::{
    Session, StatementCounts,
    catalog::Resolved,
    names::{Names, SystemCatalog},
    requests::{Requests, Step},
    responses::{Act, ResponseError, Responses},
    wire::Frame,
};
use crate::{config::Config, intercept::OrigDstTable, policy::Credential, workload::Workload};

/// A session of the workload on target "db" under `rules`.
fn session(rules: &str, state: &std::path::Path) -> Session {
    let password = state.join("pw");
    std::fs::write(&password, "pw\n").unwrap();
    std::fs::set_permissions(
        &password,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let text = format!(
        "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = \"10.0.0.1:5432\"\n\
         [target.credential]\nuser = \"app\"\npassword_file = {password:?}\n{rules}"
    );
    let policy = Config::from_text("t.toml", &text).unwrap().policy;
    let context =
        crate::proxy::tests::context(policy, true, state, Arc::new(OrigDstTable::default()));
    let (recorder, _) = crate::sessions::store::tests::begin(&context.gate.store);
    Session {
        session_id: recorder.id().to_string(),
        upstream_tls: Default::default(),
        upstream_ca_file: None,
        server_name: "db".into(),
        as_user: None,
        target: "db".into(),
        credential: Credential {
            user: "app".into(),
            password: crate::policy::Secret::new("pw".into()),
        },
        workload: Arc::new(Workload::default()),
        recorder: Arc::new(recorder),
        answers: Default::default(),
        context,
    }
}

const RULES: &str = "[[rule]]\nname = \"reads\"\nworkloads = [\"*\"]\ntargets = [\"db\"]\n\
                     decision = \"allow\"\nstatements = [\"select\"]\n\
                     mask = [{ column = \"email\" }]\n";

fn frame(tag: u8, body: &[u8]) -> Frame {
    let mut bytes = BytesMut::with_capacity(body.len() + 5);
    bytes.put_u8(tag);
    bytes.put_i32(body.len() as i32 + 4);
    bytes.put_slice(body);
    Frame {
        tag,
        bytes: bytes.freeze(),
    }
}

fn cstr(parts: &[&str]) -> Vec<u8> {
    parts
        .iter()
        .flat_map(|p| p.bytes().chain([0]))
        .collect::<Vec<u8>>()
}

fn query(sql: &str) -> Frame {
    frame(b'Q', &cstr(&[sql]))
}

/// RowDescription of text columns (no table: matched by name).
fn row_description(columns: &[&str]) -> Frame {
    let mut body = BytesMut::new();
    body.put_i16(columns.len() as i16);
    for name in columns {
        body.put_slice(name.as_bytes());
        body.put_u8(0);
        body.put_i32(0); // table
        body.put_i16(0); // column number
        body.put_i32(25); // text
        body.put_i16(-1);
        body.put_i32(-1);
        body.put_i16(0); // text format
    }
    frame(b'T', &body)
}

fn data_row(values: &[&str]) -> Frame {
    let mut body = BytesMut::new();
    body.put_i16(values.len() as i16);
    for value in values {
        body.put_i32(value.len() as i32);
        body.put_slice(value.as_bytes());
    }
    frame(b'D', &body)
}

/// The two sides of one session.
struct Pipe<'s> {
    requests: Requests<'s>,
    responses: Responses<'s>,
}

impl<'s> Pipe<'s> {
    fn new(
        session: &'s Session,
        counts: &'s StatementCounts,
        expected: &'s super::responses::Expected,
    ) -> Self {
        let policy = session.context.gate.active.load_full();
        let names = Names::new(
            Arc::new(SystemCatalog::default()),
            vec!["public".into()],
            "app".into(),
        );
        let (notices, notices_rx) = tokio::sync::mpsc::unbounded_channel();
        Self {
            requests: Requests::new(
                session,
                counts,
                expected,
                policy,
                Resolved::default(),
                names,
                notices,
            ),
            responses: Responses::new(session, counts, expected, notices_rx),
        }
    }

    /// What a client message sends upstream.
    fn client(&mut self, frame: &Frame) -> Bytes {
        let mut out = BytesMut::new();
        match self.requests.on_frame(frame, &mut out).unwrap() {
            Step::Done => out.freeze(),
            Step::Hold(_) => panic!("nothing here needs approval"),
        }
    }

    /// What becomes of a server message, and what replaced it.
    fn server(&mut self, frame: &Frame) -> Result<(Act, Bytes), ResponseError> {
        let mut out = BytesMut::new();
        let act = self
            .responses
            .on_frame(frame.tag, Some(&frame.bytes), &mut out)?;
        Ok((act, out.freeze()))
    }
}

#[test]
fn a_query_goes_upstream_and_its_masked_rows_come_back() {
    let state = tempfile::tempdir().unwrap();
    let session = session(RULES, state.path());
    let (counts, expected) = Default::default();
    let mut pipe = Pipe::new(&session, &counts, &expected);

    let select = query("SELECT email, name FROM public.customers");
    assert_eq!(pipe.client(&select), select.bytes, "forwarded as it came");

    let forward = |(act, out): (Act, Bytes)| {
        assert_eq!((act, out.len()), (Act::Forward, 0));
    };
    forward(pipe.server(&row_description(&["email", "name"])).unwrap());
    let (act, row) = pipe.server(&data_row(&["ann@example.com", "Ann"])).unwrap();
    assert_eq!(act, Act::Replaced);
    let row = String::from_utf8_lossy(&row);
    assert!(row.contains("****") && row.contains("Ann"), "{row:?}");
    assert!(!row.contains("ann@example.com"), "{row:?}");
    forward(pipe.server(&frame(b'C', &cstr(&["SELECT 1"]))).unwrap());
    forward(pipe.server(&frame(b'Z', b"I")).unwrap());
    assert_eq!(counts.allowed.load(Ordering::Relaxed), 1);
    assert_eq!(counts.denied.load(Ordering::Relaxed), 0);
}

#[test]
fn a_denied_statement_never_goes_upstream() {
    let state = tempfile::tempdir().unwrap();
    let session = session(RULES, state.path());
    let (counts, expected) = Default::default();
    let mut pipe = Pipe::new(&session, &counts, &expected);

    for sql in [
        "DELETE FROM public.customers",
        "SELECT 1; DELETE FROM public.customers",
        "WITH d AS (DELETE FROM public.customers RETURNING 1) SELECT * FROM d",
    ] {
        let sent = pipe.client(&query(sql));
        let sent = String::from_utf8_lossy(&sent);
        assert!(!sent.contains("DELETE"), "{sent}");
        assert!(
            sent.contains("RAISE EXCEPTION USING ERRCODE = '42501'"),
            "{sent}"
        );
        // The server fails the agent's RAISE; the client sees that error,
        // without the CONTEXT of a DO block it never wrote.
        let error = frame(
            b'E',
            &cstr(&[
                "SERROR",
                "C42501",
                "Mdenied",
                "WPL/pgSQL function inline_code_block line 1 at RAISE",
                "",
            ]),
        );
        let (act, sent) = pipe.server(&error).unwrap();
        assert_eq!(act, Act::Replaced);
        assert_eq!(
            sent,
            frame(b'E', &cstr(&["SERROR", "C42501", "Mdenied", ""])).bytes
        );
        assert_eq!(pipe.server(&frame(b'Z', b"I")).unwrap().0, Act::Forward);
    }
    // The SELECT beside a denied DELETE was allowed, and did not run.
    assert_eq!(counts.allowed.load(Ordering::Relaxed), 1);
    assert_eq!(counts.denied.load(Ordering::Relaxed), 3);
}

#[test]
fn extended_protocol_rows_are_masked_by_the_agents_own_describe() {
    let state = tempfile::tempdir().unwrap();
    let session = session(RULES, state.path());
    let (counts, expected) = Default::default();
    let mut pipe = Pipe::new(&session, &counts, &expected);

    let mut parse = cstr(&["", "SELECT email FROM public.customers"]);
    parse.extend_from_slice(&0i16.to_be_bytes());
    pipe.client(&frame(b'P', &parse));
    let mut bind = cstr(&["", ""]);
    bind.extend_from_slice(&[0; 6]);
    pipe.client(&frame(b'B', &bind));
    let mut execute = cstr(&[""]);
    execute.extend_from_slice(&0i32.to_be_bytes());
    let sent = pipe.client(&frame(b'E', &execute));
    // The client did not describe the portal: the agent does, first.
    assert_eq!(sent[0], b'D', "a Describe of the agent's own");
    pipe.client(&frame(b'S', b""));

    assert_eq!(pipe.server(&frame(b'1', b"")).unwrap().0, Act::Forward);
    assert_eq!(pipe.server(&frame(b'2', b"")).unwrap().0, Act::Forward);
    // The answer to the agent's own Describe is not the client's.
    assert_eq!(
        pipe.server(&row_description(&["email"])).unwrap().0,
        Act::Drop
    );
    let (act, row) = pipe.server(&data_row(&["ann@example.com"])).unwrap();
    assert_eq!(act, Act::Replaced);
    assert!(!String::from_utf8_lossy(&row).contains("ann@"));
    assert_eq!(
        pipe.server(&frame(b'C', &cstr(&["SELECT 1"]))).unwrap().0,
        Act::Forward
    );
    assert_eq!(pipe.server(&frame(b'Z', b"I")).unwrap().0, Act::Forward);
    assert_eq!(counts.allowed.load(Ordering::Relaxed), 1);
}

#[test]
fn server_messages_that_answer_nothing_are_errors() {
    let state = tempfile::tempdir().unwrap();
    let session = session(RULES, state.path());
    let (counts, expected) = Default::default();
    let mut pipe = Pipe::new(&session, &counts, &expected);
    for message in [
        data_row(&["ann@example.com"]),
        row_description(&["email"]),
        frame(b'C', &cstr(&["SELECT 1"])),
        frame(b'Z', b"I"),
    ] {
        match pipe.server(&message) {
            Err(ResponseError::OutOfStep(tag)) => assert_eq!(tag, message.tag as char),
            other => panic!("{}: {other:?}", message.tag as char),
        }
    }
    // Notices and parameter changes belong to whatever runs: passed on.
    let notice = frame(b'N', &cstr(&["SNOTICE", "Mhello", ""]));
    assert_eq!(pipe.server(&notice).unwrap().0, Act::Forward);
}

#[test]
fn statements_that_cannot_change_the_target_are_told_apart() {
    let mut catalog = SystemCatalog::default();
    for (name, volatile) in [("lower", false), ("count", false), ("nextval", true)] {
        catalog.functions.insert(name.into(), volatile);
    }
    let names = Names::new(Arc::new(catalog), vec!["public".into()], "app".into());
    let reads_only = |sql: &str| {
        super::sql::analyze(sql, Default::default())
            .iter()
            .all(|a| names.resolve(a).reads_only())
    };
    for sql in [
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        "SELECT lower(name), count(*) FROM t GROUP BY 1",
        "BEGIN",
        "SET search_path = public",
        "SHOW work_mem",
        "COMMIT",
    ] {
        assert!(reads_only(sql), "{sql}");
    }
    for sql in [
        "INSERT INTO t VALUES (1)",
        "UPDATE pgbench_accounts SET abalance = 1 WHERE aid = 1",
        "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
        "SELECT * INTO copy FROM t",
        "SELECT nextval('s')",
        "SELECT my_function()",
        "SELECT pg_catalog.pg_terminate_backend(1)",
        "SET ROLE admin",
        "EXPLAIN ANALYZE DELETE FROM t",
        "DO $$ BEGIN END $$",
        "not sql at all",
    ] {
        assert!(!reads_only(sql), "{sql}");
    }
}
