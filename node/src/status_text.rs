//! `understudy status` for people: the status JSON (`status --json`, see [`crate::status`]) in
//! sections with units and ages. Reads the JSON rather than the typed structs, so the CLI
//! renders what any build's API answered, and a missing field is left out, not a failure.

use serde_json::Value;

/// A duration in seconds as `2m 13s`, `1h 04m`, `850 ms`.
pub fn age(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "?".into();
    }
    if s < 1.0 {
        return format!("{:.0} ms", s * 1e3);
    }
    let t = s as u64;
    match t {
        0..=59 => format!("{t}s"),
        60..=3599 => format!("{}m {:02}s", t / 60, t % 60),
        3600..=86_399 => format!("{}h {:02}m", t / 3600, t % 3600 / 60),
        _ => format!("{}d {:02}h", t / 86_400, t % 86_400 / 3600),
    }
}

/// Bytes as `0 B`, `12.3 KiB`, `1.5 GiB`.
pub fn bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    if !b.is_finite() || b < 0.0 {
        return "?".into();
    }
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{v:.0} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// Microseconds as `174 µs` or `1.3 ms`.
pub fn micros(us: f64) -> String {
    if !us.is_finite() {
        "?".into()
    } else if us < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.1} ms", us / 1e3)
    }
}

/// An integer with thousands separators: `2,113`.
pub fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn f(v: &Value, k: &str) -> Option<f64> {
    v.get(k)?.as_f64()
}

fn u(v: &Value, k: &str) -> Option<u64> {
    v.get(k)?.as_u64()
}

fn s<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k)?.as_str()
}

/// How the VM came to be, in words.
fn origin(o: &Value) -> String {
    match s(o, "kind") {
        Some("booted") => format!("booted from {}", s(o, "kernel").unwrap_or("?")),
        Some("restored") => format!("restored from snapshot {}", s(o, "from").unwrap_or("?")),
        Some("promoted") => format!(
            "promoted from the replica of epoch {} ({:.1} ms to run, {} inbound frames replayed, {} output frames written)",
            count(u(o, "epoch").unwrap_or(0)),
            f(o, "promote_ms").unwrap_or(0.0),
            count(u(o, "replayed_frames").unwrap_or(0)),
            count(u(o, "output_written_frames").unwrap_or(0))
        ),
        Some("migrated") => format!(
            "migrated from {} at epoch {} (resumed {:.1} ms after the hand-over)",
            s(o, "source").unwrap_or("?"),
            count(u(o, "epoch").unwrap_or(0)),
            f(o, "resume_ms").unwrap_or(0.0)
        ),
        Some("backup") => format!("backup listening on {}", s(o, "listen").unwrap_or("?")),
        Some("destination") => format!("migration destination listening on {}", s(o, "listen").unwrap_or("?")),
        Some(other) => other.to_string(),
        None => "?".into(),
    }
}

/// The sync under way, from a protection status (`None` when not syncing): round 0 says how
/// much of memory it has looked at and what it sent, a later round its dirty pages.
pub fn sync_line(p: &Value) -> Option<String> {
    let sync = p.get("sync").filter(|v| !v.is_null())?;
    let (round, pages, total) =
        (u(sync, "round").unwrap_or(0), u(sync, "pages").unwrap_or(0), u(sync, "total_pages").unwrap_or(0));
    Some(if round == 0 {
        let scanned = u(sync, "scanned").unwrap_or(0);
        format!(
            "sync: full copy, {} of {} pages of memory looked at ({:.0}%), {} sent in {} pieces",
            count(scanned),
            count(total),
            100.0 * scanned as f64 / total.max(1) as f64,
            count(pages),
            count(u(sync, "pieces").unwrap_or(0))
        )
    } else {
        format!("sync: pre-copy round {round}, {} pages dirtied since the last round", count(pages))
    })
}

/// The last completed sync, from a protection status (`None` before the first).
pub fn last_sync_line(p: &Value) -> Option<String> {
    let last = p.get("last_sync").filter(|v| !v.is_null())?;
    let rounds = u(last, "rounds").unwrap_or(0);
    let kind = if last.get("catch_up").and_then(Value::as_bool) == Some(true) {
        " (a catch-up over the backup's replica)"
    } else {
        ""
    };
    Some(format!(
        "last sync{kind}: {} pages in {} pieces (largest {}) and {rounds} pre-copy round{}, {}",
        count(u(last, "pages").unwrap_or(0)),
        count(u(last, "pieces").unwrap_or(0)),
        count(u(last, "largest_piece_pages").unwrap_or(0)),
        if rounds == 1 { "" } else { "s" },
        age(u(last, "ms").unwrap_or(0) as f64 / 1e3)
    ))
}

fn protection(p: &Value, out: &mut Vec<String>) {
    let state = s(p, "state").unwrap_or("?");
    out.push(format!(
        "protection: {state} for {} ({}), backup {}",
        age(f(p, "state_for_s").unwrap_or(0.0)),
        s(p, "reason").unwrap_or(""),
        s(p, "backup").unwrap_or("?")
    ));
    if let Some(line) = sync_line(p) {
        out.push(format!("  {line}"));
    } else if let Some(line) = last_sync_line(p) {
        out.push(format!("  {line}"));
    }
    out.push(format!(
        "  {:.0} epochs/s ({} in all, {:.1} ms mean), pause {} p50 / {} p99, {:.0} dirty pages per epoch ({} kept writable)",
        f(p, "epoch_rate_per_s").unwrap_or(0.0),
        count(u(p, "epochs").unwrap_or(0)),
        f(p, "epoch_ms_mean").unwrap_or(0.0),
        micros(f(p, "pause_us_p50").unwrap_or(f64::NAN)),
        micros(f(p, "pause_us_p99").unwrap_or(f64::NAN)),
        f(p, "dirty_pages_per_epoch_mean").unwrap_or(0.0),
        count(u(p, "hot_pages").unwrap_or(0))
    ));
    out.push(format!(
        "  replica {} epochs behind (shipped {}, committed {}), ack {} p50 / {} p99",
        count(u(p, "replica_lag_epochs").unwrap_or(0)),
        count(u(p, "last_submitted_epoch").unwrap_or(0)),
        count(u(p, "last_acked_epoch").unwrap_or(0)),
        micros(f(p, "ack_latency_us_p50").unwrap_or(f64::NAN)),
        micros(f(p, "ack_latency_us_p99").unwrap_or(f64::NAN))
    ));
    out.push(format!(
        "  output held {} ({} frames); sent {} encoded ({} raw)",
        bytes(f(p, "held_output_bytes").unwrap_or(0.0)),
        count(u(p, "held_output_frames").unwrap_or(0)),
        bytes(f(p, "bytes_sent").unwrap_or(0.0)),
        bytes(f(p, "raw_bytes_sent").unwrap_or(0.0))
    ));
    if let Some(i) = p.get("inbound").filter(|v| !v.is_null()) {
        out.push(format!(
            "  inbound frames {} to the backup's log: {} forwarded, {} dropped (queue full), {} refused",
            if i.get("active").and_then(Value::as_bool) == Some(true) { "go" } else { "do not go" },
            count(u(i, "forwarded_frames").unwrap_or(0)),
            count(u(i, "queue_dropped_frames").unwrap_or(0)),
            count(u(i, "refused_frames").unwrap_or(0))
        ));
        match s(i, "side_copy_to") {
            Some(to) => out.push(format!(
                "  side copies to {to}: {} sent, {} dropped, {} mean on the net worker",
                count(u(i, "side_copy_sent_frames").unwrap_or(0)),
                count(u(i, "side_copy_dropped_frames").unwrap_or(0)),
                micros(u(i, "side_copy_ns_mean").unwrap_or(0) as f64 / 1e3)
            )),
            None if u(i, "side_copy_sent_frames").unwrap_or(0) > 0 => out.push(format!(
                "  no side channel now; {} side copies sent, {} dropped",
                count(u(i, "side_copy_sent_frames").unwrap_or(0)),
                count(u(i, "side_copy_dropped_frames").unwrap_or(0))
            )),
            None => {}
        }
    }
}

fn backup(b: &Value, out: &mut Vec<String>) {
    let state = s(b, "state").unwrap_or("?");
    let consistent = match u(b, "consistent_epoch") {
        Some(e) => format!("consistent at epoch {}", count(e)),
        None => "no consistent epoch yet".into(),
    };
    let last = match f(b, "since_last_commit_s") {
        Some(t) => format!("last commit {} ago", age(t)),
        None => "no commit yet".into(),
    };
    out.push(format!("backup: {state}, {consistent}, {last}"));
    let primary = match (b.get("connected").and_then(Value::as_bool), s(b, "primary")) {
        (Some(true), Some(p)) => format!("primary {p} connected"),
        (Some(true), None) => "primary connected".into(),
        _ => "no primary connected".into(),
    };
    out.push(format!(
        "  {primary}; {} commits ({} mean), {} refused, {} pages written",
        count(u(b, "commits").unwrap_or(0)),
        micros(f(b, "commit_us_mean").unwrap_or(0.0)),
        count(u(b, "rejected").unwrap_or(0)),
        count(u(b, "pages").unwrap_or(0))
    ));
    if let Some(i) = b.get("inbound_log").filter(|v| !v.is_null()) {
        out.push(format!(
            "  inbound log {} frames ({}); {} received, {} pruned at commit, {} overflowed, {} replayed",
            count(u(i, "frames").unwrap_or(0)),
            bytes(f(i, "bytes").unwrap_or(0.0)),
            count(u(i, "received_frames").unwrap_or(0)),
            count(u(i, "pruned_frames").unwrap_or(0)),
            count(u(i, "overflow_frames").unwrap_or(0)),
            count(u(i, "replayed_frames").unwrap_or(0))
        ));
        if let Some(port) = u(i, "side_copy_port") {
            out.push(format!(
                "  side copies at udp port {port}: {} received, {} logged, {} stale, {} rejected",
                count(u(i, "side_copy_received_frames").unwrap_or(0)),
                count(u(i, "side_copy_logged_frames").unwrap_or(0)),
                count(u(i, "side_copy_stale_frames").unwrap_or(0)),
                count(u(i, "side_copy_rejected_frames").unwrap_or(0))
            ));
        }
        if i.get("lan_copy").and_then(serde_json::Value::as_bool) == Some(true) {
            out.push(format!(
                "  lan copies {} frames; {} read, {} overflowed, {} replayed, {} promotions unmatched",
                count(u(i, "lan_copy_frames").unwrap_or(0)),
                count(u(i, "lan_copy_frames_read").unwrap_or(0)),
                count(u(i, "lan_copy_overflow_frames").unwrap_or(0)),
                count(u(i, "lan_copy_replayed_frames").unwrap_or(0)),
                count(u(i, "lan_copy_unmatched").unwrap_or(0))
            ));
        }
    }
    if let Some(o) = b.get("output_log").filter(|v| !v.is_null()) {
        out.push(format!(
            "  output log {} frames ({}) of {} epochs; {} received, {} released, {} overflowed, {} written at promotion, {} dropped",
            count(u(o, "frames").unwrap_or(0)),
            bytes(f(o, "bytes").unwrap_or(0.0)),
            count(u(o, "epochs").unwrap_or(0)),
            count(u(o, "received_frames").unwrap_or(0)),
            count(u(o, "released_frames").unwrap_or(0)),
            count(u(o, "overflow_frames").unwrap_or(0)),
            count(u(o, "written_frames").unwrap_or(0)),
            count(u(o, "dropped_frames").unwrap_or(0))
        ));
    }
    if let Some(r) = u(b, "rollback_epoch") {
        out.push(format!("  re-sync in progress: promotion would roll back to epoch {}", count(r)));
    }
    if let Some(e) = s(b, "last_error") {
        out.push(format!("  last error: {e}"));
    }
}

fn source_migration(m: &Value, out: &mut Vec<String>) {
    out.push(format!(
        "migration to {} ({}): {}, round {}, {} sent, {} of {} pages sent, {} pages left in the round",
        s(m, "to").unwrap_or("?"),
        s(m, "mode").unwrap_or("?"),
        s(m, "phase").unwrap_or("?"),
        u(m, "round").unwrap_or(0),
        bytes(f(m, "bytes_sent").unwrap_or(0.0)),
        count(u(m, "pages_sent").unwrap_or(0)),
        count(u(m, "total_pages").unwrap_or(0)),
        count(u(m, "round_pages_left").unwrap_or(0))
    ));
    let mut line = format!("  for {}", age(f(m, "elapsed_ms").unwrap_or(0.0) / 1e3));
    if let Some(d) = f(m, "dirty_rate_pages_s") {
        line += &format!(", dirty {d:.0} pages/s");
    }
    if let Some(p) = f(m, "predicted_downtime_ms") {
        line += &format!(", predicted downtime {p:.1} ms");
    }
    if let Some(c) = s(m, "chosen_mode") {
        line += &format!(", auto chose {c}");
    }
    out.push(line);
    if let Some(left) = u(m, "postcopy_pages_left") {
        out.push(format!(
            "  post-copy: {} pages left to push, {} reconnects",
            count(left),
            u(m, "postcopy_reconnects").unwrap_or(0)
        ));
    }
    if let Some(e) = s(m, "error") {
        out.push(format!("  error: {e}"));
    }
}

fn destination_migration(m: &Value, out: &mut Vec<String>) {
    let source = s(m, "source").map(|s| format!(" from {s}")).unwrap_or_default();
    out.push(format!(
        "migration{source}: {}, {} epochs ({} pages) received{}",
        s(m, "phase").unwrap_or("?"),
        count(u(m, "epochs").unwrap_or(0)),
        count(u(m, "pages").unwrap_or(0)),
        u(m, "switchover_epoch").map(|e| format!(", switch-over at epoch {}", count(e))).unwrap_or_default()
    ));
    if let Some(missing) = u(m, "postcopy_missing") {
        out.push(format!(
            "  post-copy: {} pages still at the source, {} faults served",
            count(missing),
            count(u(m, "postcopy_faults").unwrap_or(0))
        ));
    }
    if u(m, "refused_peers").unwrap_or(0) > 0 {
        out.push(format!("  refused {} peers", count(u(m, "refused_peers").unwrap_or(0))));
    }
    if let Some(e) = s(m, "error") {
        out.push(format!("  last error: {e}"));
    }
}

fn reprotect(r: &Value, out: &mut Vec<String>) {
    let target = s(r, "target").unwrap_or("no standby yet");
    let tries =
        format!("attempt {}, {} failed", count(u(r, "attempts").unwrap_or(0)), count(u(r, "failures").unwrap_or(0)));
    let since = age(f(r, "since_promotion_s").unwrap_or(0.0));
    let line = match s(r, "state").unwrap_or("?") {
        "protected" => format!(
            "re-protection: done, standby {target} recorded as backup {} after the promotion ({tries})",
            age(f(r, "took_s").unwrap_or(0.0))
        ),
        "waiting" => match f(r, "next_attempt_in_s") {
            Some(n) => format!("re-protection: waiting, promoted {since} ago; next attempt in {} ({tries})", age(n)),
            None => format!("re-protection: waiting, promoted {since} ago ({tries})"),
        },
        state => format!("re-protection: {state} to standby {target}, promoted {since} ago ({tries})"),
    };
    out.push(line);
    if let Some(e) = s(r, "last_error").filter(|_| s(r, "state") != Some("protected")) {
        out.push(format!("  last error: {e}"));
    }
}

fn arbitration(a: &Value, out: &mut Vec<String>) {
    let mut line = format!("arbitration: node {}, {}", u(a, "node").unwrap_or(0), s(a, "state").unwrap_or("?"));
    if let Some(r) = s(a, "reason") {
        line += &format!(" ({r})");
    }
    out.push(line);
}

/// The status for people, one section per part, ending in a newline.
pub fn render(v: &Value) -> String {
    let mut out = Vec::new();
    let role = s(v, "role").unwrap_or("?");
    let uptime = age(f(v, "uptime_s").unwrap_or(0.0));
    let memory = bytes(f(v, "memory_bytes").unwrap_or(0.0));
    let origin = v.get("origin").map(origin).unwrap_or_else(|| "?".into());
    match s(v, "state") {
        Some(state) => {
            out.push(format!("vm: {state} ({role}), up {uptime}, {memory}, {origin}"));
            if let Some(why) = s(v, "stopped_reason") {
                out.push(format!("  stopped: {why}"));
            }
            if let Some(c) = s(v, "cmdline").filter(|c| !c.is_empty()) {
                out.push(format!("  cmdline: {c}"));
            }
        }
        None => out.push(format!("{role}: up {uptime}, {memory}, {origin}")),
    }
    match v.get("protection").filter(|p| !p.is_null()) {
        Some(p) => protection(p, &mut out),
        None if s(v, "state").is_some() => out.push("protection: none".into()),
        None => {}
    }
    if let Some(r) = v.get("reprotect").filter(|r| !r.is_null()) {
        reprotect(r, &mut out);
    }
    if let Some(b) = v.get("backup").filter(|b| !b.is_null()) {
        backup(b, &mut out);
    }
    if let Some(m) = v.get("migration").filter(|m| !m.is_null()) {
        if role == "destination" {
            destination_migration(m, &mut out);
        } else {
            source_migration(m, &mut out);
        }
    }
    match v.get("arbitration").filter(|a| !a.is_null()) {
        Some(a) => arbitration(a, &mut out),
        None => out.push("arbitration: not configured".into()),
    }
    out.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn units_read_for_people() {
        assert_eq!(age(0.008), "8 ms");
        assert_eq!(age(7.0), "7s");
        assert_eq!(age(133.0), "2m 13s");
        assert_eq!(age(3840.0), "1h 04m");
        assert_eq!(age(90_000.0), "1d 01h");
        assert_eq!(bytes(0.0), "0 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(3.0 * (1u64 << 30) as f64), "3.0 GiB");
        assert_eq!(micros(174.4), "174 µs");
        assert_eq!(micros(1300.0), "1.3 ms");
        assert_eq!(count(2113), "2,113");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(count(12), "12");
    }

    #[test]
    fn a_protected_primary() {
        let v = json!({
            "role": "primary", "state": "running", "uptime_s": 140.0, "memory_bytes": 256u64 << 20,
            "cmdline": "workload=kv", "origin": {"kind": "booted", "kernel": "guest.elf"}, "stopped_reason": null,
            "protection": {"state": "protected", "state_for_s": 133.0, "reason": "backup committed consistent epoch 4",
                "backup": "10.0.0.2:7000", "epochs": 12800, "epoch_rate_per_s": 96.2, "last_submitted_epoch": 2114,
                "last_acked_epoch": 2113, "replica_lag_epochs": 1, "pause_us_p50": 174.0, "pause_us_p99": 649.0,
                "epoch_ms_mean": 10.4, "dirty_pages_per_epoch_mean": 48.0, "hot_pages": 31, "ack_latency_us_p50": 820.0,
                "ack_latency_us_p99": 1900.0, "held_output_frames": 0, "held_output_bytes": 0,
                "bytes_sent": 5_700_000, "raw_bytes_sent": 40_100_000, "sync": null,
                "last_sync": {"rounds": 3, "pages": 41_000, "pieces": 12, "largest_piece_pages": 4096, "ms": 2_400},
                "inbound": {"active": true, "forwarded_frames": 1204, "queue_dropped_frames": 0, "refused_frames": 0,
                    "side_copy_to": "10.0.0.2:41000", "side_copy_sent_frames": 1204, "side_copy_dropped_frames": 0,
                    "side_copy_ns_mean": 4200}},
            "arbitration": {"node": 1, "state": "running"}
        });
        let t = render(&v);
        assert_eq!(
            t,
            "vm: running (primary), up 2m 20s, 256.0 MiB, booted from guest.elf\n  cmdline: workload=kv\n\
             protection: protected for 2m 13s (backup committed consistent epoch 4), backup 10.0.0.2:7000\n  \
             last sync: 41,000 pages in 12 pieces (largest 4,096) and 3 pre-copy rounds, 2s\n  \
             96 epochs/s (12,800 in all, 10.4 ms mean), pause 174 µs p50 / 649 µs p99, 48 dirty pages per epoch (31 kept writable)\n  \
             replica 1 epochs behind (shipped 2,114, committed 2,113), ack 820 µs p50 / 1.9 ms p99\n  \
             output held 0 B (0 frames); sent 5.4 MiB encoded (38.2 MiB raw)\n  \
             inbound frames go to the backup's log: 1,204 forwarded, 0 dropped (queue full), 0 refused\n  \
             side copies to 10.0.0.2:41000: 1,204 sent, 0 dropped, 4 µs mean on the net worker\n\
             arbitration: node 1, running\n"
        );
    }

    /// A sync shows where its full copy is in memory, then each pre-copy round's dirty pages.
    #[test]
    fn a_syncing_primary_shows_its_progress() {
        let mut p = json!({"state": "syncing", "state_for_s": 3.0, "reason": "protection started", "backup": "b:7000",
            "sync": {"round": 0, "pages": 9000, "total_pages": 65536, "scanned": 16384, "pieces": 3},
            "last_sync": null});
        let line = |p: &Value| {
            let mut out = Vec::new();
            protection(p, &mut out);
            out[1].clone()
        };
        assert_eq!(
            line(&p),
            "  sync: full copy, 16,384 of 65,536 pages of memory looked at (25%), 9,000 sent in 3 pieces"
        );
        p["sync"] = json!({"round": 2, "pages": 310, "total_pages": 65536, "scanned": 65536, "pieces": 1});
        assert_eq!(line(&p), "  sync: pre-copy round 2, 310 pages dirtied since the last round");
        // Done, after running degraded: a catch-up over the backup's replica.
        p["sync"] = Value::Null;
        p["last_sync"] =
            json!({"rounds": 1, "pages": 2051, "pieces": 1, "largest_piece_pages": 2051, "ms": 126, "catch_up": true});
        assert_eq!(
            line(&p),
            "  last sync (a catch-up over the backup's replica): 2,051 pages in 1 pieces (largest 2,051) and 1 pre-copy round, 126 ms"
        );
    }

    #[test]
    fn a_backup_a_destination_and_a_migrating_source() {
        let b = json!({"role": "backup", "uptime_s": 5.0, "memory_bytes": 64u64 << 20,
            "origin": {"kind": "backup", "listen": "0.0.0.0:7000"},
            "backup": {"state": "consistent", "connected": true, "primary": "primary", "committed_epoch": 2113,
                "consistent_epoch": 2113, "rollback_epoch": null, "failed_sessions": 0, "commits": 2113,
                "rejected": 0, "pages": 90000, "commit_us_mean": 120.0, "since_last_commit_s": 0.008, "last_error": null,
                "inbound_log": {"frames": 2, "bytes": 140, "received_frames": 900, "pruned_frames": 898,
                    "overflow_frames": 0, "replayed_frames": 0, "skipped_frames": 0, "side_copy_port": 41000,
                    "side_copy_received_frames": 900, "side_copy_logged_frames": 850, "side_copy_stale_frames": 50,
                    "side_copy_rejected_frames": 0, "lan_copy": true, "lan_copy_frames": 4000,
                    "lan_copy_frames_read": 12000, "lan_copy_overflow_frames": 8000, "lan_copy_replayed_frames": 0,
                    "lan_copy_unmatched": 0},
                "output_log": {"frames": 1, "bytes": 70, "epochs": 1, "received_frames": 400, "released_frames": 399,
                    "overflow_frames": 0, "written_frames": 0, "dropped_frames": 0}},
            "arbitration": null});
        let t = render(&b);
        assert!(
            t.contains(
                "  output log 1 frames (70 B) of 1 epochs; 400 received, 399 released, 0 overflowed, 0 written at promotion, 0 dropped\n"
            ),
            "{t}"
        );
        assert!(t.contains("  side copies at udp port 41000: 900 received, 850 logged, 50 stale, 0 rejected\n"), "{t}");
        assert!(
            t.contains(
                "  lan copies 4,000 frames; 12,000 read, 8,000 overflowed, 0 replayed, 0 promotions unmatched\n"
            ),
            "{t}"
        );
        assert!(t.starts_with("backup: up 5s, 64.0 MiB, backup listening on 0.0.0.0:7000\n"), "{t}");
        assert!(t.contains("backup: consistent, consistent at epoch 2,113, last commit 8 ms ago\n"), "{t}");
        assert!(
            t.contains("  primary primary connected; 2,113 commits (120 µs mean), 0 refused, 90,000 pages written\n"),
            "{t}"
        );
        assert!(t.ends_with("arbitration: not configured\n"), "{t}");

        let d = json!({"role": "destination", "uptime_s": 1.0, "memory_bytes": 64u64 << 20,
            "origin": {"kind": "destination", "listen": "127.0.0.1:7300"}, "backup": null,
            "migration": {"phase": "receiving", "source": "src", "epochs": 3, "pages": 4096,
                "switchover_epoch": null, "refused_peers": 1, "error": "peer refused"}});
        let t = render(&d);
        assert!(
            t.contains("migration from src: receiving, 3 epochs (4,096 pages) received\n  refused 1 peers\n"),
            "{t}"
        );

        let m = json!({"role": "primary", "state": "running", "uptime_s": 9.0, "memory_bytes": 1u64 << 28,
            "origin": {"kind": "booted", "kernel": "k"}, "protection": null,
            "migration": {"phase": "rounds", "mode": "precopy", "to": "10.0.0.3:7300", "round": 2,
                "total_pages": 65536, "pages_sent": 30000, "round_pages_left": 1200, "bytes_sent": 120u64 << 20,
                "dirty_rate_pages_s": 18000.0, "predicted_downtime_ms": 4.25, "elapsed_ms": 512.0, "error": null}});
        let t = render(&m);
        assert!(t.contains("protection: none\n"), "{t}");
        assert!(
            t.contains(
                "migration to 10.0.0.3:7300 (precopy): rounds, round 2, 120.0 MiB sent, 30,000 of 65,536 pages sent, \
                 1,200 pages left in the round\n  for 512 ms, dirty 18000 pages/s, predicted downtime 4.2 ms\n"
            ),
            "{t}"
        );
    }

    #[test]
    fn a_promoted_vm_re_protecting_itself() {
        let mut v = json!({
            "role": "primary", "state": "running", "uptime_s": 20.0, "memory_bytes": 64u64 << 20, "cmdline": "",
            "origin": {"kind": "promoted", "epoch": 9, "memory_digest": "not computed", "promote_ms": 1.2},
            "protection": null, "arbitration": {"node": 2, "state": "running"},
            "reprotect": {"state": "waiting", "target": "1=primary@10.0.0.1:7400", "attempts": 3, "failures": 3,
                          "last_error": "standby 1=primary@10.0.0.1:7400 does not answer (connection refused)",
                          "since_promotion_s": 4.0, "next_attempt_in_s": 2.0, "took_s": null}
        });
        let t = render(&v);
        assert!(t.contains("protection: none\nre-protection: waiting, promoted 4s ago; next attempt in 2s (attempt 3, 3 failed)\n  last error: standby 1=primary@10.0.0.1:7400 does not answer (connection refused)\n"), "{t}");
        v["reprotect"]["state"] = "syncing".into();
        let t = render(&v);
        assert!(t.contains("re-protection: syncing to standby 1=primary@10.0.0.1:7400, promoted 4s ago"), "{t}");
        v["reprotect"]["state"] = "protected".into();
        v["reprotect"]["took_s"] = 6.5.into();
        let t = render(&v);
        assert!(
            t.contains(
                "re-protection: done, standby 1=primary@10.0.0.1:7400 recorded as backup 6s after the promotion"
            ),
            "{t}"
        );
        assert!(!t.contains("last error") && !t.contains('{'), "{t}");
    }
}
