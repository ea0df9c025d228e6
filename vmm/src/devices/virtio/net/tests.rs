//! virtio-net end to end: a mock driver in guest memory, a socket pair as the TAP, a mock
//! sink as the network.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::*;
use crate::bus::BusDevice;
use crate::devices::tap::tests::tap_pair;
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::{INT_USED_RING, VirtioMmio, status};
use crate::persist::Persist;

const WAIT: Duration = Duration::from_secs(5);
const RXQ_BASE: u64 = 0x10000;
const TXQ_BASE: u64 = 0x20000;
const RX_BUF_BASE: u64 = 0x40000;
const TX_BUF_BASE: u64 = 0x80000;
const QSIZE: u16 = 16;

/// Collects what the guest transmits.
#[derive(Clone, Default)]
struct VecSink(Arc<Mutex<Vec<Vec<u8>>>>);

impl TxSink for VecSink {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.0.lock().unwrap().push(frame.to_vec());
        Ok(())
    }
}

impl VecSink {
    fn frames(&self) -> Vec<Vec<u8>> {
        self.0.lock().unwrap().clone()
    }
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

struct Harness {
    mem: GuestMemory,
    dev: VirtioMmio<Net>,
    irq: EventFd,
    peer: OwnedFd,
    sink: VecSink,
    rxq: DriverQueue,
    txq: DriverQueue,
    next_rx_buf: u64,
    next_tx_buf: u64,
}

fn frame(tag: u8, len: usize) -> Vec<u8> {
    let mut f = vec![tag; len];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, tag]);
    f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    f
}

fn peer_send(peer: &OwnedFd, f: &[u8]) {
    // SAFETY: `f` is valid for reads of its length during the call.
    let n = unsafe { libc::send(peer.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
    assert_eq!(n as usize, f.len());
}

fn peer_recv(peer: &OwnedFd) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    // SAFETY: `buf` is valid for writes of its length during the call.
    let n = unsafe { libc::recv(peer.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    (n >= 0).then(|| {
        buf.truncate(n as usize);
        buf
    })
}

/// Whether a frame waits unread in the device's end of the socket pair.
fn has_queued_frame(tap: &Tap) -> bool {
    let mut buf = [0u8; 1];
    // SAFETY: `buf` is valid for writes of one byte during the call.
    let r = unsafe { libc::recv(tap.as_raw_fd(), buf.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    r >= 0
}

impl Harness {
    fn new(event_idx: bool) -> Self {
        Self::with_sink(event_idx, None)
    }

    /// A live device; `tap_sink` makes transmitted frames go to the socket pair instead of
    /// the mock sink.
    fn with_sink(event_idx: bool, tap_sink: Option<()>) -> Self {
        let mem = guest_memory();
        let (tap, peer) = tap_pair();
        let tap = Arc::new(tap);
        let sink = VecSink::default();
        let boxed: Box<dyn TxSink> = match tap_sink {
            Some(()) => Box::new(TapSink::new(tap.clone())),
            None => Box::new(sink.clone()),
        };
        let config = NetConfig { event_idx, queue_size: QSIZE, ..NetConfig::default() };
        let net = Net::new(mem.clone(), tap, boxed, config).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = VirtioMmio::new(net, irq.try_clone().unwrap()).unwrap();
        let s = negotiate(&mut dev, u64::MAX);
        assert_ne!(s & status::FEATURES_OK, 0);
        let rxq = DriverQueue::new(RXQ_BASE, QSIZE);
        let txq = DriverQueue::new(TXQ_BASE, QSIZE);
        rxq.setup(&mut dev, 0);
        txq.setup(&mut dev, 1);
        let s = driver_ok(&mut dev);
        assert_eq!(s & status::DEVICE_NEEDS_RESET, 0);
        assert!(dev.device().has_worker());
        Harness { mem, dev, irq, peer, sink, rxq, txq, next_rx_buf: RX_BUF_BASE, next_tx_buf: TX_BUF_BASE }
    }

    fn notify(&mut self, q: u32) {
        wr(&mut self.dev, REG_QUEUE_NOTIFY, q);
    }

    /// Posts a receive buffer of `len` bytes (one page each); returns its address.
    fn post_rx(&mut self, len: u32) -> u64 {
        let a = self.next_rx_buf;
        self.next_rx_buf += 0x1000;
        self.rxq.add_chain(&self.mem, &[(a, len, true)]);
        a
    }

    /// Queues `f` for transmission as header + payload descriptors (not notified).
    fn queue_tx(&mut self, f: &[u8]) -> u16 {
        let a = self.next_tx_buf;
        self.next_tx_buf += 0x1000;
        self.mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(a)).unwrap();
        self.mem.write_slice(f, GuestAddress(a + 0x100)).unwrap();
        self.txq.add_chain(&self.mem, &[(a, NET_HDR_LEN as u32, false), (a + 0x100, f.len() as u32, false)])
    }

    fn stats(&self) -> &NetStats {
        self.dev.device().stats()
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

fn copy_memory(mem: &GuestMemory) -> GuestMemory {
    let mut all = vec![0u8; 1 << 20];
    mem.read_slice(&mut all, GuestAddress(0)).unwrap();
    let copy = guest_memory();
    copy.write_slice(&all, GuestAddress(0)).unwrap();
    clear_dirty(&copy);
    copy
}

#[test]
fn features_and_config_space() {
    let h = Harness::new(true);
    let mut dev = h.dev;
    wr(&mut dev, REG_DEVICE_FEATURES_SEL, 0);
    let lo = rd(&mut dev, REG_DEVICE_FEATURES);
    assert_eq!(lo, (1 << F_MAC) | (1 << F_STATUS) | (1 << 28) | (1 << 29), "MAC, STATUS, INDIRECT_DESC, EVENT_IDX");
    wr(&mut dev, REG_DEVICE_FEATURES_SEL, 1);
    assert_eq!(rd(&mut dev, REG_DEVICE_FEATURES), 1, "VERSION_1");
    assert_eq!(rd(&mut dev, 0x008), 1, "device id: net");
    let mut mac = [0u8; 6];
    for (i, b) in mac.iter_mut().enumerate() {
        let mut one = [0u8; 1];
        dev.read(0x100 + i as u64, &mut one);
        *b = one[0];
    }
    assert_eq!(mac, NetConfig::default().mac);
    let mut st = [0u8; 2];
    dev.read(0x106, &mut st);
    assert_eq!(u16::from_le_bytes(st), 1, "link up");
    // Writes are ignored.
    dev.write(0x100, &[0xaa]);
    let mut one = [0u8; 1];
    dev.read(0x100, &mut one);
    assert_eq!(one[0], mac[0]);
    let f = announce_frame(mac);
    assert_eq!(f.len(), 60);
    assert_eq!(&f[..6], &[0xff; 6]);
    assert_eq!(&f[6..12], &mac);
    assert_eq!(&f[12..14], &[0x80, 0x35]);
}

#[test]
fn tx_reaches_sink_marks_used_ring_and_interrupts() {
    let mut h = Harness::new(false);
    let a = frame(1, 60);
    let b = frame(2, 1514);
    let ha = h.queue_tx(&a);
    let hb = h.queue_tx(&b);
    clear_dirty(&h.mem);
    h.notify(1);
    assert!(wait_until(WAIT, || h.sink.len() == 2));
    assert_eq!(h.sink.frames(), vec![a.clone(), b.clone()]);
    assert!(wait_until(WAIT, || h.txq.used_idx(&h.mem) == 2));
    assert_eq!(h.txq.pop_used(&h.mem), Some((u32::from(ha), 0)));
    assert_eq!(h.txq.pop_used(&h.mem), Some((u32::from(hb), 0)));
    assert!(wait_until(WAIT, || h.irq.read().is_ok()));
    assert_eq!(rd(&mut h.dev, REG_INTERRUPT_STATUS), INT_USED_RING);
    wr(&mut h.dev, REG_INTERRUPT_ACK, INT_USED_RING);
    assert_eq!(rd(&mut h.dev, REG_INTERRUPT_STATUS), 0);
    // The device wrote the used ring (dirty), and only read the buffers (clean).
    assert!(is_dirty(&h.mem, h.txq.used_elem_addr(0)));
    assert!(!is_dirty(&h.mem, TX_BUF_BASE));
    assert!(!is_dirty(&h.mem, h.txq.desc));
    assert_eq!(h.stats().tx_frames.load(Ordering::Relaxed), 2);
    assert_eq!(h.stats().tx_bytes.load(Ordering::Relaxed), 60 + 1514);
    // Without EVENT_IDX the device keeps tx notifications on after draining.
    assert_eq!(h.txq.used_flags(&h.mem), 0);
}

#[test]
fn indirect_chains_and_no_interrupt_flag() {
    let mut h = Harness::new(false);
    // The driver polls and asks for no interrupts (no EVENT_IDX).
    h.txq.set_avail_flags(&h.mem, 1);
    h.rxq.set_avail_flags(&h.mem, 1);
    let f = frame(4, 200);
    h.mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(TX_BUF_BASE)).unwrap();
    h.mem.write_slice(&f, GuestAddress(TX_BUF_BASE + 0x100)).unwrap();
    h.txq.add_indirect(
        &h.mem,
        TX_BUF_BASE + 0x800,
        &[(TX_BUF_BASE, NET_HDR_LEN as u32, false), (TX_BUF_BASE + 0x100, f.len() as u32, false)],
    );
    h.notify(1);
    assert!(wait_until(WAIT, || h.sink.len() == 1));
    assert_eq!(h.sink.frames()[0], f);
    // Receive into an indirect header + data chain.
    h.rxq.add_indirect(
        &h.mem,
        RX_BUF_BASE + 0x800,
        &[(RX_BUF_BASE, NET_HDR_LEN as u32, true), (RX_BUF_BASE + 0x100, 1600, true)],
    );
    h.notify(0);
    let r = frame(5, 1000);
    peer_send(&h.peer, &r);
    assert!(wait_until(WAIT, || h.rxq.used_idx(&h.mem) == 1));
    assert_eq!(h.read(RX_BUF_BASE + 0x100, 1000), r);
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(h.dev.interrupt().raised_count(), 0, "NO_INTERRUPT honoured");
    assert!(h.irq.read().is_err());
    // Interrupts again once the driver clears the flag.
    h.txq.set_avail_flags(&h.mem, 0);
    h.queue_tx(&frame(6, 60));
    h.notify(1);
    assert!(wait_until(WAIT, || h.dev.interrupt().raised_count() == 1));
}

#[test]
fn tx_through_tap_sink() {
    let mut h = Harness::with_sink(true, Some(()));
    let a = frame(3, 100);
    h.queue_tx(&a);
    h.notify(1);
    let mut got = None;
    assert!(wait_until(WAIT, || {
        got = peer_recv(&h.peer);
        got.is_some()
    }));
    assert_eq!(got.unwrap(), a);
    // Malformed chains (shorter than the header) are returned and counted, not sent.
    h.txq.add_chain(&h.mem, &[(TX_BUF_BASE + 0x8000, 4, false)]);
    h.notify(1);
    assert!(wait_until(WAIT, || h.txq.used_idx(&h.mem) == 2));
    assert_eq!(h.stats().tx_dropped.load(Ordering::Relaxed), 1);
    assert!(peer_recv(&h.peer).is_none());
}

#[test]
fn rx_writes_header_and_frame_and_dirties_pages() {
    let mut h = Harness::new(false);
    let buf0 = h.post_rx(2048);
    // A second buffer split in header + data descriptors.
    let (hdr1, data1) = (RX_BUF_BASE + 0x8000, RX_BUF_BASE + 0x9000);
    h.rxq.add_chain(&h.mem, &[(hdr1, NET_HDR_LEN as u32, true), (data1, 2048, true)]);
    let untouched = h.post_rx(2048);
    h.notify(0);
    clear_dirty(&h.mem);
    let a = frame(7, 60);
    let b = frame(8, 1514);
    peer_send(&h.peer, &a);
    peer_send(&h.peer, &b);
    assert!(wait_until(WAIT, || h.rxq.used_idx(&h.mem) == 2));
    assert_eq!(h.rxq.pop_used(&h.mem), Some((0, (NET_HDR_LEN + 60) as u32)));
    assert_eq!(h.rxq.pop_used(&h.mem), Some((1, (NET_HDR_LEN + 1514) as u32)));
    let hdr = h.read(buf0, NET_HDR_LEN);
    assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "num_buffers = 1");
    assert_eq!(h.read(buf0 + NET_HDR_LEN as u64, 60), a);
    assert_eq!(h.read(hdr1 + 10, 2), [1, 0]);
    assert_eq!(h.read(data1, 1514), b);
    // Every page the device wrote is in the VMM's dirty bitmap, and nothing else.
    assert!(is_dirty(&h.mem, buf0));
    assert!(is_dirty(&h.mem, hdr1));
    assert!(is_dirty(&h.mem, data1));
    assert!(is_dirty(&h.mem, h.rxq.used));
    assert!(!is_dirty(&h.mem, untouched));
    assert!(!is_dirty(&h.mem, h.rxq.desc));
    assert!(!is_dirty(&h.mem, h.rxq.avail));
    assert!(wait_until(WAIT, || h.irq.read().is_ok()));
    assert_eq!(h.stats().rx_frames.load(Ordering::Relaxed), 2);
    // Buffers remain: the device asked the driver not to kick the rx queue.
    assert_eq!(h.rxq.used_flags(&h.mem), 1);
}

#[test]
fn rx_waits_in_the_kernel_queue_until_buffers_arrive() {
    let mut h = Harness::new(false);
    let frames: Vec<_> = (0..3).map(|i| frame(10 + i, 80)).collect();
    for f in &frames {
        peer_send(&h.peer, f);
    }
    std::thread::sleep(Duration::from_millis(30));
    let wakeups = h.stats().wakeups.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(50));
    // No buffers: nothing read from the TAP, no busy loop on its readiness.
    assert_eq!(h.stats().rx_frames.load(Ordering::Relaxed), 0);
    assert_eq!(h.stats().rx_dropped.load(Ordering::Relaxed), 0);
    assert!(has_queued_frame(h.dev.device().tap()));
    assert!(h.stats().wakeups.load(Ordering::Relaxed) <= wakeups + 1);
    // The device wants to hear about new buffers.
    assert_eq!(h.rxq.used_flags(&h.mem), 0);

    let b0 = h.post_rx(2048);
    h.notify(0);
    assert!(wait_until(WAIT, || h.rxq.used_idx(&h.mem) == 1));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(h.rxq.used_idx(&h.mem), 1, "one buffer, one frame");
    assert_eq!(h.read(b0 + NET_HDR_LEN as u64, 80), frames[0]);
    assert_eq!(h.rxq.used_flags(&h.mem), 0, "out of buffers again");
    let b1 = h.post_rx(2048);
    let b2 = h.post_rx(2048);
    h.notify(0);
    assert!(wait_until(WAIT, || h.rxq.used_idx(&h.mem) == 3));
    assert_eq!(h.read(b1 + NET_HDR_LEN as u64, 80), frames[1]);
    assert_eq!(h.read(b2 + NET_HDR_LEN as u64, 80), frames[2]);
    assert!(!has_queued_frame(h.dev.device().tap()));

    // A buffer too small for the frame is returned empty and the frame dropped.
    h.post_rx(100);
    peer_send(&h.peer, &frame(20, 200));
    h.notify(0);
    assert!(wait_until(WAIT, || h.rxq.used_idx(&h.mem) == 4));
    for _ in 0..3 {
        h.rxq.pop_used(&h.mem);
    }
    assert_eq!(h.rxq.pop_used(&h.mem), Some((3, 0)));
    assert_eq!(h.stats().rx_dropped.load(Ordering::Relaxed), 1);
}

#[test]
fn event_idx_suppresses_interrupts_and_kicks() {
    let mut h = Harness::new(true);
    fn h_raised(dev: &VirtioMmio<Net>) -> u64 {
        dev.interrupt().raised_count()
    }
    // The driver wants an interrupt only once used idx passes 3.
    h.txq.set_used_event(&h.mem, 3);
    for i in 0..3 {
        h.queue_tx(&frame(30 + i, 60));
        h.notify(1);
        let want = u16::from(i) + 1;
        assert!(wait_until(WAIT, || h.txq.used_idx(&h.mem) == want));
    }
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(h_raised(&h.dev), 0, "used_event 3 not yet crossed");
    // The device tells the driver where to kick next (avail_event = next avail).
    assert_eq!(h.txq.avail_event(&h.mem), 3);
    h.queue_tx(&frame(33, 60));
    h.notify(1);
    assert!(wait_until(WAIT, || h_raised(&h.dev) == 1));
    assert!(h.irq.read().is_ok());
    assert_eq!(h.sink.len(), 4);

    // Receive: likewise, one interrupt when used_event is crossed.
    h.rxq.set_used_event(&h.mem, 1);
    h.post_rx(2048);
    h.post_rx(2048);
    h.notify(0);
    peer_send(&h.peer, &frame(40, 60));
    assert!(wait_until(WAIT, || h.rxq.used_idx(&h.mem) == 1));
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(h_raised(&h.dev), 1);
    peer_send(&h.peer, &frame(41, 60));
    assert!(wait_until(WAIT, || h_raised(&h.dev) == 2));
}

#[test]
fn pause_parks_the_worker_and_resume_continues() {
    let mut h = Harness::new(false);
    let rx_buf = h.post_rx(2048);
    h.notify(0);
    h.dev.pause();
    // While paused the guest queues work and the network delivers a frame.
    let t = frame(50, 70);
    h.queue_tx(&t);
    h.notify(1);
    let r = frame(51, 90);
    peer_send(&h.peer, &r);
    clear_dirty(&h.mem);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(h.sink.len(), 0);
    assert_eq!(h.txq.used_idx(&h.mem), 0);
    assert_eq!(h.rxq.used_idx(&h.mem), 0);
    assert!(!is_dirty(&h.mem, rx_buf));
    assert!(!is_dirty(&h.mem, h.rxq.used));
    assert!(!is_dirty(&h.mem, h.txq.used));
    // Pausing twice is harmless.
    h.dev.pause();
    h.dev.resume();
    assert!(wait_until(WAIT, || h.sink.len() == 1));
    assert!(wait_until(WAIT, || h.rxq.used_idx(&h.mem) == 1));
    assert_eq!(h.read(rx_buf + NET_HDR_LEN as u64, 90), r);
    assert_eq!(h.sink.frames()[0], t);

    // Pause cost with the worker idle in epoll_wait (it ran a frame since the last resume):
    // the handshake only, no sleeps.
    let mut times = Vec::new();
    for i in 0..100u32 {
        h.queue_tx(&frame(52, 60));
        h.notify(1);
        assert!(wait_until(WAIT, || h.sink.len() == 2 + i as usize));
        std::thread::sleep(Duration::from_micros(200));
        let t0 = Instant::now();
        h.dev.pause();
        times.push(t0.elapsed());
        h.dev.resume();
    }
    times.sort();
    let (p50, max) = (times[times.len() / 2], times[times.len() - 1]);
    println!("pause of an idle worker: p50 {p50:?}, max {max:?}");
    assert!(p50 < Duration::from_millis(2), "pause took {p50:?}");
}

/// A pause closes a gate: a worker asleep in `epoll` is not woken for it (each wake-up is a
/// thread switch, ~50 µs here, twice an epoch), and one woken by work during the pause waits
/// at the gate without touching the queues until the resume.
#[test]
fn pausing_an_idle_worker_does_not_wake_it() {
    let mut h = Harness::new(false);
    h.queue_tx(&frame(60, 64));
    h.notify(1);
    assert!(wait_until(WAIT, || h.sink.len() == 1));
    std::thread::sleep(Duration::from_millis(20));
    let before = h.stats().wakeups.load(Ordering::Relaxed);
    for _ in 0..50 {
        h.dev.pause();
        h.dev.resume();
    }
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(h.stats().wakeups.load(Ordering::Relaxed), before, "50 pauses of an idle worker woke it");
    // Woken by the guest while paused: it waits at the gate.
    h.dev.pause();
    h.queue_tx(&frame(61, 64));
    h.notify(1);
    assert!(wait_until(WAIT, || h.stats().wakeups.load(Ordering::Relaxed) == before + 1));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(h.sink.len(), 1, "a paused worker sent a frame");
    assert_eq!(h.txq.used_idx(&h.mem), 1);
    h.dev.resume();
    assert!(wait_until(WAIT, || h.sink.len() == 2));
    assert_eq!(h.txq.used_idx(&h.mem), 2);
}

/// A sink that takes its time, so a pause lands in the middle of a batch.
struct SlowSink(VecSink);

impl TxSink for SlowSink {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        std::thread::sleep(Duration::from_millis(5));
        self.0.send(frame)
    }
}

#[test]
fn pause_waits_for_the_frame_in_hand_and_cuts_the_batch_short() {
    let mut h = Harness::new(false);
    let slow = VecSink::default();
    h.dev.device().set_tx_sink(Box::new(SlowSink(slow.clone())));
    let total = usize::from(QSIZE / 2 - 1);
    for i in 0..total {
        h.queue_tx(&frame(i as u8, 1514));
    }
    h.notify(1);
    assert!(wait_until(WAIT, || slow.len() >= 1));
    h.dev.pause();
    // pause returned: the frame in hand is finished and accounted for in guest memory,
    // the rest of the batch waits.
    let done = slow.len();
    let used = h.txq.used_idx(&h.mem);
    assert_eq!(done, usize::from(used));
    assert!(done < total, "the batch was cut short ({done} of {total})");
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(slow.len(), done);
    assert_eq!(h.txq.used_idx(&h.mem), used);
    h.dev.resume();
    assert!(wait_until(WAIT, || slow.len() == total));
    assert!(wait_until(WAIT, || usize::from(h.txq.used_idx(&h.mem)) == total));
    assert_eq!(slow.frames()[total - 1], frame(total as u8 - 1, 1514));
}

#[test]
fn save_restore_continues_exactly() {
    let mut h = Harness::new(true);
    // Some traffic before the checkpoint.
    h.queue_tx(&frame(60, 60));
    h.notify(1);
    let b = h.post_rx(2048);
    h.notify(0);
    peer_send(&h.peer, &frame(61, 60));
    assert!(wait_until(WAIT, || h.sink.len() == 1 && h.rxq.used_idx(&h.mem) == 1));
    assert_eq!(h.read(b + NET_HDR_LEN as u64, 60), frame(61, 60));
    // Work the device has not seen yet: a tx chain whose kick never came and an rx buffer.
    let pending = frame(62, 300);
    h.queue_tx(&pending);
    let b2 = h.post_rx(2048);

    h.dev.pause();
    let state = h.dev.save();
    assert_eq!(state.mac, NetConfig::default().mac);
    assert!(state.event_idx);
    assert_eq!(state.mmio.status & status::DRIVER_OK, status::DRIVER_OK);
    assert_eq!(state.mmio.queues[1].next_avail, 1);
    assert_eq!(state.mmio.queues[1].next_used, 1);
    assert_eq!(state.mmio.queues[0].next_used, 1);
    assert!(state.mmio.queues.iter().all(|q| q.event_idx_enabled));
    let mut bytes = Vec::new();
    ciborium::into_writer(&state, &mut bytes).unwrap();
    let decoded: NetState = ciborium::from_reader(bytes.as_slice()).unwrap();
    assert_eq!(decoded, state);
    let replica = copy_memory(&h.mem);
    drop(h.dev);

    // The "backup": other memory (the checkpoint's copy), another irqfd, TAP and sink.
    let (tap, peer) = tap_pair();
    let sink = VecSink::default();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let args = NetRestoreArgs {
        mem: replica.clone(),
        irq: irq.try_clone().unwrap(),
        tap: Arc::new(tap),
        sink: Box::new(sink.clone()),
        paused: false,
    };
    let mut dev = VirtioMmio::<Net>::restore(args, &decoded).unwrap();
    assert!(dev.is_active());
    // The pending transmit is picked up without a new kick.
    assert!(wait_until(WAIT, || sink.len() == 1));
    assert_eq!(sink.frames()[0], pending);
    let mut txq = h.txq.clone();
    assert!(wait_until(WAIT, || txq.used_idx(&replica) == 2));
    assert!(is_dirty(&replica, txq.used));
    assert_eq!(txq.pop_used(&replica).map(|u| u.0), Some(0));
    // Receive continues into the buffer posted before the checkpoint.
    peer_send(&peer, &frame(63, 70));
    let mut rxq = h.rxq.clone();
    assert!(wait_until(WAIT, || rxq.used_idx(&replica) == 2));
    assert_eq!(rxq.pop_used(&replica).map(|u| u.1), Some(72));
    let mut ok = [0u8; 70];
    replica.read_slice(&mut ok, GuestAddress(b2 + NET_HDR_LEN as u64)).unwrap();
    assert_eq!(ok.to_vec(), frame(63, 70));
    // And the driver keeps using it through the registers.
    txq.add_chain(&replica, &[(TX_BUF_BASE, NET_HDR_LEN as u32, false), (TX_BUF_BASE + 0x100, 60, false)]);
    wr(&mut dev, REG_QUEUE_NOTIFY, 1);
    assert!(wait_until(WAIT, || sink.len() == 2));
    dev.pause();
    let after = dev.save();
    assert_eq!(after.mmio.queues[1].next_used, 3);
    assert_eq!(after.mmio.queues[0].next_used, 2);
    dev.resume();
}

#[test]
fn restore_paused_waits_for_resume() {
    let mut h = Harness::new(true);
    let pending = frame(64, 100);
    h.queue_tx(&pending);
    h.dev.pause();
    let state = h.dev.save();
    let replica = copy_memory(&h.mem);
    let (tap, _peer) = tap_pair();
    let sink = VecSink::default();
    let args = NetRestoreArgs {
        mem: replica.clone(),
        irq: EventFd::new(EFD_NONBLOCK).unwrap(),
        tap: Arc::new(tap),
        sink: Box::new(sink.clone()),
        paused: true,
    };
    let mut dev = VirtioMmio::<Net>::restore(args, &state).unwrap();
    assert!(dev.device().has_worker());
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(sink.len(), 0);
    assert_eq!(h.txq.used_idx(&replica), 0);
    assert_eq!(dev.save(), state, "nothing moved while paused");
    dev.resume();
    assert!(wait_until(WAIT, || sink.len() == 1));
    assert_eq!(sink.frames()[0], pending);
}

#[test]
fn restore_raises_a_pending_interrupt() {
    let mut h = Harness::new(false);
    h.queue_tx(&frame(70, 60));
    h.notify(1);
    assert!(wait_until(WAIT, || h.dev.interrupt().status() & INT_USED_RING != 0));
    h.dev.pause();
    let state = h.dev.save();
    assert_eq!(state.mmio.interrupt_status, INT_USED_RING);
    let replica = copy_memory(&h.mem);
    let (tap, _peer) = tap_pair();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let args = NetRestoreArgs {
        mem: replica,
        irq: irq.try_clone().unwrap(),
        tap: Arc::new(tap),
        sink: Box::new(VecSink::default()),
        paused: false,
    };
    let mut dev = VirtioMmio::<Net>::restore(args, &state).unwrap();
    assert!(irq.read().is_ok());
    assert_eq!(rd(&mut dev, REG_INTERRUPT_STATUS), INT_USED_RING);
}

#[test]
fn reset_stops_the_worker_and_the_driver_can_start_over() {
    let mut h = Harness::new(false);
    wr(&mut h.dev, REG_STATUS, 0);
    assert!(!h.dev.device().has_worker());
    assert_eq!(rd(&mut h.dev, REG_STATUS), 0);
    // A frame arriving now stays in the kernel queue.
    peer_send(&h.peer, &frame(80, 60));
    std::thread::sleep(Duration::from_millis(20));
    assert!(has_queued_frame(h.dev.device().tap()));
    // The driver sets the device up again (fresh rings).
    let s = negotiate(&mut h.dev, u64::MAX);
    assert_ne!(s & status::FEATURES_OK, 0);
    let mut rxq = DriverQueue::new(0x30000, QSIZE);
    let txq = DriverQueue::new(0x38000, QSIZE);
    rxq.setup(&mut h.dev, 0);
    txq.setup(&mut h.dev, 1);
    driver_ok(&mut h.dev);
    assert!(h.dev.device().has_worker());
    rxq.add_chain(&h.mem, &[(0x60000, 2048, true)]);
    wr(&mut h.dev, REG_QUEUE_NOTIFY, 0);
    assert!(wait_until(WAIT, || rxq.used_idx(&h.mem) == 1));
    assert_eq!(rxq.pop_used(&h.mem), Some((0, 72)));
}

#[test]
fn activation_with_queues_outside_memory_needs_reset() {
    let mem = guest_memory();
    let (tap, _peer) = tap_pair();
    let net = Net::new(mem, Arc::new(tap), Box::new(VecSink::default()), NetConfig::default()).unwrap();
    let mut dev = VirtioMmio::new(net, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
    negotiate(&mut dev, u64::MAX);
    DriverQueue::new(0x10000, 16).setup(&mut dev, 0);
    DriverQueue::new(0x4000_0000, 16).setup(&mut dev, 1);
    let s = driver_ok(&mut dev);
    assert_ne!(s & status::DEVICE_NEEDS_RESET, 0);
    assert!(!dev.device().has_worker());
    assert!(matches!(
        Net::new(
            guest_memory(),
            Arc::new(tap_pair().0),
            Box::new(VecSink::default()),
            NetConfig { queue_size: 100, ..NetConfig::default() }
        ),
        Err(NetError::QueueSize(100))
    ));
}

#[test]
fn sink_can_be_swapped_while_paused() {
    let mut h = Harness::new(false);
    h.queue_tx(&frame(90, 60));
    h.notify(1);
    assert!(wait_until(WAIT, || h.sink.len() == 1));
    h.dev.pause();
    let held = VecSink::default();
    let old = h.dev.device().set_tx_sink(Box::new(held.clone()));
    drop(old);
    h.dev.resume();
    h.queue_tx(&frame(91, 60));
    h.notify(1);
    assert!(wait_until(WAIT, || held.len() == 1));
    assert_eq!(h.sink.len(), 1);
    assert_eq!(h.dev.device().with_tx_sink(|_| 5), 5);
}

/// Moves frames through a real TAP interface: guest → TAP → AF_PACKET socket and back.
#[test]
fn real_tap_round_trip() {
    let tap = match Tap::open("ustest%d") {
        Ok(t) => t,
        Err(e) => {
            println!("SKIP: real_tap_round_trip: cannot create a TAP ({e}; needs root and /dev/net/tun)");
            return;
        }
    };
    tap.set_up().unwrap();
    let name = tap.name().to_string();
    let ifindex = {
        let c = std::ffi::CString::new(name.clone()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated string for the call.
        unsafe { libc::if_nametoindex(c.as_ptr()) }
    };
    assert_ne!(ifindex, 0);
    const ETHERTYPE: u16 = 0x88b5;
    // SAFETY: socket() has no memory effects; the result is checked.
    let raw =
        unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(ETHERTYPE.to_be())) };
    assert!(raw >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
    // SAFETY: `raw` is a fresh descriptor owned by nothing else.
    let pkt = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain data; all-zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETHERTYPE.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a valid sockaddr_ll of the length given.
    let rc = unsafe {
        libc::bind(
            pkt.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());

    let mem = guest_memory();
    let tap = Arc::new(tap);
    let net = Net::new(
        mem.clone(),
        tap.clone(),
        Box::new(TapSink::new(tap.clone())),
        NetConfig { queue_size: QSIZE, ..NetConfig::default() },
    )
    .unwrap();
    let mut dev = VirtioMmio::new(net, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
    negotiate(&mut dev, u64::MAX);
    let mut rxq = DriverQueue::new(RXQ_BASE, QSIZE);
    let mut txq = DriverQueue::new(TXQ_BASE, QSIZE);
    rxq.setup(&mut dev, 0);
    txq.setup(&mut dev, 1);
    driver_ok(&mut dev);

    // Guest → host.
    let out = frame(0xa1, 100);
    mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(TX_BUF_BASE)).unwrap();
    mem.write_slice(&out, GuestAddress(TX_BUF_BASE + 0x100)).unwrap();
    txq.add_chain(&mem, &[(TX_BUF_BASE, NET_HDR_LEN as u32, false), (TX_BUF_BASE + 0x100, out.len() as u32, false)]);
    wr(&mut dev, REG_QUEUE_NOTIFY, 1);
    let mut got = None;
    assert!(wait_until(WAIT, || {
        got = peer_recv(&pkt);
        got.as_deref() == Some(&out[..])
    }));

    // Host → guest (plus whatever the kernel sends on a fresh interface).
    for i in 0..8u64 {
        rxq.add_chain(&mem, &[(RX_BUF_BASE + i * 0x1000, 2048, true)]);
    }
    wr(&mut dev, REG_QUEUE_NOTIFY, 0);
    let inbound = frame(0xb2, 200);
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: `inbound` and `sll` are valid for reads of the lengths given.
    let n = unsafe {
        libc::sendto(
            pkt.as_raw_fd(),
            inbound.as_ptr().cast(),
            inbound.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(n as usize, inbound.len(), "sendto: {}", io::Error::last_os_error());
    let mut found = false;
    assert!(wait_until(WAIT, || {
        while let Some((head, len)) = rxq.pop_used(&mem) {
            let mut f = vec![0u8; len as usize - NET_HDR_LEN];
            mem.read_slice(&mut f, GuestAddress(RX_BUF_BASE + u64::from(head) * 0x1000 + NET_HDR_LEN as u64)).unwrap();
            found |= f == inbound;
        }
        found
    }));
    println!("real TAP {name}: guest->host and host->guest frames passed");
}

/// Records every delivered frame as input forwarding sees it.
#[derive(Default)]
struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);

impl RxObserver for Recorder {
    fn delivered(&self, seq: u64, frame: &[u8]) {
        self.0.lock().unwrap().push((seq, frame.to_vec()));
    }
}

/// Input replay at frame level: the frames a device delivered after a checkpoint are numbered
/// above the delivery count saved in it; a device restored from that checkpoint and given
/// exactly those (`replay_rx`) delivers each once, in order, ahead of what the TAP brings, and
/// never one the checkpoint already holds. With too few receive buffers posted, the replayed
/// frames wait (in order, still ahead of the TAP) until the driver posts more.
#[test]
fn replay_delivers_the_frames_after_the_checkpoint_exactly_once_ahead_of_the_tap() {
    let mut h = Harness::new(true);
    let seen = Arc::new(Recorder::default());
    h.dev.device().set_rx_observer(Some(seen.clone()));
    for _ in 0..2 {
        h.post_rx(2048);
    }
    h.notify(0);
    let (a, b, c, d) = (frame(70, 60), frame(71, 61), frame(72, 62), frame(73, 63));
    peer_send(&h.peer, &a);
    peer_send(&h.peer, &b);
    assert!(wait_until(WAIT, || h.rxq.used_idx(&h.mem) == 2));
    // The checkpoint: the guest has received a and b.
    h.dev.pause();
    let state = h.dev.save();
    assert_eq!(state.rx_delivered, 2);
    let replica = copy_memory(&h.mem);
    // The replica's ring as the checkpoint left it: both buffers used, none free.
    let mut rxq = h.rxq.clone();
    h.dev.resume();
    // After the checkpoint the primary delivers c and d, then dies.
    h.post_rx(2048);
    h.post_rx(2048);
    h.notify(0);
    peer_send(&h.peer, &c);
    peer_send(&h.peer, &d);
    assert!(wait_until(WAIT, || h.rxq.used_idx(&h.mem) == 4));
    let log = seen.0.lock().unwrap().clone();
    assert_eq!(log, vec![(1, a.clone()), (2, b.clone()), (3, c.clone()), (4, d.clone())]);
    drop(h.dev);

    // The promoted replica: restored paused; a new frame e already waits on its TAP.
    let (tap, peer) = tap_pair();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let args = NetRestoreArgs {
        mem: replica.clone(),
        irq: irq.try_clone().unwrap(),
        tap: Arc::new(tap),
        sink: Box::new(VecSink::default()),
        paused: true,
    };
    let mut dev = VirtioMmio::<Net>::restore(args, &state).unwrap();
    assert_eq!(dev.device().rx_delivered(), 2);
    let e = frame(74, 64);
    peer_send(&peer, &e);
    // What the backup's log would replay: the frames numbered above the replica's count.
    let replay: Vec<Vec<u8>> =
        log.iter().filter(|(seq, _)| *seq > dev.device().rx_delivered()).map(|(_, f)| f.clone()).collect();
    assert_eq!(replay, vec![c.clone(), d.clone()]);
    // One buffer only: c goes in, d and e wait.
    let b3 = RX_BUF_BASE + 0x20000;
    rxq.add_chain(&replica, &[(b3, 2048, true)]);
    assert_eq!(dev.device().replay_rx(replay), 2);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(rxq.used_idx(&replica), 2, "nothing delivered before the guest resumes");
    dev.resume();
    assert!(wait_until(WAIT, || rxq.used_idx(&replica) == 3));
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(rxq.used_idx(&replica), 3, "one buffer, one frame");
    let read = |addr: u64, len: usize| {
        let mut v = vec![0u8; len];
        replica.read_slice(&mut v, GuestAddress(addr + NET_HDR_LEN as u64)).unwrap();
        v
    };
    assert_eq!(read(b3, 62), c);
    // More buffers: d (replayed) before e (from the TAP), then nothing else.
    let (b4, b5, b6) = (b3 + 0x1000, b3 + 0x2000, b3 + 0x3000);
    for b in [b4, b5, b6] {
        rxq.add_chain(&replica, &[(b, 2048, true)]);
    }
    wr(&mut dev, REG_QUEUE_NOTIFY, 0);
    assert!(wait_until(WAIT, || rxq.used_idx(&replica) == 5));
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(rxq.used_idx(&replica), 5, "a and b are never delivered again");
    assert_eq!(read(b4, 63), d);
    assert_eq!(read(b5, 64), e);
    let stats = dev.device().stats();
    assert_eq!(stats.rx_replayed.load(Ordering::Relaxed), 2);
    assert_eq!(stats.rx_frames.load(Ordering::Relaxed), 3);
    // The promoted device goes on counting from the checkpoint: 2 + c, d, e.
    assert_eq!(dev.device().rx_delivered(), 5);
    dev.pause();
    assert_eq!(dev.save().rx_delivered, 5);
}

#[test]
fn a_flow_tag_names_a_tcp_frames_ports_and_payload_and_nothing_else() {
    // Ethernet (14) + IPv4 without options (20) + TCP with a 20-byte header, 5 bytes of payload.
    let mut f = vec![0u8; 14 + 20 + 20 + 5];
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f[16..18].copy_from_slice(&(20u16 + 20 + 5).to_be_bytes());
    f[23] = 6;
    f[34..36].copy_from_slice(&40000u16.to_be_bytes());
    f[36..38].copy_from_slice(&11211u16.to_be_bytes());
    f[46] = 5 << 4;
    assert_eq!(FlowTag(&f).parse(), Some((40000, 11211, 5)));
    assert_eq!(FlowTag(&f).to_string(), "40000:11211:5");
    // UDP, ARP and a truncated frame are not TCP flows.
    let mut udp = f.clone();
    udp[23] = 17;
    assert_eq!(FlowTag(&udp).to_string(), "-");
    let mut arp = f.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_eq!(FlowTag(&arp).parse(), None);
    assert_eq!(FlowTag(&f[..40]).parse(), None);
}
