//! Test harness: guest-like anonymous memory, a VmControl whose pause really parks
//! "vCPU" writer threads, and page patterns.

use std::any::Any;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};

use swapd::anon::AnonMap;
use swapd::pagemap::{Pagemap, PM_PRESENT};
use swapd::{Region, VmControl};

pub const PAGE: usize = 4096;

/// Private anonymous memory with 4 KiB pages, like the VMM's guest RAM.
pub struct Mem {
    pub base: usize,
    pub len: usize,
    _map: AnonMap,
}

impl Mem {
    pub fn new(len: usize) -> Mem {
        let map = AnonMap::new(len).expect("mmap");
        Mem { base: map.addr(), len, _map: map }
    }

    pub fn pages(&self) -> usize {
        self.len / PAGE
    }

    pub fn region(&self, gpa: u64) -> Region {
        Region { gpa, host_addr: self.base, len: self.len }
    }

    pub fn word(&self, page: usize, w: usize) -> *mut u64 {
        (self.base + page * PAGE + w * 8) as *mut u64
    }

    pub fn read(&self, page: usize, w: usize) -> u64 {
        // SAFETY: inside the mapping.
        unsafe { std::ptr::read_volatile(self.word(page, w)) }
    }

    pub fn write(&self, page: usize, w: usize, v: u64) {
        // SAFETY: inside the mapping.
        unsafe { std::ptr::write_volatile(self.word(page, w), v) }
    }

    /// Whether a page is resident (pagemap present bit).
    pub fn present(&self, page: usize) -> bool {
        let mut e = [0u64];
        Pagemap::open().unwrap().read(self.base + page * PAGE, &mut e).unwrap();
        e[0] & PM_PRESENT != 0
    }
}

pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Initial content of word `w` of page `p` (never zero).
pub fn init_word(p: usize, w: usize) -> u64 {
    mix((p * 512 + w) as u64) | 1
}

pub fn fill_unique(m: &Mem, pages: impl Iterator<Item = usize>) {
    for p in pages {
        for w in 0..512 {
            m.write(p, w, init_word(p, w));
        }
    }
}

pub fn check_unique(m: &Mem, p: usize) -> Result<(), String> {
    for w in 0..512 {
        let v = m.read(p, w);
        if v != init_word(p, w) {
            return Err(format!("page {p} word {w}: {v:#x} != {:#x}", init_word(p, w)));
        }
    }
    Ok(())
}

pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("swapd-it-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[derive(Default)]
pub struct Inner {
    pause_req: AtomicBool,
    state: Mutex<(usize, usize)>, // (active writers, parked writers)
    cv: Condvar,
    pub pauses: AtomicU64,
    pub ending: AtomicBool,
    /// Negative control: pause returns at once without parking anybody.
    pub broken_pause: AtomicBool,
    pub skip: Mutex<HashSet<u64>>,
    pub fatal: Mutex<Vec<String>>,
    pub fatal_cv: Condvar,
}

/// A VM stand-in: writer threads call `checkpoint` between writes; `pause` parks
/// them all before returning (so no write is in flight while the guard lives).
#[derive(Clone, Default)]
pub struct TestVm(pub Arc<Inner>);

struct Guard(Arc<Inner>);

impl Drop for Guard {
    fn drop(&mut self) {
        let _g = self.0.state.lock().unwrap();
        self.0.pause_req.store(false, SeqCst);
        self.0.cv.notify_all();
    }
}

impl TestVm {
    pub fn new() -> TestVm {
        let _ = env_logger::builder().is_test(true).try_init();
        TestVm::default()
    }

    /// A writer thread starts.
    pub fn enter(&self) {
        self.0.state.lock().unwrap().0 += 1;
    }

    /// A writer thread ends.
    pub fn leave(&self) {
        let mut s = self.0.state.lock().unwrap();
        s.0 -= 1;
        self.0.cv.notify_all();
    }

    /// Called by writers between operations: parks while a pause is requested.
    pub fn checkpoint(&self) {
        if !self.0.pause_req.load(SeqCst) {
            return;
        }
        let mut s = self.0.state.lock().unwrap();
        s.1 += 1;
        self.0.cv.notify_all();
        while self.0.pause_req.load(SeqCst) {
            s = self.0.cv.wait(s).unwrap();
        }
        s.1 -= 1;
    }

    pub fn fatal_errors(&self) -> Vec<String> {
        self.0.fatal.lock().unwrap().clone()
    }

    /// Wait until fatal has been called (the test ends by timeout if never).
    pub fn wait_fatal(&self) -> String {
        let mut f = self.0.fatal.lock().unwrap();
        while f.is_empty() {
            f = self.0.fatal_cv.wait(f).unwrap();
        }
        f[0].clone()
    }
}

impl VmControl for TestVm {
    fn pause(&self) -> Option<Box<dyn Any>> {
        if self.0.ending.load(SeqCst) {
            return None;
        }
        if self.0.broken_pause.load(SeqCst) {
            return Some(Box::new(()));
        }
        let mut s = self.0.state.lock().unwrap();
        // One pauser at a time (the swapper serialises its batches anyway).
        while self.0.pause_req.load(SeqCst) {
            s = self.0.cv.wait(s).unwrap();
        }
        self.0.pause_req.store(true, SeqCst);
        while s.1 < s.0 {
            s = self.0.cv.wait(s).unwrap();
        }
        self.0.pauses.fetch_add(1, SeqCst);
        Some(Box::new(Guard(self.0.clone())))
    }

    fn skip_page(&self, gpa: u64) -> bool {
        self.0.skip.lock().unwrap().contains(&gpa)
    }

    fn fatal(&self, error: String) {
        self.0.fatal.lock().unwrap().push(error);
        self.0.fatal_cv.notify_all();
    }
}
