//! Peer authentication on the replication link, end to end with the release binary: a primary
//! whose certificate carries another name, a witness's certificate, and a backup of another name
//! are all refused, and the backup's replica stays exactly what the real primary left in it.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// What the backup holds: its status counters and its verification journal (the memory digest
/// and state crc of every consistent commit).
fn replica_view(pair: &Pair) -> (serde_json::Value, serde_json::Value) {
    let s = Pair::status(&pair.b_sock)["backup"].clone();
    let counters = serde_json::json!({
        "state": s["state"],
        "committed_epoch": s["committed_epoch"],
        "consistent_epoch": s["consistent_epoch"],
        "commits": s["commits"],
        "rejected": s["rejected"],
        "pages": s["pages"],
    });
    (counters, Pair::ctl(&pair.b_sock, "verify-journal"))
}

fn unprotect(pair: &Pair) {
    let (ok, out, err) = run(&["unprotect", "--api", pair.p_sock.to_str().unwrap()]);
    assert!(ok, "unprotect failed: {err}{out}");
}

/// Waits until the backup's `last_error` satisfies `pred`; returns it.
fn wait_last_error(pair: &mut Pair, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
    let t0 = Instant::now();
    loop {
        pair.backup.assert_alive();
        let s = Pair::status(&pair.b_sock);
        if let Some(e) = s["backup"]["last_error"].as_str().filter(|e| pred(e)) {
            return e.to_owned();
        }
        assert!(
            t0.elapsed() < timeout,
            "backup last_error never matched: {s}\nbackup stderr:\n{}\nprimary stderr:\n{}",
            pair.backup.stderr(),
            pair.primary.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_replication_session_from_the_wrong_certificate_is_refused_and_the_replica_untouched() {
    let _g = serial_guard();
    if !kvm_available("a_replication_session_from_the_wrong_certificate_is_refused_and_the_replica_untouched") {
        return;
    }
    // The dirty workload changes memory all the time: any checkpoint that got through would
    // change the replica's digest.
    let mut pair = Pair::start(None, "workload=dirty wss=4 rate=5000", "64M", &["--verify"]);
    pair.protect(&[]);
    pair.wait_protection("protected", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    unprotect(&pair);
    std::thread::sleep(Duration::from_millis(500));
    let before = replica_view(&pair);
    assert_eq!(before.0["state"], "consistent", "{}", before.0);
    assert!(before.1.as_array().is_some_and(|j| !j.is_empty()), "no verification points: {}", before.1);

    // 1. The witness's key pair: refused by `protect` itself, naming the role.
    let (ok, out, err) = pair.try_protect(&["--name", "witness"]);
    assert!(!ok, "protect with the witness's certificate must fail: {out}");
    assert!(err.contains("our certificate \"witness\" has role witness; a replication link needs role host"), "{err}");

    // 2. A host certificate of the CA under another name: the backup refuses it during the
    //    handshake and says which name it expected and which it was shown.
    let (ok, out, err) = pair.try_protect(&["--name", "intruder"]);
    assert!(ok, "protect starts (the link connects in the background): {err}{out}");
    let last_error = wait_last_error(&mut pair, Duration::from_secs(10), |e| e.contains("intruder"));
    eprintln!("backup last_error: {last_error}");
    assert!(last_error.contains(r#"certificate names "intruder", expected "primary""#), "{last_error}");
    assert!(pair.backup.stderr().contains(r#"certificate names "intruder", expected "primary""#), "not logged");
    // Long enough for a sync to have begun, had the session been admitted.
    std::thread::sleep(Duration::from_secs(2));
    let s = Pair::status(&pair.p_sock);
    assert_ne!(s["protection"]["state"], "protected", "{s}");
    unprotect(&pair);

    // 3. The real primary's key, but the backup is expected under another name: the primary
    //    refuses the backup's certificate (`protect --backup-name`).
    let (ok, out, err) = pair.try_protect(&["--backup-name", "intruder"]);
    assert!(ok, "{err}{out}");
    let t0 = Instant::now();
    while !pair.primary.stderr().contains(r#"certificate is for ["backup"], we expected "intruder""#) {
        pair.primary.assert_alive();
        assert!(t0.elapsed() < Duration::from_secs(10), "no refusal of the backup's name:\n{}", pair.primary.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_ne!(Pair::status(&pair.p_sock)["protection"]["state"], "protected");
    unprotect(&pair);

    // The replica is exactly what the real primary left: same commits, same digests.
    let after = replica_view(&pair);
    assert_eq!(after.0, before.0, "the backup's replica changed");
    assert_eq!(after.1, before.1, "the backup's verification journal changed");
    eprintln!("replica untouched: {}", after.0);

    // And the real primary is still welcome.
    pair.protect(&[]);
    pair.wait_protection("protected", Duration::from_secs(20));
}
