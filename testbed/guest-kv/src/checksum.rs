//! Checksums the workloads print or verify, so a test can recompute them on the host.
//!
//! # `counter`
//! Line `n` (counting from 1) reads `seq=<n> sum=<s>` where `s` is 16 lowercase hex digits of
//! a 64-bit FNV-1a hash folded over the 8 little-endian bytes of every sequence number printed
//! so far: `sum(0) = 0xcbf29ce484222325` (the FNV offset basis) and
//! `sum(n) = fnv1a(sum(n-1), n.to_le_bytes())` with the FNV prime `0x100000001b3`.
//!
//! ```
//! use guest_kv::checksum::{counter_sum, counter_step, COUNTER_SUM_INIT};
//! let s1 = counter_step(COUNTER_SUM_INIT, 1);
//! assert_eq!(counter_sum(1), s1);
//! assert_eq!(counter_sum(2), counter_step(s1, 2));
//! ```
//!
//! # `dirty`
//! Page `p` (0-based index into the working set) written in generation `g` holds 512
//! little-endian 64-bit words `w[k] = seed(p, g) + k * DIRTY_STRIDE` (wrapping), where
//! `seed` is [`dirty_seed`]. No two (page, generation) pairs share a seed in practice, and a
//! zero page never verifies (`w[0]` and `w[1]` cannot both be zero).

/// FNV-1a 64-bit offset basis: the checksum before any line.
pub const COUNTER_SUM_INIT: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Folds sequence number `n` into the running checksum `sum`.
pub fn counter_step(sum: u64, n: u64) -> u64 {
    let mut h = sum;
    for b in n.to_le_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// The checksum printed on line `n` (fold of 1..=n); `counter_sum(0)` is the initial value.
pub fn counter_sum(n: u64) -> u64 {
    (1..=n).fold(COUNTER_SUM_INIT, counter_step)
}

/// Words per 4 KiB page.
pub const PAGE_WORDS: usize = 512;
/// Added to each successive word of a dirty page (odd, so words never repeat within a page).
pub const DIRTY_STRIDE: u64 = 0x9e37_79b9_7f4a_7c15;

/// splitmix64 finaliser: a bijection on u64 with good avalanche.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The first word of page `page` in generation `generation`.
pub fn dirty_seed(page: u64, generation: u64) -> u64 {
    mix64(mix64(page ^ 0x5555_0000_0000_0000).wrapping_add(generation))
}

/// Word `k` of page `page` in generation `generation`.
pub fn dirty_word(page: u64, generation: u64, k: usize) -> u64 {
    dirty_seed(page, generation).wrapping_add((k as u64).wrapping_mul(DIRTY_STRIDE))
}

/// Fills `words` with the content of `page` in `generation`.
pub fn dirty_fill(words: &mut [u64; PAGE_WORDS], page: u64, generation: u64) {
    let mut w = dirty_seed(page, generation);
    for slot in words.iter_mut() {
        *slot = w;
        w = w.wrapping_add(DIRTY_STRIDE);
    }
}

/// Whether `words` holds exactly the content of `page` in `generation`.
pub fn dirty_check(words: &[u64; PAGE_WORDS], page: u64, generation: u64) -> bool {
    let mut w = dirty_seed(page, generation);
    let mut ok = true;
    for &slot in words.iter() {
        ok &= slot == w;
        w = w.wrapping_add(DIRTY_STRIDE);
    }
    ok
}

/// Verifies that `words` holds `(page, old_generation)` and rewrites it with
/// `(page, old_generation + 1)` in one pass; returns whether the old content was right.
/// With `old_generation == None` (the page was never written) it only writes generation 0.
pub fn dirty_rewrite(words: &mut [u64; PAGE_WORDS], page: u64, old_generation: Option<u64>) -> bool {
    match old_generation {
        None => {
            dirty_fill(words, page, 0);
            true
        }
        Some(g) => {
            let mut old = dirty_seed(page, g);
            let mut new = dirty_seed(page, g + 1);
            let mut ok = true;
            for slot in words.iter_mut() {
                ok &= *slot == old;
                *slot = new;
                old = old.wrapping_add(DIRTY_STRIDE);
                new = new.wrapping_add(DIRTY_STRIDE);
            }
            ok
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_known_values() {
        // fnv1a64 of the 8 bytes 01 00 00 00 00 00 00 00 (checked against a reference impl).
        let mut h: u64 = 0xcbf29ce484222325;
        for b in [1u8, 0, 0, 0, 0, 0, 0, 0] {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
        assert_eq!(counter_sum(1), h);
        assert_eq!(counter_sum(0), COUNTER_SUM_INIT);
    }

    #[test]
    fn counter_fold_is_incremental() {
        let mut s = COUNTER_SUM_INIT;
        for n in 1..=1000 {
            s = counter_step(s, n);
        }
        assert_eq!(s, counter_sum(1000));
        // Order matters: a repeat or a gap changes the sum.
        let skip = (1..=1000u64).filter(|&n| n != 500).fold(COUNTER_SUM_INIT, counter_step);
        assert_ne!(skip, s);
        let swap = [1u64, 3, 2].into_iter().fold(COUNTER_SUM_INIT, counter_step);
        assert_ne!(swap, counter_sum(3));
    }

    #[test]
    fn dirty_fill_and_check() {
        let mut page = [0u64; PAGE_WORDS];
        assert!(!dirty_check(&page, 0, 0), "zero page must not verify");
        dirty_fill(&mut page, 7, 3);
        assert!(dirty_check(&page, 7, 3));
        assert!(!dirty_check(&page, 7, 2));
        assert!(!dirty_check(&page, 8, 3));
        for (k, w) in page.iter().enumerate() {
            assert_eq!(*w, dirty_word(7, 3, k));
        }
        page[100] ^= 1;
        assert!(!dirty_check(&page, 7, 3));
    }

    #[test]
    fn dirty_rewrite_verifies_then_advances() {
        let mut page = [0u64; PAGE_WORDS];
        assert!(dirty_rewrite(&mut page, 5, None));
        assert!(dirty_check(&page, 5, 0));
        assert!(dirty_rewrite(&mut page, 5, Some(0)));
        assert!(dirty_check(&page, 5, 1));
        // A stale page (generation 1 expected 2) is reported, and still rewritten.
        let mut stale = page;
        assert!(!dirty_rewrite(&mut stale, 5, Some(2)));
        assert!(dirty_check(&stale, 5, 3));
    }

    #[test]
    fn seeds_differ() {
        let mut seen = std::collections::HashSet::new();
        for p in 0..256 {
            for g in 0..64 {
                assert!(seen.insert(dirty_seed(p, g)));
            }
        }
    }
}
