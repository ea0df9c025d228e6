//! Time from the LAPIC tick.

use crate::arch::ticks;
use core::sync::atomic::{AtomicU32, Ordering};

static HZ: AtomicU32 = AtomicU32::new(100);

/// Starts the tick at `hz` per second.
pub fn init(hz: u32) {
    HZ.store(hz, Ordering::Relaxed);
    crate::apic::start_timer(hz);
}

/// Ticks per second.
pub fn hz() -> u64 {
    u64::from(HZ.load(Ordering::Relaxed))
}

/// Milliseconds since the timer started (tick resolution).
pub fn now_ms() -> u64 {
    ticks() * 1000 / hz()
}
