//! The arbitration agent of a VM process: a raft voter (failover crate) that asks the group for
//! activity, keeps the lease that gates output, asks before running degraded, promotes the
//! backup only when granted, and fences a copy that lost its grant.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use failover::lease::OutputPermit;
use failover::net::{ArbiterHandle, PeerSpec};
use failover::state::VmId;
use failover::{Arbiter, ArbiterConfig, Event, NodeId};

/// Command-line settings of the agent.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// This process's raft node id (1 = primary's agent, 2 = backup's, 3 = witness, by convention).
    #[arg(long = "arbiter-id", id = "arbiter_id")]
    pub id: Option<NodeId>,
    /// UDP address the agent listens on (QUIC with mutual TLS).
    #[arg(long = "arbiter-listen", id = "arbiter_listen")]
    pub listen: Option<SocketAddr>,
    /// The other voters (repeat): `ID=NAME@HOST:PORT`, NAME being the name in the peer's
    /// certificate. Arbitration runs only over QUIC with mutual TLS.
    #[arg(long = "arbiter-peer", id = "arbiter_peer", value_parser = peer_arg)]
    pub peers: Vec<PeerSpec>,
    /// Certificates for the arbitration link (ca.pem and this host's pair; `backup` defaults to
    /// its --certs).
    #[arg(long = "arbiter-certs", id = "arbiter_certs")]
    pub certs: Option<PathBuf>,
    /// This host's certificate name for the arbitration link (`backup` defaults to its --name).
    #[arg(long = "arbiter-name", id = "arbiter_name")]
    pub name: Option<String>,
    /// Directory of the persisted raft state (reuse it across restarts of this node).
    #[arg(long = "arbiter-data", id = "arbiter_data")]
    pub data: Option<PathBuf>,
    /// How long a confirmed lease lets the active copy release output, ms. The backup can be
    /// granted only after the old lease certainly ran out, so this is the floor of failover
    /// time; renewals must commit well within it or output pauses.
    #[arg(long = "lease-ms", id = "lease_ms", default_value_t = 30)]
    pub lease_ms: u64,
    /// How often the active copy renews its lease, ms (a few renewals per lease).
    #[arg(long = "lease-renew-ms", id = "lease_renew_ms", default_value_t = 10)]
    pub lease_renew_ms: u64,
}

/// Parses an arbitration peer (`--arbiter-peer`, the witness's `--peer`): `ID=NAME@HOST:PORT`.
/// The plain UDP form `ID=HOST:PORT` is refused: nothing authenticates its sender, and a
/// spoofed raft message could grant the backup while the primary still holds its lease.
pub fn peer_arg(spec: &str) -> Result<PeerSpec, String> {
    if !spec.contains('@') {
        return Err(format!(
            "{spec:?} names no certificate: arbitration runs only over QUIC with mutual TLS; give \
             the peer as ID=NAME@HOST:PORT (NAME: the host name in its certificate, `understudy \
             certs --host NAME`), and this host's certificates with --certs (witness, backup) or \
             --arbiter-certs (run)"
        ));
    }
    failover::net::parse_quic_peer(spec).map_err(|e| e.to_string())
}

/// Binds the arbitration link: QUIC with mutual TLS.
pub async fn bind_link(
    id: NodeId,
    listen: SocketAddr,
    peers: &[PeerSpec],
    certs: Option<&std::path::Path>,
    name: Option<&str>,
) -> Result<(Arc<dyn failover::net::PeerLink>, tokio::sync::mpsc::Receiver<failover::net::Inbound>)> {
    let certs = certs.context("arbitration needs --arbiter-certs (the CA and this host's certificate)")?;
    let name = name.context("arbitration needs --arbiter-name (this host's certificate name)")?;
    let identity = transport::Identity::load(certs, name)
        .with_context(|| format!("load certificates for {name} from {}", certs.display()))?;
    let (link, inbox) = failover::net::QuicLink::bind(id, listen, &identity, peers).await?;
    Ok((link, inbox))
}

impl AgentArgs {
    /// Whether arbitration is configured.
    pub fn enabled(&self) -> bool {
        self.id.is_some()
    }
}

/// The VM id the group uses, derived from the VM's name.
pub fn vm_id(name: &str) -> VmId {
    VmId(u64::from(crc32fast::hash(name.as_bytes())) << 16 | 1)
}

/// A running agent.
pub struct Agent {
    /// Handle on the arbiter task.
    pub handle: ArbiterHandle,
    /// The VM.
    pub vm: VmId,
    /// This node.
    pub id: NodeId,
    permit: Arc<Mutex<Option<OutputPermit>>>,
    /// Events, taken by the owner.
    pub events: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Event>>>,
}

impl Agent {
    /// Opens the journal, binds the link and starts the arbiter on `rt`.
    pub fn start(args: &AgentArgs, vm_name: &str, rt: &tokio::runtime::Handle) -> Result<Arc<Self>> {
        let id = args.id.context("--arbiter-id is required for arbitration")?;
        let listen = args.listen.context("--arbiter-listen is required with --arbiter-id")?;
        let data = args.data.clone().context("--arbiter-data is required with --arbiter-id")?;
        if args.peers.len() != 2 {
            anyhow::bail!("arbitration needs exactly two --arbiter-peer (the other agent and the witness)");
        }
        let mut voters: Vec<NodeId> = args.peers.iter().map(|p| p.id).chain([id]).collect();
        voters.sort_unstable();
        voters.dedup();
        let mut config = ArbiterConfig::new(id, &voters);
        config.lease.lease_timeout = Duration::from_millis(args.lease_ms);
        config.lease.renew_interval = Duration::from_millis(args.lease_renew_ms);
        // A peer's claim longer than the bound is refused: never below our own lease.
        config.lease.max_claim_lease = config.lease.max_claim_lease.max(config.lease.lease_timeout);
        config.lease.validate().context("--lease-ms / --lease-renew-ms")?;
        // By convention the witness has the highest id; it leads until a VM exists.
        config.preferred_leader = voters.iter().copied().max().filter(|w| *w != id);
        std::fs::create_dir_all(&data).with_context(|| format!("create {}", data.display()))?;
        let arbiter = Arbiter::open_dir(config, &data, Instant::now())
            .with_context(|| format!("open raft state in {}", data.display()))?;
        let (link, inbox) = rt
            .block_on(bind_link(id, listen, &args.peers, args.certs.as_deref(), args.name.as_deref()))
            .context("bind the arbitration link")?;
        let (handle, events, _task) = {
            let _g = rt.enter();
            failover::net::spawn_arbiter(arbiter, link, inbox)
        };
        let vm = vm_id(vm_name);
        let peers: Vec<String> = args.peers.iter().map(|p| format!("{}={}@{}", p.id, p.name, p.addr)).collect();
        tracing::info!(node = id, %listen, ?peers, vm = vm.0, "arbitration agent running");
        Ok(Arc::new(Self { handle, vm, id, permit: Arc::new(Mutex::new(None)), events: Mutex::new(Some(events)) }))
    }

    /// The output gate: open while this node holds a lease confirmed by a quorum.
    pub fn gate(&self) -> primary::output::Gate {
        let permit = Arc::clone(&self.permit);
        Arc::new(move |now| permit.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|p| p.allows(now)))
    }

    /// Keeps the cached permit fresh (every 5 ms) and calls `on_refresh` after each refresh.
    pub fn spawn_permit_refresher(
        self: &Arc<Self>,
        rt: &tokio::runtime::Handle,
        on_refresh: impl Fn() + Send + Sync + 'static,
    ) {
        let me = Arc::clone(self);
        rt.spawn(async move {
            let vm = me.vm;
            loop {
                match me.handle.call(move |a, now| a.permit(now, vm)).await {
                    Ok(p) => *me.permit.lock().unwrap_or_else(|e| e.into_inner()) = p,
                    Err(_) => {
                        // The arbiter is gone (see `on_failure`): no permit, the gate closes.
                        *me.permit.lock().unwrap_or_else(|e| e.into_inner()) = None;
                        on_refresh();
                        return;
                    }
                }
                on_refresh();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }

    /// Calls `f` once with the reason if the arbiter's task ends (a journal that cannot be
    /// written, a panic): this node then can neither renew a lease nor be granted anything, and
    /// the owner must act (the runtime stops the guest and exits non-zero).
    pub fn on_failure(&self, rt: &tokio::runtime::Handle, f: impl FnOnce(String) + Send + 'static) {
        let handle = self.handle.clone();
        rt.spawn(async move { f(handle.failed().await) });
    }

    /// Why the arbiter's task ended, if it has.
    pub fn failure(&self) -> Option<String> {
        self.handle.failure()
    }

    /// Runs `f` on the arbiter and waits for it.
    pub fn call<R: Send + 'static>(
        &self,
        rt: &tokio::runtime::Handle,
        f: impl FnOnce(&mut Arbiter, Instant) -> R + Send + 'static,
    ) -> Result<R> {
        let h = self.handle.clone();
        Ok(rt.block_on(async move { h.call(f).await })?)
    }

    /// Asks for activity and waits for the grant (or refusal/fencing) up to `timeout`.
    pub fn acquire(&self, rt: &tokio::runtime::Handle, timeout: Duration) -> Result<u64> {
        let vm = self.vm;
        self.call(rt, move |a, now| a.request_activity(now, vm))??;
        let t0 = Instant::now();
        loop {
            let r = self.call(rt, move |a, _now| a.record(vm))?;
            if let Some(rec) = r
                && rec.holder == self.id
            {
                return Ok(rec.generation);
            }
            if t0.elapsed() > timeout {
                anyhow::bail!("the arbitration group did not grant activity within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
