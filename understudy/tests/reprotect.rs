//! Automatic re-protection (issue 17, item 3): a backup started with `--reprotect-to` protects
//! the VM to that standby by itself once it is promoted, the group records the standby, and a
//! second failover promotes the standby without losing an acknowledged write.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const NAMES: [&str; 3] = ["primary", "backup", "witness"];

fn acked(lines: &Mutex<Vec<String>>) -> usize {
    lines.lock().unwrap().iter().filter(|l| l.starts_with("ok ")).count()
}

fn wait_acked(lines: &Mutex<Vec<String>>, at_least: usize, within: Duration, what: &str) {
    let t0 = Instant::now();
    while acked(lines) < at_least {
        assert!(t0.elapsed() < within, "{what}: only {} writes acknowledged", acked(lines));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `status --json` of a process that may be busy: retried.
fn status(sock: &Path) -> serde_json::Value {
    for _ in 0..20 {
        let (ok, out, _) = run(&["status", "--api", sock.to_str().unwrap(), "--json"]);
        if ok {
            return json(&out);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no status from {}", sock.display())
}

/// Waits until the VM at `sock` was promoted and is protected again by a standby the group
/// recorded; returns its status then.
fn wait_reprotected(sock: &Path, who: &mut Proc, within: Duration) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        who.assert_alive();
        let s = status(sock);
        if s["protection"]["state"] == "protected" && s["reprotect"]["state"] == "protected" {
            return s;
        }
        assert!(t0.elapsed() < within, "not re-protected within {within:?}: {s}\n{}", who.stderr_tail(40));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The protection states the log of `who` shows after its promotion, in order.
fn states_after_promotion(who: &Proc) -> Vec<String> {
    let log = who.stderr();
    let Some(at) = log.find("PROMOTED") else { return Vec::new() };
    log[at..]
        .lines()
        .filter(|l| l.contains("protection state") && l.contains(" to="))
        .filter_map(|l| l.split(" to=").nth(1)?.split_whitespace().next().map(str::to_string))
        .collect()
}

#[test]
fn a_promoted_vm_protects_itself_to_its_standby_and_a_second_failover_loses_nothing() {
    let _g = serial_guard();
    let test = "a_promoted_vm_protects_itself_to_its_standby_and_a_second_failover_loses_nothing";
    if !kvm_available(test) {
        return;
    }
    // Two hosts on one LAN: the primary's host on tap0, the backup's on tap1.
    let Some(ns) = NetNs::bridged(test, "rp", 87) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let certs = make_certs(d, &["primary", "backup"], "witness");
    let c = certs.to_str().unwrap().to_string();
    let ports = [free_udp_port(), free_udp_port(), free_udp_port()];
    let (p_repl, b_repl) = (free_udp_port(), free_udp_port());
    let p_standby = format!("1=primary@127.0.0.1:{p_repl}");
    let b_standby = format!("2=backup@127.0.0.1:{b_repl}");
    let spawn = |name: &str, args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // (NO_COLOR: plain `key=value` fields in the logs read below.)
        Proc::spawn_env(Some(&ns), d, name, &args, &[("NO_COLOR", "1")])
    };
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut wargs = strings(&["witness", "--data", d.join("raft3").to_str().unwrap(), "--certs", &c]);
    wargs.extend(strings(&["--listen", &format!("127.0.0.1:{}", ports[2])]));
    for id in 1..=2 {
        wargs.extend(["--peer".to_string(), format!("{id}={}@127.0.0.1:{}", NAMES[id - 1], ports[id - 1])]);
    }
    let _witness = spawn("witness", wargs);

    // A backup process on host `id`: the backup of the VM, each naming the other host as the
    // standby to protect to once promoted (the same config on both hosts but for the names).
    let backup_on = |id: usize, tap: &str, sock: &Path| -> Vec<String> {
        let (repl, name, other, standby) = match id {
            1 => (p_repl, "primary", "backup", &b_standby),
            _ => (b_repl, "backup", "primary", &p_standby),
        };
        let mut a = strings(&["backup", "--listen", &format!("127.0.0.1:{repl}"), "--certs", &c, "--name", name]);
        a.extend(strings(&["--primary-name", other, "--memory", "64M", "--tap", tap, "--verify"]));
        a.extend(strings(&["--api", sock.to_str().unwrap(), "--detect-ms", "150", "--heartbeat-ms", "10"]));
        a.extend(strings(&["--serial", d.join(format!("serial{id}.log")).to_str().unwrap()]));
        a.extend(strings(&[
            "--reprotect-to",
            standby,
            "--reprotect-retry-ms",
            "100",
            "--reprotect-retry-max-ms",
            "500",
        ]));
        a.extend(strings(&["--reprotect-verify-every", "4"]));
        a.extend(agent_args(d, &certs, id, ports));
        a
    };
    let (b_sock, s_sock) = (d.join("b.sock"), d.join("s.sock"));
    let mut backup = spawn("backup", backup_on(2, "tap1", &b_sock));
    let p_sock = d.join("p.sock");
    let cmdline = format!("workload=kv ip={}/24", ns.guest_ip);
    let mut pargs = vm_args(&cmdline, "64M", &d.join("p-serial.log"), &p_sock);
    pargs.extend(strings(&["--tap", "tap0"]));
    pargs.extend(agent_args(d, &certs, 1, ports));
    let mut primary = spawn("primary", pargs);
    wait_for(&p_sock, Duration::from_secs(30), &mut primary, "primary api", |_| p_sock.exists());
    let (ok, out, err) = run(&[
        "protect",
        "--api",
        p_sock.to_str().unwrap(),
        "--backup",
        &format!("127.0.0.1:{b_repl}"),
        "--certs",
        &c,
        "--backup-node",
        "2",
        "--detect-ms",
        "150",
        "--heartbeat-ms",
        "10",
    ]);
    assert!(ok, "protect failed: {err}{out}");
    wait_for(&primary.stderr_path.clone(), Duration::from_secs(30), &mut primary, "backup recorded", |t| {
        t.contains("asked the group to record the backup")
    });
    std::thread::sleep(Duration::from_millis(500));

    let mut writer = ns.command("/usr/bin/python3");
    writer.arg("-c").arg(WRITER).arg(&ns.guest_ip).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut writer = writer.spawn().expect("spawn the writer");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = Arc::clone(&lines);
        let out = writer.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        })
    };
    wait_acked(&lines, 100, Duration::from_secs(30), "before the first kill");

    // First failover: the primary dies; the backup is promoted and, its standby not being up
    // yet, shows its attempts in `status`.
    primary.kill();
    let t_kill = Instant::now();
    wait_for(&backup.stderr_path.clone(), Duration::from_secs(10), &mut backup, "promotion", |t| {
        t.contains("PROMOTED")
    });
    let at_first = acked(&lines);
    let t0 = Instant::now();
    let waiting = loop {
        let s = status(&b_sock);
        if s["reprotect"]["failures"].as_u64().unwrap_or(0) >= 2 {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no failed re-protection attempt shown: {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(waiting["origin"]["kind"], "promoted", "{waiting}");
    assert_eq!(waiting["reprotect"]["target"], p_standby.as_str(), "{waiting}");
    assert!(waiting["protection"].is_null(), "protected to a standby that is not up: {waiting}");
    let text = run(&["status", "--api", b_sock.to_str().unwrap()]).1;
    assert!(text.contains("re-protection: waiting") && text.contains("does not answer"), "{text}");
    eprintln!("promoted {:?} after the kill; re-protection waiting: {}", t_kill.elapsed(), waiting["reprotect"]);

    // The old primary's host comes back as an ordinary backup with its node id and raft
    // directory (as systemd would restart it): the promoted VM protects itself to it.
    let t_standby = Instant::now();
    let mut standby = spawn("standby", backup_on(1, "tap0", &s_sock));
    let s = wait_reprotected(&b_sock, &mut backup, Duration::from_secs(60));
    eprintln!("re-protected {:?} after the standby started: {}", t_standby.elapsed(), s["reprotect"]);
    assert_eq!(s["reprotect"]["target"], p_standby.as_str(), "{s}");
    let states = states_after_promotion(&backup);
    let syncing = states.iter().position(|s| s == "syncing");
    let protected = states.iter().rposition(|s| s == "protected");
    assert!(syncing.is_some() && syncing < protected, "protection did not go syncing -> protected: {states:?}");
    assert!(backup.stderr().contains("RE-PROTECTED"), "no RE-PROTECTED line:\n{}", backup.stderr_tail(30));
    let sb = status(&s_sock);
    assert_eq!(sb["backup"]["state"], "consistent", "{sb}");
    // The standby's replica is the promoted VM's memory: digests of the same epochs agree.
    wait_acked(&lines, at_first + 100, Duration::from_secs(30), "after the first failover");
    let pj = Pair::ctl(&b_sock, "verify-journal");
    let sj = Pair::ctl(&s_sock, "verify-journal");
    let same = compare_journals(&pj, &sj);
    assert!(same >= 1, "no epoch digested on both sides:\n{pj}\n{sj}");
    eprintln!("{same} epochs with the same digest on the promoted vm and its new backup");

    // Second failover: the promoted VM dies too; the standby is promoted, nothing is lost.
    std::thread::sleep(Duration::from_millis(500));
    let at_second = acked(&lines);
    backup.kill();
    let t_kill = Instant::now();
    wait_for(&standby.stderr_path.clone(), Duration::from_secs(10), &mut standby, "second promotion", |t| {
        t.contains("PROMOTED")
    });
    assert!(standby.stderr().contains("arbitration: granted"), "promoted without a grant");
    eprintln!("standby promoted {:?} after the second kill", t_kill.elapsed());
    wait_acked(&lines, at_second + 100, Duration::from_secs(30), "after the second failover");
    let s2 = status(&s_sock);
    assert_eq!(s2["origin"]["kind"], "promoted", "{s2}");
    assert_eq!(s2["reprotect"]["target"], b_standby.as_str(), "the standby does not re-protect in turn: {s2}");
    let _ = writer.kill();
    let _ = writer.wait();
    let _ = reader.join();
    let n = acked(&lines);
    let check = python_in(&ns, KV_CLIENT, &[&ns.guest_ip, "get", &n.to_string()], Duration::from_secs(120));
    assert!(check.lines().any(|l| l == "bad 0"), "acknowledged writes lost across two failovers:\n{check}");
    eprintln!(
        "all {n} acknowledged writes readable after two failovers ({at_first} at the first, {at_second} at the second)"
    );
}

/// A standby the group does not know, or this process itself, is refused before anything
/// starts, naming the problem.
#[test]
fn bad_standbys_are_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = make_certs(tmp.path(), &["primary", "backup"], "witness");
    let base = |standby: &str| {
        let mut a = vec![
            "backup",
            "--listen",
            "127.0.0.1:7400",
            "--certs",
            certs.to_str().unwrap(),
            "--memory",
            "64M",
            "--arbiter-id",
            "2",
            "--arbiter-listen",
            "127.0.0.1:7502",
            "--arbiter-peer",
            "1=primary@127.0.0.1:7501",
            "--arbiter-peer",
            "3=witness@127.0.0.1:7503",
            "--arbiter-data",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        a.push(tmp.path().join("raft2").to_string_lossy().into_owned());
        a.extend(["--reprotect-to".to_string(), standby.to_string()]);
        a
    };
    for (standby, want) in [
        ("1=primry@127.0.0.1:7400", "unknown standby name \"primry\": node 1 is \"primary\" in --arbiter-peer"),
        ("1=primary@127.0.0.1:7400", "127.0.0.1:7400 is this process's own --listen address"),
        ("5=primary@127.0.0.2:7400", "node 5 is not in --arbiter-peer"),
        ("primary@127.0.0.2:7400", "ID=NAME@HOST:PORT"),
    ] {
        let args = base(standby);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out, err) = run(&args);
        assert!(!ok, "started with --reprotect-to {standby}: {out}");
        assert!(err.contains(want), "--reprotect-to {standby}: {err}");
    }
    assert!(!tmp.path().join("raft2").exists(), "the raft state was opened before the check");
}
