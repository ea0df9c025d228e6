//! Input forwarding: each frame the guest receives goes to the backup's inbound log as it is
//! delivered, so a promoted replica can re-deliver the frames its checkpoint does not hold
//! (docs/failover.md, "Input replay").
//!
//! [`Inbound`] is the virtio-net device's [`RxObserver`]: the device's worker calls it with
//! every frame it wrote into a receive buffer, and it pushes a copy, tagged with the running
//! epoch and the device's delivery count, onto a bounded queue without ever waiting (a full
//! queue drops the frame and counts it). The epoch is the harvest sequence set by
//! [`Inbound::begin`], which the output buffer calls while the VM (and so the worker) is paused:
//! a frame tagged `e` was delivered after checkpoint `e - 1` was taken and before checkpoint `e`
//! was, so checkpoint `e` (and every later one) holds it and no earlier one does. The link task
//! drains the queue into the replication session (only while the backup announced an inbound
//! log) and, on each acknowledgement, tells the backup which epoch its replica now holds.
//!
//! A kill that lands while a frame is on that path (the link's forwarding task, the session's
//! driver, the stream, the backup's session task) would lose the frame to the client's
//! retransmission timer (docs/failover.md, "How fast a frame reaches the log"). So, when the
//! backup announced a side-copy port, the worker also seals the frame and hands it to the kernel
//! itself, in [`RxObserver::delivered`], before the device publishes the frame to the guest
//! ([`transport::side_copy`]): a frame the guest can see is already out of the process. The
//! datagram may be lost (it is never waited for: a full socket buffer drops it and counts it);
//! the session's copy stays the reliable path.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::mpsc;
use transport::side_copy::SideSender;
use vmm::devices::virtio::net::RxObserver;

/// Default bound of the forwarding queue, in frames (a burst the link has not yet taken).
pub const DEFAULT_QUEUE_FRAMES: usize = 1024;

/// One delivered frame on its way to the backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundItem {
    /// Harvest sequence of the epoch that delivered it.
    pub epoch: u64,
    /// The device's delivery count, this frame included.
    pub seq: u64,
    /// The Ethernet frame.
    pub frame: Vec<u8>,
}

/// Counters of input forwarding (`understudy status`, `/metrics`).
#[derive(Debug, Default)]
pub struct InboundStats {
    /// Frames put on the queue.
    pub queued: AtomicU64,
    /// Frames dropped because the queue was full (never forwarded).
    pub queue_dropped: AtomicU64,
    /// Frames handed to the replication session.
    pub forwarded: AtomicU64,
    /// Frames the session refused (backlog, link down): never forwarded.
    pub refused: AtomicU64,
    /// Side copies handed to the kernel.
    pub side_copy_sent: AtomicU64,
    /// Side copies not sent (socket buffer full, no route, refused port, frame too large).
    pub side_copy_dropped: AtomicU64,
    /// Nanoseconds the worker spent sealing and sending side copies, in all.
    pub side_copy_ns: AtomicU64,
}

/// A snapshot of [`InboundStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct InboundReport {
    /// Whether frames are forwarded now (a session with a backup that keeps an inbound log).
    pub active: bool,
    /// Frames handed to the replication session.
    pub forwarded_frames: u64,
    /// Frames dropped because the forwarding queue was full.
    pub queue_dropped_frames: u64,
    /// Frames the session refused (its backlog was full, or it went down).
    pub refused_frames: u64,
    /// Where side copies go now (`None`: no side channel).
    pub side_copy_to: Option<std::net::SocketAddr>,
    /// Side copies handed to the kernel.
    pub side_copy_sent_frames: u64,
    /// Side copies not sent (socket buffer full, no route, refused, too large).
    pub side_copy_dropped_frames: u64,
    /// Mean time the virtio-net worker spent on one side copy (seal and send), ns.
    pub side_copy_ns_mean: u64,
}

/// The forwarding side of the inbound log (see the module doc).
pub struct Inbound {
    /// Harvest sequence of the epoch running now.
    epoch: AtomicU64,
    /// A session whose backup keeps an inbound log is up: forward.
    active: AtomicBool,
    tx: mpsc::Sender<InboundItem>,
    rx: Mutex<Option<mpsc::Receiver<InboundItem>>>,
    /// The side channel of the current session, if its backup announced a side-copy port.
    side: RwLock<Option<SideSender>>,
    stats: InboundStats,
}

impl Inbound {
    /// A forwarder whose queue holds at most `queue_frames` frames.
    pub fn new(queue_frames: usize) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(queue_frames.max(1));
        Arc::new(Self {
            epoch: AtomicU64::new(0),
            active: AtomicBool::new(false),
            tx,
            rx: Mutex::new(Some(rx)),
            side: RwLock::new(None),
            stats: InboundStats::default(),
        })
    }

    /// Frames delivered from now on belong to harvest `epoch`. Called with the VM paused.
    pub fn begin(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Release);
    }

    /// The epoch frames are tagged with now.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The queue's receiving end, once (the link task takes it).
    pub fn take_receiver(&self) -> Option<mpsc::Receiver<InboundItem>> {
        self.rx.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Starts or stops forwarding (the link, as sessions with a logging backup come and go).
    pub fn set_active(&self, on: bool) {
        if self.active.swap(on, Ordering::AcqRel) != on {
            tracing::debug!(active = on, "inbound forwarding");
        }
    }

    /// Installs the side channel of a new session (its own key and counter), or removes it
    /// (`None`: the session went down, or its backup announced no side-copy port).
    pub fn set_side_channel(&self, side: Option<SideSender>) {
        let mut g = self.side.write().unwrap_or_else(|e| e.into_inner());
        match (&*g, &side) {
            (_, Some(s)) => tracing::info!(to = %s.peer(), "inbound side copies: channel up"),
            (Some(old), None) => tracing::info!(to = %old.peer(), "inbound side copies: channel down"),
            (None, None) => {}
        }
        *g = side;
    }

    /// Where side copies go now.
    pub fn side_copy_to(&self) -> Option<std::net::SocketAddr> {
        self.side.read().unwrap_or_else(|e| e.into_inner()).as_ref().map(SideSender::peer)
    }

    /// Whether frames are forwarded now.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// The counters.
    pub fn stats(&self) -> &InboundStats {
        &self.stats
    }

    /// A snapshot of the counters.
    pub fn report(&self) -> InboundReport {
        let s = &self.stats;
        InboundReport {
            active: self.active(),
            forwarded_frames: s.forwarded.load(Ordering::Relaxed),
            queue_dropped_frames: s.queue_dropped.load(Ordering::Relaxed),
            refused_frames: s.refused.load(Ordering::Relaxed),
            side_copy_to: self.side_copy_to(),
            side_copy_sent_frames: s.side_copy_sent.load(Ordering::Relaxed),
            side_copy_dropped_frames: s.side_copy_dropped.load(Ordering::Relaxed),
            side_copy_ns_mean: {
                let n = s.side_copy_sent.load(Ordering::Relaxed) + s.side_copy_dropped.load(Ordering::Relaxed);
                s.side_copy_ns.load(Ordering::Relaxed).checked_div(n).unwrap_or(0)
            },
        }
    }

    /// Sends the side copy of a frame just delivered, if a side channel is up. On the worker,
    /// before the guest is told of the frame; never waits.
    fn side_copy(&self, epoch: u64, seq: u64, frame: &[u8]) {
        let g = self.side.read().unwrap_or_else(|e| e.into_inner());
        let Some(side) = g.as_ref() else { return };
        let t0 = Instant::now();
        let r = side.send(epoch, seq, frame);
        let ns = t0.elapsed().as_nanos() as u64;
        drop(g);
        self.stats.side_copy_ns.fetch_add(ns, Ordering::Relaxed);
        match r {
            Ok(()) => {
                self.stats.side_copy_sent.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    seq,
                    epoch,
                    cost_ns = ns,
                    wall_ns = vmm::devices::virtio::net::wall_ns(),
                    "inbound side copy sent"
                );
            }
            Err(e) => {
                self.stats.side_copy_dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(seq, epoch, "inbound side copy dropped: {e}");
            }
        }
    }
}

impl RxObserver for Inbound {
    fn delivered(&self, seq: u64, frame: &[u8]) {
        if !self.active() {
            return;
        }
        let epoch = self.epoch();
        self.side_copy(epoch, seq, frame);
        let item = InboundItem { epoch, seq, frame: frame.to_vec() };
        match self.tx.try_send(item) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(_) | mpsc::error::TrySendError::Closed(_)) => {
                self.stats.queue_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_tagged_with_the_epoch_running_when_delivered() {
        let i = Inbound::new(8);
        let mut rx = i.take_receiver().unwrap();
        assert!(i.take_receiver().is_none());
        // Not forwarding (no backup with a log): nothing is queued, nothing counted as dropped.
        i.delivered(1, b"before");
        assert!(rx.try_recv().is_err());
        i.set_active(true);
        i.begin(7);
        i.delivered(2, b"a");
        i.delivered(3, b"b");
        // The pause of checkpoint 7: later frames belong to 8.
        i.begin(8);
        i.delivered(4, b"c");
        let got: Vec<(u64, u64, Vec<u8>)> =
            std::iter::from_fn(|| rx.try_recv().ok()).map(|x| (x.epoch, x.seq, x.frame)).collect();
        assert_eq!(got, vec![(7, 2, b"a".to_vec()), (7, 3, b"b".to_vec()), (8, 4, b"c".to_vec())]);
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_blocking() {
        let i = Inbound::new(2);
        let _rx = i.take_receiver().unwrap();
        i.set_active(true);
        let t0 = std::time::Instant::now();
        for seq in 1..=10 {
            i.delivered(seq, &[0u8; 64]);
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(1));
        let r = i.report();
        assert_eq!(i.stats().queued.load(Ordering::Relaxed), 2);
        assert_eq!(r.queue_dropped_frames, 8);
    }

    /// The side copy leaves the worker sealed (it opens under the connection's key with the
    /// frame's tags), only while a side channel is installed; a new channel is a new key; a
    /// copy the kernel refuses is counted as dropped, never waited for.
    #[test]
    fn delivered_frames_go_out_as_sealed_side_copies_while_a_channel_is_up() {
        use transport::side_copy::{Opener, SideKey};
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let i = Inbound::new(8);
        let _q = i.take_receiver().unwrap();
        i.set_active(true);
        i.begin(3);
        i.delivered(1, b"no channel yet");
        let key = SideKey::from_secret(4, [8; 32]);
        i.set_side_channel(Some(SideSender::connect(rx.local_addr().unwrap(), &key).unwrap()));
        assert_eq!(i.report().side_copy_to, Some(rx.local_addr().unwrap()));
        i.delivered(2, b"request");
        let mut buf = [0u8; 2048];
        let n = rx.recv(&mut buf).unwrap();
        let (h, frame) = Opener::new(&key).open(&mut buf[..n]).unwrap();
        assert_eq!((h.epoch, h.seq, frame), (3, 2, &b"request"[..]));
        assert!(rx.recv(&mut buf).is_err(), "one copy per frame, none before the channel");
        // The session went down: no more copies.
        i.set_side_channel(None);
        i.delivered(3, b"after");
        assert!(rx.recv(&mut buf).is_err());
        let r = i.report();
        assert_eq!((r.side_copy_to, r.side_copy_sent_frames, r.side_copy_dropped_frames), (None, 1, 0));
        assert!(r.side_copy_ns_mean > 0);
        // A port nobody listens on: the kernel refuses later sends; counted, not waited for.
        let gone = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        i.set_side_channel(Some(SideSender::connect(gone, &key).unwrap()));
        for seq in 4..8 {
            i.delivered(seq, b"x");
        }
        assert!(i.report().side_copy_dropped_frames >= 1, "{:?}", i.report());
    }
}
