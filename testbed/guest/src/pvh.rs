//! The PVH `hvm_start_info` the loader leaves at `ebx`: command line and memory map.

/// `hvm_start_info.magic`.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Memory map entry type for usable RAM.
pub const E820_RAM: u32 = 1;
/// Most memory map entries kept.
pub const MAX_REGIONS: usize = 32;
/// Longest command line kept.
pub const CMDLINE_MAX: usize = 4096;

/// A region of guest-physical memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl Region {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }
}

/// What the guest keeps from the start info (copied: the original may be overwritten).
pub struct BootInfo {
    /// Command line bytes (without NUL).
    pub cmdline: [u8; CMDLINE_MAX],
    /// Valid bytes of `cmdline`.
    pub cmdline_len: usize,
    /// RAM regions (type 1), sorted, clipped to page boundaries.
    pub ram: [Region; MAX_REGIONS],
    /// Valid entries of `ram`.
    pub ram_count: usize,
    /// Whether the start info had a memory map (otherwise `ram` is a conservative guess).
    pub had_memmap: bool,
    /// Guest-physical ranges holding the start info, memory map and command line.
    pub boot_data: [Region; 3],
}

/// Without a memory map the guest assumes RAM from 1 MiB to this address.
pub const NO_MEMMAP_RAM_END: u64 = 32 << 20;

fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: all of the first 4 GiB is identity-mapped and readable; the loader put the
    // structure here (callers only pass addresses from the start info).
    unsafe { (addr as *const T).read_unaligned() }
}

impl BootInfo {
    /// Reads the start info at `addr`. Panics on a bad magic.
    pub fn read(addr: u64) -> Self {
        let magic: u32 = read(addr);
        if magic != START_INFO_MAGIC {
            panic!("hvm_start_info at {addr:#x}: bad magic {magic:#x}");
        }
        let version: u32 = read(addr + 4);
        let cmdline_paddr: u64 = read(addr + 24);
        let mut info = BootInfo {
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
            ram: [Region::default(); MAX_REGIONS],
            ram_count: 0,
            had_memmap: false,
            boot_data: [Region::default(); 3],
        };
        info.boot_data[0] = Region { start: addr, end: addr + 56 };
        if cmdline_paddr != 0 {
            while info.cmdline_len < CMDLINE_MAX {
                let b: u8 = read(cmdline_paddr + info.cmdline_len as u64);
                if b == 0 {
                    break;
                }
                info.cmdline[info.cmdline_len] = b;
                info.cmdline_len += 1;
            }
            info.boot_data[1] = Region { start: cmdline_paddr, end: cmdline_paddr + info.cmdline_len as u64 + 1 };
        }
        if version >= 1 {
            let memmap_paddr: u64 = read(addr + 40);
            let entries: u32 = read(addr + 48);
            if memmap_paddr != 0 && entries != 0 {
                info.had_memmap = true;
                info.boot_data[2] = Region { start: memmap_paddr, end: memmap_paddr + u64::from(entries) * 24 };
                for i in 0..u64::from(entries) {
                    let e = memmap_paddr + i * 24;
                    let (base, size, ty): (u64, u64, u32) = (read(e), read(e + 8), read(e + 16));
                    if ty == E820_RAM {
                        // Whole pages only.
                        let start = base.saturating_add(0xfff) & !0xfff;
                        let end = base.saturating_add(size) & !0xfff;
                        if end > start {
                            info.add_ram(Region { start, end });
                        }
                    }
                }
            }
        }
        if !info.had_memmap {
            info.add_ram(Region { start: 0x10_0000, end: NO_MEMMAP_RAM_END });
        }
        info
    }

    fn add_ram(&mut self, r: Region) {
        if self.ram_count == MAX_REGIONS {
            return;
        }
        // Insertion sort by start.
        let mut i = self.ram_count;
        while i > 0 && self.ram[i - 1].start > r.start {
            self.ram[i] = self.ram[i - 1];
            i -= 1;
        }
        self.ram[i] = r;
        self.ram_count += 1;
    }

    /// The command line as text (invalid UTF-8 is cut at the first bad byte).
    pub fn cmdline(&self) -> &str {
        let bytes = &self.cmdline[..self.cmdline_len];
        match core::str::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
        }
    }

    /// The RAM regions.
    pub fn ram(&self) -> &[Region] {
        &self.ram[..self.ram_count]
    }

    /// Total RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram().iter().map(Region::len).sum()
    }
}
