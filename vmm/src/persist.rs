//! Save and restore of stateful VM parts.
//!
//! Every stateful part of a VM (a vCPU, the irqchip, the PIT, the clock, each device)
//! implements [`Persist`]. Its `State` is a plain serde type; states are encoded with CBOR,
//! a self-describing format, so that fields can be added later (mark them `#[serde(default)]`)
//! while primary and backup are upgraded one at a time.

/// A part of a VM whose state can be captured and brought back.
pub trait Persist: Sized {
    /// The captured state: plain data, serde-encodable, independent of any host resource.
    type State;
    /// What restoring needs beyond the state (memory, file descriptors, the VM fd, ...).
    type ConstructorArgs;
    /// The error restoring can fail with.
    type Error;

    /// Captures the current state. The caller guarantees the part is quiescent (vCPUs paused,
    /// device workers parked) so the state is consistent with guest memory.
    fn save(&self) -> Self::State;

    /// Builds the part again from a captured state.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}

/// Errors turning bytes back into a KVM structure.
#[derive(Debug, thiserror::Error)]
#[error("saved {what} is {got} bytes, expected {expected}")]
pub struct PodSizeError {
    /// Which structure.
    pub what: &'static str,
    /// Size found.
    pub got: usize,
    /// Size expected.
    pub expected: usize,
}

/// Marker for KVM structures that are plain old data: `repr(C)`, only integers and arrays of
/// integers, so every bit pattern is a valid value.
///
/// # Safety
/// - Implement only for types for which any byte pattern of `size_of::<Self>()` bytes is a
///   valid value and which hold no pointers or padding-sensitive invariants.
pub unsafe trait Pod: Default + Sized {}

// SAFETY: bindgen-generated repr(C) structs of integers and integer arrays.
unsafe impl Pod for kvm_bindings::kvm_fpu {}
// SAFETY: as above; the legacy 4 KiB xsave area is an array of u32.
unsafe impl Pod for kvm_bindings::kvm_xsave {}
// SAFETY: as above; the union members are integer arrays and integer structs.
unsafe impl Pod for kvm_bindings::kvm_irqchip {}

/// The bytes of a plain-old-data KVM structure.
pub fn pod_bytes<T: Pod>(v: &T) -> Vec<u8> {
    let size = std::mem::size_of::<T>();
    let mut out = vec![0u8; size];
    // SAFETY: `T: Pod` is plain data without pointers; reading its `size` bytes from a valid
    // reference is in bounds, and `out` has exactly `size` bytes.
    unsafe { std::ptr::copy_nonoverlapping((v as *const T).cast::<u8>(), out.as_mut_ptr(), size) };
    out
}

/// A plain-old-data KVM structure from its bytes.
pub fn pod_from_bytes<T: Pod>(what: &'static str, bytes: &[u8]) -> Result<T, PodSizeError> {
    let size = std::mem::size_of::<T>();
    if bytes.len() != size {
        return Err(PodSizeError { what, got: bytes.len(), expected: size });
    }
    let mut v = T::default();
    // SAFETY: `T: Pod` accepts any byte pattern, and `bytes` has exactly its size.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut v as *mut T).cast::<u8>(), size) };
    Ok(v)
}
