//! The inflate and deflate queues: buffers of page frame numbers (le32, 256 per
//! buffer, as Linux sends them), several in flight at once so that one
//! notification hands the host a large batch it can sort and merge into ranges.
//!
//! Buffer `b` always uses descriptor `b`, so the used ring's head names the
//! buffer the device finished with.

use guest_abi::PAGE_SIZE;

use crate::mm::frame_addr;
use crate::mm::frame_alloc::FrameAllocator;
use crate::virtio::queue::Virtq;

/// PFNs per buffer.
const PFNS_PER_BUFFER: usize = 256;
/// Buffers per queue (8192 pages, 32 MiB, per round trip).
const BUFFERS: usize = 32;
const BUFFER_BYTES: u64 = (PFNS_PER_BUFFER * 4) as u64;

/// A queue of PFN buffers.
pub struct PfnQueue {
    q: Virtq,
    /// `BUFFERS` arrays of `PFNS_PER_BUFFER` PFNs, contiguous.
    bufs: *mut u32,
    /// PFNs in each buffer while it is in flight.
    lens: [u16; BUFFERS],
    /// Bit `b`: buffer `b` is with the device.
    busy: u32,
    in_flight: u64,
}

impl PfnQueue {
    /// Queue number `index`, with its ring and buffers taken from `frames`.
    pub fn new(index: u16, frames: &mut FrameAllocator) -> Option<PfnQueue> {
        let ring = frames.alloc_contiguous(1)?;
        let bufs = frames.alloc_contiguous((BUFFERS as u64 * BUFFER_BYTES).div_ceil(PAGE_SIZE))?;
        Some(PfnQueue {
            q: Virtq::new(index, ring * PAGE_SIZE),
            bufs: frame_addr(bufs).cast::<u32>(),
            lens: [0; BUFFERS],
            busy: 0,
            in_flight: 0,
        })
    }

    /// The virtqueue (for the transport's setup and notifications).
    pub fn virtq(&self) -> &Virtq {
        &self.q
    }

    /// PFNs the device has not returned yet.
    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }

    /// PFNs that fit in the buffers not in flight.
    pub fn capacity(&self) -> u64 {
        (BUFFERS as u64 - self.busy.count_ones() as u64) * PFNS_PER_BUFFER as u64
    }

    /// Fills free buffers with up to `max` PFNs from `next` and offers them;
    /// returns the number posted (the caller notifies the device when > 0). Takes
    /// no more than `max.min(self.capacity())` PFNs from `next`.
    pub fn post(&mut self, max: u64, mut next: impl FnMut() -> Option<u64>) -> u64 {
        let mut posted = 0;
        for b in 0..BUFFERS {
            if posted >= max {
                break;
            }
            if self.busy & 1 << b != 0 {
                continue;
            }
            let buf = self.buffer(b);
            let mut n = 0;
            while n < PFNS_PER_BUFFER && posted + (n as u64) < max {
                let Some(pfn) = next() else { break };
                // SAFETY: n < PFNS_PER_BUFFER, inside buffer `b`, which the device
                // does not own (not busy).
                unsafe { buf.add(n).write_volatile(pfn as u32) };
                n += 1;
            }
            if n == 0 {
                break;
            }
            self.q.set_desc(b as u16, buf as u64, (n * 4) as u32, 0, 0);
            self.q.offer(b as u16);
            self.busy |= 1 << b;
            self.lens[b] = n as u16;
            posted += n as u64;
            if n < PFNS_PER_BUFFER {
                break;
            }
        }
        if posted > 0 {
            self.q.publish();
        }
        self.in_flight += posted;
        posted
    }

    /// Passes the PFNs of every buffer the device has finished with to `done`.
    pub fn complete(&mut self, mut done: impl FnMut(&[u32])) {
        let mut pages = 0;
        while let Some(head) = self.q.take_used() {
            let b = head as usize;
            if b >= BUFFERS || self.busy & 1 << b == 0 {
                continue; // not a buffer of ours in flight: nothing to do
            }
            self.busy &= !(1 << b);
            let n = self.lens[b] as usize;
            // SAFETY: buffer `b` is back from the device; its first n entries are
            // the PFNs written by `post`.
            done(unsafe { core::slice::from_raw_parts(self.buffer(b), n) });
            pages += n as u64;
        }
        self.in_flight -= pages;
    }

    fn buffer(&self, b: usize) -> *mut u32 {
        // SAFETY: b < BUFFERS: inside the buffer frames.
        unsafe { self.bufs.add(b * PFNS_PER_BUFFER) }
    }
}
