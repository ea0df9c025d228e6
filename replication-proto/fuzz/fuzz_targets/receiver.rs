//! `cargo fuzz run receiver`: see `replication_proto::fuzzing::receiver` for what it exercises.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    replication_proto::fuzzing::receiver(data);
});
