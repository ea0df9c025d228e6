//! `cargo fuzz run raft_wire`: see `failover::fuzzing::raft_wire` for what it exercises.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    failover::fuzzing::raft_wire(data);
});
