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

/// Sums the `field` (`Rss:`, `Pss:`, `Anonymous:`, ...) of the mappings of this
/// process that `select(start, end)` picks, in bytes.
pub fn smaps_sum(field: &str, select: impl Fn(usize, usize) -> bool) -> io::Result<u64> {
    let file = std::fs::File::open("/proc/self/smaps")?;
    let mut total = 0u64;
    let mut selected = false;
    for line in BufReader::new(file).lines() {
        let line = line?;
        if let Some(vma) = crate::maps::Vma::parse(&line) {
            selected = select(vma.start, vma.end);
            continue;
        }
        if selected {
            if let Some(kb) = line.strip_prefix(field) {
                total += kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0) * 1024;
            }
        }
    }
    Ok(total)
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
}
