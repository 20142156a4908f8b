//! Counters, as the control API and the exit summary show them.

use serde::{Deserialize, Serialize};

use crate::PAGE_SIZE;

/// A snapshot of the scanner's counters. "Now" values describe the state at the
/// snapshot; the others count since the scanner started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Milliseconds since the scanner started, when this snapshot was taken.
    pub uptime_ms: u64,
    /// Whether scanning is on.
    pub enabled: bool,
    /// Registered regions and their pages (now).
    pub regions: u64,
    pub guest_pages: u64,
    /// Pages visited (their pagemap entry looked at).
    pub pages_scanned: u64,
    /// Pages read (resident, private, not skipped): zero-checked, hashed if not zero.
    pub pages_hashed: u64,
    /// Full passes over all registered RAM, the last one's duration (microseconds:
    /// a small pass can take less than a millisecond) and its end (ms since start).
    pub full_passes: u64,
    pub last_pass_us: u64,
    pub last_pass_end_ms: u64,
    /// Zero pages dropped (`MADV_DONTNEED`).
    pub zero_pages_freed: u64,
    /// Pages dropped as zero and still not written as of their last visit (now).
    pub zero_pages: u64,
    /// Pool pages that guest pages map (now); pages written for a batch not yet
    /// applied are not counted.
    pub pool_pages: u64,
    /// Guest pages mapping the pool, shares not known broken (now).
    pub pool_mapped_pages: u64,
    /// Guest pages mapped onto the pool.
    pub merges: u64,
    /// Shared pages found privately copied (the guest wrote them).
    pub broken_shares: u64,
    /// Host memory saved: zero pages dropped, plus guest pages mapping the pool,
    /// minus the pool pages (now).
    pub bytes_saved: u64,
    /// Merges dropped because the page changed between the scan and the pause (the
    /// race, caught), or was dropped or skipped meanwhile.
    pub race_aborts: u64,
    /// Same hash, different bytes (a true collision, or a page changing while read).
    pub hash_collisions: u64,
    /// Hints found changed when a later page matched them.
    pub stale_hints: u64,
    /// Hints in the hash table (now).
    pub hints: u64,
    /// `mmap`/`madvise` calls made on guest RAM by merges (one per run of pages).
    pub remap_calls: u64,
    /// Merge batches, and the time the VMs of those batches were paused in all.
    pub batches: u64,
    pub paused_us: u64,
    /// VMAs that sharing adds to the guest RAM mappings (model, now).
    pub vmas_added: u64,
    /// VMAs of the whole process (last count plus the model's change since, now).
    pub process_vmas: u64,
    /// The most `process_vmas` sharing may reach.
    pub vma_limit: u64,
    /// Pages not merged because that would have passed `vma_limit`.
    pub vma_limited_pages: u64,
    /// Failed system calls (each also logged).
    pub errors: u64,
    /// CPU time of the scanner thread.
    pub cpu_ns: u64,
    /// Memory of the scanner's bookkeeping: hash table, per-page slots, pool index.
    pub metadata_bytes: u64,
}

/// Page sharing's figures for one VM (now): ESX's per-VM `ZERO`, `SHRD` and
/// `SHRDSVD`. Summed over all VMs they give [`Stats`]' `zero_pages`,
/// `pool_mapped_pages` and `bytes_saved`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmSharing {
    /// Pages of this VM dropped as zero and not written since.
    pub zero_pages: u64,
    /// Pages of this VM mapping the pool, shares not known broken.
    pub pool_mapped_pages: u64,
    /// Host memory this VM's sharing saves, bytes: its zero pages, plus for each
    /// pool page it maps `1 - 1/refs` of a page (the pool page's cost split evenly
    /// among the guest pages mapping it).
    pub bytes_saved: f64,
}

impl Stats {
    /// Fills `bytes_saved` from the current page counts.
    pub(crate) fn compute_saved(&mut self) {
        let saved = (self.zero_pages + self.pool_mapped_pages).saturating_sub(self.pool_pages);
        self.bytes_saved = saved * PAGE_SIZE as u64;
    }
}

/// CPU time consumed by the calling thread.
pub(crate) fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes into `ts` only.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_bytes_and_serde() {
        let mut s = Stats { zero_pages: 10, pool_mapped_pages: 8, pool_pages: 3, ..Stats::default() };
        s.compute_saved();
        assert_eq!(s.bytes_saved, 15 * PAGE_SIZE as u64);
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"bytes_saved\":61440"));
        assert_eq!(serde_json::from_str::<Stats>(&json).unwrap(), s);
    }

    #[test]
    fn cpu_clock_advances() {
        let a = thread_cpu_ns();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        assert!(thread_cpu_ns() > a);
    }
}
