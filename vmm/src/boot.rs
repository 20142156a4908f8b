//! Everything written into guest memory before the first instruction: GDT, page
//! tables, kernel image, boot information and the control page.

use guest_abi::{
    Backend as AbiBackend, BootInfo, BOOT_INFO_GPA, BOOT_INFO_MAGIC, BOOT_INFO_VERSION, CMDLINE_MAX, CONTROL_MAGIC,
    CONTROL_PAGE_GPA, MAX_MEM_REGIONS,
};
use vm_memory::{Bytes, GuestAddress};

use crate::loader::{self, LoadError, LoadedKernel};
use crate::memory::GuestRam;
use crate::x86::{paging, regs};

/// What the VM needs to know from boot preparation.
pub struct BootLayout {
    /// Kernel entry point.
    pub entry: u64,
    /// CR3 of the identity map.
    pub cr3: u64,
}

/// Facts for [`BootInfo`] that come from the VM rather than guest memory.
pub struct BootParams<'a> {
    /// vCPU count.
    pub vcpus: u32,
    /// KVM backend.
    pub backend: AbiBackend,
    /// Index of the VM in its host process.
    pub vm_index: u32,
    /// TSC frequency in kHz, 0 if unknown.
    pub tsc_khz: u64,
    /// Seed of the guest's `unique` page contents.
    pub vm_seed: u64,
    /// The boot workload.
    pub workload: &'a str,
    /// GPA of the balloon's virtio-mmio window, if the VM has a balloon.
    pub balloon_mmio: Option<u64>,
}

/// Why the boot structures could not be written.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Guest memory refused a write (it cannot, short of a bug: said clearly).
    #[error("writing {what} into guest memory: {source}")]
    Write {
        /// What was written.
        what: &'static str,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The workload does not fit the boot information.
    #[error("the workload is longer than {CMDLINE_MAX} bytes")]
    WorkloadTooLong,
}

/// Loads `image` and writes the boot structures into `ram`.
pub fn prepare(ram: &GuestRam, image: &[u8], p: &BootParams) -> Result<BootLayout, BootError> {
    let mem = ram.mem();
    let first = ram.regions()[0];
    let kernel: LoadedKernel = loader::load(mem, image, first.base + first.size)?;
    let ram_end = ram.regions().last().map(|r| r.base + r.size).unwrap_or(0);
    let err = |what, source| BootError::Write { what, source };
    regs::write_gdt(mem).map_err(|e| err("the GDT", e))?;
    let cr3 = paging::build_identity_map(mem, ram_end).map_err(|e| err("page tables", e))?;

    if p.workload.len() > CMDLINE_MAX {
        return Err(BootError::WorkloadTooLong);
    }
    // SAFETY: BootInfo is plain old data (integers and arrays); all-zero is valid.
    let mut info: BootInfo = unsafe { std::mem::zeroed() };
    info.magic = BOOT_INFO_MAGIC;
    info.version = BOOT_INFO_VERSION;
    info.vcpus = p.vcpus;
    info.backend = p.backend as u32;
    info.vm_index = p.vm_index;
    info.tsc_khz = p.tsc_khz;
    info.vm_seed = p.vm_seed;
    info.kernel_end = kernel.end;
    info.control_page = CONTROL_PAGE_GPA;
    info.balloon_mmio = p.balloon_mmio.unwrap_or(0);
    let regions = ram.regions();
    assert!(regions.len() <= MAX_MEM_REGIONS);
    info.nr_mem = regions.len() as u32;
    info.mem[..regions.len()].copy_from_slice(regions);
    info.cmdline_len = p.workload.len() as u32;
    info.cmdline[..p.workload.len()].copy_from_slice(p.workload.as_bytes());
    // SAFETY: BootInfo is repr(C) plain old data; the slice covers exactly it.
    let bytes =
        unsafe { std::slice::from_raw_parts((&info as *const BootInfo).cast::<u8>(), std::mem::size_of::<BootInfo>()) };
    mem.write_slice(bytes, GuestAddress(BOOT_INFO_GPA)).map_err(|e| err("boot information", e))?;
    mem.write_obj(CONTROL_MAGIC, GuestAddress(CONTROL_PAGE_GPA)).map_err(|e| err("the control page", e))?;
    Ok(BootLayout { entry: kernel.entry, cr3 })
}
