//! Helpers shared by the integration tests: a CA, endpoint pairs, error chains, a UDP relay
//! that can cut the path. Everything stays on 127.0.0.1.

#![allow(dead_code)]

use std::error::Error;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use transport::certs::{Authority, HostSpec, Identity, Validity};
use transport::{Connection, Endpoint, PeerPolicy, ProtocolVersions, Tuning};

pub const LOOPBACK: &str = "127.0.0.1:0";

pub fn loopback() -> SocketAddr {
    LOOPBACK.parse().unwrap()
}

/// A CA and its host identities.
pub struct Pki {
    pub ca: Authority,
}

impl Pki {
    pub fn new() -> Self {
        Pki { ca: Authority::generate(Validity::days_from_now(30)).unwrap() }
    }

    pub fn identity(&self, host: &str) -> Identity {
        self.identity_of(&HostSpec::new(host))
    }

    /// A witness's identity (role witness).
    pub fn witness(&self, host: &str) -> Identity {
        self.identity_of(&HostSpec::witness(host))
    }

    pub fn identity_of(&self, spec: &HostSpec) -> Identity {
        let issued = self.ca.issue(spec, Validity::days_from_now(1)).unwrap();
        Identity::from_pem(self.ca.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap()
    }

    /// A certificate with any validity, not checked locally (to show what the peer does).
    pub fn identity_unchecked(&self, host: &str, validity: Validity) -> Identity {
        let issued = self.ca.issue(&HostSpec::new(host), validity).unwrap();
        Identity::from_pem_unchecked(self.ca.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap()
    }
}

/// Test tuning: short timeouts so failures show quickly.
pub fn tuning() -> Tuning {
    Tuning {
        idle_timeout: Duration::from_secs(1),
        keep_alive: Duration::from_millis(200),
        handshake_timeout: Duration::from_secs(3),
        close_linger: Duration::from_secs(1),
        ..Tuning::default()
    }
}

pub fn v1() -> ProtocolVersions {
    ProtocolVersions::new(1)
}

pub fn endpoint(identity: &Identity, versions: ProtocolVersions, tuning: Tuning) -> Endpoint {
    Endpoint::bind(loopback(), identity, versions, tuning).unwrap()
}

/// An endpoint admitting the peers `policy` admits.
pub fn endpoint_with(identity: &Identity, policy: PeerPolicy) -> Endpoint {
    Endpoint::bind_with(loopback(), identity, v1(), tuning(), policy).unwrap()
}

/// A connected pair: (primary's connection to backup, backup's connection from primary).
pub async fn pair(pki: &Pki, tuning: Tuning) -> (Connection, Connection, Endpoint, Endpoint) {
    let primary = endpoint(&pki.identity("primary"), v1(), tuning.clone());
    let backup = endpoint(&pki.identity("backup"), v1(), tuning);
    let (a, b) = tokio::try_join!(primary.connect(backup.local_addr().unwrap(), "backup"), backup.accept()).unwrap();
    (a, b, primary, backup)
}

/// "outer: inner: innermost", as the binary prints errors.
pub fn chain(error: &dyn Error) -> String {
    transport::error_chain(error)
}

/// A UDP relay on 127.0.0.1 between one client and one server; `cut` makes it drop everything
/// from then on, like a dead host or a partition.
pub struct Relay {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Relay {
    pub async fn start(server: SocketAddr) -> Relay {
        let front = Arc::new(UdpSocket::bind(LOOPBACK).await.unwrap());
        let back = Arc::new(UdpSocket::bind(LOOPBACK).await.unwrap());
        back.connect(server).await.unwrap();
        let addr = front.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let up = {
            let (front, back, cut, client) = (front.clone(), back.clone(), cut.clone(), client.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = front.recv_from(&mut buf).await {
                    *client.lock().await = Some(from);
                    if !cut.load(Ordering::Relaxed) {
                        let _ = back.send(&buf[..n]).await;
                    }
                }
            })
        };
        let down = {
            let cut = cut.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = back.recv(&mut buf).await {
                    let to = *client.lock().await;
                    if let (Some(to), false) = (to, cut.load(Ordering::Relaxed)) {
                        let _ = front.send_to(&buf[..n], to).await;
                    }
                }
            })
        };
        Relay { addr, cut, tasks: vec![up, down] }
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
