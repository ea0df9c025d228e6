//! The Understudy transport: QUIC (quinn) with mutual TLS between the primary and the backup,
//! and the async driver of the sans-IO replication protocol.
//!
//! ```
//! use bytes::Bytes;
//! use transport::certs::{Authority, CertsError, HostSpec, Identity, Validity};
//! use transport::{ConnectionError, Endpoint, ProtocolVersions, Tuning};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The admin's CA and a certificate per host; `certs::generate` writes the same to files.
//! let ca = Authority::generate(Validity::days_from_now(365))?;
//! let identity = |host: &str| -> Result<Identity, CertsError> {
//!     let issued = ca.issue(&HostSpec::new(host), Validity::days_from_now(30))?;
//!     Identity::from_pem(ca.cert_pem(), &issued.cert_pem, &issued.key_pem)
//! };
//! let v1 = ProtocolVersions::new(1);
//! let any_port = "127.0.0.1:0".parse()?;
//! let backup = Endpoint::bind(any_port, &identity("backup")?, v1.clone(), Tuning::default())?;
//! let primary = Endpoint::bind(any_port, &identity("primary")?, v1, Tuning::default())?;
//!
//! // Both check the other's certificate against the CA and its role (`host` on a replication
//! // link); the primary also checks the backup's name (the backup may: `PeerPolicy`).
//! let (to_backup, from_primary) =
//!     tokio::try_join!(primary.connect(backup.local_addr()?, "backup"), backup.accept())?;
//! assert_eq!(from_primary.peer_name(), Some("primary"));
//!
//! to_backup.send_frame(Bytes::from_static(b"epoch 7 begins")).await?; // ordered control
//! to_backup.send_bulk(Bytes::from(vec![0u8; 64 * 1024])).await?; // page batches
//! to_backup.send_datagram(Bytes::from_static(b"heartbeat"))?; // unreliable
//! assert_eq!(from_primary.recv_frame().await?, "epoch 7 begins");
//! assert_eq!(from_primary.recv_bulk().await?.len(), 64 * 1024);
//! assert_eq!(from_primary.recv_datagram().await?, "heartbeat");
//!
//! to_backup.close("primary shutting down").await;
//! match from_primary.recv_frame().await {
//!     Err(ConnectionError::PeerClosed { reason, .. }) => assert_eq!(reason, "primary shutting down"),
//!     other => panic!("{other:?}"),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! - [`certs`]: make the CA and host certificates (`understudy certs`), load and check them.
//! - [`Endpoint`]: bind, [`Endpoint::connect`], [`Endpoint::accept`] (handshakes in parallel,
//!   bounded); handshake failures come back as [`HandshakeError`]s that name the problem.
//! - [`PeerPolicy`]: which roles and names an endpoint admits, checked inside the handshake.
//! - [`Connection`]: control frames, bulk frames, datagrams, [`Connection::close`].
//! - [`Tuning`]: windows, congestion control, keep-alive and idle timeout.
//! - [`side_copy`]: authenticated datagram copies of inbound frames beside a session (keyed from
//!   its TLS session).
//! - [`session`]: runs a sans-IO protocol core over a connection; [`proto`] runs
//!   `replication-proto`'s `Sender` and `Receiver` with it.
//!
//! `docs/transport.md` describes the files, the TLS setup, versioning, the stream layout, tuning
//! and errors.

#![forbid(unsafe_code)]

pub mod certs;
pub mod config;
pub mod connection;
pub mod endpoint;
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod liveness;
pub mod policy;
pub mod proto;
pub mod session;
pub mod side_copy;
pub mod testing;
pub mod tls;

pub use certs::Identity;
pub use config::{Congestion, Tuning};
pub use connection::{Connection, ConnectionError, Stats};
pub use endpoint::{Endpoint, EndpointError};
pub use handshake::HandshakeError;
pub use policy::{PeerPolicy, PolicyError};
pub use session::{Protocol, Session};
pub use tls::ProtocolVersions;

/// Wall-clock nanoseconds, for timing events (`trace`) that the peer process's logs are
/// compared with.
pub(crate) fn wall_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// An error and its sources, `: `-separated (for logs and status fields that hold one line).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// The operating system's random number generator failed.
#[derive(Debug, thiserror::Error)]
#[error("the operating system's random number generator failed")]
pub struct RandomError;

/// A random `u64` from the operating system's CSPRNG (through the TLS provider): session
/// instance numbers and the like, which a peer must not be able to predict.
pub fn random_u64() -> Result<u64, RandomError> {
    let mut b = [0u8; 8];
    rustls::crypto::ring::default_provider().secure_random.fill(&mut b).map_err(|_| RandomError)?;
    Ok(u64::from_le_bytes(b))
}

#[cfg(test)]
mod random_tests {
    #[test]
    fn random_numbers_differ_and_are_not_pid_shaped() {
        let v: Vec<u64> = (0..64).map(|_| super::random_u64().unwrap()).collect();
        let mut d = v.clone();
        d.sort_unstable();
        d.dedup();
        assert_eq!(d.len(), v.len(), "repeated values: {v:x?}");
        let pid = u64::from(std::process::id());
        assert!(v.iter().filter(|x| *x >> 32 == pid).count() < 2, "pid-shaped values: {v:x?}");
        // Every bit position varies across 64 draws (a stuck bit would be a broken source).
        let or = v.iter().fold(0u64, |a, b| a | b);
        let and = v.iter().fold(u64::MAX, |a, b| a & b);
        assert_eq!((or, and), (u64::MAX, 0), "stuck bits");
    }
}
