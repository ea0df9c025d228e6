//! Understudy's testbed: runs the fixture guest (`testbed/guest`, built by `make guest`) and
//! checks what its workloads print. The guest's contract is `docs/guest.md`.
//!
//! ```no_run
//! use std::time::Duration;
//! use testbed::qemu::{QemuGuest, QemuOptions};
//! let mut g = QemuGuest::spawn(&QemuOptions::new("workload=counter period_ms=20")).unwrap();
//! g.wait_for_line(|l| l == "ready", Duration::from_secs(5)).unwrap();
//! let line = g.wait_for_line(|l| l.starts_with("seq="), Duration::from_secs(5)).unwrap();
//! let (n, sum) = testbed::lines::parse_counter(&line).unwrap();
//! assert_eq!(sum, guest_kv::checksum::counter_sum(n));
//! ```

pub mod env;
pub mod faults;
pub mod harness;
pub mod impair;
pub mod lines;
pub mod migrate_bench;
pub mod qemu;
