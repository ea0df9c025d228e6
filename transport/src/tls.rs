//! TLS: rustls configurations for mutual authentication against our CA, and ALPN versions.
//!
//! Both ends present a certificate and verify the other's against the CA (`WebPkiClientVerifier`
//! on the accepting side, `WebPkiServerVerifier` plus the expected server name on the
//! connecting side). TLS 1.3 only, ring as the crypto provider, no session resumption (every
//! connection is a full handshake with both certificates checked).
//!
//! After the CA check both verifiers apply the link's [`PeerPolicy`] (the roles it needs and,
//! accepting, the names it expects); a refusal fails the handshake with `access_denied`.
//!
//! Each connection gets its own rustls configuration whose verifiers and certificate resolver
//! record what they saw in a `HandshakeProbe`: the exact certificate error, the protocols the
//! peer offered. When a handshake fails, [`crate::handshake`] turns that record into an error
//! that names the problem; QUIC itself only carries a TLS alert number.

use std::fmt;
use std::sync::{Arc, OnceLock};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::certs::{self, Identity};
use crate::handshake::HandshakeProbe;
use crate::policy::PeerPolicy;

/// ALPN identifiers are `understudy/<version>`.
pub const ALPN_PREFIX: &str = "understudy/";

/// The ring crypto provider, shared.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

/// Errors building TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no usable ca certificate among {count}")]
    NoRoots { count: usize },
    #[error("cannot build the certificate verifier")]
    Verifier {
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("private key does not fit the certificate")]
    Key {
        #[source]
        source: rustls::Error,
    },
    #[error("tls configuration rejected")]
    Config {
        #[source]
        source: rustls::Error,
    },
    #[error("tls configuration unusable for quic")]
    Quic {
        #[source]
        source: quinn::crypto::rustls::NoInitialCipherSuite,
    },
}

/// The protocol versions a peer speaks: the current one, which it prefers, and older ones it
/// still accepts (the protocol's rule: current and previous). Each becomes an ALPN identifier
/// `understudy/<n>`; the accepting side picks the first of its list that the connecting side
/// offers, so two peers agree on the newest version both speak.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtocolVersions {
    current: u32,
    older: Vec<u32>,
}

impl ProtocolVersions {
    /// Speaks `current` only.
    pub fn new(current: u32) -> Self {
        ProtocolVersions { current, older: Vec::new() }
    }

    /// Also accepts `version` (an older one, e.g. during a rolling upgrade).
    pub fn also_accept(mut self, version: u32) -> Self {
        if version != self.current && !self.older.contains(&version) {
            self.older.push(version);
        }
        self
    }

    /// The preferred version.
    pub fn current(&self) -> u32 {
        self.current
    }

    /// All versions, the preferred one first.
    pub fn all(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::once(self.current).chain(self.older.iter().copied())
    }

    /// Whether `version` is one of ours.
    pub fn contains(&self, version: u32) -> bool {
        self.all().any(|v| v == version)
    }

    /// ALPN identifiers, preferred first.
    pub fn alpn(&self) -> Vec<Vec<u8>> {
        self.all().map(|v| format!("{ALPN_PREFIX}{v}").into_bytes()).collect()
    }

    /// The version in an ALPN identifier, if it is one of the `understudy/<n>` kind.
    pub fn parse_alpn(protocol: &[u8]) -> Option<u32> {
        std::str::from_utf8(protocol).ok()?.strip_prefix(ALPN_PREFIX)?.parse().ok()
    }
}

impl fmt::Display for ProtocolVersions {
    /// `understudy/2`, or `understudy/2 (or understudy/1)` with older versions.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{ALPN_PREFIX}{}", self.current)?;
        if !self.older.is_empty() {
            let older: Vec<_> = self.older.iter().map(|v| format!("{ALPN_PREFIX}{v}")).collect();
            write!(f, " (or {})", older.join(", "))?;
        }
        Ok(())
    }
}

/// Shows an offered ALPN list for error messages: `understudy/1`, `"h3", understudy/1`, `nothing`.
pub(crate) fn describe_alpn(offered: &[Vec<u8>]) -> String {
    if offered.is_empty() {
        return "nothing".to_owned();
    }
    offered
        .iter()
        .map(|p| match std::str::from_utf8(p) {
            Ok(text) if text.starts_with(ALPN_PREFIX) => text.to_owned(),
            Ok(text) => format!("{text:?}"),
            Err(_) => format!("{p:02x?}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The accepting side's TLS configuration for quinn: our certificate, client certificates
/// required and checked against the CA and [`PeerPolicy::replication`], ALPN
/// `understudy/<version>` for each of `versions`. [`crate::Endpoint`] uses the same settings
/// (plus diagnostics); this is for a raw quinn endpoint, e.g. a baseline in a benchmark.
pub fn server_crypto(identity: &Identity, versions: ProtocolVersions) -> Result<QuicServerConfig, TlsError> {
    TlsContext::new(identity, versions, PeerPolicy::replication())?.server_config(&Arc::default())
}

/// The connecting side's TLS configuration for quinn: our certificate, the server's checked
/// against the CA, the server name given to `connect` and [`PeerPolicy::replication`], ALPN as
/// [`server_crypto`].
pub fn client_crypto(identity: &Identity, versions: ProtocolVersions) -> Result<QuicClientConfig, TlsError> {
    TlsContext::new(identity, versions, PeerPolicy::replication())?.client_config(&Arc::default())
}

/// What every connection's TLS configuration is built from.
pub(crate) struct TlsContext {
    provider: Arc<CryptoProvider>,
    certified: Arc<CertifiedKey>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    server_verifier: Arc<WebPkiServerVerifier>,
    versions: ProtocolVersions,
    policy: Arc<PeerPolicy>,
}

impl TlsContext {
    pub(crate) fn new(identity: &Identity, versions: ProtocolVersions, policy: PeerPolicy) -> Result<Self, TlsError> {
        let provider = provider();
        let roots = certs::root_store(identity.ca_certificates());
        if roots.is_empty() {
            return Err(TlsError::NoRoots { count: identity.ca_certificates().len() });
        }
        let roots = Arc::new(roots);
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|source| TlsError::Verifier { source })?;
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|source| TlsError::Verifier { source })?;
        let key = provider
            .key_provider
            .load_private_key(identity.private_key())
            .map_err(|source| TlsError::Key { source })?;
        let certified = Arc::new(CertifiedKey::new(identity.cert_chain().to_vec(), key));
        Ok(TlsContext { provider, certified, client_verifier, server_verifier, versions, policy: Arc::new(policy) })
    }

    pub(crate) fn versions(&self) -> &ProtocolVersions {
        &self.versions
    }

    pub(crate) fn policy(&self) -> &PeerPolicy {
        &self.policy
    }

    /// The accepting side's check of a client certificate (CA, then the peer policy),
    /// recording into `probe`.
    pub(crate) fn client_verifier(&self, probe: &Arc<HandshakeProbe>) -> Arc<dyn ClientCertVerifier> {
        Arc::new(RecordingClientVerifier {
            inner: self.client_verifier.clone(),
            policy: self.policy.clone(),
            probe: probe.clone(),
        })
    }

    /// The connecting side's check of a server certificate (CA, then the peer policy),
    /// recording into `probe`.
    pub(crate) fn server_verifier(&self, probe: &Arc<HandshakeProbe>) -> Arc<dyn ServerCertVerifier> {
        Arc::new(RecordingServerVerifier {
            inner: self.server_verifier.clone(),
            policy: self.policy.clone(),
            probe: probe.clone(),
        })
    }

    /// The accepting side's configuration for one connection.
    pub(crate) fn server_config(&self, probe: &Arc<HandshakeProbe>) -> Result<QuicServerConfig, TlsError> {
        let verifier = self.client_verifier(probe);
        let resolver = Arc::new(RecordingResolver { certified: self.certified.clone(), probe: probe.clone() });
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| TlsError::Config { source })?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(resolver);
        config.alpn_protocols = self.versions.alpn();
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        QuicServerConfig::try_from(config).map_err(|source| TlsError::Quic { source })
    }

    /// The connecting side's configuration for one connection.
    pub(crate) fn client_config(&self, probe: &Arc<HandshakeProbe>) -> Result<QuicClientConfig, TlsError> {
        let verifier = self.server_verifier(probe);
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| TlsError::Config { source })?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(SingleClientCert(self.certified.clone())));
        config.alpn_protocols = self.versions.alpn();
        config.resumption = rustls::client::Resumption::disabled();
        QuicClientConfig::try_from(config).map_err(|source| TlsError::Quic { source })
    }
}

/// Presents our certificate whatever the server asks (it asks for ones from our CA).
#[derive(Debug)]
struct SingleClientCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for SingleClientCert {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Serves our certificate and records the protocols the client offered.
#[derive(Debug)]
struct RecordingResolver {
    certified: Arc<CertifiedKey>,
    probe: Arc<HandshakeProbe>,
}

impl ResolvesServerCert for RecordingResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let offered = hello.alpn().map(|protocols| protocols.map(<[u8]>::to_vec).collect()).unwrap_or_default();
        self.probe.record_hello(offered);
        Some(self.certified.clone())
    }
}

/// The CA check of client certificates, then the policy (role and name), recording the outcome.
#[derive(Debug)]
struct RecordingClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    policy: Arc<PeerPolicy>,
    probe: Arc<HandshakeProbe>,
}

impl ClientCertVerifier for RecordingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let result = self.inner.verify_client_cert(end_entity, intermediates, now);
        self.probe.record_peer_cert(end_entity, result.as_ref().err().cloned());
        let verified = result?;
        admit(&self.policy, &self.probe, end_entity, true)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The CA and server-name check of server certificates, then the policy (role), recording the
/// outcome.
#[derive(Debug)]
struct RecordingServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    policy: Arc<PeerPolicy>,
    probe: Arc<HandshakeProbe>,
}

impl ServerCertVerifier for RecordingServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now);
        self.probe.record_peer_cert(end_entity, result.as_ref().err().cloned());
        let verified = result?;
        admit(&self.policy, &self.probe, end_entity, false)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Applies the link's policy to a CA-verified peer certificate; a refusal is recorded for the
/// error message and fails the handshake with `access_denied`.
fn admit(
    policy: &PeerPolicy,
    probe: &HandshakeProbe,
    cert: &CertificateDer<'_>,
    accepting: bool,
) -> Result<(), rustls::Error> {
    policy.check(cert, accepting).map_err(|refusal| {
        probe.record_refusal(refusal);
        rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_alpn() {
        let v = ProtocolVersions::new(2).also_accept(1).also_accept(2);
        assert_eq!(v.alpn(), vec![b"understudy/2".to_vec(), b"understudy/1".to_vec()]);
        assert_eq!(v.to_string(), "understudy/2 (or understudy/1)");
        assert_eq!(ProtocolVersions::new(7).to_string(), "understudy/7");
        assert!(v.contains(1) && !v.contains(3));
        assert_eq!(ProtocolVersions::parse_alpn(b"understudy/12"), Some(12));
        assert_eq!(ProtocolVersions::parse_alpn(b"understudy/x"), None);
        assert_eq!(ProtocolVersions::parse_alpn(b"h3"), None);
        assert_eq!(describe_alpn(&[b"understudy/1".to_vec(), b"h3".to_vec()]), "understudy/1, \"h3\"");
        assert_eq!(describe_alpn(&[]), "nothing");
    }
}
