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
