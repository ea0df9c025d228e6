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
//! (`tc netem`, tbf without it) for the partition and netem points; the `partition.x-y` points
//! cut one pair of hosts with blackhole routes; the `link.*` points send replication through
//! `testbed impair` (the [`crate::impair`] proxy, in `b` on 10.78.0.2:7410), which drops,
//! delays, duplicates and corrupts datagrams in user space (this kernel has no netem). Guest
//! MACs move between the two hosts' LAN ports when the promoted copy announces itself, as on a
//! real switch.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::harness::interrupt::{check_interrupted, install_signal_handlers, sleep};
use crate::harness::netns::{self, NetNs};
use crate::harness::proc::{Proc, die_with_parent, sh};
use crate::harness::rng::XorShift64;
use crate::harness::stats::percentile;
use crate::harness::tempdir::TempDir;
use crate::harness::wait::poll_until as wait_until;
use crate::impair::Impairment;

pub mod double;
pub mod migrate;

/// A fault the harness injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Point {
    /// `kill -9` of the primary at a random moment.
    Kill,
    /// The same with an untuned client: no `rto_min` on its route, no thin-stream option (a
    /// request the dead primary received is answered by the promoted replica's input replay,
    /// not by the client's retransmission at Linux's 200 ms minimum RTO).
    KillUntuned,
    /// `UNDERSTUDY_FAILPOINTS=primary.paused@K` on the primary.
    Paused,
    /// `primary.harvest@K`.
    Harvest,
    /// `primary.shipped@K`.
    Shipped,
    /// `primary.acked@K`.
    Acked,
    /// `backup.committed@K` on the backup with `UNDERSTUDY_FAILPOINT_VICTIM`: the backup kills
    /// the PRIMARY (`kill -9`) after committing a checkpoint, before its ack is sent.
    CommittedUnacked,
    /// `backup.committed@K` on the BACKUP: the primary must run degraded.
    BackupCommitted,
    /// `kill -9` of the backup at a random moment.
    Backup,
    /// `kill -9` of the witness: nothing may change for the client.
    Witness,
    /// The primary's control link goes down (cut from backup and witness), heals later.
    Partition,
    /// Blackhole routes between primary and backup (both keep the witness), healed later.
    PartitionPB,
    /// The same between primary and witness.
    PartitionPW,
    /// The same between backup and witness.
    PartitionBW,
    /// Loss, delay, duplication and corruption on the primary's control link.
    Netem,
    /// Replication through the impairment proxy (`impair`): 5% loss each way for 4 s.
    LinkLoss,
    /// 10 ± 5 ms delay each way (reordering).
    LinkDelay,
    /// 5% duplication.
    LinkDup,
    /// 2% corruption (1-3 bytes flipped).
    LinkCorrupt,
    /// All four at once, milder.
    LinkMix,
    /// A forced re-sync, and the primary killed as it starts: the backup refuses its K-th
    /// checkpoint (`UNDERSTUDY_FAILPOINTS=backup.refuse@K`: as if it did not apply, the replica
    /// stays at its last consistent epoch) and asks for a new baseline; the primary dies at the
    /// first round of that re-sync, before the baseline is sent (`primary.resync@1`).
    Resync,
    /// The same, but the primary dies at the start of the re-sync's second round
    /// (`primary.resync@2`): the backup has committed the new baseline, its replica is no longer
    /// consistent, and it must roll back to its last consistent checkpoint to promote.
    ResyncLate,
    /// Live migration ([`migrate`]): `kill -9` of the destination during the pre-copy rounds.
    MigrateDestKillPrecopy,
    /// `kill -9` of the source during the pre-copy rounds.
    MigrateSourceKillPrecopy,
    /// The migration's link cut (both ways) during post-copy for longer than the session's idle
    /// timeout, then healed.
    MigratePartition,
    /// Loss, delay, duplication and corruption through the impairment proxy during post-copy.
    MigrateLink,
    /// `kill -9` of the destination during post-copy.
    MigrateDestKill,
    /// `kill -9` of the primary, automatic re-protection of the promoted VM to the old
    /// primary's host, then `kill -9` of the promoted VM too ([`double`]).
    DoubleFailover,
}

impl Point {
    /// All points, in report order.
    pub const ALL: [Point; 28] = [
        Point::Kill,
        Point::KillUntuned,
        Point::Paused,
        Point::Harvest,
        Point::Shipped,
        Point::Acked,
        Point::CommittedUnacked,
        Point::BackupCommitted,
        Point::Backup,
        Point::Witness,
        Point::Partition,
        Point::PartitionPB,
        Point::PartitionPW,
        Point::PartitionBW,
        Point::Netem,
        Point::LinkLoss,
        Point::LinkDelay,
        Point::LinkDup,
        Point::LinkCorrupt,
        Point::LinkMix,
        Point::Resync,
        Point::ResyncLate,
        Point::MigrateDestKillPrecopy,
        Point::MigrateSourceKillPrecopy,
        Point::MigratePartition,
        Point::MigrateLink,
        Point::MigrateDestKill,
        Point::DoubleFailover,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Point::Kill => "kill",
            Point::KillUntuned => "kill.untuned",
            Point::Paused => "primary.paused",
            Point::Harvest => "primary.harvest",
            Point::Shipped => "primary.shipped",
            Point::Acked => "primary.acked",
            Point::CommittedUnacked => "committed-unacked",
            Point::BackupCommitted => "backup.committed",
            Point::Backup => "backup",
            Point::Witness => "witness",
            Point::Partition => "partition",
            Point::PartitionPB => "partition.p-b",
            Point::PartitionPW => "partition.p-w",
            Point::PartitionBW => "partition.b-w",
            Point::Netem => "netem",
            Point::LinkLoss => "link.loss",
            Point::LinkDelay => "link.delay",
            Point::LinkDup => "link.dup",
            Point::LinkCorrupt => "link.corrupt",
            Point::LinkMix => "link.mix",
            Point::Resync => "resync",
            Point::ResyncLate => "resync.late",
            Point::MigrateDestKillPrecopy => "migrate.dest-kill-precopy",
            Point::MigrateSourceKillPrecopy => "migrate.source-kill-precopy",
            Point::MigratePartition => "migrate.partition",
            Point::MigrateLink => "migrate.link",
            Point::MigrateDestKill => "migrate.dest-kill",
            Point::DoubleFailover => "double-failover",
        }
    }

    /// Parses a name (as [`Point::name`]).
    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s.trim())
            .ok_or_else(|| anyhow!("unknown fault point {s:?}; known: {}", Self::ALL.map(|p| p.name()).join(",")))
    }

    /// Parses `--points` (already split at commas); none means all.
    pub fn parse_list(names: &[String]) -> Result<Vec<Self>> {
        if names.is_empty() {
            return Ok(Self::ALL.to_vec());
        }
        names.iter().map(|n| Self::parse(n)).collect()
    }

    /// The forced re-sync points.
    fn resync(self) -> bool {
        matches!(self, Point::Resync | Point::ResyncLate)
    }

    /// The bound of one run of this point: `default` (`--run-timeout-s`), raised for the
    /// re-sync points to [`RESYNC_RUN_TIMEOUT`] (a refusal up to ~20 s into the load, then a
    /// baseline of the guest's 64 MiB and its pre-copy rounds before the kill).
    pub fn run_timeout(self, default: Duration) -> Duration {
        match self {
            Point::DoubleFailover => default.max(double::RUN_TIMEOUT),
            _ if self.resync() => default.max(RESYNC_RUN_TIMEOUT),
            _ => default,
        }
    }

    fn failpoint(self) -> bool {
        matches!(
            self,
            Point::Paused
                | Point::Harvest
                | Point::Shipped
                | Point::Acked
                | Point::CommittedUnacked
                | Point::BackupCommitted
                | Point::Resync
                | Point::ResyncLate
        )
    }

    /// Whether the backup must take over.
    fn expects_promotion(self) -> bool {
        matches!(
            self,
            Point::Kill
                | Point::KillUntuned
                | Point::Paused
                | Point::Harvest
                | Point::Shipped
                | Point::Acked
                | Point::CommittedUnacked
                | Point::Partition
                | Point::Resync
                | Point::ResyncLate
                | Point::DoubleFailover
        )
    }

    /// Whether the backup is lost and the primary must run degraded with the group's consent.
    fn expects_degraded(self) -> bool {
        matches!(self, Point::BackupCommitted | Point::Backup | Point::PartitionPB)
    }

    /// The two hosts a `partition.x-y` point cuts apart.
    fn pair(self) -> Option<(&'static str, &'static str)> {
        match self {
            Point::PartitionPB => Some(("p", "b")),
            Point::PartitionPW => Some(("p", "w")),
            Point::PartitionBW => Some(("b", "w")),
            _ => None,
        }
    }

    /// What the impairment proxy does during a `link.*` point's window.
    pub fn impairment(self) -> Option<Impairment> {
        let ms = Duration::from_millis;
        let base = Impairment::default();
        Some(match self {
            Point::LinkLoss => Impairment { loss: 0.05, ..base },
            Point::LinkDelay => Impairment { delay: ms(10), jitter: ms(5), ..base },
            Point::LinkDup => Impairment { dup: 0.05, ..base },
            Point::LinkCorrupt => Impairment { corrupt: 0.02, ..base },
            Point::LinkMix => Impairment { loss: 0.02, delay: ms(5), jitter: ms(2), dup: 0.01, corrupt: 0.005, ..base },
            _ => return None,
        })
    }

    /// The primary's protection states accepted at the end of a run without promotion.
    fn final_states(self) -> &'static [&'static str] {
        match self {
            Point::BackupCommitted | Point::Backup => &["degraded"],
            // After the heal the primary may reach the backup again and re-sync.
            Point::PartitionPB => &["degraded", "syncing", "protected"],
            _ => &["protected"],
        }
    }
}

/// The control address of a host of the topology.
fn ctl_ip(host: &str) -> &'static str {
    match host {
        "p" => "10.78.0.1",
        "b" => "10.78.0.2",
        _ => "10.78.0.3",
    }
}

/// Where the `link.*` points' proxy listens (in ns b, beside the backup's 7400).
const PROXY_ADDR: &str = "10.78.0.2:7410";
/// How long a `link.*` impairment lasts.
const IMPAIR_WINDOW: Duration = Duration::from_secs(4);

/// The least bound of one run of a re-sync point ([`Point::run_timeout`]).
pub const RESYNC_RUN_TIMEOUT: Duration = Duration::from_secs(90);

/// The least hit number of a checkpoint-counting fault point: at up to 100 epochs/s it is
/// reached no sooner than ~2.5 s after the first epoch, once the client is loading the guest.
pub const MIN_K: u64 = 250;

/// The fault points armed in each process of a run (`UNDERSTUDY_FAILPOINTS`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Failpoints {
    /// In the primary, e.g. `primary.paused@312`.
    pub primary: Option<String>,
    /// In the backup, e.g. `backup.refuse@230`.
    pub backup: Option<String>,
    /// The backup's point kills the process whose pid the harness writes to a file
    /// (`UNDERSTUDY_FAILPOINT_VICTIM`): the primary.
    pub victim: bool,
}

impl Failpoints {
    /// What `point` arms, its hit numbers drawn from `rng` (the run's seed).
    pub fn choose(point: Point, rng: &mut impl FnMut(u64, u64) -> u64) -> Self {
        // Epochs run at ~20-100/s (a silent guest's epoch is 50 pauses long, at least 10 ms
        // with today's ~0.2 ms pause); sync and the client's start take ~2-4 s. Pick K at least
        // [`MIN_K`] so the point fires a few seconds into protected operation, with the client
        // loading (a backup point at K = 150 once fired 0.4 s after protection, before the
        // client started: docs/results/faults-2026-12-07-s11/).
        let none = Self::default();
        match point {
            Point::BackupCommitted => Self { backup: Some(format!("backup.committed@{}", rng(MIN_K, 500))), ..none },
            Point::CommittedUnacked => {
                Self { backup: Some(format!("backup.committed@{}", rng(MIN_K, 500))), victim: true, ..none }
            }
            // The refusal a few seconds into the client's load (its first reply comes ~1.4 s
            // after protection; before it, a silent guest commits few epochs).
            Point::Resync | Point::ResyncLate => Self {
                backup: Some(format!("backup.refuse@{}", rng(200, 400))),
                primary: Some(format!("primary.resync@{}", if point == Point::Resync { 1 } else { 2 })),
                victim: false,
            },
            p if p.failpoint() => Self { primary: Some(format!("{}@{}", p.name(), rng(MIN_K, 500))), ..none },
            _ => none,
        }
    }

    /// Whether anything is armed.
    pub fn any(&self) -> bool {
        self.primary.is_some() || self.backup.is_some()
    }

    /// For reports: `backup.refuse@230,primary.resync@1`.
    pub fn describe(&self) -> Option<String> {
        let all: Vec<&str> = self.backup.iter().chain(&self.primary).map(String::as_str).collect();
        (!all.is_empty()).then(|| all.join(","))
    }

    /// The environment of process `who` (`primary` or `backup`); `victim` is the pid file.
    pub fn env(&self, who: &str, victim: &Path) -> Vec<(&'static str, String)> {
        let (spec, kills_other) = match who {
            "primary" => (&self.primary, false),
            "backup" => (&self.backup, self.victim),
            _ => return Vec::new(),
        };
        let Some(spec) = spec else { return Vec::new() };
        let mut env = vec![("UNDERSTUDY_FAILPOINTS", spec.clone())];
        if kills_other {
            env.push(("UNDERSTUDY_FAILPOINT_VICTIM", victim.to_string_lossy().into_owned()));
        }
        env
    }
}

/// The replication link's default detection time in the harness (`--detect-ms`).
pub const DEFAULT_DETECT_MS: u64 = 80;

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
    /// The replication link's `--detect-ms` (backup and primary), with heartbeats every 10 ms.
    pub detect_ms: u64,
    /// Run the backup with `--no-prepare-vm` (the A/B of building the VM ahead of promotion).
    pub no_prepare_vm: bool,
    /// Run the backup with `--inbound-log-frames 0`: no input replay at promotion (the A/B of
    /// the inbound log; what an older backup does).
    pub no_inbound_log: bool,
    /// A LAN that learns where the guest's address is (hands its frames to the primary's host
    /// only) and a backup without `--lan-copy`: what a deployment without LAN copies sees. By
    /// default the LAN floods the guest's address to both hosts (its bridges do not learn it)
    /// and the backup keeps LAN copies.
    pub no_lan_copy: bool,
    /// More arguments for `understudy protect` (`--protect-arg`), e.g. `--output-burst-end=true`.
    pub protect_args: Vec<String>,
    pub understudy: PathBuf,
    pub guest: PathBuf,
    pub client: PathBuf,
    /// This crate's `testbed` binary (runs the `link.*` points' `testbed impair` proxy).
    pub testbed: PathBuf,
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
            detect_ms: DEFAULT_DETECT_MS,
            no_prepare_vm: false,
            no_inbound_log: false,
            no_lan_copy: false,
            protect_args: Vec::new(),
            understudy: env_or("UNDERSTUDY_BIN", root.join("target/release/understudy")),
            guest: env_or("UNDERSTUDY_GUEST", root.join("target/guest/understudy-guest")),
            client: root.join("testbed/scripts/faults_client.py"),
            testbed: std::env::var_os("TESTBED_BIN").map(PathBuf::from).unwrap_or_else(|| {
                std::env::current_exe()
                    .ok()
                    .filter(|p| p.file_name().is_some_and(|n| n == "testbed"))
                    .unwrap_or_else(|| root.join("target/release/testbed"))
            }),
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
    /// Fault -> backup logs "primary suspect" or "primary lost", whichever comes first.
    pub detect_ms: Option<f64>,
    /// The backup's suspicions of the primary ("primary suspect") after the fault; in a run
    /// without promotion each was a false one (withdrawn when the primary was heard again).
    pub suspicions: u64,
    /// "primary lost" -> "arbitration: granted".
    pub grant_ms: Option<f64>,
    /// From the backup's PROMOTED line.
    pub promote_ms: Option<f64>,
    pub take_ms: Option<f64>,
    pub restore_ms: Option<f64>,
    pub announce_ms: Option<f64>,
    /// From the backup's PROMOTED line: inbound frames replayed into the promoted guest.
    pub replayed_frames: Option<u64>,
    /// From the backup's PROMOTED line: output frames of the replica's epochs the primary had
    /// not released, written by the backup at promotion.
    pub output_written_frames: Option<u64>,
    /// Primary's "lease lost" logged before the backup's grant (partition: only one releasing).
    pub lease_lost_before_grant: Option<bool>,
    /// The primary's protection state at the end (runs without promotion).
    pub final_state: Option<String>,
    /// The primary's protection state changes after the fault (`from->to`).
    pub state_changes: Vec<String>,
    /// Replication sessions the primary re-established after the fault.
    pub session_reconnects: u64,
    /// `lease lost` lines of the primary after the fault.
    pub lease_losses: u64,
    /// The impairment proxy's account of its window (`link.*`).
    pub impair: Option<String>,
    /// Re-sync points: the backup's refusal (its `backup.refuse` log line) -> the primary's
    /// death at its re-sync fault point.
    pub resync_ms: Option<f64>,
    /// Client spawned -> its first reply (`ctl/ready`), for timed faults.
    pub client_start_ms: Option<f64>,
    pub acked_writes: u64,
    pub lost_writes: u64,
    pub contradictions: u64,
    pub errors: u64,
    pub reconnects: u64,
    pub max_gap_ms: Option<f64>,
    pub client_notes: Vec<String>,
    pub elapsed_s: f64,
    /// The migration points' own account.
    pub migration: Option<migrate::MigRun>,
    /// The double-failover point's own account.
    pub double: Option<double::DoubleRun>,
}

impl RunReport {
    fn to_json(&self) -> Value {
        json!({
            "point": self.point, "run": self.run, "outcome": self.outcome, "problems": self.problems,
            "failpoint": self.failpoint, "promoted": self.promoted, "fenced": self.fenced,
            "degraded": self.degraded, "failover_ms": self.failover_ms, "detect_ms": self.detect_ms,
            "grant_ms": self.grant_ms, "promote_ms": self.promote_ms, "take_ms": self.take_ms,
            "restore_ms": self.restore_ms, "announce_ms": self.announce_ms,
            "replayed_frames": self.replayed_frames,
            "output_written_frames": self.output_written_frames,
            "lease_lost_before_grant": self.lease_lost_before_grant,
            "final_state": self.final_state, "state_changes": self.state_changes,
            "session_reconnects": self.session_reconnects, "lease_losses": self.lease_losses,
            "suspicions": self.suspicions,
            "impair": self.impair, "resync_ms": self.resync_ms, "client_start_ms": self.client_start_ms,
            "acked_writes": self.acked_writes, "lost_writes": self.lost_writes,
            "contradictions": self.contradictions, "errors": self.errors, "reconnects": self.reconnects,
            "max_gap_ms": self.max_gap_ms, "client_notes": self.client_notes, "elapsed_s": self.elapsed_s,
            "migration": self.migration.as_ref().map(migrate::MigRun::to_json),
            "double": self.double.as_ref().map(double::DoubleRun::to_json),
        })
    }
}

fn wall() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The prefix of every namespace this harness makes (`usf<pid>...`).
const NS_PREFIX: &str = "usf";

/// The namespaces of one run; deleted on drop (in the reverse order of their making).
struct Topology {
    prefix: String,
    made: Vec<NetNs>,
}

const ROLES: [&str; 5] = ["sw", "p", "b", "w", "c"];

impl Topology {
    fn ns(&self, role: &str) -> String {
        format!("{}{role}", self.prefix)
    }

    /// `tuned`: the client's route gets `rto_min 10ms` (every point but `kill.untuned`).
    /// `flood`: the hosts' LAN ports do not learn addresses, so a frame for the guest reaches
    /// both hosts' TAPs (what LAN copies need; the client's address is still learned).
    fn create(run: usize, tuned: bool, flood: bool) -> Result<Self> {
        let mut t = Topology { prefix: format!("{NS_PREFIX}{}r{run}", std::process::id()), made: Vec::new() };
        for role in ROLES {
            t.made.push(NetNs::create(&t.ns(role))?);
        }
        let [sw, p, b, w, c] = &t.made[..] else { unreachable!("one namespace per role") };
        for br in ["br-lan", "br-ctl"] {
            sw.add_bridge(br, None, &[])?;
        }
        let veth = |sw_end: &str, bridge: &str, ns: &NetNs, end: &str| -> Result<()> {
            sw.ip(&["link", "add", sw_end, "type", "veth", "peer", "name", end, "netns", ns.name()])?;
            sw.ip(&["link", "set", sw_end, "master", bridge, "up"])
        };
        for (host, ns, ip) in [("p", p, "10.78.0.1/24"), ("b", b, "10.78.0.2/24")] {
            ns.add_tap("tap0", None)?;
            veth(&format!("l-{host}"), "br-lan", ns, "lan")?;
            ns.add_bridge("br0", None, &["tap0", "lan"])?;
            veth(&format!("c-{host}"), "br-ctl", ns, "ctl")?;
            ns.ip(&["addr", "add", ip, "dev", "ctl"])?;
            ns.ip(&["link", "set", "ctl", "up"])?;
        }
        if flood {
            for port in ["l-p", "l-b"] {
                sw.ip(&["link", "set", "dev", port, "type", "bridge_slave", "learning", "off"])?;
            }
            for ns in [p, b] {
                ns.ip(&["link", "set", "dev", "lan", "type", "bridge_slave", "learning", "off"])?;
            }
        }
        veth("c-w", "br-ctl", w, "ctl")?;
        w.ip(&["addr", "add", "10.78.0.3/24", "dev", "ctl"])?;
        w.ip(&["link", "set", "ctl", "up"])?;
        veth("l-c", "br-lan", c, "eth0")?;
        c.ip(&["addr", "add", "10.77.0.1/24", "dev", "eth0"])?;
        c.ip(&["link", "set", "eth0", "up"])?;
        if !tuned {
            // An ordinary client: Linux's defaults (200 ms minimum RTO).
            return Ok(t);
        }
        // A LAN client: let TCP retransmit after 10 ms (as demo.sh), so failover, not Linux's
        // 200 ms minimum RTO, dominates the pause the client sees. The client also sets
        // TCP_THIN_LINEAR_TIMEOUTS on its socket (scripts/faults_client.py): its one-request
        // stream is thin, so retransmits stay 10 ms apart instead of backing off exponentially.
        c.ip(&[
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

    /// Cuts (or heals) the control network between hosts `a` and `b` (of p, b, w) with a
    /// blackhole route to the other's address on each side; every other pair keeps talking.
    fn blackhole(&self, a: &str, b: &str, cut: bool) -> Result<()> {
        let verb = if cut { "add" } else { "del" };
        for (here, there) in [(a, b), (b, a)] {
            sh(&["ip", "-n", &self.ns(here), "route", verb, "blackhole", &format!("{}/32", ctl_ip(there))])?;
        }
        Ok(())
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
        while let Some(ns) = self.made.pop() {
            drop(ns);
        }
    }
}

/// Child processes of one run: SIGKILLed on drop (and, through PDEATHSIG, when the harness dies).
struct Procs {
    list: Vec<Proc>,
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
        // The client's verdict is read from a pipe; `migrate --json`'s report goes to
        // `<log>.out` (`migrate.out` beside `migrate.log`).
        let stdout = match name {
            "client" => Stdio::piped(),
            "migrate" => Stdio::from(fs::File::create(log.with_extension("out"))?),
            _ => Stdio::null(),
        };
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program).args(args);
        // FAULTS_UNDERSTUDY_LOG sets the processes' log filter (e.g. the receive path's timing
        // events: `info,vmm::devices::virtio::net=debug,primary::link=debug,backup::inbound=debug`).
        let filter = std::env::var("FAULTS_UNDERSTUDY_LOG").unwrap_or_else(|_| "info".to_string());
        c.env("UNDERSTUDY_LOG", filter).env("NO_COLOR", "1");
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdout(stdout);
        let p = Proc::start(die_with_parent(&mut c), name, log.to_path_buf())?;
        let pid = p.pid();
        self.list.push(p);
        Ok(pid)
    }

    fn get(&mut self, name: &str) -> &mut Child {
        &mut self.list.iter_mut().find(|p| p.name == name).expect("known process").child
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
        // SIGKILL every one first; each guard then reaps its own.
        for p in &mut self.list {
            let _ = p.child.kill();
        }
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

const LAN_GUEST: &str = "10.77.0.2";

fn s(x: impl AsRef<std::ffi::OsStr>) -> String {
    x.as_ref().to_string_lossy().into_owned()
}

/// Runs one fault once.
fn run_one(opts: &Options, point: Point, run: usize, rng: &mut XorShift64) -> Result<RunReport> {
    let t_start = Instant::now();
    let deadline = t_start + point.run_timeout(opts.run_timeout);
    let mut rep = RunReport { point: point.name().into(), run, ..Default::default() };
    let dir = TempDir::create(
        std::env::temp_dir().join(format!("{NS_PREFIX}-{}-{run}-{}", std::process::id(), point.name())),
        false,
    )?;
    fs::create_dir_all(dir.join("ctl"))?;
    let d = |f: &str| dir.join(f);
    let result = (|| -> Result<()> {
        let topo =
            Topology::create(run, point != Point::KillUntuned, !opts.no_lan_copy).context("create the topology")?;
        let mut procs = Procs { list: Vec::new() };
        let b = &opts.understudy;
        sh(&[
            &s(b),
            "certs",
            "--out",
            &s(d("certs")),
            "--host",
            "primary",
            "--host",
            "backup",
            "--witness",
            "witness",
        ])?;
        let failpoints = Failpoints::choose(point, &mut |lo, hi| rng.range(lo, hi));
        rep.failpoint = failpoints.describe();
        // committed-unacked: the backup's failpoint kills the process whose pid is in this file
        // (the primary's, written right after it is spawned) instead of the backup itself.
        let victim = d("primary.pid");
        let fp_env = |who: &str| failpoints.env(who, &victim);
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
                "--certs",
                &s(d("certs")),
                "--peer",
                "1=primary@10.78.0.1:7501",
                "--peer",
                "2=backup@10.78.0.2:7502",
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
                &opts.detect_ms.to_string(),
                "--heartbeat-ms",
                "10",
                "--arbiter-id",
                "2",
                "--arbiter-listen",
                "10.78.0.2:7502",
                "--arbiter-peer",
                "1=primary@10.78.0.1:7501",
                "--arbiter-peer",
                "3=witness@10.78.0.3:7503",
                "--arbiter-data",
                &s(d("raft2")),
            ])
            .into_iter()
            .chain(opts.no_prepare_vm.then(|| "--no-prepare-vm".into()))
            .chain(if point == Point::DoubleFailover { double::backup_flags() } else { Vec::new() })
            .chain(opts.no_inbound_log.then(|| ["--inbound-log-frames".into(), "0".into()]).into_iter().flatten())
            .chain((!opts.no_lan_copy).then(|| "--lan-copy".into()))
            .collect::<Vec<_>>(),
            &fp_env("backup"),
            &d("backup.log"),
        )?;
        // link.*: the primary replicates through the impairment proxy in ns b (UDP for QUIC,
        // TCP for the liveness line), which impairs datagrams once `impair.start` appears.
        let impairment = point.impairment();
        if let Some(imp) = &impairment {
            let mut a = args(&[
                "impair",
                "--listen",
                PROXY_ADDR,
                "--to",
                "10.78.0.2:7400",
                "--seed",
                &rng.next_u64().to_string(),
                "--start-file",
                &s(d("impair.start")),
                "--window-ms",
                &IMPAIR_WINDOW.as_millis().to_string(),
                "--tcp",
            ]);
            a.extend(imp.args());
            procs.spawn("impair", &topo.ns("b"), &opts.testbed, &a, &[], &d("impair.log"))?;
            let up = wait_until(Instant::now() + Duration::from_secs(5), || {
                read(&d("impair.log")).contains("impair: listening").then_some(())
            })?;
            if up.is_none() {
                bail!("the impairment proxy did not start: {}", read(&d("impair.log")));
            }
        }
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
                "2=backup@10.78.0.2:7502",
                "--arbiter-peer",
                "3=witness@10.78.0.3:7503",
                "--arbiter-data",
                &s(d("raft1")),
                "--arbiter-certs",
                &s(d("certs")),
                "--arbiter-name",
                "primary",
            ]),
            &fp_env("primary"),
            &d("primary.log"),
        )?;
        // `ip netns exec` execs the program, so this is the primary's own pid.
        let primary_pid = procs.get("primary").id();
        fs::write(&victim, primary_pid.to_string())?;
        let booted = wait_until(deadline.min(Instant::now() + Duration::from_secs(20)), || {
            (d("p.sock").exists() && read(&d("p-serial.log")).lines().any(|l| l.trim() == "ready")).then_some(())
        })?;
        if booted.is_none() {
            bail!("the guest did not boot in 20 s");
        }
        let detect_ms = opts.detect_ms.to_string();
        let mut protect = vec![
            s(b),
            "protect".into(),
            "--api".into(),
            s(d("p.sock")),
            "--backup".into(),
            if impairment.is_some() { PROXY_ADDR } else { "10.78.0.2:7400" }.into(),
            "--certs".into(),
            s(d("certs")),
            "--backup-node".into(),
            "2".into(),
            "--detect-ms".into(),
            detect_ms,
            "--heartbeat-ms".into(),
            "10".into(),
        ];
        protect.extend(opts.protect_args.iter().cloned());
        sh(&protect.iter().map(String::as_str).collect::<Vec<_>>())?;
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
            Some(false) if failpoints.any() => {
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
            &if point == Point::KillUntuned { vec![("FAULTS_CLIENT_UNTUNED", "1".to_string())] } else { vec![] },
            &d("client.log"),
        )?;
        // Timed faults count from the client's first reply: that takes ~1.05-1.1 s from its
        // spawn here, and a fault before it would be timed against a client that is not there
        // yet (its first reply after the fault would measure the connect).
        let t_client = Instant::now();
        let mut client_ready = || -> Result<()> {
            let ready = wait_until(deadline.min(Instant::now() + Duration::from_secs(15)), || {
                d("ctl/ready").exists().then_some(())
            })?;
            rep.client_start_ms = Some(t_client.elapsed().as_secs_f64() * 1e3);
            ready
                .map(|_| ())
                .ok_or_else(|| anyhow!("the client got no first reply in 15 s: {}", read(&d("client.log"))))
        };
        // Inject.
        let fault_wall;
        match point {
            Point::Kill | Point::KillUntuned | Point::Backup | Point::Witness | Point::Partition => {
                client_ready()?;
                sleep(Duration::from_millis(rng.range(1000, 2500)))?;
                fault_wall = wall();
                match point {
                    Point::Kill | Point::KillUntuned => procs.kill("primary"),
                    Point::Backup => procs.kill("backup"),
                    Point::Witness => procs.kill("witness"),
                    _ => topo.cut_primary(true)?,
                }
                fs::write(d("ctl/fault"), format!("{fault_wall:.6}"))?;
            }
            Point::DoubleFailover => {
                client_ready()?;
                sleep(Duration::from_millis(rng.range(1000, 2500)))?;
                fault_wall = wall();
                procs.kill("primary");
                fs::write(d("ctl/fault"), format!("{fault_wall:.6}"))?;
                double::after_first_kill(opts, &topo, &mut procs, dir.path(), rng, deadline, &mut rep)?;
            }
            Point::PartitionPB | Point::PartitionPW | Point::PartitionBW => {
                let (x, y) = point.pair().expect("a pair");
                client_ready()?;
                sleep(Duration::from_millis(rng.range(1000, 2500)))?;
                fault_wall = wall();
                topo.blackhole(x, y, true)?;
                fs::write(d("ctl/fault"), format!("{fault_wall:.6}"))?;
                if point == Point::PartitionPB {
                    // Hold the cut until the primary runs degraded (or 5 s), then 1 s more.
                    let _ = wait_until(deadline.min(Instant::now() + Duration::from_secs(5)), || {
                        read(&d("primary.log")).contains("the group agreed the primary runs degraded").then_some(())
                    })?;
                    sleep(Duration::from_secs(1))?;
                } else {
                    sleep(Duration::from_secs(3))?;
                }
                topo.blackhole(x, y, false)?;
                if point == Point::PartitionPB {
                    // Time to reach the backup again and re-sync.
                    sleep(Duration::from_secs(2))?;
                }
            }
            Point::LinkLoss | Point::LinkDelay | Point::LinkDup | Point::LinkCorrupt | Point::LinkMix => {
                client_ready()?;
                sleep(Duration::from_millis(1000))?;
                fault_wall = wall();
                fs::write(d("impair.start"), "")?;
                fs::write(d("ctl/fault"), format!("{fault_wall:.6}"))?;
                let closed = wait_until(deadline.min(Instant::now() + IMPAIR_WINDOW * 2), || {
                    read(&d("impair.log")).lines().find(|l| l.contains("window closed")).map(str::to_string)
                })?;
                match closed {
                    Some(l) => rep.impair = Some(l.trim_start_matches("impair: ").to_string()),
                    None => rep.problems.push("the impairment window did not close".into()),
                }
            }
            Point::Netem => {
                client_ready()?;
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
                let seen = fired.ok_or_else(|| anyhow!("the fault point never fired"))?;
                fault_wall = if point == Point::CommittedUnacked {
                    // Dated by the backup's `FAULT killed pid` line: logged as soon as kill(1)
                    // returned, i.e. within ~1-2 ms of the SIGKILL (same host clock), where
                    // `seen` is up to one 10 ms poll late.
                    let line = wait_until(Instant::now() + Duration::from_secs(2), || {
                        read(&d("backup.log")).lines().find(|l| l.contains("FAULT killed pid")).map(str::to_string)
                    })?;
                    match line {
                        Some(l) if l.contains(&format!("FAULT killed pid {primary_pid} ")) => {
                            line_time(&l).unwrap_or(seen)
                        }
                        Some(l) => {
                            rep.problems.push(format!("the backup killed another pid than the primary's: {l}"));
                            seen
                        }
                        None => {
                            rep.problems.push("the primary died without the backup's `FAULT killed pid` line".into());
                            seen
                        }
                    }
                } else {
                    // Dated by the dying process's own `fault point ... reached` line, logged just
                    // before it kills itself (so the fault is dated a ms or two early, never
                    // late); `seen` is up to one poll (and the exit's reaping) late, which made
                    // failover look ~20 ms shorter than it was.
                    let log = if who == "backup" { "backup.log" } else { "primary.log" };
                    read(&d(log))
                        .lines()
                        .find(|l| l.contains("fault point") && l.contains("reached"))
                        .and_then(line_time)
                        .unwrap_or(seen)
                };
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
                let want = point.final_states();
                if !want.contains(&state.as_str()) {
                    rep.problems.push(format!("primary protection is {state}, expected {}", want.join(" or ")));
                }
                rep.final_state = Some(state);
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
        if v["thin_linear_timeouts"] == false {
            rep.client_notes.push("the kernel refused TCP_THIN_LINEAR_TIMEOUTS".into());
        }

        // The logs' account.
        let blog = read(&d("backup.log"));
        let plog = read(&d("primary.log"));
        rep.promoted = blog.contains("PROMOTED");
        if point == Point::DoubleFailover {
            double::judge(dir.path(), &mut rep);
        } else if rep.promoted {
            let bst = status(b, &d("b.sock"));
            if bst.as_ref().map(|s| s["origin"]["kind"] != "promoted").unwrap_or(true) {
                rep.problems.push("backup logged PROMOTED but its status does not say promoted".into());
            }
        }
        // Detection: the backup's first verdict after the fault that asks the group for
        // activity, a suspicion (the session goes on) or the end of the session.
        let t_lost = blog
            .lines()
            .filter(|l| l.contains("backup: primary lost") || l.contains("backup: primary suspect"))
            .filter_map(line_time)
            .find(|&t| t >= fault_wall - 0.005);
        let t_grant = first_time(&blog, "arbitration: granted");
        rep.detect_ms = t_lost.map(|t| (t - fault_wall) * 1e3);
        rep.grant_ms = t_lost.zip(t_grant).map(|(a, g)| (g - a) * 1e3);
        if let Some(line) = blog.lines().find(|l| l.contains("PROMOTED")) {
            rep.promote_ms = field(line, "promote_ms");
            rep.take_ms = field(line, "take_ms");
            rep.restore_ms = field(line, "restore_ms");
            rep.announce_ms = field(line, "announce_ms");
            rep.replayed_frames = field(line, "replayed_frames").map(|f| f as u64);
            rep.output_written_frames = field(line, "output_written_frames").map(|f| f as u64);
        }
        if let Some(g) = t_grant {
            let lease_lost = plog.lines().filter(|l| l.contains("lease lost")).filter_map(line_time).next_back();
            rep.lease_lost_before_grant = Some(lease_lost.map(|l| l < g).unwrap_or(false));
        }
        rep.fenced |= plog.contains("FENCED");
        if plog.contains("the group agreed the primary runs degraded") {
            rep.degraded = true;
        }
        let after_fault = |l: &&str| line_time(l).is_some_and(|t| t >= fault_wall);
        rep.state_changes = plog
            .lines()
            .filter(after_fault)
            .filter(|l| l.contains("protection state") && l.contains(" from="))
            .filter_map(|l| {
                let from = l.split("from=").nth(1)?.split_whitespace().next()?;
                let to = l.split(" to=").nth(1)?.split_whitespace().next()?;
                Some(format!("{from}->{to}"))
            })
            .collect();
        rep.session_reconnects =
            plog.lines().filter(after_fault).filter(|l| l.contains("link: session established")).count() as u64;
        rep.lease_losses =
            plog.lines().filter(after_fault).filter(|l| l.contains("arbitration: lease lost")).count() as u64;
        rep.suspicions =
            blog.lines().filter(after_fault).filter(|l| l.contains("backup: primary suspect")).count() as u64;

        if point.resync() {
            // The forced re-sync: the backup logs its refusal naming the fault point. It must
            // come while the client is loading (after its first reply, `ctl/ready`), or the run
            // did not test what it claims.
            let refused = blog.lines().find(|l| l.contains("backup.refuse")).and_then(line_time);
            let ready = fs::metadata(d("ctl/ready"))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|t| t.as_secs_f64());
            match (refused, ready) {
                (None, _) => rep.problems.push("the backup's log shows no backup.refuse: no forced re-sync".into()),
                (Some(r), Some(c)) if r < c => {
                    rep.outcome = "invalid".into();
                    bail!("the backup refused its checkpoint before the client's first reply (K too small)");
                }
                (Some(r), _) => rep.resync_ms = Some((fault_wall - r) * 1e3),
            }
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
        if point.expects_degraded() && !plog.contains("the group agreed the primary runs degraded") {
            rep.problems.push("the primary did not get the group's consent to run degraded".into());
        }
        if point == Point::CommittedUnacked && rep.promoted {
            // The checkpoint committed just before the kill was never acked: it must still be
            // the one promoted (a backup may not drop a committed epoch for want of an ack).
            let epoch_of = |needle: &str, key: &str| -> Option<u64> {
                let line = blog.lines().find(|l| l.contains(needle))?;
                let v = line.split(key).nth(1)?;
                v.trim_start_matches("Some(").split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
            };
            let committed = epoch_of("backup: primary lost", "consistent_epoch=");
            let promoted = epoch_of("PROMOTED", " epoch=");
            if committed.is_none() || committed != promoted {
                rep.problems.push(format!(
                    "promoted epoch {promoted:?}, but the backup had committed {committed:?} when the primary died"
                ));
            }
        }
        if point == Point::PartitionPB {
            if t_grant.is_some() {
                rep.problems
                    .push("the backup was granted activity although the primary kept a quorum with the witness".into());
            }
            // Re-protected after the heal: the group must know the backup again, or a later
            // failure of the primary finds no failover target while status says `protected`.
            let recorded = plog
                .lines()
                .filter(after_fault)
                .any(|l| l.contains("arbitration: asked the group to record the backup"));
            if rep.final_state.as_deref() == Some("protected") && !recorded {
                rep.problems.push(
                    "protected again after the heal, but the backup was not recorded in the group again \
                     (no failover target)"
                        .into(),
                );
            }
        }
        let new_quiet_point =
            !point.expects_promotion() && !matches!(point, Point::BackupCommitted | Point::Witness | Point::Netem);
        if new_quiet_point && rep.fenced {
            rep.problems.push("the primary was fenced although nobody was promoted".into());
        }
        if matches!(point, Point::PartitionPW | Point::PartitionBW) && rep.session_reconnects > 0 {
            rep.problems.push(format!(
                "the replication session was re-established {} time(s) although its path was never cut",
                rep.session_reconnects
            ));
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
            "impair.log",
            "standby.log",
            "backup2.log",
            "s-serial.log",
        ] {
            let _ = fs::copy(d(f), to.join(f.replace('/', "-")));
        }
    }
    rep.elapsed_s = t_start.elapsed().as_secs_f64();
    Ok(rep)
}

/// The `p`th percentile (0-100).
fn pct(v: &[f64], p: f64) -> Option<f64> {
    percentile(v, p / 100.0)
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
        "| point | runs | pass | invalid | promoted | lost acked writes | contradictions | reconnects | repl. reconnects | fenced | failover p50 ms | failover p99 ms | longest reply wait ms | detect p50 ms | grant p50 ms | promote p50 ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in Point::ALL.into_iter().filter(|p| !p.migration()) {
        let Some(rs) = by.get(p.name()) else { continue };
        let valid: Vec<&&RunReport> = rs.iter().filter(|r| r.outcome != "invalid").collect();
        let n = valid.len().max(1) as f64;
        let col = |f: &dyn Fn(&RunReport) -> Option<f64>| -> Vec<f64> { valid.iter().filter_map(|r| f(r)).collect() };
        let fo = col(&|r| if p.expects_promotion() || r.failover_ms.is_some() { r.failover_ms } else { None });
        out += &format!(
            "| {} | {} | {} | {} | {:.0}% | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            p.name(),
            rs.len(),
            rs.iter().filter(|r| r.outcome == "pass").count(),
            rs.len() - valid.len(),
            100.0 * valid.iter().filter(|r| r.promoted).count() as f64 / n,
            valid.iter().map(|r| r.lost_writes).sum::<u64>(),
            valid.iter().map(|r| r.contradictions).sum::<u64>(),
            valid.iter().map(|r| r.reconnects).sum::<u64>(),
            valid.iter().filter(|r| !r.promoted).map(|r| r.session_reconnects).sum::<u64>(),
            valid.iter().filter(|r| r.fenced).count(),
            fmt_ms(pct(&fo, 50.0)),
            fmt_ms(pct(&fo, 99.0)),
            fmt_ms(col(&|r| r.max_gap_ms).into_iter().reduce(f64::max)),
            fmt_ms(pct(&col(&|r| r.detect_ms), 50.0)),
            fmt_ms(pct(&col(&|r| r.grant_ms), 50.0)),
            fmt_ms(pct(&col(&|r| r.promote_ms), 50.0)),
        );
    }
    if reports.iter().any(|r| r.migration.is_some()) {
        if reports.iter().all(|r| r.migration.is_some()) {
            out.clear();
        } else {
            out.push('\n');
        }
        out += &migrate::summary(reports);
    }
    out += &double::summary(reports);
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
    let probe = format!("{NS_PREFIX}{}probe", std::process::id());
    let r = NetNs::create(&probe).and_then(|ns| {
        ns.ip(&["tuntap", "add", "dev", "t0", "mode", "tap"])?;
        ns.ip(&["link", "add", "b0", "type", "bridge"])
    });
    r.context("network namespaces, TAP devices or bridges are not available (needs root, iproute2)")
}

/// Whether this kernel has `sch_netem` (some minimal kernels have only tbf/htb).
pub fn netem_available() -> bool {
    let probe = format!("{NS_PREFIX}{}netem", std::process::id());
    let r = NetNs::create(&probe).and_then(|ns| {
        sh(&["ip", "netns", "exec", ns.name(), "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
    });
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
    netns::clean_stale(NS_PREFIX);
    crate::migrate_bench::kv::clean_stale_namespaces();
    preflight(opts)?;
    let t0 = Instant::now();
    let mut rng = XorShift64(opts.seed);
    let mut reports = Vec::new();
    let mut n = 0;
    'outer: for &point in &opts.points {
        for i in 0..opts.runs {
            if t0.elapsed() > opts.total_timeout {
                eprintln!("testbed faults: the whole-command bound ({:?}) is reached; stopping", opts.total_timeout);
                break 'outer;
            }
            n += 1;
            let r = if point.migration() {
                migrate::run_one(opts, point, n, &mut rng)?
            } else {
                run_one(opts, point, n, &mut rng)?
            };
            let problems =
                if r.problems.is_empty() { String::new() } else { format!("problems: {}", r.problems.join("; ")) };
            if let Some(m) = &r.migration {
                eprintln!(
                    "[faults {:6.1}s] {:<27} run {}: {:<13} {} {problems}",
                    t0.elapsed().as_secs_f64(),
                    point.name(),
                    i + 1,
                    r.outcome,
                    m.line(&r)
                );
            } else {
                let _ = writeln!(
                    std::io::stderr(),
                    "[faults {:6.1}s] {:<17} run {}: {:<7} promoted={} failover={} ms lost={} contradictions={} reconnects={} fenced={} final={} repl_reconnects={} states=[{}] {}",
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
                    r.final_state.as_deref().unwrap_or("-"),
                    r.session_reconnects,
                    r.state_changes.join(","),
                    problems
                );
            }
            reports.push(r);
            if let Some(out) = &opts.out {
                write_report(out, opts, &reports)?;
            }
            if check_interrupted().is_err() {
                break 'outer;
            }
        }
    }
    Ok(reports)
}

fn write_report(out: &Path, opts: &Options, reports: &[RunReport]) -> Result<()> {
    let v = json!({
        "seed": opts.seed,
        "link_detect_ms": opts.detect_ms,
        "no_prepare_vm": opts.no_prepare_vm,
        "no_inbound_log": opts.no_inbound_log,
        "no_lan_copy": opts.no_lan_copy,
        "protect_args": opts.protect_args,
        "runs_per_point": opts.runs,
        "points": opts.points.iter().map(|p| p.name()).collect::<Vec<_>>(),
        "degradation": degradation(),
        "topology": "namespaces sw (bridges br-lan, br-ctl), p, b, w, c; primary's control link cut/netem'd; \
                     partition.x-y: blackhole routes between two hosts; link.*: replication through \
                     `testbed impair` in ns b (10.78.0.2:7410 -> 7400)",
        "impairments": Point::ALL.iter()
            .filter_map(|p| Some((p.name(), p.impairment().or(p.migration_impairment())?.describe())))
            .collect::<BTreeMap<_, _>>(),
        "migration_topology": "one namespace usm<pid>-<n>: bridge br0 10.79.0.1 with tap-s (source) and tap-d \
                     (destination); source and destination on its loopback (127.0.0.1:7300; migrate.link \
                     through `testbed impair` on :7310); migrate.partition takes lo down",
        "runs": reports.iter().map(RunReport::to_json).collect::<Vec<_>>(),
        "migration_recovery": reports.iter().any(|r| r.migration.is_some()).then(|| migrate::recovery_json(reports)),
        "summary_markdown": summary(reports),
    });
    fs::write(out, serde_json::to_string_pretty(&v)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    type Env = Vec<(&'static str, String)>;

    /// The env of both processes for `point`, with hit numbers drawn from `seed`.
    fn arm(point: Point, seed: u64) -> (Failpoints, Env, Env) {
        let mut rng = XorShift64(seed | 1);
        let f = Failpoints::choose(point, &mut |lo, hi| rng.range(lo, hi));
        let victim = Path::new("/run/x/primary.pid");
        let (p, b) = (f.env("primary", victim), f.env("backup", victim));
        (f, p, b)
    }

    fn hit(spec: &str, name: &str) -> u64 {
        spec.strip_prefix(name)
            .and_then(|r| r.strip_prefix('@'))
            .and_then(|k| k.parse().ok())
            .unwrap_or_else(|| panic!("{spec:?} is not {name}@K"))
    }

    #[test]
    fn resync_points_arm_the_backup_refusal_and_the_primary_resync() {
        for (point, j) in [(Point::Resync, 1), (Point::ResyncLate, 2)] {
            for seed in [1, 7, 20261204, u64::MAX] {
                let (f, p, b) = arm(point, seed);
                assert_eq!(p, [("UNDERSTUDY_FAILPOINTS", format!("primary.resync@{j}"))], "{point:?}");
                assert_eq!(b.len(), 1, "no victim: the primary kills itself: {b:?}");
                assert_eq!(b[0].0, "UNDERSTUDY_FAILPOINTS");
                let k = hit(&b[0].1, "backup.refuse");
                assert!((200..400).contains(&k), "K {k}");
                assert_eq!(f.describe(), Some(format!("backup.refuse@{k},primary.resync@{j}")));
                // The same seed arms the same K.
                assert_eq!(arm(point, seed).0, f);
            }
        }
        // K follows the seed.
        let ks: std::collections::BTreeSet<String> =
            (1..20).map(|seed| arm(Point::Resync, seed * 7919).0.backup.unwrap()).collect();
        assert!(ks.len() > 10, "{ks:?}");
    }

    #[test]
    fn checkpoint_counting_points_fire_no_sooner_than_min_k() {
        // At up to 100 epochs/s a K below MIN_K can fire before the client started (it did:
        // committed-unacked at K from 150, docs/results/faults-2026-12-07-s11/).
        for point in [Point::CommittedUnacked, Point::BackupCommitted, Point::Paused] {
            for seed in 1..200 {
                let (_, p, b) = arm(point, seed * 7919);
                let k = match point {
                    Point::Paused => hit(&p[0].1, "primary.paused"),
                    _ => hit(&b[0].1, "backup.committed"),
                };
                assert!(k >= MIN_K, "{} seed {seed}: K = {k}", point.name());
            }
        }
    }

    #[test]
    fn other_points_arm_as_before() {
        let (_, p, b) = arm(Point::Paused, 3);
        assert!(b.is_empty());
        assert!((250..500).contains(&hit(&p[0].1, "primary.paused")));
        let (_, p, b) = arm(Point::CommittedUnacked, 3);
        assert!(p.is_empty());
        assert!((250..500).contains(&hit(&b[0].1, "backup.committed")));
        assert_eq!(b[1], ("UNDERSTUDY_FAILPOINT_VICTIM", "/run/x/primary.pid".to_string()));
        let (_, p, b) = arm(Point::BackupCommitted, 3);
        assert!(p.is_empty() && b.len() == 1);
        let (f, p, b) = arm(Point::Kill, 3);
        assert!(!f.any() && p.is_empty() && b.is_empty() && f.describe().is_none());
    }

    #[test]
    fn resync_points_expect_promotion_and_get_a_longer_bound() {
        for p in [Point::Resync, Point::ResyncLate] {
            assert_eq!(Point::parse(p.name()).unwrap(), p);
            assert!(p.failpoint() && p.expects_promotion() && !p.expects_degraded());
            assert_eq!(p.final_states(), ["protected"]);
            assert_eq!(p.run_timeout(Duration::from_secs(45)), RESYNC_RUN_TIMEOUT);
            assert_eq!(p.run_timeout(Duration::from_secs(300)), Duration::from_secs(300));
        }
        assert_eq!(Point::Kill.run_timeout(Duration::from_secs(45)), Duration::from_secs(45));
        assert_eq!(Point::parse("resync").unwrap().name(), "resync");
        assert_eq!(Point::parse("resync.late").unwrap().name(), "resync.late");
    }
}
