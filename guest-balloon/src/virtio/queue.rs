//! A split virtqueue in one 4 KiB frame: descriptor table, available ring, used
//! ring. The driver decides which descriptors a buffer uses (the balloon gives each
//! of its buffers fixed descriptors), so there is no free list here.
//!
//! Ordering: descriptors and ring entries are written before the available index
//! is published with release ordering; the used index is read with acquire
//! ordering before the used entries it covers.

use core::sync::atomic::{AtomicU16, Ordering};

use guest_abi::PAGE_SIZE;

/// Descriptors per queue (the available and used rings have as many entries).
pub const QUEUE_SIZE: u16 = 128;
/// Descriptor flag: the chain continues at `next`.
pub const DESC_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer (else it reads it).
pub const DESC_WRITE: u16 = 2;

const DESC_BYTES: u64 = 16;
const AVAIL: u64 = DESC_BYTES * QUEUE_SIZE as u64;
/// The used ring must be 4-byte aligned; after `flags, idx, ring[N], used_event`.
const USED: u64 = (AVAIL + 6 + 2 * QUEUE_SIZE as u64).next_multiple_of(4);
const _: () = assert!(USED + 6 + 8 * QUEUE_SIZE as u64 <= PAGE_SIZE);

/// One queue of a device.
pub struct Virtq {
    index: u16,
    base: u64,
    /// Next available index (published by [`Virtq::publish`]).
    avail_idx: u16,
    /// Used entries consumed so far.
    last_used: u16,
}

impl Virtq {
    /// Queue number `index` of its device, in the frame at `base` (zeroed here).
    pub fn new(index: u16, base: u64) -> Virtq {
        // SAFETY: the caller gives a whole frame of RAM owned by this queue.
        unsafe { core::ptr::write_bytes(base as *mut u8, 0, PAGE_SIZE as usize) };
        Virtq { index, base, avail_idx: 0, last_used: 0 }
    }

    /// The queue's number.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Its number of descriptors.
    pub fn size(&self) -> u16 {
        QUEUE_SIZE
    }

    /// Guest-physical address of the descriptor table.
    pub fn desc_addr(&self) -> u64 {
        self.base
    }

    /// Guest-physical address of the available ring.
    pub fn avail_addr(&self) -> u64 {
        self.base + AVAIL
    }

    /// Guest-physical address of the used ring.
    pub fn used_addr(&self) -> u64 {
        self.base + USED
    }

    /// Writes descriptor `i`.
    pub fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(i < QUEUE_SIZE && next < QUEUE_SIZE);
        let d = (self.base + i as u64 * DESC_BYTES) as *mut u8;
        // SAFETY: descriptor `i` lies in this queue's frame; the device reads it
        // only after the available index that covers it is published.
        unsafe {
            d.cast::<u64>().write_volatile(addr);
            d.add(8).cast::<u32>().write_volatile(len);
            d.add(12).cast::<u16>().write_volatile(flags);
            d.add(14).cast::<u16>().write_volatile(next);
        }
    }

    /// Puts the chain starting at descriptor `head` on the available ring (seen by
    /// the device after [`Virtq::publish`]).
    pub fn offer(&mut self, head: u16) {
        let slot = self.base + AVAIL + 4 + 2 * (self.avail_idx % QUEUE_SIZE) as u64;
        // SAFETY: a ring entry inside this queue's frame, not yet visible to the device.
        unsafe { (slot as *mut u16).write_volatile(head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Makes every offered chain visible to the device.
    pub fn publish(&self) {
        self.field(AVAIL + 2).store(self.avail_idx, Ordering::Release);
    }

    /// The head of the next chain the device has finished with, if any.
    pub fn take_used(&mut self) -> Option<u16> {
        if self.field(USED + 2).load(Ordering::Acquire) == self.last_used {
            return None;
        }
        let entry = self.base + USED + 4 + 8 * (self.last_used % QUEUE_SIZE) as u64;
        // SAFETY: a used entry the device published (acquire above), in this frame.
        let id = unsafe { (entry as *const u32).read_volatile() };
        self.last_used = self.last_used.wrapping_add(1);
        Some(id as u16)
    }

    fn field(&self, offset: u64) -> &AtomicU16 {
        // SAFETY: a naturally aligned u16 of this queue's frame, shared with the
        // device and only ever accessed atomically.
        unsafe { AtomicU16::from_ptr((self.base + offset) as *mut u16) }
    }
}
