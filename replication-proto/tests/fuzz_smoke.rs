//! A short, deterministic fuzz run inside `cargo test`: random and mutated inputs into each fuzz
//! entry point (the same functions the `cargo fuzz` targets in `fuzz/` call), so every test run
//! exercises the decoders on hostile input without cargo-fuzz.
//!
//! `FUZZ_SMOKE_ITERS` sets the inputs per target (default 300,000 in release, 20,000 in debug);
//! `FUZZ_SEED_DIR` also writes the seeds out as files (see `replication_proto::fuzzing::smoke`).

use replication_proto::frame::{MessageKind, begin_frame, finish_frame};
use replication_proto::fuzzing::{self, smoke};
use replication_proto::message::{EpochBegin, EpochEnd, Heartbeat, Lineage, Message, PageBatch, PageResponse};
use replication_proto::pageset::{EncodedPage, PageEncoding, write_page_set};

/// Valid inputs to start mutating from.
fn seeds() -> Vec<Vec<u8>> {
    let lineage = Lineage { origin: 1, baseline: 1 };
    let text: Vec<u8> = b"checkpoint ".iter().copied().cycle().take(4096).collect();
    let mut old = text.clone();
    old[10] = b'X';
    let mut delta = Vec::new();
    replication_proto::codec::encode_delta(&old, &text, &mut delta, 4096);
    let pages = vec![
        EncodedPage { pfn: 1, encoding: PageEncoding::Zero, data: vec![] },
        EncodedPage { pfn: 2, encoding: PageEncoding::Lz4, data: lz4_flex::block::compress(&text) },
        EncodedPage { pfn: 3, encoding: PageEncoding::Delta, data: delta.clone() },
        EncodedPage { pfn: 9, encoding: PageEncoding::Raw, data: text.clone() },
    ];
    let mut out = Vec::new();
    let msgs = [
        Message::EpochBegin(EpochBegin { epoch: 1, lineage, baseline: true, page_count: 4, state_len: 3 }),
        Message::PageBatch(PageBatch { epoch: 1, seq: 0, pages: pages.clone() }),
        Message::EpochEnd(EpochEnd { epoch: 1, frames: 1, page_count: 4, state_len: 0, checksum: 0, digest: 0 }),
        Message::Heartbeat(Heartbeat::default()),
        Message::Ack { epoch: 3 },
        Message::PageResponse(PageResponse { id: 0, pages: pages[..2].to_vec() }),
    ];
    let mut stream = vec![7u8];
    for m in &msgs {
        m.encode_frame(&mut stream);
        let mut one = vec![m.kind().code()];
        m.encode_frame(&mut one);
        out.push(one);
    }
    out.push(stream);
    let mut set = vec![0u8, 3];
    write_page_set(&mut set, &pages);
    out.push(set);
    // Checkpoint inputs: flags (4 KiB pages, honest digest; then a baseline; then a short
    // replica), fill, a digest, the page set.
    for flags in [3u8, 7, 0x13] {
        let mut set = Vec::new();
        write_page_set(&mut set, if flags & 4 != 0 { &pages[..2] } else { &pages });
        out.push([vec![flags, 9], vec![0; 8], set].concat());
    }
    out.push([vec![1, 4], delta].concat());
    out.push([vec![1, 3], lz4_flex::block::compress(&text)].concat());
    // Receiver inputs: (kind, len, payload) triples.
    let mut rx = Vec::new();
    for m in &msgs {
        let mut p = Vec::new();
        m.encode_payload(&mut p);
        rx.push(m.kind().code());
        rx.extend_from_slice(&(p.len() as u16).to_le_bytes());
        rx.extend_from_slice(&p);
    }
    out.push(rx);
    out.push(reverse_seed(&pages[2..]));
    out.push(vec![3, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    // A frame whose crcs we fix after mutating, below.
    let mut f = Vec::new();
    let at = begin_frame(&mut f, MessageKind::Goodbye);
    f.extend_from_slice(&[0, 2, 0, b'h', b'i']);
    finish_frame(&mut f, at);
    out.push([vec![10], f].concat());
    out
}

/// A receiver input for the reverse session of `fuzzing::reverse`: its first epoch (the one after
/// the start, in the start's lineage, not a baseline), whole, with a true checksum.
fn reverse_seed(pages: &[EncodedPage]) -> Vec<u8> {
    let start = fuzzing::reverse_fuzz_start();
    let epoch = start.epoch + 1;
    let begin =
        EpochBegin { epoch, lineage: start.lineage, baseline: false, page_count: pages.len() as u64, state_len: 0 };
    let batch = Message::PageBatch(PageBatch { epoch, seq: 0, pages: pages.to_vec() });
    let mut payload = Vec::new();
    batch.encode_payload(&mut payload);
    let checksum = crc32fast::hash(&payload);
    let end = EpochEnd { epoch, frames: 1, page_count: pages.len() as u64, state_len: 0, checksum, digest: 0 };
    let mut rx = Vec::new();
    for m in [Message::EpochBegin(begin), batch, Message::EpochEnd(end), Message::Ack { epoch }] {
        let mut p = Vec::new();
        m.encode_payload(&mut p);
        rx.push(m.kind().code());
        rx.extend_from_slice(&(p.len() as u16).to_le_bytes());
        rx.extend_from_slice(&p);
    }
    rx
}

/// Re-seals every frame whose header still parses, so mutated payloads reach the decoders.
fn reseal(input: &mut [u8]) {
    let mut at = 1;
    while at + 16 <= input.len() {
        if &input[at..at + 2] != b"US" {
            return;
        }
        let len = u32::from_le_bytes(input[at + 4..at + 8].try_into().unwrap()) as usize;
        if at + 16 + len > input.len() {
            return;
        }
        let crc = crc32fast::hash(&input[at + 16..at + 16 + len]);
        input[at + 8..at + 12].copy_from_slice(&crc.to_le_bytes());
        let h = crc32fast::hash(&input[at..at + 12]);
        input[at + 12..at + 16].copy_from_slice(&h.to_le_bytes());
        at += 16 + len;
    }
}

fn run(target: fn(&[u8]), name: &str, salt: u64, scale: usize) {
    let n = smoke::iterations(300_000, 20_000) / scale;
    let reseal_half = |rng: &mut smoke::Rng, input: &mut Vec<u8>| {
        if rng.below(2) == 0 {
            reseal(input);
        }
    };
    smoke::run(name, &seeds(), salt, n, reseal_half, target);
}

#[test]
fn fuzz_smoke_frames() {
    run(fuzzing::frames, "frames", 1, 1);
}

#[test]
fn fuzz_smoke_pages() {
    run(fuzzing::pages, "pages", 2, 1);
}

#[test]
fn fuzz_smoke_state() {
    // Each input here is a whole epoch of up to thousands of frames: fewer of them.
    run(fuzzing::state, "state", 3, 16);
}

#[test]
fn fuzz_smoke_apply() {
    run(fuzzing::apply, "apply", 5, 4);
}

#[test]
fn fuzz_smoke_receiver() {
    run(fuzzing::receiver, "receiver", 4, 4);
}

#[test]
fn fuzz_smoke_reverse() {
    run(fuzzing::reverse, "reverse", 7, 4);
}

#[test]
fn fuzz_smoke_bulk() {
    run(fuzzing::bulk, "bulk", 6, 4);
}
