//! The sending side (primary, migration source): encodes checkpoints into frames, keeps them until
//! acknowledged, resends on request or reconnect, and starts over with a baseline when the
//! receiver cannot continue the series.

use crate::cache::{Cached, PageCache};
use crate::codec::{CodecConfig, DedupRef, PageEncoder};
use crate::frame::{MessageKind, begin_frame, finish_frame};
use crate::hash::{Digest, is_zero, xxh64, zero_page_hash};
use crate::limits::{FRAME_HEADER_LEN, MAX_BATCH_PAGES, MAX_EPOCH, MAX_STATE_LEN, MAX_WINDOW};
use crate::message::{
    EpochBegin, EpochEnd, Heartbeat, Hello, Lineage, MemoryLayout, Message, PageIndex, Position, ResendRequest,
    ResyncReason, ResyncRequest, Role, VmIdentity,
};
use crate::pageset::{PageEncoding, PageSetWriter};
use crate::session::{Endpoint, Input, Link, LinkState, Local, SessionError, Timing, Transmit};
use crate::version::{Feature, PROTOCOL_VERSION, oldest_accepted};
use crate::wire::{put_u32, put_u64};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// How a [`Sender`] behaves. [`SenderConfig::new`] fills in the defaults.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// [`Role::Primary`] or [`Role::MigrationSource`]; or [`Role::MigrationDestination`] for
    /// reverse checkpoints (a session in which the destination sends checkpoints back).
    pub role: Role,
    /// The VM.
    pub vm: VmIdentity,
    /// Its memory layout.
    pub layout: MemoryLayout,
    /// This sender's incarnation number: must differ between runs (use a random number). It names
    /// the checkpoint series this sender starts.
    pub instance: u64,
    /// Most epochs in flight (submitted, not acknowledged); also limited by the receiver's window.
    /// Default 4.
    pub window: u16,
    /// Encoded bytes kept for resending: a new epoch is refused while more than this is retained
    /// (one epoch may exceed it on its own). Default 256 MiB.
    pub max_retained_bytes: u64,
    /// Bytes of last-sent page copies kept for deltas and exact "unchanged" checks. Default
    /// 64 MiB.
    pub cache_bytes: u64,
    /// Which codecs to use.
    pub codecs: CodecConfig,
    /// Treat a page as unchanged on a hash match alone when its copy was evicted (collision
    /// probability 2^-64 per page; see `docs/protocol.md`). Default false.
    pub trust_hash: bool,
    /// Target payload of one page batch frame. Default 256 KiB (clamped to 16 KiB..=2 MiB).
    pub batch_bytes: usize,
    /// Largest state chunk. Default 256 KiB (clamped to 1 KiB..=1 MiB).
    pub state_chunk: usize,
    /// Heartbeats and idle detection.
    pub timing: Timing,
    /// The protocol version to speak: [`PROTOCOL_VERSION`] (the default), or an older one it
    /// accepts to act as an older build (tests of mixed versions, a staged rollout). Clamped to
    /// the versions this build accepts.
    pub version: u16,
    /// Post-copy pushes: [`SenderEvent::PushRoom`] is reported when sending takes the push queue
    /// to at most this many frames after pushes were queued. Default 2.
    pub push_low_water: usize,
}

impl SenderConfig {
    /// A configuration with the defaults.
    pub fn new(role: Role, vm: VmIdentity, layout: MemoryLayout, instance: u64) -> Self {
        Self {
            role,
            vm,
            layout,
            instance,
            window: 4,
            max_retained_bytes: 256 << 20,
            cache_bytes: 64 << 20,
            codecs: CodecConfig::default(),
            trust_hash: false,
            batch_bytes: 256 << 10,
            state_chunk: 256 << 10,
            timing: Timing::default(),
            version: PROTOCOL_VERSION,
            push_low_water: 2,
        }
    }
}

/// Why the sender needs a baseline before it can send more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaselineReason {
    /// Nothing was ever sent.
    Initial,
    /// On reconnect, the receiver does not hold a point of this sender's series that the
    /// retained epochs continue.
    CannotResume,
    /// The receiver asked for one.
    Requested(ResyncReason),
    /// On reconnect, the receiver speaks an older protocol version (this one) that cannot read
    /// epochs retained for it (they use an encoding of a later version).
    PeerVersion(u16),
}

/// What a [`Sender`] reports to its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderEvent {
    /// The session is established. `resumed_from` is the first epoch being resent (`None` when a
    /// baseline is needed first).
    Connected {
        /// The receiver's Hello.
        peer: Box<Hello>,
        /// First epoch (re)sent on this connection.
        resumed_from: Option<u64>,
    },
    /// The receiver committed every epoch up to `epoch`: output produced up to the end of that
    /// epoch may be released.
    Acked {
        /// The epoch.
        epoch: u64,
        /// Time from submit to ack, when the epoch was still retained.
        latency: Option<Duration>,
    },
    /// The next checkpoint must be a baseline ([`Sender::submit_baseline`]): every non-zero page.
    /// Epochs not yet acknowledged were dropped; the baseline's ack covers them.
    BaselineRequired {
        /// Why.
        reason: BaselineReason,
    },
    /// Post-copy: the receiver asks for pages; answer with [`Sender::send_pages`].
    PagesRequested {
        /// Request id.
        id: u64,
        /// Pages wanted, ascending.
        pfns: Vec<u64>,
    },
    /// Post-copy: sending took the push queue to at most [`SenderConfig::push_low_water`]
    /// frames: push more ([`Sender::push_pages`]). Once after each run of pushes (owed from the
    /// first `push_pages` after the last one), so a driver that counts its pushes always hears the
    /// real count again.
    PushRoom {
        /// Push frames still queued.
        queued: usize,
    },
    /// Post-copy, after a reconnect: part of the map of pages the destination holds
    /// ([`crate::Receiver::send_held`]); frames come with `seq` from 0, and the frame with fewer
    /// than [`crate::migration::MAP_RANGES_PER_FRAME`] runs is the last
    /// ([`crate::migration::PageMap::ends_held_map`]).
    PageMap(crate::migration::PageMap),
    /// Migration: the destination runs the guest, resumed from the state of the switch-over
    /// epoch.
    Resumed(crate::migration::Resumed),
    /// Migration: every page is at the destination (post-copy is over), with its numbers.
    Complete(crate::migration::Complete),
    /// The connection ended; reconnect unless `error` [`SessionError::is_permanent`].
    Disconnected {
        /// Why.
        error: SessionError,
    },
}

/// A migration message the sender cannot send.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MigrationError {
    /// The session is not a migration's forward session.
    #[error("{role:?} sends no migration messages (only a migration source sending checkpoints does)")]
    NotSource {
        /// Our role.
        role: Role,
    },
    /// The session is not established.
    #[error("no established session to send {what} on")]
    NotConnected {
        /// The message.
        what: &'static str,
    },
    /// The map of held pages is not ascending, disjoint runs of pages of the layout.
    #[error("switch-over map: run at page {first:#x} of {count} pages is out of order or outside the layout")]
    BadMap {
        /// The run's first page.
        first: u64,
        /// Its page count.
        count: u32,
    },
    /// The switch-over names an epoch that was never submitted.
    #[error("switch-over at epoch {epoch}, but the last epoch submitted is {last}")]
    NotSubmitted {
        /// The epoch named.
        epoch: u64,
        /// The last epoch submitted.
        last: u64,
    },
}

/// An inbound frame that cannot be forwarded (the caller counts it as dropped).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InboundError {
    /// No session is established.
    #[error("no session with the backup")]
    NotConnected,
    /// The backup did not announce an inbound log (an older build, or a migration peer).
    #[error("the peer keeps no inbound log")]
    Unsupported,
    /// Too many control messages wait for the transport.
    #[error("{queued} control messages queued, limit {limit}")]
    Backlog {
        /// Messages queued.
        queued: usize,
        /// The limit.
        limit: usize,
    },
    /// The frame is empty or larger than [`crate::limits::MAX_INBOUND_FRAME`].
    #[error("inbound frame of {len} bytes (1..={max} allowed)")]
    Length {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Most control messages queued before [`Sender::send_inbound`] refuses a frame: forwarding is
/// best effort and must not grow memory without bound while the transport is blocked.
pub const MAX_INBOUND_BACKLOG: usize = 1024;

/// An epoch's output that cannot be forwarded (the caller counts its frames as dropped).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OutputError {
    /// No session is established.
    #[error("no session with the backup")]
    NotConnected,
    /// The backup did not announce an output log (an older build, or a migration peer).
    #[error("the peer keeps no output log")]
    Unsupported,
    /// The epoch was never submitted (or is 0).
    #[error("output of epoch {epoch}, but the last epoch submitted is {last}")]
    NotSubmitted {
        /// The epoch named.
        epoch: u64,
        /// The last epoch submitted.
        last: u64,
    },
    /// Too many output bytes wait for the transport.
    #[error("{queued} output bytes queued, {adding} more would pass the limit of {limit}")]
    Backlog {
        /// Bytes queued.
        queued: usize,
        /// Bytes this epoch's output would add.
        adding: usize,
        /// The limit.
        limit: usize,
    },
    /// A frame is empty or larger than [`crate::limits::MAX_OUTPUT_FRAME`].
    #[error("output frame {index} of {len} bytes (1..={max} allowed)")]
    Length {
        /// Its index in the epoch's frames.
        index: usize,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Most bytes of `Output` messages queued before [`Sender::send_output`] refuses an epoch's
/// output: forwarding it is best effort (a promoted replica without it leaves the replies to the
/// guest's retransmission), and must not grow memory while checkpoints fill the link.
pub const MAX_OUTPUT_BACKLOG: usize = 4 << 20;

/// A checkpoint that cannot be submitted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SubmitError {
    /// The series has to restart: submit a baseline.
    #[error("a baseline is required before epoch {next}")]
    BaselineRequired {
        /// The epoch number the baseline will get.
        next: u64,
    },
    /// Too many epochs in flight.
    #[error("window full: {in_flight} epochs in flight, limit {limit}")]
    WindowFull {
        /// Epochs in flight.
        in_flight: usize,
        /// The limit.
        limit: usize,
    },
    /// Too many bytes retained for resending.
    #[error("retained data full: {bytes} bytes retained, limit {limit}")]
    RetainedFull {
        /// Bytes retained.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// A page is not in the memory layout.
    #[error("page {pfn:#x} is not in the memory layout")]
    OutOfLayout {
        /// The page frame number.
        pfn: u64,
    },
    /// Pages must come in strictly ascending pfn order.
    #[error("page {pfn:#x} does not follow page {prev:#x}")]
    Order {
        /// The page frame number.
        pfn: u64,
        /// The previous one.
        prev: u64,
    },
    /// A page's length is not the page size.
    #[error("page {pfn:#x}: {len} bytes, page size is {page_size}")]
    PageLength {
        /// The page frame number.
        pfn: u64,
        /// Its length.
        len: usize,
        /// The page size.
        page_size: usize,
    },
    /// The state blob is too large.
    #[error("state of {len} bytes over the limit of {max}")]
    StateTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: u64,
    },
    /// The next epoch number would be beyond [`MAX_EPOCH`] (unreachable in practice: a peer
    /// cannot announce more than [`crate::limits::MAX_ANNOUNCED_EPOCH`], which leaves 2^62
    /// numbers).
    #[error("epoch numbers exhausted: epoch {next} is beyond the limit {limit}")]
    EpochsExhausted {
        /// The epoch number the checkpoint would get.
        next: u64,
        /// The limit.
        limit: u64,
    },
    /// A page request answer holds too many pages.
    #[error("page response of {count} pages over the limit of {max}")]
    TooManyPages {
        /// Pages given.
        count: usize,
        /// The limit.
        max: usize,
    },
}

/// Counters for monitoring and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SenderStats {
    /// Epochs submitted.
    pub epochs: u64,
    /// Pages submitted (dirty pages).
    pub pages: u64,
    /// Pages per encoding, indexed by `PageEncoding as usize`.
    pub pages_by_encoding: [u64; 6],
    /// Payload bytes per encoding.
    pub payload_by_encoding: [u64; 6],
    /// Bytes of all frames encoded for epochs (first transmission).
    pub epoch_bytes: u64,
    /// Frames handed to the transport.
    pub frames_sent: u64,
    /// Bytes handed to the transport.
    pub bytes_sent: u64,
    /// Epoch frames sent again (resend requests, reconnects).
    pub frames_resent: u64,
    /// Baselines required.
    pub resyncs: u64,
    /// Post-copy: pages sent in answer to requests ([`Sender::send_pages`]).
    pub pages_served: u64,
    /// Post-copy: frame bytes of those answers.
    pub bytes_served: u64,
    /// Post-copy: pages pushed unasked ([`Sender::push_pages`]).
    pub pages_pushed: u64,
    /// Post-copy: frame bytes of those pushes.
    pub bytes_pushed: u64,
}

struct OutEpoch {
    epoch: u64,
    lineage: Lineage,
    baseline: bool,
    frames: Vec<Arc<Vec<u8>>>,
    bytes: u64,
    submitted: Instant,
    high_sent: usize,
    /// The oldest protocol version whose receiver can take these frames (2 once a dedup record
    /// is in them).
    needs_version: u16,
}

/// The sans-IO sending state machine. See the crate docs for the protocol and [`Endpoint`] for
/// how a transport drives it.
pub struct Sender {
    cfg: SenderConfig,
    local: Local,
    index: PageIndex,
    link: Link,
    cache: PageCache,
    encoder: PageEncoder,
    zero_page: Vec<u8>,
    window: VecDeque<OutEpoch>,
    retained: u64,
    send_epoch: u64,
    send_frame: usize,
    ready: bool,
    next_epoch: u64,
    last_submitted: u64,
    acked: u64,
    lineage: Option<Lineage>,
    needs_baseline: bool,
    peer_window: u16,
    peer_instance: Option<u64>,
    last_request: Option<u32>,
    last_sent: u64,
    responses: VecDeque<Transmit>,
    /// Epochs' output frames (`Output` messages), sent after every epoch frame queued, so a
    /// checkpoint and its ack never wait behind output; dropped with the connection.
    outputs: VecDeque<Transmit>,
    /// Bytes in `outputs`.
    output_bytes: usize,
    /// Post-copy pushes ([`crate::session::Channel::Bulk`]), sent after everything else.
    pushes: VecDeque<Transmit>,
    /// A `PushRoom` is owed: pushes were queued since the last one.
    push_room_owed: bool,
    events: VecDeque<SenderEvent>,
    stats: SenderStats,
    /// The pfns of the epoch being encoded, when dedup needs them (reused buffer).
    epoch_pfns: Vec<u64>,
    /// The agreed position the series started at, instead of a baseline ([`Sender::start_at`]).
    start: Option<Position>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("state", &self.link.state)
            .field("acked", &self.acked)
            .field("last_submitted", &self.last_submitted)
            .field("in_flight", &self.window.len())
            .field("needs_baseline", &self.needs_baseline)
            .finish_non_exhaustive()
    }
}

impl Sender {
    /// A sender with no connection; the first checkpoint must be a baseline.
    ///
    /// # Panics
    /// If `config.layout` is invalid or `config.role` may not send checkpoints (a backup): both
    /// programming errors.
    pub fn new(mut config: SenderConfig) -> Self {
        config.layout.validate().expect("sender memory layout is valid");
        assert!(config.role.may_send_checkpoints(), "a Sender needs a role that sends checkpoints");
        config.version = config.version.clamp(oldest_accepted(PROTOCOL_VERSION), PROTOCOL_VERSION);
        config.window = config.window.clamp(1, MAX_WINDOW);
        config.batch_bytes = config.batch_bytes.clamp(16 << 10, 2 << 20);
        config.state_chunk = config.state_chunk.clamp(1 << 10, 1 << 20);
        let index = PageIndex::new(&config.layout);
        let page_size = config.layout.page_size as usize;
        let mut cache = PageCache::new(index.pages() as usize, page_size, config.cache_bytes);
        if config.codecs.dedup && Feature::Dedup.in_version(config.version) {
            cache.enable_index();
        }
        let local = Local {
            role: config.role,
            vm: config.vm.clone(),
            layout: config.layout.clone(),
            sends: true,
            version: config.version,
            start: None,
        };
        let mut events = VecDeque::new();
        events.push_back(SenderEvent::BaselineRequired { reason: BaselineReason::Initial });
        Self {
            link: Link::new(config.timing),
            encoder: PageEncoder::new(config.codecs),
            zero_page: vec![0; page_size],
            cfg: config,
            local,
            index,
            cache,
            window: VecDeque::new(),
            retained: 0,
            send_epoch: 1,
            send_frame: 0,
            ready: false,
            next_epoch: 1,
            last_submitted: 0,
            acked: 0,
            lineage: None,
            needs_baseline: true,
            peer_window: MAX_WINDOW,
            peer_instance: None,
            last_request: None,
            last_sent: 0,
            responses: VecDeque::new(),
            outputs: VecDeque::new(),
            output_bytes: 0,
            pushes: VecDeque::new(),
            push_room_owed: false,
            events,
            stats: SenderStats::default(),
            epoch_pfns: Vec::new(),
            start: None,
        }
    }

    /// Starts the series at an agreed position instead of a baseline: a reverse session, in
    /// which the migration destination checkpoints the guest back to its source, which holds the
    /// guest as it was at the switch-over already ([`crate::migration::reverse_start`] gives the
    /// position both sides compute). The sender then needs no baseline: its first epoch is
    /// `start.epoch + 1`, in `start.lineage`, a delta on what the receiver holds; it announces
    /// the position in its `Hello`, and the session is refused ([`SessionError::Start`]) unless
    /// the receiver was told the same one ([`crate::Receiver::start_at`]). The page cache starts
    /// empty, so no epoch refers to content this series did not send (no dedup reference, delta
    /// or "unchanged" against the switch-over's pages). Reconnects resume from the receiver's
    /// last delivered epoch as in protection; a receiver that lost its copy asks for a baseline
    /// ([`SenderEvent::BaselineRequired`]).
    ///
    /// Only for a [`Role::MigrationDestination`], before the first [`Endpoint::connect`] and the
    /// first checkpoint.
    pub fn start_at(&mut self, start: Position) -> Result<(), crate::migration::StartError> {
        use crate::migration::StartError;
        if self.cfg.role != Role::MigrationDestination {
            return Err(StartError::Role { role: self.cfg.role, side: "sending checkpoints" });
        }
        if self.link.session > 0 {
            return Err(StartError::Begun { what: "connected" });
        }
        if self.stats.epochs > 0 {
            return Err(StartError::Begun { what: "a checkpoint was submitted" });
        }
        crate::migration::check_start(&start)?;
        self.lineage = Some(start.lineage);
        self.acked = start.epoch;
        self.last_submitted = start.epoch;
        self.next_epoch = start.epoch + 1;
        self.needs_baseline = false;
        self.cache.clear();
        self.events.retain(|e| !matches!(e, SenderEvent::BaselineRequired { reason: BaselineReason::Initial }));
        self.start = Some(start);
        self.local.start = Some(start);
        Ok(())
    }

    /// The agreed position the series started at ([`Sender::start_at`]), if any.
    pub fn start(&self) -> Option<Position> {
        self.start
    }

    /// Whether epochs encoded now may use the dedup encoding: allowed by the configuration and
    /// by the version of the last session (none before the first: the peer's version is unknown).
    fn dedup_on(&self) -> bool {
        self.cfg.codecs.dedup && Feature::Dedup.in_version(self.link.version)
    }

    /// Whether the next checkpoint must be a baseline.
    pub fn needs_baseline(&self) -> bool {
        self.needs_baseline
    }

    /// The number the next submitted epoch gets.
    pub fn next_epoch(&self) -> u64 {
        self.next_epoch
    }

    /// The last epoch acknowledged (0 for none).
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The last epoch submitted (0 for none).
    pub fn last_submitted(&self) -> u64 {
        self.last_submitted
    }

    /// Epochs submitted and not acknowledged that are still retained.
    pub fn in_flight(&self) -> usize {
        self.window.len()
    }

    /// Whether another epoch would be accepted now (window and retained bytes).
    pub fn can_submit(&self) -> bool {
        self.window.len() < self.window_limit()
            && (self.window.is_empty() || self.retained < self.cfg.max_retained_bytes)
    }

    /// The current series, once a baseline was submitted.
    pub fn lineage(&self) -> Option<Lineage> {
        self.lineage
    }

    /// Where the connection stands.
    pub fn link_state(&self) -> LinkState {
        self.link.state
    }

    /// The negotiated protocol version (0 before the handshake).
    pub fn version(&self) -> u16 {
        self.link.version
    }

    /// Counters.
    pub fn stats(&self) -> SenderStats {
        self.stats
    }

    /// `(copies held, copy capacity, evictions)` of the last-sent page cache.
    pub fn cache_stats(&self) -> (usize, usize, u64) {
        (self.cache.copies(), self.cache.capacity(), self.cache.evictions())
    }

    fn window_limit(&self) -> usize {
        usize::from(self.cfg.window.min(self.peer_window.max(1)))
    }

    /// Submits the checkpoint of the next epoch: the pages dirtied in it (strictly ascending pfns,
    /// each exactly one page) and the device/vCPU state blob. Encodes it at once (the caller may
    /// reuse its buffers when this returns) and returns the epoch number.
    pub fn submit<'a, I>(&mut self, now: Instant, pages: I, state: &[u8]) -> Result<u64, SubmitError>
    where
        I: IntoIterator<Item = (u64, &'a [u8])>,
        I::IntoIter: Clone,
    {
        self.submit_inner(now, pages.into_iter(), state, false)
    }

    /// Submits a baseline: every non-zero page of the guest (zero pages may be left out: the
    /// receiver starts from an all-zero replica) and the state. Starts a new series; always
    /// allowed (also when not required).
    pub fn submit_baseline<'a, I>(&mut self, now: Instant, pages: I, state: &[u8]) -> Result<u64, SubmitError>
    where
        I: IntoIterator<Item = (u64, &'a [u8])>,
        I::IntoIter: Clone,
    {
        self.submit_inner(now, pages.into_iter(), state, true)
    }

    fn submit_inner<'a, I>(&mut self, now: Instant, pages: I, state: &[u8], baseline: bool) -> Result<u64, SubmitError>
    where
        I: Iterator<Item = (u64, &'a [u8])> + Clone,
    {
        if !baseline && self.needs_baseline {
            return Err(SubmitError::BaselineRequired { next: self.next_epoch });
        }
        if self.next_epoch > MAX_EPOCH {
            return Err(SubmitError::EpochsExhausted { next: self.next_epoch, limit: MAX_EPOCH });
        }
        let limit = self.window_limit();
        if self.window.len() >= limit {
            return Err(SubmitError::WindowFull { in_flight: self.window.len(), limit });
        }
        if !self.window.is_empty() && self.retained >= self.cfg.max_retained_bytes {
            return Err(SubmitError::RetainedFull { bytes: self.retained, limit: self.cfg.max_retained_bytes });
        }
        if state.len() as u64 > MAX_STATE_LEN {
            return Err(SubmitError::StateTooLarge { len: state.len(), max: MAX_STATE_LEN });
        }
        let page_size = self.zero_page.len();
        let mut count = 0u64;
        let mut prev: Option<u64> = None;
        // Dedup may refer to a page above the one being encoded only if the epoch does not touch
        // it: keep the epoch's pfns to look that up (a baseline refers only to pages below).
        let keep_pfns = self.dedup_on() && !baseline;
        self.epoch_pfns.clear();
        for (pfn, page) in pages.clone() {
            if self.index.index(pfn).is_none() {
                return Err(SubmitError::OutOfLayout { pfn });
            }
            if let Some(prev) = prev
                && pfn <= prev
            {
                return Err(SubmitError::Order { pfn, prev });
            }
            if page.len() != page_size {
                return Err(SubmitError::PageLength { pfn, len: page.len(), page_size });
            }
            prev = Some(pfn);
            count += 1;
            if keep_pfns {
                self.epoch_pfns.push(pfn);
            }
        }
        let epoch = self.next_epoch;
        if baseline {
            self.cache.clear();
            self.lineage = Some(Lineage { origin: self.cfg.instance, baseline: epoch });
            self.needs_baseline = false;
        }
        let lineage = self.lineage.expect("a lineage exists once a baseline was submitted");
        let begin = EpochBegin { epoch, lineage, baseline, page_count: count, state_len: state.len() as u64 };
        let dedup_before = self.stats.pages_by_encoding[PageEncoding::Dedup as usize];
        let frames = self.encode_epoch(begin, pages, state);
        let needs_version = if self.stats.pages_by_encoding[PageEncoding::Dedup as usize] > dedup_before {
            PageEncoding::Dedup.since_version()
        } else {
            1
        };
        let bytes = frames.iter().map(|f| f.len() as u64).sum();
        self.next_epoch += 1;
        self.last_submitted = epoch;
        self.retained += bytes;
        self.stats.epochs += 1;
        self.stats.pages += count;
        self.stats.epoch_bytes += bytes;
        self.window.push_back(OutEpoch {
            epoch,
            lineage,
            baseline,
            frames,
            bytes,
            submitted: now,
            high_sent: 0,
            needs_version,
        });
        Ok(epoch)
    }

    fn encode_epoch<'a>(
        &mut self,
        begin: EpochBegin,
        pages: impl Iterator<Item = (u64, &'a [u8])>,
        state: &[u8],
    ) -> Vec<Arc<Vec<u8>>> {
        let epoch = begin.epoch;
        let baseline = begin.baseline;
        let mut frames = Vec::new();
        let mut one = Vec::new();
        Message::EpochBegin(begin).encode_frame(&mut one);
        frames.push(Arc::new(one));

        let mut crc = crc32fast::Hasher::new();
        let mut digest = Digest::default();
        let mut seq = 0u32;
        let page_size = self.zero_page.len();
        let zero_hash = zero_page_hash(page_size);
        let batch_bytes = self.cfg.batch_bytes;
        let capacity = batch_bytes + 2 * page_size + 1024;
        let start_batch = |buf: &mut Vec<u8>, seq: u32| {
            let at = begin_frame(buf, MessageKind::PageBatch);
            put_u64(buf, epoch);
            put_u32(buf, seq);
            (at, PageSetWriter::begin(buf))
        };
        let mut buf = Vec::with_capacity(capacity);
        let (mut at, mut w) = start_batch(&mut buf, seq);
        let dedup = self.dedup_on();
        for (pfn, page) in pages {
            let index = self.index.index(pfn).expect("checked before encoding");
            let dedup_payload;
            let (encoding, data, hash): (PageEncoding, &[u8], u64) = if is_zero(page) {
                self.cache.put_zero(index);
                (PageEncoding::Zero, &[], zero_hash)
            } else {
                let cached = self.cache.get(index);
                // A cached copy is compared first: equal means unchanged, and its hash is the
                // one remembered (no need to hash the page again).
                if let Cached::Copy(h, copy) = cached
                    && !baseline
                    && copy == page
                {
                    (PageEncoding::Unchanged, &[][..], h)
                } else {
                    let hash = xxh64(page);
                    let trusted = matches!(cached, Cached::Hash(h) if !baseline && self.cfg.trust_hash && h == hash);
                    if trusted {
                        (PageEncoding::Unchanged, &[][..], hash)
                    } else if let Some(from) =
                        dedup.then(|| self.duplicate_of(index, pfn, hash, page, baseline)).flatten()
                    {
                        dedup_payload = DedupRef::to(from, page).encode();
                        (PageEncoding::Dedup, &dedup_payload[..], hash)
                    } else {
                        let (encoding, data) = match self.cache.get(index) {
                            Cached::Copy(_, copy) if !baseline => self.encoder.encode(page, Some(copy)),
                            Cached::Zero if !baseline => self.encoder.encode(page, Some(&self.zero_page)),
                            _ => self.encoder.encode(page, None),
                        };
                        (encoding, data, hash)
                    }
                }
            };
            self.stats.pages_by_encoding[encoding as usize] += 1;
            self.stats.payload_by_encoding[encoding as usize] += data.len() as u64;
            w.push(&mut buf, pfn, encoding, data);
            if encoding.has_payload() {
                self.cache.put(index, hash, page);
            }
            digest.add(pfn, hash);
            if buf.len() - at >= batch_bytes || w.pages() as usize >= MAX_BATCH_PAGES {
                w.finish(&mut buf);
                finish_frame(&mut buf, at);
                crc.update(&buf[at + FRAME_HEADER_LEN..]);
                frames.push(Arc::new(std::mem::replace(&mut buf, Vec::with_capacity(capacity))));
                seq += 1;
                (at, w) = start_batch(&mut buf, seq);
            }
        }
        if w.pages() > 0 {
            w.finish(&mut buf);
            finish_frame(&mut buf, at);
            crc.update(&buf[at + FRAME_HEADER_LEN..]);
            frames.push(Arc::new(buf));
            seq += 1;
        }
        let mut offset = 0u64;
        for chunk in state.chunks(self.cfg.state_chunk) {
            let mut out = Vec::with_capacity(chunk.len() + 64);
            let at = begin_frame(&mut out, MessageKind::StateChunk);
            put_u64(&mut out, epoch);
            put_u32(&mut out, seq);
            put_u64(&mut out, offset);
            out.extend_from_slice(chunk);
            finish_frame(&mut out, at);
            crc.update(&out[FRAME_HEADER_LEN..]);
            frames.push(Arc::new(out));
            offset += chunk.len() as u64;
            seq += 1;
        }
        let mut out = Vec::new();
        Message::EpochEnd(EpochEnd {
            epoch,
            frames: seq,
            page_count: begin.page_count,
            state_len: begin.state_len,
            checksum: crc.finalize(),
            digest: digest.finish(),
        })
        .encode_frame(&mut out);
        frames.push(Arc::new(out));
        frames
    }

    /// A page the receiver holds, at this point of the epoch, with the same content as `page`
    /// (page `index`, frame `pfn`, content hash `hash`), if the content index knows one that a
    /// reference may name: a page below `pfn` (sent earlier in this epoch, or untouched by it), or
    /// one above that this epoch does not touch (not in a baseline, whose receiver starts from
    /// zero). A cached copy is compared byte for byte; a page known by its hash only is taken on
    /// the hash, and the reference's check lets the receiver catch a collision.
    fn duplicate_of(&mut self, index: usize, pfn: u64, hash: u64, page: &[u8], baseline: bool) -> Option<u64> {
        let other = self.cache.find(hash, index)?;
        let from = self.index.pfn(other)?;
        if from > pfn && (baseline || self.epoch_pfns.binary_search(&from).is_ok()) {
            return None;
        }
        match self.cache.get(other) {
            Cached::Copy(_, copy) => (copy == page).then_some(from),
            Cached::Hash(_) => Some(from),
            Cached::Zero | Cached::Unknown => None,
        }
    }

    /// Post-copy: answers page request `id` (>= 1) with `pages` (ascending pfns, each one page).
    /// Pages go self-contained (zero, lz4 or raw) on [`crate::Channel::Stream`], ahead of
    /// checkpoint data and of every push. Not kept across a reconnect: the destination asks
    /// again.
    pub fn send_pages<'a, I>(&mut self, id: u64, pages: I) -> Result<(), SubmitError>
    where
        I: IntoIterator<Item = (u64, &'a [u8])>,
    {
        let (frames, count) = self.encode_pages(id, pages)?;
        self.stats.pages_served += count;
        for f in frames {
            self.stats.bytes_served += f.len() as u64;
            self.responses.push_back(Transmit::new(Arc::new(f), crate::session::Channel::Stream));
        }
        Ok(())
    }

    /// Post-copy: pages pushed unasked (ascending pfns, each one page), as `PageResponse` id 0
    /// frames encoded as [`Sender::send_pages`] does. They queue apart and go on
    /// [`crate::Channel::Bulk`] after every other transmit, so a demand answer never waits behind
    /// them. Push while [`Sender::pushes_queued`] is small and wait for
    /// [`SenderEvent::PushRoom`]: the queue has no limit of its own. Unsent pushes stay queued
    /// across a reconnect ([`Sender::discard_pushes`] drops them).
    pub fn push_pages<'a, I>(&mut self, pages: I) -> Result<(), SubmitError>
    where
        I: IntoIterator<Item = (u64, &'a [u8])>,
    {
        let (frames, count) = self.encode_pages(0, pages)?;
        if count == 0 {
            return Ok(());
        }
        self.stats.pages_pushed += count;
        self.push_room_owed = true;
        for f in frames {
            self.stats.bytes_pushed += f.len() as u64;
            self.pushes.push_back(Transmit::new(Arc::new(f), crate::session::Channel::Bulk));
        }
        Ok(())
    }

    /// Push frames queued, not yet taken by [`Endpoint::poll_transmit`].
    pub fn pushes_queued(&self) -> usize {
        self.pushes.len()
    }

    /// Drops every push frame not yet sent (e.g. after a reconnect, once the destination's map
    /// of held pages says what is still missing); returns how many frames.
    pub fn discard_pushes(&mut self) -> usize {
        let n = self.pushes.len();
        self.pushes.clear();
        n
    }

    /// Encodes `pages` into `PageResponse` frames with id `id`; returns them and the page count.
    fn encode_pages<'a, I>(&mut self, id: u64, pages: I) -> Result<(Vec<Vec<u8>>, u64), SubmitError>
    where
        I: IntoIterator<Item = (u64, &'a [u8])>,
    {
        let page_size = self.zero_page.len();
        let mut prev: Option<u64> = None;
        let mut count = 0u64;
        let mut out = Vec::new();
        let mut at = begin_frame(&mut out, MessageKind::PageResponse);
        put_u64(&mut out, id);
        let mut w = PageSetWriter::begin(&mut out);
        let mut frames = Vec::new();
        for (pfn, page) in pages {
            if self.index.index(pfn).is_none() {
                return Err(SubmitError::OutOfLayout { pfn });
            }
            if let Some(prev) = prev
                && pfn <= prev
            {
                return Err(SubmitError::Order { pfn, prev });
            }
            if page.len() != page_size {
                return Err(SubmitError::PageLength { pfn, len: page.len(), page_size });
            }
            prev = Some(pfn);
            count += 1;
            let (encoding, data) =
                if is_zero(page) { (PageEncoding::Zero, &[][..]) } else { self.encoder.encode(page, None) };
            w.push(&mut out, pfn, encoding, data);
            if out.len() - at >= self.cfg.batch_bytes || w.pages() as usize >= MAX_BATCH_PAGES {
                w.finish(&mut out);
                finish_frame(&mut out, at);
                frames.push(std::mem::take(&mut out));
                at = begin_frame(&mut out, MessageKind::PageResponse);
                put_u64(&mut out, id);
                w = PageSetWriter::begin(&mut out);
            }
        }
        if w.pages() > 0 || frames.is_empty() {
            w.finish(&mut out);
            finish_frame(&mut out, at);
            frames.push(out);
        }
        Ok((frames, count))
    }

    /// Whether the established session's receiver keeps an inbound log ([`Hello::inbound_log`]).
    pub fn peer_keeps_inbound_log(&self) -> bool {
        self.link.state == LinkState::Established && self.link.peer.as_ref().is_some_and(|p| p.inbound_log)
    }

    /// Protection: forwards a frame delivered to the guest, tagged with the harvest sequence of
    /// the epoch that delivered it and the device's delivery count. Queued as control (ahead of
    /// epoch frames still unsent). Refused, never queued, when the peer keeps no log or the
    /// queue is long.
    pub fn send_inbound(&mut self, epoch: u64, seq: u64, frame: &[u8]) -> Result<(), InboundError> {
        if frame.is_empty() || frame.len() > crate::limits::MAX_INBOUND_FRAME {
            return Err(InboundError::Length { len: frame.len(), max: crate::limits::MAX_INBOUND_FRAME });
        }
        self.inbound_ready()?;
        self.link.push(&Message::Inbound(crate::message::InboundFrame { epoch, seq, frame: frame.to_vec() }));
        Ok(())
    }

    /// Protection: tells the backup that the primary's epoch `epoch` is acknowledged and its
    /// output (and the earlier epochs') released, so it drops the inbound frames tagged with it
    /// or earlier and the output frames of those epochs. For a backup that keeps either log.
    pub fn send_inbound_committed(&mut self, epoch: u64) -> Result<(), InboundError> {
        self.ready_for(self.peer_keeps_inbound_log() || self.peer_keeps_output_log())?;
        self.link.push(&Message::InboundCommitted { epoch });
        Ok(())
    }

    /// Whether the established session's receiver keeps an output log ([`Hello::output_log`]).
    pub fn peer_keeps_output_log(&self) -> bool {
        self.link.state == LinkState::Established && self.link.peer.as_ref().is_some_and(|p| p.output_log)
    }

    /// Protection: forwards the frames the guest sent during submitted epoch `epoch` (the
    /// primary's epoch `harvest`), in the order it sent them, to a backup that keeps an output
    /// log. Queued behind every epoch frame queued (the checkpoint and its ack never wait for
    /// it), in as many `Output` messages as the limits need; returns how many. Refused, never
    /// queued in part, when the peer keeps no log, a frame is out of bounds or the queue holds
    /// [`MAX_OUTPUT_BACKLOG`] bytes.
    pub fn send_output<F: AsRef<[u8]>>(
        &mut self,
        epoch: u64,
        harvest: u64,
        frames: &[F],
    ) -> Result<usize, OutputError> {
        use crate::limits::{MAX_OUTPUT_FRAME, MAX_OUTPUT_FRAMES, MAX_OUTPUT_LEN};
        use crate::message::{OUTPUT_FRAME_OVERHEAD, OUTPUT_HEADER_LEN};
        self.output_ready()?;
        if epoch == 0 || epoch > self.last_submitted {
            return Err(OutputError::NotSubmitted { epoch, last: self.last_submitted });
        }
        if let Some((index, f)) =
            frames.iter().enumerate().find(|(_, f)| f.as_ref().is_empty() || f.as_ref().len() > MAX_OUTPUT_FRAME)
        {
            return Err(OutputError::Length { index, len: f.as_ref().len(), max: MAX_OUTPUT_FRAME });
        }
        let adding: usize = frames
            .iter()
            .map(|f| f.as_ref().len() + OUTPUT_FRAME_OVERHEAD)
            .sum::<usize>()
            .saturating_add(OUTPUT_HEADER_LEN + crate::limits::FRAME_HEADER_LEN);
        if self.output_bytes + adding > MAX_OUTPUT_BACKLOG {
            return Err(OutputError::Backlog { queued: self.output_bytes, adding, limit: MAX_OUTPUT_BACKLOG });
        }
        let mut messages = 0;
        let mut rest = frames;
        while !rest.is_empty() {
            // As many frames as fit in one message.
            let mut len = OUTPUT_HEADER_LEN;
            let mut n = 0;
            for f in rest.iter().take(MAX_OUTPUT_FRAMES) {
                let add = f.as_ref().len() + OUTPUT_FRAME_OVERHEAD;
                if n > 0 && len + add > MAX_OUTPUT_LEN {
                    break;
                }
                len += add;
                n += 1;
            }
            let (part, after) = rest.split_at(n);
            rest = after;
            let mut out = Vec::with_capacity(crate::limits::FRAME_HEADER_LEN + len);
            let at = begin_frame(&mut out, MessageKind::Output);
            put_u64(&mut out, epoch);
            put_u64(&mut out, harvest);
            put_u32(&mut out, part.len() as u32);
            for f in part {
                put_u32(&mut out, f.as_ref().len() as u32);
                out.extend_from_slice(f.as_ref());
            }
            finish_frame(&mut out, at);
            self.output_bytes += out.len();
            self.outputs.push_back(Transmit::new(Arc::new(out), crate::session::Channel::Stream));
            messages += 1;
        }
        Ok(messages)
    }

    fn output_ready(&self) -> Result<(), OutputError> {
        if self.link.state != LinkState::Established {
            return Err(OutputError::NotConnected);
        }
        if !self.peer_keeps_output_log() {
            return Err(OutputError::Unsupported);
        }
        Ok(())
    }

    fn inbound_ready(&self) -> Result<(), InboundError> {
        self.ready_for(self.peer_keeps_inbound_log())
    }

    /// An established session whose peer takes the message (`takes`), and room in the queue.
    fn ready_for(&self, takes: bool) -> Result<(), InboundError> {
        if self.link.state != LinkState::Established {
            return Err(InboundError::NotConnected);
        }
        if !takes {
            return Err(InboundError::Unsupported);
        }
        let queued = self.link.control_len();
        if queued >= MAX_INBOUND_BACKLOG {
            return Err(InboundError::Backlog { queued, limit: MAX_INBOUND_BACKLOG });
        }
        Ok(())
    }

    fn hello(&self) -> Hello {
        Hello {
            version: self.cfg.version,
            min_version: oldest_accepted(self.cfg.version),
            role: self.cfg.role,
            instance: self.cfg.instance,
            vm: self.cfg.vm.clone(),
            layout: self.cfg.layout.clone(),
            window: self.cfg.window,
            committed: self.lineage.filter(|_| self.acked > 0).map(|lineage| Position { lineage, epoch: self.acked }),
            delivered: self
                .lineage
                .filter(|_| self.last_submitted > 0)
                .map(|lineage| Position { lineage, epoch: self.last_submitted }),
            high_water: self.last_submitted,
            session: self.link.session,
            sends_checkpoints: true,
            start: self.start,
            inbound_log: false,
            side_copy_port: None,
            output_log: false,
        }
    }

    fn fail(&mut self, error: SessionError) {
        self.link.fail(&error);
        self.ready = false;
        self.outputs.clear();
        self.output_bytes = 0;
        self.events.push_back(SenderEvent::Disconnected { error });
    }

    fn resync(&mut self, reason: BaselineReason) {
        if self.needs_baseline {
            return;
        }
        self.window.clear();
        self.retained = 0;
        self.cache.clear();
        self.needs_baseline = true;
        self.stats.resyncs += 1;
        self.events.push_back(SenderEvent::BaselineRequired { reason });
    }

    fn on_ack(&mut self, now: Instant, epoch: u64) {
        if epoch <= self.acked || epoch > self.last_submitted {
            return;
        }
        self.acked = epoch;
        let mut latency = None;
        while let Some(front) = self.window.front() {
            if front.epoch > epoch {
                break;
            }
            if front.epoch == epoch {
                latency = Some(now.saturating_duration_since(front.submitted));
            }
            self.retained -= front.bytes;
            self.window.pop_front();
        }
        self.events.push_back(SenderEvent::Acked { epoch, latency });
    }

    fn epoch_at(&self, epoch: u64) -> Option<&OutEpoch> {
        let front = self.window.front()?.epoch;
        self.window.get(usize::try_from(epoch.checked_sub(front)?).ok()?)
    }

    /// Where to start sending on a new connection, or `None` when the series must restart.
    fn resume_point(&self, h: &Hello) -> Option<u64> {
        if let Some(d) = h.delivered
            && d.epoch >= self.acked
            && d.epoch <= self.last_submitted
        {
            let next = d.epoch + 1;
            match self.epoch_at(next) {
                None if next > self.last_submitted && Some(d.lineage) == self.lineage => {
                    return Some(next);
                }
                Some(ep) if (!ep.baseline && ep.lineage == d.lineage) || (ep.baseline && ep.epoch > h.high_water) => {
                    return Some(next);
                }
                _ => {}
            }
        }
        match self.window.front() {
            Some(front) if front.baseline && front.epoch > h.high_water => Some(front.epoch),
            _ => None,
        }
    }

    fn established(&mut self, now: Instant, h: Hello) {
        self.peer_window = h.window.max(1);
        if self.peer_instance != Some(h.instance) {
            self.peer_instance = Some(h.instance);
            self.last_request = None;
        }
        // The receiver's commit counts as an ack in a series this sender started: one of its
        // baselines, or the agreed position it started at.
        if let Some(c) = h.committed
            && (c.lineage.origin == self.cfg.instance || self.start.is_some_and(|s| s.lineage == c.lineage))
        {
            self.on_ack(now, c.epoch);
        }
        // The link refused a high water above `MAX_ANNOUNCED_EPOCH`: this cannot overflow.
        self.next_epoch = self.next_epoch.max(h.high_water + 1);
        self.last_sent = 0;
        if self.window.iter().any(|ep| ep.needs_version > self.link.version) {
            // Retained frames this peer's version cannot read (dedup records, for a receiver of
            // the previous version): the series restarts with a baseline it can.
            self.resync(BaselineReason::PeerVersion(self.link.version));
        }
        let resumed_from = if self.needs_baseline {
            None
        } else {
            let r = self.resume_point(&h);
            if r.is_none() {
                self.resync(BaselineReason::CannotResume);
            }
            r
        };
        if let Some(from) = resumed_from {
            self.send_epoch = from;
            self.send_frame = 0;
        }
        self.ready = true;
        self.events.push_back(SenderEvent::Connected { peer: Box::new(h), resumed_from });
    }

    fn on_input(&mut self, now: Instant, input: Input) -> Result<(), SessionError> {
        match input {
            Input::Established(h) => self.established(now, *h),
            Input::Corrupt | Input::EpochData(..) | Input::Pages(_) => {}
            Input::Message(msg) => match msg {
                Message::Ack { epoch } => self.on_ack(now, epoch),
                Message::Heartbeat(hb) if hb.committed > 0 => self.on_ack(now, hb.committed),
                Message::ResendRequest(r) => self.on_resend(r),
                Message::ResyncRequest(r) => self.on_resync_request(r),
                Message::PageRequest(r) => {
                    if let Some(&pfn) = r.pfns.iter().find(|&&p| self.index.index(p).is_none()) {
                        return Err(SessionError::Protocol {
                            what: "page request outside the memory layout",
                            epoch: pfn,
                        });
                    }
                    self.events.push_back(SenderEvent::PagesRequested { id: r.id, pfns: r.pfns });
                }
                Message::Resumed(r) => self.events.push_back(SenderEvent::Resumed(r)),
                Message::Complete(c) => self.events.push_back(SenderEvent::Complete(c)),
                Message::PageMap(m) => {
                    if let Some(r) = crate::migration::bad_run(&self.index, &m.held) {
                        return Err(SessionError::Protocol {
                            what: "map of held pages outside the memory layout",
                            epoch: r.first,
                        });
                    }
                    self.events.push_back(SenderEvent::PageMap(m));
                }
                _ => {}
            },
        }
        Ok(())
    }

    fn on_resend(&mut self, r: ResendRequest) {
        if self.last_request.is_some_and(|last| r.request <= last) {
            return;
        }
        self.last_request = Some(r.request);
        let Some(front) = self.window.front() else {
            return;
        };
        let target = r.from_epoch.max(front.epoch);
        if target > self.last_submitted {
            return;
        }
        if (self.send_epoch, self.send_frame) > (target, 0) {
            self.send_epoch = target;
            self.send_frame = 0;
        }
    }

    fn on_resync_request(&mut self, r: ResyncRequest) {
        if self.needs_baseline {
            return;
        }
        if let Some(l) = self.lineage
            && l.baseline > r.delivered
        {
            // Asked before our current baseline reached the receiver: stale.
            return;
        }
        self.resync(BaselineReason::Requested(r.reason));
    }

    fn next_output(&mut self) -> Option<Transmit> {
        let t = self.outputs.pop_front()?;
        self.output_bytes -= t.len();
        Some(t)
    }

    fn next_epoch_frame(&mut self) -> Option<Transmit> {
        let front = self.window.front()?.epoch;
        if self.send_epoch < front {
            self.send_epoch = front;
            self.send_frame = 0;
        }
        let i = usize::try_from(self.send_epoch - front).ok()?;
        let ep = self.window.get_mut(i)?;
        let frame = ep.frames.get(self.send_frame)?.clone();
        if self.send_frame < ep.high_sent {
            self.stats.frames_resent += 1;
        }
        self.send_frame += 1;
        ep.high_sent = ep.high_sent.max(self.send_frame);
        if self.send_frame == ep.frames.len() {
            self.last_sent = self.last_sent.max(ep.epoch);
            self.send_epoch += 1;
            self.send_frame = 0;
        }
        Some(Transmit::new(frame, crate::session::Channel::Stream))
    }
}

impl Sender {
    fn migration_ready(&self, what: &'static str) -> Result<(), MigrationError> {
        if self.cfg.role != Role::MigrationSource {
            return Err(MigrationError::NotSource { role: self.cfg.role });
        }
        if self.link.state != LinkState::Established {
            return Err(MigrationError::NotConnected { what });
        }
        Ok(())
    }

    /// Migration: the guest is stopped at the source and epoch `epoch` (submitted) carries its
    /// final state; with [`SwitchMode::Complete`] the epochs up to it hold every page (pre-copy,
    /// stop-and-copy); with [`SwitchMode::PostCopy`] the destination holds the pages of `held`
    /// (ascending, disjoint runs; empty for pure post-copy, round 0's clean pages for hybrid),
    /// sent as `PageMap` frames after the switch-over (`held` is ignored for `Complete`). Queued
    /// ahead of epoch frames still unsent: the destination acts on it once it has committed
    /// `epoch`.
    ///
    /// [`SwitchMode::Complete`]: crate::migration::SwitchMode::Complete
    /// [`SwitchMode::PostCopy`]: crate::migration::SwitchMode::PostCopy
    pub fn switch_over(
        &mut self,
        epoch: u64,
        mode: crate::migration::SwitchMode,
        held: &[crate::migration::PfnRange],
    ) -> Result<(), MigrationError> {
        self.migration_ready("a switch-over")?;
        if epoch == 0 || epoch > self.last_submitted {
            return Err(MigrationError::NotSubmitted { epoch, last: self.last_submitted });
        }
        if mode.is_postcopy()
            && let Some(r) = crate::migration::bad_run(&self.index, held)
        {
            return Err(MigrationError::BadMap { first: r.first, count: r.count });
        }
        let (switch, maps) = crate::migration::switch_over(epoch, mode, held);
        self.link.push(&Message::SwitchOver(switch));
        for m in maps {
            self.link.push(&Message::PageMap(m));
        }
        Ok(())
    }

    /// Migration: the source gives up its copy for good (it never resumes the guest after this);
    /// the destination may run it. `epoch`: the switch-over epoch it acknowledged.
    pub fn handover(&mut self, epoch: u64) -> Result<(), MigrationError> {
        self.migration_ready("a hand-over")?;
        self.link.push(&Message::Handover(crate::migration::Handover { epoch }));
        Ok(())
    }

    /// Ends the session with a `Cancelled` goodbye: the migration is called off before the
    /// hand-over (drain [`Endpoint::poll_transmit`] before closing the connection).
    pub fn cancel(&mut self, detail: &str) {
        self.fail(SessionError::Cancelled { detail: detail.to_owned() });
    }
}

impl Endpoint for Sender {
    type Event = SenderEvent;

    fn connect(&mut self, now: Instant) {
        self.responses.clear();
        self.outputs.clear();
        self.output_bytes = 0;
        self.ready = false;
        self.link.next_session();
        let hello = self.hello();
        self.link.connect(now, hello);
    }

    fn disconnect(&mut self, _now: Instant) {
        if self.link.state != LinkState::Down {
            self.fail(SessionError::ConnectionLost);
        }
    }

    fn handle_input(&mut self, now: Instant, data: &[u8]) {
        let mut inputs = Vec::new();
        let local = self.local.clone();
        let r = self.link.input(now, data, &local, &mut |i| {
            inputs.push(i);
            Ok(())
        });
        self.process(now, inputs, r);
    }

    fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) {
        let mut inputs = Vec::new();
        let local = self.local.clone();
        let r = self.link.datagram(now, datagram, &local, &mut |i| {
            inputs.push(i);
            Ok(())
        });
        self.process(now, inputs, r);
    }

    fn handle_frame(&mut self, now: Instant, frame: &[u8]) {
        let mut inputs = Vec::new();
        let local = self.local.clone();
        // Nothing travels to a sender on bulk: the link refuses anything but a page response,
        // and a page response to a sender fails the direction check.
        let r = self.link.bulk(now, frame, &local, &mut |i| {
            inputs.push(i);
            Ok(())
        });
        self.process(now, inputs, r);
    }

    fn handle_timeout(&mut self, now: Instant) {
        let beat = Heartbeat { last_sent: self.last_sent, committed: 0 };
        if let Err(e) = self.link.on_timeout(now, beat) {
            self.fail(e);
        }
    }

    fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        self.transmit(now, true)
    }

    fn poll_urgent_transmit(&mut self, now: Instant) -> Option<Transmit> {
        self.transmit(now, false)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.link.poll_timeout()
    }

    fn poll_event(&mut self) -> Option<SenderEvent> {
        self.events.pop_front()
    }

    fn close(&mut self, _now: Instant, detail: &str) {
        self.fail(SessionError::Closed { detail: detail.to_owned() });
    }
}

impl Sender {
    /// The next transmit: control, demand answers, epoch frames, epochs' output, then (when
    /// `bulk`) pushes.
    fn transmit(&mut self, now: Instant, bulk: bool) -> Option<Transmit> {
        let t = self.link.pop_control().or_else(|| {
            if !self.ready || self.link.state != LinkState::Established {
                return None;
            }
            self.responses.pop_front().or_else(|| self.next_epoch_frame()).or_else(|| self.next_output()).or_else(
                || {
                    if !bulk {
                        return None;
                    }
                    let t = self.pushes.pop_front()?;
                    // Owed since the last push: the queue is at or under the low water now.
                    if self.push_room_owed && self.pushes.len() <= self.cfg.push_low_water {
                        self.push_room_owed = false;
                        self.events.push_back(SenderEvent::PushRoom { queued: self.pushes.len() });
                    }
                    Some(t)
                },
            )
        })?;
        self.link.sent(now);
        self.stats.frames_sent += 1;
        self.stats.bytes_sent += t.len() as u64;
        Some(t)
    }

    fn process(&mut self, now: Instant, inputs: Vec<Input>, r: Result<(), SessionError>) {
        for input in inputs {
            if self.link.state == LinkState::Down {
                return;
            }
            if let Err(e) = self.on_input(now, input) {
                self.fail(e);
                return;
            }
        }
        if let Err(e) = r {
            self.fail(e);
        }
    }
}
