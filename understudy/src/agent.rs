//! The command line of the arbitration agent (`failover::net::agent` is the agent itself).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use failover::NodeId;
use failover::net::PeerSpec;
use failover::net::agent::AgentConfig;

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
        let mut lease = failover::LeaseConfig {
            lease_timeout: Duration::from_millis(self.lease_ms),
            renew_interval: Duration::from_millis(self.lease_renew_ms),
            ..failover::LeaseConfig::default()
        };
        // A peer's claim longer than the bound is refused: never below our own lease.
        lease.max_claim_lease = lease.max_claim_lease.max(lease.lease_timeout);
        lease.validate().context("--lease-ms / --lease-renew-ms")?;
        let certs =
            self.certs.clone().context("arbitration needs --arbiter-certs (the CA and this host's certificate)")?;
        let name = self.name.clone().context("arbitration needs --arbiter-name (this host's certificate name)")?;
        Ok(AgentConfig { id, listen, peers: self.peers.clone(), certs, name, data, lease })
    }
}
