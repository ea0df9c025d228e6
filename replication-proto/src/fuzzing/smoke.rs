//! A small deterministic stand-in for libFuzzer, for the fuzz smoke tests that run inside
//! `cargo test` (each crate's `tests/fuzz_smoke.rs`): seeds, then random bytes and mutated seeds,
//! fed to a fuzz entry point. The same salt gives the same inputs, run after run.
//!
//! `FUZZ_SMOKE_ITERS` overrides the number of inputs per target; with `FUZZ_SEED_DIR` set,
//! [`run`] also writes each target's seeds there as files (the seed corpora of the `cargo fuzz`
//! targets were made so).

/// xorshift64: fast, deterministic, good enough to pick mutations.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Up to `max - 1` random bytes.
    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        (0..self.below(max)).map(|_| self.next_u64() as u8).collect()
    }
}

/// Inputs per target: `FUZZ_SMOKE_ITERS` if set, else `release` (or `debug` in a debug build).
pub fn iterations(release: usize, debug: usize) -> usize {
    std::env::var("FUZZ_SMOKE_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(if cfg!(debug_assertions) {
        debug
    } else {
        release
    })
}

/// One to four mutations: bit flips, interesting bytes, cuts, random tails, spliced copies,
/// interesting length words (little- and big-endian u32, little-endian u64), inserted bytes.
pub fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        match rng.below(9) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] = [0, 1, 0x7f, 0x80, 0xff][rng.below(5)];
            }
            2 => input.truncate(rng.below(input.len() + 1)),
            3 => {
                let tail = rng.bytes(16);
                input.extend_from_slice(&tail);
            }
            4 if input.len() > 2 => {
                let a = rng.below(input.len());
                let b = rng.below(input.len());
                let piece = input[a.min(b)..a.max(b)].to_vec();
                let at = rng.below(input.len());
                input.splice(at..at, piece);
            }
            5 if input.len() > 8 => {
                let i = rng.below(input.len() - 4);
                let v: u32 = [0, 1, 12, 4096, 65535, u32::MAX][rng.below(6)];
                input[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            6 if input.len() > 8 => {
                let i = rng.below(input.len() - 4);
                let v: u32 = [0, 1, 64, 1 << 31, (1 << 31) | 1024, u32::MAX][rng.below(6)];
                input[i..i + 4].copy_from_slice(&v.to_be_bytes());
            }
            7 if input.len() > 8 => {
                let i = rng.below(input.len() - 8);
                let v: u64 = [0, 1, 4096, 1 << 40, u64::MAX][rng.below(5)];
                input[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            _ => {
                let i = rng.below(input.len() + 1);
                input.insert(i, rng.next_u64() as u8);
            }
        }
    }
}

/// With `FUZZ_SEED_DIR` set, writes `seeds` as files into `$FUZZ_SEED_DIR/<target>/`.
pub fn save_seeds(target: &str, seeds: &[Vec<u8>]) {
    let Some(dir) = std::env::var_os("FUZZ_SEED_DIR") else {
        return;
    };
    let dir = std::path::Path::new(&dir).join(target);
    std::fs::create_dir_all(&dir).expect("seed directory");
    for (i, seed) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i}")), seed).expect("seed file");
    }
}

/// Feeds `target` (named `name`) each seed, then `n` inputs: every eighth random bytes, the
/// others a mutated seed, each passed through `fix` first (e.g. to recompute checksums, so that
/// mutated bytes get past them).
pub fn run(
    name: &str,
    seeds: &[Vec<u8>],
    salt: u64,
    n: usize,
    mut fix: impl FnMut(&mut Rng, &mut Vec<u8>),
    mut target: impl FnMut(&[u8]),
) {
    save_seeds(name, seeds);
    seeds.iter().for_each(|s| target(s));
    let mut rng = Rng(0x5eed_0000_0000_0001 ^ salt);
    for i in 0..n {
        let mut input =
            if i % 8 == 0 || seeds.is_empty() { rng.bytes(600) } else { seeds[rng.below(seeds.len())].clone() };
        mutate(&mut rng, &mut input);
        fix(&mut rng, &mut input);
        target(&input);
    }
}
