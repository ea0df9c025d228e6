//! What this process costs, for migration reports: CPU time of every thread but the vCPUs (the
//! guest's own running is not the VMM's work), and the peak resident set; and whether the
//! guest's threads are all asleep ([`IdleProbe`], for output-driven epochs).

use std::fs;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// CPU time in ns used so far by this process's threads, the vCPU threads (named `vcpu<N>`)
/// left out. Read from `/proc/self/task/*/schedstat` (nanosecond run time); a thread that ended
/// no longer counts. `None` when `/proc` cannot be read.
pub fn cpu_ns_excluding_vcpus() -> Option<u64> {
    let mut total = 0u64;
    for (dir, comm) in tasks().ok()? {
        if is_vcpu(&comm) {
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

/// Whether the threads that run the guest (its vCPUs, `vcpu<N>`, and its device workers,
/// `net-<tap>`) are all asleep: a halted guest whose devices have taken what it sent. Read from
/// each thread's `/proc/self/task/<tid>/stat` (state `S`, interruptible sleep: a vCPU halted in
/// the kernel, a worker in `epoll_wait`), a few microseconds per thread. A heuristic for when to
/// end an epoch, never a safety decision: a thread asleep for another reason (a lock, a missing
/// post-copy page) reads as idle too.
pub struct IdleProbe {
    threads: Vec<File>,
    buf: Vec<u8>,
}

impl IdleProbe {
    /// A probe over this process's guest threads as they are now (a thread started later is
    /// not watched; one that ended reads as busy).
    pub fn guest_threads() -> io::Result<Self> {
        Self::matching(|comm| is_vcpu(comm) || comm.starts_with("net-"))
    }

    fn matching(pick: impl Fn(&str) -> bool) -> io::Result<Self> {
        let mut threads = Vec::new();
        for (dir, comm) in tasks()? {
            if pick(&comm) {
                threads.push(File::open(dir.join("stat"))?);
            }
        }
        if threads.is_empty() {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no vcpu threads in /proc/self/task"));
        }
        Ok(Self { threads, buf: vec![0; 512] })
    }

    /// How many threads it watches.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// True if every watched thread is asleep now.
    pub fn idle(&mut self) -> bool {
        for f in &self.threads {
            let n = match f.read_at(&mut self.buf, 0) {
                Ok(n) => n,
                Err(_) => return false,
            };
            if task_state(&self.buf[..n]) != Some(b'S') {
                return false;
            }
        }
        true
    }
}

/// The state letter of a `/proc/<pid>/task/<tid>/stat` line (`tid (comm) S ...`; the command
/// may itself hold spaces and parentheses, so the state follows the last `)`).
fn task_state(stat: &[u8]) -> Option<u8> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    stat[close + 1..].iter().copied().find(|b| !b.is_ascii_whitespace())
}

/// This process's threads: each one's `/proc/self/task/<tid>` directory and its name.
fn tasks() -> std::io::Result<impl Iterator<Item = (std::path::PathBuf, String)>> {
    Ok(fs::read_dir("/proc/self/task")?.flatten().map(|task| {
        let dir = task.path();
        let comm = fs::read_to_string(dir.join("comm")).unwrap_or_default().trim().to_string();
        (dir, comm)
    }))
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
        assert_eq!(task_state(b"12 (vcpu0) S 1 2 3"), Some(b'S'));
        assert_eq!(task_state(b"12 (a (b) c) R 1 2"), Some(b'R'));
        assert_eq!(task_state(b"12 (x"), None);
        // This process: some CPU, some memory.
        assert!(cpu_ns_excluding_vcpus().unwrap() > 0);
        assert!(peak_rss_bytes().unwrap() > 0);
    }

    #[test]
    fn the_idle_probe_sees_a_sleeping_guest_thread_and_a_busy_one() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let go = Arc::new(AtomicBool::new(true));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let g = go.clone();
        let t = std::thread::Builder::new()
            .name("vcpu97".into())
            .spawn(move || {
                // Asleep (blocked on the channel) until told to spin, then busy until stopped.
                let _ = rx.recv();
                while g.load(Ordering::SeqCst) {
                    std::hint::spin_loop();
                }
            })
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut p = IdleProbe::matching(|c| c == "vcpu97").unwrap();
        assert_eq!(p.threads(), 1);
        let idle = (0..50).filter(|_| p.idle()).count();
        assert_eq!(idle, 50, "a thread blocked on a channel read idle {idle} times of 50");
        tx.send(()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        // Spinning, or runnable while preempted: never asleep.
        let idle = (0..50).filter(|_| p.idle()).count();
        go.store(false, Ordering::SeqCst);
        t.join().unwrap();
        assert_eq!(idle, 0, "a spinning thread read idle {idle} times of 50");
    }
}
