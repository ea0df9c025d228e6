//! The sans-IO core must stay free of tokio (and of clocks): only `net.rs` and `net/` may use them.

use std::fs;
use std::path::Path;

#[test]
fn core_modules_do_not_use_tokio_or_read_clocks() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut checked = 0;
    let mut files = Vec::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("src dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().and_then(|e| e.to_str()) == Some("rs") {
                files.push(path);
            }
        }
    }
    for path in files {
        let name = path.strip_prefix(&src).expect("under src").display().to_string();
        // The tokio driver: `net.rs` and its submodules (`net/quic.rs`).
        if name == "net.rs" || name.starts_with("net/") {
            continue;
        }
        // The fuzz targets' harness (not the core): it takes one real instant as the base of
        // its virtual clock, as unit tests do.
        if name == "fuzzing.rs" {
            continue;
        }
        let text = fs::read_to_string(&path).expect("read source");
        // Unit tests may use a real clock as the base of their virtual time.
        let core = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (n, line) in core.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            assert!(!code.contains("tokio"), "{name}:{}: the sans-IO core uses tokio: {line}", n + 1);
            assert!(!code.contains("Instant::now"), "{name}:{}: the sans-IO core reads the clock: {line}", n + 1);
            assert!(!code.contains("SystemTime"), "{name}:{}: the sans-IO core reads the clock: {line}", n + 1);
        }
        checked += 1;
    }
    assert!(checked >= 11, "only {checked} core files found");
}

#[test]
fn net_is_the_only_module_behind_the_tokio_feature() {
    let lib = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).expect("lib.rs");
    assert!(lib.contains("#[cfg(feature = \"net\")]\npub mod net;"), "net must stay behind its feature");
    let manifest = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).expect("manifest");
    let deps = manifest.split("[dependencies]").nth(1).and_then(|s| s.split("\n[").next()).expect("deps");
    let tokio = deps.lines().find(|l| l.starts_with("tokio")).expect("tokio dependency");
    assert!(tokio.contains("optional = true"), "tokio must stay optional: {tokio}");
    let transport = deps.lines().find(|l| l.starts_with("transport")).expect("transport dependency");
    assert!(transport.contains("optional = true"), "transport must stay optional: {transport}");
}
