//! `testbed faults`: the fault-injection harness (issue 5).
//!
//! Every run builds its own topology of network namespaces (all named `usf<pid>r<run><role>`,
//! deleted on every path):
//!
//! ```text
//!   ns c (client 10.77.0.1) --veth--+                              guest LAN (10.77.0.0/24)
//!   ns p: tap0 + br0 --------veth---+-- br-lan  (ns sw)  --+-- veth-- ns b: tap0 + br0
//!   ns p: ctl 10.78.0.1 -----veth---+-- br-ctl  (ns sw)  --+-- veth-- ns b: ctl 10.78.0.2
//!                                        +-- veth -- ns w: ctl 10.78.0.3 (witness)
//! ```
//!
//! The primary (`understudy run`) lives in `p` with its guest on `p`'s tap0, the backup in `b`
//! (it opens `b`'s tap0 when promoted), the witness in `w`, the checker client
//! (`scripts/faults_client.py`) in `c`. Replication (QUIC) and arbitration (raft over UDP) use
//! the control network; `p`'s `ctl` link is the one cut (`ip link set down`) or degraded
//! (`tc netem`) for the partition and netem points. Guest MACs move between the two hosts' LAN
//! ports when the promoted copy announces itself, as on a real switch.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

/// A fault the harness injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Point {
    /// `kill -9` of the primary at a random moment.
    Kill,
    /// `UNDERSTUDY_FAILPOINTS=primary.paused@K` on the primary.
    Paused,
    /// `primary.harvest@K`.
    Harvest,
    /// `primary.shipped@K`.
    Shipped,
    /// `primary.acked@K`.
    Acked,
    /// `backup.committed@K` on the BACKUP: the primary must run degraded.
    BackupCommitted,
    /// `kill -9` of the witness: nothing may change for the client.
    Witness,
    /// The primary's control link goes down (cut from backup and witness), heals later.
    Partition,
    /// Loss, delay, duplication and corruption on the primary's control link.
    Netem,
}

impl Point {
    /// All points, in report order.
    pub const ALL: [Point; 9] = [
        Point::Kill,
        Point::Paused,
        Point::Harvest,
        Point::Shipped,
        Point::Acked,
        Point::BackupCommitted,
        Point::Witness,
        Point::Partition,
        Point::Netem,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Point::Kill => "kill",
            Point::Paused => "primary.paused",
            Point::Harvest => "primary.harvest",
            Point::Shipped => "primary.shipped",
            Point::Acked => "primary.acked",
            Point::BackupCommitted => "backup.committed",
            Point::Witness => "witness",
            Point::Partition => "partition",
            Point::Netem => "netem",
        }
    }

    /// Parses a name (as [`Point::name`]).
    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s.trim())
            .ok_or_else(|| anyhow!("unknown fault point {s:?}; known: {}", Self::ALL.map(|p| p.name()).join(",")))
    }

    fn failpoint(self) -> bool {
        matches!(self, Point::Paused | Point::Harvest | Point::Shipped | Point::Acked | Point::BackupCommitted)
    }

    /// Whether the backup must take over.
    fn expects_promotion(self) -> bool {
        matches!(self, Point::Kill | Point::Paused | Point::Harvest | Point::Shipped | Point::Acked | Point::Partition)
    }
}

/// What `testbed faults` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    pub runs: usize,
    pub points: Vec<Point>,
    pub out: Option<PathBuf>,
    /// Copy every run's logs here (`<dir>/<point>-<run>/`).
    pub logs: Option<PathBuf>,
    pub run_timeout: Duration,
    pub total_timeout: Duration,
    pub seed: u64,
    pub understudy: PathBuf,
    pub guest: PathBuf,
    pub client: PathBuf,
}

impl Options {
    /// Defaults: binaries of this workspace, 45 s per run.
    pub fn new(runs: usize, points: Vec<Point>) -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf();
        let env_or = |k: &str, d: PathBuf| std::env::var_os(k).map(PathBuf::from).unwrap_or(d);
        Self {
            runs,
            points,
            out: None,
            logs: None,
            run_timeout: Duration::from_secs(45),
            total_timeout: Duration::from_secs(3600),
            seed: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1) | 1,
            understudy: env_or("UNDERSTUDY_BIN", root.join("target/release/understudy")),
            guest: env_or("UNDERSTUDY_GUEST", root.join("target/guest/understudy-guest")),
            client: root.join("testbed/scripts/faults_client.py"),
        }
    }
}

/// One run's result.
#[derive(Clone, Debug, Default)]
pub struct RunReport {
    pub point: String,
    pub run: usize,
    /// `pass`, `fail`, or `invalid` (the fault fired before protection was established).
    pub outcome: String,
    pub problems: Vec<String>,
    pub failpoint: Option<String>,
    pub promoted: bool,
    pub fenced: bool,
    pub degraded: bool,
    /// Fault -> first client reply completed after it.
    pub failover_ms: Option<f64>,
    /// Fault -> backup logs "primary lost".
    pub detect_ms: Option<f64>,
    /// "primary lost" -> "arbitration: granted".
    pub grant_ms: Option<f64>,
    /// From the backup's PROMOTED line.
    pub promote_ms: Option<f64>,
    pub take_ms: Option<f64>,
    pub restore_ms: Option<f64>,
    pub announce_ms: Option<f64>,
    /// Primary's "lease lost" logged before the backup's grant (partition: only one releasing).
    pub lease_lost_before_grant: Option<bool>,
    pub acked_writes: u64,
    pub lost_writes: u64,
    pub contradictions: u64,
    pub errors: u64,
    pub reconnects: u64,
    pub max_gap_ms: Option<f64>,
    pub client_notes: Vec<String>,
    pub elapsed_s: f64,
}

impl RunReport {
    fn to_json(&self) -> Value {
        json!({
            "point": self.point, "run": self.run, "outcome": self.outcome, "problems": self.problems,
            "failpoint": self.failpoint, "promoted": self.promoted, "fenced": self.fenced,
            "degraded": self.degraded, "failover_ms": self.failover_ms, "detect_ms": self.detect_ms,
            "grant_ms": self.grant_ms, "promote_ms": self.promote_ms, "take_ms": self.take_ms,
            "restore_ms": self.restore_ms, "announce_ms": self.announce_ms,
            "lease_lost_before_grant": self.lease_lost_before_grant,
            "acked_writes": self.acked_writes, "lost_writes": self.lost_writes,
            "contradictions": self.contradictions, "errors": self.errors, "reconnects": self.reconnects,
            "max_gap_ms": self.max_gap_ms, "client_notes": self.client_notes, "elapsed_s": self.elapsed_s,
        })
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT/SIGTERM stop the harness at its next poll (so every guard cleans up).
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) { bail!("interrupted") } else { Ok(()) }
}

fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(10).min(end.saturating_duration_since(Instant::now())));
    }
    Ok(())
}

fn wall() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// A small xorshift generator (no dependency; the seed is in the report).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).stdin(Stdio::null()).output().context(args[0].to_string())?;
    if !out.status.success() {
        bail!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Deletes namespaces left by harness processes that no longer exist (a SIGKILLed harness).
pub fn clean_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("usf") else { continue };
        let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sh(&["ip", "netns", "del", name]);
        }
    }
}

/// The namespaces of one run; deleted on drop.
struct Topology {
    prefix: String,
    made: Vec<String>,
}

const ROLES: [&str; 5] = ["sw", "p", "b", "w", "c"];

impl Topology {
    fn ns(&self, role: &str) -> String {
        format!("{}{role}", self.prefix)
    }

    fn create(run: usize) -> Result<Self> {
        let mut t = Topology { prefix: format!("usf{}r{run}", std::process::id()), made: Vec::new() };
        for role in ROLES {
            let ns = t.ns(role);
            let _ = sh(&["ip", "netns", "del", &ns]);
            sh(&["ip", "netns", "add", &ns])?;
            t.made.push(ns.clone());
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        let sw = t.ns("sw");
        for br in ["br-lan", "br-ctl"] {
            sh(&["ip", "-n", &sw, "link", "add", br, "type", "bridge", "forward_delay", "0"])?;
            sh(&["ip", "-n", &sw, "link", "set", br, "up"])?;
        }
        let veth = |sw_end: &str, bridge: &str, ns: &str, end: &str| -> Result<()> {
            sh(&["ip", "-n", &sw, "link", "add", sw_end, "type", "veth", "peer", "name", end, "netns", ns])?;
            sh(&["ip", "-n", &sw, "link", "set", sw_end, "master", bridge, "up"])?;
            Ok(())
        };
        for (host, ip) in [("p", "10.78.0.1/24"), ("b", "10.78.0.2/24")] {
            let ns = t.ns(host);
            sh(&["ip", "-n", &ns, "tuntap", "add", "dev", "tap0", "mode", "tap"])?;
            sh(&["ip", "-n", &ns, "link", "add", "br0", "type", "bridge", "forward_delay", "0"])?;
            veth(&format!("l-{host}"), "br-lan", &ns, "lan")?;
            for dev in ["tap0", "lan"] {
                sh(&["ip", "-n", &ns, "link", "set", dev, "master", "br0", "up"])?;
            }
            sh(&["ip", "-n", &ns, "link", "set", "br0", "up"])?;
            veth(&format!("c-{host}"), "br-ctl", &ns, "ctl")?;
            sh(&["ip", "-n", &ns, "addr", "add", ip, "dev", "ctl"])?;
            sh(&["ip", "-n", &ns, "link", "set", "ctl", "up"])?;
        }
        let w = t.ns("w");
        veth("c-w", "br-ctl", &w, "ctl")?;
        sh(&["ip", "-n", &w, "addr", "add", "10.78.0.3/24", "dev", "ctl"])?;
        sh(&["ip", "-n", &w, "link", "set", "ctl", "up"])?;
        let c = t.ns("c");
        veth("l-c", "br-lan", &c, "eth0")?;
        sh(&["ip", "-n", &c, "addr", "add", "10.77.0.1/24", "dev", "eth0"])?;
        sh(&["ip", "-n", &c, "link", "set", "eth0", "up"])?;
        // A LAN client: let TCP retransmit after 10 ms (as demo.sh), so failover, not Linux's
        // 200 ms minimum RTO, dominates the pause the client sees.
        sh(&[
            "ip",
            "-n",
            &c,
            "route",
            "replace",
            "10.77.0.0/24",
            "dev",
            "eth0",
            "proto",
            "kernel",
            "scope",
            "link",
            "src",
            "10.77.0.1",
            "rto_min",
            "10ms",
        ])?;
        Ok(t)
    }

    /// Cuts (or heals) the primary's control link, both ends.
    fn cut_primary(&self, down: bool) -> Result<()> {
        let state = if down { "down" } else { "up" };
        sh(&["ip", "-n", &self.ns("p"), "link", "set", "ctl", state])?;
        sh(&["ip", "-n", &self.ns("sw"), "link", "set", "c-p", state])
    }

    /// netem on both directions of the primary's control link (None removes it).
    fn netem_primary(&self, spec: Option<&str>) -> Result<()> {
        for (ns, dev) in [(self.ns("p"), "ctl"), (self.ns("sw"), "c-p")] {
            match spec {
                Some(s) => {
                    let mut args = vec!["ip", "netns", "exec", &ns, "tc", "qdisc", "replace", "dev", dev, "root"];
                    args.extend(s.split_whitespace());
                    sh(&args)?;
                }
                None => sh(&["ip", "netns", "exec", &ns, "tc", "qdisc", "del", "dev", dev, "root"])?,
            }
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.made.drain(..).rev() {
            let _ = sh(&["ip", "netns", "del", &ns]);
        }
    }
}

/// Child processes of one run: SIGKILLed on drop (and, through PDEATHSIG, when the harness dies).
struct Procs {
    list: Vec<(String, Child)>,
}

impl Procs {
    fn spawn(
        &mut self,
        name: &str,
        ns: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
        log: &Path,
    ) -> Result<u32> {
        let stderr = fs::File::create(log)?;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program).args(args);
        c.env("UNDERSTUDY_LOG", "info").env("NO_COLOR", "1");
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdin(Stdio::null()).stdout(if name == "client" { Stdio::piped() } else { Stdio::null() }).stderr(stderr);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = c.spawn().with_context(|| format!("spawn {name}"))?;
        let pid = child.id();
        self.list.push((name.to_string(), child));
        Ok(pid)
    }

    fn get(&mut self, name: &str) -> &mut Child {
        &mut self.list.iter_mut().find(|(n, _)| n == name).expect("known process").1
    }

    fn exited(&mut self, name: &str) -> bool {
        matches!(self.get(name).try_wait(), Ok(Some(_)))
    }

    fn kill(&mut self, name: &str) {
        let c = self.get(name);
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.list {
            let _ = c.kill();
        }
        for (_, c) in &mut self.list {
            let _ = c.wait();
        }
    }
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\x1b' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn read(p: &Path) -> String {
    strip_ansi(&String::from_utf8_lossy(&fs::read(p).unwrap_or_default()))
}

/// Unix seconds of a tracing line's leading RFC 3339 UTC timestamp.
fn line_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?;
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, dd) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (hh, mm) = (t.next()?.parse::<f64>().ok()?, t.next()?.parse::<f64>().ok()?);
    let ss = t.next()?.parse::<f64>().ok()?;
    // days from civil (Howard Hinnant)
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days as f64 * 86400.0 + hh * 3600.0 + mm * 60.0 + ss)
}

fn first_time(log: &str, needle: &str) -> Option<f64> {
    log.lines().find(|l| l.contains(needle)).and_then(line_time)
}

fn field(line: &str, name: &str) -> Option<f64> {
    let i = line.find(&format!("{name}="))?;
    line[i + name.len() + 1..].split(|c: char| c.is_whitespace() || c == ',').next()?.parse().ok()
}

/// Thread stacks of a live process (gdb, when installed), for hang reports.
fn dump_stacks(pid: u32, to: &Path) {
    let Ok(f) = fs::File::create(to) else { return };
    let child = Command::new("timeout")
        .args(["30", "gdb", "-p", &pid.to_string(), "-batch", "-ex", "thread apply all bt"])
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(Stdio::null())
        .status();
    let _ = child;
}

/// `understudy status --json`, bounded to 3 s (a hung API must not hang the harness).
fn status(bin: &Path, sock: &Path) -> Option<Value> {
    let mut c = Command::new(bin)
        .args(["status", "--json", "--api"])
        .arg(sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let t0 = Instant::now();
    while c.try_wait().ok()?.is_none() {
        if t0.elapsed() > Duration::from_secs(3) {
            let _ = c.kill();
            let _ = c.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = c.wait_with_output().ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// Polls `f` every 10 ms until it returns Some, the deadline passes (None) or the run is interrupted.
fn wait_until<T>(deadline: Instant, mut f: impl FnMut() -> Option<T>) -> Result<Option<T>> {
    loop {
        check_interrupted()?;
        if let Some(v) = f() {
            return Ok(Some(v));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

const LAN_GUEST: &str = "10.77.0.2";

fn s(x: impl AsRef<std::ffi::OsStr>) -> String {
    x.as_ref().to_string_lossy().into_owned()
}

/// Runs one fault once.
fn run_one(opts: &Options, point: Point, run: usize, rng: &mut Rng) -> Result<RunReport> {
    let t_start = Instant::now();
    let deadline = t_start + opts.run_timeout;
    let mut rep = RunReport { point: point.name().into(), run, ..Default::default() };
    let dir = TempDir(std::env::temp_dir().join(format!("usf-{}-{run}-{}", std::process::id(), point.name())));
    let _ = fs::remove_dir_all(&dir.0);
    fs::create_dir_all(dir.0.join("ctl"))?;
    let d = |f: &str| dir.0.join(f);
    let result = (|| -> Result<()> {
        let topo = Topology::create(run).context("create the topology")?;
        let mut procs = Procs { list: Vec::new() };
        let b = &opts.understudy;
        sh(&[&s(b), "certs", "--out", &s(d("certs")), "--host", "primary", "--host", "backup"])?;
        let failpoint = if point.failpoint() {
            // Epochs run at ~20-100/s; sync and the client's start take ~2-4 s. Pick K so the
            // point fires a few seconds into protected operation.
            let k = match point {
                Point::BackupCommitted => rng.range(150, 400),
                _ => rng.range(250, 500),
            };
            Some(format!("{}@{k}", point.name()))
        } else {
            None
        };
        rep.failpoint = failpoint.clone();
        let fp_env = |who: &str| -> Vec<(&str, String)> {
            match &failpoint {
                Some(f) if f.starts_with(who) => vec![("UNDERSTUDY_FAILPOINTS", f.clone())],
                _ => Vec::new(),
            }
        };
        let args = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        procs.spawn(
            "witness",
            &topo.ns("w"),
            b,
            &args(&[
                "witness",
                "--data",
                &s(d("raft3")),
                "--listen",
                "10.78.0.3:7503",
                "--peer",
                "1=10.78.0.1:7501",
                "--peer",
                "2=10.78.0.2:7502",
            ]),
            &[],
            &d("witness.log"),
        )?;
        procs.spawn(
            "backup",
            &topo.ns("b"),
            b,
            &args(&[
                "backup",
                "--listen",
                "10.78.0.2:7400",
                "--certs",
                &s(d("certs")),
                "--memory",
                "64M",
                "--api",
                &s(d("b.sock")),
                "--tap",
                "tap0",
                "--serial",
                &s(d("b-serial.log")),
                "--detect-ms",
                "150",
                "--heartbeat-ms",
                "10",
                "--arbiter-id",
                "2",
                "--arbiter-listen",
                "10.78.0.2:7502",
                "--arbiter-peer",
                "1=10.78.0.1:7501",
                "--arbiter-peer",
                "3=10.78.0.3:7503",
                "--arbiter-data",
                &s(d("raft2")),
            ]),
            &fp_env("backup"),
            &d("backup.log"),
        )?;
        procs.spawn(
            "primary",
            &topo.ns("p"),
            b,
            &args(&[
                "run",
                "--kernel",
                &s(&opts.guest),
                "--cmdline",
                &format!("workload=kv ip={LAN_GUEST}/24"),
                "--memory",
                "64M",
                "--tap",
                "tap0",
                "--serial",
                &s(d("p-serial.log")),
                "--api",
                &s(d("p.sock")),
                "--arbiter-id",
                "1",
                "--arbiter-listen",
                "10.78.0.1:7501",
                "--arbiter-peer",
                "2=10.78.0.2:7502",
                "--arbiter-peer",
                "3=10.78.0.3:7503",
                "--arbiter-data",
                &s(d("raft1")),
            ]),
            &fp_env("primary"),
            &d("primary.log"),
        )?;
        let booted = wait_until(deadline.min(Instant::now() + Duration::from_secs(20)), || {
            (d("p.sock").exists() && read(&d("p-serial.log")).lines().any(|l| l.trim() == "ready")).then_some(())
        })?;
        if booted.is_none() {
            bail!("the guest did not boot in 20 s");
        }
        sh(&[
            &s(b),
            "protect",
            "--api",
            &s(d("p.sock")),
            "--backup",
            "10.78.0.2:7400",
            "--certs",
            &s(d("certs")),
            "--backup-node",
            "2",
            "--detect-ms",
            "150",
            "--heartbeat-ms",
            "10",
        ])?;
        let protected = wait_until(deadline.min(Instant::now() + Duration::from_secs(20)), || {
            if procs.exited("primary") || procs.exited("backup") {
                return Some(false);
            }
            let st = status(b, &d("p.sock"))?;
            (st["protection"]["state"] == "protected"
                && read(&d("primary.log")).contains("asked the group to record the backup"))
            .then_some(true)
        })?;
        match protected {
            Some(true) => {}
            Some(false) if failpoint.is_some() => {
                rep.outcome = "invalid".into();
                bail!("the fault point fired before protection was established (K too small)");
            }
            _ => bail!("protection was not established in 20 s"),
        }
        let t_protected = Instant::now();
        // Let the group commit SetBackup before anything is cut.
        sleep(Duration::from_millis(300))?;
        procs.spawn(
            "client",
            &topo.ns("c"),
            Path::new("/usr/bin/python3"),
            &[s(&opts.client), LAN_GUEST.into(), s(d("ctl")), "40".into()],
            &[],
            &d("client.log"),
        )?;
        // Inject.
        let fault_wall;
        match point {
            Point::Kill | Point::Witness | Point::Partition => {
                sleep(Duration::from_millis(rng.range(1000, 2500)))?;
                fault_wall = wall();
                match point {
                    Point::Kill => procs.kill("primary"),
                    Point::Witness => procs.kill("witness"),
                    _ => topo.cut_primary(true)?,
                }
                fs::write(d("ctl/fault"), format!("{fault_wall:.6}"))?;
            }
            Point::Netem => {
                sleep(Duration::from_millis(1000))?;
                fault_wall = wall();
                topo.netem_primary(Some(degradation()))?;
                fs::write(d("ctl/fault"), format!("{fault_wall:.6}"))?;
                sleep(Duration::from_secs(4))?;
                topo.netem_primary(None)?;
            }
            _ => {
                let who = if point == Point::BackupCommitted { "backup" } else { "primary" };
                let fired = wait_until(deadline, || procs.exited(who).then(wall))?;
                fault_wall = fired.ok_or_else(|| anyhow!("the fault point never fired"))?;
                fs::write(d("ctl/fault"), format!("{fault_wall:.6}"))?;
                if t_protected.elapsed() < Duration::from_millis(500) {
                    rep.problems.push("the fault fired before the client started (K too small)".into());
                }
            }
        }
        // Settle.
        if point.expects_promotion() {
            let promoted = wait_until(deadline.min(Instant::now() + Duration::from_secs(10)), || {
                read(&d("backup.log")).contains("PROMOTED").then_some(())
            })?;
            if promoted.is_some() {
                sleep(Duration::from_millis(1500))?;
            }
            if point == Point::Partition {
                topo.cut_primary(false)?;
                let _ = wait_until(deadline.min(Instant::now() + Duration::from_secs(10)), || {
                    procs.exited("primary").then_some(())
                })?;
                rep.fenced = read(&d("primary.log")).contains("FENCED");
            }
            sleep(Duration::from_millis(500))?;
        } else {
            sleep(Duration::from_secs(2))?;
            if let Some(st) = status(b, &d("p.sock")) {
                let state = st["protection"]["state"].as_str().unwrap_or("?").to_string();
                rep.degraded = state == "degraded";
                let want = if point == Point::BackupCommitted { "degraded" } else { "protected" };
                if state != want {
                    rep.problems.push(format!("primary protection is {state}, expected {want}"));
                }
            } else {
                rep.problems.push("primary status unavailable after the fault".into());
                if !procs.exited("primary") {
                    let pid = procs.get("primary").id();
                    dump_stacks(pid, &d("primary-stacks.txt"));
                }
            }
        }
        fs::write(d("ctl/stop"), "")?;
        let client_done = wait_until(deadline, || procs.exited("client").then_some(()))?;
        let out = {
            let c = procs.get("client");
            if client_done.is_none() {
                let _ = c.kill();
            }
            let mut buf = String::new();
            if let Some(mut so) = c.stdout.take() {
                use std::io::Read;
                let _ = so.read_to_string(&mut buf);
            }
            buf
        };
        fs::write(d("client.out"), &out)?;
        let v: Value = out
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .ok_or_else(|| anyhow!("the client gave no verdict (timed out?): {}", read(&d("client.log"))))?;
        let u = |k: &str| v[k].as_u64().unwrap_or(0);
        rep.acked_writes = u("acknowledged_writes");
        rep.lost_writes = u("lost");
        rep.contradictions = u("contradictions");
        rep.errors = u("errors");
        rep.reconnects = u("reconnects");
        rep.failover_ms = v["first_reply_after_fault_ms"].as_f64();
        rep.max_gap_ms = v["max_gap_ms"].as_f64();
        rep.client_notes =
            v["notes"].as_array().map(|a| a.iter().map(|x| s(x.as_str().unwrap_or(""))).collect()).unwrap_or_default();

        // The logs' account.
        let blog = read(&d("backup.log"));
        let plog = read(&d("primary.log"));
        rep.promoted = blog.contains("PROMOTED");
        if rep.promoted {
            let bst = status(b, &d("b.sock"));
            if bst.as_ref().map(|s| s["origin"]["kind"] != "promoted").unwrap_or(true) {
                rep.problems.push("backup logged PROMOTED but its status does not say promoted".into());
            }
        }
        let t_lost = first_time(&blog, "primary lost");
        let t_grant = first_time(&blog, "arbitration: granted");
        rep.detect_ms = t_lost.map(|t| (t - fault_wall) * 1e3);
        rep.grant_ms = t_lost.zip(t_grant).map(|(a, g)| (g - a) * 1e3);
        if let Some(line) = blog.lines().find(|l| l.contains("PROMOTED")) {
            rep.promote_ms = field(line, "promote_ms");
            rep.take_ms = field(line, "take_ms");
            rep.restore_ms = field(line, "restore_ms");
            rep.announce_ms = field(line, "announce_ms");
        }
        if let Some(g) = t_grant {
            let lease_lost = plog.lines().filter(|l| l.contains("lease lost")).filter_map(line_time).next_back();
            rep.lease_lost_before_grant = Some(lease_lost.map(|l| l < g).unwrap_or(false));
        }
        rep.fenced |= plog.contains("FENCED");
        if plog.contains("the group agreed the primary runs degraded") {
            rep.degraded = true;
        }

        // Verdict.
        if rep.lost_writes > 0 {
            rep.problems.push(format!("{} acknowledged writes lost", rep.lost_writes));
        }
        if rep.contradictions > 0 {
            rep.problems.push(format!("{} contradicted replies", rep.contradictions));
        }
        if rep.errors > rep.reconnects {
            rep.problems.push(format!("{} unexpected replies", rep.errors - rep.reconnects));
        }
        if point.expects_promotion() {
            if !rep.promoted {
                rep.problems.push("the backup was not promoted".into());
            } else if !blog.contains("arbitration: granted") {
                rep.problems.push("promoted without a grant".into());
            }
            if rep.failover_ms.is_none() {
                rep.problems.push("no client reply after the fault".into());
            }
        } else if rep.promoted {
            rep.problems.push("the backup was promoted although the primary lives".into());
        }
        if point == Point::Partition {
            if !rep.fenced {
                rep.problems.push("the old primary was not fenced after the partition healed".into());
            }
            if rep.lease_lost_before_grant == Some(false) {
                rep.problems.push("no 'lease lost' on the old primary before the backup's grant".into());
            }
        }
        if point == Point::BackupCommitted && !plog.contains("the group agreed the primary runs degraded") {
            rep.problems.push("the primary did not get the group's consent to run degraded".into());
        }
        if point != Point::Partition && point != Point::BackupCommitted && point.expects_promotion() && rep.fenced {
            rep.problems.push("unexpected FENCED".into());
        }
        if rep.reconnects > 0 {
            rep.problems
                .push(format!("the client had to reconnect {} time(s) (failover not transparent)", rep.reconnects));
        }
        drop(procs);
        drop(topo);
        Ok(())
    })();
    if let Err(e) = result {
        if rep.outcome.is_empty() {
            rep.outcome = "fail".into();
        }
        rep.problems.push(format!("{e:#}"));
    } else {
        rep.outcome = if rep.problems.is_empty() { "pass" } else { "fail" }.into();
    }
    if let Some(logs) = &opts.logs {
        let to = logs.join(format!("{}-{run}", point.name()));
        let _ = fs::create_dir_all(&to);
        for f in [
            "primary.log",
            "backup.log",
            "witness.log",
            "client.log",
            "client.out",
            "p-serial.log",
            "b-serial.log",
            "ctl/fault",
            "primary-stacks.txt",
        ] {
            let _ = fs::copy(d(f), to.join(f.replace('/', "-")));
        }
    }
    rep.elapsed_s = t_start.elapsed().as_secs_f64();
    Ok(rep)
}

fn pct(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * (v.len() as f64 - 1.0)).round() as usize;
    Some(v[i.min(v.len() - 1)])
}

fn fmt_ms(x: Option<f64>) -> String {
    x.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into())
}

/// The summary table (markdown), one row per point.
pub fn summary(reports: &[RunReport]) -> String {
    let mut by: BTreeMap<String, Vec<&RunReport>> = BTreeMap::new();
    for r in reports {
        by.entry(r.point.clone()).or_default().push(r);
    }
    let mut out = String::from(
        "| point | runs | pass | invalid | promoted | lost acked writes | contradictions | reconnects | fenced | failover p50 ms | failover p99 ms | detect p50 ms | grant p50 ms | promote p50 ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in Point::ALL {
        let Some(rs) = by.get(p.name()) else { continue };
        let valid: Vec<&&RunReport> = rs.iter().filter(|r| r.outcome != "invalid").collect();
        let n = valid.len().max(1) as f64;
        let col = |f: &dyn Fn(&RunReport) -> Option<f64>| -> Vec<f64> { valid.iter().filter_map(|r| f(r)).collect() };
        let fo = col(&|r| if p.expects_promotion() || r.failover_ms.is_some() { r.failover_ms } else { None });
        out += &format!(
            "| {} | {} | {} | {} | {:.0}% | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            p.name(),
            rs.len(),
            rs.iter().filter(|r| r.outcome == "pass").count(),
            rs.len() - valid.len(),
            100.0 * valid.iter().filter(|r| r.promoted).count() as f64 / n,
            valid.iter().map(|r| r.lost_writes).sum::<u64>(),
            valid.iter().map(|r| r.contradictions).sum::<u64>(),
            valid.iter().map(|r| r.reconnects).sum::<u64>(),
            valid.iter().filter(|r| r.fenced).count(),
            fmt_ms(pct(&fo, 50.0)),
            fmt_ms(pct(&fo, 99.0)),
            fmt_ms(pct(&col(&|r| r.detect_ms), 50.0)),
            fmt_ms(pct(&col(&|r| r.grant_ms), 50.0)),
            fmt_ms(pct(&col(&|r| r.promote_ms), 50.0)),
        );
    }
    out
}

/// Checks what the harness needs; Err says why it cannot run here.
pub fn preflight(opts: &Options) -> Result<()> {
    fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").context("/dev/kvm is not usable")?;
    for (what, p) in [("understudy binary", &opts.understudy), ("guest image", &opts.guest), ("client", &opts.client)] {
        if !p.exists() {
            bail!("{what} {} is missing (cargo build --release -p understudy; make guest)", p.display());
        }
    }
    let probe = format!("usf{}probe", std::process::id());
    let r = sh(&["ip", "netns", "add", &probe]).and_then(|_| {
        sh(&["ip", "-n", &probe, "tuntap", "add", "dev", "t0", "mode", "tap"])?;
        sh(&["ip", "-n", &probe, "link", "add", "b0", "type", "bridge"])
    });
    let _ = sh(&["ip", "netns", "del", &probe]);
    r.context("network namespaces, TAP devices or bridges are not available (needs root, iproute2)")
}

/// Whether this kernel has `sch_netem` (some minimal kernels have only tbf/htb).
pub fn netem_available() -> bool {
    let probe = format!("usf{}netem", std::process::id());
    let r = sh(&["ip", "netns", "add", &probe]).and_then(|_| {
        sh(&["ip", "netns", "exec", &probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
    });
    let _ = sh(&["ip", "netns", "del", &probe]);
    r.is_ok()
}

/// The link degradation the `netem` point applies: netem when the kernel has it, else tbf (a
/// rate limit whose small queue adds delay and tail-drops bursts: no duplication, no corruption).
pub fn degradation() -> &'static str {
    static SPEC: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    SPEC.get_or_init(|| {
        if netem_available() {
            "netem delay 5ms 2ms loss 2% duplicate 1% corrupt 0.5%"
        } else {
            "tbf rate 8mbit burst 16kb latency 15ms"
        }
    })
}

/// Runs the whole campaign; writes the report; returns the runs.
pub fn run(opts: &Options) -> Result<Vec<RunReport>> {
    install_signal_handlers();
    clean_stale_namespaces();
    preflight(opts)?;
    let t0 = Instant::now();
    let mut rng = Rng(opts.seed);
    let mut reports = Vec::new();
    let mut n = 0;
    'outer: for &point in &opts.points {
        for i in 0..opts.runs {
            if t0.elapsed() > opts.total_timeout {
                eprintln!("testbed faults: the whole-command bound ({:?}) is reached; stopping", opts.total_timeout);
                break 'outer;
            }
            n += 1;
            let r = run_one(opts, point, n, &mut rng)?;
            let _ = writeln!(
                std::io::stderr(),
                "[faults {:6.1}s] {:<16} run {}: {:<7} promoted={} failover={} ms lost={} contradictions={} reconnects={} fenced={} {}",
                t0.elapsed().as_secs_f64(),
                point.name(),
                i + 1,
                r.outcome,
                r.promoted,
                fmt_ms(r.failover_ms),
                r.lost_writes,
                r.contradictions,
                r.reconnects,
                r.fenced,
                if r.problems.is_empty() { String::new() } else { format!("problems: {}", r.problems.join("; ")) }
            );
            reports.push(r);
            if let Some(out) = &opts.out {
                write_report(out, opts, &reports)?;
            }
            if INTERRUPTED.load(Ordering::SeqCst) {
                break 'outer;
            }
        }
    }
    Ok(reports)
}

fn write_report(out: &Path, opts: &Options, reports: &[RunReport]) -> Result<()> {
    let v = json!({
        "seed": opts.seed,
        "runs_per_point": opts.runs,
        "points": opts.points.iter().map(|p| p.name()).collect::<Vec<_>>(),
        "degradation": degradation(),
        "topology": "namespaces sw (bridges br-lan, br-ctl), p, b, w, c; primary's control link cut/netem'd",
        "runs": reports.iter().map(RunReport::to_json).collect::<Vec<_>>(),
        "summary_markdown": summary(reports),
    });
    fs::write(out, serde_json::to_string_pretty(&v)?)?;
    Ok(())
}
