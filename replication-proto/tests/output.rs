//! The output log's messages: a primary forwards each epoch's output frames only to a backup
//! that announced an output log, behind the epoch's checkpoint (so the ack never waits for
//! them); an older backup (no flag bit 4) gets none and the session goes on; a backup without
//! the log drops `Output` a peer sends anyway; the release notice reaches a backup that keeps
//! only an output log.

mod common;

use common::{connect, first_hello, pump};
use replication_proto::frame::{FrameDecoder, MessageKind};
use replication_proto::limits::{MAX_OUTPUT_FRAME, MAX_OUTPUT_FRAMES, MAX_OUTPUT_LEN};
use replication_proto::message::{Hello, Message, OutputFrames};
use replication_proto::sender::MAX_OUTPUT_BACKLOG;
use replication_proto::{
    Endpoint, MemoryLayout, OutputError, Receiver, ReceiverConfig, ReceiverEvent, Role, Sender, SenderConfig,
    VmIdentity,
};
use std::time::Instant;

const PS: usize = 4096;

fn vm() -> VmIdentity {
    VmIdentity { uuid: [4; 16], name: "output".into() }
}

fn layout() -> MemoryLayout {
    MemoryLayout::flat(PS as u32, 8 * PS as u64)
}

fn pair(output_log: bool, inbound_log: bool) -> (Sender, Receiver) {
    let mut rcfg = ReceiverConfig::new(Role::Backup, vm(), layout(), 22);
    rcfg.output_log = output_log;
    rcfg.inbound_log = inbound_log;
    (Sender::new(SenderConfig::new(Role::Primary, vm(), layout(), 11)), Receiver::new(rcfg))
}

#[derive(Debug, PartialEq, Eq)]
enum Got {
    Output(u64, u64, Vec<Vec<u8>>),
    Released(u64),
    Checkpoint(u64),
}

fn events(r: &mut Receiver) -> Vec<Got> {
    std::iter::from_fn(|| r.poll_event())
        .filter_map(|e| match e {
            ReceiverEvent::Output(o) => Some(Got::Output(o.epoch, o.harvest, o.frames)),
            ReceiverEvent::InboundCommitted { epoch } => Some(Got::Released(epoch)),
            ReceiverEvent::Checkpoint(c) => Some(Got::Checkpoint(c.epoch())),
            _ => None,
        })
        .collect()
}

/// Every transmit the sender has now, as frame kinds in wire order, each also handed to `r`.
fn wire_kinds(s: &mut Sender, r: &mut Receiver, now: Instant) -> Vec<MessageKind> {
    let mut kinds = Vec::new();
    while let Some(t) = s.poll_transmit(now) {
        let mut d = FrameDecoder::new();
        d.push(t.as_slice());
        kinds.push(d.next_frame().unwrap().expect("one whole frame").kind);
        r.handle_input(now, t.as_slice());
    }
    kinds
}

#[test]
fn output_reaches_a_logging_backup_after_its_checkpoint() {
    let (mut s, mut r) = pair(true, false);
    let now = Instant::now();
    assert_eq!(s.send_output(1, 1, &[b"early"]), Err(OutputError::NotConnected));
    connect(&mut s, &mut r, now);
    assert!(s.peer_keeps_output_log());
    assert!(!s.peer_keeps_inbound_log());
    let page = vec![7u8; PS];
    let e1 = s.submit_baseline(now, [(0u64, &page[..])], b"state").unwrap();
    // Not submitted yet: refused.
    assert_eq!(s.send_output(e1 + 1, 9, &[b"x"]), Err(OutputError::NotSubmitted { epoch: e1 + 1, last: e1 }));
    assert_eq!(s.send_output(e1, 9, &[b"reply-a".to_vec(), b"reply-b".to_vec()]), Ok(1));
    // The next epoch, submitted after the output was queued: the output still goes after every
    // epoch frame queued, its own checkpoint's and this one's.
    let e2 = s.submit(now, [(1u64, &page[..])], b"state").unwrap();
    let kinds = wire_kinds(&mut s, &mut r, now);
    let last_epoch_frame = kinds.iter().rposition(|k| *k == MessageKind::EpochEnd).expect("epoch frames");
    let output_at = kinds.iter().position(|k| *k == MessageKind::Output).expect("an output message");
    assert!(output_at > last_epoch_frame, "output overtook checkpoint data: {kinds:?}");
    let got = events(&mut r);
    assert_eq!(
        got,
        vec![
            Got::Checkpoint(e1),
            Got::Checkpoint(e2),
            Got::Output(e1, 9, vec![b"reply-a".to_vec(), b"reply-b".to_vec()])
        ]
    );
    // The release notice reaches a backup that keeps only an output log.
    s.send_inbound_committed(9).unwrap();
    pump(&mut s, &mut r, now);
    assert_eq!(events(&mut r), vec![Got::Released(9)]);
}

#[test]
fn an_older_backup_gets_no_output_and_the_session_goes_on() {
    // A backup of a build without the log announces none (its Hello has no flag bit 4).
    let (mut s, mut r) = pair(false, false);
    let now = Instant::now();
    connect(&mut s, &mut r, now);
    assert!(!s.peer_keeps_output_log());
    let page = vec![1u8; PS];
    let e = s.submit_baseline(now, [(0u64, &page[..])], b"s").unwrap();
    assert_eq!(s.send_output(e, 1, &[b"x"]), Err(OutputError::Unsupported));
    assert!(s.send_inbound_committed(1).is_err(), "a backup with neither log gets no notice");
    pump(&mut s, &mut r, now);
    assert_eq!(events(&mut r), vec![Got::Checkpoint(e)]);
    // A backup with only an inbound log gets no output either, but the notice.
    let (mut s, mut r) = pair(false, true);
    connect(&mut s, &mut r, now);
    let e = s.submit_baseline(now, [(0u64, &page[..])], b"s").unwrap();
    assert_eq!(s.send_output(e, 1, &[b"x"]), Err(OutputError::Unsupported));
    s.send_inbound_committed(1).unwrap();
    pump(&mut s, &mut r, now);
    assert_eq!(events(&mut r), vec![Got::Released(1), Got::Checkpoint(e)]);
}

#[test]
fn a_backup_without_the_log_drops_output_sent_anyway() {
    let (mut s, mut r) = pair(false, false);
    let now = Instant::now();
    connect(&mut s, &mut r, now);
    let mut bytes = Vec::new();
    Message::Output(OutputFrames { epoch: 2, harvest: 1, frames: vec![b"x".to_vec()] }).encode_frame(&mut bytes);
    r.handle_input(now, &bytes);
    assert!(events(&mut r).is_empty());
    assert_eq!(r.link_state(), replication_proto::LinkState::Established);
}

#[test]
fn a_large_epoch_goes_in_several_messages_in_order() {
    let (mut s, mut r) = pair(true, false);
    let now = Instant::now();
    connect(&mut s, &mut r, now);
    let page = vec![1u8; PS];
    let e = s.submit_baseline(now, [(0u64, &page[..])], b"s").unwrap();
    // More frames than one message may carry, and more bytes.
    let frames: Vec<Vec<u8>> = (0..MAX_OUTPUT_FRAMES + 700).map(|i| vec![i as u8; 60 + (i % 1500)]).collect();
    let n = s.send_output(e, 3, &frames).unwrap();
    let total: usize = frames.iter().map(|f| f.len() + 4).sum();
    assert!(n >= 2 && n >= total.div_ceil(MAX_OUTPUT_LEN), "{n} messages");
    pump(&mut s, &mut r, now);
    let mut back = Vec::new();
    for g in events(&mut r) {
        if let Got::Output(epoch, harvest, f) = g {
            assert_eq!((epoch, harvest), (e, 3));
            assert!(f.len() <= MAX_OUTPUT_FRAMES);
            back.extend(f);
        }
    }
    assert_eq!(back, frames);
}

#[test]
fn bad_output_is_refused_whole_and_the_backlog_is_bounded() {
    let (mut s, mut r) = pair(true, false);
    let now = Instant::now();
    connect(&mut s, &mut r, now);
    let page = vec![1u8; PS];
    let e = s.submit_baseline(now, [(0u64, &page[..])], b"s").unwrap();
    assert_eq!(
        s.send_output(e, 1, &[vec![1u8; 60], Vec::new()]),
        Err(OutputError::Length { index: 1, len: 0, max: MAX_OUTPUT_FRAME })
    );
    assert!(matches!(s.send_output(e, 1, &[vec![1u8; MAX_OUTPUT_FRAME + 1]]), Err(OutputError::Length { .. })));
    // Untaken output piles up to the bound, then epochs are refused whole.
    let big: Vec<Vec<u8>> = (0..16).map(|_| vec![2u8; MAX_OUTPUT_FRAME]).collect();
    let mut refused = 0;
    for _ in 0..(MAX_OUTPUT_BACKLOG / (16 * MAX_OUTPUT_FRAME) + 2) {
        match s.send_output(e, 1, &big) {
            Ok(_) => {}
            Err(OutputError::Backlog { limit, .. }) => {
                assert_eq!(limit, MAX_OUTPUT_BACKLOG);
                refused += 1;
            }
            Err(other) => panic!("{other}"),
        }
    }
    assert!(refused >= 1);
    // Once the transport took the queue, output goes again.
    pump(&mut s, &mut r, now);
    assert_eq!(s.send_output(e, 1, &big), Ok(2));
}

#[test]
fn output_round_trips_and_bad_payloads_are_refused() {
    for m in [
        Message::Output(OutputFrames { epoch: 1, harvest: 0, frames: vec![vec![0xaa; 60]] }),
        Message::Output(OutputFrames { epoch: u64::MAX, harvest: 7, frames: vec![vec![1; MAX_OUTPUT_FRAME], vec![2]] }),
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
    assert!(bad(Message::Output(OutputFrames { epoch: 0, harvest: 1, frames: vec![vec![1]] })), "epoch 0");
    assert!(bad(Message::Output(OutputFrames { epoch: 1, harvest: 1, frames: vec![] })), "no frames");
    assert!(bad(Message::Output(OutputFrames { epoch: 1, harvest: 1, frames: vec![vec![]] })), "empty frame");
    assert!(
        bad(Message::Output(OutputFrames { epoch: 1, harvest: 1, frames: vec![vec![1; MAX_OUTPUT_FRAME + 1]] })),
        "frame too long"
    );
    // A count the payload cannot hold is refused before anything is allocated for it.
    let mut p = Vec::new();
    Message::Output(OutputFrames { epoch: 1, harvest: 1, frames: vec![vec![1; 8]] }).encode_payload(&mut p);
    p[16..20].copy_from_slice(&1000u32.to_le_bytes());
    assert!(Message::decode(MessageKind::Output, &p).is_err());
    p[16..20].copy_from_slice(&(MAX_OUTPUT_FRAMES as u32 + 1).to_le_bytes());
    assert!(Message::decode(MessageKind::Output, &p).is_err());
    // A frame cut short, or bytes after the last frame.
    let mut cut = Vec::new();
    Message::Output(OutputFrames { epoch: 1, harvest: 1, frames: vec![vec![1; 8]] }).encode_payload(&mut cut);
    let mut long = cut.clone();
    cut.pop();
    assert!(Message::decode(MessageKind::Output, &cut).is_err());
    long.push(0);
    assert!(Message::decode(MessageKind::Output, &long).is_err());
}

/// The flag is bit 4 of the version 2 flags byte and adds no tail: an older version 2 build
/// (which knows bits 0-3) reads the same `Hello` as one without the log, so it never sends
/// `Output`; version 1 has no flags byte at all.
#[test]
fn the_flag_is_bit_4_and_older_builds_read_it_as_no_log() {
    let hello = |log: bool| first_hello(&mut pair(log, false).1);
    assert!(hello(true).output_log);
    assert!(!hello(false).output_log);
    let (mut with, mut without) = (Vec::new(), Vec::new());
    Message::Hello(hello(true)).encode_payload(&mut with);
    Message::Hello(hello(false)).encode_payload(&mut without);
    assert_eq!(with.len(), without.len());
    let flags_at = with.len() - 1;
    assert_eq!(with[flags_at], without[flags_at] | 16, "flags bit 4");
    assert_eq!(&with[..flags_at], &without[..flags_at]);
    let mut v1 = Vec::new();
    Message::Hello(Hello { version: 1, ..hello(true) }).encode_payload(&mut v1);
    let Message::Hello(h) = Message::decode(MessageKind::Hello, &v1).unwrap() else { panic!("a hello") };
    assert!(!h.output_log);
}
