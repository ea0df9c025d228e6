//! The node's arbitration agent (`failover::net::agent` is the agent itself): starting it, its
//! events (grant, fencing, degraded running), the gated output, and what a backup does when its
//! session reports on the primary.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use failover::net::agent::{Agent, AgentConfig};

use super::{Arbitration, Node, NodeError, lock};
use crate::failover::LossAction;
use crate::role::Role;
use crate::status::{ArbitrationState, ArbitrationStatus};

impl Node {
    /// Arbitration for a booted VM: install gated output, ask the group for activity and wait
    /// for the grant, keep the lease, obey fencing.
    pub fn start_primary_agent(self: &Arc<Self>, cfg: &AgentConfig) -> Result<(), NodeError> {
        let arbitration = self.start_agent(cfg)?;
        self.install_gated_output(arbitration)?;
        self.spawn_agent_events(&arbitration.agent);
        let generation = arbitration.agent.acquire(self.tokio.handle(), Duration::from_secs(30))?;
        tracing::info!(generation, "arbitration: this copy is active");
        Ok(())
    }

    /// Arbitration for a backup: report the primary's death to the group, promote only once
    /// granted.
    pub fn start_backup_agent(self: &Arc<Self>, cfg: &AgentConfig) -> Result<(), NodeError> {
        let arbitration = self.start_agent(cfg)?;
        self.spawn_agent_events(&arbitration.agent);
        Ok(())
    }

    fn start_agent(self: &Arc<Self>, cfg: &AgentConfig) -> Result<&Arbitration, NodeError> {
        if self.arbitration.get().is_some() {
            return Err(NodeError::AgentRunning);
        }
        let agent = Agent::start(cfg, &self.vm_name, self.tokio.handle())?;
        let arbitration = self.arbitration.get_or_init(|| Arbitration { agent, output: Mutex::new(None) });
        self.watch_arbiter(&arbitration.agent);
        Ok(arbitration)
    }

    /// The agent, when arbitration is configured.
    pub(super) fn agent(&self) -> Option<Arc<Agent>> {
        self.arbitration.get().map(|a| Arc::clone(&a.agent))
    }

    /// A dead arbiter (its task ended: a journal that cannot be written, a panic) leaves this
    /// copy unable to renew its lease or to be granted anything. Rather than hold output for
    /// good (a primary whose backup still hears it is never failed over) or sit as a backup
    /// that can never be promoted, stop the guest and exit non-zero: the two other voters still
    /// form a quorum, so the group fails over from a dead primary or degrades without a dead
    /// backup, as after a crash.
    fn watch_arbiter(self: &Arc<Self>, agent: &Agent) {
        let weak = Arc::downgrade(self);
        agent.on_failure(self.tokio.handle(), move |why| {
            // Off the async runtime: stopping the guest waits for its vCPUs.
            std::thread::spawn(move || {
                if let Some(node) = weak.upgrade() {
                    node.arbitration_failed(why);
                }
            });
        });
    }

    fn arbitration_failed(&self, why: String) {
        tracing::error!("ARBITRATION FAILED: {why}; stopping this copy of the guest and exiting");
        lock(&self.exit).arbitration_failed = Some(why.clone());
        self.stop_guest();
        self.request_exit(format!("arbitration failed: {why}"));
    }

    /// Stops this copy of the guest for good (fenced, or arbitration lost).
    fn stop_guest(&self) {
        let vm = self.role().vm();
        if let Some(vm) = vm {
            let mut g = lock(&vm);
            let _ = g.pause();
            g.shutdown();
        }
    }

    /// The arbitration agent's state for `status`.
    pub(super) fn arbitration_status(&self) -> Option<ArbitrationStatus> {
        let agent = &self.arbitration.get()?.agent;
        let reason = agent.failure();
        let state = if reason.is_some() { ArbitrationState::Failed } else { ArbitrationState::Running };
        Some(ArbitrationStatus { node: agent.id, state, reason })
    }

    fn install_gated_output(&self, arbitration: &Arbitration) -> Result<(), NodeError> {
        let vm = self.role().vm();
        let Some(vm) = vm else { return Ok(()) };
        let Some(out) = primary::output::install(&vm, Some(arbitration.agent.gate()))? else { return Ok(()) };
        let o2 = Arc::clone(&out);
        arbitration.agent.spawn_permit_refresher(self.tokio.handle(), move || {
            o2.flush_allowed();
        });
        *lock(&arbitration.output) = Some(out);
        Ok(())
    }

    fn spawn_agent_events(self: &Arc<Self>, agent: &Agent) {
        let Some(mut events) = lock(&agent.events).take() else { return };
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("arbitration-events".into())
            .spawn(move || {
                while let Some(ev) = events.blocking_recv() {
                    let Some(node) = weak.upgrade() else { return };
                    node.on_agent_event(ev);
                }
            })
            .expect("spawn arbitration event thread");
    }

    fn on_agent_event(self: &Arc<Self>, ev: failover::Event) {
        use failover::Event;
        let has_vm = self.role().vm().is_some();
        match ev {
            Event::Granted { vm, generation } => {
                tracing::info!(vm = vm.0, generation, "arbitration: granted");
                let backup = matches!(*self.role(), Role::Backup(_));
                if backup {
                    match self.promote() {
                        Ok(v) => {
                            tracing::info!("promotion done: {v}");
                            if let Some(a) = self.arbitration.get()
                                && let Err(e) = self.install_gated_output(a)
                            {
                                tracing::error!("gate the promoted vm's output: {}", transport::error_chain(&e));
                            }
                            self.start_reprotect();
                        }
                        Err(e) => tracing::error!("promotion failed: {}", transport::error_chain(&e)),
                    }
                }
            }
            Event::Fenced { vm, generation } if !has_vm => {
                // A backup (re)joining under a node id that once held the VM: its old grant is
                // superseded; there is no guest here to stop.
                tracing::info!(vm = vm.0, generation, "arbitration: an old grant of this node is superseded");
            }
            Event::Fenced { vm, generation } => {
                tracing::error!(
                    vm = vm.0,
                    generation,
                    "FENCED: generation {generation} was granted elsewhere; stopping this copy of the guest for good"
                );
                self.stop_guest();
                self.request_exit(format!("fenced by generation {generation}"));
            }
            Event::Degraded { vm, generation } => {
                tracing::error!(vm = vm.0, generation, "arbitration: the group agreed the primary runs degraded");
                // The group dropped the backup: once a backup is synced again it must be
                // recorded again, or it would not be a failover target.
                if let Role::Protected(p) = &mut *self.role() {
                    p.backup_recorded = false;
                }
                let output = self.arbitration.get().and_then(|a| lock(&a.output).clone());
                if let Some(o) = output {
                    o.set_passthrough(true);
                }
            }
            Event::LeaseLost { vm, generation } => {
                tracing::warn!(vm = vm.0, generation, "arbitration: lease lost, output held")
            }
            Event::LeaseRegained { vm, generation } => {
                tracing::info!(vm = vm.0, generation, "arbitration: lease regained")
            }
            Event::Protected { vm, generation, backup } => {
                tracing::info!(
                    vm = vm.0,
                    generation,
                    backup,
                    "arbitration: the group recorded node {backup} as the backup"
                );
                self.reprotect_recorded(backup);
            }
            Event::BackupDropped { vm, generation } => {
                tracing::warn!(vm = vm.0, generation, "arbitration: this replica is no longer a failover target")
            }
            other => tracing::info!("arbitration: {other:?}"),
        }
    }

    /// With arbitration, what the epoch engine calls when the backup is lost: ask the group to
    /// run degraded.
    pub(super) fn backup_lost_hook(&self, agent: &Arc<Agent>) -> Arc<dyn Fn() + Send + Sync> {
        let a = Arc::clone(agent);
        let h = self.tokio.handle().clone();
        Arc::new(move || {
            let vm = a.vm;
            let handle = a.handle.clone();
            h.spawn(async move {
                match handle.call(move |ar, now| ar.report_backup_dead(now, vm)).await {
                    Ok(Ok(())) => tracing::warn!("backup lost: asked the group to run degraded"),
                    Ok(Err(e)) => tracing::error!("report backup dead: {e}"),
                    Err(e) => tracing::error!("report backup dead: {e}"),
                }
            });
        })
    }

    /// With arbitration: once the backup holds a consistent replica, record it in the group so
    /// it may be promoted.
    pub(super) fn record_backup_when_protected(&self) {
        let Some(agent) = self.agent() else { return };
        let node = {
            let role = self.role();
            let Role::Protected(p) = &*role else { return };
            let Some(node) = p.backup_node else { return };
            if p.backup_recorded || p.protection.stats.state() != primary::stats::ProtectionState::Protected {
                return;
            }
            node
        };
        let vm = agent.vm;
        match agent.call(self.tokio.handle(), move |a, now| a.set_backup(now, vm, node)) {
            Ok(Ok(())) => {
                tracing::info!(backup = node, "arbitration: asked the group to record the backup");
                if let Role::Protected(p) = &mut *self.role() {
                    p.backup_recorded = true;
                }
            }
            Ok(Err(e)) => tracing::warn!("record backup: {e}"),
            Err(e) => tracing::warn!("record backup: {e:#}"),
        }
    }

    /// A backup: carries out what [`crate::failover::on_primary_lost`] decides about each report
    /// of its session on the primary.
    pub(super) fn spawn_failover(
        self: &Arc<Self>,
        lost_rx: std::sync::mpsc::Receiver<backup::server::PrimaryLost>,
        auto_promote: bool,
    ) -> Result<(), NodeError> {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("failover".into())
            .spawn(move || {
                while let Ok(lost) = lost_rx.recv() {
                    let Some(node) = weak.upgrade() else { return };
                    if node.on_primary_lost(&lost, auto_promote) {
                        return;
                    }
                }
            })
            .map_err(|e| NodeError::Spawn("failover", e))?;
        Ok(())
    }

    /// One report on the primary; true once this backup promoted itself (or tried).
    fn on_primary_lost(&self, lost: &backup::server::PrimaryLost, auto_promote: bool) -> bool {
        let agent = self.agent();
        match (crate::failover::on_primary_lost(lost, agent.is_some(), auto_promote), agent) {
            (LossAction::Withdraw, Some(agent)) => {
                let vm = agent.vm;
                tracing::info!("{}: withdrawing a takeover request, if any", lost.reason);
                if let Err(e) = agent.call(self.tokio.handle(), move |a, now| a.report_primary_alive(now, vm)) {
                    tracing::error!("report primary alive: {e:#}");
                }
                false
            }
            (LossAction::AskGroup { gone, suspect }, Some(agent)) => {
                let vm = agent.vm;
                let what = if suspect { "suspect" } else { "lost" };
                tracing::warn!(epoch = lost.epoch, "primary {what} ({}): asking the group for activity", lost.reason);
                let report = agent.call(self.tokio.handle(), move |a, now| {
                    if gone { a.report_primary_gone(now, vm) } else { a.report_primary_dead(now, vm) }
                });
                match report {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!("report primary dead: {e}"),
                    Err(e) => tracing::error!("report primary dead: {e:#}"),
                }
                false
            }
            (LossAction::Promote, _) => {
                let since_commit = lost.last_commit.map(|t| t.elapsed().as_secs_f64() * 1e3);
                tracing::warn!(epoch = lost.epoch, ?since_commit, "primary lost ({}): promoting", lost.reason);
                match self.promote() {
                    Ok(v) => tracing::info!("auto-promotion done: {v}"),
                    Err(e) => tracing::error!("auto-promotion failed: {}", transport::error_chain(&e)),
                }
                true
            }
            (LossAction::LeaveToOperator, _) => {
                tracing::error!(
                    epoch = lost.epoch,
                    "primary lost ({}); not promoting by itself: run `understudy promote`",
                    lost.reason
                );
                false
            }
            // Without arbitration nothing else rules out two active copies: a suspicion is
            // only logged (the server did), the end of the session decides.
            _ => false,
        }
    }
}
