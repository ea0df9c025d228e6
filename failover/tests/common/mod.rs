//! Shared by the arbiter tests: a three-node group on a perfect in-memory network with a
//! virtual clock (crashes, restarts, cuts, tampering and injected messages), and log capture.
#![allow(dead_code)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use failover::journal::MemDisk;
use failover::{Arbiter, ArbiterConfig, ArbiterError, Event, VmId};
use raft::eraftpb::Message;
use tracing_subscriber::fmt::MakeWriter;

pub use failover::error_chain as chain;

pub const VM: VmId = VmId(5);

pub struct Group {
    pub now: Instant,
    pub disks: Vec<MemDisk>,
    pub nodes: Vec<Option<Arbiter>>,
    pub events: Vec<(u64, Event)>,
    /// Pairs that cannot talk (both directions).
    pub cuts: Vec<(u64, u64)>,
    /// Why tampered messages were refused.
    pub refusals: Vec<String>,
}

pub fn config(id: u64) -> ArbiterConfig {
    ArbiterConfig { preferred_leader: Some(3), ..ArbiterConfig::new(id, &[1, 2, 3]) }
}

impl Group {
    pub fn new() -> Self {
        let now = Instant::now();
        let disks = vec![MemDisk::new(), MemDisk::new(), MemDisk::new()];
        let nodes =
            (1..=3).map(|id| Some(Arbiter::open_mem(config(id), &disks[id as usize - 1], now).unwrap())).collect();
        Self { now, disks, nodes, events: Vec::new(), cuts: Vec::new(), refusals: Vec::new() }
    }

    /// Node 1 holds the VM, with node 2 recorded as its backup.
    pub fn protected() -> Self {
        let mut g = Self::new();
        g.at(1, |a, now| a.request_activity(now, VM)).unwrap();
        g.run(300);
        let now = g.now;
        g.node(1).set_backup(now, VM, 2).unwrap();
        g.run(300);
        g
    }

    /// Calls `f` on node `id` with the group's clock.
    pub fn at<R>(&mut self, id: u64, f: impl FnOnce(&mut Arbiter, Instant) -> R) -> R {
        let now = self.now;
        f(self.node(id), now)
    }

    pub fn node(&mut self, id: u64) -> &mut Arbiter {
        self.nodes[id as usize - 1].as_mut().expect("node up")
    }

    /// Advances 1 ms at a time with a perfect network, `ms` times. Every message must be
    /// accepted.
    pub fn run(&mut self, ms: u64) {
        self.run_with(ms, |_, _, _| true);
    }

    /// Like [`Group::run`], but `tamper(from, to, msg)` sees every raft message in flight: it
    /// may change it (the changed message is re-encoded and delivered, and may be refused) or
    /// return false to drop it.
    pub fn run_with(&mut self, ms: u64, mut tamper: impl FnMut(u64, u64, &mut Message) -> bool) {
        for _ in 0..ms {
            self.now += Duration::from_millis(1);
            let now = self.now;
            let mut flight = Vec::new();
            for node in self.nodes.iter_mut().flatten() {
                node.handle_timeout(now).unwrap();
                while let Some((to, bytes)) = node.poll_transmit() {
                    flight.push((node.id(), to, bytes));
                }
                while let Some(e) = node.poll_event() {
                    self.events.push((node.id(), e));
                }
            }
            for (from, to, bytes) in flight {
                if self.cuts.iter().any(|&(a, b)| (a, b) == (from, to) || (b, a) == (from, to)) {
                    continue;
                }
                let mut msg = failover::wire::decode(&bytes).expect("a node sent garbage");
                let original = msg.clone();
                if !tamper(from, to, &mut msg) {
                    continue;
                }
                let tampered = msg != original;
                let bytes = if tampered { failover::wire::encode(&msg) } else { bytes };
                if let Some(node) = self.nodes[to as usize - 1].as_mut() {
                    match node.step(now, from, &bytes) {
                        Ok(()) => {}
                        Err(e) if tampered => self.refusals.push(chain(&e)),
                        Err(e) => panic!("node {to} refused {:?} from {from}: {}", original.get_msg_type(), chain(&e)),
                    }
                }
            }
        }
    }

    /// Runs until a message from `from` to `to` satisfies `pred` (delivered as usual) and
    /// returns a copy of it.
    pub fn capture(&mut self, from: u64, to: u64, pred: impl Fn(&Message) -> bool) -> Message {
        for _ in 0..2000 {
            let mut seen = None;
            self.run_with(1, |f, t, m| {
                if seen.is_none() && (f, t) == (from, to) && pred(m) {
                    seen = Some(m.clone());
                }
                true
            });
            if let Some(m) = seen {
                return m;
            }
        }
        panic!("no such message from {from} to {to} within 2 s");
    }

    /// Delivers `msg` to node `to` as if node `from` had sent it.
    pub fn inject(&mut self, from: u64, to: u64, msg: &Message) -> Result<(), ArbiterError> {
        let now = self.now;
        self.node(to).step(now, from, &failover::wire::encode(msg))
    }

    /// Runs until node 2 is granted generation 2; how many ms that took.
    pub fn ms_to_backup_grant(&mut self) -> u64 {
        for ms in 1..=500 {
            self.run(1);
            if self.events.contains(&(2, Event::Granted { vm: VM, generation: 2 })) {
                return ms;
            }
        }
        panic!("no grant within 500 ms");
    }

    pub fn crash(&mut self, id: u64) {
        self.nodes[id as usize - 1] = None;
        self.disks[id as usize - 1].crash(0);
    }

    pub fn restart(&mut self, id: u64) {
        let disk = &self.disks[id as usize - 1];
        self.nodes[id as usize - 1] = Some(Arbiter::open_mem(config(id), disk, self.now).unwrap());
    }
}

/// Captures this thread's log lines (every task of a current-thread runtime runs on it).
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

impl Logs {
    pub fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            // Refusals beyond the first ten in ten seconds are logged at debug.
            .with_env_filter("info,failover::net::quic=debug")
            .finish();
        (logs.clone(), tracing::subscriber::set_default(subscriber))
    }

    /// Every thread's log lines, into one buffer shared by the whole test binary (the global
    /// subscriber, installed once). Tests running in parallel each with a thread-local
    /// subscriber ([`Logs::capture`]) sometimes lose events: tracing caches per-callsite
    /// interest and the global maximum level across threads. Look for lines only your test
    /// can have written.
    pub fn global() -> Self {
        static GLOBAL: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
        GLOBAL
            .get_or_init(|| {
                let logs = Logs::default();
                let subscriber = tracing_subscriber::fmt()
                    .with_writer(logs.clone())
                    .with_ansi(false)
                    .with_env_filter("info")
                    .finish();
                tracing::subscriber::set_global_default(subscriber).expect("no other global subscriber");
                logs
            })
            .clone()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}
