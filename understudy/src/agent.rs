//! The arbitration agent of a VM process: a raft voter (failover crate) that asks the group for
//! activity, keeps the lease that gates output, asks before running degraded, promotes the
//! backup only when granted, and fences a copy that lost its grant.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use failover::lease::OutputPermit;
use failover::net::{ArbiterHandle, UdpLink};
use failover::state::VmId;
use failover::{Arbiter, ArbiterConfig, Event, NodeId};

/// Command-line settings of the agent.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// This process's raft node id (1 = primary's agent, 2 = backup's, 3 = witness, by convention).
    #[arg(long = "arbiter-id", id = "arbiter_id")]
    pub id: Option<NodeId>,
    /// UDP address the agent listens on.
    #[arg(long = "arbiter-listen", id = "arbiter_listen")]
    pub listen: Option<SocketAddr>,
    /// The other voters (repeat): `ID=NAME@HOST:PORT` for QUIC with mutual TLS (NAME is the
    /// peer's certificate name), or `ID=HOST:PORT` for plain UDP (unauthenticated: tests only).
    #[arg(long = "arbiter-peer", id = "arbiter_peer")]
    pub peers: Vec<String>,
    /// Certificates for the QUIC arbitration link (ca.pem and this host's pair).
    #[arg(long = "arbiter-certs", id = "arbiter_certs")]
    pub certs: Option<PathBuf>,
    /// This host's certificate name for the arbitration link.
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

/// Peers of an arbitration link: all QUIC (`ID=NAME@HOST:PORT`) or all UDP (`ID=HOST:PORT`).
pub enum Peers {
    /// Authenticated: mutual TLS, sender identity from the certificate.
    Quic(Vec<failover::net::PeerSpec>),
    /// Plain UDP (tests).
    Udp(Vec<(NodeId, SocketAddr)>),
}

/// Parses `--arbiter-peer`/`--peer` values.
pub fn parse_peers(specs: &[String]) -> Result<Peers> {
    if specs.iter().all(|s| s.contains('@')) {
        Ok(Peers::Quic(specs.iter().map(|s| failover::net::parse_quic_peer(s)).collect::<Result<Vec<_>, _>>()?))
    } else if specs.iter().all(|s| !s.contains('@')) {
        Ok(Peers::Udp(specs.iter().map(|s| failover::net::parse_peer(s)).collect::<Result<Vec<_>, _>>()?))
    } else {
        anyhow::bail!("arbitration peers mix ID=NAME@HOST:PORT (QUIC) and ID=HOST:PORT (UDP): use one form")
    }
}

/// Binds the arbitration link: QUIC with mutual TLS, or UDP.
pub async fn bind_link(
    id: NodeId,
    listen: SocketAddr,
    peers: &Peers,
    certs: Option<&std::path::Path>,
    name: Option<&str>,
) -> Result<(Arc<dyn failover::net::PeerLink>, tokio::sync::mpsc::Receiver<failover::net::Inbound>)> {
    match peers {
        Peers::Quic(specs) => {
            let certs = certs.context("QUIC arbitration peers need --arbiter-certs (or --certs)")?;
            let name = name.context("QUIC arbitration peers need this host's certificate name")?;
            let identity = transport::Identity::load(certs, name)
                .with_context(|| format!("load certificates for {name} from {}", certs.display()))?;
            let (link, inbox) = failover::net::QuicLink::bind(id, listen, &identity, specs).await?;
            Ok((link, inbox))
        }
        Peers::Udp(p) => {
            tracing::warn!("arbitration over plain UDP: peers are not authenticated (use ID=NAME@HOST:PORT)");
            let (link, inbox) = UdpLink::bind(id, listen, p).await?;
            Ok((link, inbox))
        }
    }
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
        let peers = parse_peers(&args.peers)?;
        let ids: Vec<NodeId> = match &peers {
            Peers::Quic(p) => p.iter().map(|p| p.id).collect(),
            Peers::Udp(p) => p.iter().map(|p| p.0).collect(),
        };
        let mut voters: Vec<NodeId> = ids.iter().copied().chain([id]).collect();
        voters.sort_unstable();
        voters.dedup();
        let mut config = ArbiterConfig::new(id, &voters);
        config.lease.lease_timeout = Duration::from_millis(args.lease_ms);
        config.lease.renew_interval = Duration::from_millis(args.lease_renew_ms);
        config.lease.validate().context("--lease-ms / --lease-renew-ms")?;
        // By convention the witness has the highest id; it leads until a VM exists.
        config.preferred_leader = voters.iter().copied().max().filter(|w| *w != id);
        std::fs::create_dir_all(&data).with_context(|| format!("create {}", data.display()))?;
        let arbiter = Arbiter::open_dir(config, &data, Instant::now())
            .with_context(|| format!("open raft state in {}", data.display()))?;
        let (link, inbox) = rt
            .block_on(bind_link(id, listen, &peers, args.certs.as_deref(), args.name.as_deref()))
            .context("bind the arbitration link")?;
        let (handle, events, _task) = {
            let _g = rt.enter();
            failover::net::spawn_arbiter(arbiter, link, inbox)
        };
        let vm = vm_id(vm_name);
        tracing::info!(node = id, %listen, peers = ?args.peers, vm = vm.0, "arbitration agent running");
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
                    Err(_) => return,
                }
                on_refresh();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
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
