//! The post-copy page path over real QUIC connections: control frames pass a bulk send blocked
//! by a peer that does not read its bulk streams; a migration source pushes pages on the bulk
//! streams while the destination's page requests are answered on the control stream, and the
//! request-to-answer round trip is measured with the pushes flowing.

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Pki, endpoint, tuning};
use replication_proto::{
    MemoryLayout, Receiver, ReceiverConfig, ReceiverEvent, Role, Sender, SenderConfig, SenderEvent, VmIdentity,
};
use transport::proto::{self, receiver_session, sender_session};
use transport::session::{Frame, StreamCommand};
use transport::{Protocol, Session, Tuning};

/// A core that floods the bulk streams and sends a control frame on command.
struct Flood {
    bulk: Bytes,
    bulk_left: usize,
    bulk_taken: Arc<AtomicUsize>,
    control: VecDeque<Bytes>,
}

impl Protocol for Flood {
    type Event = ();
    type Command = Bytes;
    type Error = Infallible;

    fn handle_frame(&mut self, _now: std::time::Instant, _frame: Frame) -> Result<(), Infallible> {
        Ok(())
    }

    fn handle_command(&mut self, _now: std::time::Instant, command: Bytes) -> Result<(), Infallible> {
        self.control.push_back(command);
        Ok(())
    }

    fn handle_timeout(&mut self, _now: std::time::Instant) -> Result<(), Infallible> {
        Ok(())
    }

    fn poll_transmit(&mut self, _now: std::time::Instant) -> Option<Frame> {
        if let Some(c) = self.control.pop_front() {
            return Some(Frame::control(c));
        }
        if self.bulk_left == 0 {
            return None;
        }
        self.bulk_left -= 1;
        self.bulk_taken.fetch_add(1, Ordering::SeqCst);
        Some(Frame::bulk(self.bulk.clone()))
    }

    fn poll_urgent_transmit(&mut self, _now: std::time::Instant) -> Option<Frame> {
        self.control.pop_front().map(Frame::control)
    }

    fn poll_event(&mut self) -> Option<()> {
        None
    }

    fn poll_timeout(&self) -> Option<std::time::Instant> {
        None
    }
}

/// With the default windows, a peer that reads its control stream but none of its bulk
/// streams: the bulk send blocks (flow control), and a control frame still gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_frame_passes_a_blocked_bulk_send() {
    let pki = Pki::new();
    let tuning = tuning();
    let versions = proto::protocol_versions();
    let a_end = endpoint(&pki.identity("primary"), versions.clone(), tuning.clone());
    let b_end = endpoint(&pki.identity("backup"), versions, tuning.clone());
    let (a, b) = tokio::try_join!(a_end.connect(b_end.local_addr().unwrap(), "backup"), b_end.accept()).unwrap();
    let taken = Arc::new(AtomicUsize::new(0));
    let flood = Flood {
        bulk: Bytes::from(vec![0x5a; 1 << 20]),
        bulk_left: 1024,
        bulk_taken: taken.clone(),
        control: VecDeque::new(),
    };
    let session = Session::spawn(a, flood);
    // Wait until the bulk sends stop: the peer's windows are full.
    let mut last = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = taken.load(Ordering::SeqCst);
        if now == last {
            break;
        }
        last = now;
    }
    println!("bulk blocked after {last} frames of 1 MiB");
    assert!(last < 1024, "the bulk send never blocked");
    session.command(Bytes::from_static(b"urgent")).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(2), b.recv_frame())
        .await
        .expect("the control frame arrives while the bulk send is blocked")
        .unwrap();
    assert_eq!(&got[..], b"urgent");
    assert_eq!(taken.load(Ordering::SeqCst), last, "no bulk frame moved meanwhile");
    drop(session);
}

const PS: usize = 4096;
const PAGES: u64 = 16384; // a 64 MiB guest
const REQUESTS: usize = 1000;

fn guest() -> Arc<Vec<u8>> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    Arc::new(
        (0..PAGES as usize * PS)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect(),
    )
}

fn page(mem: &[u8], pfn: u64) -> &[u8] {
    &mem[pfn as usize * PS..(pfn as usize + 1) * PS]
}

async fn next<E>(session: &mut Session<impl Protocol<Event = E>>) -> E {
    tokio::time::timeout(Duration::from_secs(10), session.next_event())
        .await
        .expect("event within 10 s")
        .expect("session still running")
}

/// A migration source and destination over loopback QUIC: the source pushes pages on the bulk
/// streams without pause (more on each `PushRoom`) while a thread of the destination (as its
/// userfaultfd fault thread would) asks for one page at a time through a command handle; every
/// answer arrives intact, pushes arrive as pages with id 0, and the request-to-answer round
/// trip is printed (p50/p99 over 1,000 requests), beside the same without pushes (A/B in one
/// run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demand_pages_are_answered_while_pushes_flow() {
    let quiet = round_trips(false).await;
    let busy = round_trips(true).await;
    println!(
        "demand round trip over loopback QUIC ({REQUESTS} requests): without pushes p50 {:?} p99 {:?}; \
         with pushes flowing p50 {:?} p99 {:?}",
        quiet.0, quiet.1, busy.0, busy.1
    );
    assert!(busy.1 < Duration::from_millis(100), "p99 with pushes {:?}", busy.1);
}

/// Runs `REQUESTS` demand round trips, with or without pushes; returns (p50, p99).
async fn round_trips(pushes: bool) -> (Duration, Duration) {
    let pki = Pki::new();
    let versions = proto::protocol_versions();
    let tuning = Tuning { ..tuning() };
    let src_end = endpoint(&pki.identity("source"), versions.clone(), tuning.clone());
    let dst_end = endpoint(&pki.identity("destination"), versions, tuning);
    let (a, b) =
        tokio::try_join!(src_end.connect(dst_end.local_addr().unwrap(), "destination"), dst_end.accept()).unwrap();
    let vm = VmIdentity { uuid: [3; 16], name: "pc".into() };
    let layout = MemoryLayout::flat(PS as u32, PAGES * PS as u64);
    let sender = Sender::new(SenderConfig::new(Role::MigrationSource, vm.clone(), layout.clone(), 1));
    let receiver = Receiver::new(ReceiverConfig::new(Role::MigrationDestination, vm, layout, 2));
    let mut source = sender_session(a, sender);
    let mut destination = receiver_session(b, receiver);
    while !matches!(next(&mut source).await, SenderEvent::Connected { .. }) {}
    while !matches!(next(&mut destination).await, ReceiverEvent::Connected { .. }) {}
    let mem = guest();

    // The source: answers requests, pushes 64 pages per call (one 256 KiB frame), round and
    // round the guest, keeping about 8 frames queued.
    let source_task = {
        let mem = mem.clone();
        tokio::spawn(async move {
            let mut next_push = 0u64;
            let mut start_push = pushes;
            loop {
                if start_push {
                    let mem = mem.clone();
                    let at = next_push;
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    source
                        .call(move |s, _| {
                            let mut at = at;
                            let push = |s: &mut Sender, at: &mut u64| {
                                while s.pushes_queued() < 8 {
                                    let first = *at;
                                    let pfns = first..(first + 64).min(PAGES);
                                    *at = if pfns.end == PAGES { 0 } else { pfns.end };
                                    s.push_pages(pfns.map(|p| (p, page(&mem, p)))).unwrap();
                                }
                            };
                            push(s, &mut at);
                            let _ = tx.send(at);
                        })
                        .await
                        .ok();
                    next_push = rx.await.unwrap_or(next_push);
                    start_push = false;
                }
                match source.next_event().await {
                    Some(SenderEvent::PagesRequested { id, pfns }) => {
                        let mem = mem.clone();
                        source
                            .call(move |s, _| {
                                s.send_pages(id, pfns.iter().map(|&p| (p, page(&mem, p)))).unwrap();
                            })
                            .await
                            .ok();
                    }
                    Some(SenderEvent::PushRoom { .. }) => start_push = true,
                    Some(SenderEvent::Disconnected { .. }) | None => break,
                    Some(_) => {}
                }
            }
            source
        })
    };

    // The destination's "fault thread": one request at a time through a command handle,
    // waiting for its answer on a std channel the event loop feeds.
    let commands = destination.command_sender();
    let (answer_tx, answer_rx) = std::sync::mpsc::channel::<(u64, Vec<u64>, Vec<u8>)>();
    let fault_thread = std::thread::spawn(move || {
        let mut rtts = Vec::with_capacity(REQUESTS);
        let mut wanted = Vec::with_capacity(REQUESTS);
        for i in 0..REQUESTS {
            let pfn = (i as u64 * 7919) % PAGES;
            let (id_tx, id_rx) = std::sync::mpsc::channel();
            let started = Instant::now();
            commands
                .blocking_send(StreamCommand::with(move |r: &mut Receiver, _| {
                    let _ = id_tx.send(r.request_pages(&[pfn]).unwrap());
                }))
                .unwrap();
            let id = id_rx.recv().unwrap();
            loop {
                let (got, pfns, data) = answer_rx.recv_timeout(Duration::from_secs(10)).expect("an answer");
                if got == id {
                    rtts.push(started.elapsed());
                    wanted.push((pfn, pfns, data));
                    break;
                }
            }
        }
        (rtts, wanted)
    });
    let mut pushed_frames = 0u64;
    let mut pushed_ok = 0u64;
    while !fault_thread.is_finished() {
        let event = tokio::time::timeout(Duration::from_millis(100), destination.next_event()).await;
        match event {
            Ok(Some(ReceiverEvent::Pages { id: 0, pfns, data })) => {
                pushed_frames += 1;
                assert_eq!(data.len(), pfns.len() * PS);
                if pfns.iter().zip(data.chunks(PS)).all(|(&p, d)| d == page(&mem, p)) {
                    pushed_ok += 1;
                }
            }
            Ok(Some(ReceiverEvent::Pages { id, pfns, data })) => {
                let _ = answer_tx.send((id, pfns, data));
            }
            Ok(Some(ReceiverEvent::Disconnected { error })) => panic!("destination disconnected: {error}"),
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => panic!("destination session ended"),
        }
    }
    let (mut rtts, wanted) = fault_thread.join().unwrap();
    for (pfn, pfns, data) in &wanted {
        assert_eq!(pfns, &[*pfn]);
        assert!(data == page(&mem, *pfn), "page {pfn} intact");
    }
    destination.close("done").await.unwrap();
    let source = source_task.await.unwrap();
    let stats = source.finish().await.unwrap().core.endpoint().stats();
    let _ = destination.finish().await;
    rtts.sort();
    let pct = |p: f64| rtts[((rtts.len() as f64 * p) as usize).min(rtts.len() - 1)];
    println!(
        "pushes {pushes}: round trip p50 {:?}, p99 {:?}, max {:?} ({} requests); \
         {pushed_frames} push frames received ({} pages pushed, {} MiB)",
        pct(0.50),
        pct(0.99),
        rtts[rtts.len() - 1],
        rtts.len(),
        stats.pages_pushed,
        stats.bytes_pushed >> 20
    );
    if pushes {
        assert!(pushed_frames > 100, "pushes flowed: {pushed_frames} frames");
        assert!(stats.pages_pushed >= pushed_frames * 64);
    } else {
        assert_eq!(pushed_frames, 0);
    }
    assert_eq!(pushed_ok, pushed_frames, "every pushed page intact");
    assert_eq!(stats.pages_served, REQUESTS as u64);
    (pct(0.50), pct(0.99))
}
