//! Host-testable logic of the fixture guest (`testbed/guest`): the kernel command line, the
//! memcached text protocol with its memory-bounded store, and the workloads' checksums.
//!
//! `no_std` + `alloc`, no `unsafe`: the guest links it as is, and `cargo test -p guest-kv`
//! runs its tests on the host.
//!
//! ```
//! let c = guest_kv::cmdline::parse("workload=counter period_ms=20").unwrap();
//! assert_eq!(c.workload, guest_kv::cmdline::Workload::Counter { period_ms: 20 });
//! assert_eq!(guest_kv::checksum::counter_sum(0), guest_kv::checksum::COUNTER_SUM_INIT);
//! ```
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod checksum;
pub mod cmdline;
pub mod protocol;
pub mod store;
