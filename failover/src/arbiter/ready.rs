//! The raft loop of the arbiter: the grant gate on what comes in, proposals, renewals and
//! retries, leadership placement, and the `Ready` handling that persists before it sends.

use std::collections::BTreeMap;
use std::time::Instant;

use raft::SnapshotStatus;
use raft::StateRole;
use raft::eraftpb::{Message, MessageType};

use super::{Arbiter, ArbiterError, Event, splitmix};
use crate::NodeId;
use crate::journal::JournalError;
use crate::state::{Claim, Command, VmId};
use crate::wire;

impl Arbiter {
    /// The grant gate. An append or proposal that carries a grant this node promised not to
    /// help with yet is cut just before that grant (the entries before it are accepted, so a
    /// retransmission finds them in the log and does not renew the promise); if the grant comes
    /// first, the message is dropped (raft retries). Records the promises of the claims it lets
    /// through. Returns false when nothing is left to step.
    pub(super) fn admit(&mut self, now: Instant, msg: &mut Message) -> bool {
        match msg.get_msg_type() {
            MessageType::MsgAppend | MessageType::MsgPropose => {
                let mut cut = None;
                for (i, e) in msg.get_entries().iter().enumerate() {
                    // Our acknowledgement cannot help commit what is committed already (the
                    // leader says so in `commit`), nor what we already hold: no gate for those.
                    if !self.is_fresh(msg, e) {
                        continue;
                    }
                    let Ok(cmd) = Command::decode(&e.data) else { continue };
                    if !self.admit_command(now, &cmd) {
                        cut = Some(i);
                        break;
                    }
                }
                match cut {
                    None => true,
                    Some(0) => false,
                    Some(i) => {
                        msg.mut_entries().truncate(i);
                        true
                    }
                }
            }
            MessageType::MsgSnapshot => {
                // A snapshot may carry claims this node never saw as entries.
                self.promises.raise_floor(now + self.config.lease.voter_wait(self.config.lease.lease_timeout));
                true
            }
            _ => true,
        }
    }

    pub(super) fn admit_command(&mut self, now: Instant, cmd: &Command) -> bool {
        if let Command::Grant { vm, generation, claim } = *cmd
            && let Some(until) = self.promises.grant_blocked_until(now, vm, generation)
        {
            tracing::debug!(
                node = self.id,
                %vm,
                generation,
                claimant = claim.node,
                wait = ?until - now,
                "grant refused: an older lease may still run"
            );
            return false;
        }
        if let Some(claim) = cmd.claim() {
            let until = now + self.config.lease.voter_wait(claim.lease);
            self.promises.record(cmd.vm(), cmd.generation(), until);
        }
        true
    }

    pub(super) fn propose(&mut self, now: Instant, cmd: Command) -> bool {
        if !self.admit_command(now, &cmd) {
            return false;
        }
        match self.raw.propose(Vec::new(), cmd.encode()) {
            Ok(()) => true,
            Err(e) => {
                tracing::trace!(node = self.id, ?cmd, error = %e, "proposal dropped");
                false
            }
        }
    }

    pub(super) fn new_claim(&mut self, now: Instant, vm: VmId) -> Claim {
        self.next_seq += 1;
        let lease = self.config.lease.lease_timeout;
        self.vms.entry(vm).or_default().pending.insert(self.next_seq, (now, lease));
        Claim { node: self.id, incarnation: self.incarnation, seq: self.next_seq, lease }
    }

    /// Renewals and pending requests that are due.
    pub(super) fn drive_vms(&mut self, now: Instant) {
        let me = self.id;
        let vms: Vec<VmId> = self.vms.keys().copied().collect();
        for vm in vms {
            let record = self.sm.get(vm).copied();
            let Some(local) = self.vms.get_mut(&vm) else { continue };
            let lease = self.config.lease.lease_timeout;
            local.pending.retain(|_, (at, _)| *at + lease > now);
            let held = record.filter(|r| r.holder == me && local.holding == Some(r.generation));
            if let Some(r) = held
                && local.active
                && local.next_renew.is_none_or(|t| now >= t)
            {
                local.next_renew = Some(now + self.config.lease.renew_interval);
                let claim = self.new_claim(now, vm);
                self.propose(now, Command::Renew { vm, generation: r.generation, claim });
            }
            let Some(local) = self.vms.get_mut(&vm) else { continue };
            if !local.wants_attempt() || local.next_attempt.is_some_and(|t| now < t) {
                continue;
            }
            local.next_attempt = Some(now + self.config.retry_interval);
            if local.first_grant {
                if record.is_none() {
                    let claim = self.new_claim(now, vm);
                    self.propose(now, Command::Grant { vm, generation: 1, claim });
                } else {
                    local.first_grant = false;
                }
            }
            let Some(local) = self.vms.get_mut(&vm) else { continue };
            if local.takeover {
                match record {
                    Some(r) if r.backup == Some(me) && r.generation < u64::MAX => {
                        let generation = r.generation + 1;
                        if let Some(until) = self.promises.grant_blocked_until(now, vm, generation) {
                            // Our own promise still runs: try again the moment it ends.
                            local.next_attempt = Some(until);
                        } else {
                            let claim = self.new_claim(now, vm);
                            self.propose(now, Command::Grant { vm, generation, claim });
                        }
                    }
                    _ => local.takeover = false,
                }
            }
            let Some(local) = self.vms.get_mut(&vm) else { continue };
            if local.degrade {
                match held {
                    Some(r) if r.backup.is_some() => {
                        self.propose(now, Command::Degrade { vm, generation: r.generation, holder: me });
                    }
                    _ => local.degrade = false,
                }
            }
            let Some(local) = self.vms.get_mut(&vm) else { continue };
            if let Some(backup) = local.set_backup {
                match held {
                    Some(r) if r.backup != Some(backup) => {
                        self.propose(now, Command::SetBackup { vm, generation: r.generation, holder: me, backup });
                    }
                    _ => local.set_backup = None,
                }
            }
        }
    }

    /// Reports lease transitions of the VMs this node holds.
    pub(super) fn check_leases(&mut self, now: Instant) {
        let me = self.id;
        for (vm, local) in self.vms.iter_mut() {
            let Some(generation) = local.holding.filter(|_| local.fenced.is_none() && local.active) else {
                continue;
            };
            let ok = local.lease_until.is_some_and(|u| now < u);
            if ok == local.lease_ok {
                continue;
            }
            local.lease_ok = ok;
            if ok {
                tracing::info!(node = me, %vm, generation, "lease regained");
                self.events.push_back(Event::LeaseRegained { vm: *vm, generation });
            } else {
                tracing::warn!(node = me, %vm, generation, "lease lost: holding output");
                self.events.push_back(Event::LeaseLost { vm: *vm, generation });
            }
        }
    }

    /// Who should lead: the holder of most VMs (if leadership follows the holder and a VM is
    /// known), else the configured preferred leader.
    pub(super) fn leader_target(&self) -> Option<NodeId> {
        if self.config.leader_follows_holder {
            let mut counts: BTreeMap<NodeId, usize> = BTreeMap::new();
            for (_, r) in self.sm.iter() {
                *counts.entry(r.holder).or_default() += 1;
            }
            // Most VMs first, then the lowest id.
            let best = counts.into_iter().max_by_key(|&(node, n)| (n, std::cmp::Reverse(node)));
            if let Some((node, _)) = best {
                return Some(node);
            }
        }
        self.config.preferred_leader
    }

    pub(super) fn maybe_transfer_leadership(&mut self, now: Instant) {
        if self.raw.raft.state != StateRole::Leader || now < self.next_transfer {
            return;
        }
        let Some(target) = self.leader_target().filter(|&p| p != self.id) else { return };
        let last = self.raw.raft.raft_log.last_index();
        let ready = self.raw.raft.prs().get(target).is_some_and(|pr| pr.matched == last && pr.recent_active);
        if ready {
            tracing::info!(node = self.id, to = target, term = self.raw.raft.term, "handing raft leadership over");
            self.raw.transfer_leader(target);
            self.next_transfer = now + self.config.tick * (4 * self.config.election_ticks as u32);
        }
    }

    /// A backup asking to take over a VM whose holder led raft: once this node's own faith in
    /// that leader has lapsed (nothing heard from it for the election timeout), campaign now
    /// instead of waiting out the randomised campaign delay, and again every tick until some
    /// leader is known. An ordinary pre-vote campaign, not a forced one: a voter that still
    /// hears the leader ignores it, so a backup cut off from the primary alone (the witness
    /// still hears it) cannot unseat it. Leadership is not safety: the grant still waits for
    /// every voter's promise on the old lease.
    pub(super) fn maybe_campaign_for_takeover(&mut self) {
        let me = self.id;
        let raft = &self.raw.raft;
        if !matches!(raft.state, StateRole::Follower | StateRole::PreCandidate)
            || !raft.promotable()
            || raft.election_elapsed < raft.election_timeout()
        {
            return;
        }
        let leader = raft.leader_id;
        let wanted = self.vms.iter().any(|(vm, local)| {
            local.takeover
                && self
                    .sm
                    .get(*vm)
                    .is_some_and(|r| r.backup == Some(me) && r.holder != me && (leader == 0 || leader == r.holder))
        });
        if !wanted {
            return;
        }
        if raft.state == StateRole::Follower {
            tracing::info!(
                node = me,
                silent_leader = leader,
                term = raft.term,
                "taking over from a silent leader: campaigning"
            );
        }
        self.raw.campaign().ok();
        self.check_role();
    }

    /// Keeps the election jitter deterministic (seeded) and reports leader changes.
    pub(super) fn check_role(&mut self) {
        let role = (self.raw.raft.term, self.raw.raft.state);
        if role != self.role {
            self.role = role;
            let min = self.config.election_ticks + self.config.campaign_delay_ticks;
            self.rng = splitmix(self.rng);
            let jitter = (self.rng % self.config.election_jitter_ticks.max(1) as u64) as usize;
            self.raw.raft.set_randomized_election_timeout(min + jitter);
        }
        let leader = self.raw.raft.leader_id;
        if leader != self.leader {
            self.leader = leader;
            let leader = Some(leader).filter(|&l| l != 0);
            tracing::info!(node = self.id, ?leader, term = self.raw.raft.term, "raft leader changed");
            self.events.push_back(Event::LeaderChanged { leader, term: self.raw.raft.term });
        }
    }

    pub(super) fn stop(&mut self, e: JournalError) -> ArbiterError {
        tracing::error!(node = self.id, error = %e, "journal failed, arbiter stopped");
        self.stopped = Some(e.to_string());
        ArbiterError::Journal(e)
    }

    /// The `Ready` loop, in the order raft-rs documents: leader messages, snapshot, committed
    /// entries, then entries and hard state written and synced, and only then the messages
    /// that depend on them.
    pub(super) fn process_ready(&mut self, now: Instant) -> Result<(), ArbiterError> {
        while self.raw.has_ready() {
            let mut rd = self.raw.ready();
            let mut snapshots_sent = Vec::new();
            self.queue(rd.take_messages(), &mut snapshots_sent);
            if !rd.snapshot().is_empty() {
                self.install_snapshot(now, rd.snapshot().clone())?;
            }
            let committed = rd.take_committed_entries();
            self.apply_entries(now, committed);
            if !rd.entries().is_empty() {
                self.journal.append_entries(rd.entries()).map_err(|e| self.stop(e))?;
                self.raw.mut_store().append(rd.entries());
            }
            if let Some(hs) = rd.hs() {
                self.journal.save_hard_state(hs).map_err(|e| self.stop(e))?;
                self.raw.mut_store().set_hard_state(hs.clone());
            }
            self.journal.sync(rd.must_sync()).map_err(|e| self.stop(e))?;
            self.queue(rd.take_persisted_messages(), &mut snapshots_sent);
            let mut light = self.raw.advance(rd);
            if let Some(commit) = light.commit_index() {
                self.raw.mut_store().set_commit(commit);
                let hs = self.raw.store().hard_state().clone();
                self.journal.save_hard_state(&hs).map_err(|e| self.stop(e))?;
            }
            self.queue(light.take_messages(), &mut snapshots_sent);
            self.apply_entries(now, light.take_committed_entries());
            self.raw.advance_apply();
            for to in snapshots_sent {
                // The transport may lose it: let raft probe again rather than wait forever.
                self.raw.report_snapshot(to, SnapshotStatus::Finish);
            }
            self.maybe_compact()?;
        }
        Ok(())
    }

    pub(super) fn queue(&mut self, msgs: Vec<Message>, snapshots_sent: &mut Vec<NodeId>) {
        for m in msgs {
            if m.get_msg_type() == MessageType::MsgSnapshot {
                snapshots_sent.push(m.to);
            }
            self.outbox.push_back((m.to, wire::encode(&m)));
        }
    }
}
