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
use std::sync::{Arc, RwLock};

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

/// A VM's RAM: the vm-memory view used to read and write it, plus the facts the
/// reclaim code needs (host ranges, page size policy).
pub struct GuestRam {
    mem: GuestMemoryMmap,
    regions: Vec<MemRegion>,
    host_pages: HostPages,
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
            mapped.push(GuestRegionMmap::new(mmap, GuestAddress(r.base)).ok_or_else(|| {
                MemoryError::Mmap(format!("region at {:#x} overflows the address space", r.base))
            })?);
        }
        let mem = GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryError::Mmap(e.to_string()))?;
        Ok(GuestRam { mem, regions, host_pages, discard_hooks: RwLock::new(Vec::new()) })
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

    /// Calls `hook` before every later [`GuestRam::discard`].
    pub fn on_discard(&self, hook: DiscardHook) {
        self.discard_hooks.write().unwrap_or_else(|p| p.into_inner()).push(hook);
    }

    /// Frees the host memory behind `[gpa, gpa + len)` (page aligned, inside one
    /// region): the guest reads zeros there next time.
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
        // SAFETY: the range lies inside one mapping of guest RAM owned by `self`;
        // dropping its pages is what the caller asks for.
        if unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Bytes of guest RAM resident in host memory, from `mincore` over each region.
    ///
    /// Not from `/proc/self/smaps`: the kernel merges adjacent anonymous mappings
    /// with the same flags into one VMA, so with several VMs one VMA can hold the
    /// RAM of two of them and its Rss belongs to neither. A read-only mapping of the
    /// shared zero page counts as resident here (one page per such guest page).
    pub fn resident_bytes(&self) -> u64 {
        let mut total = 0;
        for (_, host, len) in self.host_ranges() {
            let mut vec = vec![0u8; (len / PAGE_SIZE) as usize];
            // SAFETY: the range is one page-aligned mapping of guest RAM owned by
            // `self`; `vec` has one byte per page of it.
            if unsafe { libc::mincore(host as *mut libc::c_void, len as usize, vec.as_mut_ptr()) } != 0 {
                log::warn!("mincore on guest RAM failed: {}", std::io::Error::last_os_error());
                continue;
            }
            total += vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE_SIZE;
        }
        total
    }
}

/// Resident memory of the whole process in bytes (`VmRSS` of `/proc/self/status`).
pub fn process_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
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
}
