//! The Understudy VM runtime.
//!
//! A general KVM virtual machine monitor built on the rust-vmm crates: guest memory
//! (vm-memory, with a dirty bitmap for the VMM's own writes), a KVM VM with the in-kernel
//! irqchip and PIT, vCPU threads that can be paused and resumed reliably, ELF/PVH boot, an
//! 8250 serial port and virtio-mmio devices. Every stateful part implements [`Persist`], and
//! [`VmState`](state::VmState) gathers all of it so that a VM can be captured at an instant and
//! restored in another process. The crate knows nothing of replication.
#![allow(unsafe_code)]

pub mod bus;
pub mod devices;
pub mod memory;
pub mod persist;

pub use persist::Persist;
