//! One VM's swapper: the swap file, the userfaultfd and its fault thread, the
//! page-to-slot table, victim choice and counters, behind [`Swapper`].

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::evict::EvictState;
use crate::file::{FileOptions, Slots, SwapFile, NO_SLOT, PAGE_SIZE};
use crate::pagemap::{anon_ranges, Discarder, Pagemap};
use crate::stats::{Counters, SwapStats};
use crate::uffd::{Uffd, UFFDIO_REGISTER_MODE_MISSING};
use crate::victim::{VictimPolicy, Victims};
use crate::{Region, VmControl};

/// Tunables of one swapper.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory of the swap file.
    pub dir: PathBuf,
    pub file: FileOptions,
    /// Pages per eviction batch: one VM pause, one file write each.
    pub batch_pages: usize,
    /// Pages read by one fault from the file: the faulting page and neighbours that
    /// were evicted in the same batch into adjacent slots (1 = no prefetch).
    pub prefetch_pages: usize,
    /// A fault on a page that is not in the file maps the zero page there and on up
    /// to this many following missing pages with one ioctl (1 = only the page).
    pub zero_fill_pages: usize,
    pub victims: VictimPolicy,
    /// Seed of the random victim order.
    pub seed: u64,
    /// Register the userfaultfd over guest RAM in `new` (true) or at the first
    /// eviction (false, default: until then, first touches of guest memory stay
    /// ordinary kernel faults).
    pub register_eagerly: bool,
    /// After a write error stopped eviction, how long until a later request tries
    /// again ([`Swapper::resume_eviction`] retries at once).
    pub retry_after: Duration,
}

impl Config {
    /// Defaults, with the swap file in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Config {
        Config {
            dir: dir.into(),
            file: FileOptions::default(),
            batch_pages: 256,
            prefetch_pages: 16,
            zero_fill_pages: 16,
            victims: VictimPolicy::Random,
            seed: 0x5eed,
            register_eagerly: false,
            retry_after: Duration::from_secs(30),
        }
    }
}

/// Errors of the swapper.
#[derive(Debug)]
pub enum SwapError {
    /// Setting up or an unexpected system call failure.
    Io { what: String, error: io::Error },
    /// Writing a batch failed (ENOSPC, EIO): that batch's pages stayed resident,
    /// eviction is stopped until retried; `reclaimed` pages had been evicted by the
    /// earlier batches of the same request.
    Write { reclaimed: usize, error: io::Error },
    /// Eviction is stopped by an earlier write error.
    Stopped { reason: String },
    /// The VM is ending (pause refused).
    Ending { reclaimed: usize },
    /// A slot failed its checksum or could not be read (the VM is being stopped).
    Corrupt { what: String },
}

impl std::fmt::Display for SwapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SwapError::Io { what, error } => write!(f, "{what}: {error}"),
            SwapError::Write { reclaimed, error } => {
                write!(f, "swap file write failed after {reclaimed} pages: {error}; eviction stopped")
            }
            SwapError::Stopped { reason } => write!(f, "eviction stopped: {reason}"),
            SwapError::Ending { .. } => write!(f, "the VM is ending"),
            SwapError::Corrupt { what } => write!(f, "{what}"),
        }
    }
}

impl std::error::Error for SwapError {}

impl SwapError {
    pub(crate) fn io(what: impl Into<String>, error: io::Error) -> SwapError {
        SwapError::Io { what: what.into(), error }
    }
}

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
/// a page with a slot is not present in guest RAM (except between the fault
/// thread's UFFDIO_COPY and its table update, both under this lock); only the
/// fault thread (and [`Swapper::swap_in_all`]) makes such a page present again,
/// under this lock; eviction gives a page a slot only while the VM is paused.
pub(crate) struct Table {
    /// Page index -> slot, or NO_SLOT.
    pub map: Vec<u32>,
    pub slots: Slots,
    /// Pages whose slot failed (read error or checksum): faults on them stay
    /// unresolved, the VMM has been told to stop the VM.
    pub poisoned: HashSet<u32>,
    pub next_batch: u32,
}

/// State shared by the swapper, its evictor and its fault thread.
pub(crate) struct Shared {
    pub name: String,
    pub regions: Vec<RegionInfo>,
    pub pages: u32,
    pub vm: Arc<dyn VmControl>,
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

impl Shared {
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

/// The swapper of one VM.
pub struct Swapper {
    shared: Arc<Shared>,
    evict: Mutex<EvictState>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Swapper {
    /// Create the swap file `dir/NAME.vswp`, the userfaultfd and the fault thread,
    /// with default tunables.
    pub fn new(name: &str, dir: &Path, regions: Vec<Region>, vm: Arc<dyn VmControl>) -> Result<Swapper, SwapError> {
        Swapper::with_config(name, regions, vm, Config::new(dir))
    }

    /// As [`Swapper::new`], with explicit tunables.
    pub fn with_config(
        name: &str,
        regions: Vec<Region>,
        vm: Arc<dyn VmControl>,
        cfg: Config,
    ) -> Result<Swapper, SwapError> {
        let mut infos = Vec::new();
        let mut pages: u64 = 0;
        for r in &regions {
            if r.len == 0 || r.len % PAGE_SIZE != 0 || r.host_addr % PAGE_SIZE != 0 || r.gpa % PAGE_SIZE as u64 != 0 {
                return Err(SwapError::io(
                    format!("region gpa {:#x} host {:#x} len {:#x}", r.gpa, r.host_addr, r.len),
                    io::Error::new(io::ErrorKind::InvalidInput, "not page aligned"),
                ));
            }
            infos.push(RegionInfo { gpa: r.gpa, host: r.host_addr, len: r.len, first_page: pages as u32 });
            pages += (r.len / PAGE_SIZE) as u64;
        }
        if pages >= (u32::MAX - 1) as u64 / 2 {
            return Err(SwapError::io("guest RAM", io::Error::new(io::ErrorKind::InvalidInput, "too large")));
        }
        let pages = pages as u32;
        let mut cfg = cfg;
        cfg.batch_pages = cfg.batch_pages.clamp(1, 1 << 16);
        cfg.prefetch_pages = cfg.prefetch_pages.clamp(1, 1024);
        cfg.zero_fill_pages = cfg.zero_fill_pages.clamp(1, 1 << 16);
        // Room for every page, plus one batch of slack (a page re-evicted before its
        // old slot was released needs a second one for a moment).
        let slots = pages + cfg.batch_pages as u32;
        let file = SwapFile::create(&cfg.dir, name, slots as u64, cfg.file)
            .map_err(|e| SwapError::io(format!("swap file for {name} in {}", cfg.dir.display()), e))?;
        let uffd = Uffd::open(0).map_err(|e| SwapError::io("userfaultfd", e))?;
        let pagemap = Pagemap::open().map_err(|e| SwapError::io("/proc/self/pagemap", e))?;
        let zero_pfn = pagemap.zero_pfn();
        let shared = Arc::new(Shared {
            name: name.to_string(),
            regions: infos,
            pages,
            vm,
            file,
            uffd,
            pagemap,
            discarder: Discarder::new(),
            zero_pfn,
            table: Mutex::new(Table {
                map: vec![NO_SLOT; pages as usize],
                slots: Slots::new(slots),
                poisoned: HashSet::new(),
                next_batch: 1,
            }),
            victims: Victims::new(pages, cfg.victims, cfg.seed),
            prefetched: (0..(pages as usize).div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            registered: AtomicBool::new(false),
            stopped: Mutex::new(None),
            counters: Counters::default(),
            cfg,
        });
        if shared.cfg.register_eagerly {
            shared.ensure_registered()?;
        }
        let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| SwapError::io("eventfd", e))?;
        let stop2 = stop.try_clone().map_err(|e| SwapError::io("eventfd", e))?;
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-uffd"))
            .spawn(move || crate::fault::run(sh, stop2))
            .map_err(|e| SwapError::io("spawn fault thread", e))?;
        log::info!(
            "swapd: {name}: {} MiB of guest RAM, swap file {} ({} I/O)",
            (pages as u64 * PAGE_SIZE as u64) >> 20,
            shared.file.path().display(),
            if shared.file.direct() { "direct" } else { "buffered" }
        );
        let evict = Mutex::new(EvictState::new(shared.cfg.batch_pages));
        Ok(Swapper { shared, evict, stop, thread: Some(thread) })
    }

    /// Evict up to `pages` pages (chosen by the victim policy; non-resident,
    /// skipped and shared pages are passed over, zero pages are discarded without
    /// being written). Returns the pages reclaimed (written + zero), which is less
    /// than asked when the VM has nothing more to give.
    pub fn swap_out(&self, pages: usize) -> Result<usize, SwapError> {
        let mut ev = self.evict.lock().unwrap_or_else(|p| p.into_inner());
        crate::evict::swap_out(&self.shared, &mut ev, pages, None)
    }

    /// Evict these guest pages (GPAs, any order), under the same rules.
    pub fn swap_out_gpas(&self, gpas: &[u64]) -> Result<usize, SwapError> {
        let mut pages: Vec<u32> = gpas.iter().filter_map(|&g| self.shared.page_of_gpa(g)).collect();
        pages.sort_unstable();
        pages.dedup();
        let mut ev = self.evict.lock().unwrap_or_else(|p| p.into_inner());
        crate::evict::swap_out(&self.shared, &mut ev, pages.len(), Some(&pages))
    }

    /// Bring every page in the swap file back into guest RAM (before dropping the
    /// swapper of a VM that keeps running, say). Returns the pages brought back.
    /// A bad slot stops it with [`SwapError::Corrupt`] (and `VmControl::fatal`).
    pub fn swap_in_all(&self) -> Result<usize, SwapError> {
        crate::fault::swap_in_all(&self.shared)
    }

    /// Eviction stopped by a write error may run again now.
    pub fn resume_eviction(&self) {
        *self.shared.stopped.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Write information for one period from KVM's dirty log: bit i of `bitmap` set
    /// means the page at `base_gpa + i * 4096` was written. Covers `bitmap.len()*64`
    /// pages (clamped to the region holding `base_gpa`).
    pub fn note_dirty(&self, bitmap: &[u64], base_gpa: u64) {
        let sh = &self.shared;
        let Some(first) = sh.page_of_gpa(base_gpa) else { return };
        let r = *sh.region_of_page(first);
        let nbits = (bitmap.len() * 64).min((r.first_page + r.pages() - first) as usize);
        let mut hits = 0;
        sh.victims.note_dirty(first, bitmap, nbits, |p| {
            let w = &sh.prefetched[(p / 64) as usize];
            let bit = 1u64 << (p % 64);
            if w.load(Relaxed) & bit != 0 && w.fetch_and(!bit, Relaxed) & bit != 0 {
                hits += 1;
            }
        });
        sh.counters.prefetch_hits.fetch_add(hits, Relaxed);
    }

    /// The VMM freed `[gpa, gpa + len)` (balloon inflation): drop the slots of
    /// those pages, so a later touch reads zeros like any freed page. Returns the
    /// slots released. Call it before (or right after) discarding the range.
    pub fn forget(&self, gpa: u64, len: u64) -> usize {
        let sh = &self.shared;
        let mut t = sh.lock();
        let mut n = 0;
        let mut g = gpa & !(PAGE_SIZE as u64 - 1);
        while g < gpa + len {
            if let Some(p) = sh.page_of_gpa(g) {
                let s = t.map[p as usize];
                if s != NO_SLOT {
                    t.map[p as usize] = NO_SLOT;
                    t.slots.free(s);
                    t.poisoned.remove(&p);
                    n += 1;
                }
            }
            g += PAGE_SIZE as u64;
        }
        n
    }

    /// Register (again) a range of guest RAM that the VMM remapped (page sharing
    /// replaces VMAs, and a new VMA is not covered by the old registration).
    pub fn reregister(&self, host_addr: usize, len: usize) -> Result<(), SwapError> {
        let sh = &self.shared;
        let inside = sh.regions.iter().any(|r| host_addr >= r.host && host_addr + len <= r.host + r.len);
        if !inside || host_addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(SwapError::io(
                format!("reregister {host_addr:#x}+{len:#x}"),
                io::Error::new(io::ErrorKind::InvalidInput, "not a page-aligned range of this VM's RAM"),
            ));
        }
        if !sh.registered.load(Relaxed) {
            return Ok(()); // registered as a whole at the first eviction
        }
        sh.register_anon(host_addr, host_addr + len).map_err(|e| SwapError::io("reregister", e))
    }

    /// Choose victims with another policy from now on.
    pub fn set_victim_policy(&self, p: VictimPolicy) {
        self.shared.victims.set_policy(p);
    }

    /// Pages in the swap file now.
    pub fn swapped_pages(&self) -> usize {
        self.shared.lock().slots.in_use() as usize
    }

    /// Whether the page at `gpa` is in the swap file.
    pub fn is_swapped(&self, gpa: u64) -> bool {
        self.shared.page_of_gpa(gpa).is_some_and(|p| self.shared.lock().map[p as usize] != NO_SLOT)
    }

    /// The swap file.
    pub fn file_path(&self) -> &Path {
        self.shared.file.path()
    }

    /// Bytes the swap file occupies on its file system.
    pub fn file_allocated_bytes(&self) -> u64 {
        self.shared.file.allocated_bytes().unwrap_or(0)
    }

    /// Counters and histograms.
    pub fn stats(&self) -> SwapStats {
        let sh = &self.shared;
        let mut s = SwapStats { vm: sh.name.clone(), file: sh.file.path().display().to_string(), ..Default::default() };
        {
            let t = sh.lock();
            s.slots_total = t.slots.total() as u64;
            s.slots_used = t.slots.in_use() as u64;
        }
        sh.counters.fill(&mut s);
        s.eviction_stopped = sh.stopped.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|(_, r)| r.clone());
        s
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let left = self.shared.lock().slots.in_use();
        if left > 0 {
            log::debug!("swapd: {}: dropped with {left} pages still in the swap file", self.shared.name);
        }
        // The last Arc goes with `shared`: closing the userfaultfd wakes any thread
        // still waiting on a fault (it then reads zeros), and the file is removed.
    }
}
