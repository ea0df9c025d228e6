//! Fuzz entry points, shared by the `cargo fuzz` targets in `failover/fuzz` and by the
//! deterministic smoke test in `tests/fuzz_smoke.rs`. Each takes arbitrary bytes and must never
//! panic (raft-rs's own panics included: they are what the arbiter's checks keep out).
//!
//! - [`raft_wire`]: the raft envelope ([`crate::wire`]), the commands and the state machine
//!   snapshot: whatever decodes re-encodes to something that decodes the same (for the raft
//!   envelope: the same fields the arbiter reads; protobuf's unknown fields come back in no
//!   stable order);
//! - [`arbiter_step`]: a three-node group on in-memory disks, driven by a program read from the
//!   input: time passing with the group's own messages delivered (some of them altered on the
//!   way), API calls, crashes and restarts, and messages built from the input (structured
//!   around the node's current term and log, or raw protobuf) fed to [`Arbiter::step`].

use std::collections::VecDeque;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use protobuf::ProtobufEnum as _;
use raft::eraftpb::{ConfState, Entry, EntryType, Message, MessageType, Snapshot};

use crate::journal::MemDisk;
use crate::state::{Claim, Command, StateMachine, VmId};
use crate::{Arbiter, ArbiterConfig, NodeId, wire};

/// The raft envelope, commands and state snapshots. The first byte chooses how the rest is
/// read: as a whole envelope, as a protobuf payload sealed in a valid envelope (so the parser
/// is reached past the crc), as a command, or as a state machine snapshot.
pub fn raft_wire(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        0 => check_envelope(rest),
        1 => check_envelope(&seal(rest)),
        2 => {
            if let Ok(cmd) = Command::decode(rest) {
                assert_eq!(Command::decode(&cmd.encode()), Ok(cmd), "a command does not survive re-encoding");
            }
        }
        _ => {
            if let Ok(sm) = StateMachine::decode(rest) {
                assert_eq!(StateMachine::decode(&sm.encode()), Ok(sm), "a state does not survive re-encoding");
            }
        }
    }
}

fn check_envelope(bytes: &[u8]) {
    if let Ok(mut m) = wire::decode(bytes) {
        let mut again = wire::decode(&wire::encode(&m)).expect("a re-encoded raft message decodes");
        // protobuf keeps the fields it does not know, in a hash map (so in no stable order, and
        // an empty map is unequal to none): compare what the arbiter reads.
        strip_unknown(&mut m);
        strip_unknown(&mut again);
        assert_eq!(again, m, "a raft message does not survive re-encoding");
    }
}

fn strip_unknown(m: &mut Message) {
    m.unknown_fields = Default::default();
    for e in m.mut_entries().iter_mut() {
        e.unknown_fields = Default::default();
    }
    if m.has_snapshot() {
        let s = m.mut_snapshot();
        s.unknown_fields = Default::default();
        if s.has_metadata() {
            let meta = s.mut_metadata();
            meta.unknown_fields = Default::default();
            if meta.has_conf_state() {
                meta.mut_conf_state().unknown_fields = Default::default();
            }
        }
    }
}

/// Wraps `payload` in a valid envelope (magic, version, crc32).
pub fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0x52, 1];
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

const VM: VmId = VmId(7);
const VOTERS: [NodeId; 3] = [1, 2, 3];
/// Simulated time one input may spend, so that an input costs milliseconds, not seconds.
const BUDGET_MS: u32 = 400;
const MAX_OPS: usize = 256;

/// Reads the fuzz input; zeros once it runs out.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |acc, _| (acc << 8) | u64::from(self.u8()))
    }

    fn below(&mut self, n: u8) -> u8 {
        self.u8() % n.max(1)
    }

    fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.u8()).min(max).min(self.data.len());
        let (taken, rest) = self.data.split_at(n);
        self.data = rest;
        taken
    }

    /// A value near `base`: mostly a small step either way, sometimes an extreme.
    fn near(&mut self, base: u64) -> u64 {
        match self.below(16) {
            0 => 0,
            1 => u64::MAX,
            2 => self.u64(),
            3 => base.saturating_add(1 << 20),
            k => base.saturating_add(u64::from(k)).saturating_sub(8),
        }
    }

    fn node(&mut self) -> NodeId {
        match self.below(8) {
            0 => 0,
            1 => 4,
            k => u64::from(k % 3) + 1,
        }
    }
}

fn config(id: NodeId) -> ArbiterConfig {
    ArbiterConfig { preferred_leader: Some(3), ..ArbiterConfig::new(id, &VOTERS) }
}

/// The process's virtual clock origin.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

struct Group {
    now: Instant,
    disks: Vec<MemDisk>,
    nodes: Vec<Option<Arbiter>>,
    flight: VecDeque<(NodeId, NodeId, Vec<u8>)>,
}

impl Group {
    /// A new group, or (`warm`) one whose journals hold a protected VM: node 1 holds it, node 2
    /// is its recorded backup; every node restarts from them.
    fn new(warm: bool) -> Self {
        let now = origin() + Duration::from_secs(10);
        let disks: Vec<MemDisk> = if warm {
            warm_disks().iter().map(MemDisk::fork).collect()
        } else {
            (0..3).map(|_| MemDisk::new()).collect()
        };
        let nodes = VOTERS.iter().map(|&id| Some(open(id, &disks[id as usize - 1], now))).collect();
        Self { now, disks, nodes, flight: VecDeque::new() }
    }

    fn node(&mut self, id: NodeId) -> Option<&mut Arbiter> {
        self.nodes.get_mut(usize::try_from(id).ok()?.checked_sub(1)?)?.as_mut()
    }

    /// One millisecond: every node's timers, then every message in flight delivered.
    fn tick(&mut self) {
        self.now += Duration::from_millis(1);
        let now = self.now;
        for node in self.nodes.iter_mut().flatten() {
            let _ = node.handle_timeout(now);
            while let Some((to, bytes)) = node.poll_transmit() {
                self.flight.push_back((node.id(), to, bytes));
            }
            while node.poll_event().is_some() {}
        }
        while let Some((from, to, bytes)) = self.flight.pop_front() {
            if let Some(node) = self.node(to) {
                let _ = node.step(now, from, &bytes);
            }
        }
    }

    /// Collects what the nodes want to send, without delivering it.
    fn collect(&mut self) {
        for node in self.nodes.iter_mut().flatten() {
            while let Some((to, bytes)) = node.poll_transmit() {
                self.flight.push_back((node.id(), to, bytes));
            }
        }
    }

    fn api(&mut self, input: &mut Input<'_>) {
        let id = u64::from(input.below(3)) + 1;
        let op = input.below(8);
        let other = input.node();
        let vm = if input.below(4) == 0 { VmId(8) } else { VM };
        let now = self.now;
        let Some(a) = self.node(id) else { return };
        let _ = match op {
            0 => a.request_activity(now, vm),
            1 => a.set_backup(now, vm, other),
            2 => a.report_primary_dead(now, vm),
            3 => a.report_primary_gone(now, vm),
            4 => a.report_backup_dead(now, vm),
            5 => {
                a.relinquish(vm);
                Ok(())
            }
            6 => {
                a.report_primary_alive(now, vm);
                Ok(())
            }
            _ => {
                let _ = a.permit(now, vm);
                Ok(())
            }
        };
    }

    fn crash_or_restart(&mut self, input: &mut Input<'_>) {
        let id = u64::from(input.below(3)) + 1;
        let i = id as usize - 1;
        if self.nodes[i].is_some() {
            self.nodes[i] = None;
            self.disks[i].crash(usize::from(input.below(32)));
        } else {
            self.nodes[i] = Some(open(id, &self.disks[i], self.now));
        }
    }

    /// A message built from the input, around node `to`'s current term and log.
    fn forge(&mut self, input: &mut Input<'_>) -> (NodeId, NodeId, Vec<u8>) {
        let to = u64::from(input.below(3)) + 1;
        let (term, applied, record) = match self.node(to) {
            Some(a) => (a.term(), a.applied(), a.record(VM)),
            None => (1, 1, None),
        };
        let generation = record.map_or(1, |r| r.generation);
        let mut m = Message::default();
        m.set_msg_type(MessageType::from_i32(i32::from(input.below(19))).unwrap_or(MessageType::MsgAppend));
        m.from = input.node();
        m.to = if input.below(8) == 0 { input.node() } else { to };
        m.term = input.near(term);
        m.log_term = input.near(term);
        m.index = input.near(applied);
        m.commit = input.near(applied);
        m.commit_term = if input.below(2) == 0 { 0 } else { input.near(term) };
        m.reject = input.below(4) == 0;
        m.reject_hint = if input.below(2) == 0 { 0 } else { input.near(applied) };
        if input.below(8) == 0 {
            m.context = input.bytes(24).to_vec().into();
        }
        if input.below(16) == 0 {
            m.request_snapshot = input.near(applied);
        }
        if input.below(16) == 0 {
            m.priority = input.u64() as i64;
        }
        let count = input.below(5);
        let mut entries = Vec::new();
        for i in 0..count {
            let index = if input.below(8) == 0 { input.near(applied) } else { m.index.wrapping_add(1 + u64::from(i)) };
            let entry_type = match input.below(16) {
                0 => EntryType::EntryConfChange,
                1 => EntryType::EntryConfChangeV2,
                _ => EntryType::EntryNormal,
            };
            let data = match input.below(4) {
                0 => input.bytes(80).to_vec(),
                1 => Vec::new(),
                _ => command(input, generation).encode(),
            };
            entries.push(Entry { entry_type, term: input.near(term), index, data: data.into(), ..Default::default() });
        }
        m.set_entries(entries.into());
        if m.get_msg_type() == MessageType::MsgSnapshot || input.below(16) == 0 {
            m.set_snapshot(snapshot(input, term, applied, generation));
        }
        let from = if input.below(8) == 0 { input.node() } else { m.from };
        (from, to, wire::encode(&m))
    }

    /// Alters the next message in flight (a field chosen by the input).
    fn alter_next(&mut self, input: &mut Input<'_>) {
        let Some((from, to, bytes)) = self.flight.pop_front() else { return };
        let Ok(mut m) = wire::decode(&bytes) else { return };
        let (term, applied) = (m.term, m.index);
        match input.below(10) {
            0 => m.term = input.near(term),
            1 => m.index = input.near(applied),
            2 => m.commit = input.near(m.commit),
            3 => m.log_term = input.near(m.log_term),
            4 => m.reject = !m.reject,
            5 => m.from = input.node(),
            6 => {
                let i = usize::from(input.u8());
                let len = m.entries.len();
                if let Some(e) = m.mut_entries().get_mut(i % len.max(1)) {
                    e.term = input.near(e.term);
                    e.index = input.near(e.index);
                }
            }
            7 => {
                let generation = 1 + u64::from(input.below(3));
                let cmd = command(input, generation);
                for e in m.mut_entries().iter_mut().filter(|e| !e.data.is_empty()) {
                    e.data = cmd.encode().into();
                }
            }
            8 => m.mut_entries().truncate(usize::from(input.below(3))),
            _ => {
                let t = MessageType::from_i32(i32::from(input.below(19))).unwrap_or(MessageType::MsgHeartbeat);
                m.set_msg_type(t);
            }
        }
        self.flight.push_front((from, to, wire::encode(&m)));
    }
}

fn open(id: NodeId, disk: &MemDisk, now: Instant) -> Arbiter {
    // Disks only ever lose a torn tail here, which recovery cuts off: opening must succeed.
    Arbiter::open_mem(config(id), disk, now).expect("a crashed in-memory journal reopens")
}

fn command(input: &mut Input<'_>, generation: u64) -> Command {
    let vm = if input.below(4) == 0 { VmId(input.u64()) } else { VM };
    let generation = match input.below(4) {
        0 => input.near(generation),
        k => generation + u64::from(k) - 1,
    };
    let lease = match input.below(6) {
        0 => Duration::ZERO,
        1 => Duration::from_secs(2),
        2 => Duration::from_micros(u64::MAX),
        _ => Duration::from_millis(50),
    };
    let claim = Claim { node: input.node(), incarnation: u64::from(input.below(4)), seq: u64::from(input.u8()), lease };
    match input.below(4) {
        0 => Command::Grant { vm, generation, claim },
        1 => Command::Renew { vm, generation, claim },
        2 => Command::SetBackup { vm, generation, holder: input.node(), backup: input.node() },
        _ => Command::Degrade { vm, generation, holder: input.node() },
    }
}

fn snapshot(input: &mut Input<'_>, term: u64, applied: u64, generation: u64) -> Snapshot {
    let mut s = Snapshot::default();
    s.mut_metadata().index = input.near(applied + 8);
    s.mut_metadata().term = input.near(term);
    let voters = match input.below(6) {
        0 => vec![1, 2],
        1 => vec![1, 2, 3, 4],
        2 => vec![3, 1, 2],
        _ => VOTERS.to_vec(),
    };
    let mut cs = ConfState { voters, ..Default::default() };
    if input.below(8) == 0 {
        cs.learners = vec![4];
    }
    s.mut_metadata().set_conf_state(cs);
    s.data = if input.below(4) == 0 {
        input.bytes(64).to_vec().into()
    } else {
        let mut sm = StateMachine::default();
        for _ in 0..input.below(3) {
            let cmd = command(input, generation);
            sm.apply(&cmd, &VOTERS);
        }
        sm.encode().into()
    };
    s
}

/// The journals of a group that protects [`VM`]: node 1 holds it, node 2 is its backup.
fn warm_disks() -> &'static [MemDisk] {
    static WARM: OnceLock<Vec<MemDisk>> = OnceLock::new();
    WARM.get_or_init(|| {
        let mut g = Group::new(false);
        let now = g.now;
        if let Some(a) = g.node(1) {
            let _ = a.request_activity(now, VM);
        }
        for _ in 0..300 {
            g.tick();
        }
        let now = g.now;
        if let Some(a) = g.node(1) {
            let _ = a.set_backup(now, VM, 2);
        }
        for _ in 0..200 {
            g.tick();
        }
        assert_eq!(g.nodes[2].as_ref().and_then(|w| w.record(VM)).and_then(|r| r.backup), Some(2), "warm-up");
        g.disks.clone()
    })
}

/// Arbiters fed a program read from `data`. See the module documentation.
pub fn arbiter_step(data: &[u8]) {
    let mut input = Input { data };
    let mut g = Group::new(input.below(2) == 0);
    let mut spent = 0;
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.below(10) {
            0..=2 => {
                let ms = u32::from(input.below(16)) + 1;
                for _ in 0..ms.min(BUDGET_MS - spent) {
                    g.tick();
                }
                spent = (spent + ms).min(BUDGET_MS);
            }
            3 => g.api(&mut input),
            4 | 5 => {
                let (from, to, bytes) = g.forge(&mut input);
                let now = g.now;
                if let Some(a) = g.node(to) {
                    let _ = a.step(now, from, &bytes);
                }
            }
            6 => {
                g.collect();
                g.alter_next(&mut input);
            }
            7 => {
                let to = u64::from(input.below(3)) + 1;
                let from = input.node();
                let bytes = seal(input.bytes(255));
                let now = g.now;
                if let Some(a) = g.node(to) {
                    let _ = a.step(now, from, &bytes);
                }
            }
            8 => g.crash_or_restart(&mut input),
            _ => {
                g.collect();
                // Drop, duplicate or reorder the next message in flight.
                if let Some(m) = g.flight.pop_front() {
                    match input.below(3) {
                        0 => {}
                        1 => {
                            g.flight.push_back(m.clone());
                            g.flight.push_back(m);
                        }
                        _ => g.flight.push_back(m),
                    }
                }
            }
        }
    }
    // Whatever the input did, the nodes go on: time passes without a panic.
    for _ in 0..20 {
        g.tick();
    }
}
