//! Raft messages over QUIC with mutual TLS: [`QuicLink`], an authenticated [`PeerLink`].
//!
//! Every node binds one [`transport::Endpoint`] with its certificate from the admin's CA and
//! both accepts and makes connections: **the lower id connects to the higher id**, the higher id
//! accepts, so each pair uses exactly one connection. A node refuses an accepted connection
//! whose certificate name is not in its peer list (or that comes from a higher id), and a dialled
//! connection whose certificate names another node than the one it dialled; each refusal is
//! logged at warn level and counted ([`QuicLink::refused`]). A certificate from another CA never
//! gets past the TLS handshake (`transport` checks both sides against the CA).
//!
//! **Who sent a message** is decided once per connection, from the verified certificate:
//! [`transport::Connection::peer_name`] is looked up in the peer list and every [`Inbound`]
//! received on that connection carries that id. Nothing in the payload is read: a datagram or a
//! frame is exactly the bytes given to [`PeerLink::send`] (a raft envelope, [`crate::wire`]). So a
//! peer can only ever speak as itself; a raft message inside whose `from` names another node is
//! refused by the arbiter (`ArbiterError::Spoofed`).
//!
//! A message goes as one QUIC datagram when it fits the path's `max_datagram_size` (heartbeats,
//! votes, small appends), else as one frame on the connection's ordered control stream (large
//! appends, snapshots). The two may overtake each other; raft does not mind. Sending never
//! waits: a message for a peer without a live connection, or beyond the frame queue, is dropped
//! and raft sends it again. When a connection ends the dialling side connects again after a
//! backoff (50 ms doubling to 2 s, reset by a success); an accepted connection from a peer that
//! already has one replaces it (the peer restarted).
//!
//! ALPN: `transport` names versions `understudy/<n>`; the raft link uses
//! [`RAFT_LINK_VERSION`] (`understudy/1001`), a range the replication protocol never reaches, so
//! a replication peer pointed at a raft port (or the reverse) fails the handshake with both sides
//! saying so.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use transport::{Connection, ConnectionError, Endpoint, EndpointError, Identity, PeerPolicy, ProtocolVersions, Tuning};

use super::{Inbound, NetError, PeerLink, drive_supervised};
use crate::NodeId;
use crate::arbiter::ArbiterConfig;
use crate::ratelimit::RefusalLog;
use crate::witness::Witness;

/// The ALPN version of the raft link: `understudy/1001` (raft link version 1, in the 1000 range
/// so that it can never match a replication protocol version).
pub const RAFT_LINK_VERSION: u32 = 1001;

/// Messages queued for the peers' drivers before the receive side stops reading.
const INBOX: usize = 1024;
/// Frames (messages too large for a datagram) queued per connection; more are dropped.
const FRAME_QUEUE: usize = 64;
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A connection that lasted this long resets the backoff; one refused or lost sooner does not,
/// so a peer that keeps refusing us is dialled at most every `MAX_BACKOFF`.
const STABLE: Duration = Duration::from_secs(1);

/// The protocol versions of the raft link.
pub fn raft_versions() -> ProtocolVersions {
    ProtocolVersions::new(RAFT_LINK_VERSION)
}

/// Transport tuning for the raft link: small windows (messages are at most a few tens of KiB),
/// one bulk stream (unused), keep-alive every 250 ms and a 2 s idle timeout. The raft lease and
/// the failure detector decide liveness within tens of milliseconds; the idle timeout only
/// reclaims connections to dead peers, and must survive a busy 2-core host without flapping.
pub fn raft_tuning() -> Tuning {
    const MIB: u32 = 1024 * 1024;
    Tuning {
        stream_receive_window: MIB,
        receive_window: 4 * MIB,
        send_window: 4 * MIB,
        keep_alive: Duration::from_millis(250),
        idle_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_secs(2),
        close_linger: Duration::from_millis(500),
        bulk_streams: 1,
        max_frame_size: 4 * MIB,
        recv_queue_bytes: 4 * MIB,
        ..Tuning::default()
    }
}

/// A peer of the raft link: its node id, the name in its certificate (the host name given to
/// `understudy certs --host`) and where it listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerSpec {
    pub id: NodeId,
    pub name: String,
    pub addr: SocketAddr,
}

impl PeerSpec {
    pub fn new(id: NodeId, name: impl Into<String>, addr: SocketAddr) -> Self {
        Self { id, name: name.into(), addr }
    }
}

/// Parses a peer given as `ID=NAME@HOST:PORT` (for example `1=primary@10.0.0.1:7400`).
pub fn parse_quic_peer(spec: &str) -> Result<PeerSpec, NetError> {
    let err = || NetError::QuicPeerSpec { spec: spec.to_string() };
    let (id, rest) = spec.split_once('=').ok_or_else(err)?;
    let (name, addr) = rest.split_once('@').ok_or_else(err)?;
    let id: NodeId = id.trim().parse().map_err(|_| err())?;
    let name = name.trim();
    let addr: SocketAddr = addr.trim().parse().map_err(|_| err())?;
    if id == 0 || !valid_name(name) {
        return Err(err());
    }
    Ok(PeerSpec::new(id, name, addr))
}

/// Host names as `understudy certs` accepts them: letters, digits, `-`, `.`.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

fn check_peers(me: NodeId, peers: &[PeerSpec]) -> Result<(), NetError> {
    let bad = |reason: String| Err(NetError::Peers { reason });
    if me == 0 {
        return bad("node id 0 is reserved".to_owned());
    }
    for (i, peer) in peers.iter().enumerate() {
        if peer.id == 0 || peer.id == me {
            return bad(format!("peer {:?} has id {} (ours is {me})", peer.name, peer.id));
        }
        if !valid_name(&peer.name) {
            return bad(format!("peer {}: {:?} is not a host name", peer.id, peer.name));
        }
        if let Some(other) = peers[..i].iter().find(|p| p.id == peer.id || p.name == peer.name) {
            return bad(format!("peers {}={} and {}={} clash", other.id, other.name, peer.id, peer.name));
        }
    }
    Ok(())
}

/// Raft messages over mutually authenticated QUIC connections. See the module documentation.
pub struct QuicLink {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QuicLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicLink")
            .field("me", &self.inner.me)
            .field("local_addr", &self.inner.endpoint.local_addr().ok())
            .field("connected", &self.connected())
            .finish_non_exhaustive()
    }
}

struct Inner {
    me: NodeId,
    endpoint: Endpoint,
    peers: HashMap<NodeId, Peer>,
    /// Certificate name -> node id.
    ids: HashMap<String, NodeId>,
    inbox: mpsc::Sender<Inbound>,
    /// Every task of the link (acceptor, dialers, readers, writers, closers); `None` once the
    /// link is dropped, which aborts them all.
    tasks: Mutex<Option<JoinSet<()>>>,
    serial: AtomicU64,
    refused: AtomicU64,
    refusal_log: Mutex<RefusalLog>,
}

struct Peer {
    spec: PeerSpec,
    live: Mutex<Option<Live>>,
}

/// The connection in use for a peer.
struct Live {
    serial: u64,
    connection: Connection,
    frames: mpsc::Sender<Bytes>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data, consistent after each statement: a poisoned lock is usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl QuicLink {
    /// Binds `listen` (UDP; port 0 picks one) with `identity` and [`raft_tuning`], starts
    /// accepting connections from the lower-id peers and connecting to the higher-id ones;
    /// returns the link and its inbox. Must run inside a tokio runtime.
    pub async fn bind(
        me: NodeId,
        listen: SocketAddr,
        identity: &Identity,
        peers: &[PeerSpec],
    ) -> Result<(Arc<Self>, mpsc::Receiver<Inbound>), NetError> {
        Self::bind_with(me, listen, identity, peers, raft_tuning()).await
    }

    /// [`QuicLink::bind`] with other transport tuning (all nodes should use the same).
    pub async fn bind_with(
        me: NodeId,
        listen: SocketAddr,
        identity: &Identity,
        peers: &[PeerSpec],
        tuning: Tuning,
    ) -> Result<(Arc<Self>, mpsc::Receiver<Inbound>), NetError> {
        check_peers(me, peers)?;
        let endpoint = Endpoint::bind_with(listen, identity, raft_versions(), tuning, PeerPolicy::arbitration())?;
        let (inbox, rx) = mpsc::channel(INBOX);
        let inner = Arc::new(Inner {
            me,
            endpoint,
            peers: peers.iter().map(|p| (p.id, Peer { spec: p.clone(), live: Mutex::new(None) })).collect(),
            ids: peers.iter().map(|p| (p.name.clone(), p.id)).collect(),
            inbox,
            tasks: Mutex::new(Some(JoinSet::new())),
            serial: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            refusal_log: Mutex::new(RefusalLog::new(Instant::now())),
        });
        inner.spawn(accept_loop(inner.clone()));
        for peer in peers.iter().filter(|p| p.id > me) {
            inner.spawn(dial_loop(inner.clone(), peer.clone()));
        }
        tracing::debug!(node = me, %listen, ?peers, "quic raft link bound");
        Ok((Arc::new(Self { inner }), rx))
    }

    /// This node's id.
    pub fn me(&self) -> NodeId {
        self.inner.me
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, NetError> {
        Ok(self.inner.endpoint.local_addr()?)
    }

    /// The peers with a live connection now, and the address each is connected from.
    pub fn connected(&self) -> Vec<(NodeId, SocketAddr)> {
        let mut live: Vec<_> = self
            .inner
            .peers
            .iter()
            .filter_map(|(id, peer)| lock(&peer.live).as_ref().map(|l| (*id, l.connection.remote_address())))
            .collect();
        live.sort_unstable();
        live
    }

    /// Connections refused so far: failed handshakes (another CA, no certificate, wrong
    /// version, ...) and authenticated peers whose certificate name does not fit.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }
}

impl Drop for QuicLink {
    fn drop(&mut self) {
        // Aborts every task; with their handles gone the connections close (code 2, "dropped").
        let tasks = lock(&self.inner.tasks).take();
        drop(tasks);
        for peer in self.inner.peers.values() {
            lock(&peer.live).take();
        }
    }
}

impl PeerLink for QuicLink {
    fn send(&self, to: NodeId, bytes: Vec<u8>) {
        let me = self.inner.me;
        let Some(peer) = self.inner.peers.get(&to) else {
            tracing::debug!(node = me, to, "no such peer, message dropped");
            return;
        };
        let live = lock(&peer.live);
        let Some(live) = live.as_ref() else {
            tracing::trace!(node = me, to, "no connection to peer, message dropped");
            return;
        };
        let bytes = Bytes::from(bytes);
        if live.connection.max_datagram_size().is_some_and(|max| bytes.len() <= max) {
            match live.connection.send_datagram(bytes.clone()) {
                Ok(()) => return,
                // The path shrank since we asked: send it as a frame.
                Err(ConnectionError::DatagramTooLarge { .. }) => {}
                Err(error) => {
                    tracing::trace!(node = me, to, error = %error, "datagram not sent");
                    return;
                }
            }
        }
        if live.frames.try_send(bytes).is_err() {
            tracing::debug!(node = me, to, "frame queue full or connection ending, message dropped");
        }
    }
}

impl Inner {
    /// Runs `task` until it ends or the link is dropped.
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = lock(&self.tasks);
        if let Some(set) = tasks.as_mut() {
            while set.try_join_next().is_some() {}
            set.spawn(task);
        }
    }

    /// The node id of an authenticated connection, from its certificate name.
    fn identify(&self, connection: &Connection) -> Result<NodeId, String> {
        let Some(name) = connection.peer_name() else {
            return Err("its certificate has no common name".to_owned());
        };
        self.ids.get(name).copied().ok_or_else(|| format!("certificate name {name:?} is not in the peer list"))
    }

    /// An accepted connection: keep it if it comes from a lower-id peer.
    fn admit(self: &Arc<Self>, connection: Connection) {
        match self.identify(&connection) {
            Ok(id) if id < self.me => self.register(id, connection),
            Ok(id) => self.refuse(connection, format!("node {id} connected, but node {} connects to it", self.me)),
            Err(reason) => self.refuse(connection, reason),
        }
    }

    /// Refuses an authenticated connection: tells the peer why and closes it. Nothing it sent
    /// is read.
    fn refuse(self: &Arc<Self>, connection: Connection, reason: String) {
        let peer = connection.remote_address();
        let name = connection.peer_name().unwrap_or("(none)");
        self.log_refusal(&format!("peer {peer} ({name:?}): {reason}"));
        self.spawn(async move { connection.close(&format!("refused: {reason}")).await });
    }

    /// Counts a refusal and logs it, at warn level unless too many were logged lately.
    fn log_refusal(&self, what: &str) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let warn = lock(&self.refusal_log).warn(Instant::now());
        match warn {
            None => tracing::debug!(node = self.me, "refused connection: {what}"),
            Some(0) => tracing::warn!(node = self.me, "refused connection: {what}"),
            Some(suppressed) => {
                tracing::warn!(node = self.me, "refused connection: {what} ({suppressed} more not logged)")
            }
        }
    }

    /// Makes `connection` the one used for peer `id` and starts reading from it.
    fn register(self: &Arc<Self>, id: NodeId, connection: Connection) {
        let Some(peer) = self.peers.get(&id) else { return };
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let (frames, queue) = mpsc::channel(FRAME_QUEUE);
        let old = lock(&peer.live).replace(Live { serial, connection: connection.clone(), frames });
        if let Some(old) = old {
            tracing::info!(node = self.me, peer = id, "peer reconnected, the old connection is closed");
            self.spawn(async move { old.connection.close("replaced by a newer connection").await });
        }
        tracing::info!(node = self.me, peer = id, name = %peer.spec.name, addr = %connection.remote_address(), "peer connected");
        self.spawn(read_loop(self.clone(), id, serial, connection.clone()));
        self.spawn(write_loop(self.me, id, connection, queue));
    }

    /// Forgets connection `serial` of peer `id` (if it is still the one in use).
    fn forget(&self, id: NodeId, serial: u64, why: &ConnectionError) {
        let Some(peer) = self.peers.get(&id) else { return };
        let mut live = lock(&peer.live);
        if live.as_ref().is_some_and(|l| l.serial == serial) {
            *live = None;
            tracing::info!(node = self.me, peer = id, "peer disconnected: {why}");
        }
    }
}

async fn accept_loop(inner: Arc<Inner>) {
    loop {
        match inner.endpoint.accept().await {
            Ok(connection) => inner.admit(connection),
            Err(EndpointError::Closed) => return,
            Err(error) => inner.log_refusal(&crate::error_chain(&error)),
        }
    }
}

async fn dial_loop(inner: Arc<Inner>, peer: PeerSpec) {
    let mut backoff = MIN_BACKOFF;
    let mut failures = 0u32;
    loop {
        match inner.endpoint.connect(peer.addr, &peer.name).await {
            Ok(connection) => match inner.identify(&connection) {
                Ok(id) if id == peer.id => {
                    let since = Instant::now();
                    inner.register(id, connection.clone());
                    // The reader logs why it ended; then connect again.
                    connection.closed().await;
                    if since.elapsed() >= STABLE {
                        failures = 0;
                        backoff = MIN_BACKOFF;
                    }
                }
                Ok(id) => {
                    let reason =
                        format!("dialled node {} as {:?}, but the certificate is node {id}'s", peer.id, peer.name);
                    inner.refuse(connection, reason);
                }
                Err(reason) => inner.refuse(connection, reason),
            },
            Err(error) => {
                failures += 1;
                let error = crate::error_chain(&error);
                if failures == 1 {
                    tracing::warn!(node = inner.me, peer = peer.id, addr = %peer.addr, "cannot connect to peer: {error}; retrying");
                } else {
                    tracing::debug!(node = inner.me, peer = peer.id, failures, "cannot connect to peer: {error}");
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Hands every datagram and control frame of `connection` to the driver as coming from `id`.
async fn read_loop(inner: Arc<Inner>, id: NodeId, serial: u64, connection: Connection) {
    let why = loop {
        let received = tokio::select! {
            datagram = connection.recv_datagram() => datagram,
            frame = connection.recv_frame() => frame,
        };
        match received {
            Ok(bytes) => {
                if inner.inbox.send(Inbound { from: id, bytes: bytes.to_vec() }).await.is_err() {
                    return; // the driver is gone
                }
            }
            Err(error) => break error,
        }
    };
    inner.forget(id, serial, &why);
}

/// Writes the messages too large for a datagram on the control stream, in order.
async fn write_loop(me: NodeId, id: NodeId, connection: Connection, mut queue: mpsc::Receiver<Bytes>) {
    while let Some(frame) = queue.recv().await {
        if let Err(error) = connection.send_frame(frame).await {
            tracing::debug!(node = me, peer = id, "frame not sent: {error}");
            return;
        }
    }
}

/// What `understudy witness` needs to serve the group over QUIC.
#[derive(Debug, Clone)]
pub struct WitnessQuicConfig {
    /// Where the raft journal lives.
    pub data: PathBuf,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// The witness's certificate, key and CA (`Identity::load(dir, host)`).
    pub identity: Identity,
    /// The two agents: id, certificate name and address.
    pub peers: Vec<PeerSpec>,
    /// The arbiter settings (voters: the peers and the witness; the witness prefers to lead).
    pub arbiter: ArbiterConfig,
    /// Transport tuning ([`raft_tuning`] by default).
    pub tuning: Tuning,
}

impl WitnessQuicConfig {
    /// A witness `id` with default timings and [`raft_tuning`].
    pub fn new(id: NodeId, data: PathBuf, listen: SocketAddr, identity: Identity, peers: Vec<PeerSpec>) -> Self {
        let mut voters: Vec<NodeId> = peers.iter().map(|p| p.id).chain([id]).collect();
        voters.sort_unstable();
        voters.dedup();
        Self { data, listen, identity, peers, arbiter: Witness::config(id, &voters), tuning: raft_tuning() }
    }
}

/// Everything `understudy witness` does over QUIC: opens (or bootstraps) the journal, binds the
/// [`QuicLink`] and runs the witness until an error (a panic in it included: it comes back as
/// [`NetError::Failed`], logged). Drop the future to stop it.
pub async fn run_witness_quic(config: WitnessQuicConfig) -> Result<(), NetError> {
    let id = config.arbiter.id;
    let witness = Witness::open_dir(config.arbiter.clone(), &config.data, Instant::now())
        .map_err(|source| NetError::Open { path: config.data.clone(), source })?;
    let (link, inbox) =
        QuicLink::bind_with(id, config.listen, &config.identity, &config.peers, config.tuning.clone()).await?;
    let peers: Vec<String> = config.peers.iter().map(|p| format!("{}={}@{}", p.id, p.name, p.addr)).collect();
    tracing::info!(node = id, listen = %config.listen, ?peers, "witness running over quic");
    drive_supervised(witness, id, link, inbox).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quic_peer_specs() {
        let p = parse_quic_peer("2=backup@127.0.0.1:7002").unwrap();
        assert_eq!(p, PeerSpec::new(2, "backup", "127.0.0.1:7002".parse().unwrap()));
        let p = parse_quic_peer(" 3 = witness.lan @ [::1]:9 ").unwrap();
        assert_eq!((p.id, p.name.as_str(), p.addr.port()), (3, "witness.lan", 9));
        for bad in [
            "",
            "2",
            "2=127.0.0.1:1",
            "x=a@127.0.0.1:1",
            "0=a@127.0.0.1:1",
            "2=@127.0.0.1:1",
            "2=a b@127.0.0.1:1",
            "2=a@nowhere",
        ] {
            assert!(matches!(parse_quic_peer(bad), Err(NetError::QuicPeerSpec { .. })), "{bad}");
        }
        assert_eq!(parse_quic_peer("2").unwrap_err().to_string(), "peer spec \"2\": expected ID=NAME@HOST:PORT");
    }

    #[test]
    fn peer_lists_are_checked() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let ok = [PeerSpec::new(2, "backup", addr), PeerSpec::new(3, "witness", addr)];
        check_peers(1, &ok).unwrap();
        let cases: [(NodeId, Vec<PeerSpec>, &str); 4] = [
            (0, ok.to_vec(), "peer list: node id 0 is reserved"),
            (2, ok.to_vec(), "peer list: peer \"backup\" has id 2 (ours is 2)"),
            (1, vec![ok[0].clone(), PeerSpec::new(2, "other", addr)], "peer list: peers 2=backup and 2=other clash"),
            (1, vec![ok[0].clone(), PeerSpec::new(3, "backup", addr)], "peer list: peers 2=backup and 3=backup clash"),
        ];
        for (me, peers, message) in cases {
            assert_eq!(check_peers(me, &peers).unwrap_err().to_string(), message);
        }
    }

    #[test]
    fn witness_quic_config_voters() {
        let ca = transport::certs::Authority::generate(transport::certs::Validity::days_from_now(1)).unwrap();
        let issued = ca
            .issue(&transport::certs::HostSpec::new("witness"), transport::certs::Validity::days_from_now(1))
            .unwrap();
        let identity = Identity::from_pem(ca.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let peers = vec![PeerSpec::new(1, "primary", addr), PeerSpec::new(2, "backup", addr)];
        let c = WitnessQuicConfig::new(3, PathBuf::from("/tmp/w"), addr, identity, peers);
        assert_eq!(c.arbiter.voters, vec![1, 2, 3]);
        assert_eq!(c.arbiter.preferred_leader, Some(3));
        assert_eq!(c.tuning, raft_tuning());
    }

    #[test]
    fn tuning_is_valid_and_keeps_connections_through_a_busy_second() {
        let tuning = raft_tuning();
        tuning.validate().unwrap();
        assert!(tuning.idle_timeout >= Duration::from_secs(2));
        assert!(tuning.keep_alive * 4 <= tuning.idle_timeout);
        assert_eq!(raft_versions().alpn(), vec![b"understudy/1001".to_vec()]);
    }
}
