//! Scenario tests of the sender and receiver through their public API: handshake refusals,
//! resume after reconnect, rejection and resync, windows, timeouts, post-copy pages.

mod common;

use common::{connect, pump};
use replication_proto::message::{Hello, Message};
use replication_proto::{
    ApplyError, BaselineReason, Endpoint, GoodbyeReason, MemoryImage, MemoryLayout, PROTOCOL_VERSION, Receiver,
    ReceiverConfig, ReceiverEvent, ReplicaMemory, Role, Sender, SenderConfig, SenderEvent, SessionError, SubmitError,
    Timing, VmIdentity,
};
use std::time::{Duration, Instant};

const PS: usize = 4096;
const PAGES: u64 = 8;

fn vm() -> VmIdentity {
    VmIdentity { uuid: [1; 16], name: "t".into() }
}

fn layout() -> MemoryLayout {
    MemoryLayout::flat(PS as u32, PAGES * PS as u64)
}

fn pair() -> (Sender, Receiver) {
    (
        Sender::new(SenderConfig::new(Role::Primary, vm(), layout(), 11)),
        Receiver::new(ReceiverConfig::new(Role::Backup, vm(), layout(), 22)),
    )
}

fn sender_events(s: &mut Sender) -> Vec<SenderEvent> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

fn checkpoints(r: &mut Receiver) -> Vec<replication_proto::Checkpoint> {
    std::iter::from_fn(|| r.poll_event())
        .filter_map(|e| match e {
            ReceiverEvent::Checkpoint(c) => Some(c),
            _ => None,
        })
        .collect()
}

fn page(fill: u8) -> Vec<u8> {
    let mut p = vec![fill; PS];
    p[0] = 1;
    p
}

#[test]
fn first_checkpoint_must_be_a_baseline_and_window_bounds_flight() {
    let (mut s, mut r) = pair();
    let now = Instant::now();
    let p = page(5);
    assert!(matches!(s.submit(now, [(0u64, &p[..])], b""), Err(SubmitError::BaselineRequired { next: 1 })));
    assert!(matches!(sender_events(&mut s)[..], [SenderEvent::BaselineRequired { reason: BaselineReason::Initial }]));
    connect(&mut s, &mut r, now);
    s.submit_baseline(now, [(0u64, &p[..])], b"s").unwrap();
    for _ in 1..4 {
        s.submit(now, [(1u64, &p[..])], b"s").unwrap();
    }
    assert!(matches!(s.submit(now, [(2u64, &p[..])], b""), Err(SubmitError::WindowFull { in_flight: 4, limit: 4 })));
    assert!(!s.can_submit());
    pump(&mut s, &mut r, now);
    let cps = checkpoints(&mut r);
    assert_eq!(cps.iter().map(|c| c.epoch()).collect::<Vec<_>>(), [1, 2, 3, 4]);
    r.committed(now, 2).unwrap();
    pump(&mut s, &mut r, now);
    assert_eq!(s.acked(), 2);
    assert!(s.can_submit());
    assert!(matches!(r.committed(now, 2), Err(replication_proto::ReceiverError::NotPending { epoch: 2 })));
}

#[test]
fn pages_must_be_ascending_in_layout_and_whole() {
    let (mut s, _) = pair();
    let now = Instant::now();
    let p = page(1);
    let short = [0u8; 100];
    assert!(matches!(
        s.submit_baseline(now, [(2u64, &p[..]), (1, &p[..])], b""),
        Err(SubmitError::Order { pfn: 1, prev: 2 })
    ));
    assert!(matches!(s.submit_baseline(now, [(PAGES, &p[..])], b""), Err(SubmitError::OutOfLayout { .. })));
    assert!(matches!(s.submit_baseline(now, [(0u64, &short[..])], b""), Err(SubmitError::PageLength { len: 100, .. })));
    // Nothing was consumed by the refusals.
    assert_eq!(s.next_epoch(), 1);
}

#[test]
fn codecs_are_chosen_per_page_and_replica_follows() {
    let (mut s, mut r) = pair();
    let mut replica = MemoryImage::new(&layout());
    let now = Instant::now();
    connect(&mut s, &mut r, now);
    let text: Vec<u8> = b"the quick brown fox ".iter().copied().cycle().take(PS).collect();
    let mut x = 99u64;
    let random: Vec<u8> = (0..PS)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect();
    let zero = vec![0u8; PS];
    s.submit_baseline(now, [(0u64, &text[..]), (1, &random[..]), (2, &zero[..])], b"a").unwrap();
    let mut random2 = random.clone();
    random2[77] ^= 0x55;
    s.submit(now, [(0u64, &text[..]), (1, &random2[..]), (2, &zero[..])], b"b").unwrap();
    pump(&mut s, &mut r, now);
    for cp in checkpoints(&mut r) {
        cp.apply(&mut replica).unwrap();
        r.committed(now, cp.epoch()).unwrap();
    }
    let st = s.stats();
    // Baseline: lz4, raw, zero; then: unchanged, delta, zero.
    assert_eq!(st.pages_by_encoding, [2, 1, 1, 1, 1, 0]);
    assert_eq!(replica.page(1).unwrap(), &random2[..]);
    assert_eq!(replica.page(0).unwrap(), &text[..]);
}

#[test]
fn resume_after_reconnect_resends_only_what_is_missing() {
    let (mut s, mut r) = pair();
    let now = Instant::now();
    connect(&mut s, &mut r, now);
    let p = page(3);
    s.submit_baseline(now, [(0u64, &p[..])], b"").unwrap();
    pump(&mut s, &mut r, now);
    let cps = checkpoints(&mut r);
    r.committed(now, cps[0].epoch()).unwrap();
    // Epoch 2 is sent but the connection drops before it arrives.
    s.submit(now, [(1u64, &p[..])], b"").unwrap();
    while s.poll_transmit(now).is_some() {}
    s.disconnect(now);
    r.disconnect(now);
    sender_events(&mut s);
    connect(&mut s, &mut r, now);
    let resumed = sender_events(&mut s)
        .into_iter()
        .find_map(|e| match e {
            SenderEvent::Connected { resumed_from, .. } => Some(resumed_from),
            _ => None,
        })
        .unwrap();
    assert_eq!(resumed, Some(2));
    pump(&mut s, &mut r, now);
    let cps = checkpoints(&mut r);
    assert_eq!(cps.len(), 1);
    assert_eq!(cps[0].epoch(), 2);
    assert_eq!(s.stats().resyncs, 0);
}

#[test]
fn rejected_checkpoint_leads_to_a_new_baseline() {
    let (mut s, mut r) = pair();
    let mut replica = MemoryImage::new(&layout());
    let now = Instant::now();
    connect(&mut s, &mut r, now);
    let mut p = page(3);
    s.submit_baseline(now, [(0u64, &p[..])], b"").unwrap();
    pump(&mut s, &mut r, now);
    for cp in checkpoints(&mut r) {
        cp.apply(&mut replica).unwrap();
        r.committed(now, cp.epoch()).unwrap();
    }
    // The replica drifts from what the sender believes (a bug elsewhere): the delta no longer
    // verifies, and nothing is written.
    replica.page_mut(0).unwrap()[100] ^= 1;
    let before = replica.clone();
    p[200] = 9;
    s.submit(now, [(0u64, &p[..])], b"").unwrap();
    pump(&mut s, &mut r, now);
    let cp = checkpoints(&mut r).pop().unwrap();
    assert!(matches!(cp.apply(&mut replica), Err(ApplyError::Digest { epoch: 2, .. })));
    assert_eq!(replica, before);
    r.reject(now, 2).unwrap();
    assert!(r.needs_baseline());
    pump(&mut s, &mut r, now);
    assert!(s.needs_baseline());
    assert!(
        sender_events(&mut s)
            .iter()
            .any(|e| matches!(e, SenderEvent::BaselineRequired { reason: BaselineReason::Requested(_) }))
    );
    s.submit_baseline(now, [(0u64, &p[..])], b"").unwrap();
    pump(&mut s, &mut r, now);
    let cp = checkpoints(&mut r).pop().unwrap();
    assert!(cp.is_baseline());
    assert_eq!(cp.epoch(), 3);
    cp.apply(&mut replica).unwrap();
    assert_eq!(replica.page(0).unwrap(), &p[..]);
}

fn refused(mut s_cfg: SenderConfig, r_cfg: ReceiverConfig) -> (SessionError, SessionError) {
    s_cfg.timing = Timing::default();
    let mut s = Sender::new(s_cfg);
    let mut r = Receiver::new(r_cfg);
    let now = Instant::now();
    connect(&mut s, &mut r, now);
    let se = sender_events(&mut s)
        .into_iter()
        .find_map(|e| match e {
            SenderEvent::Disconnected { error } => Some(error),
            _ => None,
        })
        .expect("sender refused");
    let re = std::iter::from_fn(|| r.poll_event())
        .find_map(|e| match e {
            ReceiverEvent::Disconnected { error } => Some(error),
            _ => None,
        })
        .expect("receiver refused");
    (se, re)
}

#[test]
fn mismatched_peers_are_refused_for_good() {
    let other_vm = VmIdentity { uuid: [2; 16], name: "u".into() };
    let (se, re) = refused(
        SenderConfig::new(Role::Primary, vm(), layout(), 1),
        ReceiverConfig::new(Role::Backup, other_vm, layout(), 2),
    );
    assert!(matches!(se, SessionError::Vm { .. }) && se.is_permanent());
    assert!(re.is_permanent());

    let (se, _) = refused(
        SenderConfig::new(Role::MigrationSource, vm(), layout(), 1),
        ReceiverConfig::new(Role::Backup, vm(), layout(), 2),
    );
    assert!(matches!(se, SessionError::Role { .. }));

    let (se, _) = refused(
        SenderConfig::new(Role::Primary, vm(), layout(), 1),
        ReceiverConfig::new(Role::Backup, vm(), MemoryLayout::flat(4096, 4096), 2),
    );
    assert!(matches!(se, SessionError::Layout { .. }));
}

/// A peer's `Hello` as a test crafts it: current version, no positions, high water 0.
fn peer_hello(role: Role, instance: u64) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        min_version: PROTOCOL_VERSION,
        role,
        instance,
        vm: vm(),
        layout: layout(),
        window: 4,
        committed: None,
        delivered: None,
        high_water: 0,
        session: 1,
        sends_checkpoints: role.is_sender(),
        start: None,
        inbound_log: false,
        side_copy_port: None,
        output_log: false,
    }
}

#[test]
fn unsupported_version_is_refused_with_both_versions_named() {
    let (_, mut r) = pair();
    let now = Instant::now();
    r.connect(now);
    let hello = Hello { version: 7, min_version: 6, ..peer_hello(Role::Primary, 5) };
    let mut bytes = Vec::new();
    Message::Hello(hello).encode_frame(&mut bytes);
    r.handle_input(now, &bytes);
    let err = std::iter::from_fn(|| r.poll_event())
        .find_map(|e| match e {
            ReceiverEvent::Disconnected { error } => Some(error),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        err.to_string(),
        format!(
            "peer speaks protocol version 7; this build speaks {PROTOCOL_VERSION} and accepts {}..={PROTOCOL_VERSION}",
            replication_proto::version::oldest_accepted(PROTOCOL_VERSION)
        )
    );
    assert!(err.is_permanent());
    // The receiver says goodbye with the reason.
    let frames: Vec<_> = std::iter::from_fn(|| r.poll_transmit(now)).collect();
    let last = frames.last().unwrap();
    let f = replication_proto::frame::decode_datagram(last).unwrap();
    match Message::decode(f.kind, &f.payload).unwrap() {
        Message::Goodbye(g) => assert_eq!(g.reason, GoodbyeReason::Version),
        m => panic!("expected goodbye, got {m:?}"),
    }
}

#[test]
fn silent_peer_times_out_and_heartbeats_keep_it_alive() {
    let (mut s, mut r) = pair();
    let t0 = Instant::now();
    connect(&mut s, &mut r, t0);
    let mut now = t0;
    // Both sides run their timers and exchange heartbeats for 5 s: no disconnect.
    for _ in 0..50 {
        now += Duration::from_millis(100);
        s.handle_timeout(now);
        r.handle_timeout(now);
        pump(&mut s, &mut r, now);
    }
    assert!(!sender_events(&mut s).iter().any(|e| matches!(e, SenderEvent::Disconnected { .. })));
    // Now the receiver goes silent: the sender, driven as a driver does (at each of its own
    // deadlines), gives up after the idle timeout. (A single jump of a second would read as a
    // stall of the sender itself, which is not blamed on the peer: tests/stall.rs.)
    let silent_from = now;
    let mut gone = false;
    while !gone {
        let deadline = s.poll_timeout().unwrap();
        assert!(deadline <= now + Duration::from_secs(1));
        now = deadline;
        s.handle_timeout(now);
        while s.poll_transmit(now).is_some() {}
        gone = sender_events(&mut s)
            .iter()
            .any(|e| matches!(e, SenderEvent::Disconnected { error: SessionError::Idle { .. } }));
        assert!(now <= silent_from + Duration::from_millis(1100), "not idle after {:?}", now - silent_from);
    }
    assert!(now >= silent_from + Duration::from_millis(900), "idle after only {:?}", now - silent_from);
}

#[test]
fn heartbeats_travel_as_datagrams() {
    let (mut s, mut r) = pair();
    let now = Instant::now();
    connect(&mut s, &mut r, now);
    while r.poll_event().is_some() {}
    let later = now + Duration::from_millis(150);
    s.handle_timeout(later);
    let t = s.poll_transmit(later).unwrap();
    assert_eq!(t.channel(), replication_proto::Channel::Datagram);
    r.handle_datagram(later, &t);
    assert!(r.poll_event().is_none());
}

#[test]
fn post_copy_page_requests_are_answered() {
    let mut s = Sender::new(SenderConfig::new(Role::MigrationSource, vm(), layout(), 1));
    let mut r = Receiver::new(ReceiverConfig::new(Role::MigrationDestination, vm(), layout(), 2));
    let now = Instant::now();
    connect(&mut s, &mut r, now);
    let id = r.request_pages(&[2, 3, 7]).unwrap();
    assert!(r.request_pages(&[3, 2]).is_err());
    pump(&mut s, &mut r, now);
    let pfns = sender_events(&mut s)
        .into_iter()
        .find_map(|e| match e {
            SenderEvent::PagesRequested { id: got, pfns } if got == id => Some(pfns),
            _ => None,
        })
        .unwrap();
    assert_eq!(pfns, [2, 3, 7]);
    let mem: Vec<Vec<u8>> = (0..PAGES as u8).map(page).collect();
    s.send_pages(id, pfns.iter().map(|&p| (p, &mem[p as usize][..]))).unwrap();
    pump(&mut s, &mut r, now);
    let (got, data) = std::iter::from_fn(|| r.poll_event())
        .find_map(|e| match e {
            ReceiverEvent::Pages { id: got, pfns, data } if got == id => Some((pfns, data)),
            _ => None,
        })
        .unwrap();
    assert_eq!(got, [2, 3, 7]);
    assert_eq!(data.len(), 3 * PS);
    for (pfn, bytes) in got.iter().zip(data.chunks(PS)) {
        assert_eq!(bytes, mem[*pfn as usize]);
    }
}

#[test]
fn small_cache_evicts_and_still_replicates_exactly() {
    let mut cfg = SenderConfig::new(Role::Primary, vm(), layout(), 1);
    cfg.cache_bytes = 2 * PS as u64;
    let mut s = Sender::new(cfg);
    let mut r = Receiver::new(ReceiverConfig::new(Role::Backup, vm(), layout(), 2));
    let mut replica = MemoryImage::new(&layout());
    let now = Instant::now();
    connect(&mut s, &mut r, now);
    let mut mem: Vec<Vec<u8>> = (0..PAGES as u8).map(|i| page(i + 1)).collect();
    let all = |m: &Vec<Vec<u8>>| -> Vec<(u64, Vec<u8>)> {
        m.iter().enumerate().map(|(i, p)| (i as u64, p.clone())).collect()
    };
    let snap = all(&mem);
    s.submit_baseline(now, snap.iter().map(|(p, b)| (*p, &b[..])), b"").unwrap();
    for round in 0..6u8 {
        for (i, p) in mem.iter_mut().enumerate() {
            p[i * 10 + 5] = round;
        }
        let snap = all(&mem);
        pump(&mut s, &mut r, now);
        for cp in checkpoints(&mut r) {
            cp.apply(&mut replica).unwrap();
            r.committed(now, cp.epoch()).unwrap();
        }
        pump(&mut s, &mut r, now);
        s.submit(now, snap.iter().map(|(p, b)| (*p, &b[..])), b"").unwrap();
    }
    pump(&mut s, &mut r, now);
    for cp in checkpoints(&mut r) {
        cp.apply(&mut replica).unwrap();
    }
    let (copies, capacity, evictions) = s.cache_stats();
    assert_eq!(capacity, 2);
    assert!(copies <= 2);
    assert!(evictions > 0);
    for (i, p) in mem.iter().enumerate() {
        assert_eq!(replica.page(i as u64).unwrap(), &p[..]);
    }
}

/// A receiver's Hello as a hostile or buggy backup would send it.
fn backup_hello(high_water: u64, committed: Option<u64>) -> Vec<u8> {
    use replication_proto::message::{Lineage, Position};
    let pos = |epoch| Position { lineage: Lineage { origin: 11, baseline: 1 }, epoch };
    let hello = Hello {
        committed: committed.map(pos),
        delivered: committed.map(pos),
        high_water,
        ..peer_hello(Role::Backup, 99)
    };
    let mut bytes = Vec::new();
    Message::Hello(hello).encode_frame(&mut bytes);
    bytes
}

/// A peer's epoch numbers near `u64::MAX` end the session with an error naming the value: the
/// sender neither overflows (a panic in debug builds, a silent wrap in release) nor numbers its
/// next baseline at or below what the peer claims to have seen (which the peer would drop as
/// stale forever, holding output for good).
#[test]
fn peer_epoch_numbers_near_u64_max_are_refused() {
    use replication_proto::limits::MAX_ANNOUNCED_EPOCH;
    let now = Instant::now();
    let p = page(3);
    for (high_water, committed) in
        [(u64::MAX, None), (u64::MAX - 1, None), (MAX_ANNOUNCED_EPOCH + 1, None), (5, Some(u64::MAX))]
    {
        let (mut s, _) = pair();
        s.connect(now);
        s.handle_input(now, &backup_hello(high_water, committed));
        let error = sender_events(&mut s)
            .into_iter()
            .find_map(|e| match e {
                SenderEvent::Disconnected { error } => Some(error),
                _ => None,
            })
            .unwrap_or_else(|| panic!("high water {high_water}, committed {committed:?}: session not refused"));
        let value = committed.unwrap_or(high_water);
        assert!(
            error.to_string().contains(&value.to_string()),
            "high water {high_water}: error does not name the value: {error}"
        );
        assert!(error.is_permanent(), "{error}");
        // Nothing of the peer's claim was taken: the sender still numbers from 1.
        assert_eq!(s.next_epoch(), 1);
        assert_eq!(s.submit_baseline(now, [(0, &p[..])], b"s").unwrap(), 1);
        assert_eq!(s.submit(now, [(0, &p[..])], b"s").unwrap(), 2);
    }

    // At the limit, the sender numbers above it and still has room to count on.
    let (mut s, _) = pair();
    s.connect(now);
    s.handle_input(now, &backup_hello(MAX_ANNOUNCED_EPOCH, None));
    assert!(
        sender_events(&mut s).iter().all(|e| !matches!(e, SenderEvent::Disconnected { .. })),
        "a high water at the limit is accepted"
    );
    assert_eq!(s.submit_baseline(now, [(0, &p[..])], b"s").unwrap(), MAX_ANNOUNCED_EPOCH + 1);
    assert_eq!(s.submit(now, [(0, &p[..])], b"s").unwrap(), MAX_ANNOUNCED_EPOCH + 2);
}

/// A sender's epoch numbered beyond the epoch limit is a protocol violation: the receiver does
/// not stage it (it would otherwise announce that number as its high water from then on).
#[test]
fn receiver_refuses_an_epoch_beyond_the_limit() {
    use replication_proto::message::{EpochBegin, Lineage};
    let (_, mut r) = pair();
    let now = Instant::now();
    r.connect(now);
    let mut bytes = Vec::new();
    Message::Hello(peer_hello(Role::Primary, 5)).encode_frame(&mut bytes);
    let epoch = u64::MAX;
    Message::EpochBegin(EpochBegin {
        epoch,
        lineage: Lineage { origin: 5, baseline: epoch },
        baseline: true,
        page_count: 0,
        state_len: 0,
    })
    .encode_frame(&mut bytes);
    r.handle_input(now, &bytes);
    let error = std::iter::from_fn(|| r.poll_event())
        .find_map(|e| match e {
            ReceiverEvent::Disconnected { error } => Some(error),
            _ => None,
        })
        .expect("an epoch beyond the limit ends the session");
    assert!(error.to_string().contains(&epoch.to_string()), "{error}");
}
