//! Failover with arbitration: a witness, the backup's agent and the primary's agent form the
//! raft group; the backup promotes only when granted, and a primary that was only frozen (a
//! partition seen from the others) is fenced when it comes back.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

struct Group {
    pair: Pair,
    witness: Proc,
}

fn arbiter_args(dir: &Path, id: u64, ports: [u16; 3]) -> Vec<String> {
    let mut v = vec![
        "--arbiter-id".to_string(),
        id.to_string(),
        "--arbiter-listen".into(),
        format!("127.0.0.1:{}", ports[id as usize - 1]),
        "--arbiter-data".into(),
        dir.join(format!("raft{id}")).to_string_lossy().into_owned(),
    ];
    for peer in 1..=3u64 {
        if peer != id {
            v.push("--arbiter-peer".into());
            v.push(format!("{peer}=127.0.0.1:{}", ports[peer as usize - 1]));
        }
    }
    v
}

fn start_group(cmdline: &str) -> Group {
    let ports = [free_udp_port(), free_udp_port(), free_udp_port()];
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_path_buf();
    let wargs: Vec<String> = vec![
        "witness".into(),
        "--data".into(),
        d.join("raft3").to_string_lossy().into_owned(),
        "--listen".into(),
        format!("127.0.0.1:{}", ports[2]),
        "--peer".into(),
        format!("1=127.0.0.1:{}", ports[0]),
        "--peer".into(),
        format!("2=127.0.0.1:{}", ports[1]),
    ];
    let wargs: Vec<&str> = wargs.iter().map(String::as_str).collect();
    let witness = Proc::spawn(&d, "witness", &wargs);
    let b = arbiter_args(&d, 2, ports);
    let mut bargs: Vec<&str> = b.iter().map(String::as_str).collect();
    bargs.extend(["--detect-ms", "150", "--heartbeat-ms", "10"]);
    let p = arbiter_args(&d, 1, ports);
    let pextra: Vec<&str> = p.iter().map(String::as_str).collect();
    let pair = Pair::start_with(None, cmdline, "64M", &bargs, &pextra);
    std::mem::forget(tmp);
    Group { pair, witness }
}

#[test]
fn backup_promotes_only_when_granted_and_the_guest_goes_on() {
    let _g = serial_guard();
    if !kvm_available("backup_promotes_only_when_granted_and_the_guest_goes_on") {
        return;
    }
    let mut g = start_group("workload=counter period_ms=20");
    g.pair.protect(&["--backup-node", "2", "--detect-ms", "150", "--heartbeat-ms", "10"]);
    g.pair.wait_protection("protected", Duration::from_secs(20));
    let stderr_path = g.pair.primary.stderr_path.clone();
    wait_for(&stderr_path, Duration::from_secs(10), &mut g.pair.primary, "backup recorded", |t| {
        t.contains("asked the group to record the backup")
    });
    std::thread::sleep(Duration::from_millis(500));
    let before = last_seq(&read_text(&g.pair.p_serial()));
    let t_kill = Instant::now();
    g.pair.primary.child.kill().unwrap();
    let _ = g.pair.primary.child.wait();
    let bs = g.pair.b_serial();
    let took =
        wait_for(&bs, Duration::from_secs(10), &mut g.pair.backup, "promoted counter", |t| last_seq(t) > before + 5);
    let promoted = g.pair.backup.stderr();
    assert!(promoted.contains("arbitration: granted"), "promoted without a grant:\n{promoted}");
    eprintln!(
        "promoted and counting {:?} after the kill (kill->grant->restore->run)",
        t_kill.elapsed().min(took + Duration::from_secs(0))
    );
    let s = Pair::status(&g.pair.b_sock);
    assert_eq!(s["origin"]["kind"], "promoted", "{s}");
    let _ = &mut g.witness;
}

#[test]
fn a_frozen_primary_is_fenced_when_it_comes_back() {
    let _g = serial_guard();
    if !kvm_available("a_frozen_primary_is_fenced_when_it_comes_back") {
        return;
    }
    let mut g = start_group("workload=counter period_ms=20");
    g.pair.protect(&["--backup-node", "2", "--detect-ms", "150", "--heartbeat-ms", "10"]);
    g.pair.wait_protection("protected", Duration::from_secs(20));
    let stderr_path = g.pair.primary.stderr_path.clone();
    wait_for(&stderr_path, Duration::from_secs(10), &mut g.pair.primary, "backup recorded", |t| {
        t.contains("asked the group to record the backup")
    });
    std::thread::sleep(Duration::from_millis(500));
    // Freeze the primary: to the others it is partitioned away (or dead).
    let pid = g.pair.primary.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let bs = g.pair.b_serial();
    let before = last_seq(&read_text(&g.pair.p_serial()));
    wait_for(&bs, Duration::from_secs(10), &mut g.pair.backup, "promoted counter", |t| last_seq(t) > before + 5);
    // Thaw it: it must learn that a newer generation was granted and stop its guest for good.
    assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    let status = g.pair.primary.wait_exit(Duration::from_secs(10));
    let err = g.pair.primary.stderr();
    assert!(err.contains("FENCED"), "old primary not fenced:\n{err}");
    assert!(status.is_some(), "fenced primary still running");
    // Its guest stopped: no new counter lines after the fence.
    let frozen = read_text(&g.pair.p_serial());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(frozen, read_text(&g.pair.p_serial()), "fenced guest kept running");
    eprintln!("frozen primary fenced after thaw; promoted copy runs on");
}
