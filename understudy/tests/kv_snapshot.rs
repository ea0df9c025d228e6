//! The kv workload over a TAP device under our VMM (not QEMU): its store survives a snapshot and
//! a restore in a new process, and it stands up to memcslap. Each test runs in its own network
//! namespace holding `tap0` (10.<s>.0.1 on the host side, 10.<s>.0.2 in the guest); every
//! client runs inside that namespace through `ip netns exec`, so nothing leaves the machine.

mod common;

use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use common::*;

/// A pymemcache client: `<host> set|check|new <n>`. Keys `k<i>:` plus 0-39 `x`s; value sizes
/// cycle through 0 B .. 16 KB, and key 7 holds 100 KiB. Values are derived from (generation,
/// i), so `check` regenerates what `set` wrote. `new` sets fresh keys, overwrites and deletes
/// old ones and reads all of that back. Prints one `... OK` line or exits non-zero.
const KV_SCRIPT: &str = r#"
import hashlib, sys
from pymemcache.client.base import Client

host, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
SIZES = [0, 1, 10, 100, 500, 1000, 2000, 4000, 8000, 16000, 3, 64]

def key(prefix, i):
    return ("%s%d:" % (prefix, i)) + "x" * (i % 40)

def size(i):
    return 100 * 1024 if i == 7 else SIZES[i % len(SIZES)]

def value(gen, i):
    s = size(i)
    h = hashlib.sha256(("%s:%d" % (gen, i)).encode()).hexdigest().encode()
    return (h * (s // len(h) + 1))[:s]

c = Client((host, 11211), connect_timeout=10, timeout=30, default_noreply=False)

def check_all(prefix, gen, count, skip=()):
    bad = []
    for i in range(count):
        if i in skip:
            continue
        got = c.get(key(prefix, i))
        if got != value(gen, i):
            bad.append((i, None if got is None else len(got), size(i)))
    # The same keys again, 50 per multi-key get.
    keys = [key(prefix, i) for i in range(count) if i not in skip]
    for j in range(0, len(keys), 50):
        got = c.get_many(keys[j:j + 50])
        for k in keys[j:j + 50]:
            i = int(k[len(prefix):].split(":")[0])
            if got.get(k) != value(gen, i):
                bad.append(("multi", i))
    if bad:
        print("MISMATCH %d: %r" % (len(bad), bad[:20]))
        sys.exit(1)

if mode == "set":
    total = 0
    for i in range(n):
        v = value("a", i)
        if c.set(key("k", i), v) is not True:
            print("SET FAILED at %d" % i)
            sys.exit(1)
        total += len(v)
    check_all("k", "a", n)
    print("SET OK keys=%d bytes=%d" % (n, total))
elif mode == "check":
    check_all("k", "a", n)
    print("CHECK OK keys=%d" % n)
elif mode == "new":
    for i in range(50):
        assert c.set(key("new", i), value("b", i)) is True, i
    check_all("new", "b", 50)
    assert c.set(key("k", 1), b"overwritten after restore") is True
    assert c.get(key("k", 1)) == b"overwritten after restore"
    assert c.delete(key("k", 2)) is True
    assert c.get(key("k", 2)) is None
    check_all("k", "a", n, skip=(1, 2))
    print("NEW OK keys=50")
else:
    sys.exit("unknown mode " + mode)
"#;

/// Runs `cmd` to completion, killing it after `timeout`; returns (status, stdout + stderr).
fn run_bounded(cmd: &mut Command, timeout: Duration) -> (ExitStatus, String) {
    let (out, _) = testbed::harness::proc::run_bounded(cmd, timeout).unwrap_or_else(|e| panic!("{e:#}"));
    (out.status, format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Runs the pymemcache script inside `ns`; panics unless it prints `<expect> OK`.
fn kv_client(ns: &NetNs, mode: &str, n: usize, expect: &str) -> String {
    let python = testbed::env::python_with_pymemcache().unwrap_or_else(|e| panic!("{e:#}"));
    let t0 = Instant::now();
    let (status, text) = run_bounded(
        ns.command(python.to_str().expect("utf-8 path")).args(["-c", KV_SCRIPT, &ns.guest_ip, mode, &n.to_string()]),
        Duration::from_secs(120),
    );
    let line = text.lines().find(|l| l.starts_with(&format!("{expect} OK"))).map(str::to_string);
    match line {
        Some(l) if status.success() => {
            eprintln!("kv client {mode}: {l} ({:.0} ms)", t0.elapsed().as_secs_f64() * 1e3);
            l
        }
        _ => panic!("kv client {mode} failed ({status}):\n{text}"),
    }
}

/// Boots the kv guest inside `ns` on `tap0`; returns the process once the guest is `ready`.
fn boot_kv(test: &str, ns: &NetNs, d: &Path, serial: &Path, api: &Path) -> Proc {
    let kernel = guest_image();
    let cmdline = format!("workload=kv ip={}/24", ns.guest_ip);
    let mut p = Proc::spawn_in(
        ns,
        d,
        "run",
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            &cmdline,
            "--memory",
            "64M",
            "--serial",
            serial.to_str().unwrap(),
            "--api",
            api.to_str().unwrap(),
            "--tap",
            &ns.tap,
        ],
    );
    let boot = wait_for(serial, Duration::from_secs(10), &mut p, "ready", |t| t.lines().any(|l| l.trim() == "ready"));
    eprintln!("{test}: kv guest ready {:.1} ms after spawning understudy run", boot.as_secs_f64() * 1e3);
    let text = read_text(serial);
    let kv = text.lines().find(|l| l.starts_with("kv: ")).unwrap_or("(no kv: line)");
    eprintln!("{test}: {}", kv.trim());
    p
}

/// Panics if the guest reported a panic or an exception.
fn assert_guest_healthy(serial: &Path) {
    let text = read_text(serial);
    assert!(!text.lines().any(|l| l.starts_with("guest ")), "guest failed:\n{text}");
}

const KEYS: usize = 300;

#[test]
fn kv_store_survives_snapshot_and_restore_over_tap() {
    const TEST: &str = "kv_store_survives_snapshot_and_restore_over_tap";
    let _g = serial_guard();
    if !kvm_available(TEST) {
        return;
    }
    let Some(ns) = NetNs::new(TEST, "kvsnap", 61) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s1 = d.join("serial1.log");
    let api1 = d.join("vm1.sock");
    let mut p1 = boot_kv(TEST, &ns, d, &s1, &api1);

    kv_client(&ns, "set", KEYS, "SET");
    p1.assert_alive();
    assert_guest_healthy(&s1);

    let snap = d.join("snap");
    let (ok, out, err) = run(&["snapshot", "--api", api1.to_str().unwrap(), "--then", "pause", snap.to_str().unwrap()]);
    assert!(ok, "snapshot failed: {err}");
    let snapshot = json(&out);
    eprintln!("{TEST}: snapshot {snapshot}");
    let serial1 = read_text(&s1);
    let (ok, _, err) = run(&["ctl", "--api", api1.to_str().unwrap(), "shutdown"]);
    assert!(ok, "shutdown failed: {err}");
    assert!(p1.wait_exit(Duration::from_secs(10)).is_some(), "first vm did not exit");
    assert_eq!(serial1, read_text(&s1), "the paused vm printed after its snapshot");

    let s2 = d.join("serial2.log");
    let api2 = d.join("vm2.sock");
    let t0 = Instant::now();
    let mut p2 = Proc::spawn_in(
        &ns,
        d,
        "restore",
        &[
            "restore",
            snap.to_str().unwrap(),
            "--tap",
            &ns.tap,
            "--serial",
            s2.to_str().unwrap(),
            "--api",
            api2.to_str().unwrap(),
        ],
    );
    wait_for(&api2, Duration::from_secs(10), &mut p2, "api socket", |_| api2.exists());
    let (ok, out, err) = run(&["status", "--api", api2.to_str().unwrap(), "--json"]);
    assert!(ok, "status failed: {err}");
    let status = json(&out);
    assert_eq!(
        status["origin"]["memory_digest"], snapshot["memory_digest"],
        "restored memory digest differs from the snapshot's"
    );
    eprintln!(
        "{TEST}: restored in {} ms (api up {:.0} ms after spawning understudy restore), digest {}",
        status["origin"]["restore_ms"],
        t0.elapsed().as_secs_f64() * 1e3,
        snapshot["memory_digest"]
    );

    kv_client(&ns, "check", KEYS, "CHECK");
    kv_client(&ns, "new", KEYS, "NEW");
    p2.assert_alive();
    assert_guest_healthy(&s2);
    let (ok, _, err) = run(&["ctl", "--api", api2.to_str().unwrap(), "shutdown"]);
    assert!(ok, "shutdown failed: {err}");
    assert!(p2.wait_exit(Duration::from_secs(10)).is_some(), "restored vm did not exit");
}

/// One `Time to <op> <n> keys[ by <t> threads]: <s> seconds.` line of memcslap (libmemcached
/// 1.1): the operation, how many keys it completed, the thread count (None for the initial
/// load) and the seconds it took. memcslap exits 0 even when operations fail; what it did
/// complete is the count.
#[derive(Debug, PartialEq)]
struct SlapLine {
    op: String,
    keys: u64,
    threads: Option<u64>,
    secs: f64,
}

fn slap_lines(text: &str) -> Vec<SlapLine> {
    text.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            if w.len() < 6 || w[0] != "Time" || w[1] != "to" || !w[4].starts_with("keys") {
                return None;
            }
            let keys = w[3].parse().ok()?;
            let threads = if w[4] == "keys" && w.get(5) == Some(&"by") { Some(w.get(6)?.parse().ok()?) } else { None };
            let secs = w[w.len() - 2].parse().ok()?;
            Some(SlapLine { op: w[2].to_string(), keys, threads, secs })
        })
        .collect()
}

#[test]
fn memcslap_output_is_parsed() {
    let text = "Time to generate        500 test keys:                0.005 seconds.\n\
                Time to set             500 keys:                     0.101 seconds.\n\
                Time to start             4 threads:                  0.000 seconds.\n\
                --------------------------------------------------------------------\n\
                Time to get            2000 keys by    4 threads:     0.180 seconds.\n\
                Time total:                                           0.186 seconds.\n";
    assert_eq!(
        slap_lines(text),
        vec![
            SlapLine { op: "set".into(), keys: 500, threads: None, secs: 0.101 },
            SlapLine { op: "get".into(), keys: 2000, threads: Some(4), secs: 0.180 },
        ]
    );
}

#[test]
fn kv_serves_memcslap_over_tap() {
    const TEST: &str = "kv_serves_memcslap_over_tap";
    let _g = serial_guard();
    if !kvm_available(TEST) {
        return;
    }
    let Some(ns) = NetNs::new(TEST, "kvslap", 62) else {
        return;
    };
    let slap = testbed::env::memcslap().unwrap_or_else(|e| panic!("{e:#}"));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s1 = d.join("serial.log");
    let api = d.join("vm.sock");
    let mut p = boot_kv(TEST, &ns, d, &s1, &api);

    let server = format!("--servers={}:11211", ns.guest_ip);
    for test in ["set", "get", "mget"] {
        let t0 = Instant::now();
        let (status, text) = run_bounded(
            ns.command(slap.to_str().expect("utf-8 path")).args([
                server.as_str(),
                "--concurrency=4",
                "--execute-number=500",
                &format!("--test={test}"),
            ]),
            Duration::from_secs(120),
        );
        let wall = t0.elapsed();
        let lower = text.to_ascii_lowercase();
        assert!(
            status.success() && !lower.contains("error") && !lower.contains("fail") && !lower.contains("could not"),
            "memcslap --test={test} reported errors ({status}):\n{text}"
        );
        let lines = slap_lines(&text);
        let run = lines
            .iter()
            .find(|l| l.threads.is_some())
            .unwrap_or_else(|| panic!("memcslap --test={test}: no result line in its output:\n{text}"));
        assert_eq!(
            (run.op.as_str(), run.keys, run.threads),
            (test, 4 * 500, Some(4)),
            "memcslap --test={test} did not complete every operation:\n{text}"
        );
        if test != "set" {
            let load = lines.iter().find(|l| l.op == "set" && l.threads.is_none());
            assert_eq!(load.map(|l| l.keys), Some(500), "memcslap --test={test}: initial load incomplete:\n{text}");
        }
        let summary: Vec<&str> = text.lines().map(str::trim).filter(|l| l.starts_with("Time to")).collect();
        eprintln!(
            "{TEST}: memcslap --test={test} --concurrency=4 --execute-number=500: {} ops in {:.3} s = {:.0} ops/s; \
             wall {:.0} ms; [{}]",
            run.keys,
            run.secs,
            run.keys as f64 / run.secs.max(1e-3),
            wall.as_secs_f64() * 1e3,
            summary.join("; ")
        );
        p.assert_alive();
    }
    assert_guest_healthy(&s1);
    // Still answering after the load.
    kv_client(&ns, "set", 20, "SET");
    let (ok, out, err) = run(&["status", "--api", api.to_str().unwrap(), "--json"]);
    assert!(ok, "status failed: {err}");
    eprintln!("{TEST}: status after load {}", json(&out));
    let (ok, _, err) = run(&["ctl", "--api", api.to_str().unwrap(), "shutdown"]);
    assert!(ok, "shutdown failed: {err}");
    assert!(p.wait_exit(Duration::from_secs(10)).is_some(), "vm did not exit");
}
