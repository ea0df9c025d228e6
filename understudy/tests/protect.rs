//! Protection end to end: exactness of the replica, output commit, atomicity, degraded mode,
//! and a manual failover that loses no acknowledged write.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Captures frames from the guest's MAC on tap0 for `secs`, then prints them as JSON lines.
const CAPTURE: &str = r#"
import socket, sys, time, zlib, json
secs = float(sys.argv[1]); mac = bytes.fromhex(sys.argv[2].replace(":", ""))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind(("tap0", 0)); s.settimeout(0.05)
end = time.monotonic() + secs; out = []
print("capturing", flush=True)
while time.monotonic() < end:
    try:
        f = s.recv(65536)
    except socket.timeout:
        continue
    t = time.monotonic_ns()
    if f[6:12] == mac:
        out.append({"t": t, "crc": zlib.crc32(f) & 0xffffffff, "len": len(f)})
for o in out:
    print(json.dumps(o))
"#;

const GUEST_MAC: &str = "02:55:44:00:00:01";

/// Protects the dirty guest (~400 pages per 20 ms epoch over 2,048) with `extra` protect
/// arguments, and checks that the sampled epochs' memory digest and state crc are equal on both
/// sides. Returns the pair for more checks.
fn dirty_replica_matches(tag: &str, extra: &[&str]) -> Pair {
    dirty_replica_matches_env(tag, extra, &[], Duration::ZERO)
}

/// [`dirty_replica_matches`] with environment variables for both processes (fault points),
/// protecting `settle` after the guest is up.
fn dirty_replica_matches_env(tag: &str, extra: &[&str], env: &[(&str, &str)], settle: Duration) -> Pair {
    let mut pair = Pair::start_env(None, "workload=dirty wss=8 rate=20000", "64M", &["--verify"], &[], env);
    std::thread::sleep(settle);
    let mut args = vec!["--epoch-ms", "20", "--verify-every", "2"];
    args.extend_from_slice(extra);
    pair.protect(&args);
    let t = pair.wait_protection("protected", Duration::from_secs(20));
    eprintln!("{tag}: protected after {t:?}");
    std::thread::sleep(Duration::from_secs(3));
    let p = Pair::ctl(&pair.p_sock, "verify-journal");
    // Give the backup time to commit the last sampled epochs.
    std::thread::sleep(Duration::from_millis(300));
    let b = Pair::ctl(&pair.b_sock, "verify-journal");
    let common = compare_journals(&p, &b);
    eprintln!("{tag}: {common} sampled epochs, memory digest and state crc equal on both sides");
    assert!(common >= 20, "too few sampled epochs in common: {common}\n{p}\n{b}");
    pair
}

#[test]
fn replica_matches_primary_exactly_dirty() {
    let _g = serial_guard();
    if !kvm_available("replica_matches_primary_exactly_dirty") {
        return;
    }
    let pair = dirty_replica_matches("dirty", &[]);
    let s = Pair::status(&pair.p_sock);
    eprintln!("dirty: primary status {}", s["protection"]);
    assert!(s["protection"]["dirty_pages_per_epoch_mean"].as_f64().unwrap() > 50.0);
}

/// The sync's full copy goes in pieces (`--sync-piece-mib`, 16 by default): the baseline, then
/// pre-copy epochs on top of it, none larger than a piece. The replica built from them matches
/// the primary exactly, and the status says how the sync went.
#[test]
fn a_sync_in_pieces_builds_an_exact_replica() {
    let _g = serial_guard();
    if !kvm_available("a_sync_in_pieces_builds_an_exact_replica") {
        return;
    }
    // 1 MiB pieces (256 pages): the full copy and the pre-copy round after it (~700 pages
    // the dirty guest wrote meanwhile) go in several.
    let pair = dirty_replica_matches("pieces", &["--sync-piece-mib", "1"]);
    let s = Pair::status(&pair.p_sock);
    let last = &s["protection"]["last_sync"];
    eprintln!("pieces: last sync {last}");
    let pieces = last["pieces"].as_u64().unwrap();
    let largest = last["largest_piece_pages"].as_u64().unwrap();
    let pages = last["pages"].as_u64().unwrap();
    assert!(largest <= 256, "a piece of {largest} pages, over 1 MiB: {last}");
    assert!(pages > 512 && pieces >= pages.div_ceil(256) && pieces >= 3, "the sync did not go in pieces: {last}");
    let (ok, text, err) = run(&["status", "--api", pair.p_sock.to_str().unwrap()]);
    assert!(ok, "status failed: {err}");
    assert!(text.contains(&format!(" pages in {pieces} pieces (largest {largest}) and ")), "{text}");
}

/// A sync interrupted between two of its pieces (the backup refuses its third commit, a piece
/// of the sync, and asks for a new baseline) starts over from a new baseline, and the replica
/// it builds still matches the primary exactly.
#[test]
fn a_sync_interrupted_between_pieces_starts_over_and_builds_an_exact_replica() {
    let _g = serial_guard();
    if !kvm_available("a_sync_interrupted_between_pieces_starts_over_and_builds_an_exact_replica") {
        return;
    }
    let env = [("UNDERSTUDY_FAILPOINTS", "backup.refuse@3")];
    // Half a second of writing first: the guest's 2,048-page working set is written, so the
    // full copy goes in ~9 pieces of 1 MiB and the third is one of them.
    let settle = Duration::from_millis(500);
    let pair = dirty_replica_matches_env("restart", &["--sync-piece-mib", "1"], &env, settle);
    let b = Pair::status(&pair.b_sock);
    assert_eq!(b["backup"]["rejected"], 1, "the backup did not refuse the piece: {b}");
    let perr = pair.primary.stderr();
    let again = perr.lines().find(|l| l.contains("backup needs a new baseline")).unwrap_or_else(|| {
        panic!("the sync did not start over:\n{perr}");
    });
    // During the first sync, not after it: nothing was held for an old replica.
    let plain: String = again.split('\x1b').map(|p| p.split_once('m').map_or(p, |(_, rest)| rest)).collect();
    assert!(plain.contains("output_held=false"), "{plain}");
    let last = &Pair::status(&pair.p_sock)["protection"]["last_sync"];
    assert!(last["largest_piece_pages"].as_u64().unwrap() <= 256, "{last}");
}

/// A backup unreachable long enough for the primary to run degraded (here: its process stopped),
/// then back: the session resumes where it was, the sync goes on from a pre-copy round over the
/// replica the backup kept (only the pages written since go, no full copy), and the replica
/// matches the primary exactly again.
#[test]
fn after_running_degraded_the_sync_catches_up_from_the_backups_replica() {
    let _g = serial_guard();
    if !kvm_available("after_running_degraded_the_sync_catches_up_from_the_backups_replica") {
        return;
    }
    // Long epochs of many pages (~2,500 each): the epochs the backup had not acknowledged when
    // it stopped take a while to resend and commit once it goes on, so their acks arrive after
    // the primary started its sync (and must not end it).
    let mut pair = Pair::start(None, "workload=dirty wss=64 rate=50000", "256M", &["--verify"]);
    pair.protect(&["--epoch-ms", "50", "--verify-every", "2"]);
    pair.wait_protection("protected", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    let first = Pair::status(&pair.p_sock)["protection"]["last_sync"].clone();
    assert_eq!(first["catch_up"], false, "{first}");
    let pid = pair.backup.child.id().to_string();
    let signal = |sig: &str| assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
    signal("-STOP");
    let degraded = pair.wait_protection("degraded", Duration::from_secs(20));
    eprintln!("catch-up: degraded {degraded:?} after the backup stopped");
    signal("-CONT");
    // Until this sync is done, status never says `protected`: a checkpoint from before the
    // primary ran degraded, acknowledged late by the resumed session, must not end it.
    let t0 = Instant::now();
    let mut samples = 0;
    loop {
        let p = Pair::status(&pair.p_sock)["protection"].clone();
        samples += 1;
        if p["last_sync"]["catch_up"] == true {
            break;
        }
        assert_ne!(p["state"], "protected", "protected again before the sync after running degraded ended: {p}");
        assert!(t0.elapsed() < Duration::from_secs(30), "no sync after running degraded: {p}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let back = pair.wait_protection("protected", Duration::from_secs(30));
    eprintln!(
        "catch-up: protected again {:?} after the backup went on ({samples} samples before)",
        t0.elapsed() + back
    );
    let last = Pair::status(&pair.p_sock)["protection"]["last_sync"].clone();
    eprintln!("catch-up: first sync {first}, after degraded {last}");
    assert_eq!(last["catch_up"], true, "the sync after running degraded copied everything again: {last}");
    let perr = pair.primary.stderr();
    assert!(perr.contains("catching up from its replica"), "{perr}");
    // Exact again: sampled epochs after the catch-up are equal on both sides.
    std::thread::sleep(Duration::from_secs(2));
    let p = Pair::ctl(&pair.p_sock, "verify-journal");
    std::thread::sleep(Duration::from_millis(300));
    let b = Pair::ctl(&pair.b_sock, "verify-journal");
    let common = compare_journals(&p, &b);
    let last_epoch = |j: &serde_json::Value| j.as_array().unwrap().last().unwrap()["epoch"].as_u64().unwrap();
    eprintln!("catch-up: {common} sampled epochs equal, last {} / {}", last_epoch(&p), last_epoch(&b));
    assert!(common >= 20, "{common}");
}

/// `protect --wait` follows the sync (a line per round and per quarter of the full copy on
/// stderr when not on a terminal) and returns once the VM is protected; with the backup gone it
/// fails, naming the state protection fell to and why.
#[test]
fn protect_wait_follows_the_sync_until_protected_or_fails_naming_why() {
    let _g = serial_guard();
    if !kvm_available("protect_wait_follows_the_sync_until_protected_or_fails_naming_why") {
        return;
    }
    // 128 MiB written before protecting: the full copy goes in 128 pieces of 1 MiB and lasts
    // long enough (~0.5 s here) for the wait to see it under way.
    let mut pair = Pair::start(None, "workload=dirty wss=128 rate=100000", "256M", &[]);
    std::thread::sleep(Duration::from_millis(1500));
    let (ok, out, err) = pair.try_protect(&["--wait", "--sync-piece-mib", "1"]);
    eprintln!("protect --wait:\n{out}{err}");
    assert!(ok, "protect --wait failed: {err}");
    assert!(err.contains("sync: full copy, "), "no progress of the full copy: {err}");
    assert!(err.contains("protected after ") && err.contains("last sync: "), "{err}");
    assert_eq!(Pair::status(&pair.p_sock)["protection"]["state"], "protected", "returned before protected");
    let (ok, _, _) = run(&["unprotect", "--api", pair.p_sock.to_str().unwrap()]);
    assert!(ok);
    // The backup gone: protection degrades (after --degrade-after-ms) and the wait says so.
    pair.backup.child.kill().unwrap();
    let _ = pair.backup.child.wait();
    let (ok, out, err) = pair.try_protect(&["--wait", "--degrade-after-ms", "300"]);
    eprintln!("protect --wait, no backup:\n{out}{err}");
    assert!(!ok, "protect --wait succeeded without a backup: {err}");
    assert!(err.contains("protection is degraded, not protected (backup unreachable for "), "{err}");
}

/// In-epoch pre-copy (`--epoch-precopy-us`): the pause copies only what was dirtied after the
/// pre-copy, the checkpoint takes the other pages from it; the replica still matches exactly.
#[test]
fn replica_matches_primary_exactly_with_epoch_precopy() {
    let _g = serial_guard();
    if !kvm_available("replica_matches_primary_exactly_with_epoch_precopy") {
        return;
    }
    // A long lead: most of each epoch's pages come from the pre-copy.
    let pair = dirty_replica_matches("precopy", &["--epoch-precopy-us", "5000"]);
    let log = pair.primary.stderr();
    assert!(log.contains("in-epoch pre-copy on"), "pre-copy never ran:\n{log}");
    assert!(!log.contains("in-epoch pre-copy off"), "pre-copy rested for this guest:\n{log}");
}

#[test]
fn output_commit_holds_every_frame_until_its_epoch_is_acked() {
    let _g = serial_guard();
    if !kvm_available("output_commit_holds_every_frame_until_its_epoch_is_acked") {
        return;
    }
    let Some(ns) = NetNs::new("output_commit", "oc", 81) else { return };
    let cmdline = format!("workload=kv ip={}/24", ns.guest_ip);
    let mut pair = Pair::start(Some(&ns), &cmdline, "64M", &["--tap", "tap0"]);
    // Long epochs make the hold visible.
    pair.protect(&["--epoch-ms", "40"]);
    pair.wait_protection("protected", Duration::from_secs(20));

    let mut cap = ns.command("/usr/bin/python3");
    cap.args(["-c", CAPTURE, "9", GUEST_MAC]).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let cap = cap.spawn().expect("capture");
    std::thread::sleep(Duration::from_millis(500));
    let out = python_in(&ns, KV_CLIENT, &[&ns.guest_ip, "set", "150"], Duration::from_secs(60));
    let lat = out.lines().last().unwrap().to_string();
    eprintln!("output commit: set latency with 40 ms epochs: {lat}");
    let captured = wait_with_timeout(cap, Duration::from_secs(20));
    let journal = Pair::ctl(&pair.p_sock, "output-journal");
    let released = journal["released"].as_array().unwrap();

    let frames: Vec<serde_json::Value> = String::from_utf8_lossy(&captured.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(frames.len() > 150, "captured only {} guest frames", frames.len());
    let mut max_margin_ms: f64 = 0.0;
    let mut epochs = std::collections::BTreeSet::new();
    for f in &frames {
        let (t, crc, len) = (f["t"].as_u64().unwrap(), f["crc"].as_u64().unwrap(), f["len"].as_u64().unwrap());
        // Some release of a frame with these bytes happened no later than the capture, and the
        // ack of the epoch that produced it came before that release.
        let m = released.iter().find(|r| {
            r["crc"].as_u64() == Some(crc) && r["len"].as_u64() == Some(len) && r["released_ns"].as_u64().unwrap() <= t
        });
        let r = m.unwrap_or_else(|| panic!("frame crc {crc:#x} len {len} reached the wire without being released"));
        let acked = r["acked_ns"].as_u64().unwrap();
        assert!(acked <= t, "frame of epoch {} seen {} ns before its ack", r["epoch"], acked - t);
        max_margin_ms = max_margin_ms.max((t - acked) as f64 / 1e6);
        epochs.insert(r["epoch"].as_u64().unwrap());
    }
    eprintln!(
        "output commit: {} guest frames captured, each after the ack of its epoch ({} epochs); {} release records",
        frames.len(),
        epochs.len(),
        released.len()
    );
    let s = Pair::status(&pair.p_sock);
    assert_eq!(s["protection"]["state"], "protected");
}

#[test]
fn acknowledged_writes_survive_kill_and_promotion() {
    let _g = serial_guard();
    if !kvm_available("acknowledged_writes_survive_kill_and_promotion") {
        return;
    }
    let Some(ns) = NetNs::new("acknowledged_writes", "aw", 82) else { return };
    let cmdline = format!("workload=kv ip={}/24", ns.guest_ip);
    let mut pair = Pair::start(Some(&ns), &cmdline, "64M", &["--tap", "tap0"]);
    pair.protect(&[]);
    pair.wait_protection("protected", Duration::from_secs(20));
    let n = 300;
    let out = python_in(&ns, KV_CLIENT, &[&ns.guest_ip, "set", &n.to_string()], Duration::from_secs(60));
    let acked = out.lines().filter(|l| l.starts_with("ok ")).count();
    assert_eq!(acked, n);
    // Kill the primary the moment the last reply arrived.
    let t_kill = Instant::now();
    pair.primary.child.kill().unwrap();
    let _ = pair.primary.child.wait();
    let (ok, out, err) = run(&["promote", "--api", pair.b_sock.to_str().unwrap()]);
    assert!(ok, "promote failed: {err}\n{}", pair.backup.stderr());
    eprintln!("promoted {:?} after the kill: {}", t_kill.elapsed(), out.trim());
    let out = python_in(&ns, KV_CLIENT, &[&ns.guest_ip, "get", &n.to_string()], Duration::from_secs(60));
    assert!(out.lines().any(|l| l == "bad 0"), "acknowledged writes lost after failover:\n{out}");
    eprintln!("all {n} acknowledged writes readable from the promoted guest");
}

#[test]
fn killed_primary_mid_ship_leaves_a_whole_replica() {
    let _g = serial_guard();
    if !kvm_available("killed_primary_mid_ship_leaves_a_whole_replica") {
        return;
    }
    // Large epochs: thousands of dirty pages each, so a kill lands mid-ship.
    let mut pair = Pair::start(None, "workload=dirty wss=32 rate=150000", "128M", &["--verify"]);
    pair.protect(&["--epoch-ms", "30", "--verify-every", "1"]);
    pair.wait_protection("protected", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(1500));
    let p = Pair::ctl(&pair.p_sock, "verify-journal");
    pair.primary.child.kill().unwrap();
    let _ = pair.primary.child.wait();
    std::thread::sleep(Duration::from_millis(300));
    let b = Pair::ctl(&pair.b_sock, "verify-journal");
    let common = compare_journals(&p, &b);
    let st = Pair::status(&pair.b_sock);
    eprintln!("mid-ship kill: {common} epochs verified equal; backup {}", st["backup"]);
    assert_eq!(st["backup"]["committed_epoch"], st["backup"]["consistent_epoch"]);
    let (ok, out, err) = run(&["promote", "--api", pair.b_sock.to_str().unwrap()]);
    assert!(ok, "promote failed: {err}");
    eprintln!("promoted: {}", out.trim());
    let bs = pair.b_serial();
    let progress = |t: &str| t.lines().filter(|l| l.starts_with("dirty gen=")).count();
    wait_for(&bs, Duration::from_secs(20), &mut pair.backup, "promoted dirty progress", |t| progress(t) >= 2);
    let text = read_text(&bs);
    // Only whole lines: the guest may be printing the next one.
    let text = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    assert!(!text.contains("dirty error"), "promoted working set is torn:\n{text}");
    assert!(text.lines().filter(|l| l.starts_with("dirty gen=")).all(|l| l.contains("errors=0")), "{text}");
}

#[test]
fn losing_the_backup_degrades_and_the_guest_keeps_running() {
    let _g = serial_guard();
    if !kvm_available("losing_the_backup_degrades_and_the_guest_keeps_running") {
        return;
    }
    let mut pair = Pair::start(None, "workload=counter period_ms=20", "64M", &[]);
    pair.protect(&["--degrade-after-ms", "300"]);
    pair.wait_protection("protected", Duration::from_secs(20));
    pair.backup.child.kill().unwrap();
    let _ = pair.backup.child.wait();
    let t = pair.wait_protection("degraded", Duration::from_secs(10));
    eprintln!("degraded {t:?} after the backup was killed (degrade-after 300 ms)");
    let s = Pair::status(&pair.p_sock);
    // The backup's host closed the liveness line: evidence of a dead process, no need to wait
    // out `--degrade-after-ms` for it to come back.
    assert!(s["protection"]["reason"].as_str().unwrap().contains("the backup's process is gone"), "{s}");
    let before = last_seq(&read_text(&pair.p_serial()));
    let ps = pair.p_serial();
    wait_for(&ps, Duration::from_secs(5), &mut pair.primary, "counter progress while degraded", |t| {
        last_seq(t) >= before + 10
    });
    assert!(pair.primary.stderr().contains("DEGRADED"), "no loud degraded log line");
}

#[test]
fn replica_matches_primary_exactly_kv_under_load() {
    let _g = serial_guard();
    if !kvm_available("replica_matches_primary_exactly_kv_under_load") {
        return;
    }
    let Some(ns) = NetNs::new("kv_exactness", "kx", 83) else { return };
    let cmdline = format!("workload=kv ip={}/24", ns.guest_ip);
    let mut pair = Pair::start(Some(&ns), &cmdline, "64M", &["--tap", "tap0", "--verify"]);
    pair.protect(&["--verify-every", "2"]);
    pair.wait_protection("protected", Duration::from_secs(20));
    // Load while checkpointing: sets and gets over TCP.
    let out = python_in(&ns, KV_CLIENT, &[&ns.guest_ip, "set", "400"], Duration::from_secs(90));
    assert_eq!(out.lines().filter(|l| l.starts_with("ok ")).count(), 400);
    let p = Pair::ctl(&pair.p_sock, "verify-journal");
    std::thread::sleep(Duration::from_millis(300));
    let b = Pair::ctl(&pair.b_sock, "verify-journal");
    let common = compare_journals(&p, &b);
    eprintln!("kv under load: {common} sampled epochs, memory digest and state crc equal on both sides");
    assert!(common >= 10, "too few sampled epochs in common: {common}");
    // Honest counters (issue 16): `bytes_sent` and `wire_bytes_per_epoch_mean` are what the
    // sender encoded, the raw harvest is beside them. kv's dirty pages are mostly zero or
    // compress: the encoded bytes are well under the raw ones.
    let s = Pair::status(&pair.p_sock);
    let p = &s["protection"];
    let (sent, raw) = (p["bytes_sent"].as_f64().unwrap(), p["raw_bytes_sent"].as_f64().unwrap());
    let (mean, raw_mean) =
        (p["wire_bytes_per_epoch_mean"].as_f64().unwrap(), p["raw_bytes_per_epoch_mean"].as_f64().unwrap());
    eprintln!("kv under load: {sent} encoded bytes of {raw} raw; per epoch {mean:.0} of {raw_mean:.0}");
    assert!(sent > 0.0 && sent < raw * 0.5, "encoded {sent} vs raw {raw}: {p}");
    assert!(mean > 0.0 && mean < raw_mean * 0.5, "{p}");
}
