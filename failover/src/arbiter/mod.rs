//! The arbiter: a raft voter (raft-rs `RawNode`) whose replicated state machine decides, per VM,
//! which copy is active, plus the lease that lets that copy release output.
//!
//! Sans-IO: the caller feeds received messages ([`Arbiter::step`]) and time
//! ([`Arbiter::handle_timeout`]) and takes out messages to send ([`Arbiter::poll_transmit`]),
//! events ([`Arbiter::poll_event`]) and the next deadline ([`Arbiter::poll_timeout`]). It reads
//! no clock and opens no socket; the raft state goes through the [`Journal`], which writes
//! (and fsyncs) before any message that depends on it is handed out.
//!
//! The rules (the argument is in `docs/failure-model.md`):
//! - a grant or renewal carries a [`Claim`](crate::state::Claim); when it is applied, the claimant's lease runs until
//!   the instant it proposed it plus the lease, on its own clock;
//! - every voter that sees a claim refuses to append a grant of a newer generation for
//!   [`LeaseConfig::voter_wait`] of the claim's lease (it drops the message carrying it; raft
//!   retries), and after a restart or a snapshot install it refuses every grant for a full wait;
//! - the state machine only grants generation `g + 1` to the recorded backup, only once;
//! - a holder that sees a newer generation applied is fenced.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::time::{Duration, Instant};

use raft::eraftpb::Snapshot;
use raft::{RawNode, StateRole};

use crate::NodeId;
use crate::journal::{Journal, JournalError, MemDisk, Recovered};
use crate::lease::{LeaseConfig, LeaseError, OutputPermit, Promises};
use crate::ratelimit::RefusalLog;
use crate::state::{StateError, StateMachine, VmId, VmRecord};
use crate::storage::Store;
use crate::wire::{self, WireError};

mod apply;
mod inbound;
mod ready;

pub use inbound::{
    MAX_ENTRIES, MAX_ENTRY_BYTES, MAX_GENERATION, MAX_INDEX, MAX_SNAPSHOT_BYTES, MAX_TERM, MessageError,
};

/// Errors of the arbiter.
#[derive(Debug, thiserror::Error)]
pub enum ArbiterError {
    #[error("arbiter config: node id 0 is reserved")]
    ZeroId,
    #[error("arbiter config: node {id} is not among the voters {voters:?}")]
    NotAVoter { id: NodeId, voters: Vec<NodeId> },
    #[error("arbiter config: {what} must be positive")]
    ZeroConfig { what: &'static str },
    #[error("arbiter config")]
    Lease(#[from] LeaseError),
    #[error("arbiter journal")]
    Journal(#[from] JournalError),
    #[error("raft")]
    Raft(#[from] raft::Error),
    #[error("arbiter input")]
    Wire(#[from] WireError),
    #[error("snapshot at index {index}")]
    Snapshot {
        index: u64,
        #[source]
        source: StateError,
    },
    #[error("message from node {from} claims to come from node {claimed}")]
    Spoofed { from: NodeId, claimed: NodeId },
    #[error("node {from} relayed a proposal of node {origin} (a follower forwards proposals to its leader)")]
    Relayed { from: NodeId, origin: NodeId },
    #[error("message for node {to} delivered to node {me}")]
    Misrouted { to: NodeId, me: NodeId },
    #[error("node {from} is not a voter")]
    UnknownPeer { from: NodeId },
    #[error("{msg_type:?} from node {from} refused")]
    Refused {
        from: NodeId,
        msg_type: raft::eraftpb::MessageType,
        #[source]
        source: MessageError,
    },
    #[error("arbiter stopped after a journal failure: {reason}")]
    Stopped { reason: String },
    #[error("{vm}: node {me} does not hold it")]
    NotHolder { vm: VmId, me: NodeId },
    #[error("{vm}: node {me} is not its recorded backup")]
    NotBackup { vm: VmId, me: NodeId },
    #[error("{vm}: node {me} is the backup, report the primary dead to ask for activity")]
    PrimaryNotDead { vm: VmId, me: NodeId },
    #[error("{vm}: node {holder} holds generation {generation}, node {me} may not ask for it")]
    NotEligible { vm: VmId, me: NodeId, holder: NodeId, generation: u64 },
    #[error("{vm}: node {backup} cannot be the backup of node {me}")]
    BadBackup { vm: VmId, me: NodeId, backup: NodeId },
}

/// The arbiter's settings. The defaults suit a LAN; see [`ArbiterConfig::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArbiterConfig {
    /// This node's id (not 0).
    pub id: NodeId,
    /// The group: primary's agent, backup's agent and witness. Only used to bootstrap an empty
    /// journal; a recovered journal's membership wins.
    pub voters: Vec<NodeId>,
    /// The node that should lead raft when it is up to date and no VM is known (the witness).
    pub preferred_leader: Option<NodeId>,
    /// Hand raft leadership to the holder of the VMs (the node holding most of them). The
    /// holder then renews through whichever other voter it can reach, so the loss of any one
    /// link never stops its output; the price is an election (50-70 ms, overlapping the
    /// detector) when the holder's host dies. When false, `preferred_leader` always leads: no
    /// election on the holder's death, but a holder cut off from the leader alone holds its
    /// output until the link heals.
    pub leader_follows_holder: bool,
    /// Duration of one raft tick.
    pub tick: Duration,
    /// Raft heartbeat period, in ticks.
    pub heartbeat_ticks: usize,
    /// Raft election timeout, in ticks: a follower that heard from its leader this recently
    /// refuses to vote for anybody else (check-quorum), and a leader that heard from no quorum
    /// for this long steps down.
    pub election_ticks: usize,
    /// Extra ticks before a follower campaigns, beyond `election_ticks`: at least one, so that
    /// the other follower's lease on the dead leader has expired when it is asked to vote.
    pub campaign_delay_ticks: usize,
    /// Width of the campaign delay's randomisation, in ticks.
    pub election_jitter_ticks: usize,
    /// Lease timings.
    pub lease: LeaseConfig,
    /// How often a pending request (grant, degrade, set-backup) is proposed again.
    pub retry_interval: Duration,
    /// Applied entries between two local snapshots (log compaction).
    pub snapshot_every: u64,
    /// Largest append message, in bytes (keeps a message within one UDP datagram).
    pub max_msg_bytes: u64,
    /// Seed of the election timeout jitter (deterministic simulation).
    pub seed: u64,
}

impl ArbiterConfig {
    /// Defaults: raft tick 10 ms, heartbeat every tick, election timeout 4 ticks (a follower's
    /// faith in a silent leader lasts 31-40 ms, about the lease wait `W` of the command line's
    /// 30 ms lease, so a backup taking over can lead by the time the grant may commit),
    /// campaign after 6-7 ticks of silence (the witness: 8, see
    /// [`Witness::config`](crate::Witness::config); a backup taking over: 4),
    /// the default [`LeaseConfig`], retries every 5 ms, a snapshot every 1,024 entries.
    pub fn new(id: NodeId, voters: &[NodeId]) -> Self {
        Self {
            id,
            voters: voters.to_vec(),
            preferred_leader: None,
            leader_follows_holder: true,
            tick: Duration::from_millis(10),
            heartbeat_ticks: 1,
            election_ticks: 4,
            campaign_delay_ticks: 2,
            election_jitter_ticks: 2,
            lease: LeaseConfig::default(),
            retry_interval: Duration::from_millis(5),
            snapshot_every: 1024,
            max_msg_bytes: 32 * 1024,
            seed: id,
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ArbiterError> {
        if self.id == 0 {
            return Err(ArbiterError::ZeroId);
        }
        if !self.voters.contains(&self.id) {
            return Err(ArbiterError::NotAVoter { id: self.id, voters: self.voters.clone() });
        }
        for (what, zero) in [
            ("tick", self.tick.is_zero()),
            ("retry_interval", self.retry_interval.is_zero()),
            ("heartbeat_ticks", self.heartbeat_ticks == 0),
            ("election_jitter_ticks", self.election_jitter_ticks == 0),
            ("campaign_delay_ticks", self.campaign_delay_ticks == 0),
            ("snapshot_every", self.snapshot_every == 0),
        ] {
            if zero {
                return Err(ArbiterError::ZeroConfig { what });
            }
        }
        self.lease.validate()?;
        Ok(())
    }
}

/// What the arbiter tells its process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// This node now holds `vm` under `generation`: it may run the guest, and release output
    /// while [`Arbiter::may_release_output`] says so.
    Granted { vm: VmId, generation: u64 },
    /// This node asked for the first grant of `vm`, but `holder` got it.
    Refused { vm: VmId, holder: NodeId, generation: u64 },
    /// The holder's lease ran out unconfirmed: output must be held (the guest may run on).
    LeaseLost { vm: VmId, generation: u64 },
    /// A renewal was confirmed again after [`Event::LeaseLost`].
    LeaseRegained { vm: VmId, generation: u64 },
    /// `generation` was granted to another node: stop this copy of the guest for good.
    Fenced { vm: VmId, generation: u64 },
    /// The group recorded that the holder runs without a backup: it may release output without
    /// the backup's acks from now on.
    Degraded { vm: VmId, generation: u64 },
    /// The group recorded `backup` as the holder's synchronised backup.
    Protected { vm: VmId, generation: u64, backup: NodeId },
    /// This node is now the recorded backup of `holder`.
    BackupOf { vm: VmId, generation: u64, holder: NodeId },
    /// This node is no longer the recorded backup: its replica must never be promoted.
    BackupDropped { vm: VmId, generation: u64 },
    /// Raft's leader changed (for operators).
    LeaderChanged { leader: Option<NodeId>, term: u64 },
}

/// This node's intentions and lease for one VM. Volatile: a restart forgets them.
#[derive(Debug, Default)]
struct LocalVm {
    /// The generation this node holds (granted to it and not superseded).
    holding: Option<u64>,
    /// The process wants to stay active: renew the lease.
    active: bool,
    /// Asked for the first grant.
    first_grant: bool,
    /// The primary was reported dead: ask for the next generation.
    takeover: bool,
    /// The backup was reported dead: ask to run degraded.
    degrade: bool,
    /// Ask to record this backup.
    set_backup: Option<NodeId>,
    /// Claims proposed by this incarnation: seq -> (proposed at, lease).
    pending: BTreeMap<u64, (Instant, Duration)>,
    lease_until: Option<Instant>,
    lease_ok: bool,
    next_renew: Option<Instant>,
    next_attempt: Option<Instant>,
    /// The generation that fenced this node, until it is granted again.
    fenced: Option<u64>,
}

impl LocalVm {
    fn wants_attempt(&self) -> bool {
        self.first_grant || self.takeover || self.degrade || self.set_backup.is_some()
    }
}

/// The arbiter of one node. See the module documentation.
pub struct Arbiter {
    id: NodeId,
    config: ArbiterConfig,
    raw: RawNode<Store>,
    journal: Journal,
    sm: StateMachine,
    applied: u64,
    /// Entries up to here were applied before a restart: replay them without events.
    replay_until: u64,
    incarnation: u64,
    started: Instant,
    ticks: u64,
    rng: u64,
    role: (u64, StateRole),
    leader: NodeId,
    outbox: VecDeque<(NodeId, Vec<u8>)>,
    events: VecDeque<Event>,
    promises: Promises,
    vms: BTreeMap<VmId, LocalVm>,
    next_seq: u64,
    next_transfer: Instant,
    stopped: Option<String>,
    /// Messages refused by [`Arbiter::step`] (garbage, spoofed, misrouted, malformed).
    refused: u64,
    refusal_log: RefusalLog,
}

impl ArbiterError {
    /// Whether this is a refused input message (logged and counted by [`Arbiter::step`]; the
    /// arbiter goes on), rather than a failure of this node.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            ArbiterError::Wire(_)
                | ArbiterError::Spoofed { .. }
                | ArbiterError::Relayed { .. }
                | ArbiterError::Misrouted { .. }
                | ArbiterError::UnknownPeer { .. }
                | ArbiterError::Refused { .. }
        )
    }
}

impl std::fmt::Debug for Arbiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arbiter")
            .field("id", &self.id)
            .field("term", &self.raw.raft.term)
            .field("role", &self.raw.raft.state)
            .field("applied", &self.applied)
            .field("incarnation", &self.incarnation)
            .finish_non_exhaustive()
    }
}

impl Arbiter {
    /// Opens (or bootstraps) the arbiter whose raft state lives in directory `dir`.
    pub fn open_dir(config: ArbiterConfig, dir: &Path, now: Instant) -> Result<Self, ArbiterError> {
        let (journal, recovered) = Journal::open_dir(dir)?;
        Self::open(config, journal, recovered, now)
    }

    /// Opens (or bootstraps) an arbiter on an in-memory disk (simulations, tests).
    pub fn open_mem(config: ArbiterConfig, disk: &MemDisk, now: Instant) -> Result<Self, ArbiterError> {
        let (journal, recovered) = Journal::open_mem(disk)?;
        Self::open(config, journal, recovered, now)
    }

    /// Opens the arbiter on a recovered journal. An empty journal is bootstrapped with
    /// `config.voters` (every node of a new group must be started with the same list).
    pub fn open(
        config: ArbiterConfig,
        mut journal: Journal,
        recovered: Recovered,
        now: Instant,
    ) -> Result<Self, ArbiterError> {
        config.validate()?;
        let id = config.id;
        let fresh = recovered.snapshot.is_none();
        let store = Store::from_recovered(&recovered, || bootstrap_snapshot(&config.voters));
        if fresh {
            journal.rewrite(store.snapshot_ref(), store.hard_state(), &[])?;
            tracing::info!(node = id, voters = ?config.voters, "raft group bootstrapped");
        }
        let voters = store.conf_state().voters.clone();
        if voters != config.voters {
            tracing::warn!(node = id, persisted = ?voters, configured = ?config.voters, "persisted voters win");
        }
        let snap_index = store.snapshot_ref().get_metadata().index;
        let sm = StateMachine::decode(&store.snapshot_ref().data)
            .map_err(|source| ArbiterError::Snapshot { index: snap_index, source })?;
        let replay_until = store.hard_state().commit;
        let raft_config = raft::Config {
            id,
            election_tick: config.election_ticks,
            min_election_tick: config.election_ticks + config.campaign_delay_ticks,
            max_election_tick: config.election_ticks + config.campaign_delay_ticks + config.election_jitter_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            applied: snap_index,
            max_size_per_msg: config.max_msg_bytes,
            max_inflight_msgs: 64,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        let raw = RawNode::new(&raft_config, store, &crate::logger::raft_logger(id))?;
        let incarnation = journal.incarnation();
        let mut promises = Promises::default();
        // This node may have seen lease requests before it restarted: refuse every grant for a
        // full wait, as if it had seen one just now.
        promises.raise_floor(now + config.lease.voter_wait(config.lease.lease_timeout));
        let mut me = Self {
            id,
            rng: config.seed ^ 0x9e37_79b9_7f4a_7c15 ^ incarnation.rotate_left(32),
            config,
            raw,
            journal,
            sm,
            applied: snap_index,
            replay_until,
            incarnation,
            started: now,
            ticks: 0,
            role: (0, StateRole::Follower),
            leader: 0,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            promises,
            vms: BTreeMap::new(),
            next_seq: 0,
            next_transfer: now,
            stopped: None,
            refused: 0,
            refusal_log: RefusalLog::new(now),
        };
        for (vm, record) in me.sm.iter() {
            if record.holder == id {
                me.vms.entry(vm).or_default().holding = Some(record.generation);
            }
        }
        me.check_role();
        me.process_ready(now)?;
        tracing::info!(node = id, incarnation, snapshot = snap_index, commit = replay_until, "arbiter open");
        Ok(me)
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The incarnation of this process (one more at every open of the journal).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The raft leader this node knows of.
    pub fn leader(&self) -> Option<NodeId> {
        Some(self.raw.raft.leader_id).filter(|&l| l != 0)
    }

    /// Whether this node leads raft.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The current raft term.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// The index of the last applied entry.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// The group's members.
    pub fn voters(&self) -> Vec<NodeId> {
        self.raw.store().conf_state().voters.clone()
    }

    /// What this node's replica of the state machine says about `vm`.
    pub fn record(&self, vm: VmId) -> Option<VmRecord> {
        self.sm.get(vm).copied()
    }

    /// The whole state machine as applied here.
    pub fn state(&self) -> &StateMachine {
        &self.sm
    }

    /// Whether this node may release output of `vm` at `now`: it holds the current generation,
    /// is not fenced, and its lease (confirmed by a quorum) has not run out. The output-commit
    /// path checks this (or a cached [`OutputPermit`]) right before every release.
    pub fn may_release_output(&self, now: Instant, vm: VmId) -> bool {
        self.permit(now, vm).is_some()
    }

    /// The permit to release output of `vm`, if this node has one at `now`.
    pub fn permit(&self, now: Instant, vm: VmId) -> Option<OutputPermit> {
        let local = self.vms.get(&vm)?;
        let generation = local.holding.filter(|_| local.fenced.is_none())?;
        let record = self.sm.get(vm)?;
        if record.holder != self.id || record.generation != generation {
            return None;
        }
        let until = local.lease_until.filter(|&u| now < u)?;
        Some(OutputPermit { vm, generation, until })
    }

    /// Messages refused so far (see [`Arbiter::step`]).
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// A raft message arrived from `from` (the transport's authenticated peer identity).
    ///
    /// Nothing reaches raft-rs unchecked: the envelope must decode, the message must name
    /// `from` as its sender (a voter other than this node) and this node as its recipient, and
    /// it must look like what the group sends (see [`MessageError`]). A refused message is
    /// counted ([`Arbiter::refused`]), logged at warn level (rate limited) and returned as an
    /// error for which [`ArbiterError::is_refusal`] holds; the arbiter goes on as if it had
    /// been lost.
    pub fn step(&mut self, now: Instant, from: NodeId, bytes: &[u8]) -> Result<(), ArbiterError> {
        self.check_running()?;
        let result = self.step_checked(now, from, bytes);
        if let Err(e) = &result
            && e.is_refusal()
        {
            self.refused += 1;
            let reason = crate::error_chain(e);
            let benign = matches!(e, ArbiterError::Relayed { .. });
            match if benign { None } else { self.refusal_log.warn(now) } {
                Some(0) => tracing::warn!(node = self.id, from, "raft message refused: {reason}"),
                Some(n) => tracing::warn!(node = self.id, from, "raft message refused: {reason} ({n} more not logged)"),
                None => tracing::debug!(node = self.id, from, "raft message refused: {reason}"),
            }
        }
        result
    }

    fn step_checked(&mut self, now: Instant, from: NodeId, bytes: &[u8]) -> Result<(), ArbiterError> {
        let mut msg = wire::decode(bytes)?;
        if msg.from != from {
            // raft-rs forwards a proposal as it came, so a follower that received one from a
            // node that took it for the leader passes it on to the real leader (seen after a
            // change of leader). Refused like any message that is not its sender's own: the
            // proposer retries with the leader it learns of.
            if msg.get_msg_type() == raft::eraftpb::MessageType::MsgPropose {
                return Err(ArbiterError::Relayed { from, origin: msg.from });
            }
            return Err(ArbiterError::Spoofed { from, claimed: msg.from });
        }
        if msg.to != self.id {
            return Err(ArbiterError::Misrouted { to: msg.to, me: self.id });
        }
        if !self.raw.store().conf_state().voters.contains(&from) {
            return Err(ArbiterError::UnknownPeer { from });
        }
        let msg_type = msg.get_msg_type();
        self.check_inbound(from, &msg).map_err(|source| ArbiterError::Refused { from, msg_type, source })?;
        if !self.admit(now, &mut msg) {
            return Ok(());
        }
        let stepped = self.raw.step(msg);
        self.check_role();
        self.process_ready(now)?;
        match stepped {
            // A proposal forwarded to a node that knows no leader: the proposer retries.
            Ok(()) | Err(raft::Error::ProposalDropped) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Advances time: raft ticks, renewals, retries, lease expiry. Call it when
    /// [`Arbiter::poll_timeout`] has passed (calling it more often is harmless).
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), ArbiterError> {
        self.check_running()?;
        let due = (now.saturating_duration_since(self.started).as_nanos() / self.config.tick.as_nanos()) as u64;
        // After a stall of this process, don't replay the ticks it missed: the messages its
        // peers sent meanwhile are still unread in the socket, and replaying would time out
        // check-quorum and elections against peers that were talking all along (seen: a
        // host-wide 120 ms stall made the leader step down and the witness campaign on
        // waking). Raft's safety does not depend on ticks, nor does the lease (it runs on the
        // monotonic clock); a real failure is noticed a stall later.
        const CATCH_UP: u64 = 2;
        if due > self.ticks + CATCH_UP {
            self.ticks = due - CATCH_UP;
        }
        while self.ticks < due {
            self.ticks += 1;
            self.raw.tick();
            self.check_role();
        }
        self.promises.prune(now);
        self.maybe_transfer_leadership(now);
        self.maybe_campaign_for_takeover();
        self.drive_vms(now);
        self.process_ready(now)?;
        self.check_leases(now);
        Ok(())
    }

    /// Same as [`Arbiter::handle_timeout`].
    pub fn tick(&mut self, now: Instant) -> Result<(), ArbiterError> {
        self.handle_timeout(now)
    }

    /// The next message to send: `(to, bytes)`.
    pub fn poll_transmit(&mut self) -> Option<(NodeId, Vec<u8>)> {
        self.outbox.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When to call [`Arbiter::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.stopped.is_some() {
            return None;
        }
        let nanos = self.config.tick.as_nanos() * u128::from(self.ticks + 1);
        let next_tick = self.started + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        let mut next = next_tick;
        for local in self.vms.values() {
            let candidates = [
                local.next_renew.filter(|_| local.active && local.holding.is_some()),
                local.next_attempt.filter(|_| local.wants_attempt()),
                local.lease_until.filter(|_| local.lease_ok),
            ];
            for t in candidates.into_iter().flatten() {
                next = next.min(t);
            }
        }
        Some(next)
    }

    /// Asks for activity on `vm`:
    /// - an unknown VM: ask for its first grant (the primary, when protection starts);
    /// - a VM this node holds: (re)start renewing the lease (after [`Event::Granted`] this is
    ///   automatic; an agent restarted beside a still running guest calls it again);
    /// - a VM whose backup this node is: refused, the backup asks with
    ///   [`Arbiter::report_primary_dead`].
    pub fn request_activity(&mut self, now: Instant, vm: VmId) -> Result<(), ArbiterError> {
        self.check_running()?;
        let me = self.id;
        match self.sm.get(vm).copied() {
            None => {
                let local = self.vms.entry(vm).or_default();
                local.first_grant = true;
                local.next_attempt = Some(now);
            }
            Some(r) if r.holder == me => {
                let local = self.vms.entry(vm).or_default();
                local.holding = Some(r.generation);
                local.fenced = None;
                local.active = true;
                local.next_renew = Some(now);
            }
            Some(r) if r.backup == Some(me) => {
                if !self.vms.get(&vm).is_some_and(|l| l.takeover) {
                    return Err(ArbiterError::PrimaryNotDead { vm, me });
                }
            }
            Some(r) => {
                return Err(ArbiterError::NotEligible { vm, me, holder: r.holder, generation: r.generation });
            }
        }
        self.drive_and_flush(now)
    }

    /// The backup's detector says the primary is dead: ask the group for the next generation,
    /// and keep asking until it is granted, this node stops being the backup, or
    /// [`Arbiter::report_primary_alive`]. The group grants it only once the old holder's lease
    /// has certainly run out.
    pub fn report_primary_dead(&mut self, now: Instant, vm: VmId) -> Result<(), ArbiterError> {
        self.check_running()?;
        let me = self.id;
        if self.sm.get(vm).and_then(|r| r.backup) != Some(me) {
            return Err(ArbiterError::NotBackup { vm, me });
        }
        let local = self.vms.entry(vm).or_default();
        if !local.takeover {
            tracing::warn!(node = me, %vm, "primary reported dead, asking for activity");
        }
        local.takeover = true;
        local.next_attempt = Some(now);
        self.maybe_campaign_for_takeover();
        self.drive_and_flush(now)
    }

    /// Like [`Arbiter::report_primary_dead`], with stronger evidence: the primary's *process* is
    /// gone (its host's kernel closed its connections), and with it the primary's agent, which
    /// runs in that process. If that agent led raft, campaign at once instead of waiting out the
    /// election timeout (the witness's check-quorum lease would ignore an ordinary campaign for
    /// that long, so this one is a forced, transfer-style campaign). Leadership is not safety:
    /// the grant still waits until every voter's promise on the old lease ran out.
    pub fn report_primary_gone(&mut self, now: Instant, vm: VmId) -> Result<(), ArbiterError> {
        // Read before reporting: an ordinary campaign it may start forgets the leader.
        let holder = self.sm.get(vm).map(|r| r.holder);
        let leader = self.raw.raft.leader_id;
        self.report_primary_dead(now, vm)?;
        if leader != 0 && holder == Some(leader) && leader != self.id && self.raw.raft.promotable() {
            tracing::warn!(
                node = self.id,
                %vm,
                dead_leader = leader,
                term = self.raw.raft.term,
                "the raft leader's process is gone: campaigning now"
            );
            self.raw.raft.campaign(raft::CAMPAIGN_TRANSFER);
            self.check_role();
            self.process_ready(now)?;
        }
        Ok(())
    }

    /// The primary spoke again: withdraw a pending takeover request.
    pub fn report_primary_alive(&mut self, _now: Instant, vm: VmId) {
        if let Some(local) = self.vms.get_mut(&vm).filter(|l| l.takeover) {
            local.takeover = false;
            tracing::info!(node = self.id, %vm, "primary alive again, takeover request withdrawn");
        }
    }

    /// The holder's detector says the backup is dead: ask the group to run degraded. Until
    /// [`Event::Degraded`], output still needs the backup's acks; if a newer generation was
    /// granted meanwhile, [`Event::Fenced`] comes instead.
    pub fn report_backup_dead(&mut self, now: Instant, vm: VmId) -> Result<(), ArbiterError> {
        self.check_running()?;
        self.check_holder(vm)?;
        if let Some(r) = self.sm.get(vm).filter(|r| r.backup.is_none()) {
            // No backup is recorded: the holder runs degraded already.
            self.events.push_back(Event::Degraded { vm, generation: r.generation });
            return Ok(());
        }
        let local = self.vms.entry(vm).or_default();
        local.degrade = true;
        local.set_backup = None;
        local.next_attempt = Some(now);
        tracing::warn!(node = self.id, %vm, "backup reported dead, asking to run degraded");
        self.drive_and_flush(now)
    }

    /// The holder records `backup` as its synchronised backup (after the backup committed a
    /// full checkpoint): from then on the backup may be promoted. Confirmed by
    /// [`Event::Protected`].
    pub fn set_backup(&mut self, now: Instant, vm: VmId, backup: NodeId) -> Result<(), ArbiterError> {
        self.check_running()?;
        self.check_holder(vm)?;
        let me = self.id;
        if backup == me || !self.raw.store().conf_state().voters.contains(&backup) {
            return Err(ArbiterError::BadBackup { vm, me, backup });
        }
        let local = self.vms.entry(vm).or_default();
        local.set_backup = Some(backup);
        local.degrade = false;
        local.next_attempt = Some(now);
        self.drive_and_flush(now)
    }

    /// The holder stops renewing its lease (unprotect, shutdown): output stops within a lease.
    pub fn relinquish(&mut self, vm: VmId) {
        if let Some(local) = self.vms.get_mut(&vm) {
            local.active = false;
            local.lease_until = None;
            local.lease_ok = false;
            tracing::info!(node = self.id, %vm, "activity relinquished");
        }
    }

    fn check_running(&self) -> Result<(), ArbiterError> {
        match &self.stopped {
            Some(reason) => Err(ArbiterError::Stopped { reason: reason.clone() }),
            None => Ok(()),
        }
    }

    fn check_holder(&self, vm: VmId) -> Result<(), ArbiterError> {
        let me = self.id;
        let holds = self.sm.get(vm).is_some_and(|r| r.holder == me)
            && self.vms.get(&vm).is_some_and(|l| l.fenced.is_none() && l.holding.is_some());
        if holds { Ok(()) } else { Err(ArbiterError::NotHolder { vm, me }) }
    }

    fn drive_and_flush(&mut self, now: Instant) -> Result<(), ArbiterError> {
        self.drive_vms(now);
        self.process_ready(now)?;
        self.check_leases(now);
        Ok(())
    }
}

fn bootstrap_snapshot(voters: &[NodeId]) -> Snapshot {
    let mut snap = Snapshot::default();
    snap.mut_metadata().index = 1;
    snap.mut_metadata().term = 1;
    snap.mut_metadata().mut_conf_state().voters = voters.to_vec();
    snap.data = StateMachine::default().encode().into();
    snap
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
