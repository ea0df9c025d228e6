//! No fail-silent exits (issue 12, finding 6): a part of protection that stops on an error
//! moves to a named state that `status` shows, and either recovers or lets the guest's output
//! go explicitly; it never leaves output held with nobody to release it.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn wait_status(sock: &std::path::Path, what: &str, timeout: Duration, pred: impl Fn(&serde_json::Value) -> bool) {
    let t0 = Instant::now();
    loop {
        let s = Pair::status(sock);
        if pred(&s) {
            return;
        }
        assert!(t0.elapsed() < timeout, "{what}: not reached within {timeout:?}: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The primary's link task dies (a bug): the epoch engine stops, protection says `failed`
/// with the reason, and the guest's output is released (without arbitration: as a lost
/// backup is given up), so clients go on being served.
#[test]
fn a_dead_link_fails_protection_loudly_and_releases_output() {
    let _g = serial_guard();
    if !kvm_available("a_dead_link_fails_protection_loudly_and_releases_output") {
        return;
    }
    let Some(ns) = NetNs::new("fail_loud_link", "fl", 85) else { return };
    let cmdline = format!("workload=kv ip={}/24", ns.guest_ip);
    let env = [("UNDERSTUDY_FAILPOINTS", "primary.link-panic@40")];
    let mut pair = Pair::start_env(Some(&ns), &cmdline, "64M", &["--tap", "tap0"], &[], &env);
    pair.protect(&[]);
    wait_status(&pair.p_sock, "protection failed", Duration::from_secs(30), |s| s["protection"]["state"] == "failed");
    let s = Pair::status(&pair.p_sock);
    let reason = s["protection"]["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("epoch engine stopped"), "no reason given: {s}");
    assert!(pair.primary.stderr().contains("protection state: FAILED"), "the failure was not logged");
    // Output flows: a client is served at once.
    let out = python_in(&ns, KV_CLIENT, &[&ns.guest_ip, "set", "50"], Duration::from_secs(30));
    assert_eq!(out.lines().filter(|l| l.starts_with("ok ")).count(), 50, "{out}");
    let s = Pair::status(&pair.p_sock);
    assert_eq!(s["protection"]["held_output_frames"], 0, "output still held: {s}");
    pair.primary.assert_alive();
    eprintln!("link died: protection {} ({reason}); the guest serves its clients", s["protection"]["state"]);
}

/// The backup's session task dies (a bug): the backup keeps listening with a fresh receiver,
/// counts the failed session in its status, and the primary re-syncs to it and is protected
/// again.
#[test]
fn a_failed_backup_session_keeps_the_backup_listening_and_protection_recovers() {
    let _g = serial_guard();
    if !kvm_available("a_failed_backup_session_keeps_the_backup_listening_and_protection_recovers") {
        return;
    }
    let env = [("UNDERSTUDY_FAILPOINTS", "backup.session-panic@60")];
    let mut pair = Pair::start_env(None, "workload=counter period_ms=20", "64M", &[], &[], &env);
    pair.protect(&["--epoch-ms", "20"]);
    pair.wait_protection("protected", Duration::from_secs(20));
    wait_status(&pair.b_sock, "failed session counted", Duration::from_secs(30), |s| {
        s["backup"]["failed_sessions"].as_u64() == Some(1)
    });
    let b = Pair::status(&pair.b_sock);
    assert!(
        b["backup"]["last_error"].as_str().unwrap_or_default().contains("session task failed"),
        "the failure is not named in status: {b}"
    );
    let acked = Pair::status(&pair.p_sock)["protection"]["last_acked_epoch"].as_u64().unwrap_or(0);
    // The primary re-syncs and new epochs are acked by the same backup process.
    wait_status(&pair.p_sock, "protected again", Duration::from_secs(30), |s| {
        s["protection"]["state"] == "protected"
            && s["protection"]["last_acked_epoch"].as_u64().unwrap_or(0) > acked + 20
    });
    wait_status(&pair.b_sock, "backup consistent again", Duration::from_secs(10), |s| {
        s["backup"]["state"] == "consistent" && s["backup"]["connected"] == true
    });
    pair.backup.assert_alive();
    assert!(pair.backup.stderr().contains("listening on with a fresh receiver"));
    eprintln!("backup session failed and recovered: {}", Pair::status(&pair.b_sock)["backup"]);
}
