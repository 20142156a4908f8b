//! Guest RAM: anonymous private host memory, mapped into the VM as KVM memory slots.
//!
//! Reclamation works on 4 KiB host pages, so guest RAM defaults to 4 KiB pages
//! (`MADV_NOHUGEPAGE`); transparent huge pages are an option for fast population.
//! The mapping is `MAP_NORESERVE`: a VM may be larger than the host's free memory,
//! which is the situation the reclaim mechanisms exist for.
//!
//! Layout (x86): RAM starts at GPA 0; beyond [`MMIO_HOLE_START`] it continues at
//! [`MMIO_HOLE_END`], leaving the hole for devices.

use std::fmt;
use std::io::{BufRead, BufReader};
use std::sync::{Arc, OnceLock, RwLock};

use guest_abi::{MemRegion, MMIO_HOLE_END, MMIO_HOLE_START, PAGE_SIZE};
use vm_memory::mmap::MmapRegionBuilder;
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

/// Errors creating guest RAM.
#[derive(Debug)]
pub enum MemoryError {
    /// The size is out of range or not page aligned.
    BadSize(String),
    /// The host refused the mapping.
    Mmap(String),
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryError::BadSize(m) => write!(f, "{m}"),
            MemoryError::Mmap(m) => write!(f, "cannot map guest memory: {m}"),
        }
    }
}

/// Checks a requested guest RAM size.
pub fn validate_size(bytes: u64) -> Result<(), MemoryError> {
    if bytes % PAGE_SIZE != 0 {
        return Err(MemoryError::BadSize(format!("memory size {bytes} is not a multiple of 4 KiB")));
    }
    if bytes < MIN_MEM {
        return Err(MemoryError::BadSize(format!(
            "memory size {} is too small: at least {} MiB",
            crate::config::format_size(bytes),
            MIN_MEM >> 20
        )));
    }
    if bytes > MAX_MEM {
        return Err(MemoryError::BadSize(format!(
            "memory size {} is too large: at most {} GiB",
            crate::config::format_size(bytes),
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

/// Frees host pages of guest RAM when a plain `MADV_DONTNEED` is not enough: with
/// page sharing on, a shared page is a mapping of the sharing pool, where DONTNEED
/// brings the pool's content back instead of zeros.
pub trait Discarder: Send + Sync {
    /// Makes `[host_addr, host_addr + len)` read zeros and frees its host memory.
    fn discard(&self, host_addr: usize, len: usize) -> std::io::Result<()>;
}

/// A VM's RAM: the vm-memory view used to read and write it, plus the facts the
/// reclaim code needs (host ranges, page size policy).
pub struct GuestRam {
    mem: GuestMemoryMmap,
    regions: Vec<MemRegion>,
    host_pages: HostPages,
    /// Set once page sharing covers this RAM: every discard goes through it.
    discarder: OnceLock<Arc<dyn Discarder>>,
    /// `PROT_NONE` pages just below each region (see [`guard_below`]).
    guards: Vec<usize>,
    /// Told of every discard first (see [`DiscardHook`]).
    discard_hooks: RwLock<Vec<DiscardHook>>,
}

/// Told `(gpa, len)` before [`GuestRam::discard`] drops a range (the swapper forgets
/// its copies of those pages, so they are not faulted back from its file).
pub type DiscardHook = Arc<dyn Fn(u64, u64) + Send + Sync>;

impl GuestRam {
    /// Maps `bytes` of guest RAM (anonymous, private, not reserved).
    pub fn new(bytes: u64, host_pages: HostPages) -> Result<Self, MemoryError> {
        validate_size(bytes)?;
        let regions = layout(bytes);
        let mut mapped = Vec::with_capacity(regions.len());
        let mut guards = Vec::new();
        for r in &regions {
            let mmap = MmapRegionBuilder::new(r.size as usize)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| MemoryError::Mmap(e.to_string()))?;
            let advice = match host_pages {
                HostPages::Small => libc::MADV_NOHUGEPAGE,
                HostPages::Thp => libc::MADV_HUGEPAGE,
            };
            // SAFETY: the range is the mapping just created and owned by `mmap`.
            let rc = unsafe { libc::madvise(mmap.as_ptr().cast(), r.size as usize, advice) };
            if rc != 0 {
                log::warn!("madvise({advice}) on guest RAM failed: {}", std::io::Error::last_os_error());
            }
            guards.extend(guard_below(mmap.as_ptr() as usize));
            mapped
                .push(GuestRegionMmap::new(mmap, GuestAddress(r.base)).ok_or_else(|| {
                    MemoryError::Mmap(format!("region at {:#x} overflows the address space", r.base))
                })?);
        }
        let mem = GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryError::Mmap(e.to_string()))?;
        Ok(GuestRam {
            mem,
            regions,
            host_pages,
            discarder: OnceLock::new(),
            guards,
            discard_hooks: RwLock::new(Vec::new()),
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

    /// `(guest address, host address, length)` of every region, for KVM memory slots
    /// and host-side page operations.
    pub fn host_ranges(&self) -> Vec<(u64, u64, u64)> {
        self.mem
            .iter()
            .map(|r| {
                let host = self.mem.get_host_address(r.start_addr()).expect("region start is mapped");
                (r.start_addr().0, host as u64, r.len())
            })
            .collect()
    }

    /// True if `[gpa, gpa + len)` lies inside one RAM region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|end| self.regions.iter().any(|r| gpa >= r.base && end <= r.base + r.size))
    }

    /// Routes every later [`GuestRam::discard`] through `discarder`; false if one
    /// was already set.
    pub fn set_discarder(&self, discarder: Arc<dyn Discarder>) -> bool {
        self.discarder.set(discarder).is_ok()
    }

    /// Calls `hook` before every later [`GuestRam::discard`].
    pub fn on_discard(&self, hook: DiscardHook) {
        self.discard_hooks.write().unwrap_or_else(|p| p.into_inner()).push(hook);
    }

    /// Frees the host memory behind `[gpa, gpa + len)` (page aligned, inside one
    /// region): the guest reads zeros there next time. Every path that frees guest
    /// pages (balloon inflation, free page reporting) comes here.
    pub fn discard(&self, gpa: u64, len: u64) -> std::io::Result<()> {
        if gpa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || !self.contains(gpa, len) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{gpa:#x}+{len:#x} is not a page-aligned range of guest RAM"),
            ));
        }
        let host = self.mem.get_host_address(GuestAddress(gpa)).map_err(std::io::Error::other)?;
        for hook in self.discard_hooks.read().unwrap_or_else(|p| p.into_inner()).iter() {
            hook(gpa, len);
        }
        if let Some(d) = self.discarder.get() {
            return d.discard(host as usize, len as usize);
        }
        // SAFETY: the range lies inside one mapping of guest RAM owned by `self`;
        // dropping its pages is what the caller asks for.
        if unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
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

    /// Bytes of guest RAM held in private host pages (`Anonymous` in smaps): all of
    /// it but page sharing's pool pages, which the scanner counts.
    pub fn private_bytes(&self) -> u64 {
        self.smaps("Anonymous:")
    }

    fn smaps(&self, field: &str) -> u64 {
        let ranges: Vec<(u64, u64)> = self.host_ranges().iter().map(|&(_, h, l)| (h, h + l)).collect();
        smaps_sum(field, |start, end| ranges.iter().any(|&(s, e)| start >= s && end <= e)).unwrap_or(0)
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        for &g in &self.guards {
            // SAFETY: a page mapped by `guard_below` for this RAM and used by nothing.
            unsafe { libc::munmap(g as *mut libc::c_void, PAGE_SIZE as usize) };
        }
    }
}

/// Maps one inaccessible page right below guest RAM at `start`, where the kernel
/// places the next mapping: without it the RAM of the next VM (same flags) would
/// join this RAM in one VMA, and `/proc/self/smaps` could not tell the two VMs'
/// resident memory apart. None if that page is taken (then by something else).
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

/// Sums the `field` (e.g. `Rss:`, `Pss:`) of the mappings of this process selected
/// by `select(start, end)`.
pub fn smaps_sum(field: &str, select: impl Fn(u64, u64) -> bool) -> std::io::Result<u64> {
    let file = std::fs::File::open("/proc/self/smaps")?;
    let mut total = 0u64;
    let mut selected = false;
    for line in BufReader::new(file).lines() {
        let line = line?;
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((s, e)) = range.split_once('-') {
                if let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) {
                    selected = select(s, e);
                    continue;
                }
            }
        }
        if selected {
            if let Some(kb) = line.strip_prefix(field) {
                total += kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0) * 1024;
            }
        }
    }
    Ok(total)
}

/// Resident memory of the whole process in bytes: `Pss` of `/proc/self/smaps_rollup`,
/// which counts a page shared by several mappings once, like
/// [`GuestRam::resident_bytes`] (`VmRSS` would count shared guest pages once per
/// mapping).
pub fn process_rss() -> u64 {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
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

    #[test]
    fn discard_hooks_see_each_valid_range() {
        let ram = GuestRam::new(32 << 20, HostPages::Small).unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = seen.clone();
        ram.on_discard(Arc::new(move |gpa, len| s2.lock().unwrap().push((gpa, len))));
        ram.discard(PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
        assert!(ram.discard(1, PAGE_SIZE).is_err());
        assert_eq!(*seen.lock().unwrap(), vec![(PAGE_SIZE, 2 * PAGE_SIZE)]);
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
}
