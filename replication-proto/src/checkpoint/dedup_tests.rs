//! Dedup references in checkpoints: how the receiver stages them and how the owner resolves,
//! verifies and applies them.

use super::*;
use crate::codec::{DedupRef, encode_delta};
use crate::hash::is_zero;
use crate::message::MemoryLayout;

const PS: usize = 512;
const PAGES: u64 = 16;

fn layout(pages: u64) -> MemoryLayout {
    MemoryLayout::flat(PS as u32, pages * PS as u64)
}

fn page(fill: u8) -> Vec<u8> {
    (0..PS).map(|i| fill.wrapping_add((i / 7) as u8)).collect()
}

/// A replica whose page `p` holds `page(p + 100)`.
fn replica() -> MemoryImage {
    let mut m = MemoryImage::new(&layout(PAGES));
    for pfn in 0..PAGES {
        m.page_mut(pfn).unwrap().copy_from_slice(&page(pfn as u8 + 100));
    }
    m
}

/// What a record says, in a test: the content it gives the page is worked out by the test.
enum Rec {
    Zero,
    Unchanged,
    Raw(Vec<u8>),
    Delta(Vec<u8>),
    Copy(u64),
    /// A reference with a wrong check.
    BadCopy(u64),
}

/// Stages `records` (ascending pfns) as epoch 5 and returns the checkpoint with the honest
/// digest of `expected` (the pages as they must be after it), or the staging error.
fn stage(baseline: bool, records: &[(u64, Rec)], expected: &MemoryImage) -> Result<Checkpoint, StageError> {
    let layout = layout(PAGES);
    let index = PageIndex::new(&layout);
    let mut b = CheckpointBuilder::new(5, Lineage { origin: 1, baseline: 1 }, baseline, PS);
    let mut digest = Digest::default();
    for (pfn, rec) in records {
        let after = expected.page(*pfn).unwrap();
        let payload;
        let (encoding, data): (PageEncoding, &[u8]) = match rec {
            Rec::Zero => (PageEncoding::Zero, &[]),
            Rec::Unchanged => (PageEncoding::Unchanged, &[]),
            Rec::Raw(p) => (PageEncoding::Raw, p),
            Rec::Delta(d) => (PageEncoding::Delta, d),
            Rec::Copy(from) => {
                payload = DedupRef::to(*from, after).encode();
                (PageEncoding::Dedup, &payload)
            }
            Rec::BadCopy(from) => {
                payload = DedupRef { from: *from, check: 7 }.encode();
                (PageEncoding::Dedup, &payload)
            }
        };
        b.push(&PageRecord { pfn: *pfn, encoding, data }, &index)?;
        digest.add(*pfn, xxh64(after));
    }
    Ok(b.finish(digest.finish()))
}

#[test]
fn references_resolve_to_earlier_pages_of_the_epoch_and_to_untouched_pages() {
    let base = replica();
    let mut want = base.clone();
    let a = page(1);
    let mut d = page(3);
    // 2: raw A; 4: copy of 2 (A, written this epoch); 6: copy of 4 (a chain: A);
    // 7: copy of 12 (untouched, above); 8: copy of 0 (untouched, below);
    // 9: zeroed; 10: copy of 9 (zero); 11: unchanged; 13: copy of 11 (11's old content);
    // 14: delta on the replica's page; 15: copy of 14 (the delta's result).
    let old14 = base.page(14).unwrap().to_vec();
    d.copy_from_slice(&old14);
    d[10..20].fill(0xee);
    let mut delta = Vec::new();
    assert!(encode_delta(&old14, &d, &mut delta, PS));
    for (pfn, content) in [
        (2, a.clone()),
        (4, a.clone()),
        (6, a.clone()),
        (7, base.page(12).unwrap().to_vec()),
        (8, base.page(0).unwrap().to_vec()),
        (9, vec![0; PS]),
        (10, vec![0; PS]),
        (13, base.page(11).unwrap().to_vec()),
        (14, d.clone()),
        (15, d.clone()),
    ] {
        want.page_mut(pfn).unwrap().copy_from_slice(&content);
    }
    let records = [
        (2, Rec::Raw(a.clone())),
        (4, Rec::Copy(2)),
        (6, Rec::Copy(4)),
        (7, Rec::Copy(12)),
        (8, Rec::Copy(0)),
        (9, Rec::Zero),
        (10, Rec::Copy(9)),
        (11, Rec::Unchanged),
        (13, Rec::Copy(11)),
        (14, Rec::Delta(delta)),
        (15, Rec::Copy(14)),
    ];
    let cp = stage(false, &records, &want).unwrap();
    assert_eq!(cp.copies(), 7);
    assert!(matches!(cp.pages().nth(1).unwrap().content, PageContent::Copy { from: 2, .. }));
    let mut mem = base.clone();
    cp.verify(&mem).unwrap();
    cp.apply(&mut mem).unwrap();
    assert!(mem == want, "the replica is not what the checkpoint says");
}

#[test]
fn a_baseline_may_refer_only_to_its_own_earlier_pages() {
    let mut want = MemoryImage::new(&layout(PAGES));
    let a = page(9);
    for pfn in [1, 3, 5] {
        want.page_mut(pfn).unwrap().copy_from_slice(&a);
    }
    let cp = stage(true, &[(1, Rec::Raw(a.clone())), (3, Rec::Copy(1)), (5, Rec::Copy(3))], &want).unwrap();
    let mut mem = replica();
    cp.apply(&mut mem).unwrap();
    assert!(mem == want);
    assert!(is_zero(mem.page(0).unwrap()), "a baseline zeroes what it does not write");
    // Below, but not in the baseline: the replica is zeroed first, the reference would be
    // ambiguous. Above: never in a baseline.
    for (records, from) in [(vec![(3, Rec::Copy(0))], 0), (vec![(3, Rec::Copy(9))], 9)] {
        let e = stage(true, &records, &want).unwrap_err();
        assert!(matches!(e, StageError::Reference { pfn: 3, from: f, .. } if f == from), "{e}");
    }
}

#[test]
fn bad_references_are_refused_at_staging() {
    let want = replica();
    let cases: Vec<(Vec<(u64, Rec)>, &str)> = vec![
        (vec![(3, Rec::Copy(3))], "names the page itself"),
        (vec![(3, Rec::Copy(PAGES))], "outside the memory layout"),
        // 3 refers to 6, and 6 comes later in the epoch: refused when 6 arrives.
        (vec![(3, Rec::Copy(6)), (4, Rec::Zero), (6, Rec::Zero)], "comes later in the epoch"),
    ];
    for (records, what) in cases {
        let e = stage(false, &records, &want).unwrap_err();
        assert!(e.to_string().contains(what), "{e}");
        assert!(matches!(e, StageError::Reference { pfn: 3, .. }), "{e}");
    }
    // A payload that is not 16 bytes.
    let index = PageIndex::new(&layout(PAGES));
    let mut b = CheckpointBuilder::new(5, Lineage { origin: 1, baseline: 1 }, false, PS);
    let rec = PageRecord { pfn: 1, encoding: PageEncoding::Dedup, data: &[0; 15] };
    assert!(matches!(b.push(&rec, &index), Err(StageError::Codec { source: CodecError::DedupLength { len: 15 }, .. })));
}

#[test]
fn a_reference_whose_check_fails_refuses_the_whole_checkpoint() {
    let base = replica();
    let mut want = base.clone();
    let a = page(1);
    want.page_mut(2).unwrap().copy_from_slice(&a);
    want.page_mut(4).unwrap().copy_from_slice(base.page(9).unwrap());
    // The digest is honest, but the reference's check names other content (as after a hash
    // collision at the sender): refused, nothing written (page 2 comes first and stays).
    let cp = stage(false, &[(2, Rec::Raw(a)), (4, Rec::BadCopy(9))], &want).unwrap();
    let mut mem = base.clone();
    let e = cp.apply(&mut mem).unwrap_err();
    assert!(
        matches!(e, ApplyError::Decode { epoch: 5, pfn: 4, source: CodecError::DedupCheck { from: 9, .. } }),
        "{e}"
    );
    assert!(mem == base);
    // The replica drifted from what the sender believes page 9 holds: the check catches it too.
    let cp = stage(false, &[(4, Rec::Copy(9))], &want).unwrap();
    let mut drifted = base.clone();
    drifted.page_mut(9).unwrap()[0] ^= 1;
    let before = drifted.clone();
    assert!(matches!(cp.apply(&mut drifted), Err(ApplyError::Decode { pfn: 4, .. })));
    assert!(drifted == before);
}

#[test]
fn a_reference_to_a_page_the_replica_does_not_hold_refuses_the_whole_checkpoint() {
    let base = replica();
    let mut want = base.clone();
    want.page_mut(2).unwrap().fill(0x33);
    want.page_mut(3).unwrap().copy_from_slice(base.page(PAGES - 1).unwrap());
    let cp = stage(false, &[(2, Rec::Raw(vec![0x33; PS])), (3, Rec::Copy(PAGES - 1))], &want).unwrap();
    // A replica (a destination, say) that does not hold the last page.
    let mut short = MemoryImage::new(&layout(PAGES - 1));
    for pfn in 0..PAGES - 1 {
        short.page_mut(pfn).unwrap().copy_from_slice(base.page(pfn).unwrap());
    }
    let before = short.clone();
    let e = cp.apply(&mut short).unwrap_err();
    assert!(matches!(e, ApplyError::MissingReference { epoch: 5, pfn: 3, from } if from == PAGES - 1), "{e}");
    assert_eq!(e.to_string(), "checkpoint 5: page 0x3 refers to page 0xf, which the replica does not hold");
    assert!(short == before);
}
