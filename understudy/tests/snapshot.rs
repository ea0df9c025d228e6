//! Snapshot and restore of real VMs running the fixture guest: the guest continues exactly.

mod common;

use std::time::Duration;

use common::*;
use guest_kv::checksum::{COUNTER_SUM_INIT, counter_step};

/// Boots `cmdline`, waits for `ready` and `until(serial)`, snapshots with `--then pause`, stops
/// the first process, restores in a second one. Returns (dir, serial1, serial2, snapshot json,
/// restored proc).
struct RoundTrip {
    dir: tempfile::TempDir,
    serial1: String,
    snapshot: serde_json::Value,
    restored: Proc,
}

fn round_trip(test: &str, cmdline: &str, memory: &str, until: impl Fn(&str) -> bool) -> RoundTrip {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s1 = d.join("serial1.log");
    let api1 = d.join("vm1.sock");
    let args = vm_args(cmdline, memory, &s1, &api1);
    let mut p1 = Proc::spawn(d, "run", &args.iter().map(String::as_str).collect::<Vec<_>>());
    let boot = wait_for(&s1, Duration::from_secs(10), &mut p1, "ready", |t| t.lines().any(|l| l.trim() == "ready"));
    eprintln!("{test}: guest ready {:.1} ms after spawning understudy run", boot.as_secs_f64() * 1e3);
    wait_for(&s1, Duration::from_secs(20), &mut p1, "workload progress", &until);
    let snap = d.join("snap");
    let (ok, out, err) = run(&["snapshot", "--api", api1.to_str().unwrap(), "--then", "pause", snap.to_str().unwrap()]);
    assert!(ok, "snapshot failed: {err}");
    let snapshot = json(&out);
    eprintln!("{test}: snapshot {snapshot}");
    let serial1 = read_text(&s1);
    let (ok, _, err) = run(&["ctl", "--api", api1.to_str().unwrap(), "shutdown"]);
    assert!(ok, "shutdown failed: {err}");
    assert!(p1.wait_exit(Duration::from_secs(10)).is_some(), "first vm did not exit");
    assert_eq!(serial1, read_text(&s1), "the paused vm printed after its snapshot");

    let s2 = d.join("serial2.log");
    let api2 = d.join("vm2.sock");
    let mut restored = Proc::spawn(
        d,
        "restore",
        &["restore", snap.to_str().unwrap(), "--serial", s2.to_str().unwrap(), "--api", api2.to_str().unwrap()],
    );
    wait_for(&api2, Duration::from_secs(10), &mut restored, "api socket", |_| api2.exists());
    let (ok, out, err) = run(&["status", "--api", api2.to_str().unwrap(), "--json"]);
    assert!(ok, "status failed: {err}");
    let status = json(&out);
    assert_eq!(
        status["origin"]["memory_digest"], snapshot["memory_digest"],
        "restored memory digest differs from the snapshot's"
    );
    eprintln!("{test}: restored in {} ms", status["origin"]["restore_ms"]);
    RoundTrip { dir, serial1, snapshot, restored }
}

#[test]
fn counter_continues_exactly_after_restore() {
    let _g = serial_guard();
    if !kvm_available("counter_continues_exactly_after_restore") {
        return;
    }
    let mut rt = round_trip("counter", "workload=counter period_ms=10", "64M", |t| last_seq(t) >= 30);
    let s2 = rt.dir.path().join("serial2.log");
    let at_snapshot = last_seq(&rt.serial1);
    wait_for(&s2, Duration::from_secs(20), &mut rt.restored, "restored counter progress", |t| {
        last_seq(&format!("{}{t}", rt.serial1)) >= at_snapshot + 30
    });
    // The two logs joined must be one unbroken sequence: a line cut by the snapshot is
    // completed by the restored guest.
    let joined = format!("{}{}", rt.serial1, read_text(&s2));
    let lines = counter_lines(&joined);
    assert!(lines.len() as u64 >= at_snapshot + 30);
    let mut sum = COUNTER_SUM_INIT;
    for (i, &(n, s)) in lines.iter().enumerate() {
        assert_eq!(n, i as u64 + 1, "gap or repeat at line {i}: {joined}");
        sum = counter_step(sum, n);
        assert_eq!(s, sum, "wrong checksum at seq {n}");
    }
    eprintln!("counter: snapshot at seq {at_snapshot}, restored guest reached seq {}", lines.len());
    let _ = rt.snapshot;
}

#[test]
fn dirty_working_set_survives_restore() {
    let _g = serial_guard();
    if !kvm_available("dirty_working_set_survives_restore") {
        return;
    }
    let progress = |t: &str| t.lines().filter(|l| l.starts_with("dirty gen=")).count();
    let mut rt = round_trip("dirty", "workload=dirty wss=16 rate=20000", "128M", |t| progress(t) >= 2);
    let s2 = rt.dir.path().join("serial2.log");
    wait_for(&s2, Duration::from_secs(20), &mut rt.restored, "restored dirty progress", |t| progress(t) >= 3);
    let out = read_text(&s2);
    // Only whole lines: the guest may be printing the next one.
    let out = &out[..out.rfind('\n').map_or(0, |i| i + 1)];
    assert!(!out.contains("dirty error"), "restored working set corrupted:\n{out}");
    for l in out.lines().filter(|l| l.starts_with("dirty gen=")) {
        assert!(l.contains("errors=0"), "restored guest reports errors: {l}");
    }
}

#[test]
fn damaged_snapshots_are_refused_with_clear_errors() {
    let _g = serial_guard();
    if !kvm_available("damaged_snapshots_are_refused_with_clear_errors") {
        return;
    }
    let rt = round_trip("damaged", "workload=counter period_ms=10", "32M", |t| last_seq(t) >= 3);
    drop(rt.restored);
    let snap = rt.dir.path().join("snap");
    let mem = snap.join("memory.bin");
    let good = std::fs::read(&mem).unwrap();

    let mut bad = good.clone();
    bad[4096 + 0x10_0000 + 17] ^= 0x40;
    std::fs::write(&mem, &bad).unwrap();
    let (ok, _, err) = run(&["restore", snap.to_str().unwrap(), "--serial", "none"]);
    assert!(!ok);
    eprintln!("corrupted memory: {err}");
    assert!(err.contains("crc mismatch"), "{err}");

    std::fs::write(&mem, &good[..good.len() / 2]).unwrap();
    let (ok, _, err) = run(&["restore", snap.to_str().unwrap(), "--serial", "none"]);
    assert!(!ok);
    eprintln!("truncated memory: {err}");
    assert!(err.contains("truncated"), "{err}");

    std::fs::write(&mem, &good).unwrap();
    let st = snap.join("state.bin");
    std::fs::write(&st, b"not a state at all, just some bytes").unwrap();
    let (ok, _, err) = run(&["restore", snap.to_str().unwrap(), "--serial", "none"]);
    assert!(!ok);
    eprintln!("garbage state: {err}");
    assert!(err.contains("not a snapshot state file"), "{err}");

    let (ok, _, err) = run(&["restore", "/nonexistent/snapshot", "--serial", "none"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/snapshot"), "{err}");
}
