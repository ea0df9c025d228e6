//! A whole, verified checkpoint as the receiver hands it to its owner, and how the owner applies
//! it to the replica.
//!
//! The receiver has already checked every frame crc, the epoch's sequence, counts and checksum,
//! and decoded every raw and lz4 page. What it cannot check alone is the content digest, because
//! deltas and unchanged pages are relative to the replica, which the owner holds. So the owner
//! calls [`Checkpoint::apply`] (or [`Checkpoint::verify`] then its own write path): it recomputes
//! the digest of every page as it will be after the checkpoint, refuses the checkpoint whole if it
//! does not match, and only then writes. A refused checkpoint goes back to the receiver with
//! [`crate::Receiver::reject`], which asks the sender for a new baseline.
//!
//! Dedup references ([`PageContent::Copy`]) are resolved the same way: against an earlier page of
//! the checkpoint (as it will be) or a page of the replica the checkpoint does not touch; each is
//! checked against the check the reference carries, and a reference to a page the replica does
//! not hold refuses the checkpoint whole ([`ApplyError::MissingReference`]).

use crate::codec::{CodecError, DedupRef, apply_delta, decompress_lz4, validate_delta};
use crate::hash::{Digest, xxh64, zero_page_hash};
use crate::message::{Lineage, MemoryLayout, PageIndex};
use crate::pageset::{PageEncoding, PageRecord};
use std::collections::BTreeMap;
use thiserror::Error;

#[cfg(test)]
mod dedup_tests;

/// Guest memory as the owner of a replica sees it, page by page.
pub trait ReplicaMemory {
    /// The page with frame number `pfn`, if the replica has it.
    fn page(&self, pfn: u64) -> Option<&[u8]>;
    /// The page with frame number `pfn`, writable.
    fn page_mut(&mut self, pfn: u64) -> Option<&mut [u8]>;
    /// Sets every page to zero (a baseline replaces the whole replica).
    fn zero_all(&mut self);
}

/// A checkpoint that does not apply to the replica.
#[derive(Debug, Error)]
pub enum ApplyError {
    /// The replica has no such page.
    #[error("checkpoint {epoch}: page {pfn:#x} is not in the replica")]
    MissingPage {
        /// The epoch.
        epoch: u64,
        /// The page frame number.
        pfn: u64,
    },
    /// A page failed to decode against the replica.
    #[error("checkpoint {epoch}: page {pfn:#x} does not decode")]
    Decode {
        /// The epoch.
        epoch: u64,
        /// The page frame number.
        pfn: u64,
        /// Why.
        source: CodecError,
    },
    /// A dedup reference names a page the replica does not hold. Nothing was written.
    #[error("checkpoint {epoch}: page {pfn:#x} refers to page {from:#x}, which the replica does not hold")]
    MissingReference {
        /// The epoch.
        epoch: u64,
        /// The page sent as a reference.
        pfn: u64,
        /// The page it refers to.
        from: u64,
    },
    /// The pages do not match the sender's content digest: the replica is not the base the sender
    /// encoded against. Nothing was written.
    #[error("checkpoint {epoch}: content digest {found:#018x}, sender sent {expected:#018x}")]
    Digest {
        /// The epoch.
        epoch: u64,
        /// The sender's digest.
        expected: u64,
        /// The digest of the pages as they would be.
        found: u64,
    },
}

/// One page of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageContent<'a> {
    /// The page is all zero.
    Zero,
    /// The page keeps the bytes the replica holds.
    Unchanged,
    /// The page's new bytes (raw and lz4 pages arrive decoded).
    Full(&'a [u8]),
    /// A delta to apply in place to the replica's page (see [`crate::codec`]).
    Delta(&'a [u8]),
    /// The same bytes as page `from` holds at this point of the checkpoint: an earlier page of
    /// it (as written by the checkpoint), or a page the checkpoint does not touch (as the replica
    /// holds it). `check` is [`crate::hash::dedup_check`] of those bytes (dedup, protocol
    /// version 2).
    Copy {
        /// The page referred to.
        from: u64,
        /// The check of its content.
        check: u64,
    },
}

/// A page of a checkpoint with its frame number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRef<'a> {
    /// Guest page frame number.
    pub pfn: u64,
    /// The content.
    pub content: PageContent<'a>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    pfn: u64,
    kind: u8,
    offset: usize,
    len: usize,
}

const K_ZERO: u8 = 0;
const K_UNCHANGED: u8 = 1;
const K_FULL: u8 = 2;
const K_DELTA: u8 = 3;
const K_COPY: u8 = 4;

/// Where the content of a page of a checkpoint comes from, for resolving references.
#[derive(Debug, Clone, Copy)]
enum Origin {
    /// The result of entry `i` (not itself a reference).
    Entry(usize),
    /// The replica's page, which the checkpoint does not write before the use.
    Replica(u64),
}

/// A whole, staged and checked epoch: every page and the device/vCPU state.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    epoch: u64,
    lineage: Lineage,
    baseline: bool,
    page_size: usize,
    entries: Vec<Entry>,
    data: Vec<u8>,
    state: Vec<u8>,
    digest: u64,
    /// Pages sent as dedup references.
    copies: usize,
}

impl Checkpoint {
    /// The epoch number.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The series it belongs to.
    pub fn lineage(&self) -> Lineage {
        self.lineage
    }

    /// Whether this is a baseline: the replica is reset to zero before the pages are written.
    pub fn is_baseline(&self) -> bool {
        self.baseline
    }

    /// The page size.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Pages in the checkpoint.
    pub fn page_count(&self) -> usize {
        self.entries.len()
    }

    /// The device/vCPU state blob (opaque: the VMM's encoding of `VmState`).
    pub fn state(&self) -> &[u8] {
        &self.state
    }

    /// The sender's content digest.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// Bytes the checkpoint holds in memory.
    pub fn memory_bytes(&self) -> usize {
        self.data.len() + self.state.len() + self.entries.len() * std::mem::size_of::<Entry>()
    }

    /// The pages, ascending pfns.
    pub fn pages(&self) -> impl ExactSizeIterator<Item = PageRef<'_>> + '_ {
        self.entries.iter().map(|e| PageRef {
            pfn: e.pfn,
            content: match e.kind {
                K_ZERO => PageContent::Zero,
                K_UNCHANGED => PageContent::Unchanged,
                K_FULL => PageContent::Full(&self.data[e.offset..e.offset + e.len]),
                K_COPY => {
                    // Staging checked the payload; a broken one could only name the page itself
                    // with check 0, which no page content verifies against in practice.
                    let r = DedupRef::decode(&self.data[e.offset..e.offset + e.len])
                        .unwrap_or(DedupRef { from: e.pfn, check: 0 });
                    PageContent::Copy { from: r.from, check: r.check }
                }
                _ => PageContent::Delta(&self.data[e.offset..e.offset + e.len]),
            },
        })
    }

    /// Pages sent as dedup references.
    pub fn copies(&self) -> usize {
        self.copies
    }

    /// Where the page of entry `i`, a reference to `from`, gets its content: `origins` holds the
    /// origin of every entry before `i`.
    fn origin_of(&self, i: usize, from: u64, origins: &[Origin]) -> Origin {
        match self.entries[..i].binary_search_by_key(&from, |e| e.pfn) {
            Ok(j) => origins[j],
            Err(_) => Origin::Replica(from),
        }
    }

    /// Checks, without writing, that applying this checkpoint to `mem` gives exactly the pages
    /// the sender had: recomputes the content digest against the replica's current pages.
    pub fn verify<M: ReplicaMemory + ?Sized>(&self, mem: &M) -> Result<(), ApplyError> {
        let epoch = self.epoch;
        let zero_hash = zero_page_hash(self.page_size);
        let mut scratch = vec![0u8; self.page_size];
        let mut digest = Digest::default();
        // With references: each entry's origin, so a reference resolves in one step.
        let mut origins = Vec::with_capacity(if self.copies > 0 { self.entries.len() } else { 0 });
        for (i, p) in self.pages().enumerate() {
            // Every page must exist in the replica, whatever its encoding, so that `apply` cannot
            // fail half way.
            let base = match mem.page(p.pfn) {
                Some(b) if b.len() == self.page_size => b,
                _ => return Err(ApplyError::MissingPage { epoch, pfn: p.pfn }),
            };
            let mut origin = Origin::Entry(i);
            let hash = match p.content {
                PageContent::Zero => zero_hash,
                PageContent::Full(bytes) => xxh64(bytes),
                PageContent::Unchanged => {
                    origin = Origin::Replica(p.pfn);
                    xxh64(base)
                }
                PageContent::Delta(d) => {
                    scratch.copy_from_slice(base);
                    apply_delta(d, &mut scratch).map_err(|source| ApplyError::Decode { epoch, pfn: p.pfn, source })?;
                    xxh64(&scratch)
                }
                PageContent::Copy { from, check } => {
                    origin = self.origin_of(i, from, &origins);
                    let content = self.resolve(origin, mem, &mut scratch).ok_or(ApplyError::MissingReference {
                        epoch,
                        pfn: p.pfn,
                        from,
                    })?;
                    DedupRef { from, check }.verify(content).map_err(|source| ApplyError::Decode {
                        epoch,
                        pfn: p.pfn,
                        source,
                    })?;
                    xxh64(content)
                }
            };
            if self.copies > 0 {
                origins.push(origin);
            }
            digest.add(p.pfn, hash);
        }
        let found = digest.finish();
        if found != self.digest {
            return Err(ApplyError::Digest { epoch, expected: self.digest, found });
        }
        Ok(())
    }

    /// The content at `origin` as it will be when the checkpoint reaches it, from the
    /// checkpoint's own data or the replica `mem` (unwritten yet); `None` if the replica lacks
    /// the page. `scratch` holds a decoded delta.
    fn resolve<'a, M: ReplicaMemory + ?Sized>(
        &'a self,
        origin: Origin,
        mem: &'a M,
        scratch: &'a mut [u8],
    ) -> Option<&'a [u8]> {
        let replica_page = |pfn| mem.page(pfn).filter(|p| p.len() == self.page_size);
        match origin {
            Origin::Replica(pfn) => replica_page(pfn),
            Origin::Entry(j) => {
                let e = self.entries.get(j)?;
                match e.kind {
                    K_FULL => Some(&self.data[e.offset..e.offset + e.len]),
                    K_DELTA => {
                        scratch.copy_from_slice(replica_page(e.pfn)?);
                        apply_delta(&self.data[e.offset..e.offset + e.len], scratch).ok()?;
                        Some(scratch)
                    }
                    // Zero (unchanged and references never are an entry origin).
                    _ => {
                        scratch.fill(0);
                        Some(scratch)
                    }
                }
            }
        }
    }

    /// Verifies (see [`Checkpoint::verify`]) and then writes every page into `mem` (after zeroing
    /// it, for a baseline). On error nothing has been written.
    pub fn apply<M: ReplicaMemory + ?Sized>(&self, mem: &mut M) -> Result<(), ApplyError> {
        // A baseline holds only self-contained pages, so verifying it reads no base.
        self.verify(mem)?;
        if self.baseline {
            mem.zero_all();
        }
        let epoch = self.epoch;
        let mut scratch = Vec::new();
        for p in self.pages() {
            if let PageContent::Copy { from, .. } = p.content {
                // What `from` holds now: an earlier page of this checkpoint is written already, any
                // other page is untouched (verify resolved the same).
                let src = mem.page(from).ok_or(ApplyError::MissingReference { epoch, pfn: p.pfn, from })?;
                scratch.clear();
                scratch.extend_from_slice(src);
            }
            let page = mem.page_mut(p.pfn).ok_or(ApplyError::MissingPage { epoch, pfn: p.pfn })?;
            match p.content {
                PageContent::Zero => page.fill(0),
                PageContent::Unchanged => {}
                PageContent::Full(bytes) => page.copy_from_slice(bytes),
                PageContent::Delta(d) => {
                    apply_delta(d, page).map_err(|source| ApplyError::Decode { epoch, pfn: p.pfn, source })?
                }
                PageContent::Copy { .. } => page.copy_from_slice(&scratch),
            }
        }
        Ok(())
    }
}

/// A problem with a page record while staging (the receiver aborts the epoch).
#[derive(Debug, Error)]
pub(crate) enum StageError {
    #[error("page {pfn:#x}: {source}")]
    Codec { pfn: u64, source: CodecError },
    #[error("page {pfn:#x}: {encoding} page in a baseline")]
    NotSelfContained { pfn: u64, encoding: &'static str },
    #[error("page {pfn:#x}: not in the memory layout")]
    OutOfLayout { pfn: u64 },
    #[error("page {pfn:#x}: not above the previous page {prev:#x}")]
    Order { pfn: u64, prev: u64 },
    #[error("page {pfn:#x}: dedup reference to page {from:#x} {what}")]
    Reference { pfn: u64, from: u64, what: &'static str },
}

/// Builds a checkpoint page by page as batches arrive.
#[derive(Debug)]
pub(crate) struct CheckpointBuilder {
    cp: Checkpoint,
    last_pfn: Option<u64>,
    /// References to pages above the referring one (target to referrer): those pages must not
    /// come later in the epoch, where the reference would be ambiguous.
    forward: BTreeMap<u64, u64>,
}

impl CheckpointBuilder {
    pub(crate) fn new(epoch: u64, lineage: Lineage, baseline: bool, page_size: usize) -> Self {
        Self {
            cp: Checkpoint {
                epoch,
                lineage,
                baseline,
                page_size,
                entries: Vec::new(),
                data: Vec::new(),
                state: Vec::new(),
                digest: 0,
                copies: 0,
            },
            last_pfn: None,
            forward: BTreeMap::new(),
        }
    }

    pub(crate) fn pages(&self) -> usize {
        self.cp.entries.len()
    }

    pub(crate) fn data_bytes(&self) -> usize {
        self.cp.data.len() + self.cp.state.len()
    }

    pub(crate) fn state_len(&self) -> usize {
        self.cp.state.len()
    }

    /// Decodes (raw, lz4) or checks (delta) one record and appends it.
    pub(crate) fn push(&mut self, rec: &PageRecord<'_>, index: &PageIndex) -> Result<(), StageError> {
        let pfn = rec.pfn;
        if index.index(pfn).is_none() {
            return Err(StageError::OutOfLayout { pfn });
        }
        if let Some(prev) = self.last_pfn
            && pfn <= prev
        {
            return Err(StageError::Order { pfn, prev });
        }
        if let Some(&referrer) = self.forward.get(&pfn) {
            return Err(StageError::Reference { pfn: referrer, from: pfn, what: "comes later in the epoch" });
        }
        if self.cp.baseline && !rec.encoding.is_self_contained() && rec.encoding != PageEncoding::Dedup {
            return Err(StageError::NotSelfContained { pfn, encoding: rec.encoding.name() });
        }
        let ps = self.cp.page_size;
        let codec = |source| StageError::Codec { pfn, source };
        let offset = self.cp.data.len();
        let (kind, len) = match rec.encoding {
            PageEncoding::Zero | PageEncoding::Unchanged => {
                if !rec.data.is_empty() {
                    return Err(codec(CodecError::UnexpectedPayload {
                        encoding: rec.encoding.name(),
                        len: rec.data.len(),
                    }));
                }
                let kind = if rec.encoding == PageEncoding::Zero { K_ZERO } else { K_UNCHANGED };
                (kind, 0)
            }
            PageEncoding::Raw => {
                if rec.data.len() != ps {
                    return Err(codec(CodecError::RawLength { len: rec.data.len(), page_size: ps }));
                }
                self.cp.data.extend_from_slice(rec.data);
                (K_FULL, ps)
            }
            PageEncoding::Lz4 => {
                self.cp.data.resize(offset + ps, 0);
                if let Err(e) = decompress_lz4(rec.data, &mut self.cp.data[offset..]) {
                    self.cp.data.truncate(offset);
                    return Err(codec(e));
                }
                (K_FULL, ps)
            }
            PageEncoding::Delta => {
                validate_delta(rec.data, ps).map_err(codec)?;
                self.cp.data.extend_from_slice(rec.data);
                (K_DELTA, rec.data.len())
            }
            PageEncoding::Dedup => {
                let r = DedupRef::decode(rec.data).map_err(codec)?;
                self.check_reference(pfn, r.from, index)?;
                self.cp.data.extend_from_slice(rec.data);
                self.cp.copies += 1;
                (K_COPY, rec.data.len())
            }
        };
        self.cp.entries.push(Entry { pfn, kind, offset, len });
        self.last_pfn = Some(pfn);
        Ok(())
    }

    /// A reference from `pfn` to `from` must name another page of the layout; in a baseline
    /// (whose receiver starts from zero) an earlier page of it; above `pfn`, a page the epoch
    /// does not touch (checked as later pages arrive).
    fn check_reference(&mut self, pfn: u64, from: u64, index: &PageIndex) -> Result<(), StageError> {
        let bad = |what| Err(StageError::Reference { pfn, from, what });
        if index.index(from).is_none() {
            return bad("outside the memory layout");
        }
        if from == pfn {
            return bad("names the page itself");
        }
        if self.cp.baseline && self.cp.entries.binary_search_by_key(&from, |e| e.pfn).is_err() {
            return bad("names no earlier page of the baseline");
        }
        if from > pfn {
            self.forward.entry(from).or_insert(pfn);
        }
        Ok(())
    }

    pub(crate) fn push_state(&mut self, data: &[u8]) {
        self.cp.state.extend_from_slice(data);
    }

    pub(crate) fn finish(mut self, digest: u64) -> Checkpoint {
        self.cp.digest = digest;
        self.cp
    }
}

/// A whole guest memory in one buffer, zero-initialised: a simple [`ReplicaMemory`] for tests,
/// tools and small guests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryImage {
    page_size: usize,
    index: Vec<(u64, u64, u64)>,
    bytes: Vec<u8>,
}

impl MemoryImage {
    /// A zeroed image of `layout` (which must be valid).
    pub fn new(layout: &MemoryLayout) -> Self {
        let ps = u64::from(layout.page_size);
        let mut base = 0;
        let index = layout
            .ranges
            .iter()
            .map(|r| {
                let e = (r.start / ps, r.len / ps, base);
                base += r.len / ps;
                e
            })
            .collect();
        Self { page_size: layout.page_size as usize, index, bytes: vec![0; (base * ps) as usize] }
    }

    fn offset(&self, pfn: u64) -> Option<usize> {
        let i = self.index.partition_point(|&(first, _, _)| first <= pfn);
        let &(first, count, base) = self.index.get(i.checked_sub(1)?)?;
        (pfn - first < count).then(|| (base + pfn - first) as usize * self.page_size)
    }

    /// The whole image.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl ReplicaMemory for MemoryImage {
    fn page(&self, pfn: u64) -> Option<&[u8]> {
        let at = self.offset(pfn)?;
        Some(&self.bytes[at..at + self.page_size])
    }

    fn page_mut(&mut self, pfn: u64) -> Option<&mut [u8]> {
        let at = self.offset(pfn)?;
        Some(&mut self.bytes[at..at + self.page_size])
    }

    fn zero_all(&mut self) {
        self.bytes.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{CodecConfig, PageEncoder};
    use crate::hash::is_zero;
    use proptest::prelude::*;

    const PAGES: u64 = 24;
    const PS: usize = 512;

    fn image(fill: impl Fn(u64, usize) -> u8) -> MemoryImage {
        let mut m = MemoryImage::new(&MemoryLayout::flat(PS as u32, PAGES * PS as u64));
        for pfn in 0..PAGES {
            for (i, b) in m.page_mut(pfn).unwrap().iter_mut().enumerate() {
                *b = fill(pfn, i);
            }
        }
        m
    }

    /// Stages the pages of `target` listed in `dirty` the way the sender encodes them against
    /// `base`, with the honest content digest of the result.
    fn checkpoint(base: &MemoryImage, target: &MemoryImage, dirty: &[u64], baseline: bool) -> Checkpoint {
        let index = PageIndex::new(&MemoryLayout::flat(PS as u32, PAGES * PS as u64));
        let mut b = CheckpointBuilder::new(3, Lineage { origin: 1, baseline: 1 }, baseline, PS);
        let mut enc = PageEncoder::new(CodecConfig::default());
        let mut digest = Digest::default();
        for &pfn in dirty {
            let new = target.page(pfn).unwrap();
            let old = base.page(pfn).unwrap();
            let (encoding, data) = if is_zero(new) {
                (PageEncoding::Zero, &[][..])
            } else if !baseline && new == old {
                (PageEncoding::Unchanged, &[][..])
            } else {
                enc.encode(new, (!baseline).then_some(old))
            };
            b.push(&PageRecord { pfn, encoding, data }, &index).unwrap();
            digest.add(pfn, xxh64(new));
        }
        b.push_state(b"vm state");
        b.finish(digest.finish())
    }

    proptest! {
        /// Whatever pages change and however the encoder encodes them, applying the checkpoint
        /// to the base gives the target; a checkpoint that does not verify changes nothing.
        #[test]
        fn apply_round_trips(
            seed in any::<u8>(),
            changes in proptest::collection::btree_map(0..PAGES, (0usize..PS, any::<u8>(), 0usize..3), 0..12),
            baseline in any::<bool>(),
            bad_digest in any::<bool>(),
        ) {
            let base = image(|pfn, i| seed.wrapping_add(pfn as u8).wrapping_mul((i / 32) as u8 | 1));
            let mut target = if baseline { image(|_, _| 0) } else { base.clone() };
            for (&pfn, &(at, byte, how)) in &changes {
                let page = target.page_mut(pfn).unwrap();
                match how {
                    0 => page.fill(0),
                    1 => page[at] = byte,
                    _ => page[at..].fill(byte),
                }
            }
            let dirty: Vec<u64> = changes.keys().copied().collect();
            let cp = checkpoint(&base, &target, &dirty, baseline);
            prop_assert_eq!(cp.page_count(), dirty.len());
            prop_assert_eq!(cp.state(), b"vm state");
            let mut replica = base.clone();
            if bad_digest {
                let cp = Checkpoint { digest: cp.digest ^ 1, ..cp };
                let refused = matches!(cp.apply(&mut replica), Err(ApplyError::Digest { .. }));
                prop_assert!(refused, "a wrong digest was not refused");
                prop_assert_eq!(replica, base);
            } else {
                cp.apply(&mut replica).unwrap();
                prop_assert_eq!(replica, target);
            }
        }
    }

    #[test]
    fn a_missing_page_refuses_the_whole_checkpoint() {
        let base = image(|pfn, _| pfn as u8);
        let mut target = base.clone();
        target.page_mut(2).unwrap().fill(9);
        target.page_mut(PAGES - 1).unwrap().fill(9);
        let cp = checkpoint(&base, &target, &[2, PAGES - 1], false);
        // A replica one page short: the last page is not there.
        let mut small = MemoryImage::new(&MemoryLayout::flat(PS as u32, (PAGES - 1) * PS as u64));
        small.page_mut(2).unwrap().fill(1);
        let before = small.clone();
        let e = cp.apply(&mut small).unwrap_err();
        assert!(matches!(e, ApplyError::MissingPage { epoch: 3, pfn } if pfn == PAGES - 1), "{e}");
        assert_eq!(small, before);
    }
}
