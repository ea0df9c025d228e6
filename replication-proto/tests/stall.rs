//! A stall of this side is not silence of the peer: after a gap between calls much longer than
//! the heartbeat timer, the idle clock skips the gap (the peer's heartbeats of that time are
//! still unread in the socket), while a peer that really went silent is still declared idle.
//! The peer is a real `Sender`; what it transmits while the receiver stalls is queued, as a
//! socket would, and delivered after the receiver's timer ran on waking. Also here: the
//! receiver's *suspicion* of a silent peer, short of ending the session.

use std::time::{Duration, Instant};

use replication_proto::session::{Channel, Endpoint, PeerLiveness, Timing};
use replication_proto::{
    MemoryLayout, Receiver, ReceiverConfig, ReceiverEvent, Role, Sender, SenderConfig, SenderEvent, VmIdentity,
};

const HB: u64 = 10;
const IDLE: u64 = 80;
const SUSPECT: u64 = 40;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

struct Link {
    t0: Instant,
    s: Sender,
    r: Receiver,
    /// Frames from the sender not yet read by the receiver: `(datagram?, bytes)`.
    socket: Vec<(bool, Vec<u8>)>,
    /// Liveness events of the receiver: `(suspect?, silent_ms)`.
    liveness: Vec<(bool, u64)>,
}

impl Link {
    fn connected() -> Self {
        Self::with_suspicion(None)
    }

    fn with_suspicion(suspect_after: Option<Duration>) -> Self {
        let vm = VmIdentity { uuid: *b"stall-test-vm-id", name: "stall".into() };
        let layout = MemoryLayout::flat(4096, 64 * 4096);
        let timing = Timing { heartbeat_interval: ms(HB), idle_timeout: ms(IDLE), suspect_after };
        let mut scfg = SenderConfig::new(Role::Primary, vm.clone(), layout.clone(), 1);
        scfg.timing = timing;
        let mut rcfg = ReceiverConfig::new(Role::Backup, vm, layout, 2);
        rcfg.timing = timing;
        let t0 = Instant::now();
        let mut l = Self { t0, s: Sender::new(scfg), r: Receiver::new(rcfg), socket: Vec::new(), liveness: Vec::new() };
        l.s.connect(t0);
        l.r.connect(t0);
        l.sender_sends(0);
        l.receiver_reads(0);
        assert!(!l.disconnected(), "handshake failed");
        l
    }

    /// The sender runs its timer at `t` and writes what it has into the socket.
    fn sender_sends(&mut self, t: u64) {
        let now = self.t0 + ms(t);
        self.s.handle_timeout(now);
        while let Some(x) = self.s.poll_transmit(now) {
            self.socket.push((x.channel() == Channel::Datagram, x.to_vec()));
        }
    }

    /// The receiver reads its socket at `t` and answers.
    fn receiver_reads(&mut self, t: u64) {
        let now = self.t0 + ms(t);
        for (datagram, bytes) in std::mem::take(&mut self.socket) {
            if datagram {
                self.r.handle_datagram(now, &bytes);
            } else {
                self.r.handle_input(now, &bytes);
            }
        }
        self.receiver_writes(now);
    }

    /// The receiver's timer runs at `t`.
    fn receiver_timer(&mut self, t: u64) {
        let now = self.t0 + ms(t);
        self.r.handle_timeout(now);
        self.receiver_writes(now);
    }

    /// What the receiver writes reaches the sender at once (the sender's socket is not the
    /// subject here).
    fn receiver_writes(&mut self, now: Instant) {
        while let Some(x) = self.r.poll_transmit(now) {
            if x.channel() == Channel::Datagram {
                self.s.handle_datagram(now, &x);
            } else {
                self.s.handle_input(now, &x);
            }
        }
    }

    fn disconnected(&mut self) -> bool {
        let mut gone = false;
        while let Some(e) = self.r.poll_event() {
            match e {
                ReceiverEvent::Disconnected { .. } => gone = true,
                ReceiverEvent::Liveness(PeerLiveness::Suspect { silent_ms }) => self.liveness.push((true, silent_ms)),
                ReceiverEvent::Liveness(PeerLiveness::Heard { silent_ms }) => self.liveness.push((false, silent_ms)),
                _ => {}
            }
        }
        gone
    }

    /// Both run every `HB` ms from `from` to `to` (the sender only if `talking`); the time the
    /// receiver declared the sender idle, if it did.
    fn run(&mut self, from: u64, to: u64, talking: bool) -> Option<u64> {
        let mut t = from;
        while t < to {
            if talking {
                self.sender_sends(t);
            }
            self.receiver_timer(t);
            self.receiver_reads(t);
            if self.disconnected() {
                return Some(t);
            }
            t += HB;
        }
        None
    }
}

#[test]
fn a_silent_peer_is_declared_idle() {
    let mut l = Link::connected();
    let at = l.run(HB, 500, false).expect("idle peer never declared");
    assert!((IDLE..=IDLE + HB).contains(&at), "declared at {at} ms");
}

#[test]
fn a_host_wide_stall_condemns_nobody() {
    let mut l = Link::connected();
    assert_eq!(l.run(HB, 50, true), None);
    // Both processes stop from 40 to 160 ms (their host stalled). On waking the receiver's
    // timer fires before it reads what the sender writes on waking.
    l.receiver_timer(160);
    assert!(!l.disconnected(), "the receiver declared the sender idle on waking from a 120 ms stall");
    l.sender_sends(160);
    l.receiver_reads(160);
    assert_eq!(l.run(170, 600, true), None, "the link did not recover from the stall");
    assert!(
        !std::iter::from_fn(|| l.s.poll_event()).any(|e| matches!(e, SenderEvent::Disconnected { .. })),
        "the sender declared the receiver idle"
    );
}

#[test]
fn a_peer_that_dies_during_our_stall_is_still_declared_idle() {
    let mut l = Link::connected();
    assert_eq!(l.run(HB, 50, true), None);
    // Stall from 40 to 160 ms; the peer died at 45 and nothing is waiting.
    let at = l.run(160, 1000, false).expect("dead peer never declared");
    // Only the silence while we were running counts: idle at most `IDLE` after waking.
    assert!(at <= 160 + IDLE + HB, "declared at {at} ms");
}

#[test]
fn a_silent_peer_is_suspected_before_idle_and_heard_again() {
    let mut l = Link::with_suspicion(Some(ms(SUSPECT)));
    assert_eq!(l.run(HB, 100, true), None);
    assert!(l.liveness.is_empty(), "a talking peer was suspected: {:?}", l.liveness);
    // Silent from 100 to 150 ms: suspected once, the session goes on.
    assert_eq!(l.run(100, 150, false), None, "suspicion ended the session");
    assert_eq!(l.liveness.len(), 1, "{:?}", l.liveness);
    let (suspect, silent) = l.liveness[0];
    assert!(suspect && (SUSPECT..SUSPECT + HB).contains(&silent), "{:?}", l.liveness);
    // It talks again: heard, once, and no new suspicion while it talks.
    assert_eq!(l.run(150, 400, true), None);
    assert_eq!(l.liveness.len(), 2, "{:?}", l.liveness);
    assert!(!l.liveness[1].0 && l.liveness[1].1 >= SUSPECT, "{:?}", l.liveness);
    // Silent for good: suspected again, then declared idle as without suspicion.
    let at = l.run(400, 1000, false).expect("silent peer never declared idle");
    assert!((400 + IDLE - HB..=400 + IDLE + HB).contains(&at), "declared at {at} ms");
    assert_eq!(l.liveness.len(), 3, "{:?}", l.liveness);
    assert!(l.liveness[2].0, "{:?}", l.liveness);
}

#[test]
fn no_suspicion_unless_asked_for_or_shorter_than_idle() {
    for suspect in [None, Some(ms(IDLE)), Some(ms(IDLE * 2))] {
        let mut l = Link::with_suspicion(suspect);
        assert!(l.run(HB, 500, false).is_some());
        assert!(l.liveness.is_empty(), "{suspect:?}: {:?}", l.liveness);
    }
}
