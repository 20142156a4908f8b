//! The host swapper of the vmm.
//!
//! ESX's third reclamation technique: when host free memory crosses thresholds, evict
//! guest pages to a per-VM `.vswp` file and demand-page them back with userfaultfd.
//! Blind (the host cannot know which pages the guest values) but guaranteed to
//! reclaim.
//!
//! The crate does not depend on the VMM: the VMM hands each [`Swapper`] the guest
//! RAM regions and an implementation of [`VmControl`] (pause every writer, say which
//! pages to skip, stop the VM on a fatal error), and asks it to evict (the VMM's
//! free-memory policy, the `policy` crate, decides how much). See `docs/swap.md`
//! for the file format, the write race and the costs.
//!
//! | module | what |
//! |---|---|
//! | [`file`](mod@file) | the swap file, its header, stale-file cleaning, slot allocator, checksums |
//! | [`uffd`] | raw userfaultfd (never user-mode-only: KVM faults are kernel faults) |
//! | [`fault`] | the fault-handler thread: slot read + verify + UFFDIO_COPY, prefetch, zero fill |
//! | [`evict`] | eviction batches under a VM pause |
//! | [`victim`] | random (ESX) and idle-aware (dirty log) victim choice |
//! | [`stats`] | counters, latency histograms |
//! | [`limits`] | what the host allows: plain write throughput, bare userfaultfd fault |
//! | [`pagemap`] | `/proc/self/pagemap` and `/proc/self/maps` readers, batched discards |
//! | [`anon`] | anonymous memory shaped like guest RAM (limits, tests) |

pub mod anon;
pub mod evict;
pub mod fault;
pub mod file;
pub mod limits;
pub mod pagemap;
pub mod stats;
pub mod swapper;
pub mod uffd;
pub mod victim;

use std::any::Any;

pub use file::{clean_stale, FileOptions, PAGE_SIZE};
pub use stats::{Histogram, SwapStats};
pub use swapper::{Config, SwapError, Swapper};
pub use victim::VictimPolicy;

/// One range of guest RAM: guest-physical address, where it is mapped in this
/// process (private anonymous memory), and its length (page multiples).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub gpa: u64,
    pub host_addr: usize,
    pub len: usize,
}

/// What the swapper needs from the VMM for one VM.
pub trait VmControl: Send + Sync + 'static {
    /// Stop every writer of this VM's memory (vCPUs out of KVM_RUN, device threads
    /// parked, page-sharing remaps of this VM held off) until the guard drops; None
    /// if the VM is ending.
    fn pause(&self) -> Option<Box<dyn Any>>;
    /// Pages eviction must skip (ballooned, or shared by page sharing): true to skip.
    /// The zero fill ahead of a fault leaves them alone too. Called with the
    /// swapper's table lock held: it must be cheap and must not call the swapper.
    fn skip_page(&self, gpa: u64) -> bool;
    /// A slot could not be read or failed its checksum: the VMM must stop the VM
    /// with this error (never hand the guest wrong data).
    fn fatal(&self, error: String);
}
