//! Helpers for tests that run real VMs through the `understudy` binary.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// VM tests share two cores: run them one at a time.
static VM_LOCK: Mutex<()> = Mutex::new(());

/// Takes the VM test lock.
pub fn serial_guard() -> MutexGuard<'static, ()> {
    VM_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether /dev/kvm is usable; prints a loud SKIP line when it is not.
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            eprintln!("\n*** SKIP: {test}: /dev/kvm is not usable ({e}); this test needs KVM ***\n");
            false
        }
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
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

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
    pub stderr_path: PathBuf,
}

impl Proc {
    /// Spawns `understudy args...`, stderr to `<dir>/<name>.stderr`.
    pub fn spawn(dir: &Path, name: &str, args: &[&str]) -> Self {
        let stderr_path = dir.join(format!("{name}.stderr"));
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let child = Command::new(bin())
            .args(args)
            .env("UNDERSTUDY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn understudy");
        Self { child, name: name.into(), stderr_path }
    }

    /// Its stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Panics with its stderr if it has exited.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited early ({status}):\n{}", self.name, self.stderr());
        }
    }

    /// Waits for exit up to `timeout`; returns the status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `understudy args...` to completion; returns (success, stdout, stderr).
pub fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin()).args(args).stdin(Stdio::null()).output().expect("run understudy");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Reads a file as text (empty if missing).
pub fn read_text(p: &Path) -> String {
    let mut s = Vec::new();
    if let Ok(mut f) = std::fs::File::open(p) {
        let _ = f.read_to_end(&mut s);
    }
    String::from_utf8_lossy(&s).into_owned()
}

/// Polls `p` until `pred(text)` holds; panics with the text and `proc`'s stderr on timeout.
pub fn wait_for(p: &Path, timeout: Duration, proc: &mut Proc, what: &str, pred: impl Fn(&str) -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        let text = read_text(p);
        if pred(&text) {
            return t0.elapsed();
        }
        proc.assert_alive();
        if t0.elapsed() > timeout {
            panic!(
                "timed out after {timeout:?} waiting for {what} in {}:\n{text}\n--- {} stderr:\n{}",
                p.display(),
                proc.name,
                proc.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The `seq=<n> sum=<hex>` lines of counter output, in order.
pub fn counter_lines(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l.strip_prefix("seq=")?;
            let (n, s) = rest.split_once(" sum=")?;
            Some((n.parse().ok()?, u64::from_str_radix(s.trim(), 16).ok()?))
        })
        .collect()
}

/// The last sequence number printed.
pub fn last_seq(text: &str) -> u64 {
    counter_lines(text).last().map(|l| l.0).unwrap_or(0)
}

/// Parses `understudy`'s JSON output.
pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not json ({e}): {s}"))
}

/// A network namespace with a TAP device for the guest, deleted on drop. The host side of the
/// TAP gets `host_ip`; the guest is told `guest_ip` on its command line.
pub struct NetNs {
    pub name: String,
    pub tap: String,
    pub host_ip: String,
    pub guest_ip: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl NetNs {
    /// Creates namespace `us-<tag>-<pid>` holding `tap0` at 10.<subnet>.0.1/24; None (with a
    /// loud SKIP line) when namespaces or TAP devices cannot be made here.
    pub fn new(test: &str, tag: &str, subnet: u8) -> Option<Self> {
        let name = format!("us-{tag}-{}", std::process::id());
        let tap = "tap0".to_string();
        let host_ip = format!("10.{subnet}.0.1");
        let guest_ip = format!("10.{subnet}.0.2");
        let _ = ip(&["netns", "del", &name]);
        let setup = || -> Result<(), String> {
            ip(&["netns", "add", &name])?;
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
            ip(&["-n", &name, "tuntap", "add", "dev", &tap, "mode", "tap"])?;
            ip(&["-n", &name, "addr", "add", &format!("{host_ip}/24"), "dev", &tap])?;
            ip(&["-n", &name, "link", "set", &tap, "up"])?;
            Ok(())
        };
        match setup() {
            Ok(()) => Some(Self { name, tap, host_ip, guest_ip }),
            Err(e) => {
                let _ = ip(&["netns", "del", &name]);
                eprintln!(
                    "\n*** SKIP: {test}: cannot create a network namespace with a TAP device ({e}); needs root ***\n"
                );
                None
            }
        }
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

impl Proc {
    /// Spawns `understudy args...` inside a network namespace.
    pub fn spawn_in(ns: &NetNs, dir: &Path, name: &str, args: &[&str]) -> Self {
        let stderr_path = dir.join(format!("{name}.stderr"));
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let child = ns
            .command(bin().to_str().expect("utf-8 path"))
            .args(args)
            .env("UNDERSTUDY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn understudy");
        Self { child, name: name.into(), stderr_path }
    }
}
