//! The compression cache in front of the swap file (ESX 4.1's memory compression,
//! Linux's zswap).
//!
//! An evicted page that lz4 compresses to at most [`CacheConfig::max_compressed`]
//! bytes (half a page by default) is kept compressed in host memory instead of
//! being written; a fault on it decompresses it straight into place, which costs a
//! few microseconds instead of a disk read. Pages that do not compress that well go
//! to the file directly (counted as refused). The cache holds at most
//! [`CacheConfig::cap_bytes`]; past that the evictor spills its oldest entries to
//! the file (decompressed: the file holds plain pages, one per slot), outside the
//! VM's pause.
//!
//! Invariants (the cache lives in the swapper's page-to-slot table (`state::Table`),
//! under its lock):
//! - a page is in the cache iff its table entry is [`IN_CACHE`]; such a page is
//!   not present in guest RAM, exactly like a page with a slot;
//! - every entry carries the crc32c of the *uncompressed* page, taken when it was
//!   copied out of guest RAM; a decompression that fails or does not reproduce it
//!   is a corrupt entry, which is never handed to the guest (the VM is stopped);
//! - entries are spilled oldest first; an entry being spilled stays in the cache
//!   (and can be faulted in) until its slot is written, and moves to the slot only
//!   if it is still the same entry then (its sequence number).
//!
//! The memory counted ([`ZCache::bytes`]) is the compressed payload plus a fixed
//! per-entry overhead; the VMM counts it as host memory in use.

use std::collections::{HashMap, VecDeque};

use pagestate::PAGE_SIZE;

/// Marks a page held by the compression cache in the page-to-slot table.
pub const IN_CACHE: u32 = u32::MAX - 1;

/// Bytes counted per entry on top of its payload (its allocation and the maps'
/// entries).
pub const ENTRY_OVERHEAD: u64 = 48;

/// The compression cache of one swapper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Host memory the cache may hold (payload and overhead), bytes.
    pub cap_bytes: u64,
    /// A page is cached only if it compresses to at most this many bytes.
    pub max_compressed: usize,
}

impl CacheConfig {
    /// A cache of `cap_bytes` keeping pages that compress to half a page or less.
    pub fn new(cap_bytes: u64) -> CacheConfig {
        CacheConfig { cap_bytes, max_compressed: PAGE_SIZE / 2 }
    }
}

/// Scratch room for compressing one page (lz4's worst case).
pub fn scratch() -> Vec<u8> {
    vec![0u8; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)]
}

/// Compresses one page into `scratch`; the compressed length if it fits in
/// `max` bytes.
pub fn compress(page: &[u8], scratch: &mut [u8], max: usize) -> Option<usize> {
    match lz4_flex::block::compress_into(page, scratch) {
        Ok(n) if n <= max => Some(n),
        _ => None,
    }
}

/// Decompresses an entry into `out` (one page) and checks it against the crc32c
/// of the page it was made from. An error message if it is corrupt.
pub fn decompress(entry: &Entry, out: &mut [u8]) -> Result<(), String> {
    match lz4_flex::block::decompress_into(&entry.data, &mut out[..PAGE_SIZE]) {
        Ok(PAGE_SIZE) if crc32c::crc32c(&out[..PAGE_SIZE]) == entry.crc => Ok(()),
        Ok(PAGE_SIZE) => Err("fails its checksum".into()),
        Ok(n) => Err(format!("decompresses to {n} bytes")),
        Err(e) => Err(format!("does not decompress: {e}")),
    }
}

/// One cached page.
pub struct Entry {
    /// lz4 block of the page.
    pub data: Box<[u8]>,
    /// crc32c of the uncompressed page.
    pub crc: u32,
    seq: u64,
}

/// An entry copied out for spilling (see [`ZCache::oldest`]).
pub struct Spill {
    pub page: u32,
    pub entry: Entry,
}

/// The cached pages, oldest first.
pub struct ZCache {
    cfg: CacheConfig,
    entries: HashMap<u32, Entry>,
    /// (page, seq) in insertion order; stale pairs (entry gone or replaced) are
    /// skipped when met.
    order: VecDeque<(u32, u64)>,
    next_seq: u64,
    bytes: u64,
}

impl ZCache {
    pub fn new(cfg: CacheConfig) -> ZCache {
        ZCache { cfg, entries: HashMap::new(), order: VecDeque::new(), next_seq: 0, bytes: 0 }
    }

    pub fn config(&self) -> CacheConfig {
        self.cfg
    }

    /// Memory held now (payload and overhead).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Compressed payload held now.
    pub fn payload_bytes(&self) -> u64 {
        self.bytes - self.entries.len() as u64 * ENTRY_OVERHEAD
    }

    pub fn entries(&self) -> usize {
        self.entries.len()
    }

    /// Bytes above the cap (0 when within it).
    pub fn over(&self) -> u64 {
        self.bytes.saturating_sub(self.cfg.cap_bytes)
    }

    fn cost(e: &Entry) -> u64 {
        e.data.len() as u64 + ENTRY_OVERHEAD
    }

    /// Caches `page`. The table must mark it [`IN_CACHE`].
    pub fn insert(&mut self, page: u32, data: &[u8], crc: u32) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let e = Entry { data: data.into(), crc, seq };
        self.bytes += Self::cost(&e);
        if let Some(old) = self.entries.insert(page, e) {
            self.bytes -= Self::cost(&old);
        }
        self.order.push_back((page, seq));
    }

    pub fn get(&self, page: u32) -> Option<&Entry> {
        self.entries.get(&page)
    }

    /// Mutable access to an entry's payload (to damage it in tests).
    pub fn payload_mut(&mut self, page: u32) -> Option<&mut [u8]> {
        self.entries.get_mut(&page).map(|e| &mut e.data[..])
    }

    /// Drops `page`'s entry; whether there was one.
    pub fn remove(&mut self, page: u32) -> bool {
        match self.entries.remove(&page) {
            Some(e) => {
                self.bytes -= Self::cost(&e);
                self.trim_order();
                true
            }
            None => false,
        }
    }

    /// Drops stale pairs at the front of the order (keeps it bounded by the
    /// entries plus the ones removed out of order since the last spill).
    fn trim_order(&mut self) {
        while let Some(&(p, s)) = self.order.front() {
            if self.entries.get(&p).is_some_and(|e| e.seq == s) {
                break;
            }
            self.order.pop_front();
        }
        if self.order.len() > 2 * self.entries.len() + 1024 {
            let entries = &self.entries;
            self.order.retain(|&(p, s)| entries.get(&p).is_some_and(|e| e.seq == s));
        }
    }

    /// Copies of the oldest entries holding at least `bytes` (at most `max`
    /// entries), skipping `skip`ped pages, to be written to the file; the entries
    /// stay cached until [`ZCache::spilled`].
    pub fn oldest(&self, bytes: u64, max: usize, skip: impl Fn(u32) -> bool) -> Vec<Spill> {
        let mut out = Vec::new();
        let mut got = 0u64;
        for &(page, seq) in &self.order {
            if got >= bytes || out.len() >= max {
                break;
            }
            let Some(e) = self.entries.get(&page).filter(|e| e.seq == seq) else { continue };
            if skip(page) {
                continue;
            }
            got += Self::cost(e);
            out.push(Spill { page, entry: Entry { data: e.data.clone(), crc: e.crc, seq } });
        }
        out
    }

    /// The spilled copy of `page` is in the file now: drops the entry if it is still
    /// the one copied (not faulted in, forgotten or replaced since); whether it was.
    pub fn spilled(&mut self, s: &Spill) -> bool {
        if self.entries.get(&s.page).is_some_and(|e| e.seq == s.entry.seq) {
            self.remove(s.page)
        } else {
            false
        }
    }
}

impl Drop for ZCache {
    /// Gives the entries' memory back to the system, not only to the allocator:
    /// freed small allocations in the middle of the heap otherwise stay resident
    /// (the cache's memory was counted as host memory in use; so must its return be).
    fn drop(&mut self) {
        self.entries = HashMap::new();
        self.order = VecDeque::new();
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only releases free memory of the allocator's arenas.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: impl FnMut(usize) -> u8) -> Vec<u8> {
        (0..PAGE_SIZE).map(fill).collect()
    }

    #[test]
    fn compressible_pages_round_trip_and_random_ones_are_refused() {
        let mut scratch = scratch();
        let text = page(|i| b"guest memory "[i % 13]);
        let n = compress(&text, &mut scratch, PAGE_SIZE / 2).expect("repetitive text compresses");
        assert!(n < 200, "{n}");
        let e = Entry { data: scratch[..n].into(), crc: crc32c::crc32c(&text), seq: 0 };
        let mut out = vec![0u8; PAGE_SIZE];
        decompress(&e, &mut out).unwrap();
        assert_eq!(out, text);
        let mut x = 0x1234_5678_u64;
        let random = page(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        });
        assert_eq!(compress(&random, &mut scratch, PAGE_SIZE / 2), None);
    }

    #[test]
    fn a_damaged_entry_is_caught() {
        let mut scratch = scratch();
        let text = page(|i| (i / 64) as u8);
        let n = compress(&text, &mut scratch, PAGE_SIZE).unwrap();
        let mut out = vec![0u8; PAGE_SIZE];
        for bit in [0usize, 9, n * 8 / 2, n * 8 - 1] {
            let mut data: Box<[u8]> = scratch[..n].into();
            data[bit / 8] ^= 1 << (bit % 8);
            let e = Entry { data, crc: crc32c::crc32c(&text), seq: 0 };
            assert!(decompress(&e, &mut out).is_err(), "bit {bit} flipped went unnoticed");
        }
    }

    #[test]
    fn oldest_first_and_spills_of_stale_copies_are_refused() {
        let mut c = ZCache::new(CacheConfig::new(3 * (100 + ENTRY_OVERHEAD)));
        for p in 0..5u32 {
            c.insert(p, &[p as u8; 100], p);
        }
        assert_eq!(c.entries(), 5);
        assert_eq!(c.over(), 2 * (100 + ENTRY_OVERHEAD));
        assert_eq!(c.payload_bytes(), 500);
        let s = c.oldest(c.over(), 16, |_| false);
        assert_eq!(s.iter().map(|s| s.page).collect::<Vec<_>>(), vec![0, 1]);
        // Page 1 is faulted in (removed) and evicted again meanwhile: a new entry.
        assert!(c.remove(1));
        c.insert(1, &[9; 10], 9);
        assert!(c.spilled(&s[0]));
        assert!(!c.spilled(&s[1]), "the copy is of an older entry of page 1");
        assert_eq!(c.entries(), 4);
        let next = c.oldest(u64::MAX, 16, |p| p == 3);
        assert_eq!(next.iter().map(|s| s.page).collect::<Vec<_>>(), vec![2, 4, 1]);
        for p in [2, 3, 4, 1] {
            assert!(c.remove(p));
        }
        assert_eq!((c.entries(), c.bytes()), (0, 0));
        assert!(c.order.is_empty());
    }
}
