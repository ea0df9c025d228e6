//! The arbitration agent's settings as the command line gives them ([`AgentArgs`], flattened
//! into `understudy run` and `understudy backup`), checked into its [`AgentConfig`]
//! (`failover::net::agent` is the agent itself; [`Node`](crate::Node) runs it).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use failover::NodeId;
use failover::net::PeerSpec;
use failover::net::agent::AgentConfig;

/// What is missing or wrong in the agent's settings.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// No node id.
    #[error("--arbiter-id is required for arbitration")]
    NoId,
    /// No address to listen on.
    #[error("--arbiter-listen is required with --arbiter-id")]
    NoListen,
    /// No raft state directory.
    #[error("--arbiter-data is required with --arbiter-id")]
    NoData,
    /// Not two peers.
    #[error("arbitration needs exactly two --arbiter-peer (the other agent and the witness)")]
    Peers,
    /// Lease timings that do not work together.
    #[error("--lease-ms / --lease-renew-ms")]
    Lease(#[source] failover::lease::LeaseError),
    /// No certificates.
    #[error("arbitration needs --arbiter-certs (the CA and this host's certificate)")]
    NoCerts,
    /// No certificate name.
    #[error("arbitration needs --arbiter-name (this host's certificate name)")]
    NoName,
}

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

    /// These settings, with `certs` and `name` (the host's replication identity) where no
    /// `--arbiter-certs` or `--arbiter-name` was given.
    pub fn or_identity(mut self, certs: &std::path::Path, name: &str) -> Self {
        self.certs.get_or_insert_with(|| certs.to_path_buf());
        self.name.get_or_insert_with(|| name.to_string());
        self
    }

    /// The agent's settings, checked.
    pub fn config(&self) -> Result<AgentConfig, ArgsError> {
        let id = self.id.ok_or(ArgsError::NoId)?;
        let listen = self.listen.ok_or(ArgsError::NoListen)?;
        let data = self.data.clone().ok_or(ArgsError::NoData)?;
        if self.peers.len() != 2 {
            return Err(ArgsError::Peers);
        }
        let mut lease = failover::LeaseConfig {
            lease_timeout: Duration::from_millis(self.lease_ms),
            renew_interval: Duration::from_millis(self.lease_renew_ms),
            ..failover::LeaseConfig::default()
        };
        // A peer's claim longer than the bound is refused: never below our own lease.
        lease.max_claim_lease = lease.max_claim_lease.max(lease.lease_timeout);
        lease.validate().map_err(ArgsError::Lease)?;
        let certs = self.certs.clone().ok_or(ArgsError::NoCerts)?;
        let name = self.name.clone().ok_or(ArgsError::NoName)?;
        Ok(AgentConfig { id, listen, peers: self.peers.clone(), certs, name, data, lease })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> AgentArgs {
        AgentArgs {
            id: Some(2),
            listen: Some("127.0.0.1:7502".parse().unwrap()),
            peers: ["1=primary@127.0.0.1:7501", "3=witness@127.0.0.1:7503"].map(|p| peer_arg(p).unwrap()).to_vec(),
            certs: None,
            name: None,
            data: Some("raft2".into()),
            lease_ms: 30,
            lease_renew_ms: 10,
        }
    }

    #[test]
    fn config_names_what_is_missing_and_takes_the_hosts_identity() {
        let e = args().config().unwrap_err().to_string();
        assert_eq!(e, "arbitration needs --arbiter-certs (the CA and this host's certificate)");
        let cfg = args().or_identity("certs".as_ref(), "backup").config().unwrap();
        assert_eq!((cfg.certs, cfg.name), ("certs".into(), "backup".to_string()));
        let own = AgentArgs { certs: Some("mine".into()), name: Some("b2".into()), ..args() };
        let cfg = own.or_identity("certs".as_ref(), "backup").config().unwrap();
        assert_eq!((cfg.certs, cfg.name), ("mine".into(), "b2".to_string()));
        let one_peer = AgentArgs { peers: args().peers[..1].to_vec(), ..args() };
        assert_eq!(one_peer.config().unwrap_err().to_string(), ArgsError::Peers.to_string());
        let slow = AgentArgs { lease_renew_ms: 40, ..args() }.or_identity("c".as_ref(), "n");
        let e = transport::error_chain(&slow.config().unwrap_err());
        assert!(e.starts_with("--lease-ms / --lease-renew-ms: lease: renew interval"), "{e}");
        assert!(peer_arg("1=127.0.0.1:7501").unwrap_err().contains("names no certificate"));
    }
}
