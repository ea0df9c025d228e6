//! The fixture guest: a tiny x86-64 OS booted through PVH (QEMU `-M microvm -kernel`, or
//! our VMM), whose ring 0 (src/boot.S) only sets up the machine and whose workloads run in
//! ring 3. The contract with the VMM and the tests is docs/guest.md.
//!
//! Unsafe code is confined to what a kernel cannot avoid: port I/O, MMIO, page tables, the
//! allocator, virtqueue memory shared with the device, and the C runtime symbols in rt.rs.
#![no_std]
#![no_main]

extern crate alloc;

mod apic;
mod arch;
mod boot;
mod console;
mod heap;
mod mem;
mod net;
mod pvh;
mod rt;
mod time;
mod virtio;
mod workloads;

use guest_kv::cmdline::{self, Workload};

const MIB: u64 = 1 << 20;
/// Heap for every workload but `kv` (which takes the whole arena).
const BOOT_HEAP: u64 = MIB;

/// Ring 3 entry (called by `ring3_entry` in boot.S with `hvm_start_info` in rdi).
#[unsafe(no_mangle)]
extern "C" fn guest_main(start_info: u64) -> ! {
    console::init();
    let boot = pvh::BootInfo::read(start_info);
    let mut arena = mem::init(&boot);
    let heap = arena.take(BOOT_HEAP, 4096).expect("no room for the heap");
    // SAFETY: the range is fresh arena memory, handed to the heap for good.
    unsafe { heap::init(heap.start, heap.len()) };
    let cfg = match cmdline::parse(boot.cmdline()) {
        Ok(c) => c,
        Err(e) => panic!("bad command line: {e}"),
    };
    time::init(cfg.hz);
    // `crash=panic|pf|ud`: fail on purpose, for tests of the fatal-error paths.
    match cmdline::get(boot.cmdline(), "crash") {
        Some("panic") => panic!("crash=panic requested"),
        // SAFETY: none; this faults on purpose (nothing is mapped at 512 GiB).
        Some("pf") => unsafe { core::ptr::read_volatile(0x80_0000_0000 as *const u64) },
        Some("ud") => arch::ud2(),
        _ => 0,
    };
    println!(
        "boot: ram={}MiB free={}MiB hz={}{}",
        boot.ram_bytes() / MIB,
        (arena.free() + heap.len()) / MIB,
        cfg.hz,
        if boot.had_memmap { "" } else { " (no memmap)" }
    );
    match cfg.workload {
        Workload::Counter { period_ms } => workloads::counter::run(period_ms),
        Workload::Dirty { wss_mib, rate, report_ms } => {
            let free = arena.free();
            let Some(ws) = arena.take(wss_mib * MIB, 2 * MIB) else {
                panic!("dirty: wss={wss_mib}MiB does not fit in {}MiB of free RAM", free / MIB);
            };
            workloads::dirty::run(ws, rate, report_ms)
        }
        Workload::Kv(kv) => {
            // The heap takes the whole arena; the store gets a quarter of it unless `mem=`
            // says otherwise (capped at half, so protocol buffers and smoltcp always fit).
            let rest = arena.free();
            // SAFETY: the heap sits at the arena's start and the arena is contiguous above it.
            unsafe { heap::extend(rest) };
            let heap_bytes = heap::size();
            let limit = match kv.mem_mib {
                Some(m) if m * MIB <= heap_bytes / 2 => m * MIB,
                Some(m) => {
                    println!("kv: mem={m}MiB exceeds half the heap, using {}MiB", heap_bytes / 2 / MIB);
                    heap_bytes / 2
                }
                None => heap_bytes / 4,
            };
            let devices: alloc::vec::Vec<(u64, u32)> = cfg.virtio_mmio.iter().map(|d| (d.base, d.irq)).collect();
            workloads::kv::run(kv, &devices, limit)
        }
    }
}
