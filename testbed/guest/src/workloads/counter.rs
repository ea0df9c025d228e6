//! `workload=counter [period_ms=N]`: `seq=<n> sum=<s>` every `period_ms`, n from 1, s the
//! running checksum of guest_kv::checksum (FNV-1a over every n so far), 16 hex digits.
//! Deadlines advance by exactly `period_ms` from the previous one, so the rate stays steady
//! (a late line does not shift the ones after it); between lines the guest halts.

use crate::arch::{halt_until_changed, irq_count};
use crate::println;
use crate::time::now_ms;
use guest_kv::checksum::{COUNTER_SUM_INIT, counter_step};

/// Runs forever.
pub fn run(period_ms: u32) -> ! {
    let period = u64::from(period_ms);
    let mut seq = 0u64;
    let mut sum = COUNTER_SUM_INIT;
    println!("ready");
    let mut next = now_ms() + period;
    loop {
        let seen = irq_count();
        let now = now_ms();
        if now < next {
            halt_until_changed(seen);
            continue;
        }
        seq += 1;
        sum = counter_step(sum, seq);
        println!("seq={seq} sum={sum:016x}");
        next += period;
        if next + 10 * period < now {
            // Far behind (the VM was stopped): resume the cadence from now, skip no numbers.
            next = now + period;
        }
    }
}
