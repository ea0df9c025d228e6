//! What the sender and the receiver share: the bytes they hand to the transport, the errors that
//! end a connection, the [`Endpoint`] interface, and the connection plumbing (framing, `Hello`
//! exchange, heartbeats, idle detection, goodbye).

use crate::frame::{FrameDecoder, FrameError, MessageKind};
use crate::message::{Goodbye, GoodbyeReason, Heartbeat, Hello, Message, MessageError, Position, Role};
use crate::version::{Feature, VersionError, negotiate_with};
use std::collections::VecDeque;
use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Which transport channel a [`Transmit`] should go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// The session's ordered byte stream (one QUIC stream per direction).
    Stream,
    /// May go as an unreliable datagram (heartbeats): losing or reordering it is harmless. It
    /// is also a whole valid frame, so a transport without datagrams writes it to the stream.
    Datagram,
    /// A whole frame for one of the transport's parallel bulk streams: unordered with respect to
    /// everything else, and it may wait behind flow control while the stream's frames go on
    /// (post-copy pushes, `PageResponse` id 0). The peer hands it to [`Endpoint::handle_frame`].
    /// A transport without bulk streams may write it to the stream instead: it is a whole valid
    /// frame there too.
    Bulk,
}

/// Bytes to send: exactly one whole frame.
///
/// Cheap to clone (shared, immutable), `Send + Sync + 'static` and `AsRef<[u8]>`, so a tokio
/// transport can hand it to `bytes::Bytes::from_owner` without copying.
#[derive(Clone, PartialEq, Eq)]
pub struct Transmit {
    data: Arc<Vec<u8>>,
    channel: Channel,
}

impl std::fmt::Debug for Transmit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transmit").field("len", &self.data.len()).field("channel", &self.channel).finish()
    }
}

impl Transmit {
    pub(crate) fn new(data: Arc<Vec<u8>>, channel: Channel) -> Self {
        Self { data, channel }
    }

    /// Where to send it.
    pub fn channel(&self) -> Channel {
        self.channel
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.data
    }

    /// The bytes as an owned vector (copies only if the frame is still retained for resending).
    pub fn into_vec(self) -> Vec<u8> {
        Arc::try_unwrap(self.data).unwrap_or_else(|shared| (*shared).clone())
    }
}

impl AsRef<[u8]> for Transmit {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Deref for Transmit {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

/// Why a connection ended. [`SessionError::is_permanent`] tells a transport whether reconnecting
/// can help.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SessionError {
    /// No common protocol version.
    #[error(transparent)]
    Version(#[from] VersionError),
    /// The peer's role does not pair with our role (a migration source met a backup, a primary
    /// met a migration destination, two primaries met ...).
    #[error("peer is a {peer}; a {ours} pairs only with a {}", ours.counterpart())]
    Role {
        /// Our role.
        ours: Role,
        /// The peer's role.
        peer: Role,
    },
    /// A migration session with a peer whose protocol version has no migration.
    #[error("a {ours} needs protocol version {needs}, the session with this peer runs at {version}")]
    MigrationVersion {
        /// Our role.
        ours: Role,
        /// The version the session runs at.
        version: u16,
        /// The first version with migration.
        needs: u16,
    },
    /// Both sides, or neither, send checkpoints: exactly one side of a session does.
    #[error(
        "peer ({peer}) {}: one side of a session sends them, the other receives",
        if *peer_sends { "sends checkpoints, and so do we" } else { "does not send checkpoints, and neither do we" }
    )]
    Direction {
        /// The peer's role.
        peer: Role,
        /// Whether the peer says it sends checkpoints (and so do we), or not (and neither do we).
        peer_sends: bool,
    },
    /// The peer's `Hello` announces a starting position, but the session is not a reverse one
    /// (a migration destination sending checkpoints to its source): only that series starts at an
    /// agreed position instead of a baseline.
    #[error(
        "peer ({peer}, {}) announces a starting position: only a reverse session (a migration destination sending \
         checkpoints to its source) starts at one",
        if *peer_sends { "sending checkpoints" } else { "receiving checkpoints" }
    )]
    StartRole {
        /// The peer's role.
        peer: Role,
        /// Whether the peer sends the session's checkpoints.
        peer_sends: bool,
    },
    /// The two sides of a reverse session do not start the series at the same position: one was
    /// told another switch-over, or none (a build without reverse sessions announces none).
    #[error("{}", start_mismatch(ours, peer))]
    Start {
        /// Where we start the series ([`crate::Sender::start_at`], [`crate::Receiver::start_at`]).
        ours: Option<Position>,
        /// Where the peer's `Hello` says it starts it.
        peer: Option<Position>,
    },
    /// The peer is about another VM.
    #[error("peer vm {peer} is not our vm {ours}")]
    Vm {
        /// Our VM's UUID (hex).
        ours: String,
        /// The peer's VM's UUID (hex).
        peer: String,
    },
    /// The peer's memory layout differs from ours.
    #[error(
        "peer memory layout ({peer_pages} pages of {peer_page_size}) differs from ours ({pages} pages of {page_size})"
    )]
    Layout {
        /// Our page count.
        pages: u64,
        /// Our page size.
        page_size: u32,
        /// The peer's page count.
        peer_pages: u64,
        /// The peer's page size.
        peer_page_size: u32,
    },
    /// The peer's `Hello` announces an epoch number beyond
    /// [`crate::limits::MAX_ANNOUNCED_EPOCH`]: taken as it is, it would leave no epoch numbers to
    /// count on (or overflow them).
    #[error("peer's {field} {value} is beyond the epoch limit {limit}")]
    EpochLimit {
        /// The `Hello` field (`high_water`, `committed` or `delivered`).
        field: &'static str,
        /// The value announced.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// The byte stream lost its framing.
    #[error("frame stream broken")]
    Frame(#[source] FrameError),
    /// A frame with a valid crc did not decode.
    #[error("bad message")]
    Message(#[source] MessageError),
    /// The peer broke a protocol rule.
    #[error("protocol violation: {what} (epoch {epoch})")]
    Protocol {
        /// The rule broken.
        what: &'static str,
        /// The epoch concerned (0 if none).
        epoch: u64,
    },
    /// The peer sent a message its role (or its side of the checkpoint stream) may not send.
    #[error("peer sent {kind:?}, which a {role} {} never sends", if *sends { "sending checkpoints" } else { "receiving checkpoints" })]
    Unexpected {
        /// The message kind.
        kind: MessageKind,
        /// The peer's role.
        role: Role,
        /// Whether the peer sends the session's checkpoints.
        sends: bool,
    },
    /// The peer sent a message kind the session's protocol version does not have.
    #[error("peer sent {kind:?}, which protocol version {version} does not have")]
    KindVersion {
        /// The message kind.
        kind: MessageKind,
        /// The version the session runs at.
        version: u16,
    },
    /// Nothing arrived for too long.
    #[error("peer silent for {idle_ms} ms")]
    Idle {
        /// How long, in milliseconds.
        idle_ms: u64,
    },
    /// The peer sent a frame on a bulk stream that does not travel there (only page responses
    /// do, from a migration source to its destination).
    #[error("peer sent {kind:?} on a bulk stream, where only page responses travel")]
    Bulk {
        /// The message kind.
        kind: MessageKind,
    },
    /// The peer ended the session.
    #[error("peer said goodbye ({reason:?}): {detail}")]
    PeerGoodbye {
        /// The peer's reason.
        reason: GoodbyeReason,
        /// The peer's explanation.
        detail: String,
    },
    /// The transport reported the connection gone ([`Endpoint::disconnect`]).
    #[error("connection lost")]
    ConnectionLost,
    /// We called the migration off ([`crate::Sender::cancel`]).
    #[error("migration cancelled: {detail}")]
    Cancelled {
        /// The explanation given.
        detail: String,
    },
    /// We resumed the guest from a reverse checkpoint: the peer's copy is superseded
    /// ([`crate::Receiver::supersede`]).
    #[error("superseded: {detail}")]
    Superseded {
        /// The explanation given.
        detail: String,
    },
    /// We closed the session ([`Endpoint::close`]).
    #[error("closed locally: {detail}")]
    Closed {
        /// The explanation given.
        detail: String,
    },
}

impl SessionError {
    /// Whether reconnecting cannot help (incompatible peer, or an orderly goodbye).
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Version(_) | Self::Role { .. } | Self::Vm { .. } | Self::Layout { .. } => true,
            Self::MigrationVersion { .. } | Self::Direction { .. } => true,
            Self::StartRole { .. } | Self::Start { .. } => true,
            Self::EpochLimit { .. } => true,
            Self::Closed { .. } | Self::Cancelled { .. } | Self::Superseded { .. } => true,
            Self::PeerGoodbye { reason, .. } => *reason != GoodbyeReason::ProtocolError,
            _ => false,
        }
    }

    fn goodbye_reason(&self) -> GoodbyeReason {
        match self {
            Self::Version(_) | Self::MigrationVersion { .. } => GoodbyeReason::Version,
            Self::Role { .. }
            | Self::Vm { .. }
            | Self::Layout { .. }
            | Self::EpochLimit { .. }
            | Self::StartRole { .. }
            | Self::Start { .. }
            | Self::Direction { .. } => GoodbyeReason::Mismatch,
            Self::Closed { .. } => GoodbyeReason::Normal,
            Self::Cancelled { .. } => GoodbyeReason::Cancelled,
            Self::Superseded { .. } => GoodbyeReason::Superseded,
            _ => GoodbyeReason::ProtocolError,
        }
    }
}

/// The sans-IO interface both [`crate::Sender`] and [`crate::Receiver`] implement, so a
/// transport can drive either with the same loop:
///
/// 1. on a new connection: [`Endpoint::connect`];
/// 2. bytes from the stream: [`Endpoint::handle_input`]; a datagram: [`Endpoint::handle_datagram`];
///    a whole frame from a bulk stream: [`Endpoint::handle_frame`];
/// 3. after any call: drain [`Endpoint::poll_transmit`] (write each [`Channel::Stream`] one in
///    order; a [`Channel::Datagram`] one may go as a datagram, a [`Channel::Bulk`] one on a bulk
///    stream), drain [`Endpoint::poll_event`], and arm a timer for [`Endpoint::poll_timeout`],
///    calling [`Endpoint::handle_timeout`] when it fires. While a bulk frame cannot be written
///    (its stream's flow control), keep taking [`Endpoint::poll_urgent_transmit`]: it never
///    hands out a bulk frame, so acks, requests and page answers do not wait behind pushes;
/// 4. when the connection breaks: [`Endpoint::disconnect`]; on an `Disconnected` event, close
///    the connection, and reconnect unless the error [`SessionError::is_permanent`].
pub trait Endpoint {
    /// What the endpoint reports to its owner.
    type Event;
    /// A new connection is up: start a session on it (sends `Hello`).
    fn connect(&mut self, now: Instant);
    /// The connection is gone (the transport noticed): stop using it.
    fn disconnect(&mut self, now: Instant);
    /// Bytes received on the stream, in order, in pieces of any size.
    fn handle_input(&mut self, now: Instant, data: &[u8]);
    /// Exactly one whole frame received on a bulk stream (independent of the stream's framing
    /// state). Only a `PageResponse` (from a migration source to its destination) travels there:
    /// anything else ends the session ([`SessionError::Bulk`]); a frame whose payload crc fails
    /// is counted and dropped, as on the stream. Bulk frames that arrive before the peer's
    /// `Hello` (another QUIC stream may overtake it) are held, a few, until it arrives.
    fn handle_frame(&mut self, now: Instant, frame: &[u8]);
    /// One datagram received (holds exactly one frame).
    fn handle_datagram(&mut self, now: Instant, datagram: &[u8]);
    /// The time from [`Endpoint::poll_timeout`] has come.
    fn handle_timeout(&mut self, now: Instant);
    /// The next frame to send (`now` is when it will be written).
    fn poll_transmit(&mut self, now: Instant) -> Option<Transmit>;
    /// The next frame to send that is not [`Channel::Bulk`], leaving bulk frames queued: for a
    /// transport whose bulk stream is blocked while control frames must still go.
    fn poll_urgent_transmit(&mut self, now: Instant) -> Option<Transmit>;
    /// When to call [`Endpoint::handle_timeout`] next.
    fn poll_timeout(&self) -> Option<Instant>;
    /// The next event for the owner.
    fn poll_event(&mut self) -> Option<Self::Event>;
    /// Ends the session with a goodbye (drain [`Endpoint::poll_transmit`] before closing).
    fn close(&mut self, now: Instant, detail: &str);
}

/// Heartbeat and idle timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Send a heartbeat when nothing was sent for this long.
    pub heartbeat_interval: Duration,
    /// Give up on the connection when nothing arrived for this long.
    pub idle_timeout: Duration,
    /// Report the peer *suspect* (without ending the session) when nothing arrived for this
    /// long: a first, cheap verdict an owner may act on where acting is safe anyway (the backup
    /// asks the group for activity, which the group grants only once the primary's lease is
    /// over), while the session itself waits out `idle_timeout`. `None`: no suspicion.
    pub suspect_after: Option<Duration>,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(1000),
            suspect_after: None,
        }
    }
}

impl Timing {
    /// The suspicion threshold in force: only one shorter than `idle_timeout` counts.
    fn suspect(&self) -> Option<Duration> {
        self.suspect_after.filter(|s| *s < self.idle_timeout)
    }
}

/// A change in how the peer's silence is judged, short of ending the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerLiveness {
    /// Nothing arrived for `silent_ms` (at least [`Timing::suspect_after`]).
    Suspect {
        /// How long the peer has been silent, in milliseconds.
        silent_ms: u64,
    },
    /// The suspect peer spoke again after `silent_ms` of silence.
    Heard {
        /// How long the silence lasted, in milliseconds.
        silent_ms: u64,
    },
}

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// No connection.
    Down,
    /// Connected, waiting for the peer's `Hello`.
    Handshaking,
    /// Both `Hello`s exchanged.
    Established,
}

/// Identity shared by both ends' configurations.
#[derive(Debug, Clone)]
pub(crate) struct Local {
    pub role: Role,
    pub vm: crate::message::VmIdentity,
    pub layout: crate::message::MemoryLayout,
    /// Whether this side sends the session's checkpoints (a [`crate::Sender`]).
    pub sends: bool,
    /// The protocol version this side speaks (its `Hello.version`).
    pub version: u16,
    /// Where this side starts the session's series instead of a baseline (a reverse session).
    pub start: Option<Position>,
}

/// What a decoded input means to the sender or receiver.
pub(crate) enum Input {
    /// The peer's Hello was accepted: the session is established.
    Established(Box<Hello>),
    /// A message of the established session.
    Message(Message),
    /// A page batch or state chunk payload (decoded by the caller, which also needs the raw
    /// payload for the epoch checksum).
    EpochData(MessageKind, Vec<u8>),
    /// A page response payload (decoded by the receiver straight into its pages, without a
    /// copy per page).
    Pages(Vec<u8>),
    /// A frame was dropped for a bad payload crc.
    Corrupt,
}

pub(crate) struct Link {
    pub state: LinkState,
    pub timing: Timing,
    decoder: FrameDecoder,
    control: VecDeque<Transmit>,
    last_recv: Option<Instant>,
    last_send: Option<Instant>,
    /// The latest instant this side was seen running (any call with a `now`).
    last_awake: Option<Instant>,
    /// Times this side found it had not run for a while (see [`Link::awake`]).
    pub stalls: u64,
    pub peer: Option<Hello>,
    pub version: u16,
    pub crc_errors: u64,
    /// Our connection count (sent in `Hello.session`).
    pub session: u64,
    /// `(instance, session)` of the last peer Hello accepted.
    last_peer: Option<(u64, u64)>,
    /// Whether the peer is suspect now (reported, not yet heard again).
    suspected: bool,
    /// A liveness change not yet taken by the owner.
    liveness: Option<PeerLiveness>,
    /// Bulk frames that arrived before the peer's `Hello` (at most [`MAX_EARLY_BULK`]).
    early_bulk: Vec<Vec<u8>>,
    /// Bulk frames dropped: beyond [`MAX_EARLY_BULK`] before the `Hello`, or on a link down.
    pub bulk_dropped: u64,
}

/// Bulk frames held until the peer's `Hello` arrives on the stream (a push on another QUIC
/// stream may overtake it when the `Hello`'s packet is lost); beyond this they are dropped.
pub(crate) const MAX_EARLY_BULK: usize = 16;

impl Link {
    pub fn new(timing: Timing) -> Self {
        Self {
            state: LinkState::Down,
            timing,
            decoder: FrameDecoder::new(),
            control: VecDeque::new(),
            last_recv: None,
            last_send: None,
            last_awake: None,
            stalls: 0,
            peer: None,
            version: 0,
            crc_errors: 0,
            session: 0,
            last_peer: None,
            suspected: false,
            liveness: None,
            early_bulk: Vec::new(),
            bulk_dropped: 0,
        }
    }

    /// The latest liveness change since the last call (a suspicion, or the peer heard again).
    pub fn take_liveness(&mut self) -> Option<PeerLiveness> {
        self.liveness.take()
    }

    /// Something arrived at `now`: clears a suspicion.
    fn heard(&mut self, now: Instant) {
        if self.suspected {
            self.suspected = false;
            let silent_ms = self.last_recv.map_or(0, |l| now.saturating_duration_since(l).as_millis() as u64);
            self.liveness = Some(PeerLiveness::Heard { silent_ms });
        }
        self.last_recv = Some(now);
    }

    /// Counts a new connection (the count goes in our `Hello`).
    pub fn next_session(&mut self) {
        self.session += 1;
    }

    pub fn connect(&mut self, now: Instant, hello: Hello) {
        self.state = LinkState::Handshaking;
        self.decoder = FrameDecoder::new();
        self.control.clear();
        self.last_recv = Some(now);
        self.last_send = Some(now);
        self.last_awake = Some(now);
        self.peer = None;
        self.suspected = false;
        self.liveness = None;
        self.early_bulk.clear();
        self.push(&Message::Hello(hello));
    }

    /// Queues a control message.
    pub fn push(&mut self, msg: &Message) {
        let mut out = Vec::new();
        msg.encode_frame(&mut out);
        let channel = if matches!(msg, Message::Heartbeat(_)) { Channel::Datagram } else { Channel::Stream };
        self.control.push_back(Transmit::new(Arc::new(out), channel));
    }

    /// Control messages queued and not yet taken by the transport.
    pub fn control_len(&self) -> usize {
        self.control.len()
    }

    pub fn pop_control(&mut self) -> Option<Transmit> {
        self.control.pop_front()
    }

    /// Notes that something was written at `now` (delays the next heartbeat).
    pub fn sent(&mut self, now: Instant) {
        if self.state != LinkState::Down {
            self.awake(now);
            self.last_send = Some(now);
        }
    }

    /// Ends the connection for `error`: queues a goodbye (best effort) and goes down.
    pub fn fail(&mut self, error: &SessionError) {
        let reason = error.goodbye_reason();
        let live = self.state != LinkState::Down;
        self.suspected = false;
        // What is queued (our Hello, acks) still goes out before the goodbye: the peer then sees
        // for itself why we part.
        self.state = LinkState::Down;
        self.decoder = FrameDecoder::new();
        self.early_bulk.clear();
        if matches!(error, SessionError::ConnectionLost) {
            self.control.clear();
        }
        if live && !matches!(error, SessionError::ConnectionLost | SessionError::Idle { .. }) {
            let mut detail = error.to_string();
            detail.truncate(crate::limits::MAX_DETAIL_LEN);
            while !detail.is_char_boundary(detail.len()) {
                detail.pop();
            }
            self.push(&Message::Goodbye(Goodbye { reason, detail }));
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state == LinkState::Down {
            return None;
        }
        let hb = self.last_send? + self.timing.heartbeat_interval;
        let last_recv = self.last_recv?;
        let idle = last_recv + self.timing.idle_timeout;
        let suspect = match self.timing.suspect() {
            Some(s) if !self.suspected && self.state == LinkState::Established => last_recv + s,
            _ => idle,
        };
        Some(hb.min(idle).min(suspect))
    }

    /// Notes that this side runs at `now`. A gap since the last call much longer than the
    /// heartbeat timer means *this* process (or its host) did not run: the peer's messages of
    /// that time are still unread in the socket, so the silence is not the peer's. The idle
    /// clock then skips the gap; a peer that really died is declared idle that much later.
    /// Seen here: all three processes of a host stalled ~120 ms at once, and an 80 ms idle
    /// timeout fired on wake-up against a peer that had been talking all along.
    fn awake(&mut self, now: Instant) {
        let stall = 2 * self.timing.heartbeat_interval + Duration::from_millis(10);
        if let Some(prev) = self.last_awake
            && now > prev + stall
        {
            let gap = now - prev;
            self.stalls += 1;
            if let Some(r) = self.last_recv {
                self.last_recv = Some((r + gap).min(now));
            }
        }
        if self.last_awake.is_none_or(|p| now > p) {
            self.last_awake = Some(now);
        }
    }

    /// Handles timers; returns an error when the peer is idle too long. Queues a heartbeat with
    /// `beat` when one is due.
    pub fn on_timeout(&mut self, now: Instant, beat: Heartbeat) -> Result<(), SessionError> {
        if self.state == LinkState::Down {
            return Ok(());
        }
        self.awake(now);
        if let Some(last) = self.last_recv
            && now >= last + self.timing.idle_timeout
        {
            return Err(SessionError::Idle { idle_ms: now.saturating_duration_since(last).as_millis() as u64 });
        }
        if let (Some(last), Some(after)) = (self.last_recv, self.timing.suspect())
            && !self.suspected
            && self.state == LinkState::Established
            && now >= last + after
        {
            self.suspected = true;
            self.liveness =
                Some(PeerLiveness::Suspect { silent_ms: now.saturating_duration_since(last).as_millis() as u64 });
        }
        if let Some(last) = self.last_send
            && now >= last + self.timing.heartbeat_interval
            && self.state == LinkState::Established
        {
            self.push(&Message::Heartbeat(beat));
            self.last_send = Some(now);
        }
        if self.state == LinkState::Handshaking {
            self.last_send = Some(now);
        }
        Ok(())
    }

    /// Feeds stream bytes; calls `f` for each input in order. Stops at the first fatal error.
    pub fn input(
        &mut self,
        now: Instant,
        data: &[u8],
        local: &Local,
        f: &mut dyn FnMut(Input) -> Result<(), SessionError>,
    ) -> Result<(), SessionError> {
        if self.state == LinkState::Down {
            return Ok(());
        }
        self.awake(now);
        self.heard(now);
        self.decoder.push(data);
        loop {
            let frame = match self.decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(()),
                Err(e) if !e.is_fatal() => {
                    self.crc_errors += 1;
                    f(Input::Corrupt)?;
                    continue;
                }
                Err(e) => return Err(SessionError::Frame(e)),
            };
            self.frame(frame.kind, frame.payload, local, f)?;
            if self.state == LinkState::Down {
                return Ok(());
            }
        }
    }

    /// Feeds one whole frame from a bulk stream (see [`Endpoint::handle_frame`]).
    pub fn bulk(
        &mut self,
        now: Instant,
        data: &[u8],
        local: &Local,
        f: &mut dyn FnMut(Input) -> Result<(), SessionError>,
    ) -> Result<(), SessionError> {
        match self.state {
            LinkState::Down => {
                self.bulk_dropped += 1;
                Ok(())
            }
            LinkState::Handshaking => {
                self.awake(now);
                if self.early_bulk.len() < MAX_EARLY_BULK {
                    self.early_bulk.push(data.to_vec());
                } else {
                    self.bulk_dropped += 1;
                }
                Ok(())
            }
            LinkState::Established => {
                self.awake(now);
                self.heard(now);
                self.bulk_frame(data, local, f)
            }
        }
    }

    fn bulk_frame(
        &mut self,
        data: &[u8],
        local: &Local,
        f: &mut dyn FnMut(Input) -> Result<(), SessionError>,
    ) -> Result<(), SessionError> {
        let frame = match crate::frame::decode_datagram(data) {
            Ok(frame) => frame,
            Err(e) if !e.is_fatal() => {
                // The frame is gone; what it held is asked for again by whoever waits for it
                // (a page request is re-sent, a pushed page is demanded when touched).
                self.crc_errors += 1;
                return Ok(());
            }
            Err(e) => return Err(SessionError::Frame(e)),
        };
        if frame.kind != MessageKind::PageResponse {
            return Err(SessionError::Bulk { kind: frame.kind });
        }
        self.frame(frame.kind, frame.payload, local, f)
    }

    /// Feeds one datagram.
    pub fn datagram(
        &mut self,
        now: Instant,
        data: &[u8],
        local: &Local,
        f: &mut dyn FnMut(Input) -> Result<(), SessionError>,
    ) -> Result<(), SessionError> {
        if self.state != LinkState::Established {
            return Ok(());
        }
        self.awake(now);
        match crate::frame::decode_datagram(data) {
            // Only heartbeats travel as datagrams; anything else is dropped.
            Ok(frame) if frame.kind == MessageKind::Heartbeat => {
                self.heard(now);
                self.frame(frame.kind, frame.payload, local, f)
            }
            Ok(_) => Ok(()),
            Err(_) => {
                self.crc_errors += 1;
                Ok(())
            }
        }
    }

    fn frame(
        &mut self,
        kind: MessageKind,
        payload: Vec<u8>,
        local: &Local,
        f: &mut dyn FnMut(Input) -> Result<(), SessionError>,
    ) -> Result<(), SessionError> {
        if matches!(kind, MessageKind::PageBatch | MessageKind::StateChunk | MessageKind::PageResponse) {
            if self.state != LinkState::Established {
                return Ok(());
            }
            self.check_direction(kind, local)?;
            if kind == MessageKind::PageResponse {
                return f(Input::Pages(payload));
            }
            return f(Input::EpochData(kind, payload));
        }
        let msg = Message::decode(kind, &payload).map_err(SessionError::Message)?;
        match (self.state, msg) {
            (LinkState::Handshaking, Message::Hello(h))
                if self.last_peer.is_some_and(|(inst, sess)| inst == h.instance && h.session <= sess) =>
            {
                // A copy of the peer's Hello from an earlier connection: stale.
                Ok(())
            }
            (LinkState::Handshaking, Message::Hello(h)) => {
                self.accept_hello(&h, local)?;
                self.last_peer = Some((h.instance, h.session));
                self.peer = Some(h.clone());
                self.state = LinkState::Established;
                f(Input::Established(Box::new(h)))?;
                // Bulk frames that overtook the Hello, in the order they came.
                for data in std::mem::take(&mut self.early_bulk) {
                    self.bulk_frame(&data, local, f)?;
                }
                Ok(())
            }
            // A second Hello on one connection (a duplicate): ignored.
            (LinkState::Established, Message::Hello(_)) => Ok(()),
            (_, Message::Goodbye(g)) => Err(SessionError::PeerGoodbye { reason: g.reason, detail: g.detail }),
            // Anything before the peer's Hello is stale: ignored.
            (LinkState::Handshaking, _) => Ok(()),
            (_, msg) => {
                self.check_direction(msg.kind(), local)?;
                f(Input::Message(msg))
            }
        }
    }

    /// Who may send what, once the peer's `Hello` is accepted: checkpoint traffic one way,
    /// acks and requests the other; post-copy and switch-over messages only between the source
    /// that sends checkpoints and the destination that receives them (the forward session of a
    /// migration), `PageMap` either way in it (the source's map at the switch-over, the
    /// destination's held pages after a reconnect); and nothing the session's version does not
    /// have.
    fn check_direction(&self, kind: MessageKind, local: &Local) -> Result<(), SessionError> {
        use MessageKind as K;
        let Some(peer) = &self.peer else {
            return Ok(());
        };
        if kind.since_version() > self.version {
            return Err(SessionError::KindVersion { kind, version: self.version });
        }
        // The Hello was checked: exactly one side sends checkpoints.
        let peer_sends = !local.sends;
        let forward_source = peer.role == Role::MigrationSource && peer_sends;
        let forward_destination = peer.role == Role::MigrationDestination && !peer_sends;
        let ok = match kind {
            K::Hello | K::Heartbeat | K::Goodbye => true,
            K::EpochBegin | K::PageBatch | K::StateChunk | K::EpochEnd => peer_sends,
            K::Ack | K::ResendRequest | K::ResyncRequest => !peer_sends,
            K::PageResponse | K::SwitchOver | K::Handover => forward_source,
            K::PageMap => forward_source || forward_destination,
            K::PageRequest | K::Resumed | K::Complete => forward_destination,
            // Only a protection primary forwards inbound and output frames (to a backup that
            // asked for them: the receiver drops them otherwise).
            K::Inbound | K::InboundCommitted | K::Output => peer_sends && peer.role == Role::Primary,
        };
        if ok { Ok(()) } else { Err(SessionError::Unexpected { kind, role: peer.role, sends: peer_sends }) }
    }

    /// The handshake rules, in order: a common version; roles that pair (protection with
    /// protection, migration with migration, never a role with itself); a version with
    /// migration for a migration session; exactly one side sending checkpoints; a starting
    /// position only in a reverse session and the same on both sides; the same VM and memory
    /// layout; epoch numbers within bounds.
    fn accept_hello(&mut self, h: &Hello, local: &Local) -> Result<(), SessionError> {
        self.version = negotiate_with(local.version, h.version, h.min_version)?;
        if h.role != local.role.counterpart() {
            return Err(SessionError::Role { ours: local.role, peer: h.role });
        }
        if local.role.is_migration() && !Feature::Migration.in_version(self.version) {
            return Err(SessionError::MigrationVersion {
                ours: local.role,
                version: self.version,
                needs: Feature::Migration.since(),
            });
        }
        if h.sends_checkpoints == local.sends {
            return Err(SessionError::Direction { peer: h.role, peer_sends: h.sends_checkpoints });
        }
        // A starting position: only in a reverse session, and the same on both sides.
        let sender_role = if h.sends_checkpoints { h.role } else { local.role };
        if h.start.is_some() && sender_role != Role::MigrationDestination {
            return Err(SessionError::StartRole { peer: h.role, peer_sends: h.sends_checkpoints });
        }
        if h.start != local.start {
            return Err(SessionError::Start { ours: local.start, peer: h.start });
        }
        if h.vm.uuid != local.vm.uuid {
            return Err(SessionError::Vm { ours: hex(&local.vm.uuid), peer: hex(&h.vm.uuid) });
        }
        if h.layout != local.layout {
            return Err(SessionError::Layout {
                pages: local.layout.page_count(),
                page_size: local.layout.page_size,
                peer_pages: h.layout.page_count(),
                peer_page_size: h.layout.page_size,
            });
        }
        check_epochs(h)
    }
}

/// Refuses a `Hello` whose epoch numbers leave no room to count on (see
/// [`crate::limits::MAX_ANNOUNCED_EPOCH`]).
fn check_epochs(h: &Hello) -> Result<(), SessionError> {
    let limit = crate::limits::MAX_ANNOUNCED_EPOCH;
    let fields = [
        ("high_water", Some(h.high_water)),
        ("committed epoch", h.committed.map(|p| p.epoch)),
        ("delivered epoch", h.delivered.map(|p| p.epoch)),
    ];
    match fields.into_iter().find(|(_, v)| v.is_some_and(|v| v > limit)) {
        Some((field, Some(value))) => Err(SessionError::EpochLimit { field, value, limit }),
        _ => Ok(()),
    }
}

/// A starting position for an error message (`epoch 12 of lineage 0x…/12`).
fn position(p: &Position) -> String {
    format!("epoch {} of lineage {:#x}/{}", p.epoch, p.lineage.origin, p.lineage.baseline)
}

/// The message of [`SessionError::Start`].
fn start_mismatch(ours: &Option<Position>, peer: &Option<Position>) -> String {
    match (ours, peer) {
        (Some(o), Some(p)) => {
            format!("peer starts the series at {}, we at {}: not the same switch-over", position(p), position(o))
        }
        (Some(o), None) => format!(
            "peer announces no starting position, we start the series at {} (a peer without reverse sessions, or not \
             told the switch-over)",
            position(o)
        ),
        (None, Some(p)) => {
            format!("peer starts the series at {}, we were told no starting position", position(p))
        }
        (None, None) => "both sides start the series with a baseline".to_owned(),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
