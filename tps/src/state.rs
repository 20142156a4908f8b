//! The scanner's state and its two halves of work: planning merges while the guests
//! run (`plan.rs`), and applying them while the VMs involved are paused (`apply.rs`);
//! plus what the VMM asks of it (`reset_range`, `remove_vm`, counters).
//!
//! Everything here runs under the scanner's state lock; nothing here calls the VMM
//! (`VmControl`), so a VMM thread blocked on that lock can never be what a pause
//! waits for.

use std::time::Instant;

use xxhash_rust::xxh3::xxh3_64_with_seed;

mod apply;
mod plan;

use crate::config::Config;
use crate::hash_table::HashTable;
use crate::pass::PassRegion;
use crate::pool::Pool;
use crate::region::{Regions, Slot};
use crate::remap::{self, Advice};
use crate::stats::{Stats, VmSharing};
use crate::vma::VmaBudget;
use crate::{Error, Page, Region, PAGE_SIZE};
use pagestate::discard::dontneed;
use pagestate::maps::max_map_count;
use pagestate::pagemap::Pagemap;

/// A new mapping made over guest RAM, for [`crate::VmControl::remapped`].
pub(crate) type Remapped = (u32, usize, usize);

/// Copies of guest pages: guest memory is never borrowed (see [`pagestate::page`]).
pub(crate) struct Copies {
    /// The page being planned or verified.
    page: Page,
    /// The hint it is compared with.
    hint: Page,
}

pub(crate) struct State {
    regions: Regions,
    table: HashTable,
    pool: Pool,
    pagemap: Pagemap,
    vma: VmaBudget,
    cross_vm: bool,
    run_replicas: u32,
    /// Calls of `reset_range` so far: a pagemap read without the lock is stale
    /// if this changed since (see `plan_chunk`).
    resets: u64,
    /// Buffers for page copies; taken out while in use (planning and applying are
    /// never re-entered: both run under the state lock).
    copies: Option<Box<Copies>>,
    /// Counters kept here; the derived ones are filled by `snapshot`.
    pub(crate) stats: Stats,
}

impl State {
    pub(crate) fn new(config: &Config) -> Result<Self, Error> {
        let io = |what| move |source| Error::Io { what, source };
        Ok(Self {
            regions: Regions::default(),
            table: HashTable::default(),
            pool: Pool::new().map_err(io("creating the pool memfd"))?,
            pagemap: Pagemap::open().map_err(io("opening /proc/self/pagemap"))?,
            vma: VmaBudget::new(config.vma_limit(max_map_count()), &Regions::default()),
            cross_vm: config.cross_vm,
            run_replicas: config.run_replicas,
            resets: 0,
            copies: Some(Box::new(Copies { page: [0; PAGE_SIZE], hint: [0; PAGE_SIZE] })),
            stats: Stats::default(),
        })
    }

    /// Applies a (possibly changed) configuration.
    pub(crate) fn configure(&mut self, config: &Config) {
        if config.cross_vm != self.cross_vm {
            // Hints were hashed for the other domains: start over.
            self.table.retain_hints(|_| false);
            self.cross_vm = config.cross_vm;
        }
        self.run_replicas = config.run_replicas;
        self.vma.limit = config.vma_limit(max_map_count());
    }

    pub(crate) fn add_region(&mut self, r: &Region) -> Result<(), Error> {
        let advice = Advice::of(r.host_addr)
            .map_err(|source| Error::Io { what: "reading the mapping's flags in /proc/self/smaps", source })?;
        self.regions.add(r, advice).map(|_| ())
    }

    /// The regions a new pass covers.
    pub(crate) fn pass_regions(&self) -> Vec<PassRegion> {
        self.regions
            .iter()
            .map(|r| PassRegion { id: r.id, host_addr: r.host_addr, vm: r.vm, gpa: r.gpa, pages: r.pages })
            .collect()
    }

    pub(crate) fn end_pass(&mut self, started: Instant, uptime_ms: u64) {
        self.stats.full_passes += 1;
        self.stats.last_pass_us = started.elapsed().as_micros() as u64;
        self.stats.last_pass_end_ms = uptime_ms;
        self.vma.end_pass(&self.regions);
        self.table.end_pass();
    }

    /// Sharing domain of a VM: pages are shared only within a domain.
    fn domain(&self, vm: u32) -> u64 {
        if self.cross_vm {
            0
        } else {
            vm as u64 + 1
        }
    }

    fn hash(page: &Page, domain: u64) -> u64 {
        // A per-domain seed: the same content in two domains gets two table entries.
        xxh3_64_with_seed(page, domain.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// One guest page fewer maps pool page `idx`; frees it after the last.
    fn release(&mut self, idx: u32) {
        self.stats.pool_mapped_pages -= 1;
        if let Some(key) = self.pool.drop_ref(idx) {
            self.table.remove_pool(key, idx);
        }
    }

    fn count_error(&mut self, what: &str, e: std::io::Error) {
        self.stats.errors += 1;
        log::warn!("tps: {what}: {e}");
    }

    /// Unregisters `vm`: drops its references to the pool and its hints.
    pub(crate) fn remove_vm(&mut self, vm: u32) {
        let removed = self.regions.remove_vm(vm);
        for r in &removed {
            for (_, slot) in r.slots() {
                match slot {
                    Slot::Pool { idx, broken: false } => self.release(idx),
                    Slot::Zero => self.stats.zero_pages -= 1,
                    _ => {}
                }
            }
        }
        if !removed.is_empty() {
            let gone = |a: usize| removed.iter().any(|r| r.page_of(a).is_some());
            self.table.retain_hints(|a| !gone(a));
        }
    }

    /// Makes `addr..addr+len` plain anonymous memory again, not resident: what
    /// `MADV_DONTNEED` does to anonymous memory, also where pages are shared.
    pub(crate) fn reset_range(&mut self, addr: usize, len: usize, remapped: &mut Vec<Remapped>) -> Result<(), Error> {
        if addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(Error::BadRange { host_addr: addr, len, why: "not page aligned" });
        }
        // Counted before anything is dropped: even a reset that fails half way may
        // have dropped pages that a scan read as resident.
        self.resets += 1;
        let remap_err = |a, l| move |source| Error::Remap { host_addr: a, len: l, source };
        let end = addr.checked_add(len).ok_or(Error::BadRange { host_addr: addr, len, why: "wraps around" })?;
        let mut a = addr;
        while a < end {
            let Some(r) = self.regions.find(a) else {
                // Not registered: plain anonymous memory as far as we know.
                let stop = self.regions.iter().map(|r| r.host_addr).filter(|&s| s > a).min().unwrap_or(end).min(end);
                dontneed(a, stop - a).map_err(remap_err(a, stop - a))?;
                a = stop;
                continue;
            };
            let (host, vm, advice) = (r.host_addr, r.vm, r.advice);
            let first = r.page_of(a).expect("found");
            let last = r.pages.min((end - host) / PAGE_SIZE);
            let len = (last - first) * PAGE_SIZE;
            if (first..last).any(|i| r.slot(i).in_pool_vma()) {
                // One anonymous mapping over the whole range: it also replaces the
                // anonymous pieces earlier ones left, which the kernel may not merge.
                // Retried once: a failed MAP_FIXED may have left a hole.
                remap::map_anon(a, len, advice)
                    .or_else(|_| remap::map_anon(a, len, advice))
                    .map_err(remap_err(a, len))?;
                remapped.push((vm, a, len));
            } else {
                dontneed(a, len).map_err(remap_err(a, len))?;
            }
            for i in first..last {
                match self.regions.find(a).expect("found").slot(i) {
                    Slot::Pool { idx, broken: false } => self.release(idx),
                    Slot::Zero => self.stats.zero_pages -= 1,
                    _ => {}
                }
                self.regions.set_slot(host, i, Slot::Anon);
            }
            a = host + last * PAGE_SIZE;
        }
        Ok(())
    }

    /// Page sharing's figures for VM `vm` (see [`VmSharing`]): one walk over its
    /// pages' slots.
    pub(crate) fn vm_sharing(&self, vm: u32) -> VmSharing {
        let mut s = VmSharing::default();
        let mut saved_pages = 0.0;
        for r in self.regions.iter().filter(|r| r.vm == vm) {
            for (_, slot) in r.slots() {
                match slot {
                    Slot::Zero => {
                        s.zero_pages += 1;
                        saved_pages += 1.0;
                    }
                    Slot::Pool { idx, broken: false } => {
                        s.pool_mapped_pages += 1;
                        let refs = self.pool.get(idx).map_or(1, |p| p.refs.max(1));
                        saved_pages += 1.0 - 1.0 / refs as f64;
                    }
                    _ => {}
                }
            }
        }
        s.bytes_saved = saved_pages * PAGE_SIZE as f64;
        s
    }

    /// The counters, with the derived ones filled in.
    pub(crate) fn snapshot(&self) -> Stats {
        let mut s = self.stats.clone();
        s.regions = self.regions.iter().count() as u64;
        s.guest_pages = self.regions.iter().map(|r| r.pages as u64).sum();
        s.pool_pages = self.pool.mapped_pages() as u64;
        s.hints = self.table.hints() as u64;
        s.vmas_added = self.vma.added(&self.regions) as u64;
        s.process_vmas = self.vma.process(&self.regions) as u64;
        s.vma_limit = self.vma.limit as u64;
        s.metadata_bytes =
            (self.table.metadata_bytes() + self.regions.metadata_bytes() + self.pool.metadata_bytes()) as u64;
        s.compute_saved();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_salt_the_hash() {
        let p = [5u8; PAGE_SIZE];
        assert_ne!(State::hash(&p, 0), State::hash(&p, 1));
        assert_eq!(State::hash(&p, 2), State::hash(&p.clone(), 2));
    }
}
