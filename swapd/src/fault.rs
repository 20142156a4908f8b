//! The fault-handler thread of one VM.
//!
//! Once guest RAM is registered, every access to a missing page (a vCPU through
//! KVM, a device thread, the VMM itself) blocks in the kernel and queues a
//! `UFFD_EVENT_PAGEFAULT` here. The thread polls the (non-blocking) descriptor and
//! for each fault, under the table lock:
//!
//! - the page has a slot: read it together with the neighbours evicted in the
//!   same batch into adjacent slots (one read of up to `prefetch_pages` slots,
//!   forward-biased), verify each crc32c, and install the run with `UFFDIO_COPY`
//!   (the faulting page first, which wakes its waiters). A page that fails its
//!   checksum or cannot be read is **not** resolved: it is marked poisoned, the
//!   VMM is told through `GuestVm::fatal` (outside the lock) and the faulting
//!   thread stays blocked until the VMM stops the VM (a signal gets a vCPU out of
//!   KVM_RUN; closing the userfaultfd releases everything). A neighbour that fails
//!   is simply not prefetched (its own fault will report it);
//! - the page is in the compression cache: decompress it, check its crc32c,
//!   install it with `UFFDIO_COPY`, drop the entry (a corrupt entry is treated as
//!   a bad slot: poisoned, reported, never installed);
//! - the page has no slot (first touch, zero page elided by eviction, ballooned):
//!   map the zero page with `UFFDIO_ZEROPAGE`, over the following missing pages
//!   without slot too (up to `zero_fill_pages`, so that a guest touching fresh
//!   memory does not pay one round trip per page; if that fails, the faulting page
//!   alone is filled with a copy); a write fault gets a real zeroed page for the
//!   faulting page (`UFFDIO_COPY`) so the write does not fault twice.
//!
//! This thread never calls `madvise` on guest RAM and never waits for a pause, so
//! it cannot deadlock with the evictor: the evictor never holds the table lock
//! while it pauses, writes, registers or discards.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, MutexGuard};
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use pagestate::PAGE_SIZE;

use crate::error::SwapError;
use crate::file::{AlignedBuf, NO_SLOT};
use crate::state::{SwapState, Table};
use crate::uffd::{Event, Fill};
use crate::zcache::{self, IN_CACHE};

/// The thread body: until `stop` is signalled.
pub(crate) fn run(sh: Arc<SwapState>, stop: EventFd) {
    let mut events = Vec::with_capacity(64);
    let mut buf = AlignedBuf::new(sh.cfg.prefetch_pages * PAGE_SIZE);
    let zero = AlignedBuf::new(PAGE_SIZE);
    loop {
        let mut fds = [
            libc::pollfd { fd: sh.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: two valid pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            log::error!("swapd: {}: poll on the userfaultfd: {e}; fault thread ends", sh.name);
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents & libc::POLLIN == 0 {
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                log::error!("swapd: {}: userfaultfd error {:#x}; fault thread ends", sh.name, fds[0].revents);
                return;
            }
            continue;
        }
        loop {
            match sh.uffd.read_events(&mut events, 64) {
                Ok(0) => break,
                Ok(_) => {
                    for ev in &events {
                        match *ev {
                            Event::PageFault { address, write, .. } => {
                                handle_fault(&sh, address, write, &mut buf, &zero)
                            }
                            other => log::debug!("swapd: {}: ignoring userfaultfd event {other:?}", sh.name),
                        }
                    }
                }
                Err(e) => {
                    log::error!("swapd: {}: reading the userfaultfd: {e}; fault thread ends", sh.name);
                    return;
                }
            }
        }
    }
}

fn handle_fault(sh: &SwapState, address: u64, write: bool, buf: &mut AlignedBuf, zero: &AlignedBuf) {
    let t0 = Instant::now();
    let c = &sh.counters;
    let addr = (address as usize) & !(PAGE_SIZE - 1);
    let Some(page) = sh.page_of_host(addr) else {
        // Not guest RAM we know (cannot happen: we register only our regions).
        c.fault_errors.fetch_add(1, Relaxed);
        log::error!("swapd: {}: fault at {addr:#x} outside guest RAM", sh.name);
        let _ = sh.uffd.wake(addr as u64, PAGE_SIZE as u64);
        return;
    };
    let mut t = sh.lock();
    if t.map[page as usize] == NO_SLOT {
        zero_fill(sh, &t, page, write, zero);
        drop(t);
        c.zero_fills.fetch_add(1, Relaxed);
        c.zero_fill.record(t0.elapsed());
        return;
    }
    if t.poisoned.contains(&page) {
        // Reported already; the VM is being stopped. Leave the thread blocked.
        c.faults_unresolved.fetch_add(1, Relaxed);
        return;
    }
    let cached = t.map[page as usize] == IN_CACHE;
    let filled = if cached {
        fill_from_cache(sh, &mut t, page, buf).map(|_| ())
    } else {
        fill_from_slot(sh, &mut t, page, buf, sh.cfg.prefetch_pages).map(|_| ())
    };
    match filled {
        Ok(()) => {
            drop(t);
            if cached {
                c.cache_fault.record(t0.elapsed());
            } else {
                c.fault_in.record(t0.elapsed());
            }
        }
        Err(msg) => {
            t.poisoned.insert(page);
            drop(t);
            c.faults_unresolved.fetch_add(1, Relaxed);
            log::error!("swapd: {}: {msg}; the fault is left unresolved", sh.name);
            sh.vm.fatal(format!("host swap: {msg}"));
        }
    }
}

/// Resolve a fault on a page without slot with the zero page (a zeroed private
/// page for a write), and the following missing pages without slot with the
/// zero page.
fn zero_fill(sh: &SwapState, t: &MutexGuard<'_, Table>, page: u32, write: bool, zero: &AlignedBuf) {
    let r = sh.region_of_page(page);
    let end = r.first_page + r.pages();
    let mut n = 1u32;
    // Ahead of the fault, not into pages the VMM vetoes: a ballooned page must stay
    // without memory behind it (the balloon counts any it finds as touched).
    while (n as usize) < sh.cfg.zero_fill_pages
        && page + n < end
        && t.map[(page + n) as usize] == NO_SLOT
        && !sh.vm.off_limits(sh.gpa_of_page(page + n))
    {
        n += 1;
    }
    let host = sh.host_of_page(page) as u64;
    let first = if write {
        sh.uffd.copy(host, &zero[..PAGE_SIZE], false)
    } else {
        // The kernel fills a range only inside one mapping: page sharing maps pool
        // pages (a file) over guest RAM, so the range may run into another mapping,
        // which fails the whole call. Then a copy fills the faulting page alone;
        // without it the vCPU would fault on that page forever. (Pool mappings are
        // never registered: there the kernel would fill pages whose content is the
        // file's, see `SwapState::register_anon`.)
        sh.uffd
            .zeropage(host, n as u64 * PAGE_SIZE as u64, false)
            .or_else(|_| sh.uffd.copy(host, &zero[..PAGE_SIZE], false))
    };
    match first {
        Ok(Fill::Done) | Ok(Fill::Partial { .. }) => {}
        Ok(Fill::Exists) => {
            // Already resolved (a second fault queued for the same page): wake.
            let _ = sh.uffd.wake(host, PAGE_SIZE as u64);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // No longer registered: the VMM remapped the page from page sharing's
            // pool since the fault was queued (a stale event). Its content is the
            // pool's; the retried access finds it.
            let _ = sh.uffd.wake(host, PAGE_SIZE as u64);
            return;
        }
        Err(e) => {
            sh.counters.fault_errors.fetch_add(1, Relaxed);
            log::error!("swapd: {}: zero fill: {e}", sh.name);
            let _ = sh.uffd.wake(host, PAGE_SIZE as u64);
            return;
        }
    }
    if write && n > 1 {
        // Best effort: stops at the first present page.
        let _ = sh.uffd.zeropage(host + PAGE_SIZE as u64, (n - 1) as u64 * PAGE_SIZE as u64, false);
    }
}

/// Bring `page` (in the compression cache) back: decompress it into `buf`, check
/// it against its checksum, install it with `UFFDIO_COPY` (which wakes its
/// waiters) and drop the entry. Whether it was installed; an error message if the
/// entry is corrupt (nothing was installed then).
pub(crate) fn fill_from_cache(
    sh: &SwapState,
    t: &mut MutexGuard<'_, Table>,
    page: u32,
    buf: &mut AlignedBuf,
) -> Result<bool, String> {
    let c = &sh.counters;
    let entry = t.cache.as_ref().and_then(|cache| cache.get(page)).expect("a page marked IN_CACHE has an entry");
    if let Err(why) = zcache::decompress(entry, &mut buf[..PAGE_SIZE]) {
        c.cache_corrupt.fetch_add(1, Relaxed);
        return Err(format!(
            "compression cache entry of guest page {:#x} {why} (corrupted in memory)",
            sh.gpa_of_page(page)
        ));
    }
    let host = sh.host_of_page(page) as u64;
    match sh.uffd.copy(host, &buf[..PAGE_SIZE], false) {
        Ok(Fill::Done) => {
            t.release(page);
            c.cache_hits.fetch_add(1, Relaxed);
            c.pages_in.fetch_add(1, Relaxed);
            sh.victims.touched(page);
            Ok(true)
        }
        Ok(Fill::Exists) => {
            // Present although cached: a mapping the VMM replaced; the entry is stale.
            log::warn!(
                "swapd: {}: guest page {:#x} present while cached; entry dropped",
                sh.name,
                sh.gpa_of_page(page)
            );
            c.fault_errors.fetch_add(1, Relaxed);
            t.release(page);
            let _ = sh.uffd.wake(host, PAGE_SIZE as u64);
            Ok(false)
        }
        Ok(Fill::Partial { .. }) => {
            let _ = sh.uffd.wake(host, PAGE_SIZE as u64);
            Ok(false)
        }
        Err(e) => {
            // ENOENT: remapped by the VMM; ESRCH: the process is exiting. Retry.
            c.fault_errors.fetch_add(1, Relaxed);
            log::error!("swapd: {}: {e}", sh.name);
            let _ = sh.uffd.wake(host, PAGE_SIZE as u64);
            Ok(false)
        }
    }
}

/// Bring `page` (which has a slot) back from the file, with up to `window - 1`
/// neighbours of the same batch in adjacent slots. Returns (pages in, prefetched);
/// an error message if the page's own slot is unreadable or corrupt (nothing was
/// installed for it then).
pub(crate) fn fill_from_slot(
    sh: &SwapState,
    t: &mut MutexGuard<'_, Table>,
    page: u32,
    buf: &mut AlignedBuf,
    window: usize,
) -> Result<(usize, usize), String> {
    let c = &sh.counters;
    let slot = t.map[page as usize];
    let batch = t.slots.batch_of(slot);
    let window = window.clamp(1, buf.len() / PAGE_SIZE) as u32;
    let back_max = (window - 1) / 4;
    let fwd_max = window - 1 - back_max;
    let ok = |t: &Table, q: u32, s: u32| {
        sh.same_region(page, q) && t.map[q as usize] == s && t.slots.batch_of(s) == batch && !t.poisoned.contains(&q)
    };
    let mut back = 0u32;
    while back < back_max && page > back && slot > back && ok(t, page - back - 1, slot - back - 1) {
        back += 1;
    }
    let mut fwd = 0u32;
    while fwd < fwd_max
        && page + fwd + 1 < sh.pages
        && slot + fwd + 1 < t.slots.total()
        && ok(t, page + fwd + 1, slot + fwd + 1)
    {
        fwd += 1;
    }
    let (mut lo, mut n) = (page - back, back + fwd + 1);
    let gpa = sh.gpa_of_page(page);
    let mut read = sh.file.read_slots(slot - back, &mut buf[..n as usize * PAGE_SIZE]);
    if read.is_err() && n > 1 {
        // Perhaps only a neighbour's block is bad: try the page alone (one error
        // counted either way).
        (lo, n) = (page, 1);
        read = sh.file.read_slots(slot, &mut buf[..PAGE_SIZE]);
        if read.is_ok() {
            c.read_errors.fetch_add(1, Relaxed);
        }
    }
    if let Err(e) = read {
        c.read_errors.fetch_add(1, Relaxed);
        return Err(format!(
            "swap file {}: cannot read slot {slot} of guest page {gpa:#x}: {e}",
            sh.file.path().display()
        ));
    }
    c.bytes_read.fetch_add(n as u64 * PAGE_SIZE as u64, Relaxed);
    let i0 = (page - lo) as usize;
    let page_at = |i: usize| &buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
    let slot_lo = slot - (page - lo);
    if !t.slots.verify(slot, page_at(i0)) {
        c.checksum_errors.fetch_add(1, Relaxed);
        return Err(format!(
            "swap file {}: slot {slot} of guest page {gpa:#x} fails its checksum (corrupted on disk)",
            sh.file.path().display()
        ));
    }
    // The verified run around the faulting page.
    let mut a = i0;
    while a > 0 && t.slots.verify(slot_lo + a as u32 - 1, page_at(a - 1)) {
        a -= 1;
    }
    let mut b = i0;
    while b + 1 < n as usize && t.slots.verify(slot_lo + b as u32 + 1, page_at(b + 1)) {
        b += 1;
    }
    // A neighbour that failed is counted (and left in its slot: its own fault will
    // report it); the pages beyond it are simply not prefetched.
    c.checksum_errors.fetch_add((a > 0) as u64 + (b + 1 < n as usize) as u64, Relaxed);
    let host = |i: usize| sh.host_of_page(lo + i as u32) as u64;
    let installed = |t: &mut MutexGuard<'_, Table>, from: usize, count: usize| {
        for i in from..from + count {
            let q = lo + i as u32;
            let s = t.map[q as usize];
            t.map[q as usize] = NO_SLOT;
            t.slots.free(s);
        }
    };
    let mut pages_in = 0;
    let mut fwd_pf = 0;
    // Forward part, faulting page first (its waiters are woken by the copy).
    match sh.uffd.copy(host(i0), &buf[i0 * PAGE_SIZE..(b + 1) * PAGE_SIZE], false) {
        Ok(Fill::Done) => {
            installed(t, i0, b + 1 - i0);
            pages_in = 1;
            fwd_pf = b - i0;
        }
        Ok(Fill::Partial { bytes }) => {
            let k = bytes as usize / PAGE_SIZE;
            installed(t, i0, k);
            if k > 0 {
                pages_in = 1;
                fwd_pf = k - 1;
            } else {
                let _ = sh.uffd.wake(host(i0), PAGE_SIZE as u64);
            }
        }
        Ok(Fill::Exists) => {
            // Present although it has a slot: something else populated it (it can
            // only be a mapping the VMM replaced). Its slot is stale.
            log::warn!("swapd: {}: guest page {gpa:#x} present while in the swap file; slot dropped", sh.name);
            c.fault_errors.fetch_add(1, Relaxed);
            installed(t, i0, 1);
            let _ = sh.uffd.wake(host(i0), PAGE_SIZE as u64);
        }
        Err(e) => {
            // ENOENT: the range is no longer registered (remapped by the VMM); ESRCH:
            // the process is exiting. Let the faulting thread retry.
            c.fault_errors.fetch_add(1, Relaxed);
            log::error!("swapd: {}: {e}", sh.name);
            let _ = sh.uffd.wake(host(i0), PAGE_SIZE as u64);
            return Ok((0, 0));
        }
    }
    for i in i0 + 1..i0 + 1 + fwd_pf {
        sh.set_prefetched(lo + i as u32);
    }
    // Backward part.
    let mut back_pf = 0;
    if a < i0 {
        back_pf = match sh.uffd.copy(host(a), &buf[a * PAGE_SIZE..i0 * PAGE_SIZE], false) {
            Ok(Fill::Done) => i0 - a,
            Ok(Fill::Partial { bytes }) => bytes as usize / PAGE_SIZE,
            _ => 0,
        };
        installed(t, a, back_pf);
        for i in a..a + back_pf {
            sh.set_prefetched(lo + i as u32);
        }
    }
    let prefetched = fwd_pf + back_pf;
    if pages_in > 0 {
        sh.victims.touched(page);
    }
    c.pages_in.fetch_add(pages_in as u64, Relaxed);
    c.prefetched.fetch_add(prefetched as u64, Relaxed);
    Ok((pages_in, prefetched))
}

/// Bring every page in the swap file back (runs of up to 256 slots per read).
pub(crate) fn swap_in_all(sh: &SwapState) -> Result<usize, SwapError> {
    const RUN: usize = 256;
    let mut buf = AlignedBuf::new(RUN * PAGE_SIZE);
    let mut total = 0usize;
    let mut poisoned = 0usize;
    let mut p = 0u32;
    while p < sh.pages {
        let mut t = sh.lock();
        // Next page with a slot.
        while p < sh.pages && (t.map[p as usize] == NO_SLOT || t.poisoned.contains(&p)) {
            if t.poisoned.contains(&p) {
                poisoned += 1;
            }
            p += 1;
        }
        if p >= sh.pages {
            break;
        }
        // Read from this page forward: a window that starts here (no look-back).
        let filled = if t.map[p as usize] == IN_CACHE {
            fill_from_cache(sh, &mut t, p, &mut buf).map(usize::from)
        } else {
            fill_from_slot_forward(sh, &mut t, p, &mut buf, RUN)
        };
        match filled {
            Ok(n) => {
                total += n;
                if t.map[p as usize] != NO_SLOT {
                    // Could not install it (mapping replaced by the VMM): move on.
                    p += 1;
                }
            }
            Err(msg) => {
                t.poisoned.insert(p);
                drop(t);
                log::error!("swapd: {}: {msg}", sh.name);
                sh.vm.fatal(format!("host swap: {msg}"));
                return Err(SwapError::Corrupt { what: msg });
            }
        }
    }
    if poisoned > 0 {
        return Err(SwapError::Corrupt { what: format!("{poisoned} pages have bad slots") });
    }
    Ok(total)
}

/// [`fill_from_slot`] with the window placed forward of `page`, counting every
/// installed page as swapped in (not prefetched).
fn fill_from_slot_forward(
    sh: &SwapState,
    t: &mut MutexGuard<'_, Table>,
    page: u32,
    buf: &mut AlignedBuf,
    window: usize,
) -> Result<usize, String> {
    // fill_from_slot looks back up to (window-1)/4 pages; pages before `page` have
    // no slot here (we scan forward), so the run starts at `page` anyway.
    let (i, pf) = fill_from_slot(sh, t, page, buf, window)?;
    let c = &sh.counters;
    c.prefetched.fetch_sub(pf as u64, Relaxed);
    c.pages_in.fetch_add(pf as u64, Relaxed);
    for q in page..(page + pf as u32 + 1).min(sh.pages) {
        sh.clear_prefetched(q);
    }
    Ok(i + pf)
}
