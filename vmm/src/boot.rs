//! Booting an ELF kernel through its PVH entry point.
//!
//! The PVH boot protocol (xenbits `misc/pvh.html`): the VMM loads the ELF, fills an
//! `hvm_start_info` (command line, memory map) and enters the kernel's
//! `XEN_ELFNOTE_PHYS32_ENTRY` in 32-bit protected mode with paging off and `ebx` pointing at
//! the start info. QEMU's `-M microvm -kernel` does the same, so one image boots under both.

use std::fs::File;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::KernelLoader;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout;
use crate::memory::GuestMemory;

/// Errors of the boot path.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("open kernel {path}")]
    Open {
        /// The path given.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The ELF loader rejected the image.
    #[error("load kernel {path}: {source}")]
    Load {
        /// The path given.
        path: String,
        /// The loader's error.
        source: linux_loader::loader::Error,
    },
    /// The ELF has no PVH note.
    #[error("kernel {0} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhEntry(String),
    /// The command line does not fit its slot.
    #[error("kernel command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Writing boot structures into guest memory failed.
    #[error("write boot structure {what}")]
    Memory {
        /// Which structure.
        what: &'static str,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;

/// Where the kernel enters and what the vCPU registers must hold.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    /// The PVH 32-bit entry point.
    pub entry: GuestAddress,
}

/// Loads `kernel` into `mem` and writes the start info, memory map and command line.
pub fn load_pvh(mem: &GuestMemory, kernel: &std::path::Path, cmdline: &str) -> Result<BootEntry, BootError> {
    let path = kernel.display().to_string();
    let mut file = File::open(kernel).map_err(|source| BootError::Open { path: path.clone(), source })?;
    let result = Elf::load(mem, None, &mut file, Some(GuestAddress(layout::HIMEM_START)))
        .map_err(|source| BootError::Load { path: path.clone(), source })?;
    let entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr,
        _ => return Err(BootError::NoPvhEntry(path)),
    };
    write_start_info(mem, cmdline)?;
    write_gdt(mem)?;
    Ok(BootEntry { entry })
}

fn write_start_info(mem: &GuestMemory, cmdline: &str) -> Result<(), BootError> {
    let max = layout::CMDLINE_MAX - 1;
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong { len: cmdline.len(), max });
    }
    let w = |what, r: Result<(), vm_memory::GuestMemoryError>| r.map_err(|source| BootError::Memory { what, source });
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    w("command line", mem.write_slice(&bytes, GuestAddress(layout::CMDLINE_START)))?;

    // Memory map: every RAM region, with the low megabyte's boot structures marked as RAM too
    // (the guest knows where they are from the start info).
    let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().raw_value(), r.len())).collect();
    let mut map = Vec::new();
    for (addr, size) in &regions {
        map.extend_from_slice(&addr.to_le_bytes());
        map.extend_from_slice(&size.to_le_bytes());
        map.extend_from_slice(&E820_RAM.to_le_bytes());
        map.extend_from_slice(&0u32.to_le_bytes());
    }
    w("memory map", mem.write_slice(&map, GuestAddress(layout::MEMMAP_START)))?;

    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&XEN_HVM_START_MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&0u32.to_le_bytes()); // nr_modules
    info.extend_from_slice(&0u64.to_le_bytes()); // modlist_paddr
    info.extend_from_slice(&layout::CMDLINE_START.to_le_bytes());
    info.extend_from_slice(&0u64.to_le_bytes()); // rsdp_paddr
    info.extend_from_slice(&layout::MEMMAP_START.to_le_bytes());
    info.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    w("start info", mem.write_slice(&info, GuestAddress(layout::START_INFO)))
}

/// A flat GDT for the 32-bit entry: null, code (0x08), data (0x10), TSS (0x18).
const GDT: [u64; 4] = [0, gdt_entry(0xc09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x008b, 0, 0x67)];

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | (((limit as u64 & 0x000f_0000) >> 16) << 48)
        | ((flags as u64 & 0xf0ff) << 40)
}

fn segment(index: u16, entry: u64) -> kvm_segment {
    let flags = (entry >> 40) & 0xf0ff;
    let g = ((flags >> 15) & 1) as u8;
    let raw_limit = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector: index * 8,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g,
        avl: ((flags >> 12) & 1) as u8,
        unusable: if (flags >> 7) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

fn write_gdt(mem: &GuestMemory) -> Result<(), BootError> {
    let mut bytes = Vec::new();
    for e in GDT {
        bytes.extend_from_slice(&e.to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(layout::BOOT_GDT))
        .map_err(|source| BootError::Memory { what: "gdt", source })?;
    mem.write_slice(&[0u8; 8], GuestAddress(layout::BOOT_IDT))
        .map_err(|source| BootError::Memory { what: "idt", source })
}

/// Registers for the PVH entry: 32-bit protected mode, paging off, `ebx` = start info.
pub fn entry_regs(entry: &BootEntry) -> kvm_regs {
    kvm_regs { rip: entry.entry.raw_value(), rbx: layout::START_INFO, rflags: 0x2, ..Default::default() }
}

/// Segment and control registers for the PVH entry, based on the vCPU's current ones.
pub fn entry_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(1, GDT[1]);
    let data = segment(2, GDT[2]);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(3, GDT[3]);
    sregs.gdt.base = layout::BOOT_GDT;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT;
    sregs.idt.limit = 7;
    sregs.cr0 = 0x1 | 0x10; // PE | ET
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_code_segment() {
        let cs = segment(1, GDT[1]);
        assert_eq!(cs.base, 0);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.selector, 8);
        assert_eq!(cs.type_, 0xb);
        assert_eq!((cs.present, cs.db, cs.s, cs.l, cs.g, cs.unusable), (1, 1, 1, 0, 1, 0));
        let tr = segment(3, GDT[3]);
        assert_eq!((tr.limit, tr.type_, tr.s, tr.g), (0x67, 0xb, 0, 0));
    }
}
