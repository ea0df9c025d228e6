//! The migration fault points of `testbed faults` (issue 15).
//!
//! Each run boots the kv guest as a migration source (`understudy run`) and a destination
//! (`understudy receive`) in one namespace of their own (`usm<pid>-<n>`, the migration
//! benchmark's [`KvNet`]: a bridge at 10.79.0.1 with the source's TAP and the destination's on
//! it, so the guest keeps 10.79.0.2 wherever it runs), loads it with the checker client
//! (`scripts/faults_client.py`), starts `understudy migrate` (reverse checkpoints on, the
//! default) and injects the point's fault at a moment drawn from the run's RNG (`--seed`):
//!
//! | point | mode | fault | expected |
//! |---|---|---|---|
//! | `migrate.dest-kill-precopy` | precopy (slow rounds) | `kill -9` destination in the rounds | fails; guest runs on at the source, 0 lost |
//! | `migrate.source-kill-precopy` | precopy (slow rounds) | `kill -9` source in the rounds | source died before the switch-over: destination exits non-zero, never runs a guest |
//! | `migrate.partition` | demand | `lo` down 1.5-2.5 s during post-copy | one copy: the source recovers (`recovered`), the destination fences itself when the link heals (exits non-zero, `FENCED:`); or, had the cut ended before the source gave up, completes; 0 lost |
//! | `migrate.link` | demand | impairment proxy window during post-copy | completes; 0 lost |
//! | `migrate.dest-kill` | demand | `kill -9` destination during post-copy | `recovered`: the source resumes from the last reverse checkpoint; 0 lost; recovery time recorded |
//!
//! What each point must end in is [`Point::migration_expect`]; [`judge`] turns what a run saw
//! ([`Observed`]) into its outcome. Source and destination talk over the namespace's loopback
//! (QUIC and the TCP liveness line on 127.0.0.1:7300, or through `testbed impair` on :7310 for
//! `migrate.link`): `ip link set lo down` cuts both directions of both, and leaves the guest's
//! LAN (the bridge) alone.
//!
//! **Recovery time** (`migrate.dest-kill`, goal ≤ 200 ms p99): the wall clock right after the
//! `SIGKILL` was sent to the timestamp of the source's `RECOVERED:` log line (the guest runs
//! there again); beside it the source's own `detect_ms` and `recover_ms` from that line and the
//! kv client's longest wait for one reply. `migrate.partition` records the same from the cut
//! (it includes the 1 s of silence the source waits for).

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use super::{Point, Procs, RunReport, read, s, status};
use crate::harness::interrupt::sleep;
use crate::harness::rng::XorShift64;
use crate::harness::tempdir::TempDir;
use crate::harness::wait::poll_until;
use crate::impair::Impairment;
use crate::migrate_bench::kv::{self, ClientVerdict, KvClient, KvNet};
use crate::migrate_bench::side_ours::{DEST_NAME, SOURCE_NAME, make_certs};

/// How a migration fault point must end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The migration completes: one copy, at the destination; 0 lost acknowledged writes.
    Completes,
    /// The migration fails before the switch-over: the guest runs on at the source, the
    /// destination never ran it; 0 lost.
    StaysAtSource,
    /// The source died before the switch-over: nothing to fail over to. The destination exits
    /// non-zero without ever running a guest; the client's losses are the source's death, not
    /// the migration's (recorded, not counted).
    SourceGone,
    /// The source resumes the guest from the destination's last reverse checkpoint (issue 15):
    /// migrate exits non-zero saying `recovered`, the source runs the guest (phase `recovered`,
    /// its `RECOVERED:` log line), the destination's process is gone; one copy; 0 lost.
    Recovered,
    /// The link was cut during post-copy for longer than the session's idle timeout: exactly one
    /// copy runs and the other is fenced. Either the source recovers (as [`Expect::Recovered`])
    /// and the destination, once it reaches the source again, learns it was superseded, stops
    /// its guest and exits non-zero (`FENCED:` in its log); or, had the cut ended before the
    /// source gave up, the migration completes (as [`Expect::Completes`]). 0 lost either way.
    OneCopy,
}

/// `migrate.dest-kill`'s expected outcome.
pub const DEST_KILL_POSTCOPY: Expect = Expect::Recovered;

/// The source's log line when the guest runs there again (fields `epoch=`, `recover_ms=`,
/// `detect_ms=`).
pub const RECOVERED_LINE: &str = "RECOVERED: the guest runs here again from reverse checkpoint";
/// The destination's log line when it learnt it was superseded and stopped its guest.
pub const FENCED_LINE: &str = "FENCED:";
/// How long a recovered run's settle step waits for the destination's process to end.
const FENCE_WAIT: Duration = Duration::from_secs(10);

impl Point {
    /// What a migration point must end in (None: not a migration point).
    pub fn migration_expect(self) -> Option<Expect> {
        Some(match self {
            Point::MigrateDestKillPrecopy => Expect::StaysAtSource,
            Point::MigrateSourceKillPrecopy => Expect::SourceGone,
            Point::MigratePartition => Expect::OneCopy,
            Point::MigrateLink => Expect::Completes,
            Point::MigrateDestKill => DEST_KILL_POSTCOPY,
            _ => return None,
        })
    }

    /// Whether this is a migration point ([`run_one`] runs it).
    pub fn migration(self) -> bool {
        self.migration_expect().is_some()
    }

    /// `understudy migrate`'s mode and settings for this point. Pre-copy points: rounds slowed
    /// to last ~6 s, so the kill lands in them: the kv guest's round 0 is only ~330 pages and
    /// its later rounds a few pages each (~0.1 ms), so 256 KB/s (round 0 ~1 s, a round ~1 ms),
    /// no downtime target, no resent-share stop, and the 6 s time limit ends pre-copy. Post-copy points: `demand` (nothing pushed until the guest asked for nothing for
    /// 1 s), so post-copy lasts more than a second.
    fn migrate_args(self) -> &'static [&'static str] {
        match self {
            Point::MigrateDestKillPrecopy | Point::MigrateSourceKillPrecopy => &[
                "--mode",
                "precopy",
                "--max-bandwidth",
                "256K",
                "--downtime-ms",
                "0",
                "--stop-share",
                "100",
                "--max-rounds",
                "10000",
                "--timeout-s",
                "6",
            ],
            _ => &["--mode", "demand"],
        }
    }

    /// The source's migration phases the fault must land in.
    fn fault_phases(self) -> &'static [&'static str] {
        match self {
            Point::MigrateDestKillPrecopy | Point::MigrateSourceKillPrecopy => &["round-0", "rounds"],
            _ => &["postcopy"],
        }
    }

    /// The impairment of `migrate.link`'s window: all four of the `link.*` points at once.
    pub fn migration_impairment(self) -> Option<Impairment> {
        let ms = Duration::from_millis;
        (self == Point::MigrateLink).then(|| Impairment {
            loss: 0.05,
            delay: ms(10),
            jitter: ms(5),
            dup: 0.05,
            corrupt: 0.02,
            keep_order: false,
        })
    }
}

/// The destination's address in the run's namespace, and the proxy's in front of it.
const DEST_ADDR: &str = "127.0.0.1:7300";
const PROXY_ADDR: &str = "127.0.0.1:7310";
/// `migrate.link`'s window.
const LINK_WINDOW: Duration = Duration::from_secs(3);
/// The destination's log lines that say it runs the guest (pre-copy hand-over, post-copy).
const DEST_RUNS: [&str; 2] = ["destination: handed over; resuming the guest here", "the guest runs here (post-copy)"];

/// A migration run's own account (beside [`RunReport`]'s client numbers).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MigRun {
    /// `--mode`.
    pub mode: String,
    /// How it ended: `completed`, `failed` (before the switch-over), `source-gone`, `lost`
    /// (post-copy broke off and nobody resumed: a failure now), `recovered`, or `unclear`.
    pub ended: String,
    /// The source's phase when the fault was injected, and how long after that phase was first
    /// seen.
    pub fault_phase: Option<String>,
    pub fault_after_ms: Option<f64>,
    /// `reconnects` of the migrate report (post-copy).
    pub reconnects: Option<u64>,
    /// The migrate command's last error line (failures).
    pub error: Option<String>,
    /// Acknowledged writes the client could not read back: counted as lost only where the
    /// migration was to keep the guest ([`RunReport::lost_writes`]).
    pub client_lost: u64,
    pub two_copies: bool,
    pub dest_ran_guest: bool,
    /// The source's and the destination's `state` at the end (None: process gone).
    pub source_state: Option<String>,
    pub dest_state: Option<String>,
    pub total_ms: Option<f64>,
    /// The destination logged `FENCED:` (it learnt it was superseded and stopped its guest).
    pub dest_fenced: bool,
    /// The source's recovery, from its `RECOVERED:` line.
    pub recovery: Option<Recovery>,
}

/// The source's account of a recovery, and how long after the fault it came.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recovery {
    /// The fault (the wall clock right after the `SIGKILL` was sent, or the cut) to the
    /// timestamp of the source's `RECOVERED:` line, ms (None when the fault's time is unknown).
    pub after_fault_ms: Option<f64>,
    /// The reverse checkpoint the source resumed from (`epoch=`).
    pub epoch: Option<u64>,
    /// The source's decision to recover to the guest running (`recover_ms=`).
    pub recover_ms: Option<f64>,
    /// The source's detection of the destination's end (`detect_ms=`).
    pub detect_ms: Option<f64>,
}

impl Recovery {
    /// From the source's log: None without a `RECOVERED:` line. `fault_unix_s`: the fault's wall
    /// clock (Unix seconds).
    pub fn from_log(log: &str, fault_unix_s: Option<f64>) -> Option<Recovery> {
        let line = log.lines().find(|l| l.contains(RECOVERED_LINE))?;
        let at = super::line_time(line);
        Some(Recovery {
            after_fault_ms: at.zip(fault_unix_s).map(|(at, f)| (at - f) * 1e3),
            epoch: token(line, "epoch").and_then(|v| v.parse().ok()),
            recover_ms: token(line, "recover_ms").and_then(|v| v.parse().ok()),
            detect_ms: token(line, "detect_ms").and_then(|v| v.parse().ok()),
        })
    }

    fn to_json(&self) -> Value {
        json!({
            "after_fault_ms": self.after_fault_ms, "epoch": self.epoch,
            "recover_ms": self.recover_ms, "detect_ms": self.detect_ms,
        })
    }
}

/// The value of a `name=value` field of a tracing line (a whole token: `epoch=` does not match
/// `reverse_epoch=`), quotes and a trailing comma dropped.
fn token<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|t| t.strip_prefix(name)?.strip_prefix('='))
        .map(|v| v.trim_end_matches(',').trim_matches('"'))
}

impl MigRun {
    /// The progress line's account of a run.
    pub fn line(&self, r: &RunReport) -> String {
        format!(
            "ended={} source={} fault={}+{} ms lost={} (client {}) contradictions={} reconnects={} \
             two_copies={} fenced={} migrate_reconnects={} recovery={} ms{}",
            self.ended,
            self.source_state.as_deref().unwrap_or("gone"),
            self.fault_phase.as_deref().unwrap_or("-"),
            super::fmt_ms(self.fault_after_ms),
            r.lost_writes,
            self.client_lost,
            r.contradictions,
            r.reconnects,
            self.two_copies,
            self.dest_fenced,
            self.reconnects.map_or("-".into(), |n| n.to_string()),
            super::fmt_ms(self.recovery.as_ref().and_then(|r| r.after_fault_ms)),
            self.error.as_deref().map(|e| format!(" error: {e}")).unwrap_or_default(),
        )
    }

    pub fn to_json(&self) -> Value {
        json!({
            "mode": self.mode, "ended": self.ended, "fault_phase": self.fault_phase,
            "fault_after_ms": self.fault_after_ms, "reconnects": self.reconnects, "error": self.error,
            "client_lost": self.client_lost, "two_copies": self.two_copies,
            "dest_ran_guest": self.dest_ran_guest, "source_state": self.source_state,
            "dest_state": self.dest_state, "total_ms": self.total_ms, "dest_fenced": self.dest_fenced,
            "recovery": self.recovery.as_ref().map(Recovery::to_json),
        })
    }
}

/// What one run saw, for [`judge`].
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The fault landed in the point's phases (else the run is `invalid`).
    pub fault_in_phase: bool,
    /// The link was cut for longer than the session's idle timeout: a completed migration's
    /// report must count a reconnect.
    pub cut_past_idle: bool,
    /// `understudy migrate` exited 0.
    pub migrate_ok: bool,
    pub migrate_stderr: String,
    /// Its JSON report (success).
    pub report: Option<Value>,
    /// The source's `status` after the end (None: its process is gone).
    pub src_state: Option<String>,
    pub src_phase: Option<String>,
    /// The source process exited 0 (after a completed migration it exits by itself).
    pub src_exit_ok: Option<bool>,
    /// The source's log.
    pub src_log: String,
    /// The destination's `status` after the end (None: gone).
    pub dst_state: Option<String>,
    pub dst_origin: Option<String>,
    /// Its exit status when it is gone.
    pub dst_exit_ok: Option<bool>,
    /// The destination's log says it ran the guest.
    pub dst_ran: bool,
    /// Its serial output is empty.
    pub dst_serial_empty: bool,
    pub dst_log: String,
    pub client: Option<ClientVerdict>,
}

impl Observed {
    /// A second active copy: the source runs the guest while the destination runs it too (its
    /// status says so, or it ran the guest and its process still lives).
    pub fn two_copies(&self) -> bool {
        let dst_alive_ran = self.dst_ran && self.dst_exit_ok.is_none();
        self.src_state.as_deref() == Some("running") && (self.dst_state.as_deref() == Some("running") || dst_alive_ran)
    }

    fn ended(&self) -> &'static str {
        let err = &self.migrate_stderr;
        if self.migrate_ok {
            "completed"
        } else if last_line(err).contains("recovered") {
            "recovered"
        } else if err.contains("broke off") && err.contains("lost") {
            "lost"
        } else if self.src_state.is_none() && !self.dst_ran {
            "source-gone"
        } else if self.src_state.is_some() && !self.dst_ran {
            "failed"
        } else {
            "unclear"
        }
    }
}

/// The outcome (`pass`, `fail`, `invalid`), the problems, and the writes counted as lost.
pub fn judge(expect: Expect, o: &Observed) -> (String, Vec<String>, u64) {
    let mut p = Vec::new();
    if !o.fault_in_phase {
        return ("invalid".into(), vec!["the fault missed the phase it is meant for".into()], 0);
    }
    if o.two_copies() {
        let dst = match o.dst_state.as_deref() {
            Some("running") => "its status says running".to_string(),
            st => format!("its process still lives after running the guest, status {st:?}"),
        };
        p.push(format!("two active copies: the source runs the guest and the destination may too ({dst})"));
    }
    let client_lost = o.client.as_ref().map_or(0, |c| c.lost);
    // Where the guest must survive, every acknowledged write must read back.
    let keeps_guest = expect != Expect::SourceGone;
    match &o.client {
        None => p.push("the client gave no verdict".into()),
        Some(c) => {
            if c.contradictions > 0 {
                p.push(format!("{} contradicted replies", c.contradictions));
            }
            if keeps_guest {
                if c.lost > 0 {
                    p.push(format!("{} acknowledged writes lost", c.lost));
                }
                if c.reconnects > 0 {
                    p.push(format!("the client had to reconnect {} time(s)", c.reconnects));
                }
                if c.acknowledged_writes == 0 {
                    p.push("the client got no write acknowledged".into());
                }
            }
        }
    }
    match expect {
        Expect::Completes => completed(o, &mut p),
        Expect::StaysAtSource => {
            at_source(o, "failed", &mut p);
            if o.dst_ran || !o.dst_serial_empty {
                p.push("the destination ran a guest".into());
            }
        }
        Expect::Recovered => recovered(o, &mut p),
        Expect::OneCopy if o.migrate_ok => completed(o, &mut p),
        Expect::OneCopy => {
            recovered(o, &mut p);
            if o.dst_exit_ok != Some(false) || !o.dst_log.contains(FENCED_LINE) {
                p.push(format!(
                    "the destination was not fenced (exit ok {:?}, {FENCED_LINE} logged: {})",
                    o.dst_exit_ok,
                    o.dst_log.contains(FENCED_LINE)
                ));
            }
        }
        Expect::SourceGone => {
            if o.src_state.is_some() {
                p.push(format!("the source still answers ({:?})", o.src_state));
            }
            if o.dst_ran || !o.dst_serial_empty {
                p.push("the destination ran a guest".into());
            }
            if o.dst_exit_ok != Some(false) {
                p.push(format!("the destination did not exit non-zero ({:?})", o.dst_exit_ok));
            }
            if !o.dst_log.contains("before the hand-over") {
                p.push("the destination does not say the source went before the hand-over".into());
            }
        }
    }
    let counted = if keeps_guest { client_lost } else { 0 };
    let outcome = if p.is_empty() { "pass" } else { "fail" };
    (outcome.into(), p, counted)
}

/// A completed migration: the source exited 0, the destination runs the migrated guest (and,
/// after a cut past the idle timeout, the report counts the reconnect that carried it on).
fn completed(o: &Observed, p: &mut Vec<String>) {
    if !o.migrate_ok {
        p.push(format!("the migration did not complete: {}", last_line(&o.migrate_stderr)));
    }
    let reconnects = o.report.as_ref().and_then(|r| r["reconnects"].as_u64());
    if o.cut_past_idle && o.migrate_ok && reconnects.unwrap_or(0) < 1 {
        p.push(format!("the link was cut past the idle timeout but the report counts {reconnects:?} reconnects"));
    }
    if o.src_exit_ok != Some(true) {
        p.push(format!("the source process did not exit 0 after the migration ({:?})", o.src_state));
    }
    if o.dst_state.as_deref() != Some("running") || o.dst_origin.as_deref() != Some("migrated") {
        p.push(format!("the destination does not run the migrated guest ({:?})", o.dst_state));
    }
}

/// The migration failed and the guest runs at the source, whose migration phase is `phase`;
/// the destination runs no guest.
fn at_source(o: &Observed, phase: &str, p: &mut Vec<String>) {
    if o.migrate_ok {
        p.push("the migration reported success".into());
    }
    if o.src_state.as_deref() != Some("running") {
        p.push(format!("the guest does not run at the source ({:?})", o.src_state));
    }
    if o.src_phase.as_deref() != Some(phase) {
        p.push(format!("the source's migration phase is {:?}, not {phase}", o.src_phase));
    }
    if o.dst_state.as_deref() == Some("running") {
        p.push("the destination still runs a guest".into());
    }
}

/// The source recovered the guest from a reverse checkpoint: it says so (migrate's last line,
/// its phase, its log) and the destination's process is gone.
fn recovered(o: &Observed, p: &mut Vec<String>) {
    at_source(o, "recovered", p);
    if !last_line(&o.migrate_stderr).contains("recovered") {
        p.push(format!("the migration does not report `recovered`: {}", last_line(&o.migrate_stderr)));
    }
    if !o.src_log.contains(RECOVERED_LINE) {
        p.push("the source does not log its recovery (RECOVERED:)".into());
    }
    if o.dst_exit_ok.is_none() {
        p.push(format!("the destination's process still lives ({:?})", o.dst_state));
    }
}

fn last_line(s: &str) -> String {
    s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string()
}

/// The source's migration phase (`status --json`).
fn phase(bin: &Path, sock: &Path) -> Option<String> {
    status(bin, sock)?["migration"]["phase"].as_str().map(str::to_string)
}

/// Runs one migration fault once.
pub(super) fn run_one(opts: &super::Options, point: Point, run: usize, rng: &mut XorShift64) -> Result<RunReport> {
    let expect = point.migration_expect().context("not a migration point")?;
    let t_start = Instant::now();
    let mut rep = RunReport { point: point.name().into(), run, ..Default::default() };
    let mode = point.migrate_args()[1].to_string();
    let mut mig = MigRun { mode, ..Default::default() };
    let dir = TempDir::create(
        std::env::temp_dir().join(format!("{}-{}-{run}-{}", super::NS_PREFIX, std::process::id(), point.name())),
        false,
    )?;
    let d = |f: &str| dir.join(f);
    let mut obs = Observed::default();
    let result = (|| -> Result<()> {
        let net = KvNet::create().context("create the namespace")?;
        let ns = net.name().to_string();
        let bin = &opts.understudy;
        make_certs(bin, &d("certs"))?;
        let certs = s(d("certs"));
        let mut procs = Procs { list: Vec::new() };
        let args = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        procs.spawn(
            "source",
            &ns,
            bin,
            &args(&[
                "run",
                "--kernel",
                &s(&opts.guest),
                "--cmdline",
                &format!("workload=kv ip={}/24", kv::GUEST_IP),
                "--memory",
                "64M",
                "--tap",
                kv::SOURCE_TAP,
                "--serial",
                &s(d("s-serial.log")),
                "--api",
                &s(d("s.sock")),
            ]),
            &[],
            &d("source.log"),
        )?;
        procs.spawn(
            "destination",
            &ns,
            bin,
            &args(&[
                "receive",
                "--listen",
                DEST_ADDR,
                "--certs",
                &certs,
                "--memory",
                "64M",
                "--name",
                DEST_NAME,
                "--source-name",
                SOURCE_NAME,
                "--api",
                &s(d("d.sock")),
                "--serial",
                &s(d("d-serial.log")),
                "--tap",
                kv::DEST_TAP,
            ]),
            &[],
            &d("destination.log"),
        )?;
        let impairment = point.migration_impairment();
        if let Some(imp) = &impairment {
            let mut a = args(&[
                "impair",
                "--listen",
                PROXY_ADDR,
                "--to",
                DEST_ADDR,
                "--seed",
                &rng.next_u64().to_string(),
                "--start-file",
                &s(d("impair.start")),
                "--window-ms",
                &LINK_WINDOW.as_millis().to_string(),
                "--tcp",
            ]);
            a.extend(imp.args());
            procs.spawn("impair", &ns, &opts.testbed, &a, &[], &d("impair.log"))?;
        }
        let up = poll_until(Instant::now() + Duration::from_secs(20), || {
            if procs.exited("source") || procs.exited("destination") {
                return Some(false);
            }
            let ready = read(&d("s-serial.log")).lines().any(|l| l.trim() == "ready");
            let proxy = impairment.is_none() || read(&d("impair.log")).contains("impair: listening");
            (ready && d("s.sock").exists() && d("d.sock").exists() && proxy).then_some(true)
        })?;
        if up != Some(true) {
            bail!(
                "source, destination or proxy did not come up: {}\n{}",
                read(&d("source.log")),
                read(&d("destination.log"))
            );
        }
        let mut client = KvClient::start(&net, &opts.client, dir.path(), 90)?;
        client.wait_ready(Duration::from_secs(15))?;
        sleep(Duration::from_millis(500))?;
        let to = if impairment.is_some() { PROXY_ADDR } else { DEST_ADDR };
        let mut margs = args(&[
            "migrate",
            "--api",
            &s(d("s.sock")),
            "--to",
            to,
            "--certs",
            &certs,
            "--name",
            SOURCE_NAME,
            "--dest-name",
            DEST_NAME,
            "--json",
        ]);
        margs.extend(args(point.migrate_args()));
        procs.spawn("migrate", &ns, bin, &margs, &[], &d("migrate.log"))?;
        // The fault: at a moment drawn from the run's RNG after the phase is first seen.
        let phases = point.fault_phases();
        let seen = poll_until(Instant::now() + Duration::from_secs(20), || {
            if procs.exited("migrate") {
                return Some(None);
            }
            let ph = phase(bin, &d("s.sock"))?;
            phases.contains(&ph.as_str()).then_some(Some(Instant::now()))
        })?
        .flatten()
        .ok_or_else(|| anyhow!("the migration never reached {phases:?}: {}", read(&d("migrate.log"))))?;
        let delay = match point {
            Point::MigrateDestKillPrecopy | Point::MigrateSourceKillPrecopy => rng.range(100, 3000),
            Point::MigrateDestKill => rng.range(0, 800),
            _ => rng.range(0, 500),
        };
        sleep(Duration::from_millis(delay).saturating_sub(seen.elapsed()))?;
        let at = phase(bin, &d("s.sock"));
        mig.fault_after_ms = Some(seen.elapsed().as_secs_f64() * 1e3);
        obs.fault_in_phase = at.as_deref().is_some_and(|p| phases.contains(&p));
        mig.fault_phase = at;
        let link = |state: &str| net.net.ip(&["link", "set", "lo", state]);
        // The fault's wall clock (Unix seconds): right after the signal was sent (before the
        // reaping), or right after the cut.
        let mut fault_wall = None;
        match point {
            Point::MigrateDestKillPrecopy | Point::MigrateDestKill | Point::MigrateSourceKillPrecopy => {
                let who = if point == Point::MigrateSourceKillPrecopy { "source" } else { "destination" };
                let child = procs.get(who);
                let _ = child.kill();
                fault_wall = Some(super::wall());
                let _ = child.wait();
            }
            Point::MigratePartition => {
                link("down")?;
                fault_wall = Some(super::wall());
                obs.cut_past_idle = true;
                let held = rng.range(1500, 2500);
                let r = sleep(Duration::from_millis(held));
                link("up")?;
                r?;
            }
            _ => {
                fs::write(d("impair.start"), "")?;
                let closed = poll_until(Instant::now() + LINK_WINDOW * 3, || {
                    read(&d("impair.log")).lines().find(|l| l.contains("window closed")).map(str::to_string)
                })?;
                rep.impair = closed.map(|l| l.trim_start_matches("impair: ").to_string());
            }
        }
        let done = poll_until(Instant::now() + Duration::from_secs(60), || procs.exited("migrate").then_some(()))?;
        if done.is_none() {
            bail!("the migrate command did not end in 60 s: {}", read(&d("migrate.log")));
        }
        obs.migrate_ok = procs.get("migrate").try_wait()?.is_some_and(|st| st.success());
        obs.migrate_stderr = read(&d("migrate.log"));
        let stdout = read(&d("migrate.out"));
        obs.report = stdout.find('{').and_then(|i| serde_json::from_str(&stdout[i..]).ok());
        if let Some(r) = &obs.report {
            mig.reconnects = r["reconnects"].as_u64();
            mig.total_ms = r["total_ms"].as_f64();
        }
        // Settle: a completed source exits by itself; a destination whose source is gone exits
        // after its session's idle timeout; a superseded destination (the source recovered) exits
        // once it reaches the source again and learns so (the link healed above). One still
        // running its guest after that is a second copy.
        let recovered = !obs.migrate_ok && last_line(&obs.migrate_stderr).contains("recovered");
        let _ = poll_until(Instant::now() + FENCE_WAIT, || {
            let src_done = !obs.migrate_ok || procs.exited("source");
            let dst_done = !(expect == Expect::SourceGone || recovered) || procs.exited("destination");
            (src_done && dst_done).then_some(())
        })?;
        sleep(Duration::from_millis(500))?;
        for (who, sock) in [("source", "s.sock"), ("destination", "d.sock")] {
            let gone = procs.exited(who);
            let st = if gone { None } else { status(bin, &d(sock)) };
            let state = st.as_ref().and_then(|v| v["state"].as_str().map(str::to_string));
            let exit_ok = if gone { procs.get(who).try_wait()?.map(|e| e.success()) } else { None };
            if who == "source" {
                obs.src_phase = st.as_ref().and_then(|v| v["migration"]["phase"].as_str().map(str::to_string));
                (obs.src_state, obs.src_exit_ok) = (state, exit_ok);
            } else {
                obs.dst_origin = st.as_ref().and_then(|v| v["origin"]["kind"].as_str().map(str::to_string));
                (obs.dst_state, obs.dst_exit_ok) = (state, exit_ok);
            }
        }
        obs.src_log = read(&d("source.log"));
        mig.recovery = Recovery::from_log(&obs.src_log, fault_wall);
        obs.dst_log = read(&d("destination.log"));
        mig.dest_fenced = obs.dst_log.contains(FENCED_LINE);
        obs.dst_ran = DEST_RUNS.iter().any(|l| obs.dst_log.contains(l));
        obs.dst_serial_empty = read(&d("d-serial.log")).is_empty();
        // The client's verdict (where the guest is gone it gives up on its connection first).
        obs.client = Some(client.stop(None, Duration::from_secs(45))?);
        drop(procs);
        drop(net);
        Ok(())
    })();
    let (outcome, problems, counted) = judge(expect, &obs);
    (rep.outcome, rep.problems) = match result {
        Ok(()) => (outcome, problems),
        Err(e) => ("fail".into(), vec![format!("{e:#}")]),
    };
    if let Some(c) = &obs.client {
        rep.acked_writes = c.acknowledged_writes;
        rep.contradictions = c.contradictions;
        rep.errors = c.errors;
        rep.reconnects = c.reconnects;
        rep.max_gap_ms = Some(c.max_gap_ms);
        rep.client_notes = c.notes.clone();
        mig.client_lost = c.lost;
    }
    rep.lost_writes = counted;
    mig.ended = obs.ended().into();
    mig.two_copies = obs.two_copies();
    mig.dest_ran_guest = obs.dst_ran;
    (mig.source_state, mig.dest_state) = (obs.src_state.clone(), obs.dst_state.clone());
    mig.error = (!obs.migrate_ok && !obs.migrate_stderr.is_empty()).then(|| last_line(&obs.migrate_stderr));
    rep.migration = Some(mig);
    if let Some(logs) = &opts.logs {
        let to = logs.join(format!("{}-{run}", point.name()));
        let _ = fs::create_dir_all(&to);
        for f in
            ["source.log", "destination.log", "migrate.log", "migrate.out", "client.log", "impair.log", "d-serial.log"]
        {
            let _ = fs::copy(d(f), to.join(f));
        }
    }
    rep.elapsed_s = t_start.elapsed().as_secs_f64();
    Ok(rep)
}

/// The recovery times of a point's runs (the runs that recovered).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RecoveryStats {
    /// Runs with a `RECOVERED:` line.
    pub runs: usize,
    /// Fault -> the source's `RECOVERED:` line, ms.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// The source's own `detect_ms=` and `recover_ms=`, p50 and max.
    pub detect_p50_ms: Option<f64>,
    pub detect_max_ms: Option<f64>,
    pub recover_p50_ms: Option<f64>,
    pub recover_max_ms: Option<f64>,
    /// The kv client's longest wait for one reply over these runs.
    pub longest_gap_ms: Option<f64>,
}

impl RecoveryStats {
    /// Over the runs of one point.
    pub fn of(rs: &[&RunReport]) -> RecoveryStats {
        let recs: Vec<&Recovery> = rs.iter().filter_map(|r| r.migration.as_ref()?.recovery.as_ref()).collect();
        let col = |f: fn(&Recovery) -> Option<f64>| -> Vec<f64> { recs.iter().filter_map(|r| f(r)).collect() };
        let max = |v: &[f64]| v.iter().copied().reduce(f64::max);
        let (after, detect, recover) = (col(|r| r.after_fault_ms), col(|r| r.detect_ms), col(|r| r.recover_ms));
        RecoveryStats {
            runs: recs.len(),
            p50_ms: super::pct(&after, 50.0),
            p99_ms: super::pct(&after, 99.0),
            max_ms: max(&after),
            detect_p50_ms: super::pct(&detect, 50.0),
            detect_max_ms: max(&detect),
            recover_p50_ms: super::pct(&recover, 50.0),
            recover_max_ms: max(&recover),
            longest_gap_ms: rs.iter().filter_map(|r| r.max_gap_ms).reduce(f64::max),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "recovered_runs": self.runs, "recovery_ms_p50": self.p50_ms, "recovery_ms_p99": self.p99_ms,
            "recovery_ms_max": self.max_ms, "source_detect_ms_p50": self.detect_p50_ms,
            "source_detect_ms_max": self.detect_max_ms, "source_recover_ms_p50": self.recover_p50_ms,
            "source_recover_ms_max": self.recover_max_ms, "longest_reply_wait_ms": self.longest_gap_ms,
        })
    }
}

/// The runs of each migration point that ran, in report order.
fn by_point(reports: &[RunReport]) -> Vec<(Point, Vec<&RunReport>)> {
    Point::ALL
        .into_iter()
        .filter(|p| p.migration())
        .map(|p| (p, reports.iter().filter(|r| r.point == p.name()).collect::<Vec<_>>()))
        .filter(|(_, rs)| !rs.is_empty())
        .collect()
}

/// The recovery times per migration point (the report's `migration_recovery`; the issue's goal:
/// `migrate.dest-kill` p99 ≤ 200 ms).
pub fn recovery_json(reports: &[RunReport]) -> Value {
    let per: serde_json::Map<String, Value> =
        by_point(reports).into_iter().map(|(p, rs)| (p.name().to_string(), RecoveryStats::of(&rs).to_json())).collect();
    json!({ "goal_p99_ms": 200, "points": per })
}

/// The migration points' table (markdown), one row per point.
pub fn summary(reports: &[RunReport]) -> String {
    let mut out = String::from(
        "| point | mode | expected | runs | pass | fail | invalid | ended | destination fenced | lost acked writes | client losses not counted | contradictions | two copies | client reconnects | migrate reconnects (min) | fault after phase start ms (min-max) | recovery ms p50/p99/max | source detect / recover ms p50 | longest reply wait ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (p, rs) in by_point(reports) {
        let count = |o: &str| rs.iter().filter(|r| r.outcome == o).count();
        let ms: Vec<&MigRun> = rs.iter().filter_map(|r| r.migration.as_ref()).collect();
        let mut ended: std::collections::BTreeMap<&str, usize> = Default::default();
        for m in &ms {
            *ended.entry(m.ended.as_str()).or_default() += 1;
        }
        let at: Vec<f64> = ms.iter().filter_map(|m| m.fault_after_ms).collect();
        let range = |v: &[f64]| match (v.iter().copied().reduce(f64::min), v.iter().copied().reduce(f64::max)) {
            (Some(a), Some(b)) => format!("{a:.0}-{b:.0}"),
            _ => "-".into(),
        };
        let rec = RecoveryStats::of(&rs);
        let f = super::fmt_ms;
        out += &format!(
            "| {} | {} | {:?} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            p.name(),
            p.migrate_args()[1],
            p.migration_expect().expect("a migration point"),
            rs.len(),
            count("pass"),
            count("fail"),
            count("invalid"),
            ended.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", "),
            ms.iter().filter(|m| m.dest_fenced).count(),
            rs.iter().map(|r| r.lost_writes).sum::<u64>(),
            ms.iter().map(|m| m.client_lost).sum::<u64>() - rs.iter().map(|r| r.lost_writes).sum::<u64>(),
            rs.iter().map(|r| r.contradictions).sum::<u64>(),
            ms.iter().filter(|m| m.two_copies).count(),
            rs.iter().map(|r| r.reconnects).sum::<u64>(),
            ms.iter().filter_map(|m| m.reconnects).min().map_or("-".into(), |n| n.to_string()),
            range(&at),
            if rec.runs == 0 { "-".into() } else { format!("{}/{}/{}", f(rec.p50_ms), f(rec.p99_ms), f(rec.max_ms)) },
            if rec.runs == 0 { "-".into() } else { format!("{} / {}", f(rec.detect_p50_ms), f(rec.recover_p50_ms)) },
            f(rec.longest_gap_ms),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(lost: u64, contradictions: u64, reconnects: u64) -> Option<ClientVerdict> {
        Some(ClientVerdict { acknowledged_writes: 500, lost, contradictions, reconnects, ..Default::default() })
    }

    fn completed() -> Observed {
        Observed {
            fault_in_phase: true,
            migrate_ok: true,
            src_exit_ok: Some(true),
            dst_state: Some("running".into()),
            dst_origin: Some("migrated".into()),
            dst_ran: true,
            client: client(0, 0, 0),
            ..Default::default()
        }
    }

    fn stayed() -> Observed {
        Observed {
            fault_in_phase: true,
            migrate_stderr: "Error: the session with the destination ended".into(),
            src_state: Some("running".into()),
            src_phase: Some("failed".into()),
            dst_exit_ok: Some(false),
            dst_serial_empty: true,
            client: client(0, 0, 0),
            ..Default::default()
        }
    }

    /// `migrate.dest-kill` as issue 15 wants it: the destination ran the guest and was killed,
    /// the source runs it again from a reverse checkpoint.
    fn recovered() -> Observed {
        Observed {
            fault_in_phase: true,
            migrate_stderr:
                "post-copy: epoch 7\nError: post-copy from epoch 7 broke off (the destination's process is \
                             gone (connection reset)): recovered: the guest runs here again from reverse checkpoint 42"
                    .into(),
            src_state: Some("running".into()),
            src_phase: Some("recovered".into()),
            src_log: format!(
                "2026-12-06T16:30:00.123456Z  INFO {RECOVERED_LINE} 42 epoch=42 recover_ms=3.1 detect_ms=0.4"
            ),
            dst_exit_ok: Some(false),
            dst_ran: true,
            dst_log: "the guest runs here (post-copy)".into(),
            client: client(0, 0, 0),
            ..Default::default()
        }
    }

    /// `migrate.partition` as issue 15 wants it: recovered at the source, and the destination
    /// fenced itself when the link healed.
    fn fenced() -> Observed {
        let mut o = recovered();
        o.cut_past_idle = true;
        o.dst_log += "\nFENCED: superseded by the source at reverse checkpoint 42; stopping the guest";
        o
    }

    /// Post-copy broke off and nobody resumed the guest (before issue 15): a failure now.
    fn lost() -> Observed {
        Observed {
            fault_in_phase: true,
            migrate_stderr: "Error: post-copy from epoch 1 broke off (destination died): ... it is lost".into(),
            src_state: Some("paused".into()),
            src_phase: Some("failed".into()),
            dst_exit_ok: Some(false),
            dst_ran: true,
            client: client(480, 0, 1),
            ..Default::default()
        }
    }

    fn gone() -> Observed {
        Observed {
            fault_in_phase: true,
            migrate_stderr: "Error: api connection closed".into(),
            dst_exit_ok: Some(false),
            dst_serial_empty: true,
            dst_log: "destination: the source went before the hand-over".into(),
            client: client(500, 0, 1),
            ..Default::default()
        }
    }

    #[test]
    fn each_expectation_passes_only_its_own_ending() {
        let endings = [
            ("completed", completed()),
            ("stayed", stayed()),
            ("gone", gone()),
            ("recovered", recovered()),
            ("fenced", fenced()),
            ("lost", lost()),
        ];
        // Which endings each expectation accepts: `OneCopy` a fenced destination or (a cut the
        // source rode out) a completion; `Recovered` a killed destination, or one that fenced
        // itself first (the source gave up on it before the kill): either way one copy.
        let accepts = [
            (Expect::Completes, &["completed"][..]),
            (Expect::StaysAtSource, &["stayed"]),
            (Expect::SourceGone, &["gone"]),
            (Expect::Recovered, &["recovered", "fenced"]),
            (Expect::OneCopy, &["fenced", "completed"]),
        ];
        for (expect, ok) in accepts {
            for (name, o) in &endings {
                let (outcome, problems, counted) = judge(expect, o);
                if ok.contains(name) {
                    assert_eq!((outcome.as_str(), counted), ("pass", 0), "{expect:?} on {name}: {problems:?}");
                    assert!(problems.is_empty());
                } else {
                    assert_eq!(outcome, "fail", "{expect:?} must not accept the {name} ending");
                }
            }
        }
        let ended: Vec<&str> = endings.iter().map(|(_, o)| o.ended()).collect();
        assert_eq!(ended, ["completed", "failed", "source-gone", "recovered", "recovered", "lost"]);
        assert!(endings.iter().all(|(_, o)| !o.two_copies()));
    }

    #[test]
    fn a_recovered_run_fails_on_a_second_copy_a_loss_or_a_missing_account() {
        // The destination fenced nothing and still runs the guest: two copies.
        for base in [recovered(), fenced()] {
            let mut o = base.clone();
            o.dst_exit_ok = None;
            o.dst_log = "the guest runs here (post-copy)".into();
            assert!(o.two_copies());
            for expect in [Expect::Recovered, Expect::OneCopy] {
                let (outcome, problems, _) = judge(expect, &o);
                assert_eq!(outcome, "fail");
                assert!(problems.iter().any(|p| p.starts_with("two active copies")), "{problems:?}");
            }
            // Its status says running even though its log is silent.
            let mut o = base.clone();
            o.dst_exit_ok = None;
            o.dst_ran = false;
            o.dst_state = Some("running".into());
            assert!(o.two_copies());
            assert_eq!(judge(Expect::OneCopy, &o).0, "fail");
        }
        // Acknowledged writes that do not read back: counted, and a failure.
        let mut o = recovered();
        o.client = client(2, 0, 0);
        let (outcome, problems, counted) = judge(Expect::Recovered, &o);
        assert_eq!((outcome.as_str(), counted), ("fail", 2));
        assert!(problems.iter().any(|p| p == "2 acknowledged writes lost"), "{problems:?}");
        let mut o = fenced();
        o.client = client(1, 0, 0);
        assert_eq!(judge(Expect::OneCopy, &o).2, 1);
        // A contradiction, or a client that had to reconnect (the recovery was not transparent).
        let mut o = recovered();
        o.client = client(0, 1, 0);
        assert_eq!(judge(Expect::Recovered, &o).0, "fail");
        o.client = client(0, 0, 1);
        assert_eq!(judge(Expect::Recovered, &o).0, "fail");
        // The source runs the guest but does not say it recovered it (phase, log, migrate).
        let mut o = recovered();
        o.src_phase = Some("failed".into());
        assert!(judge(Expect::Recovered, &o).1.iter().any(|p| p.contains("not recovered")));
        let mut o = recovered();
        o.src_log.clear();
        assert!(judge(Expect::Recovered, &o).1.iter().any(|p| p.contains("RECOVERED:")));
        let mut o = recovered();
        o.migrate_stderr = "Error: post-copy from epoch 7 broke off".into();
        assert!(judge(Expect::Recovered, &o).1.iter().any(|p| p.contains("`recovered`")));
        // The source did not resume: nothing runs.
        let mut o = recovered();
        o.src_state = Some("paused".into());
        assert_eq!(judge(Expect::Recovered, &o).0, "fail");
        // A partition's destination that exited without saying it was fenced, or exited 0.
        let mut o = fenced();
        o.dst_log = "the guest runs here (post-copy)".into();
        assert!(judge(Expect::OneCopy, &o).1.iter().any(|p| p.contains("not fenced")));
        let mut o = fenced();
        o.dst_exit_ok = Some(true);
        assert_eq!(judge(Expect::OneCopy, &o).0, "fail");
    }

    #[test]
    fn a_cut_past_the_idle_timeout_must_show_a_reconnect() {
        let mut o = completed();
        o.cut_past_idle = true;
        o.report = Some(json!({"reconnects": 0}));
        for expect in [Expect::Completes, Expect::OneCopy] {
            let (outcome, problems, _) = judge(expect, &o);
            assert_eq!(outcome, "fail");
            assert!(problems[0].contains("reconnects"), "{problems:?}");
        }
        o.report = Some(json!({"reconnects": 2}));
        assert_eq!(judge(Expect::Completes, &o).0, "pass");
        assert_eq!(judge(Expect::OneCopy, &o).0, "pass");
    }

    #[test]
    fn losses_count_only_where_the_guest_must_survive() {
        let mut o = completed();
        o.client = client(3, 0, 0);
        let (outcome, problems, counted) = judge(Expect::Completes, &o);
        assert_eq!((outcome.as_str(), counted), ("fail", 3));
        assert!(problems.iter().any(|p| p == "3 acknowledged writes lost"), "{problems:?}");
        let mut o = stayed();
        o.client = client(0, 0, 1);
        assert_eq!(judge(Expect::StaysAtSource, &o).0, "fail", "a reconnect is not transparent");
        // The source's death: losses recorded, not counted, but a contradiction always fails.
        assert_eq!(judge(Expect::SourceGone, &gone()).2, 0);
        let mut o = gone();
        o.client = client(500, 1, 1);
        assert_eq!(judge(Expect::SourceGone, &o).0, "fail");
        // A guest lost in post-copy counts its losses wherever it is judged.
        assert_eq!(judge(Expect::Recovered, &lost()).2, 480);
    }

    #[test]
    fn two_copies_fail_and_a_missed_phase_is_invalid() {
        // A destination that ran the guest in a pre-copy failure and still lives.
        let mut o = stayed();
        o.dst_ran = true;
        o.dst_exit_ok = None;
        assert!(judge(Expect::StaysAtSource, &o).1.iter().any(|p| p.starts_with("two active copies")));
        // Both say running.
        let mut o = completed();
        o.src_state = Some("running".into());
        assert!(o.two_copies());
        // The source gone but the destination ran the guest anyway.
        let mut o = gone();
        o.dst_serial_empty = false;
        assert_eq!(judge(Expect::SourceGone, &o).0, "fail");
        // A completed migration whose source did not exit.
        let mut o = completed();
        o.src_state = Some("running".into());
        o.src_exit_ok = None;
        assert_eq!(judge(Expect::Completes, &o).0, "fail");
        let mut o = completed();
        o.fault_in_phase = false;
        assert_eq!(judge(Expect::Completes, &o).0, "invalid");
    }

    #[test]
    fn points_expect_what_issue_15_says() {
        let want = [
            (Point::MigrateDestKillPrecopy, Expect::StaysAtSource, "precopy"),
            (Point::MigrateSourceKillPrecopy, Expect::SourceGone, "precopy"),
            (Point::MigratePartition, Expect::OneCopy, "demand"),
            (Point::MigrateLink, Expect::Completes, "demand"),
            (Point::MigrateDestKill, Expect::Recovered, "demand"),
        ];
        for (p, e, mode) in want {
            assert_eq!(Point::parse(p.name()).unwrap(), p);
            assert_eq!((p.migration_expect(), p.migrate_args()[1]), (Some(e), mode), "{p:?}");
        }
        assert_eq!(Point::ALL.iter().filter(|p| p.migration()).count(), want.len());
        assert!(!Point::Kill.migration() && Point::MigrateLink.migration_impairment().is_some());
    }

    #[test]
    fn the_recovery_time_runs_from_the_fault_to_the_sources_line() {
        let log = "2026-12-06T16:29:59.900000Z  INFO migrate: post-copy: the destination's process is gone\n\
                   2026-12-06T16:30:00.123456Z  INFO migrate{vm=kv}: RECOVERED: the guest runs here again from \
                   reverse checkpoint 42 (took the network identity back) reverse_epoch=7 epoch=42 recover_ms=3.25 \
                   detect_ms=0.5\n";
        let at = super::super::line_time("2026-12-06T16:30:00.000000Z x").unwrap();
        let r = Recovery::from_log(log, Some(at)).expect("a recovery");
        assert!((r.after_fault_ms.unwrap() - 123.456).abs() < 0.01, "{r:?}");
        assert_eq!((r.epoch, r.recover_ms, r.detect_ms), (Some(42), Some(3.25), Some(0.5)));
        assert_eq!(Recovery::from_log(log, None).unwrap().after_fault_ms, None);
        assert_eq!(Recovery::from_log("2026-12-06T16:30:00.1Z INFO completed", Some(at)), None);

        // The table and the JSON: p50/p99/max of the recovery and the client's longest wait.
        let run = |ms: f64, gap: f64| RunReport {
            point: "migrate.dest-kill".into(),
            outcome: "pass".into(),
            max_gap_ms: Some(gap),
            migration: Some(MigRun {
                ended: "recovered".into(),
                recovery: Some(Recovery { after_fault_ms: Some(ms), detect_ms: Some(1.0), ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let reports: Vec<RunReport> = (1..=10).map(|i| run(10.0 * i as f64, 300.0 + i as f64)).collect();
        let table = summary(&reports);
        assert!(!table.contains("expected until"), "{table}");
        assert!(table.contains("| recovery ms p50/p99/max |"), "{table}");
        let row = table.lines().find(|l| l.starts_with("| migrate.dest-kill |")).expect("a row");
        let want = format!(
            "| {}/{}/100 | 1 / - | 310 |",
            super::super::fmt_ms(super::super::pct(&(1..=10).map(|i| 10.0 * i as f64).collect::<Vec<_>>(), 50.0)),
            super::super::fmt_ms(super::super::pct(&(1..=10).map(|i| 10.0 * i as f64).collect::<Vec<_>>(), 99.0)),
        );
        assert!(row.ends_with(&want), "{row} should end with {want}");
        let v = recovery_json(&reports);
        assert_eq!(v["goal_p99_ms"], 200);
        let d = &v["points"]["migrate.dest-kill"];
        assert_eq!((d["recovered_runs"].as_u64(), d["recovery_ms_max"].as_f64()), (Some(10), Some(100.0)), "{v}");
        assert_eq!(d["longest_reply_wait_ms"].as_f64(), Some(310.0));
    }
}
