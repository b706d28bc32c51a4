use std::{sync::Arc, time::Duration};

use super::*;
use crate::{
    approvals::{Approvals, Caller, NewRequest, RequestState, Requester},
    policy::{ApprovalSpec, Approver, GrantSpec},
    principal::Principal,
    sessions::Store,
};

const APPROVER: u32 = 5001;

fn store(dir: &std::path::Path) -> Arc<Store> {
    Store::open(
        &dir.join("sessions"),
        &dir.join("host.key"),
        "test-host".into(),
        u64::MAX,
    )
    .unwrap()
}

fn admitted_conn(store: &Arc<Store>) -> (Conn, ulid::Ulid) {
    let (recorder, _) = crate::sessions::store::tests::begin(store);
    let id = recorder.id();
    let mut conn = Conn::new(id, "127.0.0.1:40000".parse().unwrap());
    conn.recorder = Some(Arc::new(recorder));
    (conn, id)
}

#[test]
fn the_session_record_ends_with_the_access_records_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());

    let (mut conn, id) = admitted_conn(&store);
    conn.end(Outcome::Error, Some("first".into()));
    // A later end replaces an earlier one: the protocol has the last word.
    conn.end(Outcome::Denied, None);
    conn.bytes().up.fetch_add(7, Ordering::Relaxed);
    drop(conn);
    assert_eq!(store.summary(&id).unwrap().outcome, "denied");

    // Dropped mid-way (a task cancelled at shutdown): cancelled in both.
    let (conn, id) = admitted_conn(&store);
    drop(conn);
    assert_eq!(store.summary(&id).unwrap().outcome, "cancelled");
}

fn request(spec: Arc<ApprovalSpec>) -> NewRequest<'static> {
    NewRequest {
        requester: Requester {
            uid: 4242,
            ..Requester::default()
        },
        target: "prod",
        rule: "deletes-need-approval",
        spec,
        command: "DELETE FROM orders",
    }
}

fn spec() -> Arc<ApprovalSpec> {
    Arc::new(ApprovalSpec {
        approvers: vec![Approver::Local(Principal::Uid(APPROVER))],
        min_approvals: 1,
        timeout: Duration::from_secs(60),
        grant: GrantSpec::Once,
        require_reason: false,
        requestable: None,
    })
}

#[tokio::test]
async fn a_client_that_gives_up_withdraws_its_request() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let approvals = Approvals::open(store.db(), "test-host".into(), None).unwrap();
    let (recorder, _) = crate::sessions::store::tests::begin(&store);
    let recorder = Arc::new(recorder);
    let mut told = None;
    let asked = ask(
        &approvals,
        &recorder,
        request(spec()),
        async |record| told = Some(record.id.clone()),
        async { "the client disconnected" },
    )
    .await
    .unwrap();
    let Asked::GaveUp { id, why } = asked else {
        panic!("expected the client to give up, got {asked:?}");
    };
    assert_eq!(
        told.as_deref(),
        Some(id.as_str()),
        "the client was told first"
    );
    assert_eq!(why, "the client disconnected");
    let history = approvals.history().unwrap();
    let record = history.iter().find(|r| r.id == id).unwrap();
    assert_eq!(record.state, RequestState::Withdrawn);
    assert_eq!(approvals.pending_count(), 0);
}

#[tokio::test]
async fn an_answer_ends_the_hold() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let approvals = Approvals::open(store.db(), "test-host".into(), None).unwrap();
    let (recorder, _) = crate::sessions::store::tests::begin(&store);
    let recorder = Arc::new(recorder);
    for approve in [true, false] {
        let answering = approvals.clone();
        let asked = ask(
            &approvals,
            &recorder,
            request(spec()),
            async |record| {
                let id = record.id.clone();
                let approver = Caller::Local {
                    uid: APPROVER,
                    gid: APPROVER,
                };
                let reason = (!approve).then(|| "not now".to_owned());
                tokio::spawn(async move { answering.answer(&id, &approver, approve, reason) });
            },
            std::future::pending::<&str>(),
        )
        .await
        .unwrap();
        match asked {
            Asked::Approved(record) if approve => {
                assert_eq!(record.state, RequestState::Approved)
            }
            Asked::Refused(why) if !approve => assert!(why.contains("not now"), "{why}"),
            other => panic!("approve = {approve}: {other:?}"),
        }
    }
}
