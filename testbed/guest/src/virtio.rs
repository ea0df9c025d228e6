//! virtio-mmio (version 2, the modern register layout) and split virtqueues, from ring 3.
//!
//! Every register access is an exit (~30-40 us), so the hot path touches only the rings in
//! guest memory; doorbells (QueueNotify) are batched and skipped while the device says it
//! does not need them (VIRTQ_USED_F_NO_NOTIFY), and interrupts are suppressed
//! (VIRTQ_AVAIL_F_NO_INTERRUPT) while the driver polls.

use crate::arch::{mb, mmio_read32, mmio_write32};
use alloc::alloc::{Layout, alloc_zeroed};
use core::sync::atomic::{Ordering, fence};

/// "virt"
pub const MAGIC: u32 = 0x7472_6976;
/// Device ID of a network card.
pub const DEVICE_NET: u32 = 1;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
/// Start of the device-specific configuration space.
pub const REG_CONFIG: u64 = 0x100;

/// Device status bits.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// The guest has a driver.
pub const STATUS_DRIVER: u32 = 2;
/// The driver is ready.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Feature negotiation done.
pub const STATUS_FEATURES_OK: u32 = 8;
/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;

const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// A virtio-mmio register window.
#[derive(Clone, Copy, Debug)]
pub struct Mmio {
    /// Guest-physical base.
    pub base: u64,
}

impl Mmio {
    /// Reads a register.
    pub fn read(&self, reg: u64) -> u32 {
        // SAFETY: `base` comes from the command line's virtio_mmio.device and lies in the
        // identity-mapped MMIO hole; reg is a virtio-mmio register offset.
        unsafe { mmio_read32(self.base + reg) }
    }

    /// Writes a register.
    pub fn write(&self, reg: u64, val: u32) {
        // SAFETY: as read.
        unsafe { mmio_write32(self.base + reg, val) }
    }

    /// Reads a byte of the configuration space.
    pub fn config_u8(&self, off: u64) -> u8 {
        // SAFETY: as read; byte access is allowed to the config space.
        unsafe { ((self.base + REG_CONFIG + off) as *const u8).read_volatile() }
    }

    /// (version, device id) if a virtio-mmio device is there.
    pub fn probe(&self) -> Option<(u32, u32)> {
        if self.read(REG_MAGIC) != MAGIC {
            return None;
        }
        Some((self.read(REG_VERSION), self.read(REG_DEVICE_ID)))
    }

    /// Resets the device and negotiates features: VERSION_1 is required, `wanted` are taken
    /// where offered. Returns the features accepted.
    pub fn negotiate(&self, wanted: u64) -> u64 {
        self.write(REG_STATUS, 0);
        let mut spins = 0;
        while self.read(REG_STATUS) != 0 {
            spins += 1;
            assert!(spins < 1000, "virtio device at {:#x} does not reset", self.base);
        }
        self.write(REG_STATUS, STATUS_ACKNOWLEDGE);
        self.write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.write(REG_DEVICE_FEATURES_SEL, 0);
        let lo = u64::from(self.read(REG_DEVICE_FEATURES));
        self.write(REG_DEVICE_FEATURES_SEL, 1);
        let hi = u64::from(self.read(REG_DEVICE_FEATURES));
        let offered = lo | (hi << 32);
        assert!(offered & F_VERSION_1 != 0, "virtio device at {:#x} lacks VIRTIO_F_VERSION_1", self.base);
        let accepted = offered & (wanted | F_VERSION_1);
        self.write(REG_DRIVER_FEATURES_SEL, 0);
        self.write(REG_DRIVER_FEATURES, accepted as u32);
        self.write(REG_DRIVER_FEATURES_SEL, 1);
        self.write(REG_DRIVER_FEATURES, (accepted >> 32) as u32);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.write(REG_STATUS, s);
        assert!(self.read(REG_STATUS) & STATUS_FEATURES_OK != 0, "virtio device refused features {accepted:#x}");
        accepted
    }

    /// Sets DRIVER_OK: the device is live.
    pub fn driver_ok(&self) {
        self.write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    }

    /// Acknowledges whatever interrupt causes are pending.
    pub fn ack_interrupt(&self) {
        let s = self.read(REG_INTERRUPT_STATUS);
        if s != 0 {
            self.write(REG_INTERRUPT_ACK, s);
        }
    }

    /// Rings queue `index`'s doorbell.
    pub fn notify(&self, index: u16) {
        self.write(REG_QUEUE_NOTIFY, u32::from(index));
    }
}

/// One split virtqueue (descriptor table, available ring, used ring).
pub struct Virtqueue {
    /// Entries.
    pub size: u16,
    desc: *mut u8,
    avail: *mut u16,
    used: *mut u8,
    avail_idx: u16,
    last_used: u16,
    published: u16,
}

fn alloc_pages(bytes: usize) -> *mut u8 {
    let layout = Layout::from_size_align(bytes.next_multiple_of(4096), 4096).expect("virtqueue layout");
    // SAFETY: non-zero size.
    let p = unsafe { alloc_zeroed(layout) };
    assert!(!p.is_null(), "out of memory for a virtqueue");
    p
}

impl Virtqueue {
    /// Sets up queue `index` of `mmio` with at most `max` entries.
    pub fn new(mmio: &Mmio, index: u16, max: u16) -> Self {
        mmio.write(REG_QUEUE_SEL, u32::from(index));
        assert!(mmio.read(REG_QUEUE_READY) == 0, "queue {index} already live");
        let dev_max = mmio.read(REG_QUEUE_NUM_MAX);
        assert!(dev_max != 0, "queue {index} does not exist");
        // The largest power of two the device and the caller both allow.
        let m = dev_max.min(u32::from(max)) as u16;
        let size = 1u16 << (15 - m.leading_zeros());
        let n = usize::from(size);
        let desc = alloc_pages(16 * n);
        let avail = alloc_pages(6 + 2 * n) as *mut u16;
        let used = alloc_pages(6 + 8 * n);
        mmio.write(REG_QUEUE_NUM, u32::from(size));
        for (lo, hi, addr) in [
            (REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH, desc as u64),
            (REG_QUEUE_DRIVER_LOW, REG_QUEUE_DRIVER_HIGH, avail as u64),
            (REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH, used as u64),
        ] {
            mmio.write(lo, addr as u32);
            mmio.write(hi, (addr >> 32) as u32);
        }
        mmio.write(REG_QUEUE_READY, 1);
        Virtqueue { size, desc, avail, used, avail_idx: 0, last_used: 0, published: 0 }
    }

    /// Fills descriptor `id` with one buffer (no chaining).
    pub fn set_desc(&mut self, id: u16, addr: u64, len: u32, device_writes: bool) {
        assert!(id < self.size);
        // SAFETY: id < size, the table has `size` 16-byte entries owned by the driver until
        // the descriptor is made available.
        unsafe {
            let d = self.desc.add(16 * usize::from(id));
            (d as *mut u64).write_volatile(addr);
            (d.add(8) as *mut u32).write_volatile(len);
            (d.add(12) as *mut u16).write_volatile(if device_writes { DESC_F_WRITE } else { 0 });
            (d.add(14) as *mut u16).write_volatile(0);
        }
    }

    /// Queues descriptor `id` on the available ring (seen by the device after `publish`).
    pub fn push_avail(&mut self, id: u16) {
        let slot = usize::from(self.avail_idx % self.size);
        // SAFETY: ring entries follow flags and idx; slot < size.
        unsafe { self.avail.add(2 + slot).write_volatile(id) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Makes the queued descriptors visible; returns whether the device wants a doorbell.
    pub fn publish(&mut self) -> bool {
        if self.published == self.avail_idx {
            return false;
        }
        fence(Ordering::Release);
        // SAFETY: idx is the second u16 of the available ring.
        unsafe { self.avail.add(1).write_volatile(self.avail_idx) };
        self.published = self.avail_idx;
        mb();
        // SAFETY: flags is the first u16 of the used ring, written by the device.
        let flags = unsafe { (self.used as *const u16).read_volatile() };
        flags & USED_F_NO_NOTIFY == 0
    }

    fn used_idx(&self) -> u16 {
        // SAFETY: idx is the second u16 of the used ring.
        let idx = unsafe { (self.used as *const u16).add(1).read_volatile() };
        fence(Ordering::Acquire);
        idx
    }

    /// Whether the device has returned buffers not yet popped.
    pub fn has_used(&self) -> bool {
        self.used_idx() != self.last_used
    }

    /// Takes the next returned buffer: (descriptor id, bytes written by the device).
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        if self.used_idx() == self.last_used {
            return None;
        }
        let slot = usize::from(self.last_used % self.size);
        // SAFETY: used elements (8 bytes: id u32, len u32) follow flags and idx.
        let (id, len) = unsafe {
            let e = self.used.add(4 + 8 * slot);
            ((e as *const u32).read_volatile(), (e.add(4) as *const u32).read_volatile())
        };
        self.last_used = self.last_used.wrapping_add(1);
        Some((id as u16, len))
    }

    /// Asks the device for (or spares it) an interrupt when it returns buffers.
    pub fn set_interrupts(&mut self, on: bool) {
        // SAFETY: flags is the first u16 of the available ring.
        unsafe { self.avail.write_volatile(if on { 0 } else { AVAIL_F_NO_INTERRUPT }) };
    }
}
