//! The host swapper of each VM: a [`swapd::Swapper`] per VM, over the VM's
//! [`ReclaimView`]: the swapper pauses the VM with its reclaim guard for each
//! eviction batch, leaves its off-limits pages alone (the low megabyte holds the
//! control page, which the VMM writes without pausing the VM: a command posted
//! between an eviction's copy and its discard would be lost), ends the VM on a slot
//! that fails its checksum (the guest never receives wrong data), and attaches itself
//! to the VM's `RamChanges`: a ballooned page that was swapped out is forgotten (it
//! reads zeros instead of coming back from the file), and a mapping page sharing
//! replaced is registered again with the userfaultfd.
//!
//! The swap file `NAME.vswp` lives in the swap directory from VM creation to the end
//! of [`Vm::finish`](crate::vm::Vm::finish); stale files of crashed runs are removed
//! when a run starts. See `docs/swap.md`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use swapd::{SwapError, SwapStats, Swapper, VictimPolicy};

use super::guest::ReclaimView;
use crate::memory::slots::MemorySlots;
use crate::memory::MemoryError;
use crate::vm::VmShared;

/// Default swap directory.
pub const DEFAULT_DIR: &str = "/var/tmp/vmm";

/// Swapping options of a run (`vmm run --swap ...`).
#[derive(Clone, Debug)]
pub struct SwapOptions {
    /// Directory of the swap files.
    pub dir: PathBuf,
    /// Victim choice of every swapper.
    pub victims: VictimPolicy,
}

impl SwapOptions {
    /// Defaults with swap files in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> SwapOptions {
        SwapOptions { dir: dir.into(), victims: VictimPolicy::Random }
    }
}

/// A VM's swapper, once swapping is on, until the VM ends (kept by the
/// `Host`).
#[derive(Default)]
pub struct SwapSlot {
    swapper: RwLock<Option<Arc<Swapper>>>,
}

impl SwapSlot {
    /// The swapper, if the VM has one.
    pub fn get(&self) -> Option<Arc<Swapper>> {
        self.swapper.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Gives the VM its swapper.
    pub fn set(&self, swapper: Arc<Swapper>) {
        *self.swapper.write().unwrap_or_else(|p| p.into_inner()) = Some(swapper);
    }

    /// Drops the swapper (its file is removed once no request still holds it) and
    /// returns its final counters. Call when the VM's vCPUs are out for good.
    pub fn close(&self) -> Option<SwapStats> {
        let sw = self.swapper.write().unwrap_or_else(|p| p.into_inner()).take()?;
        Some(sw.stats())
    }
}

/// KVM's dirty log of one VM's memory slots, for idle-aware victim choice: once
/// per policy period the bitmaps (which `KVM_GET_DIRTY_LOG` clears) go to the
/// swapper's `note_dirty`, which ages the pages not written since.
pub struct DirtyLog {
    slots: Arc<MemorySlots>,
}

impl DirtyLog {
    /// Turns dirty logging on for every memory slot of a VM.
    pub fn enable(slots: Arc<MemorySlots>) -> Result<DirtyLog, MemoryError> {
        slots.enable_dirty_log()?;
        Ok(DirtyLog { slots })
    }

    /// Reads (and clears) every slot's dirty bitmap into `sw`.
    pub fn feed(&self, sw: &Swapper) -> Result<(), MemoryError> {
        for slot in self.slots.dirty_log()? {
            sw.note_dirty(&slot.bitmap, slot.gpa);
        }
        Ok(())
    }
}

/// Why host swap could not be set up, or an eviction asked for could not run.
#[derive(Debug, thiserror::Error)]
pub enum HostSwapError {
    /// The swap directory cannot be created.
    #[error("cannot create swap directory {}: {source}", dir.display())]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Stale swap files could not be removed.
    #[error("cleaning swap directory {}: {source}", dir.display())]
    Clean {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The swapper of a VM failed.
    #[error("vm {vm}: {source}")]
    Swapper {
        /// The VM.
        vm: String,
        /// The swapper's error.
        #[source]
        source: SwapError,
    },
}

/// Creates the swap directory and removes the swap files of dead processes.
pub fn prepare_dir(dir: &Path) -> Result<(), HostSwapError> {
    std::fs::create_dir_all(dir).map_err(|source| HostSwapError::CreateDir { dir: dir.into(), source })?;
    let removed = swapd::clean_stale(dir).map_err(|source| HostSwapError::Clean { dir: dir.into(), source })?;
    if !removed.is_empty() {
        log::info!("removed {} stale swap file(s) from {}", removed.len(), dir.display());
    }
    Ok(())
}

/// A swapper for `vm`: creates `DIR/NAME.vswp` and the fault thread; from now on
/// the VM's discards and remaps reach it. The directory must be prepared
/// ([`prepare_dir`]).
pub fn attach(vm: &Arc<VmShared>, opts: &SwapOptions) -> Result<Arc<Swapper>, HostSwapError> {
    let mut cfg = swapd::Config::new(&opts.dir);
    cfg.victims = opts.victims;
    cfg.seed = crate::vm::random_seed();
    let swapper = Swapper::new(ReclaimView::of(vm), cfg)
        .map_err(|source| HostSwapError::Swapper { vm: vm.name().to_string(), source })?;
    Ok(Arc::new(swapper))
}

/// What an eviction asked for through the control API (`swap_out`) did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapOutResult {
    /// Pages asked for.
    pub asked_pages: u64,
    /// Pages taken out of guest memory (written to the swap file, or zero pages
    /// dropped).
    pub reclaimed_pages: u64,
    /// Why eviction stopped early, if it did.
    pub error: Option<String>,
    /// Pages of the VM in its swap file now.
    pub swapped_pages: u64,
}

/// Evicts up to `bytes` of a VM's memory now with its swapper (`vmm ctl swap out`);
/// returns what it did.
pub fn swap_out(sw: &Swapper, bytes: u64) -> Result<SwapOutResult, HostSwapError> {
    // An explicit request retries an eviction stopped by an earlier write error.
    sw.resume_eviction();
    let pages = bytes.div_ceil(guest_abi::PAGE_SIZE) as usize;
    let (reclaimed, error) = match sw.swap_out(pages) {
        Ok(n) => (n, None),
        Err(e @ SwapError::Write { reclaimed, .. }) => (reclaimed, Some(e.to_string())),
        Err(e @ (SwapError::Stopped { .. } | SwapError::PauseTimedOut { .. })) => (0, Some(e.to_string())),
        Err(source) => return Err(HostSwapError::Swapper { vm: sw.name().to_string(), source }),
    };
    Ok(SwapOutResult {
        asked_pages: pages as u64,
        reclaimed_pages: reclaimed as u64,
        error,
        swapped_pages: sw.stats().slots_used,
    })
}
