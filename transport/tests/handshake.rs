//! Mutual TLS and versioning over loopback: who gets in, who is refused, and what each side is
//! told. Every refusal prints both sides' error text (`cargo test -- --nocapture` shows them).

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{Pki, chain, endpoint, endpoint_with, loopback, tuning, v1};
use quinn::crypto::rustls::QuicClientConfig;
use transport::certs::{HostSpec, Role, Validity};
use transport::{EndpointError, HandshakeError, PeerPolicy, PolicyError, ProtocolVersions};

/// Runs connect and accept side by side; both must fail. Returns (client error, server error).
async fn refused(
    client: &transport::Endpoint,
    server: &transport::Endpoint,
    name: &str,
) -> (EndpointError, EndpointError) {
    let addr = server.local_addr().unwrap();
    let (c, s) = tokio::join!(client.connect(addr, name), server.accept());
    let c = c.expect_err("client must be refused");
    let s = s.expect_err("server must refuse");
    println!("client sees: {}", chain(&c));
    println!("server sees: {}", chain(&s));
    (c, s)
}

#[tokio::test]
async fn same_ca_connects_and_names_the_peer() {
    let pki = Pki::new();
    let (a, b, _, _) = common::pair(&pki, tuning()).await;
    assert_eq!(a.peer_name(), Some("backup"));
    assert_eq!(b.peer_name(), Some("primary"));
    assert_eq!((a.version(), b.version()), (1, 1));
}

#[tokio::test]
async fn client_from_another_ca_is_refused() {
    let (ours, theirs) = (Pki::new(), Pki::new());
    let server = endpoint(&ours.identity("backup"), v1(), tuning());
    let client = endpoint(&foreign_client(&ours, &theirs), v1(), tuning());
    let (c, s) = refused(&client, &server, "backup").await;
    assert!(
        matches!(&s, EndpointError::Handshake(HandshakeError::UnknownCa { subject, .. }) if subject == "\"mallory\""),
        "{s:?}"
    );
    assert!(chain(&s).ends_with("certificate \"mallory\" is not signed by our ca"));
    assert!(matches!(&c, EndpointError::Handshake(HandshakeError::RefusedByPeer { .. })), "{c:?}");
    assert!(chain(&c).contains("refused our certificate: it is not signed by the peer's ca"));
}

/// A client whose certificate comes from `theirs` but which trusts `ours` (so the client side
/// accepts our server and only the server's check can stop it).
fn foreign_client(ours: &Pki, theirs: &Pki) -> transport::Identity {
    let issued = theirs.ca.issue(&transport::certs::HostSpec::new("mallory"), Validity::days_from_now(1)).unwrap();
    transport::Identity::from_pem_unchecked(ours.ca.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap()
}

#[tokio::test]
async fn server_from_another_ca_is_refused() {
    let (ours, theirs) = (Pki::new(), Pki::new());
    let client = endpoint(&ours.identity("primary"), v1(), tuning());
    // An impostor backup: its certificate is from another CA, and it would accept our client.
    let issued = theirs.ca.issue(&transport::certs::HostSpec::new("backup"), Validity::days_from_now(1)).unwrap();
    let impostor =
        transport::Identity::from_pem_unchecked(ours.ca.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap();
    let server = endpoint(&impostor, v1(), tuning());
    let (c, s) = refused(&client, &server, "backup").await;
    assert!(matches!(&c, EndpointError::Handshake(HandshakeError::UnknownCa { .. })), "{c:?}");
    assert!(chain(&c).contains("certificate \"backup\" is not signed by our ca"));
    assert!(matches!(&s, EndpointError::Handshake(HandshakeError::RefusedByPeer { .. })), "{s:?}");
}

#[tokio::test]
async fn wrong_server_name_is_refused() {
    let pki = Pki::new();
    let client = endpoint(&pki.identity("primary"), v1(), tuning());
    let server = endpoint(&pki.identity("backup"), v1(), tuning());
    let (c, s) = refused(&client, &server, "witness").await;
    match &c {
        EndpointError::Handshake(HandshakeError::WrongServerName { expected, presented, .. }) => {
            assert_eq!(expected, "witness");
            assert_eq!(presented, &["backup"]);
        }
        other => panic!("{other:?}"),
    }
    assert!(chain(&c).contains(r#"certificate is for ["backup"], we expected "witness""#));
    assert!(chain(&s).contains("refused our certificate"));
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let pki = Pki::new();
    let server = endpoint(&pki.identity("backup"), v1(), tuning());
    let addr = server.local_addr().unwrap();

    // A plain QUIC client that trusts our CA and speaks our ALPN but has no certificate.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.cert_der().clone()).unwrap();
    let mut crypto = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    crypto.alpn_protocols = vec![b"understudy/1".to_vec()];
    let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(crypto).unwrap()));
    let client = quinn::Endpoint::client(loopback()).unwrap();
    let connect = async {
        // TLS 1.3: the client finishes before the server judges it; the refusal comes after.
        let connection = client.connect_with(config, addr, "backup").unwrap().await?;
        Err::<(), _>(connection.closed().await)
    };
    let (c, s) = tokio::join!(connect, server.accept());
    let c = c.unwrap_err();
    let s = s.unwrap_err();
    println!("client sees: {c}");
    println!("server sees: {}", chain(&s));
    assert!(matches!(&s, EndpointError::Handshake(HandshakeError::NoPeerCertificate { .. })), "{s:?}");
    assert!(chain(&s).ends_with("presented no certificate"));
    assert!(c.to_string().contains("116"), "certificate_required alert: {c}");
}

#[tokio::test]
async fn version_mismatch_is_named() {
    let pki = Pki::new();
    let client = endpoint(&pki.identity("primary"), ProtocolVersions::new(1), tuning());
    let server = endpoint(&pki.identity("backup"), ProtocolVersions::new(2), tuning());
    let (c, s) = refused(&client, &server, "backup").await;
    assert!(matches!(&s, EndpointError::Handshake(HandshakeError::VersionMismatch { .. })), "{s:?}");
    assert!(chain(&s).ends_with("offered protocol understudy/1, we speak understudy/2"), "{s}");
    assert!(chain(&c).ends_with("speaks none of our protocols (we offered understudy/1)"), "{c}");
}

#[tokio::test]
async fn newest_shared_version_is_chosen() {
    let pki = Pki::new();
    let upgraded = ProtocolVersions::new(2).also_accept(1);
    let cases = [
        (upgraded.clone(), ProtocolVersions::new(1), 1),
        (ProtocolVersions::new(1), upgraded.clone(), 1),
        (upgraded.clone(), upgraded.clone(), 2),
    ];
    for (client_versions, server_versions, expected) in cases {
        let client = endpoint(&pki.identity("primary"), client_versions, tuning());
        let server = endpoint(&pki.identity("backup"), server_versions, tuning());
        let (a, b) = tokio::try_join!(client.connect(server.local_addr().unwrap(), "backup"), server.accept()).unwrap();
        assert_eq!((a.version(), b.version()), (expected, expected));
    }
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let pki = Pki::new();
    let day = Duration::from_secs(86_400);
    let expired = Validity { not_before: SystemTime::now() - 3 * day, not_after: SystemTime::now() - day };
    let client = endpoint(&pki.identity_unchecked("primary", expired), v1(), tuning());
    let server = endpoint(&pki.identity("backup"), v1(), tuning());
    let (c, s) = refused(&client, &server, "backup").await;
    assert!(matches!(&s, EndpointError::Handshake(HandshakeError::PeerCertExpired { .. })), "{s:?}");
    assert!(chain(&s).contains("certificate \"primary\" expired at "));
    assert!(chain(&c).contains("refused our certificate"));
}

#[tokio::test]
async fn silent_peer_times_out() {
    let pki = Pki::new();
    let mut tuning = tuning();
    tuning.handshake_timeout = Duration::from_millis(500);
    let client = endpoint(&pki.identity("primary"), v1(), tuning);
    // A UDP socket that never answers.
    let silent = std::net::UdpSocket::bind(loopback()).unwrap();
    let started = std::time::Instant::now();
    let error = client.connect(silent.local_addr().unwrap(), "backup").await.unwrap_err();
    println!("client sees: {}", chain(&error));
    assert!(matches!(error, EndpointError::Handshake(HandshakeError::Timeout { .. })));
    assert!(chain(&error).contains("timed out after 500ms"));
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// A witness's certificate can never carry a replication session: the backup refuses it during
/// the handshake, whatever its name, and says which role it saw and which it needs.
#[tokio::test]
async fn witness_certificate_is_refused_on_a_replication_endpoint() {
    let pki = Pki::new();
    let server = endpoint(&pki.identity("backup"), v1(), tuning());
    // A client that binds with its witness certificate (an arbitration endpoint may).
    let client = endpoint_with(&pki.witness("primary"), PeerPolicy::arbitration());
    let (c, s) = refused(&client, &server, "backup").await;
    match &s {
        EndpointError::Handshake(HandshakeError::WrongPeerRole { role, link, .. }) => {
            assert_eq!((*role, *link), (Role::Witness, "replication"));
        }
        other => panic!("{other:?}"),
    }
    assert!(chain(&s).ends_with("certificate \"primary\" has role witness; a replication link needs role host"), "{s}");
    assert!(
        chain(&c).contains("refused our certificate: the peer does not admit its name or role on this link"),
        "{c}"
    );

    // The same on the connecting side: a replication client refuses a witness as its server.
    let witness = endpoint_with(&pki.witness("witness"), PeerPolicy::arbitration());
    let primary = endpoint(&pki.identity("primary"), v1(), tuning());
    let (c, _) = refused(&primary, &witness, "witness").await;
    assert!(matches!(&c, EndpointError::Handshake(HandshakeError::WrongPeerRole { role: Role::Witness, .. })), "{c:?}");

    // And a witness cannot even bind a replication endpoint.
    let error = transport::Endpoint::bind(loopback(), &pki.witness("witness"), v1(), tuning()).unwrap_err();
    assert!(matches!(error, EndpointError::Policy(PolicyError::OwnRole { role: Role::Witness, .. })), "{error:?}");
    assert_eq!(chain(&error), "our certificate \"witness\" has role witness; a replication link needs role host");
}

/// The backup admits only the primary it expects, and names both names when it refuses.
#[tokio::test]
async fn wrong_client_name_is_refused() {
    let pki = Pki::new();
    let server = endpoint_with(&pki.identity("backup"), PeerPolicy::replication().accept_only(["primary"]));
    let intruder = endpoint(&pki.identity("intruder"), v1(), tuning());
    let (c, s) = refused(&intruder, &server, "backup").await;
    match &s {
        EndpointError::Handshake(HandshakeError::WrongPeerName { presented, expected, .. }) => {
            assert_eq!((presented.as_deref(), expected.as_slice()), (Some("intruder"), &["primary".to_owned()][..]));
        }
        other => panic!("{other:?}"),
    }
    assert!(chain(&s).ends_with("certificate names \"intruder\", expected \"primary\""), "{s}");
    assert!(matches!(&c, EndpointError::Handshake(HandshakeError::RefusedByPeer { .. })), "{c:?}");
    assert_eq!(server.failed_handshakes(), 1);
    // The expected one gets in.
    let primary = endpoint(&pki.identity("primary"), v1(), tuning());
    let (a, b) = tokio::try_join!(primary.connect(server.local_addr().unwrap(), "backup"), server.accept()).unwrap();
    assert_eq!((a.peer_role(), b.peer_name(), b.peer_role()), (Some(Role::Host), Some("primary"), Some(Role::Host)));
}

/// A certificate from before roles is refused, with a hint to issue it again.
#[tokio::test]
async fn certificate_without_role_is_refused() {
    let pki = Pki::new();
    let server = endpoint(&pki.identity("backup"), v1(), tuning());
    let issued = pki.ca.issue_without_role(&HostSpec::new("primary"), Validity::days_from_now(1)).unwrap();
    let old = transport::Identity::from_pem_unchecked(pki.ca.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap();
    // Our own endpoint refuses to bind with it, so it speaks through a raw quinn client with the
    // same TLS settings.
    assert!(transport::Endpoint::bind(loopback(), &old, v1(), tuning()).is_err());
    let mut config = quinn::ClientConfig::new(Arc::new(transport::tls::client_crypto(&old, v1()).unwrap()));
    config.transport_config(Arc::new(tuning().to_quinn().unwrap()));
    let client = quinn::Endpoint::client(loopback()).unwrap();
    let connect = async {
        let connection = client.connect_with(config, server.local_addr().unwrap(), "backup").unwrap().await?;
        Err::<(), _>(connection.closed().await)
    };
    let (c, s) = tokio::join!(connect, server.accept());
    let s = s.unwrap_err();
    println!("client sees: {}", c.unwrap_err());
    println!("server sees: {}", chain(&s));
    assert!(matches!(&s, EndpointError::Handshake(HandshakeError::PeerWithoutRole { .. })), "{s:?}");
    assert!(chain(&s).contains("carries no usable role (none: made by an older `understudy certs`; issue it again)"));
}

/// Arbitration admits hosts and witnesses.
#[tokio::test]
async fn arbitration_admits_hosts_and_witnesses() {
    let pki = Pki::new();
    let witness = endpoint_with(&pki.witness("witness"), PeerPolicy::arbitration());
    let agent = endpoint_with(&pki.identity("primary"), PeerPolicy::arbitration());
    let addr = witness.local_addr().unwrap();
    let (a, b) = tokio::try_join!(agent.connect(addr, "witness"), witness.accept()).unwrap();
    assert_eq!((a.peer_role(), b.peer_role()), (Some(Role::Witness), Some(Role::Host)));
}
