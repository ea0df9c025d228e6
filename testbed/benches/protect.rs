//! Protection benchmarks (issue 4): what protecting a VM costs, measured end to end through
//! the release `understudy` binary, A/B (unprotected vs protected) in one run.
//!
//! ```sh
//! make guest && cargo bench -p testbed --bench protect        # builds understudy --release first
//! # knobs: BENCH_RUNS=3 BENCH_WINDOW_S=5 BENCH_ONLY=pause,dirty,kv BENCH_EPOCHS_MS=40,20,10,5
//! #        (items: ms, `adaptive` = the default output-driven policy, `adaptive-silent` = 10-50 ms
//! #        epochs that output does not end, the policy before output-driven epochs)
//! #        BENCH_NO_BUILD=1 BENCH_KEEP=1 (keep the temp dir) BENCH_MAX_S=3600 (whole-run bound)
//! #        UNDERSTUDY_BIN=PATH (drive another build of understudy; with BENCH_NO_BUILD=1)
//! ```
//!
//! Every run gets its own network namespace (deleted afterwards): the backup listens on the
//! namespace's loopback, so the UDP bytes counted on that loopback are exactly the replication
//! traffic, and nothing collides with other users of the machine. Needs root (namespaces, TAP,
//! /dev/kvm). Experiments:
//! 1. `pause`: pause time p50/p99 vs dirty pages per epoch (dirty guest, fixed epochs).
//! 2. `dirty`: guest throughput unprotected / protected / unprotected again at 25..200
//!    epochs/s, for a rate-limited guest (rate=10000 pages/s: slowdown shows as vCPU time) and
//!    a CPU-bound one (1 MiB working set, no rate limit: slowdown shows as throughput).
//! 3. `kv`: memcslap ops/s and sequential request latency against the kv guest over a TAP.
//! 4. bytes per epoch: from every protected window of 1-3.
//!
//! Every child is bounded in time and killed on every path (drop guards; SIGINT/SIGTERM set a
//! flag that turns into a panic at the next poll, so the guards run); namespaces and temp
//! directories are removed the same way. Medians over runs; ratios are medians of per-run
//! ratios.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::ops::{Deref, DerefMut};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value, json};
use testbed::harness::interrupt::{check_interrupted, install_signal_handlers};
use testbed::harness::netns::NetNs;
use testbed::harness::proc::{Proc, loadavg, tail};
use testbed::harness::stats::{median as median_of, percentile};
use testbed::harness::tempdir::TempDir;
use testbed::harness::wait::{FileLines, read_text};

/// Write-protect fault cost per newly dirtied page (shared/PLATFORM.md).
const WP_FAULT_US: f64 = 4.0;
/// Guest memory of every run (primary and backup).
const MEMORY: &str = "64M";
/// The kv guest's address inside each namespace (the TAP's host side is .1).
const KV_SUBNET: &str = "10.99.0";

// ---------------------------------------------------------------------------------------
// Interrupts and the global time bound

static DEADLINE: OnceLock<Instant> = OnceLock::new();
static NS_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Panics (so that every guard's drop runs) when interrupted or past the whole-run bound.
fn check() {
    if check_interrupted().is_err() {
        panic!("interrupted: cleaning up");
    }
    if DEADLINE.get().is_some_and(|d| Instant::now() > *d) {
        panic!("BENCH_MAX_S exceeded: cleaning up");
    }
}

/// Sleeps in small steps, checking for interrupts.
fn nap(d: Duration) {
    let end = Instant::now() + d;
    loop {
        check();
        let now = Instant::now();
        if now >= end {
            return;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}

// ---------------------------------------------------------------------------------------
// Settings

struct Cfg {
    root: PathBuf,
    bin: PathBuf,
    guest: PathBuf,
    runs: usize,
    window: Duration,
    only: Vec<String>,
    epochs_ms: Vec<u64>,
    keep: bool,
    python: PathBuf,
    memcslap: PathBuf,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

impl Cfg {
    fn wants(&self, what: &str) -> bool {
        self.only.iter().any(|o| o == what)
    }
}

// ---------------------------------------------------------------------------------------
// Processes

/// Runs `cmd` to completion, killing it after `timeout` (or on interrupt: then it panics, so
/// that every guard cleans up).
fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    match testbed::harness::proc::run_bounded(cmd, timeout) {
        Ok((out, _)) => Ok(out),
        Err(e) => {
            check();
            Err(e)
        }
    }
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

/// A long-running child (backup or primary), shut down through its API on drop (then killed
/// with the [`Proc`] it holds).
struct VmProc {
    proc: Proc,
    api: PathBuf,
}

impl Deref for VmProc {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl DerefMut for VmProc {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

impl Drop for VmProc {
    fn drop(&mut self) {
        if self.alive() {
            // Polite first (the VM shuts down, the socket is removed), then SIGKILL.
            if let Ok(mut s) = UnixStream::connect(&self.api) {
                let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = s.write_all(b"{\"op\":\"shutdown\"}\n");
            }
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end && self.alive() {
                std::thread::sleep(Duration::from_millis(10));
            }
            if self.alive() {
                eprintln!("bench: {} (pid {}) did not stop in 5 s: SIGKILL", self.name, self.pid());
            }
        }
    }
}

/// A network namespace `usb<pid>-<n>` (loopback up, optionally `tap0` at `<KV_SUBNET>.1/24`),
/// deleted on drop.
fn netns(with_tap: bool) -> Result<NetNs> {
    let ns = NetNs::create(&format!("usb{}-{}", std::process::id(), NS_COUNTER.fetch_add(1, Ordering::SeqCst)))?;
    if with_tap {
        ns.add_tap("tap0", Some(&format!("{KV_SUBNET}.1/24")))?;
    }
    Ok(ns)
}

/// Bytes transmitted on the namespace's loopback (all replication traffic, both ways).
fn lo_tx_bytes(ns: &NetNs) -> Result<u64> {
    let out = run_bounded(ns.command("cat").arg("/sys/class/net/lo/statistics/tx_bytes"), Duration::from_secs(5))?;
    text(&out.stdout).trim().parse().context("lo tx_bytes")
}

// ---------------------------------------------------------------------------------------
// CPU accounting from /proc (ns of CPU time per thread, by thread name)

fn thread_cpu(pid: u32) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return m };
    for e in rd.flatten() {
        let p = e.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default().trim().to_string();
        let ns: u64 = std::fs::read_to_string(p.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
            .unwrap_or(0);
        let key = match comm.as_str() {
            c if c.starts_with("vcpu") => "vcpu".to_string(),
            "epoch-engine" => "engine".to_string(),
            c if c.starts_with("understudy-io") || c.starts_with("tokio") => "io".to_string(),
            c if c.starts_with("net-") => "net".to_string(),
            _ => "other".to_string(),
        };
        *m.entry(key).or_insert(0) += ns;
    }
    m
}

fn cpu_total(m: &BTreeMap<String, u64>) -> u64 {
    m.values().sum()
}

/// Milliseconds of CPU per second of wall time for `key` between two samples.
fn cpu_ms_per_s(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>, key: Option<&str>, secs: f64) -> f64 {
    let get = |m: &BTreeMap<String, u64>| match key {
        Some(k) => m.get(k).copied().unwrap_or(0),
        None => cpu_total(m),
    };
    get(b).saturating_sub(get(a)) as f64 / 1e6 / secs
}

/// CPU seconds (utime + stime) of every process now, by pid.
fn all_process_cpu() -> BTreeMap<u32, (String, f64)> {
    let mut m = BTreeMap::new();
    let tck = 100.0;
    let Ok(rd) = std::fs::read_dir("/proc") else { return m };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        let Some(close) = stat.rfind(')') else { continue };
        let comm = stat[stat.find('(').map(|i| i + 1).unwrap_or(0)..close].to_string();
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        if f.len() < 13 {
            continue;
        }
        let ut: f64 = f[11].parse().unwrap_or(0.0);
        let st: f64 = f[12].parse().unwrap_or(0.0);
        m.insert(pid, (comm, (ut + st) / tck));
    }
    m
}

/// Busy CPU time of the whole machine so far, in ms (all cores; from /proc/stat).
fn machine_busy_ms() -> f64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(l) = s.lines().find(|l| l.starts_with("cpu ")) else { return f64::NAN };
    let v: Vec<f64> = l.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 5 {
        return f64::NAN;
    }
    // user nice system idle iowait irq softirq steal (guest time is already in user)
    let busy: f64 = v.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, x)| x).sum();
    busy * 10.0
}

/// CPU time of this process and its reaped children, ms.
fn own_cpu_ms() -> f64 {
    let mut t = 0.0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: getrusage writes into the zeroed struct we pass.
        let ru = unsafe {
            let mut ru: libc::rusage = std::mem::zeroed();
            libc::getrusage(who, &mut ru);
            ru
        };
        let tv = |x: libc::timeval| x.tv_sec as f64 * 1e3 + x.tv_usec as f64 / 1e3;
        t += tv(ru.ru_utime) + tv(ru.ru_stime);
    }
    t
}

// ---------------------------------------------------------------------------------------
// The guest's serial output, timestamped as it appears

/// A serial log read as it grows, each line stamped with the time it was read.
struct SerialTail(FileLines);

impl SerialTail {
    fn new(path: PathBuf) -> Self {
        Self(FileLines::new(path))
    }

    /// New complete lines, each stamped with the time it was read.
    fn poll(&mut self) -> Vec<(Instant, String)> {
        let now = Instant::now();
        self.0.poll().into_iter().map(|l| (now, l)).collect()
    }
}

/// Guest throughput over a window, from `dirty gen=.. pages=.. errors=..` lines.
#[derive(Debug, Clone, Copy, Default)]
struct Throughput {
    pages_per_s: f64,
    errors: u64,
}

/// Watches the dirty guest's progress lines for `window`; returns pages written per second of
/// host time between the first and last line seen. A CPU-bound guest prints only between its
/// catch-up bursts, so the window is stretched (by up to 10 s) until two lines at least a second
/// apart were seen.
fn dirty_window(tail: &mut SerialTail, window: Duration) -> Result<Throughput> {
    let _ = tail.poll();
    let mut pts: Vec<(Instant, u64, u64)> = Vec::new();
    let t0 = Instant::now();
    let spans = |pts: &Vec<(Instant, u64, u64)>| {
        pts.len() >= 2 && pts[pts.len() - 1].0.duration_since(pts[0].0) >= Duration::from_secs(1)
    };
    while t0.elapsed() < window || (!spans(&pts) && t0.elapsed() < window + Duration::from_secs(10)) {
        for (t, l) in tail.poll() {
            if l.starts_with("guest ") {
                bail!("guest failed: {l}");
            }
            if let Some((_, pages, errors)) = testbed::lines::parse_dirty_progress(&l) {
                pts.push((t, pages, errors));
            }
        }
        nap(Duration::from_millis(5));
    }
    ensure!(pts.len() >= 2, "only {} progress lines in {window:?}: the guest is stalled", pts.len());
    let (t0, p0, _) = pts[0];
    let (t1, p1, e1) = pts[pts.len() - 1];
    let dt = t1.duration_since(t0).as_secs_f64();
    ensure!(dt > 0.8, "progress lines span only {dt:.3} s");
    Ok(Throughput { pages_per_s: (p1.saturating_sub(p0)) as f64 / dt, errors: e1 })
}

// ---------------------------------------------------------------------------------------
// A primary and a backup in a namespace

struct Rig {
    // Drop order: the VM processes first, then the namespace, then the directory.
    primary: VmProc,
    backup: VmProc,
    ns: NetNs,
    dir: PathBuf,
    bin: PathBuf,
    certs: PathBuf,
}

impl Rig {
    fn start(cfg: &Cfg, top: &Path, certs: &Path, tag: &str, cmdline: &str, kv: bool) -> Result<Self> {
        check();
        let dir = top.join(tag);
        std::fs::create_dir_all(&dir)?;
        let ns = netns(kv)?;
        let spawn = |name: &str, args: Vec<String>| -> Result<VmProc> {
            let mut cmd = ns.command(&cfg.bin);
            // BENCH_LOG: the processes' log filter (e.g. `info,primary::engine=debug`).
            let log = std::env::var("BENCH_LOG").unwrap_or_else(|_| "info".into());
            cmd.args(&args).env("UNDERSTUDY_LOG", log).stdout(Stdio::null());
            let proc = Proc::start(&mut cmd, name, dir.join(format!("{name}.stderr")))?;
            Ok(VmProc { proc, api: dir.join(format!("{name}.sock")) })
        };
        let s = |x: &Path| x.display().to_string();
        let mut backup = spawn(
            "backup",
            vec![
                "backup".into(),
                "--listen".into(),
                "127.0.0.1:7400".into(),
                "--certs".into(),
                s(certs),
                "--memory".into(),
                MEMORY.into(),
                "--api".into(),
                s(&dir.join("backup.sock")),
                "--serial".into(),
                s(&dir.join("backup-serial.log")),
            ],
        )?;
        let mut args = vec![
            "run".into(),
            "--kernel".into(),
            s(&cfg.guest),
            "--cmdline".into(),
            cmdline.into(),
            "--memory".into(),
            MEMORY.into(),
            "--serial".into(),
            s(&dir.join("primary-serial.log")),
            "--api".into(),
            s(&dir.join("primary.sock")),
        ];
        if kv {
            args.extend(["--tap".into(), "tap0".into()]);
        }
        let t0 = Instant::now();
        while !backup.api.exists() {
            ensure!(backup.alive(), "backup exited early:\n{}", backup.stderr_tail(20));
            ensure!(t0.elapsed() < Duration::from_secs(10), "backup api socket did not appear");
            nap(Duration::from_millis(5));
        }
        let mut primary = spawn("primary", args)?;
        let serial = dir.join("primary-serial.log");
        let t0 = Instant::now();
        loop {
            let t = read_text(&serial);
            if t.lines().any(|l| l.trim() == "ready") {
                break;
            }
            ensure!(!t.contains("guest panic") && !t.contains("guest exception"), "guest failed:\n{t}");
            ensure!(primary.alive(), "primary exited early:\n{}", primary.stderr_tail(20));
            ensure!(t0.elapsed() < Duration::from_secs(15), "guest not ready after 15 s:\n{t}");
            nap(Duration::from_millis(5));
        }
        Ok(Self { primary, backup, ns, dir, bin: cfg.bin.clone(), certs: certs.to_path_buf() })
    }

    fn serial(&self) -> PathBuf {
        self.dir.join("primary-serial.log")
    }

    /// One API request to the primary.
    fn api(&self, req: &str) -> Result<Value> {
        let s = UnixStream::connect(&self.primary.api).context("connect primary api")?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        (&s).write_all(format!("{req}\n").as_bytes())?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line)?;
        let v: Value = serde_json::from_str(&line).with_context(|| format!("api answer {line:?}"))?;
        ensure!(v["ok"] == json!(true), "api {req}: {}", v["error"]);
        Ok(v["result"].clone())
    }

    fn status(&self) -> Result<Value> {
        self.api("{\"op\":\"status\"}")
    }

    /// Fails (with logs) when a process died or the guest stopped.
    fn healthy(&mut self) -> Result<()> {
        let p = self.primary.alive();
        let b = self.backup.alive();
        ensure!(p && b, "process died (primary alive {p}, backup alive {b})\n{}", self.logs());
        let st = self.status()?;
        ensure!(st["state"] == "running", "vm is {}: {}\n{}", st["state"], st["stopped_reason"], self.logs());
        Ok(())
    }

    fn logs(&self) -> String {
        format!(
            "--- primary stderr (tail):\n{}\n--- backup stderr (tail):\n{}\n--- guest serial (tail):\n{}",
            self.primary.stderr_tail(15),
            self.backup.stderr_tail(15),
            tail(&read_text(&self.serial()), 8)
        )
    }

    /// `understudy protect` with a fixed epoch; waits for `protected`. Returns the time it took.
    fn protect(&mut self, epoch_ms: u64) -> Result<Duration> {
        let t0 = Instant::now();
        let out = run_bounded(
            Command::new(&self.bin)
                .args([
                    "protect",
                    "--api",
                    &self.primary.api.display().to_string(),
                    "--backup",
                    "127.0.0.1:7400",
                    "--certs",
                    &self.certs.display().to_string(),
                ])
                .args(epoch_args(epoch_ms))
                .args(&variants()[VARIANT.get()].1),
            Duration::from_secs(40),
        )?;
        ensure!(out.status.success(), "protect failed: {}{}", text(&out.stdout), text(&out.stderr));
        loop {
            let st = self.status()?;
            let state = st["protection"]["state"].as_str().unwrap_or("?").to_string();
            if state == "protected" {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("protection still {state} after 30 s (reason {}):\n{}", st["protection"]["reason"], self.logs());
            }
            self.healthy()?;
            nap(Duration::from_millis(20));
        }
    }

    fn unprotect(&mut self) -> Result<()> {
        let out = run_bounded(
            Command::new(&self.bin).args(["unprotect", "--api", &self.primary.api.display().to_string()]),
            Duration::from_secs(40),
        )?;
        ensure!(out.status.success(), "unprotect failed: {}{}\n{}", text(&out.stdout), text(&out.stderr), self.logs());
        Ok(())
    }
}

/// Protection counters at one instant.
struct Snap {
    at: Instant,
    st: Value,
    lo: u64,
    primary_cpu: BTreeMap<String, u64>,
    backup_cpu: u64,
    machine_busy_ms: f64,
}

impl Snap {
    fn take(rig: &Rig) -> Result<Self> {
        Ok(Self {
            at: Instant::now(),
            st: rig.status()?,
            lo: lo_tx_bytes(&rig.ns)?,
            primary_cpu: thread_cpu(rig.primary.pid()),
            backup_cpu: cpu_total(&thread_cpu(rig.backup.pid())),
            machine_busy_ms: machine_busy_ms(),
        })
    }

    fn p(&self, k: &str) -> f64 {
        self.st["protection"][k].as_f64().unwrap_or(f64::NAN)
    }
}

/// What one protected window showed.
fn protected_window(a: &Snap, b: &Snap) -> Value {
    let secs = b.at.duration_since(a.at).as_secs_f64();
    let epochs = b.p("epochs") - a.p("epochs");
    let raw = b.p("bytes_sent") - a.p("bytes_sent");
    let lo = b.lo.saturating_sub(a.lo) as f64;
    json!({
        "secs": secs,
        "epochs": epochs,
        "epochs_per_s": epochs / secs,
        "epoch_ms_mean": b.p("epoch_ms_mean"),
        "pause_us_p50": b.p("pause_us_p50"),
        "pause_us_p99": b.p("pause_us_p99"),
        "dirty_pages_per_epoch_mean": b.p("dirty_pages_per_epoch_mean"),
        "dirty_pages_per_epoch_p99": b.p("dirty_pages_per_epoch_p99"),
        "ack_us_p50": b.p("ack_latency_us_p50"),
        "ack_us_p99": b.p("ack_latency_us_p99"),
        "replica_lag_epochs": b.p("replica_lag_epochs"),
        "status_wire_bytes_per_epoch_mean": b.p("wire_bytes_per_epoch_mean"),
        "status_bytes_sent_per_epoch": raw / epochs,
        "status_bytes_sent_mb_per_s": raw / secs / 1e6,
        "udp_lo_bytes_per_epoch": lo / epochs,
        "udp_lo_mb_per_s": lo / secs / 1e6,
        "cpu_ms_per_s": {
            "vcpu": cpu_ms_per_s(&a.primary_cpu, &b.primary_cpu, Some("vcpu"), secs),
            "engine": cpu_ms_per_s(&a.primary_cpu, &b.primary_cpu, Some("engine"), secs),
            "primary_io": cpu_ms_per_s(&a.primary_cpu, &b.primary_cpu, Some("io"), secs),
            "primary_total": cpu_ms_per_s(&a.primary_cpu, &b.primary_cpu, None, secs),
            "backup_total": b.backup_cpu.saturating_sub(a.backup_cpu) as f64 / 1e6 / secs,
            // Everything else the machine ran meanwhile (clients, this bench, other users).
            "rest_of_machine": (b.machine_busy_ms - a.machine_busy_ms) / secs
                - cpu_ms_per_s(&a.primary_cpu, &b.primary_cpu, None, secs)
                - b.backup_cpu.saturating_sub(a.backup_cpu) as f64 / 1e6 / secs,
        },
        "state": b.st["protection"]["state"],
    })
}

// ---------------------------------------------------------------------------------------
// Statistics

/// The epoch setting `adaptive`: the default policy (output-driven epochs).
const EPOCH_ADAPTIVE: u64 = 0;
/// The epoch setting `adaptive-silent`: the adaptive policy before output-driven epochs
/// (10..50 ms, output does not end epochs), for A/B.
const EPOCH_ADAPTIVE_SILENT: u64 = u64::MAX;

/// `BENCH_EPOCHS_MS` items: a fixed length in ms, `adaptive` or `adaptive-silent`.
fn parse_epoch(s: &str) -> Option<u64> {
    match s {
        "adaptive" => Some(EPOCH_ADAPTIVE),
        "adaptive-silent" => Some(EPOCH_ADAPTIVE_SILENT),
        n => n.parse().ok().filter(|n| *n > 0),
    }
}

fn epoch_args(e: u64) -> Vec<String> {
    let v: &[&str] = match e {
        EPOCH_ADAPTIVE => &["--epoch-ms", "0"],
        EPOCH_ADAPTIVE_SILENT => &["--epoch-ms", "0", "--epoch-min-ms", "10", "--output-coalesce-us", "0"],
        _ => return vec!["--epoch-ms".into(), e.to_string()],
    };
    v.iter().map(|s| s.to_string()).collect()
}

/// `BENCH_VARIANTS`: A/B in one run. `name=ARGS;name=ARGS`, ARGS being extra `protect`
/// arguments separated by spaces (e.g. `one=--pause-copy-threads 1;two=--pause-copy-threads 2`).
/// Each pause and kv point runs once per variant in every run (run-major, so drift spreads over
/// all). Default: one variant without extra arguments.
fn variants() -> &'static [(String, Vec<String>)] {
    static V: std::sync::OnceLock<Vec<(String, Vec<String>)>> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        let spec = std::env::var("BENCH_VARIANTS").unwrap_or_default();
        let v: Vec<(String, Vec<String>)> = spec
            .split(';')
            .filter(|x| !x.trim().is_empty())
            .map(|x| {
                let (name, args) = x.split_once('=').unwrap_or((x, ""));
                (name.trim().to_string(), args.split_whitespace().map(str::to_string).collect())
            })
            .collect();
        if v.is_empty() { vec![(String::new(), Vec::new())] } else { v }
    })
}

thread_local! {
    /// The variant the current run uses (an index into [`variants`]).
    static VARIANT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// ` [name]` when there are several variants.
fn variant_label(v: usize) -> String {
    if variants().len() > 1 { format!(" [{}]", variants()[v].0) } else { String::new() }
}

/// Every key with every variant.
fn with_variants<K: Clone>(keys: &[K]) -> Vec<(K, usize)> {
    keys.iter().flat_map(|k| (0..variants().len()).map(move |v| (k.clone(), v))).collect()
}

fn epoch_label(e: u64) -> String {
    match e {
        EPOCH_ADAPTIVE => "adaptive (output-driven)".into(),
        EPOCH_ADAPTIVE_SILENT => "adaptive 10-50 ms, output ignored".into(),
        _ => format!("{e} ms"),
    }
}

fn median(v: Vec<f64>) -> f64 {
    median_of(&v).unwrap_or(f64::NAN)
}

fn quantile(v: &[f64], p: f64) -> f64 {
    percentile(v, p).unwrap_or(f64::NAN)
}

/// Median over runs of the number at `path` (e.g. "protected/pause_us_p99").
fn med(runs: &[Value], path: &str) -> f64 {
    median(runs.iter().map(|r| at(r, path)).collect())
}

fn at(v: &Value, path: &str) -> f64 {
    let mut x = v;
    for k in path.split('/') {
        x = &x[k];
    }
    x.as_f64().unwrap_or(f64::NAN)
}

fn list(runs: &[Value], path: &str, digits: usize) -> String {
    runs.iter().map(|r| f(at(r, path), digits)).collect::<Vec<_>>().join(" ")
}

fn f(x: f64, digits: usize) -> String {
    if x.is_finite() { format!("{x:.digits$}") } else { "-".into() }
}

// ---------------------------------------------------------------------------------------
// Experiment 1: pause time vs dirty pages per epoch

struct PausePoint {
    label: &'static str,
    rate: u64,
    wss: u64,
    epoch_ms: u64,
}

const PAUSE_POINTS: &[PausePoint] = &[
    PausePoint { label: "~10 @10ms", rate: 1_000, wss: 16, epoch_ms: 10 },
    PausePoint { label: "~100 @10ms", rate: 10_000, wss: 16, epoch_ms: 10 },
    PausePoint { label: "~1,000 @10ms", rate: 100_000, wss: 16, epoch_ms: 10 },
    PausePoint { label: "~10,000 @10ms", rate: 1_000_000, wss: 48, epoch_ms: 10 },
    PausePoint { label: "~1,000 @50ms", rate: 20_000, wss: 16, epoch_ms: 50 },
    PausePoint { label: "~10,000 @250ms", rate: 40_000, wss: 48, epoch_ms: 250 },
];

fn pause_run(cfg: &Cfg, top: &Path, certs: &Path, p: &PausePoint, run: usize) -> Result<Value> {
    let cmdline = format!("workload=dirty wss={} rate={}", p.wss, p.rate);
    let tag = format!("pause-{}-{}-{run}-v{}", p.rate, p.epoch_ms, VARIANT.get());
    let mut rig = Rig::start(cfg, top, certs, &tag, &cmdline, false)?;
    let mut tail = SerialTail::new(rig.serial());
    nap(Duration::from_millis(1500));
    let unprot = dirty_window(&mut tail, Duration::from_secs(3))?;
    let sync = rig.protect(p.epoch_ms)?;
    nap(Duration::from_secs(1));
    // Long epochs need a longer window for a p99 worth the name.
    let window = cfg.window.max(Duration::from_millis(p.epoch_ms * 40));
    let a = Snap::take(&rig)?;
    let prot = dirty_window(&mut tail, window)?;
    let b = Snap::take(&rig)?;
    rig.healthy()?;
    ensure!(prot.errors == 0, "guest reported {} dirty errors", prot.errors);
    let mut w = protected_window(&a, &b);
    w["guest_pages_per_s"] = json!(prot.pages_per_s);
    Ok(json!({
        "point": p.label, "variant": variants()[VARIANT.get()].0, "rate": p.rate, "wss_mib": p.wss, "epoch_ms_set": p.epoch_ms,
        "sync_s": sync.as_secs_f64(),
        "unprotected_pages_per_s": unprot.pages_per_s,
        "protected": w,
    }))
}

fn pause_table(results: &[((usize, usize), Vec<Value>)]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| point (pages @ epoch) | rate pages/s | epochs/s | dirty pages/epoch | pause p50 µs | pause p99 µs | p99 per run | ack p50 / p99 ms | guest pages/s vs target | rest of machine, cores |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for ((i, v), runs) in results {
        let p = &PAUSE_POINTS[*i];
        let label = format!("{}{}", p.label, variant_label(*v));
        if runs.is_empty() {
            let _ = writeln!(s, "| {} | {} | all runs failed | | | | | | | |", label, p.rate);
            continue;
        }
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} / {} | {}% | {} |",
            label,
            p.rate,
            f(med(runs, "protected/epochs_per_s"), 1),
            f(med(runs, "protected/dirty_pages_per_epoch_mean"), 0),
            f(med(runs, "protected/pause_us_p50"), 0),
            f(med(runs, "protected/pause_us_p99"), 0),
            list(runs, "protected/pause_us_p99", 0),
            f(med(runs, "protected/ack_us_p50") / 1e3, 1),
            f(med(runs, "protected/ack_us_p99") / 1e3, 1),
            f(100.0 * median(runs.iter().map(|r| at(r, "protected/guest_pages_per_s") / at(r, "rate")).collect()), 0),
            f(med(runs, "protected/cpu_ms_per_s/rest_of_machine") / 1e3, 2),
        );
    }
    s
}

// ---------------------------------------------------------------------------------------
// Experiment 2: slowdown of the dirty guest

struct DirtyVariant {
    label: &'static str,
    cmdline: &'static str,
    /// Shortest measuring window: a CPU-bound guest prints its progress irregularly (it
    /// reports only between catch-up bursts), so it needs longer windows.
    min_window: Duration,
}

const DIRTY_VARIANTS: &[DirtyVariant] = &[
    DirtyVariant {
        label: "rate-limited: wss=16 rate=10000",
        cmdline: "workload=dirty wss=16 rate=10000",
        min_window: Duration::from_secs(3),
    },
    // ~7 M pages/s is what the guest manages on this machine: a higher rate keeps it CPU-bound
    // protected or not, so its throughput is its capacity.
    DirtyVariant {
        label: "CPU-bound: wss=1 rate=10000000",
        cmdline: "workload=dirty wss=1 rate=10000000",
        min_window: Duration::from_secs(8),
    },
];

fn dirty_run(cfg: &Cfg, top: &Path, certs: &Path, v: usize, epoch_ms: u64, run: usize) -> Result<Value> {
    let var = &DIRTY_VARIANTS[v];
    let tag = format!("dirty-{v}-{epoch_ms}-{run}-v{}", VARIANT.get());
    let mut rig = Rig::start(cfg, top, certs, &tag, var.cmdline, false)?;
    let mut tail = SerialTail::new(rig.serial());
    nap(Duration::from_millis(1500));
    let pid = rig.primary.pid();
    let window = cfg.window.max(var.min_window);
    let unprot_window = |tail: &mut SerialTail| -> Result<Value> {
        let c0 = thread_cpu(pid);
        let m0 = machine_busy_ms();
        let t0 = Instant::now();
        let th = dirty_window(tail, window)?;
        let secs = t0.elapsed().as_secs_f64();
        let c1 = thread_cpu(pid);
        let m1 = machine_busy_ms();
        Ok(json!({
            "pages_per_s": th.pages_per_s,
            "errors": th.errors,
            "vcpu_ms_per_s": cpu_ms_per_s(&c0, &c1, Some("vcpu"), secs),
            "primary_ms_per_s": cpu_ms_per_s(&c0, &c1, None, secs),
            "rest_of_machine_ms_per_s": (m1 - m0) / secs - cpu_ms_per_s(&c0, &c1, None, secs),
        }))
    };
    let u1 = unprot_window(&mut tail)?;
    let sync = rig.protect(epoch_ms)?;
    nap(Duration::from_secs(1));
    let a = Snap::take(&rig)?;
    let th = dirty_window(&mut tail, window)?;
    let b = Snap::take(&rig)?;
    rig.healthy()?;
    let mut w = protected_window(&a, &b);
    w["pages_per_s"] = json!(th.pages_per_s);
    w["errors"] = json!(th.errors);
    rig.unprotect()?;
    nap(Duration::from_secs(1));
    let u2 = unprot_window(&mut tail)?;
    rig.healthy()?;
    ensure!(th.errors == 0 && at(&u2, "errors") == 0.0, "guest reported dirty errors");
    let base = (at(&u1, "pages_per_s") + at(&u2, "pages_per_s")) / 2.0;
    let base_vcpu = (at(&u1, "vcpu_ms_per_s") + at(&u2, "vcpu_ms_per_s")) / 2.0;
    let prot = th.pages_per_s;
    let dirty_per_s = at(&w, "dirty_pages_per_epoch_mean") * at(&w, "epochs_per_s");
    let vcpu_prot = at(&w, "cpu_ms_per_s/vcpu");
    Ok(json!({
        "variant": var.label, "protect_variant": variants()[VARIANT.get()].0, "epoch_ms_set": epoch_ms, "sync_s": sync.as_secs_f64(),
        "unprotected": u1, "protected": w, "unprotected_after": u2,
        "slowdown_pct": 100.0 * (1.0 - prot / base),
        "dirty_pages_per_s": dirty_per_s,
        "floor_pct": 100.0 * dirty_per_s * WP_FAULT_US / 1e6,
        "pause_share_pct": 100.0 * at(&w, "epochs_per_s") * at(&w, "pause_us_p50") / 1e6,
        // Extra vCPU time per page written, and per newly dirtied page (vs the 4 µs floor).
        "vcpu_extra_ms_per_s": vcpu_prot - base_vcpu,
        "vcpu_extra_us_per_dirtied_page": (vcpu_prot - base_vcpu) * 1e3 / dirty_per_s,
        "vcpu_ns_per_page_unprotected": base_vcpu * 1e6 / base,
        "vcpu_ns_per_page_protected": vcpu_prot * 1e6 / prot,
        // Slowdown per second of vCPU time: what the guest loses to faults and pauses alone,
        // apart from getting less CPU (the replication threads compete for the two cores).
        "slowdown_per_vcpu_s_pct": 100.0 * (1.0 - (prot / vcpu_prot) / (base / base_vcpu)),
    }))
}

/// One point's runs: (epoch setting, `BENCH_VARIANTS` index) and every run's results.
type PointRuns = ((u64, usize), Vec<Value>);

fn dirty_table(v: usize, results: &[PointRuns]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}:\n", DIRTY_VARIANTS[v].label);
    let last = if v == 0 {
        "extra vCPU µs per dirtied page"
    } else {
        "slowdown per vCPU-second % | rest of machine, cores (prot)"
    };
    let _ = writeln!(
        s,
        "| epoch ms (set) | epochs/s | dirty pages/epoch | unprotected pages/s | protected pages/s | slowdown % (per run) | floor % (pages/s × 4 µs) | pause share % | vCPU ms/s unprot → prot | {last} |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|{}", if v == 0 { "" } else { "---|" });
    for ((e, pv), runs) in results {
        let label = format!("{}{}", epoch_label(*e), variant_label(*pv));
        if runs.is_empty() {
            let _ = writeln!(s, "| {} | all runs failed | | | | | | | | |", label);
            continue;
        }
        let base: Vec<f64> = runs
            .iter()
            .map(|r| (at(r, "unprotected/pages_per_s") + at(r, "unprotected_after/pages_per_s")) / 2.0)
            .collect();
        let base_vcpu: Vec<f64> = runs
            .iter()
            .map(|r| (at(r, "unprotected/vcpu_ms_per_s") + at(r, "unprotected_after/vcpu_ms_per_s")) / 2.0)
            .collect();
        let tail = if v == 0 {
            f(med(runs, "vcpu_extra_us_per_dirtied_page"), 2)
        } else {
            format!(
                "{} ({}) | {}",
                f(med(runs, "slowdown_per_vcpu_s_pct"), 1),
                list(runs, "slowdown_per_vcpu_s_pct", 1),
                f(med(runs, "protected/cpu_ms_per_s/rest_of_machine") / 1e3, 2)
            )
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | **{}** ({}) | {} | {} | {} → {} | {tail} |",
            label,
            f(med(runs, "protected/epochs_per_s"), 1),
            f(med(runs, "protected/dirty_pages_per_epoch_mean"), 0),
            f(median(base), 0),
            f(med(runs, "protected/pages_per_s"), 0),
            f(med(runs, "slowdown_pct"), 1),
            list(runs, "slowdown_pct", 1),
            f(med(runs, "floor_pct"), 1),
            f(med(runs, "pause_share_pct"), 1),
            f(median(base_vcpu), 0),
            f(med(runs, "protected/cpu_ms_per_s/vcpu"), 0),
        );
    }
    s
}

// ---------------------------------------------------------------------------------------
// Experiment 3: kv over a TAP

const SLAP_CONCURRENCY: u32 = 16;
/// Requests per connection and test (memcslap's `--execute-number`). 100 until session 17: 1,600
/// gets take ~60 ms unprotected, so a run's unprotected figure swung 16-32 k ops/s with the
/// threads' start-up and the ratio with it; 500 gives the unprotected side ~0.3 s and the
/// protected one ~1.5-2 s (`before`, at ~1 k ops/s, ~8 s).
const SLAP_PER_THREAD: u32 = 500;
const LAT_OPS_THINK: u32 = 150;
const LAT_OPS_BACK_TO_BACK: u32 = 100;
const LAT_THINK_MS: f64 = 40.0;

const LATENCY_SCRIPT: &str = r#"
import sys, time, random, json
from pymemcache.client.base import Client
host, n, think_ms = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
random.seed(7)
c = Client((host, 11211), connect_timeout=10, timeout=10, no_delay=True, default_noreply=False)
c.set("warm", b"x")
val = b"v" * 100
lat = []
for i in range(n):
    if think_ms > 0:
        time.sleep(random.uniform(0, think_ms / 1000.0))
    k = "lat%d" % (i // 2)
    t0 = time.perf_counter()
    if i % 2 == 0:
        ok = c.set(k, val)
        assert ok, ("set", k)
    else:
        r = c.get(k)
        assert r == val, ("get", k, r)
    lat.append((time.perf_counter() - t0) * 1e6)
c.close()
print(json.dumps(lat))
"#;

/// memcslap against the kv guest: ops/s of the timed phase.
fn slap(cfg: &Cfg, ns: &NetNs, test: &str) -> Result<f64> {
    let out = run_bounded(
        ns.command(&cfg.memcslap).args([
            &format!("--servers={KV_SUBNET}.2:11211"),
            &format!("--concurrency={SLAP_CONCURRENCY}"),
            &format!("--execute-number={SLAP_PER_THREAD}"),
            &format!("--test={test}"),
        ]),
        Duration::from_secs(180),
    )?;
    let t = format!("{}{}", text(&out.stdout), text(&out.stderr));
    ensure!(out.status.success(), "memcslap --test={test} failed: {t}");
    ensure!(!t.contains("rror") && !t.contains("ailure"), "memcslap --test={test} reported errors: {t}");
    // "Time to get   1600 keys by   16 threads:   0.403 seconds."
    let line = t
        .lines()
        .find(|l| l.contains(&format!("Time to {test}")) && l.contains("threads:"))
        .ok_or_else(|| anyhow!("no timing line in memcslap output: {t}"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let keys: f64 = words.get(3).and_then(|w| w.parse().ok()).context("keys")?;
    let secs: f64 = line
        .rsplit(':')
        .next()
        .and_then(|x| x.split_whitespace().next())
        .and_then(|x| x.parse().ok())
        .context("secs")?;
    Ok(keys / secs.max(1e-6))
}

/// Sequential set/get round trips; returns latencies in µs.
fn latency(cfg: &Cfg, ns: &NetNs, n: u32, think_ms: f64) -> Result<Vec<f64>> {
    let out = run_bounded(
        ns.command(&cfg.python).args([
            "-c",
            LATENCY_SCRIPT,
            &format!("{KV_SUBNET}.2"),
            &n.to_string(),
            &think_ms.to_string(),
        ]),
        Duration::from_secs(180),
    )?;
    ensure!(out.status.success(), "latency client failed: {}{}", text(&out.stdout), text(&out.stderr));
    let v: Vec<f64> = serde_json::from_slice(&out.stdout).context("latency client output")?;
    ensure!(v.len() == n as usize, "latency client returned {} samples", v.len());
    Ok(v)
}

fn kv_phase(cfg: &Cfg, ns: &NetNs, latency_too: bool) -> Result<Value> {
    let get = slap(cfg, ns, "get")?;
    let set = slap(cfg, ns, "set")?;
    let mut v = json!({ "get_ops_per_s": get, "set_ops_per_s": set });
    if latency_too {
        let lt = latency(cfg, ns, LAT_OPS_THINK, LAT_THINK_MS)?;
        let lb = latency(cfg, ns, LAT_OPS_BACK_TO_BACK, 0.0)?;
        // Every request's latency, for the report's CDF (protected vs unprotected).
        v["lat_us"] = json!(lt);
        v["lat_b2b_us"] = json!(lb);
        v["lat_us_p50"] = json!(quantile(&lt, 0.5));
        v["lat_us_p99"] = json!(quantile(&lt, 0.99));
        v["lat_b2b_us_p50"] = json!(quantile(&lb, 0.5));
        v["lat_b2b_us_p99"] = json!(quantile(&lb, 0.99));
    }
    Ok(v)
}

fn kv_run(cfg: &Cfg, top: &Path, certs: &Path, epoch_ms: u64, run: usize) -> Result<Value> {
    let tag = format!("kv-{epoch_ms}-{run}");
    let cmdline = format!("workload=kv ip={KV_SUBNET}.2/24");
    let mut rig = Rig::start(cfg, top, certs, &tag, &cmdline, true)?;
    let u1 = kv_phase(cfg, &rig.ns, true)?;
    let sync = rig.protect(epoch_ms)?;
    nap(Duration::from_millis(500));
    let a = Snap::take(&rig)?;
    let p = kv_phase(cfg, &rig.ns, true)?;
    let b = Snap::take(&rig)?;
    rig.healthy()?;
    let w = protected_window(&a, &b);
    rig.unprotect()?;
    nap(Duration::from_millis(500));
    let u2 = kv_phase(cfg, &rig.ns, false)?;
    rig.healthy()?;
    let base = |k: &str| (at(&u1, k) + at(&u2, k)) / 2.0;
    // Expected added latency for a request arriving at a random point of an epoch: it waits
    // for the rest of the epoch (half on average), the pause, then the checkpoint's ack.
    let model_ms = at(&w, "epoch_ms_mean") / 2.0 + at(&w, "pause_us_p50") / 1e3 + at(&w, "ack_us_p50") / 1e3;
    Ok(json!({
        "epoch_ms_set": epoch_ms, "protect_variant": variants()[VARIANT.get()].0, "sync_s": sync.as_secs_f64(),
        "unprotected": u1, "protected_ops": p, "unprotected_after": u2, "protected": w,
        "get_slowdown_pct": 100.0 * (1.0 - at(&p, "get_ops_per_s") / base("get_ops_per_s")),
        "set_slowdown_pct": 100.0 * (1.0 - at(&p, "set_ops_per_s") / base("set_ops_per_s")),
        "added_lat_ms_p50": (at(&p, "lat_us_p50") - at(&u1, "lat_us_p50")) / 1e3,
        "added_lat_ms_p99": (at(&p, "lat_us_p99") - at(&u1, "lat_us_p99")) / 1e3,
        "model_added_ms_p50": model_ms,
    }))
}

fn kv_table(results: &[PointRuns]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| epoch ms (set) | epochs/s | get ops/s unprot → prot | get slowdown % | set ops/s unprot → prot | set slowdown % | latency p50 ms unprot → prot | latency p99 ms unprot → prot | added p50 ms | model p50 ms (E/2 + pause + ack) | back-to-back p50 ms prot |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    for ((e, v), runs) in results {
        let label = format!("{}{}", epoch_label(*e), variant_label(*v));
        if runs.is_empty() {
            let _ = writeln!(s, "| {} | all runs failed | | | | | | | | | |", label);
            continue;
        }
        let base = |k: &str| {
            median(
                runs.iter()
                    .map(|r| (at(r, &format!("unprotected/{k}")) + at(r, &format!("unprotected_after/{k}"))) / 2.0)
                    .collect(),
            )
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} → {} | **{}** | {} → {} | **{}** | {} → {} | {} → {} | **{}** | {} | {} |",
            label,
            f(med(runs, "protected/epochs_per_s"), 1),
            f(base("get_ops_per_s"), 0),
            f(med(runs, "protected_ops/get_ops_per_s"), 0),
            f(med(runs, "get_slowdown_pct"), 1),
            f(base("set_ops_per_s"), 0),
            f(med(runs, "protected_ops/set_ops_per_s"), 0),
            f(med(runs, "set_slowdown_pct"), 1),
            f(med(runs, "unprotected/lat_us_p50") / 1e3, 2),
            f(med(runs, "protected_ops/lat_us_p50") / 1e3, 2),
            f(med(runs, "unprotected/lat_us_p99") / 1e3, 2),
            f(med(runs, "protected_ops/lat_us_p99") / 1e3, 2),
            f(med(runs, "added_lat_ms_p50"), 2),
            f(med(runs, "model_added_ms_p50"), 2),
            f(med(runs, "protected_ops/lat_b2b_us_p50") / 1e3, 2),
        );
    }
    s
}

// ---------------------------------------------------------------------------------------
// Experiment 4: bytes per epoch (from every protected window)

fn bytes_rows(s: &mut String, label: &str, runs: &[Value]) {
    if runs.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        f(med(runs, "protected/epochs_per_s"), 1),
        f(med(runs, "protected/dirty_pages_per_epoch_mean"), 0),
        f(med(runs, "protected/status_wire_bytes_per_epoch_mean") / 1e3, 1),
        f(med(runs, "protected/status_bytes_sent_per_epoch") / 1e3, 1),
        f(med(runs, "protected/udp_lo_bytes_per_epoch") / 1e3, 1),
        f(
            median(
                runs.iter()
                    .map(|r| at(r, "protected/udp_lo_bytes_per_epoch") / at(r, "protected/status_bytes_sent_per_epoch"))
                    .collect()
            ),
            2
        ),
        f(med(runs, "protected/udp_lo_mb_per_s"), 1),
        f(med(runs, "protected/cpu_ms_per_s/primary_total") - med(runs, "protected/cpu_ms_per_s/vcpu"), 0),
        f(med(runs, "protected/cpu_ms_per_s/backup_total"), 0),
    );
}

fn bytes_header(s: &mut String) {
    let _ = writeln!(
        s,
        "| workload, epoch | epochs/s | dirty pages/epoch | status `wire_bytes_per_epoch_mean` KB | Δ`bytes_sent`/Δepochs KB | UDP on lo KB/epoch | UDP ÷ `bytes_sent` | UDP MB/s | primary CPU ms/s (not vCPU) | backup CPU ms/s |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
}

// ---------------------------------------------------------------------------------------

fn build(cfg: &Cfg) -> Result<()> {
    if std::env::var_os("BENCH_NO_BUILD").is_some() {
        ensure!(cfg.bin.is_file(), "{} is missing (unset BENCH_NO_BUILD to build it)", cfg.bin.display());
        return Ok(());
    }
    let cargo = std::env::var_os("CARGO").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO")));
    eprintln!("bench: cargo build --release -p understudy");
    let out = run_bounded(
        Command::new(cargo).args(["build", "--release", "-p", "understudy"]).current_dir(&cfg.root),
        Duration::from_secs(1800),
    )?;
    ensure!(out.status.success(), "cargo build --release -p understudy failed:\n{}", text(&out.stderr));
    Ok(())
}

fn run_all<K: Clone>(
    what: &str,
    keys: &[K],
    runs: usize,
    mut one: impl FnMut(&K, usize) -> Result<Value>,
    failures: &mut Vec<String>,
    name: impl Fn(&K) -> String,
) -> Vec<(K, Vec<Value>)> {
    let mut out: Vec<(K, Vec<Value>)> = keys.iter().map(|k| (k.clone(), Vec::new())).collect();
    // Run-major order, so slow drift of the machine spreads over every point.
    for run in 0..runs {
        for (i, k) in keys.iter().enumerate() {
            let t0 = Instant::now();
            match one(k, run) {
                Ok(v) => {
                    eprintln!("bench: {what} {} run {run}: ok in {:.1} s", name(k), t0.elapsed().as_secs_f64());
                    out[i].1.push(v);
                }
                Err(e) => {
                    let msg = format!("{what} {} run {run}: {e:#}", name(k));
                    eprintln!("bench: FAILED {msg}");
                    failures.push(msg);
                }
            }
        }
    }
    out
}

fn main() -> Result<()> {
    install_signal_handlers();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?.to_path_buf();
    let max_s: u64 = env_or("BENCH_MAX_S", 3600);
    let _ = DEADLINE.set(Instant::now() + Duration::from_secs(max_s));
    let only = testbed::harness::results::bench_sections(
        &env_or("BENCH_ONLY", "pause,dirty,kv".to_string()),
        &["pause", "dirty", "kv"],
    )?;
    let epochs_ms: String = env_or("BENCH_EPOCHS_MS", "40,20,10,5".to_string());
    let cfg = Cfg {
        // UNDERSTUDY_BIN: another build (an A/B of two binaries, run by turns; as `testbed faults`).
        bin: std::env::var_os("UNDERSTUDY_BIN").map_or_else(|| root.join("target/release/understudy"), PathBuf::from),
        guest: root.join("target/guest/understudy-guest"),
        root: root.clone(),
        runs: env_or("BENCH_RUNS", 3usize).max(1),
        window: Duration::from_secs_f64(env_or("BENCH_WINDOW_S", 5.0f64).max(3.0)),
        only,
        epochs_ms: epochs_ms.split(',').filter_map(|s| parse_epoch(s.trim())).collect(),
        keep: std::env::var_os("BENCH_KEEP").is_some(),
        python: testbed::env::python_with_pymemcache().unwrap_or_else(|_| PathBuf::from("/usr/bin/python3")),
        memcslap: testbed::env::memcslap().unwrap_or_else(|_| PathBuf::from("memcslap")),
    };
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        eprintln!("\n*** SKIP: protect bench: /dev/kvm is not usable ({e}) ***\n");
        return Ok(());
    }
    if let Err(e) = netns(false) {
        eprintln!("\n*** SKIP: protect bench: cannot create a network namespace ({e:#}); needs root ***\n");
        return Ok(());
    }
    ensure!(cfg.guest.is_file(), "{} is missing: run `make guest` first", cfg.guest.display());
    build(&cfg)?;

    let top = TempDir::for_process("us-protect-bench", cfg.keep)?;
    let certs = top.join("certs");
    let out = run_bounded(
        Command::new(&cfg.bin).args([
            "certs",
            "--out",
            &certs.display().to_string(),
            "--host",
            "primary",
            "--host",
            "backup",
        ]),
        Duration::from_secs(30),
    )?;
    ensure!(out.status.success(), "certs: {}", text(&out.stderr));

    let started = Instant::now();
    let busy0 = machine_busy_ms();
    let own0 = own_cpu_ms();
    let bin_mtime = || {
        std::fs::metadata(&cfg.bin)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    let bin_before = bin_mtime();
    let load_before = loadavg();
    let cpu_before = all_process_cpu();
    let mut failures = Vec::new();
    let mut report = String::new();
    let mut raw = json!({});

    let _ = writeln!(
        report,
        "protection bench: {} runs per point, {:.0} s windows, epochs {:?} ms, guest memory {MEMORY}, 1 vCPU; load average before {load_before}",
        cfg.runs,
        cfg.window.as_secs_f64(),
        cfg.epochs_ms
    );

    let mut pause_results = Vec::new();
    if cfg.wants("pause") {
        let pick: String = env_or("BENCH_POINTS", String::new());
        let keys: Vec<usize> = if pick.is_empty() {
            (0..PAUSE_POINTS.len()).collect()
        } else {
            pick.split(',').filter_map(|x| x.trim().parse().ok()).filter(|i| *i < PAUSE_POINTS.len()).collect()
        };
        pause_results = run_all(
            "pause",
            &with_variants(&keys),
            cfg.runs,
            |(i, v), run| {
                VARIANT.set(*v);
                pause_run(&cfg, top.path(), &certs, &PAUSE_POINTS[*i], run)
            },
            &mut failures,
            |(i, v)| format!("{}{}", PAUSE_POINTS[*i].label, variant_label(*v)),
        );
        let _ = writeln!(report, "\n### 1. Pause time vs dirty pages per epoch (dirty guest)\n");
        report.push_str(&pause_table(&pause_results));
        raw["pause"] = json!(pause_results.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>());
    }

    let mut dirty_results: Vec<Vec<PointRuns>> = Vec::new();
    if cfg.wants("dirty") {
        let _ = writeln!(report, "\n### 2. Slowdown of the dirty guest, protected vs unprotected\n");
        for (v, var) in DIRTY_VARIANTS.iter().enumerate() {
            let r = run_all(
                "dirty",
                &with_variants(&cfg.epochs_ms),
                cfg.runs,
                |(e, pv), run| {
                    VARIANT.set(*pv);
                    dirty_run(&cfg, top.path(), &certs, v, *e, run)
                },
                &mut failures,
                |(e, pv)| format!("{} epoch {}{}", var.label, epoch_label(*e), variant_label(*pv)),
            );
            report.push_str(&dirty_table(v, &r));
            report.push('\n');
            dirty_results.push(r);
        }
        raw["dirty"] = json!(
            dirty_results.iter().map(|v| v.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>()).collect::<Vec<_>>()
        );
    }

    let mut kv_results = Vec::new();
    if cfg.wants("kv") {
        kv_results = run_all(
            "kv",
            &with_variants(&cfg.epochs_ms),
            cfg.runs,
            |(e, v), run| {
                VARIANT.set(*v);
                kv_run(&cfg, top.path(), &certs, *e, run)
            },
            &mut failures,
            |(e, v)| format!("epoch {}{}", epoch_label(*e), variant_label(*v)),
        );
        let _ = writeln!(
            report,
            "\n### 3. kv guest over a TAP: memcslap ({SLAP_CONCURRENCY} threads × {SLAP_PER_THREAD} ops) and sequential latency ({LAT_OPS_THINK} set/get with 0-{LAT_THINK_MS:.0} ms random think time; back-to-back: {LAT_OPS_BACK_TO_BACK})\n"
        );
        report.push_str(&kv_table(&kv_results));
        raw["kv"] = json!(kv_results.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>());
    }

    let _ = writeln!(report, "\n### 4. Bytes per epoch (protected windows above)\n");
    bytes_header(&mut report);
    for ((i, v), runs) in &pause_results {
        bytes_rows(
            &mut report,
            &format!("dirty rate={} @{} ms{}", PAUSE_POINTS[*i].rate, PAUSE_POINTS[*i].epoch_ms, variant_label(*v)),
            runs,
        );
    }
    for (v, res) in dirty_results.iter().enumerate() {
        for ((e, pv), runs) in res {
            let short = if v == 0 { "dirty rate=10000" } else { "dirty wss=1 CPU-bound" };
            bytes_rows(&mut report, &format!("{short} @{}{}", epoch_label(*e), variant_label(*pv)), runs);
        }
    }
    for ((e, v), runs) in &kv_results {
        bytes_rows(&mut report, &format!("kv memcslap+latency @{}{}", epoch_label(*e), variant_label(*v)), runs);
    }

    // What else ran: CPU of every process that lived through the whole bench.
    let secs = started.elapsed().as_secs_f64();
    let cpu_after = all_process_cpu();
    let me = std::process::id();
    let mut others: Vec<(f64, String)> = cpu_after
        .iter()
        .filter(|(pid, _)| **pid != me)
        .filter_map(|(pid, (comm, c1))| cpu_before.get(pid).map(|(_, c0)| (c1 - c0, format!("{comm} (pid {pid})"))))
        .filter(|(d, _)| *d > 0.01 * secs)
        .collect();
    others.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
    let _ = writeln!(
        report,
        "\nmachine: {} cores; bench took {:.0} s; load average before {load_before}, after {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        secs,
        loadavg()
    );
    let others_cores = ((machine_busy_ms() - busy0) - (own_cpu_ms() - own0)) / 1e3 / secs;
    let _ = writeln!(
        report,
        "CPU used by processes other than this bench and its children (other users of the machine): {:.2} cores on average",
        others_cores
    );
    if bin_mtime() != bin_before {
        let _ = writeln!(
            report,
            "WARNING: {} was rebuilt while the bench ran (mtime {bin_before} -> {}): later runs used another binary",
            cfg.bin.display(),
            bin_mtime()
        );
    }
    if others.is_empty() {
        let _ = writeln!(report, "other processes alive for the whole bench used < 1% of a core each");
    } else {
        let list: Vec<String> =
            others.iter().take(8).map(|(d, n)| format!("{n}: {:.0}% of a core", 100.0 * d / secs)).collect();
        let _ = writeln!(report, "other processes alive for the whole bench: {}", list.join(", "));
    }
    if !failures.is_empty() {
        let _ = writeln!(report, "\nFAILED runs ({}):", failures.len());
        for fl in &failures {
            let _ = writeln!(report, "- {}", fl.replace('\n', "\n  "));
        }
    }

    let ts = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    raw["failures"] = json!(failures);
    raw["report"] = json!(report);
    raw["settings"] = json!({
        "runs": cfg.runs, "window_s": cfg.window.as_secs_f64(), "only": cfg.only,
        "epochs": cfg.epochs_ms.iter().map(|e| epoch_label(*e)).collect::<Vec<_>>(), "memory": MEMORY,
    });
    raw["machine"] = json!({
        "secs": secs,
        "others_cores": others_cores,
        "others": others.iter().take(8).map(|(d, n)| json!({ "process": n, "cores": d / secs })).collect::<Vec<_>>(),
        "binary_rebuilt_during_run": bin_mtime() != bin_before,
    });
    println!("{report}");
    if testbed::harness::results::bench_json_path().is_some() {
        testbed::harness::results::write_bench_json("protect", &load_before, raw)?;
    } else {
        let outdir = root.join("target/bench");
        let _ = std::fs::create_dir_all(&outdir);
        let jpath = outdir.join(format!("protect-{ts}.json"));
        let _ = std::fs::write(&jpath, serde_json::to_string_pretty(&raw)?);
        eprintln!("bench: raw results in {}", jpath.display());
    }
    Ok(())
}
