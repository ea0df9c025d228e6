//! The admin API's requests, as a node answers them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use vmm::vm::Vm;

use super::{Node, NodeError, lock};
use crate::api::{AfterSnapshot, Request, Response};
use crate::protect::{ProtectRequest, Protection};
use crate::role::{Migrating, Protected, Role};
use crate::status::Origin;

#[derive(Serialize)]
struct SnapshotReport {
    dir: PathBuf,
    snapshot_id: Option<String>,
    memory_digest: String,
    memory_bytes: u64,
    state_bytes: u64,
    paused_ms: f64,
    then: AfterSnapshot,
}

impl Node {
    /// Handles one API request.
    pub fn handle(&self, req: Request) -> Response {
        let r = match req {
            Request::Status => serde_json::to_value(self.status()).map_err(NodeError::from),
            Request::Pause => self.pause(),
            Request::Resume => self.resume(),
            Request::Protect(req) => self.protect(req),
            Request::Unprotect => self.unprotect(),
            Request::VerifyJournal => self.verify_journal(),
            Request::Promote { force } => self.promote_request(force),
            Request::OutputJournal => self.output_journal(),
            Request::Snapshot { dir, then } => self.snapshot(&dir, then),
            Request::MemoryDigest => self.digest(),
            Request::Migrate(req) => self.migrate(req),
            Request::MigrateCancel => self.migrate_cancel(),
            Request::Shutdown => {
                self.request_exit("shutdown requested through the api".into());
                Ok(serde_json::json!({"state": "stopping"}))
            }
        };
        match r {
            Ok(v) => Response::ok(v),
            Err(e) => Response::err(&e),
        }
    }

    /// The running VM, for `what`: refused while a migration away from here is under way.
    fn vm_for(&self, what: &'static str) -> Result<Arc<Mutex<Vm>>, NodeError> {
        let role = self.role();
        if let Some(phase) = role.migrating() {
            return Err(NodeError::Migrating { what, phase });
        }
        role.vm().ok_or(NodeError::NotVm)
    }

    fn pause(&self) -> Result<serde_json::Value, NodeError> {
        let vm = self.vm_for("pause")?;
        lock(&vm).pause()?;
        Ok(serde_json::json!({"state": "paused"}))
    }

    fn resume(&self) -> Result<serde_json::Value, NodeError> {
        let vm = self.vm_for("resume")?;
        lock(&vm).resume();
        Ok(serde_json::json!({"state": "running"}))
    }

    /// Booted or promoted -> protected.
    pub(super) fn protect(&self, req: ProtectRequest) -> Result<serde_json::Value, NodeError> {
        crate::protect::validate(&req)?;
        let mut role = self.role();
        if let Some(phase) = role.migrating() {
            return Err(NodeError::Migrating { what: "protect", phase });
        }
        let guest = match &*role {
            Role::Protected(_) => return Err(NodeError::AlreadyProtected),
            other => other.unprotected().ok_or(NodeError::NotVm)?,
        };
        let arbitration = self.arbitration.get();
        let hook = arbitration.map(|a| self.backup_lost_hook(&a.agent));
        let existing = arbitration.and_then(|a| lock(&a.output).clone());
        let protection = Protection::start(&guest.vm, &req, self.link.handle(), existing, hook)
            .map_err(NodeError::StartProtection)?;
        let protected = Protected { guest, protection, backup_node: req.backup_node, backup_recorded: false };
        self.enter(&mut role, Role::Protected(protected), &format!("protecting to {}", req.backup));
        Ok(serde_json::json!({"state": "syncing", "backup": req.backup.to_string()}))
    }

    /// Protected -> booted (or promoted).
    pub(super) fn unprotect(&self) -> Result<serde_json::Value, NodeError> {
        let mut role = self.role();
        let next = match &*role {
            Role::Backup(_) | Role::MigrationDestination(_) => return Err(NodeError::NotVm),
            Role::Protected(p) => p.guest.clone().settled(),
            _ => return Err(NodeError::NotProtected),
        };
        let old = self.enter(&mut role, next, "unprotect requested");
        drop(role);
        if let Role::Protected(p) = old {
            p.protection.stop(&p.guest.vm, self.link.handle())?;
        }
        Ok(serde_json::json!({"state": "unprotected"}))
    }

    fn verify_journal(&self) -> Result<serde_json::Value, NodeError> {
        let role = self.role();
        Ok(match &*role {
            Role::Protected(p) => serde_json::to_value(&*lock(&p.protection.journal))?,
            Role::Backup(s) => serde_json::to_value(s.node.journal())?,
            Role::MigrationDestination(r) => serde_json::to_value(r.standby.node.journal())?,
            _ => return Err(NodeError::NothingVerified),
        })
    }

    fn output_journal(&self) -> Result<serde_json::Value, NodeError> {
        let role = self.role();
        let Role::Protected(p) = &*role else { return Err(NodeError::NotProtected) };
        let o = p.protection.output.as_ref().ok_or(NodeError::NoNetDevice)?;
        Ok(serde_json::json!({ "now_ns": primary::output::monotonic_ns(), "released": o.journal() }))
    }

    /// `understudy promote`: with arbitration, ask the group (the `Granted` event promotes)
    /// and wait for it; without, or forced, promote at once.
    fn promote_request(&self, force: bool) -> Result<serde_json::Value, NodeError> {
        match &*self.role() {
            Role::Backup(_) => {}
            Role::MigrationDestination(_) => return Err(NodeError::Destination),
            other if matches!(other.origin(), Origin::Migrated { .. }) => return Err(NodeError::Destination),
            _ => return Err(NodeError::NotBackup),
        }
        let Some(agent) = self.agent() else { return self.promote() };
        if force {
            tracing::error!(
                "FORCED PROMOTION without the arbitration group's grant: if the primary is alive, two copies now run"
            );
            let mut v = self.promote()?;
            v["forced"] = true.into();
            return Ok(v);
        }
        let vm = agent.vm;
        tracing::warn!("promotion requested through the api: asking the arbitration group");
        if let Err(e) = agent.call(self.tokio.handle(), move |a, now| a.report_primary_dead(now, vm))? {
            return Err(NodeError::GroupRefused(e));
        }
        let timeout = Duration::from_secs(10);
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            let origin = self.role().guest().map(|g| g.origin.clone());
            if let Some(origin) = origin {
                return Ok(serde_json::json!({ "state": "running", "granted": true, "origin": origin }));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Not granted: the primary still holds (and renews) its lease. Withdraw the request so
        // a later grant cannot surprise anybody.
        let _ = agent.call(self.tokio.handle(), move |a, now| a.report_primary_alive(now, vm));
        Err(NodeError::NotGranted(timeout.as_secs()))
    }

    fn snapshot(&self, dir: &Path, then: AfterSnapshot) -> Result<serde_json::Value, NodeError> {
        let vm = self.vm_for("snapshot")?;
        let mut vm = lock(&vm);
        let was_paused = vm.is_paused();
        let t0 = Instant::now();
        vm.pause()?;
        let result = vm
            .save_state()
            .map_err(|source| NodeError::SnapshotState { dir: dir.to_path_buf(), source })
            .and_then(|state| {
                // SAFETY: the VM is paused: vCPUs are parked and nothing else writes guest memory.
                unsafe { vmm::snapshot::write(dir, vm.memory(), &state) }
                    .map_err(|source| NodeError::SnapshotWrite { dir: dir.to_path_buf(), source })
            });
        let paused_ms = t0.elapsed().as_secs_f64() * 1e3;
        let info = match result {
            Ok(info) => info,
            Err(e) => {
                if !was_paused {
                    vm.resume();
                }
                return Err(e);
            }
        };
        match then {
            AfterSnapshot::Resume if !was_paused => vm.resume(),
            AfterSnapshot::Exit => self.request_exit(format!("exit after snapshot into {}", dir.display())),
            _ => {}
        }
        tracing::info!(
            dir = %dir.display(),
            digest = format_args!("{:016x}", info.memory_digest),
            paused_ms,
            "snapshot written"
        );
        Ok(serde_json::to_value(SnapshotReport {
            dir: dir.to_path_buf(),
            snapshot_id: info.snapshot_id,
            memory_digest: format!("{:016x}", info.memory_digest),
            memory_bytes: info.memory_bytes,
            state_bytes: info.state_bytes,
            paused_ms,
            then,
        })?)
    }

    fn digest(&self) -> Result<serde_json::Value, NodeError> {
        let vm = self.role().vm().ok_or(NodeError::ReplicaDigest)?;
        let mut vm = lock(&vm);
        let was_paused = vm.is_paused();
        vm.pause()?;
        // SAFETY: paused: nothing writes guest memory.
        let d = unsafe { vmm::memory::digest(vm.memory()) };
        if !was_paused {
            vm.resume();
        }
        Ok(serde_json::json!({ "memory_digest": format!("{d:016x}") }))
    }

    /// `understudy migrate`: booted (or promoted) -> migration source; runs the migration to its
    /// end (this API call waits). On success the guest runs at the destination and this process
    /// exits; on failure the role goes back and the guest runs on here.
    fn migrate(&self, req: primary::migrate::MigrateRequest) -> Result<serde_json::Value, NodeError> {
        req.validate()?;
        let (guest, control) = {
            let mut role = self.role();
            let guest = match &*role {
                Role::Backup(_) | Role::MigrationDestination(_) => return Err(NodeError::NotVm),
                Role::Protected(_) => return Err(NodeError::MigrateProtected),
                _ if self.arbitration.get().is_some() => return Err(NodeError::MigrateArbitrated),
                other => match other.migrating() {
                    Some(phase) => return Err(NodeError::MigrationRunning(phase)),
                    None => other.unprotected().ok_or(NodeError::NotVm)?,
                },
            };
            let control = Arc::new(primary::migrate::Control::default());
            let migrating = Migrating { guest: guest.clone(), control: Arc::clone(&control) };
            self.enter(&mut role, Role::MigrationSource(migrating), &format!("migrating to {}", req.to));
            (guest, control)
        };
        let to = req.to;
        let result = crate::migrate::source(&guest.vm, &self.vm_name, Arc::clone(&control))
            .map_err(NodeError::from)
            .and_then(|src| self.tokio.block_on(primary::migrate::migrate(src, req)).map_err(NodeError::from));
        match result {
            Ok(report) => {
                self.request_exit(format!("migrated to {to}"));
                Ok(serde_json::to_value(report)?)
            }
            Err(e) => {
                let mut role = self.role();
                if let Role::MigrationSource(m) = &*role
                    && Arc::ptr_eq(&m.control, &control)
                {
                    let guest = m.after_failure();
                    let why = format!("the migration to {to} failed: {}", transport::error_chain(&e));
                    self.enter(&mut role, guest.settled(), &why);
                }
                Err(e)
            }
        }
    }

    fn migrate_cancel(&self) -> Result<serde_json::Value, NodeError> {
        let c = self.role().migration().cloned().ok_or(NodeError::NoMigration)?;
        let phase = c.status().phase;
        if !c.cancel() {
            return Err(NodeError::TooLateToCancel(phase));
        }
        Ok(serde_json::json!({"cancelled": true, "phase": phase}))
    }
}
