//! Content hashing at memory speed: XXH64 (the published algorithm, seed 0), the zero-page test,
//! and the checkpoint content digest.
//!
//! The sender hashes every non-zero page it ships: the hash finds pages that were dirtied but
//! still hold the bytes last sent, and feeds the checkpoint's content digest, which the backup
//! recomputes from the pages it ends up with (see [`crate::Checkpoint::verify`]). A page sent as a
//! reference to another (dedup) also carries [`dedup_check`], an XXH64 of its content under
//! another seed, which the receiver checks against the page the reference resolves to.

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

#[inline(always)]
fn read_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[inline(always)]
fn round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2)).rotate_left(31).wrapping_mul(P1)
}

#[inline(always)]
fn merge(acc: u64, val: u64) -> u64 {
    (acc ^ round(0, val)).wrapping_mul(P1).wrapping_add(P4)
}

/// XXH64 of `data` with seed 0 (bit-exact with the reference implementation).
pub fn xxh64(data: &[u8]) -> u64 {
    xxh64_with_seed(data, 0)
}

/// The seed of [`dedup_check`].
pub const DEDUP_SEED: u64 = 0x9E37_79B9_7F4A_7C15;

/// The check a dedup reference carries: XXH64 of the page under [`DEDUP_SEED`]. The sender finds
/// a duplicate by the page's seed-0 hash; this second, independent hash lets the receiver catch
/// the (2^-64) case where two different pages share the first one.
pub fn dedup_check(page: &[u8]) -> u64 {
    xxh64_with_seed(page, DEDUP_SEED)
}

/// XXH64 of `data` with `seed` (bit-exact with the reference implementation).
pub fn xxh64_with_seed(data: &[u8], seed: u64) -> u64 {
    let len = data.len() as u64;
    let mut rest = data;
    let mut h = if data.len() >= 32 {
        let mut v1 = seed.wrapping_add(P1).wrapping_add(P2);
        let mut v2 = seed.wrapping_add(P2);
        let mut v3 = seed;
        let mut v4 = seed.wrapping_sub(P1);
        let mut stripes = data.chunks_exact(32);
        for s in &mut stripes {
            v1 = round(v1, read_u64(&s[0..]));
            v2 = round(v2, read_u64(&s[8..]));
            v3 = round(v3, read_u64(&s[16..]));
            v4 = round(v4, read_u64(&s[24..]));
        }
        rest = stripes.remainder();
        let mut h = v1
            .rotate_left(1)
            .wrapping_add(v2.rotate_left(7))
            .wrapping_add(v3.rotate_left(12))
            .wrapping_add(v4.rotate_left(18));
        h = merge(h, v1);
        h = merge(h, v2);
        h = merge(h, v3);
        merge(h, v4)
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(len);
    while rest.len() >= 8 {
        h ^= round(0, read_u64(rest));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
        rest = &rest[8..];
    }
    if rest.len() >= 4 {
        let mut a = [0u8; 4];
        a.copy_from_slice(&rest[..4]);
        h ^= u64::from(u32::from_le_bytes(a)).wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        rest = &rest[4..];
    }
    for &b in rest {
        h ^= u64::from(b).wrapping_mul(P5);
        h = h.rotate_left(11).wrapping_mul(P1);
    }
    avalanche(h)
}

#[inline(always)]
fn avalanche(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

/// Whether every byte of `page` is zero (64 bytes at a time, stopping at the first non-zero
/// block: a typical non-zero page is rejected within its first cache line).
pub fn is_zero(page: &[u8]) -> bool {
    let mut blocks = page.chunks_exact(64);
    for b in &mut blocks {
        let mut acc = 0u64;
        for w in b.chunks_exact(8) {
            acc |= read_u64(w);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// The running content digest of a checkpoint: folds `(pfn, page hash)` pairs in epoch order.
///
/// `digest = avalanche(fold)`, where `fold` starts at `P5` and each page does
/// `fold = ((fold ^ hash).rotl(27) * P1) ^ (pfn * P2)`. Order matters, as it should: the pages of
/// an epoch have one order on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest(u64);

impl Default for Digest {
    fn default() -> Self {
        Self(P5)
    }
}

impl Digest {
    /// Adds one page (its frame number and the XXH64 of its final content).
    #[inline]
    pub fn add(&mut self, pfn: u64, page_hash: u64) {
        self.0 = (self.0 ^ page_hash).rotate_left(27).wrapping_mul(P1) ^ pfn.wrapping_mul(P2);
    }

    /// The digest value carried in `EpochEnd`.
    pub fn finish(&self) -> u64 {
        avalanche(self.0)
    }
}

/// The XXH64 of an all-zero page of `page_size` bytes.
pub fn zero_page_hash(page_size: usize) -> u64 {
    // Zero pages are common: remember the one size in use.
    use std::sync::OnceLock;
    static CACHE: OnceLock<(usize, u64)> = OnceLock::new();
    let &(size, hash) = CACHE.get_or_init(|| (page_size, xxh64(&vec![0u8; page_size])));
    if size == page_size { hash } else { xxh64(&vec![0u8; page_size]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xxh64_matches_reference_vectors() {
        assert_eq!(xxh64(b""), 0xef46_db37_51d8_e999);
        assert_eq!(xxh64(b"a"), 0xd24e_c4f1_a98c_6e5b);
        assert_eq!(xxh64(b"abc"), 0x44bc_2cf5_ad77_0999);
        assert_eq!(xxh64(&[b'x'; 37]), 0x1e58_0c47_5bdc_5381);
        let page: Vec<u8> = (0..4096).map(|i| (i % 256) as u8).collect();
        assert_eq!(xxh64(&page), 0x0f6e_64be_186a_f6a4);
    }

    #[test]
    fn seeded_xxh64_matches_reference_vectors() {
        // The xxHash sanity suite: a generated buffer, digests at seeds 0 and 2654435761.
        let mut state = 2_654_435_761u64;
        let buf: Vec<u8> = (0..222)
            .map(|_| {
                let b = (state >> 56) as u8;
                state = state.wrapping_mul(11_400_714_785_074_694_797);
                b
            })
            .collect();
        let prime = 2_654_435_761;
        for (len, seed, want) in [
            (0, 0, 0xEF46_DB37_51D8_E999),
            (0, prime, 0xAC75_FDA2_929B_17EF),
            (1, 0, 0xE934_A84A_DB05_2768),
            (1, prime, 0x5014_6076_43A9_B4C3),
            (4, 0, 0x9136_A0DC_A574_57EE),
            (14, 0, 0x8282_DCC4_994E_35C8),
            (14, prime, 0xC3BD_6BF6_3DEB_6DF0),
            (222, 0, 0xB641_AE8C_B691_C174),
            (222, prime, 0x20CB_8AB7_AE10_C14A),
        ] {
            assert_eq!(xxh64_with_seed(&buf[..len], seed), want, "length {len}, seed {seed}");
        }
        assert_eq!(xxh64_with_seed(b"abc", prime), 0x1318_DF30_094A_85FD);
        // The dedup check is another function of the page than the hash that finds duplicates.
        let page = vec![7u8; 4096];
        assert_ne!(dedup_check(&page), xxh64(&page));
    }

    #[test]
    fn zero_detection() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        page[4095] = 1;
        assert!(!is_zero(&page));
        assert!(is_zero(&[0u8; 7]));
        assert!(!is_zero(&[0, 0, 3]));
        assert_eq!(zero_page_hash(4096), xxh64(&[0u8; 4096]));
        assert_eq!(zero_page_hash(512), xxh64(&[0u8; 512]));
    }

    #[test]
    fn digest_depends_on_order_and_content() {
        let mut a = Digest::default();
        a.add(1, 10);
        a.add(2, 20);
        let mut b = Digest::default();
        b.add(2, 20);
        b.add(1, 10);
        assert_ne!(a.finish(), b.finish());
        let mut c = Digest::default();
        c.add(1, 10);
        c.add(2, 21);
        assert_ne!(a.finish(), c.finish());
    }
}
