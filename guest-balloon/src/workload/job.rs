//! Page work that all vCPUs share: filling, touching, verifying and zeroing pages.
//!
//! A [`Job`] names a window of the allocated set (positions `first..first + count`,
//! modulo the set's length, so `touch` can wrap around) and what to do with each
//! page. `smp` splits it into chunks that the vCPUs claim; [`Job::run`] does one
//! chunk.

use core::ops::Range;

use guest_abi::content::{self, Page};

use crate::control::Control;
use crate::mm::frame_addr;
use crate::workload::pages::PageMeta;

/// What a job does to each page.
#[derive(Clone, Copy)]
pub enum Op {
    /// Write the content its record says (after `alloc`).
    Fill,
    /// Bump its version and write the new content.
    Touch,
    /// Compare it with the content its record says (reads only).
    Verify,
    /// Write zeros (before `free ... zero` returns it).
    Zero,
}

/// A page job; see the module documentation.
#[derive(Clone, Copy)]
pub struct Job {
    /// What to do.
    pub op: Op,
    /// The page records (`PageSet::records`).
    pub records: *mut PageMeta,
    /// Number of records (positions wrap around at this).
    pub set_len: u64,
    /// First position.
    pub first: u64,
    /// Number of pages (at most `set_len`: each page once).
    pub count: u64,
    /// The VM's seed (touched content depends on it).
    pub vm_seed: u64,
    /// Where progress is signalled.
    pub control: Control,
}

/// What verification found.
#[derive(Clone, Copy, Default)]
pub struct Tally {
    /// Pages whose content was wrong.
    pub bad: u64,
    /// The lowest position of such a page.
    pub first_bad: Option<u64>,
}

impl Job {
    /// Processes the pages at offsets `offsets` of the job's window.
    pub fn run(&self, offsets: Range<u64>) -> Tally {
        let mut tally = Tally::default();
        for off in offsets {
            let pos = (self.first + off) % self.set_len;
            // SAFETY: pos < set_len; each offset belongs to exactly one chunk, so no
            // other vCPU uses this record while the job runs.
            let meta = unsafe { &mut *self.records.add(pos as usize) };
            // SAFETY: the frame is allocated to this page and identity-mapped; only
            // the vCPU holding its record touches it during the job.
            let page = unsafe { &mut *frame_addr(meta.pfn as u64).cast::<Page>() };
            match self.op {
                Op::Fill => content::fill(page, meta.key),
                Op::Touch => {
                    meta.version = meta.version.wrapping_add(1).max(1);
                    content::fill(page, meta.current_key(self.vm_seed));
                }
                Op::Zero => content::fill(page, content::ZERO_KEY),
                Op::Verify => {
                    if !content::matches(page, meta.current_key(self.vm_seed)) {
                        tally.bad += 1;
                        tally.first_bad = Some(tally.first_bad.map_or(pos, |p| p.min(pos)));
                    }
                }
            }
        }
        tally
    }
}
