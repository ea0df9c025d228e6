//! Codec and pipeline throughput, and bytes on the wire per dirty byte.
//!
//! `cargo bench -p replication-proto` (a plain harness: prints markdown tables; `make bench`
//! puts them in `docs/benchmarks.md`). One thread: every number is per core.
//!
//! - **Per page kind**: an epoch of 2,048 dirty 4 KiB pages (8 MiB) that are all of one kind, with
//!   the sender's cache primed by a baseline as it would be. *encode* is `Sender::submit` (zero
//!   test, hash, cache lookup, codec, framing, crc32s); *receive* is `Receiver::handle_input` of
//!   the epoch's frames (crc32s, parsing, lz4 decompression, staging); *apply* is
//!   `Checkpoint::apply` into a replica (digest verification, then the writes). GB/s are of dirty
//!   page bytes (1 GB = 10^9 bytes); the median of 7 runs.
//! - **Primitives**: the building blocks alone.
//! - **Mix**: 20 epochs of a realistic dirty-page mix on a 64 MiB guest, bytes on the wire per
//!   dirty byte, with and without lz4 (see the table's legend for the mix).
//! - **Dedup**: a migration's round 0 and later rounds on a mix with duplicate pages, with
//!   content-hash dedup on and off (see the table's legend).
//!
//! With `BENCH_JSON=FILE` every table's rows are also written there as JSON (`make bench`).

use replication_proto::codec::{CodecConfig, encode_delta};
use replication_proto::hash::{is_zero, xxh64};
use replication_proto::pageset::PageEncoding;
use replication_proto::{
    Endpoint, MemoryImage, MemoryLayout, Receiver, ReceiverConfig, ReceiverEvent, Role, Sender, SenderConfig, Transmit,
    VmIdentity,
};
use serde_json::{Value, json};
use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use testbed::harness::rng::XorShift64;
use testbed::harness::stats::percentile;

const PS: usize = 4096;

/// Every table's rows, by table name, for `BENCH_JSON`.
static ROWS: Mutex<Vec<(&str, Value)>> = Mutex::new(Vec::new());

fn record(table: &'static str, row: Value) {
    ROWS.lock().unwrap_or_else(|e| e.into_inner()).push((table, row));
}

fn vm() -> VmIdentity {
    VmIdentity { uuid: [9; 16], name: "bench".into() }
}

fn text_page(rng: &mut XorShift64) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "the ",
        "replica ",
        "commits ",
        "epoch ",
        "of ",
        "guest ",
        "memory ",
        "and ",
        "state ",
        "0x7f3a ",
        "ok\n",
        "{\"key\": ",
    ];
    let mut p = Vec::with_capacity(PS + 16);
    while p.len() < PS {
        p.extend_from_slice(WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes());
    }
    p.truncate(PS);
    p
}

fn random_page(rng: &mut XorShift64) -> Vec<u8> {
    (0..PS / 8).flat_map(|_| rng.next_u64().to_le_bytes()).collect()
}

/// A page of structured binary data (pointers, counters, small integers, padding).
fn struct_page(rng: &mut XorShift64) -> Vec<u8> {
    let mut p = vec![0u8; PS];
    for rec in p.chunks_exact_mut(64) {
        rec[0..8].copy_from_slice(&(0xffff_8880_0000_0000u64 + rng.below(1 << 30) * 64).to_le_bytes());
        rec[8..12].copy_from_slice(&(rng.below(1000) as u32).to_le_bytes());
        rec[16..24].copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    p
}

/// `page` with a few small edits (a counter bumped, a pointer changed, a short string written).
fn touch(rng: &mut XorShift64, page: &[u8]) -> Vec<u8> {
    let mut p = page.to_vec();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(PS as u64 - 16) as usize;
        let n = 1 + rng.below(12) as usize;
        for b in &mut p[at..at + n] {
            *b = b.wrapping_add(1 + rng.below(200) as u8);
        }
    }
    p
}

struct Pair {
    s: Sender,
    r: Receiver,
    replica: MemoryImage,
    now: Instant,
}

fn pump(s: &mut Sender, r: &mut Receiver, now: Instant) {
    loop {
        let mut moved = false;
        while let Some(t) = s.poll_transmit(now) {
            r.handle_input(now, &t);
            moved = true;
        }
        while let Some(t) = r.poll_transmit(now) {
            s.handle_input(now, &t);
            moved = true;
        }
        if !moved {
            return;
        }
    }
}

fn apply_all(r: &mut Receiver, replica: &mut MemoryImage, now: Instant) -> Duration {
    let mut spent = Duration::ZERO;
    while let Some(ev) = r.poll_event() {
        if let ReceiverEvent::Checkpoint(cp) = ev {
            let t = Instant::now();
            cp.apply(replica).expect("applies");
            spent += t.elapsed();
            r.committed(now, cp.epoch()).unwrap();
        }
    }
    spent
}

/// A connected pair whose replica holds `base` (sent as the baseline).
fn pair(base: &[Vec<u8>], codecs: CodecConfig, cache_bytes: u64) -> Pair {
    let layout = MemoryLayout::flat(PS as u32, base.len() as u64 * PS as u64);
    let mut cfg = SenderConfig::new(Role::Primary, vm(), layout.clone(), 1);
    cfg.codecs = codecs;
    cfg.cache_bytes = cache_bytes;
    let mut s = Sender::new(cfg);
    let mut r = Receiver::new(ReceiverConfig::new(Role::Backup, vm(), layout.clone(), 2));
    let mut replica = MemoryImage::new(&layout);
    let now = Instant::now();
    s.connect(now);
    r.connect(now);
    pump(&mut s, &mut r, now);
    s.submit_baseline(now, base.iter().enumerate().map(|(i, p)| (i as u64, &p[..])), b"").unwrap();
    pump(&mut s, &mut r, now);
    apply_all(&mut r, &mut replica, now);
    pump(&mut s, &mut r, now);
    Pair { s, r, replica, now }
}

struct Run {
    encode: Duration,
    receive: Duration,
    apply: Duration,
    wire: u64,
}

impl Pair {
    /// Sends one epoch of `pages` (pfns 0..), timing each stage.
    fn epoch(&mut self, pages: &[Vec<u8>]) -> Run {
        let now = self.now;
        let t = Instant::now();
        self.s.submit(now, pages.iter().enumerate().map(|(i, p)| (i as u64, &p[..])), b"").unwrap();
        let encode = t.elapsed();
        let frames: Vec<Transmit> = std::iter::from_fn(|| self.s.poll_transmit(now)).collect();
        let wire = frames.iter().map(|f| f.len() as u64).sum();
        let t = Instant::now();
        for f in &frames {
            self.r.handle_input(now, f);
        }
        let receive = t.elapsed();
        let apply = apply_all(&mut self.r, &mut self.replica, now);
        pump(&mut self.s, &mut self.r, now);
        for (i, p) in pages.iter().enumerate() {
            assert_eq!(&self.replica.as_bytes()[i * PS..(i + 1) * PS], &p[..]);
        }
        Run { encode, receive, apply, wire }
    }
}

/// The upper median.
fn median(v: Vec<Duration>) -> Duration {
    percentile(&v, 0.5).expect("some runs")
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn per_kind() {
    const N: usize = 2048;
    const REPS: usize = 9;
    let mut rng = XorShift64(0x1234_5678);
    let zero = vec![vec![0u8; PS]; N];
    let randoms: Vec<_> = (0..N).map(|_| random_page(&mut rng)).collect();
    let texts: Vec<_> = (0..N).map(|_| text_page(&mut rng)).collect();
    // Each rep's epoch: unchanged resends the same pages; delta edits the previous version;
    // lz4 and raw send new content (with no cached copies, as for pages sent the first time).
    let mut chain = vec![randoms.clone()];
    for _ in 0..REPS {
        let next = chain.last().unwrap().iter().map(|p| touch(&mut rng, p)).collect();
        chain.push(next);
    }
    let fresh_texts: Vec<Vec<Vec<u8>>> = (0..REPS).map(|_| (0..N).map(|_| text_page(&mut rng)).collect()).collect();
    let fresh_randoms: Vec<Vec<Vec<u8>>> = (0..REPS).map(|_| (0..N).map(|_| random_page(&mut rng)).collect()).collect();
    let all = CodecConfig::default();
    let big = 1u64 << 30;
    println!("## Per page kind: epochs of {N} dirty 4 KiB pages (8 MiB), one core, steady state\n");
    println!("| page kind | encode GB/s | receive GB/s | apply GB/s | wire bytes / page |");
    println!("|---|---:|---:|---:|---:|");
    type Epochs<'a> = Box<dyn Fn(usize) -> &'a [Vec<u8>] + 'a>;
    let cases: Vec<(&str, &[Vec<u8>], Epochs, u64)> = vec![
        ("zero", &randoms, Box::new(|_| &zero[..]), big),
        ("unchanged", &randoms, Box::new(|_| &randoms[..]), big),
        ("delta (1-3 edits of 1-12 bytes)", &randoms, Box::new(|i| &chain[i + 1][..]), big),
        ("lz4 (text, no cached copy)", &texts, Box::new(|i| &fresh_texts[i][..]), 0),
        ("raw (random, no cached copy)", &randoms, Box::new(|i| &fresh_randoms[i][..]), 0),
        ("lz4 (text rewritten, copy cached: delta tried first)", &texts, Box::new(|i| &fresh_texts[i][..]), big),
    ];
    for (name, base, epochs, cache) in cases {
        let mut p = pair(base, all, cache);
        let runs: Vec<Run> = (0..REPS).map(|i| p.epoch(epochs(i))).collect();
        let dirty = (N * PS) as u64;
        let (encode, receive, apply) = (
            gbps(dirty, median(runs.iter().map(|r| r.encode).collect())),
            gbps(dirty, median(runs.iter().map(|r| r.receive).collect())),
            gbps(dirty, median(runs.iter().map(|r| r.apply).collect())),
        );
        let wire_per_page = runs[0].wire as f64 / N as f64;
        println!("| {name} | {encode:.2} | {receive:.2} | {apply:.2} | {wire_per_page:.1} |");
        record(
            "kinds",
            json!({ "kind": name, "encode_gbps": encode, "receive_gbps": receive, "apply_gbps": apply,
                    "wire_bytes_per_page": wire_per_page, "runs": REPS }),
        );
    }
    println!();
}

fn time_it(bytes: u64, mut f: impl FnMut()) -> f64 {
    let mut v = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        f();
        v.push(t.elapsed());
    }
    gbps(bytes, median(v))
}

fn primitives() {
    let mut rng = XorShift64(42);
    let n = 4096usize;
    let pages: Vec<Vec<u8>> = (0..n).map(|_| random_page(&mut rng)).collect();
    let copies = pages.clone();
    let touched: Vec<Vec<u8>> = pages.iter().map(|p| touch(&mut rng, p)).collect();
    let texts: Vec<Vec<u8>> = (0..n).map(|_| text_page(&mut rng)).collect();
    let bytes = (n * PS) as u64;
    let zero = vec![0u8; PS];
    let mut out = vec![0u8; PS];
    let mut buf = Vec::with_capacity(PS);
    let mut lz = vec![0u8; lz4_flex::block::get_maximum_output_size(PS)];
    let compressed: Vec<Vec<u8>> = texts.iter().map(|p| lz4_flex::block::compress(p)).collect();
    println!("## Primitives, one core (GB/s of page bytes)\n");
    println!("| primitive | GB/s |");
    println!("|---|---:|");
    let rows: Vec<(&str, f64)> = vec![
        (
            "zero test, zero page",
            time_it(bytes, || {
                for _ in 0..n {
                    black_box(is_zero(black_box(&zero)));
                }
            }),
        ),
        (
            "xxh64 (content hash)",
            time_it(bytes, || {
                for p in &pages {
                    black_box(xxh64(p));
                }
            }),
        ),
        (
            "compare with cached copy (equal)",
            time_it(bytes, || {
                for (a, b) in pages.iter().zip(&copies) {
                    black_box(a == b);
                }
            }),
        ),
        (
            "crc32 (crc32fast)",
            time_it(bytes, || {
                for p in &pages {
                    black_box(crc32fast::hash(p));
                }
            }),
        ),
        (
            "delta encode, 1-3 small edits",
            time_it(bytes, || {
                for (a, b) in pages.iter().zip(&touched) {
                    buf.clear();
                    black_box(encode_delta(a, b, &mut buf, PS / 2));
                }
            }),
        ),
        (
            "delta encode, page rewritten (gives up at 1/2 page)",
            time_it(bytes, || {
                for (a, b) in pages.iter().zip(&texts) {
                    buf.clear();
                    black_box(encode_delta(a, b, &mut buf, PS / 2));
                }
            }),
        ),
        (
            "lz4 compress, text",
            time_it(bytes, || {
                for p in &texts {
                    black_box(lz4_flex::block::compress_into(p, &mut lz).unwrap());
                }
            }),
        ),
        (
            "lz4 compress, random",
            time_it(bytes, || {
                for p in &pages {
                    black_box(lz4_flex::block::compress_into(p, &mut lz).unwrap());
                }
            }),
        ),
        (
            "lz4 decompress, text",
            time_it(bytes, || {
                for c in &compressed {
                    black_box(lz4_flex::block::decompress_into(c, &mut out).unwrap());
                }
            }),
        ),
        (
            "memcpy",
            time_it(bytes, || {
                for p in &pages {
                    out.copy_from_slice(p);
                    black_box(&out);
                }
            }),
        ),
    ];
    for (name, v) in rows {
        println!("| {name} | {v:.2} |");
        record("primitives", json!({ "primitive": name, "gbps": v }));
    }
    println!();
}

/// The mix: see the printed legend.
fn mix() {
    const PAGES: u64 = 16384; // 64 MiB guest
    const HOT: u64 = 2048; // 8 MiB working set
    const DIRTY: usize = 2000;
    const EPOCHS: usize = 20;
    println!("## Bytes on the wire per dirty byte, realistic mix\n");
    println!(
        "Guest of 64 MiB (a quarter each zero, text, structured binary and random pages at the \
         baseline), sender cache 16 MiB, {EPOCHS} epochs of {DIRTY} dirty pages. 80% of the dirty \
         pages fall in an 8 MiB working set (their copies stay cached), 20% anywhere in the guest \
         (copies mostly evicted). Each dirty page is: zeroed (20%), rewritten with the same bytes \
         (15%), edited in 1-3 runs of 1-12 bytes (45%), rewritten as text (12%), rewritten with \
         random bytes (8%). Encode GB/s is dirty bytes per second of `Sender::submit`, one core; \
         the last columns are the share of pages per encoding.\n"
    );
    println!("| codecs | wire bytes / dirty byte | encode GB/s | zero | unchanged | raw | lz4 | delta |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let on = CodecConfig::default();
    for (name, codecs, trust_hash) in [
        ("all (default)", on, false),
        ("all, trust_hash", on, true),
        ("no lz4", CodecConfig { lz4: false, ..on }, false),
        ("no delta", CodecConfig { delta: false, ..on }, false),
        ("neither (zero and unchanged still apply)", CodecConfig { lz4: false, delta: false, ..on }, false),
    ] {
        let mut rng = XorShift64(0xfeed);
        let layout = MemoryLayout::flat(PS as u32, PAGES * PS as u64);
        let mut cfg = SenderConfig::new(Role::Primary, vm(), layout, 1);
        cfg.codecs = codecs;
        cfg.trust_hash = trust_hash;
        cfg.cache_bytes = 16 << 20;
        cfg.window = 64;
        cfg.max_retained_bytes = 4 << 30;
        let mut s = Sender::new(cfg);
        let now = Instant::now();
        let mut mem: Vec<Vec<u8>> = (0..PAGES)
            .map(|i| match i % 4 {
                0 => vec![0; PS],
                1 => text_page(&mut rng),
                2 => struct_page(&mut rng),
                _ => random_page(&mut rng),
            })
            .collect();
        s.submit_baseline(now, mem.iter().enumerate().map(|(i, p)| (i as u64, &p[..])), b"").unwrap();
        let before = s.stats();
        let mut spent = Duration::ZERO;
        for _ in 0..EPOCHS {
            let mut dirty = std::collections::BTreeSet::new();
            while dirty.len() < DIRTY {
                dirty.insert(if rng.below(100) < 80 { rng.below(HOT) } else { HOT + rng.below(PAGES - HOT) });
            }
            for &pfn in &dirty {
                let p = &mut mem[pfn as usize];
                *p = match rng.below(100) {
                    0..20 => vec![0; PS],
                    20..35 => p.clone(),
                    35..80 => touch(&mut rng, p),
                    80..92 => text_page(&mut rng),
                    _ => random_page(&mut rng),
                };
            }
            let t = Instant::now();
            s.submit(now, dirty.iter().map(|&pfn| (pfn, &mem[pfn as usize][..])), b"").unwrap();
            spent += t.elapsed();
        }
        let after = s.stats();
        let wire = after.epoch_bytes - before.epoch_bytes;
        let pages = after.pages - before.pages;
        let dirty_bytes = pages * PS as u64;
        let kinds: Vec<String> = (0..5)
            .map(|k| {
                let n = after.pages_by_encoding[k] - before.pages_by_encoding[k];
                format!("{:.0}%", 100.0 * n as f64 / pages as f64)
            })
            .collect();
        let (per_dirty_byte, encode) = (wire as f64 / dirty_bytes as f64, gbps(dirty_bytes, spent));
        println!("| {name} | {per_dirty_byte:.3} | {encode:.2} | {} |", kinds.join(" | "));
        let shares: Vec<f64> =
            (0..5).map(|k| (after.pages_by_encoding[k] - before.pages_by_encoding[k]) as f64 / pages as f64).collect();
        record(
            "mix",
            json!({ "codecs": name, "wire_bytes_per_dirty_byte": per_dirty_byte, "encode_gbps": encode,
                    "share_by_encoding": { "zero": shares[0], "unchanged": shares[1], "raw": shares[2],
                                           "lz4": shares[3], "delta": shares[4] } }),
        );
    }
    println!();
}

/// Round 0 and later rounds of a migration, dedup on and off: see the printed legend.
fn dedup() {
    const PAGES: u64 = 16384; // 64 MiB guest
    const HOT: u64 = 2048;
    const DIRTY: usize = 2000;
    const ROUNDS: usize = 10;
    println!("## Content-hash dedup: a migration's round 0 and its later rounds\n");
    println!(
        "Guest of 64 MiB: 35% zero pages, 20% text, 15% structured binary, 15% random, and 15% \
         copies of other pages (buffers and structures initialised alike: 512 distinct contents, \
         each copied about five times). Round 0 sends every page (zero pages as one-byte \
         records); then {ROUNDS} rounds of {DIRTY} dirty pages (80% in an 8 MiB working set), each \
         zeroed (15%), rewritten with the same bytes (15%), edited in 1-3 runs of 1-12 bytes \
         (35%), rewritten as text (15%) or random (5%), or overwritten with another page's \
         current content (15%, a memcpy). Sender cache 64 MiB (the default), lz4 and delta on, a \
         migration session at protocol version 2; the destination applies every round and ends \
         byte-equal. Encode GB/s is page bytes per second of `Sender::submit`, one core.\n"
    );
    println!(
        "| dedup | round 0: wire bytes / page | round 0 encode GB/s | round 0 pages as references | \
         rounds: wire bytes / dirty byte | rounds encode GB/s | rounds' pages as references |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut wire_by = Vec::new();
    for (name, on) in [("off", false), ("on", true)] {
        let mut rng = XorShift64(0xd1ce);
        let layout = MemoryLayout::flat(PS as u32, PAGES * PS as u64);
        let mut cfg = SenderConfig::new(Role::MigrationSource, vm(), layout.clone(), 1);
        cfg.codecs.dedup = on;
        cfg.window = 64;
        cfg.max_retained_bytes = 4 << 30;
        let mut s = Sender::new(cfg);
        let mut r = Receiver::new(ReceiverConfig::new(Role::MigrationDestination, vm(), layout.clone(), 2));
        let mut replica = MemoryImage::new(&layout);
        let now = Instant::now();
        s.connect(now);
        r.connect(now);
        pump(&mut s, &mut r, now);
        let pool: Vec<Vec<u8>> =
            (0..512).map(|i| if i % 2 == 0 { text_page(&mut rng) } else { struct_page(&mut rng) }).collect();
        let mut mem: Vec<Vec<u8>> = (0..PAGES)
            .map(|_| match rng.below(100) {
                0..35 => vec![0; PS],
                35..55 => text_page(&mut rng),
                55..70 => struct_page(&mut rng),
                70..85 => random_page(&mut rng),
                _ => pool[rng.below(pool.len() as u64) as usize].clone(),
            })
            .collect();
        let dedup_pages = |s: &Sender| s.stats().pages_by_encoding[PageEncoding::Dedup as usize];
        let t = Instant::now();
        s.submit_baseline(now, mem.iter().enumerate().map(|(i, p)| (i as u64, &p[..])), b"").unwrap();
        let round0_time = t.elapsed();
        let round0 = s.stats();
        let round0_dedup = dedup_pages(&s);
        pump(&mut s, &mut r, now);
        apply_all(&mut r, &mut replica, now);
        pump(&mut s, &mut r, now);
        let mut spent = Duration::ZERO;
        for _ in 0..ROUNDS {
            let mut dirty = std::collections::BTreeSet::new();
            while dirty.len() < DIRTY {
                dirty.insert(if rng.below(100) < 80 { rng.below(HOT) } else { HOT + rng.below(PAGES - HOT) });
            }
            for &pfn in &dirty {
                let p = match rng.below(100) {
                    0..15 => vec![0; PS],
                    15..30 => mem[pfn as usize].clone(),
                    30..65 => touch(&mut rng, &mem[pfn as usize]),
                    65..80 => text_page(&mut rng),
                    80..85 => random_page(&mut rng),
                    _ => mem[rng.below(PAGES) as usize].clone(),
                };
                mem[pfn as usize] = p;
            }
            let t = Instant::now();
            s.submit(now, dirty.iter().map(|&pfn| (pfn, &mem[pfn as usize][..])), b"").unwrap();
            spent += t.elapsed();
            pump(&mut s, &mut r, now);
            apply_all(&mut r, &mut replica, now);
            pump(&mut s, &mut r, now);
        }
        assert!(replica.as_bytes().chunks(PS).zip(&mem).all(|(a, b)| a == &b[..]), "the destination differs");
        let after = s.stats();
        let round0_wire = round0.epoch_bytes;
        let rounds_wire = after.epoch_bytes - round0.epoch_bytes;
        let rounds_bytes = (ROUNDS * DIRTY * PS) as u64;
        wire_by.push((round0_wire, rounds_wire));
        let row = json!({
            "dedup": name,
            "round0_wire_bytes_per_page": round0_wire as f64 / PAGES as f64,
            "round0_encode_gbps": gbps(PAGES * PS as u64, round0_time),
            "round0_reference_share": round0_dedup as f64 / PAGES as f64,
            "rounds_wire_bytes_per_dirty_byte": rounds_wire as f64 / rounds_bytes as f64,
            "rounds_encode_gbps": gbps(rounds_bytes, spent),
            "rounds_reference_share": (dedup_pages(&s) - round0_dedup) as f64 / (ROUNDS * DIRTY) as f64,
        });
        let n = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {name} | {:.0} | {:.2} | {:.1}% | {:.3} | {:.2} | {:.1}% |",
            n("round0_wire_bytes_per_page"),
            n("round0_encode_gbps"),
            100.0 * n("round0_reference_share"),
            n("rounds_wire_bytes_per_dirty_byte"),
            n("rounds_encode_gbps"),
            100.0 * n("rounds_reference_share"),
        );
        record("dedup", row);
    }
    let ((off0, off), (on0, on)) = (wire_by[0], wire_by[1]);
    println!(
        "\nDedup on/off, bytes on the wire: round 0 {:.2}, later rounds {:.2}.\n",
        on0 as f64 / off0 as f64,
        on as f64 / off as f64
    );
}

fn main() {
    let load_before = testbed::harness::proc::loadavg();
    // `cargo bench` passes `--bench`; a filter argument picks one table.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let want = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    if want("kinds") {
        per_kind();
    }
    if want("primitives") {
        primitives();
    }
    if want("mix") {
        mix();
    }
    if want("dedup") {
        dedup();
    }
    let mut tables = serde_json::Map::new();
    for (table, row) in ROWS.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        match tables.entry(table).or_insert_with(|| json!([])) {
            Value::Array(rows) => rows.push(row),
            _ => unreachable!("every table is an array"),
        }
    }
    let results = json!({ "filter": filter, "tables": tables });
    testbed::harness::results::write_bench_json("codecs", &load_before, results).expect("write BENCH_JSON");
}
