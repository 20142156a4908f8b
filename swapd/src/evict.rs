//! Eviction: copy pages to the swap file and discard them from guest RAM, in
//! batches, each batch with every writer of the VM paused.
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
//!   nothing but this thread changes the batch's pages, so the content written to
//!   the file is the content discarded.
//!
//! Candidates are read in `/proc/self/pagemap` first, without pausing, and a batch
//! is gathered from those resident and private only: a pause is spent on pages
//! worth evicting. One batch, under the pause:
//! 1. read `/proc/self/maps`: only pages in private anonymous mappings may be
//!    discarded (a page remapped by page sharing would revert to the pool's content
//!    instead of faulting);
//! 2. read `/proc/self/pagemap`: skip pages not present, mapped to the shared zero
//!    page, file-backed or not exclusively mapped (KSM, fork): discarding those
//!    frees nothing or loses data;
//! 3. ask the VM (`off_limits`: the VMM's own low memory, ballooned pages);
//! 4. all-zero pages: discard without writing; others: copy into the batch buffer
//!    and checksum;
//! 5. allocate slots (as few runs as possible) and write the buffer with one large
//!    write per run; on an error (ENOSPC, EIO) free the slots, resume, stop
//!    eviction: nothing was discarded, nothing is lost;
//! 6. make sure the anonymous mappings holding the batch are registered with the
//!    userfaultfd (a no-op unless the VMM replaced a mapping), then publish
//!    page -> slot in the table, *then* `MADV_DONTNEED` the pages (coalesced into
//!    ranges): from the moment a page is missing, a fault on it finds its slot;
//! 7. resume.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use pagestate::maps::{anon_ranges, in_ranges};
use pagestate::page::{copy_page, is_zero};
use pagestate::pagemap::{Backing, PageInfo};
use pagestate::{PauseError, PAGE_SIZE};

use crate::error::SwapError;
use crate::file::{AlignedBuf, NO_SLOT};
use crate::state::SwapState;
use crate::uffd::UFFDIO_REGISTER_MODE_MISSING;
use crate::zcache::{self, IN_CACHE};

/// State kept between eviction requests (behind the swapper's eviction lock, which
/// also serialises requests).
pub(crate) struct EvictState {
    /// Pages of the batch going to the file (also the spill buffer).
    pub buf: AlignedBuf,
    /// One page compressed.
    scratch: Vec<u8>,
    /// Pages of the batch going to the compression cache: their compressed bytes
    /// back to back, and (page, offset, length, crc32c of the page).
    packed: Vec<u8>,
    cached: Vec<(u32, usize, usize, u32)>,
}

impl EvictState {
    pub fn new(batch_pages: usize) -> EvictState {
        EvictState {
            buf: AlignedBuf::new(batch_pages * PAGE_SIZE),
            scratch: zcache::scratch(),
            packed: Vec::new(),
            cached: Vec::new(),
        }
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

/// Tries of one batch to get its pause before the request gives up with
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
    let batch = sh.cfg.batch_pages;
    let mut done = 0usize;
    let mut pos = 0usize;
    if explicit.is_none() {
        sh.victims.begin();
    }
    let result = 'request: loop {
        if done >= want {
            break Ok(());
        }
        let max = batch.min(want - done);
        // Gather a batch of pages worth a pause: a request that finds little (a VM
        // mostly not resident, or shared) would otherwise pause the VM once per
        // batch of absent pages, back to back, and starve the guest. The batch
        // checks each page again under the pause.
        let mut lap = Lap::start();
        let mut cands: Vec<u32> = Vec::with_capacity(max);
        let mut walked_all = false;
        while cands.len() < max && !walked_all {
            let more: Vec<u32> = {
                let t = sh.lock();
                let left = max - cands.len();
                match explicit {
                    Some(list) => {
                        let mut c = Vec::with_capacity(left);
                        while c.len() < left && pos < list.len() {
                            let p = list[pos];
                            pos += 1;
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
            match evictable(sh, more) {
                Ok(found) => cands.extend(found),
                Err(e) => break 'request Err(e),
            }
        }
        if cands.is_empty() {
            break Ok(());
        }
        // The random walk re-keys when it completes a cycle, so one request can
        // propose a page twice.
        cands.sort_unstable();
        cands.dedup();
        lap.to(&sh.counters.stages.gather);
        let mut attempt = 1;
        let outcome = loop {
            match evict_batch(sh, ev, &cands) {
                Err(BatchError::PauseTimedOut(waited)) => {
                    // The VM runs on: other reclaimers or busy devices held it. The
                    // exclusion is handed over in arrival order, so waiting again
                    // gets a turn unless the VM itself does not settle.
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
        // Outside the pause: keep the compression cache within its cap.
        let outcome = outcome.and_then(|n| {
            done += n;
            let mut lap = Lap::start();
            let spilled = spill(sh, &mut ev.buf).map(|()| 0);
            lap.to(&sh.counters.stages.spill);
            spilled
        });
        match outcome {
            Ok(n) => done += n,
            Err(BatchError::Ending) => break Err(SwapError::Ending { reclaimed: done }),
            Err(BatchError::PauseTimedOut(waited)) => {
                sh.counters.pause_gave_up.fetch_add(1, Relaxed);
                break Err(SwapError::PauseTimedOut { reclaimed: done, waited });
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
                break Err(SwapError::Write { reclaimed: done, source: e });
            }
            Err(BatchError::Other(e)) => break Err(e),
        }
    };
    sh.counters.evict_ns.fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
    result.map(|()| done)
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

/// One batch under one pause. `cands` is sorted and holds no page with a slot.
fn evict_batch(sh: &SwapState, ev: &mut EvictState, cands: &[u32]) -> Result<usize, BatchError> {
    let c = &sh.counters;
    let EvictState { buf, scratch, packed, cached } = ev;
    packed.clear();
    cached.clear();
    let max_compressed = sh.cfg.cache.map(|z| z.max_compressed);
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
        let lo = cands.iter().map(|&p| sh.host_of_page(p)).min().unwrap();
        let hi = cands.iter().map(|&p| sh.host_of_page(p)).max().unwrap() + PAGE_SIZE;
        let anon = anon_ranges(lo, hi).map_err(|e| BatchError::Other(SwapError::io("/proc/self/maps", e)))?;

        let entries = pagemap_of(sh, cands).map_err(BatchError::Other)?;
        lap.to(&st.scan);

        let mut copied: Vec<u32> = Vec::with_capacity(cands.len());
        let mut crcs: Vec<u32> = Vec::with_capacity(cands.len());
        let mut zero: Vec<u32> = Vec::new();
        for (&p, &e) in cands.iter().zip(&entries) {
            if !worth_evicting(sh, e) {
                continue;
            }
            let host = sh.host_of_page(p);
            if !in_ranges(&anon, host) {
                c.skipped_vma.fetch_add(1, Relaxed);
                continue;
            }
            if sh.vm.off_limits(sh.gpa_of_page(p)) {
                c.skipped_vmm.fetch_add(1, Relaxed);
                continue;
            }
            let k = copied.len();
            let dst: &mut [u8; PAGE_SIZE] = (&mut buf[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]).try_into().unwrap();
            // SAFETY: host is a resident page of guest RAM (checked above), which
            // stays mapped for the swapper's life; every writer is paused, so the
            // copy is what the discard below throws away.
            unsafe { copy_page(host, dst) };
            if is_zero(dst) {
                zero.push(p);
                continue;
            }
            let crc = crc32c::crc32c(dst);
            if let Some(max) = max_compressed {
                let t0 = Instant::now();
                let fits = zcache::compress(dst, scratch, max);
                c.compress_ns.fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
                if let Some(n) = fits {
                    // To the cache: this buffer page is reused by the next one.
                    cached.push((p, packed.len(), n, crc));
                    packed.extend_from_slice(&scratch[..n]);
                    continue;
                }
                c.cache_refused.fetch_add(1, Relaxed);
            }
            crcs.push(crc);
            copied.push(p);
        }

        lap.to(&st.copy);

        // Slots, then one large write per run of slots.
        let (extents, batch_id) = {
            let mut t = sh.lock();
            let ext = t.slots.alloc(copied.len() as u32);
            let got: usize = ext.iter().map(|e| e.1 as usize).sum();
            if got < copied.len() {
                // Cannot happen with a file sized for the VM; keep the rest resident.
                log::warn!("swapd: {}: swap file full ({got} of {} slots)", sh.name, copied.len());
                copied.truncate(got);
            }
            let b = t.next_batch;
            t.next_batch = t.next_batch.wrapping_add(1).max(1);
            (ext, b)
        };
        let mut off = 0usize;
        for &(s, l) in &extents {
            let l = l as usize;
            if let Err(e) = sh.file.write_slots(s, &buf[off * PAGE_SIZE..(off + l) * PAGE_SIZE]) {
                let mut t = sh.lock();
                for &(s, l) in &extents {
                    for slot in s..s + l {
                        t.slots.free(slot);
                    }
                }
                t.slots.rewind();
                return Err(BatchError::Write(e));
            }
            off += l;
        }
        c.bytes_written.fetch_add((copied.len() * PAGE_SIZE) as u64, Relaxed);
        lap.to(&st.write);

        let mut gone: Vec<u32> = copied.iter().chain(zero.iter()).copied().chain(cached.iter().map(|e| e.0)).collect();
        gone.sort_unstable();
        let runs = runs(sh, &gone);

        // Register before discarding (a no-op for ranges already ours): the
        // anonymous ranges holding a page of the batch, and only those. Page sharing
        // splits guest RAM into thousands of mappings; registering all of them in
        // `lo..hi` made every batch of random victims cost thousands of ioctls with
        // the VM paused, and kept the guests paused nearly all the time.
        let mut last = None;
        for &(s, _) in &runs {
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

        lap.to(&st.register);

        // Publish page -> slot, then discard.
        {
            let mut t = sh.lock();
            let mut i = 0usize;
            for &(s, l) in &extents {
                for slot in s..s + l {
                    let p = copied[i];
                    debug_assert!(!t.swapped(p));
                    t.release(p);
                    t.map[p as usize] = slot;
                    t.slots.record(slot, p, batch_id, crcs[i]);
                    i += 1;
                }
            }
            if let Some(cache) = &mut t.cache {
                for &(p, off, n, crc) in cached.iter() {
                    cache.insert(p, &packed[off..off + n], crc);
                }
            }
            for &(p, ..) in cached.iter() {
                debug_assert_eq!(t.map[p as usize], NO_SLOT);
                t.map[p as usize] = IN_CACHE;
            }
        }
        c.cache_stored.fetch_add(cached.len() as u64, Relaxed);
        c.cache_stored_bytes.fetch_add(packed.len() as u64, Relaxed);
        let mut freed = 0usize;
        let mut kept_copied = 0usize;
        let ranges: Vec<(usize, usize)> =
            runs.iter().map(|&(s, l)| (sh.host_of_page(gone[s]), l * PAGE_SIZE)).collect();
        for ((s, l), r) in runs.into_iter().zip(sh.discarder.discard(&ranges)) {
            if let Err(e) = r {
                log::error!(
                    "swapd: {}: madvise(DONTNEED) {:#x}+{:#x}: {e}",
                    sh.name,
                    sh.host_of_page(gone[s]),
                    l * PAGE_SIZE
                );
                // Not discarded: the pages are resident, drop their slots.
                let mut t = sh.lock();
                for &p in &gone[s..s + l] {
                    if t.swapped(p) {
                        t.release(p);
                        kept_copied += 1;
                    }
                }
                c.fault_errors.fetch_add(1, Relaxed);
                continue;
            }
            freed += l;
        }
        for &p in &gone {
            sh.clear_prefetched(p);
        }
        let out = copied.len() + cached.len() - kept_copied;
        c.pages_out.fetch_add(out as u64, Relaxed);
        c.zero_pages_elided.fetch_add((freed - out) as u64, Relaxed);
        c.batches.fetch_add(1, Relaxed);
        lap.to(&st.discard);
        Ok(freed)
    })();
    drop(guard);
    c.pause.record(tp.elapsed());
    res
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
