//! `/proc/self/pagemap`: which guest pages are resident, and what backs them.
//!
//! The scanner reads this before touching a page so that it never faults memory in
//! (a never-touched or swapped-out page is skipped), and to tell the cases it cares
//! about apart: a private anonymous page (a candidate), the shared zero page (already
//! free), a page of the pool (still shared) and a private copy of a pool page (a
//! broken share). One 8-byte entry per page; reading 512 entries is one `pread`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::PAGE_SIZE;

const PRESENT: u64 = 1 << 63;
/// File page or shared anonymous page (set for the pool's page-cache pages).
const FILE: u64 = 1 << 61;
/// The page is mapped exactly once (clear for the shared zero page).
const EXCLUSIVE: u64 = 1 << 56;

/// One pagemap entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PageInfo(pub(crate) u64);

/// What a virtual page is backed by, as far as page sharing is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backing {
    /// Not resident (never touched, dropped, or swapped): never read it.
    Absent,
    /// Anonymous and mapped more than once: the shared zero page (a read of a dropped
    /// page), or a page shared with a forked child. Nothing to gain.
    AnonShared,
    /// A private anonymous page mapped only here: a candidate for sharing.
    Anon,
    /// A page of a file: in guest RAM, a pool page still shared.
    File,
}

impl PageInfo {
    pub(crate) fn present(self) -> bool {
        self.0 & PRESENT != 0
    }

    pub(crate) fn backing(self) -> Backing {
        if !self.present() {
            Backing::Absent
        } else if self.0 & FILE != 0 {
            Backing::File
        } else if self.0 & EXCLUSIVE != 0 {
            Backing::Anon
        } else {
            Backing::AnonShared
        }
    }

    /// Physical frame number (0 unless the process has CAP_SYS_ADMIN).
    #[cfg(test)]
    pub(crate) fn pfn(self) -> u64 {
        if self.present() {
            self.0 & ((1 << 55) - 1)
        } else {
            0
        }
    }
}

/// An open `/proc/self/pagemap`.
pub(crate) struct PageMap {
    file: File,
}

impl PageMap {
    pub(crate) fn open() -> io::Result<Self> {
        Ok(Self { file: File::open("/proc/self/pagemap")? })
    }

    /// Fills `out` with the entries of the `out.len()` pages starting at `addr`
    /// (page aligned). Unmapped pages read as not present.
    pub(crate) fn read(&self, addr: usize, out: &mut [PageInfo]) -> io::Result<()> {
        let mut raw = [0u8; 8 * 64];
        let mut done = 0;
        while done < out.len() {
            let n = (out.len() - done).min(64);
            let offset = ((addr / PAGE_SIZE + done) * 8) as u64;
            let bytes = &mut raw[..n * 8];
            self.file.read_exact_at(bytes, offset)?;
            for (i, e) in bytes.chunks_exact(8).enumerate() {
                out[done + i] = PageInfo(u64::from_ne_bytes(e.try_into().expect("8 bytes")));
            }
            done += n;
        }
        Ok(())
    }

    /// The entry of one page.
    pub(crate) fn one(&self, addr: usize) -> io::Result<PageInfo> {
        let mut e = [PageInfo::default()];
        self.read(addr, &mut e)?;
        Ok(e[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{anon, memfd_with};

    #[test]
    fn tells_backings_apart() {
        let pm = PageMap::open().unwrap();
        let m = anon(4);
        let p = |i: usize| m.addr + i * PAGE_SIZE;
        // 0: never touched; 1: written; 2: only read (shared zero page).
        unsafe {
            (p(1) as *mut u8).write_volatile(7);
            let _ = (p(2) as *const u8).read_volatile();
        }
        let mut e = [PageInfo::default(); 4];
        pm.read(m.addr, &mut e).unwrap();
        assert_eq!(e[0].backing(), Backing::Absent);
        assert_eq!(e[1].backing(), Backing::Anon);
        assert_eq!(e[2].backing(), Backing::AnonShared);
        assert_eq!(pm.one(p(1)).unwrap(), e[1]);
        if e[1].pfn() != 0 {
            assert_ne!(e[1].pfn(), e[2].pfn(), "root: PFNs are shown");
        }
    }

    #[test]
    fn pool_page_then_private_copy() {
        let pm = PageMap::open().unwrap();
        let fd = memfd_with(&[3u8; PAGE_SIZE]);
        let m = anon(1);
        unsafe {
            let r = libc::mmap(
                m.addr as *mut _,
                PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                fd,
                0,
            );
            assert_eq!(r as usize, m.addr);
            assert_eq!((m.addr as *const u8).read_volatile(), 3);
            assert_eq!(pm.one(m.addr).unwrap().backing(), Backing::File);
            (m.addr as *mut u8).write_volatile(4);
            libc::close(fd);
        }
        assert_eq!(pm.one(m.addr).unwrap().backing(), Backing::Anon, "a write broke the share");
    }
}
