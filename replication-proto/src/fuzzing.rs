//! Fuzz entry points, shared by the `cargo fuzz` targets in `replication-proto/fuzz` and by the
//! deterministic smoke test in `tests/fuzz_smoke.rs`. Each takes arbitrary bytes and must neither
//! panic nor allocate without bound; they check a few invariants on the way.

use crate::codec::{apply_delta, decode_page, validate_delta};
use crate::frame::{FrameDecoder, MessageKind, begin_frame, decode_datagram, finish_frame};
use crate::message::{EpochBegin, EpochEnd, Hello, Lineage, MemoryLayout, Message, Position, Role, VmIdentity};
use crate::pageset::{PageEncoding, parse_page_set};
use crate::session::Endpoint;
use crate::version::{PROTOCOL_VERSION, oldest_accepted};
use crate::wire::{Reader, put_u32, put_u64};
use crate::{Receiver, ReceiverConfig, ReceiverEvent};
use std::time::Instant;

pub mod smoke;

/// Frames and messages: the stream decoder (fed in pieces), the datagram decoder, and every
/// message decoder; whatever decodes must re-encode to the same payload.
pub fn frames(data: &[u8]) {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let mut d = FrameDecoder::new();
    let step = usize::from(split % 64) + 1;
    for piece in rest.chunks(step) {
        d.push(piece);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => check_message(f.kind, &f.payload),
                Ok(None) => break,
                Err(e) if e.is_fatal() => break,
                Err(_) => {}
            }
        }
        if d.is_broken() {
            break;
        }
    }
    if let Ok(f) = decode_datagram(rest) {
        check_message(f.kind, &f.payload);
    }
    if let Some(kind) = MessageKind::from_code(split % (MessageKind::ALL.len() as u8 + 1)) {
        check_message(kind, rest);
    }
}

fn check_message(kind: MessageKind, payload: &[u8]) {
    if let Ok(m) = Message::decode(kind, payload) {
        let mut again = Vec::new();
        m.encode_payload(&mut again);
        // Hello may carry an extension tail we do not keep; everything else is canonical,
        // except page request ranges (we merge adjacent ones) and page sets' range tables.
        if !matches!(
            kind,
            MessageKind::Hello | MessageKind::PageRequest | MessageKind::PageBatch | MessageKind::PageResponse
        ) {
            assert_eq!(again, payload, "{kind:?} decodes but does not re-encode the same");
        }
        assert_eq!(Message::decode(kind, &again).as_ref(), Ok(&m), "{kind:?} re-encoding does not decode the same");
    }
}

/// Page sets and page codecs: range table parsing, every record decoded into a page, and the
/// raw codec decoders on the bytes directly.
pub fn pages(data: &[u8]) {
    let [a, b, rest @ ..] = data else {
        return;
    };
    let page_size = 512usize << (a % 4);
    let mut page = vec![0x5au8; page_size];
    if let Ok(records) = parse_page_set(&mut Reader::new(rest)) {
        let mut prev = None;
        for r in records {
            assert!(prev.is_none_or(|p| r.pfn > p), "page set pfns ascend");
            prev = Some(r.pfn);
            let _ = decode_page(r.encoding, r.data, &mut page);
            assert_eq!(page.len(), page_size);
        }
    }
    let encoding = PageEncoding::ALL[usize::from(*b) % PageEncoding::ALL.len()];
    let _ = decode_page(encoding, rest, &mut page);
    assert_eq!(page.len(), page_size);
    let valid = validate_delta(rest, page_size).is_ok();
    assert_eq!(apply_delta(rest, &mut page).is_ok(), valid);
}

const FUZZ_PAGES: u64 = 64;

fn fuzz_layout() -> MemoryLayout {
    MemoryLayout::flat(4096, FUZZ_PAGES * 4096)
}

fn fuzz_vm() -> VmIdentity {
    VmIdentity { uuid: *b"fuzzing-fuzzing!", name: "fuzz".into() }
}

/// A receiver that has completed its handshake with a (pretend) primary.
fn connected_receiver(now: Instant) -> Receiver {
    connected_as(now, Role::Backup, None)
}

/// Where the reverse session of [`reverse`] starts: a switch-over at epoch 5 of a forward
/// lineage (so its first epoch is 6, in the lineage [`crate::migration::reverse_start`] derives).
pub fn reverse_fuzz_start() -> Position {
    crate::migration::reverse_start(Position { lineage: Lineage { origin: 1, baseline: 1 }, epoch: 5 })
}

/// A receiver of `role` that has completed its handshake with its (pretend) counterpart, both
/// told `start` (a reverse session) or neither.
fn connected_as(now: Instant, role: Role, start: Option<Position>) -> Receiver {
    let mut r = Receiver::new(ReceiverConfig::new(role, fuzz_vm(), fuzz_layout(), 2));
    if let Some(p) = start {
        r.start_at(p).expect("a migration source may start at a position");
    }
    r.connect(now);
    let hello = Hello {
        version: PROTOCOL_VERSION,
        min_version: oldest_accepted(PROTOCOL_VERSION),
        role: role.counterpart(),
        instance: 1,
        vm: fuzz_vm(),
        layout: fuzz_layout(),
        window: 4,
        committed: None,
        delivered: None,
        high_water: 0,
        session: 1,
        sends_checkpoints: true,
        start,
        inbound_log: false,
        side_copy_port: None,
        output_log: false,
    };
    let mut bytes = Vec::new();
    Message::Hello(hello).encode_frame(&mut bytes);
    r.handle_input(now, &bytes);
    while r.poll_transmit(now).is_some() {}
    r
}

fn drain(r: &mut Receiver, now: Instant) {
    let start = r.start();
    while r.poll_transmit(now).is_some() {}
    while let Some(ev) = r.poll_event() {
        if let ReceiverEvent::Checkpoint(cp) = ev {
            assert!(cp.page_count() as u64 <= FUZZ_PAGES);
            if let Some(p) = start {
                // Nothing at or before the position the series starts at is ever handed over.
                assert!(cp.epoch() > p.epoch, "checkpoint {} at or before the start {}", cp.epoch(), p.epoch);
            }
            let _ = r.committed(now, cp.epoch());
        }
    }
}

/// The receiver's epoch assembly around the state blob: a baseline whose state arrives in chunks
/// cut, ordered and checksummed as the input says. When the input plays by the rules the epoch
/// must come out whole with exactly that state.
pub fn state(data: &[u8]) {
    let [cuts, flags, rest @ ..] = data else {
        return;
    };
    let now = Instant::now();
    let mut r = connected_receiver(now);
    let lineage = Lineage { origin: 1, baseline: 1 };
    let mut bytes = Vec::new();
    Message::EpochBegin(EpochBegin { epoch: 1, lineage, baseline: true, page_count: 0, state_len: rest.len() as u64 })
        .encode_frame(&mut bytes);
    let chunk = usize::from(*cuts) + 1;
    let mut crc = crc32fast::Hasher::new();
    let mut frames: Vec<Vec<u8>> = Vec::new();
    for (seq, (i, c)) in rest.chunks(chunk).enumerate().enumerate() {
        let mut f = Vec::new();
        let at = begin_frame(&mut f, MessageKind::StateChunk);
        put_u64(&mut f, 1);
        put_u32(&mut f, seq as u32);
        let offset = (i * chunk) as u64;
        // Flag bit 0: lie about one offset.
        put_u64(&mut f, if flags & 1 != 0 && seq == 1 { offset + 1 } else { offset });
        f.extend_from_slice(c);
        finish_frame(&mut f, at);
        crc.update(&f[crate::limits::FRAME_HEADER_LEN..]);
        frames.push(f);
    }
    // Flag bit 1: send the chunks in reverse order (the receiver holds them until the gap fills).
    if flags & 2 != 0 {
        frames.reverse();
    }
    // Flag bit 2: drop the last one.
    if flags & 4 != 0 {
        frames.pop();
    }
    for f in &frames {
        bytes.extend_from_slice(f);
    }
    let frames_sent = rest.chunks(chunk).count() as u32;
    Message::EpochEnd(EpochEnd {
        epoch: 1,
        frames: frames_sent,
        page_count: 0,
        state_len: rest.len() as u64,
        // Flag bit 3: a wrong checksum.
        checksum: crc.finalize() ^ u32::from(flags & 8),
        digest: crate::hash::Digest::default().finish(),
    })
    .encode_frame(&mut bytes);
    r.handle_input(now, &bytes);
    let mut got = None;
    while let Some(ev) = r.poll_event() {
        if let ReceiverEvent::Checkpoint(cp) = ev {
            got = Some(cp);
        }
    }
    let lied = flags & 1 != 0 && frames_sent >= 2;
    let dropped = flags & 4 != 0 && frames_sent >= 1;
    let honest = !lied && !dropped && flags & 8 == 0;
    // Reversed, more frames than the receiver holds ahead of a gap: it waits for a resend.
    let too_many_held = flags & 2 != 0 && frames_sent as usize > 4096;
    match got {
        Some(cp) => {
            assert!(honest, "a dishonest epoch came out");
            assert_eq!(cp.state(), rest);
        }
        None => assert!(!honest || too_many_held, "an honest epoch did not come out"),
    }
}

/// The receiver against arbitrary frames with valid crcs: the input is a list of
/// `(kind u8, len u16, payload)`; the frame around each is made valid so the bytes reach the
/// message decoders and the state machine.
pub fn receiver(data: &[u8]) {
    let now = Instant::now();
    let mut r = connected_receiver(now);
    feed_frames(&mut r, data, now);
}

/// The receiver of a reverse session (a migration source told where the series starts,
/// [`reverse_fuzz_start`]) against arbitrary frames with valid crcs, as in [`receiver`]: it hands
/// over nothing at or before the start, and whatever it hands over is checked as there.
pub fn reverse(data: &[u8]) {
    let now = Instant::now();
    let mut r = connected_as(now, Role::MigrationSource, Some(reverse_fuzz_start()));
    feed_frames(&mut r, data, now);
}

/// Feeds `(kind u8, len u16, payload)` items as frames with valid crcs (see [`receiver`]).
fn feed_frames(r: &mut Receiver, data: &[u8], now: Instant) {
    let mut rd = Reader::new(data);
    let mut stream = Vec::new();
    while let (Ok(kind), Ok(len)) = (rd.u8("kind"), rd.u16("len")) {
        let payload = rd.bytes(usize::from(len).min(rd.remaining()), "payload").unwrap_or(&[]);
        let Some(kind) = MessageKind::from_code(kind % (MessageKind::ALL.len() as u8 + 1)) else {
            stream.extend_from_slice(payload);
            continue;
        };
        let at = begin_frame(&mut stream, kind);
        stream.extend_from_slice(payload);
        if stream.len() - at - crate::limits::FRAME_HEADER_LEN <= kind.max_payload() {
            finish_frame(&mut stream, at);
        }
    }
    for piece in stream.chunks(997) {
        r.handle_input(now, piece);
        drain(r, now);
    }
    r.handle_timeout(now + std::time::Duration::from_millis(60));
    drain(r, now);
}

/// A migration destination's bulk path: each `(kind u8, len u16, payload)` of the input becomes
/// one whole frame handed to `handle_frame` (kind codes with the high bit set get a wrong payload
/// crc). Whatever comes out as pages holds exactly `pfns.len()` pages of the layout, ascending;
/// anything but a page response ends the session.
pub fn bulk(data: &[u8]) {
    let now = Instant::now();
    let mut r = connected_as(now, Role::MigrationDestination, None);
    while r.poll_event().is_some() {}
    let mut rd = Reader::new(data);
    let mut ended = false;
    while let (Ok(code), Ok(len)) = (rd.u8("kind"), rd.u16("len")) {
        let payload = rd.bytes(usize::from(len).min(rd.remaining()), "payload").unwrap_or(&[]);
        let Some(kind) = MessageKind::from_code((code & 0x7f) % (MessageKind::ALL.len() as u8 + 1)) else {
            r.handle_frame(now, payload);
            continue;
        };
        let mut frame = Vec::new();
        let at = begin_frame(&mut frame, kind);
        frame.extend_from_slice(payload);
        if frame.len() - at - crate::limits::FRAME_HEADER_LEN <= kind.max_payload() {
            finish_frame(&mut frame, at);
        }
        if code & 0x80 != 0 && frame.len() > crate::limits::FRAME_HEADER_LEN {
            let last = frame.len() - 1;
            frame[last] ^= 1;
        }
        r.handle_frame(now, &frame);
        while let Some(ev) = r.poll_event() {
            match ev {
                ReceiverEvent::Pages { pfns, data, .. } => {
                    assert!(!ended, "pages after the session ended");
                    assert_eq!(data.len(), pfns.len() * 4096, "pages back to back");
                    assert!(pfns.windows(2).all(|w| w[0] < w[1]), "pfns ascend");
                    assert!(pfns.iter().all(|&p| p < FUZZ_PAGES), "pfns in the layout");
                }
                ReceiverEvent::Disconnected { .. } => ended = true,
                _ => {}
            }
        }
        while r.poll_transmit(now).is_some() {}
    }
}

/// Pages of the staged layout in [`apply`] (few: each input builds and compares whole replicas).
pub const APPLY_PAGES: u64 = 16;

/// `Checkpoint::apply` against an in-memory replica: a checkpoint staged from an arbitrary page
/// set (records that do not stage are left out, as the receiver would refuse them), with the
/// sender's digest either computed honestly or taken from the input, applied to a replica whose
/// layout may miss some of its pages. Never panics; on `Err` the replica is byte for byte what it
/// was; on `Ok` it holds exactly what the checkpoint says; an honest checkpoint whose pages all
/// exist and decode always applies; `verify` and `apply` agree.
///
/// Input: `[flags, fill, digest: u64 le, page set...]`. Flags: bits 0-1 the page size
/// (512 << n), bit 2 baseline, bit 3 a digest from the input instead of the honest one, bits 4-5
/// the replica (the staged layout of [`APPLY_PAGES`] pages, its first three quarters, the layout
/// with a hole, or pages of twice the size).
pub fn apply(data: &[u8]) {
    use crate::checkpoint::{CheckpointBuilder, MemoryImage, PageContent, ReplicaMemory};
    use crate::hash::{Digest, xxh64};
    use crate::message::{GuestRange, PageIndex};

    let [flags, fill, rest @ ..] = data else {
        return;
    };
    let Some((digest_bytes, set)) = rest.split_first_chunk::<8>() else {
        return;
    };
    let page_size = 512u32 << (flags & 3);
    let ps = u64::from(page_size);
    let baseline = flags & 4 != 0;
    let staged = MemoryLayout::flat(page_size, APPLY_PAGES * ps);
    let replica_layout = match (flags >> 4) & 3 {
        0 => staged.clone(),
        1 => MemoryLayout::flat(page_size, APPLY_PAGES * 3 / 4 * ps),
        2 => MemoryLayout {
            page_size,
            ranges: vec![GuestRange { start: 0, len: 4 * ps }, GuestRange { start: 6 * ps, len: 10 * ps }],
        },
        _ => MemoryLayout::flat(page_size * 2, APPLY_PAGES * ps),
    };
    let mut replica = MemoryImage::new(&replica_layout);
    let replica_ps = u64::from(replica_layout.page_size);
    for pfn in 0..APPLY_PAGES * ps / replica_ps {
        if let Some(page) = replica.page_mut(pfn) {
            for (i, block) in page.chunks_mut(64).enumerate() {
                block.fill(fill.wrapping_mul(pfn as u8 | 1).wrapping_add(i as u8));
            }
        }
    }
    let before = replica.clone();

    let Ok(records) = parse_page_set(&mut Reader::new(set)) else {
        return;
    };
    let index = PageIndex::new(&staged);
    let stage = |digest: u64| {
        let mut builder = CheckpointBuilder::new(7, Lineage { origin: 1, baseline: 1 }, baseline, page_size as usize);
        for r in &records {
            let _ = builder.push(r, &index);
        }
        builder.push_state(b"state");
        builder.finish(digest)
    };

    // What the replica must hold afterwards, and the digest of it, page by page.
    let mut model = before.clone();
    if baseline {
        model.zero_all();
    }
    let mut digest = Digest::default();
    let mut applies = true;
    for p in stage(0).pages() {
        // A dedup reference copies a page the epoch already wrote, or one it leaves untouched.
        let copied = match p.content {
            PageContent::Copy { from, check } => {
                match model.page(from).filter(|s| s.len() == page_size as usize && crate::hash::dedup_check(s) == check)
                {
                    Some(s) => Some(s.to_vec()),
                    None => {
                        applies = false;
                        break;
                    }
                }
            }
            _ => None,
        };
        let Some(page) = model.page_mut(p.pfn).filter(|p| p.len() == page_size as usize) else {
            applies = false;
            break;
        };
        match p.content {
            PageContent::Zero => page.fill(0),
            PageContent::Unchanged => {}
            PageContent::Full(bytes) => page.copy_from_slice(bytes),
            PageContent::Copy { .. } => {
                if let Some(c) = &copied {
                    page.copy_from_slice(c);
                }
            }
            PageContent::Delta(d) => {
                if apply_delta(d, page).is_err() {
                    applies = false;
                    break;
                }
            }
        }
        digest.add(p.pfn, xxh64(page));
    }
    let honest = flags & 8 == 0;
    let cp = stage(if honest { digest.finish() } else { u64::from_le_bytes(*digest_bytes) });

    let verified = cp.verify(&replica);
    let result = cp.apply(&mut replica);
    assert_eq!(verified.is_ok(), result.is_ok(), "verify and apply disagree: {verified:?} vs {result:?}");
    match result {
        Ok(()) => {
            assert!(applies, "a checkpoint with a missing or undecodable page applied");
            assert!(replica == model, "the applied replica is not what the checkpoint says");
        }
        Err(e) => {
            assert!(replica == before, "a refused checkpoint wrote the replica ({e})");
            assert!(!(honest && applies), "an honest checkpoint was refused: {e}");
        }
    }
}
