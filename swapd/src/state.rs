//! What the swapper, its evictor and its fault thread share about one VM
//! ([`SwapState`]), and the page-to-slot table with its invariants ([`Table`]).
//!
//! A leaf of the crate: the evictor (`evict.rs`) and the fault thread (`fault.rs`)
//! work on it, the public [`Swapper`](crate::Swapper) owns it.

use std::collections::HashSet;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pagestate::discard::Discarder;
use pagestate::maps::anon_ranges;
use pagestate::pagemap::Pagemap;
use pagestate::{GuestVm, PauseError, ReclaimGuard, SwapHooks, PAGE_SIZE};

use crate::config::Config;
use crate::error::SwapError;
use crate::file::{Slots, SwapFile, NO_SLOT};
use crate::stats::Counters;
use crate::uffd::{Uffd, UFFDIO_REGISTER_MODE_MISSING};
use crate::victim::Victims;
use crate::zcache::{ZCache, IN_CACHE};

/// How long an eviction batch waits for the VM to pause.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A region with the index of its first page in the VM's page numbering.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RegionInfo {
    pub gpa: u64,
    pub host: usize,
    pub len: usize,
    pub first_page: u32,
}

impl RegionInfo {
    pub fn pages(&self) -> u32 {
        (self.len / PAGE_SIZE) as u32
    }
}

/// The page-to-slot table and slot state, under one lock. Its invariants:
/// a page with a slot, or in the compression cache ([`IN_CACHE`]), is not present in guest RAM (except between the fault
/// thread's UFFDIO_COPY and its table update, both under this lock); only the
/// fault thread (and [`Swapper::swap_in_all`]) makes such a page present again,
/// under this lock; eviction gives a page a slot only while the VM is paused.
pub(crate) struct Table {
    /// Page index -> slot, [`IN_CACHE`] or NO_SLOT.
    pub map: Vec<u32>,
    pub slots: Slots,
    /// The compression cache, if configured.
    pub cache: Option<ZCache>,
    /// Pages whose slot failed (read error or checksum): faults on them stay
    /// unresolved, the VMM has been told to stop the VM.
    pub poisoned: HashSet<u32>,
    pub next_batch: u32,
}

impl Table {
    /// Whether `page` is out of guest RAM (in a slot or in the cache).
    pub fn swapped(&self, page: u32) -> bool {
        self.map[page as usize] != NO_SLOT
    }

    /// Forgets where `page` was kept (its slot freed, its cache entry dropped).
    pub fn release(&mut self, page: u32) {
        match std::mem::replace(&mut self.map[page as usize], NO_SLOT) {
            NO_SLOT => {}
            IN_CACHE => {
                self.cache.as_mut().map(|c| c.remove(page));
            }
            slot => self.slots.free(slot),
        }
    }

    /// Pages out of guest RAM: in slots and in the cache.
    pub fn swapped_pages(&self) -> u64 {
        self.slots.in_use() as u64 + self.cache.as_ref().map_or(0, |c| c.entries() as u64)
    }
}

/// What the swapper, its evictor and its fault thread share about one VM: its
/// regions in the swapper's page numbering, the swap file, the userfaultfd, the
/// page-to-slot table (under its lock), victim choice and counters.
pub(crate) struct SwapState {
    pub name: String,
    pub regions: Vec<RegionInfo>,
    pub pages: u32,
    pub vm: Arc<dyn GuestVm>,
    pub file: SwapFile,
    pub uffd: Uffd,
    pub pagemap: Pagemap,
    pub discarder: Discarder,
    pub zero_pfn: u64,
    pub table: Mutex<Table>,
    pub victims: Victims,
    /// Bit per page: brought in by prefetch and not yet seen used.
    pub prefetched: Vec<AtomicU64>,
    pub registered: AtomicBool,
    /// Set by a write error: when and why eviction stopped.
    pub stopped: Mutex<Option<(Instant, String)>>,
    pub counters: Counters,
    pub cfg: Config,
}

impl SwapState {
    pub fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Page index of a host address in guest RAM.
    pub fn page_of_host(&self, addr: usize) -> Option<u32> {
        self.regions
            .iter()
            .find(|r| addr >= r.host && addr < r.host + r.len)
            .map(|r| r.first_page + ((addr - r.host) / PAGE_SIZE) as u32)
    }

    /// Page index of a guest-physical address.
    pub fn page_of_gpa(&self, gpa: u64) -> Option<u32> {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa < r.gpa + r.len as u64)
            .map(|r| r.first_page + ((gpa - r.gpa) / PAGE_SIZE as u64) as u32)
    }

    pub fn region_of_page(&self, page: u32) -> &RegionInfo {
        self.regions
            .iter()
            .find(|r| page >= r.first_page && page < r.first_page + r.pages())
            .expect("page index out of range")
    }

    pub fn host_of_page(&self, page: u32) -> usize {
        let r = self.region_of_page(page);
        r.host + (page - r.first_page) as usize * PAGE_SIZE
    }

    pub fn gpa_of_page(&self, page: u32) -> u64 {
        let r = self.region_of_page(page);
        r.gpa + (page - r.first_page) as u64 * PAGE_SIZE as u64
    }

    /// Whether two page indices are in the same region (so their host addresses
    /// are contiguous).
    pub fn same_region(&self, a: u32, b: u32) -> bool {
        let r = self.region_of_page(a);
        b >= r.first_page && b < r.first_page + r.pages()
    }

    pub fn set_prefetched(&self, page: u32) {
        self.prefetched[(page / 64) as usize].fetch_or(1 << (page % 64), Relaxed);
    }

    pub fn clear_prefetched(&self, page: u32) {
        self.prefetched[(page / 64) as usize].fetch_and(!(1 << (page % 64)), Relaxed);
    }

    /// Register every region with the userfaultfd (MISSING mode), once.
    pub fn ensure_registered(&self) -> Result<(), SwapError> {
        if self.registered.load(Relaxed) {
            return Ok(());
        }
        for r in &self.regions {
            self.register_anon(r.host, r.host + r.len)
                .map_err(|e| SwapError::io(format!("register guest RAM of {}", self.name), e))?;
        }
        self.registered.store(true, Relaxed);
        Ok(())
    }

    /// Pauses the VM for an eviction batch (exclusive among reclaimers).
    pub fn pause(&self) -> Result<ReclaimGuard, PauseError> {
        self.vm.run().reclaim_guard(PAUSE_TIMEOUT)
    }

    /// Register the private anonymous mappings of `lo..hi`, and only those. A page
    /// of a private file mapping (page sharing's pool) without a page table entry
    /// holds the file's content, yet `UFFDIO_ZEROPAGE`/`UFFDIO_COPY` fill it like a
    /// missing one: left unregistered, such a mapping makes every fill of ours fail
    /// (`ENOENT`) instead of wiping shared pages. The swapper never evicts from it.
    pub fn register_anon(&self, lo: usize, hi: usize) -> io::Result<()> {
        for (s, e) in anon_ranges(lo, hi)? {
            let (s, e) = (s.max(lo), e.min(hi));
            self.uffd.register(s as u64, (e - s) as u64, UFFDIO_REGISTER_MODE_MISSING)?;
        }
        Ok(())
    }
}

/// Discards and remaps made by others reach the swapper here (see
/// [`pagestate::changes`]).
impl SwapHooks for SwapState {
    fn forget(&self, gpa: u64, len: u64) {
        let mut t = self.lock();
        let mut g = gpa & !(PAGE_SIZE as u64 - 1);
        while g < gpa.saturating_add(len) {
            if let Some(p) = self.page_of_gpa(g) {
                if t.swapped(p) {
                    t.release(p);
                    t.poisoned.remove(&p);
                }
            }
            g += PAGE_SIZE as u64;
        }
    }

    fn remapped(&self, host_addr: usize, len: usize) -> io::Result<()> {
        let inside = self.regions.iter().any(|r| host_addr >= r.host && host_addr + len <= r.host + r.len);
        if !inside || host_addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{host_addr:#x}+{len:#x} is not a page-aligned range of this VM's RAM"),
            ));
        }
        if !self.registered.load(Relaxed) {
            return Ok(()); // registered as a whole at the first eviction
        }
        self.register_anon(host_addr, host_addr + len)
    }
}
