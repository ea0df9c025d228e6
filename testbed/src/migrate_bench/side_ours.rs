//! Our side: `understudy run` as the source, `understudy receive` as the destination,
//! `understudy migrate --json` between them (the commands of issue 13). The numbers are the
//! ones `migrate` reports, plus our clock around the command.

use super::reverse::{DEST_LINE, ReverseStats};
use super::series::{self, GuestLines, Marker, Progress};
use super::{Config, Migrated, Migrator, Outcome, PostcopyStats, RunEnv, Workload, kv};
use crate::harness::interrupt::check_interrupted;
use crate::harness::netns::command_in;
use crate::harness::proc::{Proc, die_with_parent, run_bounded};
use crate::harness::wait::StampedLines;
use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The source's certificate name.
pub const SOURCE_NAME: &str = "src";
/// The destination's certificate name.
pub const DEST_NAME: &str = "dest";
/// Bound of one `understudy migrate`.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the destination's reverse-checkpoint line may come after `migrate` returned.
const REVERSE_LINE_WAIT: Duration = Duration::from_secs(2);

/// Whether `bin` has the migration commands: an error saying why not (missing binary,
/// `migrate` or `receive` an unknown subcommand).
pub fn available(bin: &Path) -> Result<()> {
    ensure!(bin.is_file(), "{} is missing (cargo build --release -p understudy)", bin.display());
    for sub in ["migrate", "receive"] {
        let out = Command::new(bin).args([sub, "--help"]).stdin(Stdio::null()).output()?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let first = err.lines().next().unwrap_or("").trim().to_string();
            bail!("{} has no `{sub}` command yet ({first})", bin.display());
        }
    }
    Ok(())
}

/// `understudy certs --out DIR --host src --host dest`.
pub fn make_certs(bin: &Path, dir: &Path) -> Result<()> {
    let out = Command::new(bin)
        .args(["certs", "--out"])
        .arg(dir)
        .args(["--host", SOURCE_NAME, "--host", DEST_NAME])
        .stdin(Stdio::null())
        .output()
        .context("run understudy certs")?;
    ensure!(out.status.success(), "understudy certs failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// Our migration of one run.
pub struct OurMigration {
    bin: PathBuf,
    mode: String,
    /// `--no-reverse`: post-copy without reverse checkpoints.
    no_reverse: bool,
    workload: Workload,
    dir: PathBuf,
    guest: PathBuf,
    certs: PathBuf,
    netns: Option<String>,
    port: u16,
    src: Option<Proc>,
    dst: Option<Proc>,
    /// The guests' serial files, read every [`SERIAL_POLL`] by a thread each.
    src_serial: StampedLines,
    dst_serial: StampedLines,
    src_lines: GuestLines,
    dst_lines: GuestLines,
}

/// How often the serial files are read: the precision of the `dirty prog` lines' times.
const SERIAL_POLL: Duration = Duration::from_millis(2);

impl OurMigration {
    pub fn new(env: &RunEnv<'_>, workload: Workload, config: &Config) -> Self {
        OurMigration {
            bin: env.opts.understudy.clone(),
            mode: config.our_mode().unwrap_or_default().to_string(),
            no_reverse: config.no_reverse(),
            workload,
            dir: env.dir.clone(),
            guest: env.guest.to_path_buf(),
            certs: env.our_certs.to_path_buf(),
            netns: env.net.map(|n| n.name().to_string()),
            port: 0,
            src: None,
            dst: None,
            src_serial: StampedLines::follow(env.dir.join("src-serial.log"), SERIAL_POLL),
            dst_serial: StampedLines::follow(env.dir.join("dst-serial.log"), SERIAL_POLL),
            src_lines: GuestLines::default(),
            dst_lines: GuestLines::default(),
        }
    }

    /// `understudy ARGS` (inside the namespace for W3).
    fn command(&self, args: &[String]) -> Command {
        let mut c = command_in(self.netns.as_deref(), &self.bin);
        c.args(args).env("UNDERSTUDY_LOG", "info").env("NO_COLOR", "1");
        die_with_parent(&mut c);
        c
    }

    fn spawn(&self, name: &'static str, args: &[String]) -> Result<Proc> {
        let stderr = self.dir.join(format!("{name}.stderr"));
        Proc::start(self.command(args).stdout(Stdio::null()), name, stderr)
            .with_context(|| format!("start understudy ({name})"))
    }

    fn memory(&self) -> String {
        format!("{}M", self.workload.mem_mib())
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// Reads `understudy migrate --json`'s report into the common shape.
pub fn parse_report(stdout: &str) -> Result<Migrated> {
    let start = stdout.find('{').with_context(|| format!("no JSON report on stdout: {stdout:?}"))?;
    // The first JSON value on stdout; anything printed after it is ignored.
    let mut de = serde_json::Deserializer::from_str(&stdout[start..]);
    let v =
        <Value as serde::Deserialize>::deserialize(&mut de).with_context(|| format!("migrate report {stdout:?}"))?;
    let num = |k: &str| v.get(k).and_then(Value::as_f64);
    let mut notes = Vec::new();
    if let Some(r) = v.get("stop_reason").and_then(Value::as_str) {
        notes.push(format!("stop: {r}"));
    }
    if v.get("handover_confirmed").and_then(Value::as_bool) == Some(false) {
        notes.push("the destination did not confirm the post-copy hand-over within 5 s".into());
    }
    Ok(Migrated {
        outcome: Outcome::Completed,
        total_ms: num("total_ms"),
        downtime_ms: num("downtime_ms"),
        bytes: v.get("bytes_transferred").and_then(Value::as_u64),
        wall_ms: None,
        paused_ms: None,
        postcopy_requested_ms: None,
        postcopy_ran: None,
        notes,
        postcopy: PostcopyStats::from_report(&v),
        started_unix_s: None,
        markers: Vec::new(),
        reverse: None,
        detail: v,
    })
}

/// The source logs this right after it starts the migration (the report's clock starts there).
pub const START_LINE: &str = "migration: idle -> connecting";

/// The migration's moments from the report, ms since it started: `pause` and `resume` (the
/// downtime ends with the destination's word that it runs the guest), `complete` (`total_ms`:
/// for post-copy modes, every page at the destination, `postcopy_ms` after the resume).
pub fn report_markers(m: &Migrated) -> Vec<Marker> {
    let Some(total) = m.total_ms else { return Vec::new() };
    let resume = total - m.postcopy.postcopy_ms.unwrap_or(0.0);
    let mut v = Vec::new();
    if let Some(down) = m.downtime_ms {
        v.push(Marker::new("pause", resume - down));
    }
    v.push(Marker::new("resume", resume));
    v.push(Marker::new("complete", total));
    v
}

/// The destination's reverse-checkpoint numbers (its log `log`) into `m`, when a post-copy
/// phase ran with them (waiting up to `wait` for the line: it may come a moment after `migrate`
/// returned) or the line is there anyway; a note when they are missing where expected or
/// present where `--no-reverse` turned them off.
pub fn read_reverse(log: &Path, m: &mut Migrated, no_reverse: bool, wait: Duration) {
    let expected = m.postcopy.postcopy_ms.is_some() && !no_reverse;
    let deadline = Instant::now() + if expected { wait } else { Duration::ZERO };
    let found = loop {
        let found = ReverseStats::from_log(&std::fs::read_to_string(log).unwrap_or_default());
        if !matches!(found, Ok(None)) || Instant::now() >= deadline {
            break found;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    match found {
        Ok(Some(r)) => {
            if no_reverse {
                m.notes.push(format!("reverse checkpoints ran despite --no-reverse ({} epochs)", r.epochs));
            }
            m.reverse = Some(r);
        }
        Ok(None) if expected => m.notes.push(format!("post-copy ran but the destination logged no {DEST_LINE:?} line")),
        Ok(None) => {}
        Err(e) => m.notes.push(format!("{e:#}")),
    }
}

impl Migrator for OurMigration {
    fn start_source(&mut self) -> Result<()> {
        let mut args: Vec<String> = ["run", "--kernel"].map(String::from).to_vec();
        args.push(self.guest.display().to_string());
        args.extend(["--cmdline".into(), self.workload.cmdline(), "--memory".into(), self.memory()]);
        args.extend(["--serial".into(), self.path("src-serial.log"), "--api".into(), self.path("src.sock")]);
        if self.workload.kv() {
            args.extend(["--tap".into(), kv::SOURCE_TAP.into()]);
        }
        let mut p = self.spawn("source", &args)?;
        let serial = self.dir.join("src-serial.log");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            check_interrupted()?;
            let text = std::fs::read_to_string(&serial).unwrap_or_default();
            if text.lines().any(|l| l.trim() == "ready") && self.dir.join("src.sock").exists() {
                break;
            }
            ensure!(p.alive(), "understudy run exited early:\n{}", p.stderr_tail(8));
            ensure!(Instant::now() < deadline, "the source guest was not ready in 20 s:\n{text}\n{}", p.stderr_tail(8));
            std::thread::sleep(Duration::from_millis(5));
        }
        self.src = Some(p);
        Ok(())
    }

    fn source_lines(&mut self) -> Vec<String> {
        self.src_lines.add(self.src_serial.drain());
        self.src_lines.take()
    }

    fn start_destination(&mut self) -> Result<()> {
        self.port = crate::env::free_local_udp_port()?;
        let mut args: Vec<String> = ["receive", "--listen"].map(String::from).to_vec();
        args.push(format!("127.0.0.1:{}", self.port));
        args.extend(["--certs".into(), self.certs.display().to_string(), "--memory".into(), self.memory()]);
        args.extend(["--name".into(), DEST_NAME.into(), "--source-name".into(), SOURCE_NAME.into()]);
        args.extend(["--api".into(), self.path("dst.sock"), "--serial".into(), self.path("dst-serial.log")]);
        if self.workload.kv() {
            args.extend(["--tap".into(), kv::DEST_TAP.into()]);
        }
        let mut p = self.spawn("destination", &args)?;
        // It listens once its API socket is there (or, at the latest, after a moment).
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.dir.join("dst.sock").exists() && Instant::now() < deadline {
            check_interrupted()?;
            std::thread::sleep(Duration::from_millis(5));
        }
        ensure!(p.alive(), "understudy receive exited early:\n{}", p.stderr_tail(8));
        self.dst = Some(p);
        Ok(())
    }

    fn migrate(&mut self) -> Result<Migrated> {
        let mut args: Vec<String> = ["migrate", "--api"].map(String::from).to_vec();
        args.extend([self.path("src.sock"), "--to".into(), format!("127.0.0.1:{}", self.port)]);
        args.extend(["--certs".into(), self.certs.display().to_string()]);
        args.extend(["--name".into(), SOURCE_NAME.into(), "--dest-name".into(), DEST_NAME.into()]);
        args.extend(["--mode".into(), self.mode.clone(), "--json".into()]);
        if self.no_reverse {
            args.push("--no-reverse".into());
        }
        let command_unix_s = super::unix_seconds();
        let (out, took) = run_bounded(&mut self.command(&args), MIGRATE_TIMEOUT)?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        std::fs::write(self.dir.join("migrate.stdout"), &stdout)?;
        std::fs::write(self.dir.join("migrate.stderr"), &stderr)?;
        if !out.status.success() {
            let tail: Vec<&str> = stderr.lines().rev().take(4).collect::<Vec<_>>().into_iter().rev().collect();
            return Ok(Migrated::failed(format!("understudy migrate: {} ({})", tail.join(" / "), out.status)));
        }
        let mut m = parse_report(&stdout)?;
        m.wall_ms = Some(took.as_secs_f64() * 1e3);
        // The series' zero: when the source started the migration (its log says), else when
        // the command started.
        let src_log = std::fs::read_to_string(self.dir.join("source.stderr")).unwrap_or_default();
        let started = series::log_time(&src_log, START_LINE);
        if started.is_none() {
            m.notes.push(format!("no {START_LINE:?} in the source's log: times from the command's start"));
        }
        let zero = started.unwrap_or(command_unix_s);
        m.started_unix_s = Some(zero);
        m.markers = report_markers(&m);
        m.markers.insert(0, Marker::new("command", (command_unix_s - zero) * 1e3));
        // The source exits on its own once the destination runs the guest.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut src_exited = false;
        while Instant::now() < deadline {
            if let Some(p) = self.src.as_mut()
                && !p.alive()
            {
                src_exited = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if !src_exited {
            m.notes.push("the source process did not exit within 5 s".into());
        }
        read_reverse(&self.dir.join("destination.stderr"), &mut m, self.no_reverse, REVERSE_LINE_WAIT);
        if let Some(p) = self.dst.as_mut()
            && !p.alive()
        {
            m.outcome = Outcome::Failed(format!("the destination exited after the migration:\n{}", p.stderr_tail(8)));
        }
        m.detail["harness"] = json!({ "source_exited": src_exited, "migrate_wall_ms": m.wall_ms });
        Ok(m)
    }

    fn dest_lines(&mut self) -> Vec<String> {
        self.dst_lines.add(self.dst_serial.drain());
        self.dst_lines.take()
    }

    fn progress(&mut self) -> Vec<Progress> {
        self.src_lines.add(self.src_serial.drain());
        self.dst_lines.add(self.dst_serial.drain());
        [self.src_lines.progress(), self.dst_lines.progress()].concat()
    }

    fn logs(&self) -> String {
        let tail =
            |p: &Option<Proc>| p.as_ref().map_or("not started".into(), |p| format!("{}: {}", p.name, p.stderr_tail(8)));
        format!("{}\n{}", tail(&self.src), tail(&self.dst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrate_report_maps_to_the_common_shape() {
        let out = r#"{"mode": "precopy", "stop_reason": "downtime fits", "rounds": [{"pages": 65536}],
            "total_ms": 41.5, "downtime_ms": 1.25, "bytes_transferred": 12345678, "bytes_retransferred": 1000,
            "pages": {"zero": 40000, "raw": 20000}, "source_cpu_ms": 30.0, "dest_cpu_ms": 20.0,
            "source_peak_rss_bytes": 300000000, "dest_peak_rss_bytes": 280000000}
            migrated in 41 ms"#;
        let m = parse_report(out).unwrap();
        assert_eq!(m.outcome, Outcome::Completed);
        assert_eq!((m.total_ms, m.downtime_ms, m.bytes), (Some(41.5), Some(1.25), Some(12_345_678)));
        assert_eq!(m.notes, ["stop: downtime fits"]);
        assert_eq!(m.detail["pages"]["zero"], 40000);
        assert!(parse_report("error: nothing").unwrap_err().to_string().contains("no JSON report"));
        assert_eq!(m.postcopy, PostcopyStats::default(), "pre-copy reports none of post-copy's fields");
        assert_eq!(m.postcopy.to_json(), json!({}));
        assert_eq!(
            report_markers(&m),
            [Marker::new("pause", 40.25), Marker::new("resume", 41.5), Marker::new("complete", 41.5)]
        );
    }

    #[test]
    fn postcopy_report_fields_and_markers() {
        let out = r#"{"mode": "auto", "stop_reason": "postcopy", "total_ms": 500.0, "downtime_ms": 2.5,
            "bytes_transferred": 1000, "postcopy_faults": 812, "fault_us_p50": 95.5, "fault_us_p99": 640.0,
            "pages_pushed": 30000, "pages_demanded": 812, "vcpu_blocked_ms": 120.25, "switchover_round": 1,
            "chosen_mode": "hybrid", "choice_reason": "dirty rate 2.1 GB/s > link 1.2 GB/s", "postcopy_ms": 420.0,
            "reconnects": 1, "pages_held_at_switchover": 100, "page_requests": 800}"#;
        let m = parse_report(out).unwrap();
        let p = &m.postcopy;
        assert_eq!(
            (p.faults, p.pages_pushed, p.pages_demanded, p.switchover_round),
            (Some(812), Some(30000), Some(812), Some(1))
        );
        assert_eq!((p.fault_us_p50, p.fault_us_p99, p.vcpu_blocked_ms), (Some(95.5), Some(640.0), Some(120.25)));
        assert_eq!(p.chosen_mode.as_deref(), Some("hybrid"));
        assert_eq!(p.to_json()["choice_reason"], "dirty rate 2.1 GB/s > link 1.2 GB/s");
        assert_eq!(p.to_json()["postcopy_faults"], 812);
        assert_eq!(p.reconnects, Some(1));
        let mut r =
            super::super::RunResult::new(Workload::W2, &super::super::Config::Ours("auto".into()), 1, m.clone());
        r.guest_ok = Some(true);
        r.guest_note = "ok".into();
        assert_eq!(
            r.line(),
            "W2 understudy auto run 1: completed; total 500.0 ms, downtime 2.5 ms, paused - ms, 0.0 MB, wall - ms, \
             812 faults (p50 95.5 µs, p99 640.0 µs), pages pushed 30000 / demanded 812, vCPU blocked 120.2 ms, \
             switched to post-copy after round 1, 1 reconnects during post-copy, \
             chose hybrid (dirty rate 2.1 GB/s > link 1.2 GB/s); guest ok: ok; stop: postcopy"
        );
        assert_eq!(
            (p.reverse_checkpoints, p.reverse_pages, p.reverse_sessions, p.handover_confirmed),
            (None, None, None, None),
            "no reverse checkpoints in this report"
        );
        assert!(p.to_json().get("handover_confirmed").is_none());
        // With reverse checkpoints, the source's side of them; an unconfirmed hand-over is said.
        let reversed = out.replace("\"reconnects\": 1,", "\"reconnects\": 0, \"reverse_checkpoints\": 14, \"reverse_pages\": 9000, \"reverse_sessions\": 1, \"handover_confirmed\": false,");
        let m2 = parse_report(&reversed).unwrap();
        let p2 = &m2.postcopy;
        assert_eq!(
            (p2.reverse_checkpoints, p2.reverse_pages, p2.reverse_sessions, p2.handover_confirmed),
            (Some(14), Some(9000), Some(1), Some(false))
        );
        assert_eq!(p2.to_json()["reverse_pages"], 9000);
        assert_eq!(m2.notes, ["stop: postcopy", "the destination did not confirm the post-copy hand-over within 5 s"]);
        let r2 = super::super::RunResult::new(Workload::W2, &super::super::Config::Ours("auto".into()), 1, m2);
        assert!(
            r2.line()
                .contains("1.2 GB/s), 14 reverse checkpoints committed at the source (9000 pages, 1 sessions); stop"),
            "{}",
            r2.line()
        );
        let confirmed =
            parse_report(&reversed.replace("\"handover_confirmed\": false", "\"handover_confirmed\": true"));
        assert_eq!(confirmed.unwrap().notes, ["stop: postcopy"]);
        // Resumed 420 ms before every page was there, paused 2.5 ms before that.
        assert_eq!(
            report_markers(&m),
            [Marker::new("pause", 77.5), Marker::new("resume", 80.0), Marker::new("complete", 500.0)]
        );
    }

    #[test]
    fn reverse_numbers_come_from_the_destinations_log_where_post_copy_ran() {
        let dir = crate::harness::tempdir::TempDir::for_process("us-reverse-log-test", false).unwrap();
        let log = dir.join("destination.stderr");
        let line = "2026-12-06T16:50:01.1Z  INFO node::runtime: reverse checkpoints stopped (given up): held output \
            released frames=1 bytes=60 epochs=7 last_acked=9 pause_us_p50=300.0 pause_us_p99=900.0 \
            dirty_pages_mean=850.5 dirty_pages_p99=1200.0 ack_us_p50=700.0 ack_us_p99=1500.0";
        std::fs::write(&log, format!("t INFO MIGRATED: the guest runs here\n{line}\n")).unwrap();
        let postcopy = || {
            let mut m = Migrated::failed("");
            m.postcopy.postcopy_ms = Some(250.0);
            m
        };
        let mut m = postcopy();
        read_reverse(&log, &mut m, false, Duration::ZERO);
        let r = m.reverse.as_ref().unwrap();
        assert_eq!((r.epochs, r.last_acked, r.pause_us_p99, r.dirty_pages_mean), (7, 9, Some(900.0), Some(850.5)));
        assert!(m.notes.is_empty(), "{:?}", m.notes);
        // With --no-reverse the line must not be there: said when it is.
        let mut m = postcopy();
        read_reverse(&log, &mut m, true, Duration::ZERO);
        assert_eq!(m.notes, ["reverse checkpoints ran despite --no-reverse (7 epochs)"]);
        // Post-copy ran, the line is missing: waited for, then said.
        let empty = dir.join("empty.stderr");
        std::fs::write(&empty, "t INFO MIGRATED: the guest runs here\n").unwrap();
        let mut m = postcopy();
        let t0 = Instant::now();
        read_reverse(&empty, &mut m, false, Duration::from_millis(100));
        assert!(t0.elapsed() >= Duration::from_millis(100) && m.reverse.is_none());
        assert_eq!(m.notes, ["post-copy ran but the destination logged no \"reverse checkpoints stopped (\" line"]);
        // No post-copy phase (pre-copy, or auto chose it), or --no-reverse: nothing expected, no wait.
        let mut m = Migrated::failed("");
        let t0 = Instant::now();
        read_reverse(&empty, &mut m, false, Duration::from_secs(5));
        let mut n = postcopy();
        read_reverse(&empty, &mut n, true, Duration::from_secs(5));
        assert!(t0.elapsed() < Duration::from_secs(1) && m.notes.is_empty() && n.notes.is_empty());
        // A line it cannot read is said, not skipped.
        std::fs::write(&log, line.replace("epochs=7", "epochs=x")).unwrap();
        let mut m = postcopy();
        read_reverse(&log, &mut m, false, Duration::ZERO);
        assert!(m.reverse.is_none() && m.notes[0].starts_with("epochs=\"x\" is not a count"), "{:?}", m.notes);
    }

    #[test]
    fn a_binary_without_migrate_is_reported_not_run() {
        let e = available(Path::new("/nonexistent/understudy")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/understudy is missing"), "{e}");
        // `true` accepts any arguments: it stands for a binary that has both commands.
        if let Some(t) = crate::env::find_in_path("true") {
            available(&t).unwrap();
        }
        if let Some(f) = crate::env::find_in_path("false") {
            assert!(available(&f).unwrap_err().to_string().contains("has no `migrate` command yet"));
        }
    }
}
