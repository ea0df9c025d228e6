//! What this process costs, for migration reports: CPU time of every thread but the vCPUs (the
//! guest's own running is not the VMM's work), and the peak resident set.

use std::fs;

/// CPU time in ns used so far by this process's threads, the vCPU threads (named `vcpu<N>`)
/// left out. Read from `/proc/self/task/*/schedstat` (nanosecond run time); a thread that ended
/// no longer counts. `None` when `/proc` cannot be read.
pub fn cpu_ns_excluding_vcpus() -> Option<u64> {
    let mut total = 0u64;
    for task in fs::read_dir("/proc/self/task").ok()?.flatten() {
        let dir = task.path();
        let comm = fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if is_vcpu(comm.trim()) {
            continue;
        }
        let Ok(stat) = fs::read_to_string(dir.join("schedstat")) else { continue };
        total = total.saturating_add(run_ns(&stat).unwrap_or(0));
    }
    Some(total)
}

/// The peak resident set of this process in bytes (`VmHWM`), `None` when unknown.
pub fn peak_rss_bytes() -> Option<u64> {
    vm_hwm(&fs::read_to_string("/proc/self/status").ok()?)
}

fn is_vcpu(comm: &str) -> bool {
    comm.strip_prefix("vcpu").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn run_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

fn vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.trim_start_matches("VmHWM:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib.saturating_mul(1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_proc_gives() {
        assert!(is_vcpu("vcpu0") && is_vcpu("vcpu12"));
        assert!(!is_vcpu("vcpu") && !is_vcpu("vcpux") && !is_vcpu("understudy-io"));
        assert_eq!(run_ns("123456 789 10\n"), Some(123_456));
        assert_eq!(run_ns(""), None);
        assert_eq!(vm_hwm("Name:\tx\nVmHWM:\t   2048 kB\nVmRSS:\t 1 kB\n"), Some(2 << 20));
        assert_eq!(vm_hwm("Name:\tx\n"), None);
        // This process: some CPU, some memory.
        assert!(cpu_ns_excluding_vcpus().unwrap() > 0);
        assert!(peak_rss_bytes().unwrap() > 0);
    }
}
