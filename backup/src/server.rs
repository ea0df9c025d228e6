//! The backup's server: accepts the primary over QUIC (mutual TLS), runs
//! `replication-proto`'s [`Receiver`], commits each whole checkpoint into the [`Replica`] and
//! acknowledges it. One primary at a time; after a disconnect the same receiver (and replica)
//! serves the next connection, so the primary can resume from the committed epoch.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use replication_proto::{MemoryLayout, PeerLiveness, Receiver, ReceiverConfig, ReceiverEvent, Role, VmIdentity};
use serde::Serialize;
use tokio::sync::watch;
use transport::session::{StreamCommand, Tap};
use transport::{Endpoint, Identity, PeerPolicy, Tuning};

use crate::replica::Replica;
use transport::error_chain;

/// What the backup serves.
#[derive(Clone)]
pub struct BackupConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Our certificates.
    pub identity: Identity,
    /// The certificate name of the only primary admitted (`understudy backup --primary-name`);
    /// any other is refused during the handshake, before it can send a byte.
    pub primary_name: String,
    /// QUIC tuning.
    pub tuning: Tuning,
    /// The protected VM.
    pub vm: VmIdentity,
    /// Its memory layout as `(guest-physical start, size)` pairs.
    pub layout: Vec<(u64, u64)>,
    /// Record memory digests of every consistent commit (for verification tests).
    pub verify: bool,
    /// Heartbeat interval and silence after which the primary counts as gone.
    pub timing: replication_proto::Timing,
    /// Build the KVM VM over the replica when it first becomes consistent, so promotion only
    /// loads state (~1 ms instead of 7-10 ms here), at the price of this process taking ~15-20
    /// ms longer to die (the primary sees a dead backup that much later).
    pub prepare_vm: bool,
    /// Where to report that the primary is gone while the replica is consistent (the owner
    /// decides whether to promote).
    pub on_primary_lost: Option<std::sync::mpsc::Sender<PrimaryLost>>,
    /// Bounds of the inbound log (frames the primary delivered that the replica may not hold,
    /// replayed at promotion); zero frames: no log, announced as none.
    pub inbound_log: crate::inbound::InboundLimits,
    /// Side copies of inbound frames (authenticated datagrams beside the session, see
    /// [`crate::side_copy`]): the UDP port to take them at, on the listen address's IP (0: any
    /// free port); `None`: no side-copy socket, none announced. Only with an inbound log.
    pub side_copy_port: Option<u16>,
    /// Read the standby's own TAP while standing by and keep what comes (LAN copies, see
    /// [`crate::lan_copy`]): needs a TAP no other process holds, on a LAN that hands the
    /// guest's inbound frames to this host too. The owner opens the TAP.
    pub lan_copy: bool,
    /// Bounds of the output log (each epoch's output frames until the primary releases them,
    /// written at promotion for the epochs the replica holds); zero frames: no log, announced
    /// as none.
    pub output_log: crate::output_log::OutputLimits,
}

/// How sure the backup is that the primary is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The session ended (silence past the detection time, the liveness line, a broken
    /// connection).
    Lost,
    /// The primary has been silent past the suspicion time; the session goes on. Acting on it
    /// is only safe where something else rules out two active copies (arbitration's lease).
    Suspect,
    /// A suspect primary spoke again: withdraw what the suspicion started.
    Heard,
}

/// The primary went silent while the replica held a consistent checkpoint (or, with
/// [`Verdict::Heard`], spoke again).
#[derive(Debug, Clone)]
pub struct PrimaryLost {
    /// How sure.
    pub verdict: Verdict,
    /// The replica's consistent epoch.
    pub epoch: u64,
    /// Why the session ended (or how long the primary has been silent).
    pub reason: String,
    /// The primary's host closed the liveness line without a goodbye: its process is gone,
    /// not merely silent.
    pub process_gone: bool,
    /// When the last commit happened.
    pub last_commit: Option<Instant>,
    /// When the loss was noticed.
    pub noticed: Instant,
}

/// A verification point: replica digest and state checksum after a commit.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct VerifyPoint {
    /// Wire epoch.
    pub epoch: u64,
    /// Replica memory digest.
    pub memory_digest: u64,
    /// crc32 of the encoded `VmState`.
    pub state_crc: u32,
}

/// What `understudy status` shows for a backup.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BackupStatus {
    /// `waiting`, `syncing`, `consistent` or `promoted`.
    pub state: String,
    /// Whether a primary is connected.
    pub connected: bool,
    /// The primary's certificate name.
    pub primary: Option<String>,
    /// Last committed epoch.
    pub committed_epoch: Option<u64>,
    /// Last consistent (promotable) epoch.
    pub consistent_epoch: Option<u64>,
    /// While a re-sync overwrites the replica: the consistent epoch kept to roll back to
    /// (promotion then resumes from it).
    pub rollback_epoch: Option<u64>,
    /// Sessions that ended on an internal failure (the server then serves the next one with a
    /// fresh receiver: the primary re-syncs).
    pub failed_sessions: u64,
    /// Checkpoints committed.
    pub commits: u64,
    /// Checkpoints refused (did not apply; replica unchanged).
    pub rejected: u64,
    /// Pages written into the replica.
    pub pages: u64,
    /// Mean commit time, µs.
    pub commit_us_mean: f64,
    /// The inbound log (frames replayed at promotion).
    pub inbound_log: crate::inbound::InboundLogReport,
    /// The output log (frames written at promotion).
    pub output_log: crate::output_log::OutputLogReport,
    /// Seconds since the last commit.
    pub since_last_commit_s: Option<f64>,
    /// The last error seen.
    pub last_error: Option<String>,
}

/// State shared between the server task and the admin API.
pub struct BackupNode {
    replica: Mutex<Option<Replica>>,
    status: Mutex<BackupStatus>,
    last_commit: Mutex<Option<Instant>>,
    journal: Mutex<Vec<VerifyPoint>>,
    commit_us_total: Mutex<f64>,
    /// A VM built over the replica memory once it first became consistent, so promotion only
    /// loads state (see [`vmm::vm::PreparedVm`]).
    prepared: Mutex<Prepared>,
    prepare_vm: bool,
    /// Frames the primary delivered after the epochs the replica holds (see [`crate::inbound`]).
    inbound: crate::inbound::InboundLog,
    /// The primary instance the inbound log's frames come from.
    inbound_origin: Mutex<Option<u64>>,
    /// The side-copy socket, once `serve` bound one.
    side_copy: Mutex<Option<Arc<crate::side_copy::SideCopyReceiver>>>,
    /// The standby's TAP, read while it stands by ([`crate::lan_copy`]).
    lan_copy: Mutex<Option<Arc<crate::lan_copy::LanCopy>>>,
    /// Output of the epochs the primary has not reported released (see [`crate::output_log`]).
    output: crate::output_log::OutputLog,
    /// The primary instance the output log's frames come from.
    output_origin: Mutex<Option<u64>>,
}

/// Where the VM built ahead of promotion stands.
#[derive(Debug, Default)]
enum Prepared {
    /// Not tried yet (no consistent checkpoint so far).
    #[default]
    No,
    /// Built.
    Ready(vmm::vm::PreparedVm),
    /// Failed or taken; promotion builds its own.
    Gone,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Errors of the backup node.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The endpoint could not be set up.
    #[error("backup: listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: Box<transport::EndpointError>,
    },
    /// The replica could not be set up or promoted.
    #[error(transparent)]
    Replica(#[from] crate::replica::ReplicaError),
    /// The replica was already promoted.
    #[error("the replica was already promoted")]
    Promoted,
    /// The memory layout is unusable.
    #[error("backup: {0}")]
    Layout(String),
    /// No random instance number for the receiver.
    #[error("backup: receiver instance number")]
    Random(#[from] transport::RandomError),
}

impl BackupNode {
    /// A node with an empty replica of `layout`; with `prepare_vm`, see
    /// [`BackupConfig::prepare_vm`].
    pub fn new(layout: &[(u64, u64)], prepare_vm: bool) -> Result<Arc<Self>, BackupError> {
        let replica = Replica::new(layout)?;
        Ok(Arc::new(Self {
            replica: Mutex::new(Some(replica)),
            status: Mutex::new(BackupStatus { state: "waiting".into(), ..Default::default() }),
            last_commit: Mutex::new(None),
            journal: Mutex::new(Vec::new()),
            commit_us_total: Mutex::new(0.0),
            prepared: Mutex::new(Prepared::No),
            prepare_vm,
            inbound: crate::inbound::InboundLog::new(crate::inbound::InboundLimits::default()),
            inbound_origin: Mutex::new(None),
            side_copy: Mutex::new(None),
            lan_copy: Mutex::new(None),
            output: crate::output_log::OutputLog::new(crate::output_log::OutputLimits::default()),
            output_origin: Mutex::new(None),
        }))
    }

    /// The epoch promotion would resume from, if any: the consistent one, or while a re-sync
    /// runs the one kept to roll back to.
    pub(crate) fn consistent_epoch(&self) -> Option<u64> {
        lock(&self.replica).as_ref().and_then(|r| r.promotable_epoch())
    }

    /// Tells the owner (`on_primary_lost`) what became of the primary, if the replica holds a
    /// consistent checkpoint (without one there is nothing to promote).
    fn report(&self, cfg: &BackupConfig, verdict: Verdict, reason: String, process_gone: bool) {
        if let (Some(epoch), Some(tx)) = (self.consistent_epoch(), &cfg.on_primary_lost) {
            let _ = tx.send(PrimaryLost {
                verdict,
                epoch,
                reason,
                process_gone,
                last_commit: *lock(&self.last_commit),
                noticed: Instant::now(),
            });
        }
    }

    /// The inbound log (replayed at promotion: [`crate::promote::PromoteOptions::replay`]).
    pub fn inbound(&self) -> &crate::inbound::InboundLog {
        &self.inbound
    }

    /// The output log (written at promotion: [`crate::promote::PromoteOptions::replay`]).
    pub fn output(&self) -> &crate::output_log::OutputLog {
        &self.output
    }

    /// Takes every side copy waiting in the socket into the inbound log (promotion does, right
    /// before it takes the log: a dead primary's last copies are all there).
    pub fn drain_side_copies(&self) {
        let side = lock(&self.side_copy).clone();
        if let Some(s) = side {
            let n = s.drain(&self.inbound);
            tracing::info!(datagrams = n, "backup: side copies drained into the inbound log");
        }
    }

    /// Keeps `lan` (the standby's TAP, read while it stands by) for promotion.
    pub fn set_lan_copy(&self, lan: Arc<crate::lan_copy::LanCopy>) {
        *lock(&self.lan_copy) = Some(lan);
    }

    /// The LAN copies, if kept (promotion takes their TAP and frames; the counters stay).
    pub fn lan_copy(&self) -> Option<Arc<crate::lan_copy::LanCopy>> {
        lock(&self.lan_copy).clone()
    }

    /// The status now.
    pub fn status(&self) -> BackupStatus {
        let mut s = lock(&self.status).clone();
        s.inbound_log = self.inbound.report();
        s.output_log = self.output.report();
        if let Some(side) = lock(&self.side_copy).as_ref() {
            s.inbound_log.side_copy = side.report();
        }
        if let Some(lan) = lock(&self.lan_copy).as_ref() {
            s.inbound_log.lan_copy = lan.report();
        }
        s.since_last_commit_s = lock(&self.last_commit).map(|t| t.elapsed().as_secs_f64());
        s
    }

    /// Verification points recorded so far.
    pub fn journal(&self) -> Vec<VerifyPoint> {
        lock(&self.journal).clone()
    }

    /// Takes the replica for promotion; the server stops committing.
    pub fn take_replica(&self) -> Result<Replica, BackupError> {
        let r = lock(&self.replica).take().ok_or(BackupError::Promoted)?;
        if r.promotable_epoch().is_none() {
            let e = crate::replica::ReplicaError::NotConsistent;
            *lock(&self.replica) = Some(r);
            return Err(e.into());
        }
        lock(&self.status).state = "promoted".into();
        Ok(r)
    }

    /// The VM built ahead of promotion, if it is ready (promotion builds its own when this is
    /// `None`).
    pub fn take_prepared_vm(&self) -> Option<vmm::vm::PreparedVm> {
        match std::mem::replace(&mut *lock(&self.prepared), Prepared::Gone) {
            Prepared::Ready(p) => Some(p),
            _ => None,
        }
    }

    /// Whether a consistent commit would still build the VM for promotion (`prepare_once`,
    /// milliseconds): such a commit goes to the blocking pool.
    fn prepare_pending(&self) -> bool {
        self.prepare_vm && matches!(*lock(&self.prepared), Prepared::No)
    }

    /// Builds the VM over a consistent replica, once (on the commit thread, under the replica
    /// lock: the first consistent commit's ack waits for it, ~1-10 ms here).
    fn prepare_once(&self, replica: &Replica) {
        let mut p = lock(&self.prepared);
        if !matches!(*p, Prepared::No) {
            return;
        }
        let t0 = Instant::now();
        *p = match replica.prepare_vm() {
            Some(Ok(vm)) => {
                tracing::info!(
                    ms = t0.elapsed().as_secs_f64() * 1e3,
                    "backup: vm prepared over the replica for promotion"
                );
                Prepared::Ready(vm)
            }
            Some(Err(e)) => {
                tracing::warn!("backup: {}; promotion will build the vm", error_chain(&e));
                Prepared::Gone
            }
            None => Prepared::No,
        };
    }

    /// Builds the VM over the replica for `vcpus` vCPUs now, before any consistent checkpoint
    /// (a migration destination, while the rounds run); promotion builds anew if the state
    /// turns out to need another count.
    pub(crate) fn prepare_now(&self, vcpus: u8) {
        let t0 = Instant::now();
        let r = match lock(&self.replica).as_ref() {
            Some(replica) => replica.prepare_vm_for(vcpus),
            None => return,
        };
        let mut p = lock(&self.prepared);
        *p = match r {
            Ok(vm) => {
                tracing::info!(vcpus, ms = t0.elapsed().as_secs_f64() * 1e3, "vm prepared over the replica");
                Prepared::Ready(vm)
            }
            Err(e) => {
                tracing::warn!("{}; the vm is built at the hand-over", error_chain(&e));
                Prepared::Gone
            }
        };
    }

    /// A handle on the replica's memory (`None` once promoted).
    pub(crate) fn replica_memory(&self) -> Option<vmm::memory::GuestMemory> {
        lock(&self.replica).as_ref().map(|r| r.memory_handle())
    }

    /// The replica's memory digest (`None` once promoted).
    pub(crate) fn replica_digest(&self) -> Option<u64> {
        lock(&self.replica).as_ref().map(|r| r.digest())
    }

    pub(crate) fn commit(&self, cp: &replication_proto::Checkpoint, verify: bool) -> Result<(), String> {
        let t0 = Instant::now();
        let mut guard = lock(&self.replica);
        let Some(replica) = guard.as_mut() else { return Err("replica was promoted".into()) };
        if failover::failpoint::fires("backup.refuse") {
            lock(&self.status).rejected += 1;
            return Err(format!("checkpoint {}: refused by fault point backup.refuse", cp.epoch()));
        }
        match replica.commit(cp) {
            Ok(c) => {
                let us = t0.elapsed().as_secs_f64() * 1e6;
                if verify && c.consistent {
                    let p = VerifyPoint {
                        epoch: c.epoch,
                        memory_digest: replica.digest(),
                        state_crc: crc32fast::hash(cp.state()),
                    };
                    lock(&self.journal).push(p);
                }
                *lock(&self.last_commit) = Some(Instant::now());
                let mut total = lock(&self.commit_us_total);
                *total += us;
                let mut s = lock(&self.status);
                s.commits += 1;
                s.pages += c.pages as u64;
                s.commit_us_mean = *total / s.commits as f64;
                s.committed_epoch = Some(c.epoch);
                s.consistent_epoch = replica.consistent_epoch();
                s.rollback_epoch = replica.rollback_epoch();
                let state = if c.consistent { "consistent" } else { "syncing" };
                if s.state != state {
                    tracing::info!(epoch = c.epoch, "backup replica: {} -> {state}", s.state);
                    s.state = state.into();
                }
                drop(s);
                drop(total);
                if c.consistent && self.prepare_vm {
                    self.prepare_once(replica);
                }
                Ok(())
            }
            Err(e) => {
                let mut s = lock(&self.status);
                s.rejected += 1;
                let msg = error_chain(&e);
                s.last_error = Some(msg.clone());
                Err(msg)
            }
        }
    }
}

/// Builds the protocol layout from `(start, size)` pairs.
pub fn proto_layout(layout: &[(u64, u64)]) -> Result<MemoryLayout, BackupError> {
    let l = MemoryLayout {
        page_size: vmm::memory::PAGE_SIZE as u32,
        ranges: layout.iter().map(|&(start, len)| replication_proto::GuestRange { start, len }).collect(),
    };
    l.validate().map_err(|e| BackupError::Layout(e.to_string()))?;
    Ok(l)
}

/// Checkpoints of at most this many pages are committed on the session's event loop.
const INLINE_COMMIT_PAGES: usize = 256;

/// Commits small checkpoints in the session's task, as the receiver hands them over, and
/// acknowledges each there once its commit is complete (a refused one is rejected, never
/// acknowledged): the checkpoint and its ack do not cross to the server's task and back (two
/// task wakes, each up to ~45 µs here when the other core is idle). Large checkpoints, the one
/// that builds the promotion VM, and every one behind a checkpoint `deferred` to the server's
/// task (counted there until its result is back in the session) pass on, so commits stay in
/// epoch order.
fn commit_tap(node: Arc<BackupNode>, verify: bool, deferred: Arc<AtomicUsize>) -> Tap<Receiver> {
    Box::new(move |r, event| match event {
        ReceiverEvent::Checkpoint(cp)
            if deferred.load(Ordering::SeqCst) == 0
                && cp.page_count() <= INLINE_COMMIT_PAGES
                && !node.prepare_pending() =>
        {
            let epoch = cp.epoch();
            tracing::debug!(epoch, pages = cp.page_count(), wall_ns = wall_ns(), "checkpoint received");
            let t_commit = Instant::now();
            let result = node.commit(&cp, verify);
            tracing::debug!(epoch, commit_us = t_commit.elapsed().as_micros() as u64, "checkpoint committed");
            resolve(r, tokio::time::Instant::now().into_std(), epoch, result);
            None
        }
        ReceiverEvent::Checkpoint(cp) => {
            deferred.fetch_add(1, Ordering::SeqCst);
            Some(ReceiverEvent::Checkpoint(cp))
        }
        other => Some(other),
    })
}

/// Tells the receiver how checkpoint `epoch`'s commit ended: acknowledged only once it is
/// complete (output commit), rejected (never acknowledged) when it failed.
fn resolve(r: &mut Receiver, now: Instant, epoch: u64, result: Result<(), String>) {
    match result {
        Ok(()) => {
            if failover::failpoint::fires("backup.session-panic") {
                panic!("fault point backup.session-panic");
            }
            failover::failpoint::hit("backup.committed");
            if let Err(e) = r.committed(now, epoch) {
                tracing::error!("backup: committed({epoch}): {e}");
            }
            tracing::debug!(epoch, wall_ns = wall_ns(), "ack queued");
        }
        Err(why) => {
            tracing::error!("backup: checkpoint {epoch} refused, replica unchanged: {why}");
            let _ = r.reject(now, epoch);
        }
    }
}

/// Resolves, in the session's task, a checkpoint `commit_tap` left to the server's task; the
/// tap commits inline again once none is left.
fn resolve_deferred(deferred: Arc<AtomicUsize>, epoch: u64, result: Result<(), String>) -> StreamCommand<Receiver> {
    StreamCommand::with(move |r: &mut Receiver, now| {
        deferred.fetch_sub(1, Ordering::SeqCst);
        resolve(r, now, epoch, result);
    })
}

fn wall_ns() -> u64 {
    vmm::devices::virtio::net::wall_ns()
}

/// The side-copy socket `cfg` asks for (`None` without an inbound log, when turned off, or when
/// it cannot be bound: the primary then gets no port and frames reach the log by the session
/// only).
fn side_copy_socket(cfg: &BackupConfig) -> Option<Arc<crate::side_copy::SideCopyReceiver>> {
    let port = cfg.side_copy_port.filter(|_| cfg.inbound_log.enabled())?;
    match crate::side_copy::SideCopyReceiver::bind(cfg.listen.ip(), port) {
        Ok(s) => Some(Arc::new(s)),
        Err(e) => {
            tracing::warn!(
                "backup: {}; no side copies (frames reach the inbound log by the session only)",
                error_chain(&e)
            );
            None
        }
    }
}

/// Serves primaries until `stop` turns true.
pub async fn serve(
    cfg: BackupConfig,
    node: Arc<BackupNode>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), BackupError> {
    let policy = PeerPolicy::replication().accept_only([cfg.primary_name.clone()]);
    let versions = transport::proto::protocol_versions();
    let endpoint = Endpoint::bind_with(cfg.listen, &cfg.identity, versions, cfg.tuning.clone(), policy)
        .map_err(|source| BackupError::Bind { addr: cfg.listen, source: Box::new(source) })?;
    tracing::info!(listen = %cfg.listen, vm = %cfg.vm.name, primary = %cfg.primary_name, "backup listening");
    let layout = proto_layout(&cfg.layout)?;
    let side_copy = side_copy_socket(&cfg);
    *lock(&node.side_copy) = side_copy.clone();
    let new_receiver = || -> Result<Receiver, BackupError> {
        // The instance number tells a primary whether it talks to the receiver it resumed
        // with: a fresh one must never match (random, not derived from the pid or the clock).
        let instance = transport::random_u64()?;
        let mut rcfg = ReceiverConfig::new(Role::Backup, cfg.vm.clone(), layout.clone(), instance);
        rcfg.timing = cfg.timing;
        rcfg.inbound_log = cfg.inbound_log.enabled();
        rcfg.side_copy_port = side_copy.as_ref().map(|s| s.port());
        rcfg.output_log = cfg.output_log.enabled();
        Ok(Receiver::new(rcfg))
    };
    let mut receiver = Some(new_receiver()?);
    node.inbound.set_limits(cfg.inbound_log);
    tracing::info!(
        enabled = cfg.inbound_log.enabled(),
        max_frames = cfg.inbound_log.max_frames,
        max_bytes = cfg.inbound_log.max_bytes,
        "backup: inbound log (frames replayed at promotion)"
    );
    node.output.set_limits(cfg.output_log);
    tracing::info!(
        enabled = cfg.output_log.enabled(),
        max_frames = cfg.output_log.max_frames,
        max_bytes = cfg.output_log.max_bytes,
        "backup: output log (output committed here but not yet released by the primary, written at promotion)"
    );
    // Process-death evidence beside each session (transport::liveness): optional, heartbeats
    // still decide when it is missing.
    let lines = match transport::liveness::Listener::bind(cfg.listen).await {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(listen = %cfg.listen, "backup: no liveness listener (tcp): {e}; detection by heartbeats only");
            None
        }
    };
    loop {
        let conn = tokio::select! {
            c = endpoint.accept() => c,
            _ = stop.changed() => break,
        };
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("backup: refused a peer: {}", error_chain(&e));
                lock(&node.status).last_error = Some(error_chain(&e));
                continue;
            }
        };
        let peer = conn.peer_name().map(str::to_string);
        tracing::info!(peer = ?peer, addr = %conn.remote_address(), "backup: primary connected");
        {
            let mut s = lock(&node.status);
            s.connected = true;
            s.primary = peer;
        }
        let line = transport::liveness::Listener::watch_if(lines.as_ref(), &conn);
        tokio::pin!(line);
        let mut line_open = true;
        let mut process_gone = false;
        let deferred = Arc::new(AtomicUsize::new(0));
        // This connection's side-copy key, installed by the log's tap when the session is up.
        let side = side_copy.as_ref().map(|s| (Arc::clone(s), transport::side_copy::SideKey::from_connection(&conn)));
        let mut log = crate::inbound::log_tap(Arc::clone(&node), |n| &n.inbound, |n| &n.inbound_origin, side);
        let mut output = crate::output_log::log_tap(Arc::clone(&node), |n| &n.output, |n| &n.output_origin);
        let mut commit = commit_tap(Arc::clone(&node), cfg.verify, Arc::clone(&deferred));
        let mut session = transport::proto::receiver_session_tapped(
            conn,
            receiver.take().expect("receiver"),
            Box::new(move |r, event| {
                output(r, event).and_then(|event| log(r, event)).and_then(|event| commit(r, event))
            }),
        );
        loop {
            let ev = tokio::select! {
                ev = session.next_event() => ev,
                _ = stop.changed() => break,
                end = &mut line, if line_open => {
                    line_open = false;
                    match end {
                        transport::liveness::End::Bye => continue,
                        transport::liveness::End::Died(why) => {
                            let msg = format!("the primary's process is gone ({why})");
                            tracing::warn!("backup: {msg}");
                            lock(&node.status).last_error = Some(msg);
                            process_gone = true;
                            break;
                        }
                    }
                }
            };
            let Some(ev) = ev else { break };
            match ev {
                ReceiverEvent::Connected { peer } => {
                    // The inbound log saw it first, in the session's task (`inbound::log_tap`).
                    tracing::info!(vm = %peer.vm.name, "backup: session established");
                    // A primary that was reported lost and came back withdraws the takeover
                    // request (a no-op when none is pending).
                    node.report(&cfg, Verdict::Heard, "primary connected".into(), false);
                }
                ReceiverEvent::Checkpoint(cp) => {
                    // Only the checkpoints `commit_tap` left to this task get here: large ones
                    // (a sync round, a baseline), the one that builds the promotion VM, and any
                    // behind one of those (commits stay in epoch order).
                    let epoch = cp.epoch();
                    // Where an ack's time goes (`UNDERSTUDY_LOG=backup::server=debug`, beside the
                    // primary's `primary::link=debug` "acked and released").
                    tracing::debug!(epoch, pages = cp.page_count(), wall_ns = wall_ns(), "checkpoint received");
                    let verify = cfg.verify;
                    let t_commit = Instant::now();
                    let inline = cp.page_count() <= INLINE_COMMIT_PAGES && !node.prepare_pending();
                    let result = if inline {
                        Ok(node.commit(&cp, verify))
                    } else {
                        let node = Arc::clone(&node);
                        tokio::task::spawn_blocking(move || node.commit(&cp, verify)).await
                    };
                    tracing::debug!(epoch, commit_us = t_commit.elapsed().as_micros() as u64, "checkpoint committed");
                    let result = match result {
                        Ok(result) => result,
                        Err(e) => {
                            tracing::error!("backup: commit task failed: {e}");
                            break;
                        }
                    };
                    if session.command(resolve_deferred(Arc::clone(&deferred), epoch, result)).await.is_err() {
                        break;
                    }
                }
                // Taken by `inbound::log_tap` in the session's task: never here.
                ReceiverEvent::Inbound(f) => {
                    node.inbound.push(f);
                }
                ReceiverEvent::InboundCommitted { epoch } => node.inbound.committed(epoch),
                // Taken by `output_log::log_tap` in the session's task: never here.
                ReceiverEvent::Output(o) => node.output.push(o),
                // Migration messages: a primary never sends them (the session refuses them).
                ReceiverEvent::Pages { .. }
                | ReceiverEvent::SwitchOver(_)
                | ReceiverEvent::PageMap(_)
                | ReceiverEvent::Handover { .. } => {}
                ReceiverEvent::Liveness(PeerLiveness::Suspect { silent_ms }) => {
                    tracing::warn!(silent_ms, consistent_epoch = ?node.consistent_epoch(), "backup: primary suspect");
                    node.report(&cfg, Verdict::Suspect, format!("primary silent for {silent_ms} ms"), false);
                }
                ReceiverEvent::Liveness(PeerLiveness::Heard { silent_ms }) => {
                    tracing::info!(silent_ms, "backup: suspect primary heard again");
                    node.report(&cfg, Verdict::Heard, format!("primary heard after {silent_ms} ms"), false);
                }
                ReceiverEvent::Disconnected { error } => {
                    tracing::warn!("backup: primary disconnected: {error}");
                    lock(&node.status).last_error = Some(error.to_string());
                    break;
                }
            }
        }
        lock(&node.status).connected = false;
        if !*stop.borrow() {
            let reason = lock(&node.status).last_error.clone().unwrap_or_else(|| "connection ended".into());
            tracing::warn!(consistent_epoch = ?node.consistent_epoch(), "backup: primary lost: {reason}");
            node.report(&cfg, Verdict::Lost, reason, process_gone);
        }
        match session.finish().await {
            Ok(f) => receiver = Some(f.core.into_endpoint()),
            Err(e) => {
                // A bug in the session (a panic): its receiver is gone with it. Keep serving
                // with a fresh one; the primary's next session is told to send a baseline and
                // re-syncs, while the replica keeps its consistent epoch (rolled back to, if
                // promoted mid-way).
                let msg = format!("session task failed: {}", error_chain(&e));
                tracing::error!(consistent_epoch = ?node.consistent_epoch(), "backup: {msg}; listening on with a fresh receiver");
                {
                    let mut s = lock(&node.status);
                    s.failed_sessions += 1;
                    s.last_error = Some(msg);
                }
                receiver = Some(new_receiver()?);
            }
        }
    }
    endpoint.shutdown().await;
    Ok(())
}

/// A VM identity from its name (the uuid is derived from the name; both sides use the same).
pub fn vm_identity(name: &str) -> VmIdentity {
    let a = crc32fast::hash(name.as_bytes());
    let b = crc32fast::hash(format!("understudy:{name}").as_bytes());
    let c = crc32fast::hash(format!("{name}:vm").as_bytes());
    let d = crc32fast::hash(format!("vm:{name}:uuid").as_bytes());
    let mut uuid = [0u8; 16];
    uuid[0..4].copy_from_slice(&a.to_le_bytes());
    uuid[4..8].copy_from_slice(&b.to_le_bytes());
    uuid[8..12].copy_from_slice(&c.to_le_bytes());
    uuid[12..16].copy_from_slice(&d.to_le_bytes());
    VmIdentity { uuid, name: name.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use replication_proto::{Endpoint, Sender, SenderConfig, SenderEvent};

    const PAGES: u64 = 512;

    struct Rig {
        sender: Sender,
        receiver: Receiver,
        node: Arc<BackupNode>,
        deferred: Arc<AtomicUsize>,
        tap: Tap<Receiver>,
        state: Vec<u8>,
        now: Instant,
    }

    impl Rig {
        fn new() -> Self {
            let layout = [(0u64, PAGES * 4096)];
            let ml = proto_layout(&layout).unwrap();
            let vm = vm_identity("t");
            let mut sender = Sender::new(SenderConfig::new(Role::Primary, vm.clone(), ml.clone(), 1));
            let mut receiver = Receiver::new(ReceiverConfig::new(Role::Backup, vm, ml, 2));
            let node = BackupNode::new(&layout, false).unwrap();
            let deferred = Arc::new(AtomicUsize::new(0));
            let tap = commit_tap(Arc::clone(&node), false, Arc::clone(&deferred));
            let state = {
                let mut st = vmm::state::tests_support::sample_state();
                st.memory = layout.to_vec();
                st.encode().unwrap()
            };
            let now = Instant::now();
            sender.connect(now);
            receiver.connect(now);
            let mut rig = Rig { sender, receiver, node, deferred, tap, state, now };
            rig.pump();
            rig
        }

        fn pump(&mut self) {
            loop {
                let mut moved = false;
                while let Some(t) = self.sender.poll_transmit(self.now) {
                    self.receiver.handle_input(self.now, t.as_slice());
                    moved = true;
                }
                while let Some(t) = self.receiver.poll_transmit(self.now) {
                    self.sender.handle_input(self.now, t.as_slice());
                    moved = true;
                }
                if !moved {
                    break;
                }
            }
        }

        /// Submits a checkpoint of `pages` pages (a baseline first) and delivers it.
        fn submit(&mut self, pages: u64, fill: u8) -> u64 {
            let data: Vec<Vec<u8>> = (0..pages).map(|p| vec![fill.wrapping_add(p as u8) | 1; 4096]).collect();
            let it = data.iter().enumerate().map(|(i, d)| (i as u64, &d[..]));
            let epoch = if self.node.status().committed_epoch.is_none() {
                self.sender.submit_baseline(self.now, it, &self.state).unwrap()
            } else {
                self.sender.submit(self.now, it, &self.state).unwrap()
            };
            self.pump();
            epoch
        }

        /// Polls the receiver's events through the tap, as the session driver does; returns
        /// the checkpoints it passed on to the server's task.
        fn poll(&mut self) -> Vec<replication_proto::Checkpoint> {
            let mut passed = Vec::new();
            while let Some(event) = self.receiver.poll_event() {
                if let Some(ReceiverEvent::Checkpoint(cp)) = (self.tap)(&mut self.receiver, event) {
                    passed.push(cp);
                }
            }
            passed
        }

        /// Epochs the sender saw acknowledged since the last call.
        fn acked(&mut self) -> Vec<u64> {
            self.pump();
            std::iter::from_fn(|| self.sender.poll_event())
                .filter_map(|e| match e {
                    SenderEvent::Acked { epoch, .. } => Some(epoch),
                    _ => None,
                })
                .collect()
        }
    }

    /// A small checkpoint is committed by the tap in the session's task and acknowledged
    /// there, after the commit: nothing reaches the server's task.
    #[test]
    fn a_small_checkpoint_is_committed_and_acknowledged_in_the_session_task() {
        let mut rig = Rig::new();
        let epoch = rig.submit(4, 1);
        assert!(rig.acked().is_empty(), "acknowledged before the receiver handed it over");
        assert!(rig.poll().is_empty(), "a small checkpoint went to the server's task");
        assert_eq!(rig.node.status().committed_epoch, Some(epoch), "not committed");
        assert_eq!(rig.acked(), vec![epoch]);
        assert_eq!(rig.deferred.load(Ordering::SeqCst), 0);
    }

    /// A checkpoint whose commit fails (here: the replica was taken for promotion) is
    /// rejected, never acknowledged; the sender is asked for a baseline.
    #[test]
    fn a_checkpoint_whose_commit_fails_is_not_acknowledged() {
        let mut rig = Rig::new();
        let first = rig.submit(4, 1);
        rig.poll();
        assert_eq!(rig.acked(), vec![first]);
        let _replica = rig.node.take_replica().unwrap();
        let second = rig.submit(4, 2);
        assert!(rig.poll().is_empty());
        rig.pump();
        let events: Vec<SenderEvent> = std::iter::from_fn(|| rig.sender.poll_event()).collect();
        assert!(
            !events.iter().any(|e| matches!(e, SenderEvent::Acked { epoch, .. } if *epoch == second)),
            "a failed commit was acknowledged: {events:?}"
        );
        assert!(events.iter().any(|e| matches!(e, SenderEvent::BaselineRequired { .. })), "{events:?}");
        assert_eq!(rig.node.status().committed_epoch, Some(first));
    }

    /// A large checkpoint goes to the server's task; a small one behind it follows it there
    /// (not committed ahead of it), and once the server's result is back the tap commits inline
    /// again: commits stay in epoch order.
    #[test]
    fn checkpoints_behind_one_left_to_the_server_follow_it() {
        let mut rig = Rig::new();
        let first = rig.submit(4, 1);
        rig.poll();
        assert_eq!(rig.acked(), vec![first]);
        let large = rig.submit(INLINE_COMMIT_PAGES as u64 + 1, 3);
        let small = rig.submit(4, 5);
        let passed = rig.poll();
        assert_eq!(passed.iter().map(|cp| cp.epoch()).collect::<Vec<_>>(), vec![large, small]);
        assert_eq!(rig.deferred.load(Ordering::SeqCst), 2);
        assert_eq!(rig.node.status().committed_epoch, Some(first), "committed ahead of the server's task");
        assert!(rig.acked().is_empty());
        // The server's task commits them in order and hands the results back to the session.
        for cp in passed {
            let result = rig.node.commit(&cp, false);
            let StreamCommand::With(f) = resolve_deferred(Arc::clone(&rig.deferred), cp.epoch(), result) else {
                unreachable!()
            };
            f(&mut rig.receiver, rig.now);
        }
        assert_eq!(rig.deferred.load(Ordering::SeqCst), 0);
        assert_eq!(rig.acked(), vec![large, small]);
        let next = rig.submit(4, 7);
        assert!(rig.poll().is_empty(), "the tap no longer commits inline");
        assert_eq!(rig.node.status().committed_epoch, Some(next));
        assert_eq!(rig.acked(), vec![next]);
    }
}
