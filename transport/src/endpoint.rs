//! A QUIC endpoint that both accepts and makes mutually authenticated connections.
//!
//! One UDP socket per endpoint. Every peer is both a server (the backup accepts the primary's
//! connection) and a client (the primary connects); the same [`Identity`] serves both roles.
//!
//! **Accepting.** The first [`Endpoint::accept`] starts a task that takes every incoming
//! connection and completes its handshake in a task of its own, each bounded by
//! [`Tuning::handshake_timeout`], so a peer that opens a handshake and stalls delays nobody
//! else. Pending handshakes are bounded: at most [`MAX_PENDING_HANDSHAKES`] in all and
//! [`MAX_PENDING_PER_ADDRESS`] from one IP address; beyond that a new peer is refused at once
//! (QUIC `CONNECTION_REFUSED`, it may try again). Every failed handshake is logged as it happens
//! (the first ten, then the 16th, 32nd...). Once more than [`VALIDATE_ABOVE`] are pending,
//! a peer must first prove it owns its address (a QUIC Retry round trip), so spoofed packets
//! cannot fill the rest. Finished connections (and the errors of failed handshakes) wait in a
//! short queue for `accept`; a connection that ended while it waited is skipped.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::certs::{self, Identity};
use crate::config::{ConfigError, Tuning};
use crate::connection::{Connection, SetupFailure};
use crate::handshake::{self, Attempt, HandshakeError, HandshakeProbe};
use crate::policy::{PeerPolicy, PolicyError};
use crate::tls::{ProtocolVersions, TlsContext, TlsError};

/// Handshakes an endpoint completes at once (including finished ones `accept` has not taken).
pub const MAX_PENDING_HANDSHAKES: usize = 32;
/// Handshakes from one IP address at once.
pub const MAX_PENDING_PER_ADDRESS: usize = 4;
/// Pending handshakes above which a new peer must first validate its address (QUIC Retry).
pub const VALIDATE_ABOVE: usize = 8;
/// Finished connections and handshake errors waiting for `accept`.
const ACCEPT_QUEUE: usize = 4;

/// Errors of binding, connecting and accepting.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("invalid tuning")]
    Config(#[from] ConfigError),
    #[error("invalid tls setup")]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("cannot bind udp socket {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to {addr} as {server_name:?}")]
    Connect {
        addr: SocketAddr,
        server_name: String,
        #[source]
        source: quinn::ConnectError,
    },
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("endpoint closed")]
    Closed,
}

/// A bound endpoint. Cheap to clone; the clones share the socket and the accept queue.
#[derive(Clone)]
pub struct Endpoint {
    core: Arc<Core>,
    acceptor: Arc<OnceLock<Acceptor>>,
}

/// What connecting and the accept task need.
struct Core {
    quinn: quinn::Endpoint,
    tls: TlsContext,
    transport: Arc<quinn::TransportConfig>,
    tuning: Tuning,
    /// Handshakes the accept task is completing now.
    pending: AtomicUsize,
    /// Peers refused because too many handshakes were pending.
    overloaded: AtomicU64,
    /// Incoming handshakes that failed (refused certificates, timeouts, ...).
    failed: AtomicU64,
}

/// The accept task and its queue; dropping the last endpoint clone stops the task.
struct Acceptor {
    queue: tokio::sync::Mutex<mpsc::Receiver<Result<Connection, EndpointError>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("local_addr", &self.core.quinn.local_addr().ok())
            .field("versions", self.core.tls.versions())
            .field("policy", self.core.tls.policy())
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Binds a UDP socket at `addr` (port 0 picks a free one) for replication
    /// ([`PeerPolicy::replication`]: host certificates at both ends, any client name). Must run
    /// inside a tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        identity: &Identity,
        versions: ProtocolVersions,
        tuning: Tuning,
    ) -> Result<Self, EndpointError> {
        Self::bind_with(addr, identity, versions, tuning, PeerPolicy::replication())
    }

    /// [`Endpoint::bind`] for the peers `policy` admits. Fails when our own certificate does not
    /// fit the policy (a witness's certificate on a replication link).
    pub fn bind_with(
        addr: SocketAddr,
        identity: &Identity,
        versions: ProtocolVersions,
        tuning: Tuning,
        policy: PeerPolicy,
    ) -> Result<Self, EndpointError> {
        policy.check_own(identity)?;
        let transport = Arc::new(tuning.to_quinn()?);
        let tls = TlsContext::new(identity, versions, policy)?;
        // Each accepted connection gets its own configuration (Incoming::accept_with); this
        // default one only has to exist for quinn to accept at all.
        let mut server =
            quinn::ServerConfig::with_crypto(Arc::new(tls.server_config(&Arc::new(HandshakeProbe::default()))?));
        server.transport_config(transport.clone());
        let quinn = quinn::Endpoint::server(server, addr).map_err(|source| EndpointError::Bind { addr, source })?;
        let core = Core {
            quinn,
            tls,
            transport,
            tuning,
            pending: AtomicUsize::new(0),
            overloaded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        };
        Ok(Endpoint { core: Arc::new(core), acceptor: Arc::default() })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, EndpointError> {
        let addr = self.core.quinn.local_addr();
        addr.map_err(|source| EndpointError::Bind { addr: SocketAddr::from(([0, 0, 0, 0], 0)), source })
    }

    /// The tuning connections of this endpoint use.
    pub fn tuning(&self) -> &Tuning {
        &self.core.tuning
    }

    /// The protocol versions this endpoint speaks.
    pub fn versions(&self) -> &ProtocolVersions {
        self.core.tls.versions()
    }

    /// Which peers this endpoint admits.
    pub fn policy(&self) -> &PeerPolicy {
        self.core.tls.policy()
    }

    /// Handshakes of incoming connections in progress now (at most
    /// [`MAX_PENDING_HANDSHAKES`]).
    pub fn pending_handshakes(&self) -> usize {
        self.core.pending.load(Ordering::Relaxed)
    }

    /// Incoming connections refused so far because too many handshakes were pending.
    pub fn refused_overload(&self) -> u64 {
        self.core.overloaded.load(Ordering::Relaxed)
    }

    /// Incoming handshakes that failed so far (each also comes out of `accept` as an error
    /// while the queue has room).
    pub fn failed_handshakes(&self) -> u64 {
        self.core.failed.load(Ordering::Relaxed)
    }

    /// Connects to `addr`, expecting the peer's certificate to name `server_name` (its host
    /// name), to be signed by our CA and to hold a role our policy admits. Returns when both
    /// sides have accepted the handshake and opened their streams, or with the reason they did
    /// not within the handshake timeout.
    pub async fn connect(&self, addr: SocketAddr, server_name: &str) -> Result<Connection, EndpointError> {
        let core = &self.core;
        let probe = Arc::new(HandshakeProbe::default());
        let mut config = quinn::ClientConfig::new(Arc::new(core.tls.client_config(&probe)?));
        config.transport_config(core.transport.clone());
        let connecting = core
            .quinn
            .connect_with(config, addr, server_name)
            .map_err(|source| EndpointError::Connect { addr, server_name: server_name.to_owned(), source })?;
        Ok(core.complete(connecting, addr, &probe, Some(server_name)).await?)
    }

    /// The next peer whose handshake completed (see the [module docs](self)), or the error of
    /// one that failed, naming the problem; call `accept` again to keep serving. Handshakes go
    /// on in the background between calls.
    pub async fn accept(&self) -> Result<Connection, EndpointError> {
        let acceptor = self.acceptor.get_or_init(|| Acceptor::start(self.core.clone()));
        let mut queue = acceptor.queue.lock().await;
        loop {
            match queue.recv().await {
                None => return Err(EndpointError::Closed),
                Some(Ok(connection)) if connection.close_reason().is_some() => {
                    tracing::debug!(peer = %connection.remote_address(), "a connection ended while it waited for accept");
                }
                Some(result) => return result,
            }
        }
    }

    /// Stops accepting, closes every connection at once (prefer [`Connection::close`] first)
    /// and waits until the peers were told.
    pub async fn shutdown(&self) {
        self.core.quinn.close(0u32.into(), b"endpoint shut down");
        self.core.quinn.wait_idle().await;
    }
}

impl Acceptor {
    fn start(core: Arc<Core>) -> Self {
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let task = tokio::spawn(accept_loop(core, tx));
        Acceptor { queue: tokio::sync::Mutex::new(rx), task }
    }
}

/// Takes incoming connections and completes their handshakes in parallel, within the bounds.
async fn accept_loop(core: Arc<Core>, queue: mpsc::Sender<Result<Connection, EndpointError>>) {
    let mut handshakes: JoinSet<IpAddr> = JoinSet::new();
    let mut per_address: HashMap<IpAddr, usize> = HashMap::new();
    loop {
        let incoming = tokio::select! {
            incoming = core.quinn.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
            Some(done) = handshakes.join_next() => {
                if let Ok(ip) = done
                    && let Some(count) = per_address.get_mut(&ip)
                {
                    *count -= 1;
                    if *count == 0 {
                        per_address.remove(&ip);
                    }
                }
                core.pending.store(handshakes.len(), Ordering::Relaxed);
                continue;
            }
        };
        let peer = incoming.remote_address();
        let ip = peer.ip();
        let from_ip = per_address.get(&ip).copied().unwrap_or(0);
        if handshakes.len() >= MAX_PENDING_HANDSHAKES || from_ip >= MAX_PENDING_PER_ADDRESS {
            let refused = core.overloaded.fetch_add(1, Ordering::Relaxed) + 1;
            if worth_logging(refused) {
                tracing::warn!(
                    %peer,
                    pending = handshakes.len(),
                    from_address = from_ip,
                    refused,
                    "refused a connection: too many handshakes pending"
                );
            }
            incoming.refuse();
            continue;
        }
        if handshakes.len() >= VALIDATE_ABOVE && !incoming.remote_address_validated() && incoming.may_retry() {
            tracing::debug!(%peer, pending = handshakes.len(), "many handshakes pending: asking the peer to validate its address");
            if let Err(error) = incoming.retry() {
                error.into_incoming().refuse();
            }
            continue;
        }
        *per_address.entry(ip).or_default() += 1;
        let (core2, queue) = (core.clone(), queue.clone());
        handshakes.spawn(async move {
            let result = core2.accept_one(incoming).await;
            match result {
                // Holds its pending slot until accept takes it: the queue bounds the rest.
                Ok(connection) => {
                    let _ = queue.send(Ok(connection)).await;
                }
                // Logged here as it happens, so a refusal shows even while the owner is busy
                // with a session and takes it from the queue only later (or never, when full).
                Err(error) => {
                    let failed = core2.failed.fetch_add(1, Ordering::Relaxed) + 1;
                    if worth_logging(failed) {
                        tracing::info!(%peer, failed, "incoming handshake failed: {}", crate::error_chain(&error));
                    }
                    let _ = queue.try_send(Err(error));
                }
            }
            ip
        });
        core.pending.store(handshakes.len(), Ordering::Relaxed);
    }
    core.pending.store(0, Ordering::Relaxed);
}

/// Whether the n-th event of a kind is logged: the first ten, then the 16th, 32nd, 64th...,
/// so a flood cannot flood the log.
fn worth_logging(n: u64) -> bool {
    n <= 10 || n.is_power_of_two()
}

impl Core {
    /// Completes one incoming connection's handshake (within the handshake timeout).
    async fn accept_one(&self, incoming: quinn::Incoming) -> Result<Connection, EndpointError> {
        let peer = incoming.remote_address();
        let probe = Arc::new(HandshakeProbe::default());
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(self.tls.server_config(&probe)?));
        config.transport_config(self.transport.clone());
        let attempt = self.attempt(peer, &probe, None);
        let connecting =
            incoming.accept_with(Arc::new(config)).map_err(|error| handshake::classify(error, &attempt))?;
        Ok(self.complete(connecting, peer, &probe, None).await?)
    }

    fn attempt<'a>(&'a self, peer: SocketAddr, probe: &'a HandshakeProbe, server_name: Option<&'a str>) -> Attempt<'a> {
        Attempt { peer, versions: self.tls.versions(), probe, server_name, timeout: self.tuning.handshake_timeout }
    }

    async fn complete(
        &self,
        connecting: quinn::Connecting,
        peer: SocketAddr,
        probe: &HandshakeProbe,
        server_name: Option<&str>,
    ) -> Result<Connection, HandshakeError> {
        let attempt = self.attempt(peer, probe, server_name);
        let setup = async {
            let quinn = connecting.await.map_err(|error| handshake::classify(error, &attempt))?;
            let version = negotiated_version(&quinn)
                .ok_or_else(|| HandshakeError::Tls { peer, reason: "no protocol version negotiated".to_owned() })?;
            let peer_name = peer_common_name(&quinn);
            tracing::debug!(%peer, ?peer_name, version, "handshake complete");
            Connection::establish(quinn, &self.tuning, version, peer_name).await.map_err(|failure| match failure {
                SetupFailure::Connection(error) => handshake::classify(error, &attempt),
                SetupFailure::NotUnderstudy(what) => HandshakeError::NotUnderstudy { peer, what },
            })
        };
        match tokio::time::timeout(self.tuning.handshake_timeout, setup).await {
            Ok(result) => result,
            Err(_) => Err(HandshakeError::Timeout { peer, after: self.tuning.handshake_timeout }),
        }
    }
}

fn negotiated_version(connection: &quinn::Connection) -> Option<u32> {
    let data = connection.handshake_data()?;
    let data = data.downcast::<quinn::crypto::rustls::HandshakeData>().ok()?;
    ProtocolVersions::parse_alpn(data.protocol.as_deref()?)
}

fn peer_common_name(connection: &quinn::Connection) -> Option<String> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    certs::common_name(chain.first()?)
}
