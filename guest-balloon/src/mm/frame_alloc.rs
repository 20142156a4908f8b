//! The page-frame allocator: a bitmap over all guest frames, next-fit.
//!
//! One bit per 4 KiB frame (set = free), stored in the first free frames after the
//! kernel image, so the image stays small whatever the RAM size (64 GiB of RAM
//! needs a 2 MiB bitmap). Operations work on runs of contiguous frames, a word of
//! the bitmap at a time: the workload allocates and frees in bulk, and the balloon
//! and free-page reporting hand ranges to the host. A single frame is a run of one.
//!
//! Next-fit (a cursor that moves past each allocation) keeps successive allocations
//! ascending and contiguous, which makes later frees and reports coalesce well.
//!
//! For free page reporting the allocator also remembers which 2 MiB chunks had
//! frames freed by the workload since the last report ([`FrameAllocator::free_run`]
//! marks them); [`FrameAllocator::take_reportable`] hands out the chunks among them
//! that are now entirely free. Frames whose host memory is already gone (deflated
//! or reported ones) come back through [`FrameAllocator::free_unbacked`], which does
//! not mark them, so nothing is reported twice.

use guest_abi::{MemRegion, PAGE_SIZE};

/// Frames `start..start + count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameRun {
    /// First frame number.
    pub start: u64,
    /// Number of frames.
    pub count: u64,
}

/// Frames per reporting chunk (2 MiB, 8 bitmap words).
pub const CHUNK_FRAMES: u64 = 512;
const CHUNK_WORDS: usize = (CHUNK_FRAMES / 64) as usize;

/// The guest's free frames.
pub struct FrameAllocator {
    /// Bit `pfn % 64` of word `pfn / 64` is set when frame `pfn` is free.
    bitmap: &'static mut [u64],
    free: u64,
    /// Where the next search starts.
    cursor: u64,
    /// Bit `c % 64` of word `c / 64` is set when chunk `c` had frames freed by
    /// [`FrameAllocator::free_run`] since it was last looked at for reporting.
    freed: &'static mut [u64],
    /// Some bit of `freed` is set.
    freed_any: bool,
}

impl FrameAllocator {
    /// An allocator owning every frame of `regions` at or above `first_free` (a page
    /// aligned address), minus the frames its bitmap takes from there.
    pub fn new(regions: &[MemRegion], first_free: u64) -> Result<FrameAllocator, &'static str> {
        let end_pfn = regions.iter().map(|r| (r.base + r.size) / PAGE_SIZE).max().ok_or("no RAM regions")?;
        let words = end_pfn.div_ceil(64);
        let chunk_words = end_pfn.div_ceil(CHUNK_FRAMES).div_ceil(64);
        let bitmap_end = first_free + ((words + chunk_words) * 8).next_multiple_of(PAGE_SIZE);
        if !regions.iter().any(|r| r.base <= first_free && bitmap_end <= r.base + r.size) {
            return Err("no room for the frame bitmap after the kernel");
        }
        // SAFETY: the bitmaps' frames are RAM (checked above), identity-mapped, past
        // the kernel image, and from now on owned by this allocator alone.
        let all = unsafe { core::slice::from_raw_parts_mut(first_free as *mut u64, (words + chunk_words) as usize) };
        all.fill(0);
        let (bitmap, freed) = all.split_at_mut(words as usize);
        let mut frames = FrameAllocator { bitmap, free: 0, cursor: bitmap_end / PAGE_SIZE, freed, freed_any: false };
        for r in regions {
            let start = r.base.max(bitmap_end) / PAGE_SIZE;
            let end = (r.base + r.size) / PAGE_SIZE;
            if start < end {
                // Never touched: the host has no memory behind these yet.
                frames.free_unbacked(FrameRun { start, count: end - start });
            }
        }
        Ok(frames)
    }

    /// Number of free frames.
    pub fn free_pages(&self) -> u64 {
        self.free
    }

    /// Takes the next run of free frames (at most `max`, at least one) after the
    /// cursor, wrapping around; `None` when no frame is free.
    pub fn alloc_run(&mut self, max: u64) -> Option<FrameRun> {
        let start = self.find_free(self.cursor, self.bits()).or_else(|| self.find_free(0, self.cursor))?;
        let run = FrameRun { start, count: self.free_len(start, max) };
        self.take(run);
        self.cursor = start + run.count;
        Some(run)
    }

    /// Takes `count` contiguous free frames (first fit from the bottom); returns the
    /// first frame.
    pub fn alloc_contiguous(&mut self, count: u64) -> Option<u64> {
        let mut from = 0;
        while let Some(start) = self.find_free(from, self.bits()) {
            let len = self.free_len(start, count);
            if len == count {
                self.take(FrameRun { start, count });
                return Some(start);
            }
            from = start + len;
        }
        None
    }

    /// Returns a run of allocated frames that the guest wrote: their chunks become
    /// candidates for free page reporting.
    pub fn free_run(&mut self, run: FrameRun) {
        if run.count == 0 {
            return;
        }
        self.free_unbacked(run);
        for chunk in run.start / CHUNK_FRAMES..=(run.start + run.count - 1) / CHUNK_FRAMES {
            self.freed[(chunk / 64) as usize] |= 1 << (chunk % 64);
        }
        self.freed_any = true;
    }

    /// Returns a run of allocated frames that have no host memory behind them
    /// (never touched, deflated from the balloon, or just reported free).
    pub fn free_unbacked(&mut self, run: FrameRun) {
        self.for_each_word(run, |word, mask| {
            assert!(*word & mask == 0, "frame freed twice");
            *word |= mask;
        });
        self.free += run.count;
    }

    /// Whether frames were freed by [`FrameAllocator::free_run`] since the last
    /// complete [`FrameAllocator::take_reportable`] pass.
    pub fn freed_since_report(&self) -> bool {
        self.freed_any
    }

    /// Takes the entirely free chunks among those freed since the last pass, merged
    /// into runs of whole chunks of at most `max_run` frames, into `out`; returns how
    /// many runs it filled. A chunk still partly in use is forgotten until some of
    /// its frames are freed again. The pass stops early when `out` is full.
    pub fn take_reportable(&mut self, out: &mut [FrameRun], max_run: u64) -> usize {
        let mut n = 0;
        for w in 0..self.freed.len() {
            while self.freed[w] != 0 {
                let chunk = w as u64 * 64 + self.freed[w].trailing_zeros() as u64;
                let run = FrameRun { start: chunk * CHUNK_FRAMES, count: CHUNK_FRAMES };
                let words = self.bitmap.get(chunk as usize * CHUNK_WORDS..(chunk as usize + 1) * CHUNK_WORDS);
                if words.is_some_and(|ws| ws.iter().all(|&x| x == !0)) {
                    let merged = n > 0
                        && out[n - 1].start + out[n - 1].count == run.start
                        && out[n - 1].count + run.count <= max_run;
                    if !merged && n == out.len() {
                        return n; // full: this chunk stays marked for the next pass
                    }
                    self.take(run);
                    if merged {
                        out[n - 1].count += run.count;
                    } else {
                        out[n] = run;
                        n += 1;
                    }
                }
                self.freed[w] &= self.freed[w] - 1;
            }
        }
        self.freed_any = false;
        n
    }

    fn take(&mut self, run: FrameRun) {
        self.for_each_word(run, |word, mask| {
            debug_assert!(*word & mask == mask);
            *word &= !mask;
        });
        self.free -= run.count;
    }

    fn bits(&self) -> u64 {
        self.bitmap.len() as u64 * 64
    }

    /// The first free frame in `from..to`.
    fn find_free(&self, from: u64, to: u64) -> Option<u64> {
        let mut w = (from / 64) as usize;
        let mut word = *self.bitmap.get(w)? & (!0 << (from % 64));
        loop {
            if word != 0 {
                let pfn = w as u64 * 64 + word.trailing_zeros() as u64;
                return (pfn < to).then_some(pfn);
            }
            w += 1;
            if w as u64 * 64 >= to {
                return None;
            }
            word = *self.bitmap.get(w)?;
        }
    }

    /// How many frames from `start` on are free, up to `max`.
    fn free_len(&self, start: u64, max: u64) -> u64 {
        let mut len = 0;
        while len < max {
            let pfn = start + len;
            let Some(&word) = self.bitmap.get((pfn / 64) as usize) else { break };
            let shift = pfn % 64;
            let ones = (word >> shift).trailing_ones() as u64;
            len += ones;
            if ones < 64 - shift {
                break;
            }
        }
        len.min(max)
    }

    /// Calls `f(word, mask)` for each bitmap word holding frames of `run`, `mask`
    /// selecting those frames.
    fn for_each_word(&mut self, run: FrameRun, mut f: impl FnMut(&mut u64, u64)) {
        let end = run.start + run.count;
        let mut pfn = run.start;
        while pfn < end {
            let w = pfn / 64;
            let lo = pfn % 64;
            let hi = (end - w * 64).min(64);
            f(&mut self.bitmap[w as usize], (!0u64 >> (64 - (hi - lo))) << lo);
            pfn = w * 64 + hi;
        }
    }
}
