//! Guest memory.
//!
//! Guest memory is a vm-memory [`GuestMemoryMmap`] whose regions carry an [`AtomicBitmap`]:
//! every write the VMM itself makes through the vm-memory API (virtio rings, received packets,
//! boot structures) sets the page's bit there. The KVM dirty log tracks the guest's own writes;
//! a dirty harvest ORs the two.

use vm_memory::bitmap::AtomicBitmap;

/// Guest page size used for dirty tracking and checkpoints.
pub const PAGE_SIZE: usize = 4096;

/// The bitmap type tracking the VMM's own writes to guest memory.
pub type Bitmap = AtomicBitmap;

/// Guest physical memory as the whole VMM sees it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<Bitmap>;

/// One region of guest memory.
pub type GuestRegion = vm_memory::GuestRegionMmap<Bitmap>;

use std::fs::File;
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::{Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Errors setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap of a region failed.
    #[error("map guest memory region at {gpa:#x} ({size} bytes)")]
    Map {
        /// Guest-physical start.
        gpa: u64,
        /// Size in bytes.
        size: u64,
        /// Why.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The regions do not form a valid guest memory.
    #[error("guest memory regions")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    /// A region overflows the address space.
    #[error("guest memory region at {0:#x} overflows")]
    Overflow(u64),
}

fn new_region(gpa: u64, size: u64, file: Option<(&Arc<File>, u64)>) -> Result<GuestRegion, MemoryError> {
    let map_err = |source| MemoryError::Map { gpa, size, source };
    let bitmap = Bitmap::new(size as usize, std::num::NonZeroUsize::new(PAGE_SIZE).expect("page size"));
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let mut builder = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(size as usize, bitmap).with_mmap_prot(prot);
    builder = match file {
        // A private mapping of the file: the guest's writes never reach the file.
        Some((f, offset)) => builder
            .with_file_offset(FileOffset::from_arc(Arc::clone(f), offset))
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE),
        None => builder.with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE),
    };
    let region: MmapRegion<Bitmap> = builder.build().map_err(map_err)?;
    GuestRegion::new(region, GuestAddress(gpa)).ok_or(MemoryError::Overflow(gpa))
}

/// Anonymous guest memory of `size` bytes laid out as [`crate::layout::ram_regions`].
pub fn create_anonymous(size: u64) -> Result<GuestMemory, MemoryError> {
    let regions = crate::layout::ram_regions(size)
        .into_iter()
        .map(|(gpa, len)| new_region(gpa, len, None))
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemory::from_regions(regions).map_err(MemoryError::Regions)
}

/// Guest memory mapped privately (copy-on-write) from `file`: each `(gpa, size, offset)`
/// maps `size` bytes at file `offset` to guest-physical `gpa`. Restoring this way costs no
/// copy; pages are read from the file as the guest touches them.
pub fn create_from_file(file: &Arc<File>, regions: &[(u64, u64, u64)]) -> Result<GuestMemory, MemoryError> {
    let regions = regions
        .iter()
        .map(|&(gpa, len, offset)| new_region(gpa, len, Some((file, offset))))
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemory::from_regions(regions).map_err(MemoryError::Regions)
}

/// The layout of guest memory as `(guest-physical start, size)` pairs.
pub fn layout_of(mem: &GuestMemory) -> Vec<(u64, u64)> {
    mem.iter().map(|r| (r.start_addr().raw_value(), r.len())).collect()
}

/// A 64-bit digest of all guest memory (crc32 of every page folded with its page number).
/// Equal digests mean equal memory for every practical purpose of a test; it runs at memory
/// speed.
///
/// # Safety
/// - Nothing may write guest memory while this runs (vCPUs and devices paused, or the
///   memory not yet given to a VM).
pub unsafe fn digest(mem: &GuestMemory) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for region in mem.iter() {
        let base_page = region.start_addr().raw_value() / PAGE_SIZE as u64;
        // SAFETY: the caller guarantees no concurrent writers.
        let bytes = unsafe { host_slice(region) };
        for (i, page) in bytes.chunks(PAGE_SIZE).enumerate() {
            let c = u64::from(crc32fast::hash(page));
            h = (h ^ (c | ((base_page + i as u64) << 32))).wrapping_mul(0x0100_0000_01b3);
            h ^= h >> 29;
        }
    }
    h
}

/// The host bytes of a region, for bulk reads (digests, snapshot writes).
///
/// # Safety
/// - Nothing may write the region while the returned slice lives (vCPUs and devices paused,
///   or the memory not yet given to a VM).
pub unsafe fn host_slice(region: &GuestRegion) -> &[u8] {
    // SAFETY: the mapping is `region.len()` bytes long and lives as long as `region`; the
    // caller guarantees there are no concurrent writers, and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) }
}

/// Guest memory owned by one party and not (yet) given to any VM or device: a backup's
/// replica. Because nothing else can reach it, plain page slices are safe here. Turn it into a
/// VM's memory with [`OwnedMemory::into_inner`] (promotion builds the VM over it in place).
pub struct OwnedMemory {
    mem: GuestMemory,
    /// (first pfn, page count, region index), sorted.
    spans: Vec<(u64, u64, usize)>,
}

impl OwnedMemory {
    /// Fresh zeroed anonymous memory with the given `(guest-physical start, size)` layout.
    pub fn new(layout: &[(u64, u64)]) -> Result<Self, MemoryError> {
        let regions = layout.iter().map(|&(gpa, len)| new_region(gpa, len, None)).collect::<Result<Vec<_>, _>>()?;
        let mem = GuestMemory::from_regions(regions).map_err(MemoryError::Regions)?;
        // SAFETY: the memory was just created here: no one else has a handle on it.
        Ok(unsafe { Self::from_paused(mem) })
    }

    /// Takes the pages of a guest that will not run while this owner lives: a migration
    /// source's guest, paused for good during post-copy, whose memory takes the destination's
    /// reverse checkpoints.
    ///
    /// # Safety
    /// - No vCPU or device may write `mem` while the returned owner lives. Readers through
    ///   vm-memory's volatile accessors (a post-copy source answering page requests) may race a
    ///   page being written only for pages whose content they do not depend on (see
    ///   `primary::migrate::reverse`).
    pub unsafe fn from_paused(mem: GuestMemory) -> Self {
        let spans = mem
            .iter()
            .enumerate()
            .map(|(i, r)| (r.start_addr().raw_value() / PAGE_SIZE as u64, r.len() / PAGE_SIZE as u64, i))
            .collect();
        Self { mem, spans }
    }

    /// The memory layout.
    pub fn layout(&self) -> Vec<(u64, u64)> {
        layout_of(&self.mem)
    }

    fn locate(&self, pfn: u64) -> Option<(usize, usize)> {
        let i = self.spans.partition_point(|&(first, _, _)| first <= pfn).checked_sub(1)?;
        let (first, count, region) = self.spans[i];
        (pfn < first + count).then(|| (region, ((pfn - first) as usize) * PAGE_SIZE))
    }

    /// The page with frame number `pfn`.
    pub fn page(&self, pfn: u64) -> Option<&[u8]> {
        let (region, offset) = self.locate(pfn)?;
        let r = self.mem.iter().nth(region)?;
        // SAFETY: `self` owns the only handle to this memory (it is never cloned out while
        // `self` lives), so no VM, device or other thread writes it; `offset + PAGE_SIZE` is
        // inside the region (checked by `locate`); the borrow of `self` keeps the mapping alive.
        Some(unsafe { std::slice::from_raw_parts(r.as_ptr().add(offset), PAGE_SIZE) })
    }

    /// The page with frame number `pfn`, writable.
    pub fn page_mut(&mut self, pfn: u64) -> Option<&mut [u8]> {
        let (region, offset) = self.locate(pfn)?;
        let r = self.mem.iter().nth(region)?;
        // SAFETY: as in `page`, and `&mut self` makes this the only live slice into the memory.
        Some(unsafe { std::slice::from_raw_parts_mut(r.as_ptr().add(offset), PAGE_SIZE) })
    }

    /// Zeroes all memory (drops the pages and maps fresh zero pages).
    pub fn zero_all(&mut self) {
        for r in self.mem.iter() {
            // SAFETY: MADV_DONTNEED on our own private anonymous mapping: its pages read back
            // as zeros; no one else holds references into it (see `page`).
            let rc = unsafe { libc::madvise(r.as_ptr().cast(), r.len() as usize, libc::MADV_DONTNEED) };
            if rc != 0 {
                // SAFETY: as above; the region is `len` writable bytes we exclusively own.
                unsafe { std::ptr::write_bytes(r.as_ptr(), 0, r.len() as usize) };
            }
        }
    }

    /// The digest of all pages (see [`digest`]).
    pub fn digest(&self) -> u64 {
        // SAFETY: nothing else writes this memory (see `page`).
        unsafe { digest(&self.mem) }
    }

    /// Builds a KVM VM over this memory ahead of time, for [`crate::vm::Vm::restore_prepared`]
    /// on what [`OwnedMemory::into_inner`] gives up later. The prepared VM never writes the
    /// memory, so it stays this owner's alone.
    pub fn prepare_vm(&self, vcpus: u8) -> Result<crate::vm::PreparedVm, crate::vm::VmError> {
        crate::vm::PreparedVm::new(&self.mem, vcpus)
    }

    /// Gives the memory up, to build a VM over it without a copy.
    pub fn into_inner(self) -> GuestMemory {
        self.mem
    }

    /// Another handle on the same mappings (post-copy registers them with userfaultfd and
    /// places pages through it, never through a slice, so this owner's slices stay sound as
    /// long as it is not writing pages at the same time).
    pub fn handle(&self) -> GuestMemory {
        self.mem.clone()
    }
}

/// Copies the pages `pfns` (ascending or not) of `mem` into `out`, one 4 KiB page after the
/// other, through vm-memory's volatile accessors (safe while the guest runs; a page being
/// written concurrently may be copied half old, half new: callers resend it later).
pub fn copy_pages(
    mem: &GuestMemory,
    pfns: impl Iterator<Item = u64>,
    out: &mut Vec<u8>,
) -> Result<(), vm_memory::GuestMemoryError> {
    for pfn in pfns {
        let src = mem.get_slice(GuestAddress(pfn * PAGE_SIZE as u64), PAGE_SIZE)?;
        if src.len() != PAGE_SIZE {
            return Err(vm_memory::GuestMemoryError::PartialBuffer { expected: PAGE_SIZE, completed: src.len() });
        }
        out.reserve(PAGE_SIZE);
        let at = out.len();
        // Copy straight into the spare capacity: no zero-fill first (that doubled the memory
        // traffic of the pause).
        // SAFETY: `reserve` made `PAGE_SIZE` bytes at `at` valid for writes; the slice does not
        // outlive this statement; after the copy those bytes are initialised.
        unsafe {
            let dst = vm_memory::VolatileSlice::new(out.as_mut_ptr().add(at), PAGE_SIZE);
            src.copy_to_volatile_slice(dst);
            out.set_len(at + PAGE_SIZE);
        }
    }
    Ok(())
}

/// Copies the pages `pfns` of `mem` that are not all zero into `out` (and their numbers into
/// `kept`), as [`copy_pages`] does; returns how many zero pages it left out. Each page goes
/// through a stack buffer first, so a zero page (most of a fresh guest) costs a copy within the
/// cache and a check, and never touches `out`.
///
/// Pages of anonymous memory that were never touched (not resident and not swapped, per
/// `/proc/self/pagemap`) are zero without being read: reading them would fault each one in.
pub fn copy_nonzero_pages(
    mem: &GuestMemory,
    pfns: impl Iterator<Item = u64>,
    kept: &mut Vec<u64>,
    out: &mut Vec<u8>,
) -> Result<u64, vm_memory::GuestMemoryError> {
    let mut buf = [0u8; PAGE_SIZE];
    let mut zero = 0;
    let pfns: Vec<u64> = pfns.collect();
    let untouched = never_touched(mem, &pfns);
    for (i, &pfn) in pfns.iter().enumerate() {
        if untouched.get(i).copied().unwrap_or(false) {
            zero += 1;
            continue;
        }
        let src = mem.get_slice(GuestAddress(pfn * PAGE_SIZE as u64), PAGE_SIZE)?;
        if src.len() != PAGE_SIZE {
            return Err(vm_memory::GuestMemoryError::PartialBuffer { expected: PAGE_SIZE, completed: src.len() });
        }
        src.copy_to(&mut buf[..]);
        if is_zero(&buf) {
            zero += 1;
        } else {
            kept.push(pfn);
            out.extend_from_slice(&buf);
        }
    }
    Ok(zero)
}

/// For each of `pfns`: whether it lies in anonymous memory and was never touched (its
/// `/proc/self/pagemap` entry is neither present, bit 63, nor swapped, bit 62), so it reads as
/// zeros. False when unsure (file-backed memory, pagemap unreadable). Reads the entries of each
/// run of consecutive pages at once.
pub fn never_touched(mem: &GuestMemory, pfns: &[u64]) -> Vec<bool> {
    use std::os::unix::fs::FileExt;
    let mut out = vec![false; pfns.len()];
    let Ok(pagemap) = File::open("/proc/self/pagemap") else { return out };
    let ps = PAGE_SIZE as u64;
    let mut i = 0;
    let mut entries = Vec::new();
    while i < pfns.len() {
        let gpa = GuestAddress(pfns[i] * ps);
        let Some(region) = mem.find_region(gpa).filter(|r| r.file_offset().is_none()) else {
            i += 1;
            continue;
        };
        // The run of consecutive pages from i within this region.
        let region_end = (region.start_addr().raw_value() + region.len()) / ps;
        let mut j = i + 1;
        while j < pfns.len() && pfns[j] == pfns[j - 1] + 1 && pfns[j] < region_end {
            j += 1;
        }
        let offset = vm_memory::MemoryRegionAddress(gpa.unchecked_offset_from(region.start_addr()));
        if let Ok(hva) = region.get_host_address(offset) {
            entries.resize((j - i) * 8, 0);
            if pagemap.read_exact_at(&mut entries, (hva as u64 / ps) * 8).is_ok() {
                for (k, e) in entries.chunks_exact(8).enumerate() {
                    let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                    out[i + k] = e & (3 << 62) == 0;
                }
            }
        }
        i = j;
    }
    out
}

/// Whether a page is all zero (an OR over 64-bit words, which the compiler vectorises).
pub fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any byte pattern is a valid u64; align_to only reinterprets.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && tail.iter().all(|&b| b == 0) && words.iter().fold(0u64, |a, &w| a | w) == 0
}

#[cfg(test)]
mod owned_tests {
    use super::*;

    /// Pages of anonymous memory never touched are known zero without reading them; a written
    /// page is not (and neither is one that was read: its zero page is mapped). Those skipped
    /// still count as zero pages.
    #[test]
    fn never_touched_pages_are_zero_without_a_read() {
        let mut m = OwnedMemory::new(&[(0, 1 << 20), (0x1_0000_0000, 1 << 20)]).unwrap();
        m.page_mut(3).unwrap().fill(7);
        let mem = m.into_inner();
        let t = never_touched(&mem, &[3, 0x10_0000, 0x10_0001, 0x10_00ff]);
        assert_eq!(t, [false, true, true, true]);
        let (mut kept, mut data) = (Vec::new(), Vec::new());
        let zero = copy_nonzero_pages(&mem, [3u64, 0x10_0000, 0x10_0001].into_iter(), &mut kept, &mut data).unwrap();
        assert_eq!((zero, kept.as_slice(), data.len()), (2, &[3u64][..], 4096));
        assert!(data.iter().all(|&b| b == 7));
        // Still untouched: the check did not read them.
        assert_eq!(never_touched(&mem, &[0x10_0000, 0x10_0001]), [true, true]);
    }

    #[test]
    fn owned_pages_and_zeroing() {
        let mut m = OwnedMemory::new(&[(0, 1 << 20), (0x1_0000_0000, 1 << 20)]).unwrap();
        assert!(m.page(256).is_none());
        m.page_mut(3).unwrap().fill(7);
        m.page_mut(0x10_0000 + 5).unwrap().fill(9);
        assert_eq!(m.page(3).unwrap()[100], 7);
        assert_eq!(m.page(0x10_0000 + 5).unwrap()[4095], 9);
        let d = m.digest();
        let mut out = Vec::new();
        let mem = m.into_inner();
        copy_pages(&mem, [3u64, 0x10_0005].into_iter(), &mut out).unwrap();
        assert_eq!(out.len(), 8192);
        assert!(out[..4096].iter().all(|&b| b == 7) && out[4096..].iter().all(|&b| b == 9));
        let (mut kept, mut data) = (Vec::new(), Vec::new());
        let zero = copy_nonzero_pages(&mem, [2u64, 3, 4, 0x10_0005].into_iter(), &mut kept, &mut data).unwrap();
        assert_eq!((zero, kept.as_slice()), (2, &[3u64, 0x10_0005][..]));
        assert_eq!(data, out);
        assert!(is_zero(&[0u8; 4096]) && !is_zero(&[0, 0, 0, 1]));
        let mut m = OwnedMemory { spans: vec![(0, 256, 0), (0x10_0000, 256, 1)], mem };
        assert_eq!(m.digest(), d);
        m.zero_all();
        assert!(m.page(3).unwrap().iter().all(|&b| b == 0));
    }
}
