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
