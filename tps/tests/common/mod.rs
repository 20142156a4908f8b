//! Helpers shared by the integration tests: guest-RAM-like memory, page contents, a
//! `VmControl` that records what the scanner asks, and pagemap/VMA probes.
#![allow(dead_code)] // each test binary uses a different part

use std::any::Any;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tps::{Region, Scanner, VmControl, PAGE_SIZE};

/// Generous bound for "a few passes": only a hang would take this long.
pub const PASS_TIMEOUT: Duration = Duration::from_secs(120);

/// Anonymous private memory like the VMM's guest RAM (`MAP_NORESERVE`,
/// `MADV_NOHUGEPAGE`), between two `PROT_NONE` guard pages so that its VMAs never
/// merge with a neighbour's.
pub struct GuestMem {
    pub addr: usize,
    pub pages: usize,
}

impl GuestMem {
    pub fn new(pages: usize) -> Self {
        let len = (pages + 2) * PAGE_SIZE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let base = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, -1, 0) };
        assert_ne!(base, libc::MAP_FAILED);
        let base = base as usize;
        unsafe {
            assert_eq!(libc::madvise(base as *mut _, len, libc::MADV_NOHUGEPAGE), 0);
            libc::mprotect(base as *mut _, PAGE_SIZE, libc::PROT_NONE);
            libc::mprotect((base + len - PAGE_SIZE) as *mut _, PAGE_SIZE, libc::PROT_NONE);
        }
        Self { addr: base + PAGE_SIZE, pages }
    }

    pub fn region(&self, vm: u32) -> Region {
        Region { vm, gpa: 0x10_0000, host_addr: self.addr, len: self.pages * PAGE_SIZE }
    }

    pub fn page(&self, i: usize) -> usize {
        assert!(i < self.pages);
        self.addr + i * PAGE_SIZE
    }

    pub fn gpa(&self, i: usize) -> u64 {
        0x10_0000 + (i * PAGE_SIZE) as u64
    }

    pub fn write(&self, i: usize, key: u64) {
        fill(self.page(i), key);
    }

    pub fn holds(&self, i: usize, key: u64) -> bool {
        holds(self.page(i), key)
    }

    pub fn len(&self) -> usize {
        self.pages * PAGE_SIZE
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        unsafe { libc::munmap((self.addr - PAGE_SIZE) as *mut _, (self.pages + 2) * PAGE_SIZE) };
    }
}

/// Word `i` of the page with `key` (key 0: the zero page).
pub fn word(key: u64, i: usize) -> u64 {
    if key == 0 {
        return 0;
    }
    let mut z = key.wrapping_add((i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub fn fill(addr: usize, key: u64) {
    let p = addr as *mut u64;
    for i in 0..PAGE_SIZE / 8 {
        unsafe { p.add(i).write_volatile(word(key, i)) };
    }
}

pub fn holds(addr: usize, key: u64) -> bool {
    let p = addr as *const u64;
    (0..PAGE_SIZE / 8).all(|i| unsafe { p.add(i).read_volatile() } == word(key, i))
}

/// What the writers of a VM's memory (standing for its vCPUs) pass through; a pause
/// closes it and waits for the writers inside to leave.
#[derive(Default)]
pub struct Gate {
    /// (pauses held, writers inside)
    state: Mutex<(u32, u32)>,
    cv: Condvar,
    pub pauses: AtomicU64,
}

impl Gate {
    pub fn enter(&self) {
        let mut s = self.state.lock().unwrap();
        while s.0 > 0 {
            s = self.cv.wait(s).unwrap();
        }
        s.1 += 1;
    }

    pub fn leave(&self) {
        let mut s = self.state.lock().unwrap();
        s.1 -= 1;
        if s.1 == 0 {
            self.cv.notify_all();
        }
    }

    /// Runs `f` as a guest write.
    pub fn write<R>(&self, f: impl FnOnce() -> R) -> R {
        self.enter();
        let r = f();
        self.leave();
        r
    }

    /// Closes the gate until the returned guard drops.
    pub fn pause(self: &Arc<Self>) -> Box<dyn Any> {
        self.pauses.fetch_add(1, Relaxed);
        let mut s = self.state.lock().unwrap();
        s.0 += 1;
        while s.1 > 0 {
            s = self.cv.wait(s).unwrap();
        }
        Box::new(Paused(self.clone()))
    }
}

struct Paused(Arc<Gate>);

impl Drop for Paused {
    fn drop(&mut self) {
        self.0.state.lock().unwrap().0 -= 1;
        self.0.cv.notify_all();
    }
}

/// Records the scanner's calls; its pause holds the test's guest writes (`gate`).
#[derive(Default)]
pub struct Recorder {
    pub gate: Arc<Gate>,
    pub skip: Mutex<HashSet<(u32, u64)>>,
    pub remapped: Mutex<Vec<(u32, usize, usize)>>,
    pub gone: Mutex<HashSet<u32>>,
}

impl VmControl for Recorder {
    fn pause(&self, vm: u32) -> Option<Box<dyn Any>> {
        (!self.gone.lock().unwrap().contains(&vm)).then(|| self.gate.pause())
    }

    fn skip_page(&self, vm: u32, gpa: u64) -> bool {
        self.skip.lock().unwrap().contains(&(vm, gpa))
    }

    fn remapped(&self, vm: u32, host_addr: usize, len: usize) {
        self.remapped.lock().unwrap().push((vm, host_addr, len));
    }
}

/// A scanner with no rate limit, and its recorder.
pub fn fast_scanner(cfg: impl FnOnce(&mut tps::Config)) -> (Scanner, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let mut config = tps::Config { pages_per_sec: 0, ..tps::Config::default() };
    cfg(&mut config);
    (Scanner::start(config, rec.clone()).unwrap(), rec)
}

/// Waits for `n` more full passes (so that every page was seen after the last write).
pub fn passes(s: &Scanner, n: u64) -> tps::Stats {
    let target = s.stats().full_passes + n;
    assert!(s.wait_passes(target, PASS_TIMEOUT), "no progress");
    s.stats()
}

/// Pagemap entries of pages `0..pages` from `addr`.
pub fn pagemap(addr: usize, pages: usize) -> Vec<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut buf = vec![0u8; pages * 8];
    f.read_exact_at(&mut buf, (addr / PAGE_SIZE * 8) as u64).unwrap();
    buf.chunks_exact(8).map(|c| u64::from_ne_bytes(c.try_into().unwrap())).collect()
}

/// Pages that hold private (anonymous, exclusive) memory: what sharing gives back.
pub fn private_pages(m: &GuestMem) -> usize {
    pagemap(m.addr, m.pages).iter().filter(|&&e| e >> 63 == 1 && e >> 61 & 1 == 0 && e >> 56 & 1 == 1).count()
}

/// Resident pages of any kind.
pub fn resident_pages(m: &GuestMem) -> usize {
    pagemap(m.addr, m.pages).iter().filter(|&&e| e >> 63 == 1).count()
}

/// VMAs overlapping the memory.
pub fn vmas(m: &GuestMem) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let (lo, hi) = (m.addr, m.addr + m.len());
    maps.lines()
        .filter_map(|l| {
            let (s, e) = l.split_whitespace().next()?.split_once('-')?;
            Some((usize::from_str_radix(s, 16).ok()?, usize::from_str_radix(e, 16).ok()?))
        })
        .filter(|&(s, e)| s < hi && e > lo)
        .count()
}
