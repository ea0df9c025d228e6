//! Post-copy at the destination (`docs/migration.md`, "Post-copy and hybrid").
//!
//! The state of the switch-over epoch and the map of the pages held are here: the replica's
//! memory is registered with userfaultfd (every page not held dropped, so stale pre-copy content
//! is never read), the guest is built from the replica and resumed at once, and from then on a
//! fault anywhere (a vCPU, a device, the VMM) waits for its page. The fault thread asks the
//! source for missing pages on the control stream; answers and the source's background pushes
//! (bulk streams) are placed with UFFDIO_COPY while still missing, never over what the guest
//! wrote since. When every page is here, userfaultfd lets go and the source is told
//! (`Complete`, with the fault numbers for its report).
//!
//! A link that breaks, or a source that dies, before every page is here loses the guest: its
//! missing pages exist nowhere else (reverse checkpoints, issue 15, close this). The guest's
//! vCPUs then wait on their faults; the process fails with the reason.

use std::sync::Arc;
use std::time::{Duration, Instant};

use replication_proto::limits::MAX_REQUEST_PAGES;
use replication_proto::migration::{Complete, PfnRange};
use replication_proto::{Receiver, ReceiverConfig, ReceiverEvent, Role};
use transport::Session;
use transport::session::{StreamCommand, StreamCore};
use vmm::memory::PAGE_SIZE;
use vmm::postcopy::{Postcopy, Via};

use crate::receive::{Early, Hooks, PostcopyIo, ReceiveError};
use crate::server::lock;

/// Pages asked for after a faulting one, if missing (the guest often walks on).
const PREFETCH: usize = 7;

type RxSession = Session<StreamCore<Receiver>>;

/// Where arriving pages go once post-copy started: answers are placed at once in the session's
/// own task (a vCPU waits on them), pushes are handed to a placer thread, so neither waits for
/// the receiving loop nor answers behind pushes.
pub(crate) struct Placing {
    pc: Arc<Postcopy>,
    pushes: std::sync::mpsc::SyncSender<(Vec<u64>, Vec<u8>)>,
    /// Signalled after each placement (the loop then checks for completion and errors).
    done: Arc<tokio::sync::Notify>,
    error: Arc<std::sync::Mutex<Option<String>>>,
}

/// Set when post-copy starts; every session of the migration taps it ([`place_tap`]).
pub(crate) type PlaceSlot = Arc<std::sync::OnceLock<Placing>>;

impl Placing {
    fn fail(&self, e: &ReceiveError) {
        lock(&self.error).get_or_insert_with(|| transport::error_chain(e));
        self.done.notify_one();
    }

    fn take(&self, id: u64, pfns: Vec<u64>, data: Vec<u8>) {
        if self.pc.is_complete() {
            return;
        }
        if id != 0 {
            match place(&self.pc, &pfns, &data, Via::Demand) {
                Ok(_) => self.done.notify_one(),
                Err(e) => self.fail(&e),
            }
            return;
        }
        match self.pushes.try_send((pfns, data)) {
            Ok(()) => {}
            // The placer is 64 batches behind: place here.
            Err(std::sync::mpsc::TrySendError::Full((pfns, data))) => match place(&self.pc, &pfns, &data, Via::Push) {
                Ok(_) => self.done.notify_one(),
                Err(e) => self.fail(&e),
            },
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {}
        }
    }
}

/// The destination session's tap: once post-copy started, pages go to [`Placing`] and never
/// reach the receiving loop; before, everything passes.
pub(crate) fn place_tap(slot: &PlaceSlot) -> transport::session::Tap<Receiver> {
    let slot = Arc::clone(slot);
    Box::new(move |_: &mut Receiver, ev: ReceiverEvent| match (ev, slot.get()) {
        (ReceiverEvent::Pages { id, pfns, data }, Some(p)) => {
            p.take(id, pfns, data);
            None
        }
        (ev, _) => Some(ev),
    })
}

/// The placer thread (pushed pages).
struct Placer {
    thread: Option<std::thread::JoinHandle<()>>,
    done: Arc<tokio::sync::Notify>,
    error: Arc<std::sync::Mutex<Option<String>>>,
}

impl Placer {
    /// Starts the thread and opens `slot` to the sessions' taps.
    fn start(pc: Arc<Postcopy>, slot: &PlaceSlot) -> Result<Self, ReceiveError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(Vec<u64>, Vec<u8>)>(64);
        let error = Arc::new(std::sync::Mutex::new(None));
        let done = Arc::new(tokio::sync::Notify::new());
        let (e2, d2, pc2) = (Arc::clone(&error), Arc::clone(&done), Arc::clone(&pc));
        let thread = std::thread::Builder::new()
            .name("postcopy-place".into())
            .spawn(move || {
                while let Ok((pfns, data)) = rx.recv() {
                    if pc2.is_complete() {
                        continue;
                    }
                    if let Err(e) = place(&pc2, &pfns, &data, Via::Push) {
                        lock(&e2).get_or_insert_with(|| transport::error_chain(&e));
                    }
                    d2.notify_one();
                }
            })
            .map_err(|e| ReceiveError::Postcopy(format!("placer thread: {e}")))?;
        let placing = Placing { pc, pushes: tx, done: Arc::clone(&done), error: Arc::clone(&error) };
        if slot.set(placing).is_err() {
            return Err(ReceiveError::Postcopy("post-copy started twice".into()));
        }
        Ok(Self { thread: Some(thread), done, error })
    }

    fn error(&self) -> Option<ReceiveError> {
        lock(&self.error).clone().map(ReceiveError::Postcopy)
    }
}

impl Drop for Placer {
    fn drop(&mut self) {
        // The thread ends when the last sender goes (the slot's, with the sessions): detach it.
        drop(self.thread.take());
    }
}

/// Places `pfns` (ascending, with their pages in `data`) as runs; returns pages placed.
fn place(pc: &Postcopy, pfns: &[u64], data: &[u8], via: Via) -> Result<u64, ReceiveError> {
    let mut placed = 0;
    let mut i = 0;
    while i < pfns.len() {
        let mut j = i + 1;
        while j < pfns.len() && pfns[j] == pfns[j - 1] + 1 {
            j += 1;
        }
        placed += pc
            .place_run(pfns[i], &data[i * PAGE_SIZE..j * PAGE_SIZE], via)
            .map_err(|e| ReceiveError::Postcopy(transport::error_chain(&e)))?;
        i = j;
    }
    Ok(placed)
}

/// Runs post-copy from the switch-over at `epoch`: registers memory, builds and resumes the guest,
/// places pages until every one is here, tells the source. Returns `epoch`.
pub(crate) async fn run(
    io: PostcopyIo<'_>,
    session: &mut RxSession,
    epoch: u64,
    held: Vec<PfnRange>,
    reverse: bool,
    early: Early,
    hooks: Hooks,
) -> Result<u64, ReceiveError> {
    let PostcopyIo { node, status, stop, mut line, mut line_open, endpoint, lines, cfg, slot, source_addr } = io;
    let set = |f: &dyn Fn(&mut crate::receive::ReceiveStatus)| f(&mut lock(status));
    let t0 = Instant::now();
    set(&|s| s.phase = "postcopy".into());
    let mem = node.replica_memory().ok_or_else(|| ReceiveError::Postcopy("the replica is gone".into()))?;
    let held_runs: Vec<(u64, u32)> = held.iter().map(|r| (r.first, r.count)).collect();
    // The fault thread's way to the session (swapped when the source reconnects).
    let commands = Arc::new(std::sync::Mutex::new(session.command_sender()));
    let tx_slot = Arc::clone(&commands);
    let fetch = Box::new(move |pfns: Vec<u64>| {
        let tx = lock(&tx_slot).clone();
        let cmd = StreamCommand::with(move |r: &mut Receiver, _| {
            for c in pfns.chunks(MAX_REQUEST_PAGES) {
                if let Err(e) = r.request_pages(c) {
                    tracing::warn!("post-copy: page request not sent: {e}");
                }
            }
        });
        if tx.blocking_send(cmd).is_err() {
            tracing::debug!("post-copy: the session is gone; page request dropped");
        }
    });
    let verify = cfg.verify;
    let pc = tokio::task::spawn_blocking(move || Postcopy::start_verified(&mem, &held_runs, PREFETCH, fetch, verify))
        .await
        .map_err(|e| ReceiveError::Postcopy(format!("userfaultfd task: {e}")))?
        .map_err(|e| ReceiveError::Postcopy(transport::error_chain(&e)))?;
    let missing0 = pc.missing();
    tracing::info!(
        epoch,
        missing = missing0,
        held = held.iter().map(|r| u64::from(r.count)).sum::<u64>(),
        early = early.batches.len(),
        early_dropped = early.dropped,
        ms = t0.elapsed().as_secs_f64() * 1e3,
        "destination: post-copy memory registered; resuming the guest"
    );
    for (pfns, data) in &early.batches {
        place(&pc, pfns, data, Via::Push)?;
    }
    let placer = Placer::start(Arc::clone(&pc), slot)?;
    let reverse_to = if reverse { Some(reverse_to(session, cfg, endpoint, source_addr).await?) } else { None };
    let Hooks { stage, run, given_up } = hooks;
    let mut reverse_to = reverse_to;
    // Build (paused), then run: on blocking threads, while pages keep being placed here (a
    // restore that touches a missing page waits for it like anyone).
    let mut building = Some(tokio::task::spawn_blocking(move || stage(epoch)));
    let mut running: Option<tokio::task::JoinHandle<Result<(), String>>> = None;
    let mut run = Some(run);
    let mut resumed = false;
    let mut resumed_at = None;
    let mut last_status = Instant::now();
    // Set while the link is down: until when the source may come back.
    let mut down_until: Option<Instant> = None;
    let mut stop_open = true;
    let mut reconnects = 0u32;
    let result = loop {
        if resumed && pc.is_complete() {
            break Ok(());
        }
        if last_status.elapsed() >= Duration::from_millis(50) {
            last_status = Instant::now();
            let st = pc.stats();
            set(&|s| {
                s.postcopy_missing = Some(st.missing);
                s.postcopy_faults = st.faults;
            });
        }
        tokio::select! {
            ev = session.next_event(), if down_until.is_none() => match ev {
                None => {
                    down_until.get_or_insert(Instant::now() + cfg.postcopy_recover);
                }
                // (Pages arrive here only if the tap let them through: it does not once the slot
                // is set, which it is from here.)
                Some(ReceiverEvent::Pages { pfns, data, .. }) => {
                    place(&pc, &pfns, &data, Via::Demand)?;
                }
                Some(ReceiverEvent::Connected { .. }) if reconnects > 0 => {
                    // The source is back: tell it what is here, ask again for what was asked
                    // and never came, and say again that the guest runs (if it does).
                    let runs: Vec<PfnRange> =
                        pc.present_runs().into_iter().map(|(first, count)| PfnRange { first, count }).collect();
                    let again = pc.rerequest();
                    let (cpu_us, rss) = (
                        vmm::procstat::cpu_ns_excluding_vcpus().unwrap_or(0) / 1000,
                        vmm::procstat::peak_rss_bytes().unwrap_or(0),
                    );
                    tracing::info!(held = runs.len(), again = again.len(), "post-copy: the source is back");
                    let cmd = StreamCommand::with(move |r: &mut Receiver, _| {
                        if let Err(e) = r.send_held(epoch, &runs) {
                            tracing::error!("post-copy: map after reconnect: {e}");
                        }
                        for c in again.chunks(MAX_REQUEST_PAGES) {
                            if let Err(e) = r.request_pages(c) {
                                tracing::warn!("post-copy: page request not sent: {e}");
                            }
                        }
                        if resumed && let Err(e) = r.resumed(epoch, cpu_us, rss) {
                            tracing::warn!("post-copy: resumed again: {e}");
                        }
                    });
                    if session.command(cmd).await.is_err() {
                        down_until.get_or_insert(Instant::now() + cfg.postcopy_recover);
                    }
                }
                Some(ReceiverEvent::Disconnected { error }) => {
                    if down_until.is_none() {
                        tracing::warn!("post-copy: the link to the source broke ({error}); the guest waits on its faults for the source to reconnect");
                        set(&|s| s.phase = "postcopy-reconnecting".into());
                    }
                    down_until.get_or_insert(Instant::now() + cfg.postcopy_recover);
                }
                Some(_) => {}
            },
            c = endpoint.accept(), if down_until.is_some() => match c {
                Ok(conn) => {
                    tracing::info!(peer = ?conn.peer_name(), "post-copy: the source reconnected");
                    let mut rcfg = ReceiverConfig::new(Role::MigrationDestination, cfg.vm.clone(), cfg.layout.clone(), transport::random_u64()?);
                    rcfg.timing = cfg.timing;
                    rcfg.resend_timeout = Duration::from_secs(1);
                    let rx = Receiver::new(rcfg);
                    line = Box::pin(transport::liveness::Listener::watch_if(lines, &conn));
                    line_open = true;
                    *session = transport::proto::receiver_session_tapped(conn, rx, place_tap(slot));
                    *lock(&commands) = session.command_sender();
                    down_until = None;
                    reconnects += 1;
                    set(&|s| s.phase = if resumed { "postcopy-running".into() } else { "postcopy".into() });
                }
                Err(e) => tracing::warn!("post-copy: refused a peer while waiting for the source: {}", transport::error_chain(&e)),
            },
            () = tokio::time::sleep_until(down_until.unwrap_or_else(Instant::now).into()), if down_until.is_some() => {
                break Err(ReceiveError::Ended(format!("the source did not come back within {:?}", cfg.postcopy_recover)));
            }
            r = async { building.as_mut().expect("guarded").await }, if building.is_some() => {
                building = None;
                r.map_err(|e| ReceiveError::Promote(format!("restore task: {e}")))?.map_err(ReceiveError::Promote)?;
                let run = run.take().expect("run once");
                let to = reverse_to.take();
                running = Some(tokio::task::spawn_blocking(move || run(epoch, to)));
            }
            r = async { running.as_mut().expect("guarded").await }, if running.is_some() => {
                running = None;
                r.map_err(|e| ReceiveError::Promote(format!("resume task: {e}")))?.map_err(ReceiveError::Promote)?;
                resumed = true;
                resumed_at = Some(Instant::now());
                set(&|s| s.phase = "postcopy-running".into());
                let (cpu_us, rss) = (
                    vmm::procstat::cpu_ns_excluding_vcpus().unwrap_or(0) / 1000,
                    vmm::procstat::peak_rss_bytes().unwrap_or(0),
                );
                tracing::info!(epoch, ms = t0.elapsed().as_secs_f64() * 1e3, missing = pc.missing(), "destination: the guest runs here (post-copy)");
                let cmd = StreamCommand::with(move |rc: &mut Receiver, _| {
                    if let Err(e) = rc.resumed(epoch, cpu_us, rss) {
                        tracing::error!("destination: resumed({epoch}): {e}");
                    }
                });
                if session.command(cmd).await.is_err() {
                    down_until.get_or_insert(Instant::now() + cfg.postcopy_recover);
                }
            }
            () = placer.done.notified() => {
                if let Some(e) = placer.error() {
                    break Err(e);
                }
            }
            // Once the guest runs here the node owns it and drops the stop switch: only an
            // explicit stop counts.
            r = stop.changed(), if stop_open => match r {
                Ok(()) if *stop.borrow() => break Err(ReceiveError::Stopped),
                Ok(()) => {}
                Err(_) => stop_open = false,
            },
            end = &mut line, if line_open => {
                line_open = false;
                if let transport::liveness::End::Died(why) = end {
                    break Err(ReceiveError::SourceDied(why.to_string()));
                }
            }
        }
    };
    if let Err(e) = result {
        let st = pc.stats();
        tracing::error!(
            missing = st.missing,
            "destination: post-copy broke off with {} pages still at the source: the guest is lost ({})",
            st.missing,
            transport::error_chain(&e)
        );
        return Err(ReceiveError::PostcopyLost { missing: st.missing, why: transport::error_chain(&e) });
    }
    drop(placer);
    let digest = pc.digest().map(|d| format!("{d:016x}"));
    if let Some(d) = &digest {
        tracing::info!("post-copy memory digest {d} (every page as held or placed)");
        set(&|s| s.memory_digest = Some(d.clone()));
    }
    let st = tokio::task::spawn_blocking({
        let pc = Arc::clone(&pc);
        move || pc.finish(false)
    })
    .await
    .map_err(|e| ReceiveError::Postcopy(format!("finish task: {e}")))?
    .map_err(|e| ReceiveError::Postcopy(transport::error_chain(&e)))?;
    let postcopy_ms = resumed_at.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
    tracing::info!(
        faults = st.faults,
        local_zero_faults = st.local_zero_faults,
        fault_us_p50 = st.fault_us_p50,
        fault_us_p99 = st.fault_us_p99,
        blocked_ms = st.blocked_ms,
        demanded = st.pages_demanded,
        pushed = st.pages_pushed,
        dropped = st.pages_dropped,
        postcopy_ms,
        "destination: every page is here; post-copy complete"
    );
    set(&|s| {
        s.phase = "running".into();
        s.postcopy_missing = Some(0);
        s.postcopy_faults = st.faults;
    });
    let c = Complete {
        pages: held.iter().map(|r| u64::from(r.count)).sum::<u64>() + missing0,
        faults: st.faults,
        fault_us_p50: st.fault_us_p50.round().clamp(0.0, f64::from(u32::MAX)) as u32,
        fault_us_p99: st.fault_us_p99.round().clamp(0.0, f64::from(u32::MAX)) as u32,
        blocked_us: (st.blocked_ms * 1e3).round().max(0.0) as u64,
        demanded: st.pages_demanded,
        pushed: st.pages_pushed,
    };
    let cmd = StreamCommand::with(move |rc: &mut Receiver, _| {
        if let Err(e) = rc.complete(c) {
            tracing::error!("destination: complete: {e}");
        }
    });
    if !reverse {
        crate::receive::last_word(session, cmd).await;
        return Ok(epoch);
    }
    // Reverse checkpoints: the guest's output stays held until the source gave its copy up.
    let _ = session.command(cmd).await;
    set(&|s| s.phase = "postcopy-handover".into());
    let why = wait_given_up(session, epoch, &mut line, line_open, stop, cfg.postcopy_recover).await?;
    tracing::info!("destination: {why}; the guest runs here alone: releasing its held output");
    tokio::task::spawn_blocking(move || given_up(why))
        .await
        .map_err(|e| ReceiveError::Promote(format!("release task: {e}")))?
        .map_err(ReceiveError::Promote)?;
    set(&|s| s.phase = "running".into());
    // The confirmation the source waits for before it exits.
    let (cpu_us, rss) =
        (vmm::procstat::cpu_ns_excluding_vcpus().unwrap_or(0) / 1000, vmm::procstat::peak_rss_bytes().unwrap_or(0));
    let cmd = StreamCommand::with(move |rc: &mut Receiver, _| {
        if let Err(e) = rc.resumed(epoch, cpu_us, rss) {
            tracing::warn!("destination: confirm the hand-over: {e}");
        }
    });
    crate::receive::last_word(session, cmd).await;
    Ok(epoch)
}

/// Where the reverse checkpoints go: back to the source, at the address it came from, in the
/// series that starts at the switch-over the forward receiver committed.
async fn reverse_to(
    session: &mut RxSession,
    cfg: &crate::receive::ReceiveConfig,
    endpoint: &transport::Endpoint,
    addr: std::net::SocketAddr,
) -> Result<crate::receive::ReverseTo, ReceiveError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let cmd = StreamCommand::with(move |r: &mut Receiver, _| {
        let _ = tx.send(r.committed_epoch());
    });
    if session.command(cmd).await.is_err() {
        return Err(crate::receive::ended(session).await);
    }
    let pos = rx.await.ok().flatten().ok_or_else(|| {
        ReceiveError::Postcopy("no committed switch-over epoch to start reverse checkpoints at".into())
    })?;
    Ok(crate::receive::ReverseTo {
        addr,
        name: cfg.source_name.clone(),
        endpoint: endpoint.clone(),
        identity: cfg.identity.clone(),
        start: replication_proto::migration::reverse_start(pos),
        vm: cfg.vm.clone(),
        layout: cfg.layout.clone(),
        timing: cfg.timing,
    })
}

/// After `Complete`, with reverse checkpoints: waits until the source gave its copy up (its
/// hand-over) or its process is gone (then it can never resume the guest either). Returns which.
/// A source that resumed the guest instead tells the reverse session (the owner fences this
/// copy); one that says nothing within `recover` leaves this copy unable to run alone: an error.
async fn wait_given_up(
    session: &mut RxSession,
    epoch: u64,
    line: &mut crate::receive::LineWatch<'_>,
    mut line_open: bool,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    recover: Duration,
) -> Result<String, ReceiveError> {
    let deadline = Instant::now() + recover;
    let mut session_open = true;
    let mut stop_open = true;
    loop {
        tokio::select! {
            ev = session.next_event(), if session_open => match ev {
                Some(ReceiverEvent::Handover { epoch: e }) if e == epoch => {
                    return Ok(format!("the source gave its copy up (hand-over at epoch {epoch})"));
                }
                Some(ReceiverEvent::Handover { epoch: e }) => {
                    return Err(ReceiveError::Handover { got: e, why: format!("post-copy switched over at {epoch}") });
                }
                None | Some(ReceiverEvent::Disconnected { .. }) => {
                    tracing::warn!("destination: the session with the source ended before its hand-over; waiting for it");
                    session_open = false;
                }
                Some(_) => {}
            },
            end = &mut *line, if line_open => {
                line_open = false;
                if let transport::liveness::End::Died(why) = end {
                    return Ok(format!("the source's process is gone ({why}) after every page arrived"));
                }
            }
            r = stop.changed(), if stop_open => match r {
                Ok(()) if *stop.borrow() => return Err(ReceiveError::Stopped),
                Ok(()) => {}
                Err(_) => stop_open = false,
            },
            () = tokio::time::sleep_until(deadline.into()) => {
                return Err(ReceiveError::Ended(format!(
                    "the source neither handed the guest over nor went away within {recover:?} after every page arrived"
                )));
            }
        }
    }
}
