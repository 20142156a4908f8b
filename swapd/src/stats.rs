//! Counters of the swapper, serialisable with serde.
//!
//! The hot paths (fault handler, evictor) update atomics ([`Counters`],
//! [`AtomicHistogram`]); [`SwapStats`] is a consistent-enough snapshot of them for the
//! control API and the exit summary.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Number of buckets: 16 exact ones for 0..16 ns, then 8 per power of two up to 2^64.
const BUCKETS: usize = 16 + 60 * 8;

/// Bucket of a value: exact below 16, then 8 linear sub-buckets per power of two
/// (so any percentile is within 12.5% of the truth).
fn bucket_of(v: u64) -> usize {
    if v < 16 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros() as usize; // >= 4
    let sub = ((v >> (e - 3)) & 7) as usize;
    16 + (e - 4) * 8 + sub
}

/// Smallest value that falls in bucket `b`.
fn bucket_low(b: usize) -> u64 {
    if b < 16 {
        return b as u64;
    }
    let e = 4 + (b - 16) / 8;
    let sub = ((b - 16) % 8) as u64;
    (8 + sub) << (e - 3)
}

/// A lock-free latency histogram in nanoseconds.
pub struct AtomicHistogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum: AtomicU64,
    max: AtomicU64,
}

impl Default for AtomicHistogram {
    fn default() -> Self {
        AtomicHistogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }
}

impl AtomicHistogram {
    /// Record one value (ns).
    pub fn record_ns(&self, ns: u64) {
        self.buckets[bucket_of(ns)].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum.fetch_add(ns, Relaxed);
        self.max.fetch_max(ns, Relaxed);
    }

    /// Record one duration.
    pub fn record(&self, d: Duration) {
        self.record_ns(d.as_nanos().min(u64::MAX as u128) as u64);
    }

    /// A serialisable copy.
    pub fn snapshot(&self) -> Histogram {
        let buckets: Vec<(u64, u64)> = self
            .buckets
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let c = c.load(Relaxed);
                (c > 0).then(|| (bucket_low(i), c))
            })
            .collect();
        let mut h = Histogram {
            count: buckets.iter().map(|b| b.1).sum(),
            sum_ns: self.sum.load(Relaxed),
            max_ns: self.max.load(Relaxed),
            buckets,
            p50_us: 0.0,
            p99_us: 0.0,
        };
        h.p50_us = h.percentile_ns(0.50) as f64 / 1000.0;
        h.p99_us = h.percentile_ns(0.99) as f64 / 1000.0;
        h
    }
}

/// A histogram snapshot: non-empty buckets as (lowest value in ns, count).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Histogram {
    pub count: u64,
    pub sum_ns: u64,
    pub max_ns: u64,
    pub buckets: Vec<(u64, u64)>,
    /// Median and 99th percentile in microseconds (bucket midpoints, within 12.5%).
    pub p50_us: f64,
    pub p99_us: f64,
}

impl Histogram {
    /// The value below which a fraction `q` of the samples fall (midpoint of its
    /// bucket, capped by the maximum seen); 0 when empty.
    pub fn percentile_ns(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for &(low, c) in &self.buckets {
            seen += c;
            if seen >= rank {
                let b = bucket_of(low);
                let high = if b + 1 < BUCKETS { bucket_low(b + 1) } else { u64::MAX };
                let mid = low + (high - low) / 2;
                return mid.min(self.max_ns).max(low);
            }
        }
        self.max_ns
    }
}

/// The swapper's counters, updated by the fault thread and the evictor.
#[derive(Default)]
pub struct Counters {
    pub pages_out: AtomicU64,
    pub pages_in: AtomicU64,
    pub prefetched: AtomicU64,
    pub prefetch_hits: AtomicU64,
    pub zero_pages_elided: AtomicU64,
    pub zero_fills: AtomicU64,
    pub bytes_written: AtomicU64,
    pub bytes_read: AtomicU64,
    pub batches: AtomicU64,
    pub skipped_not_present: AtomicU64,
    pub skipped_vmm: AtomicU64,
    pub skipped_shared: AtomicU64,
    pub skipped_vma: AtomicU64,
    pub write_errors: AtomicU64,
    pub read_errors: AtomicU64,
    pub checksum_errors: AtomicU64,
    pub fault_errors: AtomicU64,
    pub faults_unresolved: AtomicU64,
    pub pause_timeouts: AtomicU64,
    pub pause_gave_up: AtomicU64,
    pub evict_ns: AtomicU64,
    pub cache_stored: AtomicU64,
    pub cache_stored_bytes: AtomicU64,
    pub cache_refused: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_spilled: AtomicU64,
    pub cache_corrupt: AtomicU64,
    pub compress_ns: AtomicU64,
    pub cache_fault: AtomicHistogram,
    pub stages: StageCounters,
    pub skipped_changed: AtomicU64,
    pub fault_in: AtomicHistogram,
    pub zero_fill: AtomicHistogram,
    pub pause: AtomicHistogram,
}

/// A snapshot of one VM's swapper.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SwapStats {
    /// VM name and swap file path.
    pub vm: String,
    pub file: String,
    /// Slots in the file and slots holding a page now.
    pub slots_total: u64,
    pub slots_used: u64,
    /// Pages (not all-zero) taken out of guest RAM: written to the file, or kept
    /// in the compression cache.
    pub pages_out: u64,
    /// Pages brought back by a fault on them (the faulting page itself), from the
    /// file or the cache.
    pub pages_in: u64,
    /// Pages brought back by prefetch (a neighbour of a faulting page, same batch).
    pub prefetched: u64,
    /// Prefetched pages later seen written in the dirty log (a lower bound of the
    /// prefetched pages the guest used: reads are invisible to the host).
    pub prefetch_hits: u64,
    /// All-zero pages discarded without being written.
    pub zero_pages_elided: u64,
    /// Faults on pages that were never in the file (first touch, zero-evicted,
    /// ballooned): resolved with a zero page.
    pub zero_fills: u64,
    pub bytes_written: u64,
    pub bytes_read: u64,
    /// Eviction batches (one pause each).
    pub batches: u64,
    /// Candidates not evicted: not resident (or the shared zero page), refused by
    /// the VMM (ballooned/shared), shared with another mapping (KSM, file), outside
    /// an anonymous mapping.
    pub skipped_not_present: u64,
    pub skipped_vmm: u64,
    pub skipped_shared: u64,
    pub skipped_vma: u64,
    /// Pages copied out but written to by the guest before their batch was
    /// finished: left resident (their slot freed).
    pub skipped_changed: u64,
    /// Write errors (ENOSPC, EIO): each stopped eviction with pages left resident.
    pub write_errors: u64,
    /// Read errors and checksum mismatches on fault-in (each one is fatal to the VM).
    pub read_errors: u64,
    pub checksum_errors: u64,
    /// Other failures of the fault path (ioctl errors, addresses outside the VM).
    pub fault_errors: u64,
    /// Faults left unresolved on purpose (the slot was bad; the VM is being stopped).
    pub faults_unresolved: u64,
    /// Eviction batches whose pause was not obtained in time (another reclaimer or
    /// a busy device held the VM); each is tried again, up to three times.
    pub pause_timeouts: u64,
    /// Requests that ended with [`SwapError::PauseTimedOut`](crate::SwapError::PauseTimedOut)
    /// after the last try.
    pub pause_gave_up: u64,
    /// Why eviction is stopped, if it is.
    pub eviction_stopped: Option<String>,
    /// Time spent evicting (all batches), and the eviction throughput over it.
    pub evict_ms: f64,
    pub evict_mib_s: f64,
    /// Handler-side latency of faults resolved from the file (read + verify + COPY).
    pub fault_in: Histogram,
    /// Handler-side latency of zero-page faults.
    pub zero_fill: Histogram,
    /// How long each eviction batch held the VM paused.
    pub pause: Histogram,
    /// The compression cache, when configured.
    pub cache: Option<CacheStats>,
    /// Where eviction time went.
    pub stages: EvictStages,
}

/// Time spent in each stage of eviction, ns (see [`EvictStages`]).
#[derive(Default)]
pub struct StageCounters {
    pub gather: AtomicU64,
    pub pause_wait: AtomicU64,
    pub scan: AtomicU64,
    pub copy: AtomicU64,
    pub verify: AtomicU64,
    pub writer_wait: AtomicU64,
    pub write: AtomicU64,
    pub register: AtomicU64,
    pub discard: AtomicU64,
    pub spill: AtomicU64,
}

/// Where eviction time goes, milliseconds summed over all batches. Under the pause:
/// `scan` (`/proc/self/maps`), `copy` (pagemap, copy and zero test of the new
/// batch), `verify` (pagemap and content of the finished batch against its copy),
/// `register` (userfaultfd), `discard` (publishing and `MADV_DONTNEED`). Outside
/// it: `gather` (choosing victims, pagemap pre-check), `pause_wait` (until every
/// vCPU and device let go), `writer_wait` (until the batch to finish is written),
/// `spill` (cache to file), and on the writer threads, in
/// parallel with the rest, `write` (crc32c, compression (`compress` of it), slot
/// allocation, the file writes).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EvictStages {
    pub gather_ms: f64,
    pub pause_wait_ms: f64,
    pub scan_ms: f64,
    pub copy_ms: f64,
    pub verify_ms: f64,
    pub writer_wait_ms: f64,
    pub compress_ms: f64,
    pub write_ms: f64,
    pub register_ms: f64,
    pub discard_ms: f64,
    pub spill_ms: f64,
}

/// The compression cache of one swapper (see `docs/swap.md`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CacheStats {
    /// Its cap, and the host memory it holds now (payload and per-entry overhead).
    pub cap_bytes: u64,
    pub bytes: u64,
    /// Pages cached now, and their compressed size over their size.
    pub entries: u64,
    pub ratio: f64,
    /// Pages put in the cache so far, and their mean compressed size over a page.
    pub stored: u64,
    pub stored_ratio: f64,
    /// Pages that did not compress well enough and went to the file directly.
    pub refused: u64,
    /// Faults resolved from the cache (decompressed into place).
    pub hits: u64,
    /// Cached pages written to the file to keep the cache within its cap.
    pub spilled: u64,
    /// Entries that failed to decompress or their checksum (each one is fatal to
    /// the VM).
    pub corrupt: u64,
    /// CPU time of compression per page tried, microseconds.
    pub compress_us_per_page: f64,
    /// Handler-side latency of faults resolved from the cache (decompress, verify,
    /// UFFDIO_COPY).
    pub fault: Histogram,
}

impl CacheStats {
    /// A snapshot of `cache` with the swapper's counters.
    pub(crate) fn of(cache: &crate::zcache::ZCache, c: &Counters) -> CacheStats {
        let page = pagestate::PAGE_SIZE as f64;
        let entries = cache.entries() as u64;
        let stored = c.cache_stored.load(Relaxed);
        let tried = stored + c.cache_refused.load(Relaxed);
        let ratio = |bytes: u64, pages: u64| if pages > 0 { bytes as f64 / (pages as f64 * page) } else { 0.0 };
        CacheStats {
            cap_bytes: cache.config().cap_bytes,
            bytes: cache.bytes(),
            entries,
            ratio: ratio(cache.payload_bytes(), entries),
            stored,
            stored_ratio: ratio(c.cache_stored_bytes.load(Relaxed), stored),
            refused: c.cache_refused.load(Relaxed),
            hits: c.cache_hits.load(Relaxed),
            spilled: c.cache_spilled.load(Relaxed),
            corrupt: c.cache_corrupt.load(Relaxed),
            compress_us_per_page: if tried > 0 { c.compress_ns.load(Relaxed) as f64 / 1e3 / tried as f64 } else { 0.0 },
            fault: c.cache_fault.snapshot(),
        }
    }
}

impl Counters {
    /// Fill the counter part of a [`SwapStats`].
    pub fn fill(&self, s: &mut SwapStats) {
        s.pages_out = self.pages_out.load(Relaxed);
        s.pages_in = self.pages_in.load(Relaxed);
        s.prefetched = self.prefetched.load(Relaxed);
        s.prefetch_hits = self.prefetch_hits.load(Relaxed);
        s.zero_pages_elided = self.zero_pages_elided.load(Relaxed);
        s.zero_fills = self.zero_fills.load(Relaxed);
        s.bytes_written = self.bytes_written.load(Relaxed);
        s.bytes_read = self.bytes_read.load(Relaxed);
        s.batches = self.batches.load(Relaxed);
        s.skipped_not_present = self.skipped_not_present.load(Relaxed);
        s.skipped_vmm = self.skipped_vmm.load(Relaxed);
        s.skipped_shared = self.skipped_shared.load(Relaxed);
        s.skipped_vma = self.skipped_vma.load(Relaxed);
        s.skipped_changed = self.skipped_changed.load(Relaxed);
        s.write_errors = self.write_errors.load(Relaxed);
        s.read_errors = self.read_errors.load(Relaxed);
        s.checksum_errors = self.checksum_errors.load(Relaxed);
        s.fault_errors = self.fault_errors.load(Relaxed);
        s.faults_unresolved = self.faults_unresolved.load(Relaxed);
        s.pause_timeouts = self.pause_timeouts.load(Relaxed);
        s.pause_gave_up = self.pause_gave_up.load(Relaxed);
        let ns = self.evict_ns.load(Relaxed);
        s.evict_ms = ns as f64 / 1e6;
        let bytes = (s.pages_out + s.zero_pages_elided) as f64 * 4096.0;
        s.evict_mib_s = if ns > 0 { bytes / (1 << 20) as f64 / (ns as f64 / 1e9) } else { 0.0 };
        s.fault_in = self.fault_in.snapshot();
        s.zero_fill = self.zero_fill.snapshot();
        s.pause = self.pause.snapshot();
        let ms = |a: &AtomicU64| a.load(Relaxed) as f64 / 1e6;
        let st = &self.stages;
        s.stages = EvictStages {
            gather_ms: ms(&st.gather),
            pause_wait_ms: ms(&st.pause_wait),
            scan_ms: ms(&st.scan),
            copy_ms: ms(&st.copy),
            verify_ms: ms(&st.verify),
            writer_wait_ms: ms(&st.writer_wait),
            compress_ms: ms(&self.compress_ns),
            write_ms: ms(&st.write),
            register_ms: ms(&st.register),
            discard_ms: ms(&st.discard),
            spill_ms: ms(&st.spill),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_cover() {
        let mut last = 0;
        for b in 0..BUCKETS {
            let low = bucket_low(b);
            assert!(b == 0 || low > last, "bucket {b}");
            assert_eq!(bucket_of(low), b);
            if b + 1 < BUCKETS {
                assert_eq!(bucket_of(bucket_low(b + 1) - 1), b);
            }
            last = low;
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn percentiles() {
        let h = AtomicHistogram::default();
        for v in 1..=1000u64 {
            h.record_ns(v * 1000); // 1..1000 us
        }
        let s = h.snapshot();
        assert_eq!(s.count, 1000);
        let p50 = s.percentile_ns(0.5) as f64;
        let p99 = s.percentile_ns(0.99) as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.13, "{p50}");
        assert!((p99 - 990_000.0).abs() / 990_000.0 < 0.13, "{p99}");
        assert!(s.percentile_ns(1.0) <= s.max_ns);
        assert_eq!(Histogram::default().percentile_ns(0.5), 0);
        let json = serde_json::to_string(&s).unwrap();
        let back: Histogram = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }
}
