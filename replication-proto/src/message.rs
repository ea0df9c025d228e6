//! Every message, its payload layout and its decoder. Integers are little-endian; `docs/protocol.md`
//! lists each layout byte by byte.
//!
//! Decoders are total: any byte string yields a message or a [`MessageError`], every length is
//! checked against [`crate::limits`] before anything is allocated, and trailing bytes are refused
//! (except in `Hello`, whose tail is reserved for fields later versions add).

use crate::frame::{MessageKind, begin_frame, finish_frame};
use crate::limits::{
    MAX_DETAIL_LEN, MAX_GUEST_PAGES, MAX_GUEST_RANGES, MAX_INBOUND_FRAME, MAX_OUTPUT_FRAME, MAX_OUTPUT_FRAMES,
    MAX_PAGE_SIZE, MAX_REQUEST_PAGES, MAX_STATE_CHUNK, MAX_VM_NAME_LEN, MIN_PAGE_SIZE,
};
use crate::migration::{
    Complete, Handover, PageMap, Resumed, SwitchOver, get_page_map, get_runs, get_switch_over, put_page_map, put_runs,
    put_switch_over, runs,
};
use crate::pageset::{EncodedPage, PageSetError, parse_page_set, write_page_set};
use crate::wire::{Reader, WireError, put_string, put_u16, put_u32, put_u64};
use thiserror::Error;

/// The part a side plays in a session (a property of the session, not of the host: one process
/// can be a migration destination in one session and a primary in the next).
///
/// The roles say what the session is: *protection* (`Primary` and `Backup`) or *migration*
/// (`MigrationSource` and `MigrationDestination`, protocol version 2). Which side sends
/// checkpoints is said apart, by [`Hello::sends_checkpoints`]: in protection always the primary;
/// in migration the source (pre-copy rounds) or, in a reverse session, the destination (reverse
/// checkpoints during post-copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    /// Sends checkpoints of a protected VM.
    Primary = 1,
    /// Receives checkpoints into a replica.
    Backup = 2,
    /// Sends a VM being migrated (pre-copy rounds, post-copy page server).
    MigrationSource = 3,
    /// Receives a VM being migrated.
    MigrationDestination = 4,
}

impl Role {
    /// The role with wire code `code`.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Primary),
            2 => Some(Self::Backup),
            3 => Some(Self::MigrationSource),
            4 => Some(Self::MigrationDestination),
            _ => None,
        }
    }

    /// Whether this role sends the checkpoints of a forward session (primary, migration source).
    /// A migration destination may send checkpoints too, back to the source: see
    /// [`Role::may_send_checkpoints`].
    pub fn is_sender(self) -> bool {
        matches!(self, Self::Primary | Self::MigrationSource)
    }

    /// Whether a side of this role may send checkpoints (run a [`crate::Sender`]): the primary,
    /// and either side of a migration.
    pub fn may_send_checkpoints(self) -> bool {
        self != Self::Backup
    }

    /// Whether a side of this role may receive checkpoints (run a [`crate::Receiver`]): the
    /// backup, and either side of a migration.
    pub fn may_receive_checkpoints(self) -> bool {
        self != Self::Primary
    }

    /// Whether the role belongs to a migration session.
    pub fn is_migration(self) -> bool {
        matches!(self, Self::MigrationSource | Self::MigrationDestination)
    }

    /// A short lowercase name (`"migration source"`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Backup => "backup",
            Self::MigrationSource => "migration source",
            Self::MigrationDestination => "migration destination",
        }
    }

    /// The role the peer must have.
    pub fn counterpart(self) -> Self {
        match self {
            Self::Primary => Self::Backup,
            Self::Backup => Self::Primary,
            Self::MigrationSource => Self::MigrationDestination,
            Self::MigrationDestination => Self::MigrationSource,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which VM a session is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VmIdentity {
    /// The VM's UUID: both sides must agree on it.
    pub uuid: [u8; 16],
    /// A human name (at most [`MAX_VM_NAME_LEN`] bytes), informational.
    pub name: String,
}

/// One guest-physical memory range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GuestRange {
    /// First guest-physical address (page aligned).
    pub start: u64,
    /// Length in bytes (a non-zero multiple of the page size).
    pub len: u64,
}

/// The guest's memory layout: both sides must agree on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MemoryLayout {
    /// Page size in bytes: a power of two in [`MIN_PAGE_SIZE`]`..=`[`MAX_PAGE_SIZE`].
    pub page_size: u32,
    /// Ascending, disjoint ranges (at most [`MAX_GUEST_RANGES`]).
    pub ranges: Vec<GuestRange>,
}

/// A memory layout that breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LayoutError {
    /// The page size is not a power of two in range.
    #[error("memory layout: page size {0} is not a power of two in 512..=65536")]
    PageSize(u32),
    /// Too many ranges.
    #[error("memory layout: {0} ranges, over the limit of 1024")]
    TooManyRanges(usize),
    /// A range is empty, unaligned, overflows or overlaps the previous one.
    #[error("memory layout: range {index} at {start:#x}+{len:#x} is empty, unaligned, overflowing or out of order")]
    BadRange {
        /// The range's index.
        index: usize,
        /// Its start.
        start: u64,
        /// Its length.
        len: u64,
    },
    /// The layout has more pages than supported.
    #[error("memory layout: {0} pages, over the limit of 2^32")]
    TooManyPages(u64),
}

impl MemoryLayout {
    /// A layout of one range of `len` bytes at guest-physical 0.
    pub fn flat(page_size: u32, len: u64) -> Self {
        Self { page_size, ranges: vec![GuestRange { start: 0, len }] }
    }

    /// Checks the layout rules.
    pub fn validate(&self) -> Result<(), LayoutError> {
        let ps = self.page_size;
        if !ps.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&ps) {
            return Err(LayoutError::PageSize(ps));
        }
        if self.ranges.len() > MAX_GUEST_RANGES {
            return Err(LayoutError::TooManyRanges(self.ranges.len()));
        }
        let ps = u64::from(ps);
        let mut next = 0u64;
        let mut pages = 0u64;
        for (index, r) in self.ranges.iter().enumerate() {
            let end = r.start.checked_add(r.len);
            let bad =
                r.len == 0 || r.start % ps != 0 || r.len % ps != 0 || end.is_none() || (index > 0 && r.start < next);
            if bad {
                return Err(LayoutError::BadRange { index, start: r.start, len: r.len });
            }
            next = end.unwrap_or(u64::MAX);
            pages += r.len / ps;
        }
        if pages > MAX_GUEST_PAGES {
            return Err(LayoutError::TooManyPages(pages));
        }
        Ok(())
    }

    /// Pages in the layout.
    pub fn page_count(&self) -> u64 {
        let ps = u64::from(self.page_size.max(1));
        self.ranges.iter().map(|r| r.len / ps).sum()
    }

    /// Total bytes of guest memory.
    pub fn total_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }

    /// Whether page frame `pfn` lies in the layout.
    pub fn contains_pfn(&self, pfn: u64) -> bool {
        self.page_index(pfn).is_some()
    }

    /// The dense index of `pfn` (0..page_count) if it lies in the layout.
    pub fn page_index(&self, pfn: u64) -> Option<u64> {
        let ps = u64::from(self.page_size.max(1));
        let mut base = 0u64;
        for r in &self.ranges {
            let first = r.start / ps;
            let count = r.len / ps;
            if pfn >= first && pfn - first < count {
                return Some(base + (pfn - first));
            }
            base += count;
        }
        None
    }

    /// Every pfn of the layout, ascending.
    pub fn pfns(&self) -> impl Iterator<Item = u64> + '_ {
        let ps = u64::from(self.page_size.max(1));
        self.ranges.iter().flat_map(move |r| (r.start / ps)..(r.start / ps + r.len / ps))
    }
}

/// Fast pfn to dense-index lookup for a validated layout (binary search over its ranges).
#[derive(Debug, Clone)]
pub(crate) struct PageIndex {
    /// (first pfn, page count, dense index of the first page), ascending.
    ranges: Vec<(u64, u64, u64)>,
    pages: u64,
}

impl PageIndex {
    pub(crate) fn new(layout: &MemoryLayout) -> Self {
        let ps = u64::from(layout.page_size.max(1));
        let mut base = 0;
        let ranges = layout
            .ranges
            .iter()
            .map(|r| {
                let e = (r.start / ps, r.len / ps, base);
                base += r.len / ps;
                e
            })
            .collect();
        Self { ranges, pages: base }
    }

    /// Pages in the layout.
    pub(crate) fn pages(&self) -> u64 {
        self.pages
    }

    /// The dense index of `pfn`, if it lies in the layout.
    #[inline]
    pub(crate) fn index(&self, pfn: u64) -> Option<usize> {
        let i = self.ranges.partition_point(|&(first, _, _)| first <= pfn);
        let &(first, count, base) = self.ranges.get(i.checked_sub(1)?)?;
        (pfn - first < count).then(|| (base + pfn - first) as usize)
    }

    /// The pfn of dense index `index`, if it is below the page count.
    pub(crate) fn pfn(&self, index: usize) -> Option<u64> {
        let index = index as u64;
        let i = self.ranges.partition_point(|&(_, _, base)| base <= index);
        let &(first, count, base) = self.ranges.get(i.checked_sub(1)?)?;
        (index - base < count).then(|| first + index - base)
    }
}

/// Which checkpoint series a replica holds: the sender incarnation that made it and the epoch
/// of the baseline (full copy) it started from. Epochs chain only within one lineage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lineage {
    /// The sender's incarnation number ([`crate::SenderConfig::instance`]).
    pub origin: u64,
    /// The epoch of the baseline that started the series.
    pub baseline: u64,
}

/// An epoch within a lineage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    /// The series.
    pub lineage: Lineage,
    /// The epoch.
    pub epoch: u64,
}

/// The first message each side sends on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The protocol version the speaker speaks.
    pub version: u16,
    /// The oldest version the speaker accepts.
    pub min_version: u16,
    /// The speaker's role in this session.
    pub role: Role,
    /// The speaker's incarnation number (differs between process runs).
    pub instance: u64,
    /// The VM.
    pub vm: VmIdentity,
    /// The guest memory layout.
    pub layout: MemoryLayout,
    /// Most epochs the speaker lets be in flight (sender: its window; receiver: what it stages).
    pub window: u16,
    /// Sender: the last epoch acknowledged. Receiver: the last epoch committed.
    pub committed: Option<Position>,
    /// Sender: the last epoch submitted. Receiver: the last epoch it handed to its owner and
    /// still stands by (`None` after a rejection or with an empty replica: a baseline is needed).
    pub delivered: Option<Position>,
    /// The highest epoch number the speaker has used or seen (0 for none).
    pub high_water: u64,
    /// The speaker's connection count: it grows with every connect, so a `Hello` whose count is
    /// not above the last one accepted from the same instance is a stale copy and is ignored.
    pub session: u64,
    /// Whether the speaker sends the checkpoints of this session (bit 0 of the flags byte that
    /// version 2 adds). A `Hello` of version 1 has no flags byte: its role decides
    /// ([`Role::is_sender`]), and so it is decoded.
    pub sends_checkpoints: bool,
    /// The agreed position the session's checkpoint series starts at, instead of a baseline (a
    /// reverse session: [`crate::Sender::start_at`], [`crate::Receiver::start_at`]); both sides
    /// announce it and must announce the same. Bit 1 of the flags byte, then the position's
    /// lineage and epoch (24 bytes); version 2 on (a build without reverse sessions ignores both,
    /// and so announces none).
    pub start: Option<Position>,
    /// The speaker keeps an inbound log (bit 2 of the flags byte; a capability, not a version):
    /// a backup that sets it takes `Inbound` and `InboundCommitted` messages and replays the
    /// logged frames at promotion. A primary sends them only to a backup that announced it, so
    /// a build without the log (which would refuse the unknown kinds) never sees them.
    pub inbound_log: bool,
    /// The UDP port of the speaker's side-copy socket (bit 3 of the flags byte, then the port,
    /// a u16, after the starting position; a capability, not a version): a backup that keeps an
    /// inbound log and sets it also takes an authenticated datagram copy of each delivered frame
    /// at this port of the connection's address (docs/protocol.md, "Side copies"). A build
    /// without it ignores the bit and the tail, and so announces none: its peer gets no side
    /// copies.
    pub side_copy_port: Option<u16>,
    /// The speaker keeps an output log (bit 4 of the flags byte; a capability, not a version): a
    /// backup that sets it takes `Output` messages (the frames each epoch produced, sent after its
    /// checkpoint) and `InboundCommitted` notices (the epochs whose output the primary released),
    /// and at promotion writes the frames of the epochs its replica holds that were not reported
    /// released. A primary sends `Output` only to a backup that announced it, so a build without
    /// the log (which would refuse the unknown kind) never sees one.
    pub output_log: bool,
}

/// Bit 4 of the `Hello` flags byte (version 2): the speaker keeps an output log.
const HELLO_OUTPUT_LOG: u8 = 16;
/// Bit 2 of the `Hello` flags byte (version 2): the speaker keeps an inbound log.
const HELLO_INBOUND_LOG: u8 = 4;
/// Bit 3 of the `Hello` flags byte (version 2): the speaker's side-copy port follows (after the
/// starting position, if any).
const HELLO_SIDE_COPY: u8 = 8;

/// Bit 0 of the `Hello` flags byte (version 2): the speaker sends checkpoints.
const HELLO_SENDS_CHECKPOINTS: u8 = 1;
/// Bit 1 of the `Hello` flags byte (version 2): a starting position follows the flags byte.
const HELLO_START: u8 = 2;

/// Start of an epoch's checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochBegin {
    /// The epoch (numbered from 1, strictly increasing).
    pub epoch: u64,
    /// The series it belongs to.
    pub lineage: Lineage,
    /// A baseline: the replica is reset to zero and every non-zero page follows.
    pub baseline: bool,
    /// Pages the epoch carries.
    pub page_count: u64,
    /// Bytes of device/vCPU state the epoch carries.
    pub state_len: u64,
}

/// A batch of an epoch's pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBatch {
    /// The epoch.
    pub epoch: u64,
    /// Frame sequence number within the epoch (batches and state chunks share it, from 0).
    pub seq: u32,
    /// The pages, ascending pfns.
    pub pages: Vec<EncodedPage>,
}

/// A piece of an epoch's state blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChunk {
    /// The epoch.
    pub epoch: u64,
    /// Frame sequence number within the epoch.
    pub seq: u32,
    /// Offset of `data` in the blob.
    pub offset: u64,
    /// The bytes (at most [`MAX_STATE_CHUNK`]).
    pub data: Vec<u8>,
}

/// End of an epoch's checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochEnd {
    /// The epoch.
    pub epoch: u64,
    /// Batches plus state chunks sent for the epoch.
    pub frames: u32,
    /// Pages sent.
    pub page_count: u64,
    /// State bytes sent.
    pub state_len: u64,
    /// crc32 of every batch and state chunk payload of the epoch, in sequence order.
    pub checksum: u32,
    /// Content digest of the pages as the backup must end up holding them.
    pub digest: u64,
}

/// Liveness and progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Heartbeat {
    /// Sender: highest epoch whose frames were all transmitted on this connection (0 none).
    pub last_sent: u64,
    /// Receiver: highest epoch committed (0 none); a cumulative ack.
    pub committed: u64,
}

/// The receiver asks for every epoch from `from_epoch` on again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResendRequest {
    /// First epoch wanted.
    pub from_epoch: u64,
    /// Request counter (increasing): the sender ignores requests it has already served.
    pub request: u32,
}

/// Why a receiver asks for a full resend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ResyncReason {
    /// The owner rejected a checkpoint (it did not verify against the replica).
    Rejected = 1,
    /// An epoch arrived from a series the receiver does not hold.
    UnknownLineage = 2,
    /// The receiver has no replica.
    Empty = 3,
}

/// The receiver asks for a new baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncRequest {
    /// The receiver's last delivered epoch when it asked (0 none): a sender whose current
    /// baseline is newer ignores the request as stale.
    pub delivered: u64,
    /// Why.
    pub reason: ResyncReason,
}

/// Why a session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum GoodbyeReason {
    /// Orderly shutdown.
    Normal = 0,
    /// The peer broke the protocol.
    ProtocolError = 1,
    /// No common protocol version.
    Version = 2,
    /// The peer is not the VM, role or layout expected.
    Mismatch = 3,
    /// The migration was cancelled (version 2): the destination discards what it got.
    Cancelled = 4,
    /// The migration source resumed the guest from a reverse checkpoint (version 2): the
    /// destination's copy is superseded and must stop (fence itself).
    Superseded = 5,
}

/// Orderly end of the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Goodbye {
    /// Why.
    pub reason: GoodbyeReason,
    /// A human explanation (at most [`MAX_DETAIL_LEN`] bytes).
    pub detail: String,
}

/// Protection: a frame the primary delivered to the guest's receive queue, forwarded to a backup
/// that keeps an inbound log (see [`Hello::inbound_log`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundFrame {
    /// The primary's epoch (harvest sequence) whose checkpoint contains the frame's delivery:
    /// once the backup committed it, the frame is in the replica and is dropped from the log.
    pub epoch: u64,
    /// The device's count of frames delivered, this one included (1, 2, ...): it is saved with
    /// the device's state, so a replica knows exactly which frames it already holds.
    pub seq: u64,
    /// The Ethernet frame (at most [`MAX_INBOUND_FRAME`] bytes).
    pub frame: Vec<u8>,
}

/// Protection: the frames the guest sent during an epoch, held on the primary until the backup
/// acknowledges the epoch, forwarded (after the epoch's checkpoint) to a backup that keeps an
/// output log (see [`Hello::output_log`]), so that a promoted replica can send them itself when
/// the primary died between the backup's commit and the release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFrames {
    /// The checkpoint (wire epoch) whose execution produced the frames: the backup writes them
    /// at promotion only if its replica holds this epoch.
    pub epoch: u64,
    /// The primary's epoch (harvest sequence) that produced them, as `InboundCommitted` names
    /// it: once the primary reports it released, they are dropped.
    pub harvest: u64,
    /// The Ethernet frames, in the order the guest sent them (1..=[`MAX_OUTPUT_FRAMES`], each
    /// 1..=[`MAX_OUTPUT_FRAME`] bytes, the payload at most [`crate::limits::MAX_OUTPUT_LEN`]).
    pub frames: Vec<Vec<u8>>,
}

/// Bytes an `Output` payload spends besides the frames: epoch, harvest and count.
pub const OUTPUT_HEADER_LEN: usize = 20;
/// Bytes each frame of an `Output` payload spends besides its own (its length).
pub const OUTPUT_FRAME_OVERHEAD: usize = 4;

/// Post-copy: the destination asks for pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// Request id, echoed in the response.
    pub id: u64,
    /// Ascending, distinct pfns (at most [`MAX_REQUEST_PAGES`]).
    pub pfns: Vec<u64>,
}

/// Post-copy: pages answering a request, self-contained encodings only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageResponse {
    /// The request's id.
    pub id: u64,
    /// The pages, ascending pfns.
    pub pages: Vec<EncodedPage>,
}

/// Any message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`EpochBegin`].
    EpochBegin(EpochBegin),
    /// See [`PageBatch`].
    PageBatch(PageBatch),
    /// See [`StateChunk`].
    StateChunk(StateChunk),
    /// See [`EpochEnd`].
    EpochEnd(EpochEnd),
    /// The receiver committed every epoch up to and including this one.
    Ack {
        /// The epoch.
        epoch: u64,
    },
    /// See [`Heartbeat`].
    Heartbeat(Heartbeat),
    /// See [`ResendRequest`].
    ResendRequest(ResendRequest),
    /// See [`ResyncRequest`].
    ResyncRequest(ResyncRequest),
    /// See [`Goodbye`].
    Goodbye(Goodbye),
    /// See [`PageRequest`].
    PageRequest(PageRequest),
    /// See [`PageResponse`].
    PageResponse(PageResponse),
    /// See [`SwitchOver`].
    SwitchOver(SwitchOver),
    /// See [`PageMap`].
    PageMap(PageMap),
    /// See [`Handover`].
    Handover(Handover),
    /// See [`Resumed`].
    Resumed(Resumed),
    /// See [`Complete`].
    Complete(Complete),
    /// Protection: a frame delivered to the guest (to a backup that keeps an inbound log).
    Inbound(InboundFrame),
    /// Protection: the backup committed the primary's epoch `epoch` (its harvest sequence): the
    /// inbound frames tagged with it or an earlier one are in the replica. Sent right after the
    /// primary released the output of that epoch and the earlier ones, so it also tells a backup
    /// keeping an output log which epochs' output already left.
    InboundCommitted {
        /// The primary's epoch.
        epoch: u64,
    },
    /// Protection: an epoch's output frames (to a backup that keeps an output log).
    Output(OutputFrames),
}

/// A payload that does not decode as its kind.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MessageError {
    /// A primitive was malformed.
    #[error("{kind:?}: {source}")]
    Wire {
        /// The message kind.
        kind: MessageKind,
        /// What was wrong.
        source: WireError,
    },
    /// The page set was malformed.
    #[error("{kind:?}: {source}")]
    PageSet {
        /// The message kind.
        kind: MessageKind,
        /// What was wrong.
        source: PageSetError,
    },
    /// A field holds a value outside its domain.
    #[error("{kind:?}: {field} has invalid value {value}")]
    Invalid {
        /// The message kind.
        kind: MessageKind,
        /// The field.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// The memory layout breaks a rule.
    #[error("Hello: {0}")]
    Layout(#[from] LayoutError),
}

fn put_position(out: &mut Vec<u8>, p: &Option<Position>) {
    match p {
        None => out.push(0),
        Some(p) => {
            out.push(1);
            put_u64(out, p.lineage.origin);
            put_u64(out, p.lineage.baseline);
            put_u64(out, p.epoch);
        }
    }
}

impl Message {
    /// The frame kind this message travels in.
    pub fn kind(&self) -> MessageKind {
        match self {
            Self::Hello(_) => MessageKind::Hello,
            Self::EpochBegin(_) => MessageKind::EpochBegin,
            Self::PageBatch(_) => MessageKind::PageBatch,
            Self::StateChunk(_) => MessageKind::StateChunk,
            Self::EpochEnd(_) => MessageKind::EpochEnd,
            Self::Ack { .. } => MessageKind::Ack,
            Self::Heartbeat(_) => MessageKind::Heartbeat,
            Self::ResendRequest(_) => MessageKind::ResendRequest,
            Self::ResyncRequest(_) => MessageKind::ResyncRequest,
            Self::Goodbye(_) => MessageKind::Goodbye,
            Self::PageRequest(_) => MessageKind::PageRequest,
            Self::PageResponse(_) => MessageKind::PageResponse,
            Self::SwitchOver(_) => MessageKind::SwitchOver,
            Self::PageMap(_) => MessageKind::PageMap,
            Self::Handover(_) => MessageKind::Handover,
            Self::Resumed(_) => MessageKind::Resumed,
            Self::Complete(_) => MessageKind::Complete,
            Self::Inbound(_) => MessageKind::Inbound,
            Self::InboundCommitted { .. } => MessageKind::InboundCommitted,
            Self::Output(_) => MessageKind::Output,
        }
    }

    /// Appends this message as one whole frame.
    pub fn encode_frame(&self, out: &mut Vec<u8>) {
        let at = begin_frame(out, self.kind());
        self.encode_payload(out);
        finish_frame(out, at);
    }

    /// Appends this message's payload (no frame header).
    pub fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Self::Hello(h) => {
                put_u16(out, h.version);
                put_u16(out, h.min_version);
                out.push(h.role as u8);
                put_u64(out, h.instance);
                out.extend_from_slice(&h.vm.uuid);
                put_string(out, &h.vm.name);
                put_u32(out, h.layout.page_size);
                put_u32(out, h.layout.ranges.len() as u32);
                for r in &h.layout.ranges {
                    put_u64(out, r.start);
                    put_u64(out, r.len);
                }
                put_u16(out, h.window);
                put_position(out, &h.committed);
                put_position(out, &h.delivered);
                put_u64(out, h.high_water);
                put_u64(out, h.session);
                if crate::version::Feature::Migration.in_version(h.version) {
                    let sends = if h.sends_checkpoints { HELLO_SENDS_CHECKPOINTS } else { 0 };
                    let start = if h.start.is_some() { HELLO_START } else { 0 };
                    let inbound = if h.inbound_log { HELLO_INBOUND_LOG } else { 0 };
                    let side = if h.side_copy_port.is_some() { HELLO_SIDE_COPY } else { 0 };
                    let output = if h.output_log { HELLO_OUTPUT_LOG } else { 0 };
                    out.push(sends | start | inbound | side | output);
                    if let Some(p) = h.start {
                        put_u64(out, p.lineage.origin);
                        put_u64(out, p.lineage.baseline);
                        put_u64(out, p.epoch);
                    }
                    if let Some(port) = h.side_copy_port {
                        put_u16(out, port);
                    }
                }
            }
            Self::EpochBegin(b) => {
                put_u64(out, b.epoch);
                put_u64(out, b.lineage.origin);
                put_u64(out, b.lineage.baseline);
                out.push(u8::from(b.baseline));
                put_u64(out, b.page_count);
                put_u64(out, b.state_len);
            }
            Self::PageBatch(b) => {
                put_u64(out, b.epoch);
                put_u32(out, b.seq);
                write_page_set(out, &b.pages);
            }
            Self::StateChunk(c) => {
                put_u64(out, c.epoch);
                put_u32(out, c.seq);
                put_u64(out, c.offset);
                out.extend_from_slice(&c.data);
            }
            Self::EpochEnd(e) => {
                put_u64(out, e.epoch);
                put_u32(out, e.frames);
                put_u64(out, e.page_count);
                put_u64(out, e.state_len);
                put_u32(out, e.checksum);
                put_u64(out, e.digest);
            }
            Self::Ack { epoch } => put_u64(out, *epoch),
            Self::Heartbeat(h) => {
                put_u64(out, h.last_sent);
                put_u64(out, h.committed);
            }
            Self::ResendRequest(r) => {
                put_u64(out, r.from_epoch);
                put_u32(out, r.request);
            }
            Self::ResyncRequest(r) => {
                put_u64(out, r.delivered);
                out.push(r.reason as u8);
            }
            Self::Goodbye(g) => {
                out.push(g.reason as u8);
                put_string(out, &g.detail);
            }
            Self::PageRequest(p) => {
                put_u64(out, p.id);
                let runs = runs(p.pfns.iter().copied());
                put_u32(out, runs.len() as u32);
                put_runs(out, &runs);
            }
            Self::PageResponse(p) => {
                put_u64(out, p.id);
                write_page_set(out, &p.pages);
            }
            Self::SwitchOver(s) => put_switch_over(out, s),
            Self::PageMap(m) => put_page_map(out, m),
            Self::Handover(h) => put_u64(out, h.epoch),
            Self::Resumed(r) => {
                put_u64(out, r.epoch);
                put_u64(out, r.cpu_us);
                put_u64(out, r.peak_rss_bytes);
            }
            Self::Complete(c) => crate::migration::put_complete(out, c),
            Self::Inbound(f) => {
                put_u64(out, f.epoch);
                put_u64(out, f.seq);
                out.extend_from_slice(&f.frame);
            }
            Self::InboundCommitted { epoch } => put_u64(out, *epoch),
            Self::Output(o) => {
                put_u64(out, o.epoch);
                put_u64(out, o.harvest);
                put_u32(out, o.frames.len() as u32);
                for f in &o.frames {
                    put_u32(out, f.len() as u32);
                    out.extend_from_slice(f);
                }
            }
        }
    }

    /// Decodes the payload of a frame of `kind`.
    pub fn decode(kind: MessageKind, payload: &[u8]) -> Result<Message, MessageError> {
        let mut r = Reader::new(payload);
        let msg = decode_body(kind, &mut r).map_err(|e| e.with_kind(kind))?;
        if kind != MessageKind::Hello {
            r.finish().map_err(|source| MessageError::Wire { kind, source })?;
        }
        Ok(msg)
    }
}

/// Errors from the body decoders before the kind is attached.
enum BodyError {
    Wire(WireError),
    PageSet(PageSetError),
    Invalid(&'static str, u64),
    Layout(LayoutError),
}

impl From<WireError> for BodyError {
    fn from(e: WireError) -> Self {
        Self::Wire(e)
    }
}

impl From<crate::migration::BodyError> for BodyError {
    fn from(e: crate::migration::BodyError) -> Self {
        match e {
            crate::migration::BodyError::Wire(w) => Self::Wire(w),
            crate::migration::BodyError::Invalid(field, value) => Self::Invalid(field, value),
        }
    }
}

impl From<PageSetError> for BodyError {
    fn from(e: PageSetError) -> Self {
        Self::PageSet(e)
    }
}

impl BodyError {
    fn with_kind(self, kind: MessageKind) -> MessageError {
        match self {
            Self::Wire(source) => MessageError::Wire { kind, source },
            Self::PageSet(source) => MessageError::PageSet { kind, source },
            Self::Invalid(field, value) => MessageError::Invalid { kind, field, value },
            Self::Layout(e) => MessageError::Layout(e),
        }
    }
}

fn get_position(r: &mut Reader<'_>) -> Result<Option<Position>, BodyError> {
    match r.u8("position tag")? {
        0 => Ok(None),
        1 => Ok(Some(Position {
            lineage: Lineage { origin: r.u64("lineage origin")?, baseline: r.u64("lineage baseline")? },
            epoch: r.u64("position epoch")?,
        })),
        v => Err(BodyError::Invalid("position tag", u64::from(v))),
    }
}

fn nonzero_epoch(epoch: u64) -> Result<u64, BodyError> {
    if epoch == 0 { Err(BodyError::Invalid("epoch", 0)) } else { Ok(epoch) }
}

fn decode_body(kind: MessageKind, r: &mut Reader<'_>) -> Result<Message, BodyError> {
    Ok(match kind {
        MessageKind::Hello => {
            let version = r.u16("version")?;
            let min_version = r.u16("min_version")?;
            let role = r.u8("role")?;
            let role = Role::from_code(role).ok_or(BodyError::Invalid("role", u64::from(role)))?;
            let instance = r.u64("instance")?;
            let uuid = r.bytes16("vm uuid")?;
            let name = r.string(MAX_VM_NAME_LEN, "vm name")?;
            let page_size = r.u32("page_size")?;
            let count = r.u32("range count")? as usize;
            if count > MAX_GUEST_RANGES {
                return Err(BodyError::Layout(LayoutError::TooManyRanges(count)));
            }
            let mut ranges = Vec::with_capacity(count);
            for _ in 0..count {
                ranges.push(GuestRange { start: r.u64("range start")?, len: r.u64("range len")? });
            }
            let layout = MemoryLayout { page_size, ranges };
            layout.validate().map_err(BodyError::Layout)?;
            let window = r.u16("window")?;
            let committed = get_position(r)?;
            let delivered = get_position(r)?;
            let high_water = r.u64("high_water")?;
            let session = r.u64("session")?;
            // Version 2 adds the flags byte; unknown flag bits are for later versions.
            let (sends_checkpoints, start, inbound_log, side_copy_port, output_log) =
                if crate::version::Feature::Migration.in_version(version) {
                    let flags = r.u8("flags")?;
                    let start = if flags & HELLO_START != 0 {
                        Some(Position {
                            lineage: Lineage { origin: r.u64("start origin")?, baseline: r.u64("start baseline")? },
                            epoch: r.u64("start epoch")?,
                        })
                    } else {
                        None
                    };
                    let side_copy_port = if flags & HELLO_SIDE_COPY != 0 {
                        match r.u16("side copy port")? {
                            0 => return Err(BodyError::Invalid("side copy port", 0)),
                            p => Some(p),
                        }
                    } else {
                        None
                    };
                    (
                        flags & HELLO_SENDS_CHECKPOINTS != 0,
                        start,
                        flags & HELLO_INBOUND_LOG != 0,
                        side_copy_port,
                        flags & HELLO_OUTPUT_LOG != 0,
                    )
                } else {
                    (role.is_sender(), None, false, None, false)
                };
            // Anything after this is a field from a later version: ignored.
            let _ = r.rest();
            Message::Hello(Hello {
                version,
                min_version,
                role,
                instance,
                vm: VmIdentity { uuid, name },
                layout,
                window,
                committed,
                delivered,
                high_water,
                session,
                sends_checkpoints,
                start,
                inbound_log,
                side_copy_port,
                output_log,
            })
        }
        MessageKind::EpochBegin => {
            let epoch = nonzero_epoch(r.u64("epoch")?)?;
            let origin = r.u64("lineage origin")?;
            let baseline_epoch = r.u64("lineage baseline")?;
            let baseline = match r.u8("flags")? {
                0 => false,
                1 => true,
                v => return Err(BodyError::Invalid("flags", u64::from(v))),
            };
            Message::EpochBegin(EpochBegin {
                epoch,
                lineage: Lineage { origin, baseline: baseline_epoch },
                baseline,
                page_count: r.u64("page_count")?,
                state_len: r.u64("state_len")?,
            })
        }
        MessageKind::PageBatch => {
            let epoch = nonzero_epoch(r.u64("epoch")?)?;
            let seq = r.u32("seq")?;
            let pages = parse_page_set(r)?
                .into_iter()
                .map(|p| EncodedPage { pfn: p.pfn, encoding: p.encoding, data: p.data.to_vec() })
                .collect();
            Message::PageBatch(PageBatch { epoch, seq, pages })
        }
        MessageKind::StateChunk => {
            let epoch = nonzero_epoch(r.u64("epoch")?)?;
            let seq = r.u32("seq")?;
            let offset = r.u64("offset")?;
            let data = r.rest();
            if data.len() > MAX_STATE_CHUNK {
                return Err(BodyError::Invalid("chunk length", data.len() as u64));
            }
            Message::StateChunk(StateChunk { epoch, seq, offset, data: data.to_vec() })
        }
        MessageKind::EpochEnd => Message::EpochEnd(EpochEnd {
            epoch: nonzero_epoch(r.u64("epoch")?)?,
            frames: r.u32("frames")?,
            page_count: r.u64("page_count")?,
            state_len: r.u64("state_len")?,
            checksum: r.u32("checksum")?,
            digest: r.u64("digest")?,
        }),
        MessageKind::Ack => Message::Ack { epoch: nonzero_epoch(r.u64("epoch")?)? },
        MessageKind::Heartbeat => {
            Message::Heartbeat(Heartbeat { last_sent: r.u64("last_sent")?, committed: r.u64("committed")? })
        }
        MessageKind::ResendRequest => Message::ResendRequest(ResendRequest {
            from_epoch: nonzero_epoch(r.u64("from_epoch")?)?,
            request: r.u32("request")?,
        }),
        MessageKind::ResyncRequest => {
            let delivered = r.u64("delivered")?;
            let reason = match r.u8("reason")? {
                1 => ResyncReason::Rejected,
                2 => ResyncReason::UnknownLineage,
                3 => ResyncReason::Empty,
                v => return Err(BodyError::Invalid("reason", u64::from(v))),
            };
            Message::ResyncRequest(ResyncRequest { delivered, reason })
        }
        MessageKind::Goodbye => {
            let reason = match r.u8("reason")? {
                0 => GoodbyeReason::Normal,
                1 => GoodbyeReason::ProtocolError,
                2 => GoodbyeReason::Version,
                3 => GoodbyeReason::Mismatch,
                4 => GoodbyeReason::Cancelled,
                5 => GoodbyeReason::Superseded,
                v => return Err(BodyError::Invalid("reason", u64::from(v))),
            };
            let detail = r.string(MAX_DETAIL_LEN, "detail")?;
            Message::Goodbye(Goodbye { reason, detail })
        }
        MessageKind::PageRequest => {
            let id = r.u64("id")?;
            let count = r.u32("range count")? as usize;
            if count > MAX_REQUEST_PAGES {
                return Err(BodyError::Invalid("range count", count as u64));
            }
            let runs = get_runs(r, count)?;
            let pages = runs.iter().map(|r| u64::from(r.count)).sum::<u64>();
            if pages > MAX_REQUEST_PAGES as u64 {
                return Err(BodyError::Invalid("page count", pages));
            }
            let pfns = runs.iter().flat_map(|r| r.first..r.first + u64::from(r.count)).collect();
            Message::PageRequest(PageRequest { id, pfns })
        }
        MessageKind::PageResponse => {
            let id = r.u64("id")?;
            let pages = parse_page_set(r)?
                .into_iter()
                .map(|p| EncodedPage { pfn: p.pfn, encoding: p.encoding, data: p.data.to_vec() })
                .collect();
            Message::PageResponse(PageResponse { id, pages })
        }
        MessageKind::SwitchOver => Message::SwitchOver(get_switch_over(r)?),
        MessageKind::PageMap => Message::PageMap(get_page_map(r)?),
        MessageKind::Handover => Message::Handover(Handover { epoch: r.u64("epoch")? }),
        MessageKind::Resumed => Message::Resumed(Resumed {
            epoch: nonzero_epoch(r.u64("epoch")?)?,
            cpu_us: r.u64("cpu_us")?,
            peak_rss_bytes: r.u64("peak_rss_bytes")?,
        }),
        MessageKind::Complete => Message::Complete(crate::migration::get_complete(r)?),
        MessageKind::Inbound => {
            let epoch = r.u64("epoch")?;
            let seq = r.u64("seq")?;
            if seq == 0 {
                return Err(BodyError::Invalid("inbound seq", 0));
            }
            let frame = r.rest();
            if frame.is_empty() || frame.len() > MAX_INBOUND_FRAME {
                return Err(BodyError::Invalid("inbound frame length", frame.len() as u64));
            }
            Message::Inbound(InboundFrame { epoch, seq, frame: frame.to_vec() })
        }
        MessageKind::InboundCommitted => Message::InboundCommitted { epoch: r.u64("epoch")? },
        MessageKind::Output => {
            let epoch = nonzero_epoch(r.u64("epoch")?)?;
            let harvest = r.u64("harvest")?;
            let count = r.u32("output frame count")? as usize;
            if count == 0 || count > MAX_OUTPUT_FRAMES {
                return Err(BodyError::Invalid("output frame count", count as u64));
            }
            // Each frame takes at least its length and one byte: a count the payload cannot hold
            // is refused before anything is allocated for it.
            if count > r.remaining() / (OUTPUT_FRAME_OVERHEAD + 1) {
                return Err(BodyError::Invalid("output frame count", count as u64));
            }
            let mut frames = Vec::with_capacity(count);
            for _ in 0..count {
                let len = r.u32("output frame length")? as usize;
                if len == 0 || len > MAX_OUTPUT_FRAME {
                    return Err(BodyError::Invalid("output frame length", len as u64));
                }
                frames.push(r.bytes(len, "output frame")?.to_vec());
            }
            Message::Output(OutputFrames { epoch, harvest, frames })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameDecoder;

    fn round_trip(m: Message) {
        let mut out = Vec::new();
        m.encode_frame(&mut out);
        let mut d = FrameDecoder::new();
        d.push(&out);
        let f = d.next_frame().unwrap().unwrap();
        assert_eq!(f.kind, m.kind());
        assert_eq!(Message::decode(f.kind, &f.payload).unwrap(), m);
    }

    #[test]
    fn control_messages_round_trip() {
        let lineage = Lineage { origin: 7, baseline: 3 };
        round_trip(Message::Hello(Hello {
            version: 1,
            min_version: 1,
            role: Role::Backup,
            instance: 42,
            vm: VmIdentity { uuid: [5; 16], name: "vm-1".into() },
            layout: MemoryLayout::flat(4096, 1 << 20),
            window: 4,
            committed: Some(Position { lineage, epoch: 9 }),
            delivered: None,
            high_water: 11,
            session: 3,
            sends_checkpoints: false,
            start: None,
            inbound_log: false,
            side_copy_port: None,
            output_log: false,
        }));
        round_trip(Message::EpochBegin(EpochBegin {
            epoch: 12,
            lineage,
            baseline: true,
            page_count: 5,
            state_len: 100,
        }));
        round_trip(Message::Ack { epoch: 3 });
        round_trip(Message::Goodbye(Goodbye { reason: GoodbyeReason::Normal, detail: "bye".into() }));
        round_trip(Message::PageRequest(PageRequest { id: 1, pfns: vec![1, 2, 3, 10, 12] }));
        round_trip(Message::Goodbye(Goodbye { reason: GoodbyeReason::Cancelled, detail: "cancelled".into() }));
        round_trip(Message::Goodbye(Goodbye { reason: GoodbyeReason::Superseded, detail: "resumed".into() }));
    }

    #[test]
    fn migration_messages_round_trip() {
        use crate::migration::{PfnRange, SwitchMode, runs, switch_over};
        let (s, maps) = switch_over(12, SwitchMode::PostCopy, &runs([0, 1, 2, 9, 40, 41]));
        assert_eq!(s.held_pages, 6);
        round_trip(Message::SwitchOver(s));
        for m in maps {
            round_trip(Message::PageMap(m));
        }
        round_trip(Message::SwitchOver(switch_over(12, SwitchMode::Complete, &[]).0));
        round_trip(Message::PageMap(PageMap { epoch: 1, seq: 3, held: vec![PfnRange { first: 0, count: 1 }] }));
        round_trip(Message::PageMap(PageMap { epoch: 1, seq: 0, held: Vec::new() }));
        round_trip(Message::Handover(Handover { epoch: 0 }));
        round_trip(Message::Handover(Handover { epoch: 12 }));
        round_trip(Message::Resumed(Resumed { epoch: 12, cpu_us: 3_400, peak_rss_bytes: 70 << 20 }));
        round_trip(Message::Complete(Complete { pages: 1 << 16, ..Complete::default() }));
        round_trip(Message::Complete(Complete {
            pages: 1 << 16,
            faults: 9,
            fault_us_p50: 120,
            fault_us_p99: 900,
            blocked_us: 1_234,
            demanded: 40,
            pushed: 60_000,
        }));
        // Epoch 0 names no epoch: refused where an epoch is named.
        let mut p = Vec::new();
        Message::Resumed(Resumed { epoch: 0, cpu_us: 0, peak_rss_bytes: 0 }).encode_payload(&mut p);
        assert!(Message::decode(MessageKind::Resumed, &p).is_err());
    }

    fn hello(version: u16, role: Role, sends_checkpoints: bool) -> Hello {
        Hello {
            version,
            min_version: 1,
            role,
            instance: 1,
            vm: VmIdentity { uuid: [0; 16], name: String::new() },
            layout: MemoryLayout::flat(4096, 4096),
            window: 1,
            committed: None,
            delivered: None,
            high_water: 0,
            session: 1,
            sends_checkpoints,
            start: None,
            inbound_log: false,
            side_copy_port: None,
            output_log: false,
        }
    }

    #[test]
    fn hello_says_who_sends_checkpoints_from_version_2() {
        // Version 2: a flags byte; a migration destination may send (reverse checkpoints).
        let h = hello(2, Role::MigrationDestination, true);
        let mut v2 = Vec::new();
        Message::Hello(h.clone()).encode_payload(&mut v2);
        assert_eq!(Message::decode(MessageKind::Hello, &v2).unwrap(), Message::Hello(h));
        // Version 1 has no flags byte: exactly the bytes a version 1 build writes, and the role
        // decides on decoding.
        let mut v1 = Vec::new();
        Message::Hello(hello(1, Role::Primary, true)).encode_payload(&mut v1);
        assert_eq!(v1.len() + 1, v2.len());
        assert_eq!(Message::decode(MessageKind::Hello, &v1).unwrap(), Message::Hello(hello(1, Role::Primary, true)));
        let mut v1 = Vec::new();
        Message::Hello(hello(1, Role::Backup, false)).encode_payload(&mut v1);
        assert_eq!(Message::decode(MessageKind::Hello, &v1).unwrap(), Message::Hello(hello(1, Role::Backup, false)));
        // A version 2 Hello without its flags byte is truncated.
        let mut cut = Vec::new();
        Message::Hello(hello(2, Role::Primary, true)).encode_payload(&mut cut);
        cut.pop();
        assert!(Message::decode(MessageKind::Hello, &cut).is_err());
    }

    #[test]
    fn hello_carries_a_starting_position_after_its_flags() {
        let start = Position { lineage: Lineage { origin: 0xfeed, baseline: 12 }, epoch: 12 };
        let h = Hello { start: Some(start), ..hello(2, Role::MigrationDestination, true) };
        let mut with = Vec::new();
        Message::Hello(h.clone()).encode_payload(&mut with);
        assert_eq!(Message::decode(MessageKind::Hello, &with).unwrap(), Message::Hello(h.clone()));
        let mut without = Vec::new();
        Message::Hello(hello(2, Role::MigrationDestination, true)).encode_payload(&mut without);
        // The flags byte gets bit 1 and the position's 24 bytes follow it.
        assert_eq!(with.len(), without.len() + 24);
        assert_eq!(with[without.len() - 1], HELLO_SENDS_CHECKPOINTS | HELLO_START);
        // A build that knows only bit 0 reads the same Hello without the start: the start is a
        // tail it ignores (what a build without reverse sessions sees).
        let mut old = with.clone();
        old.truncate(without.len());
        old[without.len() - 1] = HELLO_SENDS_CHECKPOINTS;
        assert_eq!(old, without);
        // A start flag whose position is cut short does not decode.
        let mut cut = with.clone();
        cut.truncate(with.len() - 1);
        assert!(Message::decode(MessageKind::Hello, &cut).is_err());
        // Version 1 has no flags byte, so no start either.
        let mut v1 = Vec::new();
        Message::Hello(Hello { start: Some(start), ..hello(1, Role::Primary, true) }).encode_payload(&mut v1);
        assert_eq!(Message::decode(MessageKind::Hello, &v1).unwrap(), Message::Hello(hello(1, Role::Primary, true)));
    }

    #[test]
    fn roles_say_what_they_may_do() {
        assert!(Role::MigrationDestination.may_send_checkpoints() && Role::MigrationSource.may_receive_checkpoints());
        assert!(!Role::Backup.may_send_checkpoints() && !Role::Primary.may_receive_checkpoints());
        assert!(Role::MigrationSource.is_migration() && !Role::Backup.is_migration());
        assert_eq!(Role::MigrationDestination.to_string(), "migration destination");
    }

    #[test]
    fn hello_tolerates_fields_from_later_versions() {
        let mut payload = Vec::new();
        let hello = hello(2, Role::Primary, true);
        Message::Hello(hello.clone()).encode_payload(&mut payload);
        payload.extend_from_slice(b"future fields");
        assert_eq!(Message::decode(MessageKind::Hello, &payload).unwrap(), Message::Hello(hello));
    }

    #[test]
    fn layout_rules() {
        assert!(MemoryLayout::flat(4096, 8192).validate().is_ok());
        assert!(MemoryLayout::flat(4000, 8000).validate().is_err());
        assert!(MemoryLayout::flat(4096, 0).validate().is_err());
        let l = MemoryLayout {
            page_size: 4096,
            ranges: vec![GuestRange { start: 0, len: 8192 }, GuestRange { start: 1 << 20, len: 4096 }],
        };
        assert!(l.validate().is_ok());
        assert_eq!(l.page_count(), 3);
        assert_eq!(l.page_index(256), Some(2));
        assert_eq!(l.page_index(2), None);
        assert_eq!(l.pfns().collect::<Vec<_>>(), vec![0, 1, 256]);
        let idx = PageIndex::new(&l);
        assert_eq!(idx.index(0), Some(0));
        assert_eq!(idx.index(1), Some(1));
        assert_eq!(idx.index(2), None);
        assert_eq!(idx.index(256), Some(2));
        assert_eq!(idx.index(257), None);
        assert_eq!(idx.pages(), 3);
        for pfn in l.pfns() {
            assert_eq!(idx.pfn(idx.index(pfn).unwrap()), Some(pfn));
        }
        assert_eq!(idx.pfn(3), None);
    }
}
