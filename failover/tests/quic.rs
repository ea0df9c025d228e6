#![cfg(feature = "net")]

//! The raft link over QUIC with mutual TLS, on loopback: three arbiters (the witness through
//! `run_witness_quic`) grant a VM and hand it over when the primary dies; strangers (a
//! certificate from another CA, a name not in the peer list) are refused and never heard; a
//! peer only ever speaks as the node its certificate names; links reconnect after a restart.

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use failover::journal::MemDisk;
use failover::net::{self, ArbiterHandle, Inbound, PeerLink, PeerSpec, QuicLink, WitnessQuicConfig};
use failover::{Arbiter, ArbiterConfig, ArbiterError, Event, VmId};
use raft::eraftpb::{Message, MessageType};
use tokio::sync::mpsc;
use transport::certs::{Authority, HostSpec, Identity, Validity};
use transport::{Endpoint, ProtocolVersions, Tuning};

mod common;

use common::Logs;

const VM: VmId = VmId(7);
const NAMES: [&str; 3] = ["primary", "backup", "witness"];
const LIMIT: Duration = Duration::from_secs(5);

fn free_addr() -> SocketAddr {
    // Bind and release: good enough for a test on loopback.
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn new_ca() -> Authority {
    Authority::generate(Validity::days_from_now(30)).unwrap()
}

/// `host`'s identity; the witness's certificate has the witness role, as `understudy certs
/// --witness` issues it.
fn identity(ca: &Authority, host: &str) -> Identity {
    let spec = if host == "witness" { HostSpec::witness(host) } else { HostSpec::new(host) };
    let issued = ca.issue(&spec, Validity::days_from_now(1)).unwrap();
    Identity::from_pem(ca.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap()
}

/// A certificate from `issuer` for `host`, presented by a node that trusts `trusted` (so it
/// accepts our servers and only its own certificate is wrong).
fn foreign_identity(issuer: &Authority, trusted: &Authority, host: &str) -> Identity {
    let issued = issuer.issue(&HostSpec::new(host), Validity::days_from_now(1)).unwrap();
    Identity::from_pem_unchecked(trusted.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap()
}

/// Nodes 1..=3 named primary, backup, witness at `addrs`, except `me`.
fn peers(addrs: &[SocketAddr; 3], me: u64) -> Vec<PeerSpec> {
    (1..=3u64)
        .filter(|id| *id != me)
        .map(|id| PeerSpec::new(id, NAMES[id as usize - 1], addrs[id as usize - 1]))
        .collect()
}

async fn wait_for(
    events: &mut mpsc::UnboundedReceiver<Event>,
    what: &str,
    f: impl Fn(&Event) -> bool,
) -> (Event, Vec<Event>) {
    let end = tokio::time::Instant::now() + LIMIT;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(end, events.recv()).await {
            Ok(Some(e)) if f(&e) => return (e, seen),
            Ok(Some(e)) => seen.push(e),
            Ok(None) => panic!("{what}: event stream closed"),
            Err(_) => panic!("{what}: not within {LIMIT:?} (saw {seen:?})"),
        }
    }
}

/// Polls `f` every 10 ms until it holds; false after `LIMIT`.
async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + LIMIT;
    while tokio::time::Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}

/// Real time on a shared 2-core machine: a lease may blink under load, so wait for it.
async fn eventually_releases(node: &ArbiterHandle) -> bool {
    for _ in 0..100 {
        if node.call(|a, now| a.may_release_output(now, VM)).await.unwrap() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

type Task = tokio::task::JoinHandle<Result<(), net::NetError>>;

/// An agent: arbiter `id` of the group 1, 2, 3 over a QuicLink; the link is owned by the
/// arbiter's task only, so aborting the task drops it (the test keeps a weak reference).
async fn agent(
    id: u64,
    dir: &std::path::Path,
    listen: SocketAddr,
    identity: &Identity,
    peers: &[PeerSpec],
) -> (ArbiterHandle, mpsc::UnboundedReceiver<Event>, Task, Weak<QuicLink>) {
    let config = ArbiterConfig { preferred_leader: Some(3), ..ArbiterConfig::new(id, &[1, 2, 3]) };
    let arbiter = Arbiter::open_dir(config, dir, Instant::now()).unwrap();
    let (link, inbox) = QuicLink::bind(id, listen, identity, peers).await.unwrap();
    let weak = Arc::downgrade(&link);
    let (handle, events, task) = net::spawn_arbiter(arbiter, link, inbox);
    (handle, events, task, weak)
}

#[tokio::test(flavor = "current_thread")]
async fn grant_then_kill_primary_and_take_over_over_quic() {
    let (logs, _guard) = Logs::capture();
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca();
    let addrs = [free_addr(), free_addr(), free_addr()];
    let witness_config =
        WitnessQuicConfig::new(3, tmp.path().join("witness"), addrs[2], identity(&ca, "witness"), peers(&addrs, 3));
    let witness = tokio::spawn(net::run_witness_quic(witness_config));
    let (primary, mut primary_events, primary_task, primary_link) =
        agent(1, &tmp.path().join("primary"), addrs[0], &identity(&ca, "primary"), &peers(&addrs, 1)).await;
    let (backup, mut backup_events, _backup_task, backup_link) =
        agent(2, &tmp.path().join("backup"), addrs[1], &identity(&ca, "backup"), &peers(&addrs, 2)).await;

    // A stranger throughout: a certificate from another CA named like the primary, as node 1,
    // campaigning and asking for the VM. Its connections never get past the handshake.
    let other_ca = new_ca();
    let mallory_addr = free_addr();
    let (mallory, mut mallory_events, _mallory_task, mallory_link) = agent(
        1,
        &tmp.path().join("mallory"),
        mallory_addr,
        &foreign_identity(&other_ca, &ca, "primary"),
        &peers(&addrs, 1),
    )
    .await;
    mallory.call(|a, now| a.request_activity(now, VM)).await.unwrap().unwrap();

    // The group elects a leader and grants the VM to the primary.
    let started = Instant::now();
    primary.call(|a, now| a.request_activity(now, VM)).await.unwrap().unwrap();
    let (granted, _) = wait_for(&mut primary_events, "first grant", |e| matches!(e, Event::Granted { .. })).await;
    assert_eq!(granted, Event::Granted { vm: VM, generation: 1 });
    println!("quic loopback: first grant {:?} after start", started.elapsed());
    assert!(primary.call(|a, _| a.leader()).await.unwrap().is_some());
    primary.call(|a, now| a.set_backup(now, VM, 2)).await.unwrap().unwrap();
    wait_for(&mut backup_events, "backup recorded", |e| matches!(e, Event::BackupOf { .. })).await;
    assert!(eventually_releases(&primary).await);
    assert!(!backup.call(|a, now| a.may_release_output(now, VM)).await.unwrap());

    // One connection per pair, and the backup's node 1 is the real primary, not the stranger.
    let link = primary_link.upgrade().unwrap();
    assert!(eventually(|| link.connected() == vec![(2, addrs[1]), (3, addrs[2])]).await, "{:?}", link.connected());
    drop(link);
    let link = backup_link.upgrade().unwrap();
    assert!(eventually(|| link.connected() == vec![(1, addrs[0]), (3, addrs[2])]).await, "{:?}", link.connected());
    assert!(link.refused() >= 1, "the stranger was never refused");
    drop(link);

    // The primary's process dies: its task and link are dropped.
    primary_task.abort();
    let _ = primary_task.await;
    assert!(primary_link.upgrade().is_none(), "the primary's link outlived its task");
    let killed = Instant::now();
    backup.call(|a, now| a.report_primary_dead(now, VM)).await.unwrap().unwrap();
    let (granted, _) = wait_for(&mut backup_events, "takeover", |e| matches!(e, Event::Granted { .. })).await;
    println!("quic loopback: primary killed -> backup granted in {:?}", killed.elapsed());
    assert_eq!(granted, Event::Granted { vm: VM, generation: 2 });
    assert!(eventually_releases(&backup).await);
    let record = backup.call(|a, _| a.record(VM)).await.unwrap().unwrap();
    assert_eq!((record.holder, record.generation), (2, 2));

    // The stranger never heard from anybody: no leader, no grant, no connection.
    let mut heard = Vec::new();
    while let Ok(e) = mallory_events.try_recv() {
        heard.push(e);
    }
    assert!(
        !heard.iter().any(|e| matches!(e, Event::Granted { .. } | Event::LeaderChanged { leader: Some(_), .. })),
        "the stranger took part: {heard:?}"
    );
    assert!(mallory_link.upgrade().unwrap().connected().is_empty());
    assert_eq!(mallory.call(|a, _| a.record(VM)).await.unwrap(), None);
    let logs = logs.text();
    assert!(logs.contains("refused connection: peer 127.0.0.1"), "{logs}");
    assert!(logs.contains("certificate \"primary\" is not signed by our ca"), "{logs}");
    witness.abort();
}

#[tokio::test(flavor = "current_thread")]
async fn strangers_are_refused_and_never_heard() {
    let (logs, _guard) = Logs::capture();
    let ca = new_ca();
    let other_ca = new_ca();
    let addrs = [free_addr(), free_addr(), free_addr()];
    let (l1, _inbox1) = QuicLink::bind(1, addrs[0], &identity(&ca, "primary"), &peers(&addrs, 1)).await.unwrap();
    let (l2, mut inbox2) = QuicLink::bind(2, addrs[1], &identity(&ca, "backup"), &peers(&addrs, 2)).await.unwrap();
    let (l3, mut inbox3) = QuicLink::bind(3, addrs[2], &identity(&ca, "witness"), &peers(&addrs, 3)).await.unwrap();
    // Both strangers claim to be node 1 and dial nodes 2 and 3.
    let other_ca_addr = free_addr();
    let (other_ca_link, _) =
        QuicLink::bind(1, other_ca_addr, &foreign_identity(&other_ca, &ca, "primary"), &peers(&addrs, 1))
            .await
            .unwrap();
    let unlisted_addr = free_addr();
    let (unlisted_link, _) =
        QuicLink::bind(1, unlisted_addr, &identity(&ca, "mallory"), &peers(&addrs, 1)).await.unwrap();
    let strangers = [other_ca_addr, unlisted_addr];

    assert!(eventually(|| l1.connected().len() == 2 && l2.connected().len() == 2).await);
    let (mut legit, mut rounds) = ([0usize; 2], 0);
    let end = tokio::time::Instant::now() + Duration::from_millis(800);
    while tokio::time::Instant::now() < end || legit.contains(&0) {
        assert!(rounds < 200, "legit messages never arrived: {legit:?}");
        rounds += 1;
        for to in [2, 3] {
            l1.send(to, b"legit".to_vec());
            other_ca_link.send(to, b"mallory".to_vec());
            unlisted_link.send(to, b"mallory".to_vec());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        for (i, inbox) in [&mut inbox2, &mut inbox3].into_iter().enumerate() {
            while let Ok(Inbound { from, bytes }) = inbox.try_recv() {
                assert_eq!((from, bytes.as_slice()), (1, &b"legit"[..]), "node {} heard a stranger", i + 2);
                legit[i] += 1;
            }
        }
        for link in [&l2, &l3] {
            let connected = link.connected();
            assert!(connected.iter().all(|(_, addr)| !strangers.contains(addr)), "stranger connected: {connected:?}");
            assert!(connected.iter().all(|(id, addr)| *addr == addrs[*id as usize - 1]), "{connected:?}");
        }
        assert!(other_ca_link.connected().is_empty(), "a certificate from another ca got through");
    }
    // Each stranger was refused by both nodes it dialled (and again after each backoff).
    assert!(l2.refused() >= 2 && l3.refused() >= 2, "refusals: {} {}", l2.refused(), l3.refused());
    assert_eq!(l1.refused(), 0);

    // A replication endpoint (protocol understudy/1) with a good certificate knocks on the raft
    // port: the ALPN versions do not match, and both sides say so.
    let replication =
        Endpoint::bind(free_addr(), &identity(&ca, "primary"), ProtocolVersions::new(1), Tuning::default()).unwrap();
    let refused = l3.refused();
    let error = tokio::time::timeout(LIMIT, replication.connect(addrs[2], "witness")).await.unwrap().unwrap_err();
    assert!(error.to_string().contains("speaks none of our protocols (we offered understudy/1)"), "{error}");
    assert!(eventually(|| l3.refused() > refused).await);
    let logs = logs.text();
    assert!(logs.contains("offered protocol understudy/1, we speak understudy/1001"), "{logs}");
    assert!(logs.contains("(\"mallory\"): certificate name \"mallory\" is not in the peer list"), "{logs}");
    assert!(logs.contains("certificate \"primary\" is not signed by our ca"), "{logs}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_peer_speaks_only_as_itself() {
    let ca = new_ca();
    let addrs = [free_addr(), free_addr(), free_addr()];
    let only =
        |me: u64, other: u64| -> Vec<PeerSpec> { peers(&addrs, me).into_iter().filter(|p| p.id == other).collect() };
    let (l1, mut inbox1) = QuicLink::bind(1, addrs[0], &identity(&ca, "primary"), &only(1, 3)).await.unwrap();
    let (l3, mut inbox3) = QuicLink::bind(3, addrs[2], &identity(&ca, "witness"), &only(3, 1)).await.unwrap();
    assert!(eventually(|| l1.connected().len() == 1 && l3.connected().len() == 1).await);

    // Node 1 sends a raft message that claims to come from node 2.
    let mut forged = Message::default();
    forged.set_msg_type(MessageType::MsgHeartbeat);
    forged.from = 2;
    forged.to = 3;
    forged.term = 9;
    l1.send(3, failover::wire::encode(&forged));
    let inbound = tokio::time::timeout(LIMIT, inbox3.recv()).await.expect("delivered").expect("inbox open");
    assert_eq!(inbound.from, 1, "the sender is the certificate's node, whatever the payload says");
    let disk = MemDisk::new();
    let mut witness = Arbiter::open_mem(ArbiterConfig::new(3, &[1, 2, 3]), &disk, Instant::now()).unwrap();
    let term = witness.term();
    let refused = witness.step(Instant::now(), inbound.from, &inbound.bytes).unwrap_err();
    assert!(matches!(refused, ArbiterError::Spoofed { from: 1, claimed: 2 }), "{refused}");
    assert_eq!(witness.term(), term, "the forged heartbeat of term 9 was ignored");

    // Small messages go as datagrams, large ones as frames; both say who sent them.
    let large: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    l3.send(1, b"small".to_vec());
    l3.send(1, large.clone());
    let mut got = Vec::new();
    while got.len() < 2 {
        let inbound = tokio::time::timeout(LIMIT, inbox1.recv()).await.expect("delivered").expect("inbox open");
        assert_eq!(inbound.from, 3);
        got.push(inbound.bytes);
    }
    got.sort_by_key(Vec::len);
    assert_eq!(got, vec![b"small".to_vec(), large]);
}

/// Binds `addr` again once the previous endpoint has let it go.
async fn rebind(
    me: u64,
    addr: SocketAddr,
    identity: &Identity,
    peers: &[PeerSpec],
) -> (Arc<QuicLink>, mpsc::Receiver<Inbound>) {
    let end = tokio::time::Instant::now() + LIMIT;
    loop {
        match QuicLink::bind(me, addr, identity, peers).await {
            Ok(bound) => return bound,
            Err(e) if tokio::time::Instant::now() < end => {
                println!("rebind {addr}: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("rebind {addr}: {e}"),
        }
    }
}

/// Sends until one message arrives (a new connection may still be settling).
async fn exchange(from: &QuicLink, to: u64, inbox: &mut mpsc::Receiver<Inbound>) {
    let end = tokio::time::Instant::now() + LIMIT;
    loop {
        from.send(to, b"ping".to_vec());
        match tokio::time::timeout(Duration::from_millis(50), inbox.recv()).await {
            Ok(Some(inbound)) => {
                assert_eq!(inbound, Inbound { from: from.me(), bytes: b"ping".to_vec() });
                return;
            }
            Ok(None) => panic!("inbox closed"),
            Err(_) => assert!(tokio::time::Instant::now() < end, "node {} never reached node {to}", from.me()),
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn links_reconnect_after_a_peer_restarts() {
    let ca = new_ca();
    let addrs = [free_addr(), free_addr(), free_addr()];
    let only =
        |me: u64, other: u64| -> Vec<PeerSpec> { peers(&addrs, me).into_iter().filter(|p| p.id == other).collect() };
    let (primary, witness) = (identity(&ca, "primary"), identity(&ca, "witness"));
    let (l1, mut inbox1) = QuicLink::bind(1, addrs[0], &primary, &only(1, 3)).await.unwrap();
    let (l3, mut inbox3) = QuicLink::bind(3, addrs[2], &witness, &only(3, 1)).await.unwrap();
    exchange(&l1, 3, &mut inbox3).await;
    exchange(&l3, 1, &mut inbox1).await;

    // The accepting side restarts: the connecting side notices and dials again.
    let restarted = Instant::now();
    drop((l3, inbox3));
    assert!(eventually(|| l1.connected().is_empty()).await, "node 1 never noticed");
    let (l3, mut inbox3) = rebind(3, addrs[2], &witness, &only(3, 1)).await;
    exchange(&l1, 3, &mut inbox3).await;
    exchange(&l3, 1, &mut inbox1).await;
    println!("quic loopback: acceptor restart -> link up again in {:?}", restarted.elapsed());

    // The connecting side restarts: the accepting side takes its new connection.
    drop((l1, inbox1));
    let (l1, mut inbox1) = rebind(1, addrs[0], &primary, &only(1, 3)).await;
    exchange(&l1, 3, &mut inbox3).await;
    exchange(&l3, 1, &mut inbox1).await;
    assert_eq!(l3.connected(), vec![(1, addrs[0])]);
    assert_eq!((l1.refused(), l3.refused()), (0, 0));
}

/// A peer that opens a handshake with a node and stalls delays no other peer: the accept loop
/// completes handshakes in parallel (the raft link's handshake timeout is 2 s).
#[tokio::test(flavor = "current_thread")]
async fn a_stalled_handshake_does_not_delay_a_peer() {
    let ca = new_ca();
    let addrs = [free_addr(), free_addr(), free_addr()];
    let (backup, _backup_inbox) =
        QuicLink::bind(2, addrs[1], &identity(&ca, "backup"), &peers(&addrs, 2)).await.unwrap();
    let versions = net::quic::raft_versions();
    let _stall =
        transport::testing::stalled_handshake(addrs[1], &versions, "127.0.0.1".parse().unwrap()).await.unwrap();
    // The backup has taken the stalled handshake in hand.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    // Node 1 dials node 2 (the lower id connects).
    let (_primary, _primary_inbox) =
        QuicLink::bind(1, addrs[0], &identity(&ca, "primary"), &peers(&addrs, 1)).await.unwrap();
    assert!(eventually(|| backup.connected().iter().any(|(id, _)| *id == 1)).await, "node 1 never connected");
    let took = started.elapsed();
    println!("node 1 connected in {took:?} beside a stalled handshake");
    assert!(took < Duration::from_secs(1), "node 1 waited {took:?} behind a stalled handshake");
}
