//! Guest-physical memory: finishing the identity map, and the arena workloads take memory from.
//!
//! Layout (see docs/guest.md): the image at 1 MiB (code, data, page tables, stacks, .bss);
//! the *arena* is the largest free stretch of RAM above 1 MiB outside the image and the boot
//! data. The heap comes first in the arena (1 MiB, or all the rest for `kv`), then the
//! `dirty` working set. Page directories for RAM above 4 GiB are in .bss (up to 64 GiB).

use crate::arch::flush_tlb;
use crate::pvh::{BootInfo, Region};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const PAGE: u64 = 4096;
/// PD entry: P | RW | US | A | D | PS (write-back).
const PDE_WB: u64 = 0xe7;
/// Intermediate entry: P | RW | US | A.
const PTE_TABLE: u64 = 0x27;
/// Page directories for RAM above 4 GiB (one per GiB).
const HIGH_PDS: usize = 64;

#[repr(C, align(4096))]
struct HighPds([[u64; 512]; HIGH_PDS]);

static mut HIGH_PD_PAGES: HighPds = HighPds([[0; 512]; HIGH_PDS]);

unsafe extern "C" {
    static pdpt: [u64; 512];
    static pd_low: [u64; 2048];
    static __image_start: u8;
    static __image_end: u8;
}

/// The image's extent.
pub fn image() -> Region {
    Region { start: (&raw const __image_start) as u64, end: (&raw const __image_end) as u64 }
}

/// A bump allocator over the arena.
pub struct Arena {
    /// Next free byte (page aligned).
    pub next: u64,
    /// End of the arena.
    pub end: u64,
}

impl Arena {
    /// Takes `bytes` (rounded up to pages), aligned to `align` (a power of two >= 4096).
    pub fn take(&mut self, bytes: u64, align: u64) -> Option<Region> {
        let start = self.next.checked_add(align - 1)? & !(align - 1);
        let end = start.checked_add(bytes.checked_add(PAGE - 1)? & !(PAGE - 1))?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(Region { start, end })
    }

    /// Bytes left.
    pub fn free(&self) -> u64 {
        self.end - self.next
    }
}

/// Removes `hole` from each region of `list` (which has room for the split pieces).
fn subtract(list: &mut [Region; 64], count: &mut usize, hole: Region) {
    if hole.len() == 0 {
        return;
    }
    let hole = Region { start: hole.start & !(PAGE - 1), end: (hole.end + PAGE - 1) & !(PAGE - 1) };
    let mut i = 0;
    while i < *count {
        let r = list[i];
        if hole.end <= r.start || hole.start >= r.end {
            i += 1;
            continue;
        }
        let left = Region { start: r.start, end: hole.start };
        let right = Region { start: hole.end, end: r.end };
        let mut pieces = 0;
        if left.start < left.end {
            list[i] = left;
            pieces += 1;
        }
        if right.start < right.end {
            if pieces == 0 {
                list[i] = right;
            } else if *count < list.len() {
                list[*count] = right;
                *count += 1;
            }
            pieces += 1;
        }
        if pieces == 0 {
            list[i] = list[*count - 1];
            *count -= 1;
        } else {
            i += 1;
        }
    }
}

/// Completes the identity map for the RAM in `boot` and returns the arena.
pub fn init(boot: &BootInfo) -> Arena {
    // Free RAM: RAM above 1 MiB minus the image and the boot data.
    let mut free = [Region::default(); 64];
    let mut count = 0;
    for r in boot.ram() {
        let start = r.start.max(MIB);
        if start < r.end && count < free.len() {
            free[count] = Region { start, end: r.end };
            count += 1;
        }
    }
    subtract(&mut free, &mut count, image());
    for d in boot.boot_data {
        subtract(&mut free, &mut count, d);
    }
    let best = free[..count].iter().copied().max_by_key(Region::len).unwrap_or_default();
    if best.len() == 0 {
        panic!("no free RAM after the image");
    }
    let arena = Arena { next: best.start, end: best.end };

    // RAM inside the MMIO hole (3-4 GiB, mapped uncached by boot.S) becomes write-back.
    let pd_low_ptr = (&raw const pd_low) as *mut u64;
    let pdpt_ptr = (&raw const pdpt) as *mut u64;
    let mut dirty = false;
    for r in boot.ram() {
        let mut a = r.start.max(3 * GIB).next_multiple_of(2 * MIB);
        while a + 2 * MIB <= r.end.min(4 * GIB) {
            // SAFETY: a < 4 GiB, so the index is within pd_low's 2048 entries; ring 3 may
            // write page tables (they are mapped user-writable) and flushes below.
            unsafe { pd_low_ptr.add((a / (2 * MIB)) as usize).write_volatile(a | PDE_WB) };
            dirty = true;
            a += 2 * MIB;
        }
    }
    // RAM above 4 GiB: one page directory per GiB, from .bss (below 4 GiB, so mapped).
    let mut used_pds = 0;
    for r in boot.ram() {
        if r.end <= 4 * GIB {
            continue;
        }
        let first = r.start.max(4 * GIB) / GIB;
        let last = r.end.div_ceil(GIB).min(512);
        for gib in first..last {
            // SAFETY: gib < 512 indexes pdpt.
            let slot = unsafe { pdpt_ptr.add(gib as usize) };
            // SAFETY: as above.
            if unsafe { slot.read_volatile() } != 0 {
                continue;
            }
            if used_pds == HIGH_PDS {
                crate::println!("guest: RAM above {} GiB left unmapped", 4 + HIGH_PDS);
                break;
            }
            // SAFETY: each directory is handed out once; nothing else refers to it yet.
            let pd = unsafe { &mut *(&raw mut HIGH_PD_PAGES).cast::<[u64; 512]>().add(used_pds) };
            used_pds += 1;
            for (i, e) in pd.iter_mut().enumerate() {
                *e = gib * GIB + i as u64 * 2 * MIB + PDE_WB;
            }
            // SAFETY: publishes the fully written directory (identity map: virt = phys).
            unsafe { slot.write_volatile(pd.as_ptr() as u64 | PTE_TABLE) };
            dirty = true;
        }
    }
    if dirty {
        flush_tlb();
    }
    arena
}
