//! The guest's initial page tables: an identity map (VA == GPA) of guest RAM and the
//! MMIO hole with 2 MiB pages.
//!
//! PVM rules that hold on hardware virtualisation too: the U/S bit is set at every
//! level (without it KVM_RUN spins on spurious faults on PVM), 4-level paging, and
//! nothing in PML4 slot 256. The identity map lives in PML4 slot 0.

use guest_abi::{MMIO_HOLE_END, PAGE_TABLES_GPA};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;
const TABLE: u64 = PRESENT | WRITABLE | USER;

/// Guest-physical space covered by the identity map.
pub const MAPPED_LIMIT: u64 = 64 << 30;

/// GPA of the PML4 (the value for CR3).
pub const PML4_GPA: u64 = PAGE_TABLES_GPA;
const PDPT_GPA: u64 = PAGE_TABLES_GPA + 0x1000;
const PD_GPA: u64 = PAGE_TABLES_GPA + 0x2000;

/// End of the page tables in guest memory.
pub const fn tables_end() -> u64 {
    PD_GPA + (MAPPED_LIMIT >> 30) * 0x1000
}

/// Writes page tables mapping `[0, max(ram_end, end of the MMIO hole))` 1:1 and
/// returns the CR3 value.
pub fn build_identity_map(mem: &GuestMemoryMmap, ram_end: u64) -> Result<u64, vm_memory::GuestMemoryError> {
    let limit = ram_end.max(MMIO_HOLE_END).next_multiple_of(1 << 30).min(MAPPED_LIMIT);
    mem.write_obj(PDPT_GPA | TABLE, GuestAddress(PML4_GPA))?;
    for gib in 0..(limit >> 30) {
        let pd = PD_GPA + gib * 0x1000;
        mem.write_obj(pd | TABLE, GuestAddress(PDPT_GPA + gib * 8))?;
        let mut entries = [0u64; 512];
        for (i, e) in entries.iter_mut().enumerate() {
            *e = ((gib << 30) + ((i as u64) << 21)) | TABLE | HUGE;
        }
        mem.write_slice(as_bytes(&entries), GuestAddress(pd))?;
    }
    Ok(PML4_GPA)
}

fn as_bytes(entries: &[u64; 512]) -> &[u8] {
    // SAFETY: a u64 array is plain old data; the slice covers exactly its bytes.
    unsafe { std::slice::from_raw_parts(entries.as_ptr().cast(), std::mem::size_of_val(entries)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_ram_and_hole_with_user_bit_everywhere() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(build_identity_map(&mem, 256 << 20).unwrap(), PML4_GPA);
        let pml4e: u64 = mem.read_obj(GuestAddress(PML4_GPA)).unwrap();
        assert_eq!(pml4e, PDPT_GPA | TABLE);
        // 4 GiB mapped (RAM below the hole, then the hole): 4 PDPT entries.
        for gib in 0..4u64 {
            let pdpte: u64 = mem.read_obj(GuestAddress(PDPT_GPA + gib * 8)).unwrap();
            assert_eq!(pdpte & USER, USER);
        }
        let pdpte4: u64 = mem.read_obj(GuestAddress(PDPT_GPA + 4 * 8)).unwrap();
        assert_eq!(pdpte4, 0);
        // 3 GiB + 2 MiB maps to itself.
        let pde: u64 = mem.read_obj(GuestAddress(PD_GPA + 3 * 0x1000 + 8)).unwrap();
        assert_eq!(pde, ((3 << 30) + (2 << 20)) | TABLE | HUGE);
        assert!(tables_end() <= guest_abi::KERNEL_MIN_GPA);
    }
}
