//! The fixture guest under QEMU microvm: the peer VMM the tests compare against.
//!
//! The guest's COM1 goes to QEMU's stdout, read line by line on a thread (which notes the
//! wall-clock time each line arrived, [`QemuGuest::drain_stamped`]). Every wait is
//! bounded, and the QEMU process is killed when the [`QemuGuest`] is dropped, on every path.

use crate::env::{QEMU, guest_image};
use crate::harness::netns::command_in;
use crate::harness::proc::die_with_parent;
use crate::harness::wait::unix_seconds;
use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How to start QEMU.
#[derive(Clone, Debug)]
pub struct QemuOptions {
    /// The guest's kernel command line.
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// With a virtio-net device on QEMU user networking, forwarding 127.0.0.1:`port` to the
    /// guest's port 11211. The guest must use `ip=10.0.2.15/24 gw=10.0.2.2` then.
    pub hostfwd_port: Option<u16>,
    /// The image (default: [`guest_image`]).
    pub image: Option<PathBuf>,
    /// A QMP server on this unix socket (`-qmp unix:PATH,server=on,wait=off`).
    pub qmp: Option<PathBuf>,
    /// `-incoming` (e.g. `defer`): a migration destination.
    pub incoming: Option<String>,
    /// A virtio-net device on an existing TAP device (in `netns` when given).
    pub tap: Option<TapNic>,
    /// Run QEMU inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
}

/// A virtio-net device backed by a TAP device.
#[derive(Clone, Debug)]
pub struct TapNic {
    /// The TAP device's name (it must exist).
    pub ifname: String,
    /// The guest's MAC address (the same on both sides of a migration).
    pub mac: String,
}

impl QemuOptions {
    /// 256 MiB, no network.
    pub fn new(cmdline: &str) -> Self {
        QemuOptions {
            cmdline: cmdline.into(),
            mem_mib: 256,
            hostfwd_port: None,
            image: None,
            qmp: None,
            incoming: None,
            tap: None,
            netns: None,
        }
    }

    /// The QEMU argument list.
    pub fn args(&self, image: &std::path::Path) -> Vec<String> {
        let mut a: Vec<String> = [
            "-M",
            "microvm,acpi=off",
            "-accel",
            "kvm",
            "-cpu",
            "host,-arch-capabilities",
            "-smp",
            "1",
            "-nographic",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-global",
            "virtio-mmio.force-legacy=false",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(["-m".into(), self.mem_mib.to_string()]);
        a.extend(["-kernel".into(), image.display().to_string()]);
        a.extend(["-append".into(), self.cmdline.clone()]);
        if let Some(port) = self.hostfwd_port {
            a.extend([
                "-netdev".into(),
                format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:11211"),
                "-device".into(),
                "virtio-net-device,netdev=n0".into(),
            ]);
        }
        if let Some(tap) = &self.tap {
            a.extend([
                "-netdev".into(),
                format!("tap,id=n0,ifname={},script=no,downscript=no", tap.ifname),
                "-device".into(),
                format!("virtio-net-device,netdev=n0,mac={}", tap.mac),
            ]);
        }
        if let Some(qmp) = &self.qmp {
            a.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", qmp.display())]);
        }
        if let Some(incoming) = &self.incoming {
            a.extend(["-incoming".into(), incoming.clone()]);
        }
        a
    }
}

/// A running QEMU with the fixture guest. Killed on drop.
pub struct QemuGuest {
    child: Child,
    /// Each line with the time (Unix seconds) the reader thread read it.
    lines: Receiver<(f64, String)>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
    started: Instant,
}

impl QemuGuest {
    /// Starts QEMU.
    pub fn spawn(opts: &QemuOptions) -> Result<Self> {
        let image = match &opts.image {
            Some(p) => p.clone(),
            None => guest_image()?,
        };
        let started = Instant::now();
        // The kernel kills QEMU when the thread that started it dies (a killed harness).
        let mut cmd = command_in(opts.netns.as_deref(), QEMU);
        let mut child = die_with_parent(&mut cmd)
            .args(opts.args(&image))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {QEMU}"))?;
        let stdout = child.stdout.take().context("qemu stdout")?;
        let mut stderr_pipe = child.stderr.take().context("qemu stderr")?;
        let (tx, rx) = channel();
        thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']).to_string();
                        if tx.send((unix_seconds(), line)).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let err_sink = Arc::clone(&stderr);
        thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr_pipe.read_to_string(&mut s);
            if let Ok(mut e) = err_sink.lock() {
                e.push_str(&s);
            }
        });
        Ok(QemuGuest { child, lines: rx, seen: Vec::new(), stderr, started })
    }

    /// Time since QEMU was started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Every line read so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether QEMU is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The lines that arrived since the last read, without waiting.
    pub fn drain_lines(&mut self) -> Vec<String> {
        self.drain_stamped().into_iter().map(|(_, l)| l).collect()
    }

    /// [`Self::drain_lines`], each line with the wall-clock time (Unix seconds) it arrived.
    pub fn drain_stamped(&mut self) -> Vec<(f64, String)> {
        let new: Vec<(f64, String)> = self.lines.try_iter().collect();
        self.seen.extend(new.iter().map(|(_, l)| l.clone()));
        new
    }

    /// QEMU's stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// The next line, within `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> Result<String> {
        match self.lines.recv_timeout(timeout) {
            Ok((_, l)) => {
                self.seen.push(l.clone());
                Ok(l)
            }
            Err(RecvTimeoutError::Timeout) => bail!("no guest output for {timeout:?}; {}", self.context()),
            Err(RecvTimeoutError::Disconnected) => bail!("QEMU exited; {}", self.context()),
        }
    }

    /// Reads lines until one satisfies `pred` (returned), within `timeout` overall. Fails
    /// early on a `guest panic` or `guest exception` line.
    pub fn wait_for_line(&mut self, mut pred: impl FnMut(&str) -> bool, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("timed out after {timeout:?}; {}", self.context());
            }
            let line = self.next_line(left)?;
            if pred(&line) {
                return Ok(line);
            }
            if line.starts_with("guest panic") || line.starts_with("guest exception") {
                bail!("guest failed: {line}");
            }
        }
    }

    /// Waits for `ready`; returns the time since QEMU started.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Duration> {
        self.wait_for_line(|l| l == "ready", timeout)?;
        Ok(self.uptime())
    }

    fn context(&self) -> String {
        let tail: Vec<&str> = self.seen.iter().rev().take(5).rev().map(String::as_str).collect();
        let err = self.stderr.lock().map(|e| e.clone()).unwrap_or_default();
        format!("last guest lines: {tail:?}; qemu stderr: {:?}", err.trim())
    }

    /// Stops QEMU now (also done on drop).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        self.kill();
    }
}
