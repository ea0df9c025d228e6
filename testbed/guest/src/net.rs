//! virtio-net over virtio-mmio, as a smoltcp `Device`.
//!
//! Features: VIRTIO_F_VERSION_1 (required) and VIRTIO_NET_F_MAC (if offered; otherwise a
//! locally administered MAC is made up from the IP address). No offloads, no mergeable
//! buffers: every buffer holds the 12-byte virtio_net_hdr plus one whole frame (2 KiB).
//! Queue 0 receives, queue 1 transmits.

use crate::virtio::{DEVICE_NET, Mmio, Virtqueue};
use alloc::alloc::{Layout, alloc_zeroed};
use alloc::vec::Vec;
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;

/// VIRTIO_NET_F_MAC.
pub const F_MAC: u64 = 1 << 5;
/// virtio_net_hdr with VERSION_1 (num_buffers included).
pub const HDR_LEN: usize = 12;
/// One buffer per descriptor.
const BUF_LEN: usize = 2048;
/// Largest Ethernet frame without the FCS.
pub const MAX_FRAME: usize = 1514;
/// Entries per queue.
const QUEUE_MAX: u16 = 256;
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;

struct Buffers(*mut u8);

impl Buffers {
    fn new(count: usize) -> Self {
        let layout = Layout::from_size_align(count * BUF_LEN, 4096).expect("buffer layout");
        // SAFETY: non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        assert!(!p.is_null(), "out of memory for network buffers");
        Buffers(p)
    }
    fn addr(&self, id: u16) -> u64 {
        self.0 as u64 + u64::from(id) * BUF_LEN as u64
    }
    /// # Safety
    /// Descriptor `id` must be owned by the driver (not on the available ring).
    unsafe fn slice(&mut self, id: u16, len: usize) -> &mut [u8] {
        // SAFETY: the caller owns the buffer; len <= BUF_LEN is asserted by callers.
        unsafe { core::slice::from_raw_parts_mut(self.0.add(usize::from(id) * BUF_LEN), len) }
    }
}

/// Receive side.
pub struct Rx {
    q: Virtqueue,
    bufs: Buffers,
}

/// Transmit side.
pub struct Tx {
    q: Virtqueue,
    bufs: Buffers,
    free: Vec<u16>,
}

/// The card.
pub struct VirtioNet {
    mmio: Mmio,
    /// Its MAC address.
    pub mac: [u8; 6],
    rx: Rx,
    tx: Tx,
}

impl VirtioNet {
    /// Finds the first virtio-net among `devices` ((base, gsi) pairs).
    pub fn find(devices: &[(u64, u32)]) -> Option<(Mmio, u32)> {
        for &(base, gsi) in devices {
            let m = Mmio { base };
            match m.probe() {
                Some((2, DEVICE_NET)) => return Some((m, gsi)),
                Some((1, DEVICE_NET)) => {
                    panic!("virtio-net at {base:#x} is legacy (version 1): only virtio-mmio version 2 is supported")
                }
                _ => {}
            }
        }
        None
    }

    /// Brings the card up; `fallback_mac` is used when the device offers none.
    pub fn new(mmio: Mmio, fallback_mac: [u8; 6]) -> Self {
        let features = mmio.negotiate(F_MAC);
        let mac = if features & F_MAC != 0 {
            let mut m = [0u8; 6];
            for (i, b) in m.iter_mut().enumerate() {
                *b = mmio.config_u8(i as u64);
            }
            m
        } else {
            fallback_mac
        };
        let rxq = Virtqueue::new(&mmio, RX_QUEUE, QUEUE_MAX);
        let txq = Virtqueue::new(&mmio, TX_QUEUE, QUEUE_MAX);
        let mut rx = Rx { bufs: Buffers::new(usize::from(rxq.size)), q: rxq };
        let tx_size = txq.size;
        let tx = Tx { bufs: Buffers::new(usize::from(tx_size)), q: txq, free: (0..tx_size).rev().collect() };
        for id in 0..rx.q.size {
            let addr = rx.bufs.addr(id);
            rx.q.set_desc(id, addr, BUF_LEN as u32, true);
            rx.q.push_avail(id);
        }
        let mut net = VirtioNet { mmio, mac, rx, tx };
        net.rx.q.set_interrupts(false);
        net.tx.q.set_interrupts(false);
        mmio.driver_ok();
        net.flush();
        net.mmio.ack_interrupt();
        net
    }

    /// Publishes queued buffers and rings the doorbells the device asked for.
    pub fn flush(&mut self) {
        if self.rx.q.publish() {
            self.mmio.notify(RX_QUEUE);
        }
        if self.tx.q.publish() {
            self.mmio.notify(TX_QUEUE);
        }
    }

    /// Whether a received frame is waiting.
    pub fn rx_pending(&self) -> bool {
        self.rx.q.has_used()
    }

    /// Asks for (or stops) receive interrupts, to sleep (or poll).
    pub fn set_rx_interrupts(&mut self, on: bool) {
        self.rx.q.set_interrupts(on);
    }

    /// Acknowledges the device interrupt (call when its GSI fired).
    pub fn ack_interrupt(&self) {
        self.mmio.ack_interrupt();
    }
}

impl Tx {
    fn reclaim(&mut self) {
        while let Some((id, _)) = self.q.pop_used() {
            self.free.push(id);
        }
    }
}

/// A received frame.
pub struct NetRx<'a> {
    rx: &'a mut Rx,
    id: u16,
    len: usize,
}

/// Room for one frame to send.
pub struct NetTx<'a> {
    tx: &'a mut Tx,
}

impl RxToken for NetRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let len = self.len.clamp(HDR_LEN, BUF_LEN);
        // SAFETY: the device returned this descriptor; it is ours until re-queued below.
        let buf = unsafe { self.rx.bufs.slice(self.id, len) };
        let r = f(&buf[HDR_LEN..]);
        self.rx.q.push_avail(self.id);
        r
    }
}

impl TxToken for NetTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        assert!(len <= BUF_LEN - HDR_LEN, "frame of {len} bytes");
        let id = self.tx.free.pop().expect("NetTx without a free descriptor");
        // SAFETY: id came off the free list: the device does not own it.
        let buf = unsafe { self.tx.bufs.slice(id, HDR_LEN + len) };
        buf[..HDR_LEN].fill(0);
        let r = f(&mut buf[HDR_LEN..]);
        let addr = self.tx.bufs.addr(id);
        self.tx.q.set_desc(id, addr, (HDR_LEN + len) as u32, false);
        self.tx.q.push_avail(id);
        r
    }
}

impl Device for VirtioNet {
    type RxToken<'a> = NetRx<'a>;
    type TxToken<'a> = NetTx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(NetRx<'_>, NetTx<'_>)> {
        self.tx.reclaim();
        if self.tx.free.is_empty() {
            // An answer could not be sent: leave the frame until a descriptor frees up.
            return None;
        }
        let (id, len) = self.rx.q.pop_used()?;
        Some((NetRx { rx: &mut self.rx, id, len: len as usize }, NetTx { tx: &mut self.tx }))
    }

    fn transmit(&mut self, _: Instant) -> Option<NetTx<'_>> {
        self.tx.reclaim();
        if self.tx.free.is_empty() {
            return None;
        }
        Some(NetTx { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps.max_burst_size = Some(usize::from(QUEUE_MAX) / 2);
        caps
    }
}
