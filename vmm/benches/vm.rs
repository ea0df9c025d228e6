//! VM runtime costs on a live fixture guest: pause, dirty harvest vs dirty pages, state
//! capture, resume, and in-process restore. Run with `make bench` or
//! `cargo bench -p vmm --bench vm` (needs /dev/kvm and `make guest`). With `BENCH_JSON=FILE` the
//! rows are also written there as JSON (`make bench`).
//!
//! The guest runs `workload=dirty` on one vCPU, which keeps one of the two host cores busy;
//! this process's measuring thread uses the other.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use vmm::vm::{Vm, VmConfig};

fn percentile(v: &[f64], p: f64) -> f64 {
    testbed::harness::stats::percentile(v, p).unwrap_or(f64::NAN)
}

fn guest() -> Option<PathBuf> {
    let p = std::env::var_os("UNDERSTUDY_GUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest/understudy-guest"));
    p.exists().then_some(p)
}

fn boot(kernel: &Path, cmdline: &str, memory: u64) -> Vm {
    Vm::boot(VmConfig {
        kernel: kernel.to_path_buf(),
        cmdline: cmdline.into(),
        memory_bytes: memory,
        vcpus: 1,
        serial: Box::new(std::io::sink()),
        net: None,
    })
    .expect("boot")
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("vm: bench");
        return;
    }
    if !testbed::harness::kvm_available("vm bench") {
        return;
    }
    let Some(kernel) = guest() else {
        eprintln!("*** SKIP: vm bench: target/guest/understudy-guest missing: run `make guest` ***");
        return;
    };
    let load_before = testbed::harness::proc::loadavg();
    let memory = 256u64 << 20;
    let mut rows = Vec::new();
    println!("# vmm bench: 1 vCPU, {} MiB guest, 2-core host; guest runs workload=dirty on one core", memory >> 20);
    println!();
    println!("## pause / harvest / capture / resume vs dirty pages per harvest");
    println!();
    println!(
        "| guest rate (pages/s) | interval | dirty pages p50 | pause p50 / p99 µs | harvest p50 / p99 µs | capture p50 / p99 µs | resume p50 µs |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (rate, interval_ms) in [(1_000u64, 1u64), (100_000, 10), (100_000, 100), (200_000, 200)] {
        let mut vm = boot(&kernel, &format!("workload=dirty wss=128 rate={rate}"), memory);
        std::thread::sleep(Duration::from_millis(300));
        vm.enable_dirty_log().expect("dirty log");
        let (mut pause, mut harvest, mut capture, mut resume, mut pages) = (vec![], vec![], vec![], vec![], vec![]);
        for i in 0..60 {
            std::thread::sleep(Duration::from_millis(interval_ms));
            let t0 = Instant::now();
            vm.pause().expect("pause");
            let t1 = Instant::now();
            let d = vm.harvest_dirty().expect("harvest");
            let t2 = Instant::now();
            let state = vm.save_state().expect("state");
            let t3 = Instant::now();
            vm.resume();
            let t4 = Instant::now();
            std::hint::black_box(state);
            if i >= 5 {
                pause.push(us(t1 - t0));
                harvest.push(us(t2 - t1));
                capture.push(us(t3 - t2));
                resume.push(us(t4 - t3));
                pages.push(d.page_count() as f64);
            }
        }
        println!(
            "| {rate} | {interval_ms} ms | {:.0} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} |",
            percentile(&pages, 0.5),
            percentile(&pause, 0.5),
            percentile(&pause, 0.99),
            percentile(&harvest, 0.5),
            percentile(&harvest, 0.99),
            percentile(&capture, 0.5),
            percentile(&capture, 0.99),
            percentile(&resume, 0.5),
        );
        rows.push(json!({
            "rate_pages_per_s": rate, "interval_ms": interval_ms, "rounds": pages.len(),
            "dirty_pages_p50": percentile(&pages, 0.5),
            "pause_us_p50": percentile(&pause, 0.5), "pause_us_p99": percentile(&pause, 0.99),
            "harvest_us_p50": percentile(&harvest, 0.5), "harvest_us_p99": percentile(&harvest, 0.99),
            "capture_us_p50": percentile(&capture, 0.5), "capture_us_p99": percentile(&capture, 0.99),
            "resume_us_p50": percentile(&resume, 0.5),
        }));
        vm.shutdown();
    }

    println!();
    println!("## restore (Vm::restore of a captured state over fresh memory, in process)");
    println!();
    let mut vm = boot(&kernel, "workload=counter period_ms=10", memory);
    std::thread::sleep(Duration::from_millis(200));
    vm.pause().expect("pause");
    let state = vm.save_state().expect("state");
    vm.shutdown();
    let mut restore = vec![];
    for _ in 0..20 {
        let mem = vmm::memory::create_anonymous(memory).expect("memory");
        let t0 = Instant::now();
        let mut r = Vm::restore(
            mem,
            &state,
            vmm::vm::RestoreOptions { serial: Box::new(std::io::sink()), tap: None, open_tap: None },
        )
        .expect("restore");
        restore.push(us(t0.elapsed()));
        r.shutdown();
    }
    println!("| restore p50 µs | restore p99 µs | runs |");
    println!("|---|---|---|");
    let n = restore.len();
    println!("| {:.0} | {:.0} | {n} |", percentile(&restore, 0.5), percentile(&restore, 0.99));
    let results = json!({
        "memory_mib": memory >> 20,
        "checkpoint_steps": rows,
        "restore": { "runs": n, "us_p50": percentile(&restore, 0.5), "us_p99": percentile(&restore, 0.99) },
    });
    testbed::harness::results::write_bench_json("vm", &load_before, results).expect("write BENCH_JSON");
}
