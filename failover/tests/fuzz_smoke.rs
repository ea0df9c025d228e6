//! A short, deterministic fuzz run inside `cargo test`: random and mutated inputs into each fuzz
//! entry point (the same functions the `cargo fuzz` targets in `fuzz/` call), plus the inputs
//! the fuzzer found (`fuzz/regressions/<target>/`, each a former crash), so every test run
//! exercises the raft wire and `Arbiter::step` on hostile input without cargo-fuzz.
//!
//! `FUZZ_SMOKE_ITERS` scales the inputs per target (default 20,000 for the wire, a tenth of it
//! for the arbiter, whose inputs each drive a group of three for up to 400 ms).

use std::path::Path;

use failover::fuzzing;
use testbed::harness::rng::XorShift64;

fn iterations() -> usize {
    std::env::var("FUZZ_SMOKE_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(20_000)
}

/// Random inputs, and mutations of the corpus and regression inputs kept in `fuzz/`.
fn run(target: fn(&[u8]), name: &str, salt: u64, n: usize) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for sub in ["regressions", "corpus"] {
        if let Ok(entries) = std::fs::read_dir(dir.join(sub).join(name)) {
            for e in entries.flatten() {
                if let Ok(bytes) = std::fs::read(e.path()) {
                    seeds.push(bytes);
                }
            }
        }
    }
    for s in &seeds {
        target(s);
    }
    let mut rng = XorShift64(0x5eed_0000_0000_0001 ^ salt);
    for i in 0..n {
        let mut input: Vec<u8> = if i % 4 == 0 || seeds.is_empty() {
            let len = rng.index(300);
            (0..len).map(|_| rng.next_u64() as u8).collect()
        } else {
            seeds[rng.index(seeds.len())].clone()
        };
        for _ in 0..rng.index(8) {
            if input.is_empty() {
                break;
            }
            let at = rng.index(input.len());
            input[at] = rng.next_u64() as u8;
        }
        target(&input);
    }
}

#[test]
fn fuzz_smoke_raft_wire() {
    run(fuzzing::raft_wire, "raft_wire", 1, iterations());
}

#[test]
fn fuzz_smoke_arbiter_step() {
    run(fuzzing::arbiter_step, "arbiter_step", 2, iterations() / 10);
}

/// Replays one input with logs:
/// `FUZZ_INPUT=path FUZZ_TARGET=arbiter_step cargo test -p failover --test fuzz_smoke debug_one_input -- --ignored --nocapture`
#[test]
#[ignore]
fn debug_one_input() {
    let path = std::env::var("FUZZ_INPUT").expect("FUZZ_INPUT=path");
    let bytes = std::fs::read(&path).expect("read FUZZ_INPUT");
    let _ = tracing_subscriber::fmt().with_env_filter("failover=trace,raft=trace").with_test_writer().try_init();
    match std::env::var("FUZZ_TARGET").as_deref() {
        Ok("raft_wire") => fuzzing::raft_wire(&bytes),
        _ => fuzzing::arbiter_step(&bytes),
    }
}
