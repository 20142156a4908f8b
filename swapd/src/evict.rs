//! Eviction: copy pages out of guest RAM with every writer of the VM paused, write
//! them to the swap file (or the compression cache) while the VM runs, and discard
//! them in a later pause if they did not change meanwhile.
//!
//! **The race.** Copy-then-discard loses a write that lands between the copy and
//! the `MADV_DONTNEED`: the file holds the old content and the new one is thrown
//! away. Two ways close it: userfaultfd write-protection (protect, copy, discard,
//! with writers blocked in WP faults) or pausing every writer. The swapper pauses:
//!
//! - on this host a `MADV_DONTNEED` costs 65-91 us while a vCPU of the VM runs guest
//!   code and 4-8 us while it is out of KVM_RUN, so batching under one pause (~60-120
//!   us) is cheaper than discarding under a running guest anyway;
//! - write-protecting drops KVM's mappings too (every later *read* of a protected
//!   page exits, ~30-43 us), each writer that hits it pays a WP fault (~110 us), and
//!   the fault thread would have to tell WP from MISSING faults and un-protect pages
//!   it has not finished copying: more states for the same guarantee;
//! - a pause is simple to reason about: between `pause()` and the guard's drop,
//!   nothing but this thread changes guest pages.
//!
//! **The pipeline.** Writing is most of eviction's time, and the VM need not be
//! paused for it: the write works on the copy. So a batch goes through two pauses:
//! in one its pages are checked and copied out; then, the VM running, a writer
//! thread checksums them, compresses them (with a cache) and writes them to their
//! slots; in a later pause, with every writer of the VM held again, each page is
//! compared with its copy and discarded only if it is still the same (same
//! content, still private anonymous memory, still not off limits). A page the guest
//! changed in between stays resident and its slot is freed
//! (`skipped_changed`). What is discarded is therefore exactly what the file (or
//! the cache) holds, as with a single pause. Each pause does both jobs: it copies
//! the next batch and finishes the batch before last, so up to two batches are
//! being written while the evictor gathers and copies (three buffers).
//!
//! Candidates are read in `/proc/self/pagemap` first, without pausing, and a batch
//! is gathered from those resident and private only: a pause is spent on pages
//! worth evicting. One pause:
//! 1. read `/proc/self/maps` once over the pages of both batches: only pages in
//!    private anonymous mappings may be discarded (a page remapped by page sharing
//!    would revert to the pool's content instead of faulting);
//! 2. new batch: read `/proc/self/pagemap` and skip pages not present, mapped to the
//!    shared zero page, file-backed or not exclusively mapped (KSM, fork): discarding
//!    those frees nothing or loses data; ask the VM (`off_limits`: the VMM's own low
//!    memory, ballooned pages); all-zero pages are discarded in this pause without
//!    being written; the others are copied into the batch buffer;
//! 3. finished batch: pagemap, maps and `off_limits` again, and the content against
//!    the copy; the pages that pass are published (page -> slot, or page -> cache
//!    entry);
//! 4. make sure the anonymous mappings holding the pages to discard are registered
//!    with the userfaultfd (a no-op unless the VMM replaced a mapping), *then*
//!    `MADV_DONTNEED` them (coalesced into ranges): from the moment a page is
//!    missing, a fault on it finds its slot;
//! 5. resume.
//!
//! A write error (ENOSPC, EIO) frees the batch's slots, and its pages, never
//! discarded, stay resident: eviction stops, nothing is lost. Batches still in flight
//! when a request ends in an error are dropped the same way.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use pagestate::maps::{anon_ranges, in_ranges};
use pagestate::page::{copy_page, is_zero, Page};
use pagestate::pagemap::{Backing, PageInfo};
use pagestate::{PauseError, PAGE_SIZE};

use crate::error::SwapError;
use crate::file::{AlignedBuf, NO_SLOT};
use crate::state::SwapState;
use crate::uffd::UFFDIO_REGISTER_MODE_MISSING;
use crate::zcache::{self, IN_CACHE};

/// Batches being written at once (each pause finishes the batch this many pauses
/// old).
const IN_FLIGHT: usize = 2;

/// State kept between eviction requests (behind the swapper's eviction lock, which
/// also serialises requests): the batch buffers not in use.
pub(crate) struct EvictState {
    spare: Vec<BatchMem>,
    batch_pages: usize,
}

impl EvictState {
    pub fn new(batch_pages: usize) -> EvictState {
        EvictState { spare: Vec::new(), batch_pages }
    }

    fn take(&mut self) -> BatchMem {
        self.spare.pop().unwrap_or_else(|| BatchMem {
            buf: AlignedBuf::new(self.batch_pages * PAGE_SIZE),
            scratch: zcache::scratch(),
            packed: Vec::new(),
        })
    }
}

/// The memory of one batch: its pages' copies, and room for compressing them.
struct BatchMem {
    buf: AlignedBuf,
    /// One page compressed.
    scratch: Vec<u8>,
    /// Compressed pages back to back.
    packed: Vec<u8>,
}

/// Where the writer put a page of a batch.
#[derive(Clone, Copy)]
enum Dest {
    /// Not written (no slot left, or the batch's write failed).
    Nowhere,
    Slot(u32),
    /// In `packed[off..off + len]`, for the compression cache.
    Cached {
        off: usize,
        len: usize,
    },
}

/// A batch copied out of guest RAM, on its way to the file and the cache.
struct Batch {
    mem: BatchMem,
    /// Non-zero pages copied, sorted; page `k` is at `mem.buf[k * PAGE_SIZE..]`.
    pages: Vec<u32>,
    /// Filled by the writer: crc32c of each page, where it went, the batch id of
    /// its slots, a write error.
    crcs: Vec<u32>,
    dest: Vec<Dest>,
    batch_id: u32,
    error: Option<std::io::Error>,
}

impl Batch {
    fn page(&self, k: usize) -> &[u8] {
        &self.mem.buf[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]
    }
}

/// Time between marks, added to the stage counters.
struct Lap(Instant);

impl Lap {
    fn start() -> Lap {
        Lap(Instant::now())
    }

    /// Adds the time since the last mark to `stage`.
    fn to(&mut self, stage: &std::sync::atomic::AtomicU64) {
        let now = Instant::now();
        stage.fetch_add((now - self.0).as_nanos() as u64, Relaxed);
        self.0 = now;
    }
}

/// Tries of one pause before the request gives up with
/// [`SwapError::PauseTimedOut`].
const PAUSE_ATTEMPTS: u32 = 3;

enum BatchError {
    Ending,
    PauseTimedOut(Duration),
    Write(std::io::Error),
    Other(SwapError),
}

/// Evict up to `want` pages: victims from the policy, or from `explicit` (sorted
/// page indices). Returns the pages reclaimed.
pub(crate) fn swap_out(
    sh: &SwapState,
    ev: &mut EvictState,
    want: usize,
    explicit: Option<&[u32]>,
) -> Result<usize, SwapError> {
    if want == 0 {
        return Ok(0);
    }
    {
        let mut stopped = sh.stopped.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((since, reason)) = &*stopped {
            if since.elapsed() < sh.cfg.retry_after {
                return Err(SwapError::Stopped { reason: reason.clone() });
            }
            log::info!("swapd: {}: retrying eviction (stopped {:?} ago: {reason})", sh.name, since.elapsed());
            *stopped = None;
        }
    }
    let t0 = Instant::now();
    if explicit.is_none() {
        sh.victims.begin();
    }
    let mut done = 0usize;
    let result = std::thread::scope(|s| {
        let mut in_flight: VecDeque<std::thread::ScopedJoinHandle<'_, Batch>> = VecDeque::new();
        let mut pos = 0usize;
        let result = loop {
            let flying: usize = in_flight.len() * sh.cfg.batch_pages;
            let cands = match gather(sh, want.saturating_sub(done + flying), explicit, &mut pos) {
                Ok(c) => c,
                Err(e) => break Err(BatchError::Other(e)),
            };
            // The batch before last, or the last ones once there is nothing new.
            let mut lap = Lap::start();
            let mut finishing = if in_flight.len() >= IN_FLIGHT || cands.is_empty() {
                in_flight.pop_front().map(|h| h.join().expect("swap writer thread"))
            } else {
                None
            };
            lap.to(&sh.counters.stages.writer_wait);
            if cands.is_empty() && finishing.is_none() {
                break Ok(());
            }
            let mut attempt = 1;
            let stepped = loop {
                match pause_step(sh, ev, &cands, finishing.as_ref()) {
                    Err(BatchError::PauseTimedOut(waited)) => {
                        // The VM runs on: other reclaimers or busy devices held it.
                        // The exclusion is handed over in arrival order, so waiting
                        // again gets a turn unless the VM itself does not settle.
                        sh.counters.pause_timeouts.fetch_add(1, Relaxed);
                        log::info!(
                            "swapd: {}: no pause within {:.1}s (attempt {attempt} of {PAUSE_ATTEMPTS})",
                            sh.name,
                            waited.as_secs_f64()
                        );
                        if attempt == PAUSE_ATTEMPTS {
                            break Err(BatchError::PauseTimedOut(waited));
                        }
                        attempt += 1;
                    }
                    other => break other,
                }
            };
            let write_error = finishing.as_mut().and_then(|b| b.error.take());
            if let Some(b) = finishing {
                if stepped.is_err() {
                    abandon(sh, &b);
                }
                ev.spare.push(b.mem);
            }
            let new = match stepped {
                Ok((freed, new)) => {
                    done += freed;
                    new
                }
                Err(e) => break Err(e),
            };
            if let Some(e) = write_error {
                if let Some(b) = new {
                    abandon(sh, &b);
                    ev.spare.push(b.mem);
                }
                break Err(BatchError::Write(e));
            }
            if let Some(b) = new {
                in_flight.push_back(s.spawn(move || write_batch(sh, b)));
            }
            // Keep the compression cache within its cap (outside the pause).
            if sh.cfg.cache.is_some() {
                let mut lap = Lap::start();
                let mut mem = ev.take();
                let spilled = spill(sh, &mut mem.buf);
                ev.spare.push(mem);
                lap.to(&sh.counters.stages.spill);
                if let Err(e) = spilled {
                    break Err(e);
                }
            }
        };
        // A request that ends early drops what is still in flight (never discarded:
        // the pages stay resident).
        for h in in_flight {
            let b = h.join().expect("swap writer thread");
            abandon(sh, &b);
            ev.spare.push(b.mem);
        }
        result
    });
    let result = match result {
        Ok(()) => Ok(done),
        Err(BatchError::Ending) => Err(SwapError::Ending { reclaimed: done }),
        Err(BatchError::PauseTimedOut(waited)) => {
            sh.counters.pause_gave_up.fetch_add(1, Relaxed);
            Err(SwapError::PauseTimedOut { reclaimed: done, waited })
        }
        Err(BatchError::Write(e)) => {
            sh.counters.write_errors.fetch_add(1, Relaxed);
            let reason = format!("writing {}: {e}", sh.file.path().display());
            log::error!(
                "swapd: {}: {reason}; eviction stopped, the pages being written stay where they were \
                 (resident, or in the compression cache; {done} pages evicted before)",
                sh.name
            );
            *sh.stopped.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), reason));
            Err(SwapError::Write { reclaimed: done, source: e })
        }
        Err(BatchError::Other(e)) => Err(e),
    };
    sh.counters.evict_ns.fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
    result
}

/// Up to one batch of candidates worth a pause (at most `left`): a request that
/// finds little (a VM mostly not resident, or shared) would otherwise pause the VM
/// once per batch of absent pages, back to back, and starve the guest. The pause
/// checks each page again.
fn gather(sh: &SwapState, left: usize, explicit: Option<&[u32]>, pos: &mut usize) -> Result<Vec<u32>, SwapError> {
    let mut lap = Lap::start();
    let max = sh.cfg.batch_pages.min(left);
    let mut cands: Vec<u32> = Vec::with_capacity(max);
    let mut walked_all = max == 0;
    while cands.len() < max && !walked_all {
        let more: Vec<u32> = {
            let t = sh.lock();
            let left = max - cands.len();
            match explicit {
                Some(list) => {
                    let mut c = Vec::with_capacity(left);
                    while c.len() < left && *pos < list.len() {
                        let p = list[*pos];
                        *pos += 1;
                        if t.map[p as usize] == NO_SLOT {
                            c.push(p);
                        }
                    }
                    c
                }
                None => sh.victims.next(left, |p| t.map[p as usize] == NO_SLOT),
            }
        };
        walked_all = more.is_empty();
        cands.extend(evictable(sh, more)?);
    }
    // The random walk re-keys when it completes a cycle, so one request can propose
    // a page twice.
    cands.sort_unstable();
    cands.dedup();
    lap.to(&sh.counters.stages.gather);
    Ok(cands)
}

/// The pages of `cands` that `/proc/self/pagemap` shows resident and private (what
/// the batch would evict now); the others are counted as skipped.
fn evictable(sh: &SwapState, mut cands: Vec<u32>) -> Result<Vec<u32>, SwapError> {
    cands.sort_unstable();
    cands.dedup();
    let entries = pagemap_of(sh, &cands)?;
    let mut entry = entries.into_iter();
    cands.retain(|_| worth_evicting(sh, entry.next().unwrap()));
    Ok(cands)
}

/// Pagemap entries of `pages` (sorted).
fn pagemap_of(sh: &SwapState, pages: &[u32]) -> Result<Vec<PageInfo>, SwapError> {
    let mut entries = vec![PageInfo::default(); pages.len()];
    for (s, l) in runs(sh, pages) {
        sh.pagemap
            .read(sh.host_of_page(pages[s]), &mut entries[s..s + l])
            .map_err(|e| SwapError::io("/proc/self/pagemap", e))?;
    }
    Ok(entries)
}

/// Whether a page with this pagemap entry holds memory of its own that eviction
/// can free (counting the others as skipped): resident, not the shared zero page,
/// private anonymous memory mapped once (a file page, KSM or a fork would lose
/// data or free nothing).
fn worth_evicting(sh: &SwapState, e: PageInfo) -> bool {
    let c = &sh.counters;
    let zero_page = sh.zero_pfn != 0 && e.pfn() == sh.zero_pfn;
    match e.backing() {
        Backing::Absent => c.skipped_not_present.fetch_add(1, Relaxed),
        _ if zero_page => c.skipped_not_present.fetch_add(1, Relaxed),
        Backing::File | Backing::AnonShared => c.skipped_shared.fetch_add(1, Relaxed),
        Backing::Anon => return true,
    };
    false
}

/// Runs of consecutive pages (same region, consecutive indices) of a sorted list:
/// (index into the list, length).
fn runs(sh: &SwapState, pages: &[u32]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, &p) in pages.iter().enumerate() {
        match out.last_mut() {
            Some((s, l)) if pages[*s + *l - 1] + 1 == p && sh.same_region(pages[*s], p) => *l += 1,
            _ => out.push((i, 1)),
        }
    }
    out
}

/// One pause: copy out the batch `cands` (sorted, none with a slot) and finish
/// `finishing` (written meanwhile). Returns the pages taken out of guest RAM (zero
/// pages of the new batch, pages of the finished one) and the new batch, to be
/// written.
fn pause_step(
    sh: &SwapState,
    ev: &mut EvictState,
    cands: &[u32],
    finishing: Option<&Batch>,
) -> Result<(usize, Option<Batch>), BatchError> {
    let c = &sh.counters;
    let st = &c.stages;
    let mut lap = Lap::start();
    let guard = sh.pause().map_err(|e| match e {
        PauseError::Ending => BatchError::Ending,
        PauseError::TimedOut { waited } => BatchError::PauseTimedOut(waited),
    })?;
    lap.to(&st.pause_wait);
    let tp = Instant::now();
    let res = (|| {
        // Paused: page sharing remaps nothing while the mappings are read and
        // registered (its pool mappings must stay unregistered).
        sh.ensure_registered().map_err(BatchError::Other)?;
        let old: &[u32] = finishing.map_or(&[], |b| &b.pages);
        let hosts = cands.iter().chain(old).map(|&p| sh.host_of_page(p));
        let (lo, hi) = hosts.fold((usize::MAX, 0), |(lo, hi), h| (lo.min(h), hi.max(h + PAGE_SIZE)));
        let anon = if lo < hi {
            anon_ranges(lo, hi).map_err(|e| BatchError::Other(SwapError::io("/proc/self/maps", e)))?
        } else {
            Vec::new()
        };
        lap.to(&st.scan);

        // The new batch: check, copy out; zero pages go now.
        let mut zero: Vec<u32> = Vec::new();
        let new = if cands.is_empty() {
            None
        } else {
            let entries = pagemap_of(sh, cands).map_err(BatchError::Other)?;
            let mut mem = ev.take();
            let mut pages = Vec::with_capacity(cands.len());
            for (&p, &e) in cands.iter().zip(&entries) {
                if !worth_evicting(sh, e) {
                    continue;
                }
                if !in_ranges(&anon, sh.host_of_page(p)) {
                    c.skipped_vma.fetch_add(1, Relaxed);
                    continue;
                }
                if sh.vm.off_limits(sh.gpa_of_page(p)) {
                    c.skipped_vmm.fetch_add(1, Relaxed);
                    continue;
                }
                let k = pages.len();
                let dst: &mut Page = (&mut mem.buf[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]).try_into().unwrap();
                // SAFETY: a resident page of guest RAM (checked above), which stays
                // mapped for the swapper's life; every writer is paused.
                unsafe { copy_page(sh.host_of_page(p), dst) };
                if is_zero(dst) {
                    zero.push(p);
                } else {
                    pages.push(p);
                }
            }
            lap.to(&st.copy);
            if pages.is_empty() {
                ev.spare.push(mem);
                None
            } else {
                Some(Batch { mem, pages, crcs: Vec::new(), dest: Vec::new(), batch_id: 0, error: None })
            }
        };

        // The finished batch: which pages did not change since their copy.
        let same = match finishing {
            Some(b) => unchanged(sh, b, &anon).map_err(BatchError::Other)?,
            None => Vec::new(),
        };
        lap.to(&st.verify);
        let mut gone: Vec<u32> = same.iter().map(|&k| finishing.map_or(0, |b| b.pages[k])).collect();
        gone.extend_from_slice(&zero);
        gone.sort_unstable();
        let runs = runs(sh, &gone);
        register(sh, &gone, &runs, &anon)?;
        lap.to(&st.register);
        // Publish, then discard: from the moment a page is missing, a fault on it
        // finds its slot or entry. Nothing after this fails the step.
        let published = finishing.map_or(0, |b| publish(sh, b, &same));
        let (freed, released) = discard(sh, &gone, &runs);
        lap.to(&st.discard);
        // Published pages whose discard failed were released (they stay resident).
        let out = published - released;
        c.pages_out.fetch_add(out as u64, Relaxed);
        c.zero_pages_elided.fetch_add((freed - out) as u64, Relaxed);
        c.batches.fetch_add(1, Relaxed);
        Ok((freed, new))
    })();
    drop(guard);
    c.pause.record(tp.elapsed());
    res
}

/// Of a written batch, the indices of the pages still as they were copied: present,
/// private anonymous, not off limits, same content. The others lose their slot
/// (they stay resident). With the VM paused.
fn unchanged(sh: &SwapState, b: &Batch, anon: &[(usize, usize)]) -> Result<Vec<usize>, SwapError> {
    if b.error.is_some() || b.pages.is_empty() {
        return Ok(Vec::new());
    }
    let entries = pagemap_of(sh, &b.pages)?;
    let mut now: Page = [0; PAGE_SIZE];
    let mut same = Vec::with_capacity(b.pages.len());
    let mut changed = Vec::new();
    for (k, (&p, e)) in b.pages.iter().zip(&entries).enumerate() {
        if matches!(b.dest[k], Dest::Nowhere) {
            continue;
        }
        let host = sh.host_of_page(p);
        let zero_page = sh.zero_pfn != 0 && e.pfn() == sh.zero_pfn;
        let still = e.backing() == Backing::Anon
            && !zero_page
            && in_ranges(anon, host)
            && !sh.vm.off_limits(sh.gpa_of_page(p))
            && {
                // SAFETY: a resident page of guest RAM (pagemap, above), mapped for
                // the swapper's life; every writer is paused.
                unsafe { copy_page(host, &mut now) };
                now[..] == *b.page(k)
            };
        if still {
            same.push(k);
        } else {
            changed.push(k);
        }
    }
    if !changed.is_empty() {
        sh.counters.skipped_changed.fetch_add(changed.len() as u64, Relaxed);
        let mut t = sh.lock();
        for k in changed {
            if let Dest::Slot(slot) = b.dest[k] {
                t.slots.free(slot);
            }
        }
    }
    Ok(same)
}

/// Publishes the pages `same` of a written batch: page -> slot, or page -> cache
/// entry. Returns how many.
fn publish(sh: &SwapState, b: &Batch, same: &[usize]) -> usize {
    let c = &sh.counters;
    let mut written = 0u64;
    let mut t = sh.lock();
    let t = &mut *t;
    for &k in same {
        let p = b.pages[k];
        debug_assert!(!t.swapped(p));
        t.release(p);
        match b.dest[k] {
            Dest::Slot(slot) => {
                t.map[p as usize] = slot;
                t.slots.record(slot, p, b.batch_id, b.crcs[k]);
                written += 1;
            }
            Dest::Cached { off, len } => {
                let cache = t.cache.as_mut().expect("a page for the cache without a cache");
                cache.insert(p, &b.mem.packed[off..off + len], b.crcs[k]);
                t.map[p as usize] = IN_CACHE;
                c.cache_stored.fetch_add(1, Relaxed);
                c.cache_stored_bytes.fetch_add(len as u64, Relaxed);
            }
            Dest::Nowhere => unreachable!("only written pages are kept"),
        }
    }
    c.bytes_written.fetch_add(written * PAGE_SIZE as u64, Relaxed);
    same.len()
}

/// Registers with the userfaultfd (a no-op for ranges already ours) the anonymous
/// ranges holding a page of `gone` (sorted, in `runs`), and only those: page sharing
/// splits guest RAM into thousands of mappings, and registering all of them made
/// every batch of random victims cost thousands of ioctls with the VM paused.
fn register(sh: &SwapState, gone: &[u32], runs: &[(usize, usize)], anon: &[(usize, usize)]) -> Result<(), BatchError> {
    let mut last = None;
    for &(s, _) in runs {
        let p = gone[s];
        let (host, r) = (sh.host_of_page(p), sh.region_of_page(p));
        let (a, b) = anon[anon.partition_point(|a| a.1 <= host)];
        let (s, e) = (a.max(r.host), b.min(r.host + r.len));
        if last != Some((s, e)) {
            sh.uffd
                .register(s as u64, (e - s) as u64, UFFDIO_REGISTER_MODE_MISSING)
                .map_err(|e| BatchError::Other(SwapError::io("register before discard", e)))?;
            last = Some((s, e));
        }
    }
    Ok(())
}

/// Discards `gone` (sorted, in `runs`), coalesced into ranges, with the VM paused.
/// Returns (pages discarded, published pages released because their discard
/// failed: they stay resident).
fn discard(sh: &SwapState, gone: &[u32], runs: &[(usize, usize)]) -> (usize, usize) {
    let c = &sh.counters;
    let mut freed = 0usize;
    let mut released = 0usize;
    let ranges: Vec<(usize, usize)> = runs.iter().map(|&(s, l)| (sh.host_of_page(gone[s]), l * PAGE_SIZE)).collect();
    for (&(s, l), r) in runs.iter().zip(sh.discarder.discard(&ranges)) {
        if let Err(e) = r {
            log::error!(
                "swapd: {}: madvise(DONTNEED) {:#x}+{:#x}: {e}",
                sh.name,
                sh.host_of_page(gone[s]),
                l * PAGE_SIZE
            );
            let mut t = sh.lock();
            for &p in &gone[s..s + l] {
                if t.swapped(p) {
                    t.release(p);
                    released += 1;
                }
            }
            c.fault_errors.fetch_add(1, Relaxed);
            continue;
        }
        freed += l;
    }
    for &p in gone {
        sh.clear_prefetched(p);
    }
    (freed, released)
}

/// The writer of a batch (its own thread, the VM running): checksums each page,
/// compresses it with a cache (to the cache if it fits), and writes the others to
/// fresh slots, one vectored write per run of slots.
fn write_batch(sh: &SwapState, mut b: Batch) -> Batch {
    let c = &sh.counters;
    let t0 = Instant::now();
    let max_compressed = sh.cfg.cache.map(|z| z.max_compressed);
    let n = b.pages.len();
    b.mem.packed.clear();
    b.crcs = Vec::with_capacity(n);
    b.dest = vec![Dest::Nowhere; n];
    let mut to_file: Vec<usize> = Vec::with_capacity(n);
    for k in 0..n {
        let page = &b.mem.buf[k * PAGE_SIZE..(k + 1) * PAGE_SIZE];
        b.crcs.push(crc32c::crc32c(page));
        if let Some(max) = max_compressed {
            let tc = Instant::now();
            let fits = zcache::compress(page, &mut b.mem.scratch, max);
            c.compress_ns.fetch_add(tc.elapsed().as_nanos() as u64, Relaxed);
            if let Some(len) = fits {
                b.dest[k] = Dest::Cached { off: b.mem.packed.len(), len };
                b.mem.packed.extend_from_slice(&b.mem.scratch[..len]);
                continue;
            }
            c.cache_refused.fetch_add(1, Relaxed);
        }
        to_file.push(k);
    }
    let extents = {
        let mut t = sh.lock();
        let ext = t.slots.alloc(to_file.len() as u32);
        let got: usize = ext.iter().map(|e| e.1 as usize).sum();
        if got < to_file.len() {
            // Cannot happen with a file sized for the VM; keep the rest resident.
            log::warn!("swapd: {}: swap file full ({got} of {} slots)", sh.name, to_file.len());
            to_file.truncate(got);
        }
        b.batch_id = t.next_batch;
        t.next_batch = t.next_batch.wrapping_add(1).max(1);
        ext
    };
    let mut i = 0usize;
    for &(s, l) in &extents {
        let ks = &to_file[i..i + l as usize];
        let pages: Vec<&[u8]> = ks.iter().map(|&k| b.page(k)).collect();
        if let Err(e) = sh.file.write_slots_vectored(s, &pages) {
            let mut t = sh.lock();
            for &(s, l) in &extents {
                (s..s + l).for_each(|slot| t.slots.free(slot));
            }
            t.slots.rewind();
            drop(t);
            b.error = Some(e);
            b.dest.iter_mut().for_each(|d| *d = Dest::Nowhere);
            break;
        }
        for (j, &k) in ks.iter().enumerate() {
            b.dest[k] = Dest::Slot(s + j as u32);
        }
        i += l as usize;
    }
    c.stages.write.fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
    b
}

/// Drops a batch that will not be finished: frees its slots (its pages were never
/// discarded and stay resident).
fn abandon(sh: &SwapState, b: &Batch) {
    let mut t = sh.lock();
    for d in &b.dest {
        if let Dest::Slot(slot) = *d {
            t.slots.free(slot);
        }
    }
}

/// Keeps the compression cache within its cap: writes its oldest entries to the
/// file (decompressed, one slot each, as one batch: sorted by page, so a later
/// fault prefetches their neighbours), outside the VM's pause. An entry stays in
/// the cache, where a fault still finds it, until its slot is written; it moves to
/// the slot only if it is still the same entry then. An entry that fails to
/// decompress or its checksum is not written: its page is poisoned and the VM
/// stopped, as for a bad slot.
fn spill(sh: &SwapState, buf: &mut AlignedBuf) -> Result<(), BatchError> {
    let c = &sh.counters;
    let room = buf.len() / PAGE_SIZE;
    loop {
        let (spills, extents, batch_id) = {
            let mut t = sh.lock();
            let t = &mut *t;
            let Some(cache) = &t.cache else { return Ok(()) };
            let poisoned = &t.poisoned;
            let mut spills = cache.oldest(cache.over(), room, |p| poisoned.contains(&p));
            if spills.is_empty() {
                return Ok(());
            }
            spills.sort_unstable_by_key(|s| s.page);
            let ext = t.slots.alloc(spills.len() as u32);
            spills.truncate(ext.iter().map(|e| e.1 as usize).sum());
            let b = t.next_batch;
            t.next_batch = t.next_batch.wrapping_add(1).max(1);
            (spills, ext, b)
        };
        if spills.is_empty() {
            log::warn!("swapd: {}: swap file full, the compression cache stays over its cap", sh.name);
            return Ok(());
        }
        let mut bad = Vec::new();
        for (i, s) in spills.iter().enumerate() {
            if let Err(why) = zcache::decompress(&s.entry, &mut buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]) {
                bad.push((i, why));
            }
        }
        let mut off = 0usize;
        for &(s, l) in &extents {
            let l = l as usize;
            if let Err(e) = sh.file.write_slots(s, &buf[off * PAGE_SIZE..(off + l) * PAGE_SIZE]) {
                let mut t = sh.lock();
                for &(s, l) in &extents {
                    (s..s + l).for_each(|slot| t.slots.free(slot));
                }
                t.slots.rewind();
                return Err(BatchError::Write(e));
            }
            off += l;
        }
        let mut moved = 0u64;
        {
            let mut t = sh.lock();
            let t = &mut *t;
            let slots = extents.iter().flat_map(|&(s, l)| s..s + l);
            let mut bad_at = bad.iter().map(|b| b.0).peekable();
            for (i, (sp, slot)) in spills.iter().zip(slots).enumerate() {
                if bad_at.next_if_eq(&i).is_some() {
                    t.slots.free(slot);
                    t.poisoned.insert(sp.page);
                    continue;
                }
                if t.cache.as_mut().is_some_and(|cache| cache.spilled(sp)) {
                    t.map[sp.page as usize] = slot;
                    t.slots.record(slot, sp.page, batch_id, sp.entry.crc);
                    moved += 1;
                } else {
                    // Faulted in, forgotten or evicted anew meanwhile.
                    t.slots.free(slot);
                }
            }
        }
        c.cache_spilled.fetch_add(moved, Relaxed);
        c.bytes_written.fetch_add(moved * PAGE_SIZE as u64, Relaxed);
        for (i, why) in bad {
            c.cache_corrupt.fetch_add(1, Relaxed);
            let msg = format!(
                "compression cache entry of guest page {:#x} {why} (corrupted in memory)",
                sh.gpa_of_page(spills[i].page)
            );
            log::error!("swapd: {}: {msg}", sh.name);
            sh.vm.fatal(format!("host swap: {msg}"));
        }
    }
}
