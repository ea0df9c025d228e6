//! Real-time priority for the few hundred microseconds of a checkpoint pause.
//!
//! While the vCPUs are parked, the pause's threads (the caller and the page-copy helper) compete
//! for the cores with everything else of the host: the replication link, the backup, clients.
//! On a two-core host one preemption costs a scheduler slice (milliseconds) and makes the pause's
//! tail. [`RtPriority`] moves the calling thread to `SCHED_FIFO` for as long as it is held and
//! back to the policy it had afterwards. It needs `CAP_SYS_NICE` (or an `RLIMIT_RTPRIO` of at
//! least the priority): without it the first attempt fails, is reported once, and the thread
//! keeps its ordinary policy (the VMM works unprivileged, only its pause's tail is longer).
//! Linux's real-time throttling (`kernel.sched_rt_runtime_us`, 95% by default) bounds what a
//! runaway real-time thread could take.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

/// Failed to change the calling thread's scheduling policy.
#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    /// `sched_setscheduler` refused (most often EPERM: no `CAP_SYS_NICE`).
    #[error("set SCHED_FIFO priority {priority} on thread {tid}")]
    Set {
        /// The priority asked for.
        priority: u8,
        /// The thread.
        tid: i32,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Priority 0 is not a real-time priority (1-99).
    #[error("real-time priority {0} is out of range 1-99")]
    Range(u8),
}

/// The calling thread's policy and priority.
fn current() -> (libc::c_int, libc::c_int) {
    // SAFETY: querying the calling thread (pid 0) with a valid out-parameter.
    unsafe {
        let policy = libc::sched_getscheduler(0);
        let mut param = libc::sched_param { sched_priority: 0 };
        libc::sched_getparam(0, &mut param);
        (policy.max(0), param.sched_priority)
    }
}

fn set(policy: libc::c_int, priority: libc::c_int) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: priority };
    // SAFETY: pid 0 is the calling thread (Linux sets the policy per thread); `param` is valid.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Moves the calling thread to `SCHED_FIFO` at `priority` for good (a helper thread that only
/// runs during pauses).
pub fn make_current_fifo(priority: u8) -> Result<(), SchedError> {
    if !(1..=99).contains(&priority) {
        return Err(SchedError::Range(priority));
    }
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    set(libc::SCHED_FIFO, i32::from(priority)).map_err(|source| SchedError::Set { priority, tid, source })
}

/// Raises the calling thread to `SCHED_FIFO` while held (see the module docs); a no-op when the
/// priority is 0 or an earlier attempt was refused.
pub struct RtPriority {
    priority: u8,
    /// An attempt failed: do not try again (one warning, not one per pause).
    refused: AtomicBool,
}

/// The calling thread's policy before [`RtPriority::raise`], restored on drop.
#[must_use = "the priority drops back when this is dropped"]
pub struct Raised {
    old: Option<(libc::c_int, libc::c_int)>,
}

impl RtPriority {
    /// Raising to `priority` (1-99; 0: never raise).
    pub fn new(priority: u8) -> Self {
        Self { priority: priority.min(99), refused: AtomicBool::new(false) }
    }

    /// Whether raising is asked for and was not refused.
    pub fn active(&self) -> bool {
        self.priority > 0 && !self.refused.load(Ordering::Relaxed)
    }

    /// Raises the calling thread until the result is dropped. A refusal is logged (once) and
    /// leaves the thread as it was.
    pub fn raise(&self) -> Raised {
        if !self.active() {
            return Raised { old: None };
        }
        let old = current();
        match make_current_fifo(self.priority) {
            Ok(()) => Raised { old: Some(old) },
            Err(e) => {
                self.refused.store(true, Ordering::Relaxed);
                tracing::warn!(
                    "{e}: {}; checkpoint pauses run at the ordinary priority (grant CAP_SYS_NICE or an RLIMIT_RTPRIO for a shorter pause tail, or pass --pause-rt-priority 0)",
                    std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default()
                );
                Raised { old: None }
            }
        }
    }
}

impl Drop for Raised {
    fn drop(&mut self) {
        if let Some((policy, priority)) = self.old.take()
            && let Err(e) = set(policy, priority)
        {
            tracing::error!("cannot restore scheduling policy {policy} priority {priority}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raises_while_held_then_restores_or_is_refused_once() {
        std::thread::spawn(|| {
            let before = current();
            let rt = RtPriority::new(3);
            {
                let _r = rt.raise();
                if rt.active() {
                    assert_eq!(current(), (libc::SCHED_FIFO, 3), "raised to SCHED_FIFO 3");
                } else {
                    // Unprivileged: refused, and the thread is as it was.
                    assert_eq!(current(), before);
                }
            }
            assert_eq!(current(), before, "dropped back to the old policy");
            // Off: never touches the thread.
            let off = RtPriority::new(0);
            assert!(!off.active());
            let _r = off.raise();
            assert_eq!(current(), before);
        })
        .join()
        .unwrap();
        assert!(matches!(make_current_fifo(0), Err(SchedError::Range(0))));
    }
}
