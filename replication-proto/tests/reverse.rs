//! The reverse session of a post-copy migration (issue 15): the destination checkpoints the
//! running guest back to its source, starting at the switch-over position both sides agree on
//! (`migration::reverse_start`), not at a baseline. The source holds the guest as it was at the
//! switch-over already, so the first reverse epoch carries only what the guest dirtied since.

mod common;

use common::{connect, goodbye_reason, pump, receiver_error, sender_error};
use replication_proto::message::{EpochBegin, Hello, Lineage, Message, Position};
use replication_proto::migration::{StartError, reverse_start};
use replication_proto::pageset::PageEncoding;
use replication_proto::{
    BaselineReason, Checkpoint, Endpoint, GoodbyeReason, MemoryImage, MemoryLayout, PROTOCOL_VERSION, PageContent,
    Receiver, ReceiverConfig, ReceiverEvent, ReplicaMemory, ResyncReason, Role, Sender, SenderConfig, SenderEvent,
    SessionError, SubmitError, VmIdentity,
};
use std::time::Instant;

const PS: usize = 4096;
const PAGES: u64 = 32;

fn vm() -> VmIdentity {
    VmIdentity { uuid: [9; 16], name: "reverse".into() }
}

fn layout() -> MemoryLayout {
    MemoryLayout::flat(PS as u32, PAGES * PS as u64)
}

fn page(fill: u8) -> Vec<u8> {
    (0..PS).map(|i| fill.wrapping_add((i % 251) as u8) | 1).collect()
}

/// The two endpoints of a reverse session: the destination's sender and the source's receiver.
fn reverse_pair(dest_start: Option<Position>, source_start: Option<Position>) -> (Sender, Receiver) {
    let mut dest = Sender::new(SenderConfig::new(Role::MigrationDestination, vm(), layout(), 0xd0d0));
    let mut source = Receiver::new(ReceiverConfig::new(Role::MigrationSource, vm(), layout(), 0x5050));
    if let Some(p) = dest_start {
        dest.start_at(p).unwrap();
    }
    if let Some(p) = source_start {
        source.start_at(p).unwrap();
    }
    (dest, source)
}

fn sender_events(s: &mut Sender) -> Vec<SenderEvent> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

fn receiver_events(r: &mut Receiver) -> Vec<ReceiverEvent> {
    std::iter::from_fn(|| r.poll_event()).collect()
}

fn acked(events: &[SenderEvent]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            SenderEvent::Acked { epoch, .. } => Some(*epoch),
            _ => None,
        })
        .collect()
}

/// The checkpoints among the receiver's pending events (the others are dropped).
fn checkpoints(r: &mut Receiver) -> Vec<Checkpoint> {
    receiver_events(r)
        .into_iter()
        .filter_map(|e| match e {
            ReceiverEvent::Checkpoint(cp) => Some(cp),
            _ => None,
        })
        .collect()
}

/// Applies and commits every checkpoint the receiver has; returns their epochs.
fn commit_all(r: &mut Receiver, copy: &mut MemoryImage, now: Instant) -> Vec<u64> {
    let mut epochs = Vec::new();
    for cp in checkpoints(r) {
        cp.apply(copy).unwrap_or_else(|e| panic!("{e}"));
        r.committed(now, cp.epoch()).unwrap();
        epochs.push(cp.epoch());
    }
    epochs
}

fn digest(m: &MemoryImage) -> u64 {
    replication_proto::hash::xxh64(m.as_bytes())
}

/// A post-copy switch-over at epoch 2 of a forward session: the source's memory (which the
/// source keeps: its copy of the guest), the destination's (what the guest resumed over), and
/// the position of the switch-over as each side sees it.
struct SwitchedOver {
    source_memory: MemoryImage,
    dest_memory: MemoryImage,
    source_sees: Position,
    dest_sees: Position,
}

fn forward_switch_over(now: Instant) -> SwitchedOver {
    let mut source = Sender::new(SenderConfig::new(Role::MigrationSource, vm(), layout(), 0x50));
    let mut dest = Receiver::new(ReceiverConfig::new(Role::MigrationDestination, vm(), layout(), 0xd0));
    connect(&mut source, &mut dest, now);
    let mut source_memory = MemoryImage::new(&layout());
    for pfn in 0..PAGES {
        if pfn % 5 != 4 {
            source_memory.page_mut(pfn).unwrap().copy_from_slice(&page(pfn as u8));
        }
    }
    let all: Vec<(u64, Vec<u8>)> = (0..PAGES).map(|p| (p, source_memory.page(p).unwrap().to_vec())).collect();
    source.submit_baseline(now, all.iter().map(|(p, d)| (*p, &d[..])), b"").unwrap();
    // The last round, with the guest paused: its dirty pages and the state.
    source_memory.page_mut(3).unwrap().copy_from_slice(&page(200));
    let last = source.submit(now, [(3u64, source_memory.page(3).unwrap())], b"vm state at N").unwrap();
    assert_eq!(last, 2);
    let mut dest_memory = MemoryImage::new(&layout());
    pump(&mut source, &mut dest, now);
    assert_eq!(commit_all(&mut dest, &mut dest_memory, now), [1, 2]);
    pump(&mut source, &mut dest, now);
    assert_eq!(dest_memory, source_memory);
    let source_sees = Position { lineage: source.lineage().unwrap(), epoch: last };
    let dest_sees = dest.delivered_epoch().unwrap();
    SwitchedOver { source_memory, dest_memory, source_sees, dest_sees }
}

/// A reverse session started at a switch-over and connected, with the memories on both sides.
struct Started {
    dest: Sender,
    source: Receiver,
    dest_memory: MemoryImage,
    copy: MemoryImage,
}

fn started(now: Instant) -> Started {
    let sw = forward_switch_over(now);
    let start = reverse_start(sw.dest_sees);
    let (mut dest, mut source) = reverse_pair(Some(start), Some(start));
    connect(&mut dest, &mut source, now);
    sender_events(&mut dest);
    Started { dest, source, dest_memory: sw.dest_memory, copy: sw.source_memory }
}

/// The destination dirties `pages` of its memory (the running guest) and submits them as the
/// next reverse epoch; returns its number.
fn guest_epoch(dest: &mut Sender, mem: &mut MemoryImage, pages: &[(u64, Vec<u8>)], now: Instant) -> u64 {
    for (pfn, data) in pages {
        mem.page_mut(*pfn).unwrap().copy_from_slice(data);
    }
    let dirty: Vec<(u64, &[u8])> = pages.iter().map(|(p, _)| (*p, mem.page(*p).unwrap())).collect();
    dest.submit(now, dirty, b"vm state").unwrap()
}

/// Both sides compute the same starting position from the switch-over, with no round trip; the
/// destination's sender starts there without a baseline; epochs N+1, N+2 carry only the pages
/// the guest dirtied, apply over the source's own memory and are acknowledged; the source's copy
/// then equals the destination's memory. The first reverse epoch refers to nothing the series
/// did not send (no dedup, delta or unchanged against the switch-over's pages), later ones may.
#[test]
fn a_reverse_series_starts_at_the_switch_over_without_a_baseline() {
    let now = Instant::now();
    let sw = forward_switch_over(now);
    assert_eq!(sw.source_sees, sw.dest_sees);
    let start = reverse_start(sw.dest_sees);
    assert_eq!(start, reverse_start(sw.source_sees));
    assert_eq!((start.epoch, start.lineage.baseline), (2, 2));
    assert_ne!(start.lineage, sw.dest_sees.lineage, "the reverse series is not the forward one");
    assert_ne!(start, reverse_start(Position { epoch: 3, ..sw.dest_sees }), "another switch-over, another series");

    let (mut dest, mut source) = reverse_pair(Some(start), Some(start));
    assert!(!dest.needs_baseline() && !source.needs_baseline());
    assert_eq!((dest.next_epoch(), dest.lineage(), dest.start()), (3, Some(start.lineage), Some(start)));
    assert_eq!(
        (source.committed_epoch(), source.delivered_epoch(), source.start()),
        (Some(start), Some(start), Some(start))
    );
    assert!(
        !sender_events(&mut dest).iter().any(|e| matches!(e, SenderEvent::BaselineRequired { .. })),
        "a started sender needs no baseline"
    );
    connect(&mut dest, &mut source, now);
    let connected = sender_events(&mut dest);
    assert!(
        matches!(&connected[..], [SenderEvent::Connected { resumed_from: Some(3), peer }] if peer.start == Some(start)),
        "{connected:?}"
    );
    assert!(receiver_events(&mut source).iter().all(|e| matches!(e, ReceiverEvent::Connected { .. })));

    let mut dest_memory = sw.dest_memory.clone();
    let mut copy = sw.source_memory.clone();
    // Epoch 3: page 7 now holds what page 1 held at the switch-over (the source holds it, but
    // this series never sent it: no reference to it), page 4 was zero, page 9 is new content.
    let first = vec![(4u64, page(90)), (7, page(1)), (9, page(91))];
    assert_eq!(guest_epoch(&mut dest, &mut dest_memory, &first, now), 3);
    pump(&mut dest, &mut source, now);
    let cps = checkpoints(&mut source);
    assert_eq!(cps.len(), 1);
    let cp = &cps[0];
    assert_eq!((cp.epoch(), cp.lineage(), cp.is_baseline(), cp.state()), (3, start.lineage, false, &b"vm state"[..]));
    assert_eq!(cp.page_count(), 3, "only the dirtied pages");
    assert!(
        cp.pages().all(|p| matches!(p.content, PageContent::Full(_) | PageContent::Zero)),
        "the first reverse epoch is self-contained"
    );
    cp.apply(&mut copy).unwrap();
    source.committed(now, 3).unwrap();
    pump(&mut dest, &mut source, now);
    assert_eq!(acked(&sender_events(&mut dest)), [3]);
    assert_eq!(digest(&copy), digest(&dest_memory));

    // Epoch 4: page 4 changes a little (a delta on what epoch 3 sent), page 10 takes page 9's
    // content (sent in this series: a reference).
    let mut four = dest_memory.page(4).unwrap().to_vec();
    four[100] ^= 0xff;
    let second = vec![(4u64, four), (10, page(91))];
    assert_eq!(guest_epoch(&mut dest, &mut dest_memory, &second, now), 4);
    assert_eq!(guest_epoch(&mut dest, &mut dest_memory, &[(0, page(77))], now), 5);
    pump(&mut dest, &mut source, now);
    assert_eq!(commit_all(&mut source, &mut copy, now), [4, 5]);
    pump(&mut dest, &mut source, now);
    assert_eq!(acked(&sender_events(&mut dest)), [4, 5]);
    assert_eq!(digest(&copy), digest(&dest_memory));
    assert_eq!(copy, dest_memory);
    let by = dest.stats().pages_by_encoding;
    assert_eq!(by[PageEncoding::Dedup as usize], 1, "page 10 refers to page 9, sent in epoch 3");
    assert_eq!(by[PageEncoding::Delta as usize], 1, "page 4 is a delta on epoch 3's copy");
    assert_eq!(source.stats().resync_requests, 0);
}

/// A sender that starts at another position (another switch-over), a receiver told none, and a
/// peer without reverse sessions (its `Hello` carries no start): refused for good on both sides,
/// naming both positions; never a delta applied against a base the receiver does not hold.
#[test]
fn a_sender_starting_elsewhere_is_refused() {
    let now = Instant::now();
    let fwd = Position { lineage: Lineage { origin: 0x50, baseline: 1 }, epoch: 2 };
    let here = reverse_start(fwd);
    let there = reverse_start(Position { epoch: 5, ..fwd });
    let cases = [(Some(there), Some(here)), (Some(here), None), (None, Some(here))];
    for (dest_start, source_start) in cases {
        let (mut dest, mut source) = reverse_pair(dest_start, source_start);
        connect(&mut dest, &mut source, now);
        let se = sender_error(&mut dest).unwrap_or_else(|| panic!("{dest_start:?} / {source_start:?}: accepted"));
        let re = receiver_error(&mut source).expect("the receiver refuses too");
        assert_eq!(se, SessionError::Start { ours: dest_start, peer: source_start });
        assert_eq!(re, SessionError::Start { ours: source_start, peer: dest_start });
        assert!(se.is_permanent() && re.is_permanent());
        assert_eq!(source.stats().checkpoints, 0);
    }
    let at = |p: Position| format!("epoch {} of lineage {:#x}/{}", p.epoch, p.lineage.origin, p.lineage.baseline);
    assert_eq!(
        SessionError::Start { ours: Some(here), peer: Some(there) }.to_string(),
        format!("peer starts the series at {}, we at {}: not the same switch-over", at(there), at(here))
    );
    assert_eq!(
        SessionError::Start { ours: None, peer: Some(here) }.to_string(),
        format!("peer starts the series at {}, we were told no starting position", at(here))
    );

    // A build without reverse sessions reads our Hello without the start (a tail it ignores) and
    // sends one without: the started sender refuses it, saying why, with a Mismatch goodbye.
    let (mut dest, _) = reverse_pair(Some(here), None);
    dest.connect(now);
    while dest.poll_transmit(now).is_some() {}
    dest.handle_input(now, &frame(&Message::Hello(source_hello(None))));
    let last = std::iter::from_fn(|| dest.poll_transmit(now)).last().unwrap();
    assert_eq!(goodbye_reason(&last), Some(GoodbyeReason::Mismatch));
    let e = sender_error(&mut dest).unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "peer announces no starting position, we start the series at {} (a peer without reverse sessions, or \
             not told the switch-over)",
            at(here)
        )
    );

    // A receiver never told a position, whose sender did not announce one either (a session
    // that must start with a baseline), stages no delta of a series it does not hold.
    let (_, mut source) = reverse_pair(None, None);
    source.connect(now);
    source.handle_input(now, &frame(&Message::Hello(Hello { high_water: 3, ..dest_hello(None) })));
    let begin = EpochBegin { epoch: 3, lineage: here.lineage, baseline: false, page_count: 0, state_len: 0 };
    source.handle_input(now, &frame(&Message::EpochBegin(begin)));
    source.handle_input(
        now,
        &frame(&Message::EpochEnd(replication_proto::message::EpochEnd {
            epoch: 3,
            frames: 0,
            page_count: 0,
            state_len: 0,
            checksum: crc32_empty(),
            digest: 0,
        })),
    );
    assert!(!receiver_events(&mut source).iter().any(|e| matches!(e, ReceiverEvent::Checkpoint(_))));
    assert!(source.needs_baseline() && source.delivered_epoch().is_none());
    let asked: Vec<_> = std::iter::from_fn(|| source.poll_transmit(now)).collect();
    assert!(asked.iter().any(|t| is_request(t)), "it asks for what it lacks instead");
}

fn crc32_empty() -> u32 {
    crc32fast::hash(&[])
}

fn is_request(t: &[u8]) -> bool {
    let Ok(f) = replication_proto::frame::decode_datagram(t) else {
        return false;
    };
    matches!(Message::decode(f.kind, &f.payload), Ok(Message::ResyncRequest(_) | Message::ResendRequest(_)))
}

fn frame(m: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    m.encode_frame(&mut out);
    out
}

/// The Hello of a crafted peer of `role` (which sends checkpoints when `sends`).
fn crafted_hello(role: Role, sends: bool, start: Option<Position>) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        min_version: 1,
        role,
        instance: 0x77,
        vm: vm(),
        layout: layout(),
        window: 4,
        committed: None,
        delivered: None,
        high_water: 0,
        session: 1,
        sends_checkpoints: sends,
        start,
        inbound_log: false,
        side_copy_port: None,
        output_log: false,
    }
}

fn dest_hello(start: Option<Position>) -> Hello {
    crafted_hello(Role::MigrationDestination, true, start)
}

fn source_hello(start: Option<Position>) -> Hello {
    crafted_hello(Role::MigrationSource, false, start)
}

/// The link breaks mid-series: an epoch delivered and committed whose ack was lost, one
/// delivered and not committed, one never sent. The next connection resumes after the last
/// delivered epoch with no baseline (the receiver still holds the lineage), and the commit the
/// receiver's Hello reports counts as the lost ack at once.
#[test]
fn a_reconnect_resumes_the_reverse_series_without_a_baseline() {
    let now = Instant::now();
    let Started { mut dest, mut source, mut dest_memory, mut copy } = started(now);
    assert_eq!(guest_epoch(&mut dest, &mut dest_memory, &[(1, page(11))], now), 3);
    assert_eq!(guest_epoch(&mut dest, &mut dest_memory, &[(2, page(12))], now), 4);
    // Epochs 3 and 4 reach the source; it commits 3, and the ack is lost with the link.
    while let Some(t) = dest.poll_transmit(now) {
        source.handle_input(now, &t);
    }
    let cps = checkpoints(&mut source);
    assert_eq!(cps.iter().map(|c| c.epoch()).collect::<Vec<_>>(), [3, 4]);
    cps[0].apply(&mut copy).unwrap();
    source.committed(now, 3).unwrap();
    while source.poll_transmit(now).is_some() {}
    dest.disconnect(now);
    source.disconnect(now);
    sender_events(&mut dest);
    receiver_events(&mut source);
    assert_eq!(guest_epoch(&mut dest, &mut dest_memory, &[(5, page(15)), (6, page(16))], now), 5);

    connect(&mut dest, &mut source, now);
    let events = sender_events(&mut dest);
    assert!(!events.iter().any(|e| matches!(e, SenderEvent::BaselineRequired { .. })), "{events:?}");
    assert!(
        events.iter().any(|e| matches!(e, SenderEvent::Connected { resumed_from: Some(5), .. })),
        "resumes after the delivered epoch 4: {events:?}"
    );
    assert_eq!(acked(&events), [3], "the receiver's Hello reports its commit of 3");
    // Epoch 4, handed over before the break, is committed now; 5 came on the new connection.
    cps[1].apply(&mut copy).unwrap();
    source.committed(now, 4).unwrap();
    assert_eq!(commit_all(&mut source, &mut copy, now), [5]);
    pump(&mut dest, &mut source, now);
    assert_eq!(acked(&sender_events(&mut dest)), [4, 5]);
    assert_eq!(copy, dest_memory);
    assert_eq!((dest.stats().resyncs, source.stats().resync_requests), (0, 0));
    assert_eq!(dest.stats().frames_resent, 0, "nothing the source had was sent again");
}

/// The source's copy is not the base the destination encodes against any more (here a page of
/// it changed behind the protocol's back): the next epoch that builds on it does not verify, the
/// source rejects it and asks for a baseline, and the destination is told it needs one
/// (`BaselineRequired`, which a destination in post-copy cannot give before it holds every page).
/// A baseline, when one comes, starts a new lineage the source accepts; the session goes on.
#[test]
fn a_source_that_lost_the_base_asks_for_a_baseline() {
    let now = Instant::now();
    let Started { mut dest, mut source, mut dest_memory, mut copy } = started(now);
    guest_epoch(&mut dest, &mut dest_memory, &[(8, page(80))], now);
    pump(&mut dest, &mut source, now);
    assert_eq!(commit_all(&mut source, &mut copy, now), [3]);
    pump(&mut dest, &mut source, now);
    assert_eq!(acked(&sender_events(&mut dest)), [3]);

    copy.page_mut(8).unwrap()[0] ^= 0x40;
    let mut eight = dest_memory.page(8).unwrap().to_vec();
    eight[2000] ^= 1;
    assert_eq!(guest_epoch(&mut dest, &mut dest_memory, &[(8, eight)], now), 4);
    pump(&mut dest, &mut source, now);
    let cp = checkpoints(&mut source).remove(0);
    assert!(cp.apply(&mut copy).is_err(), "a delta on a page the copy no longer holds does not verify");
    source.reject(now, 4).unwrap();
    assert!(source.needs_baseline());
    pump(&mut dest, &mut source, now);
    let events = sender_events(&mut dest);
    assert!(
        events.contains(&SenderEvent::BaselineRequired { reason: BaselineReason::Requested(ResyncReason::Rejected) }),
        "{events:?}"
    );
    assert!(matches!(dest.submit(now, [(8u64, &page(1)[..])], b""), Err(SubmitError::BaselineRequired { next: 5 })));
    // A reconnect does not change that: the source holds no position to resume from.
    dest.disconnect(now);
    source.disconnect(now);
    receiver_events(&mut source);
    connect(&mut dest, &mut source, now);
    assert!(sender_events(&mut dest).iter().any(|e| matches!(e, SenderEvent::Connected { resumed_from: None, .. })));
    assert!(receiver_error(&mut source).is_none(), "the starts still agree: the session stands");

    // Once the destination holds every page (post-copy over), a baseline mends it.
    let all: Vec<(u64, Vec<u8>)> = (0..PAGES).map(|p| (p, dest_memory.page(p).unwrap().to_vec())).collect();
    let b = dest.submit_baseline(now, all.iter().map(|(p, d)| (*p, &d[..])), b"vm state").unwrap();
    assert_eq!(b, 5);
    pump(&mut dest, &mut source, now);
    assert_eq!(commit_all(&mut source, &mut copy, now), [5]);
    pump(&mut dest, &mut source, now);
    assert_eq!(acked(&sender_events(&mut dest)), [5]);
    assert_eq!(copy, dest_memory);
    assert_eq!(source.delivered_epoch().unwrap().lineage, Lineage { origin: 0xd0d0, baseline: 5 });
}

/// Only a reverse session starts at an agreed position: the destination that sends and the
/// source that receives may be told one (before connecting, with a sane epoch), no other role;
/// and a `Hello` that announces one in any other pairing (a primary, a backup, a forward source)
/// is refused for good, naming the peer, with a `Mismatch` goodbye. The reverse pairing with a
/// start is accepted.
#[test]
fn only_a_reverse_session_starts_at_a_position() {
    let now = Instant::now();
    let start = reverse_start(Position { lineage: Lineage { origin: 1, baseline: 1 }, epoch: 4 });
    for role in [Role::Primary, Role::MigrationSource] {
        let mut s = Sender::new(SenderConfig::new(role, vm(), layout(), 1));
        assert_eq!(s.start_at(start), Err(StartError::Role { role, side: "sending checkpoints" }));
        assert!(s.needs_baseline() && s.start().is_none());
    }
    for role in [Role::Backup, Role::MigrationDestination] {
        let mut r = Receiver::new(ReceiverConfig::new(role, vm(), layout(), 2));
        assert_eq!(r.start_at(start), Err(StartError::Role { role, side: "receiving checkpoints" }));
        assert!(r.needs_baseline() && r.start().is_none());
    }
    assert_eq!(
        StartError::Role { role: Role::Primary, side: "sending checkpoints" }.to_string(),
        "a primary sending checkpoints does not start at an agreed position (only a reverse session does: a \
         migration destination sends, its source receives)"
    );
    let (mut dest, mut source) = reverse_pair(None, None);
    for bad in [Position { epoch: 0, ..start }, Position { epoch: 3, ..start }, Position { epoch: 1 << 63, ..start }] {
        assert!(matches!(dest.start_at(bad), Err(StartError::Epoch { .. })), "{bad:?}");
        assert!(matches!(source.start_at(bad), Err(StartError::Epoch { .. })), "{bad:?}");
    }
    connect(&mut dest, &mut source, now);
    assert_eq!(dest.start_at(start), Err(StartError::Begun { what: "connected" }));
    assert_eq!(source.start_at(start), Err(StartError::Begun { what: "connected" }));
    let mut s = Sender::new(SenderConfig::new(Role::MigrationDestination, vm(), layout(), 1));
    s.submit_baseline(now, [(0u64, &page(1)[..])], b"").unwrap();
    assert_eq!(s.start_at(start), Err(StartError::Begun { what: "a checkpoint was submitted" }));

    // The reverse pairing with a start: accepted.
    let (mut dest, mut source) = reverse_pair(Some(start), Some(start));
    connect(&mut dest, &mut source, now);
    assert!(sender_error(&mut dest).is_none() && receiver_error(&mut source).is_none());
    assert_eq!(dest.version(), PROTOCOL_VERSION);

    // A start announced by a peer in any other pairing.
    let receivers = [
        (Role::Backup, crafted_hello(Role::Primary, true, Some(start)), Role::Primary, true),
        (
            Role::MigrationDestination,
            crafted_hello(Role::MigrationSource, true, Some(start)),
            Role::MigrationSource,
            true,
        ),
    ];
    for (ours, hello, peer, peer_sends) in receivers {
        let mut r = Receiver::new(ReceiverConfig::new(ours, vm(), layout(), 2));
        r.connect(now);
        r.handle_input(now, &frame(&Message::Hello(hello)));
        let last = std::iter::from_fn(|| r.poll_transmit(now)).last().unwrap();
        assert_eq!(goodbye_reason(&last), Some(GoodbyeReason::Mismatch));
        let e = receiver_error(&mut r).unwrap();
        assert_eq!(e, SessionError::StartRole { peer, peer_sends });
        assert!(e.is_permanent());
    }
    let senders = [
        (Role::Primary, crafted_hello(Role::Backup, false, Some(start)), Role::Backup),
        (
            Role::MigrationSource,
            crafted_hello(Role::MigrationDestination, false, Some(start)),
            Role::MigrationDestination,
        ),
    ];
    for (ours, hello, peer) in senders {
        let mut s = Sender::new(SenderConfig::new(ours, vm(), layout(), 1));
        s.connect(now);
        s.handle_input(now, &frame(&Message::Hello(hello)));
        let e = sender_error(&mut s).unwrap();
        assert_eq!(e, SessionError::StartRole { peer, peer_sends: false });
        assert!(e.is_permanent());
    }
    assert_eq!(
        SessionError::StartRole { peer: Role::Primary, peer_sends: true }.to_string(),
        "peer (primary, sending checkpoints) announces a starting position: only a reverse session (a migration \
         destination sending checkpoints to its source) starts at one"
    );
    // A started destination's Hello reaching a source that waits for a baseline is the
    // mismatch above, not a role error: the pairing is right, the positions differ.
    let mut r = Receiver::new(ReceiverConfig::new(Role::MigrationSource, vm(), layout(), 2));
    r.connect(now);
    r.handle_input(now, &frame(&Message::Hello(dest_hello(Some(start)))));
    assert_eq!(receiver_error(&mut r), Some(SessionError::Start { ours: None, peer: Some(start) }));
}

/// A source that resumed the guest from a reverse checkpoint answers the destination's reverse
/// session (a reconnect after a partition) with a `Superseded` goodbye, both while the
/// destination's `Hello` is still on its way and on an established session: the destination's
/// sender ends with that reason, permanent (reconnecting cannot help: its copy must stop), and
/// the source acknowledges nothing after it.
#[test]
fn a_source_that_resumed_supersedes_the_destination() {
    let now = Instant::now();
    let Started { mut dest, mut source, mut dest_memory, .. } = started(now);
    assert_eq!(guest_epoch(&mut dest, &mut dest_memory, &[(1, page(21))], now), 3);
    // Epoch 3 reaches the source, which resumes instead of committing it.
    while let Some(t) = dest.poll_transmit(now) {
        source.handle_input(now, &t);
    }
    source.supersede("the source resumed the guest from reverse checkpoint 2");
    let sent: Vec<_> = std::iter::from_fn(|| source.poll_transmit(now)).collect();
    assert_eq!(sent.iter().filter_map(|t| goodbye_reason(t)).collect::<Vec<_>>(), [GoodbyeReason::Superseded]);
    let _ = source.committed(now, 3);
    assert!(source.poll_transmit(now).is_none(), "no ack after the goodbye");
    for t in &sent {
        dest.handle_input(now, t);
    }
    let events = sender_events(&mut dest);
    assert!(acked(&events).is_empty(), "nothing acknowledged: {events:?}");
    let error = events
        .iter()
        .find_map(|e| match e {
            SenderEvent::Disconnected { error } => Some(error.clone()),
            _ => None,
        })
        .expect("the destination's session ends");
    assert!(
        matches!(&error, SessionError::PeerGoodbye { reason: GoodbyeReason::Superseded, detail } if detail.contains("reverse checkpoint 2")),
        "{error:?}"
    );
    assert!(error.is_permanent());

    // A new connection (the destination dials again after the partition healed): the source's
    // answer is the same goodbye, even before the handshake completed.
    let start = source.start().unwrap();
    let (mut dest2, mut source2) = reverse_pair(Some(start), Some(start));
    dest2.connect(now);
    source2.connect(now);
    source2.supersede("superseded");
    while let Some(t) = source2.poll_transmit(now) {
        dest2.handle_input(now, &t);
    }
    assert!(
        matches!(sender_error(&mut dest2), Some(SessionError::PeerGoodbye { reason: GoodbyeReason::Superseded, .. })),
        "a destination whose Hello is on its way learns it too"
    );
}
