//! Test harness: guest-like anonymous memory, VMs whose pause really holds the
//! "vCPU" writer threads, and page patterns.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagestate::anon::{AnonMap, MemoryVm};
use pagestate::pagemap::Pagemap;
use pagestate::Region;

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
        Pagemap::open().unwrap().one(self.base + page * PAGE).unwrap().present()
    }
}

pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Initial content of word `w` of page `p` (never zero, unique to the page): odd
/// pages are random (lz4 does not compress them), even pages repeat one word after
/// their first 32 (lz4 makes a few hundred bytes of them), so a swapper with a
/// compression cache gets both kinds.
pub fn init_word(p: usize, w: usize) -> u64 {
    if p % 2 == 0 && w >= 32 {
        mix(p as u64) | 1
    } else {
        mix((p * 512 + w) as u64) | 1
    }
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

/// A VM over `mem` (at guest-physical `GPA`) as the swapper sees it: a real pause,
/// no vCPUs (the test's writer threads stand for them, writing through
/// [`MemoryVm::write`]).
pub fn test_vm(name: &str, mem: &Mem, gpa: u64) -> Arc<MemoryVm> {
    let _ = env_logger::builder().is_test(true).try_init();
    MemoryVm::new(name, vec![mem.region(gpa)])
}

/// Waits until a reclaimer reported a fatal error on `vm`; returns the first.
pub fn wait_fatal(vm: &MemoryVm) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(e) = vm.fatal_errors().first() {
            return e.clone();
        }
        assert!(Instant::now() < deadline, "no fatal error reported");
        std::thread::sleep(Duration::from_millis(1));
    }
}
