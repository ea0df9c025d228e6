//! W3's network and client: a namespace holding a bridge (the client's side, 10.79.0.1) with two
//! TAP devices on it, one for the source VM and one for the destination, so the guest is
//! reachable at 10.79.0.2 wherever it runs once the destination announces its MAC; and the
//! checker client `testbed/scripts/faults_client.py` (one TCP connection, unique acknowledged
//! writes, the longest wait for one reply, every acknowledged write read back at the end).

use crate::faults::check_interrupted;
use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The guest's address (on its command line: `ip=10.79.0.2/24`).
pub const GUEST_IP: &str = "10.79.0.2";
/// The bridge's address: where the client talks from.
pub const HOST_IP: &str = "10.79.0.1";
/// The source's TAP device.
pub const SOURCE_TAP: &str = "tap-s";
/// The destination's TAP device.
pub const DEST_TAP: &str = "tap-d";
/// The guest's MAC address under QEMU (the same on both sides).
pub const GUEST_MAC: &str = "52:54:00:12:34:56";
/// The prefix of the namespaces this harness makes (`usm<pid>-<n>`).
pub const NS_PREFIX: &str = "usm";

static NS_COUNTER: AtomicU32 = AtomicU32::new(0);

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).stdin(Stdio::null()).output().context(args[0].to_string())?;
    ensure!(out.status.success(), "{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

/// Deletes namespaces left by harness processes that no longer exist (a SIGKILLed harness).
pub fn clean_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(NS_PREFIX) else { continue };
        let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sh(&["ip", "netns", "del", name]);
        }
    }
}

/// The namespace of one W3 run; deleted on drop.
#[derive(Debug)]
pub struct KvNet {
    pub ns: String,
}

impl KvNet {
    /// Creates `usm<pid>-<n>`: loopback up, bridge `br0` at [`HOST_IP`]/24 with
    /// [`SOURCE_TAP`] and [`DEST_TAP`] on it. The client's route to the guest gets
    /// `rto_min 10ms`, as in `testbed faults`: the client's TCP retransmits 10 ms after a loss
    /// rather than Linux's 200 ms minimum, so the outage measured is the migration's, for
    /// every configuration alike.
    pub fn create() -> Result<Self> {
        let ns = format!("{NS_PREFIX}{}-{}", std::process::id(), NS_COUNTER.fetch_add(1, Ordering::SeqCst));
        let _ = sh(&["ip", "netns", "del", &ns]);
        sh(&["ip", "netns", "add", &ns])?;
        let net = KvNet { ns };
        let n = net.ns.as_str();
        sh(&["ip", "-n", n, "link", "set", "lo", "up"])?;
        sh(&["ip", "-n", n, "link", "add", "br0", "type", "bridge", "forward_delay", "0"])?;
        for tap in [SOURCE_TAP, DEST_TAP] {
            sh(&["ip", "-n", n, "tuntap", "add", "dev", tap, "mode", "tap"])?;
            sh(&["ip", "-n", n, "link", "set", tap, "master", "br0", "up"])?;
        }
        sh(&["ip", "-n", n, "addr", "add", &format!("{HOST_IP}/24"), "dev", "br0"])?;
        sh(&["ip", "-n", n, "link", "set", "br0", "up"])?;
        sh(&[
            "ip",
            "-n",
            n,
            "route",
            "replace",
            "10.79.0.0/24",
            "dev",
            "br0",
            "proto",
            "kernel",
            "scope",
            "link",
            "src",
            HOST_IP,
            "rto_min",
            "10ms",
        ])?;
        Ok(net)
    }

    /// A command running `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }
}

impl Drop for KvNet {
    fn drop(&mut self) {
        if let Err(e) = sh(&["ip", "netns", "del", &self.ns]) {
            eprintln!("migrate-bench: could not delete namespace {}: {e}", self.ns);
        }
    }
}

/// What the client reports at the end (its final JSON line).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClientVerdict {
    pub acknowledged_writes: u64,
    pub lost: u64,
    pub contradictions: u64,
    pub errors: u64,
    pub reconnects: u64,
    pub ops: u64,
    /// The longest wait for one reply, ms, over the whole run.
    pub max_gap_ms: f64,
    /// The longest wait for a reply that overlapped the migration window: the client-visible
    /// outage (None without a window, or when no wait overlapped it).
    pub window_max_gap_ms: Option<f64>,
    /// The longest wait that did not overlap the window: the noise floor.
    pub outside_max_gap_ms: Option<f64>,
    pub notes: Vec<String>,
}

impl ClientVerdict {
    /// From the client's stdout (the last line that is a JSON object).
    pub fn parse(stdout: &str) -> Result<Self> {
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .with_context(|| format!("the client printed no verdict: {stdout:?}"))?;
        let v: Value = serde_json::from_str(line).with_context(|| format!("client verdict {line:?}"))?;
        let u = |k: &str| v[k].as_u64().with_context(|| format!("client verdict without {k}: {line}"));
        Ok(ClientVerdict {
            acknowledged_writes: u("acknowledged_writes")?,
            lost: u("lost")?,
            contradictions: u("contradictions")?,
            errors: u("errors")?,
            reconnects: u("reconnects")?,
            ops: u("ops")?,
            max_gap_ms: v["max_gap_ms"]
                .as_f64()
                .with_context(|| format!("client verdict without max_gap_ms: {line}"))?,
            window_max_gap_ms: v["window_max_gap_ms"].as_f64(),
            outside_max_gap_ms: v["outside_max_gap_ms"].as_f64(),
            notes: v["notes"]
                .as_array()
                .map(|a| a.iter().filter_map(|n| n.as_str().map(str::to_string)).collect())
                .unwrap_or_default(),
        })
    }
}

/// The checker client, running in the namespace. Killed on drop.
pub struct KvClient {
    child: Child,
    ctl: PathBuf,
    log: PathBuf,
}

impl KvClient {
    /// Starts `script` against [`GUEST_IP`]; it stops by itself after `max_secs`.
    pub fn start(net: &KvNet, script: &Path, dir: &Path, max_secs: u64) -> Result<Self> {
        let ctl = dir.join("client-ctl");
        std::fs::create_dir_all(&ctl)?;
        let log = dir.join("client.log");
        let mut cmd = net.command("/usr/bin/python3");
        cmd.arg(script).arg(GUEST_IP).arg(&ctl).arg(max_secs.to_string());
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("start the kv client")?;
        Ok(KvClient { child, ctl, log })
    }

    /// Waits for the client's first reply (it creates `ready`).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.ctl.join("ready").exists() {
            check_interrupted()?;
            if let Ok(Some(s)) = self.child.try_wait() {
                bail!("the kv client exited ({s}) before its first reply: {}", self.log_text());
            }
            ensure!(Instant::now() < deadline, "the kv client got no reply in {timeout:?}: {}", self.log_text());
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default().trim().to_string()
    }

    /// Tells the client to stop, waits for its verdict (it reads every acknowledged write back).
    /// With `window` (wall-clock seconds since the Unix epoch, start and end of the migration)
    /// the verdict splits the longest wait into the one that overlapped it and the rest.
    pub fn stop(mut self, window: Option<(f64, f64)>, timeout: Duration) -> Result<ClientVerdict> {
        if let Some((start, end)) = window {
            std::fs::write(self.ctl.join("window"), format!("{start:.6} {end:.6}"))?;
        }
        std::fs::write(self.ctl.join("stop"), b"")?;
        let mut out = self.child.stdout.take().context("client stdout")?;
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("the kv client gave no verdict within {timeout:?}: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let stdout = reader.join().unwrap_or_default();
        ClientVerdict::parse(&stdout).with_context(|| self.log_text())
    }
}

impl Drop for KvClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_verdict_parses_the_last_json_line() {
        let out = "some noise\n{\"acknowledged_writes\": 812, \"lost\": 0, \"contradictions\": 0, \"errors\": 0, \
                   \"reconnects\": 0, \"ops\": 1624, \"counter\": 812, \"first_reply_after_fault_ms\": null, \
                   \"max_gap_ms\": 41.5, \"thin_linear_timeouts\": true, \"window_max_gap_ms\": 41.5, \
                   \"outside_max_gap_ms\": null, \"notes\": [\"a\"]}\n";
        let v = ClientVerdict::parse(out).unwrap();
        assert_eq!(
            v,
            ClientVerdict {
                acknowledged_writes: 812,
                lost: 0,
                contradictions: 0,
                errors: 0,
                reconnects: 0,
                ops: 1624,
                max_gap_ms: 41.5,
                window_max_gap_ms: Some(41.5),
                outside_max_gap_ms: None,
                notes: vec!["a".into()]
            }
        );
        assert!(ClientVerdict::parse("Traceback ...\n").unwrap_err().to_string().contains("no verdict"));
        assert!(ClientVerdict::parse("{\"lost\": 1}").unwrap_err().to_string().contains("acknowledged_writes"));
    }
}
