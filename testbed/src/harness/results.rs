//! Machine-readable benchmark results. Every bench prints its tables and, when `BENCH_JSON`
//! names a file (`make bench` sets it, see `testbed/scripts/bench_run.py`), also writes its
//! numbers there as one JSON object, which `testbed/scripts/bench_report.py` turns into
//! docs/benchmarks.md and its plots.

use anyhow::{Context, Result};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::proc::loadavg;

/// The file `BENCH_JSON` names, if any. A relative name is taken from the workspace root, where
/// the commands in docs/benchmarks.md are run: `cargo bench` runs each bench in its own
/// package's directory, so it would otherwise land under that package.
pub fn bench_json_path() -> Option<PathBuf> {
    std::env::var_os("BENCH_JSON").filter(|p| !p.is_empty()).map(|p| from_workspace_root(PathBuf::from(p)))
}

/// The sections a bench's `BENCH_ONLY` (`value`) names: comma-separated, blanks ignored, each
/// one of `known`. An unknown one is an error naming it and the known ones, so that a typo or a
/// variable meant for something else (once: `make bench`'s own `BENCH_ONLY=protect,...`, which
/// reached the protect bench) fails loudly instead of running nothing and exiting 0.
pub fn bench_sections(value: &str, known: &[&str]) -> Result<Vec<String>> {
    let sections: Vec<String> = value.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
    if let Some(bad) = sections.iter().find(|s| !known.contains(&s.as_str())) {
        anyhow::bail!("BENCH_ONLY={value}: unknown section {bad:?} (this bench has: {})", known.join(", "));
    }
    anyhow::ensure!(
        !sections.is_empty(),
        "BENCH_ONLY={value:?} names no section (this bench has: {})",
        known.join(", ")
    );
    Ok(sections)
}

/// `path` as it reads from the workspace root (absolute paths unchanged).
fn from_workspace_root(path: PathBuf) -> PathBuf {
    match Path::new(env!("CARGO_MANIFEST_DIR")).parent() {
        Some(root) if path.is_relative() => root.join(path),
        _ => path,
    }
}

/// Adds `bench`, the machine's cores, the load average before (`load_before`, as the bench read
/// it at its start) and now, and the time to `results` (an object), and writes it to
/// `$BENCH_JSON` when that is set. Returns the path written, if any.
pub fn write_bench_json(bench: &str, load_before: &str, results: Value) -> Result<Option<PathBuf>> {
    let Some(path) = bench_json_path() else { return Ok(None) };
    write_bench_json_to(&path, bench, load_before, results)?;
    Ok(Some(path))
}

/// [`write_bench_json`] to `path`.
fn write_bench_json_to(path: &Path, bench: &str, load_before: &str, mut results: Value) -> Result<()> {
    let obj = results.as_object_mut().context("bench results must be a JSON object")?;
    obj.insert("bench".into(), json!(bench));
    obj.insert("cores".into(), json!(std::thread::available_parallelism().map_or(0, |n| n.get())));
    obj.insert("load_before".into(), json!(load_before));
    obj.insert("load_after".into(), json!(loadavg()));
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    obj.insert("finished_unix_s".into(), json!(now));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&results)?;
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))?;
    eprintln!("bench: {bench} results in {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_results_file_is_taken_from_the_workspace_root() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        assert!(root.join("Cargo.lock").exists(), "the workspace root holds Cargo.lock");
        assert_eq!(from_workspace_root(PathBuf::from("docs/results/x.json")), root.join("docs/results/x.json"));
        assert_eq!(from_workspace_root(PathBuf::from("/tmp/x.json")), PathBuf::from("/tmp/x.json"));
    }

    #[test]
    fn bench_sections_are_the_known_ones_and_anything_else_is_named() {
        let known = ["pause", "dirty", "kv"];
        assert_eq!(bench_sections("pause,dirty,kv", &known).unwrap(), ["pause", "dirty", "kv"]);
        assert_eq!(bench_sections(" kv, ,", &known).unwrap(), ["kv"]);
        // `make bench BENCH_ONLY=protect,...` leaked into the protect bench and ran nothing.
        let e = bench_sections("transport,codecs,vm,protect", &known).unwrap_err().to_string();
        assert_eq!(
            e,
            "BENCH_ONLY=transport,codecs,vm,protect: unknown section \"transport\" (this bench has: pause, dirty, kv)"
        );
        let e = bench_sections(" , ", &known).unwrap_err().to_string();
        assert!(e.contains("names no section"), "{e}");
    }

    #[test]
    fn results_are_written_with_the_machine_added() {
        let dir = crate::harness::tempdir::TempDir::for_process("us-results-test", false).unwrap();
        let path = dir.join("sub/x.json");
        write_bench_json_to(&path, "demo", "0.1 0.2 0.3", json!({ "rows": [1, 2] })).unwrap();
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["bench"], "demo");
        assert_eq!(v["rows"], json!([1, 2]));
        assert_eq!(v["load_before"], "0.1 0.2 0.3");
        assert!(v["cores"].as_u64().unwrap() >= 1);
        assert!(v["finished_unix_s"].as_u64().unwrap() > 0);
        let err = write_bench_json_to(&path, "demo", "", json!([1])).unwrap_err();
        assert!(err.to_string().contains("must be a JSON object"), "{err}");
    }
}
