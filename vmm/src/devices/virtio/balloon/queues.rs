//! What the buffers of each balloon queue mean, read defensively: every address,
//! length and count comes from the guest and is checked before use.
//!
//! The chain itself was walked by [`Virtqueue::pop`](crate::devices::virtio::Virtqueue::pop)
//! (bounded, no loops, no indirect descriptors); here its buffers are checked
//! against their queue's rules and copied once into host memory the caller reuses,
//! so the guest cannot change them between the check and the use. A buffer that
//! breaks a rule is refused whole: nothing of it is acted on.

use guest_abi::PAGE_SIZE;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::memory::GuestRam;

/// Most PFNs in one inflate or deflate chain (as Linux and the project's driver
/// send at most, and Firecracker accepts).
pub const MAX_PFNS: usize = 256;
/// Size of one statistics entry: `le16 tag; le64 val` (packed).
pub const STAT_ENTRY: usize = 10;
/// Most entries in one statistics buffer (Linux 6.12 sends 16 tags).
pub const MAX_STATS: usize = 64;

/// Why a buffer is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BufferError {
    /// A descriptor the device must read is device-writable, or the reverse.
    #[error("descriptor with the wrong direction for this queue")]
    Direction,
    /// A length that is not a multiple of the element size.
    #[error("buffer length {0} is not a multiple of {1}")]
    Length(u32, usize),
    /// More bytes than the queue's buffers may hold.
    #[error("buffers of {0} bytes in one chain, more than the {1} allowed")]
    TooLarge(u64, usize),
    /// The buffer is not (entirely) in guest RAM.
    #[error("buffer at {0:#x} is not in guest RAM")]
    Memory(u64),
    /// The chain holds no buffer of the expected kind.
    #[error("descriptor chain without buffers")]
    Empty,
    /// PFNs that are not guest RAM (the MMIO hole, beyond RAM).
    #[error("{count} PFNs are not guest RAM (the first: {first:#x})")]
    PfnOutsideRam {
        /// The first such PFN.
        first: u64,
        /// How many.
        count: u64,
    },
    /// A reported range that is empty, unaligned or not inside one RAM region.
    #[error("reported range {0:#x}+{1:#x} is not a page-aligned range of guest RAM")]
    Range(u64, u64),
    /// Two reported ranges of one chain overlap.
    #[error("reported ranges of one chain overlap at {0:#x}")]
    Overlap(u64),
}

/// Copies the device-readable bytes of `descs` into `out` (cleared first), each
/// descriptor's length a multiple of `unit`, `max` bytes at most.
fn read_bytes(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    unit: usize,
    max: usize,
    out: &mut Vec<u8>,
) -> Result<(), BufferError> {
    out.clear();
    let total: u64 = descs.iter().map(|d| d.len() as u64).sum();
    if total > max as u64 {
        return Err(BufferError::TooLarge(total, max));
    }
    for desc in descs {
        if desc.is_write_only() {
            return Err(BufferError::Direction);
        }
        if desc.len() as usize % unit != 0 {
            return Err(BufferError::Length(desc.len(), unit));
        }
        let start = out.len();
        out.resize(start + desc.len() as usize, 0);
        mem.read_slice(&mut out[start..], desc.addr()).map_err(|_| BufferError::Memory(desc.addr().0))?;
    }
    if out.is_empty() {
        return Err(BufferError::Empty);
    }
    Ok(())
}

/// The PFNs (le32 each) of an inflate or deflate chain, into `pfns` (cleared
/// first), every one of them guest RAM by `is_ram`. `bytes` is scratch space.
pub fn pfns(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    is_ram: impl Fn(u64) -> bool,
    bytes: &mut Vec<u8>,
    pfns: &mut Vec<u64>,
) -> Result<(), BufferError> {
    pfns.clear();
    read_bytes(mem, descs, 4, MAX_PFNS * 4, bytes)?;
    pfns.extend(bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap()) as u64));
    let mut outside = pfns.iter().filter(|&&p| !is_ram(p));
    if let Some(&first) = outside.next() {
        return Err(BufferError::PfnOutsideRam { first, count: 1 + outside.count() as u64 });
    }
    Ok(())
}

/// The `(tag, value)` entries of a statistics buffer (10 bytes each; the spec's
/// "multiple of 6" is a known error), into `entries` (cleared first).
pub fn stats(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    bytes: &mut Vec<u8>,
    entries: &mut Vec<(u16, u64)>,
) -> Result<(), BufferError> {
    entries.clear();
    read_bytes(mem, descs, STAT_ENTRY, MAX_STATS * STAT_ENTRY, bytes)?;
    entries.extend(
        bytes
            .chunks_exact(STAT_ENTRY)
            .map(|e| (u16::from_le_bytes([e[0], e[1]]), u64::from_le_bytes(e[2..10].try_into().unwrap()))),
    );
    Ok(())
}

/// The free ranges `(gpa, len)` of a free-page-reporting chain, into `ranges`
/// (cleared first, left sorted): each descriptor is one free range, device-writable,
/// page-aligned, inside one RAM region, overlapping no other range of the chain (so
/// one chain never reports more than the guest's RAM).
pub fn reported_ranges(ram: &GuestRam, descs: &[Descriptor], ranges: &mut Vec<(u64, u64)>) -> Result<(), BufferError> {
    ranges.clear();
    for desc in descs {
        if !desc.is_write_only() {
            return Err(BufferError::Direction);
        }
        let (addr, len) = (desc.addr().0, desc.len() as u64);
        // `contains` checks the end without overflowing: `addr` is any u64 the guest wrote.
        if len == 0 || addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || !ram.contains(addr, len) {
            return Err(BufferError::Range(addr, len));
        }
        ranges.push((addr, len));
    }
    if ranges.is_empty() {
        return Err(BufferError::Empty);
    }
    ranges.sort_unstable();
    if let Some(w) = ranges.windows(2).find(|w| w[0].0 + w[0].1 > w[1].0) {
        return Err(BufferError::Overlap(w[1].0));
    }
    Ok(())
}
