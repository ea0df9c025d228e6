//! The Understudy VM runtime.
//!
//! A general KVM virtual machine monitor built on the rust-vmm crates: guest memory
//! (vm-memory, with a dirty bitmap for the VMM's own writes), a KVM VM with the in-kernel
//! irqchip and PIT, vCPU threads that can be paused and resumed reliably, ELF/PVH boot, an
//! 8250 serial port and virtio-mmio devices. Every stateful part implements [`Persist`], and
//! [`VmState`] gathers all of it so that a VM can be captured at an instant and restored in
//! another process. The crate knows nothing of replication.
//!
//! ```no_run
//! use vmm::vm::{Vm, VmConfig};
//! let mut vm = Vm::boot(VmConfig {
//!     kernel: "target/guest/understudy-guest".into(),
//!     cmdline: "workload=counter".into(),
//!     memory_bytes: 256 << 20,
//!     vcpus: 1,
//!     serial: Box::new(std::io::stdout()),
//!     net: None,
//! })?;
//! vm.pause()?;
//! let state = vm.save_state()?;
//! vm.resume();
//! # let _ = state;
//! # Ok::<(), vmm::vm::VmError>(())
//! ```
#![allow(unsafe_code)]

pub mod boot;
pub mod bus;
pub mod copier;
pub mod devices;
pub mod dirty;
#[doc(hidden)]
pub mod fuzzing;
pub mod layout;
pub mod memory;
pub mod persist;
pub mod postcopy;
pub mod procstat;
pub mod sched;
pub mod snapshot;
pub mod state;
pub mod uffd;
pub mod vcpu;
pub mod vm;

pub use persist::Persist;
pub use state::VmState;
