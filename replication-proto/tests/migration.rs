//! Scenario tests of what protocol version 2 adds, through the public API: session roles (a
//! migration is not protection, and each side checks the peer is the one it expects), either side
//! of a migration sending checkpoints, mixed versions, the migration messages' directions, and
//! content-hash dedup end to end.

mod common;

use common::{connect, goodbye_reason, pump, receiver_error, sender_error};
use replication_proto::message::{EpochBegin, EpochEnd, Hello, Lineage, Message, PageBatch, PageRequest};
use replication_proto::migration::{Complete, Handover, PfnRange, Resumed, SwitchMode};
use replication_proto::pageset::{EncodedPage, PageEncoding};
use replication_proto::{
    BaselineReason, Endpoint, GoodbyeReason, MemoryImage, MemoryLayout, PROTOCOL_VERSION, Receiver, ReceiverConfig,
    ReceiverError, ReceiverEvent, ReplicaMemory, Role, Sender, SenderConfig, SenderEvent, SessionError, VmIdentity,
};
use std::time::Instant;

const PS: usize = 4096;
const PAGES: u64 = 16;

fn vm() -> VmIdentity {
    VmIdentity { uuid: [4; 16], name: "m".into() }
}

fn layout() -> MemoryLayout {
    MemoryLayout::flat(PS as u32, PAGES * PS as u64)
}

fn sender(role: Role, version: u16) -> Sender {
    let mut cfg = SenderConfig::new(role, vm(), layout(), 11);
    cfg.version = version;
    Sender::new(cfg)
}

fn receiver(role: Role, version: u16) -> Receiver {
    let mut cfg = ReceiverConfig::new(role, vm(), layout(), 22);
    cfg.version = version;
    Receiver::new(cfg)
}

fn page(fill: u8) -> Vec<u8> {
    (0..PS).map(|i| fill.wrapping_add((i % 251) as u8) | 1).collect()
}

/// Applies and commits every checkpoint the receiver has; returns how many.
fn commit_all(r: &mut Receiver, replica: &mut MemoryImage, now: Instant) -> usize {
    let cps: Vec<_> = std::iter::from_fn(|| r.poll_event())
        .filter_map(|e| match e {
            ReceiverEvent::Checkpoint(c) => Some(c),
            _ => None,
        })
        .collect();
    for cp in &cps {
        cp.apply(replica).unwrap_or_else(|e| panic!("{e}"));
        r.committed(now, cp.epoch()).unwrap();
    }
    cps.len()
}

fn acked(s: &mut Sender) -> Vec<u64> {
    std::iter::from_fn(|| s.poll_event())
        .filter_map(|e| match e {
            SenderEvent::Acked { epoch, .. } => Some(epoch),
            _ => None,
        })
        .collect()
}

/// Every pairing of a role that sends checkpoints with one that receives them: only
/// primary-backup and source-destination (either way round) meet, and every other pairing is
/// refused for good on both sides with an error that names both roles.
#[test]
fn roles_pair_only_with_their_counterpart() {
    let now = Instant::now();
    let senders = [Role::Primary, Role::MigrationSource, Role::MigrationDestination];
    let receivers = [Role::Backup, Role::MigrationDestination, Role::MigrationSource];
    for s_role in senders {
        for r_role in receivers {
            let mut s = sender(s_role, PROTOCOL_VERSION);
            let mut r = receiver(r_role, PROTOCOL_VERSION);
            connect(&mut s, &mut r, now);
            let (se, re) = (sender_error(&mut s), receiver_error(&mut r));
            if r_role == s_role.counterpart() {
                assert!(se.is_none() && re.is_none(), "{s_role} with {r_role}: {se:?} {re:?}");
                continue;
            }
            let re = re.unwrap_or_else(|| panic!("{r_role} accepted a {s_role}"));
            let se = se.unwrap_or_else(|| panic!("{s_role} accepted a {r_role}"));
            assert_eq!(
                re.to_string(),
                format!("peer is a {s_role}; a {r_role} pairs only with a {}", r_role.counterpart())
            );
            assert_eq!(
                se.to_string(),
                format!("peer is a {r_role}; a {s_role} pairs only with a {}", s_role.counterpart())
            );
            assert!(re.is_permanent() && se.is_permanent());
        }
    }
    // The two the brief names, spelled out.
    let mut s = sender(Role::MigrationSource, PROTOCOL_VERSION);
    let mut r = receiver(Role::Backup, PROTOCOL_VERSION);
    s.connect(now);
    r.connect(now);
    while let Some(t) = s.poll_transmit(now) {
        r.handle_input(now, &t);
    }
    assert_eq!(
        receiver_error(&mut r).unwrap().to_string(),
        "peer is a migration source; a backup pairs only with a primary"
    );
    let last = std::iter::from_fn(|| r.poll_transmit(now)).last().unwrap();
    assert_eq!(goodbye_reason(&last), Some(GoodbyeReason::Mismatch));
    let mut s = sender(Role::Primary, PROTOCOL_VERSION);
    let mut r = receiver(Role::MigrationDestination, PROTOCOL_VERSION);
    connect(&mut s, &mut r, now);
    assert_eq!(
        receiver_error(&mut r).unwrap().to_string(),
        "peer is a primary; a migration destination pairs only with a migration source"
    );
}

/// A build of today and a build of the previous version protect a VM together at version 1 (no
/// dedup, no flags byte); a migration between them is refused, naming the versions.
#[test]
fn protection_runs_at_version_1_and_migration_needs_version_2() {
    let now = Instant::now();
    for (sv, rv) in [(1, PROTOCOL_VERSION), (PROTOCOL_VERSION, 1), (1, 1)] {
        let mut s = sender(Role::Primary, sv);
        let mut r = receiver(Role::Backup, rv);
        let mut replica = MemoryImage::new(&layout());
        connect(&mut s, &mut r, now);
        assert_eq!((s.version(), r.version()), (1, 1));
        // Duplicate pages, which version 2 would send as references.
        let a = page(7);
        s.submit_baseline(now, [(1u64, &a[..]), (2, &a[..]), (3, &a[..])], b"state").unwrap();
        pump(&mut s, &mut r, now);
        assert_eq!(commit_all(&mut r, &mut replica, now), 1);
        s.submit(now, [(5u64, &a[..])], b"state").unwrap();
        pump(&mut s, &mut r, now);
        assert_eq!(commit_all(&mut r, &mut replica, now), 1);
        pump(&mut s, &mut r, now);
        assert_eq!(acked(&mut s), [1, 2]);
        assert_eq!(s.stats().pages_by_encoding[PageEncoding::Dedup as usize], 0);
        for pfn in [1, 2, 3, 5] {
            assert_eq!(replica.page(pfn).unwrap(), &a[..]);
        }
    }
    for (sv, rv) in [(1, PROTOCOL_VERSION), (PROTOCOL_VERSION, 1)] {
        let mut s = sender(Role::MigrationSource, sv);
        let mut r = receiver(Role::MigrationDestination, rv);
        s.connect(now);
        r.connect(now);
        while let Some(t) = s.poll_transmit(now) {
            r.handle_input(now, &t);
        }
        let re = receiver_error(&mut r).expect("refused");
        assert_eq!(
            re.to_string(),
            "a migration destination needs protocol version 2, the session with this peer runs at 1"
        );
        assert!(re.is_permanent());
        // The destination says why (its Hello, then the goodbye); the source refuses too.
        let frames: Vec<_> = std::iter::from_fn(|| r.poll_transmit(now)).collect();
        assert_eq!(goodbye_reason(frames.last().unwrap()), Some(GoodbyeReason::Version));
        for f in &frames {
            s.handle_input(now, f);
        }
        let se = sender_error(&mut s).unwrap();
        assert!(se.is_permanent() && matches!(se, SessionError::MigrationVersion { version: 1, needs: 2, .. }), "{se}");
    }
}

/// Reverse checkpoints: in a migration session the destination may be the side that sends
/// checkpoints, and the source the side that commits and acknowledges them.
#[test]
fn a_destination_sends_checkpoints_back_to_its_source() {
    let now = Instant::now();
    let mut dest = sender(Role::MigrationDestination, PROTOCOL_VERSION);
    let mut source = receiver(Role::MigrationSource, PROTOCOL_VERSION);
    let mut copy = MemoryImage::new(&layout());
    connect(&mut dest, &mut source, now);
    let a = page(3);
    let b = page(4);
    dest.submit_baseline(now, [(0u64, &a[..]), (9, &b[..])], b"vm state 1").unwrap();
    dest.submit(now, [(9u64, &a[..])], b"vm state 2").unwrap();
    pump(&mut dest, &mut source, now);
    let peer = std::iter::from_fn(|| dest.poll_event())
        .find_map(|e| match e {
            SenderEvent::Connected { peer, .. } => Some(peer),
            _ => None,
        })
        .unwrap();
    assert_eq!((peer.role, peer.sends_checkpoints), (Role::MigrationSource, false));
    assert_eq!(commit_all(&mut source, &mut copy, now), 2);
    pump(&mut dest, &mut source, now);
    assert_eq!(acked(&mut dest), [1, 2]);
    assert_eq!(copy.page(9).unwrap(), &a[..]);
    // The page 9 of epoch 2 went as a reference to page 0.
    assert_eq!(dest.stats().pages_by_encoding[PageEncoding::Dedup as usize], 1);
}

/// Two sides that both send checkpoints, or that both receive them, are refused: a session has
/// one direction.
#[test]
fn exactly_one_side_sends_checkpoints() {
    let now = Instant::now();
    let mut a = sender(Role::MigrationSource, PROTOCOL_VERSION);
    let mut b = sender(Role::MigrationDestination, PROTOCOL_VERSION);
    connect(&mut a, &mut b, now);
    let e = sender_error(&mut a).unwrap();
    assert_eq!(
        e.to_string(),
        "peer (migration destination) sends checkpoints, and so do we: one side of a session sends them, the \
         other receives"
    );
    assert!(e.is_permanent());
    assert!(sender_error(&mut b).is_some());
    let mut a = receiver(Role::MigrationDestination, PROTOCOL_VERSION);
    let mut b = receiver(Role::MigrationSource, PROTOCOL_VERSION);
    connect(&mut a, &mut b, now);
    assert!(
        receiver_error(&mut a).unwrap().to_string().starts_with("peer (migration source) does not send checkpoints")
    );
    // A version 2 Hello that claims the wrong direction for its role is held to its claim.
    let mut r = receiver(Role::Backup, PROTOCOL_VERSION);
    r.connect(now);
    r.handle_input(now, &frame(&Message::Hello(Hello { sends_checkpoints: false, ..hello(Role::Primary, 2) })));
    assert!(matches!(receiver_error(&mut r), Some(SessionError::Direction { peer: Role::Primary, peer_sends: false })));
}

/// The Hello a crafted peer of `role` sends at `version`.
fn hello(role: Role, version: u16) -> Hello {
    Hello {
        version,
        min_version: 1,
        role,
        instance: 77,
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

fn frame(m: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    m.encode_frame(&mut out);
    out
}

/// A receiver of `role` connected to a crafted peer of `peer` speaking `version`.
fn crafted_receiver(role: Role, peer: Role, version: u16, now: Instant) -> Receiver {
    let mut r = receiver(role, PROTOCOL_VERSION);
    r.connect(now);
    r.handle_input(now, &frame(&Message::Hello(Hello { sends_checkpoints: true, ..hello(peer, version) })));
    while r.poll_transmit(now).is_some() {}
    assert!(r.version() == version, "handshake at {version}");
    while r.poll_event().is_some() {}
    r
}

fn crafted_sender(role: Role, peer: Role, now: Instant) -> Sender {
    let mut s = sender(role, PROTOCOL_VERSION);
    s.connect(now);
    s.handle_input(now, &frame(&Message::Hello(Hello { sends_checkpoints: false, ..hello(peer, PROTOCOL_VERSION) })));
    while s.poll_transmit(now).is_some() {}
    while s.poll_event().is_some() {}
    s
}

/// The migration messages travel between the source that sends checkpoints and the destination
/// that receives them, and only in sessions of version 2: anything else ends the session.
#[test]
fn migration_messages_go_one_way_and_only_in_version_2() {
    let now = Instant::now();
    let (switch, maps) =
        replication_proto::migration::switch_over(3, SwitchMode::PostCopy, &[PfnRange { first: 0, count: 4 }]);
    let from_source =
        [Message::SwitchOver(switch), Message::PageMap(maps[0].clone()), Message::Handover(Handover { epoch: 3 })];
    let from_destination = [
        Message::Resumed(Resumed { epoch: 3, cpu_us: 5, peak_rss_bytes: 6 }),
        Message::Complete(Complete { pages: PAGES, ..Complete::default() }),
        Message::PageRequest(PageRequest { id: 1, pfns: vec![2, 3] }),
    ];
    // Accepted where they belong, each reported to the owner.
    for m in &from_source {
        let mut r = crafted_receiver(Role::MigrationDestination, Role::MigrationSource, 2, now);
        r.handle_input(now, &frame(m));
        let ev = r.poll_event();
        let reported = match (m, &ev) {
            (Message::SwitchOver(a), Some(ReceiverEvent::SwitchOver(b))) => a == b,
            (Message::PageMap(a), Some(ReceiverEvent::PageMap(b))) => a == b,
            (Message::Handover(a), Some(ReceiverEvent::Handover { epoch })) => a.epoch == *epoch,
            _ => false,
        };
        assert!(reported, "{m:?} reported by a destination as {ev:?}");
    }
    for (m, want) in from_destination[..2].iter().zip([
        SenderEvent::Resumed(Resumed { epoch: 3, cpu_us: 5, peak_rss_bytes: 6 }),
        SenderEvent::Complete(Complete { pages: PAGES, ..Complete::default() }),
    ]) {
        let mut s = crafted_sender(Role::MigrationSource, Role::MigrationDestination, now);
        s.handle_input(now, &frame(m));
        assert_eq!(s.poll_event(), Some(want), "{m:?} reported by a source");
    }
    // From the wrong side, or in protection.
    for m in &from_destination {
        let mut r = crafted_receiver(Role::MigrationDestination, Role::MigrationSource, 2, now);
        r.handle_input(now, &frame(m));
        let e = receiver_error(&mut r).unwrap_or_else(|| panic!("{m:?} from a source accepted"));
        assert_eq!(
            e.to_string(),
            format!("peer sent {:?}, which a migration source sending checkpoints never sends", m.kind())
        );
    }
    for m in from_source.iter().chain(&from_destination[..2]) {
        let mut r = crafted_receiver(Role::Backup, Role::Primary, 2, now);
        r.handle_input(now, &frame(m));
        assert!(
            matches!(receiver_error(&mut r), Some(SessionError::Unexpected { role: Role::Primary, .. })),
            "{m:?} in protection"
        );
    }
    for m in from_source.iter().chain(&from_destination) {
        let mut s = crafted_sender(Role::Primary, Role::Backup, now);
        s.handle_input(now, &frame(m));
        assert!(
            matches!(sender_error(&mut s), Some(SessionError::Unexpected { role: Role::Backup, .. })),
            "{m:?} from a backup"
        );
    }
    // In a reverse session the source receives checkpoints: it sends no page requests either.
    let mut s = crafted_sender(Role::MigrationDestination, Role::MigrationSource, now);
    s.handle_input(now, &frame(&from_destination[2]));
    assert!(matches!(sender_error(&mut s), Some(SessionError::Unexpected { .. })));
    // A session at version 1 has none of them.
    let mut r = crafted_receiver(Role::Backup, Role::Primary, 1, now);
    r.handle_input(now, &frame(&from_source[0]));
    assert_eq!(
        receiver_error(&mut r).unwrap().to_string(),
        "peer sent SwitchOver, which protocol version 1 does not have"
    );
}

#[test]
fn page_requests_are_for_a_migration_destination() {
    let now = Instant::now();
    let mut s = sender(Role::Primary, PROTOCOL_VERSION);
    let mut r = receiver(Role::Backup, PROTOCOL_VERSION);
    connect(&mut s, &mut r, now);
    let e = r.request_pages(&[1]).unwrap_err();
    assert_eq!(e, ReceiverError::NotMigration { role: Role::Backup });
    assert_eq!(e.to_string(), "page requests are for a migration destination receiving from its source, not a backup");
}

/// A page whose exact content was already sent in the session, for it or for another page, goes
/// as a reference; the replica ends up exact. A reference names a page below (sent earlier in
/// the epoch, or untouched by it) or a page above that the epoch does not touch: never one whose
/// content the epoch changes after the reference would be read.
#[test]
fn duplicate_pages_go_as_references_and_replicate_exactly() {
    let now = Instant::now();
    let mut s = sender(Role::MigrationSource, PROTOCOL_VERSION);
    let mut r = receiver(Role::MigrationDestination, PROTOCOL_VERSION);
    let mut replica = MemoryImage::new(&layout());
    connect(&mut s, &mut r, now);
    let (a, b, c) = (page(1), page(2), page(3));
    let zero = vec![0u8; PS];
    let mut mem: Vec<Vec<u8>> = vec![zero.clone(); PAGES as usize];
    for (pfn, p) in [(0, &a), (1, &b), (2, &a), (5, &b), (7, &c), (8, &a)] {
        mem[pfn] = p.clone();
    }
    let dedups = |s: &Sender| s.stats().pages_by_encoding[PageEncoding::Dedup as usize];
    let round = |s: &mut Sender, r: &mut Receiver, replica: &mut MemoryImage, mem: &[Vec<u8>], dirty: &[u64]| {
        let before = dedups(s);
        s.submit(now, dirty.iter().map(|&p| (p, &mem[p as usize][..])), b"").unwrap();
        pump(s, r, now);
        assert_eq!(commit_all(r, replica, now), 1);
        dedups(s) - before
    };

    // Round 0 (a baseline): 2, 5 and 8 refer to earlier pages of it; zero pages stay zero.
    let all: Vec<(u64, &[u8])> = mem.iter().enumerate().map(|(i, p)| (i as u64, &p[..])).collect();
    s.submit_baseline(now, all.iter().copied(), b"").unwrap();
    assert_eq!(dedups(&s), 3);
    assert_eq!(s.stats().pages_by_encoding[PageEncoding::Zero as usize], 10);
    pump(&mut s, &mut r, now);
    assert_eq!(commit_all(&mut r, &mut replica, now), 1);

    // Round 1: 4 takes c, which 7 holds (above, untouched by the round); 6 takes a, which 0
    // holds (below, untouched).
    mem[4] = c.clone();
    mem[6] = a.clone();
    assert_eq!(round(&mut s, &mut r, &mut replica, &mem, &[4, 6]), 2);

    // Round 2: 3 takes b while 5, which holds b, changes in the same round: 3 must not refer to
    // 5 (the destination would read 5's new content); it refers to 1, or goes whole.
    mem[3] = b.clone();
    mem[5] = page(9);
    let n = round(&mut s, &mut r, &mut replica, &mem, &[3, 5]);
    assert!(n <= 1, "{n}");

    // Round 3: 7 changes, then 11 takes c: 7 < 11, so the index no longer names 7 for c when 11
    // is encoded (it holds what it was last sent, page(10)); 4 still holds c but is not indexed.
    mem[7] = page(10);
    mem[11] = c.clone();
    assert_eq!(round(&mut s, &mut r, &mut replica, &mem, &[7, 11]), 0);

    // Round 4: 1 takes c, which 11 holds, and 11 changes in the same round: no reference to 11.
    mem[1] = c.clone();
    mem[11] = page(11);
    assert_eq!(round(&mut s, &mut r, &mut replica, &mem, &[1, 11]), 0);

    pump(&mut s, &mut r, now);
    assert_eq!(s.acked(), 5);
    assert!(receiver_error(&mut r).is_none());
    for (pfn, p) in mem.iter().enumerate() {
        assert_eq!(replica.page(pfn as u64).unwrap(), &p[..], "page {pfn}");
    }
    // A reference costs its 16 bytes of payload.
    assert_eq!(s.stats().payload_by_encoding[PageEncoding::Dedup as usize], 16 * dedups(&s));
}

/// Epochs encoded with dedup for a version 2 receiver are not resent to one of version 1 (a
/// backup restarted on an older build): the sender asks for a baseline, which it encodes without.
#[test]
fn retained_dedup_epochs_are_not_resent_to_an_older_peer() {
    let now = Instant::now();
    let mut s = sender(Role::Primary, PROTOCOL_VERSION);
    let mut r = receiver(Role::Backup, PROTOCOL_VERSION);
    connect(&mut s, &mut r, now);
    let a = page(5);
    s.submit_baseline(now, [(0u64, &a[..]), (1, &a[..])], b"").unwrap();
    assert_eq!(s.stats().pages_by_encoding[PageEncoding::Dedup as usize], 1);
    // The connection drops before anything arrives; the backup comes back (a new process) at
    // version 1.
    s.disconnect(now);
    while s.poll_event().is_some() {}
    let mut cfg = ReceiverConfig::new(Role::Backup, vm(), layout(), 23);
    cfg.version = 1;
    let mut old = Receiver::new(cfg);
    let mut replica = MemoryImage::new(&layout());
    connect(&mut s, &mut old, now);
    let required = std::iter::from_fn(|| s.poll_event())
        .find_map(|e| match e {
            SenderEvent::BaselineRequired { reason } => Some(reason),
            _ => None,
        })
        .expect("a baseline is required");
    assert_eq!(required, BaselineReason::PeerVersion(1));
    s.submit_baseline(now, [(0u64, &a[..]), (1, &a[..])], b"").unwrap();
    assert_eq!(s.stats().pages_by_encoding[PageEncoding::Dedup as usize], 1, "no dedup at version 1");
    pump(&mut s, &mut old, now);
    assert_eq!(commit_all(&mut old, &mut replica, now), 1);
    assert_eq!(replica.page(1).unwrap(), &a[..]);
    assert!(receiver_error(&mut old).is_none());
}

/// A dedup record in a session of version 1 is a protocol violation (an old build would not
/// even parse it).
#[test]
fn a_dedup_record_in_a_version_1_session_is_refused() {
    let now = Instant::now();
    for version in [1, 2] {
        let mut r = crafted_receiver(Role::Backup, Role::Primary, version, now);
        let a = page(1);
        let reference = replication_proto::codec::DedupRef::to(0, &a).encode().to_vec();
        let lineage = Lineage { origin: 77, baseline: 1 };
        let mut bytes =
            frame(&Message::EpochBegin(EpochBegin { epoch: 1, lineage, baseline: true, page_count: 2, state_len: 0 }));
        let batch = PageBatch {
            epoch: 1,
            seq: 0,
            pages: vec![
                EncodedPage { pfn: 0, encoding: PageEncoding::Raw, data: a.clone() },
                EncodedPage { pfn: 1, encoding: PageEncoding::Dedup, data: reference },
            ],
        };
        let mut payload = Vec::new();
        Message::PageBatch(batch.clone()).encode_payload(&mut payload);
        bytes.extend(frame(&Message::PageBatch(batch)));
        let mut digest = replication_proto::hash::Digest::default();
        digest.add(0, replication_proto::hash::xxh64(&a));
        digest.add(1, replication_proto::hash::xxh64(&a));
        bytes.extend(frame(&Message::EpochEnd(EpochEnd {
            epoch: 1,
            frames: 1,
            page_count: 2,
            state_len: 0,
            checksum: crc32fast::hash(&payload),
            digest: digest.finish(),
        })));
        r.handle_input(now, &bytes);
        let events: Vec<_> = std::iter::from_fn(|| r.poll_event()).collect();
        if version == 1 {
            let e = events.iter().find_map(|e| match e {
                ReceiverEvent::Disconnected { error } => Some(error.to_string()),
                _ => None,
            });
            assert_eq!(
                e.as_deref(),
                Some("protocol violation: page encoding newer than the session's protocol version (epoch 1)")
            );
        } else {
            let mut replica = MemoryImage::new(&layout());
            let cp = events
                .into_iter()
                .find_map(|e| match e {
                    ReceiverEvent::Checkpoint(c) => Some(c),
                    _ => None,
                })
                .expect("version 2 takes it");
            cp.apply(&mut replica).unwrap();
            assert_eq!(replica.page(1).unwrap(), &a[..]);
        }
    }
}

/// A pre-copy migration through the state machines: rounds, the final epoch with the state,
/// switch-over, the destination's ack, hand-over, resumed. Only a migration source sends the
/// migration messages, only on an established session, and only for an epoch it submitted.
#[test]
fn a_precopy_switch_over_and_hand_over() {
    let now = Instant::now();
    let mut s = sender(Role::MigrationSource, PROTOCOL_VERSION);
    let mut r = receiver(Role::MigrationDestination, PROTOCOL_VERSION);
    let mut replica = MemoryImage::new(&layout());
    assert_eq!(
        s.switch_over(1, SwitchMode::Complete, &[]).unwrap_err().to_string(),
        "no established session to send a switch-over on"
    );
    connect(&mut s, &mut r, now);
    assert_eq!(
        s.switch_over(1, SwitchMode::Complete, &[]).unwrap_err().to_string(),
        "switch-over at epoch 1, but the last epoch submitted is 0"
    );
    let p = page(7);
    s.submit_baseline(now, [(1u64, &p[..])], b"").unwrap();
    let last = s.submit(now, [(2u64, &p[..])], b"state").unwrap();
    s.switch_over(last, SwitchMode::Complete, &[]).unwrap();
    pump(&mut s, &mut r, now);
    // The switch-over overtakes the last epoch's frames; the destination acts once it committed.
    let mut switch = None;
    let mut committed = Vec::new();
    while let Some(ev) = r.poll_event() {
        match ev {
            ReceiverEvent::SwitchOver(sw) => switch = Some(sw),
            ReceiverEvent::Checkpoint(cp) => {
                cp.apply(&mut replica).unwrap();
                committed.push(cp.epoch());
                r.committed(now, cp.epoch()).unwrap();
            }
            ReceiverEvent::Connected { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(committed, [1, last]);
    let sw = switch.expect("switch-over reported");
    assert_eq!((sw.epoch, sw.mode, sw.map_frames), (last, SwitchMode::Complete, 0));
    pump(&mut s, &mut r, now);
    assert!(acked(&mut s).contains(&last));
    s.handover(last).unwrap();
    pump(&mut s, &mut r, now);
    assert!(matches!(r.poll_event(), Some(ReceiverEvent::Handover { epoch }) if epoch == last));
    r.resumed(last, 1_200, 64 << 20).unwrap();
    pump(&mut s, &mut r, now);
    assert_eq!(
        s.poll_event(),
        Some(SenderEvent::Resumed(Resumed { epoch: last, cpu_us: 1_200, peak_rss_bytes: 64 << 20 }))
    );
    // A backup's receiver sends no `Resumed`; a primary's sender no switch-over.
    let mut b = receiver(Role::Backup, PROTOCOL_VERSION);
    assert!(matches!(b.resumed(1, 0, 0), Err(ReceiverError::NotMigration { role: Role::Backup })));
    let mut p = sender(Role::Primary, PROTOCOL_VERSION);
    assert_eq!(
        p.handover(1).unwrap_err().to_string(),
        "Primary sends no migration messages (only a migration source sending checkpoints does)"
    );
}

/// A cancelled migration ends the session with a `Cancelled` goodbye that the destination
/// reports as such (and never as a reason to reconnect).
#[test]
fn a_cancel_reaches_the_destination_as_cancelled() {
    let now = Instant::now();
    let mut s = sender(Role::MigrationSource, PROTOCOL_VERSION);
    let mut r = receiver(Role::MigrationDestination, PROTOCOL_VERSION);
    connect(&mut s, &mut r, now);
    s.cancel("operator asked");
    let e = sender_error(&mut s).expect("the source's session ends");
    assert!(e.is_permanent());
    pump(&mut s, &mut r, now);
    let e = receiver_error(&mut r).expect("the destination's session ends");
    assert!(
        matches!(&e, SessionError::PeerGoodbye { reason: GoodbyeReason::Cancelled, detail } if detail.contains("operator asked")),
        "{e:?}"
    );
    assert!(e.is_permanent());
}

/// A heartbeat (a datagram) that announces an epoch still arriving on the stream does not make
/// the receiver ask for it again while its frames flow: a large pre-copy round used to be sent
/// one and a half times over (found by the migration benchmark: 154 MiB on the link for 96 MiB
/// of pages).
#[test]
fn a_heartbeat_overtaking_a_large_epoch_asks_for_nothing() {
    let now = Instant::now();
    let mut s = sender(Role::MigrationSource, PROTOCOL_VERSION);
    let mut r = receiver(Role::MigrationDestination, PROTOCOL_VERSION);
    let mut replica = MemoryImage::new(&layout());
    connect(&mut s, &mut r, now);
    let pages: Vec<Vec<u8>> = (0..PAGES).map(|i| page(i as u8 * 17 + 3)).collect();
    let first = s.submit_baseline(now, pages.iter().enumerate().map(|(i, p)| (i as u64, &p[..])), b"").unwrap();
    let epoch =
        s.submit(now, pages.iter().enumerate().map(|(i, p)| (i as u64, &p[..])).rev().take(4).rev(), b"").unwrap();
    let frames: Vec<_> = std::iter::from_fn(|| s.poll_transmit(now)).collect();
    assert!(frames.len() >= 6, "{} frames", frames.len());
    // The first epoch's first frame arrives, then the heartbeat announcing the second (sent by
    // then, still on its way behind the first), then the rest. (Past the resend timeout since
    // the handshake's own request, so only the flow holds the request back.)
    let later = now + std::time::Duration::from_millis(60);
    r.handle_input(later - std::time::Duration::from_millis(1), &frames[0]);
    r.handle_input(
        later,
        &frame(&Message::Heartbeat(replication_proto::message::Heartbeat { last_sent: epoch, committed: 0 })),
    );
    let asked: Vec<_> = std::iter::from_fn(|| r.poll_transmit(later))
        .filter_map(|t| {
            let f = replication_proto::frame::decode_datagram(&t).ok()?;
            matches!(Message::decode(f.kind, &f.payload).ok()?, Message::ResendRequest(_)).then_some(())
        })
        .collect();
    assert!(asked.is_empty(), "asked for epoch {first} again while it arrived");
    for f in &frames[1..] {
        r.handle_input(later, f);
    }
    assert_eq!(commit_all(&mut r, &mut replica, later), 2);
    pump(&mut s, &mut r, later);
    assert_eq!(s.stats().frames_resent, 0);
}

/// Committing an epoch while the next one is being staged asks for nothing: the next one is on
/// its way (found by the migration benchmark: each commit during a round had the epoch being
/// received sent again). Only an epoch turned away for a full window is fetched after a commit.
#[test]
fn a_commit_during_the_next_epoch_asks_for_nothing() {
    let now = Instant::now();
    let mut s = sender(Role::MigrationSource, PROTOCOL_VERSION);
    let mut r = receiver(Role::MigrationDestination, PROTOCOL_VERSION);
    let mut replica = MemoryImage::new(&layout());
    connect(&mut s, &mut r, now);
    let pages: Vec<Vec<u8>> = (0..PAGES).map(|i| page(i as u8 * 29 + 5)).collect();
    let all = || pages.iter().enumerate().map(|(i, p)| (i as u64, &p[..]));
    s.submit_baseline(now, all(), b"").unwrap();
    let first_frames: Vec<_> = std::iter::from_fn(|| s.poll_transmit(now)).collect();
    s.submit(now, all().take(8), b"").unwrap();
    let second_frames: Vec<_> = std::iter::from_fn(|| s.poll_transmit(now)).collect();
    assert!(second_frames.len() >= 3);
    let later = now + std::time::Duration::from_millis(60);
    for f in first_frames.iter().chain(&second_frames[..1]) {
        r.handle_input(later, f);
    }
    let cps: Vec<_> = std::iter::from_fn(|| r.poll_event())
        .filter_map(|e| match e {
            ReceiverEvent::Checkpoint(c) => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(cps.len(), 1);
    cps[0].apply(&mut replica).unwrap();
    r.committed(later, cps[0].epoch()).unwrap();
    let resend = std::iter::from_fn(|| r.poll_transmit(later)).any(|t| {
        replication_proto::frame::decode_datagram(&t)
            .ok()
            .and_then(|f| Message::decode(f.kind, &f.payload).ok())
            .is_some_and(|m| matches!(m, Message::ResendRequest(_)))
    });
    assert!(!resend, "asked for the epoch being received");
    for f in &second_frames[1..] {
        r.handle_input(later, f);
    }
    assert_eq!(commit_all(&mut r, &mut replica, later), 1);
    pump(&mut s, &mut r, later);
    assert_eq!(s.stats().frames_resent, 0);
}
