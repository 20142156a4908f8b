//! Anonymous private memory shaped like the VMM's guest RAM (4 KiB pages, not
//! reserved), and a memfd with given content shaped like page sharing's pool: what
//! the measurements of the host's limits and the reclaimers' tests run on when they
//! need real memory without a VM.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use crate::page::PAGE_SIZE;

/// Anonymous private memory (`MAP_NORESERVE`, `MADV_NOHUGEPAGE`), unmapped on drop.
pub struct AnonMap {
    addr: usize,
    len: usize,
}

impl AnonMap {
    /// Maps `len` bytes (rounded up to pages).
    pub fn new(len: usize) -> io::Result<AnonMap> {
        let len = len.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        // SAFETY: a fresh anonymous mapping; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: advice on the mapping just made; reclaim works on 4 KiB pages.
        unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
        Ok(AnonMap { addr: p as usize, len })
    }

    /// `pages` pages; panics if the host refuses (tests).
    pub fn pages(pages: usize) -> AnonMap {
        AnonMap::new(pages * PAGE_SIZE).expect("map anonymous memory")
    }

    /// Its first byte.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: lengths are rounded up to a page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        // SAFETY: our mapping, no longer used.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// A memfd holding `content`; panics if the host refuses (tests).
pub fn memfd_with(content: &[u8]) -> OwnedFd {
    // SAFETY: memfd_create with a valid name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: writes `content` (valid for its length) into our memfd.
    let n = unsafe { libc::pwrite(std::os::fd::AsRawFd::as_raw_fd(&fd), content.as_ptr().cast(), content.len(), 0) };
    assert_eq!(n as usize, content.len(), "pwrite to the memfd");
    fd
}
