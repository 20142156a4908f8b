//! One VM's swapper: the swap file, the userfaultfd and its fault thread, the
//! page-to-slot table, victim choice and counters, behind [`Swapper`].

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use pagestate::discard::Discarder;
use pagestate::pagemap::Pagemap;
use pagestate::{GuestVm, SwapHooks, PAGE_SIZE};
use vmm_sys_util::eventfd::EventFd;

use crate::config::Config;
use crate::error::SwapError;
use crate::evict::EvictState;
use crate::file::{Slots, SwapFile, NO_SLOT};
use crate::state::{RegionInfo, SwapState, Table};
use crate::stats::{Counters, SwapStats};
use crate::uffd::Uffd;
use crate::victim::{VictimPolicy, Victims};
use crate::zcache::ZCache;
use crate::zcache::IN_CACHE;

/// The swapper of one VM.
pub struct Swapper {
    shared: Arc<SwapState>,
    evict: Mutex<EvictState>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Swapper {
    /// Creates the swap file `DIR/NAME.vswp` for `vm`, the userfaultfd and the fault
    /// thread, and attaches to the VM's `RamChanges` (its discards and remaps come
    /// here).
    pub fn new(vm: Arc<dyn GuestVm>, cfg: Config) -> Result<Swapper, SwapError> {
        let name = vm.name().to_string();
        let name = name.as_str();
        let mut infos = Vec::new();
        let mut pages: u64 = 0;
        for r in vm.regions() {
            if r.len == 0 || r.len % PAGE_SIZE != 0 || r.host_addr % PAGE_SIZE != 0 || r.gpa % PAGE_SIZE as u64 != 0 {
                return Err(SwapError::BadRange { host_addr: r.host_addr, len: r.len, why: "not page aligned" });
            }
            infos.push(RegionInfo { gpa: r.gpa, host: r.host_addr, len: r.len, first_page: pages as u32 });
            pages += (r.len / PAGE_SIZE) as u64;
        }
        if pages >= (u32::MAX - 1) as u64 / 2 {
            return Err(SwapError::BadRange { host_addr: 0, len: (pages as usize) * PAGE_SIZE, why: "too large" });
        }
        let pages = pages as u32;
        let mut cfg = cfg;
        cfg.batch_pages = cfg.batch_pages.clamp(1, 1 << 16);
        cfg.prefetch_pages = cfg.prefetch_pages.clamp(1, 1024);
        cfg.zero_fill_pages = cfg.zero_fill_pages.clamp(1, 1 << 16);
        if let Some(z) = &mut cfg.cache {
            z.max_compressed = z.max_compressed.clamp(1, PAGE_SIZE);
        }
        // Room for every page, plus one batch of slack (a page re-evicted before its
        // old slot was released needs a second one for a moment).
        let slots = pages + cfg.batch_pages as u32;
        let file = SwapFile::create(&cfg.dir, name, slots as u64, cfg.file)
            .map_err(|e| SwapError::io(format!("swap file for {name} in {}", cfg.dir.display()), e))?;
        let uffd = Uffd::open(0).map_err(|e| SwapError::io("userfaultfd", e))?;
        let pagemap = Pagemap::open().map_err(|e| SwapError::io("/proc/self/pagemap", e))?;
        let zero_pfn = pagemap.zero_pfn();
        let shared = Arc::new(SwapState {
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
                cache: cfg.cache.map(ZCache::new),
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
        let hooks: Arc<dyn SwapHooks> = shared.clone();
        shared
            .vm
            .changes()
            .attach_swapper(Arc::downgrade(&hooks))
            .map_err(|e| SwapError::Io { what: format!("swapper of {name}"), source: std::io::Error::other(e) })?;
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
    /// A bad slot stops it with [`SwapError::Corrupt`] (and `GuestVm::fatal`).
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

    /// Choose victims with another policy from now on.
    pub fn set_victim_policy(&self, p: VictimPolicy) {
        self.shared.victims.set_policy(p);
    }

    /// Pages out of guest RAM now: in the swap file and in the compression cache.
    pub fn swapped_pages(&self) -> usize {
        self.shared.lock().swapped_pages() as usize
    }

    /// Whether the page at `gpa` is out of guest RAM (in the file or the cache).
    pub fn is_swapped(&self, gpa: u64) -> bool {
        self.shared.page_of_gpa(gpa).is_some_and(|p| self.shared.lock().swapped(p))
    }

    /// Whether the page at `gpa` is in the compression cache.
    pub fn is_cached(&self, gpa: u64) -> bool {
        self.shared.page_of_gpa(gpa).is_some_and(|p| self.shared.lock().map[p as usize] == IN_CACHE)
    }

    /// Host memory held by the compression cache now (payload and overhead), bytes:
    /// memory in use on top of the VM's resident RAM.
    pub fn cache_bytes(&self) -> u64 {
        self.shared.lock().cache.as_ref().map_or(0, |c| c.bytes())
    }

    /// Flips one bit of the compressed entry of the page at `gpa`, as a memory error
    /// would (for tests of the checksum); whether the page had an entry.
    #[doc(hidden)]
    pub fn damage_cache_entry(&self, gpa: u64) -> bool {
        let Some(p) = self.shared.page_of_gpa(gpa) else { return false };
        let mut t = self.shared.lock();
        match t.cache.as_mut().and_then(|c| c.payload_mut(p)) {
            Some(data) => {
                let mid = data.len() / 2;
                data[mid] ^= 0x10;
                true
            }
            None => false,
        }
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
            if let Some(c) = &t.cache {
                s.cache = Some(crate::stats::CacheStats::of(c, &sh.counters));
            }
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
