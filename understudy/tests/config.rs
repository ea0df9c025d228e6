//! `--config FILE.toml` through the binary (issue 17): the primary's example boots the fixture
//! guest, flags override the file, and a bad file is refused naming the file, key and line
//! before anything starts.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// The example config file `name` (docs/examples/).
fn example(name: &str) -> String {
    std::fs::read_to_string(root().join("docs/examples").join(name)).expect("read example")
}

/// `text` with the line setting `key` replaced by `key = value` (panics if there is none).
fn set(text: &str, key: &str, value: &Path) -> String {
    let prefix = format!("{key} = ");
    assert!(text.lines().any(|l| l.starts_with(&prefix)), "no {key} in the example");
    let line =
        |l: &str| if l.starts_with(&prefix) { format!("{prefix}{:?}", value.to_str().unwrap()) } else { l.into() };
    text.lines().map(line).collect::<Vec<_>>().join("\n") + "\n"
}

/// Fails (does not skip) when /dev/kvm cannot be used.
fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("/dev/kvm is not usable ({e}): this test boots a VM and needs KVM");
    }
}

/// Writes docs/examples/primary.toml into `dir` with its kernel the fixture guest and its
/// console and socket in `dir`; returns (config, serial, api).
fn primary_config(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (serial, api) = (dir.join("serial.log"), dir.join("vm.sock"));
    let text = set(&example("primary.toml"), "kernel", &guest_image());
    let text = set(&set(&text, "serial", &serial), "api", &api);
    let config = dir.join("primary.toml");
    std::fs::write(&config, text).unwrap();
    (config, serial, api)
}

/// Boots `understudy run --config <config> extra...` in a network namespace with `tap0` (the
/// example's), waits for the guest, returns its status; None when no namespace can be made.
fn boot(test: &str, dir: &Path, config: &Path, serial: &Path, api: &Path, extra: &[&str]) -> Option<serde_json::Value> {
    let mut args = vec!["run", "--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    let ns = NetNs::new(test, "cf", 87)?;
    let mut vm = Proc::spawn_in(&ns, dir, "run", &args);
    wait_for(serial, Duration::from_secs(20), &mut vm, "ready", |t| t.lines().any(|l| l.trim() == "ready"));
    wait_for(api, Duration::from_secs(10), &mut vm, "api socket", |_| api.exists());
    let status = Pair::status(api);
    let (ok, _, err) = run(&["ctl", "--api", api.to_str().unwrap(), "shutdown"]);
    assert!(ok, "shutdown failed: {err}");
    assert!(vm.wait_exit(Duration::from_secs(10)).is_some(), "vm did not exit");
    Some(status)
}

/// The primary's example (with the fixture guest as its kernel) boots, with its memory and
/// command line.
#[test]
fn the_primary_example_boots() {
    let _g = serial_guard();
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (config, serial, api) = primary_config(dir.path());
    let Some(s) = boot("the_primary_example_boots", dir.path(), &config, &serial, &api, &[]) else { return };
    assert_eq!(s["memory_bytes"], 256u64 << 20, "{s}");
    // The VMM appends the virtio-mmio device of `tap`.
    let cmdline = s["cmdline"].as_str().unwrap_or_default();
    assert!(cmdline.starts_with("workload=kv ip=10.0.0.2/24 virtio_mmio.device="), "{s}");
    assert_eq!(s["origin"]["kernel"], guest_image().to_str().unwrap(), "{s}");
}

/// Flags given on the command line win over the file's keys.
#[test]
fn flags_override_the_config_file() {
    let _g = serial_guard();
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let (config, serial, api) = primary_config(dir.path());
    let extra = ["--memory", "64M", "--cmdline=workload=counter period_ms=10"];
    let Some(s) = boot("flags_override_the_config_file", dir.path(), &config, &serial, &api, &extra) else { return };
    assert_eq!(s["memory_bytes"], 64u64 << 20, "{s}");
    assert!(s["cmdline"].as_str().unwrap_or_default().starts_with("workload=counter period_ms=10 "), "{s}");
}

/// `understudy run --config <file>`: refused with exit status 2 and stderr containing `want`.
fn refused(file: &Path, want: &str) {
    let out = std::process::Command::new(bin())
        .args(["run", "--config", file.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "not refused: {err}");
    assert!(err.contains(want), "stderr does not say {want:?}:\n{err}");
}

#[test]
fn a_bad_config_file_is_refused_naming_file_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = example("primary.toml");
    let lines = base.lines().count();
    let write = |name: &str, text: String| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    // A misspelt key, after the whole example: named with its line and the likely key.
    let f = write("typo.toml", format!("{base}memroy = \"64M\"\n"));
    let want = format!(
        "config {}, line {}: unknown key \"memroy\" for `understudy run` (did you mean \"memory\"?)",
        f.display(),
        lines + 1
    );
    refused(&f, &want);
    // A bare size under 1 MiB: the flag's own error, with its hint.
    let f = write("size.toml", base.replace("memory = \"256M\"", "memory = 256"));
    let line = base.lines().position(|l| l.starts_with("memory = ")).unwrap() + 1;
    refused(&f, &format!("config {}, line {line}: memory: invalid value '256' for '--memory <MEMORY>'", f.display()));
    refused(&f, "did you mean 256M?");
    // A value of the wrong type, and a list for a flag that takes one value.
    let f = write("type.toml", "kernel = \"/k\"\nvcpus = \"many\"\ntap = [\"a\"]\n".into());
    refused(&f, &format!("config {}, line 2: vcpus: invalid value 'many' for '--vcpus <VCPUS>'", f.display()));
    let f = write("list.toml", "kernel = \"/k\"\ntap = [\"a\", \"b\"]\n".into());
    refused(&f, &format!("config {}, line 2: tap: takes one value, not a list", f.display()));
    // Not TOML.
    let f = write("syntax.toml", "kernel = \"/k\"\n\nmemory = \"64M\n".into());
    refused(&f, &format!("config {}, line 3: ", f.display()));
    // No such file.
    let f = d.join("missing.toml");
    refused(&f, &format!("config {}: cannot read it: No such file or directory", f.display()));
}

/// A bad `UNDERSTUDY_LINK_THREADS` (the replication link's worker threads) is refused by name
/// before anything boots: no VM, nothing on its console.
#[test]
fn a_bad_link_thread_count_is_refused_before_anything_boots() {
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.log");
    for bad in ["0", "two", "65"] {
        let out = std::process::Command::new(bin())
            .args(["run", "--kernel", guest_image().to_str().unwrap(), "--memory", "64M"])
            .args(["--cmdline", "workload=counter", "--serial", serial.to_str().unwrap()])
            .env("UNDERSTUDY_LINK_THREADS", bad)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "not refused: {err}");
        let want = format!("UNDERSTUDY_LINK_THREADS={bad:?}: expected a number of threads from 1 to 64");
        assert!(err.contains(&want), "stderr does not say {want:?}:\n{err}");
        assert!(!err.contains("vm booted") && !serial.exists(), "a VM booted:\n{err}");
    }
}
