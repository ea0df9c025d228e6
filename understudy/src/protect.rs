//! Wiring of protection (primary side) and of the backup role into a VM process.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use primary::engine::{Engine, EngineConfig, EpochTiming, LinkShared};
use primary::link::{Journal, LinkConfig};
use primary::output::{DEFAULT_HOLD_CAP, OutputBuffer};
use primary::stats::{ProtectionState, Stats};
use replication_proto::{Role, Sender, SenderConfig};
use vmm::devices::virtio::net::{TapSink, TxSink};
use vmm::vm::Vm;

mod request;
pub use request::ProtectRequest;

/// Protocol timing from heartbeat, detection and suspicion settings (`suspect_ms` 0: none).
pub fn timing(heartbeat_ms: u64, detect_ms: u64, suspect_ms: u64) -> replication_proto::Timing {
    replication_proto::Timing {
        heartbeat_interval: Duration::from_millis(heartbeat_ms.max(1)),
        idle_timeout: Duration::from_millis(detect_ms.max(heartbeat_ms.max(1) * 2)),
        suspect_after: (suspect_ms > 0).then(|| Duration::from_millis(suspect_ms.max(heartbeat_ms.max(1) * 2))),
    }
}

/// A running protection.
pub struct Protection {
    shared: Arc<LinkShared>,
    pub stats: Arc<Stats>,
    pub output: Option<Arc<OutputBuffer>>,
    pub journal: Journal,
    engine: Option<std::thread::JoinHandle<Result<(), primary::engine::EngineError>>>,
    link: Option<tokio::task::JoinHandle<()>>,
}

impl Protection {
    /// Starts protecting `vm` as `req` says, on `rt`.
    pub fn start(
        vm: &Arc<Mutex<Vm>>,
        req: &ProtectRequest,
        rt: &tokio::runtime::Handle,
        existing_output: Option<Arc<OutputBuffer>>,
        backup_lost: Option<Arc<dyn Fn() + Send + Sync>>,
    ) -> Result<Self> {
        let identity = transport::Identity::load(&req.certs, &req.name)
            .with_context(|| format!("load certificates for {} from {}", req.name, req.certs.display()))?;
        let layout = {
            let g = vm.lock().unwrap_or_else(|e| e.into_inner());
            vmm::memory::layout_of(g.memory())
        };
        let proto_layout = backup::server::proto_layout(&layout)?;
        let instance = rand_u64();
        let mut scfg =
            SenderConfig::new(Role::Primary, backup::server::vm_identity(&req.vm_name), proto_layout, instance);
        scfg.timing = timing(req.heartbeat_ms, req.detect_ms, 0);
        let sender = Sender::new(scfg);
        // Output commit: swap the net device's sink for a holding one, while paused (or reuse
        // the gated buffer arbitration installed at boot).
        let output = if existing_output.is_some() {
            existing_output
        } else {
            let mut g = vm.lock().unwrap_or_else(|e| e.into_inner());
            match g.net().cloned() {
                Some(net) => {
                    g.pause()?;
                    let dev = net.lock().unwrap_or_else(|e| e.into_inner());
                    let tap = Arc::clone(dev.device().tap());
                    let out = OutputBuffer::new(tap, DEFAULT_HOLD_CAP);
                    // Until the first consistent checkpoint, output flows.
                    out.set_passthrough(true);
                    let _old = dev.device().set_tx_sink(out.sink());
                    drop(dev);
                    g.resume();
                    Some(out)
                }
                None => None,
            }
        };
        let stats = Arc::new(Stats::new(req.backup.to_string()));
        let shared = Arc::new(LinkShared::default());
        let journal: Journal = Arc::new(Mutex::new(Vec::new()));
        let cfg = EngineConfig {
            timing: EpochTiming {
                min: Duration::from_millis(req.epoch_min_ms.max(1)),
                max: Duration::from_millis(req.epoch_max_ms.max(req.epoch_min_ms.max(1))),
                fixed: (req.epoch_ms > 0).then(|| Duration::from_millis(req.epoch_ms)),
            },
            verify_every: req.verify_every,
            ..EngineConfig::default()
        };
        let (tx, rx) = tokio::sync::mpsc::channel(cfg.window + 2);
        let link_cfg = LinkConfig {
            backup: req.backup,
            backup_name: req.backup_name.clone(),
            identity,
            bind: if req.backup.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? },
            tuning: transport::Tuning::default(),
        };
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
            Duration::from_millis(req.degrade_after_ms),
        );
        if let Some(hook) = backup_lost {
            engine = engine.on_backup_lost(hook);
        }
        let engine = std::thread::Builder::new()
            .name("epoch-engine".into())
            .spawn(move || {
                let r = engine.run();
                if let Err(e) = &r {
                    tracing::error!("epoch engine stopped: {e:#}");
                }
                r
            })
            .context("spawn epoch engine")?;
        tracing::info!(backup = %req.backup, "protection starting");
        Ok(Self { shared, stats, output, journal, engine: Some(engine), link: Some(link) })
    }

    /// The status report.
    pub fn report(&self) -> primary::stats::StatusReport {
        let held = self.output.as_ref().map(|o| o.held()).unwrap_or((0, 0));
        self.stats.report(held)
    }

    /// Stops protecting; output flows straight to the TAP again.
    pub fn stop(mut self, vm: &Arc<Mutex<Vm>>, rt: &tokio::runtime::Handle) -> Result<()> {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake();
        if let Some(e) = self.engine.take() {
            let _ = e.join();
        }
        if let Some(l) = self.link.take() {
            l.abort();
            let _ = rt.block_on(l);
        }
        if let Some(o) = &self.output {
            o.set_passthrough(true);
            let mut g = vm.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(net) = g.net().cloned() {
                g.pause()?;
                let dev = net.lock().unwrap_or_else(|e| e.into_inner());
                let tap = Arc::clone(dev.device().tap());
                let sink: Box<dyn TxSink> = Box::new(TapSink::new(tap));
                let _held = dev.device().set_tx_sink(sink);
                drop(dev);
                g.resume();
            }
        }
        self.stats.set_state(ProtectionState::Unprotected, "unprotect requested");
        Ok(())
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    u64::from_le_bytes(b)
        ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Checks a protect request before starting.
pub fn validate(req: &ProtectRequest) -> Result<()> {
    if req.epoch_min_ms > req.epoch_max_ms {
        bail!("epoch bounds {}..{} ms are reversed", req.epoch_min_ms, req.epoch_max_ms);
    }
    if req.epoch_ms > 10_000 {
        bail!("epoch of {} ms is longer than 10 s", req.epoch_ms);
    }
    Ok(())
}
