//! `cargo fuzz run frames`: see `replication_proto::fuzzing::frames` for what it exercises.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    replication_proto::fuzzing::frames(data);
});
