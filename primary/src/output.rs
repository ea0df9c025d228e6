//! Output commit: the guest's transmitted frames are held per epoch and released to the TAP
//! only once the backup acknowledged the epoch that produced them.
//!
//! The virtio-net worker pushes frames through [`HoldingSink`]; each frame is tagged with the
//! harvest sequence number of the epoch running when it was sent (set by [`OutputBuffer::begin`]
//! while the VM is paused, so the boundary is exact). [`OutputBuffer::release`] writes every
//! frame of epochs up to the acknowledged one, in order. When held bytes would exceed the cap
//! a new frame is dropped, as a congested link would (TCP resends), and counted.
//!
//! Right after the pause that ends an epoch, [`OutputBuffer::take_for_backup`] copies the frames
//! that epoch produced (still held: they wait for its ack) for the backup's output log, so a
//! replica promoted after the backup committed the epoch but before the primary released it
//! sends them itself (docs/failover.md, "Output at promotion").

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use vmm::devices::tap::Tap;
use vmm::devices::virtio::net::{TapSink, TxSink};
use vmm::vm::{Vm, VmError};

/// Default cap on held bytes.
pub const DEFAULT_HOLD_CAP: usize = 64 << 20;

struct Held {
    epoch: u64,
    at: Instant,
    /// Shared, so the copy for the backup's output log takes a reference, not the bytes.
    frame: Frame,
}

/// A held frame's bytes (shared with the backup's copy, [`OutputBuffer::take_for_backup`]).
pub type Frame = Arc<[u8]>;

struct Inner {
    /// Harvest sequence of the epoch now running: frames sent now belong to it.
    current: u64,
    held: VecDeque<Held>,
    held_bytes: usize,
    released_upto: u64,
    passthrough: bool,
    journal: VecDeque<ReleaseRecord>,
    /// When the first frame held since the last epoch boundary arrived (output waiting for an
    /// epoch to end): the epoch engine ends the epoch soon after it.
    first_held: Option<Instant>,
    /// Frames held since the last epoch boundary, and in the epoch before it.
    epoch_frames: u32,
    last_epoch_frames: u32,
    /// The highest harvest whose frames [`OutputBuffer::take_for_backup`] went through.
    forwarded_upto: u64,
}

/// Most frames of one epoch copied for the backup's output log; the rest of the epoch is not
/// forwarded (counted): a promoted replica leaves them to the guest's retransmission.
pub const MAX_FORWARD_FRAMES: usize = 1024;
/// Most bytes of one epoch copied for the backup's output log.
pub const MAX_FORWARD_BYTES: usize = 1 << 20;

/// A record of one released frame, for tests that prove output commit: which epoch produced
/// it, when that epoch's acknowledgement arrived and when the frame went to the TAP (both
/// CLOCK_MONOTONIC nanoseconds, comparable with a capture on the same host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ReleaseRecord {
    /// crc32 of the frame.
    pub crc: u32,
    /// Length of the frame.
    pub len: usize,
    /// Epoch (harvest sequence) that produced the frame.
    pub epoch: u64,
    /// When the ack that released it was handled.
    pub acked_ns: u64,
    /// When the frame was written to the TAP.
    pub released_ns: u64,
}

/// Most release records kept.
const JOURNAL_CAP: usize = 1 << 16;

/// CLOCK_MONOTONIC in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we pass; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Counters of the output buffer.
#[derive(Debug, Default)]
pub struct OutputStats {
    /// Frames released to the TAP.
    pub released_frames: AtomicU64,
    /// Bytes released.
    pub released_bytes: AtomicU64,
    /// Frames dropped because the buffer was full.
    pub dropped_frames: AtomicU64,
    /// Frames written straight through while degraded or unprotected.
    pub passthrough_frames: AtomicU64,
    /// Sum of hold times of released frames, in microseconds.
    pub hold_us_total: AtomicU64,
    /// Frames copied for the backup's output log ([`OutputBuffer::take_for_backup`]).
    pub forward_taken_frames: AtomicU64,
    /// Frames handed to the replication session for the backup's output log.
    pub forwarded_frames: AtomicU64,
    /// Held frames not forwarded: over [`MAX_FORWARD_FRAMES`] or [`MAX_FORWARD_BYTES`] in their
    /// epoch, or refused by the session (no session, a backlog).
    pub unforwarded_frames: AtomicU64,
}

/// Decides, at an instant, whether output may leave at all (the arbitration lease).
pub type Gate = Arc<dyn Fn(Instant) -> bool + Send + Sync>;

/// Frames held until their epoch is acknowledged.
pub struct OutputBuffer {
    inner: Mutex<Inner>,
    /// Signalled when output starts waiting (`Inner::first_held` becomes set).
    waiting: std::sync::Condvar,
    tap: Arc<Tap>,
    cap: usize,
    stats: OutputStats,
    gate: Mutex<Option<Gate>>,
    /// Input forwarding, told of each epoch boundary with the output's.
    inbound: Mutex<Option<Arc<crate::inbound::Inbound>>>,
}

impl OutputBuffer {
    /// A buffer releasing to `tap`, holding at most `cap` bytes. Starts holding (not
    /// passthrough) with epoch 0 running.
    pub fn new(tap: Arc<Tap>, cap: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                current: 0,
                held: VecDeque::new(),
                held_bytes: 0,
                released_upto: 0,
                passthrough: false,
                journal: VecDeque::new(),
                first_held: None,
                epoch_frames: 0,
                last_epoch_frames: 0,
                forwarded_upto: 0,
            }),
            waiting: std::sync::Condvar::new(),
            tap,
            cap,
            stats: OutputStats::default(),
            gate: Mutex::new(None),
            inbound: Mutex::new(None),
        })
    }

    /// Installs the arbitration gate: while it says no, nothing is written (frames stay held,
    /// also in passthrough mode) — a primary that lost its lease stops releasing output.
    pub fn set_gate(&self, gate: Gate) {
        *self.gate.lock().unwrap_or_else(|e| e.into_inner()) = Some(gate);
    }

    fn gate_open(&self) -> bool {
        match &*self.gate.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(g) => g(Instant::now()),
            None => true,
        }
    }

    /// Releases what may go now: everything acknowledged (or, in passthrough, everything held)
    /// if the gate is open. Call when the gate may have opened.
    pub fn flush_allowed(&self) -> usize {
        let (upto, passthrough) = {
            let g = self.lock();
            (g.released_upto, g.passthrough)
        };
        if passthrough { self.release(u64::MAX) } else { self.release(upto) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The sink to install in the virtio-net device.
    pub fn sink(self: &Arc<Self>) -> Box<dyn TxSink> {
        Box::new(HoldingSink(Arc::clone(self)))
    }

    /// Frames sent from now on belong to harvest `epoch`. Call while the VM is paused.
    /// Frames *received* from now on belong to it too (input forwarding, if installed).
    pub fn begin(&self, epoch: u64) {
        let mut g = self.lock();
        g.current = epoch;
        g.first_held = None;
        g.last_epoch_frames = std::mem::take(&mut g.epoch_frames);
        if let Some(i) = &*self.inbound.lock().unwrap_or_else(|e| e.into_inner()) {
            i.begin(epoch);
        }
    }

    /// Input forwarding moving its epoch with this buffer's, if installed.
    pub fn inbound(&self) -> Option<Arc<crate::inbound::Inbound>> {
        self.inbound.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Moves input forwarding's epoch with this buffer's ([`OutputBuffer::begin`]).
    pub fn set_inbound(&self, inbound: Option<Arc<crate::inbound::Inbound>>) {
        if let Some(i) = &inbound {
            i.begin(self.lock().current);
        }
        *self.inbound.lock().unwrap_or_else(|e| e.into_inner()) = inbound;
    }

    /// Waits until output produced since the last epoch boundary is held, or `until`; returns
    /// when the first such frame arrived (output-driven epochs: the engine ends the epoch a
    /// short coalescing window after it).
    pub fn wait_for_output(&self, until: Instant) -> Option<Instant> {
        let mut g = self.lock();
        loop {
            if g.first_held.is_some() {
                return g.first_held;
            }
            let now = Instant::now();
            if now >= until {
                return None;
            }
            g = self.waiting.wait_timeout(g, until - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// How many frames the guest sent in the epoch before the current one (the output-driven
    /// coalescing window follows it, see `EpochTiming::end`).
    pub fn frames_last_epoch(&self) -> u32 {
        self.lock().last_epoch_frames
    }

    /// How many frames the guest sent in the current epoch so far.
    pub fn frames_this_epoch(&self) -> u32 {
        self.lock().epoch_frames
    }

    /// The frames held with a harvest tag up to `upto` (the harvest whose pause just ended) that
    /// an earlier call did not go through, in the order the guest sent them, copied when `copy`
    /// (a backup that keeps an output log: [`MAX_FORWARD_FRAMES`] and [`MAX_FORWARD_BYTES`] at
    /// most, the rest counted as not forwarded), so the next call starts after them either way.
    /// Call after the pause that moved the boundary past `upto` ([`OutputBuffer::begin`]), so no
    /// frame is added to those epochs any more; the pause does not wait for the copy.
    pub fn take_for_backup(&self, upto: u64, copy: bool) -> Vec<Frame> {
        let mut g = self.lock();
        let from = g.forwarded_upto;
        g.forwarded_upto = g.forwarded_upto.max(upto);
        if !copy {
            return Vec::new();
        }
        // Held frames are in tag order: those of the epochs not gone through are a suffix.
        let first = g.held.partition_point(|h| h.epoch <= from);
        let mut out = Vec::new();
        let (mut bytes, mut skipped) = (0usize, 0u64);
        for h in g.held.range(first..).filter(|h| h.epoch <= upto) {
            if out.len() < MAX_FORWARD_FRAMES && bytes + h.frame.len() <= MAX_FORWARD_BYTES {
                bytes += h.frame.len();
                out.push(Arc::clone(&h.frame));
            } else {
                skipped += 1;
            }
        }
        drop(g);
        self.stats.forward_taken_frames.fetch_add(out.len() as u64, Ordering::Relaxed);
        if skipped > 0 {
            self.stats.unforwarded_frames.fetch_add(skipped, Ordering::Relaxed);
            tracing::debug!(upto, skipped, "output: frames over the forwarding bound not copied for the backup");
        }
        out
    }

    /// Releases every frame of epochs up to and including `epoch`; returns how many.
    pub fn release(&self, epoch: u64) -> usize {
        let mut out = Vec::new();
        let open = self.gate_open();
        {
            let mut g = self.lock();
            if epoch > g.released_upto && epoch != u64::MAX {
                g.released_upto = epoch;
            }
            if !open {
                return 0;
            }
            while g.held.front().is_some_and(|h| h.epoch <= epoch) {
                let h = g.held.pop_front().expect("front exists");
                g.held_bytes -= h.frame.len();
                out.push(h);
            }
        }
        let now = Instant::now();
        let acked_ns = monotonic_ns();
        let mut records = Vec::with_capacity(out.len());
        for h in &out {
            // Stamped before the write, so a capture of the frame is never earlier.
            let released_ns = monotonic_ns();
            self.write(&h.frame);
            self.stats.hold_us_total.fetch_add(now.duration_since(h.at).as_micros() as u64, Ordering::Relaxed);
            records.push(ReleaseRecord {
                crc: crc32fast::hash(&h.frame),
                len: h.frame.len(),
                epoch: h.epoch,
                acked_ns,
                released_ns,
            });
        }
        if !records.is_empty() {
            let mut g = self.lock();
            for r in records {
                if g.journal.len() == JOURNAL_CAP {
                    g.journal.pop_front();
                }
                g.journal.push_back(r);
            }
        }
        self.stats.released_frames.fetch_add(out.len() as u64, Ordering::Relaxed);
        out.len()
    }

    /// Stops holding: releases everything held and passes frames straight through from now on
    /// (unprotected or degraded operation), or starts holding again.
    pub fn set_passthrough(&self, on: bool) {
        let open = self.gate_open();
        let held: Vec<Held> = {
            let mut g = self.lock();
            g.passthrough = on;
            if !on || !open {
                return;
            }
            g.held_bytes = 0;
            g.held.drain(..).collect()
        };
        for h in &held {
            self.write(&h.frame);
        }
        self.stats.passthrough_frames.fetch_add(held.len() as u64, Ordering::Relaxed);
    }

    /// Frames and bytes held now.
    pub fn held(&self) -> (usize, usize) {
        let g = self.lock();
        (g.held.len(), g.held_bytes)
    }

    /// The most recent release records.
    pub fn journal(&self) -> Vec<ReleaseRecord> {
        self.lock().journal.iter().copied().collect()
    }

    /// Counters.
    pub fn stats(&self) -> &OutputStats {
        &self.stats
    }

    fn write(&self, frame: &[u8]) {
        match self.tap.write_frame(frame) {
            Ok(_) => {
                self.stats.released_bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!("tap write failed: {e}"),
        }
    }

    fn push(&self, frame: &[u8]) -> io::Result<()> {
        let open = self.gate_open();
        let mut g = self.lock();
        if g.passthrough && open && g.held.is_empty() {
            drop(g);
            self.write(frame);
            self.stats.passthrough_frames.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if g.held_bytes + frame.len() > self.cap {
            self.stats.dropped_frames.fetch_add(1, Ordering::Relaxed);
            return Err(io::Error::other("output buffer full"));
        }
        let epoch = g.current;
        let now = Instant::now();
        g.held_bytes += frame.len();
        g.held.push_back(Held { epoch, at: now, frame: Frame::from(frame) });
        g.epoch_frames = g.epoch_frames.saturating_add(1);
        // The output path's timing (`UNDERSTUDY_LOG=primary::output=debug`): wall-clock ns,
        // comparable with the net device's `rx frame delivered` and the link's release.
        tracing::debug!(
            epoch,
            len = frame.len(),
            flow = %vmm::devices::virtio::net::FlowTag(frame),
            wall_ns = vmm::devices::virtio::net::wall_ns(),
            "output held"
        );
        if g.first_held.is_none() {
            g.first_held = Some(now);
            self.waiting.notify_all();
        }
        Ok(())
    }
}

/// The [`TxSink`] that feeds an [`OutputBuffer`].
pub struct HoldingSink(Arc<OutputBuffer>);

impl TxSink for HoldingSink {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.0.push(frame)
    }
}

fn lock_vm(vm: &Mutex<Vm>) -> MutexGuard<'_, Vm> {
    vm.lock().unwrap_or_else(|e| e.into_inner())
}

/// Output commit on a VM: swaps its net device's transmit sink for a holding [`OutputBuffer`]
/// while the VM is paused, then resumes it. The buffer starts in passthrough (output flows
/// until the first consistent checkpoint); with a `gate`, nothing leaves while the gate says no.
/// `None` when the VM has no net device. The one place that installs the buffer: protection
/// and arbitration both come here.
pub fn install(vm: &Mutex<Vm>, gate: Option<Gate>) -> Result<Option<Arc<OutputBuffer>>, VmError> {
    let mut g = lock_vm(vm);
    if g.net().is_none() {
        return Ok(None);
    }
    g.pause()?;
    let out = swap_in(&g, gate, None);
    g.resume();
    Ok(out)
}

/// Output commit on a paused VM that has not run yet (a post-copy destination before its
/// first resume, checkpointing back to its source): holding from the first frame on, which
/// belongs to harvest `first_epoch`. The VM stays paused. `None` without a net device.
pub fn install_held(vm: &Vm, first_epoch: u64) -> Result<Option<Arc<OutputBuffer>>, VmError> {
    if !vm.is_paused() {
        return Err(VmError::NotPaused("installing held output"));
    }
    Ok(swap_in(vm, None, Some(first_epoch)))
}

/// Puts a new holding buffer in `vm`'s net device (paused): passing frames through, or holding
/// them from harvest `held_from` on.
fn swap_in(vm: &Vm, gate: Option<Gate>, held_from: Option<u64>) -> Option<Arc<OutputBuffer>> {
    let net = vm.net()?;
    let dev = net.lock().unwrap_or_else(|e| e.into_inner());
    let out = OutputBuffer::new(Arc::clone(dev.device().tap()), DEFAULT_HOLD_CAP);
    if let Some(gate) = gate {
        out.set_gate(gate);
    }
    match held_from {
        Some(epoch) => out.begin(epoch),
        None => out.set_passthrough(true),
    }
    let _old = dev.device().set_tx_sink(out.sink());
    drop(dev);
    tracing::info!(
        gated = out.gate.lock().unwrap_or_else(|e| e.into_inner()).is_some(),
        held_from,
        "output: holding buffer installed"
    );
    Some(out)
}

/// Undoes [`install`]: the net device writes straight to its TAP again (frames still held in
/// the old buffer are dropped with it), while the VM is paused, then resumes it.
pub fn restore_plain_sink(vm: &Mutex<Vm>) -> Result<(), VmError> {
    let mut g = lock_vm(vm);
    let Some(net) = g.net().cloned() else { return Ok(()) };
    g.pause()?;
    let dev = net.lock().unwrap_or_else(|e| e.into_inner());
    let sink: Box<dyn TxSink> = Box::new(TapSink::new(Arc::clone(dev.device().tap())));
    let _held = dev.device().set_tx_sink(sink);
    drop(dev);
    g.resume();
    tracing::info!("output: plain sink restored");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};

    /// A buffer whose "TAP" is one end of a socket pair (the other end is returned to keep it
    /// open), holding from harvest 1 on.
    fn buffer() -> (Arc<OutputBuffer>, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two new descriptors into `fds`, which we then own.
        let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) };
        assert_eq!(r, 0, "socketpair: {}", io::Error::last_os_error());
        // SAFETY: both descriptors were just created and are owned by nothing else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let out = OutputBuffer::new(Arc::new(Tap::from_fd(a, "pair").unwrap()), DEFAULT_HOLD_CAP);
        out.begin(1);
        (out, b)
    }

    /// [`OutputBuffer::take_for_backup`]'s frames as bytes.
    fn taken(out: &OutputBuffer, upto: u64, copy: bool) -> Vec<Vec<u8>> {
        out.take_for_backup(upto, copy).iter().map(|f| f.to_vec()).collect()
    }

    #[test]
    fn each_epochs_frames_are_taken_for_the_backup_once_in_order() {
        let (out, _peer) = buffer();
        let mut sink = out.sink();
        sink.send(b"a1").unwrap();
        sink.send(b"a2").unwrap();
        // The pause that ends harvest 1 moves the boundary; then its frames are taken.
        out.begin(2);
        sink.send(b"b1").unwrap();
        assert_eq!(taken(&out, 1, true), vec![b"a1".to_vec(), b"a2".to_vec()]);
        assert!(taken(&out, 1, true).is_empty(), "taken once");
        // Harvest 2 while the backup keeps no log: gone through without a copy, so a backup
        // that announces a log later never gets them under a later epoch's name.
        out.begin(3);
        sink.send(b"c1").unwrap();
        assert!(taken(&out, 2, false).is_empty());
        out.begin(4);
        assert_eq!(taken(&out, 3, true), vec![b"c1".to_vec()]);
        // Still held (nothing acknowledged): the copy leaves the frames where they are.
        assert_eq!(out.held().0, 4);
        // Frames held across a re-sync carry an older tag: the next checkpoint takes them too.
        sink.send(b"d1").unwrap();
        out.begin(7);
        sink.send(b"g1").unwrap();
        out.begin(8);
        assert_eq!(taken(&out, 7, true), vec![b"d1".to_vec(), b"g1".to_vec()]);
        assert_eq!(out.stats().forward_taken_frames.load(Ordering::Relaxed), 5);
        assert_eq!(out.stats().unforwarded_frames.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn an_epoch_past_the_forwarding_bound_is_taken_in_part_and_the_rest_counted() {
        let (out, _peer) = buffer();
        let mut sink = out.sink();
        for i in 0..MAX_FORWARD_FRAMES + 5 {
            sink.send(&(i as u32).to_le_bytes()).unwrap();
        }
        out.begin(2);
        let first = taken(&out, 1, true);
        assert_eq!(first.len(), MAX_FORWARD_FRAMES);
        assert_eq!(first[0], 0u32.to_le_bytes());
        assert_eq!(out.stats().unforwarded_frames.load(Ordering::Relaxed), 5);
        // By bytes: a frame that would pass the byte bound is left out, later small ones fit.
        let big = vec![1u8; MAX_FORWARD_BYTES - 10];
        sink.send(&big).unwrap();
        sink.send(&[2u8; 20]).unwrap();
        sink.send(&[3u8; 5]).unwrap();
        out.begin(3);
        assert_eq!(taken(&out, 2, true), vec![big, vec![3u8; 5]]);
        assert_eq!(out.stats().unforwarded_frames.load(Ordering::Relaxed), 6);
    }
}
