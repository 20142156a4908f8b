//! Guest-physical memory.
//!
//! The VMM maps all guest RAM 1:1 (virtual == physical) before the first
//! instruction, so the guest needs no page tables of its own: a frame number is an
//! address once shifted. [`frame_alloc`] hands out the frames after the kernel image;
//! [`frame_set`] keeps a set of frames taken from it (the balloon's).

pub mod frame_alloc;
pub mod frame_set;

use guest_abi::PAGE_SIZE;

/// The address of frame `pfn` through the identity map.
pub fn frame_addr(pfn: u64) -> *mut u8 {
    (pfn * PAGE_SIZE) as *mut u8
}
