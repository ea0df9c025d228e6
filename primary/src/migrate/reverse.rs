//! Reverse checkpoints at the source (issue 15; `docs/failure-model.md`, "Reverse
//! checkpoints").
//!
//! During post-copy the guest runs at the destination while this host holds its paused copy:
//! the memory as of the switch-over, which still answers the destination's page requests. The
//! destination dials back and runs a reverse session on which it checkpoints the guest: every
//! epoch carries the pages the guest dirtied there and its state. Each one is verified, written
//! into the paused guest's memory whole (a checkpoint that does not verify writes nothing) and
//! acknowledged; the destination releases the guest's network output of an epoch only once it
//! is acknowledged. So this copy (its own untouched pages plus the destination's newer ones, and
//! the last state) is always at least as new as anything the outside world saw.
//!
//! Pages a reverse checkpoint writes are pages the destination holds: it never asks for them
//! again, so an answer never reads a page while it is being written (a push may, for a page the
//! destination already has, which it then ignores).
//!
//! [`Reverse::stop`] ends the acknowledgements for good before the copy is taken: the source
//! resumes only once it stopped acknowledging ([`recover`]). Afterwards [`supersede`] answers the
//! destination, should it reach this host again (a healed partition), with a `Superseded`
//! goodbye: it then fences itself.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replication_proto::message::Position;
use replication_proto::{Checkpoint, Receiver, ReceiverConfig, ReceiverEvent, ReplicaMemory};
use transport::Endpoint;
use transport::session::StreamCommand;
use vmm::memory::OwnedMemory;

use super::{MigrateError, Source, lock};

/// How long a source that resumed the guest keeps answering the destination with `Superseded`.
pub(super) const SUPERSEDE_LINGER: Duration = Duration::from_secs(60);

struct Pages<'a>(&'a mut OwnedMemory);

impl ReplicaMemory for Pages<'_> {
    fn page(&self, pfn: u64) -> Option<&[u8]> {
        self.0.page(pfn)
    }
    fn page_mut(&mut self, pfn: u64) -> Option<&mut [u8]> {
        self.0.page_mut(pfn)
    }
    fn zero_all(&mut self) {
        self.0.zero_all()
    }
}

/// The copy the source would resume: its epoch and state.
#[derive(Debug, Clone)]
pub(super) struct Committed {
    /// The last reverse epoch committed (the switch-over epoch until the first one).
    pub epoch: u64,
    /// Its encoded `VmState`.
    pub state: Vec<u8>,
}

#[derive(Debug)]
struct State {
    copy: Committed,
    /// A reverse session is established now.
    up: bool,
    /// Since when none is (the switch-over, at first).
    down_since: Instant,
    /// Reverse checkpoints committed, and their pages.
    commits: u64,
    pages: u64,
    /// Sessions the destination opened.
    sessions: u32,
}

struct Shared {
    state: Mutex<State>,
    changed: tokio::sync::Notify,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut lock(&self.state));
        self.changed.notify_waiters();
    }
}

/// What the source needs to run (and later refuse) reverse sessions.
#[derive(Clone)]
pub(super) struct Setup {
    /// The migration's endpoint: the destination dials back to it.
    pub endpoint: Endpoint,
    /// The destination's certificate name (the only peer admitted).
    pub dest_name: String,
    /// The receiver's configuration (role `MigrationSource`).
    pub cfg: ReceiverConfig,
    /// Where the series starts ([`replication_proto::migration::reverse_start`]).
    pub start: Position,
}

impl Setup {
    /// The next connection from the destination: any other peer (another certificate name, a
    /// refused handshake) is closed or logged and skipped. `None` once the endpoint is closed.
    async fn accept_destination(&self) -> Option<transport::Connection> {
        loop {
            match self.endpoint.accept().await {
                Ok(c) if c.peer_name() == Some(self.dest_name.as_str()) => return Some(c),
                Ok(c) => {
                    tracing::warn!(peer = ?c.peer_name(), expected = %self.dest_name, "reverse: a peer that is not the destination dialed in; closed");
                    c.close("only the migration's destination may open a reverse session").await;
                }
                Err(transport::EndpointError::Closed) => return None,
                Err(e) => tracing::warn!("reverse: refused a peer: {}", transport::error_chain(&e)),
            }
        }
    }

    fn receiver(&self) -> Result<Receiver, MigrateError> {
        let mut cfg = self.cfg.clone();
        cfg.instance = transport::random_u64().map_err(|e| MigrateError::Setting(format!("instance number: {e}")))?;
        let mut r = Receiver::new(cfg);
        r.start_at(self.start).map_err(|e| MigrateError::Session(format!("reverse session start: {e}")))?;
        Ok(r)
    }
}

/// The reverse sessions of one post-copy, running.
pub(super) struct Reverse {
    setup: Setup,
    shared: Arc<Shared>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// What the reverse sessions did, for the report and the logs.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Counts {
    pub commits: u64,
    pub pages: u64,
    pub sessions: u32,
}

impl Reverse {
    /// Starts taking reverse sessions from the destination on `setup.endpoint`, committing into
    /// `mem` (the paused guest's memory) from the switch-over's `copy`.
    ///
    /// # Safety
    /// The guest of `mem` must not run until [`Reverse::stop`] returned (see
    /// [`OwnedMemory::from_paused`]).
    pub(super) unsafe fn start(
        setup: Setup,
        mem: vmm::memory::GuestMemory,
        copy: Committed,
    ) -> Result<Self, MigrateError> {
        let receiver = setup.receiver()?;
        // SAFETY: the caller keeps the guest paused until `stop` returned, and the task that
        // owns this is joined there.
        let mem = unsafe { OwnedMemory::from_paused(mem) };
        let shared = Arc::new(Shared {
            state: Mutex::new(State { copy, up: false, down_since: Instant::now(), commits: 0, pages: 0, sessions: 0 }),
            changed: tokio::sync::Notify::new(),
        });
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(serve(setup.clone(), receiver, mem, Arc::clone(&shared), stop_rx));
        Ok(Self { setup, shared, stop, task })
    }

    /// Whether a reverse session is established now.
    pub(super) fn up(&self) -> bool {
        lock(&self.shared.state).up
    }

    /// How long no reverse session has been established (zero while one is).
    pub(super) fn down_for(&self) -> Duration {
        let s = lock(&self.shared.state);
        if s.up { Duration::ZERO } else { s.down_since.elapsed() }
    }

    /// Returns once no reverse session is established.
    pub(super) async fn down(&self) {
        loop {
            let changed = self.shared.changed.notified();
            if !self.up() {
                return;
            }
            changed.await;
        }
    }

    /// Counters so far.
    pub(super) fn counts(&self) -> Counts {
        let s = lock(&self.shared.state);
        Counts { commits: s.commits, pages: s.pages, sessions: s.sessions }
    }

    /// Stops the reverse sessions for good: when this returns nothing will be committed or
    /// acknowledged any more. Returns the copy as last committed.
    pub(super) async fn stop(self) -> (Setup, Committed, Counts) {
        let Self { setup, shared, stop, task } = self;
        let _ = stop.send(true);
        let _ = task.await;
        let s = lock(&shared.state);
        (setup, s.copy.clone(), Counts { commits: s.commits, pages: s.pages, sessions: s.sessions })
    }
}

/// Verifies `cp` and writes it into `mem` whole, or nothing; returns the new copy.
fn commit(mem: &mut OwnedMemory, cp: &Checkpoint) -> Result<Committed, String> {
    if cp.is_baseline() {
        return Err("a baseline cannot come in a reverse series".into());
    }
    let state = cp.state();
    if state.is_empty() {
        return Err("a reverse checkpoint without the guest's state".into());
    }
    let st = vmm::VmState::decode(state).map_err(|e| format!("its state does not decode: {e}"))?;
    st.check_restorable(&mem.layout()).map_err(|e| format!("its state cannot be restored here: {e}"))?;
    cp.apply(&mut Pages(mem)).map_err(|e| transport::error_chain(&e))?;
    Ok(Committed { epoch: cp.epoch(), state: state.to_vec() })
}

/// Takes the destination's reverse sessions one after the other until stopped.
async fn serve(
    setup: Setup,
    mut receiver: Receiver,
    mut mem: OwnedMemory,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let conn = tokio::select! {
            c = setup.accept_destination() => match c {
                Some(c) => c,
                None => return,
            },
            _ = stop.changed() => return,
        };
        tracing::info!(addr = %conn.remote_address(), "reverse: the destination dialed back");
        let mut session = transport::proto::receiver_session(conn, receiver);
        let stopped = loop {
            let ev = tokio::select! {
                ev = session.next_event() => ev,
                _ = stop.changed() => break true,
            };
            match ev {
                None => break false,
                Some(ReceiverEvent::Connected { .. }) => {
                    tracing::info!("reverse: session established");
                    shared.update(|s| {
                        s.up = true;
                        s.sessions += 1;
                    });
                }
                Some(ReceiverEvent::Checkpoint(cp)) => match commit(&mut mem, &cp) {
                    Ok(copy) => {
                        let (epoch, pages) = (copy.epoch, cp.page_count() as u64);
                        tracing::debug!(epoch, pages, "reverse: checkpoint committed");
                        shared.update(|s| {
                            s.copy = copy;
                            s.commits += 1;
                            s.pages += pages;
                        });
                        failover::failpoint::hit("migrate.reverse-committed");
                        let cmd = StreamCommand::with(move |r: &mut Receiver, now| {
                            if let Err(e) = r.committed(now, epoch) {
                                tracing::error!("reverse: committed({epoch}): {e}");
                            }
                        });
                        if session.command(cmd).await.is_err() {
                            break false;
                        }
                    }
                    // Nothing was written: the copy stays at the last committed epoch, which
                    // the destination's output never went past.
                    Err(why) => {
                        tracing::error!(epoch = cp.epoch(), "reverse: checkpoint refused, not acknowledged: {why}")
                    }
                },
                Some(ReceiverEvent::Disconnected { error }) => {
                    tracing::warn!("reverse: session ended: {error}");
                    break false;
                }
                Some(_) => {}
            }
        };
        shared.update(|s| {
            if s.up {
                s.up = false;
                s.down_since = Instant::now();
            }
        });
        if stopped {
            // Dropping the session aborts its task: no acknowledgement goes out after this.
            drop(session);
            return;
        }
        // (A session that ended on a cut link may take until the link heals to finish: a stop
        // does not wait for it.)
        let finished = tokio::select! {
            f = session.finish() => f,
            _ = stop.changed() => return,
        };
        receiver = match finished {
            Ok(f) => f.core.into_endpoint(),
            Err(e) => {
                tracing::error!("reverse: session task failed: {e}");
                match setup.receiver() {
                    Ok(r) => r,
                    Err(_) => return,
                }
            }
        };
    }
}

/// The source resumes the guest from the last reverse checkpoint it committed, after `why`
/// (the destination died, or could not be reached on either session). Stops the reverse
/// sessions first, rebuilds the VM over its memory from that state (over `prepared` if one was
/// built), announces it on the network and resumes it; then answers the destination with
/// `Superseded` for a while. Returns the error the migration ends with: `Recovered`, or
/// `PostcopyLost` if the guest could not be resumed.
pub(super) async fn recover(
    src: &Source,
    reverse: Reverse,
    prepared: Option<vmm::vm::PreparedVm>,
    switchover: u64,
    why: String,
) -> MigrateError {
    let t0 = Instant::now();
    let detect_ms = reverse.down_for().as_secs_f64() * 1e3;
    let (setup, copy, counts) = reverse.stop().await;
    let Committed { epoch, state } = copy;
    let vm = Arc::clone(&src.vm);
    let resumed = tokio::task::spawn_blocking(move || {
        let state = vmm::VmState::decode(&state).map_err(|e| format!("decode the state of epoch {epoch}: {e}"))?;
        let mut g = lock(&vm);
        let old = g.rebuild(prepared, &state).map_err(|e| transport::error_chain(&e))?;
        if let Some(net) = g.net() {
            let dev = net.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = dev.device().announce() {
                tracing::warn!("announce after recovery: {e}");
            }
        }
        g.resume();
        drop(g);
        // Dropping a KVM VM takes a while: not on the way to the running guest.
        let _ = std::thread::Builder::new().name("drop-old-vm".into()).spawn(move || drop(old));
        Ok::<_, String>(())
    })
    .await
    .map_err(|e| format!("resume task: {e}"))
    .and_then(|r| r);
    let recover_ms = t0.elapsed().as_secs_f64() * 1e3;
    if let Err(e) = resumed {
        tracing::error!("post-copy: the guest could not be resumed here from reverse checkpoint {epoch}: {e}");
        return MigrateError::PostcopyLost {
            epoch: switchover,
            why: format!("{why}; resuming from reverse checkpoint {epoch} failed: {e}"),
        };
    }
    tracing::info!(
        epoch,
        switchover,
        recover_ms,
        detect_ms,
        commits = counts.commits,
        pages = counts.pages,
        sessions = counts.sessions,
        "RECOVERED: the guest runs here again from reverse checkpoint {epoch} ({why})"
    );
    supersede(setup, format!("the source resumed the guest from reverse checkpoint {epoch}"));
    MigrateError::Recovered { switchover, epoch, why, recover_ms, commits: counts.commits }
}

/// For [`SUPERSEDE_LINGER`], answers every reverse session the destination opens with a
/// `Superseded` goodbye (it fences itself on it); then closes the endpoint.
fn supersede(setup: Setup, detail: String) {
    tokio::spawn(async move {
        let until = tokio::time::Instant::now() + SUPERSEDE_LINGER;
        loop {
            let conn = tokio::select! {
                c = setup.accept_destination() => match c {
                    Some(c) => c,
                    None => return,
                },
                () = tokio::time::sleep_until(until) => break,
            };
            let Ok(receiver) = setup.receiver() else { break };
            tracing::warn!(addr = %conn.remote_address(), "reverse: the destination is back; telling it the guest runs here");
            let mut session = transport::proto::receiver_session(conn, receiver);
            let d = detail.clone();
            let cmd = StreamCommand::with(move |r: &mut Receiver, _| r.supersede(&d));
            transport::proto::last_word(&mut session, cmd).await;
        }
        setup.endpoint.shutdown().await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use replication_proto::message::{GuestRange, Lineage};
    use replication_proto::migration::reverse_start;
    use replication_proto::{MemoryLayout, Role, Sender, SenderConfig, SenderEvent, VmIdentity};
    use transport::certs::{Authority, HostSpec, Identity, Validity};
    use transport::session::{Session, StreamCore};
    use vm_memory::{Bytes, GuestAddress};

    const PS: usize = 4096;

    struct World {
        ca: Authority,
        src: Endpoint,
        dest: Endpoint,
        mem: vmm::memory::GuestMemory,
        layout: MemoryLayout,
        vm: VmIdentity,
        start: Position,
    }

    fn identity(ca: &Authority, host: &str) -> Identity {
        let issued = ca.issue(&HostSpec::new(host), Validity::days_from_now(1)).unwrap();
        Identity::from_pem(ca.cert_pem(), &issued.cert_pem, &issued.key_pem).unwrap()
    }

    fn world() -> World {
        let ca = Authority::generate(Validity::days_from_now(1)).unwrap();
        let any = "127.0.0.1:0".parse().unwrap();
        let v = transport::proto::protocol_versions;
        let src = Endpoint::bind(any, &identity(&ca, "src"), v(), transport::Tuning::default()).unwrap();
        let dest = Endpoint::bind(any, &identity(&ca, "dest"), v(), transport::Tuning::default()).unwrap();
        let mem = vmm::memory::create_anonymous(2 << 20).unwrap();
        let ranges = vmm::memory::layout_of(&mem).into_iter().map(|(start, len)| GuestRange { start, len }).collect();
        let layout = MemoryLayout { page_size: PS as u32, ranges };
        let vm = VmIdentity { uuid: [7; 16], name: "reverse".into() };
        let start = reverse_start(Position { lineage: Lineage { origin: 1, baseline: 1 }, epoch: 5 });
        World { ca, src, dest, mem, layout, vm, start }
    }

    /// An encoded state for this memory whose first vCPU's rip is `rip`.
    fn state(w: &World, rip: u64) -> Vec<u8> {
        let mut s = vmm::state::tests_support::sample_state();
        s.memory = vmm::memory::layout_of(&w.mem);
        s.vcpus[0].regs.rip = rip;
        s.encode().unwrap()
    }

    fn setup(w: &World) -> Setup {
        Setup {
            endpoint: w.src.clone(),
            dest_name: "dest".into(),
            cfg: ReceiverConfig::new(Role::MigrationSource, w.vm.clone(), w.layout.clone(), 0),
            start: w.start,
        }
    }

    /// The destination's side: a reverse sender dialing the source, connected.
    async fn dial(w: &World, dest: &Endpoint) -> Session<StreamCore<Sender>> {
        let conn = dest.connect(w.src.local_addr().unwrap(), "src").await.unwrap();
        let mut sender = Sender::new(SenderConfig::new(Role::MigrationDestination, w.vm.clone(), w.layout.clone(), 9));
        sender.start_at(w.start).unwrap();
        let mut s = transport::proto::sender_session(conn, sender);
        loop {
            match s.next_event().await.expect("a session event") {
                SenderEvent::Connected { .. } => return s,
                SenderEvent::Disconnected { error } => panic!("reverse session refused: {error}"),
                _ => {}
            }
        }
    }

    async fn submit(s: &Session<StreamCore<Sender>>, pfn: u64, fill: u8, state: Vec<u8>) -> u64 {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let page = vec![fill; PS];
        let cmd = StreamCommand::with(move |snd: &mut Sender, now| {
            let _ = tx.send(snd.submit(now, [(pfn, &page[..])], &state));
        });
        assert!(s.command(cmd).await.is_ok());
        rx.await.unwrap().unwrap()
    }

    /// The next ack within `wait`, if any.
    async fn ack(s: &mut Session<StreamCore<Sender>>, wait: Duration) -> Option<u64> {
        tokio::time::timeout(wait, async {
            loop {
                match s.next_event().await {
                    Some(SenderEvent::Acked { epoch, .. }) => return Some(epoch),
                    Some(SenderEvent::Disconnected { .. }) | None => return None,
                    Some(_) => {}
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    fn page(w: &World, pfn: u64) -> Vec<u8> {
        let mut b = vec![0u8; PS];
        w.mem.read_slice(&mut b, GuestAddress(pfn * PS as u64)).unwrap();
        b
    }

    /// Each reverse checkpoint is written into the paused guest's memory and acknowledged; one
    /// whose state does not decode is neither written nor acknowledged; and once the source
    /// stopped (it is about to resume the guest), nothing is committed or acknowledged any more:
    /// the copy it takes is exactly the last acknowledged one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_source_acks_what_it_committed_and_nothing_once_stopped() {
        let w = world();
        // SAFETY: no guest runs on this memory.
        let rev =
            unsafe { Reverse::start(setup(&w), w.mem.clone(), Committed { epoch: 5, state: state(&w, 5) }) }.unwrap();
        assert!(!rev.up());
        let mut s = dial(&w, &w.dest).await;
        assert_eq!(submit(&s, 3, 0xab, state(&w, 6)).await, 6);
        assert_eq!(ack(&mut s, Duration::from_secs(5)).await, Some(6));
        assert_eq!(page(&w, 3), vec![0xab; PS]);
        assert!(rev.up() && rev.down_for().is_zero());
        assert_eq!(rev.counts().commits, 1);

        // A checkpoint whose state is garbage: refused whole.
        assert_eq!(submit(&s, 4, 0xcd, b"not a vm state".to_vec()).await, 7);
        assert_eq!(ack(&mut s, Duration::from_millis(500)).await, None, "a refused checkpoint is not acknowledged");
        assert_eq!(page(&w, 4), vec![0; PS], "nor written");

        let (_, copy, counts) = rev.stop().await;
        assert_eq!((copy.epoch, counts.commits, counts.sessions), (6, 1, 1));
        let st = vmm::VmState::decode(&copy.state).unwrap();
        assert_eq!(st.vcpus[0].regs.rip, 6);
        // Stopped: the source's session is gone; a checkpoint sent now (if the destination's
        // session still takes one) is never acknowledged nor written.
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let (page5, late_state) = (vec![0xefu8; PS], state(&w, 8));
        let cmd = StreamCommand::with(move |snd: &mut Sender, now| {
            let _ = tx.send(snd.submit(now, [(5u64, &page5[..])], &late_state).is_ok());
        });
        if s.command(cmd).await.is_ok() {
            assert_eq!(ack(&mut s, Duration::from_millis(500)).await, None);
        }
        assert_eq!(page(&w, 5), vec![0; PS]);
    }

    /// A destination that reaches the source after it resumed the guest (a healed partition)
    /// is told it was superseded: its reverse link ends for good and calls its fence with the
    /// reason. A peer with another certificate name gets nowhere.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_superseded_destination_fences_itself() {
        let w = world();
        supersede(setup(&w), "the source resumed the guest from reverse checkpoint 6".into());
        // An intruder (a valid host certificate, another name) is closed at once.
        let intruder = Endpoint::bind(
            "127.0.0.1:0".parse().unwrap(),
            &identity(&w.ca, "intruder"),
            transport::proto::protocol_versions(),
            transport::Tuning::default(),
        )
        .unwrap();
        let conn = intruder.connect(w.src.local_addr().unwrap(), "src").await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        assert!(closed.is_ok(), "the intruder's connection is closed");

        // The destination's real reverse link: the link task with a fence.
        let fenced = Arc::new(Mutex::new(None::<String>));
        let f2 = Arc::clone(&fenced);
        let cfg = crate::link::LinkConfig {
            endpoint: Some(w.dest.clone()),
            line: false,
            fence: Some(Arc::new(move |why| *f2.lock().unwrap() = Some(why))),
            ..crate::link::LinkConfig::protection(
                w.src.local_addr().unwrap(),
                "src".into(),
                identity(&w.ca, "dest"),
                "127.0.0.1:0".parse().unwrap(),
            )
        };
        let mut sender = Sender::new(SenderConfig::new(Role::MigrationDestination, w.vm.clone(), w.layout.clone(), 9));
        sender.start_at(w.start).unwrap();
        let (_tx, rx) = tokio::sync::mpsc::channel(4);
        let shared = Arc::new(crate::engine::LinkShared::default());
        let stats = Arc::new(crate::stats::Stats::new("src".into()));
        let link = tokio::spawn(crate::link::run(cfg, sender, rx, shared, None, stats, Arc::default()));
        tokio::time::timeout(Duration::from_secs(10), link).await.expect("the link ends by itself").unwrap();
        let why = fenced.lock().unwrap().clone().expect("fenced");
        assert!(why.contains("reverse checkpoint 6"), "{why}");
    }
}
