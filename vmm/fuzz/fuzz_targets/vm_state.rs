//! `cargo fuzz run vm_state`: see `vmm::fuzzing::vm_state` for what it exercises.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmm::fuzzing::vm_state(data);
});
