//! Guest RAM: anonymous private host memory, mapped into the VM as KVM memory slots.
//!
//! Reclamation works on 4 KiB host pages, so guest RAM defaults to 4 KiB pages
//! (`MADV_NOHUGEPAGE`); transparent huge pages are an option for fast population.
//! The mapping is `MAP_NORESERVE`: a VM may be larger than the host's free memory,
//! which is the situation the reclaim mechanisms exist for.
//!
//! Layout (x86): RAM starts at GPA 0; beyond [`MMIO_HOLE_START`] it continues at
//! [`MMIO_HOLE_END`], leaving the hole for devices. Each region is one KVM memory
//! slot ([`slots`]).
//!
//! Every path that frees guest pages (balloon inflation, free page reporting) goes
//! through [`GuestRam::discard`], which hands the range to the VM's
//! [`RamChanges`]: the one ordered path that tells the reclaimers (the swapper
//! forgets, page sharing frees shared pages correctly).

pub mod slots;

use guest_abi::{MemRegion, MMIO_HOLE_END, MMIO_HOLE_START, PAGE_SIZE};
use pagestate::residency::smaps_sum;
use pagestate::{RamChanges, Region};
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

/// Smallest guest RAM accepted: the low megabyte, the test guest's image and its
/// bookkeeping need about 8 MiB.
pub const MIN_MEM: u64 = 16 << 20;
/// Largest guest RAM accepted: the VMM's identity map covers 64 GiB of guest-physical
/// space, the MMIO hole included.
pub const MAX_MEM: u64 = 63 << 30;

/// How guest RAM is backed by host pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostPages {
    /// 4 KiB pages (`MADV_NOHUGEPAGE`): what reclaim works on. The default.
    #[default]
    Small,
    /// Transparent huge pages (`MADV_HUGEPAGE`): fast to populate, coarse to reclaim.
    Thp,
}

/// Errors creating or changing guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is out of range or not page aligned.
    #[error("{0}")]
    BadSize(String),
    /// The host refused the mapping.
    #[error("cannot map guest memory: {0}")]
    Mmap(String),
    /// A range to discard that is not page aligned or not inside one RAM region.
    #[error("{gpa:#x}+{len:#x} is not a page-aligned range of guest RAM")]
    BadRange {
        /// Its guest-physical start.
        gpa: u64,
        /// Its length.
        len: u64,
    },
    /// Freeing the range failed.
    #[error("discarding guest RAM {gpa:#x}+{len:#x}: {source}")]
    Discard {
        /// Its guest-physical start.
        gpa: u64,
        /// Its length.
        len: u64,
        /// The host's error.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused a memory slot change.
    #[error("memory slot {slot}: {what}: {source}")]
    Slot {
        /// The slot.
        slot: u32,
        /// What was asked of KVM.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Checks a requested guest RAM size.
pub fn validate_size(bytes: u64) -> Result<(), MemoryError> {
    if bytes % PAGE_SIZE != 0 {
        return Err(MemoryError::BadSize(format!("memory size {bytes} is not a multiple of 4 KiB")));
    }
    if bytes < MIN_MEM {
        return Err(MemoryError::BadSize(format!(
            "memory size {} is too small: at least {} MiB",
            crate::units::format_size(bytes),
            MIN_MEM >> 20
        )));
    }
    if bytes > MAX_MEM {
        return Err(MemoryError::BadSize(format!(
            "memory size {} is too large: at most {} GiB",
            crate::units::format_size(bytes),
            MAX_MEM >> 30
        )));
    }
    Ok(())
}

/// The guest-physical RAM ranges for `bytes` of RAM.
pub fn layout(bytes: u64) -> Vec<MemRegion> {
    if bytes <= MMIO_HOLE_START {
        vec![MemRegion { base: 0, size: bytes }]
    } else {
        vec![
            MemRegion { base: 0, size: MMIO_HOLE_START },
            MemRegion { base: MMIO_HOLE_END, size: bytes - MMIO_HOLE_START },
        ]
    }
}

/// A VM's RAM: the vm-memory view used to read and write it, plus the facts the
/// reclaim code needs (host regions, page size policy, the discard path).
pub struct GuestRam {
    mem: GuestMemoryMmap,
    regions: Vec<MemRegion>,
    /// Where each region is mapped in this process.
    host_regions: Vec<Region>,
    host_pages: HostPages,
    /// Who hears of discards and remaps of this RAM, in order.
    changes: RamChanges,
    /// The `PROT_NONE` page below each region (see [`map_guarded`]). Declared after
    /// `mem`, so dropped after it: the guards go once the RAM is unmapped.
    _guards: GuardPages,
}

impl GuestRam {
    /// Maps `bytes` of guest RAM (anonymous, private, not reserved).
    pub fn new(bytes: u64, host_pages: HostPages) -> Result<Self, MemoryError> {
        validate_size(bytes)?;
        let regions = layout(bytes);
        let mut mapped = Vec::with_capacity(regions.len());
        let mut guards = Vec::new();
        for r in &regions {
            let (mmap, guard) = map_guarded(r.size as usize, host_pages)?;
            guards.extend(guard);
            mapped
                .push(GuestRegionMmap::new(mmap, GuestAddress(r.base)).ok_or_else(|| {
                    MemoryError::Mmap(format!("region at {:#x} overflows the address space", r.base))
                })?);
        }
        let mem = GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryError::Mmap(e.to_string()))?;
        let host_regions = mem
            .iter()
            .map(|r| {
                let host = mem.get_host_address(r.start_addr()).expect("region start is mapped");
                Region { gpa: r.start_addr().0, host_addr: host as usize, len: r.len() as usize }
            })
            .collect();
        Ok(GuestRam {
            mem,
            regions,
            host_regions,
            host_pages,
            changes: RamChanges::default(),
            _guards: GuardPages(guards),
        })
    }

    /// The vm-memory view of guest RAM.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Guest-physical RAM ranges.
    pub fn regions(&self) -> &[MemRegion] {
        &self.regions
    }

    /// Total guest RAM in bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// The host page policy of this RAM.
    pub fn host_pages(&self) -> HostPages {
        self.host_pages
    }

    /// Every region with where it is mapped in this process, for KVM memory slots and
    /// host-side page operations.
    pub fn host_regions(&self) -> &[Region] {
        &self.host_regions
    }

    /// The path by which discards and remaps of this RAM reach the reclaimers.
    pub fn changes(&self) -> &RamChanges {
        &self.changes
    }

    /// True if `[gpa, gpa + len)` lies inside one RAM region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|end| self.regions.iter().any(|r| gpa >= r.base && end <= r.base + r.size))
    }

    /// Frees the host memory behind `[gpa, gpa + len)` (page aligned, inside one
    /// region): the guest reads zeros there next time. Every path that frees guest
    /// pages (balloon inflation, free page reporting) comes here; the range goes on
    /// through [`RamChanges::discard`], which tells the reclaimers in order.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        if gpa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || len == 0 || !self.contains(gpa, len) {
            return Err(MemoryError::BadRange { gpa, len });
        }
        let host = self.mem.get_host_address(GuestAddress(gpa)).map_err(|_| MemoryError::BadRange { gpa, len })?;
        self.changes.discard(gpa, host as usize, len as usize).map_err(|source| MemoryError::Discard {
            gpa,
            len,
            source,
        })
    }

    /// Bytes of guest RAM resident in host memory: the proportional set size (`Pss`
    /// in `/proc/self/smaps`) of the guest RAM mappings, so that a page shared by N
    /// guest pages (page sharing, KSM) counts once in all, not N times as in `Rss`;
    /// for private pages the two are equal. The shared zero page is not counted, nor
    /// are page sharing's pool pages where no guest page has them mapped yet (see
    /// [`GuestRam::private_bytes`]).
    pub fn resident_bytes(&self) -> u64 {
        self.smaps("Pss:")
    }

    /// How guest RAM is backed now, in pages: private, shared (page sharing's pool),
    /// the zero page, not resident. None if the pagemap cannot be read.
    pub fn census(&self) -> Option<pagestate::pagemap::Census> {
        let pm = pagestate::pagemap::Pagemap::open().ok()?;
        let zero = pm.zero_pfn();
        let mut total = pagestate::pagemap::Census::default();
        for r in &self.host_regions {
            let c = pm.census(r.host_addr, r.len / pagestate::PAGE_SIZE, zero).ok()?;
            total.private += c.private;
            total.shared += c.shared;
            total.zero += c.zero;
            total.absent += c.absent;
        }
        Some(total)
    }

    /// Bytes of guest RAM held in private host pages (`Anonymous` in smaps): all of
    /// it but page sharing's pool pages, which the scanner counts.
    pub fn private_bytes(&self) -> u64 {
        self.smaps("Anonymous:")
    }

    fn smaps(&self, field: &str) -> u64 {
        let inside = |start: usize, end: usize| self.host_regions.iter().any(|r| r.contains_host(start, end - start));
        smaps_sum(field, inside).unwrap_or(0)
    }
}

/// Guard pages mapped by [`map_guarded`], unmapped on drop.
struct GuardPages(Vec<usize>);

impl Drop for GuardPages {
    fn drop(&mut self) {
        for &g in &self.0 {
            // SAFETY: a page mapped by `guard_below` for this RAM and used by nothing.
            unsafe { libc::munmap(g as *mut libc::c_void, PAGE_SIZE as usize) };
        }
    }
}

/// Held while a region of guest RAM is mapped, given its guard page and advised,
/// so that no other RAM (another host's, in another thread) takes the page below
/// halfway through.
static MAPPING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Mappings of guest RAM tried before one without a free page below is used as is.
const MAP_TRIES: usize = 8;

/// Maps `len` bytes of guest RAM, advised for `host_pages`, with an inaccessible
/// guard page right below it.
///
/// Two anonymous mappings next to each other with the same flags (two VMs' RAM,
/// advised alike) become one VMA, and `/proc/self/smaps`, whose sums give each VM's
/// resident memory, can no longer tell them apart: each VM then counts none of it.
/// The kernel places a new mapping right below the lowest one, so a page below
/// each RAM keeps the next RAM apart; above, a RAM has the guard of the RAM mapped
/// before it, or something that is not RAM. A RAM's guard goes only after the RAM
/// itself ([`GuardPages`]). A mapping whose page below is taken (it fills a hole
/// left by an unmapped one) is kept while the next is tried, so that the kernel
/// places the next elsewhere. Returns the guard's address; None if no try found
/// the page below free (then residency figures may include a neighbour).
fn map_guarded(len: usize, host_pages: HostPages) -> Result<(MmapRegion, Option<usize>), MemoryError> {
    let _one_at_a_time = MAPPING.lock().unwrap_or_else(|p| p.into_inner());
    let mut taken = Vec::new();
    let (mmap, guard) = loop {
        let mmap = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::Mmap(e.to_string()))?;
        match guard_below(mmap.as_ptr() as usize) {
            Some(g) => break (mmap, Some(g)),
            None if taken.len() + 1 == MAP_TRIES => {
                log::warn!("guest RAM at {:p}: no free page below it for a guard page", mmap.as_ptr());
                break (mmap, None);
            }
            None => taken.push(mmap),
        }
    };
    drop(taken);
    let advice = match host_pages {
        HostPages::Small => libc::MADV_NOHUGEPAGE,
        HostPages::Thp => libc::MADV_HUGEPAGE,
    };
    // SAFETY: the range is the mapping just created and owned by `mmap`.
    if unsafe { libc::madvise(mmap.as_ptr().cast(), len, advice) } != 0 {
        log::warn!("madvise({advice}) on guest RAM failed: {}", std::io::Error::last_os_error());
    }
    Ok((mmap, guard))
}

/// Maps one inaccessible page right below guest RAM at `start`; None if that page
/// is taken.
fn guard_below(start: usize) -> Option<usize> {
    let at = start.checked_sub(PAGE_SIZE as usize)?;
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
    let p = unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            PAGE_SIZE as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    (p as usize == at).then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn layout_splits_around_the_mmio_hole() {
        assert_eq!(layout(256 << 20), vec![MemRegion { base: 0, size: 256 << 20 }]);
        let l = layout(4 << 30);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0], MemRegion { base: 0, size: MMIO_HOLE_START });
        assert_eq!(l[1], MemRegion { base: MMIO_HOLE_END, size: 1 << 30 });
    }

    #[test]
    fn sizes_are_checked() {
        assert!(validate_size(MIN_MEM - PAGE_SIZE).is_err());
        assert!(validate_size(MAX_MEM + PAGE_SIZE).is_err());
        assert!(validate_size((64 << 20) + 1).is_err());
        assert!(validate_size(64 << 20).is_ok());
    }

    #[test]
    fn discard_frees_and_rereads_zero() {
        let ram = GuestRam::new(32 << 20, HostPages::Small).unwrap();
        for page in 0..256u64 {
            ram.mem().write_obj(0x5au8, GuestAddress(page * PAGE_SIZE)).unwrap();
        }
        ram.discard(0, 128 * PAGE_SIZE).unwrap();
        assert_eq!(ram.mem().read_obj::<u8>(GuestAddress(PAGE_SIZE)).unwrap(), 0);
        assert_eq!(ram.mem().read_obj::<u8>(GuestAddress(200 * PAGE_SIZE)).unwrap(), 0x5a);
        assert!(ram.discard(1, PAGE_SIZE).is_err());
        assert!(ram.discard(31 << 20, 2 << 20).is_err(), "beyond RAM");
        assert!(ram.contains(0, 32 << 20) && !ram.contains(u64::MAX, 2));
    }

    /// Stands for a swapper: records the ranges it is told to forget.
    #[derive(Default)]
    struct Forgets(std::sync::Mutex<Vec<(u64, u64)>>);

    impl pagestate::SwapHooks for Forgets {
        fn forget(&self, gpa: u64, len: u64) {
            self.0.lock().unwrap().push((gpa, len));
        }
        fn remapped(&self, _host_addr: usize, _len: usize) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn each_valid_discard_reaches_the_reclaimers() {
        let ram = GuestRam::new(32 << 20, HostPages::Small).unwrap();
        let seen = std::sync::Arc::new(Forgets::default());
        let hooks: std::sync::Arc<dyn pagestate::SwapHooks> = seen.clone();
        ram.changes().attach_swapper(std::sync::Arc::downgrade(&hooks)).unwrap();
        ram.discard(PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
        assert!(ram.discard(1, PAGE_SIZE).is_err());
        assert!(ram.discard(PAGE_SIZE, 0).is_err());
        assert_eq!(*seen.0.lock().unwrap(), vec![(PAGE_SIZE, 2 * PAGE_SIZE)]);
    }

    #[test]
    fn resident_bytes_follow_touches() {
        let ram = GuestRam::new(64 << 20, HostPages::Small).unwrap();
        assert!(ram.resident_bytes() < (1 << 20));
        for page in 0..1024u64 {
            ram.mem().write_obj(0xabu8, GuestAddress(page * PAGE_SIZE)).unwrap();
        }
        let rss = ram.resident_bytes();
        assert!((4 << 20..(5 << 20)).contains(&rss), "rss {rss}");
        // A second RAM mapped next to it (its VMA may merge with the first) has its
        // own figure.
        let other = GuestRam::new(64 << 20, HostPages::Small).unwrap();
        other.mem().write_obj(1u8, GuestAddress(0)).unwrap();
        assert_eq!(other.resident_bytes(), PAGE_SIZE);
        assert_eq!(ram.resident_bytes(), rss);
    }

    #[test]
    fn residency_is_per_vm_even_when_mappings_are_adjacent() {
        // RAMs mapped one after another end up next to each other, where the kernel
        // would merge them into one mapping; each must still see its own pages.
        let rams: Vec<GuestRam> = (0..4).map(|_| GuestRam::new(32 << 20, HostPages::Small).unwrap()).collect();
        for (i, ram) in rams.iter().enumerate() {
            for page in 0..256 * (i as u64 + 1) {
                ram.mem().write_obj(1u8, GuestAddress(page * PAGE_SIZE)).unwrap();
            }
        }
        for (i, ram) in rams.iter().enumerate() {
            let want = 256 * (i as u64 + 1) * PAGE_SIZE;
            let rss = ram.resident_bytes();
            assert!((want..want + (1 << 20)).contains(&rss), "ram {i}: rss {rss}, want {want}");
        }
    }

    #[test]
    fn residency_is_per_vm_when_threads_map_ram_at_once() {
        // Two hosts in one process map and unmap their VMs' RAM from two threads:
        // one thread's RAM could take the page below the other's before its guard,
        // or land next to a dying RAM that had lost its guard, and the two joined in
        // one mapping that neither counted (resident 0).
        std::thread::scope(|s| {
            for t in 0..4u64 {
                s.spawn(move || {
                    for round in 0..100u64 {
                        let ram = GuestRam::new(16 << 20, HostPages::Small).unwrap();
                        let pages = 64 * (t + 1) + round;
                        for page in 0..pages {
                            ram.mem().write_obj(1u8, GuestAddress(page * PAGE_SIZE)).unwrap();
                        }
                        let (rss, want) = (ram.resident_bytes(), pages * PAGE_SIZE);
                        assert!(
                            (want..want + (1 << 20)).contains(&rss),
                            "thread {t} round {round}: rss {rss}, want {want}"
                        );
                    }
                });
            }
        });
    }
}
