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
    /// The reservation around each region (see [`map_guarded`]). Declared after
    /// `mem`, so dropped after it: the address space goes once nothing reads it.
    _reservations: Vec<Reservation>,
}

impl GuestRam {
    /// Maps `bytes` of guest RAM (anonymous, private, not reserved).
    pub fn new(bytes: u64, host_pages: HostPages) -> Result<Self, MemoryError> {
        validate_size(bytes)?;
        let regions = layout(bytes);
        let mut mapped = Vec::with_capacity(regions.len());
        let mut reservations = Vec::with_capacity(regions.len());
        for r in &regions {
            let (mmap, reservation) = map_guarded(r.size as usize, host_pages)?;
            reservations.push(reservation);
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
            _reservations: reservations,
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

/// Address space reserved by [`map_guarded`] for one region of guest RAM and the
/// inaccessible pages around it; unmapped, all of it, on drop.
struct Reservation {
    base: usize,
    len: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: the reservation mapped by `map_guarded`; the guest RAM inside it is
        // no longer read (`GuestRam` drops its memory first).
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// Alignment of guest RAM in host memory: a transparent huge page.
const HUGE_PAGE: usize = 2 << 20;

/// Maps `len` bytes of guest RAM (a multiple of the page size), aligned to a huge
/// page and advised for `host_pages`, inside a reservation whose other pages are
/// inaccessible.
///
/// Two anonymous mappings next to each other with the same flags (two VMs' RAM, or
/// RAM and any anonymous buffer advised alike) become one VMA, and
/// `/proc/self/smaps`, whose sums give each VM's resident memory, can no longer
/// tell them apart: the VM then counts none of it. The reservation is one
/// `PROT_NONE` mapping with room for the RAM, its alignment and a page on each
/// side; the RAM replaces a part of it, so whatever is mapped or unmapped around
/// later, an inaccessible page of this reservation stays on each side.
fn map_guarded(len: usize, host_pages: HostPages) -> Result<(MmapRegion, Reservation), MemoryError> {
    let page = PAGE_SIZE as usize;
    let total = len.checked_add(2 * HUGE_PAGE).ok_or_else(|| MemoryError::Mmap("guest RAM too large".into()))?;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a new inaccessible mapping at an address the kernel picks.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), total, libc::PROT_NONE, flags, -1, 0) };
    if base == libc::MAP_FAILED {
        return Err(MemoryError::Mmap(format!("reserving guest RAM: {}", std::io::Error::last_os_error())));
    }
    let reservation = Reservation { base: base as usize, len: total };
    // At most base + HUGE_PAGE, so a page still follows the RAM inside the reservation.
    let ram = (reservation.base + page).next_multiple_of(HUGE_PAGE);
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: MAP_FIXED replaces only pages of the reservation just made (ram - page
    // and ram + len stay inside it, see above), which nothing else uses.
    let p = unsafe { libc::mmap(ram as *mut libc::c_void, len, rw, flags | libc::MAP_FIXED, -1, 0) };
    if p == libc::MAP_FAILED {
        return Err(MemoryError::Mmap(format!("mapping guest RAM: {}", std::io::Error::last_os_error())));
    }
    let advice = match host_pages {
        HostPages::Small => libc::MADV_NOHUGEPAGE,
        HostPages::Thp => libc::MADV_HUGEPAGE,
    };
    // SAFETY: the range is the RAM just mapped.
    if unsafe { libc::madvise(p, len, advice) } != 0 {
        log::warn!("madvise({advice}) on guest RAM failed: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `len` bytes at `ram` are mapped read-write, private, and stay mapped
    // until `reservation` drops, which `GuestRam` does after its memory.
    let builder = unsafe {
        MmapRegionBuilder::new(len).with_mmap_prot(rw).with_mmap_flags(flags).with_raw_mmap_pointer(p.cast())
    };
    let mmap = builder.build().map_err(|e| MemoryError::Mmap(e.to_string()))?;
    Ok((mmap, reservation))
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
    fn ram_is_huge_page_aligned_between_inaccessible_pages() {
        let ram = GuestRam::new(32 << 20, HostPages::Thp).unwrap();
        let r = ram.host_regions()[0];
        assert_eq!(r.host_addr % HUGE_PAGE, 0, "{:#x}", r.host_addr);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let perms = |addr: usize| {
            maps.lines()
                .find_map(|l| {
                    let (range, rest) = l.split_once(' ')?;
                    let (a, b) = range.split_once('-')?;
                    let (a, b) = (usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?);
                    (a <= addr && addr < b).then(|| rest[..4].to_string())
                })
                .unwrap_or_default()
        };
        assert_eq!(perms(r.host_addr - 1), "---p", "below");
        assert_eq!(perms(r.host_addr + r.len), "---p", "above");
        assert_eq!(perms(r.host_addr), "rw-p");
    }

    #[test]
    fn residency_is_per_vm_when_threads_map_ram_at_once() {
        // Two hosts in one process map and unmap their VMs' RAM from two threads:
        // with a guard page mapped after the RAM, one thread's RAM could take the
        // page below the other's first, or land next to a dying RAM that had lost
        // its guard, and the two joined in one mapping that neither counted
        // (resident 0).
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
