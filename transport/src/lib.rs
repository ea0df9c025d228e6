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
//! // Both check the other's certificate against the CA; the primary also checks the name.
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
//! - [`Endpoint`]: bind, [`Endpoint::connect`], [`Endpoint::accept`]; handshake failures come
//!   back as [`HandshakeError`]s that name the problem.
//! - [`Connection`]: control frames, bulk frames, datagrams, [`Connection::close`].
//! - [`Tuning`]: windows, congestion control, keep-alive and idle timeout.
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
pub mod proto;
pub mod session;
pub mod tls;

pub use certs::Identity;
pub use config::{Congestion, Tuning};
pub use connection::{Connection, ConnectionError, Stats};
pub use endpoint::{Endpoint, EndpointError};
pub use handshake::HandshakeError;
pub use session::{Protocol, Session};
pub use tls::ProtocolVersions;
