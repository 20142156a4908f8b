//! What the kernel says about our own pages: `/proc/self/pagemap` entries and the
//! anonymous mappings of `/proc/self/maps`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::file::PAGE_SIZE;

/// Page present in RAM.
pub const PM_PRESENT: u64 = 1 << 63;
/// Page in (system) swap.
pub const PM_SWAP: u64 = 1 << 62;
/// Page is a file page or shared anonymous (e.g. a page-sharing pool page).
pub const PM_FILE: u64 = 1 << 61;
/// Page is mapped exactly once (not KSM-merged, not shared with a fork).
pub const PM_EXCLUSIVE: u64 = 1 << 56;
/// PFN bits (zero unless the reader has CAP_SYS_ADMIN).
pub const PM_PFN: u64 = (1 << 55) - 1;

/// `/proc/self/pagemap`, open.
pub struct Pagemap {
    f: File,
}

impl Pagemap {
    pub fn open() -> io::Result<Pagemap> {
        Ok(Pagemap { f: File::open("/proc/self/pagemap")? })
    }

    /// Entries of `out.len()` consecutive pages from host address `addr`.
    pub fn read(&self, addr: usize, out: &mut [u64]) -> io::Result<()> {
        let mut bytes = vec![0u8; out.len() * 8];
        let off = (addr / PAGE_SIZE) as u64 * 8;
        let mut done = 0;
        while done < bytes.len() {
            let n = self.f.read_at(&mut bytes[done..], off + done as u64)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short pagemap read"));
            }
            done += n;
        }
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
            *o = u64::from_ne_bytes(c.try_into().unwrap());
        }
        Ok(())
    }

    /// The PFN of the shared zero page (0 when PFNs are hidden from us): a page
    /// mapped to it holds no memory and needs no eviction.
    pub fn zero_pfn(&self) -> u64 {
        // SAFETY: a fresh private anonymous page, read once, unmapped below.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                return 0;
            }
            std::ptr::read_volatile(p as *const u8);
            let mut e = [0u64];
            let r = self.read(p as usize, &mut e);
            libc::munmap(p, PAGE_SIZE);
            match r {
                Ok(()) if e[0] & PM_PRESENT != 0 => e[0] & PM_PFN,
                _ => 0,
            }
        }
    }
}

/// Discards ranges of this process's memory with `MADV_DONTNEED`: up to 1024
/// ranges per `process_madvise` call (Linux 6.13+ accepts any advice on the calling
/// process itself), one `madvise` per range where that is refused. On this host a
/// discard costs microseconds per call even with the VM paused: random victims
/// make one range per page, so batching the calls matters.
pub struct Discarder {
    pidfd: Option<std::os::fd::OwnedFd>,
    batched: std::sync::atomic::AtomicBool,
}

impl Default for Discarder {
    fn default() -> Self {
        Discarder::new()
    }
}

impl Discarder {
    pub fn new() -> Discarder {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscall; a non-negative result is a new descriptor we own.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
        // SAFETY: see above.
        let pidfd = (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) });
        let batched = std::sync::atomic::AtomicBool::new(pidfd.is_some());
        Discarder { pidfd, batched }
    }

    /// Whether ranges are discarded many per system call.
    pub fn batched(&self) -> bool {
        self.batched.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn one(addr: usize, len: usize) -> io::Result<()> {
        // SAFETY: the caller hands ranges of memory whose content may be dropped.
        if unsafe { libc::madvise(addr as *mut _, len, libc::MADV_DONTNEED) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Discard each `(addr, len)`; the result of each range, in order.
    pub fn discard(&self, ranges: &[(usize, usize)]) -> Vec<io::Result<()>> {
        use std::os::fd::AsRawFd;
        use std::sync::atomic::Ordering::Relaxed;
        let mut out: Vec<io::Result<()>> = Vec::with_capacity(ranges.len());
        let mut i = 0;
        while i < ranges.len() {
            if let (true, Some(pidfd)) = (self.batched.load(Relaxed), &self.pidfd) {
                let chunk = &ranges[i..ranges.len().min(i + 1024)];
                let iov: Vec<libc::iovec> =
                    chunk.iter().map(|&(a, l)| libc::iovec { iov_base: a as *mut _, iov_len: l }).collect();
                // SAFETY: iov is valid for the call; the ranges may be discarded.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_process_madvise,
                        pidfd.as_raw_fd(),
                        iov.as_ptr(),
                        iov.len(),
                        libc::MADV_DONTNEED,
                        0,
                    )
                };
                if r >= 0 {
                    let mut bytes = r as usize;
                    let mut done = 0;
                    for &(_, l) in chunk {
                        if bytes < l {
                            break;
                        }
                        bytes -= l;
                        done += 1;
                    }
                    out.extend((0..done).map(|_| Ok(())));
                    i += done;
                    if done == chunk.len() {
                        continue;
                    }
                }
                // Refused, or stopped at range i: try that range alone.
                let batch_err = (r < 0).then(io::Error::last_os_error);
                let (a, l) = ranges[i];
                let single = Discarder::one(a, l);
                if let (Some(e), true) = (batch_err, single.is_ok()) {
                    // process_madvise refuses what madvise accepts: use madvise.
                    log::debug!("swapd: process_madvise(MADV_DONTNEED) refused ({e}); one madvise per range");
                    self.batched.store(false, Relaxed);
                }
                out.push(single);
                i += 1;
                continue;
            }
            let (a, l) = ranges[i];
            out.push(Discarder::one(a, l));
            i += 1;
        }
        out
    }
}

/// Private writable anonymous mappings (no backing file) of this process that
/// overlap `[lo, hi)`, as sorted `(start, end)` ranges. Only pages inside these
/// may be discarded by eviction: `MADV_DONTNEED` on a private file mapping (a page
/// remapped by page sharing) would bring back the file's content instead of
/// faulting, and the page would silently lose its data.
pub fn anon_ranges(lo: usize, hi: usize) -> io::Result<Vec<(usize, usize)>> {
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    Ok(parse_anon_ranges(&maps, lo, hi))
}

/// The parsing part of [`anon_ranges`].
pub fn parse_anon_ranges(maps: &str, lo: usize, hi: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for line in maps.lines() {
        let mut it = line.split_whitespace();
        let (Some(range), Some(perms), Some(_off), Some(_dev), Some(inode)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            continue;
        };
        let path = it.next().unwrap_or("");
        let Some((s, e)) = range.split_once('-') else { continue };
        let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16)) else {
            continue;
        };
        if e <= lo || s >= hi {
            continue;
        }
        let pb = perms.as_bytes();
        let anon = inode == "0" && (path.is_empty() || path.starts_with("[anon:"));
        if pb.len() >= 4 && pb[0] == b'r' && pb[1] == b'w' && pb[3] == b'p' && anon {
            // Adjacent VMAs (split by registration, say) are merged into one range.
            match out.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => out.push((s, e)),
            }
        }
    }
    out
}

/// Whether `addr` lies in one of the sorted ranges.
pub fn in_ranges(ranges: &[(usize, usize)], addr: usize) -> bool {
    let i = ranges.partition_point(|r| r.1 <= addr);
    i < ranges.len() && ranges[i].0 <= addr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_maps() {
        let maps = "\
1000-3000 rw-p 00000000 00:00 0 \n\
3000-5000 rw-p 00000000 00:00 0 \n\
5000-6000 rw-p 00000000 00:05 1234 /memfd:tps-pool (deleted)\n\
6000-8000 rw-p 00000000 00:00 0 [anon:guest]\n\
8000-9000 r--p 00000000 00:00 0 \n\
9000-a000 rw-s 00000000 00:00 0 \n\
a000-b000 rw-p 00000000 00:00 0 [heap]\n";
        let r = parse_anon_ranges(maps, 0x2000, 0xb000);
        assert_eq!(r, vec![(0x1000, 0x5000), (0x6000, 0x8000)]);
        assert!(in_ranges(&r, 0x1000));
        assert!(in_ranges(&r, 0x4fff));
        assert!(!in_ranges(&r, 0x5000));
        assert!(in_ranges(&r, 0x7000));
        assert!(!in_ranges(&r, 0x8000));
        assert!(!in_ranges(&r, 0x0));
    }

    #[test]
    fn discard_many_ranges() {
        let pm = Pagemap::open().unwrap();
        let pages = 3000;
        // SAFETY: fresh mapping, unmapped at the end.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as usize;
        for p in 0..pages {
            // SAFETY: inside the mapping.
            unsafe { std::ptr::write_volatile((base + p * PAGE_SIZE) as *mut u8, 1) };
        }
        let d = Discarder::new();
        // Every other page: 1500 ranges (two process_madvise calls), and one bad range.
        let mut ranges: Vec<(usize, usize)> =
            (0..pages).step_by(2).map(|p| (base + p * PAGE_SIZE, PAGE_SIZE)).collect();
        ranges.insert(700, (base + 1, PAGE_SIZE));
        let res = d.discard(&ranges);
        assert_eq!(res.len(), ranges.len());
        assert!(res[700].is_err());
        assert!(res.iter().enumerate().all(|(i, r)| i == 700 || r.is_ok()));
        let mut e = vec![0u64; pages];
        pm.read(base, &mut e).unwrap();
        for (p, e) in e.iter().enumerate() {
            assert_eq!(e & PM_PRESENT != 0, p % 2 == 1, "page {p}");
        }
        assert!(d.batched(), "process_madvise(MADV_DONTNEED) on ourselves (Linux 6.13+)");
        // SAFETY: our mapping.
        unsafe { libc::munmap(base as *mut _, pages * PAGE_SIZE) };
    }

    #[test]
    fn pagemap_sees_presence() {
        let pm = Pagemap::open().unwrap();
        let mut v = vec![0u8; 3 * PAGE_SIZE];
        let base = (v.as_mut_ptr() as usize).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        // SAFETY: inside v.
        unsafe { std::ptr::write_volatile(base as *mut u8, 1) };
        let mut e = [0u64; 1];
        pm.read(base, &mut e).unwrap();
        assert!(e[0] & PM_PRESENT != 0);
        assert!(e[0] & PM_EXCLUSIVE != 0);
        let _ = pm.zero_pfn();
    }
}
