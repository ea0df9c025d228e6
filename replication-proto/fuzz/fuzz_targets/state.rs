//! `cargo fuzz run state`: see `replication_proto::fuzzing::state` for what it exercises.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    replication_proto::fuzzing::state(data);
});
