//! Deterministic simulation of a protected VM's group: primary agent (1), backup agent (2) and
//! witness (3) on a virtual clock, over an in-memory network that drops, delays, duplicates,
//! reorders, corrupts, cuts and isolates, with crashes and restarts from the persisted journal.
//!
//! Each node's clock runs at its own rate (within the drift the lease math allows) from its own
//! offset, so no two nodes share a notion of time. Everything random comes from one seed.
//!
//! The agents behave like the primary and backup processes will: the holder runs the guest and
//! heartbeats "active"; a recorded backup holds a replica and heartbeats "replica"; anything else
//! is a spare. A backup whose detector declares the primary dead asks for activity; a holder
//! whose detector declares the backup dead asks to run degraded; a holder without a backup
//! re-protects with a live spare (after a simulated sync). Every step checks that no two nodes
//! may release output at the same virtual instant and that generations agree and never go back.

#![allow(dead_code)]

pub mod detector;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use detector::{Detector, DetectorConfig, DetectorEvent};
use failover::journal::MemDisk;
use failover::{Arbiter, ArbiterConfig, ArbiterError, Event, NodeId, VmId};

pub const PRIMARY: NodeId = 1;
pub const BACKUP: NodeId = 2;
pub const WITNESS: NodeId = 3;
pub const VOTERS: [NodeId; 3] = [PRIMARY, BACKUP, WITNESS];
pub const VM: VmId = VmId(7);

pub const MS: u64 = 1_000_000;
pub const US: u64 = 1_000;

pub use testbed::harness::rng::Rng;

/// Network behaviour (applies to every message).
#[derive(Debug, Clone, Copy)]
pub struct NetConfig {
    pub drop: f64,
    pub dup: f64,
    pub min_delay: u64,
    pub max_delay: u64,
    /// Chance of a delay spike (reordering against later messages).
    pub spike: f64,
    pub max_spike: u64,
    /// Chance a raft message is corrupted in flight (must be rejected cleanly).
    pub corrupt: f64,
}

impl NetConfig {
    pub fn lan() -> Self {
        Self { drop: 0.0, dup: 0.0, min_delay: 50 * US, max_delay: 300 * US, spike: 0.0, max_spike: 0, corrupt: 0.0 }
    }

    pub fn lossy() -> Self {
        Self {
            drop: 0.02,
            dup: 0.02,
            min_delay: 50 * US,
            max_delay: 800 * US,
            spike: 0.01,
            max_spike: 15 * MS,
            corrupt: 0.005,
        }
    }
}

/// What an agent's process holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guest {
    /// Nothing: a spare (or a crashed process).
    None,
    /// A committed replica: this node is the recorded backup.
    Replica,
    /// The running guest, under this generation.
    Active(u64),
}

impl Guest {
    fn kind(self) -> u8 {
        match self {
            Guest::None => 0,
            Guest::Replica => 1,
            Guest::Active(_) => 2,
        }
    }
}

#[derive(Debug)]
enum Payload {
    Raft(Vec<u8>),
    /// A detector heartbeat: the sender's guest kind.
    Heartbeat(u8),
}

#[derive(Debug)]
struct Flight {
    at: u64,
    seq: u64,
    from: NodeId,
    to: NodeId,
    payload: Payload,
}

pub struct Node {
    pub id: NodeId,
    pub agent: bool,
    pub disk: MemDisk,
    pub arb: Option<Arbiter>,
    pub guest: Guest,
    rate: f64,
    offset: u64,
    detector: Option<Detector>,
    sync_done_at: Option<u64>,
    wake: u64,
    pub restarts: u32,
    max_generation: u64,
}

impl Node {
    fn peer(&self) -> NodeId {
        if self.id == PRIMARY { BACKUP } else { PRIMARY }
    }

    pub fn alive(&self) -> bool {
        self.arb.is_some()
    }
}

/// A recorded event: virtual time, node, event.
pub type Record = (u64, NodeId, Event);

pub struct Sim {
    pub seed: u64,
    pub now: u64,
    base: Instant,
    pub rng: Rng,
    pub nodes: Vec<Node>,
    flights: BinaryHeap<Reverse<(u64, u64)>>,
    slab: BTreeMap<u64, Flight>,
    next_seq: u64,
    pub net: NetConfig,
    cut: [[bool; 4]; 4],
    pub events: Vec<Record>,
    gen_holder: BTreeMap<u64, NodeId>,
    trace: VecDeque<String>,
    pub detector: DetectorConfig,
    pub sync_time: u64,
    pub wire_errors: u64,
    /// Messages refused for another reason than a corrupted envelope (must stay empty).
    pub refusals: Vec<String>,
    pub steps: u64,
    /// Largest overlap found: if any, the invariant broke.
    pub violations: Vec<String>,
    /// Log every raft message delivered (debugging one seed).
    pub verbose: bool,
    /// Panic at the first invariant violation (or only record it).
    pub strict: bool,
    pub lease: failover::LeaseConfig,
    pub snapshot_every: u64,
    /// `ArbiterConfig::leader_follows_holder`.
    pub follow_holder: bool,
}

impl Sim {
    pub fn new(seed: u64, net: NetConfig) -> Self {
        Self::build(seed, net, |_| {})
    }

    /// A simulation whose settings `tweak` adjusts before the nodes start.
    pub fn build(seed: u64, net: NetConfig, tweak: impl FnOnce(&mut Sim)) -> Self {
        let mut rng = Rng::new(seed);
        let base = Instant::now();
        let mut nodes = Vec::new();
        for id in VOTERS {
            // Clock rates within 0.5% of real time (the lease math allows 1%), random offsets.
            let rate = 1.0 + (rng.unit() - 0.5) * 0.01;
            let offset = rng.range(0, 1_000 * MS);
            nodes.push(Node {
                id,
                agent: id != WITNESS,
                disk: MemDisk::new(),
                arb: None,
                guest: Guest::None,
                rate,
                offset,
                detector: None,
                sync_done_at: None,
                wake: 0,
                restarts: 0,
                max_generation: 0,
            });
        }
        let mut sim = Self {
            seed,
            now: 0,
            base,
            rng,
            nodes,
            flights: BinaryHeap::new(),
            slab: BTreeMap::new(),
            next_seq: 0,
            net,
            cut: [[false; 4]; 4],
            events: Vec::new(),
            gen_holder: BTreeMap::new(),
            trace: VecDeque::new(),
            detector: DetectorConfig::default(),
            sync_time: 20 * MS,
            wire_errors: 0,
            refusals: Vec::new(),
            steps: 0,
            violations: Vec::new(),
            verbose: std::env::var("FAILOVER_SIM_VERBOSE").is_ok(),
            strict: true,
            lease: failover::LeaseConfig::default(),
            snapshot_every: 0,
            follow_holder: true,
        };
        sim.snapshot_every = sim.rng.range(16, 256);
        tweak(&mut sim);
        for id in VOTERS {
            sim.start(id);
        }
        sim
    }

    pub fn config(&self, id: NodeId) -> ArbiterConfig {
        let base = if id == WITNESS { failover::Witness::config(id, &VOTERS) } else { ArbiterConfig::new(id, &VOTERS) };
        ArbiterConfig {
            preferred_leader: Some(WITNESS),
            seed: self.seed ^ id,
            // Small, so that compaction and snapshot transfer happen in every run.
            snapshot_every: self.snapshot_every,
            lease: self.lease,
            leader_follows_holder: self.follow_holder,
            ..base
        }
    }

    /// Sets a node's clock rate (1.0 is real time).
    pub fn set_rate(&mut self, id: NodeId, rate: f64) {
        let now = self.now;
        let local = self.clock(id);
        let n = &mut self.nodes[Self::idx(id)];
        n.rate = rate;
        // Keep the clock continuous: local(now) stays where it was.
        let base_ns = local.saturating_duration_since(self.base).as_nanos() as u64;
        n.offset = base_ns.saturating_sub((now as f64 * rate) as u64);
    }

    fn idx(id: NodeId) -> usize {
        (id - 1) as usize
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[Self::idx(id)]
    }

    fn local(&self, id: NodeId, t: u64) -> Instant {
        let n = &self.nodes[Self::idx(id)];
        self.base + Duration::from_nanos(n.offset + (t as f64 * n.rate) as u64)
    }

    /// The node's clock now.
    pub fn clock(&self, id: NodeId) -> Instant {
        self.local(id, self.now)
    }

    fn to_virtual(&self, id: NodeId, at: Instant) -> u64 {
        let n = &self.nodes[Self::idx(id)];
        let local = at.saturating_duration_since(self.base).as_nanos() as u64;
        (local.saturating_sub(n.offset) as f64 / n.rate).ceil() as u64 + 1
    }

    pub fn log(&mut self, line: String) {
        if self.trace.len() == 4000 {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("{:>9.3} ms  {line}", self.now as f64 / MS as f64));
    }

    pub fn dump(&self) -> String {
        let mut s = format!("seed {} at {:.3} ms, last lines:\n", self.seed, self.now as f64 / MS as f64);
        for l in &self.trace {
            s.push_str(l);
            s.push('\n');
        }
        s
    }

    // ---- faults ----

    /// Starts (or restarts from its disk) a node's process.
    pub fn start(&mut self, id: NodeId) {
        let now = self.clock(id);
        let config = self.config(id);
        let i = Self::idx(id);
        let arb = Arbiter::open_mem(config, &self.nodes[i].disk, now)
            .unwrap_or_else(|e| panic!("seed {}: node {id} failed to reopen: {e:?}", self.seed));
        let n = &mut self.nodes[i];
        n.arb = Some(arb);
        n.guest = Guest::None;
        n.detector = n.agent.then(|| Detector::new(n.peer(), self.detector));
        n.sync_done_at = None;
        n.max_generation = 0;
        n.wake = self.now;
        self.log(format!("node {id} started"));
        self.flush(id);
    }

    /// Kills a node's process: the guest (if any) dies with it, unsynced writes are lost.
    pub fn crash(&mut self, id: NodeId) {
        let torn = self.rng.below(24) as usize;
        let n = &mut self.nodes[Self::idx(id)];
        if n.arb.take().is_none() {
            return;
        }
        n.disk.crash(torn);
        n.guest = Guest::None;
        n.detector = None;
        n.restarts += 1;
        self.log(format!("node {id} crashed (torn {torn})"));
    }

    pub fn set_link(&mut self, from: NodeId, to: NodeId, up: bool) {
        self.cut[from as usize][to as usize] = !up;
    }

    pub fn set_pair(&mut self, a: NodeId, b: NodeId, up: bool) {
        self.set_link(a, b, up);
        self.set_link(b, a, up);
        self.log(format!("link {a}<->{b} {}", if up { "up" } else { "cut" }));
    }

    pub fn isolate(&mut self, id: NodeId) {
        for other in VOTERS.into_iter().filter(|&o| o != id) {
            self.set_pair(id, other, false);
        }
    }

    pub fn heal(&mut self) {
        self.cut = [[false; 4]; 4];
        self.log("all links healed".into());
    }

    // ---- network ----

    fn send(&mut self, from: NodeId, to: NodeId, payload: Payload) {
        if self.cut[from as usize][to as usize] || self.rng.chance(self.net.drop) {
            if self.verbose {
                self.log(format!("{from} -> {to}: dropped"));
            }
            return;
        }
        let copies = if self.rng.chance(self.net.dup) { 2 } else { 1 };
        let mut payload = Some(payload);
        for copy in 0..copies {
            let mut delay = self.rng.range(self.net.min_delay, self.net.max_delay);
            if self.rng.chance(self.net.spike) {
                delay += self.rng.range(0, self.net.max_spike);
            }
            let p = if copy + 1 == copies {
                payload.take().expect("payload")
            } else {
                match payload.as_ref().expect("payload") {
                    Payload::Raft(b) => Payload::Raft(b.clone()),
                    Payload::Heartbeat(k) => Payload::Heartbeat(*k),
                }
            };
            let p = match p {
                Payload::Raft(mut b) if self.rng.chance(self.net.corrupt) && !b.is_empty() => {
                    let at = self.rng.below(b.len() as u64) as usize;
                    b[at] ^= 1 << self.rng.below(8);
                    Payload::Raft(b)
                }
                p => p,
            };
            self.next_seq += 1;
            let at = self.now + delay;
            self.flights.push(Reverse((at, self.next_seq)));
            self.slab.insert(self.next_seq, Flight { at, seq: self.next_seq, from, to, payload: p });
        }
    }

    // ---- driving ----

    /// Runs until virtual time `until`.
    pub fn run_until(&mut self, until: u64) {
        loop {
            let next_flight = self.flights.peek().map(|Reverse((at, _))| *at);
            let next_wake = self.nodes.iter().filter(|n| n.alive()).map(|n| (n.wake, n.id)).min();
            let flight_first = match (next_flight, next_wake) {
                (Some(f), Some((w, _))) => f <= w,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let at = if flight_first { next_flight.expect("flight") } else { next_wake.expect("wake").0 };
            if at > until {
                break;
            }
            self.now = self.now.max(at);
            self.steps += 1;
            if flight_first {
                let Reverse((_, seq)) = self.flights.pop().expect("flight");
                let flight = self.slab.remove(&seq).expect("slab");
                self.deliver(flight);
            } else {
                let id = next_wake.expect("wake").1;
                self.wake(id);
            }
        }
        self.now = self.now.max(until);
    }

    pub fn run_for(&mut self, d: u64) {
        self.run_until(self.now + d);
    }

    fn deliver(&mut self, f: Flight) {
        let to = f.to;
        if !self.node(to).alive() {
            return;
        }
        let now = self.clock(to);
        match f.payload {
            Payload::Raft(bytes) => {
                if self.verbose {
                    let what = match failover::wire::decode(&bytes) {
                        Ok(m) => format!(
                            "{:?} term {} index {} logterm {} commit {} entries {} reject {}",
                            m.get_msg_type(),
                            m.term,
                            m.index,
                            m.log_term,
                            m.commit,
                            m.entries.len(),
                            m.reject
                        ),
                        Err(e) => format!("{e}"),
                    };
                    self.log(format!("{} -> {to}: {what}", f.from));
                }
                let i = Self::idx(to);
                let r = self.nodes[i].arb.as_mut().expect("alive").step(now, f.from, &bytes);
                match r {
                    Ok(()) => {}
                    Err(ArbiterError::Wire(_)) => self.wire_errors += 1,
                    // Only corruption (caught by the crc above) may make a message malformed:
                    // a refusal of anything else is a check that refuses what the group sends.
                    Err(ArbiterError::Relayed { .. }) => {}
                    Err(e) if e.is_refusal() => self.refusals.push(format!("node {to}: {e:?}")),
                    Err(e) => {
                        // Other step errors are fine (raft refusing an odd message), but never a panic.
                        self.log(format!("node {to} step error: {e}"));
                    }
                }
            }
            Payload::Heartbeat(kind) => {
                let n = &mut self.nodes[Self::idx(to)];
                // A holder watches its replica, a replica watches the active copy.
                let wanted = match n.guest {
                    Guest::Active(_) => kind == 1,
                    Guest::Replica => kind == 2,
                    Guest::None => false,
                };
                if wanted && let Some(d) = n.detector.as_mut() {
                    d.on_heartbeat(now, f.from);
                }
                // A holder without a backup re-protects with a live spare.
                if kind == 0 && matches!(n.guest, Guest::Active(_)) && n.sync_done_at.is_none() {
                    let arb = n.arb.as_ref().expect("alive");
                    let record = arb.record(VM);
                    if record.is_some_and(|r| r.holder == to && r.backup.is_none()) && arb.may_release_output(now, VM) {
                        n.sync_done_at = Some(self.now + self.sync_time);
                        n.wake = n.wake.min(self.now + self.sync_time);
                        self.log(format!("node {to} starts syncing spare {}", f.from));
                    }
                }
            }
        }
        self.flush(to);
    }

    fn wake(&mut self, id: NodeId) {
        let now = self.clock(id);
        let i = Self::idx(id);
        let n = &mut self.nodes[i];
        if let Some(at) = n.sync_done_at
            && self.now >= at
        {
            n.sync_done_at = None;
            let peer = n.peer();
            let arb = n.arb.as_mut().expect("alive");
            let _ = arb.set_backup(now, VM, peer);
        }
        let n = &mut self.nodes[i];
        if let Err(e) = n.arb.as_mut().expect("alive").handle_timeout(now) {
            panic!("seed {}: node {id} timeout error: {e:?}", self.seed);
        }
        if let Some(d) = n.detector.as_mut() {
            d.handle_timeout(now);
        }
        self.flush(id);
    }

    /// Drains a node's outputs and reacts to its events until it is quiet; then checks the
    /// invariants and schedules its next wake-up.
    fn flush(&mut self, id: NodeId) {
        let i = Self::idx(id);
        loop {
            let mut progress = false;
            let Some(arb) = self.nodes[i].arb.as_mut() else { return };
            let mut out = Vec::new();
            while let Some(t) = arb.poll_transmit() {
                out.push(t);
            }
            let mut events = Vec::new();
            while let Some(e) = arb.poll_event() {
                events.push(e);
            }
            let mut beats = Vec::new();
            let mut verdicts = Vec::new();
            let kind = self.nodes[i].guest.kind();
            if let Some(d) = self.nodes[i].detector.as_mut() {
                while let Some((to, _)) = d.poll_heartbeat(id) {
                    beats.push(to);
                }
                while let Some(v) = d.poll_event() {
                    verdicts.push(v);
                }
            }
            for (to, bytes) in out {
                progress = true;
                self.send(id, to, Payload::Raft(bytes));
            }
            for to in beats {
                self.send(id, to, Payload::Heartbeat(kind));
            }
            for e in events {
                progress = true;
                self.on_event(id, e);
            }
            for v in verdicts {
                progress = true;
                self.on_verdict(id, v);
            }
            if !progress {
                break;
            }
        }
        self.check(id);
        self.schedule(id);
    }

    fn schedule(&mut self, id: NodeId) {
        let i = Self::idx(id);
        let n = &self.nodes[i];
        let Some(arb) = n.arb.as_ref() else { return };
        let mut wake = u64::MAX;
        if let Some(t) = arb.poll_timeout() {
            wake = wake.min(self.to_virtual(id, t));
        }
        if let Some(t) = n.detector.as_ref().and_then(|d| d.poll_timeout()) {
            wake = wake.min(self.to_virtual(id, t));
        }
        if let Some(t) = n.sync_done_at {
            wake = wake.min(t);
        }
        self.nodes[i].wake = wake.max(self.now + 1);
    }

    fn reset_detector(&mut self, id: NodeId) {
        let cfg = self.detector;
        let n = &mut self.nodes[Self::idx(id)];
        if n.agent {
            n.detector = Some(Detector::new(n.peer(), cfg));
        }
    }

    fn on_event(&mut self, id: NodeId, e: Event) {
        self.events.push((self.now, id, e));
        self.log(format!("node {id}: {e:?}"));
        let i = Self::idx(id);
        match e {
            Event::Granted { generation, .. } => {
                // The first grant starts the guest; a later one promotes the replica. A process
                // without a replica (restarted since it asked) has nothing to run.
                let n = &mut self.nodes[i];
                if generation == 1 || n.guest == Guest::Replica {
                    n.guest = Guest::Active(generation);
                } else {
                    self.log(format!("node {id}: granted generation {generation} without a replica"));
                }
                self.nodes[i].sync_done_at = None;
                self.reset_detector(id);
            }
            Event::Fenced { .. } => {
                // Stop the guest for good: this process is a spare from now on.
                self.nodes[i].guest = Guest::None;
                self.nodes[i].sync_done_at = None;
                self.reset_detector(id);
            }
            Event::BackupOf { .. } if self.nodes[i].agent => {
                self.nodes[i].guest = Guest::Replica;
                self.reset_detector(id);
            }
            Event::BackupDropped { .. } => {
                self.nodes[i].guest = Guest::None;
                self.reset_detector(id);
            }
            _ => {}
        }
    }

    fn on_verdict(&mut self, id: NodeId, v: DetectorEvent) {
        let now = self.clock(id);
        let i = Self::idx(id);
        let guest = self.nodes[i].guest;
        let arb = self.nodes[i].arb.as_mut().expect("alive");
        match (guest, v) {
            (Guest::Replica, DetectorEvent::Dead { .. }) => {
                let r = arb.report_primary_dead(now, VM);
                self.log(format!("node {id}: primary dead -> {r:?}"));
            }
            (Guest::Replica, DetectorEvent::Alive { .. }) => arb.report_primary_alive(now, VM),
            (Guest::Active(_), DetectorEvent::Dead { .. }) if arb.record(VM).is_some_and(|r| r.backup.is_some()) => {
                let r = arb.report_backup_dead(now, VM);
                self.log(format!("node {id}: backup dead -> {r:?}"));
            }
            _ => {}
        }
    }

    /// The invariants, checked after every step of node `id`.
    fn check(&mut self, id: NodeId) {
        // 1. No two nodes may release output at the same virtual instant.
        let releasing: Vec<NodeId> = VOTERS
            .into_iter()
            .filter(|&n| {
                let now = self.clock(n);
                self.node(n).arb.as_ref().is_some_and(|a| a.may_release_output(now, VM))
            })
            .collect();
        if releasing.len() > 1 {
            let msg = format!("two nodes may release output at once: {releasing:?}");
            self.violations.push(msg.clone());
            if self.strict {
                panic!("{msg}\n{}", self.dump());
            }
        }
        // 2. Generations agree across nodes and never go back within a process.
        let Some(record) = self.node(id).arb.as_ref().and_then(|a| a.record(VM)) else { return };
        let holder = *self.gen_holder.entry(record.generation).or_insert(record.holder);
        if holder != record.holder {
            panic!(
                "generation {} held by {} on node {id} but by {holder} elsewhere\n{}",
                record.generation,
                record.holder,
                self.dump()
            );
        }
        let max = self.nodes[Self::idx(id)].max_generation;
        if record.generation < max {
            panic!("node {id}: generation went back from {max} to {}\n{}", record.generation, self.dump());
        }
        self.nodes[Self::idx(id)].max_generation = record.generation;
    }

    // ---- scenario helpers ----

    /// The node that may release output now, if any.
    pub fn releasing(&self) -> Option<NodeId> {
        VOTERS.into_iter().find(|&n| {
            let now = self.clock(n);
            self.node(n).arb.as_ref().is_some_and(|a| a.may_release_output(now, VM))
        })
    }

    /// Asks node `id` for the first grant of the VM.
    pub fn request_activity(&mut self, id: NodeId) {
        let now = self.clock(id);
        if let Some(arb) = self.nodes[Self::idx(id)].arb.as_mut() {
            let _ = arb.request_activity(now, VM);
        }
        self.flush(id);
    }

    /// The record of the VM at node `id`.
    pub fn record(&self, id: NodeId) -> Option<failover::VmRecord> {
        self.node(id).arb.as_ref().and_then(|a| a.record(VM))
    }

    /// Boots the group: node 1 asks for the VM, syncs node 2, and the group is protected.
    /// Returns false if that did not happen within `limit`.
    pub fn boot(&mut self, limit: u64) -> bool {
        self.request_activity(PRIMARY);
        let end = self.now + limit;
        while self.now < end {
            self.run_for(5 * MS);
            if self.releasing() == Some(PRIMARY)
                && self.record(PRIMARY).is_some_and(|r| r.backup == Some(BACKUP))
                && self.node(BACKUP).guest == Guest::Replica
            {
                return true;
            }
        }
        false
    }

    /// First event matching `f` at or after `since`.
    pub fn first_event(&self, since: u64, f: impl Fn(NodeId, &Event) -> bool) -> Option<(u64, NodeId, Event)> {
        self.events.iter().copied().find(|(t, n, e)| *t >= since && f(*n, e))
    }
}
