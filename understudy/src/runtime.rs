//! One VM process: the VM, its admin API and its lifecycle (run, snapshot, restore, stop).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use vmm::vcpu::StopReason;
use vmm::vm::Vm;

use node::api::{self, AfterSnapshot, Request, Response};

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
    pub fn open(&self) -> Result<vmm::devices::serial::SerialOut> {
        Ok(match self {
            Self::Stdout => Box::new(std::io::stdout()),
            Self::Null => Box::new(std::io::sink()),
            Self::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("open serial output {}", p.display()))?,
            ),
        })
    }
}

pub use node::status::Origin;
use node::status::{ArbitrationState, ArbitrationStatus, BackupProcessStatus, RoleName, Status, VmState, VmStatus};

/// What a backup process needs to promote its replica.
pub struct BackupRole {
    /// The node (replica, status).
    pub node: Arc<backup::server::BackupNode>,
    /// Stops the server task.
    pub stop: tokio::sync::watch::Sender<bool>,
    /// TAP for the promoted VM's net device.
    pub tap: Option<String>,
    /// Where the promoted VM's serial output goes.
    pub serial: SerialTarget,
    /// Digest the replica when promoting (verification runs; costs time on the critical path).
    pub digest: bool,
}

/// A running VM (or a backup waiting to become one) and what the API reports about it.
pub struct Runtime {
    vm: Mutex<Option<Arc<Mutex<Vm>>>>,
    origin: Mutex<Origin>,
    started: Instant,
    memory_bytes: u64,
    exit: (Mutex<Option<String>>, Condvar),
    protection: Mutex<Option<node::protect::Protection>>,
    backup: Mutex<Option<BackupRole>>,
    tokio: tokio::runtime::Runtime,
    agent: Mutex<Option<Arc<failover::net::agent::Agent>>>,
    /// The gated output buffer arbitration installs on the net device.
    output: Mutex<Option<Arc<primary::output::OutputBuffer>>>,
    fenced: Mutex<Option<u64>>,
    /// Why the arbitration agent died, if it did (the process then exits non-zero).
    arbitration_failed: Mutex<Option<String>>,
    backup_recorded: Mutex<bool>,
    backup_node: Mutex<Option<u64>>,
    /// Set when a part this process cannot do without stopped: the process exits non-zero.
    failed: Mutex<Option<String>>,
    /// The VM's name (its identity on replication and migration sessions).
    vm_name: Mutex<String>,
    /// The migration away from here, once one was asked for.
    migration: Mutex<Option<Arc<primary::migrate::Control>>>,
    /// A migration destination's progress (this process waits for, or received, a migration).
    destination: Mutex<Option<Arc<Mutex<backup::receive::ReceiveStatus>>>>,
}

#[derive(Serialize)]
struct SnapshotReport {
    dir: PathBuf,
    snapshot_id: Option<String>,
    memory_digest: String,
    memory_bytes: u64,
    state_bytes: u64,
    paused_ms: f64,
    then: AfterSnapshot,
}

fn new_tokio() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("understudy-io")
        .enable_all()
        .build()
        .context("start the async runtime")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Runtime {
    /// Wraps a VM.
    pub fn new(vm: Vm, origin: Origin, memory_bytes: u64) -> Result<Arc<Self>> {
        let rt = Self::new_empty(origin, memory_bytes)?;
        *lock(&rt.vm) = Some(Arc::new(Mutex::new(vm)));
        Ok(rt)
    }

    /// Names the VM (`--vm`).
    pub fn set_vm_name(&self, name: &str) {
        *lock(&self.vm_name) = name.to_string();
    }

    /// A migration destination: waits for one migration from `cfg.source_name`; on the hand-over
    /// runs the guest (with `tap`, `serial`) and from then on is the VM's process. A migration
    /// that ends before the hand-over ends the process with an error, no guest run.
    pub fn new_destination(
        cfg: backup::receive::ReceiveConfig,
        ranges: &[(u64, u64)],
        tap: Option<String>,
        serial: SerialTarget,
        memory_bytes: u64,
    ) -> Result<Arc<Self>> {
        let node = backup::server::BackupNode::new(ranges, false)?;
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let listen = cfg.listen.to_string();
        let source = cfg.source_name.clone();
        let status = Arc::new(Mutex::new(backup::receive::ReceiveStatus::default()));
        let rt = Self::new_empty(Origin::Destination { listen }, memory_bytes)?;
        *lock(&rt.backup) = Some(BackupRole { node: Arc::clone(&node), stop, tap, serial, digest: false });
        *lock(&rt.destination) = Some(Arc::clone(&status));
        *lock(&rt.vm_name) = cfg.vm.name.clone();
        let weak = Arc::downgrade(&rt);
        let status2 = Arc::clone(&status);
        let promote: Box<dyn FnOnce(u64) -> std::result::Result<(), String> + Send> = Box::new(move |epoch| {
            let rt = weak.upgrade().ok_or("the process is stopping")?;
            let t0 = Instant::now();
            rt.promote().map_err(|e| format!("{e:#}"))?;
            let resume_ms = t0.elapsed().as_secs_f64() * 1e3;
            let memory_digest = lock(&status2).memory_digest.clone();
            *lock(&rt.origin) = Origin::Migrated { source: source.clone(), epoch, resume_ms, memory_digest };
            tracing::info!(epoch, resume_ms, "MIGRATED: the guest runs here");
            Ok(())
        });
        let weak = Arc::downgrade(&rt);
        rt.tokio.spawn(async move {
            if let Err(e) = backup::receive::receive(cfg, node, status, stop_rx, promote).await {
                let why = format!("{:#}", anyhow::Error::from(e));
                if let Some(rt) = weak.upgrade() {
                    *lock(&rt.failed) = Some(format!("migration: {why}"));
                    rt.request_exit(format!("migration: {why}"));
                }
            }
        });
        Ok(rt)
    }

    fn new_empty(origin: Origin, memory_bytes: u64) -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            vm: Mutex::new(None),
            origin: Mutex::new(origin),
            started: Instant::now(),
            memory_bytes,
            exit: (Mutex::new(None), Condvar::new()),
            protection: Mutex::new(None),
            backup: Mutex::new(None),
            tokio: new_tokio()?,
            agent: Mutex::new(None),
            output: Mutex::new(None),
            fenced: Mutex::new(None),
            arbitration_failed: Mutex::new(None),
            backup_recorded: Mutex::new(false),
            backup_node: Mutex::new(None),
            failed: Mutex::new(None),
            vm_name: Mutex::new("vm".into()),
            migration: Mutex::new(None),
            destination: Mutex::new(None),
        }))
    }

    /// A backup process: serves the primary until promoted.
    pub fn new_backup(
        mut cfg: backup::server::BackupConfig,
        tap: Option<String>,
        serial: SerialTarget,
        memory_bytes: u64,
        auto_promote: bool,
    ) -> Result<Arc<Self>> {
        let node = backup::server::BackupNode::new(&cfg.layout, cfg.prepare_vm)?;
        let (lost_tx, lost_rx) = std::sync::mpsc::channel::<backup::server::PrimaryLost>();
        cfg.on_primary_lost = Some(lost_tx);
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let listen = cfg.listen.to_string();
        let digest = cfg.verify;
        let n2 = Arc::clone(&node);
        let (failed_tx, failed_rx) = std::sync::mpsc::channel::<String>();
        let rt = Self::new_empty(Origin::Backup { listen }, memory_bytes)?;
        *lock(&rt.backup) = Some(BackupRole { node, stop, tap, serial, digest });
        rt.tokio.spawn(async move {
            if let Err(e) = backup::server::serve(cfg, n2, stop_rx).await {
                let _ = failed_tx.send(format!("{:#}", anyhow::Error::from(e)));
            }
        });
        // The server ends only on an error it cannot serve past (it cannot listen): a backup
        // that no longer listens protects nothing, so the process stops with that error.
        let weak_fail = Arc::downgrade(&rt);
        std::thread::Builder::new()
            .name("backup-server-watch".into())
            .spawn(move || {
                if let Ok(why) = failed_rx.recv() {
                    tracing::error!("backup server stopped: {why}");
                    if let Some(rt) = weak_fail.upgrade() {
                        *lock(&rt.failed) = Some(format!("backup server stopped: {why}"));
                        rt.request_exit(format!("backup server stopped: {why}"));
                    }
                }
            })
            .context("spawn server watch thread")?;
        let weak = Arc::downgrade(&rt);
        std::thread::Builder::new()
            .name("failover".into())
            .spawn(move || {
                while let Ok(lost) = lost_rx.recv() {
                    let Some(rt) = weak.upgrade() else { return };
                    let agent = lock(&rt.agent).clone();
                    use node::failover::LossAction;
                    match (node::failover::on_primary_lost(&lost, agent.is_some(), auto_promote), agent) {
                        (LossAction::Withdraw, Some(agent)) => {
                            let vm = agent.vm;
                            tracing::info!("{}: withdrawing a takeover request, if any", lost.reason);
                            if let Err(e) = agent.call(rt.tokio.handle(), move |a, now| a.report_primary_alive(now, vm))
                            {
                                tracing::error!("report primary alive: {e:#}");
                            }
                            continue;
                        }
                        (LossAction::AskGroup { gone, suspect }, Some(agent)) => {
                            let vm = agent.vm;
                            let what = if suspect { "suspect" } else { "lost" };
                            tracing::warn!(
                                epoch = lost.epoch,
                                "primary {what} ({}): asking the group for activity",
                                lost.reason
                            );
                            let report = agent.call(rt.tokio.handle(), move |a, now| {
                                if gone { a.report_primary_gone(now, vm) } else { a.report_primary_dead(now, vm) }
                            });
                            match report {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => tracing::error!("report primary dead: {e}"),
                                Err(e) => tracing::error!("report primary dead: {e:#}"),
                            }
                            continue;
                        }
                        (LossAction::Promote, _) => {}
                        (LossAction::LeaveToOperator, _) => {
                            tracing::error!(
                                epoch = lost.epoch,
                                "primary lost ({}); not promoting by itself: run `understudy promote`",
                                lost.reason
                            );
                            continue;
                        }
                        // Without arbitration nothing else rules out two active copies: a
                        // suspicion is only logged (the server did), the end of the session decides.
                        _ => continue,
                    }
                    let since_commit = lost.last_commit.map(|t| t.elapsed().as_secs_f64() * 1e3);
                    tracing::warn!(epoch = lost.epoch, ?since_commit, "primary lost ({}): promoting", lost.reason);
                    match rt.promote() {
                        Ok(v) => tracing::info!("auto-promotion done: {v}"),
                        Err(e) => tracing::error!("auto-promotion failed: {e:#}"),
                    }
                    return;
                }
            })
            .context("spawn failover thread")?;
        Ok(rt)
    }

    /// Serves Prometheus metrics built from the status report (a non-loopback `addr` only when
    /// `public`).
    pub fn serve_metrics(self: &Arc<Self>, addr: std::net::SocketAddr, public: bool) -> Result<()> {
        let weak = Arc::downgrade(self);
        node::metrics::serve(
            addr,
            public,
            node::metrics::Limits::default(),
            Arc::new(move || weak.upgrade().and_then(|rt| rt.status().ok()).unwrap_or(serde_json::Value::Null)),
        )?;
        Ok(())
    }

    /// Arbitration for a booted VM: install gated output, ask the group for activity and wait
    /// for the grant, keep the lease, obey fencing.
    pub fn start_primary_agent(self: &Arc<Self>, cfg: &failover::net::agent::AgentConfig, vm_name: &str) -> Result<()> {
        let agent = failover::net::agent::Agent::start(cfg, vm_name, self.tokio.handle())?;
        *lock(&self.agent) = Some(Arc::clone(&agent));
        self.watch_arbiter(&agent);
        self.install_gated_output(&agent)?;
        self.spawn_agent_events(&agent);
        let generation = agent.acquire(self.tokio.handle(), Duration::from_secs(30))?;
        tracing::info!(generation, "arbitration: this copy is active");
        Ok(())
    }

    /// Arbitration for a backup: report the primary's death to the group, promote only once
    /// granted.
    pub fn start_backup_agent(self: &Arc<Self>, cfg: &failover::net::agent::AgentConfig, vm_name: &str) -> Result<()> {
        let agent = failover::net::agent::Agent::start(cfg, vm_name, self.tokio.handle())?;
        *lock(&self.agent) = Some(Arc::clone(&agent));
        self.watch_arbiter(&agent);
        self.spawn_agent_events(&agent);
        Ok(())
    }

    /// A dead arbiter (its task ended: a journal that cannot be written, a panic) leaves this
    /// copy unable to renew its lease or to be granted anything. Rather than hold output for
    /// good (a primary whose backup still hears it is never failed over) or sit as a backup
    /// that can never be promoted, stop the guest and exit non-zero: the two other voters still
    /// form a quorum, so the group fails over from a dead primary or degrades without a dead
    /// backup, as after a crash.
    fn watch_arbiter(self: &Arc<Self>, agent: &failover::net::agent::Agent) {
        let weak = Arc::downgrade(self);
        agent.on_failure(self.tokio.handle(), move |why| {
            // Off the async runtime: stopping the guest waits for its vCPUs.
            std::thread::spawn(move || {
                if let Some(rt) = weak.upgrade() {
                    rt.arbitration_failed(why);
                }
            });
        });
    }

    fn arbitration_failed(&self, why: String) {
        tracing::error!("ARBITRATION FAILED: {why}; stopping this copy of the guest and exiting");
        *lock(&self.arbitration_failed) = Some(why.clone());
        if let Some(vm) = lock(&self.vm).clone() {
            let mut g = lock(&vm);
            let _ = g.pause();
            g.shutdown();
        }
        self.request_exit(format!("arbitration failed: {why}"));
    }

    /// The arbitration agent's state for `status`.
    fn arbitration_status(&self) -> Option<ArbitrationStatus> {
        let agent = lock(&self.agent).clone()?;
        let reason = agent.failure();
        let state = if reason.is_some() { ArbitrationState::Failed } else { ArbitrationState::Running };
        Some(ArbitrationStatus { node: agent.id, state, reason })
    }

    fn install_gated_output(self: &Arc<Self>, agent: &Arc<failover::net::agent::Agent>) -> Result<()> {
        let Some(vm) = lock(&self.vm).clone() else { return Ok(()) };
        let Some(out) = primary::output::install(&vm, Some(agent.gate()))? else { return Ok(()) };
        let o2 = Arc::clone(&out);
        agent.spawn_permit_refresher(self.tokio.handle(), move || {
            o2.flush_allowed();
        });
        *lock(&self.output) = Some(out);
        Ok(())
    }

    fn spawn_agent_events(self: &Arc<Self>, agent: &Arc<failover::net::agent::Agent>) {
        let Some(mut events) = lock(&agent.events).take() else { return };
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("arbitration-events".into())
            .spawn(move || {
                while let Some(ev) = events.blocking_recv() {
                    let Some(rt) = weak.upgrade() else { return };
                    rt.on_agent_event(ev);
                }
            })
            .expect("spawn arbitration event thread");
    }

    fn on_agent_event(self: &Arc<Self>, ev: failover::Event) {
        use failover::Event;
        match ev {
            Event::Granted { vm, generation } => {
                tracing::info!(vm = vm.0, generation, "arbitration: granted");
                if lock(&self.backup).is_some() {
                    match self.promote() {
                        Ok(v) => {
                            tracing::info!("promotion done: {v}");
                            if let Some(agent) = lock(&self.agent).clone()
                                && let Err(e) = self.install_gated_output(&agent)
                            {
                                tracing::error!("gate the promoted vm's output: {e:#}");
                            }
                        }
                        Err(e) => tracing::error!("promotion failed: {e:#}"),
                    }
                }
            }
            Event::Fenced { vm, generation } if lock(&self.vm).is_none() => {
                // A backup (re)joining under a node id that once held the VM: its old grant is
                // superseded; there is no guest here to stop.
                tracing::info!(vm = vm.0, generation, "arbitration: an old grant of this node is superseded");
            }
            Event::Fenced { vm, generation } => {
                tracing::error!(
                    vm = vm.0,
                    generation,
                    "FENCED: generation {generation} was granted elsewhere; stopping this copy of the guest for good"
                );
                *lock(&self.fenced) = Some(generation);
                if let Some(vm) = lock(&self.vm).clone() {
                    let mut g = lock(&vm);
                    let _ = g.pause();
                    g.shutdown();
                }
                self.request_exit(format!("fenced by generation {generation}"));
            }
            Event::Degraded { vm, generation } => {
                tracing::error!(vm = vm.0, generation, "arbitration: the group agreed the primary runs degraded");
                // The group dropped the backup: once a backup is synced again it must be
                // recorded again, or it would not be a failover target.
                *lock(&self.backup_recorded) = false;
                if let Some(o) = lock(&self.output).clone() {
                    o.set_passthrough(true);
                }
            }
            Event::LeaseLost { vm, generation } => {
                tracing::warn!(vm = vm.0, generation, "arbitration: lease lost, output held")
            }
            Event::LeaseRegained { vm, generation } => {
                tracing::info!(vm = vm.0, generation, "arbitration: lease regained")
            }
            Event::BackupDropped { vm, generation } => {
                tracing::warn!(vm = vm.0, generation, "arbitration: this replica is no longer a failover target")
            }
            other => tracing::info!("arbitration: {other:?}"),
        }
    }

    fn vm_arc(&self) -> Result<Arc<Mutex<Vm>>> {
        lock(&self.vm).clone().ok_or_else(|| anyhow!("this process holds a backup replica, not a running vm"))
    }

    fn request_exit(&self, why: String) {
        let mut e = self.exit.0.lock().unwrap_or_else(|e| e.into_inner());
        if e.is_none() {
            *e = Some(why);
        }
        self.exit.1.notify_all();
    }

    /// Handles one API request.
    pub fn handle(&self, req: Request) -> Response {
        let r = match req {
            Request::Status => self.status(),
            Request::Pause => self.pause(),
            Request::Resume => self.resume(),
            Request::Protect(req) => self.protect(req),
            Request::Unprotect => self.unprotect(),
            Request::VerifyJournal => self.verify_journal(),
            Request::Promote { force } => self.promote_request(force),
            Request::OutputJournal => self.output_journal(),
            Request::Snapshot { dir, then } => self.snapshot(&dir, then),
            Request::MemoryDigest => self.digest(),
            Request::Migrate(req) => self.migrate(req),
            Request::MigrateCancel => self.migrate_cancel(),
            Request::Shutdown => {
                self.request_exit("shutdown requested through the api".into());
                Ok(serde_json::json!({"state": "stopping"}))
            }
        };
        match r {
            Ok(v) => Response::ok(v),
            Err(e) => Response::err(e.as_ref()),
        }
    }

    /// Refuses what would touch a guest being migrated away (or already handed over).
    fn not_migrating(&self, what: &str) -> Result<()> {
        if let Some(c) = lock(&self.migration).as_ref() {
            let phase = c.status().phase;
            if phase != "failed" {
                bail!("cannot {what}: a migration is {phase}");
            }
        }
        Ok(())
    }

    /// `understudy migrate`: runs the migration to its end (this API call waits); on success the
    /// guest runs at the destination and this process exits.
    fn migrate(&self, req: primary::migrate::MigrateRequest) -> Result<serde_json::Value> {
        req.validate()?;
        let vm = self.vm_arc()?;
        if lock(&self.protection).is_some() {
            bail!("the vm is protected: unprotect it before migrating it");
        }
        if lock(&self.agent).is_some() {
            bail!("the vm is under arbitration: migrating it is not supported yet");
        }
        let control = {
            let mut m = lock(&self.migration);
            if let Some(c) = m.as_ref()
                && c.status().phase != "failed"
            {
                bail!("a migration is already {}", c.status().phase);
            }
            let c = Arc::new(primary::migrate::Control::default());
            *m = Some(Arc::clone(&c));
            c
        };
        let name = lock(&self.vm_name).clone();
        let src = node::migrate::source(&vm, &name, control)?;
        let to = req.to;
        let report = self.tokio.block_on(primary::migrate::migrate(src, req))?;
        self.request_exit(format!("migrated to {to}"));
        Ok(serde_json::to_value(report)?)
    }

    fn migrate_cancel(&self) -> Result<serde_json::Value> {
        let c = lock(&self.migration).clone().ok_or_else(|| anyhow!("no migration is running"))?;
        let phase = c.status().phase;
        if !c.cancel() {
            bail!("the migration is {phase}: too late to cancel (the guest was handed over, or it failed already)");
        }
        Ok(serde_json::json!({"cancelled": true, "phase": phase}))
    }

    fn pause(&self) -> Result<serde_json::Value> {
        self.not_migrating("pause")?;
        let vm = self.vm_arc()?;
        lock(&vm).pause()?;
        Ok(serde_json::json!({"state": "paused"}))
    }

    fn resume(&self) -> Result<serde_json::Value> {
        self.not_migrating("resume")?;
        let vm = self.vm_arc()?;
        lock(&vm).resume();
        Ok(serde_json::json!({"state": "running"}))
    }

    fn protect(&self, req: node::protect::ProtectRequest) -> Result<serde_json::Value> {
        node::protect::validate(&req)?;
        self.not_migrating("protect")?;
        let vm = self.vm_arc()?;
        let mut p = lock(&self.protection);
        if p.is_some() {
            bail!("the vm is already protected (unprotect first)");
        }
        let agent = lock(&self.agent).clone();
        let hook: Option<Arc<dyn Fn() + Send + Sync>> = agent.as_ref().map(|a| {
            let a = Arc::clone(a);
            let h = self.tokio.handle().clone();
            Arc::new(move || {
                let vm = a.vm;
                let handle = a.handle.clone();
                h.spawn(async move {
                    match handle.call(move |ar, now| ar.report_backup_dead(now, vm)).await {
                        Ok(Ok(())) => tracing::warn!("backup lost: asked the group to run degraded"),
                        Ok(Err(e)) => tracing::error!("report backup dead: {e}"),
                        Err(e) => tracing::error!("report backup dead: {e}"),
                    }
                });
            }) as Arc<dyn Fn() + Send + Sync>
        });
        let existing = lock(&self.output).clone();
        *lock(&self.backup_recorded) = false;
        *p = Some(
            node::protect::Protection::start(&vm, &req, self.tokio.handle(), existing, hook)
                .context("start protection")?,
        );
        *lock(&self.backup_node) = req.backup_node;
        Ok(serde_json::json!({"state": "syncing", "backup": req.backup.to_string()}))
    }

    fn unprotect(&self) -> Result<serde_json::Value> {
        let vm = self.vm_arc()?;
        let p = lock(&self.protection).take().ok_or_else(|| anyhow!("the vm is not protected"))?;
        p.stop(&vm, self.tokio.handle())?;
        Ok(serde_json::json!({"state": "unprotected"}))
    }

    fn verify_journal(&self) -> Result<serde_json::Value> {
        if let Some(p) = lock(&self.protection).as_ref() {
            return Ok(serde_json::to_value(&*lock(&p.journal))?);
        }
        if let Some(b) = lock(&self.backup).as_ref() {
            return Ok(serde_json::to_value(b.node.journal())?);
        }
        bail!("no protection or backup here: nothing was verified")
    }

    fn output_journal(&self) -> Result<serde_json::Value> {
        let p = lock(&self.protection);
        let p = p.as_ref().ok_or_else(|| anyhow!("the vm is not protected"))?;
        let o = p.output.as_ref().ok_or_else(|| anyhow!("the vm has no network device"))?;
        Ok(serde_json::json!({ "now_ns": primary::output::monotonic_ns(), "released": o.journal() }))
    }

    /// `understudy promote`: with arbitration, ask the group (the `Granted` event promotes)
    /// and wait for it; without, or forced, promote at once.
    fn promote_request(&self, force: bool) -> Result<serde_json::Value> {
        if lock(&self.destination).is_some() {
            bail!("this process is a migration destination: it runs the guest when the source hands it over");
        }
        if lock(&self.backup).is_none() {
            bail!("this process is not a backup (or was promoted already)");
        }
        let Some(agent) = lock(&self.agent).clone() else { return self.promote() };
        if force {
            tracing::error!(
                "FORCED PROMOTION without the arbitration group's grant: if the primary is alive, two copies now run"
            );
            let mut v = self.promote()?;
            v["forced"] = true.into();
            return Ok(v);
        }
        let vm = agent.vm;
        tracing::warn!("promotion requested through the api: asking the arbitration group");
        match agent.call(self.tokio.handle(), move |a, now| a.report_primary_dead(now, vm))? {
            Ok(()) => {}
            Err(e) => bail!(
                "the arbitration group cannot grant this backup activity ({e}); `understudy promote --force` \
                 promotes without the group, risking two active copies"
            ),
        }
        let timeout = Duration::from_secs(10);
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if lock(&self.vm).is_some() {
                let origin = lock(&self.origin).clone();
                return Ok(serde_json::json!({ "state": "running", "granted": true, "origin": origin }));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Not granted: the primary still holds (and renews) its lease. Withdraw the request so
        // a later grant cannot surprise anybody.
        let _ = agent.call(self.tokio.handle(), move |a, now| a.report_primary_alive(now, vm));
        bail!(
            "the arbitration group did not grant this backup activity within {}s: the primary still holds its \
             lease (it is alive, or the group has no quorum); `understudy promote --force` promotes without the \
             group, risking two active copies",
            timeout.as_secs()
        )
    }

    fn promote(&self) -> Result<serde_json::Value> {
        let t0 = Instant::now();
        let role = lock(&self.backup)
            .take()
            .ok_or_else(|| anyhow!("this process is not a backup (or was promoted already)"))?;
        let replica = match role.node.take_replica() {
            Ok(r) => r,
            Err(e) => {
                *lock(&self.backup) = Some(role);
                return Err(e).context("promote");
            }
        };
        let _ = role.stop.send(true);
        let prepared = role.node.take_prepared_vm();
        let opts = backup::promote::PromoteOptions {
            requested: t0,
            serial: role.serial.open()?,
            tap: role.tap.clone(),
            digest: role.digest,
        };
        let (vm, promoted) = backup::promote::promote(replica, prepared, opts)?;
        *lock(&self.vm) = Some(Arc::new(Mutex::new(vm)));
        *lock(&self.origin) = Origin::Promoted {
            epoch: promoted.epoch,
            memory_digest: promoted.memory_digest.clone(),
            promote_ms: promoted.promote_ms,
        };
        let mut v = serde_json::to_value(&promoted)?;
        v["state"] = "running".into();
        Ok(v)
    }

    fn status(&self) -> Result<serde_json::Value> {
        Ok(serde_json::to_value(self.typed_status())?)
    }

    /// What `status` answers.
    pub fn typed_status(&self) -> Status {
        let uptime_s = self.started.elapsed().as_secs_f64();
        let Some(vm) = lock(&self.vm).clone() else {
            let destination = lock(&self.destination).as_ref().map(|d| lock(d).clone());
            return Status::Backup(BackupProcessStatus {
                role: if destination.is_some() { RoleName::Destination } else { RoleName::Backup },
                uptime_s,
                memory_bytes: self.memory_bytes,
                origin: lock(&self.origin).clone(),
                backup: if destination.is_some() { None } else { lock(&self.backup).as_ref().map(|b| b.node.status()) },
                arbitration: self.arbitration_status(),
                migration: destination,
            });
        };
        let protection = lock(&self.protection).as_ref().map(|p| p.report());
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
            origin: lock(&self.origin).clone(),
            stopped_reason,
            protection,
            arbitration: self.arbitration_status(),
            migration: lock(&self.migration).as_ref().map(|c| c.status()),
        })
    }

    fn snapshot(&self, dir: &Path, then: AfterSnapshot) -> Result<serde_json::Value> {
        self.not_migrating("snapshot")?;
        let vm = self.vm_arc()?;
        let mut vm = lock(&vm);
        let was_paused = vm.is_paused();
        let t0 = Instant::now();
        vm.pause()?;
        let result = (|| -> Result<vmm::snapshot::SnapshotInfo> {
            let state = vm.save_state()?;
            // SAFETY: the VM is paused: vCPUs are parked and nothing else writes guest memory.
            Ok(unsafe { vmm::snapshot::write(dir, vm.memory(), &state) }?)
        })();
        let paused_ms = t0.elapsed().as_secs_f64() * 1e3;
        let info = match result {
            Ok(info) => info,
            Err(e) => {
                if !was_paused {
                    vm.resume();
                }
                return Err(e.context(format!("snapshot into {}", dir.display())));
            }
        };
        match then {
            AfterSnapshot::Resume if !was_paused => vm.resume(),
            AfterSnapshot::Exit => self.request_exit(format!("exit after snapshot into {}", dir.display())),
            _ => {}
        }
        tracing::info!(
            dir = %dir.display(),
            digest = format_args!("{:016x}", info.memory_digest),
            paused_ms,
            "snapshot written"
        );
        Ok(serde_json::to_value(SnapshotReport {
            dir: dir.to_path_buf(),
            snapshot_id: info.snapshot_id,
            memory_digest: format!("{:016x}", info.memory_digest),
            memory_bytes: info.memory_bytes,
            state_bytes: info.state_bytes,
            paused_ms,
            then,
        })?)
    }

    fn digest(&self) -> Result<serde_json::Value> {
        if lock(&self.vm).is_none() {
            let b = lock(&self.backup);
            let node = &b.as_ref().ok_or_else(|| anyhow!("no vm and no replica"))?.node;
            let _ = node;
            bail!("a backup's replica digest is in `verify-journal`");
        }
        let vm = self.vm_arc()?;
        let mut vm = lock(&vm);
        let was_paused = vm.is_paused();
        vm.pause()?;
        // SAFETY: paused: nothing writes guest memory.
        let d = unsafe { vmm::memory::digest(vm.memory()) };
        if !was_paused {
            vm.resume();
        }
        Ok(serde_json::json!({ "memory_digest": format!("{d:016x}") }))
    }

    /// Serves the API (if a socket is given) and blocks until the VM stops or an exit is
    /// requested (API, SIGINT, SIGTERM). Returns an error if the VM failed.
    pub fn run_until_exit(self: &Arc<Self>, api_socket: Option<&Path>) -> Result<()> {
        let api_in_flight = api::InFlight::default();
        if let Some(path) = api_socket {
            let listener = api::bind(path)?;
            let rt = Arc::clone(self);
            let in_flight = Arc::clone(&api_in_flight);
            std::thread::Builder::new()
                .name("api".into())
                .spawn(move || api::serve(listener, in_flight, move |req| rt.handle(req)))
                .context("spawn api thread")?;
            tracing::info!(socket = %path.display(), "admin api listening");
        }
        let rt = Arc::clone(self);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let sig = wait_for_termination_signal();
                rt.request_exit(format!("signal {sig}"));
            })
            .context("spawn signal thread")?;

        let outcome = loop {
            {
                let e = self.exit.0.lock().unwrap_or_else(|e| e.into_inner());
                let (e, _) = self.exit.1.wait_timeout(e, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner());
                if let Some(why) = e.clone() {
                    tracing::info!("stopping: {why}");
                    break match lock(&self.failed).clone() {
                        Some(f) => Err(anyhow!(f)),
                        None => Ok(()),
                    };
                }
            }
            self.record_backup_when_protected();
            let vm = lock(&self.vm).clone();
            if let Some(vm) = vm
                && let Some(reason) = lock(&vm).stopped()
            {
                break match reason {
                    StopReason::Requested => Ok(()),
                    StopReason::Failed(why) => Err(anyhow!("vm failed: {why}")),
                };
            }
        };
        if let Some(p) = lock(&self.protection).take()
            && let Some(vm) = lock(&self.vm).clone()
        {
            let _ = p.stop(&vm, self.tokio.handle());
        }
        if let Some(b) = lock(&self.backup).take() {
            let _ = b.stop.send(true);
        }
        if let Some(vm) = lock(&self.vm).clone() {
            lock(&vm).shutdown();
        }
        // Answer what is being answered (the `shutdown` that brought us here) before the socket
        // goes away.
        api::drain(&api_in_flight, Duration::from_secs(2));
        if let Some(path) = api_socket {
            let _ = std::fs::remove_file(path);
        }
        match lock(&self.arbitration_failed).clone() {
            Some(why) => Err(anyhow!("arbitration failed: {why}")),
            None => outcome,
        }
    }

    /// With arbitration: once the backup holds a consistent replica, record it in the group so
    /// it may be promoted.
    fn record_backup_when_protected(&self) {
        if *lock(&self.backup_recorded) {
            return;
        }
        let Some(agent) = lock(&self.agent).clone() else { return };
        let Some(node) = *lock(&self.backup_node) else { return };
        let protected = lock(&self.protection)
            .as_ref()
            .is_some_and(|p| p.stats.state() == primary::stats::ProtectionState::Protected);
        if !protected {
            return;
        }
        let vm = agent.vm;
        match agent.call(self.tokio.handle(), move |a, now| a.set_backup(now, vm, node)) {
            Ok(Ok(())) => {
                tracing::info!(backup = node, "arbitration: asked the group to record the backup");
                *lock(&self.backup_recorded) = true;
            }
            Ok(Err(e)) => tracing::warn!("record backup: {e}"),
            Err(e) => tracing::warn!("record backup: {e:#}"),
        }
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread and every thread it spawns afterwards;
/// call first thing in `main`.
pub fn block_termination_signals() {
    // SAFETY: plain sigset manipulation on a local set; pthread_sigmask on the current thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Waits for SIGINT or SIGTERM (blocked in every thread by `block_termination_signals`).
pub fn wait_for_termination_signal() -> i32 {
    // SAFETY: sigwait on a local set of signals blocked in every thread (see
    // `block_termination_signals`).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
        sig
    }
}
