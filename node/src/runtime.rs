//! One node ([`Node`]): the process that runs a VM or holds a replica of one. Its role is one
//! [`Role`] behind one lock, changed only by the transitions here and in the handlers, each
//! logged and counted; beside it stay what is not the role: the arbitration agent (any role
//! may run one) and exit signalling. The node serves the admin API until it exits
//! ([`Node::run_until_exit`]).

mod agent;
mod handlers;
mod reprotect;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use backup::server::BackupNode;
use vmm::vcpu::StopReason;
use vmm::vm::Vm;

use crate::api;
use crate::role::{Guest, Receiving, Role, Standby, Transitions};
use crate::status::{BackupProcessStatus, Origin, RoleName, Status, VmState, VmStatus};

/// Where COM1's output goes, as given on the command line.
#[derive(Debug, Clone)]
pub enum SerialTarget {
    /// The process's stdout.
    Stdout,
    /// Nowhere.
    Null,
    /// Appended to a file.
    File(PathBuf),
}

impl std::str::FromStr for SerialTarget {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "stdout" | "-" => Self::Stdout,
            "none" | "null" => Self::Null,
            p => Self::File(PathBuf::from(p)),
        })
    }
}

impl SerialTarget {
    /// Opens the target.
    pub fn open(&self) -> Result<vmm::devices::serial::SerialOut, NodeError> {
        Ok(match self {
            Self::Stdout => Box::new(std::io::stdout()),
            Self::Null => Box::new(std::io::sink()),
            Self::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| NodeError::Serial { path: p.clone(), source })?,
            ),
        })
    }
}

/// Errors of a node: starting it, and every admin request it refuses (the API answers with the
/// chain, so the messages are part of the API).
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// No async runtime.
    #[error("start the async runtime")]
    Tokio(#[source] std::io::Error),
    /// The serial output could not be opened.
    #[error("open serial output {}", path.display())]
    Serial {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// LAN copies were asked for without a TAP to read them from.
    #[error("lan copies need the standby's tap (--tap)")]
    LanCopyWithoutTap,
    /// A thread could not start.
    #[error("spawn {0} thread")]
    Spawn(&'static str, #[source] std::io::Error),
    /// The replica (its memory layout) or the backup server.
    #[error(transparent)]
    Backup(#[from] backup::server::BackupError),
    /// The metrics endpoint.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// The arbitration agent.
    #[error(transparent)]
    Agent(#[from] failover::net::agent::AgentError),
    /// A call to the arbitration agent.
    #[error(transparent)]
    Net(Box<failover::net::NetError>),
    /// An arbitration agent runs already.
    #[error("an arbitration agent runs already")]
    AgentRunning,
    /// The VM.
    #[error(transparent)]
    Vm(#[from] vmm::vm::VmError),
    /// The admin API socket.
    #[error(transparent)]
    Api(#[from] api::ApiError),
    /// A report that does not serialize.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A bad protect request, or protection that did not stop cleanly.
    #[error(transparent)]
    Protect(#[from] crate::protect::ProtectError),
    /// Protection did not start.
    #[error("start protection")]
    StartProtection(#[source] crate::protect::ProtectError),
    /// A migration that was refused or failed.
    #[error(transparent)]
    Migrate(#[from] primary::migrate::MigrateError),
    /// A migration that could not be set up.
    #[error(transparent)]
    MigrateSetup(#[from] crate::migrate::SetupError),
    /// The replica could not be taken for promotion.
    #[error("promote")]
    TakeReplica(#[source] backup::server::BackupError),
    /// Promotion failed.
    #[error(transparent)]
    Promote(#[from] backup::promote::PromoteError),
    /// The VM's state could not be captured for a snapshot.
    #[error("snapshot into {}", dir.display())]
    SnapshotState {
        /// The snapshot directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: vmm::vm::VmError,
    },
    /// A snapshot could not be written.
    #[error("snapshot into {}", dir.display())]
    SnapshotWrite {
        /// The snapshot directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: vmm::snapshot::SnapshotError,
    },
    /// A request for a VM to a backup or destination.
    #[error("this process holds a backup replica, not a running vm")]
    NotVm,
    /// A request that would touch a guest being migrated away.
    #[error("cannot {what}: a migration is {phase}")]
    Migrating {
        /// What was asked.
        what: &'static str,
        /// The migration's phase.
        phase: String,
    },
    /// Migrating a protected VM.
    #[error("the vm is protected: unprotect it before migrating it")]
    MigrateProtected,
    /// Migrating a VM under arbitration.
    #[error("the vm is under arbitration: migrating it is not supported yet")]
    MigrateArbitrated,
    /// A second migration.
    #[error("a migration is already {0}")]
    MigrationRunning(String),
    /// Cancelling without a migration.
    #[error("no migration is running")]
    NoMigration,
    /// Cancelling a migration past the hand-over.
    #[error("the migration is {0}: too late to cancel (the guest was handed over, or it failed already)")]
    TooLateToCancel(String),
    /// Protecting twice.
    #[error("the vm is already protected (unprotect first)")]
    AlreadyProtected,
    /// Unprotecting (or reading the output journal of) an unprotected VM.
    #[error("the vm is not protected")]
    NotProtected,
    /// No verification journal.
    #[error("no protection or backup here: nothing was verified")]
    NothingVerified,
    /// No output journal.
    #[error("the vm has no network device")]
    NoNetDevice,
    /// Promoting a migration destination.
    #[error("this process is a migration destination: it runs the guest when the source hands it over")]
    Destination,
    /// Promoting what is not a backup.
    #[error("this process is not a backup (or was promoted already)")]
    NotBackup,
    /// The arbitration group refused to grant the backup activity.
    #[error(
        "the arbitration group cannot grant this backup activity ({0}); `understudy promote --force` \
         promotes without the group, risking two active copies"
    )]
    GroupRefused(failover::ArbiterError),
    /// The arbitration group did not grant the backup activity in time.
    #[error(
        "the arbitration group did not grant this backup activity within {0}s: the primary still holds its \
         lease (it is alive, or the group has no quorum); `understudy promote --force` promotes without the \
         group, risking two active copies"
    )]
    NotGranted(u64),
    /// A memory digest of a backup.
    #[error("a backup's replica digest is in `verify-journal`")]
    ReplicaDigest,
    /// A part this process cannot do without stopped.
    #[error("{0}")]
    Failed(String),
    /// The VM failed.
    #[error("vm failed: {0}")]
    VmFailed(String),
    /// The arbitration agent died.
    #[error("arbitration failed: {0}")]
    ArbitrationFailed(String),
}

impl From<failover::net::NetError> for NodeError {
    fn from(e: failover::net::NetError) -> Self {
        Self::Net(Box::new(e))
    }
}

/// The arbitration agent and the gated output it installed on the VM's net device.
struct Arbitration {
    agent: Arc<failover::net::agent::Agent>,
    output: Mutex<Option<Arc<primary::output::OutputBuffer>>>,
}

/// Why the process is to exit, once it is.
#[derive(Default)]
struct ExitState {
    /// Why it stops (the first reason given).
    why: Option<String>,
    /// A part it cannot do without stopped: it exits non-zero with this.
    failed: Option<String>,
    /// The arbitration agent died: it exits non-zero with this, whatever else happened.
    arbitration_failed: Option<String>,
}

/// One VM process: a VM (or a replica waiting to become one), its role, and what the API
/// reports about it.
pub struct Node {
    role: Mutex<Role>,
    transitions: Transitions,
    arbitration: OnceLock<Arbitration>,
    exit: Mutex<ExitState>,
    exit_changed: Condvar,
    started: Instant,
    memory_bytes: u64,
    /// The VM's name (its identity on replication, migration and arbitration).
    vm_name: String,
    /// A post-copy destination's reverse checkpoints to its source, while they run.
    reverse: Mutex<Option<crate::protect::Protection>>,
    /// This copy was fenced (the source resumed the guest, or reverse checkpoints failed).
    fenced: std::sync::atomic::AtomicBool,
    /// The migration source gave its copy up: this one is the only copy (never fenced after).
    given_up: std::sync::atomic::AtomicBool,
    /// Automatic re-protection after a promotion (standbys named by `backup --reprotect-to`).
    reprotect: reprotect::Reprotect,
    tokio: tokio::runtime::Runtime,
    /// The replication link's runtime ([`link_threads`] workers): the primary's link and
    /// reverse checkpoints, the backup's server. Everything else (the API's async work, the
    /// arbitration agent, migrations) runs on `tokio`'s two.
    link: tokio::runtime::Runtime,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Builds the VM from a standby's replica and resumes it; the standby's server is stopped.
fn promote_standby(standby: &Standby, requested: Instant) -> Result<(Vm, backup::promote::Promoted), NodeError> {
    let replica = standby.node.take_replica().map_err(NodeError::TakeReplica)?;
    let _ = standby.stop.send(true);
    let prepared = standby.node.take_prepared_vm();
    let opts = backup::promote::PromoteOptions {
        requested,
        serial: standby.serial.open()?,
        tap: standby.tap.clone(),
        digest: standby.digest,
        replay: Some(Arc::clone(&standby.node)),
    };
    Ok(backup::promote::promote(replica, prepared, opts)?)
}

/// Worker threads of the replication link's runtime: `UNDERSTUDY_LINK_THREADS`, default
/// [`LINK_THREADS`]. The CLI checks it before it boots a VM.
pub fn link_threads() -> Result<usize, NodeError> {
    link_threads_from(std::env::var("UNDERSTUDY_LINK_THREADS").ok().as_deref())
}

/// One: a checkpoint crosses the link's task, the session's and quinn's drivers on its way out,
/// and its ack the same tasks back; on one worker each of those hand-offs is a task switch
/// instead of a wake-up of another thread (tens of microseconds each on a virtualised host).
/// 16-connection kv gets under protection, by turns against two workers: +6-11% (session 17,
/// docs/benchmarks-history.md). The link has a runtime of its own so that a long piece of work
/// in it (encoding a checkpoint of many pages) never holds up the arbitration agent or the API.
pub const LINK_THREADS: usize = 1;

fn link_threads_from(v: Option<&str>) -> Result<usize, NodeError> {
    let Some(v) = v else { return Ok(LINK_THREADS) };
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=64).contains(&n) => Ok(n),
        _ => Err(NodeError::Tokio(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("UNDERSTUDY_LINK_THREADS={v:?}: expected a number of threads from 1 to 64"),
        ))),
    }
}

impl Node {
    fn with_role(role: Role, memory_bytes: u64, vm_name: &str) -> Result<Arc<Self>, NodeError> {
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("understudy-io")
            .enable_all()
            .build()
            .map_err(NodeError::Tokio)?;
        let link = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(link_threads()?)
            .thread_name("understudy-link")
            .enable_all()
            .build()
            .map_err(NodeError::Tokio)?;
        tracing::info!(role = %role.kind(), vm = vm_name, "node starts");
        Ok(Arc::new(Self {
            role: Mutex::new(role),
            transitions: Transitions::default(),
            arbitration: OnceLock::new(),
            exit: Mutex::new(ExitState::default()),
            exit_changed: Condvar::new(),
            started: Instant::now(),
            memory_bytes,
            vm_name: vm_name.to_string(),
            reverse: Mutex::new(None),
            fenced: std::sync::atomic::AtomicBool::new(false),
            given_up: std::sync::atomic::AtomicBool::new(false),
            reprotect: reprotect::Reprotect::default(),
            tokio,
            link,
        }))
    }

    /// A VM booted or restored in this process, named `vm_name`.
    pub fn run(vm: Vm, origin: Origin, memory_bytes: u64, vm_name: &str) -> Result<Arc<Self>, NodeError> {
        Self::with_role(Role::Booted(Guest::new(vm, origin)), memory_bytes, vm_name)
    }

    /// A backup: serves the primary until promoted (by `understudy promote`, by the arbitration
    /// group's grant, or by itself with `auto_promote` when the primary is lost).
    pub fn backup(
        mut cfg: backup::server::BackupConfig,
        tap: Option<String>,
        serial: SerialTarget,
        memory_bytes: u64,
        auto_promote: bool,
    ) -> Result<Arc<Self>, NodeError> {
        let node = BackupNode::new(&cfg.layout, cfg.prepare_vm)?;
        if cfg.lan_copy {
            let name = tap.as_deref().ok_or(NodeError::LanCopyWithoutTap)?;
            let open = vmm::vm::open_tap(name)?;
            let lan = backup::lan_copy::LanCopy::start(
                open,
                backup::lan_copy::DEFAULT_MAX_FRAMES,
                backup::lan_copy::DEFAULT_MAX_BYTES,
            )
            .map_err(|e| NodeError::Spawn("lan-copy", e))?;
            node.set_lan_copy(lan);
        }
        let (lost_tx, lost_rx) = std::sync::mpsc::channel::<backup::server::PrimaryLost>();
        cfg.on_primary_lost = Some(lost_tx);
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let standby =
            Standby { node: Arc::clone(&node), stop, listen: cfg.listen.to_string(), tap, serial, digest: cfg.verify };
        let vm_name = cfg.vm.name.clone();
        let (failed_tx, failed_rx) = std::sync::mpsc::channel::<String>();
        let rt = Self::with_role(Role::Backup(standby), memory_bytes, &vm_name)?;
        rt.link.spawn(async move {
            if let Err(e) = backup::server::serve(cfg, node, stop_rx).await {
                let _ = failed_tx.send(transport::error_chain(&e));
            }
        });
        // The server ends only on an error it cannot serve past (it cannot listen): a backup
        // that no longer listens protects nothing, so the process stops with that error.
        let weak = Arc::downgrade(&rt);
        std::thread::Builder::new()
            .name("backup-server-watch".into())
            .spawn(move || {
                if let Ok(why) = failed_rx.recv() {
                    tracing::error!("backup server stopped: {why}");
                    if let Some(rt) = weak.upgrade() {
                        rt.fail(format!("backup server stopped: {why}"));
                    }
                }
            })
            .map_err(|e| NodeError::Spawn("server watch", e))?;
        rt.spawn_failover(lost_rx, auto_promote)?;
        Ok(rt)
    }

    /// A migration destination: waits for one migration from `cfg.source_name`; on the hand-over
    /// runs the guest (with `tap`, `serial`) and from then on is the VM's process. A migration
    /// that ends before the hand-over ends the process with an error, no guest run.
    pub fn destination(
        cfg: backup::receive::ReceiveConfig,
        ranges: &[(u64, u64)],
        tap: Option<String>,
        serial: SerialTarget,
        memory_bytes: u64,
    ) -> Result<Arc<Self>, NodeError> {
        let node = BackupNode::new(ranges, false)?;
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let progress = Arc::new(Mutex::new(backup::receive::ReceiveStatus::default()));
        let standby =
            Standby { node: Arc::clone(&node), stop, listen: cfg.listen.to_string(), tap, serial, digest: false };
        let receiving =
            Receiving { standby, progress: Arc::clone(&progress), source: cfg.source_name.clone(), staged: None };
        let rt = Self::with_role(Role::MigrationDestination(receiving), memory_bytes, &cfg.vm.name)?;
        let (w1, w2, w3) = (Arc::downgrade(&rt), Arc::downgrade(&rt), Arc::downgrade(&rt));
        let hooks = backup::receive::Hooks {
            stage: Box::new(move |epoch| w1.upgrade().ok_or("the process is stopping")?.stage(epoch)),
            run: Box::new(move |epoch, to| {
                let fence_node = w2.clone();
                let fence: primary::link::Fence = Arc::new(move |why: String| {
                    if let Some(n) = fence_node.upgrade() {
                        n.fence(why);
                    }
                });
                w2.upgrade().ok_or("the process is stopping")?.hand_over(epoch, to, fence)
            }),
            given_up: Box::new(move |why| w3.upgrade().ok_or("the process is stopping")?.reverse_given_up(&why)),
        };
        let weak = Arc::downgrade(&rt);
        rt.tokio.spawn(async move {
            if let Err(e) = backup::receive::receive(cfg, node, progress, stop_rx, hooks).await {
                let why = transport::error_chain(&e);
                if let Some(rt) = weak.upgrade() {
                    rt.fail(format!("migration: {why}"));
                }
            }
        });
        Ok(rt)
    }

    fn role(&self) -> MutexGuard<'_, Role> {
        lock(&self.role)
    }

    /// The one way the role changes: logs the transition (`why`), counts it, returns the old
    /// role.
    fn enter(&self, role: &mut Role, next: Role, why: &str) -> Role {
        let (from, to) = (role.kind(), next.kind());
        let old = std::mem::replace(role, next);
        self.transitions.count(from, to);
        tracing::info!(from = from.name(), to = to.name(), "role: {from} -> {to} ({why})");
        old
    }

    /// Backup: the replica becomes the running VM.
    fn promote(&self) -> Result<serde_json::Value, NodeError> {
        let t0 = Instant::now();
        let mut role = self.role();
        let Role::Backup(standby) = &*role else { return Err(NodeError::NotBackup) };
        let (vm, promoted) = promote_standby(standby, t0)?;
        let origin = Origin::Promoted {
            epoch: promoted.epoch,
            memory_digest: promoted.memory_digest.clone(),
            promote_ms: promoted.promote_ms,
            replayed_frames: promoted.replayed_frames,
            output_written_frames: promoted.output_written_frames,
        };
        let why = format!("the replica of epoch {} runs", promoted.epoch);
        self.enter(&mut role, Role::Promoted(Guest::new(vm, origin)), &why);
        drop(role);
        let mut v = serde_json::to_value(&promoted)?;
        v["state"] = "running".into();
        Ok(v)
    }

    /// Migration destination: the switch-over epoch is committed; build the guest from it,
    /// paused, while the source decides to hand over.
    fn stage(&self, epoch: u64) -> Result<(), String> {
        let t0 = Instant::now();
        let mut role = self.role();
        let Role::MigrationDestination(r) = &mut *role else { return Err(NodeError::NotBackup.to_string()) };
        // (The receive task is not stopped: it still waits for the hand-over.)
        let replica = r.standby.node.take_replica().map_err(|e| transport::error_chain(&NodeError::TakeReplica(e)))?;
        let prepared = r.standby.node.take_prepared_vm();
        let serial = r.standby.serial.open().map_err(|e| transport::error_chain(&e))?;
        let opts = backup::promote::PromoteOptions {
            requested: t0,
            serial,
            tap: r.standby.tap.clone(),
            digest: false,
            replay: None,
        };
        let built = backup::promote::restore(replica, prepared, opts).map_err(|e| transport::error_chain(&e))?;
        tracing::info!(
            epoch,
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "destination: guest built from the switch-over epoch, paused until the hand-over"
        );
        r.staged = Some(Box::new(built));
        Ok(())
    }

    /// Migration destination: the source handed the guest over at `epoch` (or switched over
    /// to post-copy); run it here. With reverse checkpoints (`to`), dirty logging and held
    /// output go in before the guest first runs, and the checkpoints start right after.
    fn hand_over(
        &self,
        epoch: u64,
        to: Option<backup::receive::ReverseTo>,
        fence: primary::link::Fence,
    ) -> Result<(), String> {
        let t0 = Instant::now();
        let mut role = self.role();
        let Role::MigrationDestination(r) = &mut *role else { return Err(NodeError::NotBackup.to_string()) };
        let (mut vm, restored) = *r.staged.take().ok_or("no guest was built from the switch-over epoch")?;
        if restored.epoch() != epoch {
            return Err(format!("handed over at epoch {epoch}, but the guest was built at {}", restored.epoch()));
        }
        let output = match &to {
            Some(_) => {
                vm.enable_dirty_log().map_err(|e| transport::error_chain(&e))?;
                primary::output::install_held(&vm, 1).map_err(|e| transport::error_chain(&e))?
            }
            None => None,
        };
        backup::promote::activate(&mut vm, restored);
        let resume_ms = t0.elapsed().as_secs_f64() * 1e3;
        let memory_digest = lock(&r.progress).memory_digest.clone();
        let origin = Origin::Migrated { source: r.source.clone(), epoch, resume_ms, memory_digest };
        let why = format!("handed over by {} at epoch {epoch}", r.source);
        let guest = Guest::new(vm, origin);
        if let Some(to) = to {
            match crate::protect::Protection::start_reverse(&guest.vm, output, to, self.link.handle(), fence) {
                Ok(p) => *lock(&self.reverse) = Some(p),
                Err(e) => {
                    // The guest runs with its output held and nothing to release it: this copy
                    // cannot go on (the source resumes once this process is gone).
                    let why = transport::error_chain(&e);
                    self.enter(&mut role, Role::Promoted(guest), "post-copy started");
                    drop(role);
                    self.fence(format!("reverse checkpoints did not start: {why}"));
                    return Err(why);
                }
            }
        }
        self.enter(&mut role, Role::Promoted(guest), &why);
        tracing::info!(epoch, resume_ms, "MIGRATED: the guest runs here");
        Ok(())
    }

    /// Post-copy destination: the source gave its copy up (or is gone for good): reverse
    /// checkpoints stop and the held output goes out; the guest runs here alone.
    fn reverse_given_up(&self, why: &str) -> Result<(), String> {
        self.given_up.store(true, std::sync::atomic::Ordering::SeqCst);
        let Some(p) = lock(&self.reverse).take() else { return Ok(()) };
        let vm = self.role().vm().ok_or("no guest runs here")?;
        let held = p.output.as_ref().map(|o| o.held()).unwrap_or((0, 0));
        let r = p.report();
        // The source never resumes now: what is held is this copy's alone and goes out at once;
        // the engine and the link stop behind it, off the hand-over's path.
        if let Some(o) = &p.output {
            o.set_passthrough(true);
        }
        let rt = self.tokio.handle().clone();
        std::thread::Builder::new()
            .name("reverse-stop".into())
            .spawn(move || {
                if let Err(e) = p.stop(&vm, &rt) {
                    tracing::error!("stop the reverse checkpoints: {}", transport::error_chain(&e));
                }
            })
            .map_err(|e| format!("spawn the reverse stop: {e}"))?;
        tracing::info!(
            frames = held.0,
            bytes = held.1,
            epochs = r.epochs,
            last_acked = r.last_acked_epoch,
            pause_us_p50 = r.pause_us_p50,
            pause_us_p99 = r.pause_us_p99,
            dirty_pages_mean = r.dirty_pages_per_epoch_mean,
            dirty_pages_p99 = r.dirty_pages_per_epoch_p99,
            ack_us_p50 = r.ack_latency_us_p50,
            ack_us_p99 = r.ack_latency_us_p99,
            "reverse checkpoints stopped ({why}): held output released, output flows straight again"
        );
        Ok(())
    }

    /// This copy must stop: the source resumed the guest from a reverse checkpoint (it said so),
    /// or reverse checkpoints cannot go on. Its held output is never released (only the
    /// source's acknowledgements release it, and there are none any more) and the process exits
    /// non-zero at once, without stopping the guest first: a guest of a superseded post-copy
    /// may be waiting for pages that will never come, and so may anything that pauses it.
    fn fence(&self, why: String) {
        if self.given_up.load(std::sync::atomic::Ordering::SeqCst) {
            tracing::warn!("not fenced ({why}): the source gave its copy up, this is the only copy");
            return;
        }
        if self.fenced.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        tracing::error!("FENCED: {why}; this copy of the guest stops and its held output is dropped");
        self.fail(format!("fenced: {why}"));
    }

    /// Serves Prometheus metrics built from the status report and the role (a non-loopback
    /// `addr` only when `public`).
    pub fn serve_metrics(self: &Arc<Self>, addr: std::net::SocketAddr, public: bool) -> Result<(), NodeError> {
        let weak = Arc::downgrade(self);
        crate::metrics::serve(
            addr,
            public,
            crate::metrics::Limits::default(),
            Arc::new(move || weak.upgrade().map(|n| n.metrics()).unwrap_or_default()),
        )?;
        Ok(())
    }

    /// The metrics text: the status by the Prometheus conventions, the role and the transitions
    /// so far.
    fn metrics(&self) -> String {
        let status = self.status();
        let role = self.role().kind();
        let transitions: Vec<_> =
            self.transitions.counts().into_iter().map(|(f, t, n)| (f.name(), t.name(), n)).collect();
        crate::metrics::render(&status) + &crate::metrics::render_role(role.name(), &transitions)
    }

    /// What `status` answers.
    pub fn status(&self) -> Status {
        let uptime_s = self.started.elapsed().as_secs_f64();
        let arbitration = self.arbitration_status();
        let role = self.role();
        let origin = role.origin();
        let migration = role.migration().map(|c| c.status());
        let (vm, protection) = match &*role {
            Role::Backup(s) => {
                return Status::Backup(BackupProcessStatus {
                    role: RoleName::Backup,
                    uptime_s,
                    memory_bytes: self.memory_bytes,
                    origin,
                    backup: Some(s.node.status()),
                    arbitration,
                    migration: None,
                });
            }
            Role::MigrationDestination(r) => {
                return Status::Backup(BackupProcessStatus {
                    role: RoleName::Destination,
                    uptime_s,
                    memory_bytes: self.memory_bytes,
                    origin,
                    backup: None,
                    arbitration,
                    migration: Some(lock(&r.progress).clone()),
                });
            }
            Role::Protected(p) => (Arc::clone(&p.guest.vm), Some(p.protection.report())),
            Role::Booted(g) | Role::Promoted(g) => {
                (Arc::clone(&g.vm), lock(&self.reverse).as_ref().map(|p| p.report()))
            }
            Role::MigrationSource(m) => (Arc::clone(&m.guest.vm), None),
        };
        drop(role);
        let vm = lock(&vm);
        let stopped_reason = vm.stopped().map(|r| match r {
            StopReason::Requested => "stopped by request".to_string(),
            StopReason::Failed(why) => why,
        });
        let state = if stopped_reason.is_some() {
            VmState::Stopped
        } else if vm.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        };
        Status::Vm(VmStatus {
            role: RoleName::Primary,
            state,
            uptime_s,
            memory_bytes: self.memory_bytes,
            cmdline: vm.cmdline().to_string(),
            origin,
            stopped_reason,
            protection,
            arbitration,
            migration,
            reprotect: self.reprotect_status(),
        })
    }

    /// Asks the process to exit (the first reason given is the one logged).
    pub fn request_exit(&self, why: String) {
        let mut e = lock(&self.exit);
        if e.why.is_none() {
            e.why = Some(why);
        }
        self.exit_changed.notify_all();
    }

    /// A part this process cannot do without stopped: exit non-zero with `why`.
    fn fail(&self, why: String) {
        lock(&self.exit).failed = Some(why.clone());
        self.request_exit(why);
    }

    /// Serves the API (if a socket is given) and blocks until the VM stops or an exit is
    /// requested ([`Node::request_exit`]: the API, a signal). Returns an error if the VM failed
    /// or a part the process cannot do without stopped.
    pub fn run_until_exit(self: &Arc<Self>, api_socket: Option<&Path>) -> Result<(), NodeError> {
        let api_in_flight = api::InFlight::default();
        if let Some(path) = api_socket {
            let listener = api::bind(path)?;
            let node = Arc::clone(self);
            let in_flight = Arc::clone(&api_in_flight);
            std::thread::Builder::new()
                .name("api".into())
                .spawn(move || api::serve(listener, in_flight, move |req| node.handle(req)))
                .map_err(|e| NodeError::Spawn("api", e))?;
            tracing::info!(socket = %path.display(), "admin api listening");
        }
        let outcome = loop {
            {
                let e = lock(&self.exit);
                let (e, _) =
                    self.exit_changed.wait_timeout(e, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner());
                if let Some(why) = &e.why {
                    tracing::info!("stopping: {why}");
                    break match e.failed.clone() {
                        Some(f) => Err(NodeError::Failed(f)),
                        None => Ok(()),
                    };
                }
            }
            self.record_backup_when_protected();
            let vm = self.role().vm();
            // (try_lock: a pause that waits on a guest stuck in a fault must not keep this loop
            // from seeing an exit request; the next round looks again.)
            let stopped = vm.and_then(|vm| match vm.try_lock() {
                Ok(g) => g.stopped(),
                Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner().stopped(),
                Err(std::sync::TryLockError::WouldBlock) => None,
            });
            if let Some(reason) = stopped {
                break match reason {
                    StopReason::Requested => Ok(()),
                    StopReason::Failed(why) => Err(NodeError::VmFailed(why)),
                };
            }
        };
        self.stop();
        // Answer what is being answered (the `shutdown` that brought us here) before the socket
        // goes away.
        api::drain(&api_in_flight, Duration::from_secs(2));
        if let Some(path) = api_socket {
            let _ = std::fs::remove_file(path);
        }
        let arbitration_failed = lock(&self.exit).arbitration_failed.clone();
        match arbitration_failed {
            Some(why) => Err(NodeError::ArbitrationFailed(why)),
            None => outcome,
        }
    }

    /// On the way out: protection stops, a backup's server stops, the VM shuts down. A fenced
    /// copy just goes (its guest may wait on pages that never come: see [`Node::fence`]).
    fn stop(&self) {
        if self.fenced.load(std::sync::atomic::Ordering::SeqCst) {
            tracing::warn!("fenced: exiting without stopping the guest (its output was never released)");
            return;
        }
        let mut role = self.role();
        let mut protected = None;
        if let Role::Protected(p) = &*role {
            let next = p.guest.clone().settled();
            protected = Some(self.enter(&mut role, next, "the process stops"));
        }
        if let Role::Backup(s) | Role::MigrationDestination(Receiving { standby: s, .. }) = &*role {
            let _ = s.stop.send(true);
        }
        let vm = role.vm();
        drop(role);
        if let Some(p) = lock(&self.reverse).take() {
            p.abandon(self.link.handle());
        }
        if let Some(Role::Protected(p)) = protected {
            let _ = p.protection.stop(&p.guest.vm, self.link.handle());
        }
        if let Some(vm) = vm {
            lock(&vm).shutdown();
        }
    }
}

#[cfg(test)]
mod link_thread_tests {
    use super::*;

    #[test]
    fn link_threads_default_to_one_and_refuse_nonsense_by_name() {
        assert_eq!(link_threads_from(None).unwrap(), LINK_THREADS);
        assert_eq!(link_threads_from(Some("2")).unwrap(), 2);
        for bad in ["0", "-1", "two", "", "65"] {
            let e = link_threads_from(Some(bad)).unwrap_err();
            let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
            assert!(chain.contains("UNDERSTUDY_LINK_THREADS") && chain.contains("1 to 64"), "{bad}: {chain}");
        }
    }
}
