//! `workload=dirty wss=<MiB> rate=<pages/s>`: rewrites the pages of a working set at a steady
//! rate, round robin. Page `i` in generation `g` holds guest_kv::checksum's
//! `dirty_fill(i, g)`; before rewriting a page the guest checks it still holds what it last
//! wrote there (`dirty error page=<i>` otherwise: a bad restore). About once a second:
//! `dirty gen=<g> pages=<total written> errors=<e>`. With `report_ms=N` (N > 0) also, every N ms
//! (at tick resolution), `dirty prog t=<guest ms> pages=<total written>`: the fine progress the
//! migration benchmark plots.
//!
//! The target count is `rate * elapsed ticks / hz`; each tick the guest writes up to it, then
//! halts until the next tick. If it falls more than a second behind (the VM was stopped) it
//! forgets the backlog instead of bursting. Less than that it catches up: a guest slowed by its
//! migration (write faults, missing pages) still writes its rate on average, which is what makes
//! W2 a workload pre-copy cannot converge on (issue 14 kept this on purpose). While it catches
//! up it looks at the clock every 256 pages and still reports on time: a guest far behind (the
//! protect bench's ~10,000 @10ms point runs at ~3% of its rate) is slow, not stalled.

use crate::arch::{halt_until_changed, irq_count, ticks};
use crate::println;
use crate::pvh::Region;
use crate::time::{hz, now_ms};
use guest_kv::checksum::{PAGE_WORDS, dirty_rewrite};

/// Error lines printed before the guest only counts them.
const MAX_ERROR_LINES: u64 = 16;
/// Pages written between two looks at the clock while catching up.
const REPORT_CHECK_PAGES: u64 = 256;

/// The once-a-second `dirty gen=` line and the `report_ms` progress line, when due.
struct Reports {
    hz: u64,
    next_report: u64,
    report_ms: u64,
    next_prog: u64,
}

impl Reports {
    fn due(&mut self, now: u64, written: u64, npages: u64, errors: u64) {
        if now >= self.next_report {
            let generation = written.checked_div(npages).unwrap_or(0);
            println!("dirty gen={generation} pages={written} errors={errors}");
            self.next_report += self.hz;
            if self.next_report <= now {
                self.next_report = now + self.hz;
            }
        }
        if self.report_ms > 0 {
            let t = now * 1000 / self.hz;
            if t >= self.next_prog {
                println!("dirty prog t={t} pages={written}");
                self.next_prog += self.report_ms;
                if self.next_prog <= t {
                    self.next_prog = t + self.report_ms;
                }
            }
        }
    }
}

/// Runs forever over the working set `ws`.
pub fn run(ws: Region, rate: u64, report_ms: u32) -> ! {
    let npages = ws.len() / 4096;
    let pages = ws.start as *mut [u64; PAGE_WORDS];
    let hz = hz();
    let mut written = 0u64;
    let mut errors = 0u64;
    println!("dirty: pages={npages} rate={rate} base={:#x}", ws.start);
    println!("ready");
    let mut base_tick = ticks();
    let mut base_written = 0u64;
    let max_behind = rate.max(hz);
    let mut reports = Reports { hz, next_report: base_tick + hz, report_ms: u64::from(report_ms), next_prog: 0 };
    reports.next_prog = now_ms() + reports.report_ms;
    loop {
        let seen = irq_count();
        let now = ticks();
        let mut target = base_written + rate * (now - base_tick) / hz;
        if target > written + max_behind {
            base_tick = now;
            base_written = written;
            target = written;
        }
        if npages > 0 {
            while written < target {
                // A guest far behind its rate (slowed by write faults under protection) stays
                // in this loop for long: report from here too, or it looks stalled.
                if written % REPORT_CHECK_PAGES == 0 {
                    reports.due(ticks(), written, npages, errors);
                }
                let idx = written % npages;
                let generation = written / npages;
                let old = generation.checked_sub(1);
                // SAFETY: idx < npages, so the page lies in the working set, which the arena
                // gave to this workload alone; pages are 4 KiB aligned.
                let page = unsafe { &mut *pages.add(idx as usize) };
                if !dirty_rewrite(page, idx, old) {
                    errors += 1;
                    if errors <= MAX_ERROR_LINES {
                        println!("dirty error page={idx}");
                    }
                }
                written += 1;
            }
        }
        reports.due(now, written, npages, errors);
        halt_until_changed(seen);
    }
}
