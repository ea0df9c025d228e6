//! Applying committed entries and snapshots to the state machine, and turning what changed
//! into this node's events (granted, fenced, protected, degraded, backup recorded or dropped).

use std::time::Instant;

use protobuf::Message as _;
use raft::Storage as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, Entry, EntryType, Snapshot};

use super::{Arbiter, ArbiterError, Event};
use crate::state::{Applied, Command, StateMachine, VmId, VmRecord};

impl Arbiter {
    pub(super) fn install_snapshot(&mut self, now: Instant, snap: Snapshot) -> Result<(), ArbiterError> {
        let index = snap.get_metadata().index;
        let sm = StateMachine::decode(&snap.data).map_err(|source| ArbiterError::Snapshot { index, source })?;
        self.raw.mut_store().apply_snapshot(snap);
        let store = self.raw.store();
        let (snap, hs) = (store.snapshot_ref().clone(), store.hard_state().clone());
        let entries = store.entries_ref().to_vec();
        self.journal.rewrite(&snap, &hs, &entries).map_err(|e| self.stop(e))?;
        tracing::info!(node = self.id, index, "snapshot installed");
        let silent = index <= self.replay_until;
        let old = std::mem::replace(&mut self.sm, sm);
        self.applied = index;
        // Reconcile this node's view with the new state, as if the skipped entries had applied.
        let me = self.id;
        let records: Vec<(VmId, VmRecord)> = self.sm.iter().map(|(vm, r)| (vm, *r)).collect();
        for (vm, r) in records {
            let before = old.get(vm).copied();
            let generation = r.generation;
            let local = self.vms.entry(vm).or_default();
            if r.holder == me && local.holding != Some(generation) {
                local.holding = Some(generation);
                local.fenced = None;
                local.lease_until = None;
                local.lease_ok = false;
                if !silent {
                    tracing::info!(node = me, %vm, generation, "granted (from a snapshot)");
                    self.events.push_back(Event::Granted { vm, generation });
                }
            } else if r.holder != me
                && let Some(held) = local.holding.filter(|&g| g < generation)
            {
                self.fence(now, vm, held, generation, silent);
            }
            let was_backup = before.is_some_and(|b| b.backup == Some(me));
            let is_backup = r.backup == Some(me);
            let same_generation = before.is_some_and(|b| b.generation == generation);
            if was_backup && !(is_backup && same_generation) && r.holder != me {
                if let Some(local) = self.vms.get_mut(&vm) {
                    local.takeover = false;
                }
                if !silent {
                    tracing::warn!(node = me, %vm, generation, "no longer the backup (from a snapshot)");
                    self.events.push_back(Event::BackupDropped { vm, generation });
                }
            }
            if is_backup && !(was_backup && same_generation) && !silent {
                tracing::info!(node = me, %vm, generation, holder = r.holder, "recorded as backup (from a snapshot)");
                self.events.push_back(Event::BackupOf { vm, generation, holder: r.holder });
            }
            if r.holder == me && before.is_some_and(|b| b.holder == me && b.backup != r.backup) && !silent {
                self.events.push_back(match r.backup {
                    Some(backup) => Event::Protected { vm, generation, backup },
                    None => Event::Degraded { vm, generation },
                });
            }
        }
        Ok(())
    }

    pub(super) fn maybe_compact(&mut self) -> Result<(), ArbiterError> {
        let store = self.raw.store();
        let snap_index = store.snapshot_ref().get_metadata().index;
        if self.applied < snap_index + self.config.snapshot_every {
            return Ok(());
        }
        let term = store.term(self.applied)?;
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = self.applied;
        snap.mut_metadata().term = term;
        snap.mut_metadata().set_conf_state(store.conf_state().clone());
        snap.data = self.sm.encode().into();
        self.raw.mut_store().compact(snap);
        let store = self.raw.store();
        let (snap, hs) = (store.snapshot_ref().clone(), store.hard_state().clone());
        let entries = store.entries_ref().to_vec();
        self.journal.rewrite(&snap, &hs, &entries).map_err(|e| self.stop(e))?;
        tracing::debug!(node = self.id, index = self.applied, kept = entries.len(), "log compacted");
        Ok(())
    }

    pub(super) fn apply_entries(&mut self, now: Instant, entries: Vec<Entry>) {
        for e in entries {
            if e.index <= self.applied {
                continue;
            }
            self.applied = e.index;
            let silent = e.index <= self.replay_until;
            match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => {}
                EntryType::EntryNormal => match Command::decode(&e.data) {
                    Ok(cmd) => {
                        let voters = self.raw.store().conf_state().voters.clone();
                        let outcome = self.sm.apply(&cmd, &voters);
                        self.on_applied(now, outcome, silent);
                    }
                    Err(err) => tracing::error!(node = self.id, index = e.index, error = %err, "entry skipped"),
                },
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => self.apply_conf_change(&e),
            }
        }
    }

    pub(super) fn apply_conf_change(&mut self, e: &Entry) {
        let result = if e.get_entry_type() == EntryType::EntryConfChange {
            ConfChange::parse_from_bytes(&e.data)
                .map_err(|e| e.to_string())
                .and_then(|cc| self.raw.apply_conf_change(&cc).map_err(|e| e.to_string()))
        } else {
            ConfChangeV2::parse_from_bytes(&e.data)
                .map_err(|e| e.to_string())
                .and_then(|cc| self.raw.apply_conf_change(&cc).map_err(|e| e.to_string()))
        };
        match result {
            Ok(cs) => {
                tracing::info!(node = self.id, voters = ?cs.voters, "membership changed");
                self.raw.mut_store().set_conf_state(cs);
            }
            Err(err) => tracing::error!(node = self.id, index = e.index, error = %err, "conf change skipped"),
        }
    }

    pub(super) fn on_applied(&mut self, now: Instant, outcome: Applied, silent: bool) {
        let me = self.id;
        match outcome {
            Applied::Granted { vm, previous, record, claim } => {
                let generation = record.generation;
                let local = self.vms.entry(vm).or_default();
                if record.holder == me {
                    local.holding = Some(generation);
                    local.fenced = None;
                    local.first_grant = false;
                    local.takeover = false;
                    local.degrade = false;
                    local.set_backup = None;
                    local.lease_until = None;
                    local.lease_ok = false;
                    if silent {
                        return;
                    }
                    local.active = true;
                    local.next_renew = Some(now);
                    if claim.incarnation == self.incarnation
                        && let Some((at, lease)) = local.pending.remove(&claim.seq)
                    {
                        local.lease_until = Some(at + lease);
                        local.lease_ok = at + lease > now;
                    }
                    tracing::info!(node = me, %vm, generation, lease_ok = local.lease_ok, "granted");
                    self.events.push_back(Event::Granted { vm, generation });
                } else {
                    if local.first_grant && previous.is_none() {
                        local.first_grant = false;
                        if !silent {
                            tracing::info!(node = me, %vm, holder = record.holder, "first grant went to another node");
                            self.events.push_back(Event::Refused { vm, holder: record.holder, generation });
                        }
                    }
                    if let Some(held) = local.holding {
                        self.fence(now, vm, held, generation, silent);
                    }
                }
            }
            Applied::Renewed { vm, record, claim } => {
                if claim.node != me || claim.incarnation != self.incarnation {
                    return;
                }
                let Some(local) = self.vms.get_mut(&vm) else { return };
                if local.holding != Some(record.generation) {
                    return;
                }
                if let Some((at, lease)) = local.pending.remove(&claim.seq) {
                    let until = at + lease;
                    local.lease_until = Some(local.lease_until.map_or(until, |u| u.max(until)));
                }
            }
            Applied::BackupSet { vm, record } => {
                let backup = record.backup.unwrap_or_default();
                if record.holder == me {
                    if let Some(local) = self.vms.get_mut(&vm)
                        && local.set_backup == Some(backup)
                    {
                        local.set_backup = None;
                    }
                    if !silent {
                        tracing::info!(node = me, %vm, generation = record.generation, backup, "protected");
                        self.events.push_back(Event::Protected { vm, generation: record.generation, backup });
                    }
                } else if backup == me && !silent {
                    tracing::info!(node = me, %vm, generation = record.generation, holder = record.holder, "recorded as backup");
                    self.events.push_back(Event::BackupOf { vm, generation: record.generation, holder: record.holder });
                }
            }
            Applied::Degraded { vm, record, dropped } => {
                if record.holder == me {
                    if let Some(local) = self.vms.get_mut(&vm) {
                        local.degrade = false;
                    }
                    if !silent {
                        tracing::warn!(node = me, %vm, generation = record.generation, "running degraded");
                        self.events.push_back(Event::Degraded { vm, generation: record.generation });
                    }
                }
                if dropped == Some(me) {
                    if let Some(local) = self.vms.get_mut(&vm) {
                        local.takeover = false;
                    }
                    if !silent {
                        tracing::warn!(node = me, %vm, generation = record.generation, "no longer the backup");
                        self.events.push_back(Event::BackupDropped { vm, generation: record.generation });
                    }
                }
            }
            Applied::Rejected { vm, reason } => {
                tracing::trace!(node = me, %vm, reason, "command rejected");
            }
        }
    }

    pub(super) fn fence(&mut self, _now: Instant, vm: VmId, held: u64, generation: u64, silent: bool) {
        let local = self.vms.entry(vm).or_default();
        local.holding = None;
        local.active = false;
        local.lease_until = None;
        local.lease_ok = false;
        local.degrade = false;
        local.set_backup = None;
        local.fenced = Some(generation);
        if !silent {
            tracing::error!(node = self.id, %vm, held, generation, "fenced: a newer generation was granted elsewhere");
            self.events.push_back(Event::Fenced { vm, generation });
        }
    }
}
