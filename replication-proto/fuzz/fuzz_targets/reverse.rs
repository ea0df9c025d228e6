//! `cargo fuzz run reverse`: see `replication_proto::fuzzing::reverse` for what it exercises.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    replication_proto::fuzzing::reverse(data);
});
