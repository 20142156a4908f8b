//! Real memory without a VM, for the measurements of the host's limits and the
//! reclaimers' own tests: anonymous private memory shaped like the VMM's guest RAM
//! (4 KiB pages, not reserved), a memfd shaped like page sharing's pool, and
//! [`MemoryVm`], a [`GuestVm`] over such memory with a real pause and no vCPUs.

use std::collections::HashSet;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use crate::changes::RamChanges;
use crate::guest::{GuestVm, Region};
use crate::page::PAGE_SIZE;
use crate::pause::RunControl;

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

/// A VM with no vCPUs over memory of this process, as a reclaimer sees it. Its pause is
/// a real [`RunControl`]: threads that stand for its vCPUs write through
/// [`MemoryVm::write`] (its device gate), which the pause holds off. Its off-limits
/// pages are a set the caller fills; a fatal error is recorded, not acted on.
pub struct MemoryVm {
    name: String,
    regions: Vec<Region>,
    run: Arc<RunControl>,
    changes: RamChanges,
    off_limits: Mutex<HashSet<u64>>,
    fatal: Mutex<Vec<String>>,
}

impl MemoryVm {
    /// A VM named `name` over `regions` (which must stay mapped while it lives).
    pub fn new(name: &str, regions: Vec<Region>) -> Arc<MemoryVm> {
        Arc::new(MemoryVm {
            name: name.to_string(),
            regions,
            run: Arc::new(RunControl::new(0)),
            changes: RamChanges::default(),
            off_limits: Mutex::default(),
            fatal: Mutex::default(),
        })
    }

    /// Runs `f` as a write of the guest: not while the VM is paused.
    pub fn write<R>(&self, f: impl FnOnce() -> R) -> R {
        let _inside = self.run.device_guard().expect("the VM is running");
        f()
    }

    /// Puts the page at `gpa` off limits (or back).
    pub fn set_off_limits(&self, gpa: u64, off: bool) {
        let mut set = self.off_limits.lock().unwrap();
        if off {
            set.insert(gpa);
        } else {
            set.remove(&gpa);
        }
    }

    /// Frees `[host_addr, host_addr + len)` as the balloon does: through the VM's
    /// [`RamChanges`]. (A range outside its regions is discarded all the same.)
    pub fn discard(&self, host_addr: usize, len: usize) -> io::Result<()> {
        let gpa = match self.regions.iter().find(|r| r.contains_host(host_addr, len)) {
            Some(r) => r.gpa + (host_addr - r.host_addr) as u64,
            None => u64::MAX,
        };
        self.changes.discard(gpa, host_addr, len)
    }

    /// The fatal errors reclaimers reported, in order.
    pub fn fatal_errors(&self) -> Vec<String> {
        self.fatal.lock().unwrap().clone()
    }
}

impl GuestVm for MemoryVm {
    fn name(&self) -> &str {
        &self.name
    }
    fn regions(&self) -> &[Region] {
        &self.regions
    }
    fn run(&self) -> &Arc<RunControl> {
        &self.run
    }
    fn off_limits(&self, gpa: u64) -> bool {
        self.off_limits.lock().unwrap().contains(&gpa)
    }
    fn changes(&self) -> &RamChanges {
        &self.changes
    }
    fn fatal(&self, error: String) {
        log::error!("{}: fatal: {error}", self.name);
        self.fatal.lock().unwrap().push(error);
    }
}
