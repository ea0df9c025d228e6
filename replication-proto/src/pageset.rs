//! Page sets: the range table of guest page numbers plus one encoded record per page, shared by
//! `PageBatch` (after its epoch and sequence number) and `PageResponse` (after its request id).
//!
//! ```text
//! page_count   u32   pages in the set, 0..=MAX_BATCH_PAGES
//! range_count  u32   ranges in the table, 0..=page_count
//! records_len  u32   bytes of the record area
//! records      records_len bytes: page_count records, in range-table order
//!     encoding u8    0 zero, 1 unchanged, 2 raw, 3 lz4, 4 delta, 5 dedup (version 2)
//!     len      uleb32  (only for raw, lz4, delta, dedup) payload length
//!     payload  len bytes
//! ranges       range_count x { first_pfn u64, count u32 }  (count >= 1, ascending, disjoint)
//! ```
//!
//! The range table follows the records so a sender can encode pages straight into the frame and
//! append the table once it knows which pages fitted.

use crate::limits::{MAX_BATCH_PAGES, MAX_PAGE_SIZE};
use crate::wire::{Reader, WireError, patch_u32, put_u32, put_u64, put_uleb32};
use thiserror::Error;

/// How one page is encoded on the wire (chosen per page by the sender).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageEncoding {
    /// The page is all zero bytes; no payload.
    Zero = 0,
    /// The page holds the same bytes as the copy last sent; no payload.
    Unchanged = 1,
    /// The page's bytes as they are.
    Raw = 2,
    /// An lz4 block that decompresses to exactly one page.
    Lz4 = 3,
    /// A run encoding of the bytes that differ from the copy last sent (see [`crate::codec`]).
    Delta = 4,
    /// The same bytes as another page the receiver holds at that point of the epoch: a
    /// reference (its frame number) and a check of the content (protocol version 2; see
    /// [`crate::codec`]).
    Dedup = 5,
}

impl PageEncoding {
    /// Every encoding, in code order.
    pub const ALL: [PageEncoding; 6] = [Self::Zero, Self::Unchanged, Self::Raw, Self::Lz4, Self::Delta, Self::Dedup];

    /// The encoding with wire code `code`.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code)).copied()
    }

    /// Whether a record of this encoding carries a payload.
    pub fn has_payload(self) -> bool {
        matches!(self, Self::Raw | Self::Lz4 | Self::Delta | Self::Dedup)
    }

    /// The first protocol version that has this encoding: a sender uses it only in a session of
    /// that version or later, and a receiver refuses it in an older one.
    pub fn since_version(self) -> u16 {
        match self {
            Self::Dedup => crate::version::Feature::Dedup.since(),
            _ => 1,
        }
    }

    /// Whether the page can be decoded without the previous copy (the only encodings allowed in
    /// page responses, and in baselines besides dedup references to earlier pages of the same
    /// baseline).
    pub fn is_self_contained(self) -> bool {
        matches!(self, Self::Zero | Self::Raw | Self::Lz4)
    }

    /// A short lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Zero => "zero",
            Self::Unchanged => "unchanged",
            Self::Raw => "raw",
            Self::Lz4 => "lz4",
            Self::Delta => "delta",
            Self::Dedup => "dedup",
        }
    }
}

/// Largest payload of one record: an lz4 block of the largest page, with lz4's worst-case growth.
pub const MAX_RECORD_LEN: usize = lz4_flex::block::get_maximum_output_size(MAX_PAGE_SIZE as usize);

/// A malformed page set.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PageSetError {
    /// A primitive was malformed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Too many pages.
    #[error("page set: {count} pages, over the limit of {max}")]
    TooManyPages {
        /// Pages declared.
        count: u32,
        /// The limit.
        max: usize,
    },
    /// More ranges than pages.
    #[error("page set: {ranges} ranges for {pages} pages")]
    TooManyRanges {
        /// Ranges declared.
        ranges: u32,
        /// Pages declared.
        pages: u32,
    },
    /// A range is empty, overflows, or is not above the previous one.
    #[error("page set: range {index} (first pfn {first:#x}, {count} pages) is empty, overflows or is out of order")]
    BadRange {
        /// The range's index.
        index: usize,
        /// Its first page frame number.
        first: u64,
        /// Its page count.
        count: u32,
    },
    /// The ranges cover a different number of pages than declared.
    #[error("page set: ranges cover {covered} pages, header says {declared}")]
    RangeCount {
        /// Pages the ranges cover.
        covered: u64,
        /// Pages declared.
        declared: u32,
    },
    /// An unknown encoding code.
    #[error("page set: record {index} has unknown encoding {code}")]
    UnknownEncoding {
        /// The record's index.
        index: usize,
        /// The code found.
        code: u8,
    },
    /// A record's payload is longer than any page encoding can be.
    #[error("page set: record {index} payload of {len} bytes over the limit of {max}")]
    RecordTooLong {
        /// The record's index.
        index: usize,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The records do not fill the record area exactly.
    #[error("page set: records use {used} of {declared} record bytes")]
    RecordArea {
        /// Bytes the records used.
        used: usize,
        /// Bytes declared.
        declared: usize,
    },
}

/// One page of a decoded page set, borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRecord<'a> {
    /// Guest page frame number (guest-physical address / page size).
    pub pfn: u64,
    /// How the page is encoded.
    pub encoding: PageEncoding,
    /// The encoded payload (empty for zero and unchanged pages).
    pub data: &'a [u8],
}

/// One page of a page set, owning its payload (for building messages by hand and in tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPage {
    /// Guest page frame number.
    pub pfn: u64,
    /// How the page is encoded.
    pub encoding: PageEncoding,
    /// The encoded payload (empty for zero and unchanged pages).
    pub data: Vec<u8>,
}

impl EncodedPage {
    /// Borrows this page as a record.
    pub fn as_record(&self) -> PageRecord<'_> {
        PageRecord { pfn: self.pfn, encoding: self.encoding, data: &self.data }
    }
}

/// Decodes a page set from `r` (which must end where the set ends), checking every count,
/// length and range. Pages come out in ascending pfn order.
pub fn parse_page_set<'a>(r: &mut Reader<'a>) -> Result<Vec<PageRecord<'a>>, PageSetError> {
    let pages = r.u32("page_count")?;
    if pages as usize > MAX_BATCH_PAGES {
        return Err(PageSetError::TooManyPages { count: pages, max: MAX_BATCH_PAGES });
    }
    let range_count = r.u32("range_count")?;
    if range_count > pages {
        return Err(PageSetError::TooManyRanges { ranges: range_count, pages });
    }
    let records_len = r.u32("records_len")? as usize;
    let mut rec = Reader::new(r.bytes(records_len, "records")?);
    // Ranges first (they follow the records on the wire), so records get their pfns.
    let mut ranges = Vec::with_capacity(range_count as usize);
    let mut covered: u64 = 0;
    let mut next_free: u64 = 0;
    for index in 0..range_count as usize {
        let first = r.u64("range first_pfn")?;
        let count = r.u32("range count")?;
        let end = first.checked_add(u64::from(count));
        if count == 0 || end.is_none() || (index > 0 && first < next_free) {
            return Err(PageSetError::BadRange { index, first, count });
        }
        next_free = end.unwrap_or(u64::MAX);
        covered += u64::from(count);
        ranges.push((first, count));
    }
    r.finish()?;
    if covered != u64::from(pages) {
        return Err(PageSetError::RangeCount { covered, declared: pages });
    }
    let mut out = Vec::with_capacity(pages as usize);
    for (first, count) in ranges {
        for pfn in first..first + u64::from(count) {
            let index = out.len();
            let code = rec.u8("record encoding")?;
            let encoding = PageEncoding::from_code(code).ok_or(PageSetError::UnknownEncoding { index, code })?;
            let data = if encoding.has_payload() {
                let len = rec.uleb32("record length")? as usize;
                if len > MAX_RECORD_LEN {
                    return Err(PageSetError::RecordTooLong { index, len, max: MAX_RECORD_LEN });
                }
                rec.bytes(len, "record payload")?
            } else {
                &[][..]
            };
            out.push(PageRecord { pfn, encoding, data });
        }
    }
    if rec.remaining() != 0 {
        return Err(PageSetError::RecordArea { used: rec.position(), declared: records_len });
    }
    Ok(out)
}

/// Writes a page set straight into a frame buffer: records as they come, the range table last.
#[derive(Debug)]
pub struct PageSetWriter {
    header_at: usize,
    pages: u32,
    ranges: Vec<(u64, u32)>,
}

impl PageSetWriter {
    /// Starts a page set at the end of `out`.
    pub fn begin(out: &mut Vec<u8>) -> Self {
        let header_at = out.len();
        out.extend_from_slice(&[0u8; 12]);
        Self { header_at, pages: 0, ranges: Vec::new() }
    }

    /// Pages written so far.
    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// Bytes the range table will add at [`PageSetWriter::finish`].
    pub fn table_len(&self) -> usize {
        self.ranges.len() * 12
    }

    /// The last pfn written, if any.
    pub fn last_pfn(&self) -> Option<u64> {
        self.ranges.last().map(|&(first, count)| first + u64::from(count) - 1)
    }

    fn note_pfn(&mut self, pfn: u64) {
        match self.ranges.last_mut() {
            Some((first, count)) if *first + u64::from(*count) == pfn && *count < u32::MAX => *count += 1,
            _ => self.ranges.push((pfn, 1)),
        }
        self.pages += 1;
    }

    /// Appends one record; `pfn` must be above the previous one.
    pub fn push(&mut self, out: &mut Vec<u8>, pfn: u64, encoding: PageEncoding, data: &[u8]) {
        debug_assert!(self.last_pfn().is_none_or(|last| pfn > last));
        self.note_pfn(pfn);
        out.push(encoding as u8);
        if encoding.has_payload() {
            put_uleb32(out, u32::try_from(data.len()).expect("record fits u32 (pages are small)"));
            out.extend_from_slice(data);
        }
    }

    /// Writes the range table and patches the counts.
    pub fn finish(self, out: &mut Vec<u8>) {
        let records_len = out.len() - self.header_at - 12;
        let range_count = self.ranges.len() as u32;
        for (first, count) in &self.ranges {
            put_u64(out, *first);
            put_u32(out, *count);
        }
        patch_u32(out, self.header_at, self.pages);
        patch_u32(out, self.header_at + 4, range_count);
        patch_u32(out, self.header_at + 8, u32::try_from(records_len).expect("record area fits u32"));
    }
}

/// Writes `pages` (ascending pfns) as a page set.
pub fn write_page_set(out: &mut Vec<u8>, pages: &[EncodedPage]) {
    let mut w = PageSetWriter::begin(out);
    for p in pages {
        w.push(out, p.pfn, p.encoding, &p.data);
    }
    w.finish(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(pfn: u64, encoding: PageEncoding, data: &[u8]) -> EncodedPage {
        EncodedPage { pfn, encoding, data: data.to_vec() }
    }

    #[test]
    fn round_trip_with_ranges() {
        let pages = vec![
            page(3, PageEncoding::Zero, &[]),
            page(4, PageEncoding::Raw, &[7; 10]),
            page(5, PageEncoding::Delta, &[1, 2, 3]),
            page(100, PageEncoding::Unchanged, &[]),
            page(101, PageEncoding::Lz4, &[9; 300]),
        ];
        let mut out = Vec::new();
        write_page_set(&mut out, &pages);
        let mut r = Reader::new(&out);
        let got = parse_page_set(&mut r).unwrap();
        let want: Vec<_> = pages.iter().map(EncodedPage::as_record).collect();
        assert_eq!(got, want);
        // Two ranges: 3..=5 and 100..=101.
        // Records: zero 1, raw 1+1+10, delta 1+1+3, unchanged 1, lz4 1+2+300.
        assert_eq!(out.len(), 12 + (1 + 12 + 5 + 1 + 303) + 24);
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut out = Vec::new();
        put_u32(&mut out, 2);
        put_u32(&mut out, 2);
        put_u32(&mut out, 2);
        out.extend_from_slice(&[0, 0]);
        put_u64(&mut out, 10);
        put_u32(&mut out, 1);
        put_u64(&mut out, 10);
        put_u32(&mut out, 1);
        let err = parse_page_set(&mut Reader::new(&out)).unwrap_err();
        assert!(matches!(err, PageSetError::BadRange { index: 1, .. }));
    }
}
