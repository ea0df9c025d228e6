//! Accepting under hostile load: a peer that opens a handshake and stalls delays nobody else,
//! and stalled handshakes are bounded.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::{Pki, chain, endpoint, tuning, v1};
use transport::endpoint::{MAX_PENDING_PER_ADDRESS, VALIDATE_ABOVE};
use transport::testing::stalled_handshake;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// Waits until `f` holds (up to 2 s).
async fn eventually(what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(2), "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_stalled_handshake_does_not_delay_a_good_peer() {
    let pki = Pki::new();
    let mut slow = tuning();
    slow.handshake_timeout = Duration::from_secs(5);
    let backup = endpoint(&pki.identity("backup"), v1(), slow);
    let primary = endpoint(&pki.identity("primary"), v1(), tuning());
    let addr = backup.local_addr().unwrap();
    // The backup's serving loop: accepts and keeps what it gets.
    let server = backup.clone();
    let accepted = tokio::spawn(async move { server.accept().await });
    let _stall = stalled_handshake(addr, &v1(), ip("127.0.0.1")).await.unwrap();
    // The backup has taken the stalled handshake in hand.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let connection = primary.connect(addr, "backup").await.unwrap_or_else(|e| panic!("{}", chain(&e)));
    let took = started.elapsed();
    let accepted = tokio::time::timeout(Duration::from_secs(1), accepted).await.expect("accepted").unwrap().unwrap();
    println!("a good peer connected in {took:?} beside a stalled handshake (its timeout: 5 s)");
    assert!(took < Duration::from_secs(1), "the good peer waited {took:?}");
    assert_eq!(accepted.peer_name(), Some("primary"));
    assert_eq!(connection.peer_name(), Some("backup"));
}

#[tokio::test]
async fn pending_handshakes_are_bounded() {
    let pki = Pki::new();
    let mut slow = tuning();
    slow.handshake_timeout = Duration::from_secs(5);
    let backup = endpoint(&pki.identity("backup"), v1(), slow);
    let addr = backup.local_addr().unwrap();
    let server = backup.clone();
    let accepted = tokio::spawn(async move { server.accept().await });
    eventually("the acceptor runs", || !accepted.is_finished()).await;

    // One host stalls many handshakes: only a few are kept, the rest refused at once.
    let mut stalls = Vec::new();
    for _ in 0..10 {
        stalls.push(stalled_handshake(addr, &v1(), ip("127.0.4.1")).await.unwrap());
    }
    eventually("one address fills its share", || backup.pending_handshakes() == MAX_PENDING_PER_ADDRESS).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(backup.pending_handshakes(), MAX_PENDING_PER_ADDRESS);
    assert_eq!(backup.refused_overload(), 10 - MAX_PENDING_PER_ADDRESS as u64);

    // Many hosts (spoofed or not): beyond VALIDATE_ABOVE a peer must prove its address first,
    // which a one-packet staller never does.
    for i in 0..40 {
        stalls.push(stalled_handshake(addr, &v1(), ip(&format!("127.0.5.{}", i + 1))).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pending = backup.pending_handshakes();
    println!("pending after 50 stalled handshakes from 41 addresses: {pending}");
    assert!(pending <= VALIDATE_ABOVE, "{pending} pending");

    // A real peer still gets in at once (it answers the address validation).
    let primary = endpoint(&pki.identity("primary"), v1(), tuning());
    let started = Instant::now();
    primary.connect(addr, "backup").await.unwrap_or_else(|e| panic!("{}", chain(&e)));
    let took = started.elapsed();
    let accepted = tokio::time::timeout(Duration::from_secs(1), accepted).await.expect("accepted").unwrap().unwrap();
    assert_eq!(accepted.peer_name(), Some("primary"));
    println!("a good peer connected in {took:?} during the flood");
    assert!(took < Duration::from_secs(1), "the good peer waited {took:?}");
}
