//! `cargo fuzz run bulk`: see `replication_proto::fuzzing::bulk` for what it exercises.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    replication_proto::fuzzing::bulk(data);
});
