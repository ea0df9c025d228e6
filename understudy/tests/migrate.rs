//! Live migration through the binary (`understudy run` + `understudy receive` + `understudy
//! migrate`): the guest continues exactly at the destination (counter: no gap, no repeat;
//! dirty: its self-check; memory digest equal at the switch-over; kv: every acknowledged write
//! reads back over a TCP connection that survives the move), cancel in each phase, and each bad
//! input ends the migration with an error naming it, the guest running on at the source and the
//! destination never running a guest. Reverse checkpoints (issue 15): a destination killed
//! during post-copy, or cut off past the session's idle timeout, is recovered from at the source
//! (the guest runs on there from the last reverse checkpoint, nothing acknowledged lost) and a
//! cut-off destination fences itself when the link heals: never two copies.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;

/// A source VM and a destination on this host.
struct Mig {
    dir: tempfile::TempDir,
    src: Proc,
    dst: Proc,
    s_sock: PathBuf,
    d_sock: PathBuf,
    port: u16,
    certs: PathBuf,
}

impl Mig {
    /// Boots `cmdline` with `memory` as the source (`run --vm vm`) and starts a destination
    /// for `dest_memory` admitting `src`.
    fn start(cmdline: &str, memory: &str, dest_memory: &str, src_env: &[(&str, &str)], dst_args: &[&str]) -> Self {
        Self::start_in(None, cmdline, memory, dest_memory, src_env, dst_args)
    }

    fn start_in(
        ns: Option<&NetNs>,
        cmdline: &str,
        memory: &str,
        dest_memory: &str,
        src_env: &[(&str, &str)],
        dst_args: &[&str],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let certs = make_certs(&d, &["src", "dest", "intruder"], "witness");
        let port = free_udp_port();
        let s_sock = d.join("s.sock");
        let d_sock = d.join("d.sock");
        let ss = d.join("s-serial.log");
        let ds = d.join("d-serial.log");
        let sargs = vm_args(cmdline, memory, &ss, &s_sock);
        let mut sargs: Vec<&str> = sargs.iter().map(String::as_str).collect();
        if ns.is_some() {
            sargs.extend(["--tap", "tap0", "--mac", "02:55:44:00:00:07"]);
        }
        let listen = format!("127.0.0.1:{port}");
        let mut dargs = vec![
            "receive",
            "--listen",
            &listen,
            "--certs",
            certs.to_str().unwrap(),
            "--memory",
            dest_memory,
            "--api",
            d_sock.to_str().unwrap(),
            "--serial",
            ds.to_str().unwrap(),
        ];
        if ns.is_some() {
            dargs.extend(["--tap", "tap1"]);
        }
        dargs.extend_from_slice(dst_args);
        // Plain logs (no colour codes between a field's name and its value).
        let src_env: Vec<(&str, &str)> = src_env.iter().copied().chain([("NO_COLOR", "1")]).collect();
        let mut src = Proc::spawn_env(ns, &d, "src", &sargs, &src_env);
        let mut dst = Proc::spawn_env(ns, &d, "dst", &dargs, &[("NO_COLOR", "1")]);
        wait_for(&ss, Duration::from_secs(10), &mut src, "ready", |t| t.lines().any(|l| l.trim() == "ready"));
        wait_for(&d_sock, Duration::from_secs(10), &mut dst, "destination api", |_| d_sock.exists());
        wait_for(&s_sock, Duration::from_secs(30), &mut src, "source api", |_| s_sock.exists());
        Self { dir, src, dst, s_sock, d_sock, port, certs }
    }

    fn s_serial(&self) -> PathBuf {
        self.dir.path().join("s-serial.log")
    }

    fn d_serial(&self) -> PathBuf {
        self.dir.path().join("d-serial.log")
    }

    /// The migrate command's arguments.
    fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = [
            "migrate",
            "--api",
            self.s_sock.to_str().unwrap(),
            "--to",
            &format!("127.0.0.1:{}", self.port),
            "--certs",
            self.certs.to_str().unwrap(),
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// Runs `understudy migrate`; returns (success, stdout, stderr).
    fn migrate(&self, extra: &[&str]) -> (bool, String, String) {
        let a = self.args(extra);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        run(&a)
    }

    /// Starts `understudy migrate` in the background.
    fn migrate_bg(&self, extra: &[&str]) -> std::process::Child {
        std::process::Command::new(bin())
            .args(self.args(extra))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn migrate")
    }

    /// A successful migration's report; checks both processes end where they should.
    fn migrate_ok(&mut self, extra: &[&str]) -> serde_json::Value {
        let (ok, out, err) = self.migrate(extra);
        assert!(
            ok,
            "migrate failed: {err}\n--- src stderr:\n{}\n--- dst stderr:\n{}",
            self.src.stderr(),
            self.dst.stderr()
        );
        let report = json(&out);
        // The source's process exits on its own, successfully.
        let st = self.src.wait_exit(Duration::from_secs(10)).expect("the source process exits after the migration");
        assert!(st.success(), "source exit {st}: {}", self.src.stderr());
        self.dst.assert_alive();
        report
    }

    /// The source's migration status (from `status`).
    fn src_phase(&self) -> Option<String> {
        let (ok, out, _) = run(&["status", "--api", self.s_sock.to_str().unwrap(), "--json"]);
        if !ok {
            return None;
        }
        json(&out)["migration"]["phase"].as_str().map(str::to_string)
    }

    /// The source's `status --json`.
    fn src_status(&self) -> serde_json::Value {
        json(&run(&["status", "--api", self.s_sock.to_str().unwrap(), "--json"]).1)
    }

    /// Waits until the destination says the guest runs there (post-copy) and the source's phase
    /// is `postcopy`; panics when the phase is gone by then (the fault would miss post-copy).
    fn wait_guest_at_destination(&mut self) {
        self.wait_phase("postcopy", Duration::from_secs(20));
        let log = self.dst.stderr_path.clone();
        wait_for(&log, Duration::from_secs(20), &mut self.dst, "the guest running at the destination", |t| {
            t.contains("the guest runs here (post-copy)")
        });
        assert_eq!(self.src_phase().as_deref(), Some("postcopy"), "post-copy ended before the fault");
    }

    /// After the source recovered the guest from a reverse checkpoint: migrate (its `out`)
    /// failed saying `recovered`, the source runs the guest (phase `recovered`, its `RECOVERED:`
    /// line), and the destination's process ends (killed, or fenced: non-zero, `FENCED:`
    /// logged) within `dest_within`. One copy, at the source.
    fn assert_recovered(&mut self, out: &std::process::Output, fenced: bool, dest_within: Duration) {
        let err = String::from_utf8_lossy(&out.stderr);
        let ctx = |m: &Mig| format!("--- migrate:\n{err}\n--- src:\n{}\n--- dst:\n{}", m.src.stderr(), m.dst.stderr());
        assert!(!out.status.success(), "a recovered migration exits non-zero: {}", ctx(self));
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
        assert!(last.contains("recovered"), "migrate's last line says recovered: {last:?}\n{}", ctx(self));
        let s = self.src_status();
        assert_eq!(s["state"], "running", "{s}\n{}", ctx(self));
        assert_eq!(s["migration"]["phase"], "recovered", "{s}\n{}", ctx(self));
        self.src.assert_alive();
        let line = self.src.stderr().lines().find(|l| l.contains(RECOVERED)).map(str::to_string);
        let line = line.unwrap_or_else(|| panic!("the source logs {RECOVERED:?}\n{}", ctx(self)));
        for f in ["epoch=", "recover_ms=", "detect_ms="] {
            assert!(line.contains(f), "{f} in {line:?}");
        }
        eprintln!("recovered: {last}\n  {line}");
        let st = self.dst.wait_exit(dest_within);
        let st =
            st.unwrap_or_else(|| panic!("the destination still runs after {dest_within:?}: two copies\n{}", ctx(self)));
        assert!(!st.success(), "the destination exits non-zero ({st})");
        if fenced {
            let derr = self.dst.stderr();
            let line = derr.lines().find(|l| l.contains("FENCED:"));
            let line = line.unwrap_or_else(|| panic!("the destination says it was fenced:\n{}", ctx(self)));
            eprintln!("  {line}");
        }
    }

    /// Waits until the source's migration reaches `phase`.
    fn wait_phase(&self, phase: &str, timeout: Duration) {
        let t0 = Instant::now();
        while self.src_phase().as_deref() != Some(phase) {
            assert!(t0.elapsed() < timeout, "migration never reached {phase} (at {:?})", self.src_phase());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// After a failed migration: the guest still runs at the source (its serial output grows),
    /// the destination's process exits (with `dest_exits`) without ever running a guest.
    fn assert_failed_cleanly(&mut self, dest_exits: bool) {
        let status = json(&run(&["status", "--api", self.s_sock.to_str().unwrap(), "--json"]).1);
        assert_eq!(status["state"], "running", "{status}");
        assert_eq!(status["migration"]["phase"], "failed", "{status}");
        // The same for people.
        let (ok, text, _) = run(&["status", "--api", self.s_sock.to_str().unwrap()]);
        assert!(ok && text.starts_with("vm: running (primary)"), "{text}");
        assert!(text.contains("): failed, round "), "{text}");
        let before = read_text(&self.s_serial()).len();
        let serial = self.s_serial();
        wait_for(&serial, Duration::from_secs(5), &mut self.src, "the guest going on at the source", |t| {
            t.len() > before
        });
        if dest_exits {
            // 20 s: a CI run once saw a destination woken from SIGSTOP take more than 10.
            let st = self.dst.wait_exit(Duration::from_secs(20)).expect("the destination exits");
            assert!(!st.success(), "the destination exits non-zero");
        } else {
            self.dst.assert_alive();
        }
        assert!(
            read_text(&self.d_serial()).is_empty(),
            "the destination ran a guest:\n{}",
            read_text(&self.d_serial())
        );
    }
}

/// The source's log line when it runs the guest again from a reverse checkpoint.
const RECOVERED: &str = "RECOVERED: the guest runs here again from reverse checkpoint";

fn setup(test: &str) -> Option<std::sync::MutexGuard<'static, ()>> {
    let g = serial_guard();
    kvm_available(test).then_some(g)
}

/// Whether `mode` ends in post-copy (auto may or may not).
fn ends_in_postcopy(r: &serde_json::Value) -> bool {
    r.get("postcopy_faults").is_some()
}

fn assert_report(r: &serde_json::Value, mode: &str) {
    assert_eq!(r["mode"], mode, "{r}");
    if ["postcopy", "demand", "hybrid"].contains(&mode) {
        assert!(ends_in_postcopy(r), "{mode} reports post-copy numbers: {r}");
    }
    if mode == "auto" {
        let chosen = r["chosen_mode"].as_str().expect("auto reports its choice");
        assert!(["precopy", "hybrid", "postcopy"].contains(&chosen), "{r}");
        assert!(r["choice_reason"].as_str().is_some_and(|w| w.contains("MB/s") || w.contains("pages")), "{r}");
        assert_eq!(ends_in_postcopy(r), chosen != "precopy", "{r}");
    }
    if ends_in_postcopy(r) {
        let moved = r["pages_postcopied"].as_u64().unwrap();
        let (pushed, demanded) = (r["pages_pushed"].as_u64().unwrap(), r["pages_demanded"].as_u64().unwrap());
        // (A hybrid whose rounds left nothing dirty moves nothing after the resume.)
        assert!(moved > 0 || mode == "hybrid" || mode == "auto", "post-copy moved pages: {r}");
        assert!(pushed + demanded >= moved, "every missing page went, pushed or demanded: {r}");
        assert!(r["postcopy_ms"].as_f64().unwrap() > 0.0, "{r}");
        if r["postcopy_faults"].as_u64().unwrap() > 0 {
            let (p50, p99) = (r["fault_us_p50"].as_f64().unwrap(), r["fault_us_p99"].as_f64().unwrap());
            assert!(p50 > 0.0 && p99 >= p50, "{r}");
        }
        if mode == "demand" {
            assert!(demanded > 0, "demand paging demands: {r}");
        }
        if mode == "hybrid" {
            assert!(r["switchover_round"].as_u64().unwrap() >= 1, "{r}");
        }
    }
    for k in ["total_ms", "downtime_ms", "bytes_transferred", "source_cpu_ms", "dest_cpu_ms"] {
        assert!(r[k].as_f64().is_some_and(|v| v > 0.0), "{k} in {r}");
    }
    assert!(r["source_peak_rss_bytes"].as_u64().unwrap() > 1 << 20, "{r}");
    assert!(r["dest_peak_rss_bytes"].as_u64().unwrap() > 1 << 20, "{r}");
    assert!(r["downtime_ms"].as_f64().unwrap() < r["total_ms"].as_f64().unwrap());
    let digest = r["memory_digest"].as_str().expect("a digest at the switch-over (--verify)");
    assert!(!digest.is_empty());
}

/// The destination's memory digest at the hand-over (before its guest ran) equals the source's
/// at the switch-over. After post-copy: the digest of every page as it was when it arrived (or
/// held) equals the source's at the switch-over.
fn assert_same_memory(m: &Mig, r: &serde_json::Value) {
    if ends_in_postcopy(r) {
        let want = r["memory_digest"].as_str().expect("a digest at the switch-over");
        let err = m.dst.stderr();
        let got = err
            .lines()
            .find_map(|l| l.split("post-copy memory digest ").nth(1))
            .map(|d| d.split_whitespace().next().unwrap_or_default().trim_matches('"').to_string())
            .unwrap_or_else(|| panic!("the destination logs its post-copy digest:\n{err}"));
        assert_eq!(got, want, "memory differs after post-copy: {r}");
        let s = json(&run(&["status", "--api", m.d_sock.to_str().unwrap(), "--json"]).1);
        assert_eq!(s["state"], "running", "{s}");
        assert_eq!(s["origin"]["kind"], "migrated", "{s}");
        return;
    }
    let s = json(&run(&["status", "--api", m.d_sock.to_str().unwrap(), "--json"]).1);
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(s["origin"]["kind"], "migrated", "{s}");
    assert_eq!(s["origin"]["epoch"], r["switchover_epoch"], "{s}");
    assert_eq!(s["origin"]["memory_digest"], r["memory_digest"], "memory differs at the switch-over: {s}\n{r}");
}

/// The counter goes on at the destination exactly where the source stopped: no gap, no repeat.
fn assert_counter_continues(m: &mut Mig) {
    let d = m.d_serial();
    wait_for(&d, Duration::from_secs(10), &mut m.dst, "counter at the destination", |t| counter_lines(t).len() >= 3);
    // The switch-over may cut the guest mid-line: the source's output then ends with the line's
    // head and the destination's starts with its tail. Together they are one output.
    let (src, dst) = (read_text(&m.s_serial()), read_text(&d));
    let (last, _) = *counter_lines(&src).last().expect("the source counted");
    let all = counter_lines(&format!("{src}{dst}"));
    for w in all.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "gap or repeat across the move (source ..{last}): {w:?}");
    }
    assert!(all.last().is_some_and(|l| l.0 >= last + 3), "the destination counted on after {last}: {all:?}");
}

fn migrate_counter(mode: &str) {
    let test = format!("counter_migrates_with_{mode}");
    let Some(_g) = setup(&test) else { return };
    let mut m = Mig::start("workload=counter", "64M", "64M", &[], &["--verify"]);
    std::thread::sleep(Duration::from_millis(300));
    let r = m.migrate_ok(&["--mode", mode, "--verify"]);
    eprintln!("{test}: {r}");
    assert_report(&r, mode);
    assert_same_memory(&m, &r);
    assert_counter_continues(&mut m);
}

#[test]
fn counter_migrates_with_precopy() {
    migrate_counter("precopy");
}

#[test]
fn counter_migrates_with_stopcopy() {
    migrate_counter("stopcopy");
}

#[test]
fn counter_migrates_with_postcopy() {
    migrate_counter("postcopy");
}

#[test]
fn counter_migrates_with_demand() {
    migrate_counter("demand");
}

#[test]
fn counter_migrates_with_hybrid() {
    migrate_counter("hybrid");
}

#[test]
fn counter_migrates_with_auto() {
    migrate_counter("auto");
}

fn migrate_dirty(mode: &str) {
    let test = format!("dirty_migrates_with_{mode}");
    let Some(_g) = setup(&test) else { return };
    let mut m = Mig::start("workload=dirty wss=32 rate=20000", "128M", "128M", &[], &["--verify"]);
    std::thread::sleep(Duration::from_millis(500));
    let r = m.migrate_ok(&["--mode", mode, "--verify"]);
    eprintln!("{test}: {r}");
    assert_report(&r, mode);
    assert_same_memory(&m, &r);
    if ["postcopy", "demand", "hybrid", "auto"].contains(&mode) {
        if mode != "auto" {
            assert_eq!(r["stop_reason"].as_str().unwrap() == mode, mode != "hybrid", "{r}");
        }
    } else if mode == "precopy" {
        let rounds = r["rounds"].as_array().unwrap();
        assert!(!rounds.is_empty(), "{r}");
        assert!(rounds[0]["pages"].as_u64().unwrap() >= 32 * 256, "round 0 sends the working set: {r}");
        assert!(
            ["downtime_fits", "resent_share", "max_rounds", "time_limit"].contains(&r["stop_reason"].as_str().unwrap())
        );
        assert!(r["pages"]["zero"].as_u64().unwrap() > 0, "{r}");
    } else {
        assert_eq!(r["stop_reason"], "stopcopy");
        assert!(r["rounds"].as_array().unwrap().is_empty());
        assert_eq!(r["bytes_retransferred"], 0);
    }
    assert_dirty_continues(&mut m);
}

/// The dirty guest's own self-check goes on passing at the destination.
fn assert_dirty_continues(m: &mut Mig) {
    let d = m.d_serial();
    wait_for(&d, Duration::from_secs(15), &mut m.dst, "two dirty lines at the destination", |t| {
        t.lines().filter(|l| l.starts_with("dirty gen=")).count() >= 2
    });
    let text = read_text(&d);
    // Whole lines only: the guest may be printing the last one.
    let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    assert!(!whole.contains("dirty error"), "self-check failed at the destination:\n{text}");
    for l in whole.lines().map(str::trim).filter(|l| l.starts_with("dirty gen=")) {
        assert!(l.ends_with(" errors=0"), "self-check failed at the destination: {l:?}\n{text}");
    }
}

#[test]
fn dirty_migrates_with_precopy() {
    migrate_dirty("precopy");
}

#[test]
fn dirty_migrates_with_stopcopy() {
    migrate_dirty("stopcopy");
}

/// Without reverse checkpoints (`--no-reverse`), a link cut for longer than the session's idle
/// timeout in the middle of post-copy, then healed: both processes live, the guest waits on its
/// faults, the source reconnects, the destination says what it holds and asks again; the
/// migration completes and the guest is intact (memory digest as at the switch-over, its
/// self-check passing).
#[test]
fn a_link_cut_and_healed_mid_postcopy_completes_with_the_guest_intact() {
    let test = "a_link_cut_and_healed_mid_postcopy_completes_with_the_guest_intact";
    let Some(_g) = setup(test) else { return };
    let Some(ns) = NetNs::bridged(test, "mcut", 77) else { return };
    let mut m = Mig::start_in(Some(&ns), "workload=dirty wss=32 rate=20000", "128M", "128M", &[], &["--verify"]);
    std::thread::sleep(Duration::from_millis(500));
    // `demand`: nothing is pushed for the first second, so post-copy is still on when the cut
    // lands.
    let child = m.migrate_bg(&["--mode", "demand", "--verify", "--no-reverse"]);
    m.wait_phase("postcopy", Duration::from_secs(20));
    // Both processes talk over the namespace's loopback: take it down (this kernel has no
    // netem), then up again.
    let link = |state: &str| ns.net.ip(&["link", "set", "lo", state]).expect("set lo");
    link("down");
    std::thread::sleep(Duration::from_millis(2500));
    link("up");
    let out = wait_with_timeout(child, Duration::from_secs(60));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "the migration completes after the heal: {stderr}\n--- src:\n{}\n--- dst:\n{}",
        m.src.stderr(),
        m.dst.stderr()
    );
    let r = json(&stdout);
    eprintln!("{test}: {r}");
    assert!(r["reconnects"].as_u64().unwrap() >= 1, "the cut broke the session and it came back: {r}");
    let st = m.src.wait_exit(Duration::from_secs(10)).expect("the source process exits after the migration");
    assert!(st.success(), "source exit {st}: {}", m.src.stderr());
    m.dst.assert_alive();
    assert_report(&r, "demand");
    assert_same_memory(&m, &r);
    assert_dirty_continues(&mut m);
}

/// With reverse checkpoints (the default), the same cut (longer than the session's 1 s idle
/// timeout): the source decides the destination is gone and resumes the guest from the last
/// reverse checkpoint it committed; when the link heals the destination reaches the source, learns
/// it was superseded, stops its guest and exits non-zero (`FENCED:`). The guest goes on at the
/// source with its memory intact (the dirty workload's self-check over every page of its working
/// set: the source's untouched pages and the destination's newer ones merged right), and never
/// two copies.
#[test]
fn a_link_cut_past_the_idle_timeout_mid_postcopy_recovers_at_the_source_and_fences_the_destination() {
    let test = "a_link_cut_past_the_idle_timeout_mid_postcopy_recovers_at_the_source_and_fences_the_destination";
    let Some(_g) = setup(test) else { return };
    let Some(ns) = NetNs::bridged(test, "mfen", 78) else { return };
    let mut m = Mig::start_in(Some(&ns), "workload=dirty wss=32 rate=20000", "128M", "128M", &[], &["--verify"]);
    std::thread::sleep(Duration::from_millis(500));
    let child = m.migrate_bg(&["--mode", "demand", "--verify"]);
    m.wait_guest_at_destination();
    // The source's guest is paused since the switch-over: what its serial output gains from
    // here on is the recovered guest's.
    let before = read_text(&m.s_serial()).len();
    let link = |state: &str| ns.net.ip(&["link", "set", "lo", state]).expect("set lo");
    link("down");
    std::thread::sleep(Duration::from_millis(2500));
    link("up");
    let out = wait_with_timeout(child, Duration::from_secs(60));
    m.assert_recovered(&out, true, Duration::from_secs(30));
    assert_dirty_continues_at_source(&mut m, before);
}

/// The dirty guest's self-check goes on passing at the source after a recovery: two progress
/// lines past `from` (the source's serial output before the recovery), no error.
fn assert_dirty_continues_at_source(m: &mut Mig, from: usize) {
    let s = m.s_serial();
    wait_for(&s, Duration::from_secs(15), &mut m.src, "two dirty lines at the source after the recovery", |t| {
        t.get(from..).is_some_and(|t| t.lines().filter(|l| l.starts_with("dirty gen=")).count() >= 2)
    });
    let text = read_text(&s);
    let after = &text[from..];
    let whole = &after[..after.rfind('\n').map_or(0, |i| i + 1)];
    assert!(!whole.contains("dirty error"), "self-check failed after the recovery:\n{after}");
    for l in whole.lines().map(str::trim).filter(|l| l.starts_with("dirty gen=")) {
        assert!(l.ends_with(" errors=0"), "self-check failed after the recovery: {l:?}\n{after}");
    }
}

#[test]
fn dirty_migrates_with_postcopy() {
    migrate_dirty("postcopy");
}

#[test]
fn dirty_migrates_with_demand() {
    migrate_dirty("demand");
}

#[test]
fn dirty_migrates_with_hybrid() {
    migrate_dirty("hybrid");
}

#[test]
fn dirty_migrates_with_auto() {
    migrate_dirty("auto");
}

/// The checker client (`testbed/scripts/faults_client.py`) loading the kv guest from the
/// namespace over one TCP connection.
struct KvLoad {
    child: std::process::Child,
    ctl: PathBuf,
}

impl KvLoad {
    /// Starts it and waits for its first reply, then half a second of load.
    fn start(m: &Mig, ns: &NetNs) -> Self {
        let ctl = m.dir.path().join("client");
        std::fs::create_dir_all(&ctl).unwrap();
        let script = root().join("testbed/scripts/faults_client.py");
        let child = ns
            .command("/usr/bin/python3")
            .arg(&script)
            .args([ns.guest_ip.as_str(), ctl.to_str().unwrap(), "90"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start the kv client");
        let t0 = Instant::now();
        while !ctl.join("ready").exists() {
            assert!(t0.elapsed() < Duration::from_secs(20), "the kv client never got a reply");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(500));
        KvLoad { child, ctl }
    }

    /// Keeps the load on 1.5 s more, stops it, and checks its verdict: every acknowledged write
    /// reads back, no contradicted reply, and its one connection survived.
    fn stop_and_check(self, test: &str) {
        std::thread::sleep(Duration::from_millis(1500));
        std::fs::write(self.ctl.join("stop"), b"").unwrap();
        let out = wait_with_timeout(self.child, Duration::from_secs(60));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let res = json(stdout.lines().last().unwrap_or_default());
        eprintln!("{test}: client {res}");
        assert!(res["acknowledged_writes"].as_u64().unwrap() > 50, "{res}");
        assert_eq!(res["lost"], 0, "{res}");
        assert_eq!(res["contradictions"], 0, "{res}");
        assert_eq!(res["reconnects"], 0, "the client's TCP connection survives: {res}");
    }
}

/// The kv guest moves under a client's load through a bridge: the client's TCP connection
/// survives (the guest's TCP stack moved with its memory, its MAC moved with the announcement),
/// and every write it saw acknowledged reads back afterwards.
fn kv_migrates(mode: &str, subnet: u8) {
    let test = format!("kv_migrates_with_{mode}_under_load");
    let Some(_g) = setup(&test) else { return };
    let Some(ns) = NetNs::bridged(&test, "mig", subnet) else { return };
    let cmdline = format!("workload=kv ip={}/24", ns.guest_ip);
    let mut m = Mig::start_in(Some(&ns), &cmdline, "64M", "64M", &[], &["--verify"]);
    let load = KvLoad::start(&m, &ns);
    let r = m.migrate_ok(&["--mode", mode, "--verify"]);
    eprintln!("{test}: {r}");
    assert_report(&r, mode);
    assert_same_memory(&m, &r);
    load.stop_and_check(&test);
    let s = json(&run(&["status", "--api", m.d_sock.to_str().unwrap(), "--json"]).1);
    assert_eq!(s["origin"]["kind"], "migrated", "{s}");
    if r.get("reverse_checkpoints").is_some() {
        assert_handover_order(&m, &r);
    }
}

/// Post-copy with reverse checkpoints completed: the source gave its copy up (stopped
/// acknowledging, then handed over) before the destination released the output it held, and the
/// destination confirmed it. The two logs' timestamps are this host's one clock.
fn assert_handover_order(m: &Mig, r: &serde_json::Value) {
    assert_eq!(r["handover_confirmed"], true, "{r}");
    // The reverse session is dialled at the resume and its first epoch takes a handshake and
    // an ack: a post-copy phase of a few ms (hybrid after rounds that converged, 20 pages left:
    // 10 ms in one CI run) may end before any is committed, its output held until the
    // hand-over all the same (checked below).
    let postcopy_ms = r["postcopy_ms"].as_f64().unwrap_or(0.0);
    if postcopy_ms >= 250.0 {
        assert!(r["reverse_checkpoints"].as_u64().unwrap_or(0) >= 1, "no reverse checkpoint committed: {r}");
    } else {
        eprintln!("post-copy took {postcopy_ms:.1} ms: {} reverse checkpoints", r["reverse_checkpoints"]);
    }
    let at = |log: &str, what: &str| -> String {
        let line = log.lines().find(|l| l.contains(what)).unwrap_or_else(|| panic!("no {what:?} in:\n{log}"));
        line.split_whitespace().next().unwrap_or_default().to_string()
    };
    let (src, dst) = (m.src.stderr(), m.dst.stderr());
    let gave_up = at(&src, "reverse checkpoints stopped; handing the guest over");
    let released = at(&dst, "the guest runs here alone: releasing its held output");
    assert!(gave_up <= released, "the source gave its copy up at {gave_up}, the destination released at {released}");
}

/// A fault during post-copy ([`kv_postcopy_fault`]).
enum PostcopyFault {
    /// `kill -9` of the destination.
    KillDestination,
    /// The namespace's loopback (source <-> destination) down for this long, then up.
    CutLink(Duration),
}

/// `fault` during post-copy while the kv guest answers the checker client from the
/// destination: the source recovers the guest from the last reverse checkpoint it committed
/// and takes its network identity back; the destination is gone (killed, or fenced once the
/// link healed). Every write the client saw acknowledged (by the guest at the destination too:
/// its output was held until the source had the state that produced it) reads back, nothing
/// contradicts, the client's connection survives, and only the source runs the guest.
fn kv_postcopy_fault(test: &str, tag: &str, subnet: u8, fault: PostcopyFault) {
    let Some(_g) = setup(test) else { return };
    let Some(ns) = NetNs::bridged(test, tag, subnet) else { return };
    let cmdline = format!("workload=kv ip={}/24", ns.guest_ip);
    let mut m = Mig::start_in(Some(&ns), &cmdline, "64M", "64M", &[], &[]);
    let load = KvLoad::start(&m, &ns);
    // `demand`: nothing pushed until the guest asked for nothing for a second, so post-copy is
    // still on when the fault lands.
    let child = m.migrate_bg(&["--mode", "demand"]);
    m.wait_guest_at_destination();
    // Some load served from the destination (through reverse epochs), then the fault.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(m.src_phase().as_deref(), Some("postcopy"), "post-copy ended before the fault");
    let fenced = match fault {
        PostcopyFault::KillDestination => {
            let _ = m.dst.child.kill();
            false
        }
        PostcopyFault::CutLink(cut) => {
            let link = |state: &str| ns.net.ip(&["link", "set", "lo", state]).expect("set lo");
            link("down");
            std::thread::sleep(cut);
            link("up");
            true
        }
    };
    let out = wait_with_timeout(child, Duration::from_secs(60));
    m.assert_recovered(&out, fenced, Duration::from_secs(30));
    load.stop_and_check(test);
    let s = m.src_status();
    assert_eq!((s["state"].as_str(), s["migration"]["phase"].as_str()), (Some("running"), Some("recovered")), "{s}");
}

/// The destination killed (`kill -9`) during post-copy: the source notices at once (the
/// liveness line) and recovers; nothing acknowledged is lost; one copy ([`kv_postcopy_fault`]).
#[test]
fn kv_recovers_at_the_source_when_the_destination_is_killed_during_postcopy() {
    let test = "kv_recovers_at_the_source_when_the_destination_is_killed_during_postcopy";
    kv_postcopy_fault(test, "mkil", 79, PostcopyFault::KillDestination);
}

/// The link cut (~2 s, past the session's 1 s idle timeout) during post-copy: the source
/// recovers the guest, the destination fences itself when the link heals; one copy runs (the
/// source), nothing acknowledged is lost, nothing contradicts ([`kv_postcopy_fault`]).
#[test]
fn kv_partition_during_postcopy_leaves_one_copy_at_the_source_and_fences_the_destination() {
    let test = "kv_partition_during_postcopy_leaves_one_copy_at_the_source_and_fences_the_destination";
    kv_postcopy_fault(test, "mprt", 80, PostcopyFault::CutLink(Duration::from_millis(2000)));
}

#[test]
fn kv_migrates_with_precopy_under_load() {
    kv_migrates("precopy", 71);
}

#[test]
fn kv_migrates_with_stopcopy_under_load() {
    kv_migrates("stopcopy", 72);
}

#[test]
fn kv_migrates_with_postcopy_under_load() {
    kv_migrates("postcopy", 73);
}

#[test]
fn kv_migrates_with_demand_under_load() {
    kv_migrates("demand", 74);
}

#[test]
fn kv_migrates_with_hybrid_under_load() {
    kv_migrates("hybrid", 75);
}

#[test]
fn kv_migrates_with_auto_under_load() {
    kv_migrates("auto", 76);
}

/// `migrate-cancel` in each phase before the hand-over: the guest runs on at the source, the
/// destination exits without running one.
#[test]
fn cancel_in_each_phase_leaves_the_guest_at_the_source() {
    let test = "cancel_in_each_phase_leaves_the_guest_at_the_source";
    let Some(_g) = setup(test) else { return };
    for (phase, env, extra) in [
        // 1 MB/s: round 0 lasts long enough that the cancel always finds it (at 4 MB/s a slow
        // CI run once saw the migration in `rounds` already).
        ("round-0", vec![], vec!["--max-bandwidth", "1M"]),
        ("rounds", vec![], vec!["--max-bandwidth", "32M", "--downtime-ms", "0", "--stop-share", "100"]),
        ("stop-and-copy", vec![("UNDERSTUDY_FAILPOINTS", "migrate.stall-switchover")], vec![]),
        // After the destination acknowledged the switch-over epoch (and built the guest from it,
        // paused), before the hand-over: the built guest never runs.
        ("stop-and-copy", vec![("UNDERSTUDY_FAILPOINTS", "migrate.stall-handover")], vec![]),
    ] {
        let mut m = Mig::start("workload=dirty wss=16 rate=20000", "128M", "128M", &env, &[]);
        let child = m.migrate_bg(&extra);
        m.wait_phase(phase, Duration::from_secs(20));
        let (ok, out, err) = run(&["ctl", "--api", m.s_sock.to_str().unwrap(), "migrate-cancel"]);
        assert!(ok, "cancel in {phase}: {err}");
        assert_eq!(json(&out)["phase"], phase);
        let out = wait_with_timeout(child, Duration::from_secs(20));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a cancelled migration exits non-zero");
        assert!(err.contains(&format!("cancelled by request in phase {phase}")), "{phase}: {err}");
        m.assert_failed_cleanly(true);
        let derr = m.dst.stderr();
        assert!(derr.contains("Cancelled") || derr.contains("cancelled"), "the destination says why: {derr}");
        eprintln!("{test}: cancelled in {phase}");
    }
}

/// Each bad input ends the migration with an error naming it; the guest runs on at the source;
/// nothing runs at the destination.
#[test]
fn bad_inputs_end_the_migration_with_an_error_naming_them() {
    let test = "bad_inputs_end_the_migration_with_an_error_naming_them";
    let Some(_g) = setup(test) else { return };

    // Memory sizes that differ: the handshake refuses, both sides say why.
    let mut m = Mig::start("workload=counter", "64M", "128M", &[], &[]);
    let (ok, _, err) = m.migrate(&[]);
    assert!(!ok);
    eprintln!("{test}: memory size: {}", err.trim());
    assert!(err.contains("memory layout"), "{err}");
    m.assert_failed_cleanly(true);
    assert!(m.dst.stderr().contains("memory layout"), "{}", m.dst.stderr());

    // A source whose certificate is not the expected one is refused; the destination waits on
    // for the right one, which then migrates.
    let mut m = Mig::start("workload=counter", "64M", "64M", &[], &[]);
    let (ok, _, err) = m.migrate(&["--name", "intruder"]);
    assert!(!ok);
    eprintln!("{test}: wrong source certificate: {}", err.trim());
    assert!(err.contains("connect to the destination"), "{err}");
    m.assert_failed_cleanly(false);
    assert!(m.dst.stderr().contains("intruder"), "the destination names the refused peer: {}", m.dst.stderr());
    // Garbage on the port: refused, still waiting.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..50u8 {
        let junk: Vec<u8> = (0..1200).map(|j| (j as u8).wrapping_mul(31).wrapping_add(i)).collect();
        sock.send_to(&junk, ("127.0.0.1", m.port)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    m.dst.assert_alive();
    let r = m.migrate_ok(&[]);
    assert_eq!(r["mode"], "precopy");

    // A destination that is not the expected one: the source refuses it.
    let mut m = Mig::start("workload=counter", "64M", "64M", &[], &[]);
    let (ok, _, err) = m.migrate(&["--dest-name", "other"]);
    assert!(!ok);
    eprintln!("{test}: wrong destination: {}", err.trim());
    assert!(err.contains("other"), "the error names the expected destination: {err}");
    m.assert_failed_cleanly(false);

    // An unknown mode, and bad settings: refused before anything starts.
    let (ok, _, err) = m.migrate(&["--mode", "lazy"]);
    assert!(!ok && err.contains("lazy") && err.contains("postcopy, hybrid, demand, auto"), "{err}");
    let (ok, _, err) = m.migrate(&["--stop-share=-1"]);
    assert!(!ok && err.contains("--stop-share"), "{err}");
    let (ok, _, err) = m.migrate(&["--max-bandwidth", "0"]);
    assert!(!ok && err.contains("0"), "{err}");

    // A protocol version without migration (a build acting as version 1).
    let mut m = Mig::start("workload=counter", "64M", "64M", &[("UNDERSTUDY_PROTOCOL_VERSION", "1")], &[]);
    let (ok, _, err) = m.migrate(&[]);
    assert!(!ok);
    eprintln!("{test}: version 1: {}", err.trim());
    assert!(err.contains("version"), "{err}");
    m.assert_failed_cleanly(true);
}

/// A destination killed while `--max-bandwidth` holds the source between two pieces (seconds at
/// this rate) is noticed at once through its liveness line, and reported as its death: the
/// pacing wait watches the line and the session (it used to sleep through them, and the
/// session's silence after 1 s was reported instead, found by `testbed faults --points
/// migrate.dest-kill-precopy`).
#[test]
fn a_destination_killed_while_the_bandwidth_limit_paces_is_noticed_at_once() {
    let test = "a_destination_killed_while_the_bandwidth_limit_paces_is_noticed_at_once";
    let Some(_g) = setup(test) else { return };
    let mut m = Mig::start("workload=dirty wss=16 rate=20000", "128M", "128M", &[], &[]);
    let child = m.migrate_bg(&["--max-bandwidth", "2M", "--downtime-ms", "0", "--stop-share", "100"]);
    m.wait_phase("round-0", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(1500));
    let killed = Instant::now();
    let _ = m.dst.child.kill();
    let out = wait_with_timeout(child, Duration::from_secs(30));
    let noticed = killed.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("the destination's process is gone"), "{err}");
    assert!(
        noticed < Duration::from_millis(900),
        "noticed after {noticed:?} (the session's idle timeout is 1 s): {err}"
    );
    m.assert_failed_cleanly(true);
}

/// A destination killed in a round, a link cut in a round (the destination frozen), a source
/// killed before the switch-over: each ends the migration; the guest runs on at the source (or
/// nowhere new); no second copy runs.
#[test]
fn a_dead_peer_or_a_cut_link_ends_the_migration_cleanly() {
    let test = "a_dead_peer_or_a_cut_link_ends_the_migration_cleanly";
    let Some(_g) = setup(test) else { return };
    let slow = ["--max-bandwidth", "32M", "--downtime-ms", "0", "--stop-share", "100"];

    // The destination killed during the rounds.
    let mut m = Mig::start("workload=dirty wss=16 rate=20000", "128M", "128M", &[], &[]);
    let child = m.migrate_bg(&slow);
    m.wait_phase("rounds", Duration::from_secs(20));
    let killed = Instant::now();
    let _ = m.dst.child.kill();
    let out = wait_with_timeout(child, Duration::from_secs(20));
    let noticed = killed.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    // Its process death (the liveness line), not a silence, and at once: the bandwidth limit's
    // pacing watches the line too. The source's log says what its line did (a CI run once saw
    // the silence instead).
    let logs = |m: &Mig| format!("--- src:\n{}\n--- dst:\n{}", m.src.stderr(), m.dst.stderr());
    assert!(err.contains("the destination's process is gone"), "{err}\n{}", logs(&m));
    assert!(
        noticed < Duration::from_millis(900),
        "noticed after {noticed:?} (the session's idle timeout is 1 s)\n{}",
        logs(&m)
    );
    m.assert_failed_cleanly(true);

    // The link cut during the rounds: the destination stops answering (SIGSTOP), the source
    // notices the silence; when the destination wakes up its session is gone and it exits.
    let mut m = Mig::start("workload=dirty wss=16 rate=20000", "128M", "128M", &[], &[]);
    let child = m.migrate_bg(&slow);
    m.wait_phase("rounds", Duration::from_secs(20));
    let pid = m.dst.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let t0 = Instant::now();
    let out = wait_with_timeout(child, Duration::from_secs(30));
    let noticed = t0.elapsed();
    assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("session with the destination ended") || err.contains("timed out"), "{err}");
    eprintln!("{test}: cut link noticed after {noticed:?}: {}", err.lines().last().unwrap_or_default());
    m.assert_failed_cleanly(true);

    // The source killed before the switch-over: the destination discards what it got.
    let mut m = Mig::start("workload=dirty wss=16 rate=20000", "128M", "128M", &[], &[]);
    let child = m.migrate_bg(&slow);
    m.wait_phase("rounds", Duration::from_secs(20));
    let _ = m.src.child.kill();
    let _ = wait_with_timeout(child, Duration::from_secs(20));
    let st = m.dst.wait_exit(Duration::from_secs(10)).expect("the destination exits");
    assert!(!st.success());
    assert!(m.dst.stderr().contains("before the hand-over"), "{}", m.dst.stderr());
    assert!(read_text(&m.d_serial()).is_empty());
}
