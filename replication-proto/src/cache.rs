//! The sender's memory of what it last sent for each page.
//!
//! For every guest page it keeps 13 bytes: what the page last held as far as the backup knows
//! (unknown, zero, a 64-bit content hash) and, for a bounded number of pages, a full copy of the
//! bytes last sent. Copies make "unchanged" exact (hash equal *and* bytes equal) and are the base
//! of deltas. The copies live in a slab of at most `bound / page_size` slots; when it is full a
//! CLOCK hand (second chance: pages hit since the hand last passed are spared) picks the slot to
//! reuse, and the evicted page keeps only its hash.
//!
//! The hash alone says "unchanged" only when [`crate::SenderConfig::trust_hash`] is set: two
//! different pages collide with probability 2^-64 per comparison (see `docs/protocol.md`).
//!
//! With dedup on ([`PageCache::enable_index`]) the cache also keeps a *content index*: for each
//! content hash, one page whose last-sent content has that hash. A page about to be sent whose
//! hash is in the index can go as a reference to that page. The index holds at most one entry per
//! page: when a page's last-sent content changes, its old entry goes (if it was the one), so it
//! never grows beyond the guest.

use std::collections::HashMap;

/// What the cache knows about a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cached<'a> {
    /// Nothing: never sent, or forgotten at a resync.
    Unknown,
    /// Last sent as a zero page.
    Zero,
    /// Last sent with this content hash; the copy was evicted.
    Hash(u64),
    /// Last sent with this hash and these bytes.
    Copy(u64, &'a [u8]),
}

const UNKNOWN: u8 = 0;
const ZERO: u8 = 1;
const HASH: u8 = 2;
const COPY: u8 = 3;

/// Last-sent page state with a byte bound on copies.
#[derive(Debug)]
pub struct PageCache {
    page_size: usize,
    kind: Vec<u8>,
    hash: Vec<u64>,
    slot: Vec<u32>,
    capacity: usize,
    store: Vec<u8>,
    owner: Vec<u32>,
    referenced: Vec<bool>,
    hand: usize,
    evictions: u64,
    /// Content hash to a page last sent with it (see the module docs), when dedup is on.
    index: Option<HashMap<u64, u32>>,
}

impl PageCache {
    /// A cache for `pages` pages of `page_size` bytes, keeping copies of at most `bound_bytes`.
    pub fn new(pages: usize, page_size: usize, bound_bytes: u64) -> Self {
        let capacity = (bound_bytes / page_size.max(1) as u64).min(pages as u64) as usize;
        Self {
            page_size,
            kind: vec![UNKNOWN; pages],
            hash: vec![0; pages],
            slot: vec![0; pages],
            capacity,
            store: Vec::new(),
            owner: Vec::new(),
            referenced: Vec::new(),
            hand: 0,
            evictions: 0,
            index: None,
        }
    }

    /// Keeps the content index from now on (see the module docs).
    pub fn enable_index(&mut self) {
        self.index.get_or_insert_with(HashMap::new);
    }

    /// Entries in the content index.
    pub fn index_len(&self) -> usize {
        self.index.as_ref().map_or(0, HashMap::len)
    }

    /// A page other than `except` whose last-sent content has hash `hash`, if the index knows
    /// one.
    pub fn find(&self, hash: u64, except: usize) -> Option<usize> {
        let &page = self.index.as_ref()?.get(&hash)?;
        let page = page as usize;
        (page != except && self.holds(page, hash)).then_some(page)
    }

    /// Whether page `index` was last sent with content hash `hash`.
    fn holds(&self, index: usize, hash: u64) -> bool {
        matches!(self.kind.get(index), Some(&HASH | &COPY)) && self.hash[index] == hash
    }

    /// Page `index` no longer holds its last-sent content: drops its index entry if it has one.
    fn unindex(&mut self, index: usize) {
        if let (Some(map), Some(&HASH | &COPY)) = (self.index.as_mut(), self.kind.get(index)) {
            let hash = self.hash[index];
            if map.get(&hash) == Some(&(index as u32)) {
                map.remove(&hash);
            }
        }
    }

    /// Page `index` now holds content `hash`: the index points there unless it already knows a
    /// page that holds it.
    fn reindex(&mut self, index: usize, hash: u64) {
        let Some(map) = self.index.as_ref() else {
            return;
        };
        let known = map.get(&hash).is_some_and(|&p| self.holds(p as usize, hash));
        if !known && let Some(map) = self.index.as_mut() {
            map.insert(hash, index as u32);
        }
    }

    /// Copies the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Copies held now.
    pub fn copies(&self) -> usize {
        self.owner.len()
    }

    /// Copies evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Bytes of memory the cache uses.
    pub fn memory_bytes(&self) -> usize {
        self.kind.len() * 13 + self.store.len() + self.owner.len() * 5
    }

    /// What is known about page `index`; a hit on a copy marks it recently used.
    pub fn get(&mut self, index: usize) -> Cached<'_> {
        match self.kind.get(index).copied() {
            Some(ZERO) => Cached::Zero,
            Some(HASH) => Cached::Hash(self.hash[index]),
            Some(COPY) => {
                let s = self.slot[index] as usize;
                self.referenced[s] = true;
                let at = s * self.page_size;
                Cached::Copy(self.hash[index], &self.store[at..at + self.page_size])
            }
            _ => Cached::Unknown,
        }
    }

    /// Records that page `index` was sent as a zero page.
    pub fn put_zero(&mut self, index: usize) {
        self.unindex(index);
        self.release(index);
        if let Some(k) = self.kind.get_mut(index) {
            *k = ZERO;
        }
    }

    /// Records that page `index` was sent holding `page` (with content hash `hash`).
    pub fn put(&mut self, index: usize, hash: u64, page: &[u8]) {
        if index >= self.kind.len() || page.len() != self.page_size {
            return;
        }
        if !self.holds(index, hash) {
            self.unindex(index);
        }
        self.hash[index] = hash;
        let slot = if self.kind[index] == COPY { Some(self.slot[index] as usize) } else { self.alloc() };
        match slot {
            Some(s) => {
                let at = s * self.page_size;
                self.store[at..at + self.page_size].copy_from_slice(page);
                self.owner[s] = index as u32;
                self.referenced[s] = true;
                self.slot[index] = s as u32;
                self.kind[index] = COPY;
            }
            None => self.kind[index] = HASH,
        }
        self.reindex(index, hash);
    }

    /// Forgets everything (after a resync the backup's replica is a new baseline).
    pub fn clear(&mut self) {
        self.kind.fill(UNKNOWN);
        self.store = Vec::new();
        self.owner.clear();
        self.referenced.clear();
        self.hand = 0;
        if let Some(map) = self.index.as_mut() {
            map.clear();
        }
    }

    fn release(&mut self, index: usize) {
        if self.kind.get(index) == Some(&COPY) {
            // Leave the slot to be reused first: mark it cold and owned by nobody.
            let s = self.slot[index] as usize;
            self.referenced[s] = false;
            self.owner[s] = u32::MAX;
        }
    }

    fn alloc(&mut self) -> Option<usize> {
        if self.capacity == 0 {
            return None;
        }
        if self.owner.len() < self.capacity {
            self.owner.push(u32::MAX);
            self.referenced.push(false);
            self.store.resize(self.owner.len() * self.page_size, 0);
            return Some(self.owner.len() - 1);
        }
        // CLOCK: at most two sweeps (the first clears every reference bit).
        for _ in 0..2 * self.capacity + 1 {
            let s = self.hand;
            self.hand = (self.hand + 1) % self.capacity;
            if self.referenced[s] {
                self.referenced[s] = false;
                continue;
            }
            let victim = self.owner[s];
            if victim != u32::MAX {
                self.kind[victim as usize] = HASH;
                self.evictions += 1;
            }
            return Some(s);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_bounded_and_evicted_by_clock() {
        let mut c = PageCache::new(10, 4, 3 * 4);
        assert_eq!(c.capacity(), 3);
        for i in 0..3 {
            c.put(i, i as u64, &[i as u8; 4]);
        }
        // Touch page 0 so it gets a second chance.
        assert!(matches!(c.get(0), Cached::Copy(0, _)));
        c.put(3, 3, &[3; 4]);
        assert_eq!(c.copies(), 3);
        assert_eq!(c.evictions(), 1);
        let kinds: Vec<_> = (0..4).map(|i| matches!(c.get(i), Cached::Copy(..))).collect();
        assert_eq!(kinds.iter().filter(|&&k| k).count(), 3);
        // The evicted one still has its hash.
        assert!((0..4).any(|i| matches!(c.get(i), Cached::Hash(_))));
    }

    #[test]
    fn zero_releases_the_copy_and_clear_forgets() {
        let mut c = PageCache::new(4, 4, 8);
        c.put(1, 7, &[1; 4]);
        c.put_zero(1);
        assert_eq!(c.get(1), Cached::Zero);
        c.put(2, 8, &[2; 4]);
        c.put(3, 9, &[3; 4]);
        assert_eq!(c.evictions(), 0, "the released slot is reused first");
        c.clear();
        assert_eq!(c.get(2), Cached::Unknown);
        assert_eq!(c.copies(), 0);
    }

    #[test]
    fn content_index_finds_other_pages_with_the_same_content() {
        let mut c = PageCache::new(8, 4, 2 * 4);
        // Without the index, nothing is found.
        c.put(0, 10, &[1; 4]);
        assert_eq!(c.find(10, 5), None);
        c.enable_index();
        c.put(1, 10, &[1; 4]);
        // Page 1 is indexed (page 0 was sent before the index existed).
        assert_eq!(c.find(10, 5), Some(1));
        assert_eq!(c.find(10, 1), None, "a page is not its own duplicate");
        // Page 1 sent again with other content: its entry goes; page 2 takes content 10.
        c.put(1, 11, &[2; 4]);
        assert_eq!(c.find(10, 5), None);
        assert_eq!(c.find(11, 5), Some(1));
        c.put(2, 10, &[1; 4]);
        assert_eq!(c.find(10, 5), Some(2));
        // A second page with the same content leaves the entry alone.
        c.put(3, 10, &[1; 4]);
        assert_eq!(c.find(10, 5), Some(2));
        // Copies evicted (bound of two): the hash still finds the page.
        assert!(c.evictions() > 0);
        assert_eq!(c.find(10, 5), Some(2));
        // Zeroed: gone from the index; the other page with that content is not known any more.
        c.put_zero(2);
        assert_eq!(c.find(10, 5), None);
        assert!(c.index_len() <= 8);
        c.clear();
        assert_eq!(c.find(11, 5), None);
        assert_eq!(c.index_len(), 0);
    }

    #[test]
    fn content_index_never_outgrows_the_guest() {
        let mut c = PageCache::new(4, 8, 0);
        c.enable_index();
        for round in 0..100u64 {
            for i in 0..4 {
                c.put(i, round * 4 + i as u64, &[0; 8]);
            }
        }
        assert_eq!(c.index_len(), 4);
    }

    #[test]
    fn zero_bound_keeps_hashes_only() {
        let mut c = PageCache::new(4, 4, 0);
        c.put(0, 5, &[0; 4]);
        assert_eq!(c.get(0), Cached::Hash(5));
    }
}
