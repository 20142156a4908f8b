//! `/proc/self/maps`: the mappings (VMAs) of this process.
//!
//! Guest RAM starts as one private anonymous mapping per region; page sharing replaces
//! pages of it with private mappings of its pool file, splitting it into many VMAs.
//! Two facts follow that reclaimers read here:
//! - which parts of guest RAM are still **private anonymous** memory: only there does
//!   `MADV_DONTNEED` make a page read zeros (in a private file mapping it brings the
//!   file's content back), and only there may the swapper fill missing pages;
//! - **how many VMAs** the process has, and how many of them lie in guest RAM: the
//!   kernel refuses new mappings beyond `vm.max_map_count`.

use std::io;

/// One line of `/proc/self/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vma {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
    /// Readable, writable and private (copy-on-write).
    pub private_rw: bool,
    /// No file behind it (inode 0, no path, or a `[anon:...]` name).
    pub anonymous: bool,
}

impl Vma {
    /// Parses one line; None for a line that is not a mapping.
    pub fn parse(line: &str) -> Option<Vma> {
        let mut it = line.split_whitespace();
        let (start, end) = it.next()?.split_once('-')?;
        let (start, end) = (usize::from_str_radix(start, 16).ok()?, usize::from_str_radix(end, 16).ok()?);
        let perms = it.next().unwrap_or("").as_bytes();
        let (_offset, _dev) = (it.next(), it.next());
        let inode = it.next().unwrap_or("");
        let path = it.next().unwrap_or("");
        Some(Vma {
            start,
            end,
            private_rw: perms.len() >= 4 && perms[0] == b'r' && perms[1] == b'w' && perms[3] == b'p',
            anonymous: inode == "0" && (path.is_empty() || path.starts_with("[anon:")),
        })
    }
}

/// Every mapping of this process, in address order.
pub fn read_vmas() -> io::Result<Vec<Vma>> {
    Ok(std::fs::read_to_string("/proc/self/maps")?.lines().filter_map(Vma::parse).collect())
}

/// The private, writable, anonymous mappings of this process that overlap `[lo, hi)`,
/// as sorted `(start, end)` ranges, adjacent ones merged. Only pages inside these may
/// be discarded or filled by a reclaimer.
pub fn anon_ranges(lo: usize, hi: usize) -> io::Result<Vec<(usize, usize)>> {
    Ok(anon_ranges_of(&std::fs::read_to_string("/proc/self/maps")?, lo, hi))
}

/// [`anon_ranges`] of a maps text.
pub fn anon_ranges_of(maps: &str, lo: usize, hi: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for v in maps.lines().filter_map(Vma::parse) {
        if v.end <= lo || v.start >= hi || !(v.private_rw && v.anonymous) {
            continue;
        }
        // Adjacent VMAs (split by a registration or an madvise, say) make one range.
        match out.last_mut() {
            Some(last) if last.1 == v.start => last.1 = v.end,
            _ => out.push((v.start, v.end)),
        }
    }
    out
}

/// Whether `addr` lies in one of the sorted, disjoint `ranges`.
pub fn in_ranges(ranges: &[(usize, usize)], addr: usize) -> bool {
    let i = ranges.partition_point(|r| r.1 <= addr);
    i < ranges.len() && ranges[i].0 <= addr
}

/// VMAs of this process, and how many of them overlap `ranges` (sorted, disjoint).
pub fn count_vmas(ranges: &[(usize, usize)]) -> io::Result<(usize, usize)> {
    let (mut total, mut inside) = (0, 0);
    for v in read_vmas()? {
        total += 1;
        let first = ranges.partition_point(|&(_, end)| end <= v.start);
        inside += ranges[first..].iter().take_while(|&&(start, _)| start < v.end).count();
    }
    Ok((total, inside))
}

/// The kernel's limit on VMAs per process (`vm.max_map_count`).
pub fn max_map_count() -> usize {
    std::fs::read_to_string("/proc/sys/vm/max_map_count").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(65530)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anon::AnonMap;
    use crate::page::PAGE_SIZE;

    #[test]
    fn anonymous_ranges_of_a_maps_text() {
        let maps = "\
1000-3000 rw-p 00000000 00:00 0 \n\
3000-5000 rw-p 00000000 00:00 0 \n\
5000-6000 rw-p 00000000 00:05 1234 /memfd:tps-pool (deleted)\n\
6000-8000 rw-p 00000000 00:00 0 [anon:guest]\n\
8000-9000 r--p 00000000 00:00 0 \n\
9000-a000 rw-s 00000000 00:00 0 \n\
a000-b000 rw-p 00000000 00:00 0 [heap]\n";
        let r = anon_ranges_of(maps, 0x2000, 0xb000);
        assert_eq!(r, vec![(0x1000, 0x5000), (0x6000, 0x8000)]);
        assert!(in_ranges(&r, 0x1000));
        assert!(in_ranges(&r, 0x4fff));
        assert!(!in_ranges(&r, 0x5000));
        assert!(in_ranges(&r, 0x7000));
        assert!(!in_ranges(&r, 0x8000));
        assert!(!in_ranges(&r, 0x0));
        assert_eq!(Vma::parse("7f00-7f80 rw-p 0 0:0 0").map(|v| (v.start, v.end)), Some((0x7f00, 0x7f80)));
        assert_eq!(Vma::parse("not a mapping"), None);
    }

    #[test]
    fn vmas_are_counted_per_range() {
        let (a, b) = (AnonMap::pages(4), AnonMap::pages(4));
        // SAFETY: changes the protection of a page of our own test mapping.
        unsafe { libc::mprotect((a.addr() + PAGE_SIZE) as *mut _, PAGE_SIZE, libc::PROT_READ) };
        assert_eq!(count_vmas(&[(a.addr(), a.addr() + a.len())]).unwrap().1, 3);
        let mut ranges = [(a.addr(), a.addr() + a.len()), (b.addr(), b.addr() + b.len())];
        ranges.sort();
        let (total, inside) = count_vmas(&ranges).unwrap();
        assert!(total > inside && inside >= 4, "{total} {inside}");
        assert_eq!(count_vmas(&[]).unwrap().1, 0);
        assert!(max_map_count() > 0);
        let anon = anon_ranges(a.addr(), a.addr() + a.len()).unwrap();
        assert!(in_ranges(&anon, a.addr()) && !in_ranges(&anon, a.addr() + PAGE_SIZE), "{anon:x?}");
    }
}
