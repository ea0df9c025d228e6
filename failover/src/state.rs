//! The replicated state machine: per VM, who holds activity, under which generation, and which
//! node is the recorded backup.
//!
//! Every raft entry the arbiter proposes is one [`Command`]; applying the committed log in order
//! gives every node the same [`StateMachine`]. Commands are conditional (compare-and-set on the
//! generation), so concurrent or duplicated proposals are harmless: the first valid one wins, the
//! others apply as no-ops ([`Applied::Rejected`]).
//!
//! | command | applies when | effect |
//! |---|---|---|
//! | `Grant{vm, generation: 1}` | the VM is unknown | `holder = claim.node`, no backup |
//! | `Grant{vm, generation: g + 1}` | current generation is `g` and `claim.node` is the recorded backup | new holder, no backup |
//! | `Renew{vm, generation: g}` | `g` is current and `claim.node` is the holder | none: the holder's lease is confirmed |
//! | `SetBackup{vm, generation: g, holder, backup}` | `g` current, `holder` is the holder, `backup` is another voter and not already recorded | backup recorded |
//! | `Degrade{vm, generation: g, holder}` | `g` current, `holder` is the holder, a backup is recorded | backup cleared |
//!
//! The encoding is a version byte, a tag byte and little-endian fields. Decoders ignore trailing
//! bytes, so a later version may append fields; a new command kind needs every node upgraded
//! first (an unknown kind applies as a no-op everywhere, which keeps the replicas identical).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::NodeId;

/// Errors decoding commands and state machine snapshots.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("{what}: truncated at byte {at}")]
    Truncated { what: &'static str, at: usize },
    #[error("{what}: unknown version {version}")]
    Version { what: &'static str, version: u8 },
    #[error("command: unknown tag {tag}")]
    Tag { tag: u8 },
    #[error("{what}: node id 0 is not a node")]
    ZeroNode { what: &'static str },
}

/// A protected VM's identity, as the group knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmId(pub u64);

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vm-{}", self.0)
    }
}

/// A lease request: who asks, which incarnation of its process, which request, and for how long.
///
/// Grants and renewals both carry one. Every voter that receives it starts waiting out the lease
/// (with drift margin) before it accepts a grant of a newer generation; the requester, which
/// remembers when it proposed `(incarnation, seq)`, counts its lease from that instant once the
/// entry is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub node: NodeId,
    pub incarnation: u64,
    pub seq: u64,
    pub lease: Duration,
}

/// One raft entry's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Make `claim.node` the holder of `vm` under `generation`.
    Grant { vm: VmId, generation: u64, claim: Claim },
    /// The holder's lease renewal.
    Renew { vm: VmId, generation: u64, claim: Claim },
    /// The holder records a synchronised backup (protection or re-protection).
    SetBackup { vm: VmId, generation: u64, holder: NodeId, backup: NodeId },
    /// The holder lost its backup and asks to run degraded: the backup is forgotten, so it can
    /// never be promoted from its (soon stale) replica.
    Degrade { vm: VmId, generation: u64, holder: NodeId },
}

impl Command {
    /// The VM the command is about.
    pub fn vm(&self) -> VmId {
        match *self {
            Command::Grant { vm, .. }
            | Command::Renew { vm, .. }
            | Command::SetBackup { vm, .. }
            | Command::Degrade { vm, .. } => vm,
        }
    }

    /// The generation the command names.
    pub fn generation(&self) -> u64 {
        match *self {
            Command::Grant { generation, .. }
            | Command::Renew { generation, .. }
            | Command::SetBackup { generation, .. }
            | Command::Degrade { generation, .. } => generation,
        }
    }

    /// The lease request carried by a grant or a renewal.
    pub fn claim(&self) -> Option<&Claim> {
        match self {
            Command::Grant { claim, .. } | Command::Renew { claim, .. } => Some(claim),
            _ => None,
        }
    }

    /// Encodes the command (see the module documentation).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(64);
        w.push(VERSION);
        match *self {
            Command::Grant { vm, generation, claim } => {
                w.push(TAG_GRANT);
                put(&mut w, &[vm.0, generation]);
                put_claim(&mut w, &claim);
            }
            Command::Renew { vm, generation, claim } => {
                w.push(TAG_RENEW);
                put(&mut w, &[vm.0, generation]);
                put_claim(&mut w, &claim);
            }
            Command::SetBackup { vm, generation, holder, backup } => {
                w.push(TAG_SET_BACKUP);
                put(&mut w, &[vm.0, generation, holder, backup]);
            }
            Command::Degrade { vm, generation, holder } => {
                w.push(TAG_DEGRADE);
                put(&mut w, &[vm.0, generation, holder]);
            }
        }
        w
    }

    /// Decodes a command; never panics on arbitrary bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        let mut r = Reader { bytes, at: 0, what: "command" };
        let version = r.u8()?;
        if version != VERSION {
            return Err(StateError::Version { what: "command", version });
        }
        let cmd = match r.u8()? {
            TAG_GRANT => Command::Grant { vm: VmId(r.u64()?), generation: r.u64()?, claim: r.claim()? },
            TAG_RENEW => Command::Renew { vm: VmId(r.u64()?), generation: r.u64()?, claim: r.claim()? },
            TAG_SET_BACKUP => {
                Command::SetBackup { vm: VmId(r.u64()?), generation: r.u64()?, holder: r.node()?, backup: r.node()? }
            }
            TAG_DEGRADE => Command::Degrade { vm: VmId(r.u64()?), generation: r.u64()?, holder: r.node()? },
            tag => return Err(StateError::Tag { tag }),
        };
        Ok(cmd)
    }
}

const VERSION: u8 = 1;
const TAG_GRANT: u8 = 1;
const TAG_RENEW: u8 = 2;
const TAG_SET_BACKUP: u8 = 3;
const TAG_DEGRADE: u8 = 4;

fn put(w: &mut Vec<u8>, words: &[u64]) {
    for word in words {
        w.extend_from_slice(&word.to_le_bytes());
    }
}

fn put_claim(w: &mut Vec<u8>, c: &Claim) {
    let lease_us = u64::try_from(c.lease.as_micros()).unwrap_or(u64::MAX);
    put(w, &[c.node, c.incarnation, c.seq, lease_us]);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    what: &'static str,
}

impl Reader<'_> {
    fn u8(&mut self) -> Result<u8, StateError> {
        let b = *self.bytes.get(self.at).ok_or(StateError::Truncated { what: self.what, at: self.at })?;
        self.at += 1;
        Ok(b)
    }

    fn u64(&mut self) -> Result<u64, StateError> {
        let end = self.at.checked_add(8).filter(|&end| end <= self.bytes.len());
        let end = end.ok_or(StateError::Truncated { what: self.what, at: self.at })?;
        let word = u64::from_le_bytes(self.bytes[self.at..end].try_into().expect("8 bytes"));
        self.at = end;
        Ok(word)
    }

    fn u32(&mut self) -> Result<u32, StateError> {
        let end = self.at.checked_add(4).filter(|&end| end <= self.bytes.len());
        let end = end.ok_or(StateError::Truncated { what: self.what, at: self.at })?;
        let word = u32::from_le_bytes(self.bytes[self.at..end].try_into().expect("4 bytes"));
        self.at = end;
        Ok(word)
    }

    fn node(&mut self) -> Result<NodeId, StateError> {
        match self.u64()? {
            0 => Err(StateError::ZeroNode { what: self.what }),
            n => Ok(n),
        }
    }

    fn claim(&mut self) -> Result<Claim, StateError> {
        Ok(Claim {
            node: self.node()?,
            incarnation: self.u64()?,
            seq: self.u64()?,
            lease: Duration::from_micros(self.u64()?),
        })
    }
}

/// What the group knows of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmRecord {
    /// The node whose copy may be active.
    pub holder: NodeId,
    /// The fencing token: grows by one with every grant.
    pub generation: u64,
    /// The synchronised backup that may be promoted, if any. `None` means the holder runs
    /// degraded: nobody else has a copy the group trusts.
    pub backup: Option<NodeId>,
}

/// The outcome of applying one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Granted {
        vm: VmId,
        previous: Option<VmRecord>,
        record: VmRecord,
        claim: Claim,
    },
    Renewed {
        vm: VmId,
        record: VmRecord,
        claim: Claim,
    },
    BackupSet {
        vm: VmId,
        record: VmRecord,
    },
    Degraded {
        vm: VmId,
        record: VmRecord,
        dropped: Option<NodeId>,
    },
    /// The command did not apply; the state is unchanged.
    Rejected {
        vm: VmId,
        reason: &'static str,
    },
}

/// All VMs' records. Deterministic: the same log gives the same state on every node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateMachine {
    vms: BTreeMap<VmId, VmRecord>,
}

impl StateMachine {
    /// The record of `vm`, if the group knows it.
    pub fn get(&self, vm: VmId) -> Option<&VmRecord> {
        self.vms.get(&vm)
    }

    /// Every known VM.
    pub fn iter(&self) -> impl Iterator<Item = (VmId, &VmRecord)> {
        self.vms.iter().map(|(vm, r)| (*vm, r))
    }

    /// Applies one command. `voters` are the group's members (a backup must be one of them).
    pub fn apply(&mut self, cmd: &Command, voters: &[NodeId]) -> Applied {
        let vm = cmd.vm();
        let current = self.vms.get(&vm).copied();
        let reject = |reason| Applied::Rejected { vm, reason };
        match *cmd {
            Command::Grant { generation, claim, .. } => {
                let next = |r: VmRecord| r.generation.checked_add(1) == Some(generation);
                let ok = match current {
                    None => generation == 1,
                    Some(r) => next(r) && r.backup == Some(claim.node),
                };
                if !ok {
                    return reject(match current {
                        None => "first grant must be generation 1",
                        Some(r) if !next(r) => "grant generation is not the next one",
                        Some(_) => "grant to a node that is not the recorded backup",
                    });
                }
                let record = VmRecord { holder: claim.node, generation, backup: None };
                self.vms.insert(vm, record);
                Applied::Granted { vm, previous: current, record, claim }
            }
            Command::Renew { generation, claim, .. } => match current {
                Some(r) if r.generation == generation && r.holder == claim.node => {
                    Applied::Renewed { vm, record: r, claim }
                }
                _ => reject("stale renewal"),
            },
            Command::SetBackup { generation, holder, backup, .. } => match current {
                Some(r) if r.generation == generation && r.holder == holder => {
                    if backup == holder || !voters.contains(&backup) {
                        return reject("backup must be another voter");
                    }
                    if r.backup == Some(backup) {
                        return reject("already the backup");
                    }
                    let record = VmRecord { backup: Some(backup), ..r };
                    self.vms.insert(vm, record);
                    Applied::BackupSet { vm, record }
                }
                _ => reject("stale set-backup"),
            },
            Command::Degrade { generation, holder, .. } => match current {
                Some(r) if r.generation == generation && r.holder == holder && r.backup.is_none() => {
                    reject("already degraded")
                }
                Some(r) if r.generation == generation && r.holder == holder => {
                    let record = VmRecord { backup: None, ..r };
                    self.vms.insert(vm, record);
                    Applied::Degraded { vm, record, dropped: r.backup }
                }
                _ => reject("stale degrade"),
            },
        }
    }

    /// Encodes the whole state (the data of a raft snapshot).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(8 + self.vms.len() * 32);
        w.push(VERSION);
        w.extend_from_slice(&(self.vms.len() as u32).to_le_bytes());
        for (vm, r) in &self.vms {
            put(&mut w, &[vm.0, r.holder, r.generation, r.backup.unwrap_or(0)]);
        }
        w
    }

    /// Decodes a state encoded by [`StateMachine::encode`]; an empty buffer is the empty state.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        if bytes.is_empty() {
            return Ok(Self::default());
        }
        let mut r = Reader { bytes, at: 0, what: "state snapshot" };
        let version = r.u8()?;
        if version != VERSION {
            return Err(StateError::Version { what: "state snapshot", version });
        }
        let count = r.u32()?;
        let mut vms = BTreeMap::new();
        for _ in 0..count {
            let vm = VmId(r.u64()?);
            let holder = r.node()?;
            let generation = r.u64()?;
            let backup = Some(r.u64()?).filter(|&b| b != 0);
            vms.insert(vm, VmRecord { holder, generation, backup });
        }
        Ok(Self { vms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOTERS: &[NodeId] = &[1, 2, 3];

    fn claim(node: NodeId, seq: u64) -> Claim {
        Claim { node, incarnation: 7, seq, lease: Duration::from_millis(50) }
    }

    fn grant(vm: u64, generation: u64, node: NodeId) -> Command {
        Command::Grant { vm: VmId(vm), generation, claim: claim(node, generation) }
    }

    #[test]
    fn codec_round_trip() {
        let cmds = [
            grant(1, 1, 1),
            Command::Renew { vm: VmId(u64::MAX), generation: 9, claim: claim(3, u64::MAX) },
            Command::SetBackup { vm: VmId(4), generation: 2, holder: 1, backup: 2 },
            Command::Degrade { vm: VmId(4), generation: 2, holder: 1 },
        ];
        for cmd in cmds {
            let bytes = cmd.encode();
            assert_eq!(Command::decode(&bytes), Ok(cmd));
            // Added fields at the end are tolerated.
            let mut longer = bytes.clone();
            longer.extend_from_slice(&[1, 2, 3]);
            assert_eq!(Command::decode(&longer), Ok(cmd));
            // Every truncation is a clean error.
            for len in 0..bytes.len() {
                assert!(Command::decode(&bytes[..len]).is_err(), "{cmd:?} truncated to {len}");
            }
        }
        assert_eq!(Command::decode(&[1, 99]), Err(StateError::Tag { tag: 99 }));
        assert_eq!(Command::decode(&[2, 1]).unwrap_err().to_string(), "command: unknown version 2");
        let zero = Command::Degrade { vm: VmId(1), generation: 1, holder: 0 }.encode();
        assert_eq!(Command::decode(&zero), Err(StateError::ZeroNode { what: "command" }));
    }

    #[test]
    fn grants_are_compare_and_set_on_the_generation() {
        let mut sm = StateMachine::default();
        let vm = VmId(1);
        assert!(matches!(sm.apply(&grant(1, 2, 1), VOTERS), Applied::Rejected { .. }));
        assert!(matches!(sm.apply(&grant(1, 1, 1), VOTERS), Applied::Granted { previous: None, .. }));
        // A concurrent first grant loses.
        assert!(matches!(sm.apply(&grant(1, 1, 2), VOTERS), Applied::Rejected { .. }));
        // No backup recorded: nobody can take over.
        assert!(matches!(sm.apply(&grant(1, 2, 2), VOTERS), Applied::Rejected { .. }));
        let set = Command::SetBackup { vm, generation: 1, holder: 1, backup: 2 };
        assert!(matches!(sm.apply(&set, VOTERS), Applied::BackupSet { .. }));
        assert_eq!(sm.get(vm), Some(&VmRecord { holder: 1, generation: 1, backup: Some(2) }));
        // Only the recorded backup, and only the next generation.
        assert!(matches!(sm.apply(&grant(1, 2, 3), VOTERS), Applied::Rejected { .. }));
        assert!(matches!(sm.apply(&grant(1, 3, 2), VOTERS), Applied::Rejected { .. }));
        assert!(matches!(sm.apply(&grant(1, 2, 2), VOTERS), Applied::Granted { .. }));
        assert_eq!(sm.get(vm), Some(&VmRecord { holder: 2, generation: 2, backup: None }));
        // The old holder's renewals and commands are stale now.
        let renew = Command::Renew { vm, generation: 1, claim: claim(1, 5) };
        assert!(matches!(sm.apply(&renew, VOTERS), Applied::Rejected { .. }));
        let old = Command::SetBackup { vm, generation: 1, holder: 1, backup: 3 };
        assert!(matches!(sm.apply(&old, VOTERS), Applied::Rejected { .. }));
        let renew = Command::Renew { vm, generation: 2, claim: claim(2, 5) };
        assert!(matches!(sm.apply(&renew, VOTERS), Applied::Renewed { .. }));
    }

    #[test]
    fn degrade_forgets_the_backup_for_good() {
        let mut sm = StateMachine::default();
        let vm = VmId(1);
        sm.apply(&grant(1, 1, 1), VOTERS);
        sm.apply(&Command::SetBackup { vm, generation: 1, holder: 1, backup: 2 }, VOTERS);
        let bad = Command::SetBackup { vm, generation: 1, holder: 1, backup: 9 };
        assert!(matches!(sm.apply(&bad, VOTERS), Applied::Rejected { .. }));
        let degrade = Command::Degrade { vm, generation: 1, holder: 1 };
        assert_eq!(
            sm.apply(&degrade, VOTERS),
            Applied::Degraded { vm, record: VmRecord { holder: 1, generation: 1, backup: None }, dropped: Some(2) }
        );
        assert!(matches!(sm.apply(&grant(1, 2, 2), VOTERS), Applied::Rejected { .. }));
        // Duplicates are no-ops.
        assert_eq!(sm.apply(&degrade, VOTERS), Applied::Rejected { vm, reason: "already degraded" });
        let set = Command::SetBackup { vm, generation: 1, holder: 1, backup: 3 };
        assert!(matches!(sm.apply(&set, VOTERS), Applied::BackupSet { .. }));
        assert_eq!(sm.apply(&set, VOTERS), Applied::Rejected { vm, reason: "already the backup" });
    }

    #[test]
    fn snapshot_round_trip() {
        let mut sm = StateMachine::default();
        assert_eq!(StateMachine::decode(&sm.encode()), Ok(sm.clone()));
        assert_eq!(StateMachine::decode(&[]), Ok(StateMachine::default()));
        for vm in 1..5 {
            sm.apply(&grant(vm, 1, 1), VOTERS);
        }
        sm.apply(&Command::SetBackup { vm: VmId(2), generation: 1, holder: 1, backup: 3 }, VOTERS);
        let bytes = sm.encode();
        assert_eq!(StateMachine::decode(&bytes), Ok(sm));
        for len in 1..bytes.len() {
            assert!(StateMachine::decode(&bytes[..len]).is_err());
        }
    }
}
