//! Helpers shared by the integration tests: guest-RAM-like memory, page contents, VMs
//! as the scanner sees them (a real pause, a recorded `RamChanges`), and
//! pagemap/VMA probes.
#![allow(dead_code)] // each test binary uses a different part

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pagestate::anon::MemoryVm;
use pagestate::{GuestVm, Region, SwapHooks, PAGE_SIZE};
use tps::{Scanner, VmId};

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
        // SAFETY: a fresh anonymous mapping; the result is checked.
        let base = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, -1, 0) };
        assert_ne!(base, libc::MAP_FAILED);
        let base = base as usize;
        // SAFETY: advice and protections on the mapping just made.
        unsafe {
            assert_eq!(libc::madvise(base as *mut _, len, libc::MADV_NOHUGEPAGE), 0);
            libc::mprotect(base as *mut _, PAGE_SIZE, libc::PROT_NONE);
            libc::mprotect((base + len - PAGE_SIZE) as *mut _, PAGE_SIZE, libc::PROT_NONE);
        }
        Self { addr: base + PAGE_SIZE, pages }
    }

    pub fn region(&self) -> Region {
        Region { gpa: 0x10_0000, host_addr: self.addr, len: self.pages * PAGE_SIZE }
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
        // SAFETY: unmaps the test mapping and its guard pages, no longer used.
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
        // SAFETY: `addr` is a page of test memory.
        unsafe { p.add(i).write_volatile(word(key, i)) };
    }
}

pub fn holds(addr: usize, key: u64) -> bool {
    let p = addr as *const u64;
    // SAFETY: `addr` is a page of test memory.
    (0..PAGE_SIZE / 8).all(|i| unsafe { p.add(i).read_volatile() } == word(key, i))
}

/// Records the new mappings the scanner announces on one VM's `RamChanges` (where
/// the swapper would be told).
struct RemapLog {
    id: VmId,
    rec: Arc<Recorder>,
}

impl SwapHooks for RemapLog {
    fn forget(&self, _gpa: u64, _len: u64) {}
    fn remapped(&self, host_addr: usize, len: usize) -> io::Result<()> {
        self.rec.remapped.lock().unwrap().push((self.id, host_addr, len));
        Ok(())
    }
}

/// The VMs of a test (real pauses, no vCPUs: the test's writer threads stand for
/// them and write through [`MemoryVm::write`]) and what the scanner did to them.
#[derive(Default)]
pub struct Recorder {
    /// New mappings announced: (VM, address, length).
    pub remapped: Mutex<Vec<(VmId, usize, usize)>>,
    vms: Mutex<Vec<Registered>>,
}

/// A VM of the test and the hooks recording its remaps (kept alive with it).
type Registered = (Arc<MemoryVm>, Arc<dyn SwapHooks>);

impl Recorder {
    /// A VM over `m`, not yet given to a scanner; VMs are numbered in creation order,
    /// which must be the order they are given to the scanner.
    pub fn vm(self: &Arc<Self>, m: &GuestMem) -> Arc<MemoryVm> {
        self.vm_over(m.region())
    }

    /// A VM over `region`, not yet given to a scanner.
    pub fn vm_over(self: &Arc<Self>, region: Region) -> Arc<MemoryVm> {
        let mut vms = self.vms.lock().unwrap();
        let id = vms.len() as VmId;
        let vm = MemoryVm::new(&format!("vm{id}"), vec![region]);
        let log: Arc<dyn SwapHooks> = Arc::new(RemapLog { id, rec: self.clone() });
        vm.changes().attach_swapper(Arc::downgrade(&log)).unwrap();
        vms.push((vm.clone(), log));
        vm
    }

    /// A VM over `m`, given to `s`.
    pub fn add(self: &Arc<Self>, s: &Scanner, m: &GuestMem) -> Arc<MemoryVm> {
        let vm = self.vm(m);
        let id = s.add_vm(vm.clone()).unwrap();
        assert_eq!(self.at(id).name(), vm.name(), "VMs are given to the scanner in creation order");
        vm
    }

    /// VM `id`.
    pub fn at(&self, id: VmId) -> Arc<MemoryVm> {
        self.vms.lock().unwrap()[id as usize].0.clone()
    }

    /// Runs `f` as a guest write of VM `id`.
    pub fn write<R>(&self, id: VmId, f: impl FnOnce() -> R) -> R {
        self.at(id).write(f)
    }

    /// Pauses obtained over all VMs.
    pub fn pauses(&self) -> u64 {
        self.vms.lock().unwrap().iter().map(|(vm, _)| vm.run().pause_stats().0).sum()
    }
}

/// A scanner with no rate limit, and its recorder.
pub fn fast_scanner(cfg: impl FnOnce(&mut tps::Config)) -> (Scanner, Arc<Recorder>) {
    let mut config = tps::Config { pages_per_sec: 0, ..tps::Config::default() };
    cfg(&mut config);
    (Scanner::start(config).unwrap(), Arc::default())
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
