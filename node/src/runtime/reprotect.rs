//! The node's automatic re-protection ([`crate::reprotect`]): after a promotion the group
//! granted, a thread probes the standbys in turn and protects the VM to the first that answers,
//! through the same path as `understudy protect`; the run loop records the standby in the
//! group once its replica is consistent (`set_backup`), and the group's confirmation
//! (`Event::Protected`) ends it. Between rounds it waits, doubling the delay.

use std::net::TcpStream;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use failover::NodeId;
use failover::net::PeerSpec;
use primary::stats::ProtectionState;

use super::{Node, lock};
use crate::reprotect::{Phase, Plan, Progress, ReprotectStatus};
use crate::role::Role;

/// How long a probe waits for the standby's TCP accept.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often an attempt looks at the protection's state.
const POLL: Duration = Duration::from_millis(20);

/// The node's re-protection: its plan (set at start) and, once promoted, its progress.
#[derive(Default)]
pub(super) struct Reprotect {
    plan: OnceLock<Plan>,
    progress: Mutex<Option<Progress>>,
}

/// Why an attempt ended without the standby recorded.
enum Ended {
    /// This standby did not make it: try the next.
    Failed(String),
    /// Re-protection stops (the process stops, or an operator took over).
    Stopped(String),
}

fn spec(s: &PeerSpec) -> String {
    format!("{}={}@{}", s.id, s.name, s.addr)
}

impl Node {
    /// Names the standbys this backup protects the VM to once promoted (`understudy backup
    /// --reprotect-to`); set before the process serves.
    pub fn set_reprotect(&self, plan: Plan) {
        tracing::info!(
            standbys = %plan.standbys.iter().map(spec).collect::<Vec<_>>().join(", "),
            "re-protection: once promoted, this vm protects itself to these standbys"
        );
        let _ = self.reprotect.plan.set(plan);
    }

    /// Re-protection for `status` (a promoted VM whose backup named standbys).
    pub(super) fn reprotect_status(&self) -> Option<ReprotectStatus> {
        lock(&self.reprotect.progress).as_ref().map(|p| p.status(Instant::now()))
    }

    fn progress(&self, f: impl FnOnce(&mut Progress)) {
        if let Some(p) = lock(&self.reprotect.progress).as_mut() {
            f(p);
        }
    }

    /// After a granted promotion: starts re-protection, if standbys are named.
    pub(super) fn start_reprotect(self: &Arc<Self>) {
        let Some(plan) = self.reprotect.plan.get().cloned() else { return };
        {
            let mut progress = lock(&self.reprotect.progress);
            if progress.is_some() {
                return;
            }
            *progress = Some(Progress::new(Instant::now()));
        }
        tracing::info!("re-protection: starting (the promoted vm runs unprotected until a standby syncs)");
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("reprotect".into()).spawn(move || {
            if let Some(node) = weak.upgrade() {
                node.reprotect_loop(plan);
            }
        });
        if let Err(e) = spawned {
            tracing::error!("re-protection: cannot start its thread: {e}; protect the vm by hand");
            self.progress(|p| p.phase = Phase::Stopped);
        }
    }

    /// The group confirmed `backup` as the VM's backup (`Event::Protected`).
    pub(super) fn reprotect_recorded(&self, backup: NodeId) {
        self.progress(|p| {
            if p.phase == Phase::Syncing {
                p.recorded = Some(backup);
            }
        });
    }

    fn reprotect_loop(&self, mut plan: Plan) {
        let standbys = plan.standbys.clone();
        loop {
            for standby in &standbys {
                let target = spec(standby);
                let mut attempt = 0;
                self.progress(|p| {
                    p.attempts += 1;
                    attempt = p.attempts;
                    p.target = Some(target.clone());
                    p.next_attempt = None;
                    p.recorded = None;
                });
                match self.reprotect_attempt(&plan, standby) {
                    Ok(()) => {
                        let mut took = Duration::ZERO;
                        self.progress(|p| {
                            p.phase = Phase::Protected;
                            took = p.since.elapsed();
                            p.took = Some(took);
                        });
                        tracing::info!(
                            standby = %target,
                            attempt,
                            took_ms = took.as_secs_f64() * 1e3,
                            "RE-PROTECTED: the group recorded standby {target} as the backup of the promoted vm"
                        );
                        return;
                    }
                    Err(Ended::Stopped(why)) => {
                        self.progress(|p| p.phase = Phase::Stopped);
                        tracing::warn!(standby = %target, "re-protection stopped: {why}");
                        return;
                    }
                    Err(Ended::Failed(why)) => {
                        self.progress(|p| {
                            p.failures += 1;
                            p.last_error = Some(why.clone());
                            p.phase = Phase::Waiting;
                        });
                        tracing::warn!(standby = %target, attempt, "re-protection: attempt failed: {why}");
                    }
                }
            }
            let delay = plan.backoff.next_delay();
            let until = Instant::now() + delay;
            self.progress(|p| p.next_attempt = Some(until));
            tracing::info!(delay_ms = delay.as_millis() as u64, "re-protection: no standby yet; trying again later");
            while Instant::now() < until {
                if let Some(why) = self.reprotect_interrupted(false) {
                    self.progress(|p| p.phase = Phase::Stopped);
                    tracing::warn!("re-protection stopped: {why}");
                    return;
                }
                std::thread::sleep(POLL.max(Duration::from_millis(50)).min(until - Instant::now()));
            }
        }
    }

    /// Why re-protection must stop now, if it must: the process stops, or the role is not the
    /// one it expects (`ours`: the protection of its own attempt runs).
    fn reprotect_interrupted(&self, ours: bool) -> Option<String> {
        if let Some(why) = lock(&self.exit).why.clone() {
            return Some(format!("the process stops ({why})"));
        }
        match (&*self.role(), ours) {
            (Role::Promoted(_), false) | (Role::Protected(_), true) => None,
            (Role::Protected(_), false) => Some("the vm was protected by hand".into()),
            (Role::Promoted(_), true) => Some("the vm was unprotected by hand".into()),
            (other, _) => Some(format!("the node is {} now", other.kind())),
        }
    }

    /// One attempt: probe `standby`, protect to it, wait until the group recorded it.
    fn reprotect_attempt(&self, plan: &Plan, standby: &PeerSpec) -> Result<(), Ended> {
        if let Some(why) = self.reprotect_interrupted(false) {
            return Err(Ended::Stopped(why));
        }
        let target = spec(standby);
        // A standby that is not up refuses the TCP connection of its liveness listener (same
        // port): no protection is started for it, so nothing is asked of the group.
        if let Err(e) = TcpStream::connect_timeout(&standby.addr, PROBE_TIMEOUT) {
            tracing::debug!(standby = %target, "re-protection: probe: {e}");
            return Err(Ended::Failed(format!("standby {target} does not answer ({e})")));
        }
        tracing::info!(standby = %target, "re-protection: standby answers: protecting the vm to it");
        self.progress(|p| p.phase = Phase::Syncing);
        let req = plan.request(standby);
        if let Err(e) = self.protect(req) {
            // Refused before it started: an operator protected it already, or it cannot start.
            if let Some(why) = self.reprotect_interrupted(false) {
                return Err(Ended::Stopped(why));
            }
            return Err(Ended::Failed(format!("protect: {}", transport::error_chain(&e))));
        }
        let t0 = Instant::now();
        loop {
            if let Some(why) = self.reprotect_interrupted(true) {
                return Err(Ended::Stopped(why));
            }
            let state = {
                let role = self.role();
                let Role::Protected(p) = &*role else { continue };
                let r = p.protection.report();
                (p.protection.stats.state(), r.reason)
            };
            let recorded = lock(&self.reprotect.progress).as_ref().and_then(|p| p.recorded);
            if state.0 == ProtectionState::Protected && recorded == Some(standby.id) {
                return Ok(());
            }
            let failed = state.0 == ProtectionState::Failed;
            if failed || t0.elapsed() > plan.sync_timeout {
                let why = if failed {
                    format!("protection to {target} failed: {}", state.1)
                } else {
                    format!(
                        "standby {target} not recorded as the backup within {} s (protection {}: {})",
                        plan.sync_timeout.as_secs(),
                        state.0,
                        state.1
                    )
                };
                if let Err(e) = self.unprotect() {
                    tracing::error!("re-protection: unprotect after a failed attempt: {}", transport::error_chain(&e));
                }
                return Err(Ended::Failed(why));
            }
            std::thread::sleep(POLL);
        }
    }
}
