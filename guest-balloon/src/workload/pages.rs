//! The workload's allocated pages and what each must hold.
//!
//! A stack (LIFO: `free` returns the most recent pages) of 16-byte records, one per
//! allocated page, in an array taken from the frame allocator at boot and sized for
//! every free frame (0.4% of RAM, written only as pages are allocated). A record
//! keeps the page's frame, its content key from `alloc`, and its touch version; with
//! the VM's seed that determines the page's content (see `guest_abi::content`).
//!
//! Records are accessed through a raw pointer because all vCPUs process them at
//! once during a job (each its own positions) while the BSP owns the set.

use guest_abi::content;
use guest_abi::PAGE_SIZE;

use crate::mm::frame_alloc::{FrameAllocator, FrameRun};

/// What one allocated page must hold.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PageMeta {
    /// Content key given by `alloc` (see `guest_abi::content::alloc_key`).
    pub key: u64,
    /// Frame number.
    pub pfn: u32,
    /// Number of `touch`es since `alloc` (0: the `alloc` content).
    pub version: u32,
}

impl PageMeta {
    /// The key of the page's current content.
    pub fn current_key(&self, vm_seed: u64) -> u64 {
        match self.version {
            0 => self.key,
            v => content::touch_key(vm_seed, self.pfn as u64, v),
        }
    }
}

/// The allocated pages, in allocation order.
pub struct PageSet {
    meta: *mut PageMeta,
    len: u64,
    capacity: u64,
}

impl PageSet {
    /// An empty set able to hold every frame `frames` can still hand out.
    pub fn new(frames: &mut FrameAllocator) -> Option<PageSet> {
        // `pages` pages of records cover the `free - pages` frames left after them.
        let per_page = PAGE_SIZE / core::mem::size_of::<PageMeta>() as u64;
        let pages = frames.free_pages().div_ceil(per_page + 1);
        let first = frames.alloc_contiguous(pages)?;
        let meta = crate::mm::frame_addr(first).cast::<PageMeta>();
        Some(PageSet { meta, len: 0, capacity: frames.free_pages() })
    }

    /// Number of allocated pages.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// The records, for jobs (valid for positions `0..len()`).
    pub fn records(&self) -> *mut PageMeta {
        self.meta
    }

    /// Appends a record.
    pub fn push(&mut self, meta: PageMeta) {
        assert!(self.len < self.capacity, "page set full");
        // SAFETY: len < capacity, within the array allocated in `new`.
        unsafe { self.meta.add(self.len as usize).write(meta) };
        self.len += 1;
    }

    /// Removes the `count` most recent pages (at most `len()`) and returns their
    /// frames to `frames`, coalescing neighbours into runs.
    pub fn pop_into(&mut self, count: u64, frames: &mut FrameAllocator) {
        let mut run: Option<FrameRun> = None;
        for _ in 0..count.min(self.len) {
            self.len -= 1;
            // SAFETY: len < the previous len, a written record.
            let pfn = unsafe { (*self.meta.add(self.len as usize)).pfn } as u64;
            run = match run {
                // Pages were taken in ascending runs, so popping walks them down.
                Some(r) if r.start == pfn + 1 => Some(FrameRun { start: pfn, count: r.count + 1 }),
                other => {
                    if let Some(r) = other {
                        frames.free_run(r);
                    }
                    Some(FrameRun { start: pfn, count: 1 })
                }
            };
        }
        if let Some(r) = run {
            frames.free_run(r);
        }
    }
}
