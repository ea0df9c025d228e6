//! Seeded generators for simulations, fuzz smoke runs and fault schedules: small, fast, no
//! dependency, and stable across crate versions, so that a seed in a report replays the run.
//! [`Rng`] is xorshift64* seeded through splitmix64 (any seed, 0 included, gives a good
//! stream); [`XorShift64`] is the plain 13/7/17 xorshift on a raw nonzero state.

/// splitmix64's output function: decorrelates seeds (0, 1, 2, ... become unrelated states).
pub fn splitmix64(z: u64) -> u64 {
    let mut z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform float in [0, 1) from the top 53 bits of `x`.
fn unit_of(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// xorshift64* seeded through splitmix64.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(splitmix64(seed) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in [0, n) (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// In [lo, hi) (lo when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo).max(1))
    }

    /// True with probability `p` (never for p <= 0). Draws one number whatever `p` is, so a
    /// zero probability leaves the stream where a nonzero one would.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        unit_of(self.next_u64())
    }
}

/// xorshift64 (shifts 13, 7, 17) on a raw state, which must not be 0; [`XorShift64::seeded`]
/// derives a state from any seed.
#[derive(Debug, Clone)]
pub struct XorShift64(pub u64);

impl XorShift64 {
    /// A state from any seed, through [`splitmix64`].
    pub fn seeded(seed: u64) -> Self {
        Self(splitmix64(seed) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// In [0, n) (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// An index into a slice of `len` elements (0 when it is empty).
    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// In [lo, hi) (lo when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo).max(1))
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        unit_of(self.next_u64())
    }

    /// True with probability `p`; draws nothing when p <= 0 (unlike [`Rng::chance`]).
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The streams are fixed: seeds in reports and simulations must replay the same runs.
    #[test]
    fn streams_are_stable() {
        let mut x = XorShift64(7);
        assert_eq!([x.next_u64(), x.next_u64()], [7_575_888_327, 8_070_950_887_952_051_652]);
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
        let mut r = Rng::new(0);
        let first = r.next_u64();
        assert_eq!(Rng::new(0).next_u64(), first, "same seed, same stream");
        assert_ne!(Rng::new(1).next_u64(), first);
        for _ in 0..1000 {
            assert!(r.below(10) < 10);
            assert_eq!(r.below(0), 0);
            assert!((5..9).contains(&r.range(5, 9)));
            assert_eq!(r.range(4, 4), 4);
            let u = r.unit();
            assert!((0.0..1.0).contains(&u));
            assert!(!r.chance(0.0) && r.chance(1.0));
            assert!(x.index(3) < 3 && x.index(0) == 0);
        }
        // Rng::chance draws whatever the probability; XorShift64::chance not for p <= 0.
        let (mut a, mut b) = (Rng::new(3), Rng::new(3));
        assert!(!a.chance(0.0));
        b.next_u64();
        assert_eq!(a.next_u64(), b.next_u64());
        let (mut a, b) = (XorShift64(3), XorShift64(3));
        assert!(!a.chance(0.0));
        assert_eq!(a.0, b.0);
        let hits = (0..10_000).filter(|_| r.chance(0.25)).count();
        assert!((2200..2800).contains(&hits), "{hits}");
    }
}
