//! Fuzz entry points, shared by the `cargo fuzz` targets in `vmm/fuzz` and by the deterministic
//! smoke test in `tests/fuzz_smoke.rs`. Each takes arbitrary bytes and must not panic; each
//! checks that whatever decodes encodes back to the same thing.
//!
//! Checksums guard both encodings, and a fuzzer seldom guesses a crc32: each entry point can
//! "reseal" its input (recompute the checksums) so that mutated bytes reach the decoders behind
//! them.

use std::path::{Path, PathBuf};

use vmm_sys_util::eventfd::EventFd;

use crate::devices::serial::SerialDevice;
use crate::persist::{Persist, pod_bytes, pod_from_bytes};
use crate::snapshot::{self, MEMORY_MAGIC};
use crate::state::{STATE_MAGIC, VmState, VmStateVersion};

/// Bytes of the `VmState` header: magic, version, flags, body length, body crc, header crc.
const STATE_HEADER_LEN: usize = 32;
/// Bytes of the memory file's header page.
const MEMORY_HEADER_LEN: usize = crate::memory::PAGE_SIZE;

/// `VmState` decoding. Input: `[flags, bytes...]`. The bytes are decoded as they are, and (flag
/// bit 0) also as the CBOR body of a header with valid checksums (bits 1-2 pick the version
/// written: current, 0, current + 1, or current with a body length one short). Whatever decodes
/// must re-encode to a state that decodes equal and encodes to the same bytes again, and its
/// parts that restore without KVM (COM1, the virtio queues, the raw KVM structures) must restore
/// or fail cleanly, and save back what was restored.
pub fn vm_state(data: &[u8]) {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    check_state(bytes);
    if flags & 1 != 0 {
        let (version, short) = match (flags >> 1) & 3 {
            0 => (VmStateVersion::CURRENT.0, false),
            1 => (0, false),
            2 => (VmStateVersion::CURRENT.0 + 1, false),
            _ => (VmStateVersion::CURRENT.0, true),
        };
        let len = bytes.len() as u64 - u64::from(short && !bytes.is_empty());
        let mut sealed = state_header(version, len, bytes).to_vec();
        sealed.extend_from_slice(bytes);
        let decoded = check_state(&sealed);
        if version != VmStateVersion::CURRENT.0 {
            assert!(decoded.is_none(), "a state of version {version} decoded");
        }
    }
}

/// The header [`VmState::encode`] writes in front of `body`, announcing `len` body bytes, with
/// valid checksums (of the body as far as it goes).
fn state_header(version: u32, len: u64, body: &[u8]) -> [u8; STATE_HEADER_LEN] {
    let mut h = [0u8; STATE_HEADER_LEN];
    h[0..8].copy_from_slice(&STATE_MAGIC);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h[16..24].copy_from_slice(&len.to_le_bytes());
    let covered = &body[..usize::try_from(len).unwrap_or(usize::MAX).min(body.len())];
    h[24..28].copy_from_slice(&crc32fast::hash(covered).to_le_bytes());
    let crc = crc32fast::hash(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

fn check_state(bytes: &[u8]) -> Option<VmState> {
    let state = VmState::decode(bytes).ok()?;
    let encoded = state.encode().expect("a decoded state encodes");
    let again = VmState::decode(&encoded).expect("an encoded state decodes");
    assert_eq!(again, state, "a state does not survive encode and decode");
    assert_eq!(again.encode().expect("encodes"), encoded, "encoding a state is not stable");
    restore_parts(&state);
    Some(state)
}

/// Restores what needs no KVM: each must succeed or fail with an error, never panic, and give
/// back what it was restored from.
fn restore_parts(state: &VmState) {
    if let Ok(irq) = EventFd::new(0)
        && let Ok(serial) = SerialDevice::restore((irq, Box::new(std::io::sink())), &state.serial)
    {
        assert_eq!(serial.save(), state.serial, "com1 does not save what it restored");
    }
    if let Some(net) = &state.net {
        for (i, q) in net.mmio.queues.iter().enumerate() {
            if let Ok(queue) = q.to_queue(i) {
                let back = crate::devices::virtio::persist::QueueState::from_queue(&queue);
                assert_eq!(&back, q, "queue {i} does not save what it restored");
            }
        }
    }
    for (what, bytes) in [("pic master", &state.pic_master), ("pic slave", &state.pic_slave), ("ioapic", &state.ioapic)]
    {
        if let Ok(chip) = pod_from_bytes::<kvm_bindings::kvm_irqchip>(what, bytes) {
            assert_eq!(&pod_bytes(&chip), bytes);
        }
    }
    for v in &state.vcpus {
        if let Ok(fpu) = pod_from_bytes::<kvm_bindings::kvm_fpu>("fpu", &v.fpu) {
            assert_eq!(pod_bytes(&fpu), v.fpu);
        }
        if let Ok(xsave) = pod_from_bytes::<kvm_bindings::kvm_xsave>("xsave", &v.xsave) {
            assert_eq!(pod_bytes(&xsave), v.xsave);
        }
    }
}

/// A directory of this process for [`snapshot`]'s files (tmpfs when there is one).
fn scratch_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() { base.to_path_buf() } else { std::env::temp_dir() };
        let dir = base.join(format!("understudy-fuzz-snapshot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fuzz scratch directory");
        dir
    })
}

/// Reading a snapshot directory ([`snapshot::read`]) in this process's scratch directory; see
/// [`snapshot_in`].
pub fn snapshot(data: &[u8]) {
    snapshot_in(scratch_dir(), data);
}

/// Reading a snapshot directory: `state.bin` and `memory.bin` made from the input, read with
/// [`snapshot::read`] (headers, layout, checksums, mapping). Input:
/// `[flags, state_len: u16 le, state.bin bytes, memory.bin bytes]`. Flags: bit 0 writes as
/// `state.bin` a valid state whose memory layout is the regions the memory header lists instead
/// of the input's bytes; bit 1 reseals every checksum (both headers, each region); bits 4-7 add
/// that many zero pages at the end of `memory.bin`. Never panics; a snapshot that reads must
/// write again and read back equal (state, layout, memory digest).
pub fn snapshot_in(dir: &Path, data: &[u8]) {
    let [flags, a, b, rest @ ..] = data else {
        return;
    };
    let state_len = usize::from(u16::from_le_bytes([*a, *b])).min(rest.len());
    let (state_bytes, memory_bytes) = rest.split_at(state_len);
    let mut memory = memory_bytes.to_vec();
    memory.resize(memory.len() + usize::from(flags >> 4) * crate::memory::PAGE_SIZE, 0);
    let regions = listed_regions(&memory);
    let mut state = if flags & 1 != 0 {
        let mut s = crate::state::tests_support::sample_state();
        s.memory = regions.iter().map(|&(gpa, size, _)| (gpa, size)).collect();
        s.encode().expect("the sample state encodes")
    } else {
        state_bytes.to_vec()
    };
    if flags & 2 != 0 {
        reseal_memory(&mut memory, &regions);
        if state.starts_with(&STATE_MAGIC) && state.len() >= STATE_HEADER_LEN {
            let (header, body) = state.split_at(STATE_HEADER_LEN);
            let len = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
            let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
            let sealed = state_header(version, len, body);
            state[..STATE_HEADER_LEN].copy_from_slice(&sealed);
        }
    }
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).expect("fuzz scratch file");
    write(snapshot::STATE_FILE, &state);
    write(snapshot::MEMORY_FILE, &memory);

    let Ok((mem, state, info)) = snapshot::read(dir) else {
        return;
    };
    assert_eq!(crate::memory::layout_of(&mem), state.memory, "a snapshot read with another layout than its state's");
    assert_eq!(info.memory_bytes, state.memory.iter().map(|&(_, size)| size).sum::<u64>());
    let again = dir.join("again");
    // SAFETY: `mem` was just mapped by `read` and is given to no VM or device: nothing writes it.
    let written = unsafe { snapshot::write(&again, &mem, &state) }.expect("a snapshot that reads writes again");
    let (mem2, state2, info2) = snapshot::read(&again).expect("a snapshot written again reads");
    assert_eq!(state2, state, "the state changed on a second write");
    assert_eq!(crate::memory::layout_of(&mem2), crate::memory::layout_of(&mem));
    assert_eq!(info2.memory_digest, info.memory_digest, "the memory changed on a second write");
    assert_eq!(written.memory_digest, info.memory_digest);
    let _ = std::fs::remove_dir_all(&again);
}

/// The `(gpa, size, offset)` of each region the memory header lists, as far as the header goes
/// (format 1: a region table at byte 16 of 32-byte entries, the count at 12).
fn listed_regions(memory: &[u8]) -> Vec<(u64, u64, u64)> {
    if memory.len() < MEMORY_HEADER_LEN || memory[..8] != MEMORY_MAGIC {
        return Vec::new();
    }
    let u64_at = |o: usize| u64::from_le_bytes(memory[o..o + 8].try_into().expect("8 bytes"));
    let version = u32::from_le_bytes(memory[8..12].try_into().expect("4 bytes"));
    let count = u32::from_le_bytes(memory[12..16].try_into().expect("4 bytes")) as usize;
    // The region table is where the file's version puts it (format 2 moved it from 16 to 32).
    (0..count.min(snapshot::MAX_REGIONS))
        .map(|i| snapshot::region_entry(version, i))
        .map(|e| (u64_at(e), u64_at(e + 8), u64_at(e + 16)))
        .collect()
}

/// Recomputes each listed region's crc (where the file holds the region) and the header's.
fn reseal_memory(memory: &mut [u8], regions: &[(u64, u64, u64)]) {
    if memory.len() < MEMORY_HEADER_LEN || memory[..8] != MEMORY_MAGIC {
        return;
    }
    for (i, &(_, size, offset)) in regions.iter().enumerate() {
        let Some(end) = offset.checked_add(size).filter(|&end| end <= memory.len() as u64) else {
            continue;
        };
        let crc = crc32fast::hash(&memory[offset as usize..end as usize]);
        let version = u32::from_le_bytes(memory[8..12].try_into().expect("4 bytes"));
        let e = snapshot::region_entry(version, i) + 24;
        memory[e..e + 4].copy_from_slice(&crc.to_le_bytes());
    }
    let at = MEMORY_HEADER_LEN - 4;
    let crc = crc32fast::hash(&memory[..at]);
    memory[at..MEMORY_HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The snapshot target's "reseal" flag finds the region table where a format 2 file has it
    /// (it read format 1's place, so resealed inputs never got past the checksums).
    #[test]
    fn the_snapshot_target_reads_the_region_table_of_this_format() {
        let dir = tempfile::tempdir().unwrap();
        let mem = crate::memory::OwnedMemory::new(&[(0, 8192), (0x10_0000, 4096)]).unwrap().into_inner();
        let mut state = crate::state::tests_support::sample_state();
        state.memory = crate::memory::layout_of(&mem);
        // SAFETY: fresh memory, no VM.
        unsafe { snapshot::write(dir.path(), &mem, &state) }.unwrap();
        let mut memory = std::fs::read(dir.path().join(snapshot::MEMORY_FILE)).unwrap();
        let regions = listed_regions(&memory);
        let layout: Vec<(u64, u64)> = regions.iter().map(|&(gpa, size, _)| (gpa, size)).collect();
        assert_eq!(layout, state.memory);
        // Damage a page, reseal: the snapshot reads again.
        let (_, _, offset) = regions[0];
        memory[offset as usize + 5] ^= 0xff;
        reseal_memory(&mut memory, &regions);
        std::fs::write(dir.path().join(snapshot::MEMORY_FILE), &memory).unwrap();
        assert!(snapshot::read(dir.path()).is_ok());
    }
}
