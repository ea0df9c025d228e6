//! Dirty page harvest: the KVM dirty log (the guest's writes) OR the vm-memory bitmap (the
//! VMM's own writes), as guest page ranges; and [`HotPages`], which decides which dirty pages
//! are write-protected again after a harvest and which stay writable.

use serde::{Deserialize, Serialize};

/// A run of dirty guest pages: `[first_page, first_page + count)`, in 4 KiB page numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRange {
    /// Guest-physical page number of the first page.
    pub first_page: u64,
    /// Number of pages.
    pub count: u64,
}

/// The pages dirtied since the previous harvest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyPages {
    /// Sorted, non-overlapping, non-adjacent runs.
    pub ranges: Vec<PageRange>,
}

impl DirtyPages {
    /// Total pages.
    pub fn page_count(&self) -> u64 {
        self.ranges.iter().map(|r| r.count).sum()
    }

    /// Every page number, in order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges.iter().flat_map(|r| r.first_page..r.first_page + r.count)
    }

    /// Appends the set bits of a region bitmap (`words` of 64 pages each) whose first page is
    /// `base_page`. Bits past `pages` are ignored.
    pub fn add_bitmap(&mut self, base_page: u64, words: &[u64], pages: u64) {
        for (w, &word) in words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let bit = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let index = w as u64 * 64 + bit;
                if index >= pages {
                    break;
                }
                self.push_page(base_page + index);
            }
        }
    }

    fn push_page(&mut self, page: u64) {
        if let Some(last) = self.ranges.last_mut()
            && last.first_page + last.count == page
        {
            last.count += 1;
            return;
        }
        self.ranges.push(PageRange { first_page: page, count: 1 });
    }
}

/// Which dirty pages stay writable after a harvest.
///
/// Tracking a page costs a write-protect fault the first time the guest writes it after each
/// harvest: ~4 µs on hardware KVM with shadow paging, 10-25 µs on this host's kvm-pvm
/// (docs/protection.md, "Hot pages"), against ~0.3 µs to copy the page. So a page the guest
/// rewrites every epoch is cheaper to copy every epoch than to re-protect: it stays writable
/// (its dirty bit stays set, so every harvest returns it and its current content is copied at
/// every checkpoint) and only its tracking is skipped. The harvest stays exact whatever this
/// decides: a page is left out of a harvest only if it was write-protected when it was last
/// copied and has not faulted since.
///
/// The rule, per page: a page that faults again within the first epoch after it was
/// protected is *hot*: it stays writable for `level` harvests, `level` doubling (1, 2, 4 ...
/// up to `max_epochs`) each time it comes straight back after being protected again, and
/// resetting when it does not. A page that faults again later, but within `window` harvests
/// of being protected (a frequent writer: a server's per-connection buffers, touched every few
/// epochs), is hot the same way, but at most `max_window_pages` such pages are hot at once: a
/// random writer over a large set comes back within a few epochs too, and copying all of its
/// pages at every checkpoint would lengthen the pause. A page written once, or less often than
/// every `window` epochs (a slow round-robin writer), is protected again at once, as without
/// the policy: it costs nothing more. A hot page that goes quiet is copied for at most `level`
/// more epochs. At most `max_pages` pages are hot at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HotPagesConfig {
    /// The longest a hot page stays writable without a check, in harvests (0: every dirty page
    /// is protected again at every harvest, the classic dirty log).
    pub max_epochs: u8,
    /// The most pages kept writable at once.
    pub max_pages: u64,
    /// A page that faults again within this many harvests of being protected is a frequent
    /// writer, hot too (0 or 1: only a page back within the first epoch is hot).
    pub window: u8,
    /// The most frequent writers (pages back after more than one epoch) kept writable at once.
    pub max_window_pages: u64,
}

/// Default [`HotPagesConfig::window`]: on the kv guest under 16 connections, 1 (the rule of
/// session 9) left ~10 write faults an epoch (each 10-25 µs of the guest's time on this host);
/// 8 halves them and moves the gets +15-22% by turns (docs/benchmarks-history.md, session 13).
pub const DEFAULT_HOT_WINDOW: u8 = 8;
/// Default [`HotPagesConfig::max_window_pages`]: 128 KiB more to copy per checkpoint at most.
/// A random writer fills the cap: at the pause goal's point (`dirty wss=16 rate=20000`, 50 ms
/// epochs) a cap of 64 took the pause p99 from 470 to 923 µs (medians of 5 runs), 32 from 426 to
/// 513; the kv gets gained +16% with 32 (session 13, docs/benchmarks-history.md).
pub const DEFAULT_MAX_WINDOW_PAGES: u64 = 32;

impl Default for HotPagesConfig {
    fn default() -> Self {
        Self {
            max_epochs: 32,
            max_pages: 16_384,
            window: DEFAULT_HOT_WINDOW,
            max_window_pages: DEFAULT_MAX_WINDOW_PAGES,
        }
    }
}

/// Per-page state of [`HotPagesConfig`]'s rule over one memory slot.
#[derive(Debug)]
struct SlotHot {
    /// Harvests left before the page is protected again (0: protected after this harvest).
    left: Vec<u8>,
    /// The page's current hot level (harvests it stays writable when it turns hot again).
    level: Vec<u8>,
    /// The harvest at which the page was last protected again (`u32::MAX`: never).
    protected_at: Vec<u32>,
    /// The page is hot as a frequent writer (counted in [`HotPages::window_hot`]).
    frequent: Vec<bool>,
}

/// [`HotPagesConfig`]'s rule, applied harvest by harvest (see there).
#[derive(Debug)]
pub struct HotPages {
    config: HotPagesConfig,
    slots: Vec<SlotHot>,
    harvest: u32,
    hot: u64,
    /// Of `hot`, the frequent writers.
    window_hot: u64,
}

impl HotPages {
    /// The rule over slots of `slot_pages` pages each, before the first harvest.
    pub fn new(config: HotPagesConfig, slot_pages: &[u64]) -> Self {
        let slots = slot_pages
            .iter()
            .map(|&n| SlotHot {
                left: vec![0; n as usize],
                level: vec![0; n as usize],
                protected_at: vec![u32::MAX; n as usize],
                frequent: vec![false; n as usize],
            })
            .collect();
        Self { config, slots, harvest: 0, hot: 0, window_hot: 0 }
    }

    /// Starts a harvest: call once before the [`HotPages::decide`] of its slots.
    pub fn begin(&mut self) {
        self.harvest = self.harvest.wrapping_add(1);
        if self.harvest == u32::MAX {
            self.harvest = 0;
        }
    }

    /// For the dirty bitmap `dirty` of `slot` (bit i: page i of the slot), writes into
    /// `protect` the pages to write-protect again (a subset of `dirty`); the rest of `dirty`
    /// stays writable and will be in the next harvest too.
    pub fn decide(&mut self, slot: usize, dirty: &[u64], protect: &mut Vec<u64>) {
        protect.clear();
        protect.extend_from_slice(dirty);
        let Some(s) = self.slots.get_mut(slot) else { return };
        let window = u32::from(self.config.window.max(1));
        for (w, &word) in dirty.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let bit = bits.trailing_zeros();
                bits &= bits - 1;
                let i = w * 64 + bit as usize;
                if i >= s.left.len() {
                    break;
                }
                // Harvests since the page was last protected (u32::MAX: never protected).
                let since = match s.protected_at[i] {
                    u32::MAX => u32::MAX,
                    at => self.harvest.wrapping_sub(at),
                };
                let room = self.config.max_epochs > 0 && self.hot < self.config.max_pages;
                let keep = if s.left[i] > 0 {
                    // Hot: writable since an earlier harvest.
                    s.left[i] -= 1;
                    if s.left[i] == 0 {
                        self.hot -= 1;
                        if std::mem::take(&mut s.frequent[i]) {
                            self.window_hot -= 1;
                        }
                    }
                    s.left[i] > 0
                } else if room && (since == 1 || (since <= window && self.window_hot < self.config.max_window_pages)) {
                    // Faulted again within one epoch of being protected, or within the window
                    // (a frequent writer, while there is room for one more): hot.
                    s.level[i] = s.level[i].saturating_mul(2).clamp(1, self.config.max_epochs);
                    s.left[i] = s.level[i];
                    self.hot += 1;
                    if since > 1 {
                        s.frequent[i] = true;
                        self.window_hot += 1;
                    }
                    true
                } else {
                    if since > window {
                        s.level[i] = 0;
                    }
                    false
                };
                if keep {
                    protect[w] &= !(1u64 << bit);
                } else {
                    s.protected_at[i] = self.harvest;
                }
            }
        }
    }

    /// Pages kept writable after the last harvest.
    pub fn hot_pages(&self) -> u64 {
        self.hot
    }
}

/// ORs two bitmaps word by word into `a`.
pub fn or_into(a: &mut [u64], b: &[u64]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x |= *y;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KVM's manual-protect dirty log for one slot, as the policy sees it: a write sets the
    /// page's bit (faulting first if the page is protected); a harvest returns the set bits and
    /// clears (protects) the ones the policy gives back.
    struct Model {
        set: Vec<bool>,
        faults: u64,
    }

    impl Model {
        fn write(&mut self, p: usize) {
            if !self.set[p] {
                self.faults += 1;
                self.set[p] = true;
            }
        }

        fn harvest(&mut self, hot: &mut HotPages) -> Vec<usize> {
            let mut words = vec![0u64; self.set.len().div_ceil(64)];
            for (i, _) in self.set.iter().enumerate().filter(|(_, s)| **s) {
                words[i / 64] |= 1 << (i % 64);
            }
            let mut protect = Vec::new();
            hot.begin();
            hot.decide(0, &words, &mut protect);
            for (w, &word) in protect.iter().enumerate() {
                assert_eq!(word & !words[w], 0, "protects only pages it was given");
                for b in 0..64 {
                    if word & (1 << b) != 0 {
                        self.set[w * 64 + b] = false;
                    }
                }
            }
            (0..self.set.len()).filter(|&i| words[i / 64] & (1 << (i % 64)) != 0).collect()
        }
    }

    fn run(
        config: HotPagesConfig,
        pages: usize,
        epochs: usize,
        writes: impl Fn(usize) -> Vec<usize>,
    ) -> (u64, u64, HotPages) {
        let mut m = Model { set: vec![false; pages], faults: 0 };
        let mut hot = HotPages::new(config, &[pages as u64]);
        let mut copied = 0;
        for e in 0..epochs {
            let w = writes(e);
            for &p in &w {
                m.write(p);
            }
            let harvested = m.harvest(&mut hot);
            for p in &w {
                assert!(harvested.contains(p), "epoch {e}: page {p} was written and not harvested");
            }
            copied += harvested.len() as u64;
        }
        (m.faults, copied, hot)
    }

    #[test]
    fn a_page_rewritten_every_epoch_stops_faulting_and_is_still_harvested_every_epoch() {
        let cfg = HotPagesConfig { max_epochs: 32, max_pages: 1000, ..HotPagesConfig::default() };
        let (faults, copied, hot) = run(cfg, 256, 200, |_| (0..256).collect());
        // Levels 1, 2, 4, 8, 16, 32, 32, ...: 12 faults per page in 200 epochs, not 200.
        assert!(faults <= 256 * 12, "{faults} faults");
        assert_eq!(copied, 256 * 200);
        assert_eq!(hot.hot_pages(), 256);
        // Off: every write after a harvest faults.
        let (faults, _, _) = run(HotPagesConfig { max_epochs: 0, ..cfg }, 256, 200, |_| (0..256).collect());
        assert_eq!(faults, 256 * 200);
    }

    #[test]
    fn round_robin_and_one_off_writes_are_protected_at_once_as_without_the_policy() {
        let cfg = HotPagesConfig::default();
        // 16 pages an epoch round robin over 256: each page every 16th epoch.
        let rr = |e: usize| ((e * 16) % 256..(e * 16) % 256 + 16).collect::<Vec<_>>();
        let (faults, copied, hot) = run(cfg, 256, 160, rr);
        assert_eq!(faults, 16 * 160);
        assert_eq!(copied, 16 * 160, "no page is copied when it was not written");
        assert_eq!(hot.hot_pages(), 0);
    }

    #[test]
    fn a_hot_page_that_goes_quiet_is_protected_again_within_its_level() {
        let cfg = HotPagesConfig { max_epochs: 8, max_pages: 1000, ..HotPagesConfig::default() };
        // Page 5 every epoch for 100 epochs, then never.
        let (_, copied, hot) = run(cfg, 64, 200, |e| if e < 100 { vec![5] } else { vec![] });
        assert!(copied <= 100 + 8, "{copied} copies");
        assert_eq!(hot.hot_pages(), 0);
    }

    #[test]
    fn no_more_than_max_pages_are_kept_writable() {
        let cfg = HotPagesConfig { max_epochs: 32, max_pages: 10, ..HotPagesConfig::default() };
        let (faults, _, hot) = run(cfg, 128, 50, |_| (0..128).collect());
        assert!(hot.hot_pages() <= 10);
        assert!(faults > 118 * 49, "the rest fault every epoch: {faults}");
    }

    #[test]
    fn a_page_rewritten_every_few_epochs_stops_faulting_within_the_window() {
        // 32 pages written every 3rd epoch (a server's per-connection buffers).
        let every3 = |e: usize| if e.is_multiple_of(3) { (0..32).collect() } else { vec![] };
        let cfg = HotPagesConfig { window: 8, ..HotPagesConfig::default() };
        let (faults, copied, _) = run(cfg, 64, 300, every3);
        // Levels 1, 2, 4, 8, 16, 32, 32 ...: a handful of faults per page, not 100.
        assert!(faults <= 32 * 16, "{faults} faults");
        // Kept writable, they are copied every epoch (exact: `run` checks every write is harvested).
        assert!(copied > 32 * 100, "{copied} copies");
        // With the window at 1 (the every-epoch rule only) each write after a harvest faults.
        let (faults, copied, hot) = run(HotPagesConfig { window: 1, ..cfg }, 64, 300, every3);
        assert_eq!(faults, 32 * 100);
        assert_eq!(copied, 32 * 100);
        assert_eq!(hot.hot_pages(), 0);
    }

    #[test]
    fn no_more_than_max_window_pages_frequent_writers_are_kept_writable() {
        // Pages 0-19 every epoch, pages 64-255 every 2nd epoch.
        let mix = |e: usize| {
            let mut w: Vec<usize> = (0..20).collect();
            if e.is_multiple_of(2) {
                w.extend(64..256);
            }
            w
        };
        let cfg = HotPagesConfig { max_epochs: 32, max_pages: 1000, window: 8, max_window_pages: 10 };
        let mut m = Model { set: vec![false; 256], faults: 0 };
        let mut hot = HotPages::new(cfg, &[256]);
        for e in 0..200 {
            for p in mix(e) {
                m.write(p);
            }
            m.harvest(&mut hot);
            assert!(hot.window_hot <= 10, "epoch {e}: {} frequent writers hot", hot.window_hot);
        }
        // The every-epoch writers are all hot whatever the frequent writers took.
        assert!((0..20).all(|p| hot.slots[0].left[p] > 0), "an every-epoch writer is not hot");
        // Frequent writers fault: no more than 10 of them were spared at a time.
        assert!(m.faults > 150 * 100, "{} faults", m.faults);
    }

    #[test]
    fn random_writes_are_always_harvested() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let plan: Vec<Vec<usize>> = (0..300)
            .map(|e| {
                let n = (rnd() % 40) as usize;
                // A hot core (pages 0-15) most epochs, plus random pages.
                let mut w: Vec<usize> = (0..n).map(|_| (rnd() % 200) as usize).collect();
                if e % 7 != 0 {
                    w.extend(0..16);
                }
                w
            })
            .collect();
        // `run` asserts every written page is in the harvest of its epoch.
        run(HotPagesConfig { max_epochs: 16, max_pages: 50, ..HotPagesConfig::default() }, 200, 300, |e| {
            plan[e].clone()
        });
        run(HotPagesConfig { max_epochs: 16, max_pages: 50, window: 30, max_window_pages: 20 }, 200, 300, |e| {
            plan[e].clone()
        });
    }

    #[test]
    fn bitmap_to_ranges() {
        let mut d = DirtyPages::default();
        let words = [0b1110_0001u64, 1 << 63, 1];
        d.add_bitmap(0x100, &words, 129);
        assert_eq!(
            d.ranges,
            vec![
                PageRange { first_page: 0x100, count: 1 },
                PageRange { first_page: 0x105, count: 3 },
                PageRange { first_page: 0x100 + 127, count: 2 },
            ]
        );
        assert_eq!(d.page_count(), 6);
        let mut clipped = DirtyPages::default();
        clipped.add_bitmap(0, &words, 128);
        assert_eq!(clipped.page_count(), 5);
    }
}
