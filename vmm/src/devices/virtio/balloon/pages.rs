//! Which guest pages are in the balloon, and freeing their host memory in ranges.
//!
//! Page frame numbers from the guest are untrusted: each one is checked against the
//! guest's RAM regions (an MMIO-hole or out-of-range PFN is refused), duplicates are
//! dropped, and the rest are sorted and merged so that one `madvise` frees a whole
//! run: per-page system calls would dominate the cost of inflation.

use std::sync::atomic::{AtomicU64, Ordering};

use guest_abi::{MemRegion, PAGE_SIZE};

/// A run of guest pages `[first_pfn, first_pfn + count)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PfnRange {
    /// First page frame number.
    pub first_pfn: u64,
    /// Number of pages.
    pub count: u64,
}

/// Sorts and de-duplicates `pfns`, then merges consecutive ones into ranges.
pub fn merge_ranges(pfns: &mut Vec<u64>) -> Vec<PfnRange> {
    pfns.sort_unstable();
    pfns.dedup();
    let mut ranges: Vec<PfnRange> = Vec::new();
    for &pfn in pfns.iter() {
        match ranges.last_mut() {
            Some(r) if r.first_pfn + r.count == pfn => r.count += 1,
            _ => ranges.push(PfnRange { first_pfn: pfn, count: 1 }),
        }
    }
    ranges
}

/// One bit per guest page frame up to the end of guest RAM: set while the page is
/// in the balloon. Shared with page sharing and the swapper, which skip these pages.
pub struct BalloonedPages {
    regions: Vec<MemRegion>,
    bits: Vec<AtomicU64>,
    count: AtomicU64,
}

impl BalloonedPages {
    /// An empty set for guest RAM `regions`.
    pub fn new(regions: &[MemRegion]) -> Self {
        let end_pfn = regions.iter().map(|r| (r.base + r.size) / PAGE_SIZE).max().unwrap_or(0);
        BalloonedPages {
            regions: regions.to_vec(),
            bits: (0..end_pfn.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
        }
    }

    /// True if `pfn` is a page of guest RAM.
    pub fn is_ram(&self, pfn: u64) -> bool {
        let gpa = pfn.saturating_mul(PAGE_SIZE);
        self.regions.iter().any(|r| gpa >= r.base && gpa < r.base + r.size)
    }

    /// True if `pfn` is in the balloon.
    pub fn contains(&self, pfn: u64) -> bool {
        self.bits.get((pfn / 64) as usize).is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (pfn % 64)) != 0)
    }

    /// Adds `pfn`; false if it already was in the balloon (or is not RAM).
    pub fn insert(&self, pfn: u64) -> bool {
        let Some(word) = self.bits.get((pfn / 64) as usize) else { return false };
        let was = word.fetch_or(1 << (pfn % 64), Ordering::AcqRel) & (1 << (pfn % 64)) != 0;
        if !was {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        !was
    }

    /// Removes `pfn`; false if it was not in the balloon.
    pub fn remove(&self, pfn: u64) -> bool {
        let Some(word) = self.bits.get((pfn / 64) as usize) else { return false };
        let was = word.fetch_and(!(1 << (pfn % 64)), Ordering::AcqRel) & (1 << (pfn % 64)) != 0;
        if was {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        was
    }

    /// Pages in the balloon.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Every ballooned PFN, ascending.
    pub fn pfns(&self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.count() as usize);
        for (i, w) in self.bits.iter().enumerate() {
            let mut v = w.load(Ordering::Relaxed);
            while v != 0 {
                out.push(i as u64 * 64 + v.trailing_zeros() as u64);
                v &= v - 1;
            }
        }
        out
    }
}

/// Pages of the host range `[host, host + len)` (page aligned) that have memory
/// behind them, the shared zero page included (`mincore`): a ballooned page that
/// shows up here was touched after the guest gave it away.
pub fn resident_pages(host: *mut u8, len: u64) -> std::io::Result<u64> {
    let mut vec = vec![0u8; len.div_ceil(PAGE_SIZE) as usize];
    // SAFETY: `vec` has one byte per page of the range; mincore only reads the
    // page tables of a range of this process's guest RAM mapping.
    if unsafe { libc::mincore(host.cast(), len as usize, vec.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(vec.iter().filter(|&&b| b & 1 != 0).count() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_sorted_unique_runs() {
        let mut pfns = vec![7, 3, 4, 5, 5, 9, 8, 100];
        assert_eq!(
            merge_ranges(&mut pfns),
            vec![
                PfnRange { first_pfn: 3, count: 3 },
                PfnRange { first_pfn: 7, count: 3 },
                PfnRange { first_pfn: 100, count: 1 }
            ]
        );
        assert!(merge_ranges(&mut vec![]).is_empty());
    }

    #[test]
    fn ballooned_set_counts_each_page_once_and_knows_ram() {
        let regions = [MemRegion { base: 0, size: 64 << 12 }, MemRegion { base: 1 << 32, size: 16 << 12 }];
        let set = BalloonedPages::new(&regions);
        assert!(set.is_ram(63) && !set.is_ram(64) && set.is_ram((1 << 20) + 15) && !set.is_ram((1 << 20) + 16));
        assert!(!set.is_ram(u64::MAX));
        assert!(set.insert(5));
        assert!(!set.insert(5));
        assert!(set.insert(70));
        assert_eq!(set.count(), 2);
        assert_eq!(set.pfns(), vec![5, 70]);
        assert!(set.remove(5) && !set.remove(5));
        assert_eq!(set.count(), 1);
        assert!(!set.insert(u64::MAX / 2));
    }
}
