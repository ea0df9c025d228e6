//! The role a node plays for its VM, as one state: [`Role`]. A process starts as a booted (or
//! restored) VM, a backup or a migration destination; every later change is a transition of
//! [`Node`](crate::Node), logged and counted ([`Transitions`]):
//!
//! ```text
//!   Booted ──protect──▶ Protected ──unprotect──▶ Booted (or Promoted, by origin)
//!   Booted ──migrate──▶ MigrationSource ──failed/cancelled──▶ Booted (or Promoted)
//!                       MigrationSource ──handed over──▶ (the process exits)
//!   Backup ──promote──▶ Promoted ──protect──▶ Protected (re-protect)
//!   MigrationDestination ──handed over──▶ Promoted (origin `migrated`)
//! ```
//!
//! What is not the role stays beside it in the node: the arbitration agent (any role may run
//! one) and exit signalling.

use std::sync::{Arc, Mutex};

use backup::server::BackupNode;
use primary::migrate::Control;
use vmm::vm::Vm;

use crate::protect::Protection;
use crate::runtime::SerialTarget;
use crate::status::Origin;

/// What this process is for its VM.
pub enum Role {
    /// A VM runs here, unprotected: booted or restored (or unprotected again).
    Booted(Guest),
    /// A VM runs here, checkpointed to a backup every epoch, its output held until acked.
    Protected(Protected),
    /// A backup: holds a replica of a protected VM; no VM runs.
    Backup(Standby),
    /// The replica became the VM (promotion, or a migration handed over), unprotected.
    Promoted(Guest),
    /// A VM being migrated away (or handed over already: the process then exits).
    MigrationSource(Migrating),
    /// Waits for, or receives, a migration; no VM runs yet.
    MigrationDestination(Receiving),
}

/// A VM that runs in this process.
#[derive(Clone)]
pub struct Guest {
    /// The VM.
    pub(crate) vm: Arc<Mutex<Vm>>,
    /// How it came to be.
    pub(crate) origin: Origin,
    /// The last migration away from here that failed or was cancelled (`status` keeps showing
    /// it).
    pub(crate) last_migration: Option<Arc<Control>>,
}

/// A protected VM.
pub struct Protected {
    /// The VM.
    pub(crate) guest: Guest,
    /// The epoch engine, the link and the output commit.
    pub(crate) protection: Protection,
    /// The backup's arbitration node id (recorded in the group once the backup is consistent).
    pub(crate) backup_node: Option<u64>,
    /// Whether the group recorded that backup (reset when the group runs the VM degraded).
    pub(crate) backup_recorded: bool,
}

/// A replica waiting to become the VM: a backup's, or a migration destination's.
pub struct Standby {
    /// The replica and its server's status.
    pub(crate) node: Arc<BackupNode>,
    /// Stops the server task.
    pub(crate) stop: tokio::sync::watch::Sender<bool>,
    /// The address the server listens on.
    pub(crate) listen: String,
    /// TAP for the promoted VM's net device.
    pub(crate) tap: Option<String>,
    /// Where the promoted VM's serial output goes.
    pub(crate) serial: SerialTarget,
    /// Digest the replica when promoting (verification runs; costs time on the critical path).
    pub(crate) digest: bool,
}

/// A VM being migrated away.
pub struct Migrating {
    /// The VM (it runs here until the hand-over).
    pub(crate) guest: Guest,
    /// The migration's progress and cancel switch.
    pub(crate) control: Arc<Control>,
}

/// A migration destination before the hand-over.
pub struct Receiving {
    /// The replica being received.
    pub(crate) standby: Standby,
    /// The migration's progress.
    pub(crate) progress: Arc<Mutex<backup::receive::ReceiveStatus>>,
    /// The source's certificate name.
    pub(crate) source: String,
    /// The guest built from the switch-over epoch, paused, waiting for the hand-over (the
    /// time from the request to the built VM is in `Restored`).
    /// Boxed: the role enum stays small.
    pub(crate) staged: Option<Box<(vmm::vm::Vm, backup::promote::Restored)>>,
}

/// The name of a role, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RoleKind {
    /// [`Role::Booted`].
    Booted,
    /// [`Role::Protected`].
    Protected,
    /// [`Role::Backup`].
    Backup,
    /// [`Role::Promoted`].
    Promoted,
    /// [`Role::MigrationSource`].
    MigrationSource,
    /// [`Role::MigrationDestination`].
    MigrationDestination,
}

impl RoleKind {
    /// Every role, in declaration order.
    pub const ALL: [Self; 6] = [
        Self::Booted,
        Self::Protected,
        Self::Backup,
        Self::Promoted,
        Self::MigrationSource,
        Self::MigrationDestination,
    ];

    /// The role's name (kebab-case).
    pub fn name(self) -> &'static str {
        match self {
            Self::Booted => "booted",
            Self::Protected => "protected",
            Self::Backup => "backup",
            Self::Promoted => "promoted",
            Self::MigrationSource => "migration-source",
            Self::MigrationDestination => "migration-destination",
        }
    }
}

impl std::fmt::Display for RoleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Guest {
    /// A VM with no migration behind it.
    pub(crate) fn new(vm: Vm, origin: Origin) -> Self {
        Self { vm: Arc::new(Mutex::new(vm)), origin, last_migration: None }
    }

    /// The role of this VM when it is neither protected nor migrating: promoted if it came
    /// from a replica (promotion or migration), booted otherwise.
    pub(crate) fn settled(self) -> Role {
        match self.origin {
            Origin::Promoted { .. } | Origin::Migrated { .. } => Role::Promoted(self),
            _ => Role::Booted(self),
        }
    }
}

impl Migrating {
    /// The VM once this migration failed (or was cancelled): `status` keeps showing it.
    pub(crate) fn after_failure(&self) -> Guest {
        Guest { last_migration: Some(Arc::clone(&self.control)), ..self.guest.clone() }
    }
}

impl Role {
    /// The role's name.
    pub fn kind(&self) -> RoleKind {
        match self {
            Self::Booted(_) => RoleKind::Booted,
            Self::Protected(_) => RoleKind::Protected,
            Self::Backup(_) => RoleKind::Backup,
            Self::Promoted(_) => RoleKind::Promoted,
            Self::MigrationSource(_) => RoleKind::MigrationSource,
            Self::MigrationDestination(_) => RoleKind::MigrationDestination,
        }
    }

    /// The VM, when one runs here.
    pub(crate) fn guest(&self) -> Option<&Guest> {
        match self {
            Self::Booted(g) | Self::Promoted(g) => Some(g),
            Self::Protected(p) => Some(&p.guest),
            Self::MigrationSource(m) => Some(&m.guest),
            Self::Backup(_) | Self::MigrationDestination(_) => None,
        }
    }

    /// The VM, when one runs here.
    pub(crate) fn vm(&self) -> Option<Arc<Mutex<Vm>>> {
        self.guest().map(|g| Arc::clone(&g.vm))
    }

    /// How the VM came to be (a backup or destination: where it listens).
    pub(crate) fn origin(&self) -> Origin {
        match self {
            Self::Backup(s) => Origin::Backup { listen: s.listen.clone() },
            Self::MigrationDestination(r) => Origin::Destination { listen: r.standby.listen.clone() },
            Self::Booted(g) | Self::Promoted(g) => g.origin.clone(),
            Self::Protected(p) => p.guest.origin.clone(),
            Self::MigrationSource(m) => m.guest.origin.clone(),
        }
    }

    /// The migration away from here, running or the last one that failed.
    pub(crate) fn migration(&self) -> Option<&Arc<Control>> {
        match self {
            Self::MigrationSource(m) => Some(&m.control),
            _ => self.guest().and_then(|g| g.last_migration.as_ref()),
        }
    }

    /// The VM when it runs here neither protected nor migrating (a migration that failed is
    /// over, even before the request that ran it has moved the role back).
    pub(crate) fn unprotected(&self) -> Option<Guest> {
        match self {
            Self::Booted(g) | Self::Promoted(g) => Some(g.clone()),
            Self::MigrationSource(m) if self.migrating().is_none() => Some(m.after_failure()),
            _ => None,
        }
    }

    /// The phase of a migration away from here that is under way (or handed over already):
    /// the guest must not be touched meanwhile. `None` once it failed.
    pub(crate) fn migrating(&self) -> Option<String> {
        let Self::MigrationSource(m) = self else { return None };
        let phase = m.control.status().phase;
        (phase != "failed" && phase != "recovered").then_some(phase)
    }
}

/// How often each transition happened, for metrics.
#[derive(Default)]
pub struct Transitions {
    counts: Mutex<[[u64; 6]; 6]>,
}

impl Transitions {
    /// Counts one transition.
    pub fn count(&self, from: RoleKind, to: RoleKind) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c[from as usize][to as usize] += 1;
    }

    /// Every transition that happened, with its count.
    pub fn counts(&self) -> Vec<(RoleKind, RoleKind, u64)> {
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for from in RoleKind::ALL {
            for to in RoleKind::ALL {
                let n = c[from as usize][to as usize];
                if n > 0 {
                    out.push((from, to, n));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_have_distinct_names_and_transitions_are_counted_by_pair() {
        let names: std::collections::BTreeSet<_> = RoleKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), RoleKind::ALL.len());
        for (i, k) in RoleKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "{k} indexes the counters");
        }
        let t = Transitions::default();
        assert!(t.counts().is_empty());
        t.count(RoleKind::Booted, RoleKind::Protected);
        t.count(RoleKind::Protected, RoleKind::Booted);
        t.count(RoleKind::Booted, RoleKind::Protected);
        t.count(RoleKind::MigrationDestination, RoleKind::Promoted);
        assert_eq!(
            t.counts(),
            [
                (RoleKind::Booted, RoleKind::Protected, 2),
                (RoleKind::Protected, RoleKind::Booted, 1),
                (RoleKind::MigrationDestination, RoleKind::Promoted, 1),
            ]
        );
        assert_eq!(RoleKind::MigrationSource.to_string(), "migration-source");
    }
}
