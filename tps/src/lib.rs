//! Transparent page sharing (TPS) for the vmm: VMware ESX's content-based page
//! sharing, done by a userspace VMM on Linux.
//!
//! A background thread visits the guest RAM of every VM of the process at a set rate,
//! in a random order, looking only at pages that are resident (never faulting one
//! in). Each private page is checked for zero and otherwise hashed (xxh3-64) into a
//! table of candidates:
//!
//! - a **zero page** is dropped (`MADV_DONTNEED`): it reads back as zeros and costs
//!   nothing until written again;
//! - a page whose hash is new becomes a **hint**;
//! - a page matching a hint: the hint is re-hashed (it may have changed since) and
//!   both pages compared byte for byte; the content is written once into a **pool**
//!   page (a memfd) and both guest pages are replaced by `MAP_PRIVATE` mappings of it:
//!   they share one physical page, and a guest write makes a private copy;
//! - a page matching a pool page is compared and mapped onto it.
//!
//! **The race.** A vCPU or a device thread may write a page between the compare and
//! the remap (or the drop): the write would be lost. The scanner only *plans* while
//! the guests run; each batch of merges is applied with every VM it touches paused
//! ([`VmControl::pause`]), after comparing every page again. A page that changed is
//! left alone.
//!
//! **VMAs.** Each mapping of the pool is a VMA of its own, and a process may have only
//! `vm.max_map_count`. Runs of consecutive guest pages are mapped onto consecutive
//! pool pages with one `mmap` (one VMA), runs of identical pages onto replicas; the
//! VMA cost of each merge is modelled before it is made, the real count is taken
//! every pass, and merges that would pass a limit are skipped with a warning instead
//! of failing.
//!
//! **Freeing guest memory** must go through [`Scanner::reset_range`]: on a shared
//! page, `MADV_DONTNEED` brings back the pool's content, not zeros.
//!
//! **Broken shares** are found on later visits (pagemap: the page became private),
//! the pool page's count drops, and it is freed (`fallocate(PUNCH_HOLE)`) when no
//! guest page maps it.
//!
//! See `docs/tps.md` for the design, costs and counters.

mod batch;
mod config;
mod error;
mod hash_table;
mod pagemap;
mod pass;
mod pool;
mod region;
mod remap;
mod scanner;
mod state;
mod stats;
#[cfg(test)]
mod testutil;
mod vma;

pub use config::Config;
pub use error::Error;
pub use scanner::Scanner;
pub use stats::Stats;

/// Host page size; guest RAM is shared in pages of this size.
pub const PAGE_SIZE: usize = 4096;

/// A page's bytes.
type Page = [u8; PAGE_SIZE];

/// One contiguous range of guest RAM in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// The VM it belongs to (the VMM's numbering).
    pub vm: u32,
    /// Guest physical address of its first byte.
    pub gpa: u64,
    /// Where it is mapped in this process: anonymous private memory, page aligned.
    pub host_addr: usize,
    /// Its length in bytes, a multiple of [`PAGE_SIZE`].
    pub len: usize,
}

/// What the scanner needs from the VMM.
///
/// The scanner never calls these with its internal lock held, so they may call
/// [`Scanner::reset_range`] and the like from other threads freely; but a pause must
/// not wait for a thread that is itself waiting for a pause to end.
pub trait VmControl: Send + Sync + 'static {
    /// Stops every writer of `vm`'s guest memory (vCPUs kicked out of `KVM_RUN`,
    /// device threads parked, no other reclaimer touching it) until the returned
    /// guard is dropped. None if the VM is gone or ending (it is skipped).
    fn pause(&self, vm: u32) -> Option<Box<dyn std::any::Any>>;
    /// Pages the scanner must leave alone (e.g. ballooned pages): true to skip.
    fn skip_page(&self, vm: u32, gpa: u64) -> bool;
    /// Called after the scanner replaced the mapping of `[host_addr, host_addr+len)`
    /// (a new VMA), while `vm` is still paused, so that the VMM can register it with
    /// its userfaultfd if it uses one.
    fn remapped(&self, vm: u32, host_addr: usize, len: usize);
}
