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
//! the guests run, on copies of the pages (guest memory is never borrowed: see
//! [`pagestate::page`]); each batch of merges is applied with every VM it touches
//! paused (its [`ReclaimGuard`](pagestate::ReclaimGuard)), after comparing every page
//! again. A page that changed is left alone.
//!
//! **VMAs.** Each mapping of the pool is a VMA of its own, and a process may have only
//! `vm.max_map_count`. Runs of consecutive guest pages are mapped onto consecutive
//! pool pages with one `mmap` (one VMA), runs of identical pages onto replicas; the
//! VMA cost of each merge is modelled before it is made, the real count is taken
//! every pass, and merges that would pass a limit are skipped with a warning instead
//! of failing.
//!
//! **Freeing guest memory** must go through the VM's
//! [`RamChanges`](pagestate::RamChanges), to which the scanner attaches itself: on a
//! shared page, `MADV_DONTNEED` brings back the pool's content, not zeros, so the
//! scanner maps fresh anonymous memory there instead. Every new mapping it makes is
//! announced there too (the swapper must cover it with its userfaultfd).
//!
//! **What it sees of a VM** is a [`pagestate::GuestVm`]: its regions, its pause, the
//! off-limits rule (pages the scanner must leave alone), its `RamChanges`.
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
mod pass;
mod pool;
mod region;
mod remap;
mod scanner;
mod state;
mod stats;
mod vma;

pub use config::Config;
pub use error::Error;
pub use scanner::Scanner;
pub use stats::{Stats, VmSharing};

/// Pages are [`pagestate::PAGE_SIZE`]: shared with the other reclaimers.
pub(crate) use pagestate::{Page, PAGE_SIZE};

/// A VM's number in the scanner (given by [`Scanner::add_vm`]).
pub type VmId = u32;

/// One contiguous range of a VM's guest RAM, as the scanner registers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Region {
    /// The VM it belongs to.
    pub(crate) vm: VmId,
    /// Guest physical address of its first byte.
    pub(crate) gpa: u64,
    /// Where it is mapped in this process: anonymous private memory, page aligned.
    pub(crate) host_addr: usize,
    /// Its length in bytes, a multiple of [`PAGE_SIZE`].
    pub(crate) len: usize,
}
