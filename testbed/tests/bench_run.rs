//! `testbed/scripts/bench_run.py` (`make bench`): a step's command does not inherit the
//! campaign's own variables. make exports its command-line variables (`BENCH_ONLY`,
//! `BENCH_QUICK`, `BENCH_GOALS`) to the runner; before this, `make bench BENCH_ONLY=protect,...`
//! passed them on, the protect bench read `BENCH_ONLY` as its sections and ran none (exit 0).

use std::path::{Path, PathBuf};
use std::process::Command;

const PYTHON: &str = "/usr/bin/python3";

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts")
}

#[test]
fn a_steps_environment_has_its_own_variables_and_not_the_campaigns() {
    let probe =
        "import json, bench_run; print(json.dumps(bench_run.child_env({'BENCH_JSON': 'x.json', 'BENCH_ONLY': 'kv'})))";
    let out = Command::new(PYTHON)
        .args(["-c", probe])
        .current_dir(scripts())
        .env("BENCH_ONLY", "transport,codecs,vm,protect")
        .env("BENCH_QUICK", "1")
        .env("BENCH_GOALS", "kv")
        .env("BENCH_KEEP", "1")
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let env: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON object");
    // What the step sets wins; the campaign's own variables are gone; the rest is inherited.
    assert_eq!(env["BENCH_JSON"], "x.json");
    assert_eq!(env["BENCH_ONLY"], "kv");
    assert!(env.get("BENCH_QUICK").is_none(), "{env}");
    assert!(env.get("BENCH_GOALS").is_none(), "{env}");
    assert_eq!(env["BENCH_KEEP"], "1");
    assert!(env.get("PATH").is_some(), "the rest of the environment is kept");

    // A step that sets nothing of its own sees no BENCH_ONLY at all.
    let probe = "import json, bench_run; print(json.dumps(bench_run.child_env({})))";
    let out = Command::new(PYTHON)
        .args(["-c", probe])
        .current_dir(scripts())
        .env("BENCH_ONLY", "protect")
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let env: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON object");
    assert!(env.get("BENCH_ONLY").is_none(), "{env}");
}
