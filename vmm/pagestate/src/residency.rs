//! What is resident: `mincore` over a range, and `smaps` sums per mapping and for the
//! whole process.
//!
//! `mincore` counts a page that has *anything* behind it (the shared zero page
//! included): it is how the balloon notices a page the guest touched after giving it
//! away. `smaps` gives proportional figures (`Pss`): a page shared by N guest pages
//! (page sharing, KSM) counts once in all, not N times as in `Rss`, which is what
//! "host memory used by guest RAM" must mean once pages are shared.

use std::io::{self, BufRead, BufReader};

use crate::page::PAGE_SIZE;

/// Pages of `[addr, addr + len)` (page aligned, mapped) with memory behind them.
pub fn resident_pages(addr: usize, len: usize) -> io::Result<u64> {
    let mut vec = vec![0u8; len.div_ceil(PAGE_SIZE)];
    // SAFETY: `vec` has one byte per page of the range; mincore only reads the page
    // tables of this process.
    if unsafe { libc::mincore(addr as *mut _, len, vec.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(vec.iter().filter(|&&b| b & 1 != 0).count() as u64)
}

/// Whether every page of `[addr, addr + len)` is mapped (a failed `MAP_FIXED` can
/// leave a hole: `mincore` fails with `ENOMEM` there).
pub fn is_mapped(addr: usize, len: usize) -> bool {
    resident_pages(addr, len).is_ok()
}

/// Reads of `smaps` that may start again before one that is taken as it is.
const SMAPS_READS: usize = 4;

/// Sums the `field` (`Rss:`, `Pss:`, `Anonymous:`, ...) of the mappings of this
/// process that `select(start, end)` picks, in bytes.
///
/// The kernel hands `smaps` out a few mappings per read and resumes at the address
/// where it stopped: a mapping that was split there (an `mprotect` of one page, as
/// the active sampler does) and merged again in between comes out a second time,
/// whole. A read that goes back in addresses is read again; if every read does,
/// the last counts each mapping only from where the one before it ended (its field
/// scaled to that part), so the sum never exceeds what is mapped.
pub fn smaps_sum(field: &str, select: impl Fn(usize, usize) -> bool) -> io::Result<u64> {
    let mut read = 0;
    loop {
        read += 1;
        let (total, went_back) = smaps_sum_once(field, &select, read == SMAPS_READS)?;
        if !went_back || read == SMAPS_READS {
            return Ok(total);
        }
    }
}

/// One read of `smaps` for [`smaps_sum`]: the sum, and whether a mapping began
/// below the end of the one before; with `clip`, such a mapping counts only above.
fn smaps_sum_once(field: &str, select: impl Fn(usize, usize) -> bool, clip: bool) -> io::Result<(u64, bool)> {
    let file = std::fs::File::open("/proc/self/smaps")?;
    let mut total = 0u64;
    let (mut went_back, mut last_end) = (false, 0usize);
    // The share of the current mapping to count (1 but for a clipped one).
    let mut share: Option<f64> = None;
    for line in BufReader::new(file).lines() {
        let line = line?;
        if let Some(vma) = crate::maps::Vma::parse(&line) {
            let start = if vma.start < last_end {
                went_back = true;
                if clip {
                    last_end.min(vma.end)
                } else {
                    vma.start
                }
            } else {
                vma.start
            };
            share = select(vma.start, vma.end).then(|| (vma.end - start) as f64 / (vma.end - vma.start) as f64);
            last_end = last_end.max(vma.end);
            continue;
        }
        if let (Some(share), Some(kb)) = (share, line.strip_prefix(field)) {
            let bytes = kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0) * 1024;
            total += (bytes as f64 * share) as u64;
        }
    }
    Ok((total, went_back))
}

/// Resident memory of the whole process in bytes: `Pss` of `/proc/self/smaps_rollup`
/// (`VmRSS` would count a shared guest page once per mapping); 0 if unreadable.
pub fn process_rss() -> u64 {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anon::AnonMap;

    #[test]
    fn residency_follows_touches_and_holes_are_seen() {
        let m = AnonMap::pages(8);
        assert_eq!(resident_pages(m.addr(), m.len()).unwrap(), 0);
        for p in [0, 3, 4] {
            // SAFETY: a page of the test mapping.
            unsafe { ((m.addr() + p * PAGE_SIZE) as *mut u8).write_volatile(1) };
        }
        assert_eq!(resident_pages(m.addr(), m.len()).unwrap(), 3);
        let inside = |s: usize, e: usize| s >= m.addr() && e <= m.addr() + m.len();
        assert_eq!(smaps_sum("Rss:", inside).unwrap(), 3 * PAGE_SIZE as u64);
        assert!(process_rss() >= 3 * PAGE_SIZE as u64);
        // SAFETY: unmaps a page of our own test mapping.
        unsafe { libc::munmap((m.addr() + PAGE_SIZE) as *mut _, PAGE_SIZE) };
        assert!(!is_mapped(m.addr(), m.len()));
        assert!(is_mapped(m.addr(), PAGE_SIZE));
    }

    #[test]
    fn sums_never_count_a_mapping_twice_while_it_splits_and_merges() {
        // What the active sampler does to guest RAM: a page's protection changed
        // and restored, splitting the mapping in three and merging it back, while
        // another thread reads smaps.
        let pages = 4096;
        let m = AnonMap::pages(pages);
        for p in 0..pages {
            // SAFETY: a page of the test mapping.
            unsafe { ((m.addr() + p * PAGE_SIZE) as *mut u8).write_volatile(1) };
        }
        let (addr, len) = (m.addr(), m.len());
        // The kernel hands smaps out a few mappings per read; read-only pages in
        // front make mappings of their own, so that the reads end at every piece.
        // The last page read-only too: the mapping then never joins one that a test
        // running beside this one maps next to it.
        for p in (0..64).step_by(2).chain([pages - 1]) {
            // SAFETY: only the protection of a page of the test mapping changes.
            assert_eq!(unsafe { libc::mprotect((addr + p * PAGE_SIZE) as *mut _, PAGE_SIZE, libc::PROT_READ) }, 0);
        }
        let stop = std::sync::atomic::AtomicBool::new(false);
        let most = std::thread::scope(|s| {
            s.spawn(|| {
                let mut p = 1;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    p = (p * 7 + 13) % (pages - 66) + 65;
                    crate::accessed::drop_kvm_mapping(addr + p * PAGE_SIZE).unwrap();
                    // Room for the reader to take the mapping lock.
                    std::thread::sleep(std::time::Duration::from_micros(20));
                }
            });
            let inside = |s: usize, e: usize| s >= addr && e <= addr + len;
            let sums: io::Result<Vec<u64>> = (0..500).map(|_| smaps_sum("Rss:", inside)).collect();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            sums.unwrap().into_iter().max().unwrap()
        });
        assert!(most <= len as u64, "{} KiB resident of a {} KiB mapping", most >> 10, len >> 10);
        // Once the mapping holds still, the sum is all of it.
        assert!(smaps_sum("Rss:", |s, e| s >= addr && e <= addr + len).unwrap() == len as u64);
    }
}
