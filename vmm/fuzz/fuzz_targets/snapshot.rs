//! `cargo fuzz run snapshot`: see `vmm::fuzzing::snapshot` for what it exercises.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmm::fuzzing::snapshot(data);
});
