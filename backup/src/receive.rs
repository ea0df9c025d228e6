//! The migration destination (`understudy receive`): waits for one migration from the expected
//! source, commits each epoch into a replica exactly as a backup does, and on the source's
//! hand-over gives the replica to its owner, who promotes it (restore, take the network
//! identity, resume); then tells the source the guest runs here (`docs/migration.md`).
//!
//! Peers refused at the handshake (a wrong certificate, garbage) are logged and the destination
//! keeps waiting: an unauthenticated peer cannot end a migration it is not part of. Once the
//! expected source's session started, anything that ends it before the hand-over (a wrong
//! version or memory size, a cancel, a cut link, the source's death) ends the migration: the
//! destination discards what it got and never runs the guest.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replication_proto::{MemoryLayout, Receiver, ReceiverConfig, ReceiverEvent, Role, VmIdentity};
use serde::Serialize;
use transport::session::StreamCommand;
use transport::{Endpoint, Identity, PeerPolicy, Tuning};

use crate::server::{BackupNode, lock};

/// What the destination waits for.
#[derive(Clone)]
pub struct ReceiveConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Our certificates.
    pub identity: Identity,
    /// The certificate name of the only source admitted.
    pub source_name: String,
    /// QUIC tuning.
    pub tuning: Tuning,
    /// The VM.
    pub vm: VmIdentity,
    /// Its memory layout.
    pub layout: MemoryLayout,
    /// Heartbeats and the silence after which the source counts as gone.
    pub timing: replication_proto::Timing,
    /// Record the replica's digest at the switch-over (tests).
    pub verify: bool,
    /// Post-copy: how long to wait for the source to come back after the link broke before the
    /// guest counts as lost.
    pub postcopy_recover: Duration,
}

/// Where a destination stands (for `status`).
#[derive(Debug, Clone, Serialize, Default)]
pub struct ReceiveStatus {
    /// `waiting`, `receiving`, `switch-over`, `resuming`, `running`, `failed`.
    pub phase: String,
    /// The source's certificate name once connected.
    pub source: Option<String>,
    /// Epochs committed.
    pub epochs: u64,
    /// Pages written.
    pub pages: u64,
    /// The switch-over epoch, once announced.
    pub switchover_epoch: Option<u64>,
    /// Peers refused before a session (wrong certificate, garbage).
    pub refused_peers: u64,
    /// The replica's digest at the switch-over (with verify).
    pub memory_digest: Option<String>,
    /// Post-copy: pages not here yet.
    pub postcopy_missing: Option<u64>,
    /// Post-copy: faults that needed a page from the source.
    pub postcopy_faults: u64,
    /// Why it failed, or the last refusal.
    pub error: Option<String>,
}

/// Errors of a destination.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The endpoint could not be set up.
    #[error("listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: Box<transport::EndpointError>,
    },
    /// No random instance number.
    #[error("receiver instance number")]
    Random(#[from] transport::RandomError),
    /// The session with the source ended before the hand-over.
    #[error("the migration ended before the hand-over: {0}; nothing runs here")]
    Ended(String),
    /// The source's process is gone.
    #[error("the source's process is gone ({0}) before the hand-over; nothing runs here")]
    SourceDied(String),
    /// An epoch did not apply.
    #[error("epoch {epoch} did not apply: {why}; nothing runs here")]
    Commit {
        /// The epoch.
        epoch: u64,
        /// Why.
        why: String,
    },
    /// A hand-over that does not match what was received.
    #[error("hand-over at epoch {got}, but {why}; nothing runs here")]
    Handover {
        /// The epoch named.
        got: u64,
        /// What is wrong.
        why: String,
    },
    /// Promoting the replica failed.
    #[error("resume the guest here: {0}")]
    Promote(String),
    /// Asked to stop.
    #[error("stopped before a migration completed")]
    Stopped,
    /// Post-copy could not be set up or a page could not be placed.
    #[error("post-copy: {0}")]
    Postcopy(String),
    /// Post-copy broke off with pages only the source held: the guest is lost.
    #[error("post-copy broke off with {missing} pages still at the source ({why}): the guest is lost")]
    PostcopyLost {
        /// Pages that never arrived.
        missing: u64,
        /// What happened.
        why: String,
    },
}

/// What the owner's promotion reports back (sent to the source in `Resumed`).
pub struct Resumed {
    /// CPU µs this process spent so far, vCPUs left out.
    pub cpu_us: u64,
    /// Peak RSS, bytes.
    pub peak_rss_bytes: u64,
}

/// Where a post-copy destination checkpoints the guest back to (reverse checkpoints,
/// `docs/failure-model.md`): the source, dialed from this destination's own endpoint.
#[derive(Clone)]
pub struct ReverseTo {
    /// The source's address as this destination sees it (its migration endpoint).
    pub addr: SocketAddr,
    /// Its certificate name.
    pub name: String,
    /// The endpoint to dial from: the destination's own, the address the source knows.
    pub endpoint: Endpoint,
    /// Our certificates.
    pub identity: Identity,
    /// Where the reverse series starts ([`replication_proto::migration::reverse_start`]).
    pub start: replication_proto::message::Position,
    /// The VM.
    pub vm: VmIdentity,
    /// Its memory layout.
    pub layout: MemoryLayout,
    /// Heartbeats and the silence after which the source counts as gone.
    pub timing: replication_proto::Timing,
}

/// Runs the staged guest (announce, resume) at the switch-over `epoch`; with reverse
/// checkpoints (`Some`), first starts checkpointing it back to the source with its output held
/// (before it runs at all).
pub type RunHook = Box<dyn FnOnce(u64, Option<ReverseTo>) -> Result<(), String> + Send>;

/// What the owner does with the received guest, each on a blocking thread.
pub struct Hooks {
    /// The switch-over epoch is committed and acknowledged: build the guest from the replica,
    /// **paused** (it must not run, nor announce itself, before the hand-over). Runs while the
    /// acknowledgement travels to the source and its hand-over comes back, so the downtime does
    /// not pay for the restore. A migration that ends before the hand-over drops the built VM.
    pub stage: Box<dyn FnOnce(u64) -> Result<(), String> + Send>,
    /// The source handed over: run the staged guest (announce, resume).
    pub run: RunHook,
    /// Post-copy with reverse checkpoints is over: the source gave its copy up (or its process
    /// is gone): stop the reverse checkpoints and release the held output; the guest runs
    /// here alone from now on. The reason is given.
    pub given_up: Box<dyn FnOnce(String) -> Result<(), String> + Send>,
}

/// Waits for one migration and runs it to the hand-over: `hooks.stage` once the switch-over
/// epoch is committed, `hooks.run` once the source handed over; when that returns `Ok` the guest
/// runs here and the source is told so. Returns the switch-over epoch.
pub async fn receive(
    cfg: ReceiveConfig,
    node: Arc<BackupNode>,
    status: Arc<Mutex<ReceiveStatus>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    hooks: Hooks,
) -> Result<u64, ReceiveError> {
    let Hooks { stage, run, given_up } = hooks;
    let mut stage = Some(stage);
    let mut staged: Option<(u64, tokio::task::JoinHandle<Result<(), String>>)> = None;
    let policy = PeerPolicy::replication().accept_only([cfg.source_name.clone()]);
    let endpoint = Endpoint::bind_with(
        cfg.listen,
        &cfg.identity,
        transport::proto::protocol_versions(),
        cfg.tuning.clone(),
        policy,
    )
    .map_err(|source| ReceiveError::Bind { addr: cfg.listen, source: Box::new(source) })?;
    let set = |f: &dyn Fn(&mut ReceiveStatus)| f(&mut lock(&status));
    set(&|s| s.phase = "waiting".into());
    tracing::info!(listen = %cfg.listen, source = %cfg.source_name, vm = %cfg.vm.name, "destination: waiting for a migration");
    let lines = match transport::liveness::Listener::bind(cfg.listen).await {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!("destination: no liveness listener (tcp): {e}; the source's death is seen by silence only");
            None
        }
    };
    let result = async {
        let conn = loop {
            let c = tokio::select! {
                c = endpoint.accept() => c,
                _ = stop.changed() => return Err(ReceiveError::Stopped),
            };
            match c {
                Ok(c) => break c,
                Err(e) => {
                    let why = transport::error_chain(&e);
                    tracing::warn!("destination: refused a peer: {why}; still waiting for {}", cfg.source_name);
                    set(&|s| {
                        s.refused_peers += 1;
                        s.error = Some(why.clone());
                    });
                }
            }
        };
        let peer = conn.peer_name().map(str::to_string);
        let source_addr = conn.remote_address();
        tracing::info!(peer = ?peer, addr = %source_addr, "destination: source connected");
        set(&|s| {
            s.source = peer.clone();
            s.phase = "receiving".into();
        });
        let mut line: LineWatch<'_> = Box::pin(transport::liveness::Listener::watch_if(lines.as_ref(), &conn));
        let mut line_open = true;
        let mut rcfg = ReceiverConfig::new(Role::MigrationDestination, cfg.vm.clone(), cfg.layout.clone(), transport::random_u64()?);
        rcfg.timing = cfg.timing;
        // The stream is reliable: frames go missing only with a corrupt frame (asked for at
        // once) or a broken connection (which ends a migration). A short stall timer only makes
        // a busy destination ask for multi-MiB epochs still on their way.
        rcfg.resend_timeout = Duration::from_secs(1);
        let slot: crate::postcopy::PlaceSlot = Arc::default();
        let mut session =
            transport::proto::receiver_session_tapped(conn, Receiver::new(rcfg), crate::postcopy::place_tap(&slot));
        let r = async {
        let mut committed = 0u64;
        // The position of the last committed epoch (a reverse series starts from it).
        let mut position: Option<replication_proto::message::Position> = None;
        let mut switch: Option<u64> = None;
        let mut map: Option<MapState> = None;
        let mut early = Early::default();
        let next = loop {
            let ev = tokio::select! {
                ev = session.next_event() => ev,
                _ = stop.changed() => return Err(ReceiveError::Stopped),
                end = &mut line, if line_open => {
                    line_open = false;
                    match end {
                        transport::liveness::End::Bye => continue,
                        transport::liveness::End::Died(why) => return Err(ReceiveError::SourceDied(why.to_string())),
                    }
                }
            };
            let Some(ev) = ev else { return Err(ReceiveError::Ended("the session task ended without a reason".into())) };
            match ev {
                ReceiverEvent::Connected { peer } => {
                    tracing::info!(vm = %peer.vm.name, version = peer.version, "destination: migration session established");
                    // Build the KVM VM now, while the rounds run, not in the downtime (one
                    // vCPU, as the fixture guest and most small VMs; another count is built at
                    // the hand-over).
                    let n2 = Arc::clone(&node);
                    tokio::task::spawn_blocking(move || n2.prepare_now(1));
                }
                ReceiverEvent::Checkpoint(cp) => {
                    let epoch = cp.epoch();
                    let lineage = cp.lineage();
                    let pages = cp.page_count() as u64;
                    let n2 = Arc::clone(&node);
                    let t0 = Instant::now();
                    let r = tokio::task::spawn_blocking(move || n2.commit(&cp, false))
                        .await
                        .map_err(|e| ReceiveError::Commit { epoch, why: format!("commit task: {e}") })?;
                    r.map_err(|why| ReceiveError::Commit { epoch, why })?;
                    tracing::debug!(epoch, pages, ms = t0.elapsed().as_secs_f64() * 1e3, "destination: epoch committed");
                    committed = epoch;
                    position = Some(replication_proto::message::Position { lineage, epoch });
                    set(&|s| {
                        s.epochs += 1;
                        s.pages += pages;
                    });
                    let cmd = StreamCommand::with(move |r: &mut Receiver, now| {
                        if let Err(e) = r.committed(now, epoch) {
                            tracing::error!("destination: committed({epoch}): {e}");
                        }
                    });
                    if session.command(cmd).await.is_err() {
                        return Err(ended(&mut session).await);
                    }
                }
                ReceiverEvent::SwitchOver(sw) if switch.is_some() => {
                    return Err(ReceiveError::Ended(format!("a second switch-over (at {})", sw.epoch)));
                }
                ReceiverEvent::SwitchOver(sw) => {
                    if sw.mode.is_postcopy() {
                        let reverse = sw.mode == replication_proto::migration::SwitchMode::PostCopyReverse;
                        tracing::info!(
                            epoch = sw.epoch,
                            held = sw.held_pages,
                            map_frames = sw.map_frames,
                            reverse,
                            "destination: the source stopped the guest (post-copy switch-over)"
                        );
                        map = Some(MapState { epoch: sw.epoch, frames: sw.map_frames, held: sw.held_pages, runs: Vec::new(), seen: 0, reverse });
                    } else {
                        tracing::info!(epoch = sw.epoch, "destination: the source stopped the guest (switch-over)");
                    }
                    switch = Some(sw.epoch);
                    set(&|s| {
                        s.switchover_epoch = Some(sw.epoch);
                        s.phase = "switch-over".into();
                    });
                }
                ReceiverEvent::Handover { epoch } => {
                    let why = match (switch, &staged) {
                        (None, _) => Some("no switch-over was announced".to_string()),
                        (Some(sw), _) if sw != epoch => Some(format!("the switch-over was at {sw}")),
                        (Some(_), None) => Some(format!("only epoch {committed} is committed")),
                        (Some(_), Some((at, _))) if *at != epoch => Some(format!("the guest was built at epoch {at}")),
                        _ => None,
                    };
                    if let Some(why) = why {
                        return Err(ReceiveError::Handover { got: epoch, why });
                    }
                    break Next::Handover(epoch);
                }
                ReceiverEvent::PageMap(m) => match &mut map {
                    Some(st) => st.add(&m).map_err(ReceiveError::Ended)?,
                    None => return Err(ReceiveError::Ended("a page map without a post-copy switch-over".into())),
                },
                // Pushed pages may overtake the switch-over on their own streams: kept until
                // post-copy starts.
                ReceiverEvent::Pages { pfns, data, .. } => early.keep(pfns, data),
                // A migration destination keeps no inbound log (its receiver does not ask for one).
                ReceiverEvent::Liveness(_)
                | ReceiverEvent::Inbound(_)
                | ReceiverEvent::InboundCommitted { .. }
                | ReceiverEvent::Output(_) => {}
                ReceiverEvent::Disconnected { error } => return Err(ReceiveError::Ended(error.to_string())),
            }
            // Post-copy: the state and the whole map are here.
            if let (Some(sw), Some(st)) = (switch, &map)
                && committed >= sw
                && st.complete()
            {
                if node.consistent_epoch() != Some(sw) {
                    return Err(ReceiveError::Handover {
                        got: sw,
                        why: format!("the replica is consistent at {:?}", node.consistent_epoch()),
                    });
                }
                let st = map.take().expect("checked");
                let reverse_from = if st.reverse { position } else { None };
                if st.reverse && reverse_from.is_none_or(|p| p.epoch != sw) {
                    return Err(ReceiveError::Handover {
                        got: sw,
                        why: format!("the last committed position is {position:?}: no reverse series can start there"),
                    });
                }
                break Next::Postcopy(sw, st.runs, reverse_from);
            }
            // The switch-over epoch committed (its ack is on its way): build the guest, paused.
            if let (Some(sw), true, None, None) = (switch, committed >= switch.unwrap_or(u64::MAX), &staged, &map) {
                if node.consistent_epoch() != Some(sw) {
                    return Err(ReceiveError::Handover {
                        got: sw,
                        why: format!("the replica is consistent at {:?}", node.consistent_epoch()),
                    });
                }
                if cfg.verify {
                    let d = node.replica_digest();
                    set(&|s| s.memory_digest = d.map(|d| format!("{d:016x}")));
                }
                let f = stage.take().expect("staged once");
                staged = Some((sw, tokio::task::spawn_blocking(move || f(sw))));
            }
        };
        let epoch = match next {
            Next::Handover(epoch) => epoch,
            Next::Postcopy(epoch, held, reverse_from) => {
                let hooks = Hooks { stage: stage.take().expect("not staged in post-copy"), run, given_up };
                let pc = PostcopyIo {
                    node: &node,
                    status: &status,
                    stop: &mut stop,
                    line,
                    line_open,
                    endpoint: &endpoint,
                    lines: lines.as_ref(),
                    cfg: &cfg,
                    slot: &slot,
                    source_addr,
                };
                return crate::postcopy::run(pc, &mut session, epoch, held, reverse_from, early, hooks).await;
            }
        };
        // Handed over: the source never resumes. Run the guest here.
        tracing::info!(epoch, "destination: handed over; resuming the guest here");
        set(&|s| s.phase = "resuming".into());
        let (_, built) = staged.take().expect("checked at the hand-over");
        built
            .await
            .map_err(|e| ReceiveError::Promote(format!("restore task: {e}")))?
            .map_err(ReceiveError::Promote)?;
        tokio::task::spawn_blocking(move || run(epoch, None))
            .await
            .map_err(|e| ReceiveError::Promote(format!("resume task: {e}")))?
            .map_err(ReceiveError::Promote)?;
        set(&|s| s.phase = "running".into());
        let r = Resumed {
            cpu_us: vmm::procstat::cpu_ns_excluding_vcpus().unwrap_or(0) / 1000,
            peak_rss_bytes: vmm::procstat::peak_rss_bytes().unwrap_or(0),
        };
        let cmd = StreamCommand::with(move |rc: &mut Receiver, _| {
            if let Err(e) = rc.resumed(epoch, r.cpu_us, r.peak_rss_bytes) {
                tracing::error!("destination: resumed({epoch}): {e}");
            }
        });
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = session.command(StreamCommand::with(move |rc: &mut Receiver, _| {
            let _ = tx.send(rc.stats());
        })).await;
        if let Ok(st) = rx.await {
            tracing::info!(
                checkpoints = st.checkpoints,
                stale_frames = st.stale_frames,
                corrupt_frames = st.corrupt_frames,
                aborted_epochs = st.aborted_epochs,
                resend_requests = st.resend_requests,
                resync_requests = st.resync_requests,
                "destination: receiver counters"
            );
        }
        transport::proto::last_word(&mut session, cmd).await;
            Ok(epoch)
        }
        .await;
        if r.is_err() {
            // Let the session say goodbye and close the connection with its reason before the
            // endpoint goes (the source then learns why, not just that the connection ended).
            let _ = tokio::time::timeout(Duration::from_secs(1), session.finish()).await;
        }
        r
    }
    .await;
    if let Err(e) = &result {
        let why = transport::error_chain(e);
        tracing::error!("destination: {why}");
        set(&|s| {
            s.phase = "failed".into();
            s.error = Some(why.clone());
        });
    }
    let t = Instant::now();
    endpoint.shutdown().await;
    tracing::debug!(ms = t.elapsed().as_millis() as u64, "destination: endpoint shut down");
    result
}

/// How the receiving loop ended.
enum Next {
    /// Pre-copy: the source handed over at this epoch.
    Handover(u64),
    /// Post-copy: the state of this epoch and the map of held pages are here (and, when the
    /// guest is checkpointed back to the source, the switch-over's position).
    Postcopy(u64, Vec<replication_proto::migration::PfnRange>, Option<replication_proto::message::Position>),
}

/// The post-copy map being put together.
pub(crate) struct MapState {
    epoch: u64,
    frames: u32,
    held: u64,
    runs: Vec<replication_proto::migration::PfnRange>,
    seen: u32,
    /// Reverse checkpoints ([`replication_proto::migration::SwitchMode::PostCopyReverse`]).
    reverse: bool,
}

impl MapState {
    fn add(&mut self, m: &replication_proto::migration::PageMap) -> Result<(), String> {
        if m.epoch != self.epoch || m.seq != self.seen || self.seen >= self.frames {
            return Err(format!(
                "page map frame {} of epoch {} out of order (expected frame {} of {} for epoch {})",
                m.seq, m.epoch, self.seen, self.frames, self.epoch
            ));
        }
        self.seen += 1;
        self.runs.extend_from_slice(&m.held);
        let got: u64 = self.runs.iter().map(|r| u64::from(r.count)).sum();
        if self.complete() && got != self.held {
            return Err(format!("the page map holds {got} pages, the switch-over said {}", self.held));
        }
        Ok(())
    }

    fn complete(&self) -> bool {
        self.seen == self.frames
    }
}

/// Pages that arrived before post-copy started, at most [`Early::MAX_BYTES`] (beyond that
/// they are dropped: the guest demands them when it needs them).
#[derive(Default)]
pub(crate) struct Early {
    pub(crate) batches: Vec<(Vec<u64>, Vec<u8>)>,
    bytes: usize,
    pub(crate) dropped: u64,
}

impl Early {
    const MAX_BYTES: usize = 64 << 20;

    fn keep(&mut self, pfns: Vec<u64>, data: Vec<u8>) {
        if self.bytes + data.len() > Self::MAX_BYTES {
            self.dropped += pfns.len() as u64;
            return;
        }
        self.bytes += data.len();
        self.batches.push((pfns, data));
    }
}

/// The watch of a source's liveness line.
pub(crate) type LineWatch<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = transport::liveness::End> + Send + 'a>>;

/// What post-copy borrows from the receiving loop.
pub(crate) struct PostcopyIo<'a> {
    pub(crate) node: &'a Arc<BackupNode>,
    pub(crate) status: &'a Arc<Mutex<ReceiveStatus>>,
    pub(crate) stop: &'a mut tokio::sync::watch::Receiver<bool>,
    pub(crate) line: LineWatch<'a>,
    pub(crate) line_open: bool,
    /// To accept the same source again after a broken link.
    pub(crate) endpoint: &'a Endpoint,
    pub(crate) lines: Option<&'a transport::liveness::Listener>,
    pub(crate) cfg: &'a ReceiveConfig,
    /// Where the sessions' taps place pages once post-copy starts.
    pub(crate) slot: &'a crate::postcopy::PlaceSlot,
    /// The source's address as seen from here (reverse checkpoints dial it).
    pub(crate) source_addr: SocketAddr,
}

/// Why a session whose task ended did: the `Disconnected` event still queued, if any.
pub(crate) async fn ended(session: &mut transport::Session<transport::session::StreamCore<Receiver>>) -> ReceiveError {
    let why = tokio::time::timeout(Duration::from_millis(500), async {
        while let Some(ev) = session.next_event().await {
            if let ReceiverEvent::Disconnected { error } = ev {
                return Some(error.to_string());
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    ReceiveError::Ended(why.unwrap_or_else(|| "the session task ended without a reason".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use replication_proto::migration::{PageMap, PfnRange};

    fn frame(epoch: u64, seq: u32, runs: &[(u64, u32)]) -> PageMap {
        PageMap { epoch, seq, held: runs.iter().map(|&(first, count)| PfnRange { first, count }).collect() }
    }

    /// The post-copy map is taken frame by frame in order, for the announced epoch, and must
    /// add up to the page count the switch-over announced; anything else ends the migration with
    /// an error naming what is wrong.
    #[test]
    fn a_page_map_must_come_in_order_and_add_up() {
        let mut m = MapState { epoch: 7, frames: 2, held: 5, runs: Vec::new(), seen: 0, reverse: false };
        assert!(!m.complete());
        let e = m.add(&frame(7, 1, &[(0, 2)])).unwrap_err();
        assert!(e.contains("out of order") && e.contains("expected frame 0 of 2"), "{e}");
        let e = m.add(&frame(8, 0, &[(0, 2)])).unwrap_err();
        assert!(e.contains("epoch 8") && e.contains("for epoch 7"), "{e}");
        m.add(&frame(7, 0, &[(0, 2)])).unwrap();
        let e = m.add(&frame(7, 1, &[(10, 2)])).unwrap_err();
        assert!(e.contains("holds 4 pages, the switch-over said 5"), "{e}");

        let mut m = MapState { epoch: 7, frames: 1, held: 3, runs: Vec::new(), seen: 0, reverse: false };
        m.add(&frame(7, 0, &[(0, 1), (4, 2)])).unwrap();
        assert!(m.complete());
        assert!(m.add(&frame(7, 1, &[])).unwrap_err().contains("out of order"), "no frame after the last");
    }
}
