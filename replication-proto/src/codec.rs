//! Page codecs: how one page's bytes become a record payload and back.
//!
//! - **zero**: no payload (the sender checks [`crate::hash::is_zero`] first);
//! - **unchanged**: no payload (the page was dirtied but holds the bytes last sent);
//! - **delta**: XBZRLE-style runs of the bytes that differ from the copy last sent:
//!   `{ skip: uleb32, len: uleb32 (>= 1), bytes: [u8; len] }*` until the payload ends; `skip`
//!   counts unchanged bytes since the end of the previous run. Applied in place on the base page;
//! - **lz4**: one lz4 block (lz4_flex block format) that decompresses to exactly one page;
//! - **raw**: the page as it is;
//! - **dedup** (protocol version 2): `{ from: u64, check: u64 }`, exactly 16 bytes: the page
//!   holds the same bytes as page `from` holds at that point of the epoch (an earlier page of the
//!   same epoch, or a page the epoch does not touch), and `check` is [`dedup_check`] of them.
//!   The sender finds duplicates by content hash (see [`crate::cache`]); the receiver resolves
//!   the reference against its own pages and verifies `check` before it writes anything.
//!
//! [`PageEncoder`] chooses between delta, lz4 and raw for a page that is neither zero nor
//! unchanged: a delta of at most 1/8 page is taken at once; a larger one (up to half a page) is
//! compared with lz4 and the smaller wins; lz4 is taken only when smaller than the page; raw
//! otherwise.

use crate::hash::dedup_check;
use crate::pageset::PageEncoding;
use crate::wire::{Reader, put_uleb32};
use lz4_flex::block::{CompressTable, compress_into_with_table, get_maximum_output_size};
use thiserror::Error;

/// A record payload that does not decode to one page.
#[derive(Debug, Error)]
pub enum CodecError {
    /// A raw payload is not exactly one page.
    #[error("raw page: {len} bytes, page size is {page_size}")]
    RawLength {
        /// The payload length.
        len: usize,
        /// The page size.
        page_size: usize,
    },
    /// The lz4 block is malformed or does not fit one page.
    #[error("lz4 page: bad block")]
    Lz4(#[source] lz4_flex::block::DecompressError),
    /// The lz4 block decompresses to less than one page.
    #[error("lz4 page: decompresses to {len} bytes, page size is {page_size}")]
    Lz4Length {
        /// Bytes produced.
        len: usize,
        /// The page size.
        page_size: usize,
    },
    /// A delta run is malformed or goes past the end of the page.
    #[error("delta page: run at byte {at} is empty, malformed or past the page end ({page_size})")]
    DeltaRun {
        /// Offset in the delta payload where the bad run starts.
        at: usize,
        /// The page size.
        page_size: usize,
    },
    /// A dedup payload is not exactly a reference and a check.
    #[error("dedup page: {len} payload bytes, expected 16")]
    DedupLength {
        /// The payload length.
        len: usize,
    },
    /// The page a dedup reference resolves to does not have the content the reference names.
    #[error(
        "dedup page: page {from:#x} does not hold the referenced content (check {expected:#018x}, found {found:#018x})"
    )]
    DedupCheck {
        /// The page referred to.
        from: u64,
        /// The check the reference carries.
        expected: u64,
        /// The check of the page found.
        found: u64,
    },
    /// Zero and unchanged pages carry no payload.
    #[error("{encoding} page: carries {len} payload bytes, expected none")]
    UnexpectedPayload {
        /// The encoding name.
        encoding: &'static str,
        /// The payload length.
        len: usize,
    },
}

/// Appends the delta from `old` to `new` (same length) to `out`, unless it would exceed
/// `max_len` bytes; returns whether it was written (on `false`, `out` is as it was).
pub fn encode_delta(old: &[u8], new: &[u8], out: &mut Vec<u8>, max_len: usize) -> bool {
    debug_assert_eq!(old.len(), new.len());
    let start = out.len();
    let mut pos = 0;
    while let Some(d) = next_diff(old, new, pos) {
        let end = run_end(old, new, d);
        put_uleb32(out, (d - pos) as u32);
        put_uleb32(out, (end - d) as u32);
        out.extend_from_slice(&new[d..end]);
        if out.len() - start > max_len {
            out.truncate(start);
            return false;
        }
        pos = end;
    }
    true
}

#[inline(always)]
fn word(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The first index at or after `from` where `a` and `b` differ.
fn next_diff(a: &[u8], b: &[u8], from: usize) -> Option<usize> {
    let n = a.len().min(b.len());
    let mut i = from;
    while i < n && !i.is_multiple_of(8) {
        if a[i] != b[i] {
            return Some(i);
        }
        i += 1;
    }
    // 32 bytes at a time while equal.
    while i + 32 <= n {
        let x = (word(a, i) ^ word(b, i))
            | (word(a, i + 8) ^ word(b, i + 8))
            | (word(a, i + 16) ^ word(b, i + 16))
            | (word(a, i + 24) ^ word(b, i + 24));
        if x != 0 {
            break;
        }
        i += 32;
    }
    while i + 8 <= n {
        let x = word(a, i) ^ word(b, i);
        if x != 0 {
            return Some(i + (x.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    (i..n).find(|&k| a[k] != b[k])
}

/// The end (exclusive) of the changed run that starts at `d`: the run goes on through every
/// 8-byte word that differs, and stops before the first word that is equal.
fn run_end(a: &[u8], b: &[u8], d: usize) -> usize {
    let n = a.len().min(b.len());
    let mut last = d;
    let mut j = (d / 8 + 1) * 8;
    for k in d + 1..j.min(n) {
        if a[k] != b[k] {
            last = k;
        }
    }
    while j + 8 <= n {
        let x = word(a, j) ^ word(b, j);
        if x == 0 {
            return last + 1;
        }
        last = j + 7 - (x.leading_zeros() / 8) as usize;
        j += 8;
    }
    for k in j..n {
        if a[k] != b[k] {
            last = k;
        }
    }
    last + 1
}

/// Walks a delta's runs, checking each against the page size; calls `f(offset, bytes)` per run.
fn walk_delta(delta: &[u8], page_size: usize, mut f: impl FnMut(usize, &[u8])) -> Result<(), CodecError> {
    let mut r = Reader::new(delta);
    let mut pos = 0usize;
    while r.remaining() > 0 {
        let at = r.position();
        let bad = || CodecError::DeltaRun { at, page_size };
        let skip = r.uleb32("delta skip").map_err(|_| bad())? as usize;
        let len = r.uleb32("delta len").map_err(|_| bad())? as usize;
        let start = pos.checked_add(skip).ok_or_else(bad)?;
        let end = start.checked_add(len).ok_or_else(bad)?;
        if len == 0 || end > page_size {
            return Err(bad());
        }
        let bytes = r.bytes(len, "delta bytes").map_err(|_| bad())?;
        f(start, bytes);
        pos = end;
    }
    Ok(())
}

/// Checks that `delta` is well formed for pages of `page_size` bytes.
pub fn validate_delta(delta: &[u8], page_size: usize) -> Result<(), CodecError> {
    walk_delta(delta, page_size, |_, _| {})
}

/// Applies `delta` in place to `page`, which holds the base (the copy last sent). On error the
/// page may be partly written: validate first when that matters.
pub fn apply_delta(delta: &[u8], page: &mut [u8]) -> Result<(), CodecError> {
    let page_size = page.len();
    walk_delta(delta, page_size, |at, bytes| page[at..at + bytes.len()].copy_from_slice(bytes))
}

/// Decompresses an lz4 block that must fill `page` exactly.
pub fn decompress_lz4(data: &[u8], page: &mut [u8]) -> Result<(), CodecError> {
    let n = lz4_flex::block::decompress_into(data, page).map_err(CodecError::Lz4)?;
    if n != page.len() {
        return Err(CodecError::Lz4Length { len: n, page_size: page.len() });
    }
    Ok(())
}

/// Bytes of a dedup payload.
pub const DEDUP_PAYLOAD_LEN: usize = 16;

/// A dedup reference: the page holds what page `from` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DedupRef {
    /// The page referred to.
    pub from: u64,
    /// [`dedup_check`] of the content.
    pub check: u64,
}

impl DedupRef {
    /// A reference to `from`, whose content is `page`.
    pub fn to(from: u64, page: &[u8]) -> Self {
        Self { from, check: dedup_check(page) }
    }

    /// The 16-byte payload.
    pub fn encode(&self) -> [u8; DEDUP_PAYLOAD_LEN] {
        let mut out = [0u8; DEDUP_PAYLOAD_LEN];
        out[..8].copy_from_slice(&self.from.to_le_bytes());
        out[8..].copy_from_slice(&self.check.to_le_bytes());
        out
    }

    /// Parses a payload.
    pub fn decode(data: &[u8]) -> Result<Self, CodecError> {
        let (Some(from), Some(check), DEDUP_PAYLOAD_LEN) =
            (data.first_chunk::<8>(), data.get(8..).and_then(|d| d.first_chunk::<8>()), data.len())
        else {
            return Err(CodecError::DedupLength { len: data.len() });
        };
        Ok(Self { from: u64::from_le_bytes(*from), check: u64::from_le_bytes(*check) })
    }

    /// Checks that `content` (what page `from` holds) is the content referred to.
    pub fn verify(&self, content: &[u8]) -> Result<(), CodecError> {
        let found = dedup_check(content);
        if found == self.check {
            Ok(())
        } else {
            Err(CodecError::DedupCheck { from: self.from, expected: self.check, found })
        }
    }
}

/// Decodes one record into `page`. For [`PageEncoding::Delta`] and [`PageEncoding::Unchanged`]
/// `page` must hold the base (the receiver's replica page); for [`PageEncoding::Dedup`] it must
/// hold the page the reference names (checked); the other encodings overwrite it.
pub fn decode_page(encoding: PageEncoding, data: &[u8], page: &mut [u8]) -> Result<(), CodecError> {
    match encoding {
        PageEncoding::Zero | PageEncoding::Unchanged => {
            if !data.is_empty() {
                return Err(CodecError::UnexpectedPayload { encoding: encoding.name(), len: data.len() });
            }
            if encoding == PageEncoding::Zero {
                page.fill(0);
            }
            Ok(())
        }
        PageEncoding::Raw => {
            if data.len() != page.len() {
                return Err(CodecError::RawLength { len: data.len(), page_size: page.len() });
            }
            page.copy_from_slice(data);
            Ok(())
        }
        PageEncoding::Lz4 => decompress_lz4(data, page),
        PageEncoding::Delta => apply_delta(data, page),
        PageEncoding::Dedup => DedupRef::decode(data)?.verify(page),
    }
}

/// Which codecs a sender may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodecConfig {
    /// Try lz4 on pages without a usable delta (costs CPU: ~0.5 GB/s on text, see
    /// `docs/benchmarks-history.md`; turn off when the link is faster than that).
    pub lz4: bool,
    /// Send deltas against the copy last sent.
    pub delta: bool,
    /// Send a page whose content was already sent in the session (for it or another page) as a
    /// reference to that page, in sessions whose version has it (2 on). Costs a hash map of one
    /// entry per page sent (about 16 bytes a page) and a lookup per non-zero page.
    pub dedup: bool,
}

impl Default for CodecConfig {
    fn default() -> Self {
        Self { lz4: true, delta: true, dedup: true }
    }
}

/// Chooses and produces the payload for pages that are neither zero nor unchanged.
pub struct PageEncoder {
    config: CodecConfig,
    table: CompressTable,
    delta: Vec<u8>,
    lz4: Vec<u8>,
}

impl std::fmt::Debug for PageEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageEncoder").field("config", &self.config).finish_non_exhaustive()
    }
}

impl PageEncoder {
    /// An encoder using the codecs `config` allows.
    pub fn new(config: CodecConfig) -> Self {
        Self { config, table: CompressTable::default(), delta: Vec::new(), lz4: Vec::new() }
    }

    /// Encodes `page` as delta (against `base`, when given and allowed), lz4 or raw, whichever
    /// is smallest by the rule in the module docs. Returns the encoding and its payload.
    pub fn encode<'a>(&'a mut self, page: &'a [u8], base: Option<&[u8]>) -> (PageEncoding, &'a [u8]) {
        let n = page.len();
        let mut delta_ok = false;
        if let (true, Some(base)) = (self.config.delta, base) {
            self.delta.clear();
            delta_ok = base.len() == n && encode_delta(base, page, &mut self.delta, n / 2);
            if delta_ok && (self.delta.len() <= n / 8 || !self.config.lz4) {
                return (PageEncoding::Delta, &self.delta);
            }
        }
        if self.config.lz4 {
            self.lz4.resize(get_maximum_output_size(n), 0);
            if let Ok(len) = compress_into_with_table(page, &mut self.lz4, &mut self.table) {
                self.lz4.truncate(len);
                if delta_ok && self.delta.len() <= len {
                    return (PageEncoding::Delta, &self.delta);
                }
                if len < n {
                    return (PageEncoding::Lz4, &self.lz4);
                }
            }
        }
        if delta_ok {
            return (PageEncoding::Delta, &self.delta);
        }
        (PageEncoding::Raw, page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_page() -> Vec<u8> {
        let words = ["alpha ", "beta ", "gamma ", "delta ", "epsilon ", "zeta\n"];
        let mut p = Vec::new();
        let mut i = 0;
        while p.len() < 4096 {
            p.extend_from_slice(words[i % words.len()].as_bytes());
            i += 7;
        }
        p.truncate(4096);
        p
    }

    #[test]
    fn delta_round_trips_and_is_small_for_small_changes() {
        let old = text_page();
        let mut new = old.clone();
        new[10] = b'X';
        new[11] = b'Y';
        new[4000..4010].fill(0xaa);
        new[4095] ^= 1;
        let mut d = Vec::new();
        assert!(encode_delta(&old, &new, &mut d, 4096));
        assert!(d.len() < 40, "delta of {} bytes", d.len());
        validate_delta(&d, 4096).unwrap();
        let mut page = old.clone();
        apply_delta(&d, &mut page).unwrap();
        assert_eq!(page, new);
    }

    #[test]
    fn delta_gives_up_past_its_limit() {
        let old = vec![0u8; 4096];
        let new: Vec<u8> = (0..4096).map(|i| (i * 7 + 1) as u8 | 1).collect();
        let mut d = vec![9];
        assert!(!encode_delta(&old, &new, &mut d, 2048));
        assert_eq!(d, vec![9]);
    }

    #[test]
    fn identical_pages_give_an_empty_delta() {
        let p = text_page();
        let mut d = Vec::new();
        assert!(encode_delta(&p, &p, &mut d, 10));
        assert!(d.is_empty());
    }

    #[test]
    fn bad_deltas_are_refused() {
        let mut page = vec![0u8; 64];
        // Run past the end.
        assert!(apply_delta(&[60, 5, 1, 2, 3, 4, 5], &mut page).is_err());
        // Empty run.
        assert!(apply_delta(&[0, 0], &mut page).is_err());
        // Truncated bytes.
        assert!(apply_delta(&[0, 3, 1], &mut page).is_err());
        // Exactly to the end is fine.
        assert!(apply_delta(&[62, 2, 1, 2], &mut page).is_ok());
        assert_eq!(&page[62..], &[1, 2]);
    }

    #[test]
    fn encoder_picks_by_content() {
        let mut enc = PageEncoder::new(CodecConfig::default());
        let text = text_page();
        let (e, data) = enc.encode(&text, None);
        assert_eq!(e, PageEncoding::Lz4);
        let data = data.to_vec();
        let mut out = vec![0u8; 4096];
        decode_page(e, &data, &mut out).unwrap();
        assert_eq!(out, text);

        let mut x = 0x1234_5678_9abc_def0u64;
        let random: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(enc.encode(&random, None).0, PageEncoding::Raw);
        let mut changed = random.clone();
        changed[100] ^= 0xff;
        assert_eq!(enc.encode(&changed, Some(&random)).0, PageEncoding::Delta);
    }

    #[test]
    fn dedup_reference_round_trips_and_is_checked() {
        let page = text_page();
        let r = DedupRef::to(0x1234, &page);
        let payload = r.encode();
        assert_eq!(DedupRef::decode(&payload).unwrap(), r);
        // Decoding into the referenced page's content: it is checked, the page is left as is.
        let mut out = page.clone();
        decode_page(PageEncoding::Dedup, &payload, &mut out).unwrap();
        assert_eq!(out, page);
        // Another content under the reference: refused, naming the page.
        out[7] ^= 1;
        let e = decode_page(PageEncoding::Dedup, &payload, &mut out).unwrap_err();
        assert!(matches!(e, CodecError::DedupCheck { from: 0x1234, .. }), "{e}");
        for len in [0, 8, 15, 17, 32] {
            let data = vec![1u8; len];
            assert!(matches!(DedupRef::decode(&data), Err(CodecError::DedupLength { len: l }) if l == len));
        }
    }

    #[test]
    fn lz4_must_fill_the_page() {
        let small = lz4_flex::block::compress(&[1u8; 100]);
        let mut page = vec![0u8; 4096];
        assert!(matches!(decompress_lz4(&small, &mut page), Err(CodecError::Lz4Length { len: 100, .. })));
        let big = lz4_flex::block::compress(&[1u8; 5000]);
        assert!(decompress_lz4(&big, &mut page).is_err());
    }
}
