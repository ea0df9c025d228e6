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
