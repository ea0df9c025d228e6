//! The fixture guest under QEMU microvm: every workload comes up and behaves.
//!
//! Needs `/dev/kvm` and qemu-system-x86_64 (each test prints a loud SKIP line without them)
//! and the image from `make guest` (a test fails, not skips, without it). kv tests also need
//! python3-pymemcache and memcslap (`make deps`). Networking is QEMU user networking with a
//! host forward on 127.0.0.1 only.

use anyhow::{Context, Result, bail, ensure};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};
use testbed::env::{free_local_port, memcslap, python_with_pymemcache, skip_without_qemu};
use testbed::harness::proc::run_bounded;
use testbed::lines::{CounterChecker, parse_dirty_progress};
use testbed::qemu::{QemuGuest, QemuOptions};

const READY_TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn counter_is_ready_fast_and_prints_consecutive_checksummed_lines() -> Result<()> {
    if skip_without_qemu("counter_is_ready_fast_and_prints_consecutive_checksummed_lines") {
        return Ok(());
    }
    let mut g = QemuGuest::spawn(&QemuOptions::new("workload=counter period_ms=20"))?;
    let ready = g.wait_ready(READY_TIMEOUT)?;
    eprintln!("counter ready {ready:?} after QEMU start");
    ensure!(ready < Duration::from_secs(3), "counter took {ready:?} to be ready");
    let mut check = CounterChecker::new();
    let start = Instant::now();
    for _ in 0..25 {
        let line = g.wait_for_line(|l| l.starts_with("seq="), Duration::from_secs(5))?;
        check.check(&line).map_err(anyhow::Error::msg)?;
    }
    // 24 periods of 20 ms: allow for scheduling noise, but not for a wrong timer rate.
    let took = start.elapsed();
    ensure!(took > Duration::from_millis(300) && took < Duration::from_secs(3), "25 lines took {took:?}");
    Ok(())
}

#[test]
fn dirty_rewrites_its_working_set_without_errors() -> Result<()> {
    if skip_without_qemu("dirty_rewrites_its_working_set_without_errors") {
        return Ok(());
    }
    let mut g = QemuGuest::spawn(&QemuOptions::new("workload=dirty wss=8 rate=4096"))?;
    g.wait_ready(READY_TIMEOUT)?;
    let (generation, _) = three_progress_lines(&mut g)?;
    // 8 MiB = 2048 pages at 4096 pages/s: the third report (~3 s) is past generation 4.
    ensure!(generation >= 3, "only generation {generation} after 3 s");
    Ok(())
}

#[test]
fn a_dirty_guest_far_behind_its_rate_still_reports_its_progress() -> Result<()> {
    if skip_without_qemu("a_dirty_guest_far_behind_its_rate_still_reports_its_progress") {
        return Ok(());
    }
    // 10^8 pages/s (the most the command line takes) is far beyond any guest: it catches up
    // page by page for ever. It used to report only between catch-ups (here: nothing for more
    // than 5 s), so a guest slowed by protection's write faults looked stalled to the protect
    // bench (its ~10,000 @10ms point).
    let mut g = QemuGuest::spawn(&QemuOptions::new("workload=dirty wss=8 rate=100000000"))?;
    g.wait_ready(READY_TIMEOUT)?;
    three_progress_lines(&mut g)?;
    Ok(())
}

/// Three `dirty` progress lines, each within 5 s, without errors and each with more pages than
/// the one before; the last one's (generation, pages).
fn three_progress_lines(g: &mut QemuGuest) -> Result<(u64, u64)> {
    let mut last = None;
    for _ in 0..3 {
        let line = g.wait_for_line(|l| l.starts_with("dirty "), Duration::from_secs(5))?;
        ensure!(!line.starts_with("dirty error"), "guest reported {line}");
        let (generation, pages, errors) = parse_dirty_progress(&line).context(line.clone())?;
        ensure!(errors == 0, "{line}");
        if let Some((_, prev_pages)) = last {
            ensure!(pages > prev_pages, "no progress: {line}");
        }
        last = Some((generation, pages));
    }
    last.context("no progress line")
}

#[test]
fn fatal_errors_are_reported() -> Result<()> {
    if skip_without_qemu("fatal_errors_are_reported") {
        return Ok(());
    }
    for (word, want) in [("panic", "guest panic: crash=panic requested"), ("pf", "guest exception vector=14")] {
        let mut g = QemuGuest::spawn(&QemuOptions::new(&format!("workload=counter crash={word}")))?;
        let line = g.wait_for_line(|l| l.starts_with("guest "), READY_TIMEOUT)?;
        ensure!(line.starts_with(want), "crash={word}: {line}");
    }
    Ok(())
}

fn kv_guest(extra: &str) -> Result<(QemuGuest, u16)> {
    let port = free_local_port()?;
    let mut opts = QemuOptions::new(&format!("workload=kv ip=10.0.2.15/24 gw=10.0.2.2 {extra}"));
    opts.hostfwd_port = Some(port);
    let mut g = QemuGuest::spawn(&opts)?;
    g.wait_ready(READY_TIMEOUT)?;
    Ok((g, port))
}

const PYMEMCACHE_SCRIPT: &str = r#"
import sys
from pymemcache.client.base import Client
c = Client(("127.0.0.1", int(sys.argv[1])), connect_timeout=10, timeout=20, default_noreply=False)
assert c.set("k1", b"v1") is True
assert c.get("k1") == b"v1"
assert c.get("missing") is None
assert c.add("k1", b"x") is False
assert c.add("k2", b"two") is True
assert c.replace("nokey", b"x") is False
assert c.get_many(["k1", "k2", "missing"]) == {"k1": b"v1", "k2": b"two"}
v, cas = c.gets("k1")
assert v == b"v1"
assert c.cas("k1", b"v1b", cas) is True
assert c.cas("k1", b"v1c", cas) is False
assert c.get("k1") == b"v1b"
assert c.set("n", b"41") is True
assert c.incr("n", 1) == 42
assert c.decr("n", 50) == 0
assert c.append("k2", b"+") is True
assert c.prepend("k2", b"-") is True
assert c.get("k2") == b"-two+"
assert c.delete("k2") is True
assert c.delete("k2") is False
assert c.touch("k1", 100) is True
big = bytes(range(256)) * 4096
assert c.set("big", big) is True
assert c.get("big") == big
for i in range(300):
    c.set("key%d" % i, str(i).encode() * 10, noreply=True)
got = c.get_many(["key%d" % i for i in range(300)])
assert all(got["key%d" % i] == str(i).encode() * 10 for i in range(300)), "multi-get mismatch"
assert int(c.stats()[b"curr_items"]) >= 300
assert c.version().startswith(b"1.6")
print("PYMEMCACHE OK")
"#;

#[test]
fn kv_serves_pymemcache_and_memcslap() -> Result<()> {
    if skip_without_qemu("kv_serves_pymemcache_and_memcslap") {
        return Ok(());
    }
    let python = python_with_pymemcache()?;
    let slap = memcslap()?;
    let (mut g, port) = kv_guest("")?;

    let (out, _) =
        run_bounded(Command::new(&python).args(["-c", PYMEMCACHE_SCRIPT, &port.to_string()]), Duration::from_secs(60))?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("PYMEMCACHE OK"),
        "pymemcache script failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    for test in ["set", "get", "mget"] {
        let (out, _) = run_bounded(
            Command::new(&slap).args([
                &format!("--servers=127.0.0.1:{port}"),
                "--concurrency=4",
                "--execute-number=500",
                &format!("--test={test}"),
            ]),
            Duration::from_secs(120),
        )?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        ensure!(out.status.success(), "memcslap --test={test} failed: {text}");
        ensure!(!text.contains("rror") && !text.contains("ailure"), "memcslap --test={test} reported errors: {text}");
        eprintln!(
            "memcslap --test={test}: {}",
            text.lines().filter(|l| l.contains("Time to")).collect::<Vec<_>>().join("; ")
        );
    }
    // Still alive and well after the load.
    ensure!(!g.seen().iter().any(|l| l.starts_with("guest ")), "guest failed: {:?}", g.seen());
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"version\r\n")?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf)?;
    ensure!(buf[..n].starts_with(b"VERSION "), "{:?}", String::from_utf8_lossy(&buf[..n]));
    g.kill();
    Ok(())
}

/// Reads one reply line (up to `\r\n`).
fn read_line(s: &mut TcpStream) -> Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        if s.read(&mut b)? == 0 {
            bail!("connection closed after {:?}", String::from_utf8_lossy(&line));
        }
        line.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_string())
}

#[test]
fn kv_memory_bound_answers_out_of_memory() -> Result<()> {
    if skip_without_qemu("kv_memory_bound_answers_out_of_memory") {
        return Ok(());
    }
    let (_g, port) = kv_guest("mem=1")?;
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let value = vec![b'x'; 64 * 1024];
    let mut stored = 0;
    let mut refused = None;
    for i in 0..40 {
        s.write_all(format!("set k{i} 0 0 {}\r\n", value.len()).as_bytes())?;
        s.write_all(&value)?;
        s.write_all(b"\r\n")?;
        let reply = read_line(&mut s)?;
        match reply.as_str() {
            "STORED" => stored += 1,
            "SERVER_ERROR out of memory storing object" => {
                refused = Some(i);
                break;
            }
            other => bail!("set k{i}: {other}"),
        }
    }
    let refused = refused.context("a 1 MiB store never filled up")?;
    ensure!((10..=16).contains(&stored), "stored {stored} x 64 KiB in a 1 MiB store");
    // Everything acknowledged is still there, and the server still answers.
    s.write_all(b"get k0\r\n")?;
    ensure!(read_line(&mut s)? == format!("VALUE k0 0 {}", value.len()));
    let mut data = vec![0u8; value.len() + 2];
    s.read_exact(&mut data)?;
    ensure!(read_line(&mut s)? == "END");
    s.write_all(format!("delete k0\r\nset k{refused} 0 0 1\r\nz\r\n").as_bytes())?;
    ensure!(read_line(&mut s)? == "DELETED");
    ensure!(read_line(&mut s)? == "STORED");
    Ok(())
}
