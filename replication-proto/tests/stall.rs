//! A stall of this side is not silence of the peer: after a gap between calls much longer than
//! the heartbeat timer, the idle clock skips the gap (the peer's heartbeats of that time are
//! still unread in the socket), while a peer that really went silent is still declared idle.

use std::time::{Duration, Instant};

use replication_proto::message::Heartbeat;
use replication_proto::session::{Endpoint, Timing};
use replication_proto::version::{PROTOCOL_VERSION, oldest_accepted};
use replication_proto::{Hello, MemoryLayout, Message, Receiver, ReceiverConfig, ReceiverEvent, Role, VmIdentity};

const HB: u64 = 10;
const IDLE: u64 = 80;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn connected(t0: Instant) -> Receiver {
    let vm = VmIdentity { uuid: *b"stall-test-vm-id", name: "stall".into() };
    let layout = MemoryLayout::flat(4096, 64 * 4096);
    let mut cfg = ReceiverConfig::new(Role::Backup, vm.clone(), layout.clone(), 2);
    cfg.timing = Timing { heartbeat_interval: ms(HB), idle_timeout: ms(IDLE) };
    let mut r = Receiver::new(cfg);
    r.connect(t0);
    let hello = Hello {
        version: PROTOCOL_VERSION,
        min_version: oldest_accepted(PROTOCOL_VERSION),
        role: Role::Primary,
        instance: 1,
        vm,
        layout,
        window: 4,
        committed: None,
        delivered: None,
        high_water: 0,
        session: 1,
    };
    let mut bytes = Vec::new();
    Message::Hello(hello).encode_frame(&mut bytes);
    r.handle_input(t0, &bytes);
    drain(&mut r, t0);
    assert!(!disconnected(&mut r), "handshake failed");
    r
}

fn drain(r: &mut Receiver, now: Instant) {
    while r.poll_transmit(now).is_some() {}
}

fn disconnected(r: &mut Receiver) -> bool {
    let mut gone = false;
    while let Some(e) = r.poll_event() {
        gone |= matches!(e, ReceiverEvent::Disconnected { .. });
    }
    gone
}

fn heartbeat(r: &mut Receiver, now: Instant) {
    let mut bytes = Vec::new();
    Message::Heartbeat(Heartbeat { last_sent: 0, committed: 0 }).encode_frame(&mut bytes);
    r.handle_datagram(now, &bytes);
}

/// Ticks every `HB` ms from `from` to `to` (exclusive); true if the peer was declared idle.
fn tick(r: &mut Receiver, t0: Instant, from: u64, to: u64, beats: bool) -> Option<u64> {
    let mut t = from;
    while t < to {
        let now = t0 + ms(t);
        if beats {
            heartbeat(r, now);
        }
        r.handle_timeout(now);
        drain(r, now);
        if disconnected(r) {
            return Some(t);
        }
        t += HB;
    }
    None
}

#[test]
fn a_silent_peer_is_declared_idle() {
    let t0 = Instant::now();
    let mut r = connected(t0);
    let at = tick(&mut r, t0, HB, 500, false).expect("idle peer never declared");
    assert!((IDLE..=IDLE + HB).contains(&at), "declared at {at} ms");
}

#[test]
fn our_own_stall_does_not_condemn_a_talking_peer() {
    let t0 = Instant::now();
    let mut r = connected(t0);
    assert_eq!(tick(&mut r, t0, HB, 50, true), None);
    // This process does not run from 40 to 160 ms (the host stalled); on waking, the timer fires
    // before the heartbeats waiting in the socket are read.
    r.handle_timeout(t0 + ms(160));
    drain(&mut r, t0 + ms(160));
    assert!(!disconnected(&mut r), "declared idle on waking from our own 120 ms stall");
    // The backlog is read, and the peer goes on talking.
    assert_eq!(tick(&mut r, t0, 161, 600, true), None);
}

#[test]
fn a_peer_that_dies_during_our_stall_is_still_declared_idle() {
    let t0 = Instant::now();
    let mut r = connected(t0);
    assert_eq!(tick(&mut r, t0, HB, 50, true), None);
    // Stall from 40 to 160 ms; the peer died at 45 and nothing is waiting.
    let at = tick(&mut r, t0, 160, 1000, false).expect("dead peer never declared");
    // Only the silence while we were running counts: idle at most `IDLE` after waking.
    assert!(at <= 160 + IDLE + HB, "declared at {at} ms");
}
