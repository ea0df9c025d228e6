//! `testbed migrate-bench`: live migration side by side, QEMU 7.2 (`-M microvm -accel kvm`) and
//! `understudy migrate`, on the same fixture guest, memory and workload, configurations
//! interleaved run by run, medians in a markdown table (issue 13).
//!
//! ```text
//! testbed migrate-bench --workloads W1,W2,W3 --runs 5 [--configs qemu-default,...,precopy,...,auto]
//!     [--out table.md] [--json runs.json] [--plots DIR]
//! ```
//!
//! Workloads ([`Workload`]): W1 `dirty wss=64 rate=20000` at 256 MiB, W2 `dirty wss=128
//! rate=200000` at 512 MiB (both with `report_ms=10`), W3 `kv` at 64 MiB under the checker client's load through a TAP.
//! Configurations ([`Config`]): five QEMU ones (plain unix socket or TLS over TCP on 127.0.0.1)
//! and our modes. One run ([`run_one`]): start the source, let the workload settle, start the
//! destination, migrate, check the guest goes on at the destination (`dirty`: a whole generation
//! rewritten there and checked, no error; `kv`: the client's replies go on, every acknowledged
//! write reads back). A QEMU migration that has not finished after the time bound (30 s) is
//! cancelled and counted as not converged. Every child process is killed on every path.
//!
//! Issue 14: our post-copy modes' report fields ([`PostcopyStats`], QEMU's post-copy blocktime
//! beside them), each workload's throughput over time through each migration ([`series`]: W3's
//! client replies, W1/W2's pages the guest wrote, per 10 ms, markers for pause, resume and
//! complete) in the JSON, and a PNG per
//! workload drawn from it ([`plot`], `testbed/scripts/plot_migration.py`).
//!
//! Issue 15: our post-copy modes run with reverse checkpoints (the destination checkpoints the
//! guest back to the source during post-copy); each has a `-noreverse` twin (`--no-reverse`).
//! The destination's numbers of them per run ([`reverse::ReverseStats`]) are in the JSON and
//! the table, and a table sets each mode beside its twin: the issue's cost goals
//! ([`reverse::cost_rows`]).

pub mod kv;
pub mod qmp;
pub mod reverse;
pub mod series;
pub mod side_ours;
pub mod side_qemu;
pub mod table;
pub mod tls;
pub mod watch;

use crate::env::{guest_image, qemu_skip_reason, workspace_root};
use crate::harness::interrupt::{check_interrupted, sleep};
use crate::harness::proc::loadavg;
use crate::harness::tempdir::TempDir;
use crate::harness::wait::unix_seconds;
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub use table::{Summary, markdown_table, summarize};

/// The `dirty` guest's `report_ms`: a `dirty prog` line every 10 ms, one per 100 Hz tick.
pub const REPORT_MS: u32 = 10;

/// A workload of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Workload {
    /// `workload=dirty wss=64 rate=20000 report_ms=10`, 256 MiB.
    W1,
    /// `workload=dirty wss=128 rate=200000 report_ms=10`, 512 MiB.
    W2,
    /// `workload=kv`, 64 MiB, under the checker client's load.
    W3,
}

impl Workload {
    pub const ALL: [Workload; 3] = [Workload::W1, Workload::W2, Workload::W3];

    pub fn name(self) -> &'static str {
        match self {
            Workload::W1 => "W1",
            Workload::W2 => "W2",
            Workload::W3 => "W3",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name().eq_ignore_ascii_case(s.trim()))
            .with_context(|| format!("unknown workload {s:?}; known: W1, W2, W3"))
    }

    /// The guest's command line (the `dirty` guest prints its progress every [`REPORT_MS`]
    /// for the series).
    pub fn cmdline(self) -> String {
        match self {
            Workload::W1 => format!("workload=dirty wss=64 rate=20000 report_ms={REPORT_MS}"),
            Workload::W2 => format!("workload=dirty wss=128 rate=200000 report_ms={REPORT_MS}"),
            Workload::W3 => format!("workload=kv ip={}/24", kv::GUEST_IP),
        }
    }

    pub fn mem_mib(self) -> u32 {
        match self {
            Workload::W1 => 256,
            Workload::W2 => 512,
            Workload::W3 => 64,
        }
    }

    /// The dirty working set in MiB (None for kv).
    pub fn wss_mib(self) -> Option<u64> {
        match self {
            Workload::W1 => Some(64),
            Workload::W2 => Some(128),
            Workload::W3 => None,
        }
    }

    pub fn kv(self) -> bool {
        self == Workload::W3
    }

    /// A line for the report.
    pub fn describe(self) -> String {
        let load = if self.kv() { ", under the checker client's load through a TAP" } else { "" };
        format!("{}: `{}`, {} MiB{load}", self.name(), self.cmdline(), self.mem_mib())
    }
}

/// A QEMU configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QemuConfig {
    /// QEMU's defaults, plain unix socket.
    Default,
    /// `max-bandwidth` unlimited (2^40 B/s), `downtime-limit` 50 ms, plain.
    Best,
    /// As `Best`, with `postcopy-ram` on both sides and `migrate-start-postcopy` once the first
    /// pass ended (`dirty-sync-count` >= 2) or after 1 s.
    Postcopy,
    /// `Best` over TCP on 127.0.0.1 with `tls-creds-x509` on both sides (verify-peer).
    BestTls,
    /// `Postcopy` over TLS.
    PostcopyTls,
}

impl QemuConfig {
    pub const ALL: [QemuConfig; 5] =
        [QemuConfig::Default, QemuConfig::Best, QemuConfig::Postcopy, QemuConfig::BestTls, QemuConfig::PostcopyTls];

    pub fn name(self) -> &'static str {
        match self {
            QemuConfig::Default => "qemu-default",
            QemuConfig::Best => "qemu-best",
            QemuConfig::Postcopy => "qemu-postcopy",
            QemuConfig::BestTls => "qemu-best-tls",
            QemuConfig::PostcopyTls => "qemu-postcopy-tls",
        }
    }

    pub fn tls(self) -> bool {
        matches!(self, QemuConfig::BestTls | QemuConfig::PostcopyTls)
    }

    pub fn postcopy(self) -> bool {
        matches!(self, QemuConfig::Postcopy | QemuConfig::PostcopyTls)
    }

    /// Unlimited bandwidth and a 50 ms downtime limit.
    pub fn tuned(self) -> bool {
        self != QemuConfig::Default
    }

    /// A line for the report.
    pub fn describe(self) -> &'static str {
        match self {
            QemuConfig::Default => "QEMU's defaults (128 MiB/s max-bandwidth, 300 ms downtime-limit), unix socket",
            QemuConfig::Best => "max-bandwidth 2^40 B/s (unlimited), downtime-limit 50 ms, unix socket",
            QemuConfig::Postcopy => {
                "as qemu-best + postcopy-ram on both sides, migrate-start-postcopy once dirty-sync-count >= 2 or after 1 s, unix socket"
            }
            QemuConfig::BestTls => {
                "as qemu-best, TCP on 127.0.0.1 with tls-creds-x509 on both sides (verify-peer, ECDSA P-256)"
            }
            QemuConfig::PostcopyTls => "as qemu-postcopy, TLS as qemu-best-tls",
        }
    }
}

/// A configuration of the benchmark: QEMU's or one of ours.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Config {
    Qemu(QemuConfig),
    /// `understudy migrate --mode MODE` (the name is the mode), or with `--no-reverse` (the
    /// name is the mode and [`NO_REVERSE`], for a mode of [`OUR_REVERSE_MODES`]).
    Ours(String),
}

/// Our configurations benchmarked by default: every mode, each post-copy mode (with reverse
/// checkpoints, issue 15) followed by its `-noreverse` twin.
pub const OUR_DEFAULTS: [&str; 10] = [
    "precopy",
    "stopcopy",
    "postcopy",
    "postcopy-noreverse",
    "demand",
    "demand-noreverse",
    "hybrid",
    "hybrid-noreverse",
    "auto",
    "auto-noreverse",
];
/// Every mode `understudy migrate --mode` names (issue 13; some may answer "not implemented yet").
pub const OUR_MODES: [&str; 6] = ["precopy", "stopcopy", "postcopy", "hybrid", "demand", "auto"];
/// The modes that may run post-copy, with reverse checkpoints unless `--no-reverse`.
pub const OUR_REVERSE_MODES: [&str; 4] = ["postcopy", "demand", "hybrid", "auto"];
/// A configuration's suffix for `--no-reverse`.
pub const NO_REVERSE: &str = "-noreverse";

impl Config {
    /// Every QEMU configuration, then ours ([`OUR_DEFAULTS`]).
    pub fn defaults() -> Vec<Config> {
        let mut v: Vec<Config> = QemuConfig::ALL.into_iter().map(Config::Qemu).collect();
        v.extend(OUR_DEFAULTS.iter().map(|m| Config::Ours(m.to_string())));
        v
    }

    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if let Some(q) = QemuConfig::ALL.into_iter().find(|q| q.name() == s) {
            return Ok(Config::Qemu(q));
        }
        let name = s.strip_prefix("understudy-").unwrap_or(s);
        let mode = name.strip_suffix(NO_REVERSE).unwrap_or(name);
        if OUR_MODES.contains(&mode) {
            if mode != name && !OUR_REVERSE_MODES.contains(&mode) {
                bail!(
                    "configuration {s:?}: {mode} never runs post-copy, so it has no reverse checkpoints to turn off; \
                     {NO_REVERSE} goes with {}",
                    OUR_REVERSE_MODES.join(", ")
                );
            }
            return Ok(Config::Ours(name.to_string()));
        }
        let known: Vec<String> = QemuConfig::ALL
            .iter()
            .map(|q| q.name().to_string())
            .chain(OUR_MODES.iter().map(|m| m.to_string()))
            .chain(OUR_REVERSE_MODES.iter().map(|m| format!("{m}{NO_REVERSE}")))
            .collect();
        bail!("unknown configuration {s:?}; known: {}", known.join(", "))
    }

    pub fn is_qemu(&self) -> bool {
        matches!(self, Config::Qemu(_))
    }

    /// Ours: the mode `understudy migrate --mode` gets.
    pub fn our_mode(&self) -> Option<&str> {
        match self {
            Config::Ours(name) => Some(name.strip_suffix(NO_REVERSE).unwrap_or(name)),
            Config::Qemu(_) => None,
        }
    }

    /// Ours with `--no-reverse`.
    pub fn no_reverse(&self) -> bool {
        matches!(self, Config::Ours(name) if name.ends_with(NO_REVERSE))
    }

    /// Ours, a mode that runs post-copy with reverse checkpoints: the same mode without them.
    pub fn without_reverse(&self) -> Option<Config> {
        let mode = self.our_mode()?;
        (!self.no_reverse() && OUR_REVERSE_MODES.contains(&mode)).then(|| Config::Ours(format!("{mode}{NO_REVERSE}")))
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Config::Qemu(q) => f.write_str(q.name()),
            Config::Ours(m) => write!(f, "understudy {m}"),
        }
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The guest runs at the destination.
    Completed,
    /// Still copying when the time bound ran out; cancelled, the guest runs on at the source.
    DidNotConverge,
    /// The migration (or the run around it) failed: why.
    Failed(String),
    /// Not run: why.
    Skipped(String),
}

/// One migration as one side measured it.
#[derive(Clone, Debug, PartialEq)]
pub struct Migrated {
    pub outcome: Outcome,
    /// As the migrator reports it: QEMU's `total-time`, our `total_ms`.
    pub total_ms: Option<f64>,
    /// As the migrator reports it: QEMU's `downtime`, our `downtime_ms`.
    pub downtime_ms: Option<f64>,
    /// As the migrator reports it: QEMU's `ram.transferred`, our `bytes_transferred`.
    pub bytes: Option<u64>,
    /// Our own clock: the migrate command to the guest running at the destination.
    pub wall_ms: Option<f64>,
    /// The guest's pause seen from outside the migrator, where we can: QEMU's STOP event at
    /// the source to its RESUME event at the destination (QMP timestamps, one host clock).
    pub paused_ms: Option<f64>,
    /// QEMU post-copy: when `migrate-start-postcopy` was sent (ms after `migrate`), and
    /// whether a post-copy phase really ran (post-copy bytes or page requests; QEMU finishes
    /// in pre-copy when little is left by the time it looks at the request).
    pub postcopy_requested_ms: Option<f64>,
    pub postcopy_ran: Option<bool>,
    /// Short remarks for the table (stop reason, ...).
    pub notes: Vec<String>,
    /// Post-copy's numbers (issue 14), where the migrator reports them.
    pub postcopy: PostcopyStats,
    /// When the migration started (Unix seconds): QEMU's `migrate` command sent, our source's
    /// migration started (its log's `migration: idle -> connecting`). The series' zero.
    pub started_unix_s: Option<f64>,
    /// The migration's moments, ms since it started ([`series::Marker`]).
    pub markers: Vec<series::Marker>,
    /// Ours, post-copy with reverse checkpoints: the destination's numbers of them.
    pub reverse: Option<reverse::ReverseStats>,
    /// Everything else the migrator reported.
    pub detail: Value,
}

/// What a post-copy migration reports beyond pre-copy's numbers (all absent for pre-copy).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PostcopyStats {
    /// Faults on missing pages at the destination.
    pub faults: Option<u64>,
    /// Fault raised to page placed, µs, at the destination.
    pub fault_us_p50: Option<f64>,
    pub fault_us_p99: Option<f64>,
    /// Pages pushed in the background, pages sent on demand (QEMU: `postcopy-requests`).
    pub pages_pushed: Option<u64>,
    pub pages_demanded: Option<u64>,
    /// Time vCPUs waited on missing pages, ms (QEMU: the sum of `postcopy-vcpu-blocktime`).
    pub vcpu_blocked_ms: Option<f64>,
    /// Hybrid: the pre-copy round after which it switched to post-copy.
    pub switchover_round: Option<u32>,
    /// Auto: the mode it chose and why.
    pub chosen_mode: Option<String>,
    pub choice_reason: Option<String>,
    /// Switch-over to every page present at the destination, ms.
    pub postcopy_ms: Option<f64>,
    /// Times the link broke during post-copy and was reconnected.
    pub reconnects: Option<u64>,
    /// Reverse checkpoints (issue 15), as the source reports them: those it committed, the
    /// pages they carried, the reverse sessions the destination opened, and whether the
    /// destination confirmed the hand-over (absent with `--no-reverse`).
    pub reverse_checkpoints: Option<u64>,
    pub reverse_pages: Option<u64>,
    pub reverse_sessions: Option<u64>,
    pub handover_confirmed: Option<bool>,
}

impl PostcopyStats {
    /// The fields of `understudy migrate --json`'s report (each optional).
    pub fn from_report(v: &Value) -> Self {
        let u = |k: &str| v.get(k).and_then(Value::as_u64);
        let f = |k: &str| v.get(k).and_then(Value::as_f64);
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        PostcopyStats {
            faults: u("postcopy_faults"),
            fault_us_p50: f("fault_us_p50"),
            fault_us_p99: f("fault_us_p99"),
            pages_pushed: u("pages_pushed"),
            pages_demanded: u("pages_demanded"),
            vcpu_blocked_ms: f("vcpu_blocked_ms"),
            switchover_round: u("switchover_round").and_then(|r| u32::try_from(r).ok()),
            chosen_mode: s("chosen_mode"),
            choice_reason: s("choice_reason"),
            postcopy_ms: f("postcopy_ms"),
            reconnects: u("reconnects"),
            reverse_checkpoints: u("reverse_checkpoints"),
            reverse_pages: u("reverse_pages"),
            reverse_sessions: u("reverse_sessions"),
            handover_confirmed: v.get("handover_confirmed").and_then(Value::as_bool),
        }
    }

    /// As the report names them; absent fields left out.
    pub fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, v: Value| {
            if !v.is_null() {
                m.insert(k.to_string(), v);
            }
        };
        put("postcopy_faults", json!(self.faults));
        put("fault_us_p50", json!(self.fault_us_p50));
        put("fault_us_p99", json!(self.fault_us_p99));
        put("pages_pushed", json!(self.pages_pushed));
        put("pages_demanded", json!(self.pages_demanded));
        put("vcpu_blocked_ms", json!(self.vcpu_blocked_ms));
        put("switchover_round", json!(self.switchover_round));
        put("chosen_mode", json!(self.chosen_mode));
        put("choice_reason", json!(self.choice_reason));
        put("postcopy_ms", json!(self.postcopy_ms));
        put("reconnects", json!(self.reconnects));
        put("reverse_checkpoints", json!(self.reverse_checkpoints));
        put("reverse_pages", json!(self.reverse_pages));
        put("reverse_sessions", json!(self.reverse_sessions));
        put("handover_confirmed", json!(self.handover_confirmed));
        Value::Object(m)
    }
}

impl Migrated {
    pub fn failed(why: impl Into<String>) -> Self {
        Migrated {
            outcome: Outcome::Failed(why.into()),
            total_ms: None,
            downtime_ms: None,
            bytes: None,
            wall_ms: None,
            paused_ms: None,
            postcopy_requested_ms: None,
            postcopy_ran: None,
            notes: Vec::new(),
            postcopy: PostcopyStats::default(),
            started_unix_s: None,
            markers: Vec::new(),
            reverse: None,
            detail: Value::Null,
        }
    }
}

/// One run's result.
#[derive(Clone, Debug, PartialEq)]
pub struct RunResult {
    pub workload: Workload,
    pub config: Config,
    /// From 1.
    pub run: usize,
    pub migrated: Migrated,
    /// Whether the guest went on at the destination (None: not checked), and how we know.
    pub guest_ok: Option<bool>,
    pub guest_note: String,
    /// W3: the client's longest wait for a reply that overlapped the migration, ms.
    pub outage_ms: Option<f64>,
    /// W3: the client's longest wait for a reply outside the migration, ms (the noise floor).
    pub baseline_gap_ms: Option<f64>,
    /// W3: acknowledged writes that did not read back.
    pub lost_writes: Option<u64>,
    /// W3: acknowledged writes.
    pub acked_writes: Option<u64>,
    /// The workload's progress over time through the migration (W3: the client's completed
    /// operations; W1/W2: the pages the guest wrote).
    pub series: Option<series::Series>,
}

impl RunResult {
    fn new(workload: Workload, config: &Config, run: usize, migrated: Migrated) -> Self {
        RunResult {
            workload,
            config: config.clone(),
            run,
            migrated,
            guest_ok: None,
            guest_note: String::new(),
            outage_ms: None,
            baseline_gap_ms: None,
            lost_writes: None,
            acked_writes: None,
            series: None,
        }
    }

    /// One line for the per-run list of the report.
    pub fn line(&self) -> String {
        let m = &self.migrated;
        let f = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.1}"));
        let outcome = match &m.outcome {
            Outcome::Completed => "completed".to_string(),
            Outcome::DidNotConverge => "did not converge".to_string(),
            Outcome::Failed(e) => format!("FAILED: {}", clip(e, 300)),
            Outcome::Skipped(e) => format!("skipped: {e}"),
        };
        let mut s = format!(
            "{} {} run {}: {outcome}; total {} ms, downtime {} ms, paused {} ms, {} MB, wall {} ms",
            self.workload.name(),
            self.config,
            self.run,
            f(m.total_ms),
            f(m.downtime_ms),
            f(m.paused_ms),
            m.bytes.map_or("-".into(), |b| format!("{:.1}", b as f64 / 1e6)),
            f(m.wall_ms),
        );
        if let Some(o) = self.outage_ms {
            s.push_str(&format!(", outage {o:.1} ms"));
        }
        if let Some(o) = self.baseline_gap_ms {
            s.push_str(&format!(" (longest reply otherwise {o:.1} ms)"));
        }
        if let Some(at) = m.postcopy_requested_ms {
            let ran = if m.postcopy_ran == Some(true) { "ran" } else { "did not run: finished in pre-copy" };
            s.push_str(&format!(", post-copy requested at {at:.0} ms, {ran}"));
        }
        let p = &m.postcopy;
        if let Some(faults) = p.faults {
            s.push_str(&format!(", {faults} faults (p50 {} µs, p99 {} µs)", f(p.fault_us_p50), f(p.fault_us_p99)));
        }
        if p.pages_pushed.is_some() || p.pages_demanded.is_some() {
            let n = |x: Option<u64>| x.map_or("-".to_string(), |x| x.to_string());
            s.push_str(&format!(", pages pushed {} / demanded {}", n(p.pages_pushed), n(p.pages_demanded)));
        }
        if let Some(b) = p.vcpu_blocked_ms {
            s.push_str(&format!(", vCPU blocked {b:.1} ms"));
        }
        if let Some(r) = p.switchover_round {
            s.push_str(&format!(", switched to post-copy after round {r}"));
        }
        if let Some(n) = p.reconnects.filter(|&n| n > 0) {
            s.push_str(&format!(", {n} reconnects during post-copy"));
        }
        if let Some(c) = &p.chosen_mode {
            s.push_str(&format!(", chose {c} ({})", p.choice_reason.as_deref().unwrap_or("no reason given")));
        }
        if let Some(n) = p.reverse_checkpoints {
            let x = |x: Option<u64>| x.map_or("-".to_string(), |x| x.to_string());
            s.push_str(&format!(
                ", {n} reverse checkpoints committed at the source ({} pages, {} sessions)",
                x(p.reverse_pages),
                x(p.reverse_sessions)
            ));
        }
        if let Some(r) = &m.reverse {
            s.push_str(&format!(", destination: {}", r.describe()));
        }
        if let (Some(l), Some(a)) = (self.lost_writes, self.acked_writes) {
            s.push_str(&format!(", {l} of {a} acknowledged writes lost"));
        }
        match self.guest_ok {
            Some(true) => s.push_str(&format!("; guest ok: {}", self.guest_note)),
            Some(false) => s.push_str(&format!("; GUEST BROKEN: {}", self.guest_note)),
            None if !self.guest_note.is_empty() => s.push_str(&format!("; guest not checked: {}", self.guest_note)),
            None => {}
        }
        if !m.notes.is_empty() {
            s.push_str(&format!("; {}", m.notes.join("; ")));
        }
        s
    }

    pub fn to_json(&self) -> Value {
        let m = &self.migrated;
        json!({
            "workload": self.workload.name(), "config": self.config.to_string(), "run": self.run,
            "outcome": match &m.outcome {
                Outcome::Completed => "completed".to_string(),
                Outcome::DidNotConverge => "did not converge".to_string(),
                Outcome::Failed(e) => format!("failed: {e}"),
                Outcome::Skipped(e) => format!("skipped: {e}"),
            },
            "total_ms": m.total_ms, "downtime_ms": m.downtime_ms, "bytes": m.bytes, "wall_ms": m.wall_ms,
            "paused_ms": m.paused_ms,
            "postcopy_requested_ms": m.postcopy_requested_ms, "postcopy_ran": m.postcopy_ran,
            "notes": m.notes, "detail": m.detail,
            "guest_ok": self.guest_ok, "guest_note": self.guest_note,
            "outage_ms": self.outage_ms, "baseline_gap_ms": self.baseline_gap_ms, "lost_writes": self.lost_writes, "acked_writes": self.acked_writes,
            "postcopy": m.postcopy.to_json(),
            "reverse": m.reverse.as_ref().map(reverse::ReverseStats::to_json),
            "started_unix_s": m.started_unix_s,
            "markers": series::markers_json(&m.markers),
            "series": self.series.as_ref().map(series::Series::to_json),
        })
    }
}

fn clip(s: &str, n: usize) -> String {
    let s = s.replace('\n', " | ");
    if s.chars().count() <= n { s } else { format!("{}…", s.chars().take(n).collect::<String>()) }
}

/// The benchmark's settings.
#[derive(Clone, Debug)]
pub struct Options {
    pub workloads: Vec<Workload>,
    pub configs: Vec<Config>,
    pub runs: usize,
    /// Write the report here too (rewritten after every run).
    pub out: Option<PathBuf>,
    /// Write every run's numbers as JSON here (rewritten after every run).
    pub json: Option<PathBuf>,
    /// Plot the throughput over time into this directory at the end ([`plot`]).
    pub plots: Option<PathBuf>,
    /// The `understudy` binary (our configurations).
    pub understudy: PathBuf,
    pub guest: Option<PathBuf>,
    /// A QEMU migration still copying after this is cancelled (did not converge).
    pub converge_timeout: Duration,
    /// QEMU's `downtime-limit` (ms) on every QEMU configuration, in place of the configuration's
    /// own (QEMU's 300 ms default, or the tuned 50 ms). The test of the cancel path sets 1 ms;
    /// a W2 guest starved by a loaded machine still let QEMU meet it once (CI, session 17), so
    /// that test also lowers `max-bandwidth` (below). (0 would not do either: QEMU 7.2 then
    /// never syncs the dirty bitmap and completes after its first pass.)
    pub qemu_downtime_limit_ms: Option<u64>,
    /// QEMU's `max-bandwidth` (bytes/s) on every QEMU configuration, in place of the
    /// configuration's own. The test of the cancel path sets 16 MiB/s: its first pass alone
    /// (the 64 MiB working set) then outlasts the convergence bound, whatever the guest dirties.
    pub qemu_max_bandwidth: Option<u64>,
    /// Keep the run directories (logs) instead of deleting them.
    pub keep: bool,
    /// The command line, for the report.
    pub command: String,
}

impl Options {
    pub fn new(workloads: Vec<Workload>, configs: Vec<Config>, runs: usize) -> Self {
        Options {
            workloads,
            configs,
            runs,
            out: None,
            json: None,
            plots: None,
            understudy: workspace_root().join("target/release/understudy"),
            guest: None,
            converge_timeout: Duration::from_secs(30),
            qemu_downtime_limit_ms: None,
            qemu_max_bandwidth: None,
            keep: false,
            command: String::new(),
        }
    }
}

/// What a run needs to know.
pub struct RunEnv<'a> {
    pub opts: &'a Options,
    pub guest: &'a Path,
    pub dir: PathBuf,
    /// QEMU's TLS files (`tls::write_qemu_certs`).
    pub qemu_certs: &'a Path,
    /// Our certificates (`understudy certs --host src --host dest`).
    pub our_certs: &'a Path,
    /// W3's namespace.
    pub net: Option<&'a kv::KvNet>,
}

/// One side of the benchmark: starts a source and a destination and migrates between them.
pub trait Migrator {
    /// Starts the source VM; returns when the guest printed `ready`.
    fn start_source(&mut self) -> Result<()>;
    /// Lines the source guest printed since the last call.
    fn source_lines(&mut self) -> Vec<String>;
    /// Starts the destination, waiting for a migration.
    fn start_destination(&mut self) -> Result<()>;
    /// Migrates; returns when the migration ended either way.
    fn migrate(&mut self) -> Result<Migrated>;
    /// Lines the destination guest printed since the last call.
    fn dest_lines(&mut self) -> Vec<String>;
    /// Every `dirty prog` line either guest printed so far, with the time it arrived.
    fn progress(&mut self) -> Vec<series::Progress>;
    /// The tail of the logs, for an error.
    fn logs(&self) -> String;
}

/// Lets the workload settle at the source: the `dirty` guest prints its first progress line
/// (~1 s: its working set was written once); returns the watch that goes on checking.
fn settle_dirty(m: &mut dyn Migrator, wss: u64) -> Result<watch::DirtyWatch> {
    let mut w = watch::DirtyWatch::new(wss);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !w.source_running() {
        check_interrupted()?;
        for l in m.source_lines() {
            w.source_line(&l).map_err(anyhow::Error::msg)?;
        }
        if Instant::now() > deadline {
            bail!("the source printed no dirty progress line in 10 s\n{}", m.logs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(w)
}

/// Waits for the destination's verdict on the `dirty` guest (bounded).
fn check_dirty(m: &mut dyn Migrator, w: &mut watch::DirtyWatch, timeout: Duration) -> Result<(bool, String)> {
    for l in m.source_lines() {
        let _ = w.source_line(&l);
    }
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        for l in m.dest_lines() {
            match w.dest_line(&l) {
                watch::Verdict::Pending => {}
                watch::Verdict::Continued(how) => return Ok((true, how)),
                watch::Verdict::Broken(why) => return Ok((false, why)),
            }
        }
        if Instant::now() > deadline {
            return Ok((false, format!("no whole generation rewritten at the destination within {timeout:?}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The series' zero (the migrator's, else the harness's `start`) and its end, ms after the
/// zero: the later of the harness's `end` and the last marker.
fn series_span(m: &Migrated, start: f64, end: f64) -> (f64, f64) {
    let zero = m.started_unix_s.unwrap_or(start);
    (zero, m.markers.iter().map(|k| k.ms).fold((end - zero) * 1e3, f64::max))
}

/// W1/W2's throughput over time: the pages the guest wrote per [`series::BUCKET_MS`], from its
/// `dirty prog` lines at the source and then the destination (waiting, at most 2 s, until the
/// guest has printed [`series::AFTER_MS`] past the end).
/// The points are also written to `DIR/progress.tsv` (kept with `--keep`): host ms since the
/// zero, the guest's ms, pages.
fn dirty_series(
    side: &mut dyn Migrator,
    dir: &Path,
    m: &Migrated,
    start: f64,
    end: f64,
) -> Result<Option<series::Series>> {
    let (zero, last) = series_span(m, start, end);
    let until = zero + (last + series::AFTER_MS) / 1e3 + 0.05;
    let wait = (until - unix_seconds()).clamp(0.0, 2.0);
    sleep(Duration::from_secs_f64(wait))?;
    let points = side.progress();
    let tsv: String =
        points.iter().map(|p| format!("{:.3}\t{}\t{}\n", (p.unix_s - zero) * 1e3, p.guest_ms, p.pages)).collect();
    std::fs::write(dir.join("progress.tsv"), format!("host_ms\tguest_ms\tpages\n{tsv}"))?;
    let at = |name: &str| m.markers.iter().find(|k| k.name == name).map(|k| k.ms);
    Ok(series::pages_series(&points, zero, last, at("pause").zip(at("resume"))))
}

/// W3's throughput over time: the client's replies per [`series::BUCKET_MS`], from
/// [`series::BEFORE_MS`] before the migration started to [`series::AFTER_MS`] after it ended
/// (the later of the harness's end and the last marker). `start`/`end`: the harness's clock
/// around the migration, the zero when the migrator gave none.
fn kv_series(dir: &Path, m: &Migrated, start: f64, end: f64) -> Option<series::Series> {
    let text = std::fs::read_to_string(kv::completions_file(dir)).ok()?;
    let (zero, last) = series_span(m, start, end);
    let times = series::parse_completions(&text, zero);
    Some(series::Series::bucket(
        "kv client replies",
        &times,
        -series::BEFORE_MS,
        last + series::AFTER_MS,
        series::BUCKET_MS,
    ))
}

/// One run of one configuration on one workload.
pub fn run_one(env: &RunEnv<'_>, workload: Workload, config: &Config, run: usize) -> Result<RunResult> {
    std::fs::create_dir_all(&env.dir)?;
    let mut side: Box<dyn Migrator> = match config {
        Config::Qemu(q) => Box::new(side_qemu::QemuMigration::new(env, workload, *q)),
        Config::Ours(_) => Box::new(side_ours::OurMigration::new(env, workload, config)),
    };
    side.start_source()?;
    if let Some(wss) = workload.wss_mib() {
        let mut w = settle_dirty(side.as_mut(), wss)?;
        side.start_destination()?;
        let start = unix_seconds();
        let migrated = side.migrate()?;
        let end = unix_seconds();
        let mut r = RunResult::new(workload, config, run, migrated);
        if r.migrated.outcome == Outcome::Completed {
            let (ok, note) = check_dirty(side.as_mut(), &mut w, Duration::from_secs(8))?;
            r.guest_ok = Some(ok);
            r.guest_note = note;
        }
        r.series = dirty_series(side.as_mut(), &env.dir, &r.migrated, start, end)?;
        return Ok(r);
    }
    // W3: the client loads the guest for a second before and after the migration.
    let net = env.net.context("W3 needs its network namespace")?;
    let script = workspace_root().join("testbed/scripts/faults_client.py");
    let mut client = kv::KvClient::start(net, &script, &env.dir, 120)?;
    client.wait_ready(Duration::from_secs(15)).with_context(|| side.logs())?;
    sleep(Duration::from_secs(1))?;
    side.start_destination()?;
    let start = unix_seconds();
    let migrated = side.migrate()?;
    let end = unix_seconds();
    let completed = migrated.outcome == Outcome::Completed;
    sleep(Duration::from_millis(1500))?;
    let verdict = client.stop(Some((start, end)), Duration::from_secs(30))?;
    let mut r = RunResult::new(workload, config, run, migrated);
    r.outage_ms = verdict.window_max_gap_ms;
    r.baseline_gap_ms = verdict.outside_max_gap_ms;
    r.lost_writes = Some(verdict.lost);
    r.acked_writes = Some(verdict.acknowledged_writes);
    r.series = kv_series(&env.dir, &r.migrated, start, end);
    let mut problems = Vec::new();
    if verdict.lost > 0 {
        problems.push(format!("{} acknowledged writes lost", verdict.lost));
    }
    if verdict.contradictions > 0 {
        problems.push(format!("{} contradictions", verdict.contradictions));
    }
    if verdict.errors > 0 || verdict.reconnects > 0 {
        problems
            .push(format!("{} client errors, {} reconnects: {:?}", verdict.errors, verdict.reconnects, verdict.notes));
    }
    let where_ = if completed { "at the destination" } else { "at the source (not migrated)" };
    r.guest_ok = Some(problems.is_empty());
    r.guest_note = if problems.is_empty() {
        format!("{} ops, all {} acknowledged writes read back {where_}", verdict.ops, verdict.acknowledged_writes)
    } else {
        problems.join("; ")
    };
    Ok(r)
}

/// The short commit of the workspace (`git rev-parse --short HEAD`, `+dirty` when the tree has
/// changes).
pub fn commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(workspace_root())
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let head = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty { format!("{head}+dirty") } else { head }
}

/// The whole benchmark's outcome.
#[derive(Debug)]
pub struct Report {
    pub command: String,
    pub commit: String,
    pub started: String,
    pub qemu_version: String,
    pub load_before: String,
    pub load_after: String,
    pub workloads: Vec<Workload>,
    pub configs: Vec<Config>,
    pub runs: usize,
    pub skipped: Vec<String>,
    pub results: Vec<RunResult>,
    pub elapsed: Duration,
}

impl Report {
    /// The markdown report: how it was made, the table, each run.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!("command: `{}`\n", self.command));
        s.push_str(&format!(
            "commit {}, {}, {}; {} CPUs; load average before {}, after {}; {} runs per configuration, interleaved; took {:.0} s\n\n",
            self.commit,
            self.started,
            self.qemu_version,
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            self.load_before,
            self.load_after,
            self.runs,
            self.elapsed.as_secs_f64(),
        ));
        for w in &self.workloads {
            s.push_str(&format!("- {}\n", w.describe()));
        }
        for c in &self.configs {
            if let Config::Qemu(q) = c {
                s.push_str(&format!("- {}: {}\n", q.name(), q.describe()));
            }
        }
        for why in &self.skipped {
            s.push_str(&format!("- **SKIPPED**: {why}\n"));
        }
        s.push('\n');
        let rows = summarize(&self.results, &self.workloads, &self.configs);
        s.push_str(&markdown_table(&rows));
        let cost = reverse::cost_table(&reverse::cost_rows(&rows));
        if !cost.is_empty() {
            s.push_str("\nReverse checkpoints' cost (issue 15): each post-copy mode with reverse checkpoints beside the same mode with `--no-reverse`; pause and dirty pages per epoch as the destination logged them (medians over the runs of each run's p99 / mean):\n\n");
            s.push_str(&cost);
        }
        s.push_str("\nEach run:\n\n");
        for r in &self.results {
            s.push_str(&format!("- {}\n", r.line()));
        }
        s
    }

    pub fn to_json(&self) -> Value {
        let rows = summarize(&self.results, &self.workloads, &self.configs);
        let cost: Vec<Value> = reverse::cost_rows(&rows).iter().map(reverse::CostRow::to_json).collect();
        json!({
            "command": self.command, "commit": self.commit, "started": self.started,
            "qemu": self.qemu_version, "load_before": self.load_before, "load_after": self.load_after,
            "runs": self.runs, "skipped": self.skipped,
            "results": self.results.iter().map(RunResult::to_json).collect::<Vec<_>>(),
            "reverse_cost": cost,
        })
    }
}

fn qemu_version() -> String {
    Command::new(crate::env::QEMU)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_string))
        .unwrap_or_else(|| "QEMU version unknown".into())
}

fn now_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Runs the benchmark: run 1 of every workload and configuration, then run 2, ...
pub fn run(opts: &Options) -> Result<Report> {
    crate::harness::interrupt::install_signal_handlers();
    let t0 = Instant::now();
    let mut configs = opts.configs.clone();
    let mut skipped = Vec::new();
    if configs.iter().any(Config::is_qemu)
        && let Some(why) = qemu_skip_reason()
    {
        bail!("cannot run QEMU here: {why}");
    }
    let guest = match &opts.guest {
        Some(g) => g.clone(),
        None => guest_image()?,
    };
    if configs.iter().any(|c| !c.is_qemu())
        && let Err(why) = side_ours::available(&opts.understudy)
    {
        let line = format!("our configurations ({}): {why}", ours_names(&configs));
        eprintln!("\n*** SKIP: migrate-bench: {line} ***\n");
        skipped.push(line);
        configs.retain(Config::is_qemu);
    }
    if opts.workloads.iter().any(|w| w.kv()) {
        kv::clean_stale_namespaces();
    }
    let top = TempDir::for_process("us-migrate-bench", opts.keep)?;
    let qemu_certs = top.join("qemu-tls");
    tls::write_qemu_certs(&qemu_certs)?;
    let our_certs = top.join("our-certs");
    if configs.iter().any(|c| !c.is_qemu()) {
        side_ours::make_certs(&opts.understudy, &our_certs)?;
    }
    let mut report = Report {
        command: opts.command.clone(),
        commit: commit(),
        started: now_utc(),
        qemu_version: qemu_version(),
        load_before: loadavg(),
        load_after: String::new(),
        workloads: opts.workloads.clone(),
        configs: configs.clone(),
        runs: opts.runs,
        skipped,
        results: Vec::new(),
        elapsed: Duration::ZERO,
    };
    for run in 1..=opts.runs {
        for &workload in &opts.workloads {
            for config in &configs {
                check_interrupted()?;
                let tag = format!("{}-{}-{run}", workload.name(), config.to_string().replace(' ', "-"));
                eprintln!("migrate-bench: {tag} (load {})", loadavg());
                let net = if workload.kv() { Some(kv::KvNet::create()?) } else { None };
                let env = RunEnv {
                    opts,
                    guest: &guest,
                    dir: top.join(&tag),
                    qemu_certs: &qemu_certs,
                    our_certs: &our_certs,
                    net: net.as_ref(),
                };
                let r = match run_one(&env, workload, config, run) {
                    Ok(r) => r,
                    Err(e) => {
                        check_interrupted()?;
                        RunResult::new(workload, config, run, Migrated::failed(format!("{e:#}")))
                    }
                };
                eprintln!("migrate-bench:   {}", r.line());
                report.results.push(r);
                report.load_after = loadavg();
                report.elapsed = t0.elapsed();
                write_outputs(opts, &report)?;
            }
        }
    }
    report.load_after = loadavg();
    report.elapsed = t0.elapsed();
    write_outputs(opts, &report)?;
    if let Some(dir) = &opts.plots {
        let json = match &opts.json {
            Some(j) => j.clone(),
            None => {
                std::fs::create_dir_all(dir)?;
                let j = dir.join("migrate-bench.json");
                std::fs::write(&j, serde_json::to_string_pretty(&report.to_json())?)?;
                j
            }
        };
        for png in plot(&json, dir)? {
            eprintln!("migrate-bench: plot {}", png.display());
        }
    }
    Ok(report)
}

/// `testbed/scripts/plot_migration.py JSON DIR` with Debian's python3 (where
/// python3-matplotlib is): a PNG per workload whose runs carry a series; returns the files
/// written.
pub fn plot(json: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    let script = workspace_root().join("testbed/scripts/plot_migration.py");
    let out = Command::new("/usr/bin/python3")
        .arg(&script)
        .arg(json)
        .arg(dir)
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if !out.status.success() {
        let hint = if stderr.contains("No module named") { " (python3-matplotlib: make deps)" } else { "" };
        bail!("plot_migration.py failed ({}): {stderr}{hint}", out.status);
    }
    for line in stderr.lines() {
        eprintln!("migrate-bench: plot: {line}");
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(PathBuf::from).collect())
}

fn ours_names(configs: &[Config]) -> String {
    configs.iter().filter(|c| !c.is_qemu()).map(Config::to_string).collect::<Vec<_>>().join(", ")
}

fn write_outputs(opts: &Options, report: &Report) -> Result<()> {
    if let Some(out) = &opts.out {
        std::fs::write(out, report.markdown()).with_context(|| format!("write {}", out.display()))?;
    }
    if let Some(out) = &opts.json {
        let text = serde_json::to_string_pretty(&report.to_json())?;
        std::fs::write(out, text).with_context(|| format!("write {}", out.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert_eq!(Workload::parse("w2").unwrap(), Workload::W2);
        assert!(Workload::parse("W4").unwrap_err().to_string().contains("W1, W2, W3"));
        assert_eq!(Config::parse("qemu-best-tls").unwrap(), Config::Qemu(QemuConfig::BestTls));
        assert_eq!(Config::parse("precopy").unwrap(), Config::Ours("precopy".into()));
        assert_eq!(Config::parse("understudy-stopcopy").unwrap(), Config::Ours("stopcopy".into()));
        let e = Config::parse("qemu-fast").unwrap_err().to_string();
        assert!(e.contains("unknown configuration \"qemu-fast\"") && e.contains("qemu-postcopy-tls"), "{e}");
        let d = Config::defaults();
        let names: Vec<String> = d.iter().map(Config::to_string).collect();
        assert_eq!(
            names,
            [
                "qemu-default",
                "qemu-best",
                "qemu-postcopy",
                "qemu-best-tls",
                "qemu-postcopy-tls",
                "understudy precopy",
                "understudy stopcopy",
                "understudy postcopy",
                "understudy postcopy-noreverse",
                "understudy demand",
                "understudy demand-noreverse",
                "understudy hybrid",
                "understudy hybrid-noreverse",
                "understudy auto",
                "understudy auto-noreverse"
            ]
        );
        for m in ["postcopy", "demand", "hybrid", "auto"] {
            let with = Config::parse(m).unwrap();
            assert_eq!(with, Config::Ours(m.into()));
            let without = Config::parse(&format!("understudy-{m}-noreverse")).unwrap();
            assert_eq!((without.our_mode(), without.no_reverse()), (Some(m), true));
            assert_eq!((with.our_mode(), with.no_reverse()), (Some(m), false));
            assert_eq!(with.without_reverse(), Some(without.clone()));
            assert_eq!(without.without_reverse(), None, "{without} has no reverse checkpoints to turn off");
        }
        assert_eq!(Config::parse("precopy").unwrap().without_reverse(), None, "pre-copy never runs post-copy");
        assert_eq!(Config::Qemu(QemuConfig::Postcopy).without_reverse(), None);
        let e = Config::parse("stopcopy-noreverse").unwrap_err().to_string();
        assert!(
            e.contains("stopcopy never runs post-copy") && e.contains("-noreverse goes with postcopy, demand"),
            "{e}"
        );
        let e = Config::parse("postcopy-noreverse-tls").unwrap_err().to_string();
        assert!(e.contains("known: ") && e.ends_with("hybrid-noreverse, auto-noreverse"), "{e}");
        for q in QemuConfig::ALL {
            assert_eq!(Config::parse(q.name()).unwrap(), Config::Qemu(q));
        }
    }

    #[test]
    fn workloads_are_the_issues() {
        assert_eq!(Workload::W1.cmdline(), "workload=dirty wss=64 rate=20000 report_ms=10");
        assert_eq!((Workload::W1.mem_mib(), Workload::W2.mem_mib(), Workload::W3.mem_mib()), (256, 512, 64));
        assert_eq!(Workload::W2.cmdline(), "workload=dirty wss=128 rate=200000 report_ms=10");
        assert_eq!(Workload::W3.cmdline(), "workload=kv ip=10.79.0.2/24");
        assert!(Workload::W3.kv() && Workload::W3.wss_mib().is_none());
    }

    #[test]
    fn kv_series_counts_the_clients_replies_from_before_the_start_to_after_the_end() {
        let dir = TempDir::for_process("us-kv-series-test", false).unwrap();
        let run = dir.join("run");
        std::fs::create_dir_all(kv::ctl_dir(&run)).unwrap();
        // Migration started at 1000 s (the migrator's clock), harness window 999.99-1000.05.
        let replies = ["999.4", "999.505", "999.995", "1000.001", "1000.002", "1000.0301", "1000.7", "1002.0"];
        std::fs::write(kv::completions_file(&run), replies.join("\n")).unwrap();
        let mut m = Migrated::failed("");
        m.outcome = Outcome::Completed;
        m.started_unix_s = Some(1000.0);
        m.markers = vec![series::Marker::new("pause", 20.0), series::Marker::new("complete", 120.0)];
        let s = kv_series(&run, &m, 999.99, 1000.05).unwrap();
        // From -500 ms to the last marker (120 ms) + 500 ms: 112 buckets of 10 ms.
        assert_eq!((s.from_ms, s.bucket_ms, s.counts.len()), (-500.0, 10.0, 112));
        let nonzero: Vec<(usize, u64)> = s.counts.iter().copied().enumerate().filter(|&(_, c)| c > 0).collect();
        // 999.505 -> bucket 0; 999.995 -> [-10, 0) = 49; 1000.001/002 -> 50; 1000.0301 -> 53;
        // 999.4 is before the start (-600 ms), 1000.7 after the end (700 > 620 ms).
        assert_eq!(nonzero, [(0, 1), (49, 1), (50, 2), (53, 1)]);
        // Without the migrator's start, the harness's start is the zero.
        m.started_unix_s = None;
        m.markers.clear();
        let s = kv_series(&run, &m, 1000.5, 1000.625).unwrap();
        assert_eq!(s.counts.len(), 113, "-500 to 125 + 500 ms");
        assert_eq!(s.counts.iter().sum::<u64>(), 4, "1000.001 .. 1000.7 fall in [-500, 625) ms of 1000.5");
        assert!(kv_series(&dir.join("none"), &m, 0.0, 1.0).is_none());
    }

    #[test]
    fn plots_a_png_per_workload_with_a_series() {
        let ok = Command::new("/usr/bin/python3").args(["-c", "import matplotlib"]).status();
        if !ok.is_ok_and(|s| s.success()) {
            eprintln!("\n*** SKIP: plots_a_png_per_workload_with_a_series: no python3-matplotlib (make deps) ***\n");
            return;
        }
        let dir = TempDir::for_process("us-plot-test", false).unwrap();
        let mut m = Migrated::failed("");
        m.outcome = Outcome::Completed;
        m.total_ms = Some(30.0);
        m.markers = vec![series::Marker::new("pause", 20.0), series::Marker::new("resume", 30.0)];
        let mut kv = RunResult::new(Workload::W3, &Config::Ours("precopy".into()), 1, m.clone());
        let times: Vec<f64> = (0..1000).map(|i| -500.0 + i as f64).filter(|t| !(20.0..30.0).contains(t)).collect();
        kv.series = Some(series::Series::bucket("kv client replies", &times, -500.0, 500.0, 10.0));
        let dirty = RunResult::new(Workload::W1, &Config::Qemu(QemuConfig::Best), 1, m);
        let json = dir.join("bench.json");
        let bench = json!({"results": [kv.to_json(), dirty.to_json()]});
        std::fs::write(&json, bench.to_string()).unwrap();
        let written = plot(&json, &dir.join("plots")).unwrap();
        assert_eq!(written, [dir.join("plots/migration-W3.png")], "W1 has no series: no plot");
        let png = std::fs::read(&written[0]).unwrap();
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} bytes", png.len());
    }

    #[test]
    fn run_lines_say_what_happened() {
        let m = Migrated {
            outcome: Outcome::Completed,
            total_ms: Some(55.0),
            downtime_ms: Some(3.0),
            bytes: Some(30_100_000),
            wall_ms: Some(57.25),
            paused_ms: None,
            postcopy_requested_ms: Some(12.4),
            postcopy_ran: Some(false),
            notes: vec!["a note".into()],
            postcopy: PostcopyStats::default(),
            started_unix_s: None,
            markers: Vec::new(),
            reverse: None,
            detail: Value::Null,
        };
        let mut r = RunResult::new(Workload::W1, &Config::Qemu(QemuConfig::Best), 2, m);
        r.guest_ok = Some(true);
        r.guest_note = "2 progress lines".into();
        assert_eq!(
            r.line(),
            "W1 qemu-best run 2: completed; total 55.0 ms, downtime 3.0 ms, paused - ms, 30.1 MB, wall 57.2 ms, post-copy requested at 12 ms, did not run: finished in pre-copy; guest ok: 2 progress lines; a note"
        );
        let r = RunResult::new(Workload::W3, &Config::Ours("precopy".into()), 1, Migrated::failed("boom\nline 2"));
        assert!(r.line().starts_with("W3 understudy precopy run 1: FAILED: boom | line 2;"), "{}", r.line());
        assert_eq!(r.to_json()["outcome"], "failed: boom\nline 2");
        assert_eq!(r.to_json()["reverse"], Value::Null);
        let mut m = Migrated::failed("");
        m.outcome = Outcome::Completed;
        m.total_ms = Some(520.0);
        m.reverse = Some(reverse::ReverseStats {
            epochs: 40,
            last_acked: 44,
            pause_us_p50: Some(310.0),
            pause_us_p99: Some(1250.4),
            dirty_pages_mean: Some(998.6),
            dirty_pages_p99: Some(2100.0),
            ack_us_p50: Some(800.0),
            ack_us_p99: Some(3000.0),
        });
        let r = RunResult::new(Workload::W2, &Config::Ours("postcopy".into()), 3, m);
        assert_eq!(
            r.line(),
            "W2 understudy postcopy run 3: completed; total 520.0 ms, downtime - ms, paused - ms, - MB, wall - ms, \
             destination: 40 reverse epochs (last acked 44), pause p50 310 / p99 1250 µs, dirty pages per epoch mean 999 / p99 2100, \
             ack p50 800 / p99 3000 µs"
        );
        let j = r.to_json();
        assert_eq!((j["reverse"]["epochs"].as_u64(), j["reverse"]["pause_us_p99"].as_f64()), (Some(40), Some(1250.4)));
    }
}
