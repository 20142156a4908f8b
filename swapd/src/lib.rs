//! The host swapper of the vmm.
//!
//! ESX's third reclamation technique: when host free memory crosses thresholds, evict
//! guest pages to a per-VM `.vswp` file and demand-page them back with userfaultfd.
//! Blind (the host cannot know which pages the guest values) but guaranteed to
//! reclaim.
//!
//! The crate does not depend on the VMM: each [`Swapper`] sees its VM as a
//! [`pagestate::GuestVm`] (its RAM regions, its pause, the off-limits rule, its
//! `RamChanges`, a way to stop it on a fatal error) and is driven by the VMM's
//! free-memory policy. See `docs/swap.md` for the file format, the write race and
//! the costs.
//!
//! | module | what |
//! |---|---|
//! | `swapper` | [`Swapper`]: the public face of one VM's swapper |
//! | `config`, `error` | its tunables ([`Config`]) and errors ([`SwapError`]) |
//! | `state` | what the evictor and the fault thread share: regions, the page-to-slot table and its invariants, the hooks by which discards and remaps reach the swapper |
//! | `evict` | eviction batches under a VM pause |
//! | `fault` | the fault-handler thread: slot read + verify + UFFDIO_COPY, prefetch, zero fill |
//! | [`file`](mod@file) | the swap file, its header, stale-file cleaning, slot allocator, checksums |
//! | [`uffd`] | raw userfaultfd (never user-mode-only: KVM faults are kernel faults) |
//! | [`victim`] | random (ESX) and idle-aware (dirty log) victim choice |
//! | [`zcache`] | the compression cache in front of the file: lz4 entries, checksums, oldest-first spill |
//! | [`stats`] | counters, latency histograms |
//! | [`limits`] | what the host allows: plain write throughput, bare userfaultfd fault |

mod config;
mod error;
mod evict;
mod fault;
pub mod file;
pub mod limits;
mod state;
pub mod stats;
mod swapper;
pub mod uffd;
pub mod victim;
pub mod zcache;

pub use config::Config;
pub use error::SwapError;
pub use file::{clean_stale, FileOptions};
pub use stats::{CacheStats, EvictStages, Histogram, SwapStats};
pub use swapper::Swapper;
pub use victim::VictimPolicy;
pub use zcache::CacheConfig;
