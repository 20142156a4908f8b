//! The content-hash table: 64-bit page hash -> the one candidate with that content.
//!
//! As in ESX, an entry is either a *hint* (a guest page hashed once, not shared: it
//! may have changed since, so a match must re-hash and compare it) or a pool page
//! (shared content, immutable while in use). Keys are xxh3 values, already uniform,
//! so the map hashes them with the identity. An entry is one `u64` (16 bytes with its
//! key, ~18 in the map): 0.45% of the memory of a guest made of unique pages.
//!
//! A page whose content changes leaves its old hint behind. Hints carry the pass
//! that last set them, and those not set again for a whole pass are dropped when a
//! pass ends: the table holds at most about two hints per guest page.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// What a key leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    /// Host address of a guest page seen with this content.
    Hint(usize),
    /// A pool page with this content.
    Pool(u32),
}

const POOL_TAG: u64 = 1 << 63;
/// A hint's page number (user addresses are below 2^57) and the pass that set it.
const PAGE_BITS: u32 = 46;
const GEN_MASK: u64 = (1 << (63 - PAGE_BITS)) - 1;

impl Entry {
    fn pack(self, generation: u64) -> u64 {
        match self {
            Entry::Hint(addr) => (generation & GEN_MASK) << PAGE_BITS | (addr / crate::PAGE_SIZE) as u64,
            Entry::Pool(idx) => POOL_TAG | idx as u64,
        }
    }

    fn unpack(v: u64) -> Self {
        if v & POOL_TAG != 0 {
            Entry::Pool(v as u32)
        } else {
            Entry::Hint((v & ((1 << PAGE_BITS) - 1)) as usize * crate::PAGE_SIZE)
        }
    }
}

/// Passes since a hint packed in `v` was set, when the current pass is `generation`.
fn age(v: u64, generation: u64) -> u64 {
    generation.wrapping_sub(v >> PAGE_BITS) & GEN_MASK
}

/// Keys are hash values already: pass them through.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

#[derive(Default)]
pub(crate) struct HashTable {
    map: HashMap<u64, u64, BuildHasherDefault<Identity>>,
    hints: usize,
    generation: u64,
}

impl HashTable {
    pub(crate) fn get(&self, key: u64) -> Option<Entry> {
        self.map.get(&key).map(|&v| Entry::unpack(v))
    }

    /// Sets the entry of `key` (a hint: as seen in the current pass).
    pub(crate) fn set(&mut self, key: u64, entry: Entry) {
        let old = self.map.insert(key, entry.pack(self.generation)).map(Entry::unpack);
        self.count(old, -1);
        self.count(Some(entry), 1);
    }

    /// Removes the entry of `key` if it is pool page `idx`.
    pub(crate) fn remove_pool(&mut self, key: u64, idx: u32) {
        if self.get(key) == Some(Entry::Pool(idx)) {
            self.map.remove(&key);
        }
    }

    /// Drops the hints whose page `keep` rejects.
    pub(crate) fn retain_hints(&mut self, mut keep: impl FnMut(usize) -> bool) {
        self.map.retain(|_, v| match Entry::unpack(*v) {
            Entry::Hint(addr) => keep(addr),
            Entry::Pool(_) => true,
        });
        self.hints = self.map.values().filter(|&&v| v & POOL_TAG == 0).count();
    }

    /// A pass ended: drops the hints not set during it nor the one before.
    pub(crate) fn end_pass(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        let generation = self.generation;
        self.map.retain(|_, v| *v & POOL_TAG != 0 || age(*v, generation) <= 1);
        self.hints = self.map.values().filter(|&&v| v & POOL_TAG == 0).count();
    }

    fn count(&mut self, e: Option<Entry>, d: isize) {
        if let Some(Entry::Hint(_)) = e {
            self.hints = self.hints.wrapping_add_signed(d);
        }
    }

    pub(crate) fn hints(&self) -> usize {
        self.hints
    }

    /// Bytes of bookkeeping (hashbrown: key, value and one control byte per bucket).
    pub(crate) fn metadata_bytes(&self) -> usize {
        self.map.capacity() * 17
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_and_pool_entries() {
        let mut t = HashTable::default();
        assert_eq!(t.get(1), None);
        t.set(1, Entry::Hint(0x7f00_1234_5000));
        t.set(2, Entry::Hint(0x1000));
        t.set(3, Entry::Pool(7));
        assert_eq!(t.get(1), Some(Entry::Hint(0x7f00_1234_5000)));
        assert_eq!(t.get(3), Some(Entry::Pool(7)));
        assert_eq!(t.hints(), 2);

        t.set(2, Entry::Pool(u32::MAX >> 1));
        assert_eq!(t.get(2), Some(Entry::Pool(u32::MAX >> 1)));
        assert_eq!(t.hints(), 1, "a hint replaced by a pool page");
        t.set(1, Entry::Hint(0x2000));
        assert_eq!(t.hints(), 1, "a hint replaced by a hint");

        t.remove_pool(3, 8);
        assert_eq!(t.get(3), Some(Entry::Pool(7)), "another page: kept");
        t.remove_pool(3, 7);
        assert_eq!(t.get(3), None);

        t.set(4, Entry::Hint(0x3000));
        t.retain_hints(|a| a != 0x3000);
        assert_eq!((t.get(4), t.get(1)), (None, Some(Entry::Hint(0x2000))));
        assert_eq!(t.hints(), 1);
        assert!(t.metadata_bytes() > 0);
    }

    #[test]
    fn hints_not_seen_for_a_pass_are_dropped() {
        let mut t = HashTable::default();
        t.set(1, Entry::Hint(0x1000));
        t.set(2, Entry::Hint(0x2000));
        t.set(3, Entry::Pool(3));
        t.end_pass();
        assert_eq!(t.hints(), 2, "set during the pass that just ended");
        t.set(1, Entry::Hint(0x1000));
        t.end_pass();
        assert_eq!((t.get(1), t.get(2)), (Some(Entry::Hint(0x1000)), None));
        assert_eq!(t.get(3), Some(Entry::Pool(3)), "pool entries stay");
        for _ in 0..(GEN_MASK + 5) {
            t.set(1, Entry::Hint(0x7fff_ffff_f000));
            t.end_pass();
        }
        assert_eq!((t.get(1), t.hints()), (Some(Entry::Hint(0x7fff_ffff_f000)), 1), "generations wrap");
    }
}
