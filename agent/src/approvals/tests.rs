use std::time::Duration;

use super::*;
use crate::principal::Principal;

const REQUESTER: u32 = 4242;
const ALICE: u32 = 5001;
const BOB: u32 = 5002;

fn spec(min_approvals: u32, timeout: Duration, grant: GrantSpec) -> Arc<ApprovalSpec> {
    Arc::new(ApprovalSpec {
        approvers: vec![
            Approver::Local(Principal::Uid(ALICE)),
            Approver::Local(Principal::Uid(BOB)),
            Approver::Local(Principal::Uid(REQUESTER)),
            Approver::Callback("chatops".into()),
        ],
        min_approvals,
        timeout,
        grant,
        require_reason: false,
        requestable: None,
    })
}

fn requester() -> Requester {
    Requester {
        uid: REQUESTER,
        cgroup: Some("/ci.slice/job-1.scope".into()),
        ..Requester::default()
    }
}

/// Approvals in a session store, and a session of it to hold commands of.
fn open(dir: &std::path::Path) -> (Arc<crate::sessions::Store>, Arc<Approvals>, Arc<Recorder>) {
    let store = crate::sessions::Store::open(
        &dir.join("sessions"),
        &dir.join("host.key"),
        "test-host".into(),
        u64::MAX,
    )
    .unwrap();
    let approvals = Approvals::open(store.db(), "test-host".into(), None).unwrap();
    let (recorder, _) = crate::sessions::store::tests::begin(&store);
    (store, approvals, Arc::new(recorder))
}

async fn ask(
    approvals: &Arc<Approvals>,
    recorder: &Arc<Recorder>,
    spec: Arc<ApprovalSpec>,
) -> Held {
    approvals
        .hold(
            recorder,
            NewRequest {
                requester: requester(),
                target: "prod",
                rule: "deletes-need-approval",
                spec,
                command: "DELETE FROM orders WHERE id = 7",
            },
        )
        .await
        .unwrap()
}

fn local(uid: u32) -> Caller {
    Caller::Local { uid, gid: uid }
}

#[tokio::test]
async fn an_approver_approves_and_the_command_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, approvals, recorder) = open(dir.path());
    let mut held = ask(
        &approvals,
        &recorder,
        spec(1, Duration::from_secs(60), GrantSpec::Once),
    )
    .await;
    let id = held.record().id.clone();

    let own = approvals.answer(&id, &local(REQUESTER), true, None);
    assert!(
        matches!(own, Err(ApprovalError::OwnRequest { uid: REQUESTER, .. })),
        "{own:?}"
    );
    let stranger = approvals.answer(&id, &local(6000), true, None);
    assert!(
        matches!(stranger, Err(ApprovalError::NotApprover { .. })),
        "{stranger:?}"
    );
    let unnamed = approvals.answer(&id, &Caller::Callback { name: "eve".into() }, true, None);
    assert!(
        matches!(unnamed, Err(ApprovalError::NotApprover { .. })),
        "{unnamed:?}"
    );

    // A unique prefix names the request.
    let record = approvals
        .answer(&id[..20], &local(ALICE), true, None)
        .unwrap();
    assert_eq!(record.state, RequestState::Approved);
    let outcome = held.outcome().await.unwrap();
    assert_eq!(outcome.state, RequestState::Approved);
    assert_eq!(outcome.answers.len(), 1);
    assert!(outcome.grant_id.is_none(), "grant once creates no grant");
    assert!(approvals.pending(&local(ALICE), false).is_empty());
    // The outcome is on record.
    let history = approvals.history().unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].state, RequestState::Approved);
}

#[tokio::test]
async fn a_denial_needs_a_reason_and_ends_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, approvals, recorder) = open(dir.path());
    let mut held = ask(
        &approvals,
        &recorder,
        spec(2, Duration::from_secs(60), GrantSpec::Once),
    )
    .await;
    let id = held.record().id.clone();
    assert!(matches!(
        approvals.answer(&id, &local(ALICE), false, None),
        Err(ApprovalError::NoReason)
    ));
    // Two approvals needed: one is not enough, nor the same person twice.
    let record = approvals.answer(&id, &local(ALICE), true, None).unwrap();
    assert_eq!(record.state, RequestState::Pending);
    assert!(matches!(
        approvals.answer(&id, &local(ALICE), true, None),
        Err(ApprovalError::Again(_))
    ));
    approvals
        .answer(
            &id,
            &Caller::Callback {
                name: "chatops".into(),
            },
            false,
            Some("not during the freeze".into()),
        )
        .unwrap();
    let outcome = held.outcome().await.unwrap();
    assert_eq!(outcome.state, RequestState::Denied);
    let refusal = outcome.refusal();
    assert!(
        refusal.contains("denied by webhook:chatops: not during the freeze"),
        "{refusal}"
    );
}

#[tokio::test]
async fn unanswered_requests_time_out_and_dropped_ones_are_withdrawn() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, approvals, recorder) = open(dir.path());
    let mut held = ask(
        &approvals,
        &recorder,
        spec(1, Duration::from_millis(50), GrantSpec::Once),
    )
    .await;
    let outcome = held.outcome().await.unwrap();
    assert_eq!(outcome.state, RequestState::TimedOut);
    assert!(
        outcome.refusal().contains("timed out"),
        "{}",
        outcome.refusal()
    );
    let id = outcome.id.clone();
    assert!(matches!(
        approvals.answer(&id, &local(ALICE), true, None),
        Err(ApprovalError::NotFound(_))
    ));

    let held = ask(
        &approvals,
        &recorder,
        spec(1, Duration::from_secs(60), GrantSpec::Once),
    )
    .await;
    let id = held.record().id.clone();
    drop(held);
    let history = approvals.history().unwrap();
    let withdrawn = history.iter().find(|r| r.id == id).unwrap();
    assert_eq!(withdrawn.state, RequestState::Withdrawn);
}

#[tokio::test]
async fn a_grant_lets_the_same_workload_through_until_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let (store, approvals, recorder) = open(dir.path());
    let mut held = ask(
        &approvals,
        &recorder,
        spec(
            1,
            Duration::from_secs(60),
            GrantSpec::For(Duration::from_secs(1800)),
        ),
    )
    .await;
    approvals
        .answer(&held.record().id.clone(), &local(BOB), true, None)
        .unwrap();
    let outcome = held.outcome().await.unwrap();
    let grant = outcome.grant_id.clone().expect("a 30m grant");
    assert_eq!(
        approvals
            .grant_for(&requester(), "prod", "deletes-need-approval", |_| false)
            .map(|g| g.id),
        Some(grant.clone())
    );
    let other_job = Requester {
        cgroup: Some("/ci.slice/job-2.scope".into()),
        ..requester()
    };
    assert!(
        approvals
            .grant_for(&other_job, "prod", "deletes-need-approval", |_| false)
            .is_none()
    );
    assert!(
        approvals
            .grant_for(&requester(), "staging", "deletes-need-approval", |_| false)
            .is_none()
    );

    // Grants survive a restart; requests pending then are abandoned.
    let _pending = ask(
        &approvals,
        &recorder,
        spec(1, Duration::from_secs(60), GrantSpec::Once),
    )
    .await;
    std::mem::forget(_pending);
    drop(approvals);
    let reopened = Approvals::open(store.db(), "test-host".into(), None).unwrap();
    assert!(
        reopened
            .grant_for(&requester(), "prod", "deletes-need-approval", |_| false)
            .is_some()
    );
    let states: Vec<RequestState> = reopened
        .history()
        .unwrap()
        .iter()
        .map(|r| r.state)
        .collect();
    assert_eq!(states, [RequestState::Approved, RequestState::Abandoned]);

    assert!(matches!(
        reopened.revoke(&grant, &local(6000), false, None),
        Err(ApprovalError::NotApprover { .. })
    ));
    reopened
        .revoke(&grant, &local(ALICE), false, Some("done".into()))
        .unwrap();
    assert!(
        reopened
            .grant_for(&requester(), "prod", "deletes-need-approval", |_| false)
            .is_none()
    );
    assert_eq!(reopened.grants(false).len(), 0);
    assert_eq!(reopened.grants(true).len(), 1);
}

#[test]
fn approvers_are_told_which_job_asks() {
    let requester = Requester {
        job: Some(crate::workload::JobContext {
            ci: "gitlab".into(),
            project: Some("group/app".into()),
            git_ref: Some("main".into()),
            job: Some("77".into()),
            url: Some("https://gitlab.example/group/app/-/jobs/77".into()),
            actor: Some("ann".into()),
            ..Default::default()
        }),
        ..requester()
    };
    assert!(
        requester.describe().ends_with(
            ", gitlab job 77 of group/app on main by ann (https://gitlab.example/group/app/-/jobs/77)"
        ),
        "{}",
        requester.describe()
    );
}
