//! Migration of a running VM, both ends, as a node does it: the source side builds the driver's
//! inputs from the VM ([`source`]); the destination side builds the receiver's configuration
//! ([`destination_config`]). The drivers are `primary::migrate` and `backup::receive`. For the
//! CLI: the request's flags ([`MigrateArgs`]) and the progress and report as people read them
//! ([`progress_line`], [`report_table`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use primary::migrate::{Control, MigrateRequest, Mode, Source};
use vmm::vm::Vm;

/// Errors of setting a migration up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The VM's memory layout cannot go on the wire.
    #[error(transparent)]
    Layout(#[from] backup::server::BackupError),
    /// Certificates.
    #[error("load certificates for {name} from {dir}")]
    Identity {
        /// The name.
        name: String,
        /// The directory.
        dir: String,
        /// Why.
        #[source]
        source: transport::certs::LoadError,
    },
    /// Our certificate may not carry a migration.
    #[error(transparent)]
    Policy(#[from] transport::PolicyError),
}

/// Session timing of a migration: heartbeats every 20 ms, the peer gone after 1 s of silence.
pub fn timing() -> replication_proto::Timing {
    crate::protect::timing(20, 1000, 0)
}

/// The source driver's inputs for `vm` named `vm_name`.
pub fn source(vm: &Arc<Mutex<Vm>>, vm_name: &str, control: Arc<Control>) -> Result<Source, SetupError> {
    let layout = {
        let g = vm.lock().unwrap_or_else(|e| e.into_inner());
        vmm::memory::layout_of(g.memory())
    };
    Ok(Source {
        vm: Arc::clone(vm),
        identity: backup::server::vm_identity(vm_name),
        layout: backup::server::proto_layout(&layout)?,
        control,
        tuning: transport::Tuning::default(),
        timing: timing(),
        // Tests of mixed versions: act as a build of an older protocol version.
        version: std::env::var("UNDERSTUDY_PROTOCOL_VERSION").ok().and_then(|v| v.parse().ok()),
    })
}

/// A destination's configuration: listen on `listen` as `name` (certificates in `certs`),
/// admit only `source_name`, for VM `vm_name` of `memory_bytes`.
pub fn destination_config(
    listen: SocketAddr,
    certs: &std::path::Path,
    name: &str,
    source_name: &str,
    vm_name: &str,
    memory_bytes: u64,
    verify: bool,
) -> Result<(backup::receive::ReceiveConfig, Vec<(u64, u64)>), SetupError> {
    let identity = transport::Identity::load_named(certs, name).map_err(|source| SetupError::Identity {
        name: name.into(),
        dir: certs.display().to_string(),
        source,
    })?;
    transport::PeerPolicy::replication().check_own(&identity)?;
    let ranges = vmm::layout::ram_regions(memory_bytes);
    let cfg = backup::receive::ReceiveConfig {
        listen,
        identity,
        source_name: source_name.into(),
        tuning: transport::Tuning::default(),
        vm: backup::server::vm_identity(vm_name),
        layout: backup::server::proto_layout(&ranges)?,
        timing: timing(),
        verify,
        postcopy_recover: std::time::Duration::from_secs(60),
    };
    Ok((cfg, ranges))
}

/// The flags of `understudy migrate` that make its [`MigrateRequest`].
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    /// The destination's address (host:port).
    #[arg(long)]
    pub to: SocketAddr,
    /// Directory with ca.pem and this host's certificate and key.
    #[arg(long)]
    pub certs: PathBuf,
    /// This host's certificate name.
    #[arg(long, default_value = "src")]
    pub name: String,
    /// The destination's certificate name.
    #[arg(long, default_value = "dest")]
    pub dest_name: String,
    /// precopy | stopcopy | postcopy | demand | hybrid | auto.
    #[arg(long, default_value = "precopy")]
    pub mode: Mode,
    /// Stop pre-copying once the predicted downtime fits this, ms.
    #[arg(long, default_value_t = 5)]
    pub downtime_ms: u64,
    /// Most bytes a second on the link (K/M/G suffixes, e.g. 100M), or `unlimited`.
    #[arg(long, value_parser = parse_rate)]
    pub max_bandwidth: Option<u64>,
    /// Stop pre-copying once the data re-sent since round 0 reaches this share of round 0's.
    #[arg(long, default_value_t = 0.75)]
    pub stop_share: f64,
    /// Stop pre-copying after this many rounds (round 0 included).
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// Stop pre-copying after this many seconds (the migration fails after twice that).
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
    /// Digest guest memory at the switch-over (tests; costs downtime).
    #[arg(long)]
    pub verify: bool,
    /// Post-copy without reverse checkpoints: the guest's output is not held during post-copy,
    /// but a destination that dies then loses the guest.
    #[arg(long)]
    pub no_reverse: bool,
}

impl MigrateArgs {
    /// The request (the certificate directory made absolute: the source process may run
    /// elsewhere).
    pub fn into_request(self) -> MigrateRequest {
        MigrateRequest {
            to: self.to,
            dest_name: self.dest_name,
            certs: std::path::absolute(&self.certs).unwrap_or(self.certs),
            name: self.name,
            mode: self.mode,
            downtime_ms: self.downtime_ms,
            max_bandwidth: self.max_bandwidth.filter(|&r| r != u64::MAX),
            stop_share: self.stop_share,
            max_rounds: self.max_rounds,
            timeout_s: self.timeout_s,
            verify: self.verify,
            no_reverse: self.no_reverse,
        }
    }
}

/// Parses a rate (`--max-bandwidth`): bytes a second with an optional K/M/G suffix, or
/// `unlimited` (`u64::MAX`).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    if s == "unlimited" {
        return Ok(u64::MAX);
    }
    let (num, mult) = match s.trim().chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("rate {s:?} is not bytes a second with an optional K/M/G suffix"))?;
    match n.checked_mul(mult) {
        Some(0) => Err("a rate of 0 would never send anything".into()),
        Some(r) => Ok(r),
        None => Err(format!("rate {s:?} is too large")),
    }
}

fn mib(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(0.0) / (1u64 << 20) as f64
}

/// One line of progress from a `status`'s `migration`: phase, round, sent and remaining, dirty
/// rate, predicted downtime, ETA.
pub fn progress_line(m: &serde_json::Value) -> String {
    let total = m["total_pages"].as_f64().unwrap_or(0.0);
    let sent = m["pages_sent"].as_f64().unwrap_or(0.0);
    let pct = if total > 0.0 { (sent / total * 100.0).min(100.0) } else { 0.0 };
    let filled = (pct / 5.0) as usize;
    let bar: String = "#".repeat(filled) + &".".repeat(20 - filled.min(20));
    let opt = |k: &str, unit: &str| match m[k].as_f64() {
        Some(x) => format!("{x:.1}{unit}"),
        None => "?".into(),
    };
    if let Some(left) = m["postcopy_pages_left"].as_u64() {
        return format!(
            "migrate [{bar}] {:<13} post-copy | sent {:.1} MiB | {} pages left to push | {} reconnects{}",
            m["phase"].as_str().unwrap_or("?"),
            mib(&m["bytes_sent"]),
            left,
            m["postcopy_reconnects"].as_u64().unwrap_or(0),
            m["chosen_mode"].as_str().map(|c| format!(" | auto chose {c}")).unwrap_or_default(),
        );
    }
    format!(
        "migrate [{bar}] {:<13} round {} | sent {:.1} MiB, {} pages left in round | dirty {} pages/s | downtime ~{} | eta {}",
        m["phase"].as_str().unwrap_or("?"),
        m["round"],
        mib(&m["bytes_sent"]),
        m["round_pages_left"],
        opt("dirty_rate_pages_s", ""),
        opt("predicted_downtime_ms", " ms"),
        opt("eta_ms", " ms"),
    )
}

/// A migration's report as a table for people.
pub fn report_table(r: &serde_json::Value) -> String {
    let mut out = String::new();
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    out += &format!("migration {} completed: stopped by {}\n", r["mode"].as_str().unwrap_or("?"), r["stop_reason"]);
    out += &format!(
        "  total {:.1} ms, downtime {:.2} ms (predicted {}){}\n",
        f("total_ms"),
        f("downtime_ms"),
        r["predicted_downtime_ms"].as_f64().map(|p| format!("{p:.2} ms")).unwrap_or_else(|| "none".into()),
        if r["downtime_over_prediction"].as_bool() == Some(true) { ", OVER the prediction" } else { "" }
    );
    let parts = &r["downtime_parts"];
    out += &format!(
        "  downtime: capture {:.2} ms, last pages and state acked {:.2} ms, resume at the destination {:.2} ms\n",
        parts["capture_ms"].as_f64().unwrap_or(0.0),
        parts["transfer_ms"].as_f64().unwrap_or(0.0),
        parts["resume_ms"].as_f64().unwrap_or(0.0)
    );
    out += &format!(
        "  bytes {:.1} MiB on the link, {:.1} MiB re-sent after round 0\n",
        mib(&r["bytes_transferred"]),
        mib(&r["bytes_retransferred"])
    );
    let p = &r["pages"];
    out += &format!(
        "  pages: zero {} dedup {} unchanged {} delta {} lz4 {} raw {}; {} in the stop-and-copy\n",
        p["zero"], p["dedup"], p["unchanged"], p["delta"], p["lz4"], p["raw"], r["final_pages"]
    );
    out += &format!(
        "  cpu source {:.1} ms, destination {:.1} ms; peak rss source {:.1} MiB, destination {:.1} MiB\n",
        f("source_cpu_ms"),
        f("dest_cpu_ms"),
        mib(&r["source_peak_rss_bytes"]),
        mib(&r["dest_peak_rss_bytes"])
    );
    if let Some(c) = r["chosen_mode"].as_str() {
        out += &format!("  auto chose {c}: {}\n", r["choice_reason"].as_str().unwrap_or("?"));
    }
    if r.get("postcopy_faults").is_some() {
        out += &format!(
            "  post-copy{}: {} pages held at the switch-over, {} moved after the resume in {:.1} ms ({} pushed, {} demanded in {} requests, {} reconnects)\n",
            r["switchover_round"].as_u64().map(|n| format!(" after {n} pre-copy rounds")).unwrap_or_default(),
            r["pages_held_at_switchover"],
            r["pages_postcopied"],
            f("postcopy_ms"),
            r["pages_pushed"],
            r["pages_demanded"],
            r["page_requests"],
            r["reconnects"],
        );
        out += &format!(
            "  faults at the destination: {}, fault to page placed p50 {:.0} us, p99 {:.0} us; vCPUs blocked {:.1} ms\n",
            r["postcopy_faults"],
            f("fault_us_p50"),
            f("fault_us_p99"),
            f("vcpu_blocked_ms"),
        );
    }
    out += "  round      pages     MiB   dirty pages/s    link MiB/s       ms\n";
    for round in r["rounds"].as_array().into_iter().flatten() {
        out += &format!(
            "  {:>5} {:>10} {:>7.1} {:>15} {:>13} {:>8.1}\n",
            round["round"].as_u64().unwrap_or(0),
            round["pages"].as_u64().unwrap_or(0),
            mib(&round["bytes"]),
            round["dirty_rate_pages_s"].as_f64().map(|d| format!("{d:.0}")).unwrap_or_else(|| "-".into()),
            round["link_rate_bytes_s"]
                .as_f64()
                .map(|l| format!("{:.0}", l / (1u64 << 20) as f64))
                .unwrap_or_else(|| "-".into()),
            round["ms"].as_f64().unwrap_or(0.0)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_suffixes_and_refuse_zero() {
        assert_eq!(parse_rate("100M"), Ok(100 << 20));
        assert_eq!(parse_rate("unlimited"), Ok(u64::MAX));
        assert_eq!(parse_rate("1024"), Ok(1024));
        assert_eq!(parse_rate("0").unwrap_err(), "a rate of 0 would never send anything");
        assert!(parse_rate("fast").unwrap_err().contains("not bytes a second"));
        assert!(parse_rate("99999999999G").unwrap_err().contains("too large"));
    }

    #[test]
    fn the_report_and_progress_read_for_people() {
        let r = serde_json::json!({
            "mode": "precopy", "stop_reason": "downtime_fits", "predicted_downtime_ms": 1.5,
            "total_ms": 120.0, "downtime_ms": 2.25, "downtime_over_prediction": false,
            "bytes_transferred": 10 << 20, "bytes_retransferred": 1 << 20,
            "pages": {"zero": 1, "dedup": 2, "unchanged": 3, "delta": 4, "lz4": 5, "raw": 6}, "final_pages": 7,
            "source_cpu_ms": 10.0, "dest_cpu_ms": 5.0, "source_peak_rss_bytes": 64 << 20, "dest_peak_rss_bytes": 32 << 20,
            "rounds": [{"round": 0, "pages": 100, "bytes": 1 << 20, "dirty_rate_pages_s": 50.0, "link_rate_bytes_s": 2 << 20, "ms": 9.5}]
        });
        let t = report_table(&r);
        assert!(t.contains("stopped by \"downtime_fits\""), "{t}");
        assert!(t.contains("downtime 2.25 ms (predicted 1.50 ms)"), "{t}");
        assert!(t.contains("10.0 MiB on the link, 1.0 MiB re-sent"), "{t}");
        assert!(t.contains("zero 1 dedup 2 unchanged 3 delta 4 lz4 5 raw 6; 7 in the stop-and-copy"), "{t}");
        assert!(t.contains("      0        100     1.0              50             2      9.5"), "{t}");
        let m = serde_json::json!({"phase": "rounds", "round": 2, "total_pages": 100, "pages_sent": 50,
            "bytes_sent": 3 << 20, "round_pages_left": 10, "dirty_rate_pages_s": 1000.0, "predicted_downtime_ms": null, "eta_ms": 4.0});
        let l = progress_line(&m);
        assert!(l.starts_with("migrate [##########..........] rounds"), "{l}");
        assert!(
            l.contains("sent 3.0 MiB, 10 pages left in round | dirty 1000.0 pages/s | downtime ~? | eta 4.0 ms"),
            "{l}"
        );
    }
}
