//! `cargo fuzz run framing`: see `transport::fuzzing::framing` for what it exercises.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    transport::fuzzing::framing(data);
});
