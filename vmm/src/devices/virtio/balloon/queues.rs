//! What the buffers of each balloon queue mean, read defensively: every address,
//! length and count comes from the guest and is checked before use.
//!
//! A descriptor chain that loops is cut by virtio-queue after queue-size
//! descriptors; buffers outside guest RAM fail the read; anything malformed is an
//! error for the whole chain (the device completes it without acting on it).

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemory};

/// Largest buffer the device reads from one descriptor (256 Ki PFNs).
pub const MAX_BUFFER: u32 = 1 << 20;
/// Size of one statistics entry: `le16 tag; le64 val` (packed).
pub const STAT_ENTRY: usize = 10;

/// Why a chain was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum ChainError {
    /// A descriptor the device must read is device-writable, or the reverse.
    Direction,
    /// A length that is not a multiple of the element size, or too large.
    Length(u32),
    /// The buffer is not (entirely) in guest RAM.
    Memory(u64),
    /// The chain holds no buffer of the expected kind.
    Empty,
}

impl ChainError {
    /// Short kind, for logging each kind once.
    pub fn kind(&self) -> &'static str {
        match self {
            ChainError::Direction => "descriptor direction",
            ChainError::Length(_) => "buffer length",
            ChainError::Memory(_) => "buffer outside guest RAM",
            ChainError::Empty => "empty chain",
        }
    }
}

impl std::fmt::Display for ChainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChainError::Direction => write!(f, "descriptor with the wrong direction"),
            ChainError::Length(l) => write!(f, "buffer length {l} is not allowed here"),
            ChainError::Memory(a) => write!(f, "buffer at {a:#x} is not in guest RAM"),
            ChainError::Empty => write!(f, "descriptor chain without buffers"),
        }
    }
}

/// Reads the device-readable bytes of `chain`, each descriptor's length a multiple
/// of `unit`.
fn readable_bytes<M>(chain: DescriptorChain<M>, unit: u32) -> Result<Vec<u8>, ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let holder = chain.clone();
    let mem = holder.memory();
    let mut out = Vec::new();
    for desc in chain {
        if desc.is_write_only() {
            return Err(ChainError::Direction);
        }
        let len = desc.len();
        if len % unit != 0 || len > MAX_BUFFER || out.len() as u64 + len as u64 > MAX_BUFFER as u64 {
            return Err(ChainError::Length(len));
        }
        let start = out.len();
        out.resize(start + len as usize, 0);
        mem.read_slice(&mut out[start..], desc.addr()).map_err(|_| ChainError::Memory(desc.addr().0))?;
    }
    if out.is_empty() {
        return Err(ChainError::Empty);
    }
    Ok(out)
}

/// The PFNs (le32 each) of an inflate or deflate buffer.
pub fn pfns<M>(chain: DescriptorChain<M>) -> Result<Vec<u64>, ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let bytes = readable_bytes(chain, 4)?;
    Ok(bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap()) as u64).collect())
}

/// The `(tag, value)` entries of a statistics buffer (10 bytes each; the spec's
/// "multiple of 6" is a known error).
pub fn stats<M>(chain: DescriptorChain<M>) -> Result<Vec<(u16, u64)>, ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let bytes = readable_bytes(chain, STAT_ENTRY as u32)?;
    Ok(bytes
        .chunks_exact(STAT_ENTRY)
        .map(|e| (u16::from_le_bytes([e[0], e[1]]), u64::from_le_bytes(e[2..10].try_into().unwrap())))
        .collect())
}

/// The free ranges `(gpa, len)` of a free-page-reporting buffer: each
/// device-writable descriptor is one free range (page-aligned).
pub fn reported_ranges<M>(chain: DescriptorChain<M>) -> Result<Vec<(u64, u64)>, ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let mut ranges = Vec::new();
    for desc in chain {
        if !desc.is_write_only() {
            return Err(ChainError::Direction);
        }
        let (addr, len) = (desc.addr().0, desc.len() as u64);
        if len == 0 || addr % guest_abi::PAGE_SIZE != 0 || len % guest_abi::PAGE_SIZE != 0 {
            return Err(ChainError::Length(desc.len()));
        }
        ranges.push((addr, len));
    }
    if ranges.is_empty() {
        return Err(ChainError::Empty);
    }
    Ok(ranges)
}
