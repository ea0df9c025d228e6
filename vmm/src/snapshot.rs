//! Snapshots on disk: a directory holding `state.bin` (a snapshot header, then an encoded
//! [`VmState`]) and `memory.bin` (a header page, then each memory region's bytes at a
//! page-aligned offset; zero pages are holes). Both headers carry the same random
//! [`SnapshotId`], so a memory file and a state file of two different snapshots are refused as a
//! pair. The format is specified in docs/checkpoint-format.md.
//!
//! Writing never follows a symlink and never touches a file it did not create: each file is
//! written to a fresh temporary name (`O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0600), synced, and
//! renamed over its final name (a rename replaces a symlink planted there, it does not write
//! through it); then the directory is synced.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{self, GuestMemory, MemoryError, PAGE_SIZE};
use crate::state::{STATE_MAGIC, StateError, VmState};

/// Magic at the start of `memory.bin`.
pub const MEMORY_MAGIC: [u8; 8] = *b"USTMEM\0\0";
/// Version of the memory file layout this build writes (2: with the snapshot id).
pub const MEMORY_VERSION: u32 = 2;
/// The previous memory file version (no snapshot id), still read.
pub const MEMORY_VERSION_UNBOUND: u32 = 1;
/// Magic at the start of `state.bin` (from format 2 on): the snapshot header.
pub const STATE_FILE_MAGIC: [u8; 8] = *b"USTSNST\0";
/// Version of the state file's snapshot header this build writes.
pub const STATE_FILE_VERSION: u32 = 2;
/// Most regions a memory file describes.
pub const MAX_REGIONS: usize = 64;
/// Largest guest memory accepted from a file (1 TiB).
pub const MAX_MEMORY_BYTES: u64 = 1 << 40;
const REGION_ENTRY: usize = 32;
const HEADER_CRC_AT: usize = PAGE_SIZE - 4;
/// Bytes of `state.bin`'s snapshot header: magic, version, flags, id, header crc, reserved.
const STATE_HEADER_LEN: usize = 8 + 4 + 4 + 16 + 4 + 4;

/// File names inside a snapshot directory.
pub const STATE_FILE: &str = "state.bin";
/// See [`STATE_FILE`].
pub const MEMORY_FILE: &str = "memory.bin";

/// Names one snapshot: 128 random bits, written into both files' headers when the snapshot is
/// taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotId(pub [u8; 16]);

impl SnapshotId {
    /// A fresh random id (from the kernel's random source).
    pub fn random() -> std::io::Result<Self> {
        let mut id = [0u8; 16];
        File::open("/dev/urandom")?.read_exact(&mut id)?;
        Ok(Self(id))
    }
}

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// The id a file of a pair carries, for errors: format 1 files carry none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId(pub Option<SnapshotId>);

impl std::fmt::Display for FileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(id) => write!(f, "snapshot {id}"),
            None => f.write_str("no snapshot id (format 1)"),
        }
    }
}

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
    /// The `VmState` in `state.bin` is bad.
    #[error("{path}")]
    State {
        /// Which file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: StateError,
    },
    /// A file's snapshot header is bad.
    #[error("{path}: {problem}")]
    File {
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
    /// The two files were not written together.
    #[error("snapshot {dir}: memory.bin carries {memory}, state.bin carries {state}; they are not one snapshot")]
    Pair {
        /// The snapshot directory.
        dir: PathBuf,
        /// The memory file's id.
        memory: FileId,
        /// The state file's id.
        state: FileId,
    },
}

/// What a snapshot holds, for reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotInfo {
    /// The snapshot's id in hex (`None` for a format 1 snapshot, which has none).
    pub snapshot_id: Option<String>,
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

/// The temporary name `final_name` is written under: unique to the snapshot.
fn temp_name(final_name: &str, id: SnapshotId) -> String {
    format!(".{final_name}.{id}.tmp")
}

/// Creates `path` fresh for writing, mode 0600: fails if anything is there already, a symlink
/// included (`O_EXCL`; `O_NOFOLLOW` says the same for the last component).
fn create_fresh(path: &Path) -> Result<File, SnapshotError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io("create", path))?;
    // The umask may only have removed bits; make it exactly 0600.
    file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io("chmod", path))?;
    Ok(file)
}

/// Writes `state` and all of `mem` into `dir` (created, mode 0700, if missing) as one snapshot
/// under a fresh random id.
///
/// # Safety
/// - Nothing may write guest memory while this runs (the VM is paused).
pub unsafe fn write(dir: &Path, mem: &GuestMemory, state: &VmState) -> Result<SnapshotInfo, SnapshotError> {
    let id = SnapshotId::random().map_err(io("read random id from", Path::new("/dev/urandom")))?;
    // SAFETY: the caller's duties are ours.
    unsafe { write_with_id(dir, mem, state, id) }
}

/// [`write`] with a chosen id (tests plant files at its temporary names).
///
/// # Safety
/// - Nothing may write guest memory while this runs (the VM is paused).
unsafe fn write_with_id(
    dir: &Path,
    mem: &GuestMemory,
    state: &VmState,
    id: SnapshotId,
) -> Result<SnapshotInfo, SnapshotError> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io("create directory", dir))?;
    let state_bytes = state.encode().map_err(|source| SnapshotError::State { path: dir.join(STATE_FILE), source })?;
    let mem_tmp = dir.join(temp_name(MEMORY_FILE, id));
    let state_tmp = dir.join(temp_name(STATE_FILE, id));
    // Temporary files this call created and has not renamed yet: removed on failure.
    let mut created: Vec<&Path> = Vec::new();
    let result = (|| -> Result<u64, SnapshotError> {
        let file = create_fresh(&mem_tmp)?;
        created.push(&mem_tmp);
        // SAFETY: the caller guarantees the VM is paused.
        let total = unsafe { write_memory(&file, &mem_tmp, mem, id) }?;
        let mut f = create_fresh(&state_tmp)?;
        created.push(&state_tmp);
        f.write_all(&state_header(id)).map_err(io("write", &state_tmp))?;
        f.write_all(&state_bytes).map_err(io("write", &state_tmp))?;
        f.sync_all().map_err(io("sync", &state_tmp))?;
        // Both files are whole on disk before either takes its final name. A crash between the
        // two renames leaves a pair of two ids, which `read` refuses.
        let mem_path = dir.join(MEMORY_FILE);
        std::fs::rename(&mem_tmp, &mem_path).map_err(io("rename", &mem_path))?;
        created.retain(|p| *p != mem_tmp);
        let state_path = dir.join(STATE_FILE);
        std::fs::rename(&state_tmp, &state_path).map_err(io("rename", &state_path))?;
        created.clear();
        File::open(dir).and_then(|d| d.sync_all()).map_err(io("sync directory", dir))?;
        Ok(total)
    })();
    for path in created {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(path = %path.display(), error = %e, "snapshot: temporary file not removed");
        }
    }
    let total = result?;
    tracing::info!(dir = %dir.display(), snapshot = %id, memory_bytes = total, "snapshot written");
    Ok(SnapshotInfo {
        snapshot_id: Some(id.to_string()),
        // SAFETY: as above, the VM is paused.
        memory_digest: unsafe { memory::digest(mem) },
        memory_bytes: total,
        state_bytes: state_bytes.len() as u64,
    })
}

/// Writes the memory file (header and every region) into `file` and syncs it; returns the bytes
/// of guest memory.
///
/// # Safety
/// - Nothing may write guest memory while this runs (the VM is paused).
unsafe fn write_memory(file: &File, path: &Path, mem: &GuestMemory, id: SnapshotId) -> Result<u64, SnapshotError> {
    let mut header = vec![0u8; PAGE_SIZE];
    header[0..8].copy_from_slice(&MEMORY_MAGIC);
    header[8..12].copy_from_slice(&MEMORY_VERSION.to_le_bytes());
    let regions: Vec<_> = mem.iter().collect();
    header[12..16].copy_from_slice(&(regions.len() as u32).to_le_bytes());
    header[16..32].copy_from_slice(&id.0);
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
                .map_err(io("write", path))?;
        }
        let e = region_entry(MEMORY_VERSION, i);
        header[e..e + 8].copy_from_slice(&region.start_addr().raw_value().to_le_bytes());
        header[e + 8..e + 16].copy_from_slice(&region.len().to_le_bytes());
        header[e + 16..e + 24].copy_from_slice(&offset.to_le_bytes());
        header[e + 24..e + 28].copy_from_slice(&crc.to_le_bytes());
        offset += region.len();
        total += region.len();
    }
    let hcrc = crc32fast::hash(&header[..HEADER_CRC_AT]);
    header[HEADER_CRC_AT..].copy_from_slice(&hcrc.to_le_bytes());
    file.write_all_at(&header, 0).map_err(io("write", path))?;
    file.set_len(offset).map_err(io("resize", path))?;
    file.sync_all().map_err(io("sync", path))?;
    Ok(total)
}

/// Where region `i`'s entry starts in a memory header of `version`.
pub(crate) fn region_entry(version: u32, i: usize) -> usize {
    let table = if version == MEMORY_VERSION_UNBOUND { 16 } else { 32 };
    table + i * REGION_ENTRY
}

/// `state.bin`'s snapshot header.
fn state_header(id: SnapshotId) -> [u8; STATE_HEADER_LEN] {
    let mut h = [0u8; STATE_HEADER_LEN];
    h[0..8].copy_from_slice(&STATE_FILE_MAGIC);
    h[8..12].copy_from_slice(&STATE_FILE_VERSION.to_le_bytes());
    // 12..16: flags, 0.
    h[16..32].copy_from_slice(&id.0);
    let crc = crc32fast::hash(&h[..32]);
    h[32..36].copy_from_slice(&crc.to_le_bytes());
    // 36..40: reserved, 0.
    h
}

/// Reads `state.bin`: its snapshot id (`None` for format 1, a bare encoded `VmState`), the
/// state, and the file's length.
fn read_state(path: &Path) -> Result<(Option<SnapshotId>, VmState, u64), SnapshotError> {
    let mut bytes = Vec::new();
    File::open(path)
        .map_err(io("open", path))?
        .take(crate::state::MAX_STATE_BYTES + 4096 + STATE_HEADER_LEN as u64)
        .read_to_end(&mut bytes)
        .map_err(io("read", path))?;
    let bad = |problem: String| SnapshotError::File { path: path.to_path_buf(), problem };
    let (id, body) = if bytes.starts_with(&STATE_MAGIC) {
        (None, &bytes[..])
    } else if bytes.starts_with(&STATE_FILE_MAGIC) {
        if bytes.len() < STATE_HEADER_LEN {
            return Err(bad(format!(
                "truncated: {} bytes, the snapshot header alone is {STATE_HEADER_LEN}",
                bytes.len()
            )));
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        if crc32fast::hash(&bytes[..32]) != u32_at(32) {
            return Err(bad("snapshot header crc mismatch".into()));
        }
        let version = u32_at(8);
        if version != STATE_FILE_VERSION {
            return Err(bad(format!("snapshot format version {version}; this build reads 1..={STATE_FILE_VERSION}")));
        }
        let id = SnapshotId(bytes[16..32].try_into().expect("16 bytes"));
        (Some(id), &bytes[STATE_HEADER_LEN..])
    } else {
        let n = bytes.len().min(8);
        return Err(bad(format!("not a snapshot state file (magic {:02x?})", &bytes[..n])));
    };
    let state = VmState::decode(body).map_err(|source| SnapshotError::State { path: path.to_path_buf(), source })?;
    Ok((id, state, body.len() as u64))
}

/// Reads and verifies a snapshot: maps its memory copy-on-write (no copy) and decodes its
/// state. Every checksum, and that both files carry the same snapshot id, is checked before
/// anything is returned. A format 1 pair (no ids: written before ids existed) is read, with a
/// warning that nothing binds its two files.
pub fn read(dir: &Path) -> Result<(GuestMemory, VmState, SnapshotInfo), SnapshotError> {
    let state_path = dir.join(STATE_FILE);
    let (state_id, state, state_bytes) = read_state(&state_path)?;

    let mem_path = dir.join(MEMORY_FILE);
    let bad = |problem: String| SnapshotError::File { path: mem_path.clone(), problem };
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
    let mem_id = match version {
        MEMORY_VERSION => Some(SnapshotId(header[16..32].try_into().expect("16 bytes"))),
        MEMORY_VERSION_UNBOUND => None,
        _ => {
            return Err(bad(format!(
                "version {version}; this build reads {MEMORY_VERSION_UNBOUND}..={MEMORY_VERSION}"
            )));
        }
    };
    if mem_id != state_id {
        return Err(SnapshotError::Pair { dir: dir.to_path_buf(), memory: FileId(mem_id), state: FileId(state_id) });
    }
    if mem_id.is_none() {
        tracing::warn!(
            dir = %dir.display(),
            "snapshot of format 1: its memory and state files carry no snapshot id, so nothing shows they were written together"
        );
    }
    let count = u32_at(12) as usize;
    if count == 0 || count > MAX_REGIONS {
        return Err(bad(format!("{count} regions; 1 to {MAX_REGIONS} allowed")));
    }
    let mut regions = Vec::new();
    let mut crcs = Vec::new();
    let mut total = 0u64;
    for i in 0..count {
        let e = region_entry(version, i);
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
        snapshot_id: mem_id.map(|id| id.to_string()),
        // SAFETY: as above, nothing writes this memory yet.
        memory_digest: unsafe { memory::digest(&mem) },
        memory_bytes: total,
        state_bytes,
    };
    tracing::info!(dir = %dir.display(), snapshot = ?info.snapshot_id, memory_bytes = total, "snapshot read");
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

    /// Writes a second snapshot of the same layout but other contents into a new directory.
    fn other_snapshot(mem: &GuestMemory, state: &VmState) -> (tempfile::TempDir, SnapshotInfo) {
        let dir = tempfile::tempdir().unwrap();
        mem.write_slice(b"another snapshot", GuestAddress(0x10_0000)).unwrap();
        // SAFETY: test memory, no VM.
        let info = unsafe { write(dir.path(), mem, state) }.unwrap();
        (dir, info)
    }

    #[test]
    fn memory_and_state_of_two_snapshots_are_refused_as_a_pair() {
        let (a, mem, state) = setup();
        // SAFETY: test memory, no VM.
        let ia = unsafe { write(a.path(), &mem, &state) }.unwrap();
        let (b, ib) = other_snapshot(&mem, &state);
        assert_ne!(ia.snapshot_id, ib.snapshot_id);
        // B's state beside A's memory (same layout, both files whole): refused, naming both ids.
        std::fs::copy(b.path().join(STATE_FILE), a.path().join(STATE_FILE)).unwrap();
        let e = read(a.path()).unwrap_err();
        assert!(matches!(e, SnapshotError::Pair { .. }), "{e}");
        let e = e.to_string();
        let (ida, idb) = (ia.snapshot_id.clone().unwrap(), ib.snapshot_id.clone().unwrap());
        assert!(e.contains(&format!("memory.bin carries snapshot {ida}")), "{e}");
        assert!(e.contains(&format!("state.bin carries snapshot {idb}")), "{e}");
        // And B's own pair still reads, with its id.
        assert_eq!(read(b.path()).unwrap().2.snapshot_id, ib.snapshot_id);
    }

    #[test]
    fn files_are_private() {
        let (dir, mem, state) = setup();
        // SAFETY: test memory, no VM.
        unsafe { write(dir.path(), &mem, &state) }.unwrap();
        for name in [MEMORY_FILE, STATE_FILE] {
            let mode = std::fs::metadata(dir.path().join(name)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name}: mode {mode:o}");
        }
        // A directory the snapshot creates is the owner's alone too.
        let sub = dir.path().join("new");
        // SAFETY: test memory, no VM.
        unsafe { write(&sub, &mem, &state) }.unwrap();
        let mode = std::fs::metadata(&sub).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "directory mode {mode:o}");
    }

    /// A file outside the snapshot that symlinks point at: it must never change.
    fn victim(dir: &Path) -> PathBuf {
        let v = dir.join("victim");
        std::fs::write(&v, b"precious").unwrap();
        v
    }

    fn assert_untouched(victim: &Path) {
        assert_eq!(std::fs::read(victim).unwrap(), b"precious", "{} was written through a symlink", victim.display());
    }

    #[test]
    fn symlinks_at_the_final_names_and_older_temporary_names_are_not_followed() {
        let (dir, mem, state) = setup();
        let outside = tempfile::tempdir().unwrap();
        let v = victim(outside.path());
        // The final names, and the fixed temporary names earlier builds used.
        for name in [MEMORY_FILE, STATE_FILE, ".memory.bin.tmp", ".state.bin.tmp"] {
            std::os::unix::fs::symlink(&v, dir.path().join(name)).unwrap();
        }
        // SAFETY: test memory, no VM.
        let info = unsafe { write(dir.path(), &mem, &state) }.unwrap();
        assert_untouched(&v);
        for name in [MEMORY_FILE, STATE_FILE] {
            assert!(std::fs::symlink_metadata(dir.path().join(name)).unwrap().is_file(), "{name} is a file now");
        }
        assert_eq!(read(dir.path()).unwrap().2, info);
    }

    #[test]
    fn a_symlink_at_a_temporary_name_fails_the_write_and_is_not_followed() {
        let (dir, mem, state) = setup();
        // SAFETY: test memory, no VM.
        let first = unsafe { write(dir.path(), &mem, &state) }.unwrap();
        let outside = tempfile::tempdir().unwrap();
        let v = victim(outside.path());
        for (n, planted) in [MEMORY_FILE, STATE_FILE].into_iter().enumerate() {
            let id = SnapshotId([n as u8 + 1; 16]);
            let link = dir.path().join(temp_name(planted, id));
            std::os::unix::fs::symlink(&v, &link).unwrap();
            // SAFETY: test memory, no VM.
            let e = unsafe { write_with_id(dir.path(), &mem, &state, id) }.unwrap_err();
            let e = format!("{}", ErrChain(&e));
            assert!(e.contains(&format!("create {}", link.display())) && e.contains("exists"), "{e}");
            assert_untouched(&v);
            // Nothing this write created is left behind, and the snapshot there is intact.
            for name in [MEMORY_FILE, STATE_FILE] {
                let tmp = dir.path().join(temp_name(name, id));
                assert_eq!(tmp.symlink_metadata().is_ok(), name == planted, "{}", tmp.display());
            }
            assert_eq!(read(dir.path()).unwrap().2, first);
        }
    }

    /// Rewrites a format 2 pair in `dir` as format 1 (no ids; the region table at 16); only the
    /// memory file when `memory_only`.
    fn downgrade(dir: &Path, memory_only: bool) {
        let mp = dir.join(MEMORY_FILE);
        let mut m = std::fs::read(&mp).unwrap();
        let table = 64 * REGION_ENTRY;
        m.copy_within(32..32 + table, 16);
        m[16 + table..32 + table].fill(0);
        m[8..12].copy_from_slice(&MEMORY_VERSION_UNBOUND.to_le_bytes());
        let crc = crc32fast::hash(&m[..HEADER_CRC_AT]);
        m[HEADER_CRC_AT..PAGE_SIZE].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&mp, &m).unwrap();
        if !memory_only {
            let sp = dir.join(STATE_FILE);
            let s = std::fs::read(&sp).unwrap();
            std::fs::write(&sp, &s[STATE_HEADER_LEN..]).unwrap();
        }
    }

    #[test]
    fn a_format_1_snapshot_is_read_and_a_mixed_pair_refused() {
        let (dir, mem, state) = setup();
        // SAFETY: test memory, no VM.
        let info = unsafe { write(dir.path(), &mem, &state) }.unwrap();
        downgrade(dir.path(), false);
        let (mem2, state2, info2) = read(dir.path()).unwrap();
        assert_eq!((state2, info2.snapshot_id, info2.memory_digest), (state.clone(), None, info.memory_digest));
        let mut buf = [0u8; 14];
        mem2.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(&buf, b"hello snapshot");

        // SAFETY: test memory, no VM.
        let info = unsafe { write(dir.path(), &mem, &state) }.unwrap();
        downgrade(dir.path(), true);
        let e = read(dir.path()).unwrap_err().to_string();
        let id = info.snapshot_id.unwrap();
        assert!(
            e.contains("memory.bin carries no snapshot id (format 1), state.bin carries snapshot") && e.contains(&id),
            "{e}"
        );

        // A version from the future is refused, naming it.
        let sp = dir.path().join(STATE_FILE);
        let mut s = std::fs::read(&sp).unwrap();
        s[8..12].copy_from_slice(&3u32.to_le_bytes());
        let crc = crc32fast::hash(&s[..32]);
        s[32..36].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&sp, &s).unwrap();
        let e = read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("snapshot format version 3; this build reads 1..=2"), "{e}");
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
