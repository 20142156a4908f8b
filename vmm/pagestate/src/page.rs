//! Guest pages as bytes: their size, copying one out of guest memory, the zero test.
//!
//! Guest RAM is written by vCPUs (in guest mode, outside anything Rust knows about)
//! and by the VMM's device threads at any moment. A Rust reference (`&[u8]`) to it
//! would promise the compiler that the bytes do not change while it is alive, which is
//! false: the compiler may then read a byte twice and see two values, or merge reads.
//! So reclaimers never borrow guest memory: they copy a page out with vm-memory's
//! [`VolatileSlice`] (what vm-memory, Firecracker and Cloud Hypervisor do for guest
//! memory) and hash or compare the copy. A copy taken while the guest runs is only a
//! hint; every decision that matters is checked again on a copy taken with the VM
//! paused.

use vm_memory::VolatileSlice;

/// Host (and x86 guest) page size: reclaim works on pages of this size.
pub const PAGE_SIZE: usize = 4096;

/// The bytes of one page, copied out of guest memory.
pub type Page = [u8; PAGE_SIZE];

/// Copies the page of guest memory at host address `addr` into `out`.
///
/// # Safety
/// `addr..addr + PAGE_SIZE` must be mapped readable for the whole call (e.g. a page
/// of guest RAM whose mapping outlives the caller's hold on it). Others may write it
/// concurrently: `out` then holds some mix of old and new bytes, which the caller
/// must treat as a hint only.
pub unsafe fn copy_page(addr: usize, out: &mut Page) {
    // SAFETY: the caller guarantees the range is mapped and readable; a VolatileSlice
    // makes no aliasing promise about its bytes.
    let slice = unsafe { VolatileSlice::new(addr as *mut u8, PAGE_SIZE) };
    let copied = slice.copy_to(&mut out[..]);
    debug_assert_eq!(copied, PAGE_SIZE);
}

/// Whether every byte of `bytes` is zero; stops at the first non-zero 256-byte block.
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(256);
    let blocks_zero = blocks
        .by_ref()
        .all(|block| block.chunks_exact(8).fold(0u64, |acc, w| acc | u64::from_ne_bytes(w.try_into().unwrap())) == 0);
    blocks_zero && blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_test_sees_every_byte() {
        let mut v = vec![0u8; PAGE_SIZE + 1];
        assert!(is_zero(&v[1..]));
        for at in [1, 255, 256, 4000, PAGE_SIZE] {
            v[at] = 0x80;
            assert!(!is_zero(&v[1..]), "byte {at}");
            v[at] = 0;
        }
        assert!(is_zero(&[]));
        assert!(!is_zero(&[0, 0, 1]));
    }

    #[test]
    fn copies_a_page() {
        let src = vec![7u8; PAGE_SIZE];
        let mut out = [0u8; PAGE_SIZE];
        // SAFETY: `src` is a live page-sized buffer.
        unsafe { copy_page(src.as_ptr() as usize, &mut out) };
        assert_eq!(&out[..], &src[..]);
    }
}
