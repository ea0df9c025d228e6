//! Property tests: every message and every page codec round-trips; decoders never panic on
//! arbitrary bytes.

use proptest::prelude::*;
use replication_proto::GoodbyeReason;
use replication_proto::codec::{
    CodecConfig, DedupRef, PageEncoder, apply_delta, decode_page, encode_delta, validate_delta,
};
use replication_proto::frame::{FrameDecoder, MessageKind, decode_datagram};
use replication_proto::message::{
    EpochBegin, EpochEnd, Goodbye, GuestRange, Heartbeat, Hello, Lineage, MemoryLayout, Message, OutputFrames,
    PageBatch, PageRequest, PageResponse, Position, ResendRequest, ResyncReason, ResyncRequest, Role, StateChunk,
    VmIdentity,
};
use replication_proto::migration::{Complete, Handover, PageMap, PfnRange, Resumed, SwitchMode, SwitchOver};
use replication_proto::pageset::{EncodedPage, PageEncoding, parse_page_set};
use replication_proto::wire::Reader;

fn lineage() -> impl Strategy<Value = Lineage> {
    (any::<u64>(), any::<u64>()).prop_map(|(origin, baseline)| Lineage { origin, baseline })
}

fn position() -> impl Strategy<Value = Option<Position>> {
    proptest::option::of((lineage(), any::<u64>()).prop_map(|(lineage, epoch)| Position { lineage, epoch }))
}

fn layout() -> impl Strategy<Value = MemoryLayout> {
    (9u32..=16, proptest::collection::vec((0u64..1000, 1u64..1000), 0..6)).prop_map(|(shift, gaps)| {
        let page_size = 1u32 << shift;
        let ps = u64::from(page_size);
        let mut start = 0;
        let ranges = gaps
            .into_iter()
            .map(|(gap, len)| {
                let r = GuestRange { start: start + gap * ps, len: len * ps };
                start = r.start + r.len;
                r
            })
            .collect();
        MemoryLayout { page_size, ranges }
    })
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Primary), Just(Role::Backup), Just(Role::MigrationSource), Just(Role::MigrationDestination)]
}

fn encoded_pages(self_contained: bool) -> impl Strategy<Value = Vec<EncodedPage>> {
    proptest::collection::vec((1u64..4, 0usize..6, proptest::collection::vec(any::<u8>(), 0..300)), 0..40).prop_map(
        move |items| {
            let mut pfn = 0u64;
            items
                .into_iter()
                .map(|(step, e, data)| {
                    pfn += step;
                    let all = if self_contained {
                        &[PageEncoding::Zero, PageEncoding::Raw, PageEncoding::Lz4][..]
                    } else {
                        &PageEncoding::ALL[..]
                    };
                    let encoding = all[e % all.len()];
                    EncodedPage { pfn, encoding, data: if encoding.has_payload() { data } else { Vec::new() } }
                })
                .collect()
        },
    )
}

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..max / 4).prop_map(|c| c.into_iter().collect())
}

fn message() -> impl Strategy<Value = Message> {
    let epoch = 1u64..u64::MAX;
    prop_oneof![
        (
            any::<u16>(),
            any::<u16>(),
            role(),
            any::<u64>(),
            any::<[u8; 16]>(),
            text(255),
            layout(),
            any::<u16>(),
            position(),
            position(),
            (any::<u64>(), any::<u64>(), any::<bool>(), position())
        )
            .prop_map(
                |(
                    version,
                    min_version,
                    role,
                    instance,
                    uuid,
                    name,
                    layout,
                    window,
                    c,
                    d,
                    (hw, session, sends, start),
                )| {
                    Message::Hello(Hello {
                        version,
                        min_version,
                        role,
                        instance,
                        vm: VmIdentity { uuid, name },
                        layout,
                        window,
                        committed: c,
                        delivered: d,
                        high_water: hw,
                        session,
                        // Version 1 has no flags byte: the role decides.
                        sends_checkpoints: if version >= 2 { sends } else { role.is_sender() },
                        // The starting position rides on the flags byte: version 2 on.
                        start: if version >= 2 { start } else { None },
                        // The inbound-log capability rides on the flags byte too.
                        inbound_log: version >= 2 && sends,
                        side_copy_port: (version >= 2 && hw % 2 == 0).then_some((session % 65_535) as u16 + 1),
                        // And so does the output-log capability.
                        output_log: version >= 2 && hw % 3 == 0,
                    })
                }
            ),
        (epoch.clone(), lineage(), any::<bool>(), any::<u64>(), any::<u64>()).prop_map(
            |(epoch, lineage, baseline, page_count, state_len)| {
                Message::EpochBegin(EpochBegin { epoch, lineage, baseline, page_count, state_len })
            }
        ),
        (epoch.clone(), any::<u32>(), encoded_pages(false))
            .prop_map(|(epoch, seq, pages)| Message::PageBatch(PageBatch { epoch, seq, pages })),
        (epoch.clone(), any::<u32>(), any::<u64>(), proptest::collection::vec(any::<u8>(), 0..2000))
            .prop_map(|(epoch, seq, offset, data)| Message::StateChunk(StateChunk { epoch, seq, offset, data })),
        (epoch.clone(), any::<u32>(), any::<u64>(), any::<u64>(), any::<u32>(), any::<u64>()).prop_map(
            |(epoch, frames, page_count, state_len, checksum, digest)| {
                Message::EpochEnd(EpochEnd { epoch, frames, page_count, state_len, checksum, digest })
            }
        ),
        epoch.clone().prop_map(|epoch| Message::Ack { epoch }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(last_sent, committed)| { Message::Heartbeat(Heartbeat { last_sent, committed }) }),
        (epoch.clone(), any::<u32>())
            .prop_map(|(from_epoch, request)| { Message::ResendRequest(ResendRequest { from_epoch, request }) }),
        (
            any::<u64>(),
            prop_oneof![Just(ResyncReason::Rejected), Just(ResyncReason::UnknownLineage), Just(ResyncReason::Empty)]
        )
            .prop_map(|(delivered, reason)| Message::ResyncRequest(ResyncRequest { delivered, reason })),
        (
            prop_oneof![
                Just(GoodbyeReason::Normal),
                Just(GoodbyeReason::ProtocolError),
                Just(GoodbyeReason::Version),
                Just(GoodbyeReason::Mismatch),
                Just(GoodbyeReason::Cancelled)
            ],
            text(512)
        )
            .prop_map(|(reason, detail)| Message::Goodbye(Goodbye { reason, detail })),
        (any::<u64>(), proptest::collection::btree_set(0u64..100_000, 0..200))
            .prop_map(|(id, pfns)| Message::PageRequest(PageRequest { id, pfns: pfns.into_iter().collect() })),
        (any::<u64>(), encoded_pages(true)).prop_map(|(id, pages)| Message::PageResponse(PageResponse { id, pages })),
        (
            epoch.clone(),
            any::<u64>(),
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..1600), 1..20)
        )
            .prop_map(|(epoch, harvest, frames)| Message::Output(OutputFrames { epoch, harvest, frames })),
        migration_message(),
    ]
}

/// Ascending, disjoint runs of pages.
fn pfn_runs() -> impl Strategy<Value = Vec<PfnRange>> {
    proptest::collection::vec((0u64..1000, 1u32..1000), 0..50).prop_map(|steps| {
        let mut next = 0u64;
        steps
            .into_iter()
            .map(|(gap, count)| {
                let r = PfnRange { first: next + gap, count };
                next = r.first + u64::from(count);
                r
            })
            .collect()
    })
}

fn migration_message() -> BoxedStrategy<Message> {
    let epoch = 1u64..u64::MAX;
    prop_oneof![
        (epoch.clone(), any::<u32>(), any::<u64>()).prop_map(|(epoch, map_frames, held_pages)| {
            Message::SwitchOver(SwitchOver {
                epoch,
                mode: SwitchMode::PostCopy,
                map_frames: map_frames % 8193,
                held_pages,
            })
        }),
        epoch.clone().prop_map(|epoch| Message::SwitchOver(SwitchOver {
            epoch,
            mode: SwitchMode::Complete,
            map_frames: 0,
            held_pages: 0
        })),
        (epoch.clone(), any::<u32>(), pfn_runs()).prop_map(|(epoch, seq, held)| Message::PageMap(PageMap {
            epoch,
            seq,
            held
        })),
        any::<u64>().prop_map(|epoch| Message::Handover(Handover { epoch })),
        (epoch, any::<u64>(), any::<u64>()).prop_map(|(epoch, cpu_us, peak_rss_bytes)| Message::Resumed(Resumed {
            epoch,
            cpu_us,
            peak_rss_bytes
        })),
        (any::<u64>(), any::<u64>(), any::<u32>(), any::<u32>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(pages, faults, fault_us_p50, fault_us_p99, blocked_us, demanded, pushed)| {
                Message::Complete(Complete { pages, faults, fault_us_p50, fault_us_p99, blocked_us, demanded, pushed })
            }
        ),
    ]
    .boxed()
}

/// A page with structure: runs of a few byte values, some text-like.
fn page_bytes(size: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec((any::<u8>(), 1usize..600), 1..20).prop_map(move |runs| {
        let mut p = Vec::with_capacity(size);
        for (b, n) in runs.iter().cycle() {
            if p.len() >= size {
                break;
            }
            p.extend(std::iter::repeat_n(*b, *n));
        }
        p.truncate(size);
        p
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_message_round_trips(m in message(), split in 1usize..64) {
        let mut bytes = Vec::new();
        m.encode_frame(&mut bytes);
        // Through the stream decoder, in pieces.
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for piece in bytes.chunks(split) {
            d.push(piece);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        prop_assert_eq!(got.len(), 1);
        let f = &got[0];
        prop_assert_eq!(f.kind, m.kind());
        let back = Message::decode(f.kind, &f.payload);
        // A Hello with an invalid layout is refused by design; our generator makes valid ones.
        prop_assert_eq!(back.unwrap(), m.clone());
        // And as a datagram.
        let f = decode_datagram(&bytes).unwrap();
        prop_assert_eq!(Message::decode(f.kind, &f.payload).unwrap(), m);
    }

    #[test]
    fn page_sets_round_trip(pages in encoded_pages(false)) {
        let mut out = Vec::new();
        replication_proto::pageset::write_page_set(&mut out, &pages);
        let got = parse_page_set(&mut Reader::new(&out)).unwrap();
        prop_assert_eq!(got, pages.iter().map(EncodedPage::as_record).collect::<Vec<_>>());
    }

    #[test]
    fn delta_round_trips(old in page_bytes(4096), edits in proptest::collection::vec((0usize..4096, any::<u8>(), 1usize..64), 0..40)) {
        let mut new = old.clone();
        for (at, b, n) in edits {
            let end = (at + n).min(4096);
            new[at..end].fill(b);
        }
        let mut d = Vec::new();
        prop_assert!(encode_delta(&old, &new, &mut d, usize::MAX));
        validate_delta(&d, 4096).unwrap();
        let mut page = old.clone();
        apply_delta(&d, &mut page).unwrap();
        prop_assert_eq!(page, new);
    }

    #[test]
    fn encoder_output_decodes_to_the_page(
        base in page_bytes(4096),
        new in page_bytes(4096),
        use_base in any::<bool>(),
        lz4 in any::<bool>(),
        delta in any::<bool>(),
    ) {
        let mut enc = PageEncoder::new(CodecConfig { lz4, delta, dedup: false });
        let (encoding, data) = enc.encode(&new, use_base.then_some(&base[..]));
        prop_assert!(data.len() <= 4096);
        let mut page = base.clone();
        decode_page(encoding, data, &mut page).unwrap();
        prop_assert_eq!(&page, &new);
    }

    #[test]
    fn dedup_references_round_trip_and_decode_totally(
        from in any::<u64>(),
        page in page_bytes(4096),
        junk in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let r = DedupRef::to(from, &page);
        prop_assert_eq!(DedupRef::decode(&r.encode()).unwrap(), r);
        prop_assert!(r.verify(&page).is_ok());
        let mut out = page.clone();
        decode_page(PageEncoding::Dedup, &r.encode(), &mut out).unwrap();
        prop_assert_eq!(&out, &page);
        // Any other length is refused; any 16 bytes decode.
        prop_assert_eq!(DedupRef::decode(&junk).is_ok(), junk.len() == 16);
    }

    #[test]
    fn message_decoder_is_total(kind in 1u8..=17, payload in proptest::collection::vec(any::<u8>(), 0..512)) {
        let kind = MessageKind::from_code(kind).unwrap();
        let _ = Message::decode(kind, &payload);
    }

    #[test]
    fn frame_decoder_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut d = FrameDecoder::new();
        d.push(&bytes);
        for _ in 0..64 {
            match d.next_frame() {
                Ok(None) => break,
                Ok(Some(_)) => {}
                Err(e) if e.is_fatal() => break,
                Err(_) => {}
            }
        }
        let _ = decode_datagram(&bytes);
    }

    #[test]
    fn page_decoders_are_total(encoding in 0u8..6, data in proptest::collection::vec(any::<u8>(), 0..5000), shift in 9u32..=13) {
        let encoding = PageEncoding::from_code(encoding).unwrap();
        let mut page = vec![7u8; 1 << shift];
        let _ = decode_page(encoding, &data, &mut page);
        prop_assert_eq!(page.len(), 1 << shift);
        let _ = parse_page_set(&mut Reader::new(&data));
    }
}
