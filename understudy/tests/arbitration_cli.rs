//! Arbitration is reachable from the command line only over QUIC with mutual TLS. A peer given
//! without a certificate name (`ID=HOST:PORT`, which used to select plain, unauthenticated UDP
//! with a mere warning) is refused by the release binary with an error that says how to
//! configure mTLS, before anything starts. Needs no KVM: the refusal comes first.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Runs `understudy args...`; it must exit (non-zero) within 10 s. Returns stderr.
fn refused(args: &[&str]) -> String {
    let child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn understudy");
    let out = wait_with_timeout(child, Duration::from_secs(10));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "understudy {} was accepted:\n{err}", args.join(" "));
    err
}

fn assert_explains_mtls(err: &str, certs_flag: &str) {
    for needle in ["1=127.0.0.1:7501", "names no certificate", "ID=NAME@HOST:PORT", certs_flag] {
        assert!(err.contains(needle), "the refusal does not say {needle:?}:\n{err}");
    }
}

#[test]
fn a_witness_with_plain_udp_peers_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("raft3");
    let err = refused(&[
        "witness",
        "--data",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--peer",
        "1=127.0.0.1:7501",
        "--peer",
        "2=127.0.0.1:7502",
    ]);
    assert_explains_mtls(&err, "--certs");
    assert!(!data.exists(), "the witness got as far as opening its journal");
}

#[test]
fn agents_with_plain_udp_peers_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let arbiter = |id: &str| -> Vec<String> {
        let raft = d.join(format!("raft{id}"));
        [
            "--arbiter-id",
            id,
            "--arbiter-listen",
            "127.0.0.1:0",
            "--arbiter-peer",
            "1=127.0.0.1:7501",
            "--arbiter-peer",
            "3=witness@127.0.0.1:7503",
            "--arbiter-data",
            raft.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    // `run` (the kernel does not exist: the refusal must come before the boot).
    let mut run: Vec<String> =
        ["run", "--kernel", d.join("no-kernel").to_str().unwrap(), "--memory", "64M"].map(String::from).to_vec();
    run.extend(arbiter("2"));
    let err = refused(&run.iter().map(String::as_str).collect::<Vec<_>>());
    assert_explains_mtls(&err, "--arbiter-certs");
    assert!(!err.contains("does not exist"), "the peers were checked after the kernel:\n{err}");
    // `backup`.
    let mut backup: Vec<String> =
        ["backup", "--listen", "127.0.0.1:0", "--certs", d.join("certs").to_str().unwrap(), "--memory", "64M"]
            .map(String::from)
            .to_vec();
    backup.extend(arbiter("2"));
    let err = refused(&backup.iter().map(String::as_str).collect::<Vec<_>>());
    assert_explains_mtls(&err, "--certs");
    assert!(!d.join("raft2").exists(), "the backup got as far as opening its journal");
}

#[test]
fn a_witness_without_certificates_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("raft3");
    let err = refused(&[
        "witness",
        "--data",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--peer",
        "1=primary@127.0.0.1:7501",
        "--peer",
        "2=backup@127.0.0.1:7502",
    ]);
    assert!(err.contains("a witness needs --certs"), "{err}");
}
