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
//! driver, the stream, the backup's session task) loses the frame to the client's
//! retransmission timer: docs/failover.md, "How fast a frame reaches the log", measures it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::mpsc;
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
}

/// The forwarding side of the inbound log (see the module doc).
pub struct Inbound {
    /// Harvest sequence of the epoch running now.
    epoch: AtomicU64,
    /// A session whose backup keeps an inbound log is up: forward.
    active: AtomicBool,
    tx: mpsc::Sender<InboundItem>,
    rx: Mutex<Option<mpsc::Receiver<InboundItem>>>,
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
        }
    }
}

impl RxObserver for Inbound {
    fn delivered(&self, seq: u64, frame: &[u8]) {
        if !self.active() {
            return;
        }
        let item = InboundItem { epoch: self.epoch(), seq, frame: frame.to_vec() };
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
}
