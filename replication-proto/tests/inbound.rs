//! The inbound log's messages: a primary forwards delivered frames only to a backup that
//! announced a log, in order, ahead of checkpoint data; an older backup (no flag) gets none and
//! the session goes on; a backup without a log drops frames a peer sends anyway.

mod common;

use common::{connect, first_hello, pump};
use replication_proto::message::{Hello, InboundFrame, Message};
use replication_proto::{
    Endpoint, InboundError, MemoryLayout, Receiver, ReceiverConfig, ReceiverEvent, Role, Sender, SenderConfig,
    VmIdentity,
};
use std::time::Instant;

const PS: usize = 4096;

fn vm() -> VmIdentity {
    VmIdentity { uuid: [3; 16], name: "inbound".into() }
}

fn layout() -> MemoryLayout {
    MemoryLayout::flat(PS as u32, 8 * PS as u64)
}

fn pair(log: bool) -> (Sender, Receiver) {
    let mut rcfg = ReceiverConfig::new(Role::Backup, vm(), layout(), 22);
    rcfg.inbound_log = log;
    (Sender::new(SenderConfig::new(Role::Primary, vm(), layout(), 11)), Receiver::new(rcfg))
}

enum Got {
    Frame(u64, u64, Vec<u8>),
    Committed(u64),
    Checkpoint(u64),
}

fn events(r: &mut Receiver) -> Vec<Got> {
    std::iter::from_fn(|| r.poll_event())
        .filter_map(|e| match e {
            ReceiverEvent::Inbound(f) => Some(Got::Frame(f.epoch, f.seq, f.frame)),
            ReceiverEvent::InboundCommitted { epoch } => Some(Got::Committed(epoch)),
            ReceiverEvent::Checkpoint(c) => Some(Got::Checkpoint(c.epoch())),
            _ => None,
        })
        .collect()
}

#[test]
fn frames_reach_a_logging_backup_in_order_with_their_tags() {
    let (mut s, mut r) = pair(true);
    let now = Instant::now();
    assert_eq!(s.send_inbound(1, 1, b"early"), Err(InboundError::NotConnected));
    connect(&mut s, &mut r, now);
    assert!(s.peer_keeps_inbound_log());
    let page = vec![7u8; PS];
    s.submit_baseline(now, [(0u64, &page[..])], b"state").unwrap();
    // Frames of the epoch running after harvest 1, then the commit of harvest 1 reported.
    s.send_inbound(2, 10, b"request-a").unwrap();
    s.send_inbound(2, 11, b"request-b").unwrap();
    s.send_inbound_committed(1).unwrap();
    s.send_inbound(3, 12, b"request-c").unwrap();
    pump(&mut s, &mut r, now);
    let got = events(&mut r);
    let frames: Vec<(u64, u64, Vec<u8>)> = got
        .iter()
        .filter_map(|g| match g {
            Got::Frame(e, q, f) => Some((*e, *q, f.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        frames,
        vec![(2, 10, b"request-a".to_vec()), (2, 11, b"request-b".to_vec()), (3, 12, b"request-c".to_vec())]
    );
    // The commit notice comes between the frames it was sent between.
    let order: Vec<String> = got
        .iter()
        .map(|g| match g {
            Got::Frame(_, q, _) => format!("f{q}"),
            Got::Committed(e) => format!("c{e}"),
            Got::Checkpoint(e) => format!("cp{e}"),
        })
        .filter(|s| !s.starts_with("cp"))
        .collect();
    assert_eq!(order, ["f10", "f11", "c1", "f12"]);
    // Inbound frames are control messages: they overtake checkpoint data still queued, so a
    // request reaches the backup at once even behind a large checkpoint.
    assert!(got.iter().any(|g| matches!(g, Got::Checkpoint(1))));
}

#[test]
fn an_older_backup_gets_no_frames_and_the_session_goes_on() {
    // A backup of a build without the log announces none (its Hello has no flag bit 2).
    let (mut s, mut r) = pair(false);
    let now = Instant::now();
    connect(&mut s, &mut r, now);
    assert!(!s.peer_keeps_inbound_log());
    assert_eq!(s.send_inbound(2, 1, b"x"), Err(InboundError::Unsupported));
    assert_eq!(s.send_inbound_committed(1), Err(InboundError::Unsupported));
    let page = vec![1u8; PS];
    s.submit_baseline(now, [(0u64, &page[..])], b"s").unwrap();
    pump(&mut s, &mut r, now);
    let got = events(&mut r);
    assert!(matches!(got[..], [Got::Checkpoint(1)]));
}

#[test]
fn a_backup_without_a_log_drops_frames_sent_anyway() {
    let (mut s, mut r) = pair(false);
    let now = Instant::now();
    connect(&mut s, &mut r, now);
    // A peer that ignores the missing flag: the frame is dropped, the session stays up.
    let mut bytes = Vec::new();
    Message::Inbound(InboundFrame { epoch: 2, seq: 1, frame: b"x".to_vec() }).encode_frame(&mut bytes);
    r.handle_input(now, &bytes);
    assert!(events(&mut r).is_empty());
    assert_eq!(r.link_state(), replication_proto::LinkState::Established);
}

#[test]
fn frames_and_the_flag_round_trip_and_bad_ones_are_refused() {
    for m in [
        Message::Inbound(InboundFrame { epoch: 0, seq: 1, frame: vec![0xaa; 60] }),
        Message::Inbound(InboundFrame { epoch: 9, seq: u64::MAX, frame: vec![1; 65536] }),
        Message::InboundCommitted { epoch: 42 },
    ] {
        let mut p = Vec::new();
        m.encode_payload(&mut p);
        assert_eq!(Message::decode(m.kind(), &p).unwrap(), m);
    }
    let bad = |m: Message| {
        let mut p = Vec::new();
        m.encode_payload(&mut p);
        Message::decode(m.kind(), &p).is_err()
    };
    assert!(bad(Message::Inbound(InboundFrame { epoch: 1, seq: 0, frame: vec![1] })), "seq 0");
    assert!(bad(Message::Inbound(InboundFrame { epoch: 1, seq: 1, frame: vec![] })), "empty frame");
    assert!(bad(Message::Inbound(InboundFrame { epoch: 1, seq: 1, frame: vec![1; 65537] })), "too long");
    // The Hello flag survives a round trip (a backup's own Hello, with and without a log);
    // version 1 has no flags byte, so no log.
    let hello = |log: bool| first_hello(&mut pair(log).1);
    assert!(hello(true).inbound_log);
    assert!(!hello(false).inbound_log);
    let mut p = Vec::new();
    Message::Hello(Hello { version: 1, ..hello(true) }).encode_payload(&mut p);
    let Message::Hello(h) = Message::decode(replication_proto::frame::MessageKind::Hello, &p).unwrap() else {
        panic!("a hello")
    };
    assert!(!h.inbound_log);
}

#[test]
fn a_long_backlog_refuses_frames_instead_of_growing() {
    let (mut s, mut r) = pair(true);
    let now = Instant::now();
    connect(&mut s, &mut r, now);
    let mut refused = 0;
    for seq in 1..=(replication_proto::sender::MAX_INBOUND_BACKLOG as u64 + 10) {
        if let Err(e) = s.send_inbound(1, seq, &[0u8; 64]) {
            assert!(matches!(e, InboundError::Backlog { .. }), "{e}");
            refused += 1;
        }
    }
    assert_eq!(refused, 10);
    // Once the transport took the queue, frames go again.
    pump(&mut s, &mut r, now);
    s.send_inbound(1, 5000, &[0u8; 64]).unwrap();
}

/// The backup's `Hello` as the sender's `Connected` reports it.
fn connected_peer(s: &mut Sender) -> Box<Hello> {
    std::iter::from_fn(|| s.poll_event())
        .find_map(|e| match e {
            replication_proto::SenderEvent::Connected { peer, .. } => Some(peer),
            _ => None,
        })
        .expect("connected")
}

/// The side-copy port (flags bit 3) reaches the primary with the backup's `Hello`, only beside an
/// inbound log, and rides as a tail an older version 2 build ignores: the same `Hello` without
/// the port is a prefix of it (flags bit 3 aside), so such a build decodes it as a `Hello`
/// without one and never sends side copies.
#[test]
fn the_side_copy_port_reaches_the_primary_and_older_builds_ignore_it() {
    let now = Instant::now();
    let mut rcfg = ReceiverConfig::new(Role::Backup, vm(), layout(), 22);
    rcfg.inbound_log = true;
    rcfg.side_copy_port = Some(40_123);
    let mut s = Sender::new(SenderConfig::new(Role::Primary, vm(), layout(), 11));
    let mut r = Receiver::new(rcfg.clone());
    connect(&mut s, &mut r, now);
    let peer = connected_peer(&mut s);
    assert_eq!(peer.side_copy_port, Some(40_123));
    // Without a log no port is announced (side copies only feed the log).
    rcfg.inbound_log = false;
    let mut s = Sender::new(SenderConfig::new(Role::Primary, vm(), layout(), 11));
    let mut r = Receiver::new(rcfg);
    connect(&mut s, &mut r, now);
    let peer = connected_peer(&mut s);
    assert_eq!(peer.side_copy_port, None);
    // The wire: the port is the last two bytes, after everything an older build reads.
    let (_, mut r) = pair(true);
    r.connect(now);
    let t = r.poll_transmit(now).expect("a hello");
    let mut d = replication_proto::frame::FrameDecoder::new();
    d.push(t.as_slice());
    let f = d.next_frame().unwrap().expect("a whole frame");
    let Message::Hello(h) = Message::decode(f.kind, &f.payload).unwrap() else { panic!("a hello") };
    let (mut with, mut without) = (Vec::new(), Vec::new());
    Message::Hello(Hello { side_copy_port: Some(0x1234), ..h.clone() }).encode_payload(&mut with);
    Message::Hello(Hello { side_copy_port: None, ..h.clone() }).encode_payload(&mut without);
    assert_eq!(with.len(), without.len() + 2);
    assert_eq!(&with[with.len() - 2..], &0x1234u16.to_le_bytes());
    let flags_at = without.len() - 1;
    assert_eq!(with[flags_at], without[flags_at] | 8, "flags bit 3");
    assert_eq!(&with[..flags_at], &without[..flags_at]);
    let Message::Hello(back) = Message::decode(f.kind, &with).unwrap() else { panic!("a hello") };
    assert_eq!(back.side_copy_port, Some(0x1234));
    // Port 0 is refused.
    let mut zero = without.clone();
    zero[flags_at] |= 8;
    zero.extend_from_slice(&[0, 0]);
    assert!(Message::decode(f.kind, &zero).is_err());
}
