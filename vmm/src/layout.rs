//! The guest-physical memory layout (x86-64).
//!
//! ```text
//! 0x0000_0500  boot GDT (PVH entry)          0x0000_0520  boot IDT (empty)
//! 0x0000_6000  hvm_start_info                0x0000_6100  memory map (hvm_memmap_table_entry[])
//! 0x0002_0000  kernel command line (4 KiB)
//! 0x0010_0000  kernel (ELF PT_LOAD segments)
//! RAM up to 3 GiB, then the MMIO hole:
//! 0xd000_0000  virtio-mmio windows, 4 KiB apart (512 bytes used), GSI 5, 6, ...
//! 0xfec0_0000  IOAPIC                        0xfee0_0000  LAPIC
//! RAM above 3 GiB continues at 4 GiB.
//! ```

/// Boot GDT for the 32-bit PVH entry.
pub const BOOT_GDT: u64 = 0x500;
/// Boot IDT (empty, limit 7).
pub const BOOT_IDT: u64 = 0x520;
/// The PVH `hvm_start_info`.
pub const START_INFO: u64 = 0x6000;
/// The memory map the start info points at.
pub const MEMMAP_START: u64 = 0x6100;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Room for the command line, terminating NUL included.
pub const CMDLINE_MAX: usize = 4096;
/// Kernels load at or above this address.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole: RAM stops here and resumes at [`HIGH_RAM_START`].
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// RAM beyond the hole starts here.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// First virtio-mmio window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Distance between virtio-mmio windows.
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
/// Bytes of each virtio-mmio window the device decodes.
pub const VIRTIO_MMIO_SIZE: u64 = 0x200;
/// GSI of the first virtio device; device i gets `VIRTIO_GSI_BASE + i`.
pub const VIRTIO_GSI_BASE: u32 = 5;
/// COM1 port base and its GSI.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1's interrupt line.
pub const COM1_GSI: u32 = 4;
/// KVM's TSS area for Intel hosts (three pages below the BIOS area); harmless elsewhere.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// KVM's identity map page for Intel hosts.
pub const KVM_IDENTITY_MAP: u64 = 0xfffb_c000;

/// RAM regions for `size` bytes of guest memory: below the MMIO hole, then above 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_HOLE_START), (HIGH_RAM_START, size - MMIO_HOLE_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_split_around_the_hole() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_regions(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }
}
