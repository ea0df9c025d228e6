//! The replica: guest memory plus the `VmState` of exactly one committed checkpoint.
//!
//! A checkpoint arrives whole and checked (the receiver staged it and verified every frame and
//! its checksum). [`Replica::commit`] then verifies it against the replica (content digest of
//! every page as it will be, deltas included) and only then writes: on any error nothing is
//! written and the replica stays at the previous committed epoch.
//!
//! Sync rounds (checkpoints without state) rebuild memory before the first consistent
//! checkpoint; while they are applied the replica is not promotable.

use replication_proto::{ApplyError, Checkpoint, ReplicaMemory};
use vmm::memory::OwnedMemory;

/// Errors of the replica.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The checkpoint does not apply; the replica is unchanged.
    #[error("replica: checkpoint does not apply")]
    Apply(#[from] ApplyError),
    /// The replica memory could not be allocated.
    #[error("replica: allocate memory")]
    Memory(#[from] vmm::memory::MemoryError),
    /// The checkpoint's state does not decode.
    #[error("replica: checkpoint {epoch} state")]
    State {
        /// The epoch.
        epoch: u64,
        /// Why.
        #[source]
        source: vmm::state::StateError,
    },
    /// There is no consistent checkpoint to promote.
    #[error("replica holds no consistent checkpoint (still syncing)")]
    NotConsistent,
}

struct Pages<'a>(&'a mut OwnedMemory);

impl ReplicaMemory for Pages<'_> {
    fn page(&self, pfn: u64) -> Option<&[u8]> {
        self.0.page(pfn)
    }
    fn page_mut(&mut self, pfn: u64) -> Option<&mut [u8]> {
        self.0.page_mut(pfn)
    }
    fn zero_all(&mut self) {
        self.0.zero_all()
    }
}

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// The epoch.
    pub epoch: u64,
    /// Pages written.
    pub pages: usize,
    /// Whether the replica is now a consistent, promotable checkpoint.
    pub consistent: bool,
}

/// Guest memory and state of the last committed checkpoint.
pub struct Replica {
    mem: OwnedMemory,
    state: Option<Vec<u8>>,
    committed: Option<u64>,
    consistent: Option<u64>,
}

impl Replica {
    /// An empty (all-zero) replica with the given layout.
    pub fn new(layout: &[(u64, u64)]) -> Result<Self, ReplicaError> {
        Ok(Self { mem: OwnedMemory::new(layout)?, state: None, committed: None, consistent: None })
    }

    /// The memory layout.
    pub fn layout(&self) -> Vec<(u64, u64)> {
        self.mem.layout()
    }

    /// Verifies `cp` against the replica and applies it whole, or changes nothing.
    pub fn commit(&mut self, cp: &Checkpoint) -> Result<Committed, ReplicaError> {
        let epoch = cp.epoch();
        let state = cp.state();
        if !state.is_empty() {
            // Decode before writing anything: a bad state must not leave new pages behind.
            vmm::VmState::decode(state).map_err(|source| ReplicaError::State { epoch, source })?;
        }
        cp.apply(&mut Pages(&mut self.mem))?;
        self.committed = Some(epoch);
        if state.is_empty() {
            // A sync round: memory moves on, no state matches it until the next checkpoint.
            self.state = None;
            self.consistent = None;
        } else {
            self.state = Some(state.to_vec());
            self.consistent = Some(epoch);
        }
        Ok(Committed { epoch, pages: cp.page_count(), consistent: self.consistent.is_some() })
    }

    /// Last committed epoch.
    pub fn committed_epoch(&self) -> Option<u64> {
        self.committed
    }

    /// Last committed epoch that is a consistent checkpoint (promotable), if the replica is at it.
    pub fn consistent_epoch(&self) -> Option<u64> {
        self.consistent
    }

    /// Digest of the replica memory.
    pub fn digest(&self) -> u64 {
        self.mem.digest()
    }

    /// The encoded `VmState` of the consistent checkpoint.
    pub fn state_bytes(&self) -> Option<&[u8]> {
        self.state.as_deref()
    }

    /// Gives up memory and state to build a VM (promotion), without copying memory.
    pub fn into_parts(self) -> Result<(vmm::memory::GuestMemory, vmm::VmState, u64), ReplicaError> {
        let (Some(state), Some(epoch)) = (self.state, self.consistent) else {
            return Err(ReplicaError::NotConsistent);
        };
        let state = vmm::VmState::decode(&state).map_err(|source| ReplicaError::State { epoch, source })?;
        Ok((self.mem.into_inner(), state, epoch))
    }
}
