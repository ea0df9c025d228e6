//! Copying a checkpoint's dirty pages on two threads while the vCPUs are parked.
//!
//! During a pause the vCPUs' cores are idle: a helper thread copies pages beside the caller,
//! who first does other pause work (capturing the vCPU and device state) and then copies too.
//! Pages are claimed in small chunks from a shared counter, so the pause is never longer than
//! copying alone by more than one chunk: if the helper is not scheduled in time, the caller
//! copies everything itself.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::memory::{GuestMemory, PAGE_SIZE};

/// Pages claimed at a time.
const CHUNK: usize = 16;
/// Below this many pages one thread copies (waking the helper would cost more than it saves).
pub const PARALLEL_MIN: usize = 64;

/// One copy job as the helper sees it: raw pointers, valid until the caller saw every page
/// done (the caller waits for that before returning).
#[derive(Clone, Copy)]
struct Job {
    mem: *const GuestMemory,
    pfns: *const u64,
    n: usize,
    out: *mut u8,
}

// SAFETY: the pointers are only dereferenced for chunks claimed under the job's generation,
// while the caller of `PageCopier::copy` is still waiting for them (see `claim`).
unsafe impl Send for Job {}

#[derive(Default)]
struct Slot {
    job: Option<(u32, Job)>,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    slot: Mutex<Slot>,
    cv: Condvar,
    /// `generation << 32 | next page index` of the current job.
    next: AtomicU64,
    /// Pages copied of the current job.
    done: AtomicUsize,
    /// A page of the current job was outside guest memory.
    failed: AtomicBool,
    /// Pages the helper copied, in all (counted by the caller once a job is done: for tests
    /// and the engine's debug log).
    helped: AtomicU64,
}

impl Shared {
    /// Claims the next chunk of job `generation`: the index range, or None when it is over
    /// (or another job replaced it).
    fn claim(&self, generation: u32, n: usize) -> Option<(usize, usize)> {
        let mut cur = self.next.load(Ordering::Acquire);
        loop {
            if (cur >> 32) as u32 != generation {
                return None;
            }
            let at = (cur & 0xffff_ffff) as usize;
            if at >= n {
                return None;
            }
            let end = (at + CHUNK).min(n);
            let new = (u64::from(generation) << 32) | end as u64;
            match self.next.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some((at, end)),
                Err(c) => cur = c,
            }
        }
    }

    /// Copies every chunk of `job` it can claim; returns how many pages.
    fn work(&self, generation: u32, job: Job) -> usize {
        let mut copied = 0;
        while let Some((from, to)) = self.claim(generation, job.n) {
            // SAFETY: the chunk was claimed under the current generation, so the caller of
            // `copy` is still waiting for it: `mem`, `pfns[..n]` and `out[..n * PAGE_SIZE]` are
            // alive, and no other thread writes `out` at these indices.
            let ok = unsafe {
                let mem = &*job.mem;
                let pfns = std::slice::from_raw_parts(job.pfns.add(from), to - from);
                copy_chunk(mem, pfns, job.out.add(from * PAGE_SIZE))
            };
            if !ok {
                self.failed.store(true, Ordering::Release);
            }
            copied += to - from;
            self.done.fetch_add(to - from, Ordering::AcqRel);
        }
        copied
    }
}

/// Copies `pfns` into `out` (room for all of them), page after page; false if a page is not
/// in guest memory (its bytes are then left as they were).
///
/// # Safety
/// `out` must be valid for writes of `pfns.len() * PAGE_SIZE` bytes and not be accessed by
/// anyone else meanwhile.
unsafe fn copy_chunk(mem: &GuestMemory, pfns: &[u64], out: *mut u8) -> bool {
    let mut ok = true;
    for (i, &pfn) in pfns.iter().enumerate() {
        match mem.get_slice(GuestAddress(pfn * PAGE_SIZE as u64), PAGE_SIZE) {
            Ok(src) if src.len() == PAGE_SIZE => {
                // SAFETY: within `out` per the contract.
                let dst = unsafe { vm_memory::VolatileSlice::new(out.add(i * PAGE_SIZE), PAGE_SIZE) };
                src.copy_to_volatile_slice(dst);
            }
            _ => ok = false,
        }
    }
    ok
}

/// A page copier with one helper thread (see the module docs).
pub struct PageCopier {
    shared: Arc<Shared>,
    generation: u32,
    thread: Option<JoinHandle<()>>,
}

/// A page was not in guest memory.
#[derive(Debug, thiserror::Error)]
#[error("a page to copy is outside guest memory")]
pub struct OutsideMemory;

impl PageCopier {
    /// Starts the helper thread (`page-copy`).
    pub fn new() -> std::io::Result<Self> {
        Self::with_priority(0)
    }

    /// Starts the helper thread (`page-copy`) at real-time priority `rt_priority` (`SCHED_FIFO`,
    /// see [`crate::sched`]; 0: the ordinary policy). It only runs during copies, so it never
    /// takes a core from anything else for longer than a copy.
    pub fn with_priority(rt_priority: u8) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new().name("page-copy".into()).spawn(move || {
            if rt_priority > 0
                && let Err(e) = crate::sched::make_current_fifo(rt_priority)
            {
                tracing::warn!(
                    "page-copy helper: {e}: {}; it copies at the ordinary priority",
                    std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default()
                );
            }
            helper(s)
        })?;
        Ok(Self { shared, generation: 0, thread: Some(thread) })
    }

    /// Pages the helper copied so far.
    pub fn helped(&self) -> u64 {
        self.shared.helped.load(Ordering::Relaxed)
    }

    /// Appends the pages `pfns` of `mem` to `out` (as `memory::copy_pages` does), with the
    /// helper's help when there are many; runs `meanwhile` on this thread while the helper
    /// starts, then copies beside it. Returns what `meanwhile` returned.
    pub fn copy<R>(
        &mut self,
        mem: &GuestMemory,
        pfns: &[u64],
        out: &mut Vec<u8>,
        meanwhile: impl FnOnce() -> R,
    ) -> (Result<(), OutsideMemory>, R) {
        let n = pfns.len();
        out.reserve(n * PAGE_SIZE);
        let at = out.len();
        // SAFETY: `reserve` made `n * PAGE_SIZE` bytes at `at` valid for writes.
        let dst = unsafe { out.as_mut_ptr().add(at) };
        if n < PARALLEL_MIN {
            let r = meanwhile();
            // SAFETY: room reserved above; only this thread writes it.
            let ok = unsafe { copy_chunk(mem, pfns, dst) };
            if !ok {
                return (Err(OutsideMemory), r);
            }
            // SAFETY: every byte of the `n` pages was written.
            unsafe { out.set_len(at + n * PAGE_SIZE) };
            return (Ok(()), r);
        }
        self.generation = self.generation.wrapping_add(1);
        let generation = self.generation;
        let s = &self.shared;
        s.done.store(0, Ordering::Release);
        s.failed.store(false, Ordering::Release);
        s.next.store(u64::from(generation) << 32, Ordering::Release);
        let job = Job { mem, pfns: pfns.as_ptr(), n, out: dst };
        {
            let mut slot = s.slot.lock().unwrap_or_else(|e| e.into_inner());
            slot.job = Some((generation, job));
        }
        s.cv.notify_one();
        let r = meanwhile();
        let mine = s.work(generation, job);
        s.helped.fetch_add((n - mine) as u64, Ordering::Relaxed);
        // Wait for the chunks the helper claimed (at most one at a time, a few microseconds).
        let t = Instant::now();
        while s.done.load(Ordering::Acquire) < n {
            if t.elapsed() < Duration::from_micros(50) {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // Retire the job: a helper that wakes late finds nothing to claim.
        s.slot.lock().unwrap_or_else(|e| e.into_inner()).job = None;
        if s.failed.load(Ordering::Acquire) {
            return (Err(OutsideMemory), r);
        }
        // SAFETY: all `n` pages were written (done == n, none outside memory).
        unsafe { out.set_len(at + n * PAGE_SIZE) };
        (Ok(()), r)
    }
}

fn helper(s: Arc<Shared>) {
    let mut last = 0u32;
    loop {
        let (generation, job) = {
            let mut slot = s.slot.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if slot.stop {
                    return;
                }
                match slot.job {
                    Some((g, job)) if g != last => break (g, job),
                    _ => slot = s.cv.wait(slot).unwrap_or_else(|e| e.into_inner()),
                }
            }
        };
        last = generation;
        s.work(generation, job);
    }
}

impl Drop for PageCopier {
    fn drop(&mut self) {
        self.shared.slot.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    fn memory(pages: usize) -> GuestMemory {
        let mem: GuestMemory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), pages * PAGE_SIZE)]).unwrap();
        for p in 0..pages {
            let fill = vec![(p % 251) as u8 + 1; PAGE_SIZE];
            mem.write_slice(&fill, GuestAddress((p * PAGE_SIZE) as u64)).unwrap();
        }
        mem
    }

    #[test]
    fn copies_what_copy_pages_copies_small_and_large() {
        let mem = memory(1024);
        let mut c = PageCopier::new().unwrap();
        for n in [0usize, 1, 63, 64, 65, 500, 1000] {
            // Every other page from a varying start, descending for variety.
            let pfns: Vec<u64> = (0..n as u64).map(|i| (i * 7 + n as u64) % 1024).rev().collect();
            let mut want = vec![9u8; 3];
            crate::memory::copy_pages(&mem, pfns.iter().copied(), &mut want).unwrap();
            for _ in 0..20 {
                let mut got = vec![9u8; 3];
                let (r, x) = c.copy(&mem, &pfns, &mut got, || 42);
                r.unwrap();
                assert_eq!(x, 42);
                assert!(got == want, "{n} pages copied differently");
            }
        }
    }

    #[test]
    fn a_page_outside_memory_is_an_error_and_leaves_the_buffer_as_it_was() {
        let mem = memory(256);
        let mut c = PageCopier::new().unwrap();
        for n in [10usize, 200] {
            let mut pfns: Vec<u64> = (0..n as u64).collect();
            pfns[n / 2] = 10_000;
            let mut out = vec![1u8, 2, 3];
            let (r, ()) = c.copy(&mem, &pfns, &mut out, || ());
            assert!(r.is_err(), "{n} pages with one outside memory");
            assert_eq!(out, vec![1, 2, 3]);
        }
        // And the copier still works afterwards.
        let pfns: Vec<u64> = (0..200).collect();
        let mut out = Vec::new();
        c.copy(&mem, &pfns, &mut out, || ()).0.unwrap();
        assert_eq!(out.len(), 200 * PAGE_SIZE);
    }

    #[test]
    fn the_helper_takes_part_when_there_is_time() {
        let mem = memory(4096);
        let mut c = PageCopier::new().unwrap();
        let pfns: Vec<u64> = (0..4096).collect();
        for _ in 0..50 {
            let mut out = Vec::new();
            // The caller is busy a while first: the helper starts alone.
            c.copy(&mem, &pfns, &mut out, || std::thread::sleep(Duration::from_millis(5))).0.unwrap();
            if c.helped() > 0 {
                return;
            }
        }
        panic!("the helper never copied a page in 50 jobs");
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    /// Not a test: prints copy times (`cargo test --release -p vmm --lib copier::timing -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn print_copy_times() {
        let pages = 16384;
        let mem: GuestMemory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), pages * PAGE_SIZE)]).unwrap();
        for p in 0..pages {
            mem.write_slice(&[p as u8 | 1; 64], GuestAddress((p * PAGE_SIZE) as u64)).unwrap();
        }
        let pfns: Vec<u64> = (0..1000u64).map(|i| (i * 13) % pages as u64).collect();
        let mut c = PageCopier::new().unwrap();
        let mut warm = Vec::with_capacity(1000 * PAGE_SIZE);
        for round in 0..5 {
            let t = Instant::now();
            let mut fresh = Vec::new();
            crate::memory::copy_pages(&mem, pfns.iter().copied(), &mut fresh).unwrap();
            let t_fresh = t.elapsed();
            warm.clear();
            let t = Instant::now();
            crate::memory::copy_pages(&mem, pfns.iter().copied(), &mut warm).unwrap();
            let t_warm = t.elapsed();
            warm.clear();
            let t = Instant::now();
            c.copy(&mem, &pfns, &mut warm, || ()).0.unwrap();
            let t_par = t.elapsed();
            println!(
                "round {round}: fresh serial {t_fresh:?}, warm serial {t_warm:?}, warm parallel {t_par:?} (helper {})",
                c.helped()
            );
        }
    }
}
