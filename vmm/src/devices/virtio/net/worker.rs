//! The virtio-net worker thread: TAP → receive queue, transmit queue → sink.
//!
//! It waits in `epoll` on the TAP, one notify eventfd per queue and a control eventfd (for
//! stopping). Pausing is a gate on a mutex and condvar, not a wake-up: the worker passes the
//! gate before each batch of work and marks itself busy until the batch ends. [`Handle::pause`]
//! closes the gate and waits only while the worker is busy (it then finishes the frame in
//! hand, decides the pending interrupt and leaves); a worker asleep in `epoll` is not woken
//! at all, and one woken during the pause waits at the gate. Work cut short by a pause
//! re-kicks itself so it resumes exactly where it stopped.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{NET_HDR_LEN, NetStats, RX_QUEUE, RxShared, TX_QUEUE, TxSink};
use crate::devices::tap::Tap;
use crate::devices::virtio::{Interrupt, Queues, VirtioError, lock};
use crate::memory::GuestMemory;

const TOKEN_CTRL: u64 = 0;
const TOKEN_RX: u64 = 1;
const TOKEN_TX: u64 = 2;
const TOKEN_TAP: u64 = 3;

/// `VRING_AVAIL_F_NO_INTERRUPT`: the driver asks for no used-buffer interrupts.
const AVAIL_F_NO_INTERRUPT: u16 = virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16;

/// Room for the largest frame a TAP can hand over (64 KiB) plus the header.
const FRAME_BUF_LEN: usize = NET_HDR_LEN + 65536;

#[derive(Debug, Default)]
struct CtrlState {
    pause: bool,
    stop: bool,
    /// The worker is past the gate, working on a batch (it touches the queues and memory).
    busy: bool,
    exited: bool,
}

/// The pause gate and stop flag shared by the device and its worker.
#[derive(Debug)]
struct Control {
    state: Mutex<CtrlState>,
    cond: Condvar,
    evt: EventFd,
    /// Set while a pause or stop is requested: checked between frames without locking.
    pending: AtomicBool,
}

impl Control {
    fn new(paused: bool) -> io::Result<Self> {
        Ok(Self {
            state: Mutex::new(CtrlState { pause: paused, ..CtrlState::default() }),
            cond: Condvar::new(),
            evt: EventFd::new(EFD_NONBLOCK)?,
            pending: AtomicBool::new(paused),
        })
    }

    fn kick(&self) {
        if let Err(e) = self.evt.write(1) {
            tracing::warn!(error = %e, "virtio-net control eventfd write failed");
        }
    }

    fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Worker side, before a batch: waits while a pause is on, then marks the worker busy.
    /// Returns how long it waited, or None if the worker must exit.
    fn enter(&self) -> Option<Option<std::time::Duration>> {
        let mut s = lock(&self.state);
        let waited = (s.pause && !s.stop).then(std::time::Instant::now);
        while s.pause && !s.stop {
            s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if s.stop {
            return None;
        }
        s.busy = true;
        Some(waited.map(|t| t.elapsed()))
    }

    /// Worker side, after a batch: no longer busy (a pause waiting for that may go on).
    fn leave(&self) {
        let mut s = lock(&self.state);
        s.busy = false;
        if s.pause || s.stop {
            self.cond.notify_all();
        }
    }
}

/// Marks the worker as gone however its thread ends, so `pause` never waits for it.
struct ExitGuard(Arc<Control>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let mut s = lock(&self.0.state);
        s.exited = true;
        self.0.cond.notify_all();
    }
}

/// The device's handle on its running worker.
pub(super) struct Handle {
    ctrl: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

impl Handle {
    /// Closes the gate (a busy worker cuts its batch short) and returns once the worker is
    /// outside a batch (it then touches neither the queues nor guest memory until
    /// [`Handle::resume`]) or has exited.
    pub(super) fn pause(&self) {
        let mut s = lock(&self.ctrl.state);
        s.pause = true;
        self.ctrl.pending.store(true, Ordering::Release);
        while s.busy && !s.exited {
            s = self.ctrl.cond.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub(super) fn resume(&self) {
        let mut s = lock(&self.ctrl.state);
        s.pause = false;
        if !s.stop {
            self.ctrl.pending.store(false, Ordering::Release);
        }
        self.ctrl.cond.notify_all();
    }

    /// Stops the worker and joins its thread.
    pub(super) fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        {
            let mut s = lock(&self.ctrl.state);
            s.stop = true;
            self.ctrl.pending.store(true, Ordering::Release);
            self.ctrl.kick();
            self.ctrl.cond.notify_all();
        }
        if thread.join().is_err() {
            tracing::error!("virtio-net worker panicked");
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What a worker is built from.
pub(super) struct WorkerArgs<'a> {
    pub mem: GuestMemory,
    pub queues: Queues,
    pub interrupt: Arc<Interrupt>,
    pub tap: Arc<Tap>,
    pub sink: Arc<Mutex<Box<dyn TxSink>>>,
    pub stats: Arc<NetStats>,
    pub rx: Arc<RxShared>,
    pub notify: [&'a EventFd; 2],
    /// Start parked (the device was paused when activated).
    pub paused: bool,
}

pub(super) struct Worker {
    mem: GuestMemory,
    queues: Queues,
    interrupt: Arc<Interrupt>,
    tap: Arc<Tap>,
    sink: Arc<Mutex<Box<dyn TxSink>>>,
    stats: Arc<NetStats>,
    rx: Arc<RxShared>,
    ctrl: Arc<Control>,
    rx_evt: EventFd,
    tx_evt: EventFd,
    epoll: Epoll,
    /// The TAP is in the epoll set (there are receive buffers, or there may be).
    tap_armed: bool,
    /// The TAP reported end of file (only a socket-pair stand-in does).
    tap_eof: bool,
    /// The driver is asked to notify the receive queue (we ran out of buffers).
    rx_notify_on: bool,
    frame: Vec<u8>,
    /// How long the worker was parked just before this batch (per-frame timing events).
    parked_for: Option<std::time::Duration>,
}

fn resource(what: &'static str) -> impl FnOnce(io::Error) -> VirtioError {
    move |source| VirtioError::Resource { what, source }
}

impl Worker {
    /// Builds the worker and starts its thread.
    pub(super) fn spawn(a: WorkerArgs<'_>) -> Result<Handle, VirtioError> {
        let ctrl = Arc::new(Control::new(a.paused).map_err(resource("control eventfd"))?);
        let rx_evt = a.notify[RX_QUEUE].try_clone().map_err(resource("rx eventfd"))?;
        let tx_evt = a.notify[TX_QUEUE].try_clone().map_err(resource("tx eventfd"))?;
        let epoll = Epoll::new().map_err(resource("epoll"))?;
        for (fd, token) in
            [(ctrl.evt.as_raw_fd(), TOKEN_CTRL), (rx_evt.as_raw_fd(), TOKEN_RX), (tx_evt.as_raw_fd(), TOKEN_TX)]
        {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))
                .map_err(resource("epoll add"))?;
        }
        let mut w = Worker {
            mem: a.mem,
            queues: a.queues,
            interrupt: a.interrupt,
            tap: a.tap,
            sink: a.sink,
            stats: a.stats,
            rx: a.rx,
            ctrl: ctrl.clone(),
            rx_evt,
            tx_evt,
            epoll,
            tap_armed: false,
            tap_eof: false,
            rx_notify_on: true,
            frame: vec![0; FRAME_BUF_LEN],
            parked_for: None,
        };
        w.arm_tap(true).map_err(resource("epoll add tap"))?;
        let name = format!("net-{}", w.tap.name());
        let thread =
            std::thread::Builder::new().name(name).spawn(move || w.run()).map_err(resource("worker thread"))?;
        Ok(Handle { ctrl, thread: Some(thread) })
    }

    fn arm_tap(&mut self, on: bool) -> io::Result<()> {
        watch_tap(&self.epoll, &self.tap, &mut self.tap_armed, self.tap_eof, on)
    }

    fn run(mut self) {
        let _exit = ExitGuard(self.ctrl.clone());
        let mut events = [EpollEvent::default(); 8];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "virtio-net epoll wait failed; worker exits");
                    return;
                }
            };
            NetStats::add(&self.stats.wakeups, 1);
            let (mut rx, mut tx) = (false, false);
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_CTRL => {
                        let _ = self.ctrl.evt.read();
                    }
                    TOKEN_RX => {
                        let _ = self.rx_evt.read();
                        rx = true;
                    }
                    TOKEN_TX => {
                        let _ = self.tx_evt.read();
                        tx = true;
                    }
                    TOKEN_TAP => rx = true,
                    other => tracing::warn!(token = other, "virtio-net unknown epoll token"),
                }
            }
            // A worker started paused waits here before touching anything.
            let Some(waited) = self.ctrl.enter() else {
                return;
            };
            self.parked_for = waited;
            if tx {
                self.process_tx();
            }
            if rx {
                self.process_rx();
            }
            self.ctrl.leave();
        }
    }

    /// Kicks our own notify eventfd so work cut short by a pause continues after it.
    fn rekick(evt: &EventFd) {
        if let Err(e) = evt.write(1) {
            tracing::warn!(error = %e, "virtio-net self-kick failed");
        }
    }

    /// Moves frames from the TAP into receive buffers until one of them runs out.
    fn process_rx(&mut self) {
        if let Err(e) = self.arm_tap(true) {
            tracing::warn!(error = %e, "virtio-net cannot watch the tap");
        }
        let queues = self.queues.clone();
        let mut queues = lock(&queues);
        let Some(q) = queues.get_mut(RX_QUEUE) else {
            return;
        };
        let mem = &self.mem;
        let mut used = false;
        let observer = self.rx.observer();
        loop {
            if self.ctrl.pending() {
                Self::rekick(&self.rx_evt);
                break;
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                // Out of buffers: ask the driver to notify us when it posts more, and leave
                // further frames in the TAP's queue until then.
                match q.enable_notification(mem) {
                    Ok(true) => continue,
                    Ok(false) => {
                        self.rx_notify_on = true;
                        if let Err(e) = watch_tap(&self.epoll, &self.tap, &mut self.tap_armed, false, false) {
                            tracing::warn!(error = %e, "virtio-net cannot pause the tap");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "virtio-net rx queue unreadable"),
                }
                break;
            };
            if self.rx_notify_on {
                // We have buffers and read the TAP anyway: driver kicks are not needed.
                if let Err(e) = q.disable_notification(mem) {
                    tracing::warn!(error = %e, "virtio-net rx queue unreadable");
                }
                self.rx_notify_on = false;
            }
            // Frames to replay go first, in order, ahead of anything from the TAP.
            let replayed = self.rx.pop_replay(&mut self.frame[NET_HDR_LEN..]);
            let len = match replayed.map_or_else(|| self.tap.read_frame(&mut self.frame[NET_HDR_LEN..]), Ok) {
                Ok(0) => {
                    tracing::warn!(tap = %self.tap.name(), "virtio-net tap closed");
                    q.go_to_previous_position();
                    let _ = watch_tap(&self.epoll, &self.tap, &mut self.tap_armed, false, false);
                    self.tap_eof = true;
                    break;
                }
                Ok(n) => n,
                Err(e) => {
                    q.go_to_previous_position();
                    match e.kind() {
                        io::ErrorKind::WouldBlock => break,
                        io::ErrorKind::Interrupted => continue,
                        _ => {
                            // A TAP whose interface went away reports errors for ever:
                            // stop watching it rather than spin.
                            tracing::error!(tap = %self.tap.name(), error = %e, "virtio-net tap read failed; receive stops");
                            let _ = watch_tap(&self.epoll, &self.tap, &mut self.tap_armed, false, false);
                            self.tap_eof = true;
                            break;
                        }
                    }
                }
            };
            // virtio_net_hdr_v1: no offloads; num_buffers is 1 without MRG_RXBUF.
            self.frame[..NET_HDR_LEN].fill(0);
            self.frame[10..12].copy_from_slice(&1u16.to_le_bytes());
            let head = chain.head_index();
            let total = NET_HDR_LEN + len;
            let written = match write_chain(mem, chain, &self.frame[..total]) {
                Ok(()) => {
                    NetStats::add(&self.stats.rx_frames, 1);
                    NetStats::add(&self.stats.rx_bytes, len as u64);
                    if replayed.is_some() {
                        NetStats::add(&self.stats.rx_replayed, 1);
                    }
                    let seq = self.rx.delivered(observer.as_ref(), &self.frame[NET_HDR_LEN..total]);
                    if observer.is_some() {
                        // The receive path's timing (`UNDERSTUDY_LOG=vmm::devices::virtio::net=debug`):
                        // wall-clock ns, comparable with the backup's log of the same frame.
                        tracing::debug!(
                            seq,
                            wall_ns = super::wall_ns(),
                            replayed = replayed.is_some(),
                            flow = %super::FlowTag(&self.frame[NET_HDR_LEN..total]),
                            after_park_us = self.parked_for.map(|d| d.as_micros() as u64),
                            "rx frame delivered"
                        );
                    }
                    total as u32
                }
                Err(e) => {
                    tracing::debug!(error = %e, head, "virtio-net rx frame dropped");
                    NetStats::add(&self.stats.rx_dropped, 1);
                    0
                }
            };
            if let Err(e) = q.add_used(mem, head, written) {
                tracing::warn!(error = %e, "virtio-net rx used ring write failed");
                break;
            }
            used = true;
        }
        self.parked_for = None;
        if used && wants_interrupt(q, mem) {
            self.interrupt.signal_used_queue();
        }
    }

    /// Hands every available transmit chain to the sink.
    fn process_tx(&mut self) {
        let queues = self.queues.clone();
        let mut queues = lock(&queues);
        let Some(q) = queues.get_mut(TX_QUEUE) else {
            return;
        };
        let sink = self.sink.clone();
        let mut sink = lock(&sink);
        let mem = &self.mem;
        let mut used = false;
        'batch: loop {
            if let Err(e) = q.disable_notification(mem) {
                tracing::warn!(error = %e, "virtio-net tx queue unreadable");
                break;
            }
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                if self.ctrl.pending() {
                    q.go_to_previous_position();
                    Self::rekick(&self.tx_evt);
                    break 'batch;
                }
                let head = chain.head_index();
                match read_chain(mem, chain, &mut self.frame) {
                    Ok(n) if n >= NET_HDR_LEN => {
                        let frame = &self.frame[NET_HDR_LEN..n];
                        match sink.send(frame) {
                            Ok(()) => {
                                NetStats::add(&self.stats.tx_frames, 1);
                                NetStats::add(&self.stats.tx_bytes, frame.len() as u64);
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "virtio-net tx sink refused a frame");
                                NetStats::add(&self.stats.tx_dropped, 1);
                            }
                        }
                    }
                    Ok(n) => {
                        tracing::debug!(len = n, "virtio-net tx chain shorter than the header");
                        NetStats::add(&self.stats.tx_dropped, 1);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, head, "virtio-net tx chain dropped");
                        NetStats::add(&self.stats.tx_dropped, 1);
                    }
                }
                if let Err(e) = q.add_used(mem, head, 0) {
                    tracing::warn!(error = %e, "virtio-net tx used ring write failed");
                    break 'batch;
                }
                used = true;
            }
            match q.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-net tx queue unreadable");
                    break;
                }
            }
        }
        sink.flush();
        if used && wants_interrupt(q, mem) {
            self.interrupt.signal_used_queue();
        }
    }
}

/// Whether the driver wants an interrupt for the used entries added since the last call:
/// `used_event` with EVENT_IDX, otherwise the available ring's NO_INTERRUPT flag (which
/// virtio-queue leaves to the device). On a ring read error, interrupt anyway.
fn wants_interrupt(q: &mut Queue, mem: &GuestMemory) -> bool {
    // Also resets the count of entries added, for both modes.
    let needed = match q.needs_notification(mem) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "virtio-net used_event unreadable");
            return true;
        }
    };
    if q.event_idx_enabled() {
        return needed;
    }
    match mem.load::<u16>(GuestAddress(q.avail_ring()), Ordering::Acquire) {
        Ok(flags) => u16::from_le(flags) & AVAIL_F_NO_INTERRUPT == 0,
        Err(e) => {
            tracing::warn!(error = %e, "virtio-net avail flags unreadable");
            true
        }
    }
}

/// Adds the TAP to (`on`) or removes it from the epoll set, tracking it in `armed`.
fn watch_tap(epoll: &Epoll, tap: &Tap, armed: &mut bool, eof: bool, on: bool) -> io::Result<()> {
    if on == *armed || (on && eof) {
        return Ok(());
    }
    let (op, ev) = if on {
        (ControlOperation::Add, EpollEvent::new(EventSet::IN, TOKEN_TAP))
    } else {
        (ControlOperation::Delete, EpollEvent::default())
    };
    epoll.ctl(op, tap.as_raw_fd(), ev)?;
    *armed = on;
    Ok(())
}

/// Why a descriptor chain could not carry a frame.
#[derive(Debug, thiserror::Error)]
enum ChainError {
    #[error("chain holds {capacity} bytes, frame needs {needed}")]
    TooSmall { capacity: usize, needed: usize },
    #[error("chain is longer than {0} bytes")]
    TooLarge(usize),
    #[error("descriptor at {addr:#x}+{len:#x} is outside guest memory")]
    Memory { addr: u64, len: u32 },
}

/// Copies `data` into the chain's device-writable buffers through the vm-memory API, which
/// marks the pages dirty. Nothing is written unless all of `data` fits.
fn write_chain(mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>, data: &[u8]) -> Result<(), ChainError> {
    let capacity: usize = chain.clone().writable().map(|d| d.len() as usize).sum();
    if capacity < data.len() {
        return Err(ChainError::TooSmall { capacity, needed: data.len() });
    }
    let mut rest = data;
    for d in chain.writable() {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(d.len() as usize);
        mem.write_slice(&rest[..n], d.addr()).map_err(|_| ChainError::Memory { addr: d.addr().0, len: d.len() })?;
        rest = &rest[n..];
    }
    Ok(())
}

/// Copies the chain's device-readable buffers into `buf`; returns the length.
fn read_chain(mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>, buf: &mut [u8]) -> Result<usize, ChainError> {
    let mut len = 0usize;
    for d in chain.readable() {
        let n = d.len() as usize;
        let end = len.checked_add(n).filter(|&e| e <= buf.len()).ok_or(ChainError::TooLarge(buf.len()))?;
        mem.read_slice(&mut buf[len..end], d.addr())
            .map_err(|_| ChainError::Memory { addr: d.addr().0, len: d.len() })?;
        len = end;
    }
    Ok(len)
}
