//! The benchmark report generator (`testbed/scripts/bench_report.py`, `make bench-report`) on a
//! small stored fixture of real results (`testbed/tests/fixtures/bench-results/`, cut down from
//! a `make bench BENCH_QUICK=1` campaign): it must write a markdown report whose every image link
//! names a valid PNG that exists, with the figures the issue asks for, and the fault points the
//! results hold (not a fixed list: the test adds a point the generator has never heard of to a
//! copy of the fixture).

use std::path::{Path, PathBuf};
use std::process::Command;

use testbed::harness::tempdir::TempDir;

const PYTHON: &str = "/usr/bin/python3";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Fails loudly, naming `make deps`, when Debian's matplotlib is not there.
fn require_matplotlib() {
    let ok = Command::new(PYTHON).args(["-c", "import matplotlib"]).output().is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{PYTHON} cannot import matplotlib: the benchmark report needs Debian's python3-matplotlib; run `make deps`"
    );
}

/// The targets of every `![alt](target)` in `md`.
fn image_links(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = md;
    while let Some(i) = rest.find("![") {
        rest = &rest[i + 2..];
        let Some(close) = rest.find("](") else { break };
        let after = &rest[close + 2..];
        let Some(end) = after.find(')') else { break };
        out.push(after[..end].to_string());
        rest = &after[end..];
    }
    out
}

/// Width and height of a PNG, or why the bytes are not one.
fn png_size(bytes: &[u8]) -> Result<(u32, u32), String> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    if bytes.len() < 24 || !bytes.starts_with(SIGNATURE) {
        return Err(format!("no PNG signature ({} bytes)", bytes.len()));
    }
    if &bytes[12..16] != b"IHDR" {
        return Err("first chunk is not IHDR".into());
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let (w, h) = (be(&bytes[16..20]), be(&bytes[20..24]));
    if w == 0 || h == 0 {
        return Err(format!("empty image {w}x{h}"));
    }
    if !bytes.ends_with(b"IEND\xaeB`\x82") {
        return Err("no IEND chunk at the end (truncated?)".into());
    }
    Ok((w, h))
}

#[test]
fn png_checks_refuse_what_is_not_a_png() {
    assert!(png_size(b"not a png at all, really not").is_err());
    assert!(png_size(b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0\0\0\0\0\0\x01").is_err(), "zero width");
    assert_eq!(image_links("a ![x](p/a.png) b ![y](b.png)\n"), ["p/a.png", "b.png"]);
}

#[test]
fn the_report_links_valid_pngs_for_every_figure_from_stored_results() {
    require_matplotlib();
    let root = root();
    let stored = root.join("testbed/tests/fixtures/bench-results");
    let out = TempDir::for_process("us-bench-report-test", false).unwrap();
    let fixture = out.join("results");
    std::fs::create_dir_all(&fixture).unwrap();
    for e in std::fs::read_dir(&stored).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), fixture.join(e.file_name())).unwrap();
    }
    // A fault point no list in the generator names (as a new `testbed faults` point would be).
    let mut faults: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("faults.json")).unwrap()).unwrap();
    let runs = faults["runs"].as_array_mut().unwrap();
    let mut extra = runs[0].clone();
    extra["point"] = "made-up.new-point".into();
    runs.push(extra);
    std::fs::write(fixture.join("faults.json"), serde_json::to_string(&faults).unwrap()).unwrap();
    let md_path = out.join("benchmarks.md");
    let img_dir = out.join("benchmarks");
    let run = Command::new(PYTHON)
        .arg(root.join("testbed/scripts/bench_report.py"))
        .arg("--results")
        .arg(&fixture)
        .arg("--out-md")
        .arg(&md_path)
        .arg("--img-dir")
        .arg(&img_dir)
        .output()
        .expect("run bench_report.py");
    assert!(
        run.status.success(),
        "bench_report.py failed ({}):\n{}{}",
        run.status,
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let md = std::fs::read_to_string(&md_path).expect("the report");

    let links = image_links(&md);
    for want in [
        "pause-vs-dirty-pages.png",
        "kv-latency-cdf.png",
        "failover-per-fault-point.png",
        "codec-wire-bytes.png",
        "migration-W3.png",
    ] {
        assert!(links.iter().any(|l| l.ends_with(want)), "the report links no {want}: {links:?}");
    }
    for link in &links {
        let path = out.path().join(link);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{link} is linked but unreadable: {e}"));
        let (w, h) = png_size(&bytes).unwrap_or_else(|e| panic!("{link} is not a valid PNG: {e}"));
        assert!(w >= 200 && h >= 100, "{link} is {w}x{h}: too small to be a figure");
    }

    // Provenance: the commit and the machine's load from meta.json, the history linked.
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("meta.json")).unwrap()).unwrap();
    let commit = meta["commit"].as_str().unwrap();
    assert!(md.contains(&format!("commit {commit}")), "the report does not name commit {commit}");
    assert!(md.contains("other processes"), "the report does not say what else ran");
    assert!(md.contains("(benchmarks-history.md"), "the report does not link the history");

    // Every fault point in the results is in the table, whatever its name.
    assert!(md.contains("| `made-up.new-point` |"), "a fault point outside any list is left out");
    for r in faults["runs"].as_array().unwrap() {
        let point = r["point"].as_str().unwrap();
        assert!(md.contains(&format!("| `{point}` |")), "fault point {point} is missing from the report");
    }
}
