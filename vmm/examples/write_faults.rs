//! What checkpointing costs a guest that rewrites its working set: the `dirty` fixture guest
//! runs while this process does, every INTERVAL ms, nothing / a pause with a state capture /
//! a classic dirty harvest (every dirty page protected again) / a harvest with the hot-page
//! rule (`vmm::dirty::HotPagesConfig`), and prints the guest's pages/s and the CPU its vCPU
//! thread used. The vCPU CPU beyond `none` divided by the pages dirtied per second is the cost
//! of a write-protect fault (docs/protection.md, "Hot pages").
//!
//! ```sh
//! make guest && cargo run --release -p vmm --example write_faults -- \
//!     [INTERVAL_MS=10] ["workload=dirty wss=1 rate=2000000 report_ms=100"] [ROUNDS=2]
//! ```
//! Needs /dev/kvm. Each mode runs 2 s per round; modes alternate within a round.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::dirty::HotPagesConfig;
use vmm::vm::{Vm, VmConfig};

/// The line being received, and the guest's `dirty ... pages=<total>` lines as (time seen, total).
type Lines = (Vec<u8>, Vec<(Instant, u64)>);

#[derive(Clone, Default)]
struct Progress(Arc<Mutex<Lines>>);

impl Write for Progress {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut g = self.0.lock().unwrap();
        for &c in b {
            if c != b'\n' {
                g.0.push(c);
                continue;
            }
            let line = String::from_utf8_lossy(&g.0).into_owned();
            g.0.clear();
            let total =
                line.strip_prefix("dirty ").and_then(|l| l.split("pages=").nth(1)).and_then(|t| t.split(' ').next());
            if let Some(n) = total.and_then(|n| n.parse().ok()) {
                g.1.push((Instant::now(), n));
            }
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Progress {
    /// Pages per second between the first and last line seen since `from`.
    fn rate(&self, from: Instant) -> f64 {
        let g = self.0.lock().unwrap();
        let v: Vec<_> = g.1.iter().filter(|(t, _)| *t >= from).collect();
        match (v.first(), v.last()) {
            (Some(a), Some(b)) if b.0 > a.0 => (b.1 - a.1) as f64 / (b.0 - a.0).as_secs_f64(),
            _ => f64::NAN,
        }
    }
}

/// CPU seconds used so far by the thread named `vcpu0`.
fn vcpu_seconds() -> f64 {
    for e in std::fs::read_dir("/proc/self/task").expect("/proc/self/task").flatten() {
        if std::fs::read_to_string(e.path().join("comm")).unwrap_or_default().trim() != "vcpu0" {
            continue;
        }
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let f: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
        let ticks: f64 = f.get(11).and_then(|u| u.parse().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
        return ticks / 100.0;
    }
    f64::NAN
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let interval = Duration::from_millis(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10));
    let cmdline = args.get(2).cloned().unwrap_or_else(|| "workload=dirty wss=1 rate=2000000 report_ms=100".into());
    let rounds: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2);
    let kernel = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest/understudy-guest");
    let progress = Progress::default();
    let mut vm = Vm::boot(VmConfig {
        kernel,
        cmdline: cmdline.clone(),
        memory_bytes: 64 << 20,
        vcpus: 1,
        serial: Box::new(progress.clone()),
        net: None,
    })
    .expect("boot (needs /dev/kvm and `make guest`)");
    std::thread::sleep(Duration::from_millis(500));
    println!("# {cmdline}, every {interval:?}; vCPU cores = CPU of the vCPU thread per second");
    let mut logging = false;
    for round in 0..rounds {
        for mode in ["none", "pause+state", "classic harvest", "hot-page harvest"] {
            let harvest = mode.ends_with("harvest");
            if harvest && !logging {
                vm.enable_dirty_log().expect("dirty log");
                logging = true;
            }
            if harvest {
                let max_epochs = if mode.starts_with("hot") { 32 } else { 0 };
                vm.set_hot_pages(HotPagesConfig { max_epochs, ..Default::default() }).expect("hot pages");
            }
            std::thread::sleep(Duration::from_millis(300));
            let (t0, c0) = (Instant::now(), vcpu_seconds());
            while t0.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(interval);
                if mode == "none" {
                    continue;
                }
                vm.pause().expect("pause");
                if harvest {
                    std::hint::black_box(vm.harvest_dirty().expect("harvest"));
                } else {
                    std::hint::black_box(vm.save_state().expect("state"));
                }
                vm.resume();
            }
            let cores = (vcpu_seconds() - c0) / t0.elapsed().as_secs_f64();
            println!(
                "round {round} {mode:>17}: {:>10.0} pages/s, vCPU {cores:.3} cores, {} hot pages",
                progress.rate(t0),
                vm.hot_pages()
            );
        }
    }
}
