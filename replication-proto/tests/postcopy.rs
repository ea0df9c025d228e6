//! The post-copy page path through the public API: demand answers overtake queued epochs and
//! pushes, pushes travel on bulk frames with a low-water signal, the destination decodes pages
//! into one contiguous buffer, tells the source what it holds after a reconnect and that it is
//! complete, and a reconnect after the switch-over asks for no baseline.

mod common;

use common::{connect, deliver, pump};
use replication_proto::frame::decode_datagram;
use replication_proto::message::Message;
use replication_proto::migration::{Complete, MAP_RANGES_PER_FRAME, PageMap, PfnRange, SwitchMode};
use replication_proto::{
    Channel, Endpoint, MemoryImage, MemoryLayout, PROTOCOL_VERSION, Receiver, ReceiverConfig, ReceiverError,
    ReceiverEvent, ReplicaMemory, Role, Sender, SenderConfig, SenderEvent, SessionError, Transmit, VmIdentity,
};
use std::time::{Duration, Instant};

const PS: usize = 4096;
const PAGES: u64 = 256;

fn vm() -> VmIdentity {
    VmIdentity { uuid: [9; 16], name: "pc".into() }
}

fn layout() -> MemoryLayout {
    MemoryLayout::flat(PS as u32, PAGES * PS as u64)
}

fn source() -> Sender {
    let mut cfg = SenderConfig::new(Role::MigrationSource, vm(), layout(), 31);
    cfg.batch_bytes = 16 << 10;
    Sender::new(cfg)
}

fn destination() -> Receiver {
    Receiver::new(ReceiverConfig::new(Role::MigrationDestination, vm(), layout(), 32))
}

/// A page that does not compress (xorshift bytes), so frames fill up.
fn page(pfn: u64) -> Vec<u8> {
    let mut x = pfn.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..PS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn memory() -> Vec<Vec<u8>> {
    (0..PAGES).map(page).collect()
}

fn kind(t: &[u8]) -> replication_proto::frame::MessageKind {
    decode_datagram(t).expect("one whole frame").kind
}

fn message(t: &[u8]) -> Message {
    let f = decode_datagram(t).expect("one whole frame");
    Message::decode(f.kind, &f.payload).expect("a message")
}

fn response_id(t: &[u8]) -> u64 {
    match message(t) {
        Message::PageResponse(p) => p.id,
        m => panic!("not a page response: {m:?}"),
    }
}

fn sender_events(s: &mut Sender) -> Vec<SenderEvent> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

fn page_maps(s: &mut Sender) -> Vec<PageMap> {
    sender_events(s)
        .into_iter()
        .filter_map(|e| match e {
            SenderEvent::PageMap(m) => Some(m),
            _ => None,
        })
        .collect()
}

fn receiver_events(r: &mut Receiver) -> Vec<ReceiverEvent> {
    std::iter::from_fn(|| r.poll_event()).collect()
}

fn commit_all(r: &mut Receiver, replica: &mut MemoryImage, now: Instant) {
    for e in receiver_events(r) {
        if let ReceiverEvent::Checkpoint(cp) = e {
            cp.apply(replica).unwrap();
            r.committed(now, cp.epoch()).unwrap();
        }
    }
}

/// Pages `pfns` of `mem`, for `send_pages`/`push_pages`.
fn pages<'a>(mem: &'a [Vec<u8>], pfns: &'a [u64]) -> impl Iterator<Item = (u64, &'a [u8])> + Clone + 'a {
    pfns.iter().map(|&p| (p, &mem[p as usize][..]))
}

/// A demand answer goes out before the rest of an epoch already being sent and before every
/// queued push; pushes go on bulk frames (id 0), everything else on the stream.
#[test]
fn a_demand_answer_overtakes_queued_pushes_and_a_queued_epoch() {
    let now = Instant::now();
    let (mut s, mut r) = (source(), destination());
    connect(&mut s, &mut r, now);
    let mem = memory();
    let all: Vec<u64> = (0..PAGES).collect();
    s.submit_baseline(now, pages(&mem, &all[..64]), b"state").unwrap();
    s.push_pages(pages(&mem, &all[64..128])).unwrap();
    assert!(s.pushes_queued() >= 8, "{} push frames", s.pushes_queued());
    // The epoch is under way: its first frame went.
    let first = s.poll_transmit(now).unwrap();
    assert_eq!(first.channel(), Channel::Stream);
    deliver(&mut r, &first, now);
    let id = r.request_pages(&[200, 201]).unwrap();
    for t in std::iter::from_fn(|| r.poll_transmit(now)).collect::<Vec<_>>() {
        deliver(&mut s, &t, now);
    }
    let asked = sender_events(&mut s).into_iter().find_map(|e| match e {
        SenderEvent::PagesRequested { id, pfns } => Some((id, pfns)),
        _ => None,
    });
    assert_eq!(asked, Some((id, vec![200, 201])));
    s.send_pages(id, pages(&mem, &[200, 201])).unwrap();

    let rest: Vec<Transmit> = std::iter::from_fn(|| s.poll_transmit(now)).collect();
    assert_eq!(rest[0].channel(), Channel::Stream);
    assert_eq!(response_id(&rest[0]), id, "the answer is the very next frame");
    let first_bulk = rest.iter().position(|t| t.channel() == Channel::Bulk).expect("pushes went");
    assert!(rest[first_bulk..].iter().all(|t| t.channel() == Channel::Bulk), "pushes go after every other frame");
    assert!(rest[..first_bulk].iter().any(|t| kind(t) == replication_proto::frame::MessageKind::EpochEnd));
    for t in &rest[first_bulk..] {
        assert_eq!(response_id(t), 0, "a push is a page response with id 0");
    }
    let stats = s.stats();
    assert_eq!((stats.pages_served, stats.pages_pushed), (2, 64));
    let bulk_bytes: u64 = rest[first_bulk..].iter().map(|t| t.len() as u64).sum();
    assert_eq!(stats.bytes_pushed, bulk_bytes);
    assert_eq!(stats.bytes_served, rest[0].len() as u64);

    // Everything arrives: the epoch whole, the answer and the pushes as pages.
    for t in &rest {
        deliver(&mut r, t, now);
    }
    let mut replica = MemoryImage::new(&layout());
    let mut got = vec![None; PAGES as usize];
    for e in receiver_events(&mut r) {
        match e {
            ReceiverEvent::Checkpoint(cp) => cp.apply(&mut replica).unwrap(),
            ReceiverEvent::Pages { id: got_id, pfns, data } => {
                assert_eq!(data.len(), pfns.len() * PS);
                for (pfn, bytes) in pfns.iter().zip(data.chunks(PS)) {
                    got[*pfn as usize] = Some((got_id, bytes.to_vec()));
                }
            }
            ReceiverEvent::Connected { .. } => {}
            e => panic!("unexpected {e:?}"),
        }
    }
    for pfn in 0..PAGES as usize {
        match pfn {
            0..64 => assert_eq!(replica.page(pfn as u64).unwrap(), &mem[pfn][..]),
            64..128 => assert_eq!(got[pfn], Some((0, mem[pfn].clone())), "pushed page {pfn}"),
            200 | 201 => assert_eq!(got[pfn], Some((id, mem[pfn].clone())), "demanded page {pfn}"),
            _ => assert_eq!(got[pfn], None),
        }
    }
}

/// `PushRoom` is reported once after each run of pushes, when sending takes the push queue to
/// the low water or under (also when it never was above: a driver counting its pushes must hear
/// the real count, or it would wait for ever); the urgent poll never takes a push.
#[test]
fn push_room_fires_once_per_run_of_pushes() {
    let now = Instant::now();
    let (mut s, mut r) = (source(), destination());
    connect(&mut s, &mut r, now);
    sender_events(&mut s);
    let mem = memory();
    for pfn in 0..6u64 {
        s.push_pages(pages(&mem, &[pfn])).unwrap();
    }
    assert_eq!(s.pushes_queued(), 6);
    assert!(s.poll_urgent_transmit(now).is_none(), "the urgent poll takes no push");
    assert_eq!(s.pushes_queued(), 6);
    let mut rooms = Vec::new();
    for _ in 0..6 {
        let t = s.poll_transmit(now).unwrap();
        assert_eq!(t.channel(), Channel::Bulk);
        for e in sender_events(&mut s) {
            if let SenderEvent::PushRoom { queued } = e {
                rooms.push((s.pushes_queued(), queued));
            }
        }
    }
    assert_eq!(rooms, [(2, 2)], "once, when the queue reached the low water of 2");
    for pfn in 6..9u64 {
        s.push_pages(pages(&mem, &[pfn])).unwrap();
    }
    s.poll_transmit(now).unwrap();
    assert_eq!(sender_events(&mut s), [SenderEvent::PushRoom { queued: 2 }], "again on the next crossing");
    // Nothing pushed since: no event while the queue drains.
    s.poll_transmit(now).unwrap();
    s.poll_transmit(now).unwrap();
    assert!(sender_events(&mut s).is_empty());
    // Under the low water from the start: the event still comes, with the real count.
    s.push_pages(pages(&mem, &[20])).unwrap();
    s.poll_transmit(now).unwrap();
    assert_eq!(sender_events(&mut s), [SenderEvent::PushRoom { queued: 0 }]);
    // A control frame still goes by the urgent poll while pushes wait.
    s.push_pages(pages(&mem, &[21])).unwrap();
    s.close(now, "done");
    assert_eq!(kind(&s.poll_urgent_transmit(now).unwrap()), replication_proto::frame::MessageKind::Goodbye);
    assert_eq!(s.pushes_queued(), 1);
    assert_eq!(s.discard_pushes(), 1);
}

/// A push arrives whole on a bulk frame and comes out as one `Pages` event whose data holds
/// the pages back to back (zero pages included); the answer to a request keeps its id.
#[test]
fn a_bulk_frame_decodes_into_contiguous_pages() {
    let now = Instant::now();
    let (mut s, mut r) = (source(), destination());
    connect(&mut s, &mut r, now);
    receiver_events(&mut r);
    let mut mem = memory();
    mem[11] = vec![0; PS];
    s.push_pages(pages(&mem, &[10, 11, 12, 40])).unwrap();
    let t = s.poll_transmit(now).unwrap();
    assert_eq!(t.channel(), Channel::Bulk);
    r.handle_frame(now, &t);
    match receiver_events(&mut r).as_slice() {
        [ReceiverEvent::Pages { id: 0, pfns, data }] => {
            assert_eq!(pfns, &[10, 11, 12, 40]);
            let want: Vec<u8> = [10, 11, 12, 40].iter().flat_map(|&p| mem[p].clone()).collect();
            assert!(data == &want, "data is the pages back to back");
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(r.stats().corrupt_frames, 0);
}

/// Only page responses travel on bulk: anything else there ends the session with an error
/// naming it (a broken peer; dropping it would stall whatever waits for it). A bulk frame with
/// a bad payload crc is counted and dropped and the session goes on. Nothing travels to a
/// sender on bulk.
#[test]
fn a_bulk_frame_that_is_not_a_page_response_ends_the_session() {
    let now = Instant::now();
    let (mut s, mut r) = (source(), destination());
    connect(&mut s, &mut r, now);
    receiver_events(&mut r);
    let mem = memory();
    s.push_pages(pages(&mem, &[1])).unwrap();
    let mut bad = s.poll_transmit(now).unwrap().into_vec();
    let last = bad.len() - 1;
    bad[last] ^= 0x40;
    r.handle_frame(now, &bad);
    assert_eq!(r.stats().corrupt_frames, 1);
    assert!(receiver_events(&mut r).is_empty(), "a corrupt bulk frame is dropped quietly");

    let mut ack = Vec::new();
    Message::Ack { epoch: 1 }.encode_frame(&mut ack);
    r.handle_frame(now, &ack);
    let errors: Vec<_> = receiver_events(&mut r)
        .into_iter()
        .filter_map(|e| match e {
            ReceiverEvent::Disconnected { error } => Some(error),
            _ => None,
        })
        .collect();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].to_string(), "peer sent Ack on a bulk stream, where only page responses travel");
    assert!(!errors[0].is_permanent());

    // To a sender: a page response on bulk is from the wrong side.
    let (mut s, mut r) = (source(), destination());
    connect(&mut s, &mut r, now);
    sender_events(&mut s);
    let mut s2 = source();
    let mut r2 = destination();
    connect(&mut s2, &mut r2, now);
    s2.push_pages(pages(&mem, &[1])).unwrap();
    let push = s2.poll_transmit(now).unwrap();
    s.handle_frame(now, &push);
    assert!(
        sender_events(&mut s)
            .iter()
            .any(|e| matches!(e, SenderEvent::Disconnected { error: SessionError::Unexpected { .. } })),
        "a sender takes no page response"
    );
    drop(r);
}

/// A push that overtakes the source's `Hello` (another QUIC stream) is held until the `Hello`
/// arrives, then reported.
#[test]
fn a_push_ahead_of_the_hello_is_held_until_it_arrives() {
    let now = Instant::now();
    let (mut s, mut r) = (source(), destination());
    s.connect(now);
    r.connect(now);
    let hello_to_r: Vec<Transmit> = std::iter::from_fn(|| s.poll_transmit(now)).collect();
    for t in std::iter::from_fn(|| r.poll_transmit(now)).collect::<Vec<_>>() {
        s.handle_input(now, &t);
    }
    sender_events(&mut s);
    let mem = memory();
    s.push_pages(pages(&mem, &[5])).unwrap();
    let push = s.poll_transmit(now).unwrap();
    assert_eq!(push.channel(), Channel::Bulk);
    r.handle_frame(now, &push);
    assert!(receiver_events(&mut r).is_empty());
    for t in &hello_to_r {
        r.handle_input(now, t);
    }
    let events = receiver_events(&mut r);
    assert!(matches!(events[0], ReceiverEvent::Connected { .. }), "{events:?}");
    assert!(matches!(&events[1], ReceiverEvent::Pages { id: 0, pfns, .. } if pfns == &[5]), "{events:?}");
}

/// A destination that reconnects during post-copy tells the source which pages it holds:
/// `PageMap` frames from the destination, reported by the sender, the last one not full.
#[test]
fn a_destination_sends_its_held_map_to_the_source() {
    let now = Instant::now();
    let (mut s, mut r) = (source(), destination());
    connect(&mut s, &mut r, now);
    sender_events(&mut s);
    let held = [PfnRange { first: 0, count: 10 }, PfnRange { first: 20, count: 1 }];
    r.send_held(3, &held).unwrap();
    pump(&mut s, &mut r, now);
    let maps = page_maps(&mut s);
    assert_eq!(maps, [PageMap { epoch: 3, seq: 0, held: held.to_vec() }]);
    assert!(maps[0].ends_held_map());
    // Holding nothing still sends one (empty, last) frame.
    r.send_held(3, &[]).unwrap();
    pump(&mut s, &mut r, now);
    assert!(matches!(&sender_events(&mut s)[..], [SenderEvent::PageMap(m)] if m.held.is_empty() && m.ends_held_map()));
    // Bad maps are refused before anything is sent.
    let bad = [
        (3, vec![PfnRange { first: 5, count: 2 }, PfnRange { first: 6, count: 1 }]),
        (3, vec![PfnRange { first: PAGES - 1, count: 2 }]),
        (3, vec![PfnRange { first: 1, count: 0 }]),
        (0, vec![PfnRange { first: 1, count: 1 }]),
    ];
    for (epoch, runs) in bad {
        assert!(matches!(r.send_held(epoch, &runs), Err(ReceiverError::BadMap { .. })), "{runs:?}");
    }
    assert!(r.poll_transmit(now).is_none());
    assert_eq!(
        ReceiverError::BadMap { first: 6, count: 1 }.to_string(),
        "map of held pages: run at page 0x6 of 1 pages is out of order or outside the layout"
    );
    // A backup has no map to send.
    let mut b = Receiver::new(ReceiverConfig::new(Role::Backup, vm(), layout(), 5));
    assert_eq!(b.send_held(3, &held), Err(ReceiverError::NotMigration { role: Role::Backup }));
    assert_eq!(
        b.complete(Complete { pages: PAGES, ..Complete::default() }),
        Err(ReceiverError::NotMigration { role: Role::Backup })
    );
}

/// A map that spans frames: every frame but the last is full, `seq` counts from 0.
#[test]
fn a_large_held_map_spans_frames() {
    let now = Instant::now();
    let big = MemoryLayout::flat(PS as u32, 4 * MAP_RANGES_PER_FRAME as u64 * PS as u64);
    let mut s = Sender::new(SenderConfig::new(Role::MigrationSource, vm(), big.clone(), 1));
    let mut r = Receiver::new(ReceiverConfig::new(Role::MigrationDestination, vm(), big, 2));
    connect(&mut s, &mut r, now);
    sender_events(&mut s);
    let runs = replication_proto::migration::runs((0..MAP_RANGES_PER_FRAME as u64 + 5).map(|i| 2 * i));
    r.send_held(7, &runs).unwrap();
    pump(&mut s, &mut r, now);
    let maps = page_maps(&mut s);
    assert_eq!(maps.iter().map(|m| (m.seq, m.held.len())).collect::<Vec<_>>(), [(0, MAP_RANGES_PER_FRAME), (1, 5)]);
    assert_eq!((maps[0].ends_held_map(), maps[1].ends_held_map()), (false, true));
    assert_eq!(maps.iter().flat_map(|m| m.held.clone()).collect::<Vec<_>>(), runs);
}

#[test]
fn complete_reaches_the_source() {
    let now = Instant::now();
    let (mut s, mut r) = (source(), destination());
    assert_eq!(r.complete(Complete { pages: PAGES, ..Complete::default() }), Err(ReceiverError::NotConnected));
    connect(&mut s, &mut r, now);
    sender_events(&mut s);
    r.complete(Complete { pages: PAGES, ..Complete::default() }).unwrap();
    pump(&mut s, &mut r, now);
    assert_eq!(sender_events(&mut s), [SenderEvent::Complete(Complete { pages: PAGES, ..Complete::default() })]);
}

/// The map given to a post-copy switch-over reaches the destination (hybrid: round 0's clean
/// pages); a map out of order or outside the layout is refused.
#[test]
fn a_post_copy_switch_over_carries_the_held_map() {
    let now = Instant::now();
    let (mut s, mut r) = (source(), destination());
    connect(&mut s, &mut r, now);
    let mem = memory();
    let epoch = s.submit_baseline(now, pages(&mem, &[0, 1, 2]), b"state").unwrap();
    let bad = [PfnRange { first: 4, count: 1 }, PfnRange { first: 2, count: 1 }];
    assert!(s.switch_over(epoch, SwitchMode::PostCopy, &bad).is_err());
    let held = [PfnRange { first: 0, count: 3 }];
    s.switch_over(epoch, SwitchMode::PostCopy, &held).unwrap();
    pump(&mut s, &mut r, now);
    let events = receiver_events(&mut r);
    let sw = events.iter().find_map(|e| match e {
        ReceiverEvent::SwitchOver(sw) => Some(*sw),
        _ => None,
    });
    let sw = sw.expect("switch-over");
    assert_eq!((sw.mode, sw.map_frames, sw.held_pages), (SwitchMode::PostCopy, 1, 3));
    assert!(events.iter().any(|e| matches!(e, ReceiverEvent::PageMap(m) if m.held == held)));
}

/// Whether `t` is a resend or resync request.
fn asks_for_epochs(t: &[u8]) -> bool {
    matches!(message(t), Message::ResendRequest(_) | Message::ResyncRequest(_))
}

/// After the switch-over of a post-copy migration the link breaks and comes back: the
/// destination asks for no epoch and no baseline, the source requires none, page requests from
/// before the break are not replayed by either core (the destination's driver asks again), and
/// requests, answers, pushes and the held map work on the new connection.
#[test]
fn a_reconnect_in_post_copy_asks_for_no_baseline() {
    let now = Instant::now();
    let (mut s, mut r) = (source(), destination());
    let mut replica = MemoryImage::new(&layout());
    connect(&mut s, &mut r, now);
    let mem = memory();
    let epoch = s.submit_baseline(now, pages(&mem, &[0, 1]), b"state").unwrap();
    s.switch_over(epoch, SwitchMode::PostCopy, &[PfnRange { first: 0, count: 2 }]).unwrap();
    pump(&mut s, &mut r, now);
    commit_all(&mut r, &mut replica, now);
    pump(&mut s, &mut r, now);
    assert_eq!(s.acked(), epoch);
    r.resumed(epoch, 0, 0).unwrap();
    pump(&mut s, &mut r, now);
    sender_events(&mut s);
    // A request in flight when the link breaks, and an answer queued for it.
    r.request_pages(&[7]).unwrap();
    pump(&mut s, &mut r, now);
    s.send_pages(1, pages(&mem, &[7])).unwrap();
    s.disconnect(now);
    r.disconnect(now);
    sender_events(&mut s);
    receiver_events(&mut r);

    let later = now + Duration::from_millis(500);
    s.connect(later);
    r.connect(later);
    let mut frames_to_source = Vec::new();
    let mut frames_to_destination = Vec::new();
    let mut t = later;
    for _ in 0..20 {
        loop {
            let a: Vec<Transmit> = std::iter::from_fn(|| s.poll_transmit(t)).collect();
            let b: Vec<Transmit> = std::iter::from_fn(|| r.poll_transmit(t)).collect();
            if a.is_empty() && b.is_empty() {
                break;
            }
            for f in &a {
                deliver(&mut r, f, t);
            }
            for f in &b {
                deliver(&mut s, f, t);
            }
            frames_to_destination.extend(a);
            frames_to_source.extend(b);
        }
        // Time passes: resend timers, heartbeats.
        t += Duration::from_millis(100);
        s.handle_timeout(t);
        r.handle_timeout(t);
    }
    assert!(
        !frames_to_source.iter().any(|f| f.channel() != Channel::Datagram && asks_for_epochs(f)),
        "the destination asked for epochs or a baseline after the reconnect"
    );
    assert!(
        !frames_to_destination.iter().any(|f| f.channel() != Channel::Datagram
            && matches!(kind(f), replication_proto::frame::MessageKind::PageResponse)),
        "an answer from before the reconnect was replayed"
    );
    let events = sender_events(&mut s);
    assert!(
        !events.iter().any(|e| matches!(e, SenderEvent::BaselineRequired { .. } | SenderEvent::PagesRequested { .. })),
        "{events:?}"
    );
    assert!(events.iter().any(|e| matches!(e, SenderEvent::Connected { resumed_from: Some(_), .. })), "{events:?}");
    let events = receiver_events(&mut r);
    assert!(!events.iter().any(|e| matches!(e, ReceiverEvent::Disconnected { .. })), "{events:?}");
    assert!(!r.needs_baseline() && !s.needs_baseline());
    assert_eq!(r.stats().resync_requests, 0);

    // The new connection carries the post-copy traffic.
    r.send_held(epoch, &[PfnRange { first: 0, count: 2 }]).unwrap();
    let id = r.request_pages(&[7]).unwrap();
    pump(&mut s, &mut r, t);
    let events = sender_events(&mut s);
    assert!(events.iter().any(|e| matches!(e, SenderEvent::PageMap(m) if m.epoch == epoch)));
    assert!(events.iter().any(|e| matches!(e, SenderEvent::PagesRequested { id: i, .. } if *i == id)));
    s.send_pages(id, pages(&mem, &[7])).unwrap();
    s.push_pages(pages(&mem, &[8])).unwrap();
    pump(&mut s, &mut r, t);
    let got: Vec<(u64, Vec<u64>)> = receiver_events(&mut r)
        .into_iter()
        .filter_map(|e| match e {
            ReceiverEvent::Pages { id, pfns, .. } => Some((id, pfns)),
            _ => None,
        })
        .collect();
    assert_eq!(got, [(id, vec![7]), (0, vec![8])]);
    assert_eq!(s.version(), PROTOCOL_VERSION);
}
