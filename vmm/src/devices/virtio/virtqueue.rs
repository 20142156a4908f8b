//! Split virtqueues held to the virtio 1.x rules, over virtio-queue's `Queue`.
//!
//! virtio-queue keeps a queue's indices and writes the used ring. What a hostile
//! driver can break is checked here first, because virtio-queue meets bad input by
//! logging an error on every occurrence and carrying on: it keeps its default ring
//! address (GPA 0) when given a misaligned one, follows indirect descriptors whatever
//! was negotiated, and cuts a looping chain short without saying so. This module
//! never lets a driver reach those paths:
//!
//! - [`RingLayout::check`] (at DRIVER_OK): a power-of-two size up to the device's
//!   maximum; each ring aligned (descriptor table 16 bytes, available ring 2, used
//!   ring 4), not at GPA 0 (virtio-queue reads that as "not set up"), inside one RAM
//!   region; and [`check_disjoint`]: no ring overlaps another ring of the device.
//! - [`Virtqueue::pop`] reads the available index once per call. An index more than
//!   the queue size ahead of the device, or a head index outside the queue, breaks
//!   the ring for good ([`RingError`]: the device must ask for a reset, since it
//!   cannot complete a head it cannot name). Each chain is walked here: at most
//!   queue-size descriptors (so a loop is caught after `size` reads), every `next`
//!   inside the table, no indirect descriptor (the devices do not offer
//!   VIRTIO_F_INDIRECT_DESC). A chain that breaks these rules is handed back as
//!   [`Popped::Malformed`], to be refused whole and completed unused.
//!
//! The descriptors of a chain are copied into a buffer the caller reuses (at most
//! `size` entries of 16 bytes): popping allocates nothing per chain.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::GuestRam;

/// Bytes of one descriptor.
const DESC_SIZE: u64 = 16;

/// One of the three areas of a split virtqueue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    /// The descriptor table.
    Descriptors,
    /// The available ring (driver to device).
    Available,
    /// The used ring (device to driver).
    Used,
}

impl std::fmt::Display for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ring::Descriptors => "descriptor table",
            Ring::Available => "available ring",
            Ring::Used => "used ring",
        })
    }
}

impl Ring {
    /// Alignment the virtio 1.x spec requires (2.7 Split Virtqueues).
    fn align(self) -> u64 {
        match self {
            Ring::Descriptors => 16,
            Ring::Available => 2,
            Ring::Used => 4,
        }
    }

    /// Bytes of the area for a queue of `size` (with the event index fields).
    fn len(self, size: u16) -> u64 {
        let n = size as u64;
        match self {
            Ring::Descriptors => DESC_SIZE * n,
            Ring::Available => 6 + 2 * n,
            Ring::Used => 6 + 8 * n,
        }
    }
}

/// Why a queue configuration is refused at DRIVER_OK (the device then sets
/// NEEDS_RESET).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueConfigError {
    /// Not a power of two from 1 to the device's maximum.
    #[error("queue size {size} is not a power of two from 1 to {max}")]
    Size {
        /// Size the driver chose.
        size: u16,
        /// The device's maximum.
        max: u16,
    },
    /// Misaligned ring.
    #[error("{ring} at {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        /// Which ring.
        ring: Ring,
        /// Its address.
        addr: u64,
        /// The alignment required.
        align: u64,
    },
    /// A ring at GPA 0.
    #[error("{ring} at GPA 0")]
    Null {
        /// Which ring.
        ring: Ring,
    },
    /// A ring not inside one RAM region.
    #[error("{ring} at {addr:#x}+{len:#x} is not inside guest RAM")]
    OutsideRam {
        /// Which ring.
        ring: Ring,
        /// Its address.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// Two rings share memory.
    #[error("the {ring} of queue {queue} overlaps the {other_ring} of queue {other_queue}")]
    Overlap {
        /// One queue.
        queue: usize,
        /// Its ring.
        ring: Ring,
        /// The other queue (may be the same).
        other_queue: usize,
        /// Its ring.
        other_ring: Ring,
    },
}

/// Where the driver put a queue, as written to the transport's registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingLayout {
    /// Queue size (number of descriptors).
    pub size: u16,
    /// GPA of the descriptor table.
    pub desc: u64,
    /// GPA of the available ring.
    pub avail: u64,
    /// GPA of the used ring.
    pub used: u64,
}

impl RingLayout {
    /// `(ring, address, length)` of the three areas.
    fn areas(&self) -> [(Ring, u64, u64); 3] {
        [Ring::Descriptors, Ring::Available, Ring::Used].map(|r| {
            let addr = match r {
                Ring::Descriptors => self.desc,
                Ring::Available => self.avail,
                Ring::Used => self.used,
            };
            (r, addr, r.len(self.size))
        })
    }

    /// Checks size, alignment and placement of one queue (not overlaps: see
    /// [`check_disjoint`]).
    pub fn check(&self, ram: &GuestRam, max_size: u16) -> Result<(), QueueConfigError> {
        if self.size == 0 || self.size > max_size || !self.size.is_power_of_two() {
            return Err(QueueConfigError::Size { size: self.size, max: max_size });
        }
        for (ring, addr, len) in self.areas() {
            if addr % ring.align() != 0 {
                return Err(QueueConfigError::Misaligned { ring, addr, align: ring.align() });
            }
            if addr == 0 {
                return Err(QueueConfigError::Null { ring });
            }
            if !ram.contains(addr, len) {
                return Err(QueueConfigError::OutsideRam { ring, addr, len });
            }
        }
        Ok(())
    }
}

/// Checks that no ring of `queues` (index, layout; each already passed
/// [`RingLayout::check`]) overlaps another one, of the same queue or another.
pub fn check_disjoint(queues: &[(usize, RingLayout)]) -> Result<(), QueueConfigError> {
    let areas: Vec<(usize, Ring, u64, u64)> =
        queues.iter().flat_map(|&(q, l)| l.areas().map(|(r, a, n)| (q, r, a, a + n))).collect();
    for (i, &(queue, ring, start, end)) in areas.iter().enumerate() {
        for &(other_queue, other_ring, s, e) in &areas[i + 1..] {
            if start < e && s < end {
                return Err(QueueConfigError::Overlap { queue, ring, other_queue, other_ring });
            }
        }
    }
    Ok(())
}

/// The driver broke the ring itself: the device cannot go on with this queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The available index ran ahead of the device by more than the queue size.
    #[error("available index {avail} is {ahead} entries ahead of the device (queue size {size})")]
    AvailIndex {
        /// The index the driver wrote.
        avail: u16,
        /// Entries it claims are available.
        ahead: u16,
        /// The queue size.
        size: u16,
    },
    /// A head index outside the descriptor table.
    #[error("head index {head} in the available ring (queue size {size})")]
    HeadIndex {
        /// The head index.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// A ring could not be read or written (it was checked to be RAM: not expected).
    #[error("cannot access the {0}")]
    Memory(Ring),
}

/// Why a chain is refused whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// More descriptors than the queue size: a loop, or a chain too long.
    #[error("chain longer than the queue size ({size} descriptors): it loops or is too long")]
    TooLong {
        /// The queue size.
        size: u16,
    },
    /// A `next` index outside the descriptor table.
    #[error("descriptor links to index {next} (queue size {size})")]
    NextIndex {
        /// The index.
        next: u16,
        /// The queue size.
        size: u16,
    },
    /// An indirect descriptor (VIRTIO_F_INDIRECT_DESC is not offered).
    #[error("indirect descriptor (VIRTIO_F_INDIRECT_DESC was not negotiated)")]
    Indirect,
}

/// A chain taken from the available ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Popped {
    /// A well-formed chain with this head; its descriptors are in the caller's buffer.
    Chain(u16),
    /// A chain that broke the rules: refuse it whole, and complete it unused.
    Malformed(u16, ChainError),
}

/// A running split virtqueue.
pub struct Virtqueue {
    queue: Queue,
    size: u16,
}

impl Virtqueue {
    /// A queue over `layout`, which [`RingLayout::check`] accepted for `max_size`.
    pub fn new(layout: RingLayout, max_size: u16) -> Self {
        let mut queue = Queue::new(max_size).expect("the device's maximum queue size is valid");
        queue.try_set_size(layout.size).expect("size checked");
        queue.try_set_desc_table_address(GuestAddress(layout.desc)).expect("alignment checked");
        queue.try_set_avail_ring_address(GuestAddress(layout.avail)).expect("alignment checked");
        queue.try_set_used_ring_address(GuestAddress(layout.used)).expect("alignment checked");
        queue.set_ready(true);
        Virtqueue { queue, size: layout.size }
    }

    /// Chains made available and not yet popped.
    pub fn pending(&self, mem: &GuestMemoryMmap) -> Result<u16, RingError> {
        let avail = self.queue.avail_idx(mem, Ordering::Acquire).map_err(|_| RingError::Memory(Ring::Available))?;
        let ahead = (avail - Wrapping(self.queue.next_avail())).0;
        if ahead > self.size {
            return Err(RingError::AvailIndex { avail: avail.0, ahead, size: self.size });
        }
        Ok(ahead)
    }

    /// Takes the next available chain, copying its descriptors into `descs`
    /// (cleared first); `None` if the driver made none available.
    pub fn pop(&mut self, mem: &GuestMemoryMmap, descs: &mut Vec<Descriptor>) -> Result<Option<Popped>, RingError> {
        descs.clear();
        if self.pending(mem)? == 0 {
            return Ok(None);
        }
        // The driver may move the index between the check above and this read: the
        // iterator checks it again.
        let head = match self.queue.iter(mem) {
            Ok(mut chains) => match chains.next() {
                Some(chain) => chain.head_index(),
                None => return Ok(None),
            },
            Err(_) => {
                return Err(self.pending(mem).err().unwrap_or(RingError::Memory(Ring::Available)));
            }
        };
        if head >= self.size {
            return Err(RingError::HeadIndex { head, size: self.size });
        }
        let table = self.queue.desc_table();
        let mut index = head;
        loop {
            if descs.len() == self.size as usize {
                return Ok(Some(Popped::Malformed(head, ChainError::TooLong { size: self.size })));
            }
            let desc: Descriptor = mem
                .read_obj(GuestAddress(table + index as u64 * DESC_SIZE))
                .map_err(|_| RingError::Memory(Ring::Descriptors))?;
            if desc.refers_to_indirect_table() {
                return Ok(Some(Popped::Malformed(head, ChainError::Indirect)));
            }
            descs.push(desc);
            if !desc.has_next() {
                return Ok(Some(Popped::Chain(head)));
            }
            index = desc.next();
            if index >= self.size {
                return Ok(Some(Popped::Malformed(head, ChainError::NextIndex { next: index, size: self.size })));
            }
        }
    }

    /// Returns chain `head` (from [`Virtqueue::pop`]) to the driver, `len` bytes
    /// written into it.
    pub fn complete(&mut self, mem: &GuestMemoryMmap, head: u16, len: u32) -> Result<(), RingError> {
        self.queue.add_used(mem, head, len).map_err(|_| RingError::Memory(Ring::Used))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::HostPages;

    fn ram() -> GuestRam {
        GuestRam::new(16 << 20, HostPages::Small).unwrap()
    }

    fn layout(size: u16, base: u64) -> RingLayout {
        RingLayout { size, desc: base, avail: base + 0x1000, used: base + 0x2000 }
    }

    #[test]
    fn layouts_must_be_aligned_in_ram_and_apart() {
        let ram = ram();
        let max = 256;
        assert_eq!(layout(16, 0x10_0000).check(&ram, max), Ok(()));
        assert_eq!(layout(12, 0x10_0000).check(&ram, max), Err(QueueConfigError::Size { size: 12, max }));
        assert_eq!(layout(512, 0x10_0000).check(&ram, max), Err(QueueConfigError::Size { size: 512, max }));
        let misaligned = RingLayout { desc: 0x10_0008, ..layout(16, 0x10_0000) };
        assert!(matches!(
            misaligned.check(&ram, max),
            Err(QueueConfigError::Misaligned { ring: Ring::Descriptors, .. })
        ));
        let odd_avail = RingLayout { avail: 0x10_1001, ..layout(16, 0x10_0000) };
        assert!(matches!(odd_avail.check(&ram, max), Err(QueueConfigError::Misaligned { ring: Ring::Available, .. })));
        let used2 = RingLayout { used: 0x10_2002, ..layout(16, 0x10_0000) };
        assert!(matches!(used2.check(&ram, max), Err(QueueConfigError::Misaligned { ring: Ring::Used, .. })));
        let null = RingLayout { desc: 0, ..layout(16, 0x10_0000) };
        assert_eq!(null.check(&ram, max), Err(QueueConfigError::Null { ring: Ring::Descriptors }));
        // The used ring of a 256-entry queue runs past the end of RAM.
        let top = RingLayout { used: (16 << 20) - 0x800, ..layout(256, 0x10_0000) };
        assert!(matches!(top.check(&ram, max), Err(QueueConfigError::OutsideRam { ring: Ring::Used, .. })));
        let hole = RingLayout { avail: 0xd000_0000, ..layout(16, 0x10_0000) };
        assert!(matches!(hole.check(&ram, max), Err(QueueConfigError::OutsideRam { .. })));
        let wrap = RingLayout { used: u64::MAX - 3, ..layout(16, 0x10_0000) };
        assert!(matches!(wrap.check(&ram, max), Err(QueueConfigError::OutsideRam { .. })));

        assert_eq!(check_disjoint(&[(0, layout(16, 0x10_0000)), (1, layout(16, 0x20_0000))]), Ok(()));
        let shared_used = RingLayout { used: 0x20_2000, ..layout(16, 0x10_0000) };
        assert!(matches!(
            check_disjoint(&[(0, shared_used), (1, layout(16, 0x20_0000))]),
            Err(QueueConfigError::Overlap { queue: 0, ring: Ring::Used, other_queue: 1, other_ring: Ring::Used })
        ));
        // Within one queue: a 256-entry descriptor table (4 KiB) reaches its own avail ring.
        let tight = RingLayout { size: 256, desc: 0x10_0000, avail: 0x10_0ff0, used: 0x10_2000 };
        assert!(matches!(
            check_disjoint(&[(0, tight)]),
            Err(QueueConfigError::Overlap { queue: 0, other_queue: 0, .. })
        ));
    }
}
