//! Tools for tests of a listening peer: hostile or broken clients that this crate's own
//! [`Endpoint`](crate::Endpoint) would never be.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;

use crate::tls::ProtocolVersions;

/// Opens a handshake with the QUIC server at `server` from a UDP socket bound to `from` (any
/// loopback address stands for another host) and then goes silent: one real QUIC Initial
/// packet (a TLS ClientHello offering `versions`), nothing after. The server answers and waits
/// for a client that never speaks again, until its handshake timeout. Keep the returned socket
/// while the stall should last.
pub async fn stalled_handshake(server: SocketAddr, versions: &ProtocolVersions, from: IpAddr) -> io::Result<UdpSocket> {
    let initial = client_initial(versions).await?;
    let socket = UdpSocket::bind(SocketAddr::new(from, 0)).await?;
    socket.send_to(&initial, server).await?;
    Ok(socket)
}

/// The first datagram a quinn client sends: its Initial packet, captured on a socket of ours.
async fn client_initial(versions: &ProtocolVersions) -> io::Result<Vec<u8>> {
    let capture = UdpSocket::bind("127.0.0.1:0").await?;
    let mut crypto = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(io::Error::other)?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    crypto.alpn_protocols = versions.alpn();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).map_err(io::Error::other)?;
    let client = quinn::Endpoint::client("127.0.0.1:0".parse().expect("address"))?;
    let connecting = client
        .connect_with(quinn::ClientConfig::new(Arc::new(crypto)), capture.local_addr()?, "stall")
        .map_err(io::Error::other)?;
    let mut datagram = vec![0u8; 65536];
    let received = tokio::time::timeout(Duration::from_secs(5), capture.recv(&mut datagram)).await;
    drop(connecting);
    client.close(0u32.into(), b"");
    let n = received.map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no initial packet"))??;
    datagram.truncate(n);
    Ok(datagram)
}
