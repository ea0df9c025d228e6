//! The in-memory view of the persisted raft state, which raft reads through [`raft::Storage`].
//!
//! It only ever holds what the [`Journal`](crate::journal::Journal) already made durable (or is
//! about to, within the same Ready): the arbiter writes the journal first, then updates this.

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use crate::journal::Recovered;

/// The raft log, hard state and latest snapshot in memory.
#[derive(Debug, Clone, Default)]
pub struct Store {
    hard_state: HardState,
    snapshot: Snapshot,
    entries: Vec<Entry>,
}

impl Store {
    /// The store a journal recovered; `bootstrap` is used when the journal never had a snapshot.
    pub fn from_recovered(recovered: &Recovered, bootstrap: impl FnOnce() -> Snapshot) -> Self {
        let snapshot = recovered.snapshot.clone().unwrap_or_else(bootstrap);
        let mut hard_state = recovered.hard_state.clone();
        let index = snapshot.get_metadata().index;
        if hard_state.commit < index {
            hard_state.commit = index;
        }
        if hard_state.term < snapshot.get_metadata().term {
            hard_state.term = snapshot.get_metadata().term;
        }
        Self { hard_state, snapshot, entries: recovered.entries.clone() }
    }

    /// The hard state.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// The latest snapshot (the bootstrap one at first).
    pub fn snapshot_ref(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The entries after the snapshot.
    pub fn entries_ref(&self) -> &[Entry] {
        &self.entries
    }

    /// The conf state as of the snapshot, updated by applied conf changes.
    pub fn conf_state(&self) -> &ConfState {
        self.snapshot.get_metadata().get_conf_state()
    }

    /// Records a conf state (after applying a conf change).
    pub fn set_conf_state(&mut self, cs: ConfState) {
        self.snapshot.mut_metadata().set_conf_state(cs);
    }

    /// Sets the hard state.
    pub fn set_hard_state(&mut self, hs: HardState) {
        self.hard_state = hs;
    }

    /// Sets the commit index.
    pub fn set_commit(&mut self, commit: u64) {
        self.hard_state.commit = commit;
    }

    fn first(&self) -> u64 {
        self.snapshot.get_metadata().index + 1
    }

    fn last(&self) -> u64 {
        self.snapshot.get_metadata().index + self.entries.len() as u64
    }

    /// Appends entries, replacing any from the first one's index on.
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        // Entries the snapshot already covers are skipped.
        let skip = self.first().saturating_sub(first.index) as usize;
        let entries = &entries[skip.min(entries.len())..];
        let Some(first) = entries.first() else { return };
        let keep = (first.index - self.first()) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(entries);
    }

    /// Installs a snapshot received from the leader: the log is replaced by it. raft-rs
    /// restores a snapshot only when this log does not hold the snapshot's last entry (else it
    /// just moves the commit index), so every entry here either is covered by the snapshot or
    /// follows a divergent entry, and none may stay (raft-rs's own view of the log after a
    /// restore ends at the snapshot; keeping a divergent tail made the two disagree, and
    /// raft-rs panic on its next election: found by the `arbiter_step` fuzz target).
    pub fn apply_snapshot(&mut self, snapshot: Snapshot) {
        let meta = snapshot.get_metadata();
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.hard_state.term = self.hard_state.term.max(meta.term);
        self.entries.clear();
        self.snapshot = snapshot;
    }

    /// Replaces the snapshot by a newer local one and drops the entries it covers.
    pub fn compact(&mut self, snapshot: Snapshot) {
        let index = snapshot.get_metadata().index;
        self.entries.retain(|e| e.index > index);
        self.snapshot = snapshot;
    }
}

impl Storage for Store {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.conf_state().clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let offset = self.first();
        let mut out = self.entries[(low - offset) as usize..(high - offset) as usize].to_vec();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let meta = self.snapshot.get_metadata();
        if idx == meta.index {
            return Ok(meta.term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot.get_metadata().index < request_index {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(self.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, ..Default::default() }
    }

    fn store() -> Store {
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 1;
        snap.mut_metadata().term = 1;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        Store::from_recovered(&Recovered::default(), || snap)
    }

    #[test]
    fn append_truncates_conflicts_and_skips_compacted() {
        let mut s = store();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (2, 1));
        assert_eq!(s.hard_state().commit, 1);
        s.append(&[entry(2, 1), entry(3, 1), entry(4, 1)]);
        s.append(&[entry(3, 2)]);
        assert_eq!(s.last_index().unwrap(), 3);
        assert_eq!(s.term(3).unwrap(), 2);
        assert_eq!(s.term(1).unwrap(), 1);
        s.append(&[entry(1, 1), entry(2, 1)]);
        assert_eq!(s.last_index().unwrap(), 2);
        assert!(matches!(s.term(0), Err(raft::Error::Store(StorageError::Compacted))));
        assert!(matches!(s.term(9), Err(raft::Error::Store(StorageError::Unavailable))));
    }

    #[test]
    fn entries_bounds_and_compaction() {
        let mut s = store();
        s.append(&(2..10).map(|i| entry(i, 1)).collect::<Vec<_>>());
        let got = s.entries(3, 6, None, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(got.iter().map(|e| e.index).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert!(s.entries(3, 11, None, GetEntriesContext::empty(false)).is_err());
        let mut snap = s.snapshot_ref().clone();
        snap.mut_metadata().index = 5;
        s.compact(snap);
        assert_eq!(s.first_index().unwrap(), 6);
        assert_eq!(s.term(5).unwrap(), 1);
        assert!(s.entries(4, 6, None, GetEntriesContext::empty(false)).is_err());
        assert_eq!(s.snapshot(5, 2).unwrap().get_metadata().index, 5);
        assert!(s.snapshot(6, 2).is_err());
    }

    #[test]
    fn a_snapshot_below_the_last_entry_drops_the_divergent_tail() {
        let mut s = store();
        s.append(&(2..=10).map(|i| entry(i, 1)).collect::<Vec<_>>());
        let mut snap = s.snapshot_ref().clone();
        snap.mut_metadata().index = 5;
        snap.mut_metadata().term = 2;
        s.apply_snapshot(snap);
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (6, 5));
        assert_eq!(s.term(5).unwrap(), 2);
        assert!(s.entries_ref().is_empty());
    }

    #[test]
    fn applying_a_snapshot_replaces_the_log() {
        let mut s = store();
        s.append(&(2..5).map(|i| entry(i, 1)).collect::<Vec<_>>());
        let mut snap = s.snapshot_ref().clone();
        snap.mut_metadata().index = 20;
        snap.mut_metadata().term = 3;
        s.apply_snapshot(snap);
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (21, 20));
        assert_eq!((s.hard_state().commit, s.hard_state().term), (20, 3));
    }
}
