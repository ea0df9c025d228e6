//! A mock guest driver for device tests: it writes split virtqueues into a [`GuestMemory`]
//! and drives the virtio-mmio registers the way a Linux guest does.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

pub(crate) use super::mmio::{
    REG_DEVICE_FEATURES, REG_DEVICE_FEATURES_SEL, REG_DRIVER_FEATURES, REG_DRIVER_FEATURES_SEL, REG_INTERRUPT_ACK,
    REG_INTERRUPT_STATUS, REG_QUEUE_DESC_HIGH, REG_QUEUE_DESC_LOW, REG_QUEUE_DEVICE_HIGH, REG_QUEUE_DEVICE_LOW,
    REG_QUEUE_DRIVER_HIGH, REG_QUEUE_DRIVER_LOW, REG_QUEUE_NOTIFY, REG_QUEUE_NUM, REG_QUEUE_NUM_MAX, REG_QUEUE_READY,
    REG_QUEUE_SEL, REG_STATUS,
};
use super::status;
use crate::bus::BusDevice;
use crate::memory::GuestMemory;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;

/// One MiB of guest memory at address 0, with a dirty bitmap.
pub(crate) fn guest_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

/// Whether the VMM's dirty bitmap has the page holding `addr` set.
pub(crate) fn is_dirty(mem: &GuestMemory, addr: u64) -> bool {
    let region = mem.find_region(GuestAddress(addr)).unwrap();
    // Single region at 0 in these tests: the address is the region offset.
    (**region).bitmap().is_addr_set(addr as usize)
}

/// Clears the VMM's dirty bitmap (what a harvest does).
pub(crate) fn clear_dirty(mem: &GuestMemory) {
    for region in mem.iter() {
        (**region).bitmap().reset();
    }
}

/// Polls `f` until it holds or `timeout` passes.
pub(crate) fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub(crate) fn rd(dev: &mut dyn BusDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read(offset, &mut b);
    u32::from_le_bytes(b)
}

pub(crate) fn wr(dev: &mut dyn BusDevice, offset: u64, v: u32) {
    dev.write(offset, &v.to_le_bytes());
}

/// Reset, ACKNOWLEDGE, DRIVER, features (`want` & offered), FEATURES_OK. Returns the status
/// read back (FEATURES_OK is missing if the device refused).
pub(crate) fn negotiate(dev: &mut dyn BusDevice, want: u64) -> u32 {
    wr(dev, REG_STATUS, 0);
    assert_eq!(rd(dev, REG_STATUS), 0);
    wr(dev, REG_STATUS, status::ACKNOWLEDGE);
    wr(dev, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(dev, REG_DEVICE_FEATURES_SEL, 1);
    let hi = rd(dev, REG_DEVICE_FEATURES);
    wr(dev, REG_DEVICE_FEATURES_SEL, 0);
    let lo = rd(dev, REG_DEVICE_FEATURES);
    let offered = (u64::from(hi) << 32) | u64::from(lo);
    let acked = offered & want;
    wr(dev, REG_DRIVER_FEATURES_SEL, 1);
    wr(dev, REG_DRIVER_FEATURES, (acked >> 32) as u32);
    wr(dev, REG_DRIVER_FEATURES_SEL, 0);
    wr(dev, REG_DRIVER_FEATURES, acked as u32);
    wr(dev, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    rd(dev, REG_STATUS)
}

/// Sets DRIVER_OK on top of the negotiated status; returns the status read back.
pub(crate) fn driver_ok(dev: &mut dyn BusDevice) -> u32 {
    let s = rd(dev, REG_STATUS);
    wr(dev, REG_STATUS, s | status::DRIVER_OK);
    rd(dev, REG_STATUS)
}

/// The driver's view of one split virtqueue: descriptor table at `base`, available ring
/// one page up, used ring two pages up.
#[derive(Clone, Debug)]
pub(crate) struct DriverQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
}

impl DriverQueue {
    pub(crate) fn new(base: u64, size: u16) -> Self {
        assert!(size <= 256);
        Self { size, desc: base, avail: base + 0x1000, used: base + 0x2000, next_desc: 0, avail_idx: 0, last_used: 0 }
    }

    /// Programs queue `index` through the registers and marks it ready.
    pub(crate) fn setup(&self, dev: &mut dyn BusDevice, index: u32) {
        wr(dev, REG_QUEUE_SEL, index);
        assert_eq!(rd(dev, REG_QUEUE_READY), 0);
        assert!(rd(dev, REG_QUEUE_NUM_MAX) >= u32::from(self.size));
        wr(dev, REG_QUEUE_NUM, u32::from(self.size));
        wr(dev, REG_QUEUE_DESC_LOW, self.desc as u32);
        wr(dev, REG_QUEUE_DESC_HIGH, (self.desc >> 32) as u32);
        wr(dev, REG_QUEUE_DRIVER_LOW, self.avail as u32);
        wr(dev, REG_QUEUE_DRIVER_HIGH, (self.avail >> 32) as u32);
        wr(dev, REG_QUEUE_DEVICE_LOW, self.used as u32);
        wr(dev, REG_QUEUE_DEVICE_HIGH, (self.used >> 32) as u32);
        wr(dev, REG_QUEUE_READY, 1);
        assert_eq!(rd(dev, REG_QUEUE_READY), 1);
    }

    /// Writes a chain of `(addr, len, device_writable)` buffers and publishes it in the
    /// available ring. Returns the head descriptor index.
    pub(crate) fn add_chain(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let idx = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let mut flags = if writable { DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            let d = self.desc + 16 * u64::from(idx);
            mem.write_obj(addr.to_le(), GuestAddress(d)).unwrap();
            mem.write_obj(len.to_le(), GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags.to_le(), GuestAddress(d + 12)).unwrap();
            mem.write_obj(self.next_desc.to_le(), GuestAddress(d + 14)).unwrap();
        }
        self.publish(mem, head);
        head
    }

    /// Writes `bufs` as an indirect table at `table` and publishes a single descriptor
    /// pointing to it. Returns the head descriptor index.
    pub(crate) fn add_indirect(&mut self, mem: &GuestMemory, table: u64, bufs: &[(u64, u32, bool)]) -> u16 {
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let mut flags = if writable { DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            let d = table + 16 * i as u64;
            mem.write_obj(addr.to_le(), GuestAddress(d)).unwrap();
            mem.write_obj(len.to_le(), GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags.to_le(), GuestAddress(d + 12)).unwrap();
            mem.write_obj((i as u16 + 1).to_le(), GuestAddress(d + 14)).unwrap();
        }
        let head = self.next_desc;
        self.next_desc = (self.next_desc + 1) % self.size;
        let d = self.desc + 16 * u64::from(head);
        mem.write_obj(table.to_le(), GuestAddress(d)).unwrap();
        mem.write_obj((16 * bufs.len() as u32).to_le(), GuestAddress(d + 8)).unwrap();
        mem.write_obj(DESC_F_INDIRECT.to_le(), GuestAddress(d + 12)).unwrap();
        self.publish(mem, head);
        head
    }

    fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2)).unwrap();
    }

    /// Sets the available ring's flags (bit 0: the driver wants no interrupts).
    pub(crate) fn set_avail_flags(&self, mem: &GuestMemory, flags: u16) {
        mem.write_obj(flags.to_le(), GuestAddress(self.avail)).unwrap();
    }

    /// The used ring's idx as the device last wrote it.
    pub(crate) fn used_idx(&self, mem: &GuestMemory) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).unwrap())
    }

    /// The used ring's flags (bit 0: the device asks for no notifications).
    pub(crate) fn used_flags(&self, mem: &GuestMemory) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.used)).unwrap())
    }

    /// The device's `avail_event` (EVENT_IDX).
    pub(crate) fn avail_event(&self, mem: &GuestMemory) -> u16 {
        let a = self.used + 4 + 8 * u64::from(self.size);
        u16::from_le(mem.read_obj(GuestAddress(a)).unwrap())
    }

    /// Sets the driver's `used_event` (EVENT_IDX).
    pub(crate) fn set_used_event(&self, mem: &GuestMemory, v: u16) {
        let a = self.avail + 4 + 2 * u64::from(self.size);
        mem.write_obj(v.to_le(), GuestAddress(a)).unwrap();
    }

    /// Takes the next used element, if the device has returned one: `(head, len)`.
    pub(crate) fn pop_used(&mut self, mem: &GuestMemory) -> Option<(u32, u32)> {
        if self.used_idx(mem) == self.last_used {
            return None;
        }
        let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let id = u32::from_le(mem.read_obj(GuestAddress(e)).unwrap());
        let len = u32::from_le(mem.read_obj(GuestAddress(e + 4)).unwrap());
        self.last_used = self.last_used.wrapping_add(1);
        Some((id, len))
    }

    /// The address of used-ring element `i` (for dirty-bit checks).
    pub(crate) fn used_elem_addr(&self, i: u16) -> u64 {
        self.used + 4 + 8 * u64::from(i % self.size)
    }
}
