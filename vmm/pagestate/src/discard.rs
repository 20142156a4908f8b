//! Dropping pages of this process's memory (`MADV_DONTNEED`): one range, or many
//! ranges per system call.
//!
//! On anonymous private memory a dropped page reads zeros next time and its memory
//! goes back to the host. On this host a discard costs microseconds per call even
//! with the VM paused, and random victims make one range per page, so the swapper
//! hands many ranges to one `process_madvise` (Linux 6.13+ accepts any advice on the
//! calling process itself), falling back to one `madvise` per range where the kernel
//! refuses.

use std::io;

/// Drops `[addr, addr + len)` (page aligned) with `MADV_DONTNEED`.
///
/// Only for memory whose content the caller owns and wants gone: on a private file
/// mapping the file's content comes back instead of zeros.
pub fn dontneed(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: madvise only changes what backs the range; the caller hands memory whose
    // content may be dropped.
    if unsafe { libc::madvise(addr as *mut _, len, libc::MADV_DONTNEED) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
    /// A discarder for this process (batched where the kernel allows it).
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
                let single = dontneed(a, l);
                if let (Some(e), true) = (batch_err, single.is_ok()) {
                    // process_madvise refuses what madvise accepts: use madvise.
                    log::debug!("process_madvise(MADV_DONTNEED) refused ({e}); one madvise per range");
                    self.batched.store(false, Relaxed);
                }
                out.push(single);
                i += 1;
                continue;
            }
            let (a, l) = ranges[i];
            out.push(dontneed(a, l));
            i += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anon::AnonMap;
    use crate::page::PAGE_SIZE;
    use crate::pagemap::{PageInfo, Pagemap};

    #[test]
    fn discard_many_ranges() {
        let pm = Pagemap::open().unwrap();
        let pages = 3000;
        let m = AnonMap::pages(pages);
        let base = m.addr();
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
        let mut e = vec![PageInfo::default(); pages];
        pm.read(base, &mut e).unwrap();
        for (p, e) in e.iter().enumerate() {
            assert_eq!(e.present(), p % 2 == 1, "page {p}");
        }
        assert!(d.batched(), "process_madvise(MADV_DONTNEED) on ourselves (Linux 6.13+)");
    }
}
