//! The KVM memory slots of a VM's RAM, registered in one place.
//!
//! Slot `i` is region `i` of [`GuestRam::host_regions`]. The slots are registered
//! once, when the VM is created; dirty logging (for the swapper's idle-aware victim
//! choice, and later the active-memory sampler) is switched on here by registering
//! the same slots again with `KVM_MEM_LOG_DIRTY_PAGES`, and read here.
//!
//! Logging makes the first write to each page in a period fault into KVM (a write
//! protection fault, handled in the kernel), which is its cost to the guest.

use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use pagestate::Region;

use super::{GuestRam, MemoryError};

/// The memory slots of one VM.
pub struct MemorySlots {
    vm_fd: Arc<VmFd>,
    /// Slot `i` holds `regions[i]`.
    regions: Vec<Region>,
}

/// One slot's pages written since the last read: bit `i` of `bitmap` set means the
/// page at `gpa + i * 4096` was written.
pub struct DirtyBitmap {
    /// Guest-physical address of the slot's first page.
    pub gpa: u64,
    /// One bit per page of the slot.
    pub bitmap: Vec<u64>,
}

impl MemorySlots {
    /// Registers every region of `ram` as a slot of `vm_fd`.
    ///
    /// # Safety
    /// `ram` must stay mapped as long as `vm_fd` lives (KVM maps guest memory to its
    /// pages; unmapping it under a live VM would hand the guest whatever is mapped
    /// there next). The VMM keeps the RAM in the VM's shared state, dropped after the
    /// VM fd.
    pub unsafe fn register(vm_fd: Arc<VmFd>, ram: &GuestRam) -> Result<MemorySlots, MemoryError> {
        let slots = MemorySlots { vm_fd, regions: ram.host_regions().to_vec() };
        // SAFETY: the caller keeps `ram` mapped as long as the VM fd lives.
        unsafe { slots.set_flags(0, "KVM_SET_USER_MEMORY_REGION")? };
        Ok(slots)
    }

    /// Turns dirty logging on for every slot; [`MemorySlots::dirty_log`] then reports
    /// the pages written since the previous call.
    pub fn enable_dirty_log(&self) -> Result<(), MemoryError> {
        // SAFETY: the same slots, addresses and lengths as `register` (whose caller
        // keeps the RAM mapped for the VM's life); only the flags change.
        unsafe { self.set_flags(KVM_MEM_LOG_DIRTY_PAGES, "turning dirty logging on") }
    }

    /// Reads (and clears) every slot's dirty bitmap.
    pub fn dirty_log(&self) -> Result<Vec<DirtyBitmap>, MemoryError> {
        self.regions
            .iter()
            .enumerate()
            .map(|(slot, r)| {
                let bitmap = self.vm_fd.get_dirty_log(slot as u32, r.len).map_err(|source| MemoryError::Slot {
                    slot: slot as u32,
                    what: "KVM_GET_DIRTY_LOG",
                    source,
                })?;
                Ok(DirtyBitmap { gpa: r.gpa, bitmap })
            })
            .collect()
    }

    /// # Safety
    /// The regions must be mapped for as long as the VM fd lives.
    unsafe fn set_flags(&self, flags: u32, what: &'static str) -> Result<(), MemoryError> {
        for (slot, r) in self.regions.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: r.gpa,
                memory_size: r.len as u64,
                userspace_addr: r.host_addr as u64,
            };
            // SAFETY: the caller guarantees the range stays mapped while the VM lives.
            unsafe { self.vm_fd.set_user_memory_region(region) }.map_err(|source| MemoryError::Slot {
                slot: slot as u32,
                what,
                source,
            })?;
        }
        Ok(())
    }
}
