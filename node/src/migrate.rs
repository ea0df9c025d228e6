//! Migration of a running VM, both ends, as a node does it: the source side builds the driver's
//! inputs from the VM ([`source`]); the destination side builds the receiver's configuration
//! ([`destination_config`]). The drivers are `primary::migrate` and `backup::receive`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use primary::migrate::{Control, Source};
use vmm::vm::Vm;

/// Errors of setting a migration up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The VM's memory layout cannot go on the wire.
    #[error(transparent)]
    Layout(#[from] backup::server::BackupError),
    /// Certificates.
    #[error("load certificates for {name} from {dir}")]
    Identity {
        /// The name.
        name: String,
        /// The directory.
        dir: String,
        /// Why.
        #[source]
        source: transport::certs::LoadError,
    },
    /// Our certificate may not carry a migration.
    #[error(transparent)]
    Policy(#[from] transport::PolicyError),
}

/// Session timing of a migration: heartbeats every 20 ms, the peer gone after 1 s of silence.
pub fn timing() -> replication_proto::Timing {
    crate::protect::timing(20, 1000, 0)
}

/// The source driver's inputs for `vm` named `vm_name`.
pub fn source(vm: &Arc<Mutex<Vm>>, vm_name: &str, control: Arc<Control>) -> Result<Source, SetupError> {
    let layout = {
        let g = vm.lock().unwrap_or_else(|e| e.into_inner());
        vmm::memory::layout_of(g.memory())
    };
    Ok(Source {
        vm: Arc::clone(vm),
        identity: backup::server::vm_identity(vm_name),
        layout: backup::server::proto_layout(&layout)?,
        control,
        tuning: transport::Tuning::default(),
        timing: timing(),
        // Tests of mixed versions: act as a build of an older protocol version.
        version: std::env::var("UNDERSTUDY_PROTOCOL_VERSION").ok().and_then(|v| v.parse().ok()),
    })
}

/// A destination's configuration: listen on `listen` as `name` (certificates in `certs`),
/// admit only `source_name`, for VM `vm_name` of `memory_bytes`.
pub fn destination_config(
    listen: SocketAddr,
    certs: &std::path::Path,
    name: &str,
    source_name: &str,
    vm_name: &str,
    memory_bytes: u64,
    verify: bool,
) -> Result<(backup::receive::ReceiveConfig, Vec<(u64, u64)>), SetupError> {
    let identity = transport::Identity::load_named(certs, name).map_err(|source| SetupError::Identity {
        name: name.into(),
        dir: certs.display().to_string(),
        source,
    })?;
    transport::PeerPolicy::replication().check_own(&identity)?;
    let ranges = vmm::layout::ram_regions(memory_bytes);
    let cfg = backup::receive::ReceiveConfig {
        listen,
        identity,
        source_name: source_name.into(),
        tuning: transport::Tuning::default(),
        vm: backup::server::vm_identity(vm_name),
        layout: backup::server::proto_layout(&ranges)?,
        timing: timing(),
        verify,
    };
    Ok((cfg, ranges))
}
