//! The link to the backup: a tokio task that connects over QUIC (mutual TLS), runs
//! `replication-proto`'s [`Sender`] on the connection, submits the engine's harvests, and on
//! each acknowledgement releases the held output and tells the engine. It reconnects after a
//! failure; the sender resumes from the backup's committed epoch when it can, otherwise it asks
//! the engine for a new baseline.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replication_proto::{Sender, SenderEvent, SubmitError};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use transport::session::{AbortOnDrop, Session, StreamCommand, StreamCore};
use transport::{Endpoint, Identity, Tuning};

use crate::engine::{Harvest, HarvestKind, LinkShared};
use crate::inbound::{Inbound, InboundItem};
use crate::output::OutputBuffer;
use crate::stats::{ProtectionState, Stats};

/// What ends a reverse series' copy (see [`LinkConfig::fence`]), with the reason.
pub type Fence = Arc<dyn Fn(String) + Send + Sync>;

/// Where the backup is and who we are.
#[derive(Clone)]
pub struct LinkConfig {
    /// The backup's address.
    pub backup: SocketAddr,
    /// The backup's certificate name.
    pub backup_name: String,
    /// Our certificates.
    pub identity: Identity,
    /// Local address to bind (port 0 for any).
    pub bind: SocketAddr,
    /// QUIC tuning.
    pub tuning: Tuning,
    /// Dial from this endpoint instead of binding one at `bind` (a post-copy destination dials
    /// its source back from its own endpoint: the address the source knows it by).
    pub endpoint: Option<Endpoint>,
    /// Hold a liveness line beside each session (a backup serves one on its address; a
    /// migration source does not).
    pub line: bool,
    /// Reverse checkpoints: ends this copy when the peer superseded it (it resumed the guest
    /// from a reverse checkpoint) or the series cannot go on with this peer (a permanent
    /// session error). Harvests are then never dropped while the peer is away (each is needed:
    /// there is no baseline to fall back on); the engine's window bounds them.
    pub fence: Option<Fence>,
    /// Input forwarding: frames delivered to the guest go to the backup's inbound log (if it
    /// keeps one), and each acknowledgement tells it which epoch its replica holds.
    pub inbound: Option<Arc<Inbound>>,
}

impl LinkConfig {
    /// A link to `backup` named `backup_name`, dialing from a fresh endpoint at `bind`, with a
    /// liveness line: protection's link.
    pub fn protection(backup: SocketAddr, backup_name: String, identity: Identity, bind: SocketAddr) -> Self {
        Self {
            backup,
            backup_name,
            identity,
            bind,
            tuning: Tuning::default(),
            endpoint: None,
            line: true,
            fence: None,
            inbound: None,
        }
    }
}

/// A sampled verification point: memory digest and state checksum at a committed epoch.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct VerifyPoint {
    /// Wire epoch.
    pub epoch: u64,
    /// Memory digest.
    pub memory_digest: u64,
    /// crc32 of the encoded `VmState`.
    pub state_crc: u32,
}

/// Verification points recorded by the primary.
pub type Journal = Arc<Mutex<Vec<VerifyPoint>>>;

struct InFlight {
    seq: u64,
    kind: HarvestKind,
}

/// What an acknowledgement needs, shared by the link task and its session's tap: the tap
/// handles each ack in the session's task as the sender decodes it (releases the held output,
/// tells the engine), without an event hop to the link task first (a task wake, up to ~45 µs
/// here when the other core is idle).
struct Acks {
    /// Epochs submitted and not yet acknowledged, across reconnects: a resumed session acks
    /// epochs sent on the previous connection. Entered by the submit itself, in the session's
    /// task, so an entry is always there before its ack.
    in_flight: Mutex<BTreeMap<u64, InFlight>>,
    shared: Arc<LinkShared>,
    output: Option<Arc<OutputBuffer>>,
    stats: Arc<Stats>,
    inbound: Option<Arc<Inbound>>,
}

impl Acks {
    fn in_flight(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, InFlight>> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Epoch `epoch` (harvest `seq`) was submitted; called by the submit itself, in the
    /// session's task, before its ack can be decoded.
    fn submitted(&self, epoch: u64, seq: u64, kind: HarvestKind) {
        self.in_flight().insert(epoch, InFlight { seq, kind });
    }

    /// Queues checkpoint `epoch`'s output (harvest `h`) behind it for the backup's output log.
    fn forward_output(&self, sender: &mut Sender, epoch: u64, h: &Harvest) {
        let n = h.output.len() as u64;
        let r = sender.send_output(epoch, h.seq, &h.output);
        let Some(stats) = self.output.as_ref().map(|o| o.stats()) else { return };
        match r {
            Ok(messages) => {
                stats.forwarded_frames.fetch_add(n, Ordering::Relaxed);
                tracing::debug!(seq = h.seq, epoch, frames = n, messages, "output forwarded behind its checkpoint");
            }
            Err(e) => {
                stats.unforwarded_frames.fetch_add(n, Ordering::Relaxed);
                tracing::debug!(seq = h.seq, epoch, frames = n, "output not forwarded: {e}");
            }
        }
    }

    /// Everything in flight is void: a new baseline replaces it.
    fn clear(&self) {
        self.in_flight().clear();
        self.shared.need_baseline.store(true, Ordering::SeqCst);
        self.shared.reset_in_flight();
    }

    /// The backup committed every epoch up to `epoch`.
    fn acked(&self, sender: &mut Sender, epoch: u64, latency: Option<Duration>) {
        let mut in_flight = self.in_flight();
        let done: Vec<u64> = in_flight.range(..=epoch).map(|(k, _)| *k).collect();
        let mut top: Option<InFlight> = None;
        // Output is released only by the ack of a consistent checkpoint: a sync round's ack
        // proves the backup has pages, not a state it can resume from (its replica is not
        // consistent until the next checkpoint).
        let mut release: Option<u64> = None;
        for k in &done {
            top = in_flight.remove(k);
            if let Some(t) = &top
                && t.kind == HarvestKind::Checkpoint
            {
                release = Some(t.seq);
            }
        }
        drop(in_flight);
        let Some(t) = top else { return };
        if t.kind == HarvestKind::Checkpoint {
            failover::failpoint::hit("primary.acked");
        }
        self.shared.acked(t.seq);
        self.shared.done(done.len());
        if let (Some(o), Some(seq)) = (&self.output, release) {
            let frames = o.release(seq);
            tracing::debug!(
                seq,
                epoch,
                frames,
                latency_us = latency.map(|l| l.as_micros() as u64),
                wall_ns = vmm::devices::virtio::net::wall_ns(),
                "acked and released"
            );
        }
        // Right after the release: the notice tells the backup's inbound log which frames its
        // replica holds, and its output log which epochs' output already left (so a promoted
        // replica does not send them again; one still on its way when the primary dies makes
        // a duplicate). A notice that does not fit now is covered by the next acknowledgement's.
        let inbound = self.inbound.as_ref().is_some_and(|i| i.active());
        if let Some(seq) = release
            && (inbound || sender.peer_keeps_output_log())
        {
            let _ = sender.send_inbound_committed(seq);
        }
        {
            let mut s = self.stats.lock();
            s.last_acked = t.seq;
            s.last_acked_wire_epoch = epoch;
            if let Some(l) = latency {
                s.ack_us.push(l.as_secs_f64() * 1e6);
                s.ack_latency_seconds.observe(l.as_secs_f64());
            }
        }
        if t.kind == HarvestKind::Checkpoint
            && t.seq > self.shared.sync_floor.load(Ordering::SeqCst)
            && self.stats.state() == ProtectionState::Syncing
        {
            self.stats.set_state(ProtectionState::Protected, &format!("backup committed consistent epoch {epoch}"));
        }
    }
}

/// Runs the link until the harvest channel closes.
pub async fn run(
    cfg: LinkConfig,
    mut sender: Sender,
    mut harvests: mpsc::Receiver<Harvest>,
    shared: Arc<LinkShared>,
    output: Option<Arc<OutputBuffer>>,
    stats: Arc<Stats>,
    journal: Journal,
) {
    let versions = transport::proto::protocol_versions();
    let own_endpoint = cfg.endpoint.is_none();
    let endpoint = match cfg
        .endpoint
        .clone()
        .map_or_else(|| Endpoint::bind(cfg.bind, &cfg.identity, versions, cfg.tuning.clone()), Ok)
    {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("link: bind {}: {e}", cfg.bind);
            stats.set_state(ProtectionState::Degraded, &format!("cannot bind {}: {e}", cfg.bind));
            return;
        }
    };
    let reverse = cfg.fence.is_some();
    // Input forwarding runs in its own task, so a frame never waits while this loop is busy
    // (submitting a checkpoint waits for the session to encode it): it hands each batch
    // straight to the session current in `forward_to`.
    let (forward_to, forward_rx) = watch::channel(None);
    let _forwarder = match (&cfg.inbound, cfg.inbound.as_ref().and_then(|i| i.take_receiver())) {
        (Some(i), Some(rx)) => Some(AbortOnDrop(tokio::spawn(forward_task(rx, Arc::clone(i), forward_rx)))),
        _ => None,
    };
    let mut pending: Option<Harvest> = None;
    let mut away = Away::default();
    let mut backoff = Duration::from_millis(20);
    let acks = Arc::new(Acks {
        in_flight: Mutex::new(BTreeMap::new()),
        shared: Arc::clone(&shared),
        output,
        stats: Arc::clone(&stats),
        inbound: cfg.inbound.clone(),
    });
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let conn = match endpoint.connect(cfg.backup, &cfg.backup_name).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("link: connect to backup {} ({}): {e}", cfg.backup, cfg.backup_name);
                shared.up.store(false, Ordering::SeqCst);
                shared.wake();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                // Keep the engine from blocking on a full channel while we are away. A dropped
                // harvest's pages would never reach the replica: force a new baseline.
                if !reverse {
                    let dropped;
                    (pending, dropped) = away.drain(&mut harvests, pending.take());
                    if dropped > 0 {
                        tracing::warn!(dropped, "link: harvests dropped while disconnected: a new baseline is needed");
                        acks.clear();
                    }
                }
                continue;
            }
        };
        backoff = Duration::from_millis(20);
        // This connection's side-copy key (both ends derive it from its TLS session); used if
        // the backup announces a side-copy port.
        let side_key = transport::side_copy::SideKey::from_connection(&conn);
        let remote = conn.remote_address();
        // Process-death evidence beside the session (transport::liveness).
        let mut line: std::pin::Pin<Box<dyn std::future::Future<Output = transport::liveness::End> + Send>> =
            if cfg.line {
                Box::pin(transport::liveness::hold(cfg.backup, &conn))
            } else {
                Box::pin(std::future::pending())
            };
        let mut line_open = cfg.line;
        let tap_acks = Arc::clone(&acks);
        let tap: transport::session::Tap<Sender> = Box::new(move |ep, event| {
            if let SenderEvent::Acked { epoch, latency } = &event {
                tap_acks.acked(ep, *epoch, *latency);
            }
            // The link task still sees it (its fault point).
            Some(event)
        });
        let mut session = transport::proto::sender_session_tapped(conn, sender, tap);
        forward_to.send_replace(Some(session.command_sender()));
        let mut closed = false;
        loop {
            tokio::select! {
                end = &mut line, if line_open => {
                    line_open = false;
                    if let transport::liveness::End::Died(why) = end {
                        tracing::warn!("link: the backup's process is gone ({why})");
                        shared.backup_dead.store(true, Ordering::SeqCst);
                        break;
                    }
                }
                h = async { match pending.take() { Some(h) => Some(h), None => harvests.recv().await } } => {
                    let Some(h) = h else { closed = true; break };
                    if !away.admit(h.kind) {
                        // The engine took it before it saw the drop: it lacks the dropped
                        // harvests' pages, so it must not reach the replica (a checkpoint would
                        // be committed as consistent without them).
                        tracing::debug!(seq = h.seq, kind = ?h.kind, "link: harvest taken after a drop, before the new baseline: dropped");
                        shared.done(1);
                        continue;
                    }
                    tracing::debug!(seq = h.seq, wall_ns = vmm::devices::virtio::net::wall_ns(), "harvest taken by the link");
                    match submit(&session, &acks, h).await {
                        Ok((epoch, encoded, h)) => {
                            if let Some(d) = h.digest {
                                journal.lock().unwrap_or_else(|e| e.into_inner()).push(VerifyPoint {
                                    epoch, memory_digest: d, state_crc: crc32(&h.state),
                                });
                            }
                            if h.kind == HarvestKind::Checkpoint {
                                failover::failpoint::hit("primary.shipped");
                            }
                            {
                                let mut s = stats.lock();
                                // Encoded bytes (what the sender framed for the wire), and the raw
                                // harvest beside them.
                                let raw = h.data.len() as u64 + h.state.len() as u64;
                                s.bytes_sent += encoded;
                                s.raw_bytes_sent += raw;
                                s.wire_bytes.push(encoded as f64);
                                s.raw_bytes.push(raw as f64);
                            }
                            // The sender encoded the pages: their buffer may serve a later epoch.
                            shared.recycle_harvest(h.kind, h.data);
                        }
                        Err(SubmitOutcome::Retry(h)) => { pending = Some(h); tokio::time::sleep(Duration::from_millis(1)).await; }
                        Err(SubmitOutcome::Baseline(seq)) if seq < shared.sync_floor.load(Ordering::SeqCst) => {
                            // Taken before the re-sync the engine already started: its baseline
                            // replaces it.
                            tracing::debug!(seq, "link: stale harvest dropped, a new baseline is on its way");
                            shared.done(1);
                        }
                        Err(SubmitOutcome::Baseline(_)) => acks.clear(),
                        Err(SubmitOutcome::Dropped(why)) => {
                            tracing::error!("link: harvest dropped: {why}");
                            shared.done(1);
                        }
                        Err(SubmitOutcome::Gone) => break,
                    }
                }
                ev = session.next_event() => {
                    let Some(ev) = ev else { break };
                    match ev {
                        SenderEvent::Connected { resumed_from, peer } => {
                            tracing::info!(?resumed_from, backup = %cfg.backup, "link: session established");
                            if let Some(i) = &cfg.inbound {
                                if peer.inbound_log {
                                    tracing::info!("link: the backup keeps an inbound log: frames delivered to the guest are forwarded for replay at promotion");
                                } else {
                                    tracing::warn!("link: the backup keeps no inbound log (an older build): no input replay at promotion; clients resend what a failover loses");
                                }
                                i.set_active(peer.inbound_log);
                                i.set_side_channel(side_channel(peer.inbound_log, peer.side_copy_port, remote, side_key.as_ref()));
                            }
                            if peer.output_log {
                                tracing::info!("link: the backup keeps an output log: each checkpoint's output follows it, for the backup to send at promotion if this primary dies before releasing it");
                            } else {
                                tracing::info!("link: the backup keeps no output log (an older build, or turned off): output committed but not yet released when this primary dies waits for the promoted guest's retransmission");
                            }
                            shared.forward_output.store(peer.output_log, Ordering::SeqCst);
                            shared.backup_dead.store(false, Ordering::SeqCst);
                            shared.up.store(true, Ordering::SeqCst);
                            shared.wake();
                        }
                        // Handled in the session's task as it was decoded (`Acks::acked`).
                        SenderEvent::Acked { .. } => {
                            if failover::failpoint::fires("primary.link-panic") {
                                panic!("fault point primary.link-panic");
                            }
                        }
                        SenderEvent::BaselineRequired { reason } => {
                            tracing::warn!(?reason, "link: backup needs a baseline");
                            if !matches!(reason, replication_proto::BaselineReason::Initial) {
                                acks.clear();
                            }
                        }
                        // Migration messages: a backup never sends them (the session refuses them).
                        SenderEvent::PagesRequested { .. }
                        | SenderEvent::Resumed(_)
                        | SenderEvent::Complete { .. }
                        | SenderEvent::PushRoom { .. }
                        | SenderEvent::PageMap(_) => {}
                        SenderEvent::Disconnected { error } => {
                            tracing::warn!("link: disconnected from backup: {error}");
                            if let Some(fence) = &cfg.fence && error.is_permanent() {
                                fence(match &error {
                                    replication_proto::SessionError::PeerGoodbye {
                                        reason: replication_proto::GoodbyeReason::Superseded,
                                        detail,
                                    } => detail.clone(),
                                    e => format!("the reverse session cannot go on: {e}"),
                                });
                                closed = true;
                            }
                            break;
                        }
                    }
                }
            }
        }
        shared.up.store(false, Ordering::SeqCst);
        shared.forward_output.store(false, Ordering::SeqCst);
        forward_to.send_replace(None);
        if let Some(i) = &cfg.inbound {
            i.set_active(false);
            i.set_side_channel(None);
        }
        shared.wake();
        match session.finish().await {
            Ok(f) => sender = f.core.into_endpoint(),
            Err(e) => {
                tracing::error!("link: session task failed: {e}");
                return;
            }
        }
        if closed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if own_endpoint {
        endpoint.shutdown().await;
    }
}

/// The side channel of a session whose backup keeps a log at `inbound_log` and announced `port`:
/// datagrams to that port at the connection's remote address, sealed under the connection's
/// key (a new key and counter per connection). `None` (said once per session) without a port
/// (an older backup, or one started with `--no-side-copy`) or when the socket cannot be made.
fn side_channel(
    inbound_log: bool,
    port: Option<u16>,
    remote: SocketAddr,
    key: Option<&transport::side_copy::SideKey>,
) -> Option<transport::side_copy::SideSender> {
    if !inbound_log {
        return None;
    }
    let Some(port) = port else {
        tracing::info!("link: the backup announced no side-copy port: frames reach its log by the session only");
        return None;
    };
    let to = SocketAddr::new(remote.ip(), port);
    let Some(key) = key else {
        tracing::warn!(%to, "link: no side-copy key (the connection closed): no side copies this session");
        return None;
    };
    match transport::side_copy::SideSender::connect(to, key) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(%to, "link: {}: no side copies this session", transport::error_chain(&e));
            None
        }
    }
}

/// The harvests the link takes while it cannot send (its connect failed).
#[derive(Debug, Default)]
struct Away {
    /// Harvests were dropped: every harvest after them lacks their pages, so none may reach
    /// the sender until the baseline that replaces them.
    awaiting_baseline: bool,
}

impl Away {
    /// Takes everything queued behind `pending`: the one harvest left is kept for the next
    /// session if it was the only one; more means some must be dropped, and then all of them
    /// are (with the series: a new baseline is needed). Returns the harvest to keep and how
    /// many were dropped.
    fn drain(&mut self, harvests: &mut mpsc::Receiver<Harvest>, pending: Option<Harvest>) -> (Option<Harvest>, usize) {
        let mut kept = pending.filter(|h| self.admit(h.kind));
        let mut dropped = 0;
        while let Ok(h) = harvests.try_recv() {
            if !self.admit(h.kind) {
                continue;
            }
            if kept.replace(h).is_some() {
                dropped += 1;
            }
        }
        if dropped > 0 {
            // The kept one is newer than the dropped: it goes too.
            dropped += usize::from(kept.take().is_some());
            self.awaiting_baseline = true;
        }
        (kept, dropped)
    }

    /// Whether a harvest of `kind` may go to the sender: after a drop, only the baseline that
    /// starts the new series (and everything after it).
    fn admit(&mut self, kind: HarvestKind) -> bool {
        if kind == HarvestKind::Baseline {
            self.awaiting_baseline = false;
        }
        !self.awaiting_baseline
    }
}

/// Most inbound frames handed to the session in one command.
const INBOUND_BATCH: usize = 64;

/// The session input forwarding hands frames to (`None` between sessions).
type ForwardTo = Option<mpsc::Sender<StreamCommand<Sender>>>;

/// Input forwarding's task: takes delivered frames off the queue as they come and hands them,
/// in batches, to the current session; between sessions they are refused (and counted).
async fn forward_task(mut rx: mpsc::Receiver<InboundItem>, inbound: Arc<Inbound>, to: watch::Receiver<ForwardTo>) {
    while let Some(item) = rx.recv().await {
        let mut batch = vec![item];
        while batch.len() < INBOUND_BATCH
            && let Ok(i) = rx.try_recv()
        {
            batch.push(i);
        }
        let session = to.borrow().clone();
        match session {
            Some(commands) => forward_inbound(&commands, &inbound, batch),
            None => {
                inbound.stats().refused.fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
        }
    }
}

/// Hands a batch of delivered frames to the session (counted as forwarded or refused). Never
/// waits: input must not queue up behind a session that is behind (a frame late to the log is
/// as good as lost), so a batch that does not fit in the command channel now is dropped and
/// counted as refused.
fn forward_inbound(commands: &mpsc::Sender<StreamCommand<Sender>>, inbound: &Arc<Inbound>, batch: Vec<InboundItem>) {
    let n = batch.len() as u64;
    if failover::failpoint::fires_from("primary.inbound-stream-off") {
        // Tests: the frames reach the log by their side copies only.
        inbound.stats().refused.fetch_add(n, Ordering::Relaxed);
        return;
    }
    let owned = Arc::clone(inbound);
    let cmd = StreamCommand::with(move |ep: &mut Sender, _now: Instant| {
        let stats = owned.stats();
        for item in batch {
            match ep.send_inbound(item.epoch, item.seq, &item.frame) {
                Ok(()) => {
                    tracing::debug!(
                        seq = item.seq,
                        epoch = item.epoch,
                        wall_ns = vmm::devices::virtio::net::wall_ns(),
                        "inbound frame handed to the sender"
                    );
                    stats.forwarded.fetch_add(1, Ordering::Relaxed)
                }
                Err(e) => {
                    tracing::debug!(seq = item.seq, "link: inbound frame not forwarded: {e}");
                    stats.refused.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
    });
    if commands.try_send(cmd).is_err() {
        inbound.stats().refused.fetch_add(n, Ordering::Relaxed);
    }
}

enum SubmitOutcome {
    Retry(Harvest),
    /// The sender needs a baseline; the refused harvest's sequence.
    Baseline(u64),
    Dropped(String),
    Gone,
}

/// Submits a harvest; on success, its epoch and its encoded bytes.
async fn submit(
    session: &Session<StreamCore<Sender>>,
    acks: &Arc<Acks>,
    h: Harvest,
) -> Result<(u64, u64, Harvest), SubmitOutcome> {
    let (tx, rx) = oneshot::channel();
    let acks = Arc::clone(acks);
    let cmd = StreamCommand::with(move |ep: &mut Sender, now: Instant| {
        let before = ep.stats().epoch_bytes;
        let r = if h.kind == HarvestKind::Baseline {
            ep.submit_baseline(now, h.pages(), &h.state)
        } else {
            ep.submit(now, h.pages(), &h.state)
        };
        let encoded = ep.stats().epoch_bytes - before;
        tracing::debug!(seq = h.seq, encoded, wall_ns = vmm::devices::virtio::net::wall_ns(), "harvest encoded");
        if let Ok(epoch) = &r {
            // Here, not in the link task: the ack may be decoded before the link task runs again.
            acks.submitted(*epoch, h.seq, h.kind);
            if !h.output.is_empty() {
                acks.forward_output(ep, *epoch, &h);
            }
        }
        let _ = tx.send((r.map(|e| (e, encoded)), h));
    });
    if session.command(cmd).await.is_err() {
        return Err(SubmitOutcome::Gone);
    }
    match rx.await {
        Ok((Ok((epoch, encoded)), h)) => Ok((epoch, encoded, h)),
        Ok((Err(SubmitError::WindowFull { .. } | SubmitError::RetainedFull { .. }), h)) => Err(SubmitOutcome::Retry(h)),
        Ok((Err(SubmitError::BaselineRequired { .. }), h)) if h.kind != HarvestKind::Baseline => {
            Err(SubmitOutcome::Baseline(h.seq))
        }
        Ok((Err(e), _)) => Err(SubmitOutcome::Dropped(e.to_string())),
        Err(_) => Err(SubmitOutcome::Gone),
    }
}

fn crc32(b: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(b);
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use replication_proto::{MemoryLayout, Role, SenderConfig, VmIdentity};

    fn harvest(seq: u64, kind: HarvestKind) -> Harvest {
        let (pfns, data, state, digest, output) = (Vec::new(), Vec::new(), Vec::new(), None, Vec::new());
        Harvest { seq, kind, pfns, data, state, digest, taken_at: std::time::Instant::now(), output }
    }

    /// While the link is away, one queued harvest is kept for the next session; more are all
    /// dropped, and then no harvest reaches the sender until the engine's new baseline: a
    /// checkpoint the engine took after the drop (before it saw it) lacks the dropped pages and
    /// would be committed as consistent without them.
    #[test]
    fn after_a_drop_only_the_new_baseline_and_what_follows_reach_the_sender() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut away = Away::default();
        // One harvest: kept.
        tx.try_send(harvest(1, HarvestKind::Checkpoint)).unwrap();
        let (kept, dropped) = away.drain(&mut rx, None);
        assert_eq!((kept.as_ref().map(|h| h.seq), dropped), (Some(1), 0));
        // It and two more: all three dropped, nothing kept.
        tx.try_send(harvest(2, HarvestKind::Checkpoint)).unwrap();
        tx.try_send(harvest(3, HarvestKind::Checkpoint)).unwrap();
        let (kept, dropped) = away.drain(&mut rx, kept);
        assert_eq!((kept.is_none(), dropped), (true, 3));
        // Taken later, before the engine saw the drop: a checkpoint and a sync piece are stale.
        assert!(!away.admit(HarvestKind::Checkpoint));
        assert!(!away.admit(HarvestKind::Precopy));
        // Also when queued while still away.
        tx.try_send(harvest(4, HarvestKind::Checkpoint)).unwrap();
        assert_eq!(away.drain(&mut rx, None).0.map(|h| h.seq), None);
        // The baseline starts the new series; what follows it goes again.
        assert!(away.admit(HarvestKind::Baseline));
        assert!(away.admit(HarvestKind::Precopy));
        assert!(away.admit(HarvestKind::Checkpoint));
        // A baseline queued behind stale harvests while away is kept.
        let mut away = Away { awaiting_baseline: true };
        tx.try_send(harvest(5, HarvestKind::Checkpoint)).unwrap();
        tx.try_send(harvest(6, HarvestKind::Baseline)).unwrap();
        let (kept, dropped) = away.drain(&mut rx, None);
        assert_eq!((kept.map(|h| h.seq), dropped), (Some(6), 0));
    }

    /// Only a checkpoint's page buffer goes back to the pool the pause copies into: a sync
    /// piece's (up to 16 MiB, allocated for a whole piece, partly written) would make a later
    /// pause fault on memory never touched. The goals bench found it: the pause p99 at ~1,000
    /// pages went from ~0.55 ms to 1.3-4.0 ms when sync pieces were recycled.
    #[test]
    fn only_a_checkpoints_buffer_serves_a_later_pause() {
        let shared = LinkShared::default();
        let mut piece = Vec::with_capacity(16 << 20);
        piece.resize(4096, 1);
        shared.recycle_harvest(HarvestKind::Baseline, piece.clone());
        shared.recycle_harvest(HarvestKind::Precopy, piece);
        assert_eq!(shared.buffer(4096).0.capacity(), 4096, "a sync piece's buffer was kept");
        let mut checkpoint = Vec::with_capacity(8192);
        checkpoint.resize(8192, 1);
        shared.recycle_harvest(HarvestKind::Checkpoint, checkpoint);
        let (buf, warm) = shared.buffer(8192);
        assert!(warm && buf.is_empty() && buf.capacity() >= 8192);
    }

    /// The session's tap settles an ack on its own, from the entry the submit made in the same
    /// task: the engine learns the acknowledged harvest, its in-flight count drops, and only a
    /// consistent checkpoint's ack (not a sync round's) makes the state `protected`.
    #[test]
    fn an_ack_is_settled_in_the_session_task_from_the_submits_entry() {
        let shared = Arc::new(LinkShared::default());
        let stats = Arc::new(Stats::new("backup".into()));
        stats.set_state(ProtectionState::Syncing, "test");
        let acks = Acks {
            in_flight: Mutex::new(BTreeMap::new()),
            shared: Arc::clone(&shared),
            output: None,
            stats: Arc::clone(&stats),
            inbound: None,
        };
        let vm = VmIdentity { uuid: [1; 16], name: "t".into() };
        let mut sender = Sender::new(SenderConfig::new(Role::Primary, vm, MemoryLayout::flat(4096, 16 * 4096), 1));
        acks.submitted(1, 10, HarvestKind::Baseline);
        acks.submitted(2, 11, HarvestKind::Precopy);
        acks.submitted(3, 12, HarvestKind::Checkpoint);
        acks.acked(&mut sender, 2, None);
        assert_eq!(*shared.acked_seq.lock().unwrap(), 11);
        assert_eq!(stats.state(), ProtectionState::Syncing, "a sync round's ack made the replica consistent");
        acks.acked(&mut sender, 3, Some(Duration::from_micros(500)));
        assert_eq!(*shared.acked_seq.lock().unwrap(), 12);
        assert_eq!(stats.state(), ProtectionState::Protected);
        assert_eq!(stats.lock().last_acked_wire_epoch, 3);
        assert!(acks.in_flight().is_empty());
        // An ack for nothing in flight (a duplicate) changes nothing.
        acks.acked(&mut sender, 3, None);
        assert_eq!(*shared.acked_seq.lock().unwrap(), 12);
    }
}
