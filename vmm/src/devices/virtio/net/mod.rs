//! virtio-net over a TAP interface.
//!
//! Two queues (receive 0, transmit 1), a 12-byte `virtio_net_hdr_v1` on every buffer, no
//! offloads and no mergeable receive buffers: the guest posts receive buffers of at least
//! 1526 bytes. Features offered: VERSION_1, MAC, STATUS (link always up), INDIRECT_DESC and,
//! unless disabled, EVENT_IDX.
//!
//! A worker thread per activated device moves frames from the TAP into the receive queue
//! and from the transmit queue into a [`TxSink`]. The sink is the device's only way out:
//! [`TapSink`] writes frames to the TAP at once, and the replication engine swaps in a sink
//! that holds each epoch's output until the backup acknowledged it
//! ([`Net::set_tx_sink`]). When the guest has no receive buffers the worker stops reading
//! the TAP (frames wait in the kernel's queue) until the guest posts some.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{Activation, VirtioDevice, VirtioError, features, lock};
use crate::devices::tap::Tap;
use crate::memory::GuestMemory;

mod persist;
mod worker;

pub use persist::{NetRestoreArgs, NetState};

/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Length of `virtio_net_hdr_v1` (VERSION_1 makes `num_buffers` always present).
pub const NET_HDR_LEN: usize = 12;
/// The default (and maximum offered) queue size.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;

/// Device feature: the configuration space holds the MAC address.
pub const F_MAC: u32 = virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
/// Device feature: the configuration space holds the link status.
pub const F_STATUS: u32 = virtio_bindings::virtio_net::VIRTIO_NET_F_STATUS;
/// Link status bit in the configuration space.
const S_LINK_UP: u16 = virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP as u16;

/// Errors building a net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The queue size is not a power of two in 1..=32768.
    #[error("net queue size {0} is not a power of two up to 32768")]
    QueueSize(u16),
    /// An eventfd of the device could not be created.
    #[error("net device eventfd")]
    EventFd(#[source] io::Error),
    /// The transport rejected the saved state.
    #[error("net device transport")]
    Transport(#[from] VirtioError),
}

/// Where the guest's transmitted frames go.
pub trait TxSink: Send {
    /// Takes one frame the guest transmitted (Ethernet, without the virtio-net header).
    /// An error drops the frame (it is counted, like a full NIC queue would). Runs on the
    /// device's worker thread and must not block: a pause waits for the frame in hand.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Called after each batch of frames taken from the transmit queue.
    fn flush(&mut self) {}
}

/// Told of every frame the worker delivered into a receive buffer (replication forwards it to
/// the backup's inbound log). Runs on the device's worker thread with the frame just written:
/// it must not block (a bounded queue with a non-blocking push), since it is on the path of
/// every received frame.
pub trait RxObserver: Send + Sync {
    /// `frame` (Ethernet, without the virtio-net header) was delivered to the guest; `seq` is
    /// the device's count of frames delivered, this one included (saved in [`NetState`]).
    fn delivered(&self, seq: u64, frame: &[u8]);
}

/// What the device and its worker share about the receive path: the delivery count, the
/// frames to replay ahead of the TAP, and the observer.
#[derive(Default)]
pub(crate) struct RxShared {
    /// Frames delivered to the guest since the device was created (restored with its state).
    delivered: AtomicU64,
    /// Frames to deliver before any new frame from the TAP, in order ([`Net::replay_rx`]).
    replay: Mutex<VecDeque<Vec<u8>>>,
    /// `replay` is not empty (checked per frame without locking).
    replay_pending: AtomicBool,
    observer: Mutex<Option<Arc<dyn RxObserver>>>,
}

impl RxShared {
    /// Moves the next frame to replay into `buf`; its length, or `None` if there is none.
    /// A frame longer than `buf` is dropped (and the next one tried).
    pub(crate) fn pop_replay(&self, buf: &mut [u8]) -> Option<usize> {
        if !self.replay_pending.load(Ordering::Acquire) {
            return None;
        }
        let mut q = lock(&self.replay);
        let got = loop {
            match q.pop_front() {
                Some(f) if f.len() <= buf.len() => {
                    buf[..f.len()].copy_from_slice(&f);
                    break Some(f.len());
                }
                Some(f) => tracing::warn!(len = f.len(), "virtio-net replayed frame too long: dropped"),
                None => break None,
            }
        };
        self.replay_pending.store(!q.is_empty(), Ordering::Release);
        got
    }

    /// Counts a delivered frame and tells the observer; returns its number.
    pub(crate) fn delivered(&self, observer: Option<&Arc<dyn RxObserver>>, frame: &[u8]) -> u64 {
        let seq = self.delivered.fetch_add(1, Ordering::AcqRel) + 1;
        if let Some(o) = observer {
            o.delivered(seq, frame);
        }
        seq
    }

    pub(crate) fn observer(&self) -> Option<Arc<dyn RxObserver>> {
        lock(&self.observer).clone()
    }
}

/// Wall-clock nanoseconds, for timing events that other processes on the host compare with.
pub fn wall_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// A frame's TCP flow for debug timelines: `sport:dport:payload` of an IPv4 TCP frame, `-` for
/// anything else. Formatted only when the event that carries it is enabled, so that a request
/// can be followed from its delivery to the guest to its reply's release
/// (docs/results/s15-2026-12-07/request-timeline.py).
pub struct FlowTag<'a>(pub &'a [u8]);

impl FlowTag<'_> {
    /// (source port, destination port, TCP payload bytes), if an IPv4 TCP frame.
    pub fn parse(&self) -> Option<(u16, u16, usize)> {
        let d = self.0;
        if d.len() < 34 || d[12..14] != [8, 0] || d[23] != 6 {
            return None;
        }
        let ihl = usize::from(d[14] & 15) * 4;
        let total = usize::from(u16::from_be_bytes([d[16], d[17]]));
        let t = 14 + ihl;
        let tcp = d.get(t..t + 13)?;
        let doff = usize::from(tcp[12] >> 4) * 4;
        let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
        let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
        Some((sport, dport, total.saturating_sub(ihl + doff)))
    }
}

impl std::fmt::Display for FlowTag<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.parse() {
            Some((s, d, len)) => write!(f, "{s}:{d}:{len}"),
            None => f.write_str("-"),
        }
    }
}

/// The plain sink: writes every frame to the TAP at once.
#[derive(Debug)]
pub struct TapSink {
    tap: Arc<Tap>,
}

impl TapSink {
    /// A sink writing to `tap`.
    pub fn new(tap: Arc<Tap>) -> Self {
        Self { tap }
    }
}

impl TxSink for TapSink {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.tap.write_frame(frame).map(|_| ())
    }
}

/// Traffic counters of one device.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames put into the receive queue.
    pub rx_frames: AtomicU64,
    /// Bytes of those frames (without headers).
    pub rx_bytes: AtomicU64,
    /// Frames read from the TAP and dropped (receive buffer too small).
    pub rx_dropped: AtomicU64,
    /// Frames taken from the transmit queue and accepted by the sink.
    pub tx_frames: AtomicU64,
    /// Bytes of those frames.
    pub tx_bytes: AtomicU64,
    /// Frames taken from the transmit queue and dropped (malformed, or the sink refused).
    pub tx_dropped: AtomicU64,
    /// Times the worker woke from `epoll_wait` (a busy loop shows here).
    pub wakeups: AtomicU64,
    /// Frames delivered from the replay queue ([`Net::replay_rx`]) rather than the TAP.
    pub rx_replayed: AtomicU64,
}

impl NetStats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// How to build a [`Net`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// The maximum size of each queue (a power of two).
    pub queue_size: u16,
    /// Offer VIRTIO_F_EVENT_IDX.
    pub event_idx: bool,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            // Locally administered, unicast.
            mac: [0x02, 0x55, 0x44, 0x00, 0x00, 0x01],
            queue_size: DEFAULT_QUEUE_SIZE,
            event_idx: true,
        }
    }
}

/// A virtio-net device backed by a TAP. Put it behind a
/// [`VirtioMmio`](super::VirtioMmio).
pub struct Net {
    config: NetConfig,
    queue_sizes: [u16; 2],
    mem: GuestMemory,
    tap: Arc<Tap>,
    sink: Arc<Mutex<Box<dyn TxSink>>>,
    notify: [EventFd; 2],
    stats: Arc<NetStats>,
    rx: Arc<RxShared>,
    paused: bool,
    worker: Option<worker::Handle>,
}

impl Net {
    /// A device on `tap` sending the guest's frames to `sink`. `mem` is (a clone of) the
    /// VM's guest memory.
    pub fn new(mem: GuestMemory, tap: Arc<Tap>, sink: Box<dyn TxSink>, config: NetConfig) -> Result<Self, NetError> {
        let qs = config.queue_size;
        if qs == 0 || qs > 32768 || !qs.is_power_of_two() {
            return Err(NetError::QueueSize(qs));
        }
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd);
        Ok(Self {
            queue_sizes: [qs, qs],
            config,
            mem,
            tap,
            sink: Arc::new(Mutex::new(sink)),
            notify: [evt()?, evt()?],
            stats: Arc::new(NetStats::default()),
            rx: Arc::new(RxShared::default()),
            paused: false,
            worker: None,
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.config.mac
    }

    /// The configuration the device was built with.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// The TAP the device reads received frames from.
    pub fn tap(&self) -> &Arc<Tap> {
        &self.tap
    }

    /// Traffic counters.
    pub fn stats(&self) -> &Arc<NetStats> {
        &self.stats
    }

    /// Frames delivered to the guest so far (saved with the device: a restored device goes on
    /// counting from its checkpoint's value).
    pub fn rx_delivered(&self) -> u64 {
        self.rx.delivered.load(Ordering::Acquire)
    }

    pub(crate) fn set_rx_delivered(&self, n: u64) {
        self.rx.delivered.store(n, Ordering::Release);
    }

    /// Installs (or removes) the observer told of every delivered frame. Takes effect at the
    /// worker's next batch of frames; install it with the device paused to start at an exact
    /// point.
    pub fn set_rx_observer(&self, observer: Option<Arc<dyn RxObserver>>) {
        *lock(&self.rx.observer) = observer;
    }

    /// Queues `frames` for delivery to the guest, in order, ahead of any frame from the TAP
    /// (a promoted replica's replay of the primary's last inputs). They wait while the guest
    /// has no receive buffer, like TAP frames do; a paused device delivers them once resumed.
    /// Returns how many frames are queued in all.
    pub fn replay_rx(&self, frames: impl IntoIterator<Item = Vec<u8>>) -> usize {
        let n = {
            let mut q = lock(&self.rx.replay);
            q.extend(frames);
            self.rx.replay_pending.store(!q.is_empty(), Ordering::Release);
            q.len()
        };
        if let Err(e) = self.notify[RX_QUEUE].write(1) {
            tracing::warn!(error = %e, "virtio-net replay kick failed");
        }
        n
    }

    /// Replaces the transmit sink, returning the old one. Takes effect at the next frame;
    /// call it with the device paused to switch at an exact point of the guest's execution.
    pub fn set_tx_sink(&self, sink: Box<dyn TxSink>) -> Box<dyn TxSink> {
        std::mem::replace(&mut *lock(&self.sink), sink)
    }

    /// Runs `f` on the current transmit sink (for example to mark an epoch boundary in an
    /// output-commit buffer while the device is paused).
    pub fn with_tx_sink<R>(&self, f: impl FnOnce(&mut dyn TxSink) -> R) -> R {
        f(lock(&self.sink).as_mut())
    }

    /// The eventfd signalled when the driver notifies queue `index`, for a KVM ioeventfd
    /// on the QueueNotify register (datamatch = `index`).
    pub fn queue_evt(&self, index: usize) -> Option<&EventFd> {
        self.notify.get(index)
    }

    /// Sends a RARP announcement of the guest's MAC straight out of the TAP (not through
    /// the sink), so switches learn where the guest now lives: call it when a backup is
    /// promoted or a migration completes.
    pub fn announce(&self) -> io::Result<()> {
        self.tap.write_frame(&announce_frame(self.config.mac)).map(|_| ())
    }

    /// Whether the worker thread is running (the device is active).
    pub fn has_worker(&self) -> bool {
        self.worker.is_some()
    }

    /// Stops the worker for good and leaves the device paused: how a VM that was replaced
    /// ([`crate::vm::Vm::rebuild`]) lets go of the TAP and of guest memory. Only a driver
    /// (a vCPU of this device's VM) could start it again, and that VM's vCPUs are gone.
    pub(crate) fn retire(&mut self) {
        self.paused = true;
        self.stop_worker();
    }

    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
            tracing::debug!(tap = %self.tap.name(), "virtio-net worker stopped");
        }
    }

    fn config_bytes(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[..6].copy_from_slice(&self.config.mac);
        c[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
        // max_virtqueue_pairs (meaningful only with VIRTIO_NET_F_MQ).
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c
    }
}

/// A RARP "reverse request" from `mac` to the broadcast address, padded to the Ethernet
/// minimum, as hypervisors send after moving a guest.
pub fn announce_frame(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x8035u16.to_be_bytes()); // RARP
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&3u16.to_be_bytes()); // reverse request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0);
    f
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        super::TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        let mut f =
            (1u64 << features::VERSION_1) | (1 << features::RING_INDIRECT_DESC) | (1 << F_MAC) | (1 << F_STATUS);
        if self.config.event_idx {
            f |= 1 << features::RING_EVENT_IDX;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The modern net configuration space is read-only for the driver.
        tracing::warn!(offset = format_args!("{offset:#x}"), len = data.len(), "virtio-net config write ignored");
    }

    fn activate(&mut self, a: Activation) -> Result<(), VirtioError> {
        self.stop_worker();
        {
            let queues = lock(&a.queues);
            for (i, q) in queues.iter().enumerate() {
                if !virtio_queue::QueueT::is_valid(q, &self.mem) {
                    return Err(VirtioError::QueueInvalid(i));
                }
            }
        }
        let handle = worker::Worker::spawn(worker::WorkerArgs {
            mem: self.mem.clone(),
            queues: a.queues,
            interrupt: a.interrupt,
            tap: self.tap.clone(),
            sink: self.sink.clone(),
            stats: self.stats.clone(),
            rx: self.rx.clone(),
            notify: [&self.notify[0], &self.notify[1]],
            paused: self.paused,
        })?;
        self.worker = Some(handle);
        tracing::debug!(tap = %self.tap.name(), "virtio-net worker started");
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }

    fn queue_notify(&self, index: u32) {
        match self.notify.get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    tracing::warn!(queue = index, error = %e, "virtio-net notify eventfd write failed");
                }
            }
            None => tracing::warn!(queue = index, "virtio-net notify of a queue it does not have"),
        }
    }

    fn pause(&mut self) {
        self.paused = true;
        if let Some(w) = &self.worker {
            w.pause();
        }
    }

    fn resume(&mut self) {
        self.paused = false;
        if let Some(w) = &self.worker {
            w.resume();
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

#[cfg(test)]
mod tests;
