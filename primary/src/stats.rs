//! What the primary reports: protection state, epoch rate, pause times, dirty pages, ack
//! latency, held output, replica lag. Shared between the epoch thread, the link task and the
//! admin API.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Protection states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProtectionState {
    /// Not protected (no backup configured).
    Unprotected,
    /// Copying memory to the backup; the replica is not yet consistent.
    Syncing,
    /// Every epoch is checkpointed to the backup; output is held until acknowledged.
    Protected,
    /// The backup is lost: the guest runs unprotected, output flows at once.
    Degraded,
    /// Protection is being turned off.
    Stopping,
    /// The epoch engine stopped on an error: no checkpoints are taken. The guest's output went
    /// the way of a lost backup (degraded with the group's consent, or passed through without
    /// arbitration); `reason` says why. `unprotect` then `protect` starts again.
    Failed,
}

impl std::fmt::Display for ProtectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Self::Unprotected => "unprotected",
            Self::Syncing => "syncing",
            Self::Protected => "protected",
            Self::Degraded => "degraded",
            Self::Stopping => "stopping",
            Self::Failed => "failed",
        };
        f.write_str(s)
    }
}

/// A bounded window of recent samples.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    v: VecDeque<f64>,
}

impl Samples {
    const CAP: usize = 2048;

    /// Adds a sample.
    pub fn push(&mut self, x: f64) {
        if self.v.len() == Self::CAP {
            self.v.pop_front();
        }
        self.v.push_back(x);
    }

    /// The `p` quantile (0..=1) of the window, or 0 when empty.
    pub fn quantile(&self, p: f64) -> f64 {
        if self.v.is_empty() {
            return 0.0;
        }
        let mut s: Vec<f64> = self.v.iter().copied().collect();
        s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        s[((s.len() - 1) as f64 * p).round() as usize]
    }

    /// Mean of the window.
    pub fn mean(&self) -> f64 {
        if self.v.is_empty() { 0.0 } else { self.v.iter().sum::<f64>() / self.v.len() as f64 }
    }

    /// Number of samples in the window.
    pub fn len(&self) -> usize {
        self.v.len()
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.v.is_empty()
    }
}

/// Upper bounds (seconds) of the checkpoint pause and ack latency histograms: 50 µs to 100 ms,
/// about three buckets per decade, then `+Inf`.
pub const LATENCY_BUCKETS_S: [f64; 12] =
    [50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3, 100e-3, f64::INFINITY];

/// A Prometheus-style histogram over [`LATENCY_BUCKETS_S`]: every sample since protection
/// started (not a window), so its counts only grow.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Samples per bucket (not cumulative): `buckets[i]` counts samples in
    /// `(LATENCY_BUCKETS_S[i-1], LATENCY_BUCKETS_S[i]]`.
    pub buckets: [u64; LATENCY_BUCKETS_S.len()],
    /// Sum of the samples, seconds.
    pub sum: f64,
    /// Number of samples.
    pub count: u64,
}

impl Histogram {
    /// Adds a sample, in seconds.
    pub fn observe(&mut self, s: f64) {
        let i = LATENCY_BUCKETS_S.iter().position(|&b| s <= b).unwrap_or(LATENCY_BUCKETS_S.len() - 1);
        self.buckets[i] += 1;
        self.sum += s;
        self.count += 1;
    }

    /// `(upper bound, cumulative count)` per bucket, the last one `+Inf` with [`Self::count`].
    pub fn cumulative(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        LATENCY_BUCKETS_S
            .iter()
            .zip(self.buckets.iter().scan(0u64, |acc, n| {
                *acc += n;
                Some(*acc)
            }))
            .map(|(b, n)| (*b, n))
    }
}

/// Everything the status command shows.
#[derive(Debug)]
pub struct Stats {
    inner: Mutex<StatsInner>,
}

/// The mutable part of [`Stats`].
#[derive(Debug)]
pub struct StatsInner {
    /// Current protection state.
    pub state: ProtectionState,
    /// When the state last changed.
    pub since: Instant,
    /// Why (for degraded and stopping).
    pub reason: String,
    /// Backup address.
    pub backup: String,
    /// Harvests shipped.
    pub epochs: u64,
    /// Harvest sequence of the last epoch submitted.
    pub last_submitted: u64,
    /// Last harvest sequence acknowledged by the backup.
    pub last_acked: u64,
    /// Protocol epoch number of the last acknowledged checkpoint.
    pub last_acked_wire_epoch: u64,
    /// Pause times, microseconds.
    pub pause_us: Samples,
    /// Every pause since protection started, seconds.
    pub pause_seconds: Histogram,
    /// Every ack latency since protection started, seconds.
    pub ack_latency_seconds: Histogram,
    /// Dirty pages per epoch.
    pub dirty_pages: Samples,
    /// Pages the guest rewrites every epoch, kept writable after the last harvest
    /// (`vmm::dirty::HotPagesConfig`).
    pub hot_pages: u64,
    /// Encoded bytes on the wire per epoch (what the sender framed: pages after their codecs,
    /// state, headers; not QUIC/TLS overhead).
    pub wire_bytes: Samples,
    /// Raw harvested bytes per epoch (4 KiB per dirty page plus the state).
    pub raw_bytes: Samples,
    /// Ack latency (submit to ack), microseconds.
    pub ack_us: Samples,
    /// Epoch lengths, microseconds.
    pub epoch_us: Samples,
    /// Times of recent harvests, for the epoch rate.
    pub harvest_times: VecDeque<Instant>,
    /// Initial sync progress: (pages sent, pages total) of the current round, and round.
    pub sync: Option<SyncProgress>,
    /// The last sync that completed.
    pub last_sync: Option<SyncSummary>,
    /// Total encoded bytes sent.
    pub bytes_sent: u64,
    /// Total raw harvested bytes (before encoding).
    pub raw_bytes_sent: u64,
}

/// Progress of the initial sync.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SyncProgress {
    /// Pre-copy round (0 is the full copy).
    pub round: u32,
    /// Pages sent in this round.
    pub pages: u64,
    /// Pages of guest memory.
    pub total_pages: u64,
    /// Pages of guest memory looked at so far in this round (the full copy goes through
    /// memory in pieces; a later round harvests the dirty log at once).
    pub scanned: u64,
    /// Pieces (epochs on the wire) this round went in so far.
    pub pieces: u64,
}

/// A completed sync: how long it took and how it went on the wire.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SyncSummary {
    /// Pre-copy rounds after the full copy (a catch-up: its rounds).
    pub rounds: u32,
    /// Pages sent in all rounds.
    pub pages: u64,
    /// Pieces (epochs on the wire) in all rounds.
    pub pieces: u64,
    /// Pages of the largest piece.
    pub largest_piece_pages: u64,
    /// From the start of the full copy (or of the catch-up) to the first consistent
    /// checkpoint, ms.
    pub ms: u64,
    /// A catch-up: after the link came back (or after running degraded) the sync went on from
    /// a pre-copy round over the replica the backup held, without a full copy.
    pub catch_up: bool,
}

impl Stats {
    /// Fresh stats for a primary protecting towards `backup`.
    pub fn new(backup: String) -> Self {
        Self {
            inner: Mutex::new(StatsInner {
                state: ProtectionState::Unprotected,
                since: Instant::now(),
                reason: String::new(),
                backup,
                epochs: 0,
                last_submitted: 0,
                last_acked: 0,
                last_acked_wire_epoch: 0,
                pause_us: Samples::default(),
                pause_seconds: Histogram::default(),
                ack_latency_seconds: Histogram::default(),
                dirty_pages: Samples::default(),
                hot_pages: 0,
                wire_bytes: Samples::default(),
                raw_bytes: Samples::default(),
                ack_us: Samples::default(),
                epoch_us: Samples::default(),
                harvest_times: VecDeque::new(),
                sync: None,
                last_sync: None,
                bytes_sent: 0,
                raw_bytes_sent: 0,
            }),
        }
    }

    /// Locks the stats for update.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, StatsInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the protection state, logging the transition.
    pub fn set_state(&self, state: ProtectionState, reason: &str) {
        let mut g = self.lock();
        if g.state != state {
            let was = g.state;
            g.state = state;
            g.since = Instant::now();
            g.reason = reason.to_string();
            match state {
                ProtectionState::Degraded => {
                    tracing::error!(from = %was, to = %state, reason, "protection state: DEGRADED, the guest runs unprotected")
                }
                ProtectionState::Failed => {
                    tracing::error!(from = %was, to = %state, reason, "protection state: FAILED, no checkpoints are taken")
                }
                _ => tracing::info!(from = %was, to = %state, reason, "protection state"),
            }
        }
    }

    /// The current state.
    pub fn state(&self) -> ProtectionState {
        self.lock().state
    }

    /// A serialisable report.
    pub fn report(&self, held: (usize, usize)) -> StatusReport {
        let g = self.lock();
        let now = Instant::now();
        let window = Duration::from_secs(2);
        let recent = g.harvest_times.iter().filter(|t| now.duration_since(**t) <= window).count();
        StatusReport {
            state: g.state,
            state_for_s: now.duration_since(g.since).as_secs_f64(),
            reason: g.reason.clone(),
            backup: g.backup.clone(),
            epochs: g.epochs,
            epoch_rate_per_s: recent as f64 / window.as_secs_f64(),
            last_submitted_epoch: g.last_submitted,
            last_acked_epoch: g.last_acked,
            replica_lag_epochs: g.last_submitted.saturating_sub(g.last_acked),
            pause_us_p50: g.pause_us.quantile(0.5),
            pause_us_p99: g.pause_us.quantile(0.99),
            epoch_ms_mean: g.epoch_us.mean() / 1e3,
            dirty_pages_per_epoch_mean: g.dirty_pages.mean(),
            dirty_pages_per_epoch_p99: g.dirty_pages.quantile(0.99),
            hot_pages: g.hot_pages,
            wire_bytes_per_epoch_mean: g.wire_bytes.mean(),
            raw_bytes_per_epoch_mean: g.raw_bytes.mean(),
            ack_latency_us_p50: g.ack_us.quantile(0.5),
            ack_latency_us_p99: g.ack_us.quantile(0.99),
            held_output_frames: held.0,
            held_output_bytes: held.1,
            bytes_sent: g.bytes_sent,
            raw_bytes_sent: g.raw_bytes_sent,
            sync: g.sync,
            last_sync: g.last_sync,
            inbound: None,
            pause_seconds: g.pause_seconds.clone(),
            ack_latency_seconds: g.ack_latency_seconds.clone(),
        }
    }
}

/// The status the admin API returns.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// Protection state.
    pub state: ProtectionState,
    /// Seconds in that state.
    pub state_for_s: f64,
    /// Why the last transition happened.
    pub reason: String,
    /// Backup address.
    pub backup: String,
    /// Epochs checkpointed.
    pub epochs: u64,
    /// Epochs per second over the last 2 s.
    pub epoch_rate_per_s: f64,
    /// Last epoch shipped.
    pub last_submitted_epoch: u64,
    /// Last epoch the backup committed.
    pub last_acked_epoch: u64,
    /// Epochs shipped but not yet committed.
    pub replica_lag_epochs: u64,
    /// Pause time p50, µs.
    pub pause_us_p50: f64,
    /// Pause time p99, µs.
    pub pause_us_p99: f64,
    /// Mean epoch length, ms.
    pub epoch_ms_mean: f64,
    /// Mean dirty pages per epoch.
    pub dirty_pages_per_epoch_mean: f64,
    /// p99 dirty pages per epoch.
    pub dirty_pages_per_epoch_p99: f64,
    /// Pages kept writable after the last checkpoint because the guest rewrites them every
    /// epoch (they are copied at every checkpoint instead of taking a write fault each epoch).
    pub hot_pages: u64,
    /// Mean encoded bytes per epoch (pages after their codecs, state, framing).
    pub wire_bytes_per_epoch_mean: f64,
    /// Mean raw harvested bytes per epoch (4 KiB per dirty page plus the state).
    pub raw_bytes_per_epoch_mean: f64,
    /// Ack latency p50, µs.
    pub ack_latency_us_p50: f64,
    /// Ack latency p99, µs.
    pub ack_latency_us_p99: f64,
    /// Frames held for output commit.
    pub held_output_frames: usize,
    /// Bytes held for output commit.
    pub held_output_bytes: usize,
    /// Encoded bytes sent to the backup (as framed by the sender).
    pub bytes_sent: u64,
    /// Raw harvested bytes handed to the sender (before encoding).
    pub raw_bytes_sent: u64,
    /// Initial sync progress, while syncing.
    pub sync: Option<SyncProgress>,
    /// The last sync that completed (`None` before the first).
    pub last_sync: Option<SyncSummary>,
    /// Input forwarding to the backup's inbound log (`None` without a net device).
    pub inbound: Option<crate::inbound::InboundReport>,
    /// Every pause since protection started (for metrics; not in the JSON).
    #[serde(skip)]
    pub pause_seconds: Histogram,
    /// Every ack latency since protection started (for metrics; not in the JSON).
    #[serde(skip)]
    pub ack_latency_seconds: Histogram,
}
