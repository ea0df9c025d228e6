//! The arbitration agent of a VM process: a raft voter that asks the group for activity, keeps
//! the lease that gates output, asks before running degraded, lets the backup promote only
//! when granted, and reports fencing. The binary turns its command line into an
//! [`AgentConfig`]; [`Agent::start`] opens the persisted raft state, binds the link and runs the
//! arbiter in a task of the caller's tokio runtime.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{ArbiterHandle, Inbound, NetError, PeerLink, PeerSpec, QuicLink};
use crate::lease::OutputPermit;
use crate::state::VmId;
use crate::{Arbiter, ArbiterConfig, ArbiterError, Event, LeaseConfig, NodeId};

/// Errors of the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The link or the driver.
    #[error(transparent)]
    Net(Box<NetError>),
    /// The arbiter refused a call.
    #[error(transparent)]
    Arbiter(#[from] ArbiterError),
    /// This host's certificates could not be loaded.
    #[error(transparent)]
    Identity(#[from] transport::certs::LoadError),
    /// The raft state directory could not be created.
    #[error("create {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The persisted raft state could not be opened.
    #[error("open raft state in {}", path.display())]
    Open {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: ArbiterError,
    },
    /// The arbitration link could not be bound.
    #[error("bind the arbitration link")]
    Bind(#[source] Box<AgentError>),
    /// No grant in time.
    #[error("the arbitration group did not grant activity within {0:?}")]
    NotGranted(Duration),
}

impl From<NetError> for AgentError {
    fn from(e: NetError) -> Self {
        Self::Net(Box::new(e))
    }
}

/// Binds the arbitration link: QUIC with mutual TLS, as `name` with the certificates in `certs`.
pub async fn bind_link(
    id: NodeId,
    listen: SocketAddr,
    peers: &[PeerSpec],
    certs: &Path,
    name: &str,
) -> Result<(Arc<dyn PeerLink>, tokio::sync::mpsc::Receiver<Inbound>), AgentError> {
    let identity = transport::Identity::load_named(certs, name)?;
    let (link, inbox) = QuicLink::bind(id, listen, &identity, peers).await?;
    Ok((link, inbox))
}

/// What an agent needs (the binary builds it from its command line and checks it).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This process's raft node id.
    pub id: NodeId,
    /// Address the agent listens on.
    pub listen: SocketAddr,
    /// The other two voters.
    pub peers: Vec<PeerSpec>,
    /// Certificates for the link (ca.pem and this host's pair).
    pub certs: PathBuf,
    /// This host's certificate name.
    pub name: String,
    /// Directory of the persisted raft state.
    pub data: PathBuf,
    /// The lease (validated; a peer's claim longer than `max_claim_lease` is refused).
    pub lease: LeaseConfig,
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
    pub fn start(cfg: &AgentConfig, vm_name: &str, rt: &tokio::runtime::Handle) -> Result<Arc<Self>, AgentError> {
        let id = cfg.id;
        let mut voters: Vec<NodeId> = cfg.peers.iter().map(|p| p.id).chain([id]).collect();
        voters.sort_unstable();
        voters.dedup();
        let mut config = ArbiterConfig::new(id, &voters);
        config.lease = cfg.lease;
        // By convention the witness has the highest id; it leads until a VM exists.
        config.preferred_leader = voters.iter().copied().max().filter(|w| *w != id);
        let data = &cfg.data;
        std::fs::create_dir_all(data).map_err(|source| AgentError::CreateDir { path: data.clone(), source })?;
        let arbiter = Arbiter::open_dir(config, data, Instant::now())
            .map_err(|source| AgentError::Open { path: data.clone(), source })?;
        let (link, inbox) = rt
            .block_on(bind_link(id, cfg.listen, &cfg.peers, &cfg.certs, &cfg.name))
            .map_err(|e| AgentError::Bind(Box::new(e)))?;
        let (handle, events, _task) = {
            let _g = rt.enter();
            super::spawn_arbiter(arbiter, link, inbox)
        };
        let vm = vm_id(vm_name);
        let peers: Vec<String> = cfg.peers.iter().map(|p| format!("{}={}@{}", p.id, p.name, p.addr)).collect();
        tracing::info!(node = id, listen = %cfg.listen, ?peers, vm = vm.0, "arbitration agent running");
        Ok(Arc::new(Self { handle, vm, id, permit: Arc::new(Mutex::new(None)), events: Mutex::new(Some(events)) }))
    }

    /// The output gate: open while this node holds a lease confirmed by a quorum.
    pub fn gate(&self) -> Arc<dyn Fn(Instant) -> bool + Send + Sync> {
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
    ) -> Result<R, NetError> {
        let h = self.handle.clone();
        rt.block_on(async move { h.call(f).await })
    }

    /// Asks for activity and waits for the grant (or refusal/fencing) up to `timeout`.
    pub fn acquire(&self, rt: &tokio::runtime::Handle, timeout: Duration) -> Result<u64, AgentError> {
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
                return Err(AgentError::NotGranted(timeout));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_id_is_stable() {
        assert_eq!(vm_id("vm"), vm_id("vm"));
        assert_ne!(vm_id("vm"), vm_id("other"));
        assert_eq!(vm_id("vm").0 & 0xffff, 1);
    }
}
