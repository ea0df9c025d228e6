//! The `double-failover` fault point of `testbed faults` (issue 17): automatic re-protection,
//! then a second failover.
//!
//! The backup (node 2, ns b) runs with `--reprotect-to 1=primary@10.78.0.1:7400`. The harness
//! kills the primary (`kill -9`) while the checker client loads the guest; the backup is
//! promoted. The old primary's host "comes back": an ordinary `understudy backup` in ns p with
//! node id 1 and its raft directory (`standby`, naming `2=backup@10.78.0.2:7400` in turn), and
//! the promoted VM must protect itself to it with no command (its status `reprotect.state`
//! `protected`: the group recorded the standby). Then the promoted VM is killed too: the
//! standby is promoted, and re-protects itself to a new backup process on the backup's host
//! (`backup2`). The judge wants both promotions granted, both re-protections, and the client's
//! verdict over the whole run: 0 lost acknowledged writes, no contradiction, no reconnect.
//!
//! Times per run: the client's first reply after each kill (`failover_ms`, and
//! `failover2_ms` from the client's completion times around the second kill, its `window`),
//! and per re-protection the time from the standby's start to the promoted VM's
//! `RE-PROTECTED` line (`reprotect_ms`) and from its promotion (`since_promotion_ms`).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use serde_json::{Value, json};

use super::{Procs, RunReport, Topology, field, line_time, read, s, status, wall};
use crate::harness::interrupt::sleep;
use crate::harness::rng::XorShift64;
use crate::harness::wait::poll_until as wait_until;

/// How long one run of the point may take (two syncs of the 64 MiB guest, two failovers).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// The backup's flags for re-protection to the primary's host (added to its command line).
pub fn backup_flags() -> Vec<String> {
    reprotect_to("p")
}

fn reprotect_to(host: &str) -> Vec<String> {
    let standby = match host {
        "p" => "1=primary@10.78.0.1:7400",
        _ => "2=backup@10.78.0.2:7400",
    };
    ["--reprotect-to", standby, "--reprotect-retry-ms", "100", "--reprotect-retry-max-ms", "1000"]
        .map(String::from)
        .to_vec()
}

/// What one re-protection took.
#[derive(Clone, Debug, Default)]
pub struct Reprotection {
    /// The standby's start -> the promoted VM's `RE-PROTECTED` line.
    pub reprotect_ms: Option<f64>,
    /// The promotion -> that line (the node's own `took_ms`).
    pub since_promotion_ms: Option<f64>,
}

/// The point's own account of a run.
#[derive(Clone, Debug, Default)]
pub struct DoubleRun {
    /// Re-protection after the first failover, then after the second.
    pub reprotections: Vec<Reprotection>,
    /// Second kill -> the client's first reply completed after it.
    pub failover2_ms: Option<f64>,
    /// The standby was promoted (with the group's grant).
    pub promoted2: bool,
    /// Wall clock of the second kill.
    pub fault2: Option<f64>,
}

impl DoubleRun {
    /// For the JSON report.
    pub fn to_json(&self) -> Value {
        json!({
            "reprotect_ms": self.reprotections.iter().map(|r| r.reprotect_ms).collect::<Vec<_>>(),
            "reprotect_since_promotion_ms": self.reprotections.iter().map(|r| r.since_promotion_ms).collect::<Vec<_>>(),
            "failover2_ms": self.failover2_ms,
            "promoted2": self.promoted2,
        })
    }
}

/// An `understudy backup` on `host` (p: node 1, b: node 2) re-protecting to the other host.
fn backup_args(opts: &super::Options, dir: &Path, host: &str, tag: &str) -> Vec<String> {
    let (me, other, id, ip, peer) = match host {
        "p" => ("primary", "backup", "1", "10.78.0.1", "2=backup@10.78.0.2:7502"),
        _ => ("backup", "primary", "2", "10.78.0.2", "1=primary@10.78.0.1:7501"),
    };
    let f = |x: &str| s(dir.join(x));
    let mut a: Vec<String> = [
        "backup",
        "--listen",
        &format!("{ip}:7400"),
        "--certs",
        &f("certs"),
        "--name",
        me,
        "--primary-name",
        other,
        "--memory",
        "64M",
        "--api",
        &f(&format!("{tag}.sock")),
        "--tap",
        "tap0",
        "--serial",
        &f(&format!("{tag}-serial.log")),
        "--detect-ms",
        &opts.detect_ms.to_string(),
        "--heartbeat-ms",
        "10",
        "--arbiter-id",
        id,
        "--arbiter-listen",
        &format!("{ip}:750{id}"),
        "--arbiter-peer",
        peer,
        "--arbiter-peer",
        "3=witness@10.78.0.3:7503",
        "--arbiter-data",
        &f(&format!("raft{id}")),
    ]
    .map(String::from)
    .to_vec();
    a.extend(reprotect_to(if host == "p" { "b" } else { "p" }));
    if !opts.no_lan_copy {
        a.push("--lan-copy".into());
    }
    a
}

/// Waits until the VM behind `sock` (whose log is `log`) is re-protected: its status says the
/// group recorded the standby. Returns the times, or None after `within`.
fn wait_reprotected(
    opts: &super::Options,
    sock: &Path,
    log: &Path,
    started: f64,
    until: Instant,
) -> Result<Option<Reprotection>> {
    let done = wait_until(until, || {
        let st = status(&opts.understudy, sock)?;
        (st["reprotect"]["state"] == "protected" && st["protection"]["state"] == "protected").then_some(())
    })?;
    if done.is_none() {
        return Ok(None);
    }
    let line = read(log).lines().find(|l| l.contains("RE-PROTECTED")).map(str::to_string);
    Ok(Some(Reprotection {
        reprotect_ms: line.as_deref().and_then(line_time).map(|t| (t - started) * 1e3),
        since_promotion_ms: line.as_deref().and_then(|l| field(l, "took_ms")),
    }))
}

/// After the first kill (the primary's, at `fault_wall`): waits for the promotion, starts the
/// standby, waits for re-protection, kills the promoted VM, waits for the standby's promotion,
/// starts a backup on the backup's host and waits for the second re-protection. Problems go to
/// `rep.problems`; the run's account to `rep.double`.
#[allow(clippy::too_many_arguments)]
pub(super) fn after_first_kill(
    opts: &super::Options,
    topo: &Topology,
    procs: &mut Procs,
    dir: &Path,
    rng: &mut XorShift64,
    deadline: Instant,
    rep: &mut RunReport,
) -> Result<()> {
    let d = |f: &str| -> PathBuf { dir.join(f) };
    let mut run = DoubleRun::default();
    let bound = |secs| deadline.min(Instant::now() + Duration::from_secs(secs));
    let promoted = wait_until(bound(10), || read(&d("backup.log")).contains("PROMOTED").then_some(()))?;
    promoted.ok_or_else(|| anyhow!("the backup was not promoted after the primary's kill"))?;

    // The old primary's host is back: its standby backup starts (node 1, its raft directory).
    let started = wall();
    let standby = backup_args(opts, dir, "p", "s");
    procs.spawn("standby", &topo.ns("p"), &opts.understudy, &standby, &[], &d("standby.log"))?;
    match wait_reprotected(opts, &d("b.sock"), &d("backup.log"), started, bound(30))? {
        Some(r) => run.reprotections.push(r),
        None => {
            rep.double = Some(run);
            return Err(anyhow!("the promoted vm was not re-protected within 30 s of the standby's start"));
        }
    }
    // The group committed SetBackup (the status says so); the client loads the new pair a while.
    sleep(Duration::from_millis(rng.range(1000, 2500)))?;

    // Second failover: the promoted VM dies too.
    let fault2 = wall();
    procs.kill("backup");
    run.fault2 = Some(fault2);
    // The client reports its completion times around this window (`failover2_ms`).
    fs::write(d("ctl/window"), format!("{fault2:.6} {:.6}", fault2 + 20.0))?;
    let promoted2 = wait_until(bound(10), || read(&d("standby.log")).contains("PROMOTED").then_some(()))?;
    let slog = read(&d("standby.log"));
    run.promoted2 = promoted2.is_some() && slog.contains("arbitration: granted");
    if !run.promoted2 {
        rep.double = Some(run);
        return Err(anyhow!("the standby was not promoted (with a grant) after the second kill"));
    }
    // The backup's host comes back in turn: the standby, now the VM, re-protects itself to it.
    sleep(Duration::from_millis(500))?;
    let started = wall();
    let again = backup_args(opts, dir, "b", "b2");
    procs.spawn("backup2", &topo.ns("b"), &opts.understudy, &again, &[], &d("backup2.log"))?;
    match wait_reprotected(opts, &d("s.sock"), &d("standby.log"), started, bound(30))? {
        Some(r) => run.reprotections.push(r),
        None => rep.problems.push("the standby, promoted, was not re-protected within 30 s".into()),
    }
    rep.double = Some(run);
    Ok(())
}

/// After the client's verdict: the second failover's time from the client's completions.
pub fn judge(dir: &Path, rep: &mut RunReport) {
    let Some(run) = rep.double.as_mut() else {
        rep.problems.push("double-failover: no account of the run".into());
        return;
    };
    if let Some(f2) = run.fault2 {
        let done = fs::read_to_string(dir.join("ctl/completions")).unwrap_or_default();
        run.failover2_ms =
            done.lines().filter_map(|l| l.trim().parse::<f64>().ok()).find(|&t| t > f2).map(|t| (t - f2) * 1e3);
        if run.failover2_ms.is_none() {
            rep.problems.push("no client reply after the second kill".into());
        }
    }
    if run.reprotections.len() < 2 {
        rep.problems.push(format!("re-protected {} time(s), expected 2", run.reprotections.len()));
    }
}

/// Summary lines: per-run p50/max of the failover and re-protection times.
pub fn summary(reports: &[RunReport]) -> String {
    let runs: Vec<&RunReport> = reports.iter().filter(|r| r.double.is_some()).collect();
    if runs.is_empty() {
        return String::new();
    }
    let col = |f: &dyn Fn(&RunReport) -> Option<f64>| -> Vec<f64> { runs.iter().filter_map(|r| f(r)).collect() };
    let rp = |i: usize| move |r: &RunReport| r.double.as_ref()?.reprotections.get(i)?.reprotect_ms;
    let pm = |v: Vec<f64>| {
        format!("{} / {}", super::fmt_ms(super::pct(&v, 50.0)), super::fmt_ms(v.iter().copied().reduce(f64::max)))
    };
    format!(
        "\n| double-failover (p50 / max ms) | failover 1 | failover 2 | re-protection 1 | re-protection 2 |\n|---|---|---|---|---|\n| {} runs, {} pass, {} lost | {} | {} | {} | {} |\n",
        runs.len(),
        runs.iter().filter(|r| r.outcome == "pass").count(),
        runs.iter().map(|r| r.lost_writes).sum::<u64>(),
        pm(col(&|r| r.failover_ms)),
        pm(col(&|r| r.double.as_ref()?.failover2_ms)),
        pm(col(&rp(0))),
        pm(col(&rp(1))),
    )
}
