//! Unprotect, then protect again, on a VM under arbitration: the arbitration installed a gated
//! holding buffer at boot and protection uses it. Stopping protection once put the plain sink
//! back on the net device anyway, so the next `protect` held output in a buffer the device no
//! longer wrote to: no output commit (frames reached the wire before their epoch was acked)
//! and no lease gate.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn protecting_again_after_unprotect_holds_output_in_the_gated_buffer() {
    let _g = serial_guard();
    let test = "protecting_again_after_unprotect_holds_output_in_the_gated_buffer";
    if !kvm_available(test) {
        return;
    }
    let Some(ns) = NetNs::new(test, "up", 89) else { return };
    // The group: a witness, the primary's agent and the backup's (their own certificates).
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let certs = make_certs(d, &["primary", "backup"], "witness");
    let ports = [free_udp_port(), free_udp_port(), free_udp_port()];
    let mut wargs: Vec<String> =
        ["witness", "--data", d.join("raft3").to_str().unwrap(), "--certs"].iter().map(|s| s.to_string()).collect();
    wargs.extend([certs.to_string_lossy().into_owned(), "--listen".into(), format!("127.0.0.1:{}", ports[2])]);
    for (id, name) in [(1, "primary"), (2, "backup")] {
        wargs.extend(["--peer".to_string(), format!("{id}={name}@127.0.0.1:{}", ports[id - 1])]);
    }
    let wargs: Vec<&str> = wargs.iter().map(String::as_str).collect();
    let _witness = Proc::spawn_in(&ns, d, "witness", &wargs);
    let b = agent_args(d, &certs, 2, ports);
    let mut bargs: Vec<&str> = b.iter().map(String::as_str).collect();
    bargs.extend(["--detect-ms", "150", "--heartbeat-ms", "10"]);
    let p = agent_args(d, &certs, 1, ports);
    let pargs: Vec<&str> = p.iter().map(String::as_str).collect();
    let cmdline = format!("workload=kv ip={}/24", ns.guest_ip);
    let mut pair = Pair::start_with(Some(&ns), &cmdline, "64M", &bargs, &pargs);
    let protect = ["--backup-node", "2", "--detect-ms", "150", "--heartbeat-ms", "10", "--epoch-ms", "40"];

    pair.protect(&protect);
    pair.wait_protection("protected", Duration::from_secs(20));
    let (ok, out, err) = run(&["unprotect", "--api", pair.p_sock.to_str().unwrap()]);
    assert!(ok, "unprotect failed: {err}{out}");
    pair.protect(&protect);
    pair.wait_protection("protected", Duration::from_secs(20));
    let since = Pair::ctl(&pair.p_sock, "output-journal")["now_ns"].as_u64().unwrap();

    // Every reply of these sets leaves through the holding buffer, released once its epoch is
    // acked (before the fix: none, the device wrote straight to the TAP).
    let t0 = Instant::now();
    let out = python_in(&ns, KV_CLIENT, &[&ns.guest_ip, "set", "40"], Duration::from_secs(60));
    assert_eq!(out.lines().filter(|l| l.starts_with("ok ")).count(), 40, "{out}");
    let journal = Pair::ctl(&pair.p_sock, "output-journal");
    let released: Vec<&serde_json::Value> =
        journal["released"].as_array().unwrap().iter().filter(|r| r["acked_ns"].as_u64().unwrap() >= since).collect();
    assert!(
        released.len() >= 40,
        "{} frames released through the holding buffer for 40 acknowledged sets after protecting again \
         (output bypassed output commit):\n{}",
        released.len(),
        pair.primary.stderr_tail(40)
    );
    for r in &released {
        assert!(r["released_ns"].as_u64().unwrap() >= r["acked_ns"].as_u64().unwrap(), "released before its ack: {r}");
    }
    let s = Pair::status(&pair.p_sock);
    assert_eq!(s["protection"]["state"], "protected", "{s}");
    let frames = s["protection"]["held_output_frames"].as_u64().unwrap();
    eprintln!(
        "protected again: {} frames released after their acks in {:?} ({frames} held now)",
        released.len(),
        t0.elapsed()
    );
}
