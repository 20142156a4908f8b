//! The system calls that change guest RAM, and the VMA limit they run into.
//!
//! - A shared page is `mmap(MAP_PRIVATE | MAP_FIXED)` of a pool page: reads hit the
//!   pool's page-cache page, the first write makes a private copy.
//! - A zero page in anonymous memory is dropped with `madvise(MADV_DONTNEED)`; one
//!   inside a pool mapping cannot be (DONTNEED there brings the pool page back), so it
//!   gets a fresh anonymous mapping instead.
//! - Every new mapping gets the `madvise` flags of the guest RAM it replaces (huge
//!   page choice, dontfork, dontdump) and the same `MAP_NORESERVE`, so the kernel can
//!   merge it with its neighbours: consecutive guest pages mapping consecutive pool
//!   pages become one VMA, and a page made anonymous again rejoins the RAM around it.

use std::io;

/// The mapping attributes of guest RAM that a replacement mapping must repeat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Advice {
    /// `Some(true)`: `MADV_HUGEPAGE`; `Some(false)`: `MADV_NOHUGEPAGE`.
    pub(crate) huge: Option<bool>,
    pub(crate) dontfork: bool,
    pub(crate) dontdump: bool,
    pub(crate) noreserve: bool,
}

impl Advice {
    /// Parses the `VmFlags:` line of `/proc/self/smaps`.
    fn from_vm_flags(flags: &str) -> Self {
        let has = |f: &str| flags.split_whitespace().any(|x| x == f);
        Self {
            huge: if has("hg") {
                Some(true)
            } else if has("nh") {
                Some(false)
            } else {
                None
            },
            dontfork: has("dd"),
            dontdump: has("dc"),
            noreserve: has("nr"),
        }
    }

    /// The attributes of the mapping that contains `addr`.
    pub(crate) fn of(addr: usize) -> io::Result<Self> {
        let smaps = std::fs::read_to_string("/proc/self/smaps")?;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                if inside {
                    return Ok(Self::from_vm_flags(flags));
                }
            } else if let Some(vma) = pagestate::maps::Vma::parse(line) {
                inside = (vma.start..vma.end).contains(&addr);
            }
        }
        Err(io::Error::new(io::ErrorKind::NotFound, "no mapping at this address"))
    }

    fn apply(self, addr: usize, len: usize) {
        let mut advice = Vec::with_capacity(3);
        match self.huge {
            Some(true) => advice.push(libc::MADV_HUGEPAGE),
            Some(false) => advice.push(libc::MADV_NOHUGEPAGE),
            None => {}
        }
        if self.dontfork {
            advice.push(libc::MADV_DONTFORK);
        }
        if self.dontdump {
            advice.push(libc::MADV_DONTDUMP);
        }
        for a in advice {
            // SAFETY: changes flags of our own mapping only.
            if unsafe { libc::madvise(addr as *mut _, len, a) } != 0 {
                // The mapping works without it; it only may not merge with neighbours.
                log::warn!("tps: madvise({a}) on {addr:#x}+{len:#x}: {}", io::Error::last_os_error());
            }
        }
    }

    fn map_flags(self) -> i32 {
        let nr = if self.noreserve { libc::MAP_NORESERVE } else { 0 };
        libc::MAP_PRIVATE | libc::MAP_FIXED | nr
    }
}

fn check_map(addr: usize, r: *mut libc::c_void) -> io::Result<()> {
    if r == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        debug_assert_eq!(r as usize, addr);
        Ok(())
    }
}

/// Maps `len` bytes of the pool file at `offset` copy-on-write over `addr`.
pub(crate) fn map_pool(addr: usize, len: usize, fd: i32, offset: u64, advice: Advice) -> io::Result<()> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: `addr..addr+len` is registered guest RAM whose writers are paused and
    // whose content equals the pool's at `offset` (checked by the caller).
    let r = unsafe { libc::mmap(addr as *mut _, len, prot, advice.map_flags(), fd, offset as i64) };
    check_map(addr, r)?;
    advice.apply(addr, len);
    Ok(())
}

/// Replaces `addr..addr+len` with fresh anonymous memory (reads zeros).
pub(crate) fn map_anon(addr: usize, len: usize, advice: Advice) -> io::Result<()> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = advice.map_flags() | libc::MAP_ANONYMOUS;
    // SAFETY: the caller owns the range and wants its content gone.
    let r = unsafe { libc::mmap(addr as *mut _, len, prot, flags, -1, 0) };
    check_map(addr, r)?;
    advice.apply(addr, len);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use pagestate::anon::{memfd_with, AnonMap};
    use pagestate::discard::dontneed;
    use pagestate::maps::{count_vmas, max_map_count};
    use pagestate::residency::is_mapped;

    use super::*;
    use crate::PAGE_SIZE;

    #[test]
    fn flags_are_parsed() {
        let a = Advice::from_vm_flags(" rd wr mr mw me ac nr nh dd ");
        assert_eq!(a, Advice { huge: Some(false), dontfork: true, dontdump: false, noreserve: true });
        assert_eq!(Advice::from_vm_flags(" rd wr hg dc").huge, Some(true));
        assert!(max_map_count() > 0);
    }

    /// VMAs overlapping `addr..addr+len`.
    fn vmas_in(addr: usize, len: usize) -> usize {
        count_vmas(&[(addr, addr + len)]).unwrap().1
    }

    #[test]
    fn pool_runs_merge_and_anonymous_rejoins() {
        let m = AnonMap::pages(8);
        let advice = Advice::of(m.addr() + PAGE_SIZE).unwrap();
        assert_eq!((advice.huge, advice.noreserve), (Some(false), true));
        let mut content = vec![0u8; 4 * PAGE_SIZE];
        for (i, c) in content.chunks_mut(PAGE_SIZE).enumerate() {
            c.fill(i as u8 + 1);
        }
        let pool = memfd_with(&content);
        let fd = pool.as_raw_fd();
        let page = |i: usize| m.addr() + i * PAGE_SIZE;
        // SAFETY: fills our own test mapping.
        unsafe { std::ptr::write_bytes(m.addr() as *mut u8, 0x55, 8 * PAGE_SIZE) };

        map_pool(page(2), 2 * PAGE_SIZE, fd, 0, advice).unwrap();
        assert_eq!(vmas_in(m.addr(), 8 * PAGE_SIZE), 3);
        map_pool(page(4), PAGE_SIZE, fd, 2 * PAGE_SIZE as u64, advice).unwrap();
        assert_eq!(vmas_in(m.addr(), 8 * PAGE_SIZE), 3, "consecutive pool pages: one VMA");
        map_pool(page(6), PAGE_SIZE, fd, 0, advice).unwrap();
        assert_eq!(vmas_in(m.addr(), 8 * PAGE_SIZE), 5);
        // SAFETY: reads a page of our own test mapping.
        let read = |i: usize| unsafe { (page(i) as *const u8).read_volatile() };
        assert_eq!([read(1), read(2), read(3), read(4), read(6)], [0x55, 1, 2, 3, 1]);

        // SAFETY: writes a page of our own test mapping.
        unsafe { (page(3) as *mut u8).write_volatile(9) };
        assert_eq!(read(3), 9);
        let mut pool_first = [0u8; 1];
        // SAFETY: reads one byte of our memfd into a one-byte buffer.
        unsafe { libc::pread(fd, pool_first.as_mut_ptr().cast(), 1, PAGE_SIZE as i64) };
        assert_eq!(pool_first[0], 2, "a guest write does not reach the pool");

        map_anon(page(2), 3 * PAGE_SIZE, advice).unwrap();
        assert_eq!(read(3), 0);
        assert_eq!(vmas_in(m.addr(), 8 * PAGE_SIZE), 3, "anonymous again: merged with its neighbours");
        map_anon(page(6), PAGE_SIZE, advice).unwrap();
        assert_eq!(vmas_in(m.addr(), 8 * PAGE_SIZE), 1);

        dontneed(page(0), PAGE_SIZE).unwrap();
        assert_eq!(read(0), 0);
        assert!(is_mapped(m.addr(), 8 * PAGE_SIZE));
    }
}
