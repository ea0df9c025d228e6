//! Why a handshake failed, in words an admin can act on.
//!
//! A failed QUIC handshake reaches the side that detected it as a local TLS error and the other
//! side as a CONNECTION_CLOSE carrying a TLS alert number. The first side knows the precise
//! reason (its verifier recorded it in the connection's `HandshakeProbe`); the second only
//! knows the alert, which says enough: `unknown_ca` means the peer does not trust our
//! certificate's CA, `certificate_required` that we sent none, `no_application_protocol` that
//! we share no protocol version.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use quinn::{ConnectionError as QuinnError, TransportErrorCode};
use rustls::CertificateError;
use rustls::pki_types::CertificateDer;

use crate::certs::{self, Timestamp};
use crate::policy::{Refusal, describe_problem, one_of};
use crate::tls::{ProtocolVersions, describe_alpn};

/// Errors of establishing a connection: TLS, certificates, versions, time.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("peer {peer} presented no certificate")]
    NoPeerCertificate { peer: SocketAddr },
    #[error("peer {peer} certificate {subject} is not signed by our ca")]
    UnknownCa { peer: SocketAddr, subject: String },
    #[error("peer {peer} certificate is for {presented:?}, we expected {expected:?}")]
    WrongServerName { peer: SocketAddr, expected: String, presented: Vec<String> },
    #[error("peer {peer} certificate {subject} expired at {not_after} (now {now})")]
    PeerCertExpired { peer: SocketAddr, subject: String, not_after: Timestamp, now: Timestamp },
    #[error("peer {peer} certificate {subject} is not valid before {not_before} (now {now})")]
    PeerCertNotYetValid { peer: SocketAddr, subject: String, not_before: Timestamp, now: Timestamp },
    #[error("peer {peer} certificate names {}, expected {}", crate::policy::quoted(.presented.as_deref()), one_of(.expected))]
    WrongPeerName { peer: SocketAddr, presented: Option<String>, expected: Vec<String> },
    #[error("peer {peer} certificate {subject} has role {role}; a {link} link needs {needed}")]
    WrongPeerRole { peer: SocketAddr, subject: String, role: certs::Role, link: &'static str, needed: &'static str },
    #[error("peer {peer} certificate {subject} carries no usable role ({problem}); a {link} link needs {needed}")]
    PeerWithoutRole { peer: SocketAddr, subject: String, problem: String, link: &'static str, needed: &'static str },
    #[error("peer {peer} certificate {subject} is not allowed for {usage} authentication")]
    WrongUsage { peer: SocketAddr, subject: String, usage: &'static str },
    #[error("peer {peer} certificate {subject} rejected")]
    PeerCertRejected {
        peer: SocketAddr,
        subject: String,
        #[source]
        source: rustls::Error,
    },
    #[error("peer {peer} refused our certificate: {why}{}", peer_says(.reason))]
    RefusedByPeer { peer: SocketAddr, why: &'static str, reason: String },
    #[error("peer {peer} offered protocol {offered}, we speak {ours}")]
    VersionMismatch { peer: SocketAddr, offered: String, ours: ProtocolVersions },
    #[error("peer {peer} speaks none of our protocols (we offered {ours})")]
    PeerVersionMismatch { peer: SocketAddr, ours: ProtocolVersions },
    #[error("handshake with {peer} timed out after {after:?}")]
    Timeout { peer: SocketAddr, after: Duration },
    #[error("peer {peer} aborted the handshake with tls alert {alert}{}", peer_says(.reason))]
    PeerAlert { peer: SocketAddr, alert: String, reason: String },
    #[error("peer {peer} closed the connection during the handshake (code {code}){}", peer_says(.reason))]
    PeerClosed { peer: SocketAddr, code: u64, reason: String },
    #[error("peer {peer} is not an understudy peer: {what}")]
    NotUnderstudy { peer: SocketAddr, what: String },
    #[error("tls handshake with {peer} failed: {reason}")]
    Tls { peer: SocketAddr, reason: String },
    #[error("connection with {peer} failed during the handshake")]
    Connection {
        peer: SocketAddr,
        #[source]
        source: QuinnError,
    },
}

fn peer_says(reason: &str) -> String {
    if reason.is_empty() { String::new() } else { format!(" (peer says: {reason})") }
}

impl HandshakeError {
    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        match self {
            HandshakeError::NoPeerCertificate { peer }
            | HandshakeError::UnknownCa { peer, .. }
            | HandshakeError::WrongServerName { peer, .. }
            | HandshakeError::PeerCertExpired { peer, .. }
            | HandshakeError::PeerCertNotYetValid { peer, .. }
            | HandshakeError::WrongPeerName { peer, .. }
            | HandshakeError::WrongPeerRole { peer, .. }
            | HandshakeError::PeerWithoutRole { peer, .. }
            | HandshakeError::WrongUsage { peer, .. }
            | HandshakeError::PeerCertRejected { peer, .. }
            | HandshakeError::RefusedByPeer { peer, .. }
            | HandshakeError::VersionMismatch { peer, .. }
            | HandshakeError::PeerVersionMismatch { peer, .. }
            | HandshakeError::Timeout { peer, .. }
            | HandshakeError::PeerAlert { peer, .. }
            | HandshakeError::PeerClosed { peer, .. }
            | HandshakeError::NotUnderstudy { peer, .. }
            | HandshakeError::Tls { peer, .. }
            | HandshakeError::Connection { peer, .. } => *peer,
        }
    }
}

/// What one connection's verifiers and certificate resolver saw.
#[derive(Debug, Default)]
pub(crate) struct HandshakeProbe {
    state: Mutex<ProbeState>,
}

#[derive(Debug, Default)]
struct ProbeState {
    offered_alpn: Option<Vec<Vec<u8>>>,
    peer_subject: Option<String>,
    peer_cert_error: Option<rustls::Error>,
    refusal: Option<Refusal>,
}

impl HandshakeProbe {
    fn state(&self) -> std::sync::MutexGuard<'_, ProbeState> {
        // A panic while holding this lock loses at most a diagnostic.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn record_hello(&self, offered_alpn: Vec<Vec<u8>>) {
        self.state().offered_alpn = Some(offered_alpn);
    }

    pub(crate) fn record_peer_cert(&self, cert: &CertificateDer<'_>, error: Option<rustls::Error>) {
        let mut state = self.state();
        state.peer_subject = certs::common_name(cert);
        state.peer_cert_error = error;
    }

    /// Records that the link's policy refused the peer's (CA-verified) certificate.
    pub(crate) fn record_refusal(&self, refusal: Refusal) {
        self.state().refusal = Some(refusal);
    }
}

/// Where a failing handshake happened, for [`classify`].
pub(crate) struct Attempt<'a> {
    pub peer: SocketAddr,
    pub versions: &'a ProtocolVersions,
    pub probe: &'a HandshakeProbe,
    /// The name we expected in the server's certificate (connecting side).
    pub server_name: Option<&'a str>,
    pub timeout: Duration,
}

// TLS alert descriptions (RFC 8446 section 6).
const ALERT_BAD_CERTIFICATE: u8 = 42;
const ALERT_UNSUPPORTED_CERTIFICATE: u8 = 43;
const ALERT_CERTIFICATE_REVOKED: u8 = 44;
const ALERT_CERTIFICATE_EXPIRED: u8 = 45;
const ALERT_CERTIFICATE_UNKNOWN: u8 = 46;
const ALERT_UNKNOWN_CA: u8 = 48;
const ALERT_ACCESS_DENIED: u8 = 49;
const ALERT_DECRYPT_ERROR: u8 = 51;
const ALERT_CERTIFICATE_REQUIRED: u8 = 116;
const ALERT_NO_APPLICATION_PROTOCOL: u8 = 120;

/// The TLS alert in a QUIC crypto error code (0x100-0x1ff).
fn alert(code: TransportErrorCode) -> Option<u8> {
    let code = u64::from(code);
    (0x100..=0x1ff).contains(&code).then(|| u8::try_from(code - 0x100).unwrap_or_default())
}

fn alert_name(alert: u8) -> String {
    let name = match alert {
        10 => "unexpected_message",
        20 => "bad_record_mac",
        40 => "handshake_failure",
        ALERT_BAD_CERTIFICATE => "bad_certificate",
        ALERT_UNSUPPORTED_CERTIFICATE => "unsupported_certificate",
        ALERT_CERTIFICATE_REVOKED => "certificate_revoked",
        ALERT_CERTIFICATE_EXPIRED => "certificate_expired",
        ALERT_CERTIFICATE_UNKNOWN => "certificate_unknown",
        47 => "illegal_parameter",
        ALERT_UNKNOWN_CA => "unknown_ca",
        ALERT_ACCESS_DENIED => "access_denied",
        50 => "decode_error",
        ALERT_DECRYPT_ERROR => "decrypt_error",
        70 => "protocol_version",
        71 => "insufficient_security",
        80 => "internal_error",
        109 => "missing_extension",
        110 => "unsupported_extension",
        112 => "unrecognized_name",
        ALERT_CERTIFICATE_REQUIRED => "certificate_required",
        ALERT_NO_APPLICATION_PROTOCOL => "no_application_protocol",
        _ => return format!("{alert}"),
    };
    format!("{name} ({alert})")
}

/// Names the problem behind a failed handshake.
pub(crate) fn classify(error: QuinnError, attempt: &Attempt<'_>) -> HandshakeError {
    let peer = attempt.peer;
    let (offered, subject, cert_error, refusal) = {
        let mut state = attempt.probe.state();
        (state.offered_alpn.clone(), state.peer_subject.clone(), state.peer_cert_error.take(), state.refusal.take())
    };
    if let Some(refusal) = refusal {
        return refused(refusal, peer);
    }
    let subject = subject.map_or_else(|| "(no common name)".to_owned(), |cn| format!("{cn:?}"));
    if let Some(error) = cert_error {
        return certificate_error(error, peer, subject, attempt.server_name);
    }
    if let Some(offered) = offered {
        let shared =
            offered.iter().any(|p| ProtocolVersions::parse_alpn(p).is_some_and(|v| attempt.versions.contains(v)));
        if !shared {
            return HandshakeError::VersionMismatch {
                peer,
                offered: describe_alpn(&offered),
                ours: attempt.versions.clone(),
            };
        }
    }
    match error {
        QuinnError::TransportError(error) => match alert(error.code) {
            Some(ALERT_CERTIFICATE_REQUIRED) => HandshakeError::NoPeerCertificate { peer },
            Some(ALERT_NO_APPLICATION_PROTOCOL) => {
                HandshakeError::PeerVersionMismatch { peer, ours: attempt.versions.clone() }
            }
            _ => HandshakeError::Tls { peer, reason: error.reason },
        },
        QuinnError::ConnectionClosed(close) => {
            let reason = String::from_utf8_lossy(&close.reason).into_owned();
            let Some(alert) = alert(close.error_code) else {
                return HandshakeError::PeerClosed { peer, code: u64::from(close.error_code), reason };
            };
            let why = match alert {
                ALERT_UNKNOWN_CA => "it is not signed by the peer's ca",
                // webpki's verdict for a same-named CA with another key.
                ALERT_DECRYPT_ERROR => "its signature does not verify against the peer's ca",
                ALERT_CERTIFICATE_REQUIRED => "the peer requires one and we sent none",
                ALERT_CERTIFICATE_EXPIRED => "the peer says it expired or is not yet valid",
                ALERT_BAD_CERTIFICATE => "bad certificate (wrong name or usage?)",
                ALERT_UNSUPPORTED_CERTIFICATE => "unsupported certificate",
                ALERT_CERTIFICATE_REVOKED => "the peer says it is revoked",
                ALERT_CERTIFICATE_UNKNOWN => "certificate unknown",
                ALERT_ACCESS_DENIED => "the peer does not admit its name or role on this link",
                ALERT_NO_APPLICATION_PROTOCOL => {
                    return HandshakeError::PeerVersionMismatch { peer, ours: attempt.versions.clone() };
                }
                _ => {
                    return HandshakeError::PeerAlert { peer, alert: alert_name(alert), reason };
                }
            };
            HandshakeError::RefusedByPeer { peer, why, reason }
        }
        QuinnError::ApplicationClosed(close) => HandshakeError::PeerClosed {
            peer,
            code: close.error_code.into_inner(),
            reason: String::from_utf8_lossy(&close.reason).into_owned(),
        },
        QuinnError::TimedOut => HandshakeError::Timeout { peer, after: attempt.timeout },
        source => HandshakeError::Connection { peer, source },
    }
}

fn refused(refusal: Refusal, peer: SocketAddr) -> HandshakeError {
    match refusal {
        Refusal::Name { presented, expected } => HandshakeError::WrongPeerName { peer, presented, expected },
        Refusal::Role { subject, role: Ok(role), link, needed } => {
            HandshakeError::WrongPeerRole { peer, subject, role, link, needed }
        }
        Refusal::Role { subject, role: Err(problem), link, needed } => {
            HandshakeError::PeerWithoutRole { peer, subject, problem: describe_problem(&problem), link, needed }
        }
    }
}

fn certificate_error(
    error: rustls::Error,
    peer: SocketAddr,
    subject: String,
    server_name: Option<&str>,
) -> HandshakeError {
    let timestamp = |t: rustls::pki_types::UnixTime| Timestamp(i64::try_from(t.as_secs()).unwrap_or(i64::MAX));
    let rustls::Error::InvalidCertificate(cert_error) = error else {
        return match error {
            rustls::Error::NoCertificatesPresented => HandshakeError::NoPeerCertificate { peer },
            source => HandshakeError::PeerCertRejected { peer, subject, source },
        };
    };
    match cert_error {
        CertificateError::UnknownIssuer | CertificateError::BadSignature => HandshakeError::UnknownCa { peer, subject },
        CertificateError::NotValidForNameContext { expected, presented } => HandshakeError::WrongServerName {
            peer,
            expected: expected.to_str().into_owned(),
            presented: certs::presented_names(&presented),
        },
        CertificateError::NotValidForName => HandshakeError::WrongServerName {
            peer,
            expected: server_name.unwrap_or_default().to_owned(),
            presented: Vec::new(),
        },
        CertificateError::ExpiredContext { time, not_after } => {
            HandshakeError::PeerCertExpired { peer, subject, not_after: timestamp(not_after), now: timestamp(time) }
        }
        CertificateError::NotValidYetContext { time, not_before } => HandshakeError::PeerCertNotYetValid {
            peer,
            subject,
            not_before: timestamp(not_before),
            now: timestamp(time),
        },
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            HandshakeError::WrongUsage { peer, subject, usage: if server_name.is_some() { "server" } else { "client" } }
        }
        other => HandshakeError::PeerCertRejected { peer, subject, source: rustls::Error::InvalidCertificate(other) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts() {
        assert_eq!(alert(TransportErrorCode::crypto(48)), Some(48));
        assert_eq!(alert(TransportErrorCode::PROTOCOL_VIOLATION), None);
        assert_eq!(alert_name(48), "unknown_ca (48)");
        assert_eq!(alert_name(200), "200");
    }

    #[test]
    fn version_mismatch_message() {
        let probe = HandshakeProbe::default();
        probe.record_hello(vec![b"understudy/1".to_vec()]);
        let versions = ProtocolVersions::new(2);
        let attempt = Attempt {
            peer: "127.0.0.1:4433".parse().unwrap(),
            versions: &versions,
            probe: &probe,
            server_name: None,
            timeout: Duration::from_secs(1),
        };
        let error = classify(QuinnError::TimedOut, &attempt);
        assert_eq!(error.to_string(), "peer 127.0.0.1:4433 offered protocol understudy/1, we speak understudy/2");
    }
}
