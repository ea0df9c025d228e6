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
    ports: [u16; 3],
    raft_dir: std::path::PathBuf,
}

const NAMES: [&str; 3] = ["primary", "backup", "witness"];

/// Arbitration flags for node `id` (QUIC with mutual TLS: peers named by certificate).
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
            v.push(format!("{peer}={}@127.0.0.1:{}", NAMES[peer as usize - 1], ports[peer as usize - 1]));
        }
    }
    v
}

/// A primary, a backup and a witness, with extra agent flags for the primary and the backup.
fn start_group_with(cmdline: &str, agent_extra: &[&str]) -> Group {
    let ports = [free_udp_port(), free_udp_port(), free_udp_port()];
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_path_buf();
    let certs = make_certs(&d, &["primary", "backup"], "witness");
    let wargs: Vec<String> = vec![
        "witness".into(),
        "--data".into(),
        d.join("raft3").to_string_lossy().into_owned(),
        "--listen".into(),
        format!("127.0.0.1:{}", ports[2]),
        "--certs".into(),
        certs.to_string_lossy().into_owned(),
        "--peer".into(),
        format!("1=primary@127.0.0.1:{}", ports[0]),
        "--peer".into(),
        format!("2=backup@127.0.0.1:{}", ports[1]),
    ];
    let wargs: Vec<&str> = wargs.iter().map(String::as_str).collect();
    let witness = Proc::spawn(&d, "witness", &wargs);
    let mut b = arbiter_args(&d, 2, ports);
    b.extend([
        "--arbiter-certs".to_string(),
        certs.to_string_lossy().into_owned(),
        "--arbiter-name".into(),
        "backup".into(),
    ]);
    let mut bargs: Vec<&str> = b.iter().map(String::as_str).collect();
    bargs.extend(["--detect-ms", "150", "--heartbeat-ms", "10"]);
    bargs.extend_from_slice(agent_extra);
    let mut p = arbiter_args(&d, 1, ports);
    p.extend([
        "--arbiter-certs".to_string(),
        certs.to_string_lossy().into_owned(),
        "--arbiter-name".into(),
        "primary".into(),
    ]);
    let mut pextra: Vec<&str> = p.iter().map(String::as_str).collect();
    pextra.extend_from_slice(agent_extra);
    let pair = Pair::start_with(None, cmdline, "64M", &bargs, &pextra);
    let raft_dir = tmp.keep();
    Group { pair, witness, ports, raft_dir }
}

/// A group whose primary is protected and has its backup recorded by the group.
fn protected_group(cmdline: &str) -> Group {
    protected_group_with(cmdline, &[])
}

fn protected_group_with(cmdline: &str, agent_extra: &[&str]) -> Group {
    let mut g = start_group_with(cmdline, agent_extra);
    g.pair.protect(&["--backup-node", "2", "--detect-ms", "150", "--heartbeat-ms", "10"]);
    g.pair.wait_protection("protected", Duration::from_secs(20));
    let stderr_path = g.pair.primary.stderr_path.clone();
    wait_for(&stderr_path, Duration::from_secs(10), &mut g.pair.primary, "backup recorded", |t| {
        t.contains("asked the group to record the backup")
    });
    std::thread::sleep(Duration::from_millis(500));
    g
}

#[test]
fn backup_promotes_only_when_granted_and_the_guest_goes_on() {
    let _g = serial_guard();
    if !kvm_available("backup_promotes_only_when_granted_and_the_guest_goes_on") {
        return;
    }
    let mut g = protected_group("workload=counter period_ms=20");
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

    // Re-protection: the old primary's host comes back as the backup (node 1, same raft
    // state), and the promoted VM is protected to it. No failback.
    let d = g.pair.dir.path().to_path_buf();
    let ports = g.ports;
    let port = free_udp_port();
    let listen = format!("127.0.0.1:{port}");
    let b1_sock = d.join("b1.sock");
    let mut args: Vec<String> = [
        "backup",
        "--listen",
        &listen,
        "--certs",
        d.join("certs").to_str().unwrap(),
        "--memory",
        "64M",
        "--api",
        b1_sock.to_str().unwrap(),
        "--serial",
        d.join("b1-serial.log").to_str().unwrap(),
        "--detect-ms",
        "150",
        "--heartbeat-ms",
        "10",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(arbiter_args(&g.raft_dir, 1, ports));
    args.extend([
        "--arbiter-certs".to_string(),
        g.raft_dir.join("certs").to_string_lossy().into_owned(),
        "--arbiter-name".into(),
        "primary".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut rejoined = Proc::spawn(&d, "rejoined-backup", &args);
    wait_for(&b1_sock, Duration::from_secs(10), &mut rejoined, "rejoined backup api", |_| b1_sock.exists());
    let certs = d.join("certs");
    let (ok, out, err) = run(&[
        "protect",
        "--api",
        g.pair.b_sock.to_str().unwrap(),
        "--backup",
        &listen,
        "--certs",
        certs.to_str().unwrap(),
        "--backup-node",
        "1",
        "--detect-ms",
        "150",
        "--heartbeat-ms",
        "10",
    ]);
    assert!(ok, "re-protect failed: {err}{out}");
    let t0 = Instant::now();
    loop {
        let s = Pair::status(&g.pair.b_sock);
        if s["protection"]["state"] == "protected" {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "re-protection never reached protected: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let sb = Pair::status(&b1_sock);
    assert_eq!(sb["backup"]["state"], "consistent", "{sb}");
    eprintln!("re-protected: the old primary's host is the backup of the promoted vm ({:?})", t0.elapsed());
    let _ = &mut g.witness;
}

#[test]
fn a_frozen_primary_is_fenced_when_it_comes_back() {
    let _g = serial_guard();
    if !kvm_available("a_frozen_primary_is_fenced_when_it_comes_back") {
        return;
    }
    let mut g = protected_group("workload=counter period_ms=20");
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

/// `understudy promote` on a backup with arbitration goes through the group: while the
/// primary is alive and renews its lease the group grants nothing, so the request is refused
/// with the flag that forces it, and nothing changes; `--force` promotes without the group.
#[test]
fn promote_through_the_api_asks_the_group_and_refuses_while_the_primary_holds_its_lease() {
    let _g = serial_guard();
    if !kvm_available("promote_through_the_api_asks_the_group_and_refuses_while_the_primary_holds_its_lease") {
        return;
    }
    // A lease of 300 ms: on a loaded 2-core host a starved primary can miss a 30 ms lease, and
    // then the group rightly grants the backup; this test is about a primary that holds it.
    let mut g = protected_group_with("workload=counter period_ms=20", &["--lease-ms", "300", "--lease-renew-ms", "50"]);
    let t0 = Instant::now();
    let (ok, out, err) = run(&["promote", "--api", g.pair.b_sock.to_str().unwrap()]);
    assert!(!ok, "promote succeeded while the primary holds its lease: {out}");
    assert!(err.contains("did not grant") && err.contains("--force"), "unhelpful refusal: {err}");
    eprintln!("promote refused after {:?}: {}", t0.elapsed(), err.trim());
    let s = Pair::status(&g.pair.b_sock);
    assert_eq!(s["role"], "backup", "the backup changed role: {s}");
    g.pair.primary.assert_alive();
    let p = Pair::status(&g.pair.p_sock);
    assert_eq!(p["protection"]["state"], "protected", "{p}");
    assert!(!g.pair.backup.stderr().contains("PROMOTED"), "the backup promoted anyway");

    let (ok, out, err) = run(&["promote", "--force", "--api", g.pair.b_sock.to_str().unwrap()]);
    assert!(ok, "forced promotion failed: {err}");
    assert_eq!(json(&out)["forced"], true, "{out}");
    assert!(g.pair.backup.stderr().contains("FORCED PROMOTION"), "a forced promotion must be logged loudly");
    let _ = &mut g.witness;
}

#[test]
fn a_primary_whose_arbiter_dies_exits_and_the_backup_takes_over() {
    let _g = serial_guard();
    if !kvm_available("a_primary_whose_arbiter_dies_exits_and_the_backup_takes_over") {
        return;
    }
    let mut g = protected_group("workload=counter period_ms=20");
    // The primary's raft directory disappears (deleted, or its disk unmounted): appends still go
    // to the open journal file, but the next compaction (every 1,024 entries: about 10 s of
    // renewals) cannot write its new file, and the arbiter stops. Before, its task ended
    // silently: the primary ran on holding its output for good, and the backup, still hearing
    // it, never took over.
    std::fs::remove_dir_all(g.raft_dir.join("raft1")).unwrap();
    let before = Instant::now();
    let status = g.pair.primary.wait_exit(Duration::from_secs(60));
    let err = g.pair.primary.stderr();
    let tail: String = err.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    let status = status.unwrap_or_else(|| panic!("the primary runs on without its arbiter:\n{tail}"));
    assert!(!status.success(), "the primary exited 0 after its arbiter died:\n{tail}");
    for needle in ["ARBITER STOPPED", "arbiter journal", "ARBITRATION FAILED", "understudy: error: arbitration failed"]
    {
        assert!(err.contains(needle), "no {needle:?} in the primary's log:\n{tail}");
    }
    eprintln!("the primary exited {:?} after its raft directory went ({status})", before.elapsed());
    // The guest stopped with it, and the other two voters hand the VM to the backup.
    let frozen = last_seq(&read_text(&g.pair.p_serial()));
    let bs = g.pair.b_serial();
    wait_for(&bs, Duration::from_secs(10), &mut g.pair.backup, "promoted counter", |t| last_seq(t) > frozen + 5);
    assert!(g.pair.backup.stderr().contains("arbitration: granted"));
    let _ = &mut g.witness;
}
