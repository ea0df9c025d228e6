//! What a raft message off the arbitration link must look like before raft-rs sees it.
//!
//! raft-rs trusts its peers: a heartbeat whose commit lies beyond the log, an empty proposal or
//! a read-index request without its context make it panic, an acknowledgement of entries it
//! never sent makes a leader count them committed, a proposed membership change changes the
//! group. The group's peers are authenticated (the QUIC link names the sender from its
//! certificate) but a bug, a corrupted journal or a compromised host must not be able to kill
//! an arbiter or move the group's state by a malformed message. So every message is checked
//! against what this group actually sends, and refused whole ([`MessageError`]) otherwise:
//!
//! - **types**: appends, heartbeats, votes and pre-votes, their responses, snapshots, leader
//!   hand-over (`MsgTimeoutNow`) and forwarded proposals. Never local messages, read-index,
//!   leader-transfer requests or snapshot requests (this group sends none);
//! - **fields**: entries only on appends and proposals, a snapshot only on snapshots, a context
//!   only on a forced vote (`CampaignTransfer`), no priorities, no snapshot requests;
//! - **terms and indices**: proposals carry term 0, everything else a term in `1..=2^48`; the
//!   terms inside a message never exceed its own; indices stay below 2^48; an append is
//!   anchored at a term of at least 1 (raft-rs reads the term beyond its log as 0) and its
//!   entries are contiguous from `index + 1` with terms that never go down; at most [`MAX_ENTRIES`] of
//!   at most [`MAX_ENTRY_BYTES`] each; only normal entries (membership never changes);
//! - **state**: a heartbeat never commits beyond this node's log; a leader accepts no
//!   acknowledgement beyond its last index; one leader per term (appends, heartbeats and
//!   snapshots from another node than the term's known leader are refused) and only that
//!   leader (or, to a node that does not know it yet, a node of the same term) may hand
//!   leadership over;
//! - **commands** in entries the gate looks at (not yet committed nor already held): they
//!   decode, name only voters, carry a generation in `1..=2^48` and a lease in
//!   `(0, max_claim_lease]`; a proposal speaks only in its sender's name;
//! - **snapshots**: of this group's exact membership, with a state that decodes and names only
//!   voters.

use raft::StateRole;
use raft::eraftpb::{Entry, EntryType, Message, MessageType, Snapshot};

use super::Arbiter;
use crate::NodeId;
use crate::state::{Command, StateError, StateMachine};

/// Largest term or index accepted off the wire: far beyond any real group (an election a
/// second for 8 million years), far from overflowing raft-rs's arithmetic.
pub const MAX_TERM: u64 = 1 << 48;
/// See [`MAX_TERM`].
pub const MAX_INDEX: u64 = 1 << 48;
/// Largest generation a command or snapshot may name (generations grow by one per failover).
pub const MAX_GENERATION: u64 = 1 << 48;
/// Most entries in one message (an append is at most `max_msg_bytes`, 32 KiB by default, and an
/// entry is at least a few bytes).
pub const MAX_ENTRIES: usize = 8192;
/// Largest entry payload: a command is 42 to 66 bytes; later versions may append fields.
pub const MAX_ENTRY_BYTES: usize = 1024;
/// Largest state machine in a snapshot (32 bytes a VM).
pub const MAX_SNAPSHOT_BYTES: usize = 512 * 1024;

/// Why a raft message was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("the group never sends this message type")]
    Type,
    #[error("a message from this node itself")]
    FromSelf,
    #[error("term {term} is out of range 1..={max}", max = MAX_TERM)]
    Term { term: u64 },
    #[error("a proposal carries term {term}, expected 0")]
    ProposalTerm { term: u64 },
    #[error("{field} {value} is above the message's term {term}")]
    InnerTerm { field: &'static str, value: u64, term: u64 },
    #[error("an append anchored at log_term 0: raft-rs reads that term beyond its log")]
    ZeroLogTerm,
    #[error("{field} {value} is out of range 0..={max}", max = MAX_INDEX)]
    Index { field: &'static str, value: u64 },
    #[error("{field} is set, but this message type never carries it")]
    Field { field: &'static str },
    #[error("context {len} bytes, expected none or CampaignTransfer")]
    Context { len: usize },
    #[error("{count} entries, at most {max}", max = MAX_ENTRIES)]
    TooManyEntries { count: usize },
    #[error("a proposal without entries")]
    EmptyProposal,
    #[error("entry {at}: index {index}, expected {expected}")]
    EntryIndex { at: usize, index: u64, expected: u64 },
    #[error("entry {index}: term {term} is below the previous term {previous}")]
    EntryTerm { index: u64, term: u64, previous: u64 },
    #[error("entry {index}: a {entry_type:?}: membership never changes")]
    EntryType { index: u64, entry_type: EntryType },
    #[error("entry {index}: {len} bytes, at most {max}", max = MAX_ENTRY_BYTES)]
    EntrySize { index: u64, len: usize },
    #[error("entry {index}: context or sync_log is set")]
    EntryExtra { index: u64 },
    #[error("entry {index}: an empty proposal")]
    EmptyCommand { index: u64 },
    #[error("entry {index}")]
    Command {
        index: u64,
        #[source]
        source: StateError,
    },
    #[error("entry {index}: names node {node}, not a voter")]
    Stranger { index: u64, node: NodeId },
    #[error("entry {index}: node {from} proposes in node {node}'s name")]
    NotOwnName { index: u64, from: NodeId, node: NodeId },
    #[error("entry {index}: generation {generation} is out of range 1..={max}", max = MAX_GENERATION)]
    Generation { index: u64, generation: u64 },
    #[error("entry {index}: lease {lease_us} us is out of range 1..={max_us} us")]
    Lease { index: u64, lease_us: u128, max_us: u128 },
    #[error("heartbeat commits index {commit}, beyond this node's last index {last}")]
    Commit { commit: u64, last: u64 },
    #[error("acknowledges index {index}, beyond this leader's last index {last}")]
    Ack { index: u64, last: u64 },
    #[error("node {leader} leads term {term}, not the sender")]
    SecondLeader { leader: NodeId, term: u64 },
    #[error("this node leads term {term}, not the sender")]
    OwnTerm { term: u64 },
    #[error("a hand-over at term {term}; only the leader of this node's term {ours} (node {leader}) may")]
    TimeoutNow { term: u64, ours: u64, leader: NodeId },
    #[error("snapshot missing")]
    NoSnapshot,
    #[error("snapshot index {index} term {term} out of range (index 1..={max}, term 1..=message term)", max = MAX_INDEX)]
    SnapshotPosition { index: u64, term: u64 },
    #[error("snapshot membership {voters:?} (learners or a change: {changing}), this group is {ours:?}")]
    SnapshotMembers { voters: Vec<NodeId>, changing: bool, ours: Vec<NodeId> },
    #[error("snapshot state {len} bytes, at most {max}", max = MAX_SNAPSHOT_BYTES)]
    SnapshotSize { len: usize },
    #[error("snapshot state")]
    SnapshotState(#[source] StateError),
    #[error("snapshot state: {vm} {what}")]
    SnapshotRecord { vm: crate::VmId, what: String },
}

const CAMPAIGN_TRANSFER: &[u8] = raft::CAMPAIGN_TRANSFER;

impl Arbiter {
    /// Checks a message from authenticated peer `from` (a voter, the message's own `from`,
    /// addressed to this node) before raft-rs sees it. See the module documentation.
    pub(super) fn check_inbound(&self, from: NodeId, msg: &Message) -> Result<(), MessageError> {
        if from == self.id {
            return Err(MessageError::FromSelf);
        }
        let t = msg.get_msg_type();
        check_fields(msg)?;
        check_terms_and_indices(msg)?;
        if matches!(t, MessageType::MsgAppend | MessageType::MsgPropose) {
            self.check_entries(from, msg)?;
        }
        if t == MessageType::MsgSnapshot {
            self.check_snapshot(msg)?;
        }
        self.check_against_state(from, msg)
    }

    /// Checks that need this node's raft state.
    fn check_against_state(&self, from: NodeId, msg: &Message) -> Result<(), MessageError> {
        let raft = &self.raw.raft;
        let (term, last) = (raft.term, raft.raft_log.last_index());
        let t = msg.get_msg_type();
        let from_leader = matches!(t, MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot);
        if from_leader && msg.term == term {
            if raft.state == StateRole::Leader {
                return Err(MessageError::OwnTerm { term });
            }
            if raft.leader_id != 0 && raft.leader_id != from {
                return Err(MessageError::SecondLeader { leader: raft.leader_id, term });
            }
        }
        match t {
            // raft-rs ignores a stale one; a node that restarted since knows its term but not
            // yet its leader.
            MessageType::MsgTimeoutNow
                if msg.term > term || (msg.term == term && raft.leader_id != 0 && raft.leader_id != from) =>
            {
                Err(MessageError::TimeoutNow { term: msg.term, ours: term, leader: raft.leader_id })
            }
            MessageType::MsgHeartbeat if msg.term >= term && msg.commit > last => {
                Err(MessageError::Commit { commit: msg.commit, last })
            }
            MessageType::MsgAppendResponse
                if raft.state == StateRole::Leader && msg.term == term && msg.index > last =>
            {
                Err(MessageError::Ack { index: msg.index, last })
            }
            _ => Ok(()),
        }
    }

    fn check_entries(&self, from: NodeId, msg: &Message) -> Result<(), MessageError> {
        let entries = msg.get_entries();
        if entries.len() > MAX_ENTRIES {
            return Err(MessageError::TooManyEntries { count: entries.len() });
        }
        let propose = msg.get_msg_type() == MessageType::MsgPropose;
        if propose && entries.is_empty() {
            return Err(MessageError::EmptyProposal);
        }
        let mut previous = msg.log_term;
        for (at, e) in entries.iter().enumerate() {
            if propose {
                // The leader numbers proposed entries.
                if e.index != 0 || e.term != 0 {
                    return Err(MessageError::Field { field: "index or term of a proposed entry" });
                }
            } else {
                let expected = msg.index + 1 + at as u64;
                if e.index != expected {
                    return Err(MessageError::EntryIndex { at, index: e.index, expected });
                }
                if e.term < previous {
                    return Err(MessageError::EntryTerm { index: e.index, term: e.term, previous });
                }
                if e.term > msg.term {
                    return Err(MessageError::InnerTerm { field: "entry term", value: e.term, term: msg.term });
                }
                previous = e.term;
            }
            check_entry_shape(e)?;
            if propose && e.data.is_empty() {
                return Err(MessageError::EmptyCommand { index: e.index });
            }
            if self.is_fresh(msg, e) {
                let cmd =
                    Command::decode(&e.data).map_err(|source| MessageError::Command { index: e.index, source })?;
                self.check_command(propose.then_some(from), e.index, &cmd)?;
            }
        }
        Ok(())
    }

    /// Whether the grant gate looks at entry `e` of `msg` (an append's entry not yet committed
    /// nor already in this node's log, or any proposed entry); commands in the others were
    /// accepted by a quorum already and are only applied.
    pub(super) fn is_fresh(&self, msg: &Message, e: &Entry) -> bool {
        if e.get_entry_type() != EntryType::EntryNormal || e.data.is_empty() {
            return false;
        }
        if msg.get_msg_type() != MessageType::MsgAppend {
            return true;
        }
        let log = &self.raw.raft.raft_log;
        !(e.index <= msg.commit.max(log.committed) || log.match_term(e.index, e.term))
    }

    /// A command the gate is about to look at. `proposer`: the sender of a proposal, who may
    /// only speak in its own name.
    fn check_command(&self, proposer: Option<NodeId>, index: u64, cmd: &Command) -> Result<(), MessageError> {
        let voters = &self.raw.store().conf_state().voters;
        let actor = match *cmd {
            Command::Grant { claim, .. } | Command::Renew { claim, .. } => claim.node,
            Command::SetBackup { holder, .. } | Command::Degrade { holder, .. } => holder,
        };
        let mut named = vec![actor];
        if let Command::SetBackup { backup, .. } = *cmd {
            named.push(backup);
        }
        if let Some(node) = named.into_iter().find(|n| !voters.contains(n)) {
            return Err(MessageError::Stranger { index, node });
        }
        if let Some(from) = proposer
            && actor != from
        {
            return Err(MessageError::NotOwnName { index, from, node: actor });
        }
        let generation = cmd.generation();
        if !(1..=MAX_GENERATION).contains(&generation) {
            return Err(MessageError::Generation { index, generation });
        }
        if let Some(claim) = cmd.claim() {
            let max = self.config.lease.max_claim_lease;
            if claim.lease.is_zero() || claim.lease > max {
                return Err(MessageError::Lease { index, lease_us: claim.lease.as_micros(), max_us: max.as_micros() });
            }
        }
        Ok(())
    }

    fn check_snapshot(&self, msg: &Message) -> Result<(), MessageError> {
        if !msg.has_snapshot() {
            return Err(MessageError::NoSnapshot);
        }
        let snap: &Snapshot = msg.get_snapshot();
        let meta = snap.get_metadata();
        if !(1..=MAX_INDEX).contains(&meta.index) || meta.term == 0 || meta.term > msg.term {
            return Err(MessageError::SnapshotPosition { index: meta.index, term: meta.term });
        }
        let ours = self.voters();
        let cs = meta.get_conf_state();
        let mut theirs = cs.voters.clone();
        theirs.sort_unstable();
        let mut sorted = ours.clone();
        sorted.sort_unstable();
        let changing =
            !(cs.learners.is_empty() && cs.voters_outgoing.is_empty() && cs.learners_next.is_empty() && !cs.auto_leave);
        if theirs != sorted || cs.voters.len() != ours.len() || changing {
            return Err(MessageError::SnapshotMembers { voters: cs.voters.clone(), changing, ours });
        }
        if snap.data.len() > MAX_SNAPSHOT_BYTES {
            return Err(MessageError::SnapshotSize { len: snap.data.len() });
        }
        let sm = StateMachine::decode(&snap.data).map_err(MessageError::SnapshotState)?;
        for (vm, r) in sm.iter() {
            let what = if !ours.contains(&r.holder) {
                format!("holder {} is not a voter", r.holder)
            } else if r.backup.is_some_and(|b| b == r.holder || !ours.contains(&b)) {
                format!("backup {:?} is not another voter", r.backup)
            } else if !(1..=MAX_GENERATION).contains(&r.generation) {
                format!("generation {} is out of range", r.generation)
            } else {
                continue;
            };
            return Err(MessageError::SnapshotRecord { vm, what });
        }
        Ok(())
    }
}

/// Message types the group sends, and the fields each may carry.
fn check_fields(msg: &Message) -> Result<(), MessageError> {
    use MessageType::*;
    let t = msg.get_msg_type();
    if !matches!(
        t,
        MsgPropose
            | MsgAppend
            | MsgAppendResponse
            | MsgRequestVote
            | MsgRequestVoteResponse
            | MsgRequestPreVote
            | MsgRequestPreVoteResponse
            | MsgSnapshot
            | MsgHeartbeat
            | MsgHeartbeatResponse
            | MsgTimeoutNow
    ) {
        return Err(MessageError::Type);
    }
    if !matches!(t, MsgAppend | MsgPropose) && !msg.entries.is_empty() {
        return Err(MessageError::Field { field: "entries" });
    }
    if t != MsgSnapshot && msg.has_snapshot() {
        return Err(MessageError::Field { field: "snapshot" });
    }
    let forced_vote = t == MsgRequestVote && msg.context.as_ref() == CAMPAIGN_TRANSFER;
    if !msg.context.is_empty() && !forced_vote {
        return Err(MessageError::Context { len: msg.context.len() });
    }
    if msg.request_snapshot != 0 {
        return Err(MessageError::Field { field: "request_snapshot" });
    }
    if msg.priority != 0 || msg.deprecated_priority != 0 {
        return Err(MessageError::Field { field: "priority" });
    }
    let response = matches!(t, MsgAppendResponse | MsgRequestVoteResponse | MsgRequestPreVoteResponse);
    if msg.reject && !response {
        return Err(MessageError::Field { field: "reject" });
    }
    if msg.reject_hint != 0 && t != MsgAppendResponse {
        return Err(MessageError::Field { field: "reject_hint" });
    }
    Ok(())
}

fn check_terms_and_indices(msg: &Message) -> Result<(), MessageError> {
    if msg.get_msg_type() == MessageType::MsgPropose {
        if msg.term != 0 {
            return Err(MessageError::ProposalTerm { term: msg.term });
        }
    } else if !(1..=MAX_TERM).contains(&msg.term) {
        return Err(MessageError::Term { term: msg.term });
    }
    // Every entry of this group's log has a term of at least 1 (the log starts with the
    // bootstrap snapshot at term 1), and raft-rs takes the "term" of an index beyond its log
    // for 0: an append anchored at term 0 would pass its consistency check anywhere.
    if msg.get_msg_type() == MessageType::MsgAppend && msg.log_term == 0 {
        return Err(MessageError::ZeroLogTerm);
    }
    for (field, value) in [("log_term", msg.log_term), ("commit_term", msg.commit_term)] {
        if value > msg.term && msg.get_msg_type() != MessageType::MsgPropose {
            return Err(MessageError::InnerTerm { field, value, term: msg.term });
        }
    }
    let last_entry = msg.index.saturating_add(msg.entries.len() as u64);
    for (field, value) in
        [("index", msg.index), ("commit", msg.commit), ("reject_hint", msg.reject_hint), ("last entry", last_entry)]
    {
        if value > MAX_INDEX {
            return Err(MessageError::Index { field, value });
        }
    }
    Ok(())
}

fn check_entry_shape(e: &Entry) -> Result<(), MessageError> {
    if e.get_entry_type() != EntryType::EntryNormal {
        return Err(MessageError::EntryType { index: e.index, entry_type: e.get_entry_type() });
    }
    if e.data.len() > MAX_ENTRY_BYTES {
        return Err(MessageError::EntrySize { index: e.index, len: e.data.len() });
    }
    if !e.context.is_empty() || e.sync_log {
        return Err(MessageError::EntryExtra { index: e.index });
    }
    Ok(())
}
