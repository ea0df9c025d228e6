//! Frames, datagrams, close and failure over loopback.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Pki, Relay, chain, endpoint, pair, tuning, v1};
use transport::{Congestion, ConnectionError, Tuning};

fn numbered(i: u32, len: usize) -> Bytes {
    let mut frame = vec![(i % 251) as u8; len.max(4)];
    frame[..4].copy_from_slice(&i.to_be_bytes());
    Bytes::from(frame)
}

fn number(frame: &Bytes) -> u32 {
    u32::from_be_bytes(frame[..4].try_into().unwrap())
}

#[tokio::test]
async fn frames_and_datagrams_both_ways() {
    let pki = Pki::new();
    let (a, b, _, _) = pair(&pki, tuning()).await;
    for (from, to) in [(&a, &b), (&b, &a)] {
        // Control frames keep their order, empty ones included.
        for i in 0..100u32 {
            from.send_frame(numbered(i, 4 + (i as usize * 37) % 3000)).await.unwrap();
        }
        from.send_frame(Bytes::new()).await.unwrap();
        for i in 0..100u32 {
            let frame = to.recv_frame().await.unwrap();
            assert_eq!(number(&frame), i);
            assert_eq!(frame.len(), 4 + (i as usize * 37) % 3000);
        }
        assert!(to.recv_frame().await.unwrap().is_empty());

        // Bulk frames all arrive, over several streams, in some order.
        let sent: BTreeSet<u32> = (0..64).collect();
        for &i in &sent {
            from.send_bulk(numbered(i, 64 * 1024)).await.unwrap();
        }
        let mut got = BTreeSet::new();
        for _ in &sent {
            let frame = to.recv_bulk().await.unwrap();
            assert_eq!(frame.len(), 64 * 1024);
            assert!(frame[4..].iter().all(|&b| b == (number(&frame) % 251) as u8));
            got.insert(number(&frame));
        }
        assert_eq!(got, sent);

        // Frames on one bulk lane keep their order.
        for i in 0..50u32 {
            from.send_bulk_on(1, numbered(i, 1000)).await.unwrap();
        }
        for i in 0..50u32 {
            assert_eq!(number(&to.recv_bulk().await.unwrap()), i);
        }

        // Datagrams (heartbeats).
        for i in 0..10u32 {
            from.send_datagram(numbered(i, 16)).unwrap();
        }
        for i in 0..10u32 {
            assert_eq!(number(&to.recv_datagram().await.unwrap()), i);
        }
    }
    let stats = a.stats();
    println!(
        "primary: {} frames / {} bytes sent, {} frames received, rtt {:?}",
        stats.frames_sent, stats.bytes_sent, stats.frames_received, stats.rtt
    );
    assert_eq!(stats.frames_sent, 100 + 1 + 64 + 50);
    assert_eq!(stats.frames_received, 100 + 1 + 64 + 50);
    assert_eq!(stats.datagrams_sent, 10);
    assert_eq!(stats.datagrams_received, 10);
    assert_eq!(b.stats().queued_bytes, 0);
}

#[tokio::test]
async fn concurrent_senders_keep_frames_whole() {
    let pki = Pki::new();
    let (a, b, _, _) = pair(&pki, tuning()).await;
    let mut tasks = Vec::new();
    for task in 0..4u32 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50u32 {
                let n = task * 1000 + i;
                a.send_bulk(numbered(n, 10_000 + n as usize)).await.unwrap();
                a.send_frame(numbered(n, 100)).await.unwrap();
            }
        }));
    }
    let mut bulk = BTreeSet::new();
    let mut control = BTreeSet::new();
    for _ in 0..200 {
        let frame = b.recv_bulk().await.unwrap();
        assert_eq!(frame.len(), 10_000 + number(&frame) as usize);
        bulk.insert(number(&frame));
        control.insert(number(&b.recv_frame().await.unwrap()));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(bulk.len(), 200);
    assert_eq!(bulk, control);
}

#[tokio::test]
async fn close_delivers_everything_then_the_reason() {
    let pki = Pki::new();
    let (a, b, _, _) = pair(&pki, tuning()).await;
    for i in 0..200u32 {
        a.send_bulk(numbered(i, 8192)).await.unwrap();
        a.send_frame(numbered(i, 64)).await.unwrap();
    }
    let closer = tokio::spawn({
        let a = a.clone();
        async move { a.close("primary shutting down").await }
    });
    // Read slowly: close waits for us.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 0..200u32 {
        assert_eq!(number(&b.recv_frame().await.unwrap()), i);
    }
    let mut bulk = 0;
    let error = loop {
        match b.recv_bulk().await {
            Ok(_) => bulk += 1,
            Err(error) => break error,
        }
    };
    assert_eq!(bulk, 200);
    println!("receiver sees: {error}");
    assert!(matches!(&error, ConnectionError::PeerClosed { reason, .. } if reason == "primary shutting down"));
    assert!(error.to_string().ends_with("closed the connection: primary shutting down"));
    assert!(matches!(b.recv_frame().await, Err(ConnectionError::PeerClosed { .. })));
    assert!(matches!(b.send_frame(Bytes::from_static(b"late")).await, Err(ConnectionError::PeerClosed { .. })));
    closer.await.unwrap();
    let error = a.send_frame(Bytes::from_static(b"after close")).await.unwrap_err();
    assert!(matches!(error, ConnectionError::Closed), "{error:?}");
}

#[tokio::test]
async fn oversized_frames_are_refused() {
    let pki = Pki::new();
    let small = Tuning { max_frame_size: 1024 * 1024, ..tuning() };
    let big = Tuning { max_frame_size: 4 * 1024 * 1024, ..tuning() };
    let primary = endpoint(&pki.identity("primary"), v1(), big);
    let backup = endpoint(&pki.identity("backup"), v1(), small);
    let (a, b) = tokio::try_join!(primary.connect(backup.local_addr().unwrap(), "backup"), backup.accept()).unwrap();
    // Ours: refused before sending, the connection stays usable.
    let error = b.send_frame(Bytes::from(vec![0; 1024 * 1024 + 1])).await.unwrap_err();
    println!("sender sees: {error}");
    assert_eq!(error.to_string(), "frame of 1048577 bytes exceeds the limit of 1048576");
    b.send_frame(Bytes::from_static(b"still fine")).await.unwrap();
    assert_eq!(a.recv_frame().await.unwrap(), "still fine");
    // The peer's: a protocol violation that ends the connection, named on both sides.
    a.send_frame(Bytes::from(vec![0; 2 * 1024 * 1024])).await.unwrap();
    let at_b = b.recv_frame().await.unwrap_err();
    let at_a = a.recv_frame().await.unwrap_err();
    println!("receiver sees: {at_b}\nsender sees: {at_a}");
    assert!(
        at_b.to_string().ends_with("broke the framing: control frame of 2097152 bytes exceeds the limit of 1048576")
    );
    assert!(matches!(at_a, ConnectionError::PeerAborted { code: 1, .. }));
}

#[tokio::test]
async fn keep_alive_holds_an_idle_connection() {
    let pki = Pki::new();
    let (a, b, _, _) = pair(&pki, tuning()).await;
    tokio::time::sleep(tuning().idle_timeout * 3).await;
    a.send_frame(Bytes::from_static(b"still here")).await.unwrap();
    assert_eq!(b.recv_frame().await.unwrap(), "still here");
}

#[tokio::test]
async fn cut_path_reports_peer_gone_within_idle_timeout() {
    let pki = Pki::new();
    let tuning = tuning();
    let primary = endpoint(&pki.identity("primary"), v1(), tuning.clone());
    let backup = endpoint(&pki.identity("backup"), v1(), tuning.clone());
    let relay = Relay::start(backup.local_addr().unwrap()).await;
    let (a, b) = tokio::try_join!(primary.connect(relay.addr, "backup"), backup.accept()).unwrap();
    a.send_frame(Bytes::from_static(b"before")).await.unwrap();
    assert_eq!(b.recv_frame().await.unwrap(), "before");

    relay.cut();
    let cut = Instant::now();
    let (at_a, at_b) = tokio::join!(a.recv_frame(), b.recv_frame());
    let elapsed = cut.elapsed();
    let (at_a, at_b) = (at_a.unwrap_err(), at_b.unwrap_err());
    println!("after {elapsed:?}: primary sees: {at_a}; backup sees: {at_b}");
    for error in [&at_a, &at_b] {
        assert!(matches!(error, ConnectionError::PeerGone { .. }), "{error:?}");
        assert!(error.to_string().contains("gone: nothing heard for 1s"));
    }
    assert!(elapsed >= tuning.idle_timeout / 2, "{elapsed:?}");
    assert!(elapsed <= tuning.idle_timeout * 2, "{elapsed:?}");
    assert!(matches!(a.close_reason(), Some(ConnectionError::PeerGone { .. })));
}

#[test]
fn killed_peer_is_reported_gone() {
    // The backup runs on its own runtime, which is then dropped: its socket closes and it
    // sends nothing more, like a process killed with SIGKILL.
    let pki = Pki::new();
    let tuning = tuning();
    let backup_runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let backup = backup_runtime.block_on(async { endpoint(&pki.identity("backup"), v1(), tuning.clone()) });
    let addr = backup.local_addr().unwrap();
    let backup_thread = std::thread::spawn(move || {
        backup_runtime.block_on(async {
            let connection = backup.accept().await.unwrap();
            connection.recv_frame().await.unwrap();
            std::mem::forget(connection); // no close, no drop: just gone
        });
        drop(backup_runtime);
    });
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let primary = endpoint(&pki.identity("primary"), v1(), tuning.clone());
        let a = primary.connect(addr, "backup").await.unwrap();
        a.send_frame(Bytes::from_static(b"hello")).await.unwrap();
        tokio::task::spawn_blocking(move || backup_thread.join()).await.unwrap().unwrap();
        let gone = Instant::now();
        let error = a.recv_frame().await.unwrap_err();
        let elapsed = gone.elapsed();
        println!("after {elapsed:?}: primary sees: {}", chain(&error));
        assert!(matches!(error, ConnectionError::PeerGone { .. }), "{error:?}");
        assert!(elapsed <= tuning.idle_timeout * 2, "{elapsed:?}");
    });
}

#[tokio::test]
async fn every_congestion_controller_and_mismatched_stream_counts_work() {
    let pki = Pki::new();
    for (congestion, streams) in [(Congestion::Cubic, 1), (Congestion::NewReno, 8), (Congestion::Bbr, 16)] {
        let primary =
            endpoint(&pki.identity("primary"), v1(), Tuning { congestion, bulk_streams: streams, ..tuning() });
        let backup = endpoint(&pki.identity("backup"), v1(), tuning());
        let (a, b) =
            tokio::try_join!(primary.connect(backup.local_addr().unwrap(), "backup"), backup.accept()).unwrap();
        assert_eq!(a.bulk_streams(), usize::from(streams));
        for i in 0..64u32 {
            a.send_bulk(numbered(i, 64 * 1024)).await.unwrap();
        }
        let mut got = BTreeSet::new();
        for _ in 0..64 {
            got.insert(number(&b.recv_bulk().await.unwrap()));
        }
        assert_eq!(got.len(), 64, "{congestion:?}");
        a.close("done").await;
    }
}

#[tokio::test]
async fn ipv6_loopback_works() {
    let pki = Pki::new();
    let any6: std::net::SocketAddr = "[::1]:0".parse().unwrap();
    let bind = |host: &str| transport::Endpoint::bind(any6, &pki.identity(host), v1(), tuning());
    let (primary, backup) = match (bind("primary"), bind("backup")) {
        (Ok(p), Ok(b)) => (p, b),
        (Err(e), _) | (_, Err(e)) => {
            println!("SKIP ipv6_loopback_works: cannot bind [::1]: {}", chain(&e));
            return;
        }
    };
    let (a, b) = tokio::try_join!(primary.connect(backup.local_addr().unwrap(), "backup"), backup.accept()).unwrap();
    assert!(a.remote_address().is_ipv6());
    a.send_frame(Bytes::from_static(b"v6")).await.unwrap();
    assert_eq!(b.recv_frame().await.unwrap(), "v6");
    b.send_datagram(Bytes::from_static(b"beat")).unwrap();
    assert_eq!(a.recv_datagram().await.unwrap(), "beat");
}

/// A checkpoint-sized burst (about ten packets) reaches the peer's application before the peer
/// sends an ACK for it: with QUIC's default (an ACK for every second packet) quinn's driver
/// sends that ACK first and only then hands the data on, and on loopback the send, which wakes
/// this side, delayed each checkpoint by ~50-90 µs. The ACK now rides on the peer's next
/// packet (the epoch's acknowledgement), or follows within `MAX_ACK_DELAY`.
#[tokio::test]
async fn a_burst_reaches_the_application_before_an_ack_is_sent_for_it() {
    let pki = Pki::new();
    let (a, b, _, _) = pair(&pki, tuning()).await;
    // The handshake's own ACKs, the ACK_FREQUENCY request and a first burst settle first.
    a.send_frame(numbered(99, 13_000)).await.unwrap();
    assert_eq!(number(&b.recv_frame().await.unwrap()), 99);
    tokio::time::sleep(Duration::from_millis(50)).await;
    for round in 0..5u32 {
        let before = b.stats().quic.frame_tx.acks;
        a.send_frame(numbered(round, 13_000)).await.unwrap();
        let frame = b.recv_frame().await.unwrap();
        assert_eq!(number(&frame), round);
        // No await since the frame came: on this single-threaded runtime b's connection driver
        // has not run again, so this counts exactly the ACKs it sent before handing the data on.
        let after = b.stats().quic.frame_tx.acks;
        assert_eq!(after, before, "round {round}: the receiver sent an ACK before the data reached the application");
        // The held-back ACK goes out on its timer.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(b.stats().quic.frame_tx.acks > after, "round {round}: the held-back ACK never went out");
    }
}

/// Both ends of a connection derive the same side-copy key from its TLS session, and another
/// connection a different one: a copy sealed on one connection opens on its peer and on no
/// other.
#[tokio::test]
async fn side_copy_keys_are_per_connection_and_agree_on_both_ends() {
    use transport::side_copy::{Opener, Sealer, SideCopyError, SideKey};
    let pki = Pki::new();
    let (a, b, _, _) = pair(&pki, tuning()).await;
    let (c, _d, _, _) = pair(&pki, tuning()).await;
    let (ka, kb, kc) = (
        SideKey::from_connection(&a).unwrap(),
        SideKey::from_connection(&b).unwrap(),
        SideKey::from_connection(&c).unwrap(),
    );
    assert_eq!(ka.id(), kb.id());
    assert_ne!(ka.id(), kc.id());
    let mut d = Vec::new();
    Sealer::new(&ka).seal(1, 1, b"frame", &mut d).unwrap();
    assert_eq!(Opener::new(&kb).open(&mut d.clone()).unwrap().1, b"frame");
    assert!(matches!(Opener::new(&kc).open(&mut d), Err(SideCopyError::KeyId { .. })));
}
