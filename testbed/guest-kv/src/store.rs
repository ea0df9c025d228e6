//! The key-value store behind the `kv` workload, bounded in memory.
//!
//! Every item is charged `ITEM_OVERHEAD + key length + value length` bytes against the bound.
//! Nothing is ever evicted: when a write would exceed the bound, expired items are swept and,
//! if that is not enough, the write fails with [`StoreError::OutOfMemory`] (the protocol
//! answers `SERVER_ERROR out of memory storing object`). So an acknowledged write stays
//! readable until it is overwritten, deleted, flushed or expires, which is what the
//! consistency checker relies on.
//!
//! Time is the guest's uptime in seconds, passed in by the caller. Expiry times follow
//! memcached: 0 never expires, a negative value is already expired, up to 30 days is relative
//! to now; larger values would be absolute Unix times, which the guest cannot know (it has no
//! wall clock), so they never expire.
//!
//! ```
//! use guest_kv::store::{SetMode, SetResult, Store};
//! let mut s = Store::new(1 << 20);
//! assert_eq!(s.store(SetMode::Set, b"k", 7, 0, b"v", 0), Ok(SetResult::Stored));
//! assert_eq!(s.get(b"k", 0).unwrap().data.as_slice(), b"v");
//! ```

use alloc::collections::BTreeMap;
use alloc::collections::TryReserveError;
use alloc::rc::Rc;
use alloc::vec::Vec;

/// Bytes charged per item on top of key and value (map node, item header, allocator slack).
pub const ITEM_OVERHEAD: usize = 96;
/// Largest value accepted.
pub const MAX_VALUE: usize = 1 << 20;
/// Longest key accepted.
pub const MAX_KEY: usize = 250;
/// memcached's boundary between relative and absolute expiry times.
pub const RELATIVE_EXPIRY_MAX: i64 = 60 * 60 * 24 * 30;

/// One stored value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// Client flags.
    pub flags: u32,
    /// Expiry in store seconds (0: never).
    pub expires: u64,
    /// CAS unique.
    pub cas: u64,
    /// The value (shared with responses still being sent).
    pub data: Rc<Vec<u8>>,
}

/// How a storage command treats an existing item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetMode {
    /// Store unconditionally.
    Set,
    /// Only if absent.
    Add,
    /// Only if present.
    Replace,
    /// Add data after the existing value (flags and expiry unchanged).
    Append,
    /// Add data before the existing value.
    Prepend,
    /// Only if present with this CAS unique.
    Cas(u64),
}

/// Outcome of a storage command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetResult {
    /// `STORED`
    Stored,
    /// `NOT_STORED` (add of a present key, replace/append/prepend of an absent one)
    NotStored,
    /// `EXISTS` (cas with a stale unique)
    Exists,
    /// `NOT_FOUND` (cas of an absent key)
    NotFound,
}

/// Why a write failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// The bound (or the heap) has no room.
    OutOfMemory,
    /// The value exceeds [`MAX_VALUE`].
    TooLarge,
}

impl From<TryReserveError> for StoreError {
    fn from(_: TryReserveError) -> Self {
        StoreError::OutOfMemory
    }
}

/// Why incr/decr failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncrError {
    /// The key is absent.
    NotFound,
    /// The value is not a decimal number.
    NonNumeric,
    /// No room for the new value.
    OutOfMemory,
}

/// Counters for `stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Stats {
    pub cmd_get: u64,
    pub cmd_set: u64,
    pub cmd_touch: u64,
    pub cmd_flush: u64,
    pub get_hits: u64,
    pub get_misses: u64,
    pub delete_hits: u64,
    pub delete_misses: u64,
    pub incr_hits: u64,
    pub incr_misses: u64,
    pub decr_hits: u64,
    pub decr_misses: u64,
    pub cas_hits: u64,
    pub cas_misses: u64,
    pub cas_badval: u64,
    pub touch_hits: u64,
    pub touch_misses: u64,
    pub total_items: u64,
    pub out_of_memory: u64,
    pub curr_connections: u64,
    pub total_connections: u64,
}

/// The store.
#[derive(Debug)]
pub struct Store {
    map: BTreeMap<Vec<u8>, Item>,
    used: usize,
    limit: usize,
    next_cas: u64,
    /// Counters for `stats`.
    pub stats: Stats,
}

fn charge(key_len: usize, value_len: usize) -> usize {
    ITEM_OVERHEAD + key_len + value_len
}

/// Converts a protocol expiry time to store seconds (None: already expired).
pub fn expiry(exptime: i64, now: u64) -> Option<u64> {
    match exptime {
        0 => Some(0),
        t if t < 0 => None,
        t if t <= RELATIVE_EXPIRY_MAX => Some(now + t as u64),
        _ => Some(0),
    }
}

impl Store {
    /// An empty store holding at most `limit` bytes (as charged above).
    pub fn new(limit: usize) -> Self {
        Store { map: BTreeMap::new(), used: 0, limit, next_cas: 1, stats: Stats::default() }
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used
    }

    /// The bound.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Items held (expired ones included until swept).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the store holds nothing.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn live(item: &Item, now: u64) -> bool {
        item.expires == 0 || item.expires > now
    }

    fn bump_cas(&mut self) -> u64 {
        let c = self.next_cas;
        self.next_cas += 1;
        c
    }

    /// Drops `key` if it has expired.
    fn expire(&mut self, key: &[u8], now: u64) {
        if let Some(item) = self.map.get(key)
            && !Self::live(item, now)
        {
            self.remove(key);
        }
    }

    fn remove(&mut self, key: &[u8]) -> Option<Item> {
        let item = self.map.remove(key)?;
        self.used -= charge(key.len(), item.data.len());
        Some(item)
    }

    /// Removes every expired item.
    pub fn sweep(&mut self, now: u64) {
        let mut freed = 0;
        self.map.retain(|k, item| {
            let keep = Self::live(item, now);
            if !keep {
                freed += charge(k.len(), item.data.len());
            }
            keep
        });
        self.used -= freed;
    }

    /// Whether `extra` more bytes fit, sweeping expired items if needed.
    fn room_for(&mut self, extra: usize, now: u64) -> bool {
        if self.used + extra <= self.limit {
            return true;
        }
        self.sweep(now);
        self.used + extra <= self.limit
    }

    /// Whether a value of `len` bytes for `key` could be stored now (checked before its data
    /// is read, as memcached allocates the item first).
    pub fn can_store(&mut self, key: &[u8], len: usize, now: u64) -> Result<(), StoreError> {
        if len > MAX_VALUE {
            return Err(StoreError::TooLarge);
        }
        self.expire(key, now);
        let old = self.map.get(key).map_or(0, |i| charge(key.len(), i.data.len()));
        if self.room_for(charge(key.len(), len).saturating_sub(old), now) {
            Ok(())
        } else {
            self.stats.out_of_memory += 1;
            Err(StoreError::OutOfMemory)
        }
    }

    /// Looks `key` up (a hit or miss is counted).
    pub fn get(&mut self, key: &[u8], now: u64) -> Option<&Item> {
        self.expire(key, now);
        self.stats.cmd_get += 1;
        match self.map.get(key) {
            Some(item) => {
                self.stats.get_hits += 1;
                Some(item)
            }
            None => {
                self.stats.get_misses += 1;
                None
            }
        }
    }

    /// Looks `key` up without counting.
    pub fn peek(&self, key: &[u8], now: u64) -> Option<&Item> {
        self.map.get(key).filter(|i| Self::live(i, now))
    }

    /// A storage command. `exptime` is the protocol value (see [`expiry`]).
    pub fn store(
        &mut self,
        mode: SetMode,
        key: &[u8],
        flags: u32,
        exptime: i64,
        data: &[u8],
        now: u64,
    ) -> Result<SetResult, StoreError> {
        self.stats.cmd_set += 1;
        if data.len() > MAX_VALUE {
            return Err(StoreError::TooLarge);
        }
        self.expire(key, now);
        let existing = self.map.get(key);
        match (mode, existing) {
            (SetMode::Add, Some(_)) => return Ok(SetResult::NotStored),
            (SetMode::Replace | SetMode::Append | SetMode::Prepend, None) => return Ok(SetResult::NotStored),
            (SetMode::Cas(_), None) => {
                self.stats.cas_misses += 1;
                return Ok(SetResult::NotFound);
            }
            (SetMode::Cas(c), Some(item)) if item.cas != c => {
                self.stats.cas_badval += 1;
                return Ok(SetResult::Exists);
            }
            (SetMode::Cas(_), Some(_)) => self.stats.cas_hits += 1,
            _ => {}
        }
        let old_len = existing.map_or(0, |i| i.data.len());
        let old_charge = existing.map_or(0, |i| charge(key.len(), i.data.len()));
        let new_len = match mode {
            SetMode::Append | SetMode::Prepend => old_len + data.len(),
            _ => data.len(),
        };
        if new_len > MAX_VALUE {
            return Err(StoreError::TooLarge);
        }
        if !self.room_for(charge(key.len(), new_len).saturating_sub(old_charge), now) {
            self.stats.out_of_memory += 1;
            return Err(StoreError::OutOfMemory);
        }
        // The sweep cannot have removed the existing item: it was live a moment ago at `now`.
        let existing = self.map.get(key);
        let mut value = Vec::new();
        value.try_reserve_exact(new_len)?;
        let (flags, expires) = match (mode, existing) {
            (SetMode::Append, Some(old)) => {
                value.extend_from_slice(&old.data);
                value.extend_from_slice(data);
                (old.flags, old.expires)
            }
            (SetMode::Prepend, Some(old)) => {
                value.extend_from_slice(data);
                value.extend_from_slice(&old.data);
                (old.flags, old.expires)
            }
            _ => {
                value.extend_from_slice(data);
                match expiry(exptime, now) {
                    Some(e) => (flags, e),
                    None => {
                        // Already expired: storing it is deleting the key.
                        self.remove(key);
                        return Ok(SetResult::Stored);
                    }
                }
            }
        };
        let mut owned_key = Vec::new();
        owned_key.try_reserve_exact(key.len())?;
        owned_key.extend_from_slice(key);
        let cas = self.bump_cas();
        self.remove(key);
        self.used += charge(key.len(), value.len());
        self.map.insert(owned_key, Item { flags, expires, cas, data: Rc::new(value) });
        self.stats.total_items += 1;
        Ok(SetResult::Stored)
    }

    /// `delete`: whether the key was there.
    pub fn delete(&mut self, key: &[u8], now: u64) -> bool {
        self.expire(key, now);
        let hit = self.remove(key).is_some();
        if hit {
            self.stats.delete_hits += 1;
        } else {
            self.stats.delete_misses += 1;
        }
        hit
    }

    /// `incr` (or `decr` with `up == false`): the new value. incr wraps at 2^64, decr stops at 0.
    pub fn incr(&mut self, key: &[u8], delta: u64, up: bool, now: u64) -> Result<u64, IncrError> {
        self.expire(key, now);
        let Some(item) = self.map.get(key) else {
            if up {
                self.stats.incr_misses += 1;
            } else {
                self.stats.decr_misses += 1;
            }
            return Err(IncrError::NotFound);
        };
        let current = parse_decimal(&item.data).ok_or(IncrError::NonNumeric)?;
        let new = if up { current.wrapping_add(delta) } else { current.saturating_sub(delta) };
        let mut digits = [0u8; 20];
        let text = format_decimal(new, &mut digits);
        let old_len = item.data.len();
        if text.len() > old_len && !self.room_for(text.len() - old_len, now) {
            self.stats.out_of_memory += 1;
            return Err(IncrError::OutOfMemory);
        }
        let mut value = Vec::new();
        value.try_reserve_exact(text.len()).map_err(|_| IncrError::OutOfMemory)?;
        value.extend_from_slice(text);
        let cas = self.bump_cas();
        let Some(item) = self.map.get_mut(key) else {
            return Err(IncrError::NotFound);
        };
        self.used = self.used - old_len + value.len();
        item.data = Rc::new(value);
        item.cas = cas;
        if up {
            self.stats.incr_hits += 1;
        } else {
            self.stats.decr_hits += 1;
        }
        Ok(new)
    }

    /// `touch`: sets a new expiry; whether the key was there.
    pub fn touch(&mut self, key: &[u8], exptime: i64, now: u64) -> bool {
        self.stats.cmd_touch += 1;
        self.expire(key, now);
        match expiry(exptime, now) {
            None => {
                let hit = self.remove(key).is_some();
                self.count_touch(hit);
                hit
            }
            Some(e) => {
                let hit = match self.map.get_mut(key) {
                    Some(item) => {
                        item.expires = e;
                        true
                    }
                    None => false,
                };
                self.count_touch(hit);
                hit
            }
        }
    }

    fn count_touch(&mut self, hit: bool) {
        if hit {
            self.stats.touch_hits += 1;
        } else {
            self.stats.touch_misses += 1;
        }
    }

    /// `flush_all`: drops everything.
    pub fn flush(&mut self) {
        self.stats.cmd_flush += 1;
        self.map.clear();
        self.used = 0;
    }
}

/// A value incr/decr accepts: 1 to 20 ASCII digits fitting in a u64.
pub fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(n)
}

/// Writes `n` in decimal into `buf`, returning the digits.
pub fn format_decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn val(s: &mut Store, k: &[u8]) -> Option<Vec<u8>> {
        s.get(k, 0).map(|i| i.data.to_vec())
    }

    #[test]
    fn set_get_overwrite_delete() {
        let mut s = Store::new(1 << 20);
        assert_eq!(s.store(SetMode::Set, b"a", 1, 0, b"one", 0), Ok(SetResult::Stored));
        assert_eq!(val(&mut s, b"a").unwrap(), b"one");
        assert_eq!(s.get(b"a", 0).unwrap().flags, 1);
        let c1 = s.get(b"a", 0).unwrap().cas;
        assert_eq!(s.store(SetMode::Set, b"a", 2, 0, b"two!", 0), Ok(SetResult::Stored));
        assert_eq!(val(&mut s, b"a").unwrap(), b"two!");
        assert!(s.get(b"a", 0).unwrap().cas > c1);
        assert_eq!(s.used(), charge(1, 4));
        assert!(s.delete(b"a", 0));
        assert!(!s.delete(b"a", 0));
        assert_eq!(s.used(), 0);
        assert!(s.is_empty());
        assert_eq!(s.stats.delete_hits, 1);
        assert_eq!(s.stats.delete_misses, 1);
    }

    #[test]
    fn add_replace_append_prepend() {
        let mut s = Store::new(1 << 20);
        assert_eq!(s.store(SetMode::Replace, b"k", 0, 0, b"x", 0), Ok(SetResult::NotStored));
        assert_eq!(s.store(SetMode::Append, b"k", 0, 0, b"x", 0), Ok(SetResult::NotStored));
        assert_eq!(s.store(SetMode::Prepend, b"k", 0, 0, b"x", 0), Ok(SetResult::NotStored));
        assert_eq!(s.store(SetMode::Add, b"k", 5, 0, b"mid", 0), Ok(SetResult::Stored));
        assert_eq!(s.store(SetMode::Add, b"k", 0, 0, b"no", 0), Ok(SetResult::NotStored));
        assert_eq!(s.store(SetMode::Append, b"k", 9, 0, b">", 0), Ok(SetResult::Stored));
        assert_eq!(s.store(SetMode::Prepend, b"k", 9, 0, b"<", 0), Ok(SetResult::Stored));
        assert_eq!(val(&mut s, b"k").unwrap(), b"<mid>");
        assert_eq!(s.get(b"k", 0).unwrap().flags, 5, "append keeps flags");
        assert_eq!(s.store(SetMode::Replace, b"k", 3, 0, b"r", 0), Ok(SetResult::Stored));
        assert_eq!(val(&mut s, b"k").unwrap(), b"r");
        assert_eq!(s.used(), charge(1, 1));
    }

    #[test]
    fn cas() {
        let mut s = Store::new(1 << 20);
        assert_eq!(s.store(SetMode::Cas(1), b"k", 0, 0, b"x", 0), Ok(SetResult::NotFound));
        s.store(SetMode::Set, b"k", 0, 0, b"x", 0).unwrap();
        let c = s.get(b"k", 0).unwrap().cas;
        assert_eq!(s.store(SetMode::Cas(c + 1), b"k", 0, 0, b"y", 0), Ok(SetResult::Exists));
        assert_eq!(s.store(SetMode::Cas(c), b"k", 0, 0, b"y", 0), Ok(SetResult::Stored));
        assert_eq!(s.store(SetMode::Cas(c), b"k", 0, 0, b"z", 0), Ok(SetResult::Exists));
        assert_eq!(val(&mut s, b"k").unwrap(), b"y");
        assert_eq!((s.stats.cas_hits, s.stats.cas_badval, s.stats.cas_misses), (1, 2, 1));
    }

    #[test]
    fn incr_decr() {
        let mut s = Store::new(1 << 20);
        assert_eq!(s.incr(b"n", 1, true, 0), Err(IncrError::NotFound));
        s.store(SetMode::Set, b"n", 0, 0, b"9", 0).unwrap();
        assert_eq!(s.incr(b"n", 1, true, 0), Ok(10));
        assert_eq!(val(&mut s, b"n").unwrap(), b"10");
        assert_eq!(s.used(), charge(1, 2));
        assert_eq!(s.incr(b"n", 3, false, 0), Ok(7));
        assert_eq!(s.incr(b"n", 100, false, 0), Ok(0));
        assert_eq!(val(&mut s, b"n").unwrap(), b"0");
        s.store(SetMode::Set, b"n", 0, 0, b"18446744073709551615", 0).unwrap();
        assert_eq!(s.incr(b"n", 2, true, 0), Ok(1));
        s.store(SetMode::Set, b"t", 0, 0, b"abc", 0).unwrap();
        assert_eq!(s.incr(b"t", 1, true, 0), Err(IncrError::NonNumeric));
        s.store(SetMode::Set, b"t", 0, 0, b"", 0).unwrap();
        assert_eq!(s.incr(b"t", 1, false, 0), Err(IncrError::NonNumeric));
    }

    #[test]
    fn decimal_helpers() {
        assert_eq!(parse_decimal(b"0"), Some(0));
        assert_eq!(parse_decimal(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_decimal(b"18446744073709551616"), None);
        assert_eq!(parse_decimal(b"1 "), None);
        assert_eq!(parse_decimal(b""), None);
        let mut b = [0; 20];
        assert_eq!(format_decimal(0, &mut b), b"0");
        assert_eq!(format_decimal(u64::MAX, &mut b), b"18446744073709551615");
        assert_eq!(format_decimal(1205, &mut b), b"1205");
    }

    #[test]
    fn expiry_rules() {
        assert_eq!(expiry(0, 100), Some(0));
        assert_eq!(expiry(-1, 100), None);
        assert_eq!(expiry(10, 100), Some(110));
        assert_eq!(expiry(RELATIVE_EXPIRY_MAX + 1, 100), Some(0));
        let mut s = Store::new(1 << 20);
        s.store(SetMode::Set, b"e", 0, 10, b"x", 100).unwrap();
        assert!(s.get(b"e", 109).is_some());
        assert!(s.get(b"e", 110).is_none());
        assert_eq!(s.used(), 0, "expired item reclaimed on access");
        s.store(SetMode::Set, b"e", 0, 0, b"x", 0).unwrap();
        assert_eq!(s.store(SetMode::Set, b"e", 0, -1, b"y", 0), Ok(SetResult::Stored));
        assert!(s.get(b"e", 0).is_none(), "negative exptime deletes");
        s.store(SetMode::Set, b"t", 0, 0, b"x", 0).unwrap();
        assert!(s.touch(b"t", 5, 0));
        assert!(s.peek(b"t", 4).is_some());
        assert!(s.peek(b"t", 5).is_none());
        assert!(!s.touch(b"t", 5, 6));
        assert!(!s.touch(b"none", 5, 0));
        s.store(SetMode::Set, b"t", 0, 0, b"x", 0).unwrap();
        assert!(s.touch(b"t", -1, 0));
        assert!(s.peek(b"t", 0).is_none());
    }

    #[test]
    fn memory_bound() {
        let limit = 10 * (ITEM_OVERHEAD + 1 + 100);
        let mut s = Store::new(limit);
        let v = [7u8; 100];
        for i in 0..10u8 {
            assert_eq!(s.store(SetMode::Set, &[b'a' + i], 0, 0, &v, 0), Ok(SetResult::Stored));
        }
        assert_eq!(s.used(), limit);
        assert_eq!(s.store(SetMode::Set, b"z", 0, 0, &v, 0), Err(StoreError::OutOfMemory));
        assert_eq!(s.can_store(b"z", 100, 0), Err(StoreError::OutOfMemory));
        // Overwriting in place with the same size fits; growing does not.
        assert_eq!(s.store(SetMode::Set, b"a", 0, 0, &v, 0), Ok(SetResult::Stored));
        assert_eq!(s.can_store(b"a", 100, 0), Ok(()));
        assert_eq!(s.store(SetMode::Append, b"a", 0, 0, b"x", 0), Err(StoreError::OutOfMemory));
        assert_eq!(s.store(SetMode::Set, b"a", 0, 0, &[1u8; 101], 0), Err(StoreError::OutOfMemory));
        // Shrinking fits, and frees room.
        assert_eq!(s.store(SetMode::Set, b"a", 0, 0, &[1u8; 50], 0), Ok(SetResult::Stored));
        assert_eq!(s.store(SetMode::Set, b"a", 0, 0, &[1u8; 100], 0), Ok(SetResult::Stored));
        // Deleting frees room.
        assert!(s.delete(b"b", 0));
        assert_eq!(s.store(SetMode::Set, b"z", 0, 0, &v, 0), Ok(SetResult::Stored));
        assert!(s.stats.out_of_memory >= 3);
        // Nothing was evicted.
        for k in [b"a", b"c", b"j", b"z"] {
            assert!(s.peek(k, 0).is_some());
        }
        assert_eq!(s.store(SetMode::Set, b"big", 0, 0, &vec![0; MAX_VALUE + 1], 0), Err(StoreError::TooLarge));
        assert_eq!(s.can_store(b"big", MAX_VALUE + 1, 0), Err(StoreError::TooLarge));
    }

    #[test]
    fn expired_items_are_swept_when_full() {
        let limit = 2 * (ITEM_OVERHEAD + 1 + 10);
        let mut s = Store::new(limit);
        s.store(SetMode::Set, b"a", 0, 5, &[0; 10], 0).unwrap();
        s.store(SetMode::Set, b"b", 0, 0, &[0; 10], 0).unwrap();
        assert_eq!(s.store(SetMode::Set, b"c", 0, 0, &[0; 10], 1), Err(StoreError::OutOfMemory));
        assert_eq!(s.store(SetMode::Set, b"c", 0, 0, &[0; 10], 6), Ok(SetResult::Stored));
        assert_eq!(s.len(), 2);
        assert_eq!(s.used(), limit);
    }

    #[test]
    fn incr_growth_respects_bound() {
        let limit = ITEM_OVERHEAD + 1 + 1;
        let mut s = Store::new(limit);
        s.store(SetMode::Set, b"n", 0, 0, b"9", 0).unwrap();
        assert_eq!(s.incr(b"n", 1, true, 0), Err(IncrError::OutOfMemory));
        assert_eq!(s.incr(b"n", 1, false, 0), Ok(8));
    }

    #[test]
    fn flush() {
        let mut s = Store::new(1 << 20);
        s.store(SetMode::Set, b"a", 0, 0, b"1", 0).unwrap();
        s.store(SetMode::Set, b"b", 0, 0, b"2", 0).unwrap();
        s.flush();
        assert!(s.is_empty());
        assert_eq!(s.used(), 0);
    }
}
