//! The migration benchmark's QEMU side on real QEMU: a migration completes and the guest goes
//! on at the destination (plain and TLS), a migration that cannot converge is cancelled with the
//! guest running on at the source, and W3's client sees the kv guest move through the bridge.
//!
//! Needs /dev/kvm and QEMU (loud SKIP without them) and the image from `make guest`; the W3 test
//! needs root for its network namespace (loud SKIP without it).

use anyhow::Result;
use std::path::Path;
use std::time::Duration;
use testbed::env::{guest_image, skip_without_qemu};
use testbed::harness::tempdir::TempDir;
use testbed::migrate_bench::kv::KvNet;
use testbed::migrate_bench::{Config, Options, Outcome, QemuConfig, RunEnv, Workload, run_one, tls};

fn with_env<T>(
    name: &str,
    timeout: Duration,
    (downtime_limit_ms, max_bandwidth): (Option<u64>, Option<u64>),
    net: Option<&KvNet>,
    f: impl FnOnce(&RunEnv<'_>) -> T,
) -> Result<T> {
    let top = TempDir::create(std::env::temp_dir().join(format!("us-mb-it-{name}-{}", std::process::id())), false)?;
    let certs = top.join("qemu-tls");
    tls::write_qemu_certs(&certs)?;
    let guest = guest_image()?;
    let mut opts = Options::new(vec![], vec![], 1);
    opts.converge_timeout = timeout;
    opts.qemu_downtime_limit_ms = downtime_limit_ms;
    opts.qemu_max_bandwidth = max_bandwidth;
    let env = RunEnv {
        opts: &opts,
        guest: &guest,
        dir: top.join("run"),
        qemu_certs: &certs,
        our_certs: Path::new("/nonexistent"),
        net,
    };
    Ok(f(&env))
}

#[test]
fn qemu_migrates_w1_plain_and_over_tls_and_the_guest_goes_on() -> Result<()> {
    if skip_without_qemu("qemu_migrates_w1_plain_and_over_tls_and_the_guest_goes_on") {
        return Ok(());
    }
    for q in [QemuConfig::Best, QemuConfig::BestTls] {
        let r = with_env(q.name(), Duration::from_secs(30), (None, None), None, |env| {
            run_one(env, Workload::W1, &Config::Qemu(q), 1)
        })??;
        eprintln!("{}", r.line());
        assert_eq!(r.migrated.outcome, Outcome::Completed, "{}", r.line());
        assert_eq!(r.guest_ok, Some(true), "{}", r.line());
        let m = &r.migrated;
        // At least the working set (64 MiB, written once before the migration) was sent.
        assert!(m.bytes.unwrap() > 64 << 20, "{}", r.line());
        assert!(m.total_ms.unwrap() > 0.0 && m.wall_ms.unwrap() > 0.0, "{}", r.line());
        let (down, paused) = (m.downtime_ms.unwrap(), m.paused_ms.unwrap());
        assert!(down < 1000.0 && paused > 0.0 && paused < 1000.0, "{}", r.line());
        assert_eq!(m.detail["ram_total"].as_u64().map(|t| t >> 20), Some(256), "{}", m.detail);
        if q.tls() {
            assert!(m.detail["uri"].as_str().unwrap().starts_with("tcp:127.0.0.1:"), "{}", m.detail);
            assert_eq!(m.detail["parameters"]["tls-creds"], "tls0", "{}", m.detail);
        }
    }
    Ok(())
}

#[test]
fn qemu_migration_that_cannot_converge_is_cancelled_and_the_guest_stays() -> Result<()> {
    if skip_without_qemu("qemu_migration_that_cannot_converge_is_cancelled_and_the_guest_stays") {
        return Ok(());
    }
    // W2 dirties ~800 MB/s, more than QEMU's default 128 MiB/s can send. But a guest starved by
    // a loaded machine dirties far less: with the default 300 ms downtime limit QEMU once
    // converged just under 2 s and once, in CI, in 1.44 s; with a 1 ms limit (~134 KB, 32 pages)
    // it still completed once in CI (session 17, 1.45 s, downtime 6 ms: the guest wrote fewer
    // than 32 pages between two syncs). So the test no longer relies on the guest's speed: at
    // 16 MiB/s the first pass alone (the 64 MiB working set) takes ~4 s, more than the 1.5 s
    // bound, whatever the guest dirties, and the harness must cancel it and leave the guest
    // where it was. The 1 ms limit stays (never 0: QEMU 7.2 then never syncs the dirty bitmap,
    // finds nothing pending after the first pass, and completes).
    const BANDWIDTH: u64 = 16 << 20;
    let r = with_env("cancel", Duration::from_millis(1500), (Some(1), Some(BANDWIDTH)), None, |env| {
        run_one(env, Workload::W2, &Config::Qemu(QemuConfig::Default), 1)
    })??;
    eprintln!("{}", r.line());
    assert_eq!(r.migrated.outcome, Outcome::DidNotConverge, "{}", r.line());
    let m = &r.migrated;
    assert!(m.total_ms.unwrap() >= 1500.0, "{}", r.line());
    // It was sending when it was cancelled: ~1.5 s at 16 MiB/s is ~25 MB.
    assert!(m.bytes.unwrap() > 8_000_000, "bytes sent before the cancel: {}", r.line());
    assert_eq!(m.detail["status"], "cancelled", "{}", m.detail);
    assert_eq!(m.detail["parameters"]["downtime-limit"], 1, "{}", m.detail);
    assert_eq!(m.detail["parameters"]["max-bandwidth"], BANDWIDTH, "{}", m.detail);
    assert_eq!(r.guest_ok, None);
    Ok(())
}

#[test]
fn qemu_migrates_the_kv_guest_under_load_through_the_bridge() -> Result<()> {
    if skip_without_qemu("qemu_migrates_the_kv_guest_under_load_through_the_bridge") {
        return Ok(());
    }
    let net = match KvNet::create() {
        Ok(n) => n,
        Err(e) => {
            eprintln!(
                "\n*** SKIP: qemu_migrates_the_kv_guest_under_load_through_the_bridge: no namespace ({e:#}); needs root ***\n"
            );
            return Ok(());
        }
    };
    let r = with_env("kv", Duration::from_secs(30), (None, None), Some(&net), |env| {
        run_one(env, Workload::W3, &Config::Qemu(QemuConfig::Best), 1)
    })??;
    eprintln!("{}", r.line());
    assert_eq!(r.migrated.outcome, Outcome::Completed, "{}", r.line());
    assert_eq!(r.guest_ok, Some(true), "{}", r.line());
    assert_eq!(r.lost_writes, Some(0), "{}", r.line());
    assert!(r.acked_writes.unwrap() > 100, "{}", r.line());
    // The outage is the wait that overlapped the migration; the rest of the run gives the floor.
    let (outage, floor) = (r.outage_ms.unwrap(), r.baseline_gap_ms.unwrap());
    assert!(outage > 0.0 && outage < 5000.0 && floor > 0.0, "{}", r.line());
    Ok(())
}
