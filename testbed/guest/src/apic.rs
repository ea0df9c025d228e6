//! LAPIC timer and IOAPIC routes, programmed from ring 3 through the identity map.
//!
//! KVM's LAPIC timer counts at the 1 GHz APIC bus clock; with divide-by-1 the initial count
//! for `hz` ticks per second is `1_000_000_000 / hz` (measured: docs/guest.md).

use crate::arch::{mmio_read32, mmio_write32};

const LAPIC: u64 = 0xfee0_0000;
const LAPIC_ID: u64 = 0x20;
const LAPIC_TPR: u64 = 0x80;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_LVT_LINT0: u64 = 0x350;
const LAPIC_LVT_ERROR: u64 = 0x370;
const LAPIC_TIMER_INIT: u64 = 0x380;
const LAPIC_TIMER_DIV: u64 = 0x3e0;
const IOAPIC: u64 = 0xfec0_0000;

/// Vector of the LAPIC timer (src/boot.S).
pub const VEC_TIMER: u32 = 0x20;
/// Vector of GSI 0; GSI g uses `VEC_DEV_BASE + g` (src/boot.S).
pub const VEC_DEV_BASE: u32 = 0x30;
/// GSIs with a vector.
pub const NUM_GSIS: u32 = 24;
/// LAPIC bus clock under KVM.
pub const APIC_BUS_HZ: u64 = 1_000_000_000;

fn lapic_write(reg: u64, val: u32) {
    // SAFETY: the LAPIC page is mapped (uncached) by boot.S; reg is a LAPIC register.
    unsafe { mmio_write32(LAPIC + reg, val) }
}

fn lapic_read(reg: u64) -> u32 {
    // SAFETY: as lapic_write.
    unsafe { mmio_read32(LAPIC + reg) }
}

/// Enables the LAPIC and starts the periodic timer at `hz`.
pub fn start_timer(hz: u32) {
    lapic_write(LAPIC_SVR, 0x100 | 0xff); // enabled, spurious vector 0xff
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_LVT_LINT0, 0x1_0000); // masked (the 8259s are masked too)
    lapic_write(LAPIC_LVT_ERROR, 0x1_0000);
    lapic_write(LAPIC_TIMER_DIV, 0xb); // divide by 1
    lapic_write(LAPIC_LVT_TIMER, 0x2_0000 | VEC_TIMER); // periodic
    lapic_write(LAPIC_TIMER_INIT, (APIC_BUS_HZ / u64::from(hz.max(1))) as u32);
}

/// Routes GSI `gsi` to this CPU, edge-triggered, active high, on `VEC_DEV_BASE + gsi`.
pub fn route_gsi(gsi: u32) {
    assert!(gsi < NUM_GSIS, "GSI {gsi} has no vector");
    let apic_id = lapic_read(LAPIC_ID) >> 24;
    let reg = 0x10 + 2 * gsi;
    // SAFETY: the IOAPIC window is mapped by boot.S; IOREGSEL at +0, IOWIN at +0x10.
    unsafe {
        mmio_write32(IOAPIC, reg + 1);
        mmio_write32(IOAPIC + 0x10, apic_id << 24);
        mmio_write32(IOAPIC, reg);
        mmio_write32(IOAPIC + 0x10, VEC_DEV_BASE + gsi);
    }
}
