//! Fuzz entry points, shared by the `cargo fuzz` targets in `transport/fuzz` and by the
//! deterministic smoke test in `tests/fuzz_smoke.rs`. Each takes arbitrary bytes and must not
//! panic; each checks that what it decodes encodes back to the bytes it came from.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use quinn::{ApplicationClose, ConnectionClose, ConnectionError as QuinnError, TransportErrorCode, VarInt};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, Error as TlsError};

use crate::certs::{self, Authority, HostSpec, Identity, Validity};
use crate::connection::wire::{self, HEADER_LEN, MAX_FRAME_LIMIT, Record, StreamKind};
use crate::handshake::{Attempt, HandshakeError, HandshakeProbe, classify};
use crate::tls::{ProtocolVersions, TlsContext, describe_alpn};

/// A cursor over the fuzzer's bytes that yields zeros once they run out.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) << 8 | u16::from(self.u8())
    }

    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let got = self.take(8);
        b[..got.len()].copy_from_slice(got);
        u64::from_le_bytes(b)
    }
}

/// Stream framing: `[limit selector, stream bytes...]` read as a peer's unidirectional stream is
/// read (`connection::reader`): the stream header, then length words and bodies until the bytes
/// end or a word is refused. Every header and record that reads must be exactly what our writer
/// produces for it (the header's reserved bytes aside), frames must respect the limit and
/// goodbyes appear only on the control stream.
pub fn framing(data: &[u8]) {
    let Some((&limit, stream)) = data.split_first() else {
        return;
    };
    let max_frame = [0, 64, 4096, 16 << 20, MAX_FRAME_LIMIT][usize::from(limit % 5)];
    let Some(head) = stream.first_chunk::<HEADER_LEN>() else {
        return;
    };
    let Ok(kind) = wire::parse_header(head) else {
        return;
    };
    assert_eq!(wire::header(kind)[..6], head[..6], "stream header does not re-encode");
    let mut rest = &stream[HEADER_LEN..];
    while let Some((word, after)) = rest.split_first_chunk::<4>() {
        let Ok(record) = wire::parse_word(*word, kind, max_frame) else {
            return;
        };
        let (Record::Frame(len) | Record::Goodbye(len)) = record;
        if after.len() < len {
            return; // the stream ended inside the record
        }
        let (body, after) = after.split_at(len);
        match record {
            Record::Frame(len) => {
                assert!(len <= max_frame as usize, "a {len}-byte frame passed the limit of {max_frame}");
                assert_eq!(wire::frame_word(len)[..], word[..], "frame length word does not re-encode");
            }
            Record::Goodbye(_) => {
                assert!(matches!(kind, StreamKind::Control { .. }), "a goodbye on a bulk stream");
                let reason = String::from_utf8_lossy(body);
                if let Ok(text) = std::str::from_utf8(body) {
                    assert_eq!(reason, text);
                    assert_eq!(wire::goodbye(&reason)[..], rest[..4 + len], "goodbye does not re-encode");
                }
            }
        }
        rest = after;
    }
}

/// A CA and a host identity, made once per process, for the real certificate verifiers.
fn tls_context() -> &'static TlsContext {
    static CONTEXT: OnceLock<TlsContext> = OnceLock::new();
    CONTEXT.get_or_init(|| {
        let ca = Authority::generate(Validity::days_from_now(30)).expect("fuzz ca");
        let issued = ca.issue(&HostSpec::new("backup"), Validity::days_from_now(30)).expect("fuzz certificate");
        let identity = Identity::from_pem(ca.cert_pem(), &issued.cert_pem, &issued.key_pem).expect("fuzz identity");
        TlsContext::new(&identity, ProtocolVersions::new(1), crate::PeerPolicy::replication())
            .expect("fuzz tls context")
    })
}

/// What the handshake saw, as a failing handshake is explained ([`classify`]): the protocols
/// the peer offered, its certificate (bytes through the real verifiers, or a verdict from the
/// input), and how the connection ended (close codes and reasons from the input). Input:
/// `[flags, our version, offered count, (len, protocol)*, cert len u16, cert, verdict, close
/// kind, code u64, reason...]`. The explanation must come out without a panic, name the peer,
/// and be consistent: a version mismatch only when no offered protocol is one of ours, never
/// one when one is. Every offered `understudy/<n>` round-trips through [`ProtocolVersions`].
pub fn handshake(data: &[u8]) {
    let mut input = Input(data);
    let flags = input.u8();
    let ours = ProtocolVersions::new(u32::from(input.u8() % 4) + 1).also_accept(1);
    let offered: Vec<Vec<u8>> = (0..input.u8() % 6)
        .map(|_| {
            let len = usize::from(input.u8() % 24);
            input.take(len).to_vec()
        })
        .collect();
    let cert_len = usize::from(input.u16());
    let cert = CertificateDer::from(input.take(cert_len).to_vec());
    let verdict = input.u8();

    let probe = Arc::new(HandshakeProbe::default());
    if flags & 1 != 0 {
        probe.record_hello(offered.clone());
    }
    let server_name = (flags & 2 != 0).then_some("backup");
    if flags & 4 != 0 {
        let now = UnixTime::now();
        match verdict % 4 {
            0 => {
                let _ = tls_context().client_verifier(&probe).verify_client_cert(&cert, &[], now);
            }
            1 => {
                let name = ServerName::try_from("backup").expect("a dns name");
                let _ = tls_context().server_verifier(&probe).verify_server_cert(&cert, &[], &name, &[], now);
            }
            2 => probe.record_peer_cert(&cert, None),
            _ => probe.record_peer_cert(&cert, Some(tls_error(&mut input))),
        }
    }
    let close = quinn_error(&mut input);
    let peer: SocketAddr = "192.0.2.7:4433".parse().expect("an address");
    let attempt = Attempt { peer, versions: &ours, probe: &probe, server_name, timeout: Duration::from_secs(5) };
    let error = classify(close, &attempt);
    assert_eq!(error.peer(), peer);
    assert!(error.to_string().contains(&peer.to_string()), "{error} does not name the peer");

    let shared = offered.iter().any(|p| ProtocolVersions::parse_alpn(p).is_some_and(|v| ours.contains(v)));
    let mismatch = matches!(error, HandshakeError::VersionMismatch { .. });
    if mismatch {
        assert!(flags & 1 != 0 && !shared, "a version mismatch reported with {}", describe_alpn(&offered));
    }
    if flags & 5 == 1 && !shared {
        assert!(mismatch, "no version mismatch reported with {}: {error}", describe_alpn(&offered));
    }
    for p in &offered {
        if let Some(v) = ProtocolVersions::parse_alpn(p) {
            assert_eq!(ProtocolVersions::parse_alpn(&ProtocolVersions::new(v).alpn()[0]), Some(v));
        }
    }
    assert!(!describe_alpn(&offered).is_empty());
    let _ = certs::common_name(&cert);
}

/// A certificate verdict as rustls gives it, from the input.
fn tls_error(input: &mut Input<'_>) -> TlsError {
    let time = |secs: u64| UnixTime::since_unix_epoch(Duration::from_secs(secs));
    let cert = match input.u8() % 10 {
        0 => return TlsError::NoCertificatesPresented,
        1 => return TlsError::General(String::from_utf8_lossy(input.take(16)).into_owned()),
        2 => CertificateError::UnknownIssuer,
        3 => CertificateError::BadSignature,
        4 => CertificateError::NotValidForName,
        5 => {
            let presented = (0..input.u8() % 4)
                .map(|_| {
                    let len = usize::from(input.u8() % 32);
                    String::from_utf8_lossy(input.take(len)).into_owned()
                })
                .collect();
            CertificateError::NotValidForNameContext {
                expected: ServerName::try_from("backup").expect("a dns name"),
                presented,
            }
        }
        6 => CertificateError::ExpiredContext { time: time(input.u64()), not_after: time(input.u64()) },
        7 => CertificateError::NotValidYetContext { time: time(input.u64()), not_before: time(input.u64()) },
        8 => CertificateError::InvalidPurpose,
        _ => CertificateError::BadEncoding,
    };
    TlsError::InvalidCertificate(cert)
}

/// How a connection ended, from the input.
fn quinn_error(input: &mut Input<'_>) -> QuinnError {
    let kind = input.u8();
    let code = input.u64();
    let reason = Bytes::copy_from_slice(input.take(usize::MAX));
    let transport_code = if kind & 0x80 != 0 {
        TransportErrorCode::crypto(code as u8)
    } else {
        [TransportErrorCode::NO_ERROR, TransportErrorCode::PROTOCOL_VIOLATION, TransportErrorCode::INTERNAL_ERROR]
            [(code % 3) as usize]
    };
    match kind % 6 {
        0 => QuinnError::ConnectionClosed(ConnectionClose { error_code: transport_code, frame_type: None, reason }),
        1 => QuinnError::ApplicationClosed(ApplicationClose {
            error_code: VarInt::from_u64(code >> 2).unwrap_or(VarInt::MAX),
            reason,
        }),
        2 => QuinnError::TransportError(transport_code.into()),
        3 => QuinnError::TimedOut,
        4 => QuinnError::Reset,
        _ => QuinnError::LocallyClosed,
    }
}
