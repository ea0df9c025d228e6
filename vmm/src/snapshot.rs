//! Snapshots on disk: a directory holding `state.bin` (an encoded [`VmState`]) and
//! `memory.bin` (a header page, then each memory region's bytes at a page-aligned offset;
//! zero pages are holes). The format is specified in docs/checkpoint-format.md.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{self, GuestMemory, MemoryError, PAGE_SIZE};
use crate::state::{StateError, VmState};

/// Magic at the start of `memory.bin`.
pub const MEMORY_MAGIC: [u8; 8] = *b"USTMEM\0\0";
/// Version of the memory file layout.
pub const MEMORY_VERSION: u32 = 1;
/// Most regions a memory file describes.
pub const MAX_REGIONS: usize = 64;
/// Largest guest memory accepted from a file (1 TiB).
pub const MAX_MEMORY_BYTES: u64 = 1 << 40;
const REGION_ENTRY: usize = 32;
const HEADER_CRC_AT: usize = PAGE_SIZE - 4;

/// File names inside a snapshot directory.
pub const STATE_FILE: &str = "state.bin";
/// See [`STATE_FILE`].
pub const MEMORY_FILE: &str = "memory.bin";

/// Errors writing or reading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// Which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `state.bin` is bad.
    #[error("{path}")]
    State {
        /// Which file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: StateError,
    },
    /// `memory.bin` is bad.
    #[error("{path}: {problem}")]
    MemoryFile {
        /// Which file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The memory could not be mapped.
    #[error(transparent)]
    Map(#[from] MemoryError),
    /// State and memory disagree.
    #[error("snapshot {dir}: state describes memory {state:x?}, memory file holds {file:x?}")]
    Mismatch {
        /// The snapshot directory.
        dir: PathBuf,
        /// Layout in the state.
        state: Vec<(u64, u64)>,
        /// Layout in the memory file.
        file: Vec<(u64, u64)>,
    },
}

/// What a snapshot holds, for reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotInfo {
    /// [`memory::digest`] of guest memory.
    pub memory_digest: u64,
    /// Bytes of guest memory.
    pub memory_bytes: u64,
    /// Bytes of encoded state.
    pub state_bytes: u64,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io { op, path: path.to_path_buf(), source }
}

/// Writes `state` and all of `mem` into `dir` (created if missing).
///
/// # Safety
/// - Nothing may write guest memory while this runs (the VM is paused).
pub unsafe fn write(dir: &Path, mem: &GuestMemory, state: &VmState) -> Result<SnapshotInfo, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io("create directory", dir))?;
    let state_bytes = state.encode().map_err(|source| SnapshotError::State { path: dir.join(STATE_FILE), source })?;

    let mem_path = dir.join(MEMORY_FILE);
    let tmp = dir.join(".memory.bin.tmp");
    let file = OpenOptions::new().create(true).write(true).truncate(true).open(&tmp).map_err(io("create", &tmp))?;
    let mut header = vec![0u8; PAGE_SIZE];
    header[0..8].copy_from_slice(&MEMORY_MAGIC);
    header[8..12].copy_from_slice(&MEMORY_VERSION.to_le_bytes());
    let regions: Vec<_> = mem.iter().collect();
    header[12..16].copy_from_slice(&(regions.len() as u32).to_le_bytes());
    let mut offset = PAGE_SIZE as u64;
    let zero = [0u8; PAGE_SIZE];
    let mut total = 0u64;
    for (i, region) in regions.iter().enumerate() {
        // SAFETY: the caller guarantees the VM is paused: no concurrent writers.
        let bytes = unsafe { memory::host_slice(region) };
        let crc = crc32fast::hash(bytes);
        // Write non-zero runs only: zero pages stay holes in a sparse file.
        let mut page = 0;
        let pages = bytes.len() / PAGE_SIZE;
        while page < pages {
            if bytes[page * PAGE_SIZE..(page + 1) * PAGE_SIZE] == zero {
                page += 1;
                continue;
            }
            let start = page;
            while page < pages && bytes[page * PAGE_SIZE..(page + 1) * PAGE_SIZE] != zero {
                page += 1;
            }
            file.write_all_at(&bytes[start * PAGE_SIZE..page * PAGE_SIZE], offset + (start * PAGE_SIZE) as u64)
                .map_err(io("write", &tmp))?;
        }
        let e = 16 + i * REGION_ENTRY;
        header[e..e + 8].copy_from_slice(&region.start_addr().raw_value().to_le_bytes());
        header[e + 8..e + 16].copy_from_slice(&region.len().to_le_bytes());
        header[e + 16..e + 24].copy_from_slice(&offset.to_le_bytes());
        header[e + 24..e + 28].copy_from_slice(&crc.to_le_bytes());
        offset += region.len();
        total += region.len();
    }
    let hcrc = crc32fast::hash(&header[..HEADER_CRC_AT]);
    header[HEADER_CRC_AT..].copy_from_slice(&hcrc.to_le_bytes());
    file.write_all_at(&header, 0).map_err(io("write", &tmp))?;
    file.set_len(offset).map_err(io("resize", &tmp))?;
    file.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, &mem_path).map_err(io("rename", &mem_path))?;

    let state_path = dir.join(STATE_FILE);
    let stmp = dir.join(".state.bin.tmp");
    let mut f = File::create(&stmp).map_err(io("create", &stmp))?;
    f.write_all(&state_bytes).map_err(io("write", &stmp))?;
    f.sync_all().map_err(io("sync", &stmp))?;
    std::fs::rename(&stmp, &state_path).map_err(io("rename", &state_path))?;
    Ok(SnapshotInfo {
        // SAFETY: as above, the VM is paused.
        memory_digest: unsafe { memory::digest(mem) },
        memory_bytes: total,
        state_bytes: state_bytes.len() as u64,
    })
}

/// Reads and verifies a snapshot: maps its memory copy-on-write (no copy) and decodes its
/// state. Every checksum is checked before anything is returned.
pub fn read(dir: &Path) -> Result<(GuestMemory, VmState, SnapshotInfo), SnapshotError> {
    let state_path = dir.join(STATE_FILE);
    let mut bytes = Vec::new();
    File::open(&state_path)
        .map_err(io("open", &state_path))?
        .take(crate::state::MAX_STATE_BYTES + 4096)
        .read_to_end(&mut bytes)
        .map_err(io("read", &state_path))?;
    let state = VmState::decode(&bytes).map_err(|source| SnapshotError::State { path: state_path.clone(), source })?;

    let mem_path = dir.join(MEMORY_FILE);
    let bad = |problem: String| SnapshotError::MemoryFile { path: mem_path.clone(), problem };
    let file = File::open(&mem_path).map_err(io("open", &mem_path))?;
    let file_len = file.metadata().map_err(io("stat", &mem_path))?.len();
    let mut header = vec![0u8; PAGE_SIZE];
    if file_len < PAGE_SIZE as u64 {
        return Err(bad(format!("truncated: {file_len} bytes, the header alone is {PAGE_SIZE}")));
    }
    file.read_exact_at(&mut header, 0).map_err(io("read", &mem_path))?;
    if header[0..8] != MEMORY_MAGIC {
        return Err(bad(format!("not a memory file (magic {:02x?})", &header[0..8])));
    }
    let u32_at = |o: usize| u32::from_le_bytes(header[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(header[o..o + 8].try_into().expect("8 bytes"));
    if crc32fast::hash(&header[..HEADER_CRC_AT]) != u32_at(HEADER_CRC_AT) {
        return Err(bad("header crc mismatch".into()));
    }
    let version = u32_at(8);
    if version != MEMORY_VERSION {
        return Err(bad(format!("version {version}; this build reads {MEMORY_VERSION}")));
    }
    let count = u32_at(12) as usize;
    if count == 0 || count > MAX_REGIONS {
        return Err(bad(format!("{count} regions; 1 to {MAX_REGIONS} allowed")));
    }
    let mut regions = Vec::new();
    let mut crcs = Vec::new();
    let mut total = 0u64;
    for i in 0..count {
        let e = 16 + i * REGION_ENTRY;
        let (gpa, size, offset, crc) = (u64_at(e), u64_at(e + 8), u64_at(e + 16), u32_at(e + 24));
        if size == 0
            || !size.is_multiple_of(PAGE_SIZE as u64)
            || !gpa.is_multiple_of(PAGE_SIZE as u64)
            || !offset.is_multiple_of(PAGE_SIZE as u64)
        {
            return Err(bad(format!("region {i} at {gpa:#x} size {size:#x} offset {offset:#x} is not page aligned")));
        }
        total = total.saturating_add(size);
        if total > MAX_MEMORY_BYTES {
            return Err(bad(format!("regions add up to more than the {MAX_MEMORY_BYTES} byte cap")));
        }
        match offset.checked_add(size) {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(bad(format!(
                    "truncated: region {i} needs bytes up to {:#x}, file has {file_len:#x}",
                    offset.saturating_add(size)
                )));
            }
        }
        regions.push((gpa, size, offset));
        crcs.push(crc);
    }
    let file_layout: Vec<(u64, u64)> = regions.iter().map(|&(g, s, _)| (g, s)).collect();
    if file_layout != state.memory {
        return Err(SnapshotError::Mismatch { dir: dir.to_path_buf(), state: state.memory.clone(), file: file_layout });
    }
    let mem = memory::create_from_file(&Arc::new(file), &regions)?;
    for (i, region) in mem.iter().enumerate() {
        // SAFETY: the memory is not yet given to any VM or device: nothing writes it.
        let computed = crc32fast::hash(unsafe { memory::host_slice(region) });
        if computed != crcs[i] {
            return Err(bad(format!("region {i} crc mismatch: stored {:#010x}, computed {computed:#010x}", crcs[i])));
        }
    }
    let info = SnapshotInfo {
        // SAFETY: as above, nothing writes this memory yet.
        memory_digest: unsafe { memory::digest(&mem) },
        memory_bytes: total,
        state_bytes: bytes.len() as u64,
    };
    Ok((mem, state, info))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn setup() -> (tempfile::TempDir, GuestMemory, VmState) {
        let dir = tempfile::tempdir().unwrap();
        let mem = memory::create_anonymous(16 << 20).unwrap();
        mem.write_slice(b"hello snapshot", GuestAddress(0x10_0000)).unwrap();
        mem.write_slice(&[7u8; 8192], GuestAddress(0x20_0000)).unwrap();
        let mut state = crate::state::tests::sample();
        state.memory = memory::layout_of(&mem);
        (dir, mem, state)
    }

    #[test]
    fn write_then_read_round_trips() {
        let (dir, mem, state) = setup();
        // SAFETY: test memory, no VM.
        let info = unsafe { write(dir.path(), &mem, &state) }.unwrap();
        let (mem2, state2, info2) = read(dir.path()).unwrap();
        assert_eq!(state2, state);
        assert_eq!(info.memory_digest, info2.memory_digest);
        let mut buf = [0u8; 14];
        mem2.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(&buf, b"hello snapshot");
        // Copy-on-write: writing the restored memory leaves the file alone.
        mem2.write_slice(b"changed", GuestAddress(0x10_0000)).unwrap();
        let (mem3, _, _) = read(dir.path()).unwrap();
        mem3.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(&buf, b"hello snapshot");
    }

    #[test]
    fn damaged_files_are_rejected_with_clear_errors() {
        let (dir, mem, state) = setup();
        // SAFETY: test memory, no VM.
        unsafe { write(dir.path(), &mem, &state) }.unwrap();
        let mp = dir.path().join(MEMORY_FILE);
        let orig = std::fs::read(&mp).unwrap();

        std::fs::write(&mp, &orig[..orig.len() - 4096]).unwrap();
        let e = read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("truncated: region 0"), "{e}");

        let mut b = orig.clone();
        b[0x10_0000 + PAGE_SIZE] ^= 1;
        std::fs::write(&mp, &b).unwrap();
        let e = read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("region 0 crc mismatch"), "{e}");

        std::fs::write(&mp, &orig[..100]).unwrap();
        let e = read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");

        std::fs::write(&mp, &orig).unwrap();
        let sp = dir.path().join(STATE_FILE);
        let s = std::fs::read(&sp).unwrap();
        std::fs::write(&sp, &s[..s.len() / 2]).unwrap();
        let e = format!("{:#}", ErrChain(&read(dir.path()).unwrap_err()));
        assert!(e.contains("state.bin") && e.contains("truncated"), "{e}");
    }

    struct ErrChain<'a>(&'a dyn std::error::Error);
    impl std::fmt::Display for ErrChain<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}", self.0)?;
            let mut s = self.0.source();
            while let Some(e) = s {
                write!(f, ": {e}")?;
                s = e.source();
            }
            Ok(())
        }
    }
}
