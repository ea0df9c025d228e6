//! The protect request of the admin API: plain data, so that the API's request parsing can be
//! built without the rest of the binary (the fuzz target in `understudy/fuzz` includes it).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What `understudy protect` asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProtectRequest {
    /// The backup's address.
    pub backup: SocketAddr,
    /// The backup's certificate name.
    pub backup_name: String,
    /// Directory with `ca.pem` and this host's certificate and key.
    pub certs: PathBuf,
    /// This host's certificate name.
    pub name: String,
    /// The VM's name (the backup must be started for the same name).
    pub vm_name: String,
    /// Fixed epoch length in ms (0 = adaptive).
    #[serde(default)]
    pub epoch_ms: u64,
    /// Adaptive bounds, ms.
    #[serde(default = "default_min")]
    pub epoch_min_ms: u64,
    /// Adaptive bounds, ms.
    #[serde(default = "default_max")]
    pub epoch_max_ms: u64,
    /// Digest memory every this many checkpoints (tests; 0 = off).
    #[serde(default)]
    pub verify_every: u64,
    /// How long the backup may be unreachable before the primary runs degraded, ms.
    #[serde(default = "default_degrade")]
    pub degrade_after_ms: u64,
    /// Heartbeat interval, ms.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_ms: u64,
    /// Silence after which the link counts as broken, ms.
    #[serde(default = "default_detect")]
    pub detect_ms: u64,
    /// The backup's arbitration node id (recorded as the VM's backup once it is consistent).
    #[serde(default)]
    pub backup_node: Option<u64>,
}

fn default_heartbeat() -> u64 {
    20
}

fn default_detect() -> u64 {
    1000
}

fn default_min() -> u64 {
    10
}

fn default_max() -> u64 {
    50
}

fn default_degrade() -> u64 {
    500
}
