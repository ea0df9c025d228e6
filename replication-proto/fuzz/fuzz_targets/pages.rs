//! `cargo fuzz run pages`: see `replication_proto::fuzzing::pages` for what it exercises.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    replication_proto::fuzzing::pages(data);
});
