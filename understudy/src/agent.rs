//! The command line of the arbitration agent (`failover::agent` is the agent itself).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use failover::NodeId;
use failover::net::agent::{AgentConfig, Peers, parse_peers};

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

impl AgentArgs {
    /// Whether arbitration is configured.
    pub fn enabled(&self) -> bool {
        self.id.is_some()
    }

    /// The agent's settings, checked.
    pub fn config(&self) -> Result<AgentConfig> {
        let id = self.id.context("--arbiter-id is required for arbitration")?;
        let listen = self.listen.context("--arbiter-listen is required with --arbiter-id")?;
        let data = self.data.clone().context("--arbiter-data is required with --arbiter-id")?;
        if self.peers.len() != 2 {
            anyhow::bail!("arbitration needs exactly two --arbiter-peer (the other agent and the witness)");
        }
        let peers = parse_peers(&self.peers)?;
        let lease = failover::LeaseConfig {
            lease_timeout: Duration::from_millis(self.lease_ms),
            renew_interval: Duration::from_millis(self.lease_renew_ms),
            ..failover::LeaseConfig::default()
        };
        lease.validate().context("--lease-ms / --lease-renew-ms")?;
        if matches!(peers, Peers::Quic(_)) {
            self.certs.as_ref().context("QUIC arbitration peers need --arbiter-certs (or --certs)")?;
            self.name.as_ref().context("QUIC arbitration peers need this host's certificate name")?;
        }
        Ok(AgentConfig { id, listen, peers, certs: self.certs.clone(), name: self.name.clone(), data, lease })
    }
}
