//! `cargo fuzz run apply`: see `replication_proto::fuzzing::apply` for what it exercises.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    replication_proto::fuzzing::apply(data);
});
