//! What the KVM tests of this crate share (each test crate uses part of it).

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Serial output collected in memory.
#[derive(Clone, Default)]
pub struct Capture(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Fails the test with a line that stands out in the harness output.
pub fn fail(test: &str, why: String) -> ! {
    panic!("\n*** FAIL: {test}: {why} ***\n")
}

/// The fixture guest; fails the test loudly when /dev/kvm or the image is missing.
pub fn kernel(test: &str) -> PathBuf {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        fail(test, format!("/dev/kvm is not usable ({e}); this test needs KVM"));
    }
    let kernel = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest/understudy-guest");
    if !kernel.exists() {
        fail(test, format!("{} missing: run `make guest`", kernel.display()));
    }
    kernel
}
