//! `/proc/self/pagemap`: what backs each page of this process, without touching it.
//!
//! Reclaimers read this before they touch a guest page, so that they never fault
//! memory in (a never-touched, dropped or evicted page is not present), and to tell
//! apart what they care about: a private anonymous page (the only kind worth sharing,
//! evicting or sampling), the shared zero page (already free), a page of a file (page
//! sharing's pool) and a page mapped more than once. One 8-byte entry per page; 64
//! entries are one `pread`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::page::PAGE_SIZE;

const PRESENT: u64 = 1 << 63;
/// File page or shared anonymous page (set for page sharing's pool pages).
const FILE: u64 = 1 << 61;
/// The page is mapped exactly once (clear for the shared zero page, KSM and fork).
const EXCLUSIVE: u64 = 1 << 56;
/// Page frame number bits (zero unless the reader has `CAP_SYS_ADMIN`).
const PFN: u64 = (1 << 55) - 1;

/// One pagemap entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageInfo(pub u64);

/// What a virtual page is backed by, as far as reclaim is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Not resident (never touched, dropped, or evicted): never read it.
    Absent,
    /// Anonymous and mapped more than once: the shared zero page (a read of a dropped
    /// page), a KSM page, or a page shared with a forked child. Nothing to gain.
    AnonShared,
    /// A private anonymous page mapped only here: what reclaim works on.
    Anon,
    /// A page of a file: in guest RAM, a page-sharing pool page still shared.
    File,
}

impl PageInfo {
    /// The page is resident.
    pub fn present(self) -> bool {
        self.0 & PRESENT != 0
    }

    /// What backs it.
    pub fn backing(self) -> Backing {
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

    /// Physical frame number: 0 unless the page is present and the process has
    /// `CAP_SYS_ADMIN`.
    pub fn pfn(self) -> u64 {
        if self.present() {
            self.0 & PFN
        } else {
            0
        }
    }
}

/// How the pages of a range are backed, counted ([`Pagemap::census`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Census {
    /// Resident in a page of its own (private anonymous).
    pub private: u64,
    /// Resident in a page mapped elsewhere too: page sharing's pool (a file page) or
    /// another shared anonymous page (KSM).
    pub shared: u64,
    /// Mapped to the shared zero page (a read of a page never written or dropped);
    /// counted as `shared` when page frame numbers are hidden (no `CAP_SYS_ADMIN`).
    pub zero: u64,
    /// Not resident: never touched, dropped (zero pages page sharing freed, the
    /// balloon's), or evicted to swap.
    pub absent: u64,
}

/// An open `/proc/self/pagemap`.
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Opens the pagemap of this process.
    pub fn open() -> io::Result<Self> {
        Ok(Self { file: File::open("/proc/self/pagemap")? })
    }

    /// Fills `out` with the entries of the `out.len()` pages from `addr` (page
    /// aligned). Unmapped pages read as not present.
    pub fn read(&self, addr: usize, out: &mut [PageInfo]) -> io::Result<()> {
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

    /// Counts how the `pages` pages from `addr` are backed; `zero_pfn` is
    /// [`Pagemap::zero_pfn`]. Reads 512 entries per call and touches no page.
    pub fn census(&self, addr: usize, pages: usize, zero_pfn: u64) -> io::Result<Census> {
        let mut buf = [PageInfo::default(); 512];
        let mut c = Census::default();
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(buf.len());
            self.read(addr + done * PAGE_SIZE, &mut buf[..n])?;
            for e in &buf[..n] {
                match e.backing() {
                    Backing::Absent => c.absent += 1,
                    Backing::Anon => c.private += 1,
                    Backing::AnonShared if zero_pfn != 0 && e.pfn() == zero_pfn => c.zero += 1,
                    Backing::AnonShared | Backing::File => c.shared += 1,
                }
            }
            done += n;
        }
        Ok(c)
    }

    /// The entry of one page.
    pub fn one(&self, addr: usize) -> io::Result<PageInfo> {
        let mut e = [PageInfo::default()];
        self.read(addr, &mut e)?;
        Ok(e[0])
    }

    /// The PFN of the shared zero page (0 when PFNs are hidden from this process): a
    /// page mapped to it holds no memory of its own.
    pub fn zero_pfn(&self) -> u64 {
        // SAFETY: a fresh private anonymous page of our own, unmapped below.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), PAGE_SIZE, libc::PROT_READ, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        if p == libc::MAP_FAILED {
            return 0;
        }
        // SAFETY: `p` is the readable page mapped above; reading maps the zero page.
        unsafe { std::ptr::read_volatile(p as *const u8) };
        let entry = self.one(p as usize);
        // SAFETY: unmaps the page mapped above, which nothing else refers to.
        unsafe { libc::munmap(p, PAGE_SIZE) };
        entry.map_or(0, PageInfo::pfn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_census_counts_each_kind() {
        let map = crate::anon::AnonMap::pages(4);
        let base = map.addr();
        // SAFETY: pages of our own, mapped read-write: write one, read another (the
        // zero page), leave two untouched.
        unsafe {
            (base as *mut u8).write_volatile(1);
            ((base + PAGE_SIZE) as *const u8).read_volatile();
        }
        let pm = Pagemap::open().unwrap();
        let c = pm.census(base, 4, pm.zero_pfn()).unwrap();
        assert_eq!(c, Census { private: 1, shared: 0, zero: 1, absent: 2 });
    }
    use std::os::fd::AsRawFd;

    use crate::anon::{memfd_with, AnonMap};

    #[test]
    fn tells_backings_apart() {
        let pm = Pagemap::open().unwrap();
        let m = AnonMap::pages(4);
        let p = |i: usize| m.addr() + i * PAGE_SIZE;
        // 0: never touched; 1: written; 2: only read (shared zero page).
        // SAFETY: pages of the test mapping.
        unsafe {
            (p(1) as *mut u8).write_volatile(7);
            let _ = (p(2) as *const u8).read_volatile();
        }
        let mut e = [PageInfo::default(); 4];
        pm.read(m.addr(), &mut e).unwrap();
        assert_eq!(e[0].backing(), Backing::Absent);
        assert_eq!(e[1].backing(), Backing::Anon);
        assert_eq!(e[2].backing(), Backing::AnonShared);
        assert_eq!(pm.one(p(1)).unwrap(), e[1]);
        if e[1].pfn() != 0 {
            assert_ne!(e[1].pfn(), e[2].pfn(), "root: PFNs are shown");
            assert_eq!(e[2].pfn(), pm.zero_pfn(), "a read of a fresh page maps the zero page");
        }
    }

    #[test]
    fn pool_page_then_private_copy() {
        let pm = Pagemap::open().unwrap();
        let fd = memfd_with(&[3u8; PAGE_SIZE]);
        let m = AnonMap::pages(1);
        let a = m.addr();
        // SAFETY: maps the memfd over the test mapping's page, then reads and writes it.
        unsafe {
            let prot = libc::PROT_READ | libc::PROT_WRITE;
            let r = libc::mmap(a as *mut _, PAGE_SIZE, prot, libc::MAP_PRIVATE | libc::MAP_FIXED, fd.as_raw_fd(), 0);
            assert_eq!(r as usize, a);
            assert_eq!((a as *const u8).read_volatile(), 3);
            assert_eq!(pm.one(a).unwrap().backing(), Backing::File);
            (a as *mut u8).write_volatile(4);
        }
        assert_eq!(pm.one(a).unwrap().backing(), Backing::Anon, "a write broke the share");
    }
}
