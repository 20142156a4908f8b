//! A raw userfaultfd: `syscall(SYS_userfaultfd)` plus the ioctls of
//! `<linux/userfaultfd.h>`, declared with vmm-sys-util's ioctl macros.
//!
//! Only what the swapper needs: MISSING registration of anonymous memory, COPY,
//! ZEROPAGE, WAKE, UNREGISTER and reading fault messages. The descriptor is opened
//! `O_CLOEXEC | O_NONBLOCK` and **never** with `UFFD_USER_MODE_ONLY`: a fault KVM
//! takes on behalf of a vCPU is a kernel-mode fault, and a user-mode-only descriptor
//! lets such faults bypass the handler silently (KVM_RUN then fails with EFAULT).
//! Opening one needs root (or CAP_SYS_PTRACE) when `vm.unprivileged_userfaultfd=0`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};

/// `UFFD_API`: the only API version.
const UFFD_API: u64 = 0xAA;
/// Ioctl type of userfaultfd.
const UFFDIO: u32 = 0xAA;

/// `uffd_msg.event` of a page fault.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `uffd_msg.event` of fork, remap, remove, unmap (only seen with those features).
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

/// Page-fault flags.
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
pub const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

/// Features (a few; the kernel of this project advertises 0x1ffff).
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

/// Registration modes.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;

/// `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` mode: do not wake the faulting threads.
pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;

/// Bits of `uffdio_register.ioctls` (1 << _UFFDIO_xxx).
pub const UFFDIO_BIT_WAKE: u64 = 1 << 0x02;
pub const UFFDIO_BIT_COPY: u64 = 1 << 0x03;
pub const UFFDIO_BIT_ZEROPAGE: u64 = 1 << 0x04;

/// Size of one `struct uffd_msg`.
pub const UFFD_MSG_SIZE: usize = 32;

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

vmm_sys_util::ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, UffdioApi);
vmm_sys_util::ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
vmm_sys_util::ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
vmm_sys_util::ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
vmm_sys_util::ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
vmm_sys_util::ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);

/// One event read from the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread (or KVM on behalf of a vCPU) touched a missing page. `address` is
    /// page-aligned (no `UFFD_FEATURE_EXACT_ADDRESS`); `write` tells a write fault.
    PageFault { address: u64, write: bool, wp: bool },
    /// `MADV_DONTNEED`/`MADV_REMOVE` on a registered range (only with
    /// `UFFD_FEATURE_EVENT_REMOVE`, which the swapper does not request).
    Remove { start: u64, end: u64 },
    /// Anything else (fork, remap, unmap; not requested).
    Other { event: u8 },
}

impl Event {
    /// Decode one raw `struct uffd_msg`.
    pub fn parse(raw: &[u8; UFFD_MSG_SIZE]) -> Event {
        let u64_at = |off: usize| u64::from_ne_bytes(raw[off..off + 8].try_into().unwrap());
        match raw[0] {
            UFFD_EVENT_PAGEFAULT => {
                let flags = u64_at(8);
                Event::PageFault {
                    address: u64_at(16),
                    write: flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                    wp: flags & UFFD_PAGEFAULT_FLAG_WP != 0,
                }
            }
            UFFD_EVENT_REMOVE => Event::Remove { start: u64_at(8), end: u64_at(16) },
            e => Event::Other { event: e },
        }
    }
}

/// Outcome of a fill (COPY or ZEROPAGE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Every byte of the range was filled (and the waiters woken unless DONTWAKE).
    Done,
    /// Only the first `bytes` were filled: the next page was already present
    /// (EEXIST after progress, reported as EAGAIN by the kernel) or the mm changed.
    Partial { bytes: u64 },
    /// The first page was already present (another path resolved it): nothing filled.
    /// Waiters for that page, if any, must be woken with [`Uffd::wake`].
    Exists,
}

/// A userfaultfd descriptor.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Uffd {
    /// Open a userfaultfd (`O_CLOEXEC | O_NONBLOCK`, kernel-mode faults included) and
    /// complete the API handshake asking for `features` (0 is enough for MISSING
    /// faults on anonymous memory).
    pub fn open(features: u64) -> io::Result<Uffd> {
        // SAFETY: plain syscall with integer flags; the result is checked.
        let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("userfaultfd: {e} (needs root or vm.unprivileged_userfaultfd=1)"),
            ));
        }
        // SAFETY: the syscall returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(ret as RawFd) };
        let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `api` is.
        let r = unsafe { ioctl_with_mut_ref(&fd, UFFDIO_API(), &mut api) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("UFFDIO_API features {features:#x}: {e}")));
        }
        Ok(Uffd { fd, features: api.features })
    }

    /// Features the kernel advertised in the handshake.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Register `[start, start + len)` in `mode` (e.g. MISSING). Returns the ioctls
    /// the range supports (`UFFDIO_BIT_*`). Registering a range this descriptor
    /// already covers in the same mode is a no-op; a range covered by another
    /// userfaultfd fails with EBUSY; registration splits VMAs at the range ends.
    pub fn register(&self, start: u64, len: u64, mode: u64) -> io::Result<u64> {
        let mut reg = UffdioRegister { range: UffdioRange { start, len }, mode, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`.
        let r = unsafe { ioctl_with_mut_ref(self, UFFDIO_REGISTER(), &mut reg) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("UFFDIO_REGISTER [{start:#x}, +{len:#x}) mode {mode}: {e}")));
        }
        Ok(reg.ioctls)
    }

    /// Unregister a range (pending faults in it are woken and retried without us).
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let range = UffdioRange { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads a `struct uffdio_range`.
        let r = unsafe { ioctl_with_ref(self, UFFDIO_UNREGISTER(), &range) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Wake the threads waiting on faults in a range (they retry the access).
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let range = UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE reads a `struct uffdio_range`.
        let r = unsafe { ioctl_with_ref(self, UFFDIO_WAKE(), &range) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Atomically fill missing pages `[dst, dst + src.len())` with `src` and wake
    /// the waiters (unless `dontwake`). `src` must be a whole number of pages.
    pub fn copy(&self, dst: u64, src: &[u8], dontwake: bool) -> io::Result<Fill> {
        let mut c = UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: if dontwake { UFFDIO_COPY_MODE_DONTWAKE } else { 0 },
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads `src.len()` bytes from `src` (borrowed for the
        // call) and writes only the `copy` field of the struct.
        let r = unsafe { ioctl_with_mut_ref(self, UFFDIO_COPY(), &mut c) };
        fill_result(r, c.copy, c.len, "UFFDIO_COPY", dst)
    }

    /// Map the shared zero page at the missing pages of `[start, start + len)`.
    pub fn zeropage(&self, start: u64, len: u64, dontwake: bool) -> io::Result<Fill> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start, len },
            mode: if dontwake { UFFDIO_ZEROPAGE_MODE_DONTWAKE } else { 0 },
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes a `struct uffdio_zeropage`.
        let r = unsafe { ioctl_with_mut_ref(self, UFFDIO_ZEROPAGE(), &mut z) };
        fill_result(r, z.zeropage, len, "UFFDIO_ZEROPAGE", start)
    }

    /// Read the pending events into `out` (cleared first). Returns the number read;
    /// 0 means nothing pending (EAGAIN: the descriptor is non-blocking).
    pub fn read_events(&self, out: &mut Vec<Event>, max: usize) -> io::Result<usize> {
        out.clear();
        let mut buf = vec![0u8; UFFD_MSG_SIZE * max.max(1)];
        loop {
            // SAFETY: reads at most buf.len() bytes into buf.
            let n = unsafe { libc::read(self.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(0),
                    Some(libc::EINTR) => continue,
                    _ => return Err(e),
                }
            }
            let n = n as usize;
            for chunk in buf[..n - n % UFFD_MSG_SIZE].chunks_exact(UFFD_MSG_SIZE) {
                out.push(Event::parse(chunk.try_into().unwrap()));
            }
            return Ok(out.len());
        }
    }
}

/// Interpret the return of COPY/ZEROPAGE: `done` is the kernel's byte count (or
/// negative errno) written into the struct.
fn fill_result(r: i32, done: i64, len: u64, what: &str, at: u64) -> io::Result<Fill> {
    if r == 0 {
        return Ok(Fill::Done);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // Partial progress: the kernel filled `done` bytes, then stopped (EEXIST on
        // the next page, or the mm changed under it).
        Some(libc::EAGAIN) if done > 0 && (done as u64) < len => Ok(Fill::Partial { bytes: done as u64 }),
        Some(libc::EEXIST) => Ok(Fill::Exists),
        Some(libc::EAGAIN) => Ok(Fill::Partial { bytes: 0 }),
        _ => Err(io::Error::new(e.kind(), format!("{what} at {at:#x} (+{len:#x}): {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use pagestate::anon::AnonMap;
    use pagestate::PAGE_SIZE as PAGE;

    use super::*;

    fn wait_event(u: &Uffd) -> Event {
        let mut ev = Vec::new();
        loop {
            let mut pfd = libc::pollfd { fd: u.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, -1) };
            if u.read_events(&mut ev, 4).unwrap() > 0 {
                return ev[0];
            }
        }
    }

    #[test]
    fn missing_fault_copy_zeropage_exists() {
        let u = Arc::new(Uffd::open(0).expect("userfaultfd (run as root)"));
        let mem = AnonMap::new(4 * PAGE).unwrap();
        let base = mem.addr();
        let ioctls = u.register(base as u64, 4 * PAGE as u64, UFFDIO_REGISTER_MODE_MISSING).unwrap();
        assert!(ioctls & UFFDIO_BIT_COPY != 0 && ioctls & UFFDIO_BIT_ZEROPAGE != 0);

        // A reader thread faults on page 1: resolve it with COPY.
        // SAFETY: a word of the test mapping, which outlives the thread (joined below).
        let t = std::thread::spawn(move || unsafe { std::ptr::read_volatile((base + PAGE + 8) as *const u64) });
        match wait_event(&u) {
            Event::PageFault { address, write, .. } => {
                assert_eq!(address, (base + PAGE) as u64);
                assert!(!write);
            }
            e => panic!("unexpected {e:?}"),
        }
        let mut src = vec![0u8; PAGE];
        src[8..16].copy_from_slice(&0x1122334455667788u64.to_ne_bytes());
        assert_eq!(u.copy((base + PAGE) as u64, &src, false).unwrap(), Fill::Done);
        assert_eq!(t.join().unwrap(), 0x1122334455667788);
        // The page is now present: another COPY reports Exists.
        assert_eq!(u.copy((base + PAGE) as u64, &src, false).unwrap(), Fill::Exists);

        // A writer on page 2 faults with the write flag; ZEROPAGE over pages 2..4
        // fills both (page 2 first).
        // SAFETY: a word of the test mapping, which outlives the thread (joined below).
        let t = std::thread::spawn(move || unsafe { std::ptr::write_volatile((base + 2 * PAGE) as *mut u64, 7) });
        match wait_event(&u) {
            Event::PageFault { address, write, .. } => {
                assert_eq!(address, (base + 2 * PAGE) as u64);
                assert!(write);
            }
            e => panic!("unexpected {e:?}"),
        }
        assert_eq!(u.zeropage((base + 2 * PAGE) as u64, 2 * PAGE as u64, false).unwrap(), Fill::Done);
        t.join().unwrap();
        // SAFETY: a word of the test mapping.
        assert_eq!(unsafe { std::ptr::read_volatile((base + 2 * PAGE) as *const u64) }, 7);
        // Page 0 is missing, page 1 present: one page filled, then the kernel stops.
        assert_eq!(u.zeropage(base as u64, 4 * PAGE as u64, false).unwrap(), Fill::Partial { bytes: PAGE as u64 });
        u.unregister(base as u64, 4 * PAGE as u64).unwrap();
    }
}
