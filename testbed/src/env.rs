//! What the machine offers: KVM, QEMU, the guest image, the memcached clients.

use anyhow::{Context, Result, bail};
use std::io::Write;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The QEMU binary the tests use.
pub const QEMU: &str = "qemu-system-x86_64";

/// Why QEMU tests cannot run here (no `/dev/kvm`, no QEMU), or `None` when they can.
pub fn qemu_skip_reason() -> Option<String> {
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm is missing".into());
    }
    if find_in_path(QEMU).is_none() {
        return Some(format!("{QEMU} is not installed (make deps)"));
    }
    None
}

/// Prints a loud SKIP line and returns true when QEMU tests cannot run.
pub fn skip_without_qemu(test: &str) -> bool {
    match qemu_skip_reason() {
        Some(why) => {
            // Straight to stderr: the test harness captures print!/eprint! of passing tests.
            let _ = writeln!(std::io::stderr(), "SKIP: {test}: {why}");
            true
        }
        None => false,
    }
}

/// `name` found on `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|f| f.is_file()))
        .unwrap_or(None)
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("testbed lives in the workspace").to_path_buf()
}

/// The guest image `make guest` builds; an error telling to run it when it is missing.
pub fn guest_image() -> Result<PathBuf> {
    let p = workspace_root().join("target/guest/understudy-guest");
    if !p.is_file() {
        bail!("guest image {} is missing: run `make guest` first", p.display());
    }
    Ok(p)
}

/// A python3 that can `import pymemcache` (Debian's python3-pymemcache lives in
/// /usr/bin/python3's path, which another python3 first on PATH may not see).
pub fn python_with_pymemcache() -> Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = find_in_path("python3").into_iter().collect();
    candidates.push("/usr/bin/python3".into());
    for py in candidates {
        let ok = Command::new(&py)
            .args(["-c", "import pymemcache"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(py);
        }
    }
    bail!("no python3 with pymemcache: run `make deps` (python3-pymemcache)")
}

/// libmemcached's load generator (`memcslap`, or `memaslap` on older releases).
pub fn memcslap() -> Result<PathBuf> {
    find_in_path("memcslap")
        .or_else(|| find_in_path("memaslap"))
        .context("neither memcslap nor memaslap found: run `make deps` (libmemcached-tools)")
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_local_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A UDP port on 127.0.0.1 that was free a moment ago (QUIC listeners).
pub fn free_local_udp_port() -> Result<u16> {
    let s = UdpSocket::bind("127.0.0.1:0").context("bind udp 127.0.0.1:0")?;
    Ok(s.local_addr()?.port())
}
