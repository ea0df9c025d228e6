//! Scaffolding for the tests, benches and harnesses of every crate: child processes killed on
//! drop ([`proc`]), network namespaces with TAP devices and bridges ([`netns`]), bounded waits
//! ([`wait`]), seeded generators ([`rng`]), percentiles and medians ([`stats`]), directories
//! removed on drop ([`tempdir`]), benches' JSON results ([`results`]) and the flag that turns SIGINT into a clean-up
//! ([`interrupt`]). Nothing here knows the `understudy` binary: callers pass programs, paths
//! and arguments in.
//!
//! ```
//! use testbed::harness::{rng::Rng, stats};
//! let mut rng = Rng::new(7);
//! let v: Vec<u64> = (0..101).map(|_| rng.below(1000)).collect();
//! let p50 = stats::percentile(&v, 0.5).unwrap();
//! assert!(v.iter().filter(|&&x| x < p50).count() <= 50);
//! ```

pub mod interrupt;
pub mod netns;
pub mod proc;
pub mod results;
pub mod rng;
pub mod stats;
pub mod tempdir;
pub mod wait;

use std::sync::{Mutex, MutexGuard};

/// VM tests share two cores: [`serial_guard`] runs them one at a time (within a test binary).
static VM_LOCK: Mutex<()> = Mutex::new(());

/// Takes the VM test lock (a test that panicked while holding it does not poison it).
pub fn serial_guard() -> MutexGuard<'static, ()> {
    VM_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether /dev/kvm is usable; prints a loud SKIP line naming `test` when it is not.
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            eprintln!("\n*** SKIP: {test}: /dev/kvm is not usable ({e}); this test needs KVM ***\n");
            false
        }
    }
}
