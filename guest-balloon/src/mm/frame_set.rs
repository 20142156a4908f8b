//! A set of frames as a bitmap (one bit per frame up to the end of RAM), whose own
//! frames come from the frame allocator: the balloon keeps the frames the host
//! holds in one, and takes them back out in ascending runs when it deflates.

use guest_abi::PAGE_SIZE;

use crate::mm::frame_addr;
use crate::mm::frame_alloc::FrameAllocator;

/// A set of frame numbers.
pub struct FrameSet {
    bits: &'static mut [u64],
    count: u64,
    /// Where [`FrameSet::take_next`] looks first.
    cursor: u64,
}

impl FrameSet {
    /// An empty set able to hold frames `0..end_pfn`; its bitmap is taken from `frames`.
    pub fn new(frames: &mut FrameAllocator, end_pfn: u64) -> Option<FrameSet> {
        let words = end_pfn.div_ceil(64);
        let first = frames.alloc_contiguous((words * 8).div_ceil(PAGE_SIZE))?;
        // SAFETY: the frames were just allocated for this set alone, identity-mapped.
        let bits = unsafe { core::slice::from_raw_parts_mut(frame_addr(first).cast::<u64>(), words as usize) };
        bits.fill(0);
        Some(FrameSet { bits, count: 0, cursor: 0 })
    }

    /// Number of frames in the set.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Adds `pfn` (not yet in the set).
    pub fn insert(&mut self, pfn: u64) {
        let word = &mut self.bits[(pfn / 64) as usize];
        assert!(*word & 1 << (pfn % 64) == 0, "frame added to a set twice");
        *word |= 1 << (pfn % 64);
        self.count += 1;
    }

    /// Removes and returns a frame of the set (ascending from where the last one
    /// was found, wrapping around); `None` if the set is empty.
    pub fn take_next(&mut self) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let words = self.bits.len();
        let mut w = (self.cursor / 64) as usize % words;
        while self.bits[w] == 0 {
            w = (w + 1) % words;
        }
        let pfn = w as u64 * 64 + self.bits[w].trailing_zeros() as u64;
        self.bits[w] &= self.bits[w] - 1;
        self.count -= 1;
        self.cursor = pfn;
        Some(pfn)
    }
}
