//! A slow receiver makes the sender wait instead of buffering without bound. Alone in its
//! file (its own process) so the memory measurement sees only this test.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Pki, pair, tuning};
use transport::{Connection, Tuning};

const FRAME: usize = 64 * 1024;
const FRAMES: u32 = 1024; // 64 MiB offered, far more than all windows together
const KIB: u32 = 1024;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

fn frame(i: u32) -> Bytes {
    let mut frame = vec![(i % 251) as u8; FRAME];
    frame[..4].copy_from_slice(&i.to_be_bytes());
    Bytes::from(frame)
}

async fn check(bulk: bool, tuning: &Tuning, a: Connection, b: Connection) {
    let name = if bulk { "bulk" } else { "control" };
    let sent_before = a.stats().bytes_sent;
    let rss_before = rss_bytes();
    let sender = tokio::spawn({
        let a = a.clone();
        async move {
            for i in 0..FRAMES {
                if bulk {
                    a.send_bulk_on(i as usize, frame(i)).await.unwrap();
                } else {
                    a.send_frame(frame(i)).await.unwrap();
                }
            }
        }
    });
    // The receiver reads nothing for a while: the sender must stall.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stalled_at = a.stats().bytes_sent - sent_before;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still_at = a.stats().bytes_sent - sent_before;
    let queued = b.stats().queued_bytes;
    let rss_growth = rss_bytes().saturating_sub(rss_before);

    let lanes = if bulk { u64::from(tuning.bulk_streams) } else { 1 };
    let peer_windows = (lanes * u64::from(tuning.stream_receive_window)).min(u64::from(tuning.receive_window));
    let bound =
        u64::from(tuning.send_window) + peer_windows + u64::from(tuning.recv_queue_bytes) + lanes * 2 * FRAME as u64;
    println!(
        "{name}: sender accepted {stalled_at} bytes of {} offered, then {still_at}; \
         receiver queued {queued}; bound {bound}; rss grew {} KiB",
        u64::from(FRAMES) * FRAME as u64,
        rss_growth / 1024
    );
    assert!(!sender.is_finished(), "send must wait for the slow receiver");
    assert_eq!(stalled_at, still_at, "nothing more accepted while nobody reads");
    assert!(stalled_at <= bound, "{stalled_at} > {bound}");
    assert!(queued <= u64::from(tuning.recv_queue_bytes));
    assert!(rss_growth < 32 * 1024 * 1024, "rss grew {rss_growth}");

    // Now read everything: the sender finishes and every frame arrives intact.
    let mut seen = vec![0u32; lanes as usize];
    for _ in 0..FRAMES {
        let frame = if bulk { b.recv_bulk().await.unwrap() } else { b.recv_frame().await.unwrap() };
        let i = u32::from_be_bytes(frame[..4].try_into().unwrap());
        assert_eq!(frame.len(), FRAME);
        assert!(frame[4..].iter().all(|&x| x == (i % 251) as u8));
        // In order per lane (the control stream is one lane).
        let lane = (i as u64 % lanes) as usize;
        assert_eq!(i / lanes as u32, seen[lane], "lane {lane} out of order");
        seen[lane] += 1;
    }
    tokio::time::timeout(Duration::from_secs(10), sender)
        .await
        .expect("sender finishes once the receiver reads")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_receiver_holds_the_sender() {
    let tuning = Tuning {
        stream_receive_window: 256 * KIB,
        receive_window: 1024 * KIB,
        send_window: 512 * KIB,
        recv_queue_bytes: 1024 * KIB,
        bulk_streams: 4,
        ..tuning()
    };
    let pki = Pki::new();
    let (a, b, _, _) = pair(&pki, tuning.clone()).await;
    check(false, &tuning, a.clone(), b.clone()).await;
    check(true, &tuning, a, b).await;
}
