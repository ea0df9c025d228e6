//! W3's network and client: a namespace holding a bridge (the client's side, 10.79.0.1) with two
//! TAP devices on it, one for the source VM and one for the destination, so the guest is
//! reachable at 10.79.0.2 wherever it runs once the destination announces its MAC; and the
//! checker client `testbed/scripts/faults_client.py` (one TCP connection, unique acknowledged
//! writes, the longest wait for one reply, every acknowledged write read back at the end).

use crate::harness::interrupt::check_interrupted;
use crate::harness::netns::{self, NetNs};
use crate::harness::proc::{Proc, die_with_parent};
use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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

/// Deletes namespaces left by harness processes that no longer exist (a SIGKILLed harness).
pub fn clean_stale_namespaces() {
    netns::clean_stale(NS_PREFIX);
}

/// The namespace of one W3 run; deleted on drop.
#[derive(Debug)]
pub struct KvNet {
    pub net: NetNs,
}

impl KvNet {
    /// Creates `usm<pid>-<n>`: loopback up, bridge `br0` at [`HOST_IP`]/24 with
    /// [`SOURCE_TAP`] and [`DEST_TAP`] on it. The client's route to the guest gets
    /// `rto_min 10ms`, as in `testbed faults`: the client's TCP retransmits 10 ms after a loss
    /// rather than Linux's 200 ms minimum, so the outage measured is the migration's, for
    /// every configuration alike.
    pub fn create() -> Result<Self> {
        let net =
            NetNs::create(&format!("{NS_PREFIX}{}-{}", std::process::id(), NS_COUNTER.fetch_add(1, Ordering::SeqCst)))?;
        for tap in [SOURCE_TAP, DEST_TAP] {
            net.add_tap(tap, None)?;
        }
        net.add_bridge("br0", Some(&format!("{HOST_IP}/24")), &[SOURCE_TAP, DEST_TAP])?;
        net.ip(&[
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
        Ok(KvNet { net })
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        self.net.name()
    }

    /// A command running `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.net.command(program)
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

/// The client's control directory in a run's directory.
pub fn ctl_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("client-ctl")
}

/// Where the client writes the wall-clock time of each reply around the migration window.
pub fn completions_file(run_dir: &Path) -> PathBuf {
    ctl_dir(run_dir).join("completions")
}

/// The checker client, running in the namespace. Killed on drop.
pub struct KvClient {
    proc: Proc,
    ctl: PathBuf,
}

impl KvClient {
    /// Starts `script` against [`GUEST_IP`]; it stops by itself after `max_secs`.
    pub fn start(net: &KvNet, script: &Path, dir: &Path, max_secs: u64) -> Result<Self> {
        let ctl = ctl_dir(dir);
        std::fs::create_dir_all(&ctl)?;
        let log = dir.join("client.log");
        let mut cmd = net.command("/usr/bin/python3");
        cmd.arg(script).arg(GUEST_IP).arg(&ctl).arg(max_secs.to_string());
        let proc = Proc::start(die_with_parent(&mut cmd).stdout(Stdio::piped()), "the kv client", log)?;
        Ok(KvClient { proc, ctl })
    }

    /// Waits for the client's first reply (it creates `ready`).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.ctl.join("ready").exists() {
            check_interrupted()?;
            if let Ok(Some(s)) = self.proc.child.try_wait() {
                bail!("the kv client exited ({s}) before its first reply: {}", self.log_text());
            }
            ensure!(Instant::now() < deadline, "the kv client got no reply in {timeout:?}: {}", self.log_text());
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn log_text(&self) -> String {
        self.proc.stderr().trim().to_string()
    }

    /// Tells the client to stop, waits for its verdict (it reads every acknowledged write back).
    /// With `window` (wall-clock seconds since the Unix epoch, start and end of the migration)
    /// the verdict splits the longest wait into the one that overlapped it and the rest.
    pub fn stop(mut self, window: Option<(f64, f64)>, timeout: Duration) -> Result<ClientVerdict> {
        if let Some((start, end)) = window {
            std::fs::write(self.ctl.join("window"), format!("{start:.6} {end:.6}"))?;
        }
        std::fs::write(self.ctl.join("stop"), b"")?;
        let mut out = self.proc.child.stdout.take().context("client stdout")?;
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(_)) = self.proc.child.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                self.proc.kill();
                bail!("the kv client gave no verdict within {timeout:?}: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let stdout = reader.join().unwrap_or_default();
        ClientVerdict::parse(&stdout).with_context(|| self.log_text())
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
