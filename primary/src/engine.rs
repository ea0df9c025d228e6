//! The epoch engine: pre-copy sync, then pause, harvest, resume, hand off, epoch after epoch.
//!
//! It runs on its own thread. Each protected epoch it takes the VM lock, pauses the vCPUs and
//! the net device, fetches and clears the dirty log (OR the VMM's own writes), copies those
//! pages into a staging buffer, captures `VmState`, moves the output-commit boundary, and
//! resumes; the pause is exactly that. Encoding and shipping happen on the link task while the
//! next epoch runs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm::memory::{PAGE_SIZE, copy_pages};
use vmm::vm::Vm;

use crate::output::OutputBuffer;
use crate::stats::{ProtectionState, Stats, SyncProgress, SyncSummary};
use transport::error_chain;

/// Epoch length policy.
///
/// Adaptive (the default): a guest that emits no network output runs epochs long enough that
/// the pause costs at most 2% of its time, within `min..=max`. **Output drives it**: when a
/// frame is held (a reply waits for its epoch's ack), the epoch ends `coalesce` after that
/// frame (so replies emitted together share one checkpoint), but never before `min` from its
/// start. A reply then waits about one coalescing window, one pause and one ack instead of half
/// an epoch; a busy server pays for it in pauses (CPU for latency, see docs/protection.md).
#[derive(Debug, Clone, Copy)]
pub struct EpochTiming {
    /// Shortest epoch.
    pub min: Duration,
    /// Longest epoch.
    pub max: Duration,
    /// Fixed length (overrides the adaptive policy, output included).
    pub fixed: Option<Duration>,
    /// With output waiting, end the epoch at most this long after its first held frame (50 µs
    /// per frame of the previous epoch's output, see [`EpochTiming::end`]; `None`: output does
    /// not shorten epochs).
    pub coalesce: Option<Duration>,
}

impl Default for EpochTiming {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(1),
            max: Duration::from_millis(50),
            fixed: None,
            coalesce: Some(Duration::from_micros(500)),
        }
    }
}

impl EpochTiming {
    /// The next epoch's length without output: a fixed length, or long enough that the last
    /// pause costs at most 2% of the guest's time, within the bounds.
    pub fn next(&self, last_pause: Duration) -> Duration {
        if let Some(f) = self.fixed {
            return f;
        }
        (last_pause * 50).clamp(self.min, self.max)
    }

    /// When an epoch that started at `start` ends: at `start + silent` (from [`Self::next`]),
    /// or, with output first held at `first_output`, a coalescing window after it (not before
    /// `start + min`, not after `start + silent`). The window follows the output's burst:
    /// [`COALESCE_PER_FRAME`] per frame the previous epoch held (`burst`), at least one frame's
    /// worth, at most `coalesce`. A lone reply (a request at a time) leaves after 50 µs instead
    /// of waiting for replies that are not coming; a busy server's replies, many per epoch,
    /// share checkpoints as before.
    pub fn end(&self, start: Instant, silent: Duration, first_output: Option<Instant>, burst: u32) -> Instant {
        let latest = start + silent;
        match (self.fixed, self.coalesce, first_output) {
            (None, Some(c), Some(t)) => {
                let window = c.min(COALESCE_PER_FRAME.saturating_mul(burst.max(1)));
                (t + window).max(start + self.min).min(latest)
            }
            _ => latest,
        }
    }
}

/// The output-driven coalescing window per frame of the previous epoch's output (see
/// [`EpochTiming::end`]). A/B on the kv guest (docs/benchmarks-history.md): a fixed 50 µs
/// window cut a lone request's added latency ~250 µs against 500 µs with idle detection, and
/// cost 16 connections 5-10% of their throughput, which the growing window keeps.
pub const COALESCE_PER_FRAME: Duration = Duration::from_micros(50);

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Epoch length policy.
    pub timing: EpochTiming,
    /// Checkpoints in flight (shipped, not acknowledged) before the engine waits.
    pub window: usize,
    /// Most pre-copy rounds after the full copy.
    pub precopy_max_rounds: u32,
    /// Stop pre-copying once a round dirtied fewer pages than this.
    pub precopy_stop_pages: u64,
    /// Every this many checkpoints, digest guest memory while paused (for verification; 0 = off).
    pub verify_every: u64,
    /// Reverse checkpoints (a post-copy destination checkpointing back to its source): the peer
    /// holds the guest as it was when the engine starts (the switch-over), so there is no sync:
    /// the first epoch is a checkpoint of what the guest dirtied since (the caller turned dirty
    /// logging on and held output before the guest first ran). It never runs degraded: output
    /// stays held while the source is unreachable, and a lost source or a failed engine calls
    /// the backup-lost hook (which fences this copy) instead of releasing it.
    pub reverse: bool,
    /// Copy a checkpoint's pages on two threads during the pause (the vCPUs' cores are idle
    /// then), capturing the state beside the copy.
    pub parallel_copy: bool,
    /// With output held, end the epoch as soon as the guest went idle (its vCPUs halted, its
    /// devices' workers asleep) instead of waiting out the whole coalescing window.
    pub idle_end: bool,
    /// With output held, end the epoch as soon as it holds as many frames as the previous
    /// epoch held (the burst the coalescing window waits for is complete), not before the
    /// shortest epoch.
    pub burst_end: bool,
    /// Keep pages the guest rewrites every epoch writable for up to this many epochs
    /// (`vmm::dirty::HotPagesConfig`; 0: protect every dirty page again at each checkpoint).
    pub hot_page_epochs: u8,
    /// Pages rewritten within this many epochs of being protected stay writable too (at most
    /// `vmm::dirty::DEFAULT_MAX_WINDOW_PAGES` of them; `vmm::dirty::HotPagesConfig::window`).
    pub hot_page_window: u8,
    /// Run the pause (this thread while the vCPUs are parked, and the page-copy helper) at this
    /// `SCHED_FIFO` priority, so nothing else on the host preempts it (0: the ordinary policy;
    /// without the privilege it warns once and runs at the ordinary one). See `vmm::sched`.
    pub pause_rt_priority: u8,
    /// In-epoch pre-copy: this long before a silent epoch ends (no output held by then),
    /// harvest and copy the pages dirtied so far while the guest runs; the pause then copies
    /// only the pages dirtied after (the checkpoint takes those fresh copies, the others from
    /// the pre-copy). Exact (a page written after the pre-copy is in the pause's harvest); the
    /// price: a page written both before and after it takes one more write-protect fault and
    /// is copied twice, off the pause. `None`: off.
    pub epoch_precopy: Option<Duration>,
    /// The full copy that starts a sync goes to the link in pieces of at most this many
    /// non-zero pages (the first piece is the baseline, the others pre-copy epochs on top of
    /// it), at most [`SYNC_PIECES_IN_FLIGHT`] unacknowledged at once. Each piece is one epoch
    /// on the wire: the session encodes it, and the backup commits it, in one go, so a piece
    /// must be small enough for the heartbeats between pieces to flow (a whole 1.5 GiB guest
    /// in one epoch held both sessions for seconds: docs/protection.md, "Initial sync").
    pub sync_piece_pages: usize,
}

/// [`EngineConfig::sync_piece_pages`] by default: 16 MiB of pages.
pub const SYNC_PIECE_PAGES: usize = 4096;

/// Pieces of a sync's full copy handed to the link and not yet acknowledged before the engine
/// copies the next (the sender's window holds four epochs).
pub const SYNC_PIECES_IN_FLIGHT: usize = 4;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            timing: EpochTiming::default(),
            window: 4,
            precopy_max_rounds: 8,
            precopy_stop_pages: 4096,
            verify_every: 0,
            reverse: false,
            parallel_copy: true,
            idle_end: true,
            burst_end: true,
            hot_page_epochs: 32,
            hot_page_window: vmm::dirty::DEFAULT_HOT_WINDOW,
            pause_rt_priority: 1,
            epoch_precopy: None,
            sync_piece_pages: SYNC_PIECE_PAGES,
        }
    }
}

/// What a harvest is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HarvestKind {
    /// The full copy that starts a sync (all non-zero pages, taken while the guest runs).
    Baseline,
    /// A pre-copy round (dirty pages, taken while the guest runs): no consistent state.
    Precopy,
    /// A consistent checkpoint: pages and state taken while paused.
    Checkpoint,
}

/// One harvest, handed from the engine to the link.
pub struct Harvest {
    /// Harvest sequence number (1, 2, ...): output is tagged with it.
    pub seq: u64,
    /// What it is.
    pub kind: HarvestKind,
    /// Page frame numbers, ascending.
    pub pfns: Vec<u64>,
    /// The pages, `PAGE_SIZE` bytes each, in `pfns` order.
    pub data: Vec<u8>,
    /// Encoded `VmState` (empty unless a checkpoint).
    pub state: Vec<u8>,
    /// Memory digest at this checkpoint, when sampled for verification.
    pub digest: Option<u64>,
    /// When it was taken.
    pub taken_at: Instant,
    /// A checkpoint's output frames, for a backup that keeps an output log (empty otherwise):
    /// the link sends them after the checkpoint ([`OutputBuffer::take_for_backup`]).
    pub output: Vec<crate::output::Frame>,
}

impl Harvest {
    /// `(pfn, page)` pairs.
    pub fn pages(&self) -> impl Iterator<Item = (u64, &[u8])> + Clone {
        self.pfns.iter().copied().zip(self.data.chunks(PAGE_SIZE))
    }
}

/// State shared between the engine thread and the link task.
pub struct LinkShared {
    in_flight: Mutex<usize>,
    cv: Condvar,
    /// The link needs a new baseline (reconnect without resume, or the backup asked).
    pub need_baseline: AtomicBool,
    /// A session with the backup is established.
    pub up: AtomicBool,
    /// The backup keeps an output log (it said so in its `Hello`): each checkpoint's output
    /// frames are copied for it.
    pub forward_output: AtomicBool,
    /// The backup's process is known to be gone (its host closed the liveness line): no need to
    /// wait `degrade_after` for it to come back.
    pub backup_dead: AtomicBool,
    /// The engine should stop.
    pub stop: AtomicBool,
    /// Highest harvest sequence acknowledged.
    pub acked_seq: Mutex<u64>,
    /// Sequence of the latest sync's baseline: only the ack of a checkpoint taken after it
    /// makes the VM `protected` (an ack of an epoch from before a re-sync proves nothing).
    pub sync_floor: AtomicU64,
    /// Page buffers the link is done with, for the next epochs: a recycled buffer is already
    /// faulted in, so the pause copies into warm memory instead of fresh zeroed pages.
    spare: Mutex<Vec<Vec<u8>>>,
}

/// Waits until `end` (the end of an output coalescing window), or less once `complete` says the
/// burst the window waits for came (the epoch holds as many frames as the previous one), or
/// once `idle` said so twice in a row (every vCPU halted and the device workers asleep: the
/// guest answered what it had and waits for more, so waiting longer only delays its replies),
/// but not before `floor` (the shortest epoch). Some(true) if it ended early, Some(false) at
/// `end`, None if the engine was asked to stop.
fn coalesce(
    link: &LinkShared,
    floor: Instant,
    end: Instant,
    mut idle: impl FnMut() -> bool,
    mut complete: impl FnMut() -> bool,
) -> Option<bool> {
    let mut seen = 0;
    loop {
        let now = Instant::now();
        if now >= end {
            return Some(false);
        }
        if now >= floor && complete() {
            return Some(true);
        }
        // Two looks in a row: a vCPU between two exits can read asleep for a moment.
        if now >= floor && idle() {
            seen += 1;
            if seen >= 2 {
                return Some(true);
            }
        } else {
            seen = 0;
        }
        if !link.nap_until((now + IDLE_LOOK).min(end)) {
            return None;
        }
    }
}

/// Merges two sets of pages (ascending pfns, `PAGE_SIZE` bytes each in `data`) into `out`
/// (cleared first): every pfn of either once, ascending; a pfn in both takes `newer`'s page.
fn merge_pages(older: (&[u64], &[u8]), newer: (&[u64], &[u8]), mut out: Vec<u8>) -> Merged {
    fn page(data: &[u8], i: usize) -> &[u8] {
        &data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
    }
    out.clear();
    let mut pfns = Vec::with_capacity(older.0.len() + newer.0.len());
    let (mut i, mut j, mut both) = (0, 0, 0);
    while i < older.0.len() || j < newer.0.len() {
        let take_newer = match (older.0.get(i), newer.0.get(j)) {
            (Some(a), Some(b)) if a == b => {
                i += 1;
                both += 1;
                true
            }
            (Some(a), Some(b)) => b < a,
            (None, _) => true,
            (Some(_), None) => false,
        };
        if take_newer {
            pfns.push(newer.0[j]);
            out.extend_from_slice(page(newer.1, j));
            j += 1;
        } else {
            pfns.push(older.0[i]);
            out.extend_from_slice(page(older.1, i));
            i += 1;
        }
    }
    Merged { pfns, data: out, both }
}

/// What [`merge_pages`] made.
#[derive(Debug, PartialEq, Eq)]
struct Merged {
    pfns: Vec<u64>,
    data: Vec<u8>,
    /// Pages in both inputs (pre-copied, then dirtied again).
    both: usize,
}

/// In-epoch pre-copy pays off only when the pause would copy many pages ...
const PRECOPY_MIN_PAGES: usize = 512;
/// ... and the guest does not write most of them again before the epoch ends (each such page
/// takes one more write-protect fault): past this share of the pre-copied pages dirtied
/// again, pre-copy rests for [`PRECOPY_REST`] epochs.
const PRECOPY_MAX_REDIRTY: f64 = 0.25;
/// Epochs without pre-copy after one that did not pay off (doubling each time it still does
/// not, up to [`PRECOPY_REST_MAX`]).
const PRECOPY_REST: u32 = 32;
/// The longest rest.
const PRECOPY_REST_MAX: u32 = 1024;

/// How often the coalescing window looks whether the guest went idle (each look reads a
/// `/proc` file per guest thread, a few µs; 50 µs looks ended epochs ~60 µs later).
const IDLE_LOOK: Duration = Duration::from_micros(20);

/// How many spare page buffers the link hands back at most.
const SPARE_BUFFERS: usize = 4;

impl Default for LinkShared {
    fn default() -> Self {
        Self {
            in_flight: Mutex::new(0),
            cv: Condvar::new(),
            need_baseline: AtomicBool::new(false),
            up: AtomicBool::new(false),
            forward_output: AtomicBool::new(false),
            backup_dead: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            acked_seq: Mutex::new(0),
            spare: Mutex::new(Vec::new()),
            sync_floor: AtomicU64::new(0),
        }
    }
}

impl LinkShared {
    /// The link finished with `n` harvests (acked or dropped).
    pub fn done(&self, n: usize) {
        let mut g = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        *g = g.saturating_sub(n);
        self.cv.notify_all();
    }

    /// Everything in flight was dropped (resync).
    pub fn reset_in_flight(&self) {
        *self.in_flight.lock().unwrap_or_else(|e| e.into_inner()) = 0;
        self.cv.notify_all();
    }

    /// Records an acknowledged harvest sequence.
    pub fn acked(&self, seq: u64) {
        let mut a = self.acked_seq.lock().unwrap_or_else(|e| e.into_inner());
        *a = (*a).max(seq);
        self.cv.notify_all();
    }

    /// Hands a harvest's page buffer back once it is encoded (kept only up to a few).
    pub fn recycle(&self, mut buf: Vec<u8>) {
        buf.clear();
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < SPARE_BUFFERS {
            spare.push(buf);
        }
    }

    /// Hands back the page buffer of a harvest of `kind` once it is encoded: a checkpoint's
    /// serves a later checkpoint ([`Self::recycle`]); a sync piece's is dropped (allocated for a
    /// whole piece and partly written, it would make a later pause fault on memory never
    /// touched: the pause p99 at ~1,000 pages went from ~0.55 to 1.3-4.0 ms).
    pub fn recycle_harvest(&self, kind: HarvestKind, buf: Vec<u8>) {
        if kind == HarvestKind::Checkpoint {
            self.recycle(buf);
        }
    }

    /// A buffer for `bytes` of pages: a recycled one if there is one; true if it already had
    /// room (warm: no page faults while copying into it).
    pub(crate) fn buffer(&self, bytes: usize) -> (Vec<u8>, bool) {
        let mut buf = self.spare.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
        let warm = buf.capacity() >= bytes;
        buf.reserve(bytes);
        (buf, warm)
    }

    fn started(&self) {
        *self.in_flight.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    /// Wakes the engine (state change).
    pub fn wake(&self) {
        self.cv.notify_all();
    }

    /// Sleeps until `until`, or until asked to stop (false then).
    fn nap_until(&self, until: Instant) -> bool {
        let mut g = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return false;
            }
            let now = Instant::now();
            if now >= until {
                return true;
            }
            g = self.cv.wait_timeout(g, until - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Waits until fewer than `limit` are in flight, or `timeout`, or stop. True if room.
    fn wait_room(&self, limit: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        while *g >= limit && !self.stop.load(Ordering::SeqCst) && !self.need_baseline.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self.cv.wait_timeout(g, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        *g < limit
    }
}

/// Pages of guest memory in `layout` (`(gpa, bytes)` regions).
fn memory_pages(layout: &[(u64, u64)]) -> u64 {
    layout.iter().map(|r| r.1 / PAGE_SIZE as u64).sum()
}

/// Errors that end the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The VM failed during a harvest.
    #[error("harvest {seq}")]
    Vm {
        /// Harvest sequence.
        seq: u64,
        /// Why.
        #[source]
        source: vmm::vm::VmError,
    },
    /// Encoding the state failed.
    #[error("harvest {seq}: encode vm state")]
    State {
        /// Harvest sequence.
        seq: u64,
        /// Why.
        #[source]
        source: vmm::state::StateError,
    },
    /// Reading guest memory failed.
    #[error("harvest {seq}: read guest memory")]
    Memory {
        /// Harvest sequence.
        seq: u64,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The link went away for good.
    #[error("the link task to the backup ended")]
    LinkClosed,
    /// Reverse checkpoints: the source asked for a new baseline, which a reverse series cannot
    /// give.
    #[error("the source asked for a new baseline, which reverse checkpoints cannot give")]
    Baseline,
}

/// The engine's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Sync { round: u32 },
    Protected,
    Degraded,
}

/// The epoch engine of one protected VM.
pub struct Engine {
    vm: Arc<Mutex<Vm>>,
    output: Option<Arc<OutputBuffer>>,
    stats: Arc<Stats>,
    link: Arc<LinkShared>,
    cfg: EngineConfig,
    tx: tokio::sync::mpsc::Sender<Harvest>,
    seq: u64,
    last_pause: Duration,
    degrade_after: Duration,
    backup_lost: Option<Arc<dyn Fn() + Send + Sync>>,
    /// The backup became a failover target (a sync completed) and has not been given up since
    /// (degraded): output released so far is covered by its replica, so a re-sync must keep
    /// output held until a checkpoint after it is committed.
    protected_once: bool,
    /// Watches the guest's threads to end a coalescing window early (None: unavailable).
    idle: Option<vmm::procstat::IdleProbe>,
    /// Copies a checkpoint's pages on two threads (None: one).
    copier: Option<vmm::copier::PageCopier>,
    /// Raises this thread's priority for each pause.
    rt: vmm::sched::RtPriority,
    /// Pages pre-copied in this epoch (in-epoch pre-copy), not yet in a checkpoint: they were
    /// taken out of the dirty log, so the next checkpoint must carry them (dropped when a sync
    /// starts: its baseline resends everything).
    carry: Option<(Vec<u64>, Vec<u8>)>,
    /// Pages of the last checkpoint.
    last_pages: usize,
    /// Epochs left without pre-copy (it did not pay off), and the next rest.
    precopy_rest: u32,
    precopy_rest_next: u32,
    /// Whether the last epoch pre-copied (for the log).
    precopy_on: bool,
    /// The sync under way (for its summary).
    sync_run: SyncRun,
    /// The current series holds a full copy: round 0 shipped every page of memory since its
    /// baseline. While it does, a sync the link interrupted (or one after running degraded)
    /// goes on from a pre-copy round, whose dirty log holds every page written since the last
    /// harvest, instead of copying everything again.
    series_complete: bool,
    /// Pages a pre-copy round harvested (out of the dirty log) and could not ship before the
    /// link went down: the next round sends them too.
    unshipped: Vec<u64>,
}

/// Counts of the sync under way.
#[derive(Debug, Clone, Copy)]
struct SyncRun {
    started: Instant,
    pages: u64,
    pieces: u64,
    largest: u64,
    /// It went on from a pre-copy round over the replica the backup held, not a full copy.
    catch_up: bool,
}

impl SyncRun {
    fn new() -> Self {
        Self { started: Instant::now(), pages: 0, pieces: 0, largest: 0, catch_up: false }
    }

    fn shipped(&mut self, pages: u64) {
        self.pages += pages;
        self.pieces += 1;
        self.largest = self.largest.max(pages);
    }
}

impl Engine {
    /// An engine for `vm`, handing harvests to `tx`.
    pub fn new(
        vm: Arc<Mutex<Vm>>,
        output: Option<Arc<OutputBuffer>>,
        stats: Arc<Stats>,
        link: Arc<LinkShared>,
        cfg: EngineConfig,
        tx: tokio::sync::mpsc::Sender<Harvest>,
        degrade_after: Duration,
    ) -> Self {
        Self {
            vm,
            output,
            stats,
            link,
            tx,
            seq: 0,
            last_pause: Duration::ZERO,
            degrade_after,
            backup_lost: None,
            protected_once: false,
            idle: None,
            copier: None,
            rt: vmm::sched::RtPriority::new(cfg.pause_rt_priority),
            carry: None,
            last_pages: 0,
            precopy_rest: 0,
            precopy_rest_next: PRECOPY_REST,
            precopy_on: false,
            sync_run: SyncRun::new(),
            series_complete: false,
            unshipped: Vec::new(),
            cfg,
        }
    }

    /// With arbitration: instead of releasing output when the backup is lost, call `hook`
    /// (which asks the group to run degraded; output flows once the group agreed).
    pub fn on_backup_lost(mut self, hook: Arc<dyn Fn() + Send + Sync>) -> Self {
        self.backup_lost = Some(hook);
        self
    }

    fn vm(&self) -> std::sync::MutexGuard<'_, Vm> {
        self.vm.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&mut self, h: Harvest) -> Result<(), EngineError> {
        self.link.started();
        tracing::debug!(seq = h.seq, wall_ns = vmm::devices::virtio::net::wall_ns(), "harvest to the link");
        self.tx.blocking_send(h).map_err(|_| EngineError::LinkClosed)
    }

    fn stopping(&self) -> bool {
        self.link.stop.load(Ordering::SeqCst)
    }

    /// Runs until stopped. The first phase is a full sync. An error that ends the engine moves
    /// protection to [`ProtectionState::Failed`] and gives the backup up as a lost backup is
    /// given up (output then flows with the group's consent, or at once without arbitration),
    /// so a dead engine never leaves output held with nobody to release it.
    pub fn run(mut self) -> Result<(), EngineError> {
        if self.cfg.parallel_copy {
            match vmm::copier::PageCopier::with_priority(self.cfg.pause_rt_priority) {
                Ok(c) => self.copier = Some(c),
                Err(e) => tracing::warn!("no page-copy helper thread ({e}): the pause copies on one thread"),
            }
        }
        if self.cfg.idle_end && self.cfg.timing.coalesce.is_some() && self.cfg.timing.fixed.is_none() {
            match vmm::procstat::IdleProbe::guest_threads() {
                Ok(p) => self.idle = Some(p),
                Err(e) => {
                    tracing::warn!("cannot watch the guest's threads ({e}): output waits the whole coalescing window")
                }
            }
        }
        // Each vCPU thread captures its own state as it parks, beside the harvest and copy
        // (docs/protection.md, "Harvest"; A/Bs in docs/benchmarks-history.md, session 10).
        self.vm().set_capture_at_park(true);
        let result = self.run_epochs();
        self.vm().set_capture_at_park(false);
        if let Err(e) = &result
            && self.stopping()
        {
            // Asked to stop: the link may have ended first. Not a failure (and a reverse copy
            // whose source gave it up must not be fenced for it).
            tracing::debug!("epoch engine stopped on request ({e})");
            return Ok(());
        }
        if let Err(e) = &result {
            tracing::error!("epoch engine stopped: {e}");
            self.give_up_backup();
            self.link.reset_in_flight();
            self.stats.set_state(ProtectionState::Failed, &format!("epoch engine stopped: {}", error_chain(e)));
        }
        result
    }

    /// Stops relying on the backup: with arbitration asks the group to run degraded (output
    /// flows once it agreed), without it releases held output and passes frames through.
    fn give_up_backup(&mut self) {
        self.protected_once = false;
        match &self.backup_lost {
            Some(hook) => hook(),
            // Reverse checkpoints never release output the source did not acknowledge.
            None if self.cfg.reverse => tracing::error!("reverse checkpoints stopped: output stays held"),
            None => {
                if let Some(o) = &self.output {
                    o.set_passthrough(true);
                }
            }
        }
    }

    fn run_epochs(&mut self) -> Result<(), EngineError> {
        let mut phase = if self.cfg.reverse {
            // The source holds the guest as of the switch-over: nothing to sync.
            self.protected_once = true;
            self.stats.set_state(ProtectionState::Syncing, "reverse checkpoints started");
            Phase::Protected
        } else {
            self.stats.set_state(ProtectionState::Syncing, "protection started");
            Phase::Sync { round: 0 }
        };
        let mut link_down_since: Option<Instant> = None;
        let mut failures = 0u32;
        while !self.stopping() {
            // The link task is gone for good (it ended or panicked): nothing will ever ack or
            // release output again.
            if self.tx.is_closed() {
                return Err(EngineError::LinkClosed);
            }
            // Link health: degrade when the backup has been unreachable too long.
            if self.link.up.load(Ordering::SeqCst) {
                link_down_since = None;
                if phase == Phase::Degraded {
                    self.sync_run = SyncRun::new();
                    phase = self.sync_again();
                    let why = if phase == (Phase::Sync { round: 0 }) {
                        "backup reachable again: re-syncing"
                    } else {
                        "backup reachable again: catching up from its replica (only pages written since go)"
                    };
                    self.stats.set_state(ProtectionState::Syncing, why);
                }
            } else {
                let since = *link_down_since.get_or_insert_with(Instant::now);
                let dead = self.link.backup_dead.load(Ordering::SeqCst);
                // Reverse checkpoints never run degraded: output waits for the source (or the
                // copy is fenced), see `EngineConfig::reverse`.
                if !self.cfg.reverse && phase != Phase::Degraded && (dead || since.elapsed() >= self.degrade_after) {
                    phase = Phase::Degraded;
                    self.give_up_backup();
                    self.link.reset_in_flight();
                    self.stats.set_state(
                        ProtectionState::Degraded,
                        &if dead {
                            format!("the backup's process is gone (after {} ms)", since.elapsed().as_millis())
                        } else {
                            format!("backup unreachable for {} ms", since.elapsed().as_millis())
                        },
                    );
                }
                if phase != Phase::Protected {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
            }
            if self.link.need_baseline.load(Ordering::SeqCst) && self.cfg.reverse {
                // A reverse series has no baseline to give (this copy may not even hold every
                // page yet): it cannot go on.
                return Err(EngineError::Baseline);
            }
            if self.link.need_baseline.load(Ordering::SeqCst) {
                // Harvests taken before this point are stale once the new baseline is sent: mark
                // the floor before clearing the flag, so the link drops such a harvest that the
                // sender refuses (it wants a baseline) instead of asking for a second re-sync.
                self.link.sync_floor.store(self.seq + 1, Ordering::SeqCst);
                self.link.need_baseline.store(false, Ordering::SeqCst);
                tracing::warn!(
                    output_held = self.protected_once,
                    "backup needs a new baseline: re-syncing (output stays held until a checkpoint after it is committed)"
                );
                self.link.reset_in_flight();
                phase = Phase::Sync { round: 0 };
                self.stats.set_state(ProtectionState::Syncing, "backup asked for a baseline");
            }
            phase = match phase {
                Phase::Sync { round } => self.sync_round(round)?,
                Phase::Protected => {
                    match self.checkpoint() {
                        Ok(()) => failures = 0,
                        Err(EngineError::LinkClosed) => return Err(EngineError::LinkClosed),
                        Err(e) => {
                            // A failed pause leaves the guest running (the VM rolls back):
                            // try again next epoch, give up only if it keeps failing.
                            failures += 1;
                            tracing::error!(failures, "checkpoint failed: {e}");
                            if failures >= 20 {
                                return Err(e);
                            }
                        }
                    }
                    Phase::Protected
                }
                Phase::Degraded => Phase::Degraded,
            };
        }
        self.stats.set_state(ProtectionState::Stopping, "protection stopped");
        // A reverse series stopped on purpose: the owner decides what its held output becomes
        // (released once the source gave its copy up, never otherwise).
        if !self.cfg.reverse
            && let Some(o) = &self.output
        {
            o.set_passthrough(true);
        }
        Ok(())
    }

    /// One pre-copy round; returns the next phase.
    ///
    /// Output is never released here. On the first sync (and after a degrade the group agreed
    /// to) the buffer is already passing frames through: no replica is a failover target. On a
    /// *re*-sync the old replica still is the failover target (the backup keeps it until a
    /// checkpoint of the new sync is committed, see `backup::replica`), so output produced
    /// from now on stays held until that checkpoint is acknowledged (DESIGN.md invariant 1).
    fn sync_round(&mut self, round: u32) -> Result<Phase, EngineError> {
        if self.protected_once {
            failover::failpoint::hit("primary.resync");
        }
        let t0 = Instant::now();
        if round == 0 {
            // The baseline resends everything: pre-copied pages of an epoch that never became a
            // checkpoint are stale (the dirty log is reset below).
            if let Some((_, data)) = self.carry.take() {
                self.link.recycle(data);
            }
            self.sync_run = SyncRun::new();
            self.series_complete = false;
            self.unshipped.clear();
        }
        let seq = self.seq + 1;
        // Pages out of the dirty log that never reached the link: an earlier round's unshipped
        // ones, and an in-epoch pre-copy's that no checkpoint took (both copied again now, as
        // they are).
        let mut extra = std::mem::take(&mut self.unshipped);
        if round > 0
            && let Some((pfns, data)) = self.carry.take()
        {
            self.link.recycle(data);
            extra.extend(pfns);
        }
        let (pfns, total_pages) = {
            let mut vm = self.vm();
            let layout = vmm::memory::layout_of(vm.memory());
            let pfns: Vec<u64> = if round == 0 {
                // Start dirty tracking now, then copy everything: later rounds resend what
                // changed meanwhile.
                vm.enable_dirty_log().map_err(|source| EngineError::Vm { seq, source })?;
                let hot = vmm::dirty::HotPagesConfig {
                    max_epochs: self.cfg.hot_page_epochs,
                    window: self.cfg.hot_page_window,
                    ..Default::default()
                };
                vm.set_hot_pages(hot).map_err(|source| EngineError::Vm { seq, source })?;
                layout
                    .iter()
                    .flat_map(|&(gpa, size)| {
                        let first = gpa / PAGE_SIZE as u64;
                        first..first + size / PAGE_SIZE as u64
                    })
                    .collect()
            } else {
                let mut pfns: Vec<u64> =
                    vm.harvest_dirty().map_err(|source| EngineError::Vm { seq, source })?.pages().collect();
                if !extra.is_empty() {
                    pfns.append(&mut extra);
                    pfns.sort_unstable();
                    pfns.dedup();
                }
                pfns
            };
            (pfns, memory_pages(&layout))
        };
        let Some(pages) = self.ship_round(round, &pfns, total_pages)? else {
            return Ok(self.sync_again());
        };
        if round == 0 {
            self.series_complete = true;
        }
        tracing::info!(round, pages, total_pages, ms = t0.elapsed().as_millis() as u64, "sync round copied");
        // Let this round land before measuring the next: the dirty set then reflects the
        // time the round took on the wire.
        if !self.wait_for_room(1)? {
            return Ok(self.sync_again());
        }
        let converged = round > 0 && pages < self.cfg.precopy_stop_pages;
        if converged || round >= self.cfg.precopy_max_rounds {
            // The first consistent checkpoint ends the sync.
            if let Some(o) = &self.output {
                o.begin(self.seq + 1);
                o.set_passthrough(false);
            }
            let run = self.sync_run;
            let summary = SyncSummary {
                rounds: round,
                pages: run.pages,
                pieces: run.pieces,
                largest_piece_pages: run.largest,
                ms: run.started.elapsed().as_millis() as u64,
                catch_up: run.catch_up,
            };
            tracing::info!(
                rounds = summary.rounds,
                pages = summary.pages,
                pieces = summary.pieces,
                largest_piece_pages = summary.largest_piece_pages,
                ms = summary.ms,
                catch_up = summary.catch_up,
                "sync complete"
            );
            // Before the checkpoint, whose ack makes the state `protected`: status never says
            // `protected` with a sync under way.
            {
                let mut s = self.stats.lock();
                s.sync = None;
                s.last_sync = Some(summary);
            }
            self.checkpoint()?;
            self.protected_once = true;
            return Ok(Phase::Protected);
        }
        Ok(Phase::Sync { round: round + 1 })
    }

    /// Ships sync round `round`'s pages `pfns` (ascending; with round 0 every page of memory,
    /// `total_pages` of them) in pieces of at most [`EngineConfig::sync_piece_pages`], each
    /// copied just before it goes and handed to the link as its own epoch, at most
    /// [`SYNC_PIECES_IN_FLIGHT`] unacknowledged. Round 0's first piece is the baseline (the
    /// replica starts from zero, so round 0 leaves zero pages out); every other piece is a
    /// pre-copy epoch on top of it. Between pieces the sessions on both ends run their
    /// heartbeats, and a piece holds the VM's lock only while it is copied. Returns the pages
    /// sent, or `None` when the sync must start again (the link went down or wants a new
    /// baseline, or protection is stopping).
    fn ship_round(&mut self, round: u32, pfns: &[u64], total_pages: u64) -> Result<Option<u64>, EngineError> {
        let piece = self.cfg.sync_piece_pages.max(1);
        let full = round == 0;
        let mut rest = pfns.iter().copied();
        let (mut pages, mut scanned, mut pieces) = (0u64, 0u64, 0u64);
        loop {
            if self.sync_cut_off() || (pieces > 0 && !self.wait_for_room(SYNC_PIECES_IN_FLIGHT)?) {
                if !full {
                    // Out of the dirty log, never shipped: the next round must send them.
                    self.unshipped.extend(rest);
                }
                return Ok(None);
            }
            let seq = self.seq + 1;
            let t0 = Instant::now();
            let most = piece.min(rest.len());
            let mut taken = Vec::with_capacity(most);
            let mut data = Vec::with_capacity(most * PAGE_SIZE);
            let mut done = false;
            {
                let vm = self.vm();
                while taken.len() < piece {
                    let Some(pfn) = rest.next() else {
                        done = true;
                        break;
                    };
                    scanned += 1;
                    let at = data.len();
                    copy_pages(vm.memory(), std::iter::once(pfn), &mut data)
                        .map_err(|source| EngineError::Memory { seq, source })?;
                    if full && data[at..].iter().all(|&b| b == 0) {
                        data.truncate(at);
                    } else {
                        taken.push(pfn);
                    }
                }
            }
            let n = taken.len() as u64;
            // The baseline always goes (it starts the series, even over an all-zero guest), and
            // so does a later round's only piece; an empty piece otherwise carries nothing.
            if pieces == 0 || n > 0 {
                let kind = if full && pieces == 0 { HarvestKind::Baseline } else { HarvestKind::Precopy };
                self.seq = seq;
                if kind == HarvestKind::Baseline {
                    self.link.sync_floor.store(seq, Ordering::SeqCst);
                }
                let (pfns, state, digest, output) = (taken, Vec::new(), None, Vec::new());
                self.send(Harvest { seq, kind, pfns, data, state, digest, taken_at: t0, output })?;
                self.sync_run.shipped(n);
                pages += n;
                pieces += 1;
                tracing::debug!(round, seq, pages = n, scanned, "sync piece handed to the link");
            }
            let progress = if full { scanned } else { total_pages };
            self.stats.lock().sync = Some(SyncProgress { round, pages, total_pages, scanned: progress, pieces });
            if done {
                return Ok(Some(pages));
            }
        }
    }

    /// Where a sync goes on after the link went down (or after running degraded): from a
    /// pre-copy round while the series holds a full copy (the backup's replica has every page
    /// shipped so far: a resumed session resends what it had not acknowledged, and a harvest
    /// the link had to drop asks for a new baseline instead), from a new full copy otherwise.
    /// Only checkpoints taken from now on may make the state `protected` again.
    fn sync_again(&mut self) -> Phase {
        self.link.sync_floor.store(self.seq + 1, Ordering::SeqCst);
        if self.series_complete && !self.link.need_baseline.load(Ordering::SeqCst) {
            self.sync_run.catch_up = true;
            tracing::info!(
                unshipped = self.unshipped.len(),
                "sync goes on from a pre-copy round: the series holds a full copy"
            );
            Phase::Sync { round: 1 }
        } else {
            Phase::Sync { round: 0 }
        }
    }

    /// Waits until fewer than `limit` harvests are unacknowledged. False when the sync must
    /// start again instead (the link went down or wants a new baseline, or protection is
    /// stopping).
    fn wait_for_room(&self, limit: usize) -> Result<bool, EngineError> {
        while !self.link.wait_room(limit, Duration::from_millis(100)) {
            if self.tx.is_closed() {
                return Err(EngineError::LinkClosed);
            }
            if self.sync_cut_off() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The sync under way must stop: protection is stopping, the link went down, or it wants a
    /// new baseline.
    fn sync_cut_off(&self) -> bool {
        self.stopping() || !self.link.up.load(Ordering::SeqCst) || self.link.need_baseline.load(Ordering::SeqCst)
    }

    /// Waits until output is held or `until` (output-driven epochs only; None at once
    /// otherwise): when the first held frame arrived.
    fn wait_for_output(&self, until: Instant) -> Option<Instant> {
        match (&self.output, self.cfg.timing.fixed, self.cfg.timing.coalesce) {
            (Some(o), None, Some(_)) => o.wait_for_output(until),
            _ => None,
        }
    }

    /// In-epoch pre-copy ([`EngineConfig::epoch_precopy`]): harvests and copies the pages
    /// dirtied so far while the guest runs, into `carry`. Returns how many pages.
    fn precopy(&mut self) -> Result<usize, EngineError> {
        let seq = self.seq + 1;
        let (pfns, data) = {
            let mut vm = self.vm();
            // Hot pages stay out: the pause's harvest has them anyway (their bits stay set).
            let dirty = vm.harvest_dirty_leaving_kept().map_err(|source| EngineError::Vm { seq, source })?;
            let pfns: Vec<u64> = dirty.pages().collect();
            let (mut data, _) = self.link.buffer(pfns.len() * PAGE_SIZE);
            if let Err(source) = copy_pages(vm.memory(), pfns.iter().copied(), &mut data) {
                // These pages left the dirty log: only a new baseline covers them now.
                self.link.need_baseline.store(true, Ordering::SeqCst);
                return Err(EngineError::Memory { seq, source });
            }
            (pfns, data)
        };
        let n = pfns.len();
        if !self.precopy_on {
            self.precopy_on = true;
            tracing::info!(seq, pages = n, "in-epoch pre-copy on");
        }
        let merged = match self.carry.take() {
            Some(older) => {
                let m = self.merge(older, (pfns, data));
                (m.pfns, m.data)
            }
            None => (pfns, data),
        };
        self.carry = Some(merged);
        Ok(n)
    }

    /// [`merge_pages`] into a recycled buffer, recycling the inputs' buffers.
    fn merge(&self, older: (Vec<u64>, Vec<u8>), newer: (Vec<u64>, Vec<u8>)) -> Merged {
        let (out, _) = self.link.buffer((older.0.len() + newer.0.len()) * PAGE_SIZE);
        let merged = merge_pages((&older.0, &older.1), (&newer.0, &newer.1), out);
        self.link.recycle(older.1);
        self.link.recycle(newer.1);
        merged
    }

    /// Whether this epoch pre-copies: configured, the epoch long enough, the last checkpoint
    /// big enough to be worth it, and not resting after one that did not pay off.
    fn wants_precopy(&mut self, silent: Duration) -> Option<Duration> {
        let lead = self.cfg.epoch_precopy.filter(|l| silent >= *l * 2)?;
        if self.precopy_rest > 0 {
            self.precopy_rest -= 1;
            return None;
        }
        (self.last_pages >= PRECOPY_MIN_PAGES).then_some(lead)
    }

    /// With output held: waits out the coalescing window (until `end`), or less once the guest
    /// went idle or the epoch held `burst` frames (see [`coalesce`]). Some(true) if it ended
    /// early, None if asked to stop.
    fn nap_until_idle(&mut self, floor: Instant, end: Instant, burst: u32) -> Option<bool> {
        let output = self.output.clone().filter(|_| self.cfg.burst_end);
        let complete = || output.as_ref().is_some_and(|o| o.frames_this_epoch() >= burst.max(1));
        match self.idle.as_mut() {
            Some(probe) => coalesce(&self.link, floor, end, || probe.idle(), complete),
            None if output.is_some() => coalesce(&self.link, floor, end, || false, complete),
            None => self.link.nap_until(end).then_some(false),
        }
    }

    /// One protected epoch: wait, pause, harvest, resume, hand off.
    fn checkpoint(&mut self) -> Result<(), EngineError> {
        let timing = self.cfg.timing;
        let silent = timing.next(self.last_pause);
        let epoch_start = Instant::now();
        let mut first_output = None;
        let mut precopied = 0;
        if let Some(lead) = self.wants_precopy(silent) {
            let at = epoch_start + silent - lead;
            first_output = self.wait_for_output(at);
            if first_output.is_none() {
                if !self.link.nap_until(at) {
                    return Ok(());
                }
                precopied = self.precopy()?;
            }
        }
        if first_output.is_none() {
            first_output = self.wait_for_output(epoch_start + silent);
        }
        let burst = self.output.as_ref().map_or(u32::MAX, |o| o.frames_last_epoch());
        let end = timing.end(epoch_start, silent, first_output, burst);
        let ended_idle = match first_output {
            Some(_) => match self.nap_until_idle(epoch_start + timing.min, end, burst) {
                Some(idle) => idle,
                None => return Ok(()),
            },
            None if !self.link.nap_until(end) => return Ok(()),
            None => false,
        };
        let t_end = Instant::now();
        if !self.link.wait_room(self.cfg.window, Duration::from_millis(200)) {
            return Ok(());
        }
        let t_room = Instant::now();
        self.seq += 1;
        let seq = self.seq;
        let verify = self.cfg.verify_every > 0 && seq.is_multiple_of(self.cfg.verify_every);
        // Nothing else on the host preempts the pause (see `vmm::sched`); dropped after resume.
        let raised = self.rt.raise();
        let mut vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        let t0 = Instant::now();
        // Wall-clock stamps of the pause, for timelines across threads and processes.
        tracing::debug!(seq, wall_ns = vmm::devices::virtio::net::wall_ns(), "pause begin");
        vm.pause().map_err(|source| EngineError::Vm { seq, source })?;
        let t_paused = t0.elapsed();
        failover::failpoint::hit("primary.paused");
        let result = (|| {
            let dirty = vm.harvest_dirty().map_err(|source| EngineError::Vm { seq, source })?;
            let t_harvest = t0.elapsed();
            failover::failpoint::hit("primary.harvest");
            let pfns: Vec<u64> = dirty.pages().collect();
            let (mut data, warm) = self.link.buffer(pfns.len() * PAGE_SIZE);
            let helped_before = self.copier.as_ref().map_or(0, |c| c.helped());
            let (state, t_state) = match self.copier.as_mut() {
                // The state is captured while the helper starts on the pages, then both copy.
                Some(c) => {
                    let (copied, state) = c.copy(vm.memory(), &pfns, &mut data, || (vm.save_state(), t0.elapsed()));
                    copied.map_err(|_| EngineError::Memory {
                        seq,
                        source: vm_memory::GuestMemoryError::InvalidGuestAddress(vm_memory::GuestAddress(0)),
                    })?;
                    state
                }
                None => {
                    copy_pages(vm.memory(), pfns.iter().copied(), &mut data)
                        .map_err(|source| EngineError::Memory { seq, source })?;
                    (vm.save_state(), t0.elapsed())
                }
            };
            let state = state.map_err(|source| EngineError::Vm { seq, source })?;
            // Where a pause goes (debug: `UNDERSTUDY_LOG=primary::engine=debug`); with the
            // parallel copy the state is taken first, beside the copy.
            tracing::debug!(
                seq,
                pages = pfns.len(),
                hot = vm.hot_pages(),
                parallel = self.copier.is_some(),
                warm,
                helper_pages = self.copier.as_ref().map_or(0, |c| c.helped()) - helped_before,
                precopied,
                stop_us = t_paused.as_micros() as u64,
                harvest_us = (t_harvest - t_paused).as_micros() as u64,
                state_done_us = (t_state - t_harvest).as_micros() as u64,
                copy_and_state_us = (t0.elapsed() - t_harvest).as_micros() as u64,
                "pause parts"
            );
            tracing::debug!(
                seq,
                output_after_us = first_output.map(|t| t.duration_since(epoch_start).as_micros() as u64),
                end_after_us = t_end.duration_since(epoch_start).as_micros() as u64,
                late_us = t_end.saturating_duration_since(end).as_micros() as u64,
                room_wait_us = t_room.duration_since(t_end).as_micros() as u64,
                ended_idle,
                "epoch timeline"
            );
            let digest =
                if verify { Some(vm.memory_digest().map_err(|source| EngineError::Vm { seq, source })?) } else { None };
            if let Some(o) = &self.output {
                o.begin(seq + 1);
            }
            Ok::<_, EngineError>((pfns, data, state, digest))
        })();
        vm.resume();
        tracing::debug!(seq, wall_ns = vmm::devices::virtio::net::wall_ns(), "pause end");
        let pause = t0.elapsed();
        let hot_pages = vm.hot_pages();
        drop(vm);
        drop(raised);
        let (mut pfns, mut data, state, digest) = result?;
        // Off the pause: the frames this epoch produced (final since the boundary moved) for the
        // backup's output log, behind the checkpoint on the wire.
        let forward = self.link.forward_output.load(Ordering::SeqCst);
        let output = self.output.as_ref().map_or_else(Vec::new, |o| o.take_for_backup(seq, forward));
        if let Some(pre) = self.carry.take() {
            // Off the pause: the pre-copied pages not dirtied again join the fresh ones.
            let pre_pages = pre.0.len();
            let m = self.merge(pre, (pfns, data));
            if m.both as f64 > pre_pages as f64 * PRECOPY_MAX_REDIRTY {
                // The guest rewrites what it dirtied: pre-copy only adds faults. Rest a while.
                self.precopy_rest = self.precopy_rest_next;
                self.precopy_rest_next = (self.precopy_rest_next * 2).min(PRECOPY_REST_MAX);
                self.precopy_on = false;
                tracing::info!(
                    seq,
                    pre_pages,
                    redirtied = m.both,
                    rest_epochs = self.precopy_rest,
                    "in-epoch pre-copy off for a while: the guest dirtied most pre-copied pages again"
                );
            } else {
                self.precopy_rest_next = PRECOPY_REST;
            }
            (pfns, data) = (m.pfns, m.data);
        }
        self.last_pages = pfns.len();
        let state = state.encode().map_err(|source| EngineError::State { seq, source })?;
        self.last_pause = pause;
        {
            let mut s = self.stats.lock();
            s.epochs += 1;
            s.last_submitted = seq;
            s.pause_us.push(pause.as_secs_f64() * 1e6);
            s.pause_seconds.observe(pause.as_secs_f64());
            s.dirty_pages.push(pfns.len() as f64);
            s.hot_pages = hot_pages;
            s.epoch_us.push(epoch_start.elapsed().as_secs_f64() * 1e6);
            s.harvest_times.push_back(t0);
            while s.harvest_times.len() > 4096 {
                s.harvest_times.pop_front();
            }
        }
        self.send(Harvest { seq, kind: HarvestKind::Checkpoint, pfns, data, state, digest, taken_at: t0, output })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_guest_ends_the_coalescing_window_early_but_not_before_the_floor() {
        let link = LinkShared::default();
        let t0 = Instant::now();
        let (floor, end) = (t0 + Duration::from_millis(2), t0 + Duration::from_millis(200));
        // Idle all along: ends just after the floor, on idleness.
        assert_eq!(coalesce(&link, floor, end, || true, || false), Some(true));
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(2) && took < Duration::from_millis(100), "{took:?}");
        // Never idle: the whole window.
        let t1 = Instant::now();
        assert_eq!(coalesce(&link, t1, t1 + Duration::from_millis(20), || false, || false), Some(false));
        assert!(t1.elapsed() >= Duration::from_millis(20));
        // Idle only every other look (a vCPU between exits): never twice in a row, so the window
        // runs out.
        let mut flip = false;
        let t2 = Instant::now();
        let r = coalesce(
            &link,
            t2,
            t2 + Duration::from_millis(20),
            || {
                flip = !flip;
                flip
            },
            || false,
        );
        assert_eq!(r, Some(false));
        // The burst came (the epoch holds as many frames as the previous one): at once, but
        // not before the floor; the guest never idle.
        let t4 = Instant::now();
        let mut looks = 0;
        let r = coalesce(
            &link,
            t4 + Duration::from_millis(3),
            t4 + Duration::from_secs(5),
            || false,
            || {
                looks += 1;
                true
            },
        );
        assert_eq!(r, Some(true));
        assert!(t4.elapsed() >= Duration::from_millis(3) && t4.elapsed() < Duration::from_secs(1));
        assert_eq!(looks, 1, "complete is asked only once the floor passed");
        // Asked to stop: None at once.
        link.stop.store(true, Ordering::SeqCst);
        let t3 = Instant::now();
        assert_eq!(
            coalesce(&link, t3 + Duration::from_millis(50), t3 + Duration::from_secs(5), || false, || false),
            None
        );
        assert!(t3.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn merged_pages_are_ascending_once_each_and_the_newer_copy_wins() {
        let pages = |pfns: &[u64], tag: u8| -> (Vec<u64>, Vec<u8>) {
            let data = pfns.iter().flat_map(|&p| vec![tag ^ p as u8; PAGE_SIZE]).collect();
            (pfns.to_vec(), data)
        };
        let older = pages(&[1, 3, 4, 9], 0x10);
        let newer = pages(&[0, 3, 5, 9, 12], 0x20);
        let Merged { pfns, data, both } = merge_pages((&older.0, &older.1), (&newer.0, &newer.1), vec![7; 3]);
        assert_eq!(both, 2);
        assert_eq!(pfns, vec![0, 1, 3, 4, 5, 9, 12]);
        assert_eq!(data.len(), pfns.len() * PAGE_SIZE);
        let tags: Vec<u8> = data.chunks(PAGE_SIZE).zip(&pfns).map(|(d, &p)| d[0] ^ p as u8).collect();
        assert_eq!(tags, vec![0x20, 0x10, 0x20, 0x10, 0x20, 0x20, 0x20], "3 and 9 from the newer copy");
        assert!(data.chunks(PAGE_SIZE).all(|d| d.iter().all(|&b| b == d[0])));
        // Either side empty.
        let none: (Vec<u64>, Vec<u8>) = (Vec::new(), Vec::new());
        let whole = |(pfns, data): (Vec<u64>, Vec<u8>)| Merged { pfns, data, both: 0 };
        assert_eq!(merge_pages((&none.0, &none.1), (&older.0, &older.1), Vec::new()), whole(older.clone()));
        assert_eq!(merge_pages((&older.0, &older.1), (&none.0, &none.1), Vec::new()), whole(older));
    }

    #[test]
    fn a_silent_guest_keeps_long_epochs_and_output_ends_them_soon() {
        let t = EpochTiming::default();
        let start = Instant::now();
        // Silent: 50 x the pause, within bounds.
        assert_eq!(t.next(Duration::from_micros(400)), Duration::from_millis(20));
        assert_eq!(t.next(Duration::from_millis(5)), Duration::from_millis(50));
        let busy = u32::MAX;
        assert_eq!(t.end(start, Duration::from_millis(20), None, busy), start + Duration::from_millis(20));
        // Output 3 ms in: the epoch ends one coalescing window later.
        let out = start + Duration::from_millis(3);
        assert_eq!(t.end(start, Duration::from_millis(20), Some(out), busy), out + Duration::from_micros(500));
        // The window follows the previous epoch's burst: 50 µs a frame, one frame's worth at
        // least, the configured window at most.
        assert_eq!(t.end(start, Duration::from_millis(20), Some(out), 0), out + Duration::from_micros(50));
        assert_eq!(t.end(start, Duration::from_millis(20), Some(out), 1), out + Duration::from_micros(50));
        assert_eq!(t.end(start, Duration::from_millis(20), Some(out), 4), out + Duration::from_micros(200));
        assert_eq!(t.end(start, Duration::from_millis(20), Some(out), 40), out + Duration::from_micros(500));
        // Output at once: not before the minimum.
        assert_eq!(t.end(start, Duration::from_millis(20), Some(start), busy), start + Duration::from_millis(1));
        // Output late in the epoch: never after its silent length.
        let late = start + Duration::from_millis(19_900) / 1000;
        assert_eq!(t.end(start, Duration::from_millis(20), Some(late), busy), start + Duration::from_millis(20));
        // A fixed length ignores output; so does coalescing turned off.
        let fixed = EpochTiming { fixed: Some(Duration::from_millis(10)), ..t };
        assert_eq!(fixed.end(start, fixed.next(Duration::ZERO), Some(start), 1), start + Duration::from_millis(10));
        let off = EpochTiming { coalesce: None, ..t };
        assert_eq!(off.end(start, Duration::from_millis(20), Some(start), 1), start + Duration::from_millis(20));
    }
}
