//! Named fault points for the fault-injection harness.
//!
//! `UNDERSTUDY_FAILPOINTS=name[@hit],...` in a process's environment makes [`hit`] kill the
//! process with SIGKILL (as `kill -9` would) the `hit`-th time (default: first) the point named
//! `name` is reached. Without the variable a point costs one relaxed atomic load.
//!
//! With `UNDERSTUDY_FAILPOINT_VICTIM=<pidfile>` as well, a point that fires kills the process
//! whose pid that file holds instead, and this process carries on: the harness uses it to kill
//! the primary at an instant only the backup can see (a checkpoint committed, its ack not yet
//! sent). Points used:
//!
//! | name | where |
//! |---|---|
//! | `primary.paused` | vCPUs parked, before the dirty log is fetched |
//! | `primary.harvest` | dirty log fetched, pages not yet copied |
//! | `primary.shipped` | an epoch handed to the sender, before its ack |
//! | `primary.acked` | an ack arrived, before the held output is released |
//! | `backup.committed` | a checkpoint applied to the replica, before the ack is sent |
//! | `primary.resync` | a sync round of a *re*-sync starts (output held for the old replica) |
//! | `migrate.paused` | migration source: the guest paused for the stop-and-copy, nothing sent yet |
//! | `migrate.handover` | migration source: the switch-over epoch acknowledged, the hand-over not sent |
//!
//! Behaviour points do not kill: [`fires`] returns true on the armed hit and the caller
//! injects the fault itself:
//!
//! | name | what happens |
//! |---|---|
//! | `backup.refuse` | the backup refuses a checkpoint as if it did not apply (it then asks for a baseline) |
//! | `backup.session-panic` | the backup's session task panics (a bug in the session) |
//! | `primary.link-panic` | the primary's link task panics on an ack (the epoch engine then stops) |
//! | `primary.inbound-stream-off` | from its armed hit on, the primary's link forwards no inbound frame on the session (refused): frames reach the backup's log by their side copies only ([`fires_from`]) |
//! | `migrate.stall-switchover` | migration source: holds the paused guest up to 5 s before sending the last epoch (a cancel ends the wait) |
//! | `migrate.stall-handover` | migration source: holds up to 5 s after the switch-over epoch's ack, before the hand-over (a cancel ends the wait) |

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Armed {
    name: String,
    at: u64,
    count: AtomicU64,
}

fn armed() -> &'static [Armed] {
    static ARMED: OnceLock<Vec<Armed>> = OnceLock::new();
    ARMED.get_or_init(|| {
        let Ok(spec) = std::env::var("UNDERSTUDY_FAILPOINTS") else { return Vec::new() };
        spec.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                let (name, at) = match s.trim().split_once('@') {
                    Some((n, k)) => (n.to_string(), k.parse().unwrap_or(1)),
                    None => (s.trim().to_string(), 1),
                };
                Armed { name, at: at.max(1), count: AtomicU64::new(0) }
            })
            .collect()
    })
}

/// Reaches the behaviour point `name`: true on the armed hit (the caller then injects its
/// fault), false otherwise. Counts hits like [`hit`].
pub fn fires(name: &str) -> bool {
    armed().iter().any(|a| a.name == name && a.count.fetch_add(1, Ordering::Relaxed) + 1 == a.at)
}

/// Reaches the behaviour point `name`: true on the armed hit and every later one (a fault that
/// lasts), false otherwise.
pub fn fires_from(name: &str) -> bool {
    armed().iter().any(|a| a.name == name && a.count.fetch_add(1, Ordering::Relaxed) + 1 >= a.at)
}

/// Reaches the fault point `name`: kills the process if it is armed for this hit.
pub fn hit(name: &str) {
    for a in armed() {
        if a.name == name && a.count.fetch_add(1, Ordering::Relaxed) + 1 == a.at {
            if let Ok(pidfile) = std::env::var("UNDERSTUDY_FAILPOINT_VICTIM") {
                kill_victim(name, a.at, &pidfile);
                return;
            }
            tracing::error!("fault point {name} reached (hit {}): killing this process", a.at);
            eprintln!("understudy: fault point {name} reached: SIGKILL");
            // A kill -9 of ourselves: no destructors, no flush, like a crash.
            let _ = std::process::Command::new("kill").args(["-9", &std::process::id().to_string()]).status();
            std::process::abort();
        }
    }
}

fn kill_victim(name: &str, at: u64, pidfile: &str) {
    let pid = std::fs::read_to_string(pidfile).ok().and_then(|s| s.trim().parse::<u32>().ok());
    let Some(pid) = pid else {
        tracing::error!("fault point {name} reached (hit {at}): no pid in {pidfile}; nobody killed");
        return;
    };
    let killed = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
    tracing::error!("fault point {name} reached (hit {at}): FAULT killed pid {pid} ({killed:?})");
}
