//! Protection of a running VM (the primary side): the request `understudy protect` sends, and
//! the running protection (epoch engine thread, replication link task, output commit).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use primary::engine::{Engine, EngineConfig, EpochTiming, LinkShared};
use primary::link::{Journal, LinkConfig};
use primary::output::OutputBuffer;
use primary::stats::{ProtectionState, Stats};
use replication_proto::{Role, Sender, SenderConfig};
use serde::{Deserialize, Serialize};
use vmm::vm::{Vm, VmError};

/// The longest reverse epoch of a guest that emits no output ([`Protection::start_reverse`]).
pub const REVERSE_EPOCH_MAX: Duration = Duration::from_millis(200);

/// Errors of protection.
#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    /// This host's certificates could not be loaded.
    #[error(transparent)]
    Identity(#[from] transport::certs::LoadError),
    /// Our certificate may not replicate.
    #[error(transparent)]
    Policy(#[from] transport::PolicyError),
    /// The VM's memory layout cannot be replicated.
    #[error(transparent)]
    Layout(#[from] backup::server::BackupError),
    /// No random instance number for the sender.
    #[error("sender instance number")]
    Random(#[source] transport::RandomError),
    /// The VM could not be paused to swap its output sink.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The epoch engine thread could not start.
    #[error("spawn epoch engine")]
    Spawn(#[source] std::io::Error),
    /// `epoch_min_ms` > `epoch_max_ms`.
    #[error("epoch bounds {min}..{max} ms are reversed")]
    EpochBounds {
        /// The lower bound.
        min: u64,
        /// The upper bound.
        max: u64,
    },
    /// An output coalescing window over 1 s.
    #[error("output coalescing window of {0} µs is longer than 1 s")]
    Coalesce(u64),
    /// `pause_copy_threads` other than 1 or 2.
    #[error("--pause-copy-threads {0}: 1 or 2 threads copy a checkpoint's pages")]
    CopyThreads(u8),
    /// An in-epoch pre-copy lead over 1 s.
    #[error("--epoch-precopy-us {0}: at most 1000000 (1 s)")]
    Precopy(u32),
    /// A sync piece outside 1-1024 MiB.
    #[error("--sync-piece-mib {0}: a sync's pieces are 1-1024 MiB")]
    SyncPiece(u32),
    /// A real-time priority over 99.
    #[error("--pause-rt-priority {0}: SCHED_FIFO priorities are 1-99 (0: off)")]
    RtPriority(u8),
    /// A fixed epoch over 10 s.
    #[error("epoch of {0} ms is longer than 10 s")]
    EpochTooLong(u64),
    /// A reverse series that cannot start where the switch-over was.
    #[error("reverse checkpoints cannot start")]
    Start(#[source] replication_proto::migration::StartError),
}

/// What `understudy protect` asks for (its command-line flags, and the API request).
#[derive(Debug, Clone, Serialize, Deserialize, clap::Args)]
pub struct ProtectRequest {
    /// The backup's address (host:port).
    #[arg(long)]
    pub backup: SocketAddr,
    /// The backup's certificate name.
    #[arg(long, default_value = "backup")]
    pub backup_name: String,
    /// Directory with ca.pem and this host's certificate and key (`understudy certs`).
    #[arg(long)]
    pub certs: PathBuf,
    /// This host's certificate name.
    #[arg(long, default_value = "primary")]
    pub name: String,
    /// The VM's name; the backup must be started with the same `--vm`.
    #[arg(long = "vm", value_name = "VM", default_value = "vm")]
    pub vm_name: String,
    /// Fixed epoch length in ms (default: adaptive between --epoch-min-ms and --epoch-max-ms).
    #[serde(default)]
    #[arg(long, default_value_t = 0)]
    pub epoch_ms: u64,
    /// Shortest adaptive epoch, ms (0: no floor; held output then ends an epoch as soon as its
    /// coalescing window or the guest's idleness says).
    #[serde(default = "default_min")]
    #[arg(long, default_value_t = default_min())]
    pub epoch_min_ms: u64,
    /// Longest adaptive epoch, ms (a guest that emits no output runs epochs this long at
    /// most).
    #[serde(default = "default_max")]
    #[arg(long, default_value_t = default_max())]
    pub epoch_max_ms: u64,
    /// Output-driven epochs: when the guest's output is held, end the epoch at most this many
    /// µs after its first held frame (replies emitted together share a checkpoint); the
    /// window is 50 µs per frame the previous epoch held, so a lone reply leaves after 50 µs.
    /// Lower: less added latency, more pauses under load (CPU for latency). 0: output does
    /// not shorten epochs.
    #[serde(default = "default_coalesce")]
    #[arg(long, default_value_t = default_coalesce())]
    pub output_coalesce_us: u64,
    /// With output held, end the epoch as soon as the guest is idle (its vCPUs halted, its
    /// device workers asleep) instead of waiting out --output-coalesce-us (`false`: always
    /// wait the whole window).
    #[serde(default = "default_true")]
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub output_idle_end: bool,
    /// With output held, end the epoch as soon as it holds as many frames as the previous
    /// epoch did (the burst the window expects came: a lone reply leaves at once, a busy
    /// server's burst when it is complete) instead of waiting out --output-coalesce-us or the
    /// guest's idleness. On by default since session 12 (docs/protection.md): it commits a
    /// reply's epoch sooner, so more kills land after the commit and before the release, and a
    /// backup that keeps an output log (`understudy backup`, default) writes such a reply at
    /// promotion itself (docs/failover.md, "Output at promotion"); `false` waits as before.
    #[serde(default = "default_true")]
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub output_burst_end: bool,
    /// Threads that copy a checkpoint's pages during the pause: 2 (the caller and a helper;
    /// the vCPUs' cores are idle then) or 1.
    #[serde(default = "default_copy_threads")]
    #[arg(long, default_value_t = default_copy_threads())]
    pub pause_copy_threads: u8,
    /// Pages the guest rewrites every epoch stay writable (and are copied at every checkpoint)
    /// for up to this many epochs instead of taking a write-protect fault each epoch (0: protect
    /// every dirty page again at every checkpoint).
    #[serde(default = "default_hot_page_epochs")]
    #[arg(long, default_value_t = default_hot_page_epochs())]
    pub hot_page_epochs: u8,
    /// A page the guest rewrites within this many epochs of its last checkpoint (not every
    /// epoch: a server's per-connection buffers) stays writable too, at most 32 such pages at
    /// once (1: only pages rewritten every epoch; docs/protection.md, "Hot pages").
    #[serde(default = "default_hot_page_window")]
    #[arg(long, default_value_t = default_hot_page_window())]
    pub hot_page_window: u8,
    /// Real-time (`SCHED_FIFO`) priority of the pause's threads while the vCPUs are parked, so
    /// that nothing else on the host preempts a pause (1-99; 0: the ordinary policy). Needs
    /// CAP_SYS_NICE or an RLIMIT_RTPRIO: without, protection warns once and pauses at the
    /// ordinary priority.
    #[serde(default = "default_rt_priority")]
    #[arg(long, default_value_t = default_rt_priority())]
    pub pause_rt_priority: u8,
    /// In-epoch pre-copy: this many µs before a silent epoch ends, copy the pages dirtied so
    /// far while the guest runs, so the pause copies only those dirtied after (0: off). Shorter
    /// pauses for guests that dirty many pages; the price: pages written again after it take
    /// one more write-protect fault and are copied twice (off the pause).
    #[serde(default = "default_precopy")]
    #[arg(long, default_value_t = default_precopy())]
    pub epoch_precopy_us: u32,
    /// A sync's full copy goes to the backup in pieces of at most this many MiB of non-zero
    /// pages (1-1024), each its own epoch on the wire, so heartbeats flow between them on
    /// both ends however large the guest (docs/protection.md, "Initial sync").
    #[serde(default = "default_sync_piece_mib")]
    #[arg(long, default_value_t = default_sync_piece_mib())]
    pub sync_piece_mib: u32,
    /// How long the backup may be unreachable before running degraded, ms.
    #[serde(default = "default_degrade")]
    #[arg(long, default_value_t = default_degrade())]
    pub degrade_after_ms: u64,
    /// Digest guest memory every N checkpoints for `ctl verify-journal` (tests; 0 = off).
    #[serde(default)]
    #[arg(long, default_value_t = 0)]
    pub verify_every: u64,
    /// Heartbeat interval to the backup, ms.
    #[serde(default = "default_heartbeat")]
    #[arg(long, default_value_t = default_heartbeat())]
    pub heartbeat_ms: u64,
    /// Silence after which the link to the backup counts as broken, ms.
    #[serde(default = "default_detect")]
    #[arg(long, default_value_t = default_detect())]
    pub detect_ms: u64,
    /// The backup's arbitration node id (with arbitration).
    #[serde(default)]
    #[arg(long)]
    pub backup_node: Option<u64>,
}

fn default_true() -> bool {
    true
}
fn default_copy_threads() -> u8 {
    2
}
fn default_hot_page_epochs() -> u8 {
    32
}
fn default_hot_page_window() -> u8 {
    vmm::dirty::DEFAULT_HOT_WINDOW
}
fn default_rt_priority() -> u8 {
    1
}
fn default_precopy() -> u32 {
    2000
}
fn default_sync_piece_mib() -> u32 {
    ((primary::engine::SYNC_PIECE_PAGES * vmm::memory::PAGE_SIZE) >> 20) as u32
}
impl ProtectRequest {
    /// A request to protect to `backup` with every other setting at its default (as
    /// `understudy protect --backup ADDR --certs certs` without other flags).
    pub fn defaults(backup: SocketAddr) -> Self {
        Self {
            backup,
            backup_name: "backup".into(),
            certs: "certs".into(),
            name: "primary".into(),
            vm_name: "vm".into(),
            epoch_ms: 0,
            epoch_min_ms: default_min(),
            epoch_max_ms: default_max(),
            output_coalesce_us: default_coalesce(),
            output_idle_end: true,
            output_burst_end: true,
            pause_copy_threads: default_copy_threads(),
            hot_page_epochs: default_hot_page_epochs(),
            hot_page_window: default_hot_page_window(),
            pause_rt_priority: default_rt_priority(),
            epoch_precopy_us: default_precopy(),
            sync_piece_mib: default_sync_piece_mib(),
            verify_every: 0,
            degrade_after_ms: default_degrade(),
            heartbeat_ms: default_heartbeat(),
            detect_ms: default_detect(),
            backup_node: None,
        }
    }
}

fn default_heartbeat() -> u64 {
    20
}
fn default_detect() -> u64 {
    1000
}

/// Protocol timing from heartbeat, detection and suspicion settings (`suspect_ms` 0: none).
pub fn timing(heartbeat_ms: u64, detect_ms: u64, suspect_ms: u64) -> replication_proto::Timing {
    replication_proto::Timing {
        heartbeat_interval: Duration::from_millis(heartbeat_ms.max(1)),
        idle_timeout: Duration::from_millis(detect_ms.max(heartbeat_ms.max(1) * 2)),
        suspect_after: (suspect_ms > 0).then(|| Duration::from_millis(suspect_ms.max(heartbeat_ms.max(1) * 2))),
    }
}

fn default_min() -> u64 {
    1
}
fn default_coalesce() -> u64 {
    500
}
fn default_max() -> u64 {
    50
}
fn default_degrade() -> u64 {
    500
}

/// A running protection.
pub struct Protection {
    shared: Arc<LinkShared>,
    pub stats: Arc<Stats>,
    pub output: Option<Arc<OutputBuffer>>,
    pub journal: Journal,
    engine: Option<std::thread::JoinHandle<Result<(), primary::engine::EngineError>>>,
    link: Option<tokio::task::JoinHandle<()>>,
    /// The holding buffer is this protection's own (not the arbitration's gated one): stopping
    /// puts the plain sink back. The arbitration's buffer stays in place, passing frames
    /// through, so the lease still gates the output and a later protection holds in it again.
    own_output: bool,
}

impl Protection {
    /// Starts protecting `vm` as `req` says, on `rt`.
    pub fn start(
        vm: &Arc<Mutex<Vm>>,
        req: &ProtectRequest,
        rt: &tokio::runtime::Handle,
        existing_output: Option<Arc<OutputBuffer>>,
        backup_lost: Option<Arc<dyn Fn() + Send + Sync>>,
    ) -> Result<Self, ProtectError> {
        let identity = transport::Identity::load_named(&req.certs, &req.name)?;
        transport::PeerPolicy::replication().check_own(&identity)?;
        let layout = {
            let g = vm.lock().unwrap_or_else(|e| e.into_inner());
            vmm::memory::layout_of(g.memory())
        };
        let proto_layout = backup::server::proto_layout(&layout)?;
        let instance = transport::random_u64().map_err(ProtectError::Random)?;
        let mut scfg =
            SenderConfig::new(Role::Primary, backup::server::vm_identity(&req.vm_name), proto_layout, instance);
        scfg.timing = timing(req.heartbeat_ms, req.detect_ms, 0);
        let sender = Sender::new(scfg);
        // Output commit: a holding buffer on the net device (or the gated one arbitration
        // installed at boot).
        let own_output = existing_output.is_none();
        let output = match existing_output {
            Some(o) => Some(o),
            None => primary::output::install(vm, None)?,
        };
        let cfg = EngineConfig {
            timing: epoch_timing(req),
            verify_every: req.verify_every,
            parallel_copy: req.pause_copy_threads >= 2,
            hot_page_epochs: req.hot_page_epochs,
            hot_page_window: req.hot_page_window,
            idle_end: req.output_idle_end,
            burst_end: req.output_burst_end,
            pause_rt_priority: req.pause_rt_priority,
            epoch_precopy: (req.epoch_precopy_us > 0).then(|| Duration::from_micros(u64::from(req.epoch_precopy_us))),
            sync_piece_pages: ((req.sync_piece_mib as usize) << 20) / vmm::memory::PAGE_SIZE,
            ..EngineConfig::default()
        };
        let bind = if req.backup.is_ipv4() {
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
        } else {
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
        };
        let mut link_cfg = LinkConfig::protection(req.backup, req.backup_name.clone(), identity, bind);
        link_cfg.inbound = install_inbound(vm, output.as_ref());
        let degrade = Duration::from_millis(req.degrade_after_ms);
        let mut p = Self::spawn(vm, output, sender, cfg, link_cfg, degrade, backup_lost, rt, "epoch-engine")?;
        p.own_output = own_output;
        tracing::info!(backup = %req.backup, "protection starting");
        Ok(p)
    }

    /// Starts the link task (to `link_cfg`'s backup, running `sender`) and the epoch engine
    /// thread (`cfg`; `backup_lost` instead of releasing output when the backup is lost).
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        vm: &Arc<Mutex<Vm>>,
        output: Option<Arc<OutputBuffer>>,
        sender: Sender,
        cfg: EngineConfig,
        link_cfg: LinkConfig,
        degrade_after: Duration,
        backup_lost: Option<Arc<dyn Fn() + Send + Sync>>,
        rt: &tokio::runtime::Handle,
        thread: &str,
    ) -> Result<Self, ProtectError> {
        let stats = Arc::new(Stats::new(link_cfg.backup.to_string()));
        let shared = Arc::new(LinkShared::default());
        let journal: Journal = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::mpsc::channel(cfg.window + 2);
        let link = rt.spawn(primary::link::run(
            link_cfg,
            sender,
            rx,
            Arc::clone(&shared),
            output.clone(),
            Arc::clone(&stats),
            Arc::clone(&journal),
        ));
        let mut engine = Engine::new(
            Arc::clone(vm),
            output.clone(),
            Arc::clone(&stats),
            Arc::clone(&shared),
            cfg,
            tx,
            degrade_after,
        );
        if let Some(hook) = backup_lost {
            engine = engine.on_backup_lost(hook);
        }
        let engine =
            std::thread::Builder::new().name(thread.into()).spawn(move || engine.run()).map_err(ProtectError::Spawn)?;
        Ok(Self { shared, stats, output, journal, engine: Some(engine), link: Some(link), own_output: true })
    }

    /// Reverse checkpoints of a post-copy destination (`docs/failure-model.md`): checkpoints
    /// `vm` back to its source, `to`, from the switch-over on. `vm` is paused and has not run
    /// since it was built: dirty logging goes on and its output is held from the first frame
    /// (`output`, from [`primary::output::install_held`], holding from harvest 1), so nothing
    /// the guest does escapes a checkpoint. No sync (the source holds the switch-over), never
    /// degraded: output leaves only once the source acknowledged the epoch that produced it, or
    /// once it gave its copy up ([`Protection::stop`]). `fence` ends this copy when the source
    /// superseded it or the series cannot go on.
    pub fn start_reverse(
        vm: &Arc<Mutex<Vm>>,
        output: Option<Arc<OutputBuffer>>,
        to: backup::receive::ReverseTo,
        rt: &tokio::runtime::Handle,
        fence: primary::link::Fence,
    ) -> Result<Self, ProtectError> {
        let instance = transport::random_u64().map_err(ProtectError::Random)?;
        let mut scfg = SenderConfig::new(Role::MigrationDestination, to.vm.clone(), to.layout.clone(), instance);
        scfg.timing = to.timing;
        let mut sender = Sender::new(scfg);
        sender.start_at(to.start).map_err(ProtectError::Start)?;
        // Epochs as protection's (output ends them 500 µs after the first held frame), but a
        // silent guest's up to 200 ms: during post-copy the CPU the epochs take is the pages'
        // (W1/W2 of the migration bench: total 1.4-1.5x without reverse checkpoints at 50 ms,
        // 1.2-1.3x at 200 ms; docs/benchmarks-history.md), and a silent guest's clients wait on none.
        let mut cfg = EngineConfig { reverse: true, ..EngineConfig::default() };
        cfg.timing.max = REVERSE_EPOCH_MAX;
        let link_cfg = LinkConfig {
            endpoint: Some(to.endpoint.clone()),
            line: false,
            fence: Some(Arc::clone(&fence)),
            ..LinkConfig::protection(
                to.addr,
                to.name.clone(),
                to.identity.clone(),
                to.endpoint.local_addr().unwrap_or(to.addr),
            )
        };
        let lost: Arc<dyn Fn() + Send + Sync> = Arc::new(move || fence("the reverse checkpoints stopped".into()));
        let p = Self::spawn(vm, output, sender, cfg, link_cfg, Duration::MAX, Some(lost), rt, "reverse-engine")?;
        tracing::info!(source = %to.addr, start = to.start.epoch, "reverse checkpoints starting");
        Ok(p)
    }

    /// Stops the engine and the link and drops what output is held, never releasing it (a
    /// fenced reverse copy, or a process that exits while it is held).
    pub fn abandon(mut self, rt: &tokio::runtime::Handle) {
        self.halt(rt);
        let held = self.output.as_ref().map(|o| o.held()).unwrap_or((0, 0));
        tracing::warn!(frames = held.0, bytes = held.1, "held output dropped, never released");
        self.stats.set_state(ProtectionState::Unprotected, "abandoned");
    }

    /// Stops the engine thread and the link task (the output buffer is left as it is).
    fn halt(&mut self, rt: &tokio::runtime::Handle) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake();
        if let Some(e) = self.engine.take() {
            let _ = e.join();
        }
        if let Some(l) = self.link.take() {
            l.abort();
            let _ = rt.block_on(l);
        }
    }

    /// The status report.
    pub fn report(&self) -> primary::stats::StatusReport {
        let held = self.output.as_ref().map(|o| o.held()).unwrap_or((0, 0));
        let mut r = self.stats.report(held);
        // Input forwarding lives beside the output buffer (it moves its epoch with it).
        r.inbound = self.output.as_ref().and_then(|o| o.inbound()).map(|i| i.report());
        r
    }

    /// Stops protecting; output flows straight to the TAP again (through the arbitration's
    /// gated buffer, when protection used it).
    pub fn stop(mut self, vm: &Arc<Mutex<Vm>>, rt: &tokio::runtime::Handle) -> Result<(), ProtectError> {
        self.halt(rt);
        if let Some(o) = &self.output
            && o.inbound().is_some()
        {
            o.set_inbound(None);
            set_rx_observer(vm, None);
        }
        if let Some(o) = &self.output {
            o.set_passthrough(true);
            if self.own_output {
                primary::output::restore_plain_sink(vm)?;
            }
        }
        self.stats.set_state(ProtectionState::Unprotected, "unprotect requested");
        Ok(())
    }
}

/// Input forwarding for `vm`'s net device (if it has one and output is held): frames are tagged
/// with the output buffer's epoch, so the boundary is the same exact pause.
fn install_inbound(vm: &Arc<Mutex<Vm>>, output: Option<&Arc<OutputBuffer>>) -> Option<Arc<primary::inbound::Inbound>> {
    let output = output?;
    let inbound = primary::inbound::Inbound::new(primary::inbound::DEFAULT_QUEUE_FRAMES);
    output.set_inbound(Some(Arc::clone(&inbound)));
    set_rx_observer(vm, Some(Arc::clone(&inbound) as Arc<dyn vmm::devices::virtio::net::RxObserver>)).then_some(inbound)
}

/// Installs (or removes) the net device's receive observer; false without a net device.
fn set_rx_observer(vm: &Arc<Mutex<Vm>>, observer: Option<Arc<dyn vmm::devices::virtio::net::RxObserver>>) -> bool {
    let g = vm.lock().unwrap_or_else(|e| e.into_inner());
    let Some(net) = g.net() else { return false };
    net.lock().unwrap_or_else(|e| e.into_inner()).device().set_rx_observer(observer);
    true
}

/// Checks a protect request before starting.
/// The engine's epoch policy from a request. `--epoch-min-ms 0` means no floor: output ends
/// an epoch as soon as its coalescing window (or the guest's idleness) says; the longest epoch
/// is at least 1 ms.
fn epoch_timing(req: &ProtectRequest) -> EpochTiming {
    EpochTiming {
        min: Duration::from_millis(req.epoch_min_ms),
        max: Duration::from_millis(req.epoch_max_ms.max(req.epoch_min_ms).max(1)),
        fixed: (req.epoch_ms > 0).then(|| Duration::from_millis(req.epoch_ms)),
        coalesce: (req.output_coalesce_us > 0).then(|| Duration::from_micros(req.output_coalesce_us)),
    }
}

pub fn validate(req: &ProtectRequest) -> Result<(), ProtectError> {
    if req.epoch_min_ms > req.epoch_max_ms {
        return Err(ProtectError::EpochBounds { min: req.epoch_min_ms, max: req.epoch_max_ms });
    }
    if !(1..=2).contains(&req.pause_copy_threads) {
        return Err(ProtectError::CopyThreads(req.pause_copy_threads));
    }
    if req.pause_rt_priority > 99 {
        return Err(ProtectError::RtPriority(req.pause_rt_priority));
    }
    if req.epoch_precopy_us > 1_000_000 {
        return Err(ProtectError::Precopy(req.epoch_precopy_us));
    }
    if !(1..=1024).contains(&req.sync_piece_mib) {
        return Err(ProtectError::SyncPiece(req.sync_piece_mib));
    }
    if req.output_coalesce_us > 1_000_000 {
        return Err(ProtectError::Coalesce(req.output_coalesce_us));
    }
    if req.epoch_ms > 10_000 {
        return Err(ProtectError::EpochTooLong(req.epoch_ms));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> ProtectRequest {
        ProtectRequest::defaults("127.0.0.1:7000".parse().unwrap())
    }

    #[test]
    fn an_epoch_floor_of_zero_is_no_floor_and_the_bounds_stay_ordered() {
        let t = epoch_timing(&ProtectRequest { epoch_min_ms: 0, epoch_max_ms: 50, ..request() });
        assert_eq!((t.min, t.max), (Duration::ZERO, Duration::from_millis(50)));
        let t = epoch_timing(&ProtectRequest { epoch_min_ms: 0, epoch_max_ms: 0, ..request() });
        assert_eq!((t.min, t.max), (Duration::ZERO, Duration::from_millis(1)));
        let t = epoch_timing(&request());
        assert_eq!((t.min, t.max), (Duration::from_millis(default_min()), Duration::from_millis(default_max())));
        // Output held 100 µs into an epoch ends it a window later, not at a floor.
        let t = epoch_timing(&ProtectRequest { epoch_min_ms: 0, ..request() });
        let start = std::time::Instant::now();
        let first = start + Duration::from_micros(100);
        assert_eq!(t.end(start, t.max, Some(first), 1), first + primary::engine::COALESCE_PER_FRAME);
    }

    #[test]
    fn validate_names_each_bad_setting() {
        assert!(validate(&request()).is_ok());
        let bounds = validate(&ProtectRequest { epoch_min_ms: 60, epoch_max_ms: 50, ..request() });
        assert_eq!(bounds.unwrap_err().to_string(), "epoch bounds 60..50 ms are reversed");
        let threads = validate(&ProtectRequest { pause_copy_threads: 3, ..request() });
        assert_eq!(
            threads.unwrap_err().to_string(),
            "--pause-copy-threads 3: 1 or 2 threads copy a checkpoint's pages"
        );
        let rt = validate(&ProtectRequest { pause_rt_priority: 100, ..request() });
        assert_eq!(rt.unwrap_err().to_string(), "--pause-rt-priority 100: SCHED_FIFO priorities are 1-99 (0: off)");
        let pre = validate(&ProtectRequest { epoch_precopy_us: 2_000_000, ..request() });
        assert_eq!(pre.unwrap_err().to_string(), "--epoch-precopy-us 2000000: at most 1000000 (1 s)");
        for mib in [0, 1025] {
            let piece = validate(&ProtectRequest { sync_piece_mib: mib, ..request() });
            assert_eq!(
                piece.unwrap_err().to_string(),
                format!("--sync-piece-mib {mib}: a sync's pieces are 1-1024 MiB")
            );
        }
        assert!(validate(&ProtectRequest { sync_piece_mib: 1, ..request() }).is_ok());
        let coalesce = validate(&ProtectRequest { output_coalesce_us: 2_000_000, ..request() });
        assert_eq!(coalesce.unwrap_err().to_string(), "output coalescing window of 2000000 µs is longer than 1 s");
        let epoch = validate(&ProtectRequest { epoch_ms: 20_000, ..request() });
        assert_eq!(epoch.unwrap_err().to_string(), "epoch of 20000 ms is longer than 10 s");
    }

    #[test]
    fn timing_keeps_detection_above_two_heartbeats() {
        let t = timing(20, 1000, 0);
        assert_eq!(t.heartbeat_interval, Duration::from_millis(20));
        assert_eq!(t.idle_timeout, Duration::from_millis(1000));
        assert_eq!(t.suspect_after, None);
        let t = timing(100, 50, 10);
        assert_eq!(t.idle_timeout, Duration::from_millis(200));
        assert_eq!(t.suspect_after, Some(Duration::from_millis(200)));
    }
}
