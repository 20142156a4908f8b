//! Helpers for the unit tests: guest-RAM-like mappings and a pool-like memfd.

use crate::PAGE_SIZE;

/// Anonymous private memory mapped like guest RAM; unmapped on drop.
pub(crate) struct Mapping {
    pub(crate) addr: usize,
    pub(crate) len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.addr as *mut _, self.len) };
    }
}

/// `pages` pages of `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`, `MADV_NOHUGEPAGE`.
pub(crate) fn anon(pages: usize) -> Mapping {
    let len = pages * PAGE_SIZE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, -1, 0) };
    assert_ne!(addr, libc::MAP_FAILED);
    assert_eq!(unsafe { libc::madvise(addr, len, libc::MADV_NOHUGEPAGE) }, 0);
    Mapping { addr: addr as usize, len }
}

/// A memfd holding `content`.
pub(crate) fn memfd_with(content: &[u8]) -> i32 {
    let fd = unsafe { libc::memfd_create(c"test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    let n = unsafe { libc::pwrite(fd, content.as_ptr().cast(), content.len(), 0) };
    assert_eq!(n as usize, content.len());
    fd
}
