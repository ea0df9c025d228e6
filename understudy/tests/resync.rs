//! A re-sync keeps its promise (issue 12, finding 1): when the backup asks for a new baseline
//! while the VM is protected, the primary keeps the guest's output held until a checkpoint of
//! the new sync is committed, and the backup keeps its last consistent checkpoint to roll back
//! to. A primary killed in the middle of that re-sync (after the backup already committed the
//! new baseline) therefore loses no acknowledged write.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

fn acked(out: &str) -> usize {
    out.lines().filter(|l| l.starts_with("ok ")).count()
}

#[test]
fn a_primary_killed_mid_resync_loses_no_acknowledged_write() {
    let _g = serial_guard();
    if !kvm_available("a_primary_killed_mid_resync_loses_no_acknowledged_write") {
        return;
    }
    let Some(ns) = NetNs::new("resync", "rs", 84) else { return };
    let cmdline = format!("workload=kv ip={}/24", ns.guest_ip);
    // The backup refuses its 150th commit (under load: ~1.5-5 s into protection), which makes
    // it ask for a baseline; the primary dies when the re-sync's second round starts, i.e.
    // after the backup committed the new baseline and its replica stopped being consistent.
    let env = [("UNDERSTUDY_FAILPOINTS", "backup.refuse@150,primary.resync@2")];
    let mut pair = Pair::start_env(Some(&ns), &cmdline, "64M", &["--tap", "tap0"], &[], &env);
    pair.protect(&[]);
    pair.wait_protection("protected", Duration::from_secs(20));

    let mut writer = ns.command("/usr/bin/python3");
    writer.arg("-c").arg(WRITER).arg(&ns.guest_ip).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut writer = writer.spawn().expect("spawn writer");
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = std::sync::Arc::clone(&lines);
        let out = writer.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        })
    };
    let acked_now = || acked(&lines.lock().unwrap().join("\n"));

    let t_writer = Instant::now();
    let died = pair.primary.wait_exit(Duration::from_secs(60));
    eprintln!(
        "primary died {:?} after the writer started, {} sets acknowledged by then",
        t_writer.elapsed(),
        acked_now()
    );
    let perr = pair.primary.stderr();
    assert!(died.is_some(), "the primary never reached primary.resync@2:\n{perr}");
    assert!(perr.contains("fault point primary.resync reached"), "the primary died elsewhere:\n{perr}");
    assert!(perr.contains("re-syncing"), "no re-sync before the kill:\n{perr}");
    let t_kill = Instant::now();

    // The backup holds the new baseline, not a consistent state: it must offer the old epoch.
    let b = Pair::status(&pair.b_sock);
    let rollback = b["backup"]["rollback_epoch"].as_u64();
    assert!(rollback.is_some(), "the backup kept no epoch to roll back to: {b}");
    assert!(b["backup"]["consistent_epoch"].is_null(), "the backup did not commit the new baseline yet: {b}");

    let (ok, out, err) = run(&["promote", "--api", pair.b_sock.to_str().unwrap()]);
    assert!(ok, "promote failed: {err}\n{}", pair.backup.stderr());
    let promoted = json(&out);
    assert_eq!(promoted["epoch"].as_u64(), rollback, "promoted from another epoch than the rollback: {promoted}");
    eprintln!("promoted {:?} after the kill, rolled back to epoch {rollback:?}", t_kill.elapsed());

    // The client carries on against the promoted guest (its TCP resends what the dead primary
    // never answered: the replies were held).
    let at_promotion = acked_now();
    let t0 = Instant::now();
    while acked_now() < at_promotion + 100 && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let resumed = t0.elapsed();
    let _ = writer.kill();
    let _ = writer.wait();
    let _ = reader.join();
    let out = lines.lock().unwrap().join("\n");
    let n = acked(&out);
    eprintln!("writer: {at_promotion} acknowledged sets before the promotion, {n} in all; 100 more took {resumed:?}");
    assert!(at_promotion > 50, "too few acknowledged writes to judge: {at_promotion}\n{out}");
    assert!(n >= at_promotion + 100, "the client did not carry on against the promoted guest:\n{out}");

    let check = python_in(&ns, KV_CLIENT, &[&ns.guest_ip, "get", &n.to_string()], Duration::from_secs(60));
    assert!(check.lines().any(|l| l == "bad 0"), "acknowledged writes lost across the re-sync and failover:\n{check}");
    let backup_log = pair.backup.stderr();
    assert!(backup_log.contains("rolled back an unfinished re-sync"), "no rollback logged:\n{backup_log}");
    eprintln!("all {n} acknowledged writes readable from the promoted guest");
}
