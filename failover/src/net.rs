//! The async driver (tokio): carries raft messages between the three nodes, feeds time into the
//! sans-IO [`Arbiter`] or [`Witness`], and hands events out. Behind the `net` feature; nothing
//! else in the crate uses tokio.
//!
//! # The transport seam
//!
//! The driver talks to the network through two things only:
//! - outgoing: a [`PeerLink`], `send(to, bytes)`: best effort, non-blocking, may drop;
//! - incoming: a `tokio::sync::mpsc::Receiver<Inbound>` of `(from, bytes)`, where `from` is the
//!   peer's *authenticated* identity.
//!
//! [`UdpLink`] implements both over plain UDP, for this crate's loopback tests only: it checks
//! that a datagram's claimed sender matches the configured address, which is no authentication
//! at all, and the `understudy` binary refuses to run arbitration over it. [`quic::QuicLink`] implements both over QUIC with mutual TLS (`transport`): one
//! datagram per message when it fits, else one frame on the control stream (messages are at
//! most [`ArbiterConfig::max_msg_bytes`] plus a few hundred bytes, snapshots a little more), and
//! every message it receives is pushed into the inbox with the node id mapped from the peer's
//! verified certificate name. The arbiter refuses a message whose raft `from` differs from that
//! id, and every message that does not look like what the group sends (`docs/failover.md`, *Off
//! the wire*). [`quic::run_witness_quic`] serves a group over QUIC, [`run_witness`] over UDP
//! (tests).
//!
//! # Blocking
//!
//! The arbiter writes and fsyncs its journal inside `step` and `handle_timeout` (a few
//! milliseconds on a disk). The witness is a process of its own and does not care; an agent that
//! shares a runtime with latency-sensitive tasks should give the driver its own thread (a
//! current-thread runtime on a dedicated thread is enough).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};

use crate::NodeId;
use crate::arbiter::{Arbiter, ArbiterConfig, ArbiterError, Event};
use crate::witness::Witness;

pub mod agent;
pub mod quic;

pub use quic::{PeerSpec, QuicLink, WitnessQuicConfig, parse_quic_peer, run_witness_quic};

/// Errors of the driver.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("udp bind {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("peer spec {spec:?}: expected ID=HOST:PORT")]
    PeerSpec { spec: String },
    #[error("peer spec {spec:?}: expected ID=NAME@HOST:PORT")]
    QuicPeerSpec { spec: String },
    #[error("peer list: {reason}")]
    Peers { reason: String },
    #[error("quic endpoint")]
    Endpoint(#[from] transport::EndpointError),
    #[error("witness data directory {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: ArbiterError,
    },
    #[error("arbiter")]
    Arbiter(#[from] ArbiterError),
    #[error("arbiter task ended: {reason}")]
    Failed { reason: String },
}

/// Sends raft messages to peers. Best effort: a lost message is retried by raft.
pub trait PeerLink: Send + Sync + 'static {
    /// Queues `bytes` for node `to`; never blocks.
    fn send(&self, to: NodeId, bytes: Vec<u8>);
}

/// A message received from an authenticated peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub from: NodeId,
    pub bytes: Vec<u8>,
}

/// What the driver needs from a node.
pub trait Node: Send {
    fn step(&mut self, now: Instant, from: NodeId, bytes: &[u8]) -> Result<(), ArbiterError>;
    fn handle_timeout(&mut self, now: Instant) -> Result<(), ArbiterError>;
    fn poll_transmit(&mut self) -> Option<(NodeId, Vec<u8>)>;
    fn poll_timeout(&self) -> Option<Instant>;
    fn poll_event(&mut self) -> Option<Event>;
}

impl Node for Arbiter {
    fn step(&mut self, now: Instant, from: NodeId, bytes: &[u8]) -> Result<(), ArbiterError> {
        Arbiter::step(self, now, from, bytes)
    }
    fn handle_timeout(&mut self, now: Instant) -> Result<(), ArbiterError> {
        Arbiter::handle_timeout(self, now)
    }
    fn poll_transmit(&mut self) -> Option<(NodeId, Vec<u8>)> {
        Arbiter::poll_transmit(self)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        Arbiter::poll_timeout(self)
    }
    fn poll_event(&mut self) -> Option<Event> {
        Arbiter::poll_event(self)
    }
}

impl Node for Witness {
    fn step(&mut self, now: Instant, from: NodeId, bytes: &[u8]) -> Result<(), ArbiterError> {
        Witness::step(self, now, from, bytes)
    }
    fn handle_timeout(&mut self, now: Instant) -> Result<(), ArbiterError> {
        Witness::handle_timeout(self, now)
    }
    fn poll_transmit(&mut self) -> Option<(NodeId, Vec<u8>)> {
        Witness::poll_transmit(self)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        Witness::poll_timeout(self)
    }
    fn poll_event(&mut self) -> Option<Event> {
        Witness::poll_event(self)
    }
}

const UDP_MAGIC: u8 = 0x55; // 'U'
const UDP_VERSION: u8 = 1;
const UDP_HEADER: usize = 10;
const MAX_DATAGRAM: usize = 65_507;

/// Raft messages over UDP: `magic | version | from: u64 | raft envelope`. The raft envelope
/// carries its own crc32. See the module documentation for what this does not protect against.
#[derive(Debug)]
pub struct UdpLink {
    me: NodeId,
    socket: Arc<UdpSocket>,
    peers: HashMap<NodeId, SocketAddr>,
    receiver: tokio::task::AbortHandle,
}

impl Drop for UdpLink {
    fn drop(&mut self) {
        // The receive task holds the socket: stop it so the address is free again.
        self.receiver.abort();
    }
}

impl UdpLink {
    /// Binds `listen` and starts receiving; returns the link and its inbox.
    pub async fn bind(
        me: NodeId,
        listen: SocketAddr,
        peers: &[(NodeId, SocketAddr)],
    ) -> Result<(Arc<Self>, mpsc::Receiver<Inbound>), NetError> {
        let socket = UdpSocket::bind(listen).await.map_err(|source| NetError::Bind { addr: listen, source })?;
        let socket = Arc::new(socket);
        let peers: HashMap<NodeId, SocketAddr> = peers.iter().copied().collect();
        let (tx, rx) = mpsc::channel(1024);
        let receiver = tokio::spawn(receive(me, socket.clone(), peers.clone(), tx)).abort_handle();
        Ok((Arc::new(Self { me, socket, peers, receiver }), rx))
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }
}

impl PeerLink for UdpLink {
    fn send(&self, to: NodeId, bytes: Vec<u8>) {
        let Some(addr) = self.peers.get(&to) else {
            tracing::debug!(node = self.me, to, "no address for peer, message dropped");
            return;
        };
        if bytes.len() + UDP_HEADER > MAX_DATAGRAM {
            tracing::warn!(node = self.me, to, len = bytes.len(), "raft message too large for udp, dropped");
            return;
        }
        let mut frame = Vec::with_capacity(UDP_HEADER + bytes.len());
        frame.push(UDP_MAGIC);
        frame.push(UDP_VERSION);
        frame.extend_from_slice(&self.me.to_le_bytes());
        frame.extend_from_slice(&bytes);
        if let Err(e) = self.socket.try_send_to(&frame, *addr) {
            tracing::trace!(node = self.me, to, error = %e, "udp send failed");
        }
    }
}

async fn receive(me: NodeId, socket: Arc<UdpSocket>, peers: HashMap<NodeId, SocketAddr>, tx: mpsc::Sender<Inbound>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, src) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors from a dead peer surface here on Linux; keep listening.
                tracing::trace!(node = me, error = %e, "udp receive error");
                continue;
            }
        };
        let frame = &buf[..len];
        if len < UDP_HEADER || frame[0] != UDP_MAGIC || frame[1] != UDP_VERSION {
            tracing::debug!(node = me, %src, len, "garbage datagram dropped");
            continue;
        }
        let from = u64::from_le_bytes(frame[2..10].try_into().expect("8 bytes"));
        if peers.get(&from) != Some(&src) {
            tracing::debug!(node = me, %src, from, "datagram from an unexpected address dropped");
            continue;
        }
        let inbound = Inbound { from, bytes: frame[UDP_HEADER..].to_vec() };
        if tx.send(inbound).await.is_err() {
            return; // the driver is gone
        }
    }
}

/// Drives `node` until the inbox closes or the journal fails: steps received messages, calls
/// `handle_timeout` on time, sends what it wants sent and forwards its events to `events` (if
/// given). Input errors (garbage, spoofed or misrouted messages) are logged and skipped.
pub async fn drive<N: Node + ?Sized>(
    node: &mut N,
    link: &dyn PeerLink,
    inbox: &mut mpsc::Receiver<Inbound>,
    events: Option<&mpsc::UnboundedSender<Event>>,
) -> Result<(), NetError> {
    let mut commands = mpsc::unbounded_channel::<Command<N>>().1;
    drive_with(node, link, inbox, events, &mut commands).await
}

type Command<N> = Box<dyn FnOnce(&mut N, Instant) + Send>;

async fn drive_with<N: Node + ?Sized>(
    node: &mut N,
    link: &dyn PeerLink,
    inbox: &mut mpsc::Receiver<Inbound>,
    events: Option<&mpsc::UnboundedSender<Event>>,
    commands: &mut mpsc::UnboundedReceiver<Command<N>>,
) -> Result<(), NetError> {
    node.handle_timeout(Instant::now())?;
    let mut commands_open = true;
    loop {
        while let Some((to, bytes)) = node.poll_transmit() {
            link.send(to, bytes);
        }
        while let Some(e) = node.poll_event() {
            if let Some(tx) = events {
                let _ = tx.send(e);
            }
        }
        let deadline = node.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            msg = inbox.recv() => {
                let Some(msg) = msg else { return Ok(()) };
                match node.step(Instant::now(), msg.from, &msg.bytes) {
                    Ok(()) => {}
                    Err(e @ (ArbiterError::Stopped { .. } | ArbiterError::Journal(_))) => return Err(e.into()),
                    // Refusals are logged by the arbiter itself (rate limited).
                    Err(e) => tracing::trace!(from = msg.from, error = %e, "message refused"),
                }
            }
            cmd = commands.recv(), if commands_open => match cmd {
                Some(f) => f(node, Instant::now()),
                None => commands_open = false,
            },
            _ = sleep_until(deadline) => node.handle_timeout(Instant::now())?,
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// A handle on an arbiter running in its own task ([`spawn_arbiter`]): the primary's and
/// backup's processes call into it; events arrive on the receiver returned with it.
///
/// The task ends only on a failure: a journal that cannot be written, a panic, or a link whose
/// inbox closed. It then logs an error, and every [`ArbiterHandle::call`] fails with
/// [`NetError::Failed`] naming why; [`ArbiterHandle::failed`] lets the owner wait for that and
/// act (a node without its arbiter can neither renew a lease nor be granted anything).
#[derive(Debug, Clone)]
pub struct ArbiterHandle {
    commands: mpsc::UnboundedSender<Command<Arbiter>>,
    ended: watch::Receiver<Option<String>>,
}

impl ArbiterHandle {
    /// Runs `f` on the arbiter with the driver's clock, and returns its result. Typical uses:
    /// `request_activity`, `report_primary_dead`, `set_backup`, and fetching an
    /// [`OutputPermit`](crate::OutputPermit) that the output path then caches and checks.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Arbiter, Instant) -> R + Send + 'static,
    ) -> Result<R, NetError> {
        let (tx, rx) = oneshot::channel();
        let cmd: Command<Arbiter> = Box::new(move |a, now| {
            let _ = tx.send(f(a, now));
        });
        if self.commands.send(cmd).is_err() {
            return Err(NetError::Failed { reason: self.failed().await });
        }
        match rx.await {
            Ok(r) => Ok(r),
            Err(_) => Err(NetError::Failed { reason: self.failed().await }),
        }
    }

    /// Why the arbiter's task ended, if it has.
    pub fn failure(&self) -> Option<String> {
        self.ended.borrow().clone()
    }

    /// Waits until the arbiter's task ends, and says why.
    pub async fn failed(&self) -> String {
        let mut ended = self.ended.clone();
        match ended.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "the arbiter task is gone".to_owned(),
        }
    }
}

/// Runs `arbiter` in a task of its own over `link` and `inbox`. The returned task ends when the
/// arbiter's does, with the reason in [`NetError::Failed`] (see [`ArbiterHandle`]).
pub fn spawn_arbiter(
    mut arbiter: Arbiter,
    link: Arc<dyn PeerLink>,
    mut inbox: mpsc::Receiver<Inbound>,
) -> (ArbiterHandle, mpsc::UnboundedReceiver<Event>, tokio::task::JoinHandle<Result<(), NetError>>) {
    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let (ended_tx, ended) = watch::channel(None);
    let id = arbiter.id();
    let task = tokio::spawn(async move {
        let driven =
            CatchUnwind(Box::pin(drive_with(&mut arbiter, link.as_ref(), &mut inbox, Some(&ev_tx), &mut cmd_rx))).await;
        let reason = ended_because(id, driven);
        let _ = ended_tx.send(Some(reason.clone()));
        Err(NetError::Failed { reason })
    });
    (ArbiterHandle { commands: cmd_tx, ended }, ev_rx, task)
}

/// Polls a future, turning a panic inside it into an `Err` carrying the panic's payload.
struct CatchUnwind<F>(std::pin::Pin<Box<F>>);

impl<F: std::future::Future> std::future::Future for CatchUnwind<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let inner = self.0.as_mut();
        // A future that panicked is never polled again: it is dropped with this one.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Ok(std::task::Poll::Ready(out)) => std::task::Poll::Ready(Ok(out)),
            Err(payload) => std::task::Poll::Ready(Err(payload)),
        }
    }
}

/// Why a driver ended (it only ends on a failure), logged as an error.
fn ended_because(id: NodeId, driven: std::thread::Result<Result<(), NetError>>) -> String {
    let reason = match driven {
        Ok(Ok(())) => "the arbitration link closed".to_owned(),
        Ok(Err(e)) => crate::error_chain(&e),
        Err(payload) => {
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            format!("panicked: {text}")
        }
    };
    tracing::error!(node = id, "ARBITER STOPPED: {reason}; this node no longer takes part in arbitration");
    reason
}

/// Drives `node` until it fails, like [`drive`], and turns a panic in it into
/// [`NetError::Failed`] (logged as an error) instead of unwinding into the caller. Drop the
/// future to stop it.
pub async fn drive_supervised<N: Node>(
    mut node: N,
    id: NodeId,
    link: Arc<dyn PeerLink>,
    mut inbox: mpsc::Receiver<Inbound>,
) -> Result<(), NetError> {
    let driven = CatchUnwind(Box::pin(drive(&mut node, link.as_ref(), &mut inbox, None))).await;
    Err(NetError::Failed { reason: ended_because(id, driven) })
}

/// What `understudy witness` needs.
#[derive(Debug, Clone)]
pub struct WitnessConfig {
    /// Where the raft journal lives.
    pub data: PathBuf,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// The two agents: id and address.
    pub peers: Vec<(NodeId, SocketAddr)>,
    /// The arbiter settings (voters: the peers and the witness; the witness prefers to lead).
    pub arbiter: ArbiterConfig,
}

impl WitnessConfig {
    /// A witness `id` with default timings.
    pub fn new(id: NodeId, data: PathBuf, listen: SocketAddr, peers: Vec<(NodeId, SocketAddr)>) -> Self {
        let mut voters: Vec<NodeId> = peers.iter().map(|(id, _)| *id).chain([id]).collect();
        voters.sort_unstable();
        voters.dedup();
        Self { data, listen, peers, arbiter: Witness::config(id, &voters) }
    }
}

/// Parses a peer given as `ID=HOST:PORT` (for example `1=10.0.0.1:7400`).
pub fn parse_peer(spec: &str) -> Result<(NodeId, SocketAddr), NetError> {
    let err = || NetError::PeerSpec { spec: spec.to_string() };
    let (id, addr) = spec.split_once('=').ok_or_else(err)?;
    let id: NodeId = id.trim().parse().map_err(|_| err())?;
    let addr: SocketAddr = addr.trim().parse().map_err(|_| err())?;
    if id == 0 {
        return Err(err());
    }
    Ok((id, addr))
}

/// A witness over plain UDP (unauthenticated: loopback tests only; `understudy witness` runs
/// [`quic::run_witness_quic`]): opens (or bootstraps) the journal, binds UDP and runs the
/// witness until an error. Drop the future to stop it (every state change is already on disk
/// when a message leaves).
pub async fn run_witness(config: WitnessConfig) -> Result<(), NetError> {
    let id = config.arbiter.id;
    let witness = Witness::open_dir(config.arbiter.clone(), &config.data, Instant::now())
        .map_err(|source| NetError::Open { path: config.data.clone(), source })?;
    let (link, inbox) = UdpLink::bind(id, config.listen, &config.peers).await?;
    tracing::info!(node = id, listen = %config.listen, peers = ?config.peers, "witness running");
    drive_supervised(witness, id, link, inbox).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_specs() {
        assert_eq!(parse_peer("2=127.0.0.1:7002").unwrap(), (2, "127.0.0.1:7002".parse().unwrap()));
        assert_eq!(parse_peer(" 3 = [::1]:9 ").unwrap().0, 3);
        for bad in ["", "2", "x=127.0.0.1:1", "0=127.0.0.1:1", "2=nowhere"] {
            assert!(matches!(parse_peer(bad), Err(NetError::PeerSpec { .. })), "{bad}");
        }
        assert_eq!(parse_peer("2").unwrap_err().to_string(), "peer spec \"2\": expected ID=HOST:PORT");
    }

    #[test]
    fn witness_config_voters() {
        let peers = vec![(1, "127.0.0.1:1".parse().unwrap()), (2, "127.0.0.1:2".parse().unwrap())];
        let c = WitnessConfig::new(3, PathBuf::from("/tmp/w"), "127.0.0.1:3".parse().unwrap(), peers);
        assert_eq!(c.arbiter.voters, vec![1, 2, 3]);
        assert_eq!(c.arbiter.preferred_leader, Some(3));
    }
}
