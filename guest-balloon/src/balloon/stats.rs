//! The statistics queue: the driver keeps one buffer of `{le16 tag; le64 value}`
//! entries with the device; the device returns it when it wants fresh numbers,
//! and the driver refills and re-posts it at its next poll.

use guest_abi::PAGE_SIZE;

use crate::mm::frame_alloc::FrameAllocator;
use crate::virtio::mmio::Transport;
use crate::virtio::queue::Virtq;

/// Free memory, bytes.
pub const MEMFREE: u16 = 4;
/// Total memory, bytes.
pub const MEMTOT: u16 = 5;
/// Memory available to new allocations without reclaim, bytes.
pub const AVAIL: u16 = 6;
/// Linux 6.12's OOM-kill count; here: allocations refused for lack of memory.
pub const OOM_KILL: u16 = 10;
/// Allocations that had to wait for reclaim; here: deflations on OOM.
pub const ALLOC_STALL: u16 = 11;
/// Pages reclaimed directly for allocations; here: pages deflated on OOM.
pub const DIRECT_RECLAIM: u16 = 15;

/// Bytes of one entry.
const ENTRY: usize = 10;

/// The statistics queue and its one buffer.
pub struct Stats {
    q: Virtq,
    buf: u64,
}

impl Stats {
    /// Queue number `index`, with its ring and buffer taken from `frames`.
    pub fn new(index: u16, frames: &mut FrameAllocator) -> Option<Stats> {
        let ring = frames.alloc_contiguous(1)?;
        let buf = frames.alloc_contiguous(1)?;
        Some(Stats { q: Virtq::new(index, ring * PAGE_SIZE), buf: buf * PAGE_SIZE })
    }

    /// The virtqueue (for the transport's setup).
    pub fn virtq(&self) -> &Virtq {
        &self.q
    }

    /// True once the device has returned the buffer (it wants fresh numbers).
    pub fn wanted(&mut self) -> bool {
        let mut back = false;
        while self.q.take_used().is_some() {
            back = true;
        }
        back
    }

    /// Writes `entries` into the buffer and hands it to the device.
    pub fn send(&mut self, transport: &Transport, entries: &[(u16, u64)]) {
        let p = self.buf as *mut u8;
        for (i, &(tag, value)) in entries.iter().enumerate() {
            let mut e = [0u8; ENTRY];
            e[..2].copy_from_slice(&tag.to_le_bytes());
            e[2..].copy_from_slice(&value.to_le_bytes());
            // SAFETY: entries are few (< 400 fit a frame); the buffer is ours
            // while the device does not hold it.
            unsafe { core::ptr::copy_nonoverlapping(e.as_ptr(), p.add(i * ENTRY), ENTRY) };
        }
        self.q.set_desc(0, self.buf, (entries.len() * ENTRY) as u32, 0, 0);
        self.q.offer(0);
        self.q.publish();
        transport.notify(self.q.index());
    }
}
