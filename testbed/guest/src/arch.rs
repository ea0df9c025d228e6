//! Ring-3 view of the machine: port I/O, MMIO, system calls, the counters ring 0 updates.
//!
//! Everything here runs natively in ring 3 (IOPL=3 plus an all-zero TSS I/O bitmap allow the
//! port I/O; the identity map is user-accessible, so MMIO is plain volatile access).

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// LAPIC timer ticks since the timer was started (incremented by ring 0).
#[unsafe(no_mangle)]
pub static GUEST_TICKS: AtomicU64 = AtomicU64::new(0);
/// Interrupts taken (timer and devices), for [`halt_until_changed`].
#[unsafe(no_mangle)]
pub static GUEST_IRQ_COUNT: AtomicU64 = AtomicU64::new(0);
/// Bit `g` is set by ring 0 when the device interrupt for GSI `g` arrives.
#[unsafe(no_mangle)]
pub static GUEST_IRQ_PENDING: AtomicU64 = AtomicU64::new(0);

/// System call numbers (`rax` of `int3`), see src/boot.S.
pub const SYS_HALT: u64 = 0;
/// Stop for good.
pub const SYS_EXIT: u64 = 1;
/// Reload CR3.
pub const SYS_FLUSH_TLB: u64 = 2;

/// Ticks so far.
pub fn ticks() -> u64 {
    GUEST_TICKS.load(Ordering::Relaxed)
}

/// Interrupts so far.
pub fn irq_count() -> u64 {
    GUEST_IRQ_COUNT.load(Ordering::SeqCst)
}

/// Takes (and clears) the pending device interrupt bits.
pub fn take_irq_pending() -> u64 {
    if GUEST_IRQ_PENDING.load(Ordering::Relaxed) == 0 {
        return 0;
    }
    GUEST_IRQ_PENDING.swap(0, Ordering::SeqCst)
}

fn syscall2(nr: u64, a: u64, b: u64) -> u64 {
    let ret;
    // SAFETY: int3 enters ring 0 through the DPL-3 gate on vector 3 (src/boot.S), which
    // preserves every register but rax and touches no Rust-visible memory.
    unsafe {
        asm!("int3", inlateout("rax") nr => ret, in("rdi") a, in("rsi") b, options(nostack));
    }
    ret
}

/// Sleeps in ring 0 (`sti; hlt`) until the next interrupt, unless `GUEST_IRQ_COUNT` already
/// differs from `seen` (an interrupt came after the caller looked): no lost wake-ups.
pub fn halt_until_changed(seen: u64) {
    syscall2(SYS_HALT, GUEST_IRQ_COUNT.as_ptr() as u64, seen);
}

/// Stops the guest for good.
pub fn exit() -> ! {
    loop {
        syscall2(SYS_EXIT, 0, 0);
    }
}

/// Flushes the TLB after page-table edits.
pub fn flush_tlb() {
    syscall2(SYS_FLUSH_TLB, 0, 0);
}

/// `out` a byte.
pub fn outb(port: u16, val: u8) {
    // SAFETY: port I/O has no effect on Rust-visible memory; the TSS bitmap allows it.
    unsafe { asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags)) }
}

/// `in` a byte.
pub fn inb(port: u16) -> u8 {
    let v;
    // SAFETY: as for outb.
    unsafe { asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags)) }
    v
}

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the TSC (CR4.TSD is clear).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Raises #UD (for `crash=ud`).
pub fn ud2() -> u64 {
    // SAFETY: traps into ring 0, which reports the exception and stops the guest.
    unsafe { asm!("ud2", options(nomem, nostack)) };
    0
}

/// Spin-loop hint.
pub fn pause() {
    core::hint::spin_loop();
}

/// Reads a 32-bit MMIO register at a guest-physical (= virtual) address.
///
/// # Safety
/// `addr` must be a mapped, 4-byte aligned device register.
pub unsafe fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: the caller guarantees addr is a valid register.
    unsafe { (addr as *const u32).read_volatile() }
}

/// Writes a 32-bit MMIO register.
///
/// # Safety
/// `addr` must be a mapped, 4-byte aligned device register.
pub unsafe fn mmio_write32(addr: u64, val: u32) {
    // SAFETY: the caller guarantees addr is a valid register.
    unsafe { (addr as *mut u32).write_volatile(val) }
}

/// Full memory barrier (orders the guest's ring stores against its later loads).
pub fn mb() {
    core::sync::atomic::fence(Ordering::SeqCst);
}
