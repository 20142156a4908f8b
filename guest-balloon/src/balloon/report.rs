//! Free page reporting: whole 2 MiB chunks that the workload freed are reported to
//! the host, which frees their memory. A chunk is taken out of the allocator while
//! its report is in flight (the host may drop its contents at any moment until it
//! returns the buffer) and comes back as memory with no host page behind it.
//!
//! Like Linux, the driver waits a little after frees before reporting
//! ([`REPORT_DELAY_US`]), so that memory a workload frees and allocates again at
//! once is not dropped and faulted back in.

use guest_abi::PAGE_SIZE;

use crate::clock::Clock;
use crate::mm::frame_alloc::{FrameAllocator, FrameRun, CHUNK_FRAMES};
use crate::virtio::mmio::Transport;
use crate::virtio::queue::{Virtq, DESC_NEXT, DESC_WRITE, QUEUE_SIZE};

/// How long freed memory stays unreported at least.
pub const REPORT_DELAY_US: u64 = 500_000;
/// Ranges per report (one descriptor each).
const RANGES: usize = 32;
/// Largest range of one descriptor: 32 chunks, 64 MiB.
const MAX_RUN: u64 = 32 * CHUNK_FRAMES;

/// The reporting queue and the report in flight.
pub struct Reporter {
    q: Virtq,
    runs: [FrameRun; RANGES],
    /// Ranges of the report in flight (0: none).
    in_flight: usize,
    /// When frees were first noticed since the last report.
    freed_at: Option<u64>,
}

const _: () = assert!(RANGES <= QUEUE_SIZE as usize);

impl Reporter {
    /// Queue number `index`, with its ring taken from `frames`.
    pub fn new(index: u16, frames: &mut FrameAllocator) -> Option<Reporter> {
        let ring = frames.alloc_contiguous(1)?;
        Some(Reporter {
            q: Virtq::new(index, ring * PAGE_SIZE),
            runs: [FrameRun { start: 0, count: 0 }; RANGES],
            in_flight: 0,
            freed_at: None,
        })
    }

    /// The virtqueue (for the transport's setup).
    pub fn virtq(&self) -> &Virtq {
        &self.q
    }

    /// Whether a report is with the device.
    pub fn busy(&self) -> bool {
        self.in_flight > 0
    }

    /// Returns the chunks of a report the device has finished with.
    pub fn complete(&mut self, frames: &mut FrameAllocator) {
        if self.q.take_used().is_some() && self.in_flight > 0 {
            for run in &self.runs[..self.in_flight] {
                frames.free_unbacked(*run);
            }
            self.in_flight = 0;
        }
    }

    /// Sends a report if chunks were freed long enough ago and none is in flight.
    pub fn poll(&mut self, frames: &mut FrameAllocator, transport: &Transport, clock: &Clock) {
        if self.in_flight > 0 {
            return;
        }
        if !frames.freed_since_report() {
            self.freed_at = None;
            return;
        }
        let since = *self.freed_at.get_or_insert_with(|| clock.now());
        if clock.us_since(since) < REPORT_DELAY_US {
            return;
        }
        let n = frames.take_reportable(&mut self.runs, MAX_RUN);
        if !frames.freed_since_report() {
            self.freed_at = None; // everything looked at; a full report leaves the rest for next time
        }
        if n == 0 {
            return;
        }
        for (i, run) in self.runs[..n].iter().enumerate() {
            let more = i + 1 < n;
            let flags = DESC_WRITE | if more { DESC_NEXT } else { 0 };
            let next = if more { i as u16 + 1 } else { 0 };
            self.q.set_desc(i as u16, run.start * PAGE_SIZE, (run.count * PAGE_SIZE) as u32, flags, next);
        }
        self.q.offer(0);
        self.q.publish();
        self.in_flight = n;
        transport.notify(self.q.index());
    }
}
