//! QEMU's side: a source QEMU running the fixture guest, a destination started with
//! `-incoming defer`, both driven over QMP; the numbers are QEMU's own (`query-migrate`) plus
//! our clock and QMP event timestamps.

use super::qmp::{MigrateInfo, Qmp};
use super::series::{GuestLines, Marker, Progress};
use super::{Migrated, Migrator, Outcome, PostcopyStats, QemuConfig, RunEnv, Workload, kv};
use crate::env::free_local_port;
use crate::harness::interrupt::check_interrupted;
use crate::qemu::{QemuGuest, QemuOptions, TapNic};
use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// `max-bandwidth` for "unlimited": 1 TiB/s.
pub const UNLIMITED_BANDWIDTH: u64 = 1 << 40;
/// `downtime-limit` of the tuned configurations, ms.
pub const DOWNTIME_LIMIT_MS: u64 = 50;
/// Post-copy starts after this long if the first pass has not ended by then.
pub const POSTCOPY_AFTER: Duration = Duration::from_secs(1);
/// How often `query-migrate` is polled.
const POLL: Duration = Duration::from_millis(2);

/// A running QEMU and its QMP session.
type Vm = (QemuGuest, Qmp);

/// A QEMU migration of one run.
pub struct QemuMigration {
    config: QemuConfig,
    workload: Workload,
    dir: PathBuf,
    guest: PathBuf,
    certs: PathBuf,
    netns: Option<String>,
    converge_timeout: Duration,
    downtime_limit_ms: Option<u64>,
    max_bandwidth: Option<u64>,
    src: Option<Vm>,
    dst: Option<Vm>,
    src_lines: GuestLines,
    dst_lines: GuestLines,
}

/// QEMU's `total-time` and `downtime`, each left out (None, with a note) when it cannot be
/// right. Seen with QEMU 7.2 and `postcopy-ram`: a downtime of 13,029,094 ms (the host's
/// uptime: a start time never set) for a 935 ms migration, and a total and downtime of 0 for a
/// migration our clock saw take 12 ms. `seen_ms` is how long our polling saw it run.
pub fn plausible_times(info: &MigrateInfo, seen_ms: f64) -> (Option<f64>, Option<f64>, Vec<String>) {
    let mut notes = Vec::new();
    let mut total = info.total_time_ms.map(|t| t as f64);
    let mut down = info.downtime_ms.map(|d| d as f64);
    if let Some(t) = total
        && t < 1.0
        && seen_ms >= 5.0
    {
        notes.push(format!("QEMU reported total-time {t} ms for a migration seen to take {seen_ms:.0} ms: left out"));
        total = None;
        down = None;
    }
    if let (Some(d), Some(t)) = (down, total)
        && d > t
    {
        notes.push(format!("QEMU reported a downtime of {d} ms, longer than the whole {t} ms: left out"));
        down = None;
    }
    (total, down, notes)
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// utime + stime of a process, ms (`/proc/PID/stat`, clock ticks of 10 ms).
pub fn process_cpu_ms(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks * 10.0)
}

/// Peak resident set of a process, bytes (`VmHWM`).
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Capabilities, parameters and TLS credentials on one side.
fn configure(
    config: QemuConfig,
    (downtime_limit_ms, max_bandwidth): (Option<u64>, Option<u64>),
    certs: &Path,
    qmp: &mut Qmp,
    endpoint: &str,
) -> Result<()> {
    if config.postcopy() {
        // `postcopy-blocktime`: the destination measures how long vCPUs waited on missing
        // pages (QEMU 3.0 and later; `query-migrate` at the destination reports it).
        qmp.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "postcopy-ram", "state": true},
                                    {"capability": "postcopy-blocktime", "state": true}]}),
        )?;
    }
    let mut params = serde_json::Map::new();
    if config.tuned() {
        params.insert("max-bandwidth".into(), json!(UNLIMITED_BANDWIDTH));
        params.insert("downtime-limit".into(), json!(DOWNTIME_LIMIT_MS));
    }
    if let Some(ms) = downtime_limit_ms {
        params.insert("downtime-limit".into(), json!(ms));
    }
    if let Some(bps) = max_bandwidth {
        params.insert("max-bandwidth".into(), json!(bps));
    }
    if config.tls() {
        qmp.execute(
            "object-add",
            json!({"qom-type": "tls-creds-x509", "id": "tls0", "dir": certs.display().to_string(),
                   "endpoint": endpoint, "verify-peer": true}),
        )?;
        params.insert("tls-creds".into(), json!("tls0"));
        if endpoint == "client" {
            params.insert("tls-hostname".into(), json!("localhost"));
        }
    }
    if !params.is_empty() {
        qmp.execute("migrate-set-parameters", Value::Object(params))?;
    }
    Ok(())
}

/// The destination's `postcopy-blocktime` (ms all vCPUs were blocked at once) and
/// `postcopy-vcpu-blocktime` (ms per vCPU) from its `query-migrate` answer; None where QEMU
/// left them out (the capability off, or no post-copy phase).
pub fn blocktimes(dst_info: &Value) -> (Option<f64>, Option<Vec<f64>>) {
    let all = dst_info.get("postcopy-blocktime").and_then(Value::as_f64);
    let per = dst_info
        .get("postcopy-vcpu-blocktime")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_f64).collect());
    (all, per)
}

/// QEMU's vCPU blocked time for the table: the sum over vCPUs, left out (with a note) when it
/// is 0 although the destination asked for pages. QEMU 7.2 stamps faults with a millisecond
/// clock; in a W2 run with 428 page requests it reported 0 ms, which cannot be compared with a
/// microsecond measurement.
pub fn vcpu_blocked(per_vcpu: Option<&[f64]>, requests: Option<u64>) -> (Option<f64>, Option<String>) {
    let Some(per) = per_vcpu else { return (None, None) };
    let sum: f64 = per.iter().sum();
    match requests {
        Some(n) if n > 0 && sum == 0.0 => (
            None,
            Some(format!(
                "QEMU's postcopy-vcpu-blocktime is 0 ms for {n} page requests (ms-granular in QEMU 7.2): left out"
            )),
        ),
        _ => (Some(sum), None),
    }
}

impl QemuMigration {
    pub fn new(env: &RunEnv<'_>, workload: Workload, config: QemuConfig) -> Self {
        QemuMigration {
            config,
            workload,
            dir: env.dir.clone(),
            guest: env.guest.to_path_buf(),
            certs: env.qemu_certs.to_path_buf(),
            netns: env.net.map(|n| n.name().to_string()),
            converge_timeout: env.opts.converge_timeout,
            downtime_limit_ms: env.opts.qemu_downtime_limit_ms,
            max_bandwidth: env.opts.qemu_max_bandwidth,
            src: None,
            dst: None,
            src_lines: GuestLines::default(),
            dst_lines: GuestLines::default(),
        }
    }

    fn options(&self, qmp: &Path, tap: &str, incoming: bool) -> QemuOptions {
        let mut o = QemuOptions::new(&self.workload.cmdline());
        o.mem_mib = self.workload.mem_mib();
        o.image = Some(self.guest.clone());
        o.qmp = Some(qmp.to_path_buf());
        o.netns = self.netns.clone();
        if self.workload.kv() {
            o.tap = Some(TapNic { ifname: tap.into(), mac: kv::GUEST_MAC.into() });
        }
        if incoming {
            o.incoming = Some("defer".into());
        }
        o
    }

    /// Takes the lines both QEMUs printed (stamped on arrival by their reader threads).
    fn pump(&mut self) {
        if let Some((g, _)) = self.src.as_mut() {
            self.src_lines.add(g.drain_stamped());
        }
        if let Some((g, _)) = self.dst.as_mut() {
            self.dst_lines.add(g.drain_stamped());
        }
    }

    fn sides(&mut self) -> Result<(&mut Vm, &mut Vm)> {
        match (self.src.as_mut(), self.dst.as_mut()) {
            (Some(s), Some(d)) => Ok((s, d)),
            _ => bail!("both QEMUs must be started first"),
        }
    }
}

impl Migrator for QemuMigration {
    fn start_source(&mut self) -> Result<()> {
        let qmp_path = self.dir.join("src.qmp");
        let mut g = QemuGuest::spawn(&self.options(&qmp_path, kv::SOURCE_TAP, false))?;
        g.wait_ready(Duration::from_secs(20)).context("source QEMU")?;
        let q = Qmp::connect(&qmp_path, Duration::from_secs(10))?;
        self.src = Some((g, q));
        Ok(())
    }

    fn source_lines(&mut self) -> Vec<String> {
        self.pump();
        self.src_lines.take()
    }

    fn start_destination(&mut self) -> Result<()> {
        let qmp_path = self.dir.join("dst.qmp");
        let g = QemuGuest::spawn(&self.options(&qmp_path, kv::DEST_TAP, true))?;
        let mut q = Qmp::connect(&qmp_path, Duration::from_secs(10))
            .with_context(|| format!("destination QEMU: {}", g.stderr().trim()))?;
        let st = q.execute("query-status", Value::Null)?;
        ensure!(st["status"] == "inmigrate", "the destination QEMU is {}, not waiting for a migration", st["status"]);
        self.dst = Some((g, q));
        Ok(())
    }

    fn migrate(&mut self) -> Result<Migrated> {
        let config = self.config;
        let timeout = self.converge_timeout;
        let limits = (self.downtime_limit_ms, self.max_bandwidth);
        let uri = if config.tls() {
            format!("tcp:127.0.0.1:{}", free_local_port()?)
        } else {
            format!("unix:{}", self.dir.join("migration.sock").display())
        };
        let certs = self.certs.clone();
        let (src, dst) = self.sides()?;
        configure(config, limits, &certs, &mut src.1, "client")?;
        configure(config, limits, &certs, &mut dst.1, "server")?;
        let params = src.1.execute("query-migrate-parameters", Value::Null)?;
        dst.1.execute("migrate-incoming", json!({ "uri": uri }))?;
        let (src_pid, dst_pid) = (src.0.pid(), dst.0.pid());
        let cpu0 = (process_cpu_ms(src_pid), process_cpu_ms(dst_pid));
        let sent_us = now_us();
        let t0 = Instant::now();
        src.1.execute("migrate", json!({ "uri": uri }))?;
        let mut postcopy_at: Option<Duration> = None;
        let mut cancelled = false;
        let mut polls = 0u64;
        // The last answer with RAM numbers: a cancelled migration's has none.
        let mut last_active = MigrateInfo::default();
        let info = loop {
            check_interrupted()?;
            let info = MigrateInfo::parse(&src.1.execute("query-migrate", Value::Null)?);
            polls += 1;
            if info.finished() {
                break info;
            }
            if info.ram_transferred.is_some() {
                last_active = info.clone();
            }
            let elapsed = t0.elapsed();
            if config.postcopy()
                && postcopy_at.is_none()
                && info.status == "active"
                && (info.dirty_sync_count.unwrap_or(0) >= 2 || elapsed >= POSTCOPY_AFTER)
            {
                src.1.execute("migrate-start-postcopy", Value::Null)?;
                postcopy_at = Some(elapsed);
            }
            if elapsed > timeout && !cancelled {
                if info.status == "postcopy-active" {
                    // Post-copy cannot be cancelled: the guest runs at the destination already.
                    if elapsed > timeout * 2 {
                        bail!("post-copy still running after {:?}", timeout * 2);
                    }
                } else {
                    src.1.execute("migrate_cancel", Value::Null)?;
                    cancelled = true;
                }
            }
            if cancelled && elapsed > timeout + Duration::from_secs(10) {
                bail!("QEMU did not cancel the migration within 10 s (status {})", info.status);
            }
            std::thread::sleep(POLL);
        };
        let end = t0.elapsed();
        let cpu1 = (process_cpu_ms(src_pid), process_cpu_ms(dst_pid));
        let (total_ms, downtime_ms, notes) = plausible_times(&info, end.as_secs_f64() * 1e3);
        let mut m = Migrated {
            outcome: match info.status.as_str() {
                "completed" => Outcome::Completed,
                "cancelled" if cancelled => Outcome::DidNotConverge,
                s => Outcome::Failed(format!(
                    "QEMU says {s}: {}",
                    info.error_desc.clone().unwrap_or_else(|| "no error-desc".into())
                )),
            },
            total_ms,
            downtime_ms,
            bytes: info.ram_transferred,
            wall_ms: None,
            paused_ms: None,
            postcopy_requested_ms: postcopy_at.map(|d| d.as_secs_f64() * 1e3),
            postcopy_ran: config
                .postcopy()
                .then(|| info.postcopy_bytes.unwrap_or(0) > 0 || info.postcopy_requests.unwrap_or(0) > 0),
            notes,
            postcopy: PostcopyStats::default(),
            started_unix_s: Some(sent_us as f64 / 1e6),
            markers: Vec::new(),
            reverse: None,
            detail: Value::Null,
        };
        if m.outcome == Outcome::DidNotConverge {
            m.total_ms = Some(end.as_secs_f64() * 1e3);
            m.bytes = last_active.ram_transferred;
            // The guest must run on at the source.
            let st = src.1.execute("query-status", Value::Null)?;
            if st["status"] != "running" {
                m.outcome = Outcome::Failed(format!("cancelled, and the source is {}, not running", st["status"]));
            }
        }
        // Our clock: the migrate command to the destination's RESUME event (QEMU stamps events
        // with the host's wall clock); QEMU's own downtime cross-checked with the source's
        // STOP and the destination's RESUME.
        let mut resume_us = None;
        if m.outcome == Outcome::Completed {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let st = dst.1.execute("query-status", Value::Null)?;
                if st["status"] == "running" {
                    break;
                }
                if Instant::now() > deadline {
                    m.outcome = Outcome::Failed(format!("the destination is {} 10 s after completion", st["status"]));
                    break;
                }
                std::thread::sleep(POLL);
            }
            dst.1.poll_events(Duration::from_millis(50))?;
            resume_us = dst.1.event("RESUME").map(|e| e.timestamp_us);
            m.wall_ms = resume_us.map(|r| r.saturating_sub(sent_us) as f64 / 1e3);
        }
        src.1.poll_events(Duration::from_millis(5))?;
        let stop_us = src.1.event("STOP").map(|e| e.timestamp_us);
        m.paused_ms = stop_us.zip(resume_us).map(|(s, r)| r.saturating_sub(s) as f64 / 1e3);
        let since = |us: u64| (us as f64 - sent_us as f64) / 1e3;
        m.markers = [
            ("postcopy", postcopy_at.map(|d| d.as_secs_f64() * 1e3)),
            ("pause", stop_us.map(since)),
            ("resume", resume_us.map(since)),
            ("complete", (m.outcome == Outcome::Completed).then_some(end.as_secs_f64() * 1e3)),
        ]
        .into_iter()
        .filter_map(|(name, ms)| ms.map(|ms| Marker::new(name, ms)))
        .collect();
        let mut blocktime = Value::Null;
        if config.postcopy() && m.outcome == Outcome::Completed {
            // The destination's view: how long its vCPUs waited on pages (ms).
            let dst_info = dst.1.execute("query-migrate", Value::Null)?;
            let (all, per_vcpu) = blocktimes(&dst_info);
            if m.postcopy_ran == Some(true) {
                m.postcopy.pages_demanded = info.postcopy_requests;
                let (blocked, note) = vcpu_blocked(per_vcpu.as_deref(), info.postcopy_requests);
                m.postcopy.vcpu_blocked_ms = blocked;
                m.notes.extend(note);
            }
            blocktime = json!({"postcopy_blocktime_ms": all, "postcopy_vcpu_blocktime_ms": per_vcpu});
        }
        let delta = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| b - a);
        m.detail = json!({
            "uri": uri,
            "parameters": params,
            "status": info.status,
            "setup_time_ms": info.setup_time_ms,
            "ram_total": info.ram_total,
            "dirty_sync_count": info.dirty_sync_count,
            "precopy_bytes": info.precopy_bytes,
            "postcopy_bytes": info.postcopy_bytes,
            "downtime_bytes": info.downtime_bytes,
            "zero_pages": info.duplicate_pages,
            "normal_pages": info.normal_pages,
            "postcopy_requests": info.postcopy_requests,
            "postcopy_started_ms": postcopy_at.map(|d| d.as_secs_f64() * 1e3),
            "destination_blocktime": blocktime,
            "polls": polls,
            "end_seen_ms": end.as_secs_f64() * 1e3,
            "last_active": {"status": last_active.status, "ram_transferred": last_active.ram_transferred,
                            "ram_remaining": last_active.ram_remaining, "dirty_sync_count": last_active.dirty_sync_count,
                            "expected_downtime_ms": last_active.expected_downtime_ms},
            "source_cpu_ms": delta(cpu0.0, cpu1.0),
            "dest_cpu_ms": delta(cpu0.1, cpu1.1),
            "source_peak_rss_bytes": peak_rss_bytes(src_pid),
            "dest_peak_rss_bytes": peak_rss_bytes(dst_pid),
        });
        Ok(m)
    }

    fn dest_lines(&mut self) -> Vec<String> {
        self.pump();
        self.dst_lines.take()
    }

    fn progress(&mut self) -> Vec<Progress> {
        self.pump();
        [self.src_lines.progress(), self.dst_lines.progress()].concat()
    }

    fn logs(&self) -> String {
        let tail = |g: &QemuGuest| {
            let seen = g.seen();
            format!("{:?}; stderr {:?}", &seen[seen.len().saturating_sub(5)..], g.stderr().trim())
        };
        format!(
            "source QEMU: {}\ndestination QEMU: {}",
            self.src.as_ref().map_or("not started".into(), |(g, _)| tail(g)),
            self.dst.as_ref().map_or("not started".into(), |(g, _)| tail(g)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impossible_qemu_times_are_left_out_with_a_note() {
        let info = |down, total| MigrateInfo { downtime_ms: down, total_time_ms: total, ..MigrateInfo::default() };
        assert_eq!(plausible_times(&info(Some(13), Some(108)), 110.0), (Some(108.0), Some(13.0), vec![]));
        let (t, d, notes) = plausible_times(&info(Some(13_029_094), Some(935)), 940.0);
        assert_eq!((t, d), (Some(935.0), None));
        assert!(notes[0].contains("downtime of 13029094 ms"), "{notes:?}");
        let (t, d, notes) = plausible_times(&info(Some(0), Some(0)), 12.0);
        assert_eq!((t, d), (None, None));
        assert!(notes[0].contains("total-time 0 ms") && notes[0].contains("12 ms"), "{notes:?}");
        // A really short migration may round to 0.
        assert_eq!(plausible_times(&info(Some(0), Some(0)), 3.0), (Some(0.0), Some(0.0), vec![]));
        assert_eq!(plausible_times(&info(None, None), 3.0), (None, None, vec![]));
    }

    #[test]
    fn destination_blocktimes() {
        let v = json!({"status": "completed", "postcopy-blocktime": 212, "postcopy-vcpu-blocktime": [212]});
        assert_eq!(blocktimes(&v), (Some(212.0), Some(vec![212.0])));
        assert_eq!(blocktimes(&json!({"status": "completed"})), (None, None));
        assert_eq!(vcpu_blocked(Some(&[3.0, 4.0]), Some(428)), (Some(7.0), None));
        assert_eq!(vcpu_blocked(Some(&[0.0]), Some(0)), (Some(0.0), None));
        assert_eq!(vcpu_blocked(None, Some(428)), (None, None));
        let (b, note) = vcpu_blocked(Some(&[0.0]), Some(428));
        assert_eq!(b, None);
        assert!(note.unwrap().contains("0 ms for 428 page requests"));
    }

    #[test]
    fn process_numbers_come_from_proc() {
        let me = std::process::id();
        assert!(process_cpu_ms(me).is_some());
        assert!(peak_rss_bytes(me).unwrap() > 1 << 20);
        assert_eq!(process_cpu_ms(u32::MAX), None);
    }
}
