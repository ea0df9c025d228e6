//! A short, deterministic fuzz run inside `cargo test`: random and mutated inputs into each fuzz
//! entry point of `vmm::fuzzing` (the same functions the `cargo fuzz` targets in `fuzz/` call),
//! so every test run exercises the state and snapshot decoders on hostile input.
//!
//! `FUZZ_SMOKE_ITERS` sets the inputs per target (default 20,000 in release);
//! `FUZZ_SEED_DIR` also writes the seeds out as files (see `replication_proto::fuzzing::smoke`,
//! whose harness this uses).

use replication_proto::fuzzing::smoke;
use vmm::fuzzing;
use vmm::memory::OwnedMemory;
use vmm::snapshot;
use vmm::state::tests_support::sample_state;

/// A CBOR `VmState` body (the encoding without its 32-byte header).
fn body(state: &vmm::VmState) -> Vec<u8> {
    state.encode().unwrap()[32..].to_vec()
}

#[test]
fn fuzz_smoke_vm_state() {
    let mut with_net = sample_state();
    with_net.net = Some(Default::default());
    let seeds = vec![
        [vec![0], sample_state().encode().unwrap()].concat(),
        [vec![1], body(&sample_state())].concat(),
        [vec![1], body(&with_net)].concat(),
    ];
    smoke::run("vm_state", &seeds, 1, smoke::iterations(20_000, 2_000), |_, _| {}, fuzzing::vm_state);
}

/// The files of a real snapshot as `fuzzing::snapshot` takes them.
fn snapshot_input(flags: u8) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let mem = OwnedMemory::new(&[(0, 8192), (0x10_0000, 4096)]).unwrap().into_inner();
    let mut state = sample_state();
    state.memory = vmm::memory::layout_of(&mem);
    // SAFETY: fresh memory, no VM.
    unsafe { snapshot::write(dir.path(), &mem, &state) }.unwrap();
    let state = std::fs::read(dir.path().join(snapshot::STATE_FILE)).unwrap();
    let memory = std::fs::read(dir.path().join(snapshot::MEMORY_FILE)).unwrap();
    let state = if flags & 1 != 0 { Vec::new() } else { state };
    [vec![flags], (state.len() as u16).to_le_bytes().to_vec(), state, memory].concat()
}

#[test]
fn fuzz_smoke_snapshot() {
    // On tmpfs when there is one: every snapshot that reads is written again, with fsyncs.
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap();
    let seeds = vec![snapshot_input(0), snapshot_input(2), snapshot_input(3)];
    let n = smoke::iterations(20_000, 1_000);
    smoke::run("snapshot", &seeds, 2, n, |_, _| {}, |d| fuzzing::snapshot_in(dir.path(), d));
}
