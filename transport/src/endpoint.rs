//! A QUIC endpoint that both accepts and makes mutually authenticated connections.
//!
//! One UDP socket per endpoint. Every peer is both a server (the backup accepts the primary's
//! connection) and a client (the primary connects); the same [`Identity`] serves both roles.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::certs::{self, Identity};
use crate::config::{ConfigError, Tuning};
use crate::connection::{Connection, SetupFailure};
use crate::handshake::{self, Attempt, HandshakeError, HandshakeProbe};
use crate::tls::{ProtocolVersions, TlsContext, TlsError};

/// Errors of binding, connecting and accepting.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("invalid tuning")]
    Config(#[from] ConfigError),
    #[error("invalid tls setup")]
    Tls(#[from] TlsError),
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

/// A bound endpoint.
#[derive(Clone)]
pub struct Endpoint {
    quinn: quinn::Endpoint,
    tls: Arc<TlsContext>,
    transport: Arc<quinn::TransportConfig>,
    tuning: Tuning,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("local_addr", &self.quinn.local_addr().ok())
            .field("versions", self.tls.versions())
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Binds a UDP socket at `addr` (port 0 picks a free one). Must run inside a tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        identity: &Identity,
        versions: ProtocolVersions,
        tuning: Tuning,
    ) -> Result<Self, EndpointError> {
        let transport = Arc::new(tuning.to_quinn()?);
        let tls = Arc::new(TlsContext::new(identity, versions)?);
        // Each accepted connection gets its own configuration (Incoming::accept_with); this
        // default one only has to exist for quinn to accept at all.
        let mut server =
            quinn::ServerConfig::with_crypto(Arc::new(tls.server_config(&Arc::new(HandshakeProbe::default()))?));
        server.transport_config(transport.clone());
        let quinn = quinn::Endpoint::server(server, addr).map_err(|source| EndpointError::Bind { addr, source })?;
        Ok(Endpoint { quinn, tls, transport, tuning })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, EndpointError> {
        let addr = self.quinn.local_addr();
        addr.map_err(|source| EndpointError::Bind { addr: SocketAddr::from(([0, 0, 0, 0], 0)), source })
    }

    /// The tuning connections of this endpoint use.
    pub fn tuning(&self) -> &Tuning {
        &self.tuning
    }

    /// The protocol versions this endpoint speaks.
    pub fn versions(&self) -> &ProtocolVersions {
        self.tls.versions()
    }

    /// Connects to `addr`, expecting the peer's certificate to name `server_name` (its host
    /// name) and to be signed by our CA. Returns when both sides have accepted the handshake
    /// and opened their streams, or with the reason they did not within the handshake timeout.
    pub async fn connect(&self, addr: SocketAddr, server_name: &str) -> Result<Connection, EndpointError> {
        let probe = Arc::new(HandshakeProbe::default());
        let mut config = quinn::ClientConfig::new(Arc::new(self.tls.client_config(&probe)?));
        config.transport_config(self.transport.clone());
        let connecting = self
            .quinn
            .connect_with(config, addr, server_name)
            .map_err(|source| EndpointError::Connect { addr, server_name: server_name.to_owned(), source })?;
        self.complete(connecting, addr, &probe, Some(server_name)).await
    }

    /// Waits for the next peer and completes its handshake. A peer that fails the handshake
    /// yields an error naming the problem; call `accept` again to keep serving. Handshakes
    /// are completed one at a time, and a peer's handshake only progresses while `accept` runs,
    /// so a serving endpoint calls it in a loop.
    pub async fn accept(&self) -> Result<Connection, EndpointError> {
        let incoming = self.quinn.accept().await.ok_or(EndpointError::Closed)?;
        let peer = incoming.remote_address();
        let probe = Arc::new(HandshakeProbe::default());
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(self.tls.server_config(&probe)?));
        config.transport_config(self.transport.clone());
        let attempt = self.attempt(peer, &probe, None);
        let connecting =
            incoming.accept_with(Arc::new(config)).map_err(|error| handshake::classify(error, &attempt))?;
        self.complete(connecting, peer, &probe, None).await
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
    ) -> Result<Connection, EndpointError> {
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
            Ok(result) => Ok(result?),
            Err(_) => Err(HandshakeError::Timeout { peer, after: self.tuning.handshake_timeout }.into()),
        }
    }

    /// Stops accepting, closes every connection at once (prefer [`Connection::close`] first)
    /// and waits until the peers were told.
    pub async fn shutdown(&self) {
        self.quinn.close(0u32.into(), b"endpoint shut down");
        self.quinn.wait_idle().await;
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
