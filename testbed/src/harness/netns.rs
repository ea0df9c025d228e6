//! Network namespaces for tests and harnesses (needs root): one namespace with its loopback up,
//! TAP devices for guests, a bridge joining several TAPs (hosts on one LAN), commands run
//! inside it; deleted on drop. Namespaces a killed harness left behind are found by their
//! prefix and pid ([`clean_stale`]).

use super::proc::sh;
use anyhow::Result;
use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates namespace `name` (deleting a stale one of that name first) with its loopback up.
    pub fn create(name: &str) -> Result<Self> {
        let _ = sh(&["ip", "netns", "del", name]);
        sh(&["ip", "netns", "add", name])?;
        let ns = NetNs { name: name.to_string() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <name> ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut v = vec!["ip", "-n", self.name.as_str()];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// Adds TAP device `tap`, with the host-side address `cidr` (`10.61.0.1/24`) when given,
    /// and sets it up.
    pub fn add_tap(&self, tap: &str, cidr: Option<&str>) -> Result<()> {
        self.ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
        if let Some(a) = cidr {
            self.ip(&["addr", "add", a, "dev", tap])?;
        }
        self.ip(&["link", "set", tap, "up"])
    }

    /// Adds bridge `bridge` (no forwarding delay) with `ports` (existing devices) on it, all up,
    /// the bridge holding the host-side address `cidr` when given.
    pub fn add_bridge(&self, bridge: &str, cidr: Option<&str>, ports: &[&str]) -> Result<()> {
        self.ip(&["link", "add", bridge, "type", "bridge", "forward_delay", "0"])?;
        for port in ports {
            self.ip(&["link", "set", port, "master", bridge, "up"])?;
        }
        if let Some(a) = cidr {
            self.ip(&["addr", "add", a, "dev", bridge])?;
        }
        self.ip(&["link", "set", bridge, "up"])
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        command_in(Some(&self.name), program)
    }
}

/// A command that runs `program` inside namespace `ns` (`ip netns exec`), or here without one.
pub fn command_in(ns: Option<&str>, program: impl AsRef<OsStr>) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = sh(&["ip", "netns", "del", &self.name]) {
            eprintln!("could not delete network namespace {}: {e}", self.name);
        }
    }
}

/// Deletes the namespaces named `<prefix><pid>...` whose process `<pid>` no longer exists
/// (left by a SIGKILLed harness).
pub fn clean_stale(prefix: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(prefix) else { continue };
        let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sh(&["ip", "netns", "del", name]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A namespace with two TAPs on a bridge answers on the bridge's address and is gone after
    /// drop; skips without root.
    #[test]
    fn bridged_namespace_is_made_and_deleted() {
        let name = format!("usharness{}", std::process::id());
        let ns = match NetNs::create(&name) {
            Ok(ns) => ns,
            Err(e) => {
                eprintln!("\n*** SKIP: bridged_namespace_is_made_and_deleted: {e:#}; needs root ***\n");
                return;
            }
        };
        ns.add_tap("tap0", None).unwrap();
        ns.add_tap("tap1", None).unwrap();
        ns.add_bridge("br0", Some("10.250.0.1/24"), &["tap0", "tap1"]).unwrap();
        let out = ns.command("ip").args(["-o", "addr", "show", "dev", "br0"]).output().unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("10.250.0.1/24"));
        let out = ns.command("ip").args(["-o", "link", "show", "master", "br0"]).output().unwrap();
        let ports = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(ports.contains("tap0") && ports.contains("tap1"), "{ports}");
        let e = ns.add_tap("tap0", None).unwrap_err().to_string();
        assert!(e.starts_with(&format!("ip -n {name} tuntap add dev tap0 mode tap: ")), "{e}");
        drop(ns);
        let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
        assert!(!String::from_utf8_lossy(&list.stdout).contains(&name), "deleted on drop");
    }
}
