//! `understudy migrate`: asks the source's process to migrate, shows progress while it runs
//! (a bar on a terminal, a line per phase or round otherwise) and prints the report.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use crate::api::{self, Request};

/// Runs the migration through the API at `sock`; returns when it ended.
pub fn run(sock: &Path, req: primary::migrate::MigrateRequest, json: bool) -> Result<()> {
    let timeout = Duration::from_secs(req.timeout_s.saturating_mul(2).saturating_add(120));
    let sock2 = sock.to_path_buf();
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(api::call(&sock2, &Request::Migrate(req), timeout));
    });
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    // Progress every 200 ms; the answer ends the wait at once (not at the next tick).
    let result = loop {
        match done.recv_timeout(Duration::from_millis(200)) {
            Ok(r) => break r,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => anyhow::bail!("the migrate call panicked"),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        let Ok(v) = api::call(sock, &Request::Status, Duration::from_secs(2)) else { continue };
        let Some(m) = v.get("migration").filter(|m| !m.is_null()) else { continue };
        let line = progress_line(m);
        if tty {
            eprint!("\r\x1b[2K{line}");
            let _ = std::io::stderr().flush();
        } else {
            let key = format!("{} {}", m["phase"], m["round"]);
            if key != last {
                eprintln!("{line}");
                last = key;
            }
        }
    };
    if tty {
        eprintln!();
    }
    let report = result?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

fn mib(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(0.0) / (1u64 << 20) as f64
}

/// One line of progress: phase, round, sent and remaining, dirty rate, predicted downtime, ETA.
fn progress_line(m: &serde_json::Value) -> String {
    let total = m["total_pages"].as_f64().unwrap_or(0.0);
    let sent = m["pages_sent"].as_f64().unwrap_or(0.0);
    let pct = if total > 0.0 { (sent / total * 100.0).min(100.0) } else { 0.0 };
    let filled = (pct / 5.0) as usize;
    let bar: String = "#".repeat(filled) + &".".repeat(20 - filled.min(20));
    let opt = |k: &str, unit: &str| match m[k].as_f64() {
        Some(x) => format!("{x:.1}{unit}"),
        None => "?".into(),
    };
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

/// The report as a table for people.
fn table(r: &serde_json::Value) -> String {
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
    fn the_report_and_progress_read_for_people() {
        let r = serde_json::json!({
            "mode": "precopy", "stop_reason": "downtime_fits", "predicted_downtime_ms": 1.5,
            "total_ms": 120.0, "downtime_ms": 2.25, "downtime_over_prediction": false,
            "bytes_transferred": 10 << 20, "bytes_retransferred": 1 << 20,
            "pages": {"zero": 1, "dedup": 2, "unchanged": 3, "delta": 4, "lz4": 5, "raw": 6}, "final_pages": 7,
            "source_cpu_ms": 10.0, "dest_cpu_ms": 5.0, "source_peak_rss_bytes": 64 << 20, "dest_peak_rss_bytes": 32 << 20,
            "rounds": [{"round": 0, "pages": 100, "bytes": 1 << 20, "dirty_rate_pages_s": 50.0, "link_rate_bytes_s": 2 << 20, "ms": 9.5}]
        });
        let t = table(&r);
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
