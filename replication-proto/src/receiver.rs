//! The receiving side (backup, migration destination): stages each epoch, hands it to the owner
//! only when it is whole and checked, acknowledges only what the owner committed, and asks for
//! resends (or a new baseline) when something is missing.

use crate::checkpoint::{Checkpoint, CheckpointBuilder};
use crate::codec::decode_page;
use crate::frame::MessageKind;
use crate::limits::{MAX_EPOCH, MAX_REQUEST_PAGES, MAX_STATE_LEN, MAX_WINDOW};
use crate::message::{
    EpochBegin, EpochEnd, Hello, MemoryLayout, Message, MessageError, PageIndex, PageRequest, Position, ResendRequest,
    ResyncReason, ResyncRequest, Role, VmIdentity,
};
use crate::pageset::parse_page_set;
use crate::session::{Endpoint, Input, Link, LinkState, Local, SessionError, Timing, Transmit};
use crate::version::{PROTOCOL_VERSION, oldest_accepted};
use crate::wire::Reader;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};
use thiserror::Error;

/// How a [`Receiver`] behaves. [`ReceiverConfig::new`] fills in the defaults.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// [`Role::Backup`] or [`Role::MigrationDestination`]; or [`Role::MigrationSource`] for
    /// reverse checkpoints (a session in which the destination sends checkpoints back).
    pub role: Role,
    /// The VM.
    pub vm: VmIdentity,
    /// Its memory layout.
    pub layout: MemoryLayout,
    /// This receiver's incarnation number (differs between runs).
    pub instance: u64,
    /// Most checkpoints handed to the owner and not yet committed; epochs beyond wait. Default 4.
    pub window: u16,
    /// Most bytes one staged checkpoint may hold (decoded pages, deltas and state). Default: the
    /// guest's memory size plus the largest state blob, which no valid checkpoint exceeds.
    pub max_checkpoint_bytes: u64,
    /// Ask for a resend when an expected epoch makes no progress for this long. Default 50 ms.
    pub resend_timeout: Duration,
    /// Heartbeats and idle detection.
    pub timing: Timing,
    /// The protocol version to speak: [`PROTOCOL_VERSION`] (the default), or an older one it
    /// accepts to act as an older build (tests of mixed versions, a staged rollout). Clamped to
    /// the versions this build accepts.
    pub version: u16,
    /// Keep an inbound log (a protection backup): announce it in `Hello` and report the frames
    /// the primary forwards ([`ReceiverEvent::Inbound`]). Default off: without it the primary
    /// sends none.
    pub inbound_log: bool,
    /// With [`ReceiverConfig::inbound_log`]: the UDP port of the owner's side-copy socket,
    /// announced in `Hello` ([`Hello::side_copy_port`]) so the primary also sends each frame
    /// there as an authenticated datagram. Default none.
    pub side_copy_port: Option<u16>,
    /// Keep an output log (a protection backup): announce it in `Hello` and report the output
    /// frames the primary forwards after each checkpoint ([`ReceiverEvent::Output`]) and the
    /// epochs it released ([`ReceiverEvent::InboundCommitted`]). Default off: without it the
    /// primary sends none.
    pub output_log: bool,
}

impl ReceiverConfig {
    /// A configuration with the defaults.
    pub fn new(role: Role, vm: VmIdentity, layout: MemoryLayout, instance: u64) -> Self {
        let max_checkpoint_bytes = layout.total_bytes() + MAX_STATE_LEN;
        Self {
            role,
            vm,
            layout,
            instance,
            window: 4,
            max_checkpoint_bytes,
            resend_timeout: Duration::from_millis(50),
            timing: Timing::default(),
            version: PROTOCOL_VERSION,
            inbound_log: false,
            side_copy_port: None,
            output_log: false,
        }
    }
}

/// What a [`Receiver`] reports to its owner.
#[derive(Debug)]
pub enum ReceiverEvent {
    /// The session is established.
    Connected {
        /// The sender's Hello.
        peer: Box<Hello>,
    },
    /// A whole, checked checkpoint, in epoch order. Apply it ([`Checkpoint::apply`]), then call
    /// [`Receiver::committed`] (or [`Receiver::reject`] if it does not apply).
    Checkpoint(Checkpoint),
    /// Post-copy: pages of one `PageResponse` frame, decoded: the answer to request `id`, or
    /// pages the source pushed unasked (`id` 0). A large answer comes in several events with the
    /// same id.
    Pages {
        /// The request id (0: a push).
        id: u64,
        /// The pages' frame numbers, ascending.
        pfns: Vec<u64>,
        /// `pfns.len()` pages of the layout's page size, back to back in the order of `pfns`
        /// (so a run of consecutive pfns is one contiguous slice).
        data: Vec<u8>,
    },
    /// Migration: the source stopped the guest; `epoch` carries its final state.
    SwitchOver(crate::migration::SwitchOver),
    /// Migration: part of the map of pages held at a post-copy switch-over.
    PageMap(crate::migration::PageMap),
    /// Migration: the source gave up its copy; the destination may run the guest.
    Handover {
        /// The epoch the source names (pre-copy: the switch-over epoch).
        epoch: u64,
    },
    /// Protection: a frame the primary delivered to its guest (only with
    /// [`ReceiverConfig::inbound_log`]); keep it for replay at promotion.
    Inbound(crate::message::InboundFrame),
    /// Protection: the output frames of a checkpoint (only with [`ReceiverConfig::output_log`]);
    /// keep them until the primary reports them released, write them at promotion.
    Output(crate::message::OutputFrames),
    /// Protection: the primary's epoch `epoch` is committed here: drop the inbound frames tagged
    /// with it or an earlier one. The primary sends it right after releasing the output of that
    /// epoch and the earlier ones: drop their output frames too.
    InboundCommitted {
        /// The primary's epoch (its harvest sequence, the tag of [`ReceiverEvent::Inbound`]).
        epoch: u64,
    },
    /// The sender became suspect (silent for [`crate::Timing::suspect_after`]; the session goes
    /// on until `idle_timeout`), or a suspect sender spoke again.
    Liveness(crate::session::PeerLiveness),
    /// The connection ended; reconnect unless `error` [`SessionError::is_permanent`].
    Disconnected {
        /// Why.
        error: SessionError,
    },
}

/// A call the receiver cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReceiverError {
    /// The epoch was not handed over, or was already committed.
    #[error("epoch {epoch} is not awaiting commit")]
    NotPending {
        /// The epoch.
        epoch: u64,
    },
    /// Page requests need an established session.
    #[error("no established session for a page request")]
    NotConnected,
    /// Page requests are a migration destination's, in the session the source sends checkpoints
    /// in.
    #[error("page requests are for a migration destination receiving from its source, not a {role}")]
    NotMigration {
        /// This receiver's role.
        role: Role,
    },
    /// A page request must name 1..=4096 ascending pages of the layout.
    #[error("page request: {what} (pfn {pfn:#x})")]
    BadRequest {
        /// What is wrong.
        what: &'static str,
        /// The page concerned.
        pfn: u64,
    },
    /// A map of held pages must be ascending, disjoint runs of pages of the layout, for a
    /// switch-over epoch (not 0).
    #[error("map of held pages: run at page {first:#x} of {count} pages is out of order or outside the layout")]
    BadMap {
        /// The run's first page (the epoch, when it is 0).
        first: u64,
        /// Its page count.
        count: u32,
    },
}

/// Counters for monitoring and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    /// Checkpoints handed to the owner.
    pub checkpoints: u64,
    /// Epochs committed by the owner.
    pub commits: u64,
    /// Frames dropped for a bad payload crc.
    pub corrupt_frames: u64,
    /// Frames ignored as duplicates or stale.
    pub stale_frames: u64,
    /// Staged epochs thrown away (gap, count or checksum mismatch).
    pub aborted_epochs: u64,
    /// Resend requests sent.
    pub resend_requests: u64,
    /// Resync requests sent.
    pub resync_requests: u64,
    /// Bulk frames dropped: beyond the few held before the sender's `Hello`, or with no
    /// session.
    pub bulk_dropped: u64,
}

/// Frames held ahead of a gap, at most.
const MAX_PENDING_FRAMES: usize = 4096;

struct Staging {
    begin: EpochBegin,
    next_seq: u32,
    builder: CheckpointBuilder,
    crc: crc32fast::Hasher,
    /// Frames that arrived ahead of `next_seq`.
    pending: BTreeMap<u32, (MessageKind, Vec<u8>)>,
    pending_bytes: usize,
    /// The epoch's end, if it arrived before every frame.
    end: Option<EpochEnd>,
}

/// The sans-IO receiving state machine. See the crate docs for the protocol and [`Endpoint`] for
/// how a transport drives it.
pub struct Receiver {
    cfg: ReceiverConfig,
    local: Local,
    index: PageIndex,
    link: Link,
    delivered: Option<Position>,
    committed: Option<Position>,
    high_water: u64,
    needs_baseline: bool,
    uncommitted: VecDeque<Position>,
    staging: Option<Staging>,
    peer_known: u64,
    requests: u32,
    last_request: Option<Instant>,
    last_progress: Option<Instant>,
    /// An epoch was turned away because the window was full: fetch it once there is room.
    turned_away: bool,
    /// Requests sent since the last progress: each doubles the wait before the next (a large
    /// epoch resent from its start must be given time to get past what is already staged).
    unanswered: u32,
    next_page_request: u64,
    events: VecDeque<ReceiverEvent>,
    stats: ReceiverStats,
    /// The agreed position the series started at, instead of a baseline ([`Receiver::start_at`]).
    start: Option<Position>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("state", &self.link.state)
            .field("delivered", &self.delivered)
            .field("committed", &self.committed)
            .field("needs_baseline", &self.needs_baseline)
            .finish_non_exhaustive()
    }
}

enum Want {
    Resend(u64),
    Resync,
}

impl Receiver {
    /// A receiver with an empty replica (it will accept only a baseline first).
    ///
    /// # Panics
    /// If `config.layout` is invalid or `config.role` may not receive checkpoints (a primary):
    /// both programming errors.
    pub fn new(mut config: ReceiverConfig) -> Self {
        config.layout.validate().expect("receiver memory layout is valid");
        assert!(config.role.may_receive_checkpoints(), "a Receiver needs a role that receives checkpoints");
        config.version = config.version.clamp(oldest_accepted(PROTOCOL_VERSION), PROTOCOL_VERSION);
        config.window = config.window.clamp(1, MAX_WINDOW);
        let local = Local {
            role: config.role,
            vm: config.vm.clone(),
            layout: config.layout.clone(),
            sends: false,
            version: config.version,
            start: None,
        };
        Self {
            index: PageIndex::new(&config.layout),
            link: Link::new(config.timing),
            cfg: config,
            local,
            delivered: None,
            committed: None,
            high_water: 0,
            needs_baseline: true,
            uncommitted: VecDeque::new(),
            staging: None,
            peer_known: 0,
            requests: 0,
            last_request: None,
            last_progress: None,
            turned_away: false,
            unanswered: 0,
            next_page_request: 1,
            events: VecDeque::new(),
            stats: ReceiverStats::default(),
            start: None,
        }
    }

    /// Holds the agreed position `start` (committed, the owner's replica being exactly that
    /// epoch of that lineage) instead of waiting for a baseline: a reverse session's source, which
    /// holds the guest as it was at the switch-over ([`crate::migration::reverse_start`] gives the
    /// position both sides compute). The receiver then accepts epoch `start.epoch + 1` of
    /// `start.lineage` (a delta on its replica) and acknowledges it once committed. It announces
    /// the position in its `Hello` and refuses a sender that starts elsewhere, or nowhere
    /// ([`SessionError::Start`]); a sender that starts at a position refuses a receiver told none.
    /// Keep the receiver across reconnects (its position moves on with each commit).
    ///
    /// Only for a [`Role::MigrationSource`], before the first [`Endpoint::connect`] and the first
    /// checkpoint.
    pub fn start_at(&mut self, start: Position) -> Result<(), crate::migration::StartError> {
        use crate::migration::StartError;
        if self.cfg.role != Role::MigrationSource {
            return Err(StartError::Role { role: self.cfg.role, side: "receiving checkpoints" });
        }
        if self.link.session > 0 {
            return Err(StartError::Begun { what: "connected" });
        }
        if self.delivered.is_some() || self.stats.checkpoints > 0 {
            return Err(StartError::Begun { what: "a checkpoint was handed over" });
        }
        crate::migration::check_start(&start)?;
        self.delivered = Some(start);
        self.committed = Some(start);
        self.high_water = self.high_water.max(start.epoch);
        self.peer_known = self.peer_known.max(start.epoch);
        self.needs_baseline = false;
        self.start = Some(start);
        self.local.start = Some(start);
        Ok(())
    }

    /// The agreed position the series started at ([`Receiver::start_at`]), if any.
    pub fn start(&self) -> Option<Position> {
        self.start
    }

    /// The last epoch committed by the owner.
    pub fn committed_epoch(&self) -> Option<Position> {
        self.committed
    }

    /// The last epoch handed to the owner (and not rejected).
    pub fn delivered_epoch(&self) -> Option<Position> {
        self.delivered
    }

    /// Whether the receiver waits for a baseline (empty replica or after a rejection).
    pub fn needs_baseline(&self) -> bool {
        self.needs_baseline
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
    pub fn stats(&self) -> ReceiverStats {
        let mut s = self.stats;
        s.corrupt_frames = self.link.crc_errors;
        s.bulk_dropped = self.link.bulk_dropped;
        s
    }

    /// The owner committed checkpoint `epoch` (and so every one before it) to the replica: the
    /// receiver acknowledges it to the sender.
    pub fn committed(&mut self, now: Instant, epoch: u64) -> Result<(), ReceiverError> {
        let i = self.uncommitted.iter().position(|p| p.epoch == epoch).ok_or(ReceiverError::NotPending { epoch })?;
        let pos = self.uncommitted[i];
        self.uncommitted.drain(..=i);
        self.committed = Some(pos);
        self.stats.commits += 1;
        if self.link.state == LinkState::Established {
            self.link.push(&Message::Ack { epoch });
            // Room in the window again: fetch what was turned away for lack of it (only that:
            // an epoch being staged is on its way, asking for it would have it sent twice).
            if std::mem::take(&mut self.turned_away) {
                self.maybe_request(now);
            }
        }
        Ok(())
    }

    /// The owner could not apply checkpoint `epoch` (its digest did not verify against the
    /// replica). Every checkpoint handed over and not committed is void (drop them, and any not yet
    /// polled are withdrawn); the receiver asks the sender for a new baseline.
    pub fn reject(&mut self, now: Instant, epoch: u64) -> Result<(), ReceiverError> {
        if !self.uncommitted.iter().any(|p| p.epoch == epoch) {
            return Err(ReceiverError::NotPending { epoch });
        }
        self.uncommitted.clear();
        self.delivered = self.committed;
        self.needs_baseline = true;
        self.staging = None;
        self.events.retain(|e| !matches!(e, ReceiverEvent::Checkpoint(_)));
        if self.link.state == LinkState::Established {
            self.send(now, Want::Resync);
        }
        Ok(())
    }

    /// Migration: tells the source the guest runs here, resumed from switch-over epoch `epoch`
    /// (with what the destination's process spent: CPU µs without its vCPUs, peak RSS bytes).
    pub fn resumed(&mut self, epoch: u64, cpu_us: u64, peak_rss_bytes: u64) -> Result<(), ReceiverError> {
        self.migration_established()?;
        self.link.push(&Message::Resumed(crate::migration::Resumed { epoch: epoch.max(1), cpu_us, peak_rss_bytes }));
        Ok(())
    }

    /// Migration: tells the source every page is here (post-copy is over); `c.pages` is the
    /// count the destination holds (the layout's page count), the rest its fault numbers.
    pub fn complete(&mut self, c: crate::migration::Complete) -> Result<(), ReceiverError> {
        self.migration_established()?;
        self.link.push(&Message::Complete(c));
        Ok(())
    }

    /// Post-copy, after a reconnect: tells the source which pages the destination holds (runs
    /// ascending and disjoint, pages of the layout), for switch-over epoch `epoch`, as `PageMap`
    /// frames (`seq` from 0; the last one is not full, see
    /// [`crate::migration::PageMap::ends_held_map`]); the source reports them as
    /// [`crate::SenderEvent::PageMap`] and re-derives what it still has to send.
    pub fn send_held(&mut self, epoch: u64, runs: &[crate::migration::PfnRange]) -> Result<(), ReceiverError> {
        self.migration_established()?;
        if epoch == 0 {
            return Err(ReceiverError::BadMap { first: 0, count: 0 });
        }
        if let Some(r) = crate::migration::bad_run(&self.index, runs) {
            return Err(ReceiverError::BadMap { first: r.first, count: r.count });
        }
        let maps = crate::migration::held_map(epoch, runs);
        for m in maps {
            self.link.push(&Message::PageMap(m));
        }
        Ok(())
    }

    /// A migration destination's message can go: the role and an established session.
    fn migration_established(&self) -> Result<(), ReceiverError> {
        if self.cfg.role != Role::MigrationDestination {
            return Err(ReceiverError::NotMigration { role: self.cfg.role });
        }
        if self.link.state != LinkState::Established {
            return Err(ReceiverError::NotConnected);
        }
        Ok(())
    }

    /// Post-copy: asks the sender for pages (ascending, in the layout, at most
    /// [`MAX_REQUEST_PAGES`]); the answer comes as [`ReceiverEvent::Pages`] with the returned id.
    pub fn request_pages(&mut self, pfns: &[u64]) -> Result<u64, ReceiverError> {
        self.migration_established()?;
        let bad = |what, pfn| Err(ReceiverError::BadRequest { what, pfn });
        if pfns.is_empty() || pfns.len() > MAX_REQUEST_PAGES {
            return bad("needs 1..=4096 pages", pfns.len() as u64);
        }
        for (i, &pfn) in pfns.iter().enumerate() {
            if self.index.index(pfn).is_none() {
                return bad("page outside the memory layout", pfn);
            }
            if i > 0 && pfn <= pfns[i - 1] {
                return bad("pages not strictly ascending", pfn);
            }
        }
        let id = self.next_page_request;
        self.next_page_request += 1;
        self.link.push(&Message::PageRequest(PageRequest { id, pfns: pfns.to_vec() }));
        Ok(id)
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
            committed: self.committed,
            delivered: if self.needs_baseline { None } else { self.delivered },
            high_water: self.high_water,
            session: self.link.session,
            sends_checkpoints: false,
            start: self.start,
            inbound_log: self.cfg.inbound_log,
            side_copy_port: self.cfg.side_copy_port.filter(|_| self.cfg.inbound_log),
            output_log: self.cfg.output_log,
        }
    }

    /// A migration source that resumed the guest from a reverse checkpoint ends the reverse
    /// session with a `Superseded` goodbye: the destination's copy must stop (drain
    /// [`Endpoint::poll_transmit`] before closing the connection). Acknowledges nothing after it.
    pub fn supersede(&mut self, detail: &str) {
        self.fail(SessionError::Superseded { detail: detail.to_owned() });
    }

    fn fail(&mut self, error: SessionError) {
        self.link.fail(&error);
        self.events.push_back(ReceiverEvent::Disconnected { error });
    }

    /// Reports a change in the sender's liveness the link noticed.
    fn liveness_event(&mut self) {
        if let Some(l) = self.link.take_liveness() {
            self.events.push_back(ReceiverEvent::Liveness(l));
        }
    }

    /// What the receiver is waiting for, if anything.
    fn want(&self) -> Option<Want> {
        if self.link.state != LinkState::Established || self.uncommitted.len() >= usize::from(self.cfg.window) {
            return None;
        }
        if let Some(st) = &self.staging {
            return Some(Want::Resend(st.begin.epoch));
        }
        if self.needs_baseline {
            // A baseline may be on its way (ask for it again), or never asked for.
            return Some(if self.peer_known > self.high_water {
                Want::Resend(self.high_water + 1)
            } else {
                Want::Resync
            });
        }
        let d = self.delivered.map_or(0, |d| d.epoch);
        (self.peer_known > d).then_some(Want::Resend(d + 1))
    }

    fn resend_deadline(&self) -> Option<Instant> {
        self.want()?;
        let base = match (self.last_progress, self.last_request) {
            (Some(p), Some(r)) => p.max(r),
            (p, r) => p.or(r)?,
        };
        Some(base + self.backoff())
    }

    /// The wait before asking again: the resend timeout, doubled per unanswered request, at
    /// most 64 times.
    fn backoff(&self) -> Duration {
        self.cfg.resend_timeout * (1u32 << self.unanswered.min(6))
    }

    fn send(&mut self, now: Instant, want: Want) {
        match want {
            Want::Resend(from_epoch) => {
                self.requests = self.requests.wrapping_add(1);
                self.link.push(&Message::ResendRequest(ResendRequest { from_epoch, request: self.requests }));
                self.stats.resend_requests += 1;
            }
            Want::Resync => {
                let reason = if self.committed.is_none() && self.delivered.is_none() {
                    ResyncReason::Empty
                } else {
                    ResyncReason::Rejected
                };
                self.link.push(&Message::ResyncRequest(ResyncRequest { delivered: self.high_water, reason }));
                self.stats.resync_requests += 1;
            }
        }
        self.last_request = Some(now);
        self.unanswered = self.unanswered.saturating_add(1);
    }

    /// Something is missing: ask now unless a request went out less than a timeout ago (the timer
    /// asks again later).
    fn maybe_request(&mut self, now: Instant) {
        if self.last_request.is_some_and(|t| now < t + self.backoff()) {
            return;
        }
        if let Some(w) = self.want() {
            self.send(now, w);
        }
    }

    /// Asks only if nothing arrived for a resend timeout: a heartbeat (a datagram) announcing an
    /// epoch overtakes the epoch's frames on the stream, and a large epoch takes a while to
    /// arrive; asking at once would have the sender send it twice. Stalls are caught by the
    /// resend timer (`resend_deadline`).
    fn maybe_request_if_stalled(&mut self, now: Instant) {
        if self.last_progress.is_some_and(|p| now < p + self.cfg.resend_timeout) {
            return;
        }
        self.maybe_request(now);
    }

    fn abort(&mut self, now: Instant) {
        if let Some(st) = self.staging.take() {
            self.stats.aborted_epochs += 1;
            // Ask for this very epoch again (want() now points at it).
            self.peer_known = self.peer_known.max(st.begin.epoch);
            self.maybe_request(now);
        }
    }

    fn progress(&mut self, now: Instant) {
        self.last_progress = Some(now);
        self.unanswered = 0;
    }

    fn on_begin(&mut self, now: Instant, b: EpochBegin) -> Result<(), SessionError> {
        if b.epoch > MAX_EPOCH {
            return Err(SessionError::Protocol { what: "epoch number beyond the limit of 2^63", epoch: b.epoch });
        }
        if let Some(st) = &self.staging {
            if st.begin == b {
                self.stats.stale_frames += 1;
                return Ok(());
            }
            let newer_baseline = b.baseline && b.epoch > st.begin.epoch;
            if b.epoch != st.begin.epoch && !newer_baseline {
                // Earlier: stale. Later: it waits until this one completes (asked for again).
                self.note_unstaged(now, b.epoch);
                return Ok(());
            }
            if b.epoch == st.begin.epoch {
                // Another version of this epoch: throw the staged one away and ask again.
                self.abort(now);
                return Ok(());
            }
            // A newer baseline: the sender started a new series, and the staged epoch may never
            // be sent again. The baseline replaces it.
            self.staging = None;
            self.stats.aborted_epochs += 1;
        }
        if b.epoch <= self.high_water {
            self.stats.stale_frames += 1;
            return Ok(());
        }
        self.peer_known = self.peer_known.max(b.epoch);
        if b.baseline != (b.lineage.baseline == b.epoch) || b.lineage.baseline > b.epoch {
            return Err(SessionError::Protocol {
                what: "epoch lineage does not match its baseline flag",
                epoch: b.epoch,
            });
        }
        let acceptable = b.baseline
            || (!self.needs_baseline
                && self.delivered.is_some_and(|d| d.lineage == b.lineage && b.epoch == d.epoch + 1));
        if !acceptable {
            // A gap (or a series we do not hold): ask for what comes after our last epoch.
            self.maybe_request(now);
            return Ok(());
        }
        if self.uncommitted.len() >= usize::from(self.cfg.window) {
            // No room: the epoch is fetched again after the owner commits.
            self.turned_away = true;
            return Ok(());
        }
        if b.page_count > self.index.pages() || b.state_len > MAX_STATE_LEN {
            return Err(SessionError::Protocol { what: "epoch larger than the guest", epoch: b.epoch });
        }
        self.staging = Some(Staging {
            begin: b,
            next_seq: 0,
            builder: CheckpointBuilder::new(b.epoch, b.lineage, b.baseline, self.cfg.layout.page_size as usize),
            crc: crc32fast::Hasher::new(),
            pending: BTreeMap::new(),
            pending_bytes: 0,
            end: None,
        });
        self.progress(now);
        Ok(())
    }

    fn note_unstaged(&mut self, now: Instant, epoch: u64) {
        if epoch > self.high_water {
            // A frame of an epoch we are not staging (its Begin was lost, or it is ahead of the
            // one being staged): dropped, and asked for again in due course.
            self.peer_known = self.peer_known.max(epoch);
            self.stats.stale_frames += 1;
            if self.staging.is_none() {
                self.maybe_request(now);
            }
        } else {
            self.stats.stale_frames += 1;
        }
    }

    fn on_epoch_data(&mut self, now: Instant, kind: MessageKind, payload: Vec<u8>) -> Result<(), SessionError> {
        let mut r = Reader::new(&payload);
        let (epoch, seq) = r
            .u64("epoch")
            .and_then(|e| Ok((e, r.u32("seq")?)))
            .map_err(|source| SessionError::Message(MessageError::Wire { kind, source }))?;
        let max_bytes = self.cfg.max_checkpoint_bytes;
        let Some(st) = self.staging.as_mut().filter(|st| st.begin.epoch == epoch) else {
            self.note_unstaged(now, epoch);
            return Ok(());
        };
        if seq < st.next_seq || st.pending.contains_key(&seq) {
            self.stats.stale_frames += 1;
            return Ok(());
        }
        if seq > st.next_seq {
            // Ahead of a missing frame (reordered, or the missing one was lost): keep it, within
            // bounds, until the gap fills; the stall timer asks for a resend if it does not.
            let room = (st.builder.data_bytes() + st.pending_bytes + payload.len()) as u64 <= max_bytes
                && st.pending.len() < MAX_PENDING_FRAMES;
            if room {
                st.pending_bytes += payload.len();
                st.pending.insert(seq, (kind, payload));
            } else {
                self.stats.stale_frames += 1;
            }
            return Ok(());
        }
        let version = self.link.version;
        consume(st, &self.index, max_bytes, version, kind, &payload)?;
        while let Some(entry) = st.pending.first_entry() {
            if *entry.key() != st.next_seq {
                break;
            }
            let (kind, payload) = entry.remove();
            st.pending_bytes -= payload.len();
            consume(st, &self.index, max_bytes, version, kind, &payload)?;
        }
        let complete = st.end.filter(|end| st.next_seq >= end.frames);
        self.progress(now);
        if let Some(end) = complete {
            self.finish(now, end);
        }
        Ok(())
    }

    fn on_end(&mut self, now: Instant, e: EpochEnd) {
        let Some(st) = self.staging.as_mut().filter(|st| st.begin.epoch == e.epoch) else {
            self.note_unstaged(now, e.epoch);
            return;
        };
        match st.end {
            Some(prev) if prev == e => {
                self.stats.stale_frames += 1;
                return;
            }
            Some(_) => {
                // Two different ends for one epoch: throw it away and ask again.
                self.abort(now);
                return;
            }
            None => st.end = Some(e),
        }
        if st.next_seq >= e.frames {
            self.finish(now, e);
        }
    }

    /// Every frame up to `e.frames` is in: check the counts and the checksum, hand it over.
    fn finish(&mut self, now: Instant, e: EpochEnd) {
        let st = self.staging.take().expect("finish is called while staging");
        let whole = st.next_seq == e.frames
            && st.pending.is_empty()
            && st.builder.pages() as u64 == e.page_count
            && e.page_count == st.begin.page_count
            && st.builder.state_len() as u64 == e.state_len
            && e.state_len == st.begin.state_len
            && st.crc.clone().finalize() == e.checksum;
        if !whole {
            // Frames lost at the end, or corrupted beyond the frame crc: ask again.
            self.staging = Some(st);
            self.abort(now);
            return;
        }
        let pos = Position { lineage: st.begin.lineage, epoch: e.epoch };
        self.delivered = Some(pos);
        self.high_water = self.high_water.max(e.epoch);
        self.needs_baseline = false;
        self.uncommitted.push_back(pos);
        self.stats.checkpoints += 1;
        self.events.push_back(ReceiverEvent::Checkpoint(st.builder.finish(e.digest)));
        self.progress(now);
        // Something after it was seen already: fetch it without waiting for the stall timer,
        // unless data is still flowing (it is then most likely right behind).
        if self.peer_known > e.epoch {
            self.maybe_request_if_stalled(now);
        }
    }

    /// A `PageResponse` payload: decoded straight into one contiguous buffer.
    fn on_pages(&mut self, payload: &[u8]) -> Result<(), SessionError> {
        let kind = MessageKind::PageResponse;
        let mut r = Reader::new(payload);
        let id = r.u64("id").map_err(|source| SessionError::Message(MessageError::Wire { kind, source }))?;
        let records =
            parse_page_set(&mut r).map_err(|source| SessionError::Message(MessageError::PageSet { kind, source }))?;
        if r.remaining() != 0 {
            return Err(SessionError::Protocol { what: "page response with trailing bytes", epoch: 0 });
        }
        let ps = self.cfg.layout.page_size as usize;
        let mut pfns = Vec::with_capacity(records.len());
        let mut data = vec![0u8; records.len() * ps];
        for (p, page) in records.iter().zip(data.chunks_exact_mut(ps)) {
            if !p.encoding.is_self_contained() || self.index.index(p.pfn).is_none() {
                return Err(SessionError::Protocol {
                    what: "page response page not self-contained or outside the layout",
                    epoch: 0,
                });
            }
            decode_page(p.encoding, p.data, page)
                .map_err(|_| SessionError::Protocol { what: "page response page does not decode", epoch: 0 })?;
            pfns.push(p.pfn);
        }
        self.events.push_back(ReceiverEvent::Pages { id, pfns, data });
        Ok(())
    }

    fn on_input(&mut self, now: Instant, input: Input) -> Result<(), SessionError> {
        match input {
            Input::Established(h) => {
                self.peer_known = self.peer_known.max(h.high_water);
                self.last_request = None;
                self.progress(now);
                self.events.push_back(ReceiverEvent::Connected { peer: h });
            }
            Input::Corrupt => {
                // A frame is gone; if it belonged to the epoch being staged, ask at once.
                if self.staging.is_some() {
                    self.maybe_request(now);
                }
            }
            Input::EpochData(kind, payload) => self.on_epoch_data(now, kind, payload)?,
            Input::Pages(payload) => self.on_pages(&payload)?,
            Input::Message(msg) => match msg {
                Message::EpochBegin(b) => self.on_begin(now, b)?,
                Message::EpochEnd(e) => self.on_end(now, e),
                Message::Heartbeat(hb) if hb.last_sent > self.peer_known => {
                    self.peer_known = hb.last_sent;
                    self.maybe_request_if_stalled(now);
                }
                Message::SwitchOver(s) => self.events.push_back(ReceiverEvent::SwitchOver(s)),
                Message::PageMap(m) => self.events.push_back(ReceiverEvent::PageMap(m)),
                Message::Handover(h) => self.events.push_back(ReceiverEvent::Handover { epoch: h.epoch }),
                Message::Inbound(f) if self.cfg.inbound_log => self.events.push_back(ReceiverEvent::Inbound(f)),
                Message::InboundCommitted { epoch } if self.cfg.inbound_log || self.cfg.output_log => {
                    self.events.push_back(ReceiverEvent::InboundCommitted { epoch })
                }
                Message::Output(o) if self.cfg.output_log => self.events.push_back(ReceiverEvent::Output(o)),
                _ => {}
            },
        }
        Ok(())
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

/// Decodes the in-sequence frame `payload` into the staged checkpoint (of a session running at
/// protocol `version`).
fn consume(
    st: &mut Staging,
    index: &PageIndex,
    max_bytes: u64,
    version: u16,
    kind: MessageKind,
    payload: &[u8],
) -> Result<(), SessionError> {
    let epoch = st.begin.epoch;
    let violation = |what| SessionError::Protocol { what, epoch };
    let mut r = Reader::new(payload);
    if kind == MessageKind::PageBatch {
        let mut header = || -> Result<(), crate::wire::WireError> {
            r.u64("epoch")?;
            r.u32("seq")?;
            Ok(())
        };
        header().map_err(|source| SessionError::Message(MessageError::Wire { kind, source }))?;
        let records =
            parse_page_set(&mut r).map_err(|source| SessionError::Message(MessageError::PageSet { kind, source }))?;
        for rec in &records {
            if rec.encoding.since_version() > version {
                return Err(violation("page encoding newer than the session's protocol version"));
            }
            st.builder.push(rec, index).map_err(|_| violation("bad page record"))?;
        }
        if st.builder.pages() as u64 > st.begin.page_count {
            return Err(violation("more pages than announced"));
        }
    } else {
        let msg = Message::decode(kind, payload).map_err(SessionError::Message)?;
        let Message::StateChunk(c) = msg else {
            return Err(violation("state chunk expected"));
        };
        if c.offset != st.builder.state_len() as u64 || c.offset + c.data.len() as u64 > st.begin.state_len {
            return Err(violation("state chunk out of place"));
        }
        st.builder.push_state(&c.data);
    }
    if st.builder.data_bytes() as u64 > max_bytes {
        return Err(violation("checkpoint larger than the configured limit"));
    }
    st.crc.update(payload);
    st.next_seq += 1;
    Ok(())
}

impl Endpoint for Receiver {
    type Event = ReceiverEvent;

    fn connect(&mut self, now: Instant) {
        self.link.next_session();
        let hello = self.hello();
        self.link.connect(now, hello);
        self.last_request = None;
        self.last_progress = Some(now);
        self.unanswered = 0;
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
        self.liveness_event();
        self.process(now, inputs, r);
    }

    fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) {
        let mut inputs = Vec::new();
        let local = self.local.clone();
        let r = self.link.datagram(now, datagram, &local, &mut |i| {
            inputs.push(i);
            Ok(())
        });
        self.liveness_event();
        self.process(now, inputs, r);
    }

    fn handle_frame(&mut self, now: Instant, frame: &[u8]) {
        let mut inputs = Vec::new();
        let local = self.local.clone();
        let r = self.link.bulk(now, frame, &local, &mut |i| {
            inputs.push(i);
            Ok(())
        });
        self.liveness_event();
        self.process(now, inputs, r);
    }

    fn handle_timeout(&mut self, now: Instant) {
        let beat = crate::message::Heartbeat { last_sent: 0, committed: self.committed.map_or(0, |c| c.epoch) };
        let r = self.link.on_timeout(now, beat);
        self.liveness_event();
        if let Err(e) = r {
            self.fail(e);
            return;
        }
        if self.resend_deadline().is_some_and(|d| now >= d)
            && let Some(w) = self.want()
        {
            self.send(now, w);
        }
    }

    fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        let t = self.link.pop_control()?;
        self.link.sent(now);
        Some(t)
    }

    /// A receiver sends nothing on bulk streams: the same as [`Endpoint::poll_transmit`].
    fn poll_urgent_transmit(&mut self, now: Instant) -> Option<Transmit> {
        self.poll_transmit(now)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let link = self.link.poll_timeout();
        match (link, self.resend_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn poll_event(&mut self) -> Option<ReceiverEvent> {
        self.events.pop_front()
    }

    fn close(&mut self, _now: Instant, detail: &str) {
        self.fail(SessionError::Closed { detail: detail.to_owned() });
    }
}
