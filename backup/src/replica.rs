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
    /// A VM could not be built over the replica ahead of promotion.
    #[error("replica: prepare a vm over the replica memory")]
    Prepare(#[source] vmm::vm::VmError),
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

    /// Builds a KVM VM over the replica memory ahead of promotion (see
    /// [`vmm::vm::PreparedVm`]), with the vCPU count of the consistent state; `None` while the
    /// replica holds no consistent state.
    pub fn prepare_vm(&self) -> Option<Result<vmm::vm::PreparedVm, ReplicaError>> {
        let (state, epoch) = (self.state.as_ref()?, self.consistent?);
        let vcpus = match vmm::VmState::decode(state) {
            Ok(s) => s.vcpus.len(),
            Err(source) => return Some(Err(ReplicaError::State { epoch, source })),
        };
        Some(self.mem.prepare_vm(u8::try_from(vcpus).unwrap_or(u8::MAX)).map_err(ReplicaError::Prepare))
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

#[cfg(test)]
mod tests {
    use super::*;
    use replication_proto::{
        MemoryLayout, Receiver, ReceiverConfig, ReceiverEvent, Role, Sender, SenderConfig, VmIdentity,
    };
    use std::time::Instant;

    fn pump(s: &mut Sender, r: &mut Receiver, now: Instant) {
        use replication_proto::Endpoint;
        loop {
            let mut moved = false;
            while let Some(t) = s.poll_transmit(now) {
                r.handle_input(now, t.as_slice());
                moved = true;
            }
            while let Some(t) = r.poll_transmit(now) {
                s.handle_input(now, t.as_slice());
                moved = true;
            }
            if !moved {
                break;
            }
        }
    }

    fn checkpoints(r: &mut Receiver) -> Vec<Checkpoint> {
        use replication_proto::Endpoint;
        let mut out = Vec::new();
        while let Some(ev) = r.poll_event() {
            if let ReceiverEvent::Checkpoint(cp) = ev {
                out.push(cp);
            }
        }
        out
    }

    /// A checkpoint that does not apply (its deltas were encoded against other pages than the
    /// replica holds) is refused whole: the replica keeps the previous committed epoch.
    #[test]
    fn a_checkpoint_that_does_not_apply_leaves_the_replica_unchanged() {
        use replication_proto::Endpoint;
        let layout = [(0u64, 64 * 4096u64)];
        let ml = MemoryLayout::flat(4096, 64 * 4096);
        let vm = VmIdentity { uuid: [1; 16], name: "t".into() };
        let mut s = Sender::new(SenderConfig::new(Role::Primary, vm.clone(), ml.clone(), 1));
        let mut r = Receiver::new(ReceiverConfig::new(Role::Backup, vm, ml, 2));
        let mut replica = Replica::new(&layout).unwrap();
        let now = Instant::now();
        s.connect(now);
        r.connect(now);
        pump(&mut s, &mut r, now);
        let state = {
            let mut st = vmm::state::tests_support::sample_state();
            st.memory = layout.to_vec();
            st.encode().unwrap()
        };
        let mut page = vec![7u8; 4096];
        s.submit_baseline(now, [(3u64, &page[..])], &state).unwrap();
        pump(&mut s, &mut r, now);
        for cp in checkpoints(&mut r) {
            replica.commit(&cp).unwrap();
            r.committed(now, cp.epoch()).unwrap();
        }
        pump(&mut s, &mut r, now);
        assert_eq!(replica.consistent_epoch(), Some(1));
        // Epoch 2 changes a few bytes of page 3: a delta against the copy last sent.
        page[100] = 9;
        s.submit(now, [(3u64, &page[..])], &state).unwrap();
        pump(&mut s, &mut r, now);
        let cps = checkpoints(&mut r);
        assert_eq!(cps.len(), 1);
        // The replica's page 3 is not what the sender encoded against (a torn earlier apply,
        // a bit flip in memory): the digest check must refuse epoch 2 without writing.
        replica.mem.page_mut(3).unwrap()[0] ^= 0xff;
        let before = replica.digest();
        let err = replica.commit(&cps[0]).unwrap_err();
        assert!(err.to_string().contains("does not apply"), "{err}");
        assert_eq!(replica.digest(), before, "a refused checkpoint changed the replica");
        assert_eq!(replica.committed_epoch(), Some(1));
        assert_eq!(replica.consistent_epoch(), Some(1));
    }
}
