//! Post-copy guest memory with a real userfaultfd (needs root or CAP_SYS_PTRACE: these tests
//! fail, loudly, where userfaultfd is not permitted; they never pass without it).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm::memory::{GuestMemory, PAGE_SIZE, create_anonymous};
use vmm::postcopy::{Postcopy, PostcopyError, Via};

mod common;
use common::Capture;

const MEM: u64 = 16 << 20;
const PAGES: u64 = MEM / PAGE_SIZE as u64;

fn gpa(pfn: u64) -> GuestAddress {
    GuestAddress(pfn * PAGE_SIZE as u64)
}

/// Starts post-copy with a `fetch` that sends each request list into the returned channel.
fn start(mem: &GuestMemory, held: &[(u64, u32)], prefetch: usize) -> (Arc<Postcopy>, Receiver<Vec<u64>>) {
    let (tx, rx) = channel();
    let tx = std::sync::Mutex::new(tx);
    let fetch = Box::new(move |pfns: Vec<u64>| {
        let _ = tx.lock().unwrap().send(pfns);
    });
    match Postcopy::start(mem, held, prefetch, fetch) {
        Ok(pc) => (pc, rx),
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg += &format!(": {s}");
                src = s.source();
            }
            panic!("\n*** FAIL: this test needs a working userfaultfd (run as root): {msg} ***\n");
        }
    }
}

fn page(byte: u8) -> Vec<u8> {
    vec![byte; PAGE_SIZE]
}

/// Reads page `pfn` through vm-memory on another thread (as a device would).
fn read_page_async(mem: &GuestMemory, pfn: u64) -> (JoinHandle<()>, Receiver<Vec<u8>>) {
    let (tx, rx) = channel();
    let mem = mem.clone();
    let h = std::thread::spawn(move || {
        let mut buf = vec![0u8; PAGE_SIZE];
        mem.read_slice(&mut buf, gpa(pfn)).unwrap();
        tx.send(buf).unwrap();
    });
    (h, rx)
}

fn read_page(mem: &GuestMemory, pfn: u64) -> Vec<u8> {
    let mut buf = vec![0u8; PAGE_SIZE];
    mem.read_slice(&mut buf, gpa(pfn)).unwrap();
    buf
}

fn asked(rx: &Receiver<Vec<u64>>) -> Vec<u64> {
    let mut all: Vec<u64> = rx.recv_timeout(Duration::from_secs(5)).expect("fetch called");
    while let Ok(more) = rx.try_recv() {
        all.extend(more);
    }
    all.sort_unstable();
    all
}

/// The acceptance test: a VMM-side read and write of a missing page wait for the page;
/// the read returns the placed bytes (never zeros, never the stale pre-copy content) and the
/// write lands on top of the placed content.
#[test]
fn vmm_access_to_a_missing_page_waits_for_it() {
    let mem = create_anonymous(MEM).unwrap();
    // Stale pre-copy content: must never be read after start.
    mem.write_slice(&page(0xAA), gpa(10)).unwrap();
    mem.write_slice(&page(0xAA), gpa(20)).unwrap();
    let (pc, rx) = start(&mem, &[], 0);
    assert_eq!(pc.missing(), PAGES);

    let (reader, read) = read_page_async(&mem, 10);
    let (wtx, written) = channel();
    let m2 = mem.clone();
    let writer = std::thread::spawn(move || {
        m2.write_slice(&[1, 2, 3, 4, 5, 6, 7, 8], gpa(20)).unwrap();
        wtx.send(()).unwrap();
    });
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(read.try_recv().unwrap_err(), std::sync::mpsc::TryRecvError::Empty, "reader returned early");
    assert!(written.try_recv().is_err(), "writer returned before its page arrived");
    let mut want = asked(&rx);
    if want.len() < 2 {
        want.extend(rx.recv_timeout(Duration::from_secs(5)).unwrap());
        want.sort_unstable();
    }
    assert_eq!(want, vec![10, 20], "fetch asks for each faulting page once");

    let b: Vec<u8> = (0..PAGE_SIZE).map(|i| (i % 251) as u8).collect();
    assert!(pc.place(10, &b, Via::Demand).unwrap());
    assert_eq!(read.recv_timeout(Duration::from_secs(5)).expect("reader woke"), b);
    reader.join().unwrap();

    assert!(written.try_recv().is_err());
    assert!(pc.place(20, &page(0x5A), Via::Push).unwrap());
    written.recv_timeout(Duration::from_secs(5)).expect("writer woke");
    writer.join().unwrap();
    let got = read_page(&mem, 20);
    assert_eq!(&got[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
    assert!(got[8..].iter().all(|&x| x == 0x5A), "the write lands on the placed page");

    let st = pc.stats();
    assert_eq!((st.faults, st.pages_demanded, st.pages_pushed, st.local_zero_faults), (2, 1, 1, 0));
    assert!(st.fault_us_p50 >= 50_000.0, "the reader waited ~100 ms: {st:?}");
    assert!(st.blocked_ms >= 150.0, "two threads waited ~100 ms each: {st:?}");
    assert_eq!(pc.missing(), PAGES - 2);
    pc.finish(true).unwrap();
}

/// Held pages keep their content and never fault; a held page never written reads as zeros,
/// resolved locally (no fetch).
#[test]
fn held_pages_are_kept_or_zero_filled_locally() {
    let mem = create_anonymous(MEM).unwrap();
    mem.write_slice(&page(0x11), gpa(5)).unwrap();
    mem.write_slice(&page(0x22), gpa(9)).unwrap(); // not held: dropped
    let (pc, rx) = start(&mem, &[(5, 2), (100, 3)], 8);
    assert_eq!(pc.missing(), PAGES - 5);
    assert_eq!(read_page(&mem, 5), page(0x11));
    assert_eq!(pc.stats().local_zero_faults, 0);
    assert_eq!(read_page(&mem, 6), page(0));
    assert_eq!(read_page(&mem, 101), page(0));
    let st = pc.stats();
    assert_eq!((st.local_zero_faults, st.faults), (2, 0));
    assert!(rx.try_recv().is_err(), "held pages are never fetched");
    // A held zero page written afterwards keeps the write (copy-on-write of the zero page).
    mem.write_slice(&[7u8; 16], gpa(6)).unwrap();
    assert_eq!(read_page(&mem, 6)[..16], [7u8; 16]);
    // Held pages are present: an arriving copy is dropped.
    assert!(!pc.place(5, &page(0x99), Via::Push).unwrap());
    assert!(!pc.place(6, &page(0x99), Via::Push).unwrap());
    assert_eq!(read_page(&mem, 5), page(0x11));
    assert_eq!(pc.stats().pages_dropped, 2);
    // The page not held lost its stale content: it is fetched (with its prefetch run).
    let (reader, read) = read_page_async(&mem, 9);
    assert_eq!(asked(&rx), (9..=17).collect::<Vec<_>>());
    assert!(pc.place(9, &page(0x33), Via::Demand).unwrap());
    assert_eq!(read.recv_timeout(Duration::from_secs(5)).unwrap(), page(0x33));
    reader.join().unwrap();
    // Bad held runs are refused.
    for bad in [&[(5u64, 2u32), (6, 1)][..], &[(9, 1), (5, 1)], &[(PAGES - 1, 2)]] {
        let e = Postcopy::start(&mem, bad, 0, Box::new(|_| {})).err().expect("bad held run refused");
        assert!(matches!(e, PostcopyError::HeldRun { .. }), "{e}");
    }
    pc.finish(true).unwrap();
}

/// A page already present (placed, then written by the guest) is never overwritten.
#[test]
fn placing_a_present_page_drops_it() {
    let mem = create_anonymous(MEM).unwrap();
    let (pc, _rx) = start(&mem, &[], 0);
    assert!(pc.place(30, &page(1), Via::Push).unwrap());
    mem.write_slice(&[9u8; 100], gpa(30)).unwrap();
    assert!(!pc.place(30, &page(2), Via::Demand).unwrap());
    assert_eq!(pc.place_run(30, &page(3), Via::Push).unwrap(), 0);
    let got = read_page(&mem, 30);
    assert!(got[..100].iter().all(|&x| x == 9) && got[100..].iter().all(|&x| x == 1));
    let st = pc.stats();
    assert_eq!((st.pages_pushed, st.pages_demanded, st.pages_dropped), (1, 0, 2));
    assert!(matches!(pc.place(PAGES, &page(0), Via::Push), Err(PostcopyError::NotInMemory(p)) if p == PAGES));
    assert!(matches!(pc.place(1, &[0u8; 100], Via::Push), Err(PostcopyError::Length { .. })));
    pc.finish(true).unwrap();
}

/// Runs: one copy when all missing, the missing pieces when partly present; completion and
/// `finish`: refused while missing, then memory is plain.
#[test]
fn runs_completion_and_finish() {
    let mem = create_anonymous(MEM).unwrap();
    let (pc, _rx) = start(&mem, &[(0, 16)], 0);
    let run: Vec<u8> = (0..8u8).flat_map(|k| page(0x40 + k)).collect();
    assert_eq!(pc.place_run(100, &run, Via::Push).unwrap(), 8);
    for k in 0..8 {
        assert_eq!(read_page(&mem, 100 + k), page(0x40 + k as u8));
    }
    assert!(pc.place(203, &page(0xEE), Via::Demand).unwrap());
    // 200..208 with 203 present: 7 placed, 203 kept; 14..18 with 14, 15 held: 2 placed.
    assert_eq!(pc.place_run(200, &run, Via::Push).unwrap(), 7);
    assert_eq!(read_page(&mem, 203), page(0xEE));
    assert_eq!(read_page(&mem, 204), page(0x44));
    assert_eq!(pc.place_run(14, &run[..4 * PAGE_SIZE], Via::Push).unwrap(), 2);
    assert_eq!(read_page(&mem, 16), page(0x42));
    assert_eq!(pc.missing(), PAGES - 16 - 8 - 8 - 2);
    assert!(!pc.is_complete());
    assert!(matches!(pc.finish(false), Err(PostcopyError::StillMissing(n)) if n == pc.missing()));

    // Drain the rest in runs.
    loop {
        let pfns = pc.missing_pfns(1000);
        if pfns.is_empty() {
            break;
        }
        let mut i = 0;
        while i < pfns.len() {
            let mut j = i + 1;
            while j < pfns.len() && pfns[j] == pfns[j - 1] + 1 {
                j += 1;
            }
            let data = vec![0x77u8; (j - i) * PAGE_SIZE];
            assert_eq!(pc.place_run(pfns[i], &data, Via::Push).unwrap(), (j - i) as u64);
            i = j;
        }
    }
    assert!(pc.is_complete());
    assert_eq!(pc.present_runs(), vec![(0, PAGES as u32)]);
    let st = pc.finish(false).unwrap();
    assert_eq!(st.missing, 0);
    assert_eq!(st.pages_pushed + st.pages_demanded, PAGES - 16);
    // Plain memory now: reads and writes work without the fault thread.
    assert_eq!(read_page(&mem, 300), page(0x77));
    mem.write_slice(&page(0x12), gpa(300)).unwrap();
    assert_eq!(read_page(&mem, 300), page(0x12));
    assert!(matches!(pc.place(301, &page(0), Via::Push), Err(PostcopyError::Finished(301))));
    assert_eq!(pc.finish(false).unwrap().missing, 0, "finish twice returns the counters");
}

/// An abandoned post-copy (`finish(true)`) wakes a thread waiting on a missing page; it reads
/// zeros (the guest is lost then).
#[test]
fn forced_finish_wakes_waiters_with_zeros() {
    let mem = create_anonymous(MEM).unwrap();
    mem.write_slice(&page(0xAA), gpa(40)).unwrap();
    let (pc, rx) = start(&mem, &[], 0);
    let (reader, read) = read_page_async(&mem, 40);
    assert_eq!(asked(&rx), vec![40]);
    assert!(read.recv_timeout(Duration::from_millis(100)).is_err());
    let st = pc.finish(true).unwrap();
    assert_eq!(st.missing, PAGES);
    assert_eq!(read.recv_timeout(Duration::from_secs(5)).expect("woken by finish"), page(0));
    reader.join().unwrap();
}

/// `rerequest` returns what was asked and is still missing and lets faults ask again;
/// `present_runs` lists held and placed pages.
#[test]
fn rerequest_and_present_runs() {
    let mem = create_anonymous(MEM).unwrap();
    let (pc, rx) = start(&mem, &[(0, 10)], 4);
    let (r1, read1) = read_page_async(&mem, 50);
    assert_eq!(asked(&rx), vec![50, 51, 52, 53, 54]);
    assert!(pc.place(51, &page(0x51), Via::Demand).unwrap());
    // A fault on a page asked for already (prefetched) asks nothing new but 55..=56.
    let (r2, read2) = read_page_async(&mem, 52);
    assert_eq!(asked(&rx), vec![55, 56]);
    assert_eq!(pc.rerequest(), vec![50, 52, 53, 54, 55, 56]);
    assert_eq!(pc.rerequest(), Vec::<u64>::new(), "marks cleared");
    // Cleared: a new fault asks again.
    let (r3, read3) = read_page_async(&mem, 53);
    assert_eq!(asked(&rx), vec![53, 54, 55, 56, 57]);
    assert_eq!(pc.present_runs(), vec![(0, 10), (51, 1)]);
    for (p, r, h) in [(50u64, read1, r1), (52, read2, r2), (53, read3, r3)] {
        assert!(pc.place(p, &page(p as u8), Via::Demand).unwrap());
        assert_eq!(r.recv_timeout(Duration::from_secs(5)).unwrap(), page(p as u8));
        h.join().unwrap();
    }
    assert_eq!(pc.present_runs(), vec![(0, 10), (50, 4)]);
    assert_eq!(pc.missing_pfns(3), vec![10, 11, 12]);
    assert_eq!(pc.stats().faults, 3);
    pc.finish(true).unwrap();
}

/// Two regions (RAM above the MMIO hole): pfns are guest-physical, prefetch stays in the
/// region, runs are per region.
#[test]
fn multiple_regions() {
    let size = vmm::layout::MMIO_HOLE_START + (8 << 20);
    let mem = create_anonymous(size).unwrap();
    let high = vmm::layout::HIGH_RAM_START / PAGE_SIZE as u64;
    let low_end = vmm::layout::MMIO_HOLE_START / PAGE_SIZE as u64;
    mem.write_slice(&page(0x61), gpa(high + 1)).unwrap();
    let (pc, rx) = start(&mem, &[(low_end - 2, 2), (high, 2)], 4);
    assert_eq!(read_page(&mem, high + 1), page(0x61));
    let (r, read) = read_page_async(&mem, low_end - 3);
    assert_eq!(asked(&rx), vec![low_end - 3], "prefetch neither crosses held pages nor the hole");
    assert!(pc.place(low_end - 3, &page(3), Via::Demand).unwrap());
    assert_eq!(read.recv_timeout(Duration::from_secs(5)).unwrap(), page(3));
    r.join().unwrap();
    let (r, read) = read_page_async(&mem, high + 5);
    assert_eq!(asked(&rx), vec![high + 5, high + 6, high + 7, high + 8, high + 9]);
    let run: Vec<u8> = [page(5), page(6)].concat();
    assert_eq!(pc.place_run(high + 5, &run, Via::Demand).unwrap(), 2);
    assert_eq!(read.recv_timeout(Duration::from_secs(5)).unwrap(), page(5));
    r.join().unwrap();
    assert_eq!(pc.present_runs(), vec![(low_end - 3, 3), (high, 2), (high + 5, 2)]);
    assert_eq!(pc.missing_pfns(2), vec![0, 1]);
    assert!(matches!(pc.place(low_end, &page(0), Via::Push), Err(PostcopyError::NotInMemory(_))));
    pc.finish(true).unwrap();
}

/// Fault latency on this machine: one thread touches missing pages one after the other, a
/// "network" thread places each page on request. Prints the figures.
#[test]
fn fault_latency() {
    const N: u64 = 2000;
    let mem = create_anonymous(MEM).unwrap();
    let (pc, rx) = start(&mem, &[], 0);
    let pc2 = Arc::clone(&pc);
    let placer = std::thread::spawn(move || {
        let data = page(0xC3);
        loop {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(pfns) => {
                    for p in pfns {
                        pc2.place(p, &data, Via::Demand).unwrap();
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return,
            }
            if pc2.missing() <= PAGES - N {
                return;
            }
        }
    });
    let t0 = std::time::Instant::now();
    for p in 0..N {
        // Every other page, so no fault finds its page placed already.
        let v: u8 = mem.read_obj(gpa(p * 2)).unwrap();
        assert_eq!(v, 0xC3);
    }
    let el = t0.elapsed();
    // The counters of the last page are updated just after its COPY woke us.
    placer.join().unwrap();
    let st = pc.stats();
    eprintln!(
        "post-copy fault latency over {} faults: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs; {:.1} µs per access end to end",
        st.faults,
        st.fault_us_p50,
        st.fault_us_p99,
        st.fault_us_max,
        el.as_secs_f64() * 1e6 / st.faults.max(1) as f64
    );
    assert_eq!(st.faults, N);
    assert_eq!(st.pages_demanded, N);
    assert!(st.fault_us_p50 > 0.0 && st.fault_us_p50 <= st.fault_us_p99 && st.fault_us_p99 <= st.fault_us_max);
    pc.finish(false).unwrap_err();
    pc.finish(true).unwrap();
}

impl Capture {
    /// The `seq=` numbers of the complete lines so far, of `before`'s output then this one's
    /// (a line the source was pausing in the middle of is finished by the destination).
    fn seqs_after(&self, before: &Capture) -> Vec<u64> {
        let mut bytes = before.0.lock().unwrap().clone();
        bytes.extend_from_slice(&self.0.lock().unwrap());
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        complete.lines().filter_map(|l| l.strip_prefix("seq=")?.split(' ').next()?.parse().ok()).collect()
    }

    fn seqs(&self) -> Vec<u64> {
        self.seqs_after(&Capture::default())
    }
}

/// A KVM guest restored over memory that holds none of its pages runs on: each page it
/// touches faults, is fetched (from a copy of the source's memory here) and placed, and the
/// guest's counter continues exactly where the source stopped.
#[test]
fn kvm_guest_runs_on_post_copy_memory() {
    if !testbed::harness::kvm_available("kvm_guest_runs_on_post_copy_memory") {
        return;
    }
    let kernel = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest/understudy-guest");
    if !kernel.exists() {
        eprintln!(
            "\n*** SKIP: kvm_guest_runs_on_post_copy_memory: {} missing: run `make guest` ***\n",
            kernel.display()
        );
        return;
    }
    const SIZE: u64 = 64 << 20;
    let src_out = Capture::default();
    let mut src = vmm::vm::Vm::boot(vmm::vm::VmConfig {
        kernel,
        cmdline: "workload=counter period_ms=5".into(),
        memory_bytes: SIZE,
        vcpus: 1,
        serial: Box::new(src_out.clone()),
        net: None,
    })
    .expect("boot");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while src_out.seqs().len() < 20 {
        assert!(std::time::Instant::now() < deadline, "source guest prints no counter");
        std::thread::sleep(Duration::from_millis(10));
    }
    src.pause().unwrap();
    let state = src.save_state().unwrap();
    let mut image = Vec::new();
    vmm::memory::copy_pages(src.memory(), 0..SIZE / PAGE_SIZE as u64, &mut image).unwrap();
    src.shutdown();
    let before = src_out.seqs().len();
    let image = Arc::new(image);

    // The destination: fresh memory holding nothing; a "network" thread serves each request
    // from the image.
    let mem = create_anonymous(SIZE).unwrap();
    let (pc, rx) = start(&mem, &[], 16);
    let pc2 = Arc::clone(&pc);
    let img = Arc::clone(&image);
    // Ends when `finish` drops `fetch` (and with it the sender).
    let server = std::thread::spawn(move || {
        while let Ok(pfns) = rx.recv() {
            for p in pfns {
                let at = p as usize * PAGE_SIZE;
                pc2.place(p, &img[at..at + PAGE_SIZE], Via::Demand).unwrap();
            }
        }
    });
    let dst_out = Capture::default();
    let opts = vmm::vm::RestoreOptions { serial: Box::new(dst_out.clone()), tap: None, open_tap: None };
    let mut dst = vmm::vm::Vm::restore(mem.clone(), &state, opts).expect("restore over post-copy memory");
    dst.resume();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while dst_out.seqs_after(&src_out).len() < before + 20 {
        assert!(std::time::Instant::now() < deadline, "restored guest prints no counter: {:?}", pc.stats());
        std::thread::sleep(Duration::from_millis(10));
    }
    let seqs = dst_out.seqs_after(&src_out);
    let want: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, want, "the counter continues exactly");
    let st = pc.stats();
    eprintln!(
        "kvm post-copy: {} faults, p50 {:.1} µs, p99 {:.1} µs, {} pages demanded, {} still missing",
        st.faults, st.fault_us_p50, st.fault_us_p99, st.pages_demanded, st.missing
    );
    assert!(st.faults > 0 && st.pages_demanded > 0 && st.missing > 0, "{st:?}");

    // Push the rest; then the guest memory equals the source's but for what the guest wrote.
    dst.pause().unwrap();
    for p in pc.missing_pfns(usize::MAX) {
        let at = p as usize * PAGE_SIZE;
        assert!(pc.place(p, &image[at..at + PAGE_SIZE], Via::Push).unwrap());
    }
    let st = pc.finish(false).unwrap();
    assert_eq!(st.pages_demanded + st.pages_pushed, SIZE / PAGE_SIZE as u64);
    dst.resume();
    std::thread::sleep(Duration::from_millis(50));
    let n = dst_out.seqs_after(&src_out).len();
    assert!(n > seqs.len(), "the guest runs on after finish");
    dst.shutdown();
    server.join().unwrap();
}

/// Zero pages from the source are mapped as the zero page, waking the waiter, never over a
/// present page.
#[test]
fn zero_pages_are_placed_without_a_buffer() {
    let mem = create_anonymous(MEM).unwrap();
    mem.write_slice(&page(0xAA), gpa(400)).unwrap();
    let (pc, rx) = start(&mem, &[], 0);
    let (reader, read) = read_page_async(&mem, 400);
    assert_eq!(asked(&rx), vec![400]);
    assert!(pc.place(399, &page(0x39), Via::Push).unwrap());
    assert_eq!(pc.place_zeros(398, 4, Via::Demand).unwrap(), 3);
    assert_eq!(read.recv_timeout(Duration::from_secs(5)).unwrap(), page(0));
    reader.join().unwrap();
    assert_eq!(read_page(&mem, 399), page(0x39));
    assert_eq!(pc.place_zeros(400, 1, Via::Push).unwrap(), 0);
    mem.write_slice(&[5u8; 8], gpa(401)).unwrap();
    assert_eq!(read_page(&mem, 401)[..9], [5, 5, 5, 5, 5, 5, 5, 5, 0]);
    let st = pc.stats();
    assert_eq!((st.pages_demanded, st.pages_pushed, st.pages_dropped, st.faults), (3, 1, 2, 1));
    pc.finish(true).unwrap();
}

/// With verification the digest of memory as held and placed equals the source's digest at the
/// switch-over, even after the guest (here: this test) writes over placed pages; a page placed
/// with other content changes it.
#[test]
fn the_verified_digest_is_memory_as_it_arrived() {
    let src = create_anonymous(MEM).unwrap();
    for pfn in (0..PAGES).step_by(3) {
        src.write_slice(&page((pfn % 251) as u8 + 1), gpa(pfn)).unwrap();
    }
    // SAFETY: nothing else touches `src`.
    let want = unsafe { vmm::memory::digest(&src) };
    let run = |corrupt: bool| {
        let dst = create_anonymous(MEM).unwrap();
        // Held: the first 64 pages, copied before the start (as pre-copy would have).
        for pfn in 0..64 {
            dst.write_slice(&read_page(&src, pfn), gpa(pfn)).unwrap();
        }
        let fetch = Box::new(|_: Vec<u64>| {});
        let pc = Postcopy::start_verified(&dst, &[(0, 64)], 0, fetch, true).expect("userfaultfd (run as root)");
        assert_eq!(pc.digest(), None, "no digest while pages are missing");
        for pfn in 64..PAGES {
            let mut p = read_page(&src, pfn);
            if corrupt && pfn == 100 {
                p[7] ^= 1;
            }
            if p.iter().all(|&b| b == 0) {
                pc.place_zeros(pfn, 1, Via::Push).unwrap();
            } else {
                pc.place(pfn, &p, Via::Push).unwrap();
            }
        }
        // The guest writes after the placement: not part of the digest.
        dst.write_slice(&page(0xEE), gpa(70)).unwrap();
        let d = pc.digest().expect("complete");
        pc.finish(false).unwrap();
        d
    };
    assert_eq!(run(false), want);
    assert_ne!(run(true), want);
}

/// A thread whose wait for a missing page is interrupted (a signal: a reverse checkpoint's pause
/// kicking a vCPU) faults again on the same page. That is still one fault and one wait, not one
/// per interruption: counted each, the waits overlapped and the blocked time exceeded the time
/// that passed (found by the migration bench: 3,580 ms blocked in a 923 ms post-copy).
#[test]
fn a_wait_interrupted_by_signals_is_one_fault() {
    extern "C" fn nothing(_: libc::c_int) {}
    // SAFETY: a handler that does nothing, for SIGUSR2, which nothing else in this test binary
    // uses; `sa` is a plain C struct, zeroed then filled.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = nothing as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut()), 0);
    }
    let mem = create_anonymous(MEM).unwrap();
    let (pc, rx) = start(&mem, &[], 0);
    let t0 = std::time::Instant::now();
    let (tid_tx, tid_rx) = channel();
    let (tx, read) = channel();
    let m2 = mem.clone();
    let reader = std::thread::spawn(move || {
        // SAFETY: pthread_self has no preconditions.
        tid_tx.send(unsafe { libc::pthread_self() }).unwrap();
        let mut buf = vec![0u8; PAGE_SIZE];
        m2.read_slice(&mut buf, gpa(30)).unwrap();
        tx.send(buf).unwrap();
    });
    let thread = tid_rx.recv().unwrap();
    assert_eq!(asked(&rx), vec![30]);
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(20));
        // SAFETY: `thread` is the reader, alive until it got its page (placed below).
        unsafe { libc::pthread_kill(thread, libc::SIGUSR2) };
    }
    std::thread::sleep(Duration::from_millis(30));
    assert!(read.try_recv().is_err(), "the reader returned before its page arrived");
    assert!(pc.place(30, &page(7), Via::Demand).unwrap());
    assert_eq!(read.recv_timeout(Duration::from_secs(5)).expect("reader woke"), page(7));
    let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    reader.join().unwrap();
    let st = pc.stats();
    assert_eq!(st.faults, 1, "one fault, however often its wait was interrupted: {st:?}");
    assert!(st.blocked_ms <= wall_ms, "blocked {} ms in {wall_ms:.1} ms: {st:?}", st.blocked_ms);
    assert!(st.blocked_ms >= 100.0, "the reader waited ~130 ms: {st:?}");
    pc.finish(true).unwrap();
}
