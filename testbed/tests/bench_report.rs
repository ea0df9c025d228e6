//! The benchmark report generator (`testbed/scripts/bench_report.py`, `make bench-report`) on a
//! small stored fixture of real results (`testbed/tests/fixtures/bench-results/`, cut down from
//! a `make bench BENCH_QUICK=1` campaign): it must write a markdown report whose every image link
//! names a valid PNG that exists, with the figures the issue asks for, and the fault points the
//! results hold (not a fixed list: the test adds a point the generator has never heard of to a
//! copy of the fixture). The fixture's `goals-*.json` (the goals step of `make bench`: issue 16's
//! goals, before and after in one run) are real results cut down to 3 runs (5 for the faults) with
//! the per-run numbers the goals are judged on set by hand, so that each row's medians and its
//! met/missed are known here; `bench-results-previous/` stands for an older campaign (the tuned
//! failover's previous figures).

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

/// A copy of the stored fixture in a new temporary directory: (the directory, the copy).
fn fixture_copy(tag: &str) -> (TempDir, PathBuf) {
    let stored = root().join("testbed/tests/fixtures/bench-results");
    let out = TempDir::for_process(tag, false).unwrap();
    let fixture = out.join("results");
    std::fs::create_dir_all(&fixture).unwrap();
    for e in std::fs::read_dir(&stored).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), fixture.join(e.file_name())).unwrap();
    }
    (out, fixture)
}

/// Runs bench_report.py on `results` (the campaign, then older ones) into `out`; the markdown.
fn render(out: &Path, results: &[&Path]) -> String {
    let md_path = out.join("benchmarks.md");
    let mut cmd = Command::new(PYTHON);
    cmd.arg(root().join("testbed/scripts/bench_report.py"));
    for r in results {
        cmd.arg("--results").arg(r);
    }
    let run = cmd
        .arg("--out-md")
        .arg(&md_path)
        .arg("--img-dir")
        .arg(out.join("benchmarks"))
        .output()
        .expect("run bench_report.py");
    assert!(
        run.status.success(),
        "bench_report.py failed ({}):\n{}{}",
        run.status,
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    std::fs::read_to_string(&md_path).expect("the report")
}

/// The cells of the table row whose first cell starts with `goal`.
fn row<'a>(md: &'a str, goal: &str) -> Vec<&'a str> {
    let line = md
        .lines()
        .find(|l| l.starts_with(&format!("| {goal}")))
        .unwrap_or_else(|| panic!("no row for {goal:?} in the report:\n{md}"));
    line.trim_matches('|').split(" | ").map(str::trim).collect()
}

const GOALS: &str = "## Issue 16 goals: before and after, in one run";

#[test]
fn the_report_shows_issue_16_goals_before_and_after_with_their_commands() {
    require_matplotlib();
    let (out, fixture) = fixture_copy("us-bench-report-goals");
    let previous = root().join("testbed/tests/fixtures/bench-results-previous");
    let md = render(out.path(), &[&fixture, &previous]);
    let at = md.find(GOALS).unwrap_or_else(|| panic!("no goals section in the report:\n{md}"));
    assert!(at < md.find("## Transport").unwrap(), "the goals section is not near the top");
    let goals = &md[at..md.find("## Transport").unwrap()];

    // [goal, before, now, met?, command]: medians of the fixture's runs, set by hand.
    let kv_cmd = "BENCH_ONLY=kv BENCH_EPOCHS_MS=adaptive BENCH_RUNS=3 BENCH_NO_BUILD=1 BENCH_VARIANTS='before=";
    let expect: &[(&str, &str, &str, &str, &str)] = &[
        ("kv get throughput", "10.5%", "30.0%", "**yes**", kv_cmd),
        ("kv set throughput", "9.0%", "11.0%", "**no**", kv_cmd),
        ("kv added latency per request p50 ≤ 1 ms", "1.90 ms", "1.00 ms", "**yes**", kv_cmd),
        ("pause p50 ≤ 0.5 ms", "1.18 ms", "0.50 ms", "**yes**", "BENCH_ONLY=pause BENCH_POINTS=4 BENCH_RUNS=3"),
        ("pause p99 ≤ 1 ms", "4.80 ms", "1.10 ms", "**no**", "BENCH_ONLY=pause BENCH_POINTS=4 BENCH_RUNS=3"),
        (
            "`dirty` guest slowdown no worse than before: rate-limited",
            "0.1% (0.0 0.2)",
            "-0.2% (-0.1 -0.2)",
            "**yes**",
            "BENCH_ONLY=dirty BENCH_EPOCHS_MS=10,5",
        ),
        (
            "`dirty` guest slowdown no worse than before: CPU-bound",
            "65.2% (64.8 65.6)",
            "70.5% (70.0 71.0)",
            "**no**",
            "BENCH_ONLY=dirty BENCH_EPOCHS_MS=10,5",
        ),
        (
            "untuned client (no `rto_min`, no thin-stream options): kill to first reply p50",
            "209 ms",
            "45 ms",
            "**yes**",
            "--no-inbound-log",
        ),
        (
            "untuned client (no `rto_min`, no thin-stream options): kill to first reply p99",
            "215 ms",
            "120 ms",
            "**no**",
            "--points kill.untuned",
        ),
        (
            "tuned client, `kill`",
            "44 ms (40 52 44)",
            "47 ms (45 51 47)",
            "**yes**",
            "--points kill,primary.paused,primary.acked",
        ),
        (
            "tuned client, `primary.paused`",
            "no earlier campaign",
            "38 ms",
            "shown only",
            "--points kill,primary.paused",
        ),
        (
            "tuned client, `primary.acked`",
            "71 ms (70 72 71)",
            "85 ms (80 85 90)",
            "**no**",
            "--points kill,primary.paused",
        ),
    ];
    for (goal, before, now, met, command) in expect {
        let cells = row(goals, goal);
        assert_eq!(cells.len(), 5, "{goal}: {cells:?}");
        assert!(cells[1].starts_with(before), "{goal}: before is {:?}, expected {before:?}", cells[1]);
        assert!(cells[2].starts_with(now), "{goal}: now is {:?}, expected {now:?}", cells[2]);
        assert_eq!(cells[3], *met, "{goal}: met? {:?}", cells[3]);
        assert!(
            cells[4].starts_with('`') && cells[4].contains(command),
            "{goal}: command {:?} lacks {command:?}",
            cells[4]
        );
    }
    // Where the previous figures come from, and the before variant spelled out.
    assert!(row(goals, "tuned client, `kill`")[1].contains("commit prev123"), "the previous campaign is not named");
    assert!(goals.contains("--hot-page-epochs 0"), "the before variant is not spelled out");

    // A goal whose command did not run says so.
    std::fs::remove_file(fixture.join("goals-pause.json")).unwrap();
    let md = render(out.path(), &[&fixture, &previous]);
    let cells = row(&md, "pause p50 ≤ 0.5 ms and p99 ≤ 1 ms");
    assert!(cells[1].starts_with("not run (no `goals-pause.json`)") && cells[3] == "-", "{cells:?}");
    assert_eq!(row(&md, "kv set throughput")[3], "**no**", "the other goals are still there");

    // No goals results: no section (the rest of the report as before).
    for e in std::fs::read_dir(&fixture).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap().to_string_lossy().starts_with("goals-") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let md = render(out.path(), &[&fixture]);
    assert!(!md.contains(GOALS), "a goals section without goals results");
    assert!(md.contains("## Protection"), "the rest of the report is gone");
}

#[test]
fn the_report_links_valid_pngs_for_every_figure_from_stored_results() {
    require_matplotlib();
    let (out, fixture) = fixture_copy("us-bench-report-test");
    // A fault point no list in the generator names (as a new `testbed faults` point would be).
    let mut faults: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("faults.json")).unwrap()).unwrap();
    let runs = faults["runs"].as_array_mut().unwrap();
    let mut extra = runs[0].clone();
    extra["point"] = "made-up.new-point".into();
    runs.push(extra);
    std::fs::write(fixture.join("faults.json"), serde_json::to_string(&faults).unwrap()).unwrap();
    let md = render(out.path(), &[&fixture]);

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
