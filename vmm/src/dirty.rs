//! Dirty page harvest: the KVM dirty log (the guest's writes) OR the vm-memory bitmap (the
//! VMM's own writes), as guest page ranges.

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

/// ORs two bitmaps word by word into `a`.
pub fn or_into(a: &mut [u64], b: &[u64]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x |= *y;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
