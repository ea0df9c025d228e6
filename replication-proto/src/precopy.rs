//! When pre-copy should stop: the stopping rule as a sans-IO policy.
//!
//! A migration source runs round 0 (every page, while the guest runs), then rounds of the pages
//! the guest dirtied meanwhile. After each round it hands the round's numbers to a [`Policy`],
//! which answers [`Decision::Continue`] or [`Decision::Stop`] with the reason, and always with its
//! [`Prediction`] of the stop-and-copy: how many pages and bytes it would send with the guest
//! paused, and how long the guest would stay paused.
//!
//! The rules, in order of precedence (the first that holds is the reason reported):
//!
//! 1. [`StopReason::DowntimeFits`]: the predicted downtime is within the target (default 5 ms);
//! 2. [`StopReason::ResentShare`]: the data re-sent since round 0 reached a share (default 0.75)
//!    of what round 0 sent: more rounds mostly re-send what the guest keeps dirtying;
//! 3. [`StopReason::MaxRounds`]: the round bound (default 30, round 0 included);
//! 4. [`StopReason::TimeLimit`]: the time bound (default 60 s, the rounds' durations summed).
//!
//! So a migration never loops forever, and its report can say how long it predicted the pause to
//! be even when it stops for another reason than the downtime.
//!
//! **The prediction.** The stop-and-copy sends the pages dirtied during the last round (the
//! pages left) and the device state. It sends them at the link rate the round measured (or the
//! rate the transport reports), at the bytes per page of the last round after round 0 (round 0
//! is mostly first copies, zero pages and duplicates, not what later rounds send; with round 0
//! only, a page is taken as raw), and the guest runs at the destination one and a half round
//! trips later: the last byte's way there, the destination's ack, the source's handover
//! (`docs/migration.md`). Every number is checked: an instant round, an idle link or a huge
//! guest give no division by zero, no NaN and no overflow; a rate that cannot be measured is
//! `None`, and then the downtime rule cannot hold (the other rules still bound the migration).
//!
//! ```
//! use replication_proto::precopy::{Decision, Policy, PolicyConfig, RoundStats, StopReason};
//! use std::time::Duration;
//!
//! let mut policy = Policy::new(PolicyConfig { state_bytes: 64 << 10, ..PolicyConfig::new(4096) });
//! // Round 0: 65,536 pages (256 MiB) in 400 ms; the guest dirtied 5,000 pages meanwhile.
//! let d = policy.record(RoundStats {
//!     pages_sent: 65_536,
//!     bytes_sent: 120 << 20,
//!     duration: Duration::from_millis(400),
//!     pages_dirtied: 5_000,
//!     link_rate: None,
//!     rtt: Duration::from_micros(100),
//! });
//! assert!(matches!(d, Decision::Continue(_)));
//! // Round 1 sends those in 30 ms, and only 40 pages were dirtied meanwhile.
//! let d = policy.record(RoundStats {
//!     pages_sent: 5_000,
//!     bytes_sent: 6 << 20,
//!     duration: Duration::from_millis(30),
//!     pages_dirtied: 40,
//!     link_rate: None,
//!     rtt: Duration::from_micros(100),
//! });
//! let Decision::Stop { reason, prediction } = d else { panic!("should stop") };
//! assert_eq!(reason, StopReason::DowntimeFits);
//! assert!(prediction.downtime.unwrap() < Duration::from_millis(5));
//! ```

use std::time::Duration;

/// The stopping rule's parameters. [`PolicyConfig::new`] gives the defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyConfig {
    /// Stop once the predicted downtime is at most this. Default 5 ms.
    pub downtime_target: Duration,
    /// Stop once the bytes re-sent in rounds after round 0 reach this share of round 0's bytes.
    /// Default 0.75; a negative or NaN share counts as 0 (stop after round 1).
    pub stop_share: f64,
    /// Stop after this many rounds, round 0 included (0 counts as 1: round 0 always runs).
    /// Default 30.
    pub max_rounds: u32,
    /// Stop once the rounds took this long in all. Default 60 s.
    pub time_limit: Duration,
    /// Bytes of device state the stop-and-copy sends besides the pages. Default 0; set it to
    /// the size of the last `VmState` (it changes little).
    pub state_bytes: u64,
    /// The guest's page size (the bytes of a page sent raw, before a round after round 0 measured
    /// better).
    pub page_size: u32,
}

impl PolicyConfig {
    /// The defaults for pages of `page_size` bytes.
    pub fn new(page_size: u32) -> Self {
        Self {
            downtime_target: Duration::from_millis(5),
            stop_share: 0.75,
            max_rounds: 30,
            time_limit: Duration::from_secs(60),
            state_bytes: 0,
            page_size,
        }
    }
}

/// What one round did, as the source measured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RoundStats {
    /// Pages the round sent (round 0: every page).
    pub pages_sent: u64,
    /// Bytes the round put on the link (frames, after encoding).
    pub bytes_sent: u64,
    /// From the end of the previous round (or the migration's start) to the end of this one:
    /// harvest, encoding and transfer, so the rounds' durations add up to the time spent.
    pub duration: Duration,
    /// Distinct pages the guest dirtied while the round ran: what the next round, or the
    /// stop-and-copy, must send.
    pub pages_dirtied: u64,
    /// The link's rate in bytes a second, if the transport measured it (`None` or 0: the round's
    /// own `bytes_sent / duration`).
    pub link_rate: Option<u64>,
    /// The link's round-trip time (zero if unknown).
    pub rtt: Duration,
}

/// Why pre-copy stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// The predicted downtime fits the target.
    DowntimeFits,
    /// The data re-sent since round 0 reached the stop share of round 0's.
    ResentShare,
    /// The round bound was reached.
    MaxRounds,
    /// The time bound was reached.
    TimeLimit,
}

impl StopReason {
    /// A short name for reports (`"downtime_fits"`).
    pub fn name(self) -> &'static str {
        match self {
            Self::DowntimeFits => "downtime_fits",
            Self::ResentShare => "resent_share",
            Self::MaxRounds => "max_rounds",
            Self::TimeLimit => "time_limit",
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The stop-and-copy as predicted after a round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// Pages the stop-and-copy would send (those dirtied during the last round).
    pub pages_left: u64,
    /// Bytes it would send: the pages at the estimated bytes per page, plus the state.
    pub bytes_left: u64,
    /// The bytes per page it assumes.
    pub bytes_per_page: u64,
    /// The link rate it assumes, in bytes a second (`None`: never measured).
    pub link_rate: Option<u64>,
    /// How fast the guest dirtied pages during the last round, in pages a second (`None`: the
    /// round took no measurable time).
    pub dirty_rate: Option<f64>,
    /// How long the guest would stay paused (`None`: no link rate to predict it with).
    pub downtime: Option<Duration>,
    /// Bytes re-sent since round 0 over round 0's bytes (0 after round 0; finite).
    pub resent_share: f64,
}

impl Prediction {
    /// Whether the predicted downtime is known and at most `target`.
    pub fn fits(&self, target: Duration) -> bool {
        self.downtime.is_some_and(|d| d <= target)
    }
}

/// The policy's answer after a round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Run another round.
    Continue(Prediction),
    /// Pause the guest and send the rest.
    Stop {
        /// Which rule held first (see the module docs for the precedence).
        reason: StopReason,
        /// The stop-and-copy it predicts.
        prediction: Prediction,
    },
}

impl Decision {
    /// The prediction either way.
    pub fn prediction(&self) -> &Prediction {
        match self {
            Self::Continue(p) | Self::Stop { prediction: p, .. } => p,
        }
    }

    /// The reason to stop, if it is one.
    pub fn stop_reason(&self) -> Option<StopReason> {
        match self {
            Self::Continue(_) => None,
            Self::Stop { reason, .. } => Some(*reason),
        }
    }
}

/// A round as the policy recorded it (for the migration's report).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundRecord {
    /// The round's numbers as given.
    pub stats: RoundStats,
    /// Pages dirtied a second during the round (`None` for an instant round).
    pub dirty_rate: Option<f64>,
    /// The link rate in force after the round, in bytes a second.
    pub link_rate: Option<u64>,
}

/// The pre-copy stopping rule (see the module docs). Feed it each round with
/// [`Policy::record`].
#[derive(Debug, Clone)]
pub struct Policy {
    cfg: PolicyConfig,
    rounds: Vec<RoundRecord>,
    elapsed: Duration,
    link_rate: Option<u64>,
    bytes_per_page: Option<u64>,
    stopped: Option<StopReason>,
}

impl Policy {
    /// A policy before round 0.
    pub fn new(mut config: PolicyConfig) -> Self {
        if config.stop_share.is_nan() || config.stop_share < 0.0 {
            config.stop_share = 0.0;
        }
        config.max_rounds = config.max_rounds.max(1);
        Self {
            cfg: config,
            rounds: Vec::new(),
            elapsed: Duration::ZERO,
            link_rate: None,
            bytes_per_page: None,
            stopped: None,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// Updates the state size the stop-and-copy must send.
    pub fn set_state_bytes(&mut self, bytes: u64) {
        self.cfg.state_bytes = bytes;
    }

    /// The rounds recorded so far, round 0 first.
    pub fn rounds(&self) -> &[RoundRecord] {
        &self.rounds
    }

    /// The rounds' durations summed.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// Time left before the time limit (a driver may cut a long round short with it).
    pub fn time_left(&self) -> Duration {
        self.cfg.time_limit.saturating_sub(self.elapsed)
    }

    /// Bytes round 0 sent.
    pub fn first_round_bytes(&self) -> u64 {
        self.rounds.first().map_or(0, |r| r.stats.bytes_sent)
    }

    /// Bytes the rounds after round 0 sent (all of it re-sent: round 0 sent every page once).
    pub fn resent_bytes(&self) -> u64 {
        self.rounds.iter().skip(1).map(|r| r.stats.bytes_sent).fold(0, u64::saturating_add)
    }

    /// The reason the policy said stop, once it did (it keeps saying so).
    pub fn stopped(&self) -> Option<StopReason> {
        self.stopped
    }

    /// Records a round and decides.
    pub fn record(&mut self, stats: RoundStats) -> Decision {
        self.elapsed = self.elapsed.saturating_add(stats.duration);
        let measured = stats.link_rate.filter(|&r| r > 0).or_else(|| rate(stats.bytes_sent, stats.duration));
        if measured.is_some() {
            self.link_rate = measured;
        }
        if !self.rounds.is_empty() && stats.pages_sent > 0 {
            self.bytes_per_page = Some(stats.bytes_sent.div_ceil(stats.pages_sent).max(1));
        }
        let dirty_rate = per_second(stats.pages_dirtied, stats.duration);
        self.rounds.push(RoundRecord { stats, dirty_rate, link_rate: self.link_rate });
        let prediction = self.predict(stats, dirty_rate);
        let reason = self.stopped.or_else(|| self.rule(&prediction));
        self.stopped = reason;
        match reason {
            Some(reason) => Decision::Stop { reason, prediction },
            None => Decision::Continue(prediction),
        }
    }

    /// The stop-and-copy after `last` (the round just recorded).
    fn predict(&self, last: RoundStats, dirty_rate: Option<f64>) -> Prediction {
        // Before a round after round 0: a raw record (its encoding byte and a length of up to
        // three bytes, then the page).
        let bytes_per_page = self.bytes_per_page.unwrap_or(u64::from(self.cfg.page_size) + 4);
        let bytes_left = last.pages_dirtied.saturating_mul(bytes_per_page).saturating_add(self.cfg.state_bytes);
        let downtime = self.link_rate.map(|r| {
            let transfer = Duration::try_from_secs_f64(bytes_left as f64 / r as f64).unwrap_or(Duration::MAX);
            transfer.saturating_add(last.rtt.saturating_add(last.rtt / 2))
        });
        let first = self.first_round_bytes();
        let resent = self.resent_bytes();
        let resent_share = if first > 0 {
            resent as f64 / first as f64
        } else if resent > 0 {
            f64::MAX
        } else {
            0.0
        };
        Prediction {
            pages_left: last.pages_dirtied,
            bytes_left,
            bytes_per_page,
            link_rate: self.link_rate,
            dirty_rate,
            downtime,
            resent_share,
        }
    }

    /// The first rule that holds, in order of precedence.
    fn rule(&self, p: &Prediction) -> Option<StopReason> {
        let round = self.rounds.len();
        if p.fits(self.cfg.downtime_target) {
            Some(StopReason::DowntimeFits)
        } else if round >= 2 && p.resent_share >= self.cfg.stop_share {
            Some(StopReason::ResentShare)
        } else if round >= self.cfg.max_rounds as usize {
            Some(StopReason::MaxRounds)
        } else if self.elapsed >= self.cfg.time_limit {
            Some(StopReason::TimeLimit)
        } else {
            None
        }
    }
}

/// `bytes / duration` in bytes a second, if both are above zero (and at least 1).
fn rate(bytes: u64, duration: Duration) -> Option<u64> {
    let r = per_second(bytes, duration)?;
    // A float to integer cast saturates: a rate beyond u64::MAX is u64::MAX.
    (r >= 1.0).then_some(r as u64)
}

/// `count / duration` a second, if `count` and `duration` are above zero: finite and positive.
fn per_second(count: u64, duration: Duration) -> Option<f64> {
    let secs = duration.as_secs_f64();
    (count > 0 && secs > 0.0).then(|| count as f64 / secs).filter(|r| r.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn cfg() -> PolicyConfig {
        PolicyConfig::new(4096)
    }

    /// A round of `pages` pages at `bpp` bytes each over `ms` milliseconds, `dirtied` dirtied.
    fn round(pages: u64, bpp: u64, ms: u64, dirtied: u64) -> RoundStats {
        RoundStats {
            pages_sent: pages,
            bytes_sent: pages * bpp,
            duration: MS * ms as u32,
            pages_dirtied: dirtied,
            link_rate: None,
            rtt: Duration::ZERO,
        }
    }

    /// `got` within a microsecond of `want` (float to duration rounding).
    fn near(got: Option<Duration>, want: Duration) -> bool {
        got.is_some_and(|g| g.abs_diff(want) <= Duration::from_micros(1))
    }

    fn near_f(got: Option<f64>, want: f64) -> bool {
        got.is_some_and(|g| (g - want).abs() <= want.abs() * 1e-9)
    }

    fn assert_sane(p: &Prediction) {
        assert!(p.resent_share.is_finite() && p.resent_share >= 0.0, "{p:?}");
        if let Some(r) = p.dirty_rate {
            assert!(r.is_finite() && r > 0.0, "{p:?}");
        }
    }

    #[test]
    fn stops_when_the_downtime_fits() {
        let mut p = Policy::new(cfg());
        // Round 0: 1 GB/s (1e6 bytes in 1 ms); 10,000 pages dirtied: raw pages (no later round
        // yet) take 41 ms: go on.
        let d = p.record(round(250, 4000, 1, 10_000));
        assert_eq!(d.stop_reason(), None);
        let pr = d.prediction();
        assert_eq!(pr.link_rate, Some(1_000_000_000));
        assert_eq!(pr.bytes_per_page, 4096 + 4);
        assert_eq!(pr.pages_left, 10_000);
        assert!(near(pr.downtime, Duration::from_millis(41)), "{pr:?}");
        assert!(near_f(pr.dirty_rate, 10_000_000.0), "{pr:?}");
        // Round 1: 10,000 pages at 500 bytes (deltas) in 5 ms = 1 GB/s; 1,000 dirtied:
        // 1,000 x 500 B = 0.5 ms.
        let d = p.record(round(10_000, 500, 5, 1_000));
        assert_eq!(d.stop_reason(), Some(StopReason::DowntimeFits));
        assert_eq!(d.prediction().bytes_per_page, 500);
        assert!(near(d.prediction().downtime, Duration::from_micros(500)), "{d:?}");
        assert!(d.prediction().fits(cfg().downtime_target));
    }

    #[test]
    fn downtime_counts_the_state_and_a_round_trip_and_a_half() {
        let mut p = Policy::new(PolicyConfig { state_bytes: 1_000_000, ..cfg() });
        let mut r = round(1000, 1000, 1, 0);
        r.rtt = Duration::from_millis(2);
        // 1e6 bytes of state at 1 GB/s = 1 ms, plus 3 ms of round trips: 4 ms fits 5.
        let d = p.record(r);
        assert!(near(d.prediction().downtime, Duration::from_millis(4)), "{d:?}");
        assert_eq!(d.stop_reason(), Some(StopReason::DowntimeFits));
        // With a 3 ms RTT it does not: 1 + 4.5 ms.
        let mut p = Policy::new(PolicyConfig { state_bytes: 1_000_000, ..cfg() });
        r.rtt = Duration::from_millis(3);
        let d = p.record(r);
        assert!(near(d.prediction().downtime, Duration::from_micros(5500)), "{d:?}");
        assert_eq!(d.stop_reason(), None);
        p.set_state_bytes(0);
        assert_eq!(p.record(round(1, 1000, 1, 0)).stop_reason(), Some(StopReason::DowntimeFits));
    }

    #[test]
    fn a_link_rate_from_the_transport_wins_over_the_rounds_own() {
        let mut p = Policy::new(cfg());
        let mut r = round(100, 4096, 100, 100);
        r.link_rate = Some(4096 * 100 * 1000); // 100 pages a millisecond
        let d = p.record(r);
        assert_eq!(d.prediction().link_rate, Some(409_600_000));
        // 100 pages of 4100 bytes at 409.6 MB/s: 1.001 ms.
        assert!(d.prediction().fits(Duration::from_millis(2)));
        // A reported rate of 0 means unknown: the round's own is taken.
        let mut r = round(100, 1000, 1, 5);
        r.link_rate = Some(0);
        assert_eq!(p.record(r).prediction().link_rate, Some(100_000_000));
    }

    #[test]
    fn stops_when_the_resent_share_is_reached() {
        // A guest that dirties faster than the link: each round re-sends 30% of round 0.
        let mut p = Policy::new(cfg());
        assert_eq!(p.record(round(1000, 1000, 10, 300)).stop_reason(), None);
        let d = p.record(round(300, 1000, 10, 300));
        assert_eq!(d.stop_reason(), None);
        assert!((d.prediction().resent_share - 0.3).abs() < 1e-9);
        assert_eq!(p.record(round(300, 1000, 10, 300)).stop_reason(), None);
        // 0.9 >= 0.75.
        let d = p.record(round(300, 1000, 10, 300));
        assert_eq!(d.stop_reason(), Some(StopReason::ResentShare));
        assert_eq!(p.first_round_bytes(), 1_000_000);
        assert_eq!(p.resent_bytes(), 900_000);
        assert_eq!(p.rounds().len(), 4);
        // The policy keeps saying stop, with the reason it gave.
        assert_eq!(p.record(round(1, 1, 1, 0)).stop_reason(), Some(StopReason::ResentShare));
        assert_eq!(p.stopped(), Some(StopReason::ResentShare));
    }

    #[test]
    fn the_share_rule_needs_a_round_after_round_0() {
        // Share 0: stops after round 1, never after round 0 alone.
        let mut p = Policy::new(PolicyConfig { stop_share: 0.0, ..cfg() });
        assert_eq!(p.record(round(1000, 1000, 10, 900)).stop_reason(), None);
        assert_eq!(p.record(round(900, 1000, 10, 900)).stop_reason(), Some(StopReason::ResentShare));
        // A NaN or negative share counts as 0.
        for share in [f64::NAN, -1.0] {
            let mut p = Policy::new(PolicyConfig { stop_share: share, ..cfg() });
            assert_eq!(p.config().stop_share, 0.0);
            p.record(round(1000, 1000, 10, 900));
            assert_eq!(p.record(round(900, 1000, 10, 900)).stop_reason(), Some(StopReason::ResentShare));
        }
        // Infinity: never by share.
        let mut p = Policy::new(PolicyConfig { stop_share: f64::INFINITY, max_rounds: 1000, ..cfg() });
        for _ in 0..50 {
            assert_eq!(p.record(round(1000, 1000, 10, 900)).stop_reason(), None);
        }
    }

    #[test]
    fn stops_at_the_round_bound_round_0_included() {
        let mut p = Policy::new(PolicyConfig { max_rounds: 3, stop_share: 100.0, ..cfg() });
        assert_eq!(p.record(round(1000, 1000, 10, 900)).stop_reason(), None);
        assert_eq!(p.record(round(900, 1000, 10, 900)).stop_reason(), None);
        assert_eq!(p.record(round(900, 1000, 10, 900)).stop_reason(), Some(StopReason::MaxRounds));
        // 0 rounds counts as 1: round 0 runs, then stop.
        let mut p = Policy::new(PolicyConfig { max_rounds: 0, ..cfg() });
        assert_eq!(p.config().max_rounds, 1);
        assert_eq!(p.record(round(1000, 1000, 10, 900)).stop_reason(), Some(StopReason::MaxRounds));
    }

    #[test]
    fn stops_at_the_time_limit() {
        let mut p = Policy::new(PolicyConfig { time_limit: MS * 25, stop_share: 100.0, ..cfg() });
        assert_eq!(p.record(round(1000, 1000, 10, 900)).stop_reason(), None);
        assert_eq!(p.time_left(), MS * 15);
        assert_eq!(p.record(round(900, 1000, 10, 900)).stop_reason(), None);
        assert_eq!(p.record(round(900, 1000, 10, 900)).stop_reason(), Some(StopReason::TimeLimit));
        assert_eq!(p.elapsed(), MS * 30);
        assert_eq!(p.time_left(), Duration::ZERO);
    }

    /// Every combination of the four rules holding after one round: the reason is the first in
    /// the order downtime, share, rounds, time.
    #[test]
    fn precedence_of_the_rules() {
        for mask in 0u32..16 {
            let (fits, share, rounds, time) = (mask & 1 != 0, mask & 2 != 0, mask & 4 != 0, mask & 8 != 0);
            let mut p = Policy::new(PolicyConfig {
                downtime_target: MS,
                stop_share: if share { 0.5 } else { 100.0 },
                max_rounds: if rounds { 2 } else { 100 },
                time_limit: if time { MS * 20 } else { Duration::from_secs(100) },
                ..cfg()
            });
            // Round 0: 1 MB in 10 ms (100 MB/s); nothing decided (its share cannot hold).
            let first = p.record(round(1000, 1000, 10, 1000));
            assert_eq!(first.stop_reason(), None, "mask {mask}");
            // Round 1: 1000 pages of 1000 bytes (share 1.0) in 10 ms; 10 pages left (0.1 ms) or
            // 10,000 (100 ms).
            let d = p.record(round(1000, 1000, 10, if fits { 10 } else { 10_000 }));
            let want = if fits {
                Some(StopReason::DowntimeFits)
            } else if share {
                Some(StopReason::ResentShare)
            } else if rounds {
                Some(StopReason::MaxRounds)
            } else if time {
                Some(StopReason::TimeLimit)
            } else {
                None
            };
            assert_eq!(d.stop_reason(), want, "mask {mask:04b}");
        }
    }

    #[test]
    fn instant_and_empty_rounds_give_no_nan_and_no_division_by_zero() {
        let mut p = Policy::new(cfg());
        // An instant round 0 with nothing sent: no rate, no downtime, nothing decided.
        let d = p.record(RoundStats::default());
        let pr = *d.prediction();
        assert_sane(&pr);
        assert_eq!((pr.link_rate, pr.dirty_rate, pr.downtime), (None, None, None));
        assert_eq!(pr.resent_share, 0.0);
        assert_eq!(d.stop_reason(), None);
        // An instant round that sent bytes: still no rate (no time to divide by).
        let d = p.record(round(10, 4096, 0, 5));
        assert_sane(d.prediction());
        assert_eq!(d.prediction().link_rate, None);
        // Round 0 sent nothing and round 1 something: the share is huge, not infinite or NaN,
        // and the rule holds.
        let mut p = Policy::new(cfg());
        p.record(RoundStats { duration: MS, ..RoundStats::default() });
        let d = p.record(round(10, 4096, 1, 5_000_000));
        assert_sane(d.prediction());
        assert_eq!(d.stop_reason(), Some(StopReason::ResentShare));
        // Nothing left and a known rate: the downtime is the round trips alone.
        let mut p = Policy::new(cfg());
        let d = p.record(round(10, 4096, 1, 0));
        assert_eq!(d.prediction().downtime, Some(Duration::ZERO));
        assert_eq!(d.stop_reason(), Some(StopReason::DowntimeFits));
    }

    #[test]
    fn huge_numbers_saturate() {
        let mut p = Policy::new(PolicyConfig { state_bytes: u64::MAX, ..cfg() });
        let d = p.record(RoundStats {
            pages_sent: u64::MAX,
            bytes_sent: u64::MAX,
            duration: Duration::from_nanos(1),
            pages_dirtied: u64::MAX,
            link_rate: None,
            rtt: Duration::MAX,
        });
        let pr = d.prediction();
        assert_sane(pr);
        assert_eq!(pr.bytes_left, u64::MAX);
        assert_eq!(pr.link_rate, Some(u64::MAX));
        assert_eq!(pr.downtime, Some(Duration::MAX));
        assert_eq!(d.stop_reason(), None);
        // A slow link and a huge guest: the prediction is Duration::MAX at worst, never a panic.
        let mut p = Policy::new(PolicyConfig { time_limit: Duration::MAX, stop_share: f64::INFINITY, ..cfg() });
        let mut r = round(1, 1, 1000, u64::MAX / 2);
        r.link_rate = Some(1);
        assert_eq!(p.record(r).prediction().downtime, Some(Duration::MAX));
        let mut r = round(1, 1, 1, u64::MAX / 2);
        r.duration = Duration::MAX;
        assert_eq!(p.record(r).stop_reason(), Some(StopReason::TimeLimit));
        assert_eq!(p.elapsed(), Duration::MAX);
    }

    #[test]
    fn rounds_are_recorded_for_the_report() {
        let mut p = Policy::new(cfg());
        p.record(round(1000, 1000, 10, 100));
        p.record(round(100, 500, 2, 0));
        let r = p.rounds();
        assert_eq!(r.len(), 2);
        assert!(near_f(r[0].dirty_rate, 10_000.0));
        assert_eq!(r[0].link_rate, Some(100_000_000));
        assert_eq!(r[1].stats.pages_sent, 100);
        assert_eq!(r[1].dirty_rate, None);
        assert_eq!(r[1].link_rate, Some(25_000_000));
        assert_eq!(StopReason::ResentShare.to_string(), "resent_share");
    }
}
