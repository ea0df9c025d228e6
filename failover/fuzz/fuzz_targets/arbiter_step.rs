//! `cargo fuzz run arbiter_step`: see `failover::fuzzing::arbiter_step` for what it exercises.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    failover::fuzzing::arbiter_step(data);
});
