//! An established connection: ordered control frames, parallel bulk frames, datagrams.
//!
//! | channel | carried on | order | for |
//! |---|---|---|---|
//! | control | one unidirectional stream each way, higher send priority | total | protocol messages: epoch start/end, acks, requests |
//! | bulk | `bulk_streams` unidirectional streams each way | per stream only | page batches |
//! | datagram | QUIC datagrams (unreliable, never blocks) | none | heartbeats |
//!
//! Frames are opaque byte strings up to [`Tuning::max_frame_size`]; the protocol above numbers
//! what it needs to (a checkpoint's end frame on the control stream says how many batches the
//! bulk streams carried). Sending waits while quinn's send window is full; receiving queues at
//! most [`Tuning::recv_queue_bytes`] per channel, then stops reading so QUIC flow control holds
//! the sender. Nothing buffers without bound.

mod reader;
pub(crate) mod wire;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quinn::{SendDatagramError, SendStream, WriteError};
use tokio::sync::{Mutex as AsyncMutex, Semaphore, mpsc, oneshot};

use crate::config::Tuning;
use reader::{Inbound, Queue, Queued};
use wire::StreamKind;

pub(crate) use wire::MAX_FRAME_LIMIT;

/// Application close code: orderly close (goodbye).
pub const CODE_GOODBYE: u32 = 0;
/// Application close code: the peer broke the framing.
pub const CODE_PROTOCOL: u32 = 1;
/// Application close code: the connection handle was dropped without [`Connection::close`].
pub const CODE_DROPPED: u32 = 2;

/// Send priority of the control stream; bulk streams have 0. Control frames (acks, commits)
/// therefore overtake queued page batches.
const CONTROL_PRIORITY: i32 = 1;

/// Errors of an established connection.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("peer {peer} closed the connection: {}", or_none(.reason))]
    PeerClosed { peer: SocketAddr, reason: String },
    #[error("peer {peer} closed the connection with code {code}: {}", or_none(.reason))]
    PeerAborted { peer: SocketAddr, code: u64, reason: String },
    #[error("peer {peer} gone: nothing heard for {idle:?}")]
    PeerGone { peer: SocketAddr, idle: Duration },
    #[error("peer {peer} reset the connection (it lost its state, e.g. restarted)")]
    PeerReset { peer: SocketAddr },
    #[error("peer {peer} stopped reading our {channel} stream (code {code})")]
    PeerStopped { peer: SocketAddr, channel: &'static str, code: u64 },
    #[error("transport error with peer {peer}: {reason}")]
    Transport { peer: SocketAddr, reason: String },
    #[error("peer {peer} broke the framing: {what}")]
    Protocol { peer: SocketAddr, what: String },
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: usize, max: u32 },
    #[error("datagram of {len} bytes exceeds the path limit of {max}")]
    DatagramTooLarge { len: usize, max: usize },
    #[error("peer {peer} does not accept datagrams")]
    DatagramsUnsupported { peer: SocketAddr },
    #[error("our {channel} stream was torn by a cancelled send; the connection is unusable")]
    Torn { channel: &'static str },
    #[error("connection closed locally")]
    Closed,
}

fn or_none(reason: &str) -> &str {
    if reason.is_empty() { "(no reason given)" } else { reason }
}

/// Frame-layer counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    frames_sent: AtomicU64,
    bytes_sent: AtomicU64,
    frames_received: AtomicU64,
    bytes_received: AtomicU64,
    /// Received frame bytes waiting in our queues (both channels).
    queued_bytes: AtomicU64,
    datagrams_sent: AtomicU64,
    datagrams_received: AtomicU64,
}

/// What the frame layer has done so far, and quinn's own statistics.
#[derive(Clone, Debug)]
pub struct Stats {
    /// Frames accepted by `send_frame`/`send_bulk`.
    pub frames_sent: u64,
    /// Payload bytes of those frames.
    pub bytes_sent: u64,
    /// Frames handed to the application by `recv_frame`/`recv_bulk`.
    pub frames_received: u64,
    /// Payload bytes of those frames.
    pub bytes_received: u64,
    /// Received payload bytes queued, not yet taken by the application.
    pub queued_bytes: u64,
    /// Datagrams sent.
    pub datagrams_sent: u64,
    /// Datagrams received.
    pub datagrams_received: u64,
    /// Current RTT estimate.
    pub rtt: Duration,
    /// quinn's counters (packets, frames, congestion window, lost bytes, ...).
    pub quic: quinn::ConnectionStats,
}

/// Connection state the reader tasks share with the handle.
#[derive(Debug, Default)]
pub(crate) struct State {
    inner: Mutex<StateInner>,
}

#[derive(Debug, Default)]
struct StateInner {
    /// First framing error seen; it explains the close.
    error: Option<ConnectionError>,
    /// The reason in the peer's goodbye.
    peer_goodbye: Option<String>,
    /// We said goodbye (close was called).
    closing: bool,
    /// 1 + the peer's bulk stream count, once its control stream arrived.
    peer_streams: Option<usize>,
    /// Peer streams that finished cleanly.
    peer_streams_ended: usize,
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, StateInner> {
        // The state is plain data, consistent after each statement: a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn fail_protocol(&self, quinn: &quinn::Connection, peer: SocketAddr, what: String) {
        tracing::warn!(%peer, "closing connection: {what}");
        quinn.close(CODE_PROTOCOL.into(), what.as_bytes());
        let mut inner = self.lock();
        if inner.error.is_none() {
            inner.error = Some(ConnectionError::Protocol { peer, what });
        }
    }

    /// Records the peer's control stream; false if it already had one.
    fn peer_control_opened(&self, bulk_streams: u8) -> bool {
        let mut inner = self.lock();
        if inner.peer_streams.is_some() {
            return false;
        }
        inner.peer_streams = Some(1 + usize::from(bulk_streams));
        true
    }

    fn peer_said_goodbye(&self, reason: String) {
        self.lock().peer_goodbye = Some(reason);
    }

    /// Counts a cleanly finished peer stream; true when the peer said goodbye and all of its
    /// streams are now read to the end, i.e. we may close.
    fn peer_stream_ended(&self) -> bool {
        let mut inner = self.lock();
        inner.peer_streams_ended += 1;
        inner.peer_goodbye.is_some() && Some(inner.peer_streams_ended) == inner.peer_streams
    }
}

/// One of our send streams, with a flag for a frame half written by a cancelled send.
struct Outbound {
    stream: SendStream,
    torn: bool,
}

struct Shared {
    quinn: quinn::Connection,
    peer: SocketAddr,
    peer_name: Option<String>,
    version: u32,
    idle_timeout: Duration,
    close_linger: Duration,
    max_frame: u32,
    control_tx: AsyncMutex<Outbound>,
    bulk_tx: Vec<AsyncMutex<Outbound>>,
    next_lane: AtomicUsize,
    control_rx: AsyncMutex<mpsc::UnboundedReceiver<Queued>>,
    bulk_rx: AsyncMutex<mpsc::UnboundedReceiver<Queued>>,
    budgets: [Arc<Semaphore>; 2],
    state: Arc<State>,
    counters: Arc<Counters>,
    closing: AtomicBool,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Wakes reader tasks waiting for budget so they end; closing is a no-op after close().
        for budget in &self.budgets {
            budget.close();
        }
        self.quinn.close(CODE_DROPPED.into(), b"connection dropped");
    }
}

/// Why [`Connection::establish`] failed; the endpoint turns it into a handshake error.
pub(crate) enum SetupFailure {
    Connection(quinn::ConnectionError),
    NotUnderstudy(String),
}

/// An established, authenticated connection to a peer. Cheap to clone; all clones share it.
/// Dropping the last clone without [`Connection::close`] aborts the connection.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.shared.peer)
            .field("peer_name", &self.shared.peer_name)
            .field("version", &self.shared.version)
            .finish_non_exhaustive()
    }
}

/// Which send channel a write went to, for messages.
#[derive(Clone, Copy)]
enum Channel {
    Control,
    Bulk,
}

impl Channel {
    fn name(self) -> &'static str {
        match self {
            Channel::Control => "control",
            Channel::Bulk => "bulk",
        }
    }
}

impl Connection {
    /// Opens our streams, starts the readers and waits for the peer's control stream, which
    /// tells us the peer accepted the handshake too (in TLS 1.3 the client finishes before the
    /// server has checked its certificate).
    pub(crate) async fn establish(
        quinn: quinn::Connection,
        tuning: &Tuning,
        version: u32,
        peer_name: Option<String>,
    ) -> Result<Connection, SetupFailure> {
        let peer = quinn.remote_address();
        let lost = SetupFailure::Connection;
        let open = |kind| {
            let quinn = quinn.clone();
            async move {
                let mut stream = quinn.open_uni().await.map_err(lost)?;
                stream.write_all(&wire::header(kind)).await.map_err(|e| match e {
                    WriteError::ConnectionLost(e) => SetupFailure::Connection(e),
                    other => SetupFailure::NotUnderstudy(format!("peer refused our stream: {other}")),
                })?;
                Ok::<_, SetupFailure>(Outbound { stream, torn: false })
            }
        };
        let control = open(StreamKind::Control { bulk_streams: tuning.bulk_streams }).await?;
        let _ = control.stream.set_priority(CONTROL_PRIORITY);
        let mut bulk = Vec::with_capacity(usize::from(tuning.bulk_streams));
        for index in 0..tuning.bulk_streams {
            bulk.push(AsyncMutex::new(open(StreamKind::Bulk { index }).await?));
        }

        let state = Arc::new(State::default());
        let counters = Arc::new(Counters::default());
        let (ready_tx, ready_rx) = oneshot::channel();
        let (control_in, control_rx) = mpsc::unbounded_channel();
        let (bulk_in, bulk_rx) = mpsc::unbounded_channel();
        let budget_max = tuning.recv_queue_bytes;
        let budgets = [Arc::new(Semaphore::new(budget_max as usize)), Arc::new(Semaphore::new(budget_max as usize))];
        let inbound = Arc::new(Inbound {
            quinn: quinn.clone(),
            peer,
            max_frame: tuning.max_frame_size,
            control: Queue { tx: control_in, budget: budgets[0].clone(), budget_max },
            bulk: Queue { tx: bulk_in, budget: budgets[1].clone(), budget_max },
            state: state.clone(),
            counters: counters.clone(),
            ready: Mutex::new(Some(ready_tx)),
        });
        tokio::spawn(reader::accept_streams(inbound));
        let connection = Connection {
            shared: Arc::new(Shared {
                peer,
                peer_name,
                version,
                idle_timeout: tuning.idle_timeout,
                close_linger: tuning.close_linger,
                max_frame: tuning.max_frame_size,
                control_tx: AsyncMutex::new(control),
                bulk_tx: bulk,
                next_lane: AtomicUsize::new(0),
                control_rx: AsyncMutex::new(control_rx),
                bulk_rx: AsyncMutex::new(bulk_rx),
                budgets,
                state,
                counters,
                closing: AtomicBool::new(false),
                quinn: quinn.clone(),
            }),
        };
        tokio::select! {
            biased;
            ready = ready_rx => match ready {
                Ok(_) => Ok(connection),
                // The readers ended without a control stream: a framing error or a close.
                Err(_) => {
                    let framing = connection.shared.state.lock().error.clone();
                    Err(match framing {
                        Some(error) => SetupFailure::NotUnderstudy(error.to_string()),
                        None => SetupFailure::Connection(quinn.closed().await),
                    })
                }
            },
            error = quinn.closed() => Err(SetupFailure::Connection(error)),
        }
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.shared.peer
    }

    /// The subject common name of the peer's certificate (its host name, for certificates made
    /// by [`crate::certs::generate`]).
    pub fn peer_name(&self) -> Option<&str> {
        self.shared.peer_name.as_deref()
    }

    /// The role in the peer's certificate (checked during the handshake against the
    /// endpoint's [`PeerPolicy`](crate::PeerPolicy)).
    pub fn peer_role(&self) -> Option<crate::certs::Role> {
        let identity = self.shared.quinn.peer_identity()?;
        let chain = identity.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
        crate::certs::certificate_role(chain.first()?).ok()
    }

    /// The protocol version both sides agreed on (from ALPN).
    pub fn version(&self) -> u32 {
        self.shared.version
    }

    /// 32 bytes both ends of this connection derive from its TLS session (RFC 5705 exporter)
    /// under `label`: a secret only these two peers know, to bind a side channel such as
    /// [`crate::liveness`] to this authenticated connection.
    pub fn keying_material(&self, label: &[u8]) -> Option<[u8; 32]> {
        let mut out = [0u8; 32];
        self.shared.quinn.export_keying_material(&mut out, label, b"understudy").ok()?;
        Some(out)
    }

    /// Sends a frame on the ordered control stream. Waits while the send window is full.
    ///
    /// Not cancel-safe: dropping the future in the middle of a write leaves half a frame on the
    /// stream, and later sends on it fail with [`ConnectionError::Torn`].
    pub async fn send_frame(&self, frame: Bytes) -> Result<(), ConnectionError> {
        let mut control = self.shared.control_tx.lock().await;
        self.write_frame(&mut control, Channel::Control, frame).await
    }

    /// Sends a frame on one of the bulk streams, whichever is free (round robin). Frames sent
    /// through different streams may arrive in any order. Waits while the send window is full.
    /// Not cancel-safe, as [`Connection::send_frame`].
    pub async fn send_bulk(&self, frame: Bytes) -> Result<(), ConnectionError> {
        let lanes = &self.shared.bulk_tx;
        let start = self.shared.next_lane.fetch_add(1, Ordering::Relaxed);
        for i in 0..lanes.len() {
            if let Ok(mut lane) = lanes[(start + i) % lanes.len()].try_lock() {
                return self.write_frame(&mut lane, Channel::Bulk, frame).await;
            }
        }
        let mut lane = lanes[start % lanes.len()].lock().await;
        self.write_frame(&mut lane, Channel::Bulk, frame).await
    }

    /// Sends a frame on bulk stream `lane % bulk_streams`: frames on one lane arrive in order.
    pub async fn send_bulk_on(&self, lane: usize, frame: Bytes) -> Result<(), ConnectionError> {
        let lanes = &self.shared.bulk_tx;
        let mut lane = lanes[lane % lanes.len()].lock().await;
        self.write_frame(&mut lane, Channel::Bulk, frame).await
    }

    /// How many bulk streams we send on.
    pub fn bulk_streams(&self) -> usize {
        self.shared.bulk_tx.len()
    }

    async fn write_frame(&self, out: &mut Outbound, channel: Channel, frame: Bytes) -> Result<(), ConnectionError> {
        let len = frame.len();
        if len > self.shared.max_frame as usize {
            return Err(ConnectionError::FrameTooLarge { len, max: self.shared.max_frame });
        }
        if self.shared.closing.load(Ordering::Relaxed) {
            return Err(ConnectionError::Closed);
        }
        if out.torn {
            return Err(ConnectionError::Torn { channel: channel.name() });
        }
        let mut chunks = [wire::frame_word(len), frame];
        out.torn = true;
        out.stream.write_all_chunks(&mut chunks).await.map_err(|e| self.write_error(e, channel))?;
        out.torn = false;
        tracing::trace!(channel = channel.name(), len, wall_ns = crate::wall_ns(), "frame written");
        let counters = &self.shared.counters;
        counters.frames_sent.fetch_add(1, Ordering::Relaxed);
        counters.bytes_sent.fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Receives the next control frame, in order. After the peer's goodbye or the end of the
    /// connection, the frames already received come first, then the error saying why it ended.
    pub async fn recv_frame(&self) -> Result<Bytes, ConnectionError> {
        let mut rx = self.shared.control_rx.lock().await;
        self.take(rx.recv().await).await
    }

    /// Receives the next bulk frame, from whichever bulk stream has one.
    pub async fn recv_bulk(&self) -> Result<Bytes, ConnectionError> {
        let mut rx = self.shared.bulk_rx.lock().await;
        self.take(rx.recv().await).await
    }

    async fn take(&self, queued: Option<Queued>) -> Result<Bytes, ConnectionError> {
        let Some(queued) = queued else {
            return Err(self.end_reason().await);
        };
        let len = queued.bytes.len() as u64;
        let counters = &self.shared.counters;
        counters.queued_bytes.fetch_sub(len, Ordering::Relaxed);
        counters.frames_received.fetch_add(1, Ordering::Relaxed);
        counters.bytes_received.fetch_add(len, Ordering::Relaxed);
        Ok(queued.bytes)
    }

    /// Sends a datagram: unreliable, unordered, never waits. When the send buffer is full the
    /// oldest queued datagram is dropped. For heartbeats.
    pub fn send_datagram(&self, data: Bytes) -> Result<(), ConnectionError> {
        let len = data.len();
        match self.shared.quinn.send_datagram(data) {
            Ok(()) => {
                self.shared.counters.datagrams_sent.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(SendDatagramError::TooLarge) => {
                Err(ConnectionError::DatagramTooLarge { len, max: self.max_datagram_size().unwrap_or(0) })
            }
            Err(SendDatagramError::UnsupportedByPeer | SendDatagramError::Disabled) => {
                Err(ConnectionError::DatagramsUnsupported { peer: self.shared.peer })
            }
            Err(SendDatagramError::ConnectionLost(error)) => Err(self.explain(error)),
        }
    }

    /// Receives the next datagram.
    pub async fn recv_datagram(&self) -> Result<Bytes, ConnectionError> {
        match self.shared.quinn.read_datagram().await {
            Ok(data) => {
                self.shared.counters.datagrams_received.fetch_add(1, Ordering::Relaxed);
                Ok(data)
            }
            Err(error) => Err(self.explain(error)),
        }
    }

    /// The largest datagram the path takes now (it can grow with MTU discovery).
    pub fn max_datagram_size(&self) -> Option<usize> {
        self.shared.quinn.max_datagram_size()
    }

    /// Closes in order: sends a goodbye with `reason` on the control stream, finishes our
    /// streams, and waits (at most [`Tuning::close_linger`]) for the peer to read everything
    /// and close its end; then closes the connection. Frames sent before are delivered unless
    /// the peer stops reading for longer than the linger time. The peer's receivers see
    /// [`ConnectionError::PeerClosed`] with `reason` after the last frame.
    pub async fn close(&self, reason: &str) {
        let shared = &self.shared;
        let goodbye = async {
            {
                let mut control = shared.control_tx.lock().await;
                shared.closing.store(true, Ordering::Relaxed);
                shared.state.lock().closing = true;
                if !control.torn {
                    let _ = control.stream.write_chunk(wire::goodbye(reason)).await;
                }
                let _ = control.stream.finish();
            }
            for lane in &shared.bulk_tx {
                let _ = lane.lock().await.stream.finish();
            }
            shared.quinn.closed().await
        };
        let _ = tokio::time::timeout(shared.close_linger, goodbye).await;
        shared.closing.store(true, Ordering::Relaxed);
        shared.state.lock().closing = true;
        shared.quinn.close(CODE_GOODBYE.into(), wire::cut_reason(reason).as_bytes());
    }

    /// Waits until the connection ends and says why.
    pub async fn closed(&self) -> ConnectionError {
        self.shared.quinn.closed().await;
        self.end_reason().await
    }

    /// Why the connection ended, if it has.
    pub fn close_reason(&self) -> Option<ConnectionError> {
        let error = self.shared.quinn.close_reason()?;
        Some(self.explain(error))
    }

    /// Counters of the frame layer and of quinn.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        Stats {
            frames_sent: c.frames_sent.load(Ordering::Relaxed),
            bytes_sent: c.bytes_sent.load(Ordering::Relaxed),
            frames_received: c.frames_received.load(Ordering::Relaxed),
            bytes_received: c.bytes_received.load(Ordering::Relaxed),
            queued_bytes: c.queued_bytes.load(Ordering::Relaxed),
            datagrams_sent: c.datagrams_sent.load(Ordering::Relaxed),
            datagrams_received: c.datagrams_received.load(Ordering::Relaxed),
            rtt: self.shared.quinn.rtt(),
            quic: self.shared.quinn.stats(),
        }
    }

    /// Why the connection ended, once it has (the receive queues closed only then).
    async fn end_reason(&self) -> ConnectionError {
        let error = self.shared.quinn.closed().await;
        self.explain(error)
    }

    /// Our framing error, then the peer's goodbye, then our own close, then quinn's reason.
    fn explain(&self, error: quinn::ConnectionError) -> ConnectionError {
        {
            let state = self.shared.state.lock();
            if let Some(error) = &state.error {
                return error.clone();
            }
            if let Some(reason) = &state.peer_goodbye {
                return ConnectionError::PeerClosed { peer: self.shared.peer, reason: reason.clone() };
            }
            if state.closing {
                return ConnectionError::Closed;
            }
        }
        self.map_quinn(error)
    }

    fn map_quinn(&self, error: quinn::ConnectionError) -> ConnectionError {
        let peer = self.shared.peer;
        match error {
            quinn::ConnectionError::ApplicationClosed(close) => {
                let code = close.error_code.into_inner();
                let reason = String::from_utf8_lossy(&close.reason).into_owned();
                if code == u64::from(CODE_GOODBYE) {
                    ConnectionError::PeerClosed { peer, reason }
                } else {
                    ConnectionError::PeerAborted { peer, code, reason }
                }
            }
            quinn::ConnectionError::TimedOut => ConnectionError::PeerGone { peer, idle: self.shared.idle_timeout },
            quinn::ConnectionError::Reset => ConnectionError::PeerReset { peer },
            quinn::ConnectionError::LocallyClosed => {
                let state = self.shared.state.lock();
                state.error.clone().unwrap_or(ConnectionError::Closed)
            }
            quinn::ConnectionError::ConnectionClosed(close) => {
                ConnectionError::Transport { peer, reason: close.to_string() }
            }
            other => ConnectionError::Transport { peer, reason: other.to_string() },
        }
    }

    fn write_error(&self, error: WriteError, channel: Channel) -> ConnectionError {
        match error {
            WriteError::ConnectionLost(error) => self.explain(error),
            WriteError::Stopped(code) => ConnectionError::PeerStopped {
                peer: self.shared.peer,
                channel: channel.name(),
                code: code.into_inner(),
            },
            WriteError::ClosedStream | WriteError::ZeroRttRejected => ConnectionError::Closed,
        }
    }
}
