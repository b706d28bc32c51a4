//! The proxy without a kernel: an [`OrigDstTable`] stands in for the eBPF
//! peer table, upstreams are loopback servers. (The privileged tests in
//! `tests/` run the same path through the real kernel programs.)
use std::{net::SocketAddr, sync::Arc};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use arc_swap::ArcSwap;

use super::*;
use crate::{
    addr::OrigDstAddr,
    config::Config,
    intercept::{Intercepted, OrigDstTable},
    policy::ActivePolicy,
    workload::{CgroupFs, KernelIdentity, WorkloadResolver},
};

struct Harness {
    _state: tempfile::TempDir,
    table: Arc<OrigDstTable>,
    listen: SocketAddr,
    shutdown: watch::Sender<bool>,
    approvals: Arc<crate::approvals::Approvals>,
}

async fn harness(upstream: SocketAddr, allowed: bool) -> Harness {
    harness_with(upstream, allowed, true).await
}

async fn harness_with(upstream: SocketAddr, allowed: bool, enforce: bool) -> Harness {
    harness_deciding(upstream, if allowed { "allow" } else { "deny" }, enforce).await
}

/// `decision` is the rule's decision line and whatever follows it.
async fn harness_deciding(upstream: SocketAddr, decision: &str, enforce: bool) -> Harness {
    let text = format!(
        "[[target]]\nname = \"up\"\nprotocol = \"tcp\"\naddress = \"{upstream}\"\n\
         [[workload]]\nname = \"me\"\nuid = 4242\n\
         [[rule]]\nname = \"r\"\nworkloads = [\"me\"]\ntargets = [\"up\"]\ndecision = \"{decision}\"\n",
    );
    let policy = Config::from_text("t.toml", &text).unwrap().policy;
    let orig_dst = Arc::new(OrigDstTable::default());
    let state = tempfile::tempdir().unwrap();
    let context = context(policy, enforce, state.path(), orig_dst.clone());
    let approvals = context.gate.approvals.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listen = listener.local_addr().unwrap();
    let (shutdown, rx) = watch::channel(false);
    tokio::spawn(serve(context, vec![listener], rx, Duration::from_secs(1)));
    Harness {
        _state: state,
        table: orig_dst,
        listen,
        shutdown,
        approvals,
    }
}

/// What connections share, over a store in `state` and a kernel stand-in.
pub(crate) fn context(
    policy: crate::policy::Policy,
    enforce: bool,
    state: &std::path::Path,
    kernel: Arc<OrigDstTable>,
) -> Arc<ProxyContext> {
    let table = crate::daemon::resolve_table(&policy);
    let store = crate::sessions::Store::open(
        &state.join("sessions"),
        &state.join("host.key"),
        "test-host".into(),
        u64::MAX,
    )
    .unwrap();
    let approvals =
        crate::approvals::Approvals::open(store.db(), "test-host".into(), None).unwrap();
    Arc::new(ProxyContext {
        gate: crate::conn::Gate {
            kernel,
            resolver: Arc::new(WorkloadResolver::new(CgroupFs::new("/nonexistent".into()))),
            active: ArcSwap::from_pointee(ActivePolicy {
                policy,
                table,
                enforce,
                bundle: None,
            }),
            connections: crate::conn::ConnRegistry::default(),
            store,
            approvals,
        },
        tls: None,
        mask_key: Arc::new(crate::masking::MaskKey::new([0; 32])),
        literals: Default::default(),
        pg_cancels: Default::default(),
        pg: crate::proxy::postgres::Shared::new(&Default::default()),
        ssh_server: super::ssh::server_config(russh::keys::PrivateKey::from(
            russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&[7; 32]),
        )),
    })
}

/// Connects to the proxy and registers what the kernel would have recorded.
async fn connect(h: &Harness, orig: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let client = socket.local_addr().unwrap();
    h.table.insert(
        ClientAddr(client),
        Intercepted {
            orig_dst: OrigDstAddr(orig),
            kernel: KernelIdentity {
                tgid: u32::MAX - 1,
                uid: 4242,
                gid: 4242,
                comm: "test".into(),
                ..Default::default()
            },
        },
    );
    socket.connect(h.listen).await.unwrap()
}

/// An upstream that sends a greeting, echoes until EOF, then says "bye".
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                stream.write_all(b"hi\n").await.unwrap();
                let mut buf = Vec::new();
                stream.read_to_end(&mut buf).await.unwrap();
                stream.write_all(&buf).await.unwrap();
                stream.write_all(b"bye\n").await.unwrap();
            });
        }
    });
    addr
}

#[tokio::test]
async fn allowed_connection_is_forwarded_with_half_close() {
    let upstream = echo_server().await;
    let h = harness(upstream, true).await;
    let mut client = connect(&h, upstream).await;
    client.write_all(b"ping").await.unwrap();
    // Half-close: the upstream sees EOF and can still answer.
    client.shutdown().await.unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"hi\npingbye\n");
    let _ = h.shutdown.send(true);
}

#[tokio::test]
async fn a_large_stream_passes_intact_both_ways() {
    // More than a pipe holds, in both directions, ending in a half-close.
    let upstream = echo_server().await;
    let h = harness(upstream, true).await;
    let sent: Vec<u8> = (0..6 << 20).map(|i: u32| (i % 251) as u8).collect();
    let client = connect(&h, upstream).await;
    let (mut read, mut write) = client.into_split();
    let writer = tokio::spawn({
        let sent = sent.clone();
        async move {
            write.write_all(&sent).await.unwrap();
            write.shutdown().await.unwrap();
        }
    });
    let mut reply = Vec::new();
    read.read_to_end(&mut reply).await.unwrap();
    writer.await.unwrap();
    assert_eq!(reply.len(), sent.len() + 7);
    assert!(reply.starts_with(b"hi\n") && reply.ends_with(b"bye\n"));
    assert!(
        reply[3..reply.len() - 4] == sent[..],
        "the stream changed on the way"
    );
    let _ = h.shutdown.send(true);
}

#[tokio::test]
async fn denied_connection_is_reset() {
    let upstream = echo_server().await;
    let h = harness(upstream, false).await;
    let mut client = connect(&h, upstream).await;
    let mut buf = [0u8; 8];
    let error = client.read(&mut buf).await.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
    let _ = h.shutdown.send(true);
}

#[tokio::test]
async fn connection_without_a_kernel_record_is_reset() {
    let upstream = echo_server().await;
    let h = harness(upstream, true).await;
    let mut client = TcpStream::connect(h.listen).await.unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(
        client.read(&mut buf).await.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionReset
    );
    let _ = h.shutdown.send(true);
}

#[tokio::test]
async fn unreachable_upstream_resets_the_client_and_spares_others() {
    // Bind then drop: nothing listens on this port any more.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let h = harness(dead, true).await;
    let mut client = connect(&h, dead).await;
    let mut buf = [0u8; 8];
    assert_eq!(
        client.read(&mut buf).await.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionReset
    );
    let _ = h.shutdown.send(true);
}

#[tokio::test]
async fn audit_mode_logs_the_deny_but_forwards() {
    let upstream = echo_server().await;
    let h = harness_with(upstream, false, false).await;
    let mut client = connect(&h, upstream).await;
    client.write_all(b"x").await.unwrap();
    client.shutdown().await.unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"hi\nxbye\n");
    let _ = h.shutdown.send(true);
}

/// Waits for the one pending request and answers it as uid 5001.
async fn answer_pending(h: &Harness, approve: bool) {
    let caller = crate::approvals::Caller::Local {
        uid: 5001,
        gid: 5001,
    };
    for _ in 0..200 {
        if let Some(request) = h.approvals.pending(&caller, true).first() {
            assert_eq!(request.command, "connect to up");
            assert_eq!(request.requester.uid, 4242);
            let reason = (!approve).then(|| "no".to_owned());
            h.approvals
                .answer(&request.id, &caller, approve, reason)
                .unwrap();
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("no pending request");
}

#[tokio::test]
async fn an_approve_rule_holds_a_tcp_connection_until_answered() {
    let upstream = echo_server().await;
    let h = harness_deciding(
        upstream,
        "approve\"\napprovers = [\"uid:5001\"]\ntimeout = \"30s",
        true,
    )
    .await;
    let mut client = connect(&h, upstream).await;
    client.write_all(b"ping").await.unwrap();
    client.shutdown().await.unwrap();
    // Held: nothing from upstream yet.
    let mut buf = [0u8; 8];
    let early =
        tokio::time::timeout(std::time::Duration::from_millis(200), client.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "upstream reached before approval: {early:?}"
    );
    answer_pending(&h, true).await;
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"hi\npingbye\n");

    // Denied: reset, never connected.
    let mut client = connect(&h, upstream).await;
    answer_pending(&h, false).await;
    assert_eq!(
        client.read(&mut buf).await.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionReset
    );

    // A client that gives up while held withdraws its request.
    let client = connect(&h, upstream).await;
    let admin = crate::approvals::Caller::Local { uid: 0, gid: 0 };
    while h.approvals.pending(&admin, true).is_empty() {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    drop(client);
    for _ in 0..200 {
        let states: Vec<_> = h
            .approvals
            .history()
            .unwrap()
            .iter()
            .map(|r| r.state)
            .collect();
        if states.last() == Some(&crate::approvals::RequestState::Withdrawn) {
            assert!(h.approvals.pending(&admin, true).is_empty());
            let _ = h.shutdown.send(true);
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("not withdrawn: {:?}", h.approvals.history().unwrap());
}
