//! The simulation's model of a failure detector: a sans-IO, tick-driven heartbeat monitor for
//! one peer. (It was `failover::detector`, used by nothing in production: there the detector is
//! the replication session's, `replication_proto::Timing`'s heartbeats, suspicion and idle
//! timeout, plus the transport's liveness line; see docs/failover.md. The simulation needs a
//! detector on its virtual clock, and this is it.)
//!
//! The detector reads no clock and does no I/O. The caller feeds it time and what it heard:
//! [`Detector::on_heartbeat`] for a heartbeat from the peer, [`Detector::on_activity`] for any
//! other sign of life (a checkpoint frame or an ack counts as much as a heartbeat), and
//! [`Detector::handle_timeout`] whenever [`Detector::poll_timeout`] has passed. It answers with
//! heartbeats to send ([`Detector::poll_transmit`]) and verdict changes ([`Detector::poll_event`]).
//!
//! The verdict is a function of silence only: `Alive` while the peer was heard within
//! `suspect_after`, `Suspect` after that, `Dead` after `dead_after`. A heartbeat or activity from
//! a suspected or dead peer brings it back to `Alive` (the caller decides what a resurrection
//! means: a backup that already asked for activity simply withdraws its request, the arbiter
//! decides who is active anyway). Every verdict carries its [`Evidence`] for the log.
//!

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use failover::NodeId;

/// Errors of the detector: bad configuration and undecodable heartbeats.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DetectorError {
    #[error("detector: heartbeat interval must be positive")]
    ZeroInterval,
    #[error("detector: suspect_after {suspect_after:?} must be at least the interval {interval:?}")]
    SuspectTooSoon { suspect_after: Duration, interval: Duration },
    #[error("detector: dead_after {dead_after:?} must exceed suspect_after {suspect_after:?}")]
    DeadTooSoon { dead_after: Duration, suspect_after: Duration },
    #[error("heartbeat: {len} bytes, expected {expected}")]
    HeartbeatLength { len: usize, expected: usize },
    #[error("heartbeat: bad magic {magic:#04x}")]
    HeartbeatMagic { magic: u8 },
    #[error("heartbeat: unknown version {version}")]
    HeartbeatVersion { version: u8 },
}

/// How often to send heartbeats and how much silence makes a peer suspect, then dead.
///
/// The defaults are sized for a LAN and fast failover: a heartbeat every 10 ms, suspect after
/// 30 ms (three missed), dead after 60 ms (six missed). Both ends of a pair should use the same
/// interval, since one end's silence budget is the other end's sending rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DetectorConfig {
    /// Time between two heartbeats sent to the peer.
    pub interval: Duration,
    /// Silence after which the peer is suspect.
    pub suspect_after: Duration,
    /// Silence after which the peer is dead.
    pub dead_after: Duration,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(10),
            suspect_after: Duration::from_millis(30),
            dead_after: Duration::from_millis(60),
        }
    }
}

impl DetectorConfig {
    /// Checks that the three durations are ordered: `0 < interval <= suspect_after < dead_after`.
    pub fn validate(&self) -> Result<(), DetectorError> {
        if self.interval.is_zero() {
            return Err(DetectorError::ZeroInterval);
        }
        if self.suspect_after < self.interval {
            return Err(DetectorError::SuspectTooSoon { suspect_after: self.suspect_after, interval: self.interval });
        }
        if self.dead_after <= self.suspect_after {
            return Err(DetectorError::DeadTooSoon { dead_after: self.dead_after, suspect_after: self.suspect_after });
        }
        Ok(())
    }
}

/// What the detector thinks of its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Alive,
    Suspect,
    Dead,
}

/// Why a verdict was reached, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evidence {
    /// When the peer was last heard (heartbeat or activity); the detector's start if never.
    pub last_heard: Instant,
    /// Silence so far: `now - last_heard`.
    pub elapsed: Duration,
    /// Heartbeat intervals that passed without a word: `elapsed / interval`.
    pub missed: u32,
    /// Heartbeats received from the peer so far.
    pub heard: u64,
}

impl fmt::Display for Evidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "silent for {:?}, {} heartbeats missed, {} heard", self.elapsed, self.missed, self.heard)
    }
}

/// A verdict change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectorEvent {
    /// The peer has been silent for `suspect_after`.
    Suspect { peer: NodeId, since: Instant, evidence: Evidence },
    /// The peer has been silent for `dead_after`.
    Dead { peer: NodeId, since: Instant, evidence: Evidence },
    /// A suspect or dead peer spoke again; `evidence` describes the silence that ended.
    Alive { peer: NodeId, since: Instant, evidence: Evidence },
}

/// A heartbeat: who sends it and its sequence number. Encoded in 18 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    pub from: NodeId,
    pub seq: u64,
}

const HEARTBEAT_MAGIC: u8 = 0x48; // 'H'
const HEARTBEAT_VERSION: u8 = 1;
const HEARTBEAT_LEN: usize = 18;

impl Heartbeat {
    /// Encodes the heartbeat: magic, version, sender and sequence number (little endian).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEARTBEAT_LEN);
        out.push(HEARTBEAT_MAGIC);
        out.push(HEARTBEAT_VERSION);
        out.extend_from_slice(&self.from.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out
    }

    /// Decodes a heartbeat; any other length, magic or version is an error.
    pub fn decode(bytes: &[u8]) -> Result<Self, DetectorError> {
        if bytes.len() != HEARTBEAT_LEN {
            return Err(DetectorError::HeartbeatLength { len: bytes.len(), expected: HEARTBEAT_LEN });
        }
        if bytes[0] != HEARTBEAT_MAGIC {
            return Err(DetectorError::HeartbeatMagic { magic: bytes[0] });
        }
        if bytes[1] != HEARTBEAT_VERSION {
            return Err(DetectorError::HeartbeatVersion { version: bytes[1] });
        }
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        Ok(Self { from: word(2), seq: word(10) })
    }
}

/// A heartbeat due for the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    pub to: NodeId,
    pub heartbeat: Heartbeat,
}

/// The failure detector for one peer. See the module documentation.
#[derive(Debug)]
pub struct Detector {
    peer: NodeId,
    config: DetectorConfig,
    /// Set by the first input: the detector gives a new peer the full silence budget from there.
    started: Option<Instant>,
    last_heard: Option<Instant>,
    heard: u64,
    next_send: Option<Instant>,
    seq: u64,
    verdict: Verdict,
    transmits: VecDeque<Transmit>,
    events: VecDeque<DetectorEvent>,
}

impl Detector {
    /// A detector that watches `peer`. An invalid `config` is replaced by the default one with a
    /// warning; use [`DetectorConfig::validate`] first to refuse it instead.
    pub fn new(peer: NodeId, config: DetectorConfig) -> Self {
        let config = match config.validate() {
            Ok(()) => config,
            Err(e) => {
                tracing::warn!(peer, error = %e, "invalid detector config, using the defaults");
                DetectorConfig::default()
            }
        };
        Self {
            peer,
            config,
            started: None,
            last_heard: None,
            heard: 0,
            next_send: None,
            seq: 0,
            verdict: Verdict::Alive,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The watched peer.
    pub fn peer(&self) -> NodeId {
        self.peer
    }

    /// The configuration in force.
    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    /// The current verdict.
    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// A heartbeat arrived from `from`. Heartbeats from anyone but the watched peer are ignored
    /// (and `false` is returned).
    pub fn on_heartbeat(&mut self, now: Instant, from: NodeId) -> bool {
        if from != self.peer {
            tracing::debug!(peer = self.peer, from, "heartbeat from an unwatched node ignored");
            return false;
        }
        self.heard += 1;
        self.heard_at(now);
        true
    }

    /// Any other sign of life from the peer (a checkpoint frame, an ack).
    pub fn on_activity(&mut self, now: Instant) {
        self.heard_at(now);
    }

    /// Advances time: queues a heartbeat if one is due and updates the verdict.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.start(now);
        if self.next_send.is_none_or(|at| now >= at) {
            self.seq += 1;
            self.transmits.push_back(Transmit { to: self.peer, heartbeat: Heartbeat { from: 0, seq: self.seq } });
            // Keep the cadence, but never queue a burst after a long pause of the caller.
            let next = self.next_send.map_or(now, |at| at + self.config.interval);
            self.next_send = Some(if next <= now { now + self.config.interval } else { next });
        }
        let evidence = self.evidence(now);
        let next = if evidence.elapsed >= self.config.dead_after {
            Verdict::Dead
        } else if evidence.elapsed >= self.config.suspect_after {
            Verdict::Suspect
        } else {
            Verdict::Alive
        };
        if next == self.verdict || next == Verdict::Alive {
            // Only a word from the peer brings it back to life.
            return;
        }
        if next == Verdict::Suspect && self.verdict == Verdict::Dead {
            return;
        }
        self.verdict = next;
        let peer = self.peer;
        let event = if next == Verdict::Dead {
            tracing::warn!(peer, %evidence, "peer dead");
            DetectorEvent::Dead { peer, since: now, evidence }
        } else {
            tracing::info!(peer, %evidence, "peer suspect");
            DetectorEvent::Suspect { peer, since: now, evidence }
        };
        self.events.push_back(event);
    }

    /// The next heartbeat to send, if one is due. Its `from` is 0: the caller, who knows its own
    /// id, fills it in (see [`Detector::poll_heartbeat`] for a ready-made one).
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Like [`Detector::poll_transmit`], with the sender's id filled in.
    pub fn poll_heartbeat(&mut self, me: NodeId) -> Option<(NodeId, Heartbeat)> {
        self.poll_transmit().map(|t| (t.to, Heartbeat { from: me, seq: t.heartbeat.seq }))
    }

    /// The next verdict change, if any.
    pub fn poll_event(&mut self) -> Option<DetectorEvent> {
        self.events.pop_front()
    }

    /// When [`Detector::handle_timeout`] must be called next: the next heartbeat or the next
    /// verdict deadline, whichever is first. `None` before the first input.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let started = self.started?;
        let last = self.last_heard.unwrap_or(started);
        let deadline = match self.verdict {
            Verdict::Alive => Some(last + self.config.suspect_after),
            Verdict::Suspect => Some(last + self.config.dead_after),
            Verdict::Dead => None,
        };
        match (self.next_send, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The evidence as of `now`.
    pub fn evidence(&self, now: Instant) -> Evidence {
        let last_heard = self.last_heard.or(self.started).unwrap_or(now);
        let elapsed = now.saturating_duration_since(last_heard);
        let missed = (elapsed.as_nanos() / self.config.interval.as_nanos()).min(u32::MAX as u128) as u32;
        Evidence { last_heard, elapsed, missed, heard: self.heard }
    }

    fn start(&mut self, now: Instant) {
        if self.started.is_none() {
            self.started = Some(now);
        }
    }

    fn heard_at(&mut self, now: Instant) {
        self.start(now);
        let evidence = self.evidence(now);
        // Inputs may come slightly out of order from several sources: never move backwards.
        if self.last_heard.is_none_or(|last| now > last) {
            self.last_heard = Some(now);
        }
        if self.verdict != Verdict::Alive {
            tracing::info!(peer = self.peer, %evidence, was = ?self.verdict, "peer alive again");
            self.verdict = Verdict::Alive;
            self.events.push_back(DetectorEvent::Alive { peer: self.peer, since: now, evidence });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn drain(d: &mut Detector) -> Vec<DetectorEvent> {
        std::iter::from_fn(|| d.poll_event()).collect()
    }

    #[test]
    fn config_validation() {
        assert_eq!(DetectorConfig::default().validate(), Ok(()));
        let zero = DetectorConfig { interval: Duration::ZERO, ..Default::default() };
        assert_eq!(zero.validate(), Err(DetectorError::ZeroInterval));
        let early = DetectorConfig { suspect_after: ms(5), ..Default::default() };
        assert!(matches!(early.validate(), Err(DetectorError::SuspectTooSoon { .. })));
        let dead = DetectorConfig { dead_after: ms(30), ..Default::default() };
        assert!(matches!(dead.validate(), Err(DetectorError::DeadTooSoon { .. })));
        assert_eq!(
            dead.validate().unwrap_err().to_string(),
            "detector: dead_after 30ms must exceed suspect_after 30ms"
        );
        // An invalid config falls back to the defaults.
        assert_eq!(*Detector::new(1, zero).config(), DetectorConfig::default());
    }

    #[test]
    fn heartbeats_follow_the_interval_without_bursts() {
        let t0 = Instant::now();
        let mut d = Detector::new(2, DetectorConfig::default());
        d.handle_timeout(t0);
        assert_eq!(d.poll_heartbeat(1), Some((2, Heartbeat { from: 1, seq: 1 })));
        assert_eq!(d.poll_transmit(), None);
        assert_eq!(d.poll_timeout(), Some(t0 + ms(10)));
        d.handle_timeout(t0 + ms(5));
        assert_eq!(d.poll_transmit(), None);
        d.handle_timeout(t0 + ms(10));
        assert_eq!(d.poll_transmit().map(|t| t.heartbeat.seq), Some(2));
        // The caller slept for 100 ms: one heartbeat, not ten.
        d.on_heartbeat(t0 + ms(110), 2);
        d.handle_timeout(t0 + ms(110));
        assert_eq!(d.poll_transmit().map(|t| t.heartbeat.seq), Some(3));
        assert_eq!(d.poll_transmit(), None);
        assert_eq!(d.poll_timeout(), Some(t0 + ms(120)));
    }

    #[test]
    fn silence_makes_suspect_then_dead_with_evidence() {
        let t0 = Instant::now();
        let mut d = Detector::new(2, DetectorConfig::default());
        d.on_heartbeat(t0, 2);
        d.handle_timeout(t0 + ms(29));
        assert!(drain(&mut d).is_empty());
        assert_eq!(d.verdict(), Verdict::Alive);
        assert_eq!(d.poll_timeout(), Some(t0 + ms(30)));
        d.handle_timeout(t0 + ms(30));
        let events = drain(&mut d);
        assert_eq!(
            events,
            vec![DetectorEvent::Suspect {
                peer: 2,
                since: t0 + ms(30),
                evidence: Evidence { last_heard: t0, elapsed: ms(30), missed: 3, heard: 1 }
            }]
        );
        d.handle_timeout(t0 + ms(59));
        assert!(drain(&mut d).is_empty());
        d.handle_timeout(t0 + ms(61));
        match drain(&mut d).as_slice() {
            [DetectorEvent::Dead { peer: 2, since, evidence }] => {
                assert_eq!(*since, t0 + ms(61));
                assert_eq!(evidence.elapsed, ms(61));
                assert_eq!(evidence.missed, 6);
            }
            other => panic!("expected dead, got {other:?}"),
        }
        // Dead is sticky under more silence, and there are no more verdict deadlines.
        d.handle_timeout(t0 + ms(500));
        assert!(drain(&mut d).is_empty());
        assert_eq!(d.verdict(), Verdict::Dead);
        assert!(d.poll_timeout().unwrap() <= t0 + ms(510));
    }

    #[test]
    fn a_long_gap_goes_straight_to_dead() {
        let t0 = Instant::now();
        let mut d = Detector::new(2, DetectorConfig::default());
        d.handle_timeout(t0);
        d.handle_timeout(t0 + ms(200));
        assert!(matches!(drain(&mut d).as_slice(), [DetectorEvent::Dead { .. }]));
    }

    #[test]
    fn activity_counts_as_liveness_and_revives() {
        let t0 = Instant::now();
        let mut d = Detector::new(2, DetectorConfig::default());
        d.handle_timeout(t0);
        for i in 1..20 {
            d.on_activity(t0 + ms(i * 20));
            d.handle_timeout(t0 + ms(i * 20 + 19));
        }
        assert!(drain(&mut d).is_empty(), "checkpoint traffic every 20 ms keeps the peer alive");
        d.handle_timeout(t0 + ms(1000));
        assert!(matches!(drain(&mut d).as_slice(), [DetectorEvent::Dead { .. }]));
        d.on_activity(t0 + ms(1001));
        match drain(&mut d).as_slice() {
            [DetectorEvent::Alive { peer: 2, evidence, .. }] => assert_eq!(evidence.elapsed, ms(621)),
            other => panic!("expected alive, got {other:?}"),
        }
        assert_eq!(d.verdict(), Verdict::Alive);
    }

    #[test]
    fn heartbeats_from_others_do_not_count() {
        let t0 = Instant::now();
        let mut d = Detector::new(2, DetectorConfig::default());
        d.handle_timeout(t0);
        assert!(!d.on_heartbeat(t0 + ms(20), 3));
        d.handle_timeout(t0 + ms(60));
        assert!(matches!(drain(&mut d).as_slice(), [DetectorEvent::Dead { .. }]));
    }

    #[test]
    fn late_inputs_never_move_last_heard_backwards() {
        let t0 = Instant::now();
        let mut d = Detector::new(2, DetectorConfig::default());
        d.on_heartbeat(t0 + ms(50), 2);
        d.on_activity(t0 + ms(10));
        assert_eq!(d.evidence(t0 + ms(60)).last_heard, t0 + ms(50));
    }

    #[test]
    fn heartbeat_codec_round_trip_and_errors() {
        for hb in [Heartbeat { from: 1, seq: 0 }, Heartbeat { from: u64::MAX, seq: 77 }] {
            assert_eq!(Heartbeat::decode(&hb.encode()), Ok(hb));
        }
        let good = Heartbeat { from: 3, seq: 9 }.encode();
        assert_eq!(Heartbeat::decode(&good[..17]), Err(DetectorError::HeartbeatLength { len: 17, expected: 18 }));
        let mut bad = good.clone();
        bad[0] = 0;
        assert_eq!(Heartbeat::decode(&bad), Err(DetectorError::HeartbeatMagic { magic: 0 }));
        let mut bad = good;
        bad[1] = 9;
        assert_eq!(Heartbeat::decode(&bad).unwrap_err().to_string(), "heartbeat: unknown version 9");
        // Arbitrary bytes never panic.
        let mut rng = testbed::harness::rng::XorShift64(0x1234_5678_9abc_def0);
        for len in 0..64 {
            let x = rng.next_u64();
            let bytes: Vec<u8> = (0..len).map(|i| (x >> (i % 8 * 8)) as u8).collect();
            let _ = Heartbeat::decode(&bytes);
        }
    }
}
