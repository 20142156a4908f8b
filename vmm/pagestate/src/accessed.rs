//! Did the guest read or write a page since a point in time? The method the active
//! memory sampler uses, measured on the PVM hosts (see `docs/policy.md`):
//!
//! 1. [`clear_refs`]: clear the referenced bit of every page of this process
//!    (`/proc/self/clear_refs`, value 1). It does not reach KVM: a guest page that KVM
//!    has mapped stays mapped and its later accesses set nothing.
//! 2. [`drop_kvm_mapping`] of each watched page: a write-protect and unprotect
//!    (`mprotect`) runs the MMU notifiers, so KVM forgets its mapping; the next guest
//!    access, read or write, faults into KVM, which takes the page again and marks it
//!    accessed. The VM must be paused around it: changing protections under running
//!    vCPUs can make `KVM_RUN` fail with `EFAULT` on PVM.
//! 3. At the end, [`KPageFlags::referenced`] of the page's frame (from the pagemap:
//!    needs `CAP_SYS_ADMIN`, without which PFNs read as 0).
//!
//! The order of 1 and 2 matters: re-faults that land before the clear are lost.
//! `clear_refs` is process-wide, so a caller that watches pages of several VMs reads
//! every watched page's bit before each clear (see the sampler). The flags of a page
//! mapped more than once (the zero page, page sharing's pool) are shared by every
//! mapper and say nothing about this guest page: leave such pages out.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

use crate::page::PAGE_SIZE;

/// `KPF_REFERENCED` in `/proc/kpageflags`.
const KPF_REFERENCED: u64 = 1 << 2;

/// Clears the referenced bits of every page of this process.
pub fn clear_refs() -> io::Result<()> {
    OpenOptions::new().write(true).open("/proc/self/clear_refs")?.write_all(b"1")
}

/// Makes KVM forget its mapping of the page at `host_addr` (page aligned, mapped
/// readable and writable, and not written by anyone meanwhile: the caller holds the
/// VM paused and its reclaimers out), leaving the page, its content and its
/// protection as they were.
pub fn drop_kvm_mapping(host_addr: usize) -> io::Result<()> {
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    for prot in [libc::PROT_READ, rw] {
        // SAFETY: changes only the protection of one page of guest RAM, which this
        // process mapped read-write and keeps mapped; the second call restores it.
        // Nothing of this process writes it in between (the caller's contract).
        if unsafe { libc::mprotect(host_addr as *mut libc::c_void, PAGE_SIZE, prot) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// An open `/proc/kpageflags`.
pub struct KPageFlags {
    file: File,
}

impl KPageFlags {
    /// Opens it (root only).
    pub fn open() -> io::Result<Self> {
        Ok(KPageFlags { file: File::open("/proc/kpageflags")? })
    }

    /// Whether frame `pfn` was referenced since the last [`clear_refs`].
    pub fn referenced(&self, pfn: u64) -> io::Result<bool> {
        let mut raw = [0u8; 8];
        self.file.read_exact_at(&mut raw, pfn * 8)?;
        Ok(u64::from_ne_bytes(raw) & KPF_REFERENCED != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anon::AnonMap;
    use crate::pagemap::Pagemap;

    #[test]
    fn the_clear_clears_and_the_protection_round_trip_keeps_the_page() {
        let map = AnonMap::pages(1);
        let a = map.addr();
        // SAFETY: the page is ours, mapped read-write.
        unsafe { (a as *mut u8).write_volatile(7) };
        let pagemap = Pagemap::open().unwrap();
        let pfn = pagemap.one(a).unwrap().pfn();
        assert!(pfn != 0, "these tests run as root: PFNs are visible");
        drop_kvm_mapping(a).unwrap();
        assert_eq!(pagemap.one(a).unwrap().pfn(), pfn, "the same frame stays mapped");
        clear_refs().unwrap();
        assert!(!KPageFlags::open().unwrap().referenced(pfn).unwrap());
        // SAFETY: as above; still mapped read-write.
        unsafe { (a as *mut u8).write_volatile(8) };
        // SAFETY: as above.
        assert_eq!(unsafe { (a as *const u8).read_volatile() }, 8);
    }
}
