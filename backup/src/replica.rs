//! The replica: guest memory plus the `VmState` of exactly one committed checkpoint.
//!
//! A checkpoint arrives whole and checked (the receiver staged it and verified every frame and
//! its checksum). [`Replica::commit`] then verifies it against the replica (content digest of
//! every page as it will be, deltas included) and only then writes: on any error nothing is
//! written and the replica stays at the previous committed epoch.
//!
//! Sync rounds (checkpoints without state) rebuild memory before the first consistent
//! checkpoint. On the first sync nothing is promotable until then. On a *re*-sync (the
//! primary was asked for a new baseline, or reconnected without resuming) the replica was
//! consistent at some epoch E, and the primary's released output may depend on E: the replica
//! then keeps a **rollback** of E (E's state plus the old contents of every page the sync
//! rounds overwrite) until a checkpoint of the new sync commits, and promotion in between
//! rolls back to E first. The primary holds its output from the start of the re-sync until
//! that checkpoint is acknowledged, so E is at least as new as any released output
//! (DESIGN.md invariant 4). The price: up to one copy of the guest's non-zero memory while a
//! re-sync runs.

use std::collections::HashMap;

use replication_proto::{ApplyError, Checkpoint, ReplicaMemory};
use vmm::memory::{OwnedMemory, PAGE_SIZE};

/// Errors of the replica.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The checkpoint does not apply; the replica is unchanged.
    #[error("replica: checkpoint does not apply")]
    Apply(#[from] ApplyError),
    /// The replica memory could not be allocated.
    #[error("replica: allocate memory")]
    Memory(#[from] vmm::memory::MemoryError),
    /// The checkpoint's state does not decode or could not be restored here.
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

/// Old page contents by frame number.
type SavedPages = HashMap<u64, Box<[u8]>>;

/// The last consistent checkpoint, kept while a re-sync overwrites the replica.
struct Rollback {
    epoch: u64,
    state: Vec<u8>,
    /// A baseline of the re-sync zeroed the memory: roll back by zeroing, then `pages`.
    zeroed: bool,
    /// Old contents of every page written since `epoch` (the first write of each wins), and
    /// with `zeroed`, of every page that was not zero at `epoch`.
    pages: SavedPages,
}

/// Guest memory and state of the last committed checkpoint.
pub struct Replica {
    mem: OwnedMemory,
    state: Option<Vec<u8>>,
    committed: Option<u64>,
    consistent: Option<u64>,
    rollback: Option<Rollback>,
}

impl Replica {
    /// An empty (all-zero) replica with the given layout.
    pub fn new(layout: &[(u64, u64)]) -> Result<Self, ReplicaError> {
        Ok(Self { mem: OwnedMemory::new(layout)?, state: None, committed: None, consistent: None, rollback: None })
    }

    /// The memory layout.
    pub fn layout(&self) -> Vec<(u64, u64)> {
        self.mem.layout()
    }

    /// Verifies `cp` against the replica and applies it whole, or changes nothing.
    ///
    /// A checkpoint with state must decode and be restorable over this replica's memory
    /// ([`vmm::VmState::check_restorable`]): one that could not be promoted is refused here.
    pub fn commit(&mut self, cp: &Checkpoint) -> Result<Committed, ReplicaError> {
        let epoch = cp.epoch();
        let state = cp.state();
        if !state.is_empty() {
            // Decode before writing anything: a bad state must not leave new pages behind.
            let st = vmm::VmState::decode(state).map_err(|source| ReplicaError::State { epoch, source })?;
            st.check_restorable(&self.mem.layout()).map_err(|source| ReplicaError::State { epoch, source })?;
        }
        // A sync round over a consistent replica (a re-sync): keep what it overwrites.
        let saved = if state.is_empty() { self.save_for_rollback(cp) } else { None };
        cp.apply(&mut Pages(&mut self.mem))?;
        self.committed = Some(epoch);
        if state.is_empty() {
            // A sync round: memory moves on, no state matches it until the next checkpoint.
            if let Some((zeroed, pages)) = saved {
                self.keep_rollback(zeroed, pages);
            }
            self.state = None;
            self.consistent = None;
        } else {
            if let Some(r) = self.rollback.take() {
                tracing::info!(epoch, old = r.epoch, "replica: re-sync complete, rollback of the old epoch dropped");
            }
            self.state = Some(state.to_vec());
            self.consistent = Some(epoch);
        }
        Ok(Committed { epoch, pages: cp.page_count(), consistent: self.consistent.is_some() })
    }

    /// The old contents `cp` would overwrite that a rollback does not hold yet, if the replica
    /// is consistent or already keeps a rollback; `(zeroed, pages)`.
    fn save_for_rollback(&self, cp: &Checkpoint) -> Option<(bool, SavedPages)> {
        if self.consistent.is_none() && self.rollback.is_none() {
            return None;
        }
        let held = |pfn: u64| self.rollback.as_ref().is_some_and(|r| r.pages.contains_key(&pfn));
        let mut pages = HashMap::new();
        if cp.is_baseline() && !self.rollback.as_ref().is_some_and(|r| r.zeroed) {
            // Everything goes to zero: keep every page that is not zero.
            for (gpa, len) in self.mem.layout() {
                let first = gpa / PAGE_SIZE as u64;
                for pfn in first..first + len / PAGE_SIZE as u64 {
                    if let Some(p) = self.mem.page(pfn)
                        && p.iter().any(|&b| b != 0)
                        && !held(pfn)
                    {
                        pages.insert(pfn, Box::from(p));
                    }
                }
            }
            return Some((true, pages));
        }
        for p in cp.pages() {
            if !held(p.pfn)
                && !pages.contains_key(&p.pfn)
                && let Some(old) = self.mem.page(p.pfn)
            {
                pages.insert(p.pfn, Box::from(old));
            }
        }
        Some((cp.is_baseline(), pages))
    }

    fn keep_rollback(&mut self, zeroed: bool, pages: SavedPages) {
        match &mut self.rollback {
            Some(r) => {
                r.zeroed |= zeroed;
                for (pfn, page) in pages {
                    r.pages.entry(pfn).or_insert(page);
                }
            }
            None => {
                let (Some(epoch), Some(state)) = (self.consistent, self.state.clone()) else { return };
                tracing::warn!(
                    epoch,
                    pages = pages.len(),
                    "replica: a re-sync overwrites epoch {epoch}; keeping it to roll back to"
                );
                self.rollback = Some(Rollback { epoch, state, zeroed, pages });
            }
        }
    }

    /// The epoch promotion would resume from: the consistent one, or during a re-sync the one
    /// kept to roll back to.
    pub fn promotable_epoch(&self) -> Option<u64> {
        self.consistent.or(self.rollback.as_ref().map(|r| r.epoch))
    }

    /// The epoch kept to roll back to while a re-sync runs.
    pub fn rollback_epoch(&self) -> Option<u64> {
        self.rollback.as_ref().map(|r| r.epoch)
    }

    /// Rolls an unfinished re-sync back: the replica is its old consistent checkpoint again.
    pub fn roll_back(&mut self) -> Option<u64> {
        let r = self.rollback.take()?;
        if r.zeroed {
            self.mem.zero_all();
        }
        for (pfn, page) in &r.pages {
            if let Some(dst) = self.mem.page_mut(*pfn) {
                dst.copy_from_slice(page);
            }
        }
        tracing::warn!(epoch = r.epoch, pages = r.pages.len(), "replica: rolled back an unfinished re-sync");
        self.state = Some(r.state);
        self.consistent = Some(r.epoch);
        self.committed = Some(r.epoch);
        Some(r.epoch)
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

    /// The page with frame number `pfn` (tests and digests).
    pub fn page(&self, pfn: u64) -> Option<&[u8]> {
        self.mem.page(pfn)
    }

    /// A handle on the replica's memory (post-copy: registered with userfaultfd before the
    /// replica is given up).
    pub fn memory_handle(&self) -> vmm::memory::GuestMemory {
        self.mem.handle()
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

    /// Builds the KVM VM over the replica's memory for `vcpus` vCPUs before any state arrived (a
    /// migration destination prepares while the rounds run, so its downtime does not pay for it).
    pub fn prepare_vm_for(&self, vcpus: u8) -> Result<vmm::vm::PreparedVm, ReplicaError> {
        self.mem.prepare_vm(vcpus).map_err(ReplicaError::Prepare)
    }

    /// Gives up memory and state to build a VM (promotion), without copying memory.
    /// An unfinished re-sync is rolled back first.
    pub fn into_parts(mut self) -> Result<(vmm::memory::GuestMemory, vmm::VmState, u64), ReplicaError> {
        if self.consistent.is_none() {
            self.roll_back();
        }
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

    fn synced(layout: &[(u64, u64)]) -> (Sender, Receiver, Replica, Vec<u8>, Instant) {
        use replication_proto::Endpoint;
        let pages = layout[0].1 / 4096;
        let ml = MemoryLayout::flat(4096, layout[0].1);
        let vm = VmIdentity { uuid: [1; 16], name: "t".into() };
        let mut s = Sender::new(SenderConfig::new(Role::Primary, vm.clone(), ml.clone(), 1));
        let mut r = Receiver::new(ReceiverConfig::new(Role::Backup, vm, ml, 2));
        let replica = Replica::new(layout).unwrap();
        let now = Instant::now();
        s.connect(now);
        r.connect(now);
        pump(&mut s, &mut r, now);
        let state = {
            let mut st = vmm::state::tests_support::sample_state();
            st.memory = layout.to_vec();
            st.encode().unwrap()
        };
        assert!(pages >= 8);
        (s, r, replica, state, now)
    }

    fn commit_all(s: &mut Sender, r: &mut Receiver, replica: &mut Replica, now: Instant) -> Vec<Committed> {
        pump(s, r, now);
        let mut out = Vec::new();
        for cp in checkpoints(r) {
            out.push(replica.commit(&cp).unwrap());
            r.committed(now, cp.epoch()).unwrap();
        }
        pump(s, r, now);
        out
    }

    /// A re-sync (a new baseline and pre-copy rounds over a consistent replica) keeps the old
    /// consistent checkpoint: promotion in the middle rolls back to it exactly (memory and
    /// state), and the first checkpoint of the new sync drops it.
    #[test]
    fn a_resync_can_be_rolled_back_to_the_last_consistent_checkpoint() {
        let layout = [(0u64, 64 * 4096u64)];
        let (mut s, mut r, mut replica, state, now) = synced(&layout);
        let a = vec![0xaa_u8; 4096];
        let b = vec![0xbb_u8; 4096];
        s.submit_baseline(now, [(3u64, &a[..]), (5, &a[..])], &state).unwrap();
        commit_all(&mut s, &mut r, &mut replica, now);
        s.submit(now, [(6u64, &b[..])], &state).unwrap();
        commit_all(&mut s, &mut r, &mut replica, now);
        let e = replica.consistent_epoch().expect("consistent");
        let digest_e = replica.digest();
        let state_e = replica.state_bytes().unwrap().to_vec();

        // The re-sync: a baseline that drops page 5 and changes page 3, then a round on 7.
        let c = vec![0xcc_u8; 4096];
        s.submit_baseline(now, [(3u64, &c[..]), (9, &c[..])], &[]).unwrap();
        commit_all(&mut s, &mut r, &mut replica, now);
        assert_eq!(replica.consistent_epoch(), None);
        assert_eq!(replica.rollback_epoch(), Some(e));
        assert_eq!(replica.promotable_epoch(), Some(e));
        s.submit(now, [(3u64, &b[..]), (7, &c[..])], &[]).unwrap();
        commit_all(&mut s, &mut r, &mut replica, now);
        assert_ne!(replica.digest(), digest_e);

        // Promotion now resumes from epoch e, byte for byte.
        assert_eq!(replica.roll_back(), Some(e));
        assert_eq!(replica.digest(), digest_e, "rolled-back memory differs from epoch {e}");
        assert_eq!(replica.state_bytes().unwrap(), &state_e[..]);
        assert_eq!(replica.consistent_epoch(), Some(e));
        assert_eq!(replica.page(5).unwrap(), &a[..]);
        assert!(replica.page(9).unwrap().iter().all(|&x| x == 0));
    }

    #[test]
    fn the_first_checkpoint_of_a_resync_drops_the_rollback() {
        let layout = [(0u64, 64 * 4096u64)];
        let (mut s, mut r, mut replica, state, now) = synced(&layout);
        let a = vec![0xaa_u8; 4096];
        s.submit_baseline(now, [(3u64, &a[..])], &state).unwrap();
        commit_all(&mut s, &mut r, &mut replica, now);
        s.submit_baseline(now, [(4u64, &a[..])], &[]).unwrap();
        commit_all(&mut s, &mut r, &mut replica, now);
        assert!(replica.rollback_epoch().is_some());
        s.submit(now, [(5u64, &a[..])], &state).unwrap();
        let done = commit_all(&mut s, &mut r, &mut replica, now);
        assert!(done.last().unwrap().consistent);
        assert_eq!(replica.rollback_epoch(), None);
        assert_eq!(replica.promotable_epoch(), replica.consistent_epoch());
        // The first sync ever keeps nothing: there is nothing to roll back to.
        let (mut s, mut r, mut fresh, _, now) = synced(&layout);
        s.submit_baseline(now, [(4u64, &a[..])], &[]).unwrap();
        commit_all(&mut s, &mut r, &mut fresh, now);
        assert_eq!((fresh.rollback_epoch(), fresh.promotable_epoch()), (None, None));
    }

    /// A checkpoint whose state could not be promoted here (another memory layout) is refused
    /// at commit, whole, instead of failing at failover.
    #[test]
    fn a_checkpoint_that_could_not_be_promoted_is_refused_at_commit() {
        use replication_proto::Endpoint;
        let layout = [(0u64, 64 * 4096u64)];
        let (mut s, mut r, mut replica, _, now) = synced(&layout);
        let other = {
            let mut st = vmm::state::tests_support::sample_state();
            st.memory = vec![(0, 128 * 4096)];
            st.encode().unwrap()
        };
        let a = vec![0xaa_u8; 4096];
        s.submit_baseline(now, [(3u64, &a[..])], &other).unwrap();
        pump(&mut s, &mut r, now);
        let cps = checkpoints(&mut r);
        assert_eq!(cps.len(), 1);
        let err = replica.commit(&cps[0]).unwrap_err();
        let chain = format!("{err}: {}", std::error::Error::source(&err).map(|e| e.to_string()).unwrap_or_default());
        assert!(chain.contains("memory layout"), "{chain}");
        assert_eq!(replica.committed_epoch(), None);
        assert!(replica.page(3).unwrap().iter().all(|&x| x == 0), "a refused checkpoint wrote pages");
        let _ = r.poll_event();
    }
}
