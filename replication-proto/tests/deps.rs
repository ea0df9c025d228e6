//! Sans-IO stays sans-IO: this crate must never depend, directly or transitively, on an async
//! runtime or a network stack. Two checks: the resolved graph from `cargo tree`, and the closure
//! over the workspace's Cargo.lock (which needs no cargo run).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;

const FORBIDDEN: &[&str] =
    &["tokio", "quinn", "quinn-proto", "quinn-udp", "mio", "async-std", "smol", "socket2", "rustls"];

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn cargo_tree_has_no_io_runtime() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let run = |offline: bool| {
        let mut c = Command::new(&cargo);
        c.current_dir(manifest_dir()).args([
            "tree",
            "-p",
            "replication-proto",
            "--edges",
            "normal,build,dev",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ]);
        if offline {
            c.arg("--offline");
        }
        c.output().expect("cargo runs")
    };
    let mut out = run(true);
    if !out.status.success() {
        out = run(false);
    }
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8(out.stdout).expect("utf-8");
    let names: BTreeSet<&str> = tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(names.contains("lz4_flex"), "the tree was read: {names:?}");
    for bad in FORBIDDEN {
        assert!(
            !names.contains(bad),
            "replication-proto depends on {bad}: it must stay sans-IO (no runtime, no sockets)"
        );
    }
}

#[test]
fn lockfile_closure_has_no_io_runtime() {
    let lock_path = manifest_dir().join("../Cargo.lock");
    let lock = std::fs::read_to_string(&lock_path).expect("workspace Cargo.lock");
    // name -> dependency names, from the [[package]] tables.
    let mut deps: HashMap<String, Vec<String>> = HashMap::new();
    for block in lock.split("[[package]]").skip(1) {
        let mut name = None;
        let mut list = Vec::new();
        let mut in_deps = false;
        for line in block.lines() {
            let line = line.trim();
            if let Some(v) = line.strip_prefix("name = ") {
                name = Some(v.trim_matches('"').to_string());
            } else if line.starts_with("dependencies = [") {
                in_deps = true;
            } else if in_deps && line.starts_with(']') {
                in_deps = false;
            } else if in_deps {
                let dep = line.trim_matches(|c| c == '"' || c == ',');
                list.push(dep.split_whitespace().next().unwrap_or("").to_string());
            }
        }
        if let Some(n) = name {
            deps.entry(n).or_default().extend(list);
        }
    }
    let mut seen = BTreeSet::new();
    let mut todo = vec!["replication-proto".to_string()];
    while let Some(n) = todo.pop() {
        if seen.insert(n.clone()) {
            todo.extend(deps.get(&n).cloned().unwrap_or_default());
        }
    }
    assert!(seen.contains("lz4_flex"), "the lockfile was read: {seen:?}");
    for bad in FORBIDDEN {
        assert!(!seen.contains(*bad), "replication-proto pulls in {bad} (Cargo.lock): it must stay sans-IO");
    }
}

#[test]
fn manifest_names_no_io_runtime() {
    let manifest = std::fs::read_to_string(manifest_dir().join("Cargo.toml")).expect("manifest");
    for line in manifest.lines().filter(|l| !l.trim_start().starts_with('#')) {
        for bad in FORBIDDEN {
            assert!(
                !line.split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '_')).any(|w| w == *bad),
                "Cargo.toml mentions {bad}: {line}"
            );
        }
    }
}
