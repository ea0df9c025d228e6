//! Helpers for tests that run real VMs through the `understudy` binary: the understudy layer
//! (the binary, the guest image, a primary/backup pair) over `testbed::harness`, which holds
//! the general scaffolding (child guards, namespaces, waits).
// Each test binary uses its own subset of these helpers and re-exports.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use testbed::harness::proc::Proc;
pub use testbed::harness::wait::{read_text, wait_for, wait_with_timeout};
pub use testbed::harness::{kvm_available, serial_guard};
pub use testbed::lines::{counter_lines, last_seq};

/// The workspace root.
pub fn root() -> PathBuf {
    testbed::env::workspace_root()
}

/// The fixture guest image; panics (not skips) when it has not been built.
pub fn guest_image() -> PathBuf {
    let p = std::env::var_os("UNDERSTUDY_GUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/guest/understudy-guest"));
    assert!(p.exists(), "fixture guest {} is missing: run `make guest` first", p.display());
    p
}

/// The binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_understudy"))
}

/// `understudy` processes as [`Proc`]s: stderr to `<dir>/<name>.stderr`, stdout closed,
/// `UNDERSTUDY_LOG=info`.
pub trait SpawnUnderstudy: Sized {
    /// Spawns `understudy args...`.
    fn spawn(dir: &Path, name: &str, args: &[&str]) -> Self {
        Self::spawn_env(None, dir, name, args, &[])
    }

    /// Spawns `understudy args...` inside a network namespace.
    fn spawn_in(ns: &NetNs, dir: &Path, name: &str, args: &[&str]) -> Self {
        Self::spawn_env(Some(ns), dir, name, args, &[])
    }

    /// Spawns `understudy args...` (inside `ns` when given) with extra environment variables.
    fn spawn_env(ns: Option<&NetNs>, dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Self;
}

impl SpawnUnderstudy for Proc {
    fn spawn_env(ns: Option<&NetNs>, dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = testbed::harness::netns::command_in(ns.map(|n| n.net.name()), bin());
        cmd.args(args).env("UNDERSTUDY_LOG", "info").envs(env.iter().copied()).stdout(Stdio::null());
        Proc::start(&mut cmd, name, dir.join(format!("{name}.stderr"))).expect("spawn understudy")
    }
}

/// Runs `understudy args...` to completion; returns (success, stdout, stderr).
pub fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin()).args(args).stdin(Stdio::null()).output().expect("run understudy");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// `understudy certs` into `dir/certs` for VM hosts `hosts` and witness `witness`; the
/// certificate directory.
pub fn make_certs(dir: &Path, hosts: &[&str], witness: &str) -> PathBuf {
    let certs = dir.join("certs");
    let mut args = vec!["certs", "--out", certs.to_str().expect("utf-8 path")];
    for h in hosts {
        args.extend(["--host", h]);
    }
    args.extend(["--witness", witness]);
    let (ok, _, err) = run(&args);
    assert!(ok, "certs: {err}");
    certs
}

/// The arguments of `understudy run` for the fixture guest with `cmdline` and `memory`, its
/// serial output into `serial`, its API on `api`.
pub fn vm_args(cmdline: &str, memory: &str, serial: &Path, api: &Path) -> Vec<String> {
    let kernel = guest_image();
    [
        "run",
        "--kernel",
        kernel.to_str().expect("utf-8 path"),
        "--cmdline",
        cmdline,
        "--memory",
        memory,
        "--serial",
        serial.to_str().expect("utf-8 path"),
        "--api",
        api.to_str().expect("utf-8 path"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Parses `understudy`'s JSON output.
pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not json ({e}): {s}"))
}

/// A network namespace with a TAP device for the guest, deleted on drop. The host side of the
/// TAP gets `host_ip`; the guest is told `guest_ip` on its command line.
pub struct NetNs {
    pub net: testbed::harness::netns::NetNs,
    pub tap: String,
    pub host_ip: String,
    pub guest_ip: String,
}

impl NetNs {
    /// Creates namespace `us-<tag>-<pid>` holding `tap0` at 10.<subnet>.0.1/24; None (with a
    /// loud SKIP line) when namespaces or TAP devices cannot be made here.
    pub fn new(test: &str, tag: &str, subnet: u8) -> Option<Self> {
        let host_ip = format!("10.{subnet}.0.1");
        let made = testbed::harness::netns::NetNs::create(&format!("us-{tag}-{}", std::process::id()))
            .and_then(|net| net.add_tap("tap0", Some(&format!("{host_ip}/24"))).map(|()| net));
        match made {
            Ok(net) => Some(Self { net, tap: "tap0".into(), host_ip, guest_ip: format!("10.{subnet}.0.2") }),
            Err(e) => {
                eprintln!(
                    "\n*** SKIP: {test}: cannot create a network namespace with a TAP device ({e:#}); needs root ***\n"
                );
                None
            }
        }
    }

    /// [`NetNs::new`] with a bridge `br0` (the host side, 10.<subnet>.0.1) and two TAPs on it:
    /// `tap0` for one VM, `tap1` for another, as two hosts on one LAN.
    pub fn bridged(test: &str, tag: &str, subnet: u8) -> Option<Self> {
        let ns = Self::new(test, tag, subnet)?;
        let host = format!("{}/24", ns.host_ip);
        let bridge = || -> anyhow::Result<()> {
            ns.net.ip(&["addr", "del", &host, "dev", "tap0"])?;
            ns.net.add_tap("tap1", None)?;
            ns.net.add_bridge("br0", Some(&host), &["tap0", "tap1"])
        };
        bridge().unwrap_or_else(|e| panic!("bridge tap0 and tap1 in {}: {e:#}", ns.net.name()));
        Some(ns)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        self.net.command(program)
    }
}

/// A primary/backup pair on this host: certificates, a backup process and a VM process.
pub struct Pair {
    pub dir: tempfile::TempDir,
    pub backup: Proc,
    pub primary: Proc,
    pub b_sock: PathBuf,
    pub p_sock: PathBuf,
    pub port: u16,
}

impl Pair {
    /// The kv guest protected in `ns` (made by [`NetNs::bridged`]: the primary's guest on tap0,
    /// the promoted one on tap1, the client on the bridge), the backup promoting itself, both
    /// processes armed with fault points `failpoints` (`UNDERSTUDY_FAILPOINTS`).
    pub fn kv_failover(ns: &NetNs, failpoints: &str) -> Self {
        Self::kv_failover_with(ns, failpoints, &[])
    }

    /// [`Pair::kv_failover`] with `backup_args` added to the backup's.
    pub fn kv_failover_with(ns: &NetNs, failpoints: &str, backup_args: &[&str]) -> Self {
        let cmdline = format!("workload=kv ip={}/24", ns.guest_ip);
        let mut args = vec!["--tap", "tap1", "--auto-promote"];
        args.extend_from_slice(backup_args);
        let mut pair = Self::start_env(Some(ns), &cmdline, "64M", &args, &[], &[("UNDERSTUDY_FAILPOINTS", failpoints)]);
        pair.protect(&[]);
        pair.wait_protection("protected", Duration::from_secs(20));
        pair
    }
}

/// A free UDP port on 127.0.0.1 (racy but fine for tests run one at a time).
pub fn free_udp_port() -> u16 {
    testbed::env::free_local_udp_port().expect("a free udp port")
}

impl Pair {
    /// Starts a backup and a VM running `cmdline` (both inside `ns` when given).
    pub fn start(ns: Option<&NetNs>, cmdline: &str, memory: &str, backup_args: &[&str]) -> Self {
        Self::start_with(ns, cmdline, memory, backup_args, &[])
    }

    /// As [`Pair::start`], with extra arguments for `understudy run`.
    pub fn start_with(
        ns: Option<&NetNs>,
        cmdline: &str,
        memory: &str,
        backup_args: &[&str],
        run_args: &[&str],
    ) -> Self {
        Self::start_env(ns, cmdline, memory, backup_args, run_args, &[])
    }

    /// [`Pair::start_with`], both processes with extra environment variables (fault points).
    pub fn start_env(
        ns: Option<&NetNs>,
        cmdline: &str,
        memory: &str,
        backup_args: &[&str],
        run_args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let certs = make_certs(&d, &["primary", "backup", "intruder"], "witness");
        let port = free_udp_port();
        let listen = format!("127.0.0.1:{port}");
        let b_sock = d.join("b.sock");
        let p_sock = d.join("p.sock");
        let bs = d.join("b-serial.log");
        let ps = d.join("p-serial.log");
        let mut bargs: Vec<String> = [
            "backup",
            "--listen",
            &listen,
            "--certs",
            certs.to_str().unwrap(),
            "--memory",
            memory,
            "--api",
            b_sock.to_str().unwrap(),
            "--serial",
            bs.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        bargs.extend(backup_args.iter().map(|s| s.to_string()));
        let bargs: Vec<&str> = bargs.iter().map(String::as_str).collect();
        let pargs = vm_args(cmdline, memory, &ps, &p_sock);
        let mut pargs: Vec<&str> = pargs.iter().map(String::as_str).collect();
        if ns.is_some() {
            pargs.extend(["--tap", "tap0"]);
        }
        pargs.extend_from_slice(run_args);
        let mut backup = Proc::spawn_env(ns, &d, "backup", &bargs, env);
        let mut primary = Proc::spawn_env(ns, &d, "primary", &pargs, env);
        wait_for(&ps, Duration::from_secs(10), &mut primary, "ready", |t| t.lines().any(|l| l.trim() == "ready"));
        wait_for(&b_sock, Duration::from_secs(10), &mut backup, "backup api", |_| b_sock.exists());
        wait_for(&p_sock, Duration::from_secs(30), &mut primary, "primary api", |_| p_sock.exists());
        Self { dir, backup, primary, b_sock, p_sock, port }
    }

    /// The primary's serial log path.
    pub fn p_serial(&self) -> PathBuf {
        self.dir.path().join("p-serial.log")
    }

    /// The backup's serial log path (the promoted VM writes here).
    pub fn b_serial(&self) -> PathBuf {
        self.dir.path().join("b-serial.log")
    }

    /// `understudy protect` with extra args; panics when it fails.
    pub fn protect(&self, extra: &[&str]) {
        let (ok, out, err) = self.try_protect(extra);
        assert!(ok, "protect failed: {err}{out}");
    }

    /// `understudy protect` with extra args: (success, stdout, stderr).
    pub fn try_protect(&self, extra: &[&str]) -> (bool, String, String) {
        let certs = self.dir.path().join("certs");
        let backup = format!("127.0.0.1:{}", self.port);
        let mut args = vec![
            "protect",
            "--api",
            self.p_sock.to_str().unwrap(),
            "--backup",
            &backup,
            "--certs",
            certs.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        run(&args)
    }

    /// JSON status of the primary or backup.
    pub fn status(sock: &Path) -> serde_json::Value {
        let (ok, out, err) = run(&["status", "--api", sock.to_str().unwrap(), "--json"]);
        assert!(ok, "status failed: {err}");
        json(&out)
    }

    /// Waits until the primary reports `state` (e.g. "protected"); returns how long it took.
    pub fn wait_protection(&mut self, state: &str, timeout: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            self.primary.assert_alive();
            let s = Self::status(&self.p_sock);
            if s["protection"]["state"] == state {
                return t0.elapsed();
            }
            if t0.elapsed() > timeout {
                panic!(
                    "protection never reached {state}: {s}\nprimary stderr:\n{}\nbackup stderr:\n{}",
                    self.primary.stderr(),
                    self.backup.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `ctl <action>` on a socket, parsed.
    pub fn ctl(sock: &Path, action: &str) -> serde_json::Value {
        let (ok, out, err) = run(&["ctl", "--api", sock.to_str().unwrap(), action]);
        assert!(ok, "ctl {action} failed: {err}");
        json(&out)
    }
}

/// Compares the primary's and the backup's verification journals; returns the number of
/// epochs both sampled. Panics on any mismatch.
pub fn compare_journals(p: &serde_json::Value, b: &serde_json::Value) -> usize {
    let backup: std::collections::HashMap<u64, &serde_json::Value> =
        b.as_array().expect("array").iter().map(|x| (x["epoch"].as_u64().unwrap(), x)).collect();
    let mut common = 0;
    for x in p.as_array().expect("array") {
        let e = x["epoch"].as_u64().unwrap();
        if let Some(y) = backup.get(&e) {
            assert_eq!(&x, y, "epoch {e}: primary and backup differ");
            common += 1;
        }
    }
    common
}

/// Runs a python3 script (with pymemcache available) inside `ns`; returns stdout.
pub fn python_in(ns: &NetNs, script: &str, args: &[&str], timeout: Duration) -> String {
    let mut c = ns.command("/usr/bin/python3");
    c.arg("-c").arg(script).args(args).stdin(Stdio::null());
    let child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn python3");
    let out = wait_with_timeout(child, timeout);
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sets keys one by one, prints `ok <i>` after each STORED (flushing), then reads a list back.
pub const KV_CLIENT: &str = r#"
import sys, time, json
from pymemcache.client.base import Client
host, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = Client((host, 11211), connect_timeout=5, timeout=10)
if mode == "set":
    lat = []
    for i in range(n):
        t = time.monotonic()
        assert c.set("key%d" % i, ("value-%d-" % i) * (1 + i % 50), noreply=False)
        lat.append(time.monotonic() - t)
        print("ok", i, flush=True)
    lat.sort()
    print(json.dumps({"p50_ms": lat[len(lat)//2]*1e3, "p99_ms": lat[int(len(lat)*0.99)]*1e3}), flush=True)
else:
    bad = 0
    for i in range(n):
        v = c.get("key%d" % i)
        if v is None or v.decode() != ("value-%d-" % i) * (1 + i % 50):
            bad += 1
            print("missing", i, v[:40] if v else None, flush=True)
    print("bad", bad, flush=True)
"#;

/// The arbitration flags of node `id` of a three-node group (1 = the primary's host,
/// 2 = the backup's, 3 = the witness) on 127.0.0.1 `ports`, raft data under `raft`.
pub fn agent_args(raft: &Path, certs: &Path, id: usize, ports: [u16; 3]) -> Vec<String> {
    const NAMES: [&str; 3] = ["primary", "backup", "witness"];
    let mut v = vec![
        "--arbiter-id".to_string(),
        id.to_string(),
        "--arbiter-listen".into(),
        format!("127.0.0.1:{}", ports[id - 1]),
        "--arbiter-data".into(),
        raft.join(format!("raft{id}")).to_string_lossy().into_owned(),
        "--arbiter-certs".into(),
        certs.to_string_lossy().into_owned(),
        "--arbiter-name".into(),
        NAMES[id - 1].into(),
    ];
    for peer in (1..=3).filter(|&p| p != id) {
        v.push("--arbiter-peer".into());
        v.push(format!("{peer}={}@127.0.0.1:{}", NAMES[peer - 1], ports[peer - 1]));
    }
    v
}

/// A kv writer (python, pymemcache): sets key0, key1, ... one at a time and prints `ok <i>` after
/// each STORED; on a timeout or a broken connection it reconnects and sets the same key again.
/// Runs until killed. `python3 -c WRITER <guest ip>`.
#[allow(dead_code)]
pub const WRITER: &str = r#"
import sys, time
from pymemcache.client.base import Client
host = sys.argv[1]
c = Client((host, 11211), connect_timeout=5, timeout=5)
i = 0
while True:
    try:
        assert c.set("key%d" % i, ("value-%d-" % i) * (1 + i % 50), noreply=False)
        print("ok", i, flush=True)
        i += 1
    except Exception as e:
        print("retry", i, repr(e), flush=True)
        time.sleep(0.05)
        c = Client((host, 11211), connect_timeout=5, timeout=5)
"#;
