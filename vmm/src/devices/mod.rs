//! Emulated devices.

pub mod serial;
pub mod tap;
pub mod virtio;
