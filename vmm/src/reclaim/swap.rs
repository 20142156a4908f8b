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
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use swapd::{PolicyConfig, PolicyStats, SwapError, SwapStats, Swapper, VictimPolicy};

use super::guest::ReclaimView;
use super::policy::{PolicyThread, PolicyVm};
use crate::memory::slots::MemorySlots;
use crate::vm::{Vm, VmShared};

/// Default swap directory.
pub const DEFAULT_DIR: &str = "/var/tmp/vmm";

/// Where the policy learns how much host memory is free.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostMemChoice {
    /// The real host: `/proc/meminfo` (default).
    Host,
    /// The memory cgroup this process runs in.
    Cgroup,
    /// A budget in bytes: free = budget - guest RAM resident for every VM.
    Budget(u64),
}

impl HostMemChoice {
    /// Parses `host`, `cgroup` or a size (`2G`).
    pub fn parse(text: &str) -> Result<HostMemChoice, String> {
        match text {
            "host" => Ok(HostMemChoice::Host),
            "cgroup" => Ok(HostMemChoice::Cgroup),
            size => match crate::config::parse_size(size) {
                Ok(0) => Err("--host-mem must be more than 0".into()),
                Ok(b) => Ok(HostMemChoice::Budget(b)),
                Err(e) => Err(format!("--host-mem: {e} (or host, cgroup)")),
            },
        }
    }
}

/// Swapping options of a run (`vmm run --swap ...`).
#[derive(Clone, Debug)]
pub struct SwapOptions {
    /// Directory of the swap files.
    pub dir: PathBuf,
    /// Host memory source of the policy.
    pub host_mem: HostMemChoice,
    /// Policy period.
    pub tick: Duration,
    /// Thresholds and amounts of the policy.
    pub policy: PolicyConfig,
    /// Victim choice of every swapper.
    pub victims: VictimPolicy,
}

impl SwapOptions {
    /// Defaults with swap files in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> SwapOptions {
        SwapOptions {
            dir: dir.into(),
            host_mem: HostMemChoice::Host,
            tick: Duration::from_millis(100),
            policy: PolicyConfig::default(),
            victims: VictimPolicy::Random,
        }
    }
}

/// A VM's swapper, once swapping is on (a field of [`VmShared`]).
#[derive(Default)]
pub struct SwapSlot {
    swapper: RwLock<Option<Arc<Swapper>>>,
    policy: RwLock<Option<Arc<Mutex<PolicyStats>>>>,
}

impl SwapSlot {
    /// The swapper, if the VM has one.
    pub fn get(&self) -> Option<Arc<Swapper>> {
        self.swapper.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Its counters.
    pub fn stats(&self) -> Option<SwapStats> {
        self.get().map(|s| s.stats())
    }

    /// The process's free-memory policy counters, if a policy runs.
    pub fn policy_stats(&self) -> Option<PolicyStats> {
        self.policy.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(|p| p.lock().unwrap().clone())
    }

    pub(crate) fn set_policy(&self, stats: Arc<Mutex<PolicyStats>>) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Some(stats);
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
    /// Turns dirty logging on for every memory slot of `vm`.
    pub fn enable(vm: &Vm) -> Result<DirtyLog, String> {
        let slots = vm.memory_slots().clone();
        slots.enable_dirty_log().map_err(|e| format!("vm {}: {e}", vm.name()))?;
        Ok(DirtyLog { slots })
    }

    /// Reads (and clears) every slot's dirty bitmap into `sw`.
    pub fn feed(&self, sw: &Swapper) -> Result<(), String> {
        for slot in self.slots.dirty_log().map_err(|e| e.to_string())? {
            sw.note_dirty(&slot.bitmap, slot.gpa);
        }
        Ok(())
    }
}

/// Creates the swap directory and removes the swap files of dead processes.
pub fn prepare_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create swap directory {}: {e}", dir.display()))?;
    let removed = swapd::clean_stale(dir).map_err(|e| format!("cleaning swap directory {}: {e}", dir.display()))?;
    if !removed.is_empty() {
        log::info!("removed {} stale swap file(s) from {}", removed.len(), dir.display());
    }
    Ok(())
}

/// Gives `vm` a swapper: creates `DIR/NAME.vswp` and the fault thread; from now on
/// the VM's discards and remaps reach it.
pub fn attach(vm: &Arc<VmShared>, opts: &SwapOptions) -> Result<(), String> {
    let mut cfg = swapd::Config::new(&opts.dir);
    cfg.victims = opts.victims;
    cfg.seed = crate::vm::random_seed();
    let swapper = Arc::new(Swapper::new(ReclaimView::of(vm), cfg).map_err(|e| format!("vm {}: {e}", vm.name))?);
    *vm.swap.swapper.write().unwrap_or_else(|p| p.into_inner()) = Some(swapper);
    Ok(())
}

/// Turns swapping on for a run: prepares the directory, attaches a swapper to
/// every VM (before any starts) and starts the free-memory policy over them.
pub fn start(vms: &[Vm], opts: &SwapOptions) -> Result<PolicyThread, String> {
    prepare_dir(&opts.dir)?;
    for vm in vms {
        attach(vm.shared(), opts)?;
    }
    let mut members = Vec::new();
    for vm in vms {
        let dirty = match opts.victims {
            VictimPolicy::Idle => Some(DirtyLog::enable(vm)?),
            VictimPolicy::Random => None,
        };
        members.push(PolicyVm { vm: vm.shared().clone(), limit: vm.config().limit, dirty });
    }
    PolicyThread::start(members, opts)
}

/// Evicts up to `bytes` of `vm`'s memory now (`vmm ctl swap out`); returns what it did.
pub fn swap_out(vm: &VmShared, bytes: u64) -> Result<serde_json::Value, String> {
    let sw = vm.swap.get().ok_or_else(|| format!("vm {} has no swapper (run with --swap)", vm.name))?;
    // An explicit request retries an eviction stopped by an earlier write error.
    sw.resume_eviction();
    let pages = bytes.div_ceil(guest_abi::PAGE_SIZE) as usize;
    let (reclaimed, error) = match sw.swap_out(pages) {
        Ok(n) => (n, None),
        Err(e @ SwapError::Write { reclaimed, .. }) => (reclaimed, Some(e.to_string())),
        Err(e @ (SwapError::Stopped { .. } | SwapError::PauseTimedOut { .. })) => (0, Some(e.to_string())),
        Err(e) => return Err(format!("vm {}: {e}", vm.name)),
    };
    let stats = sw.stats();
    Ok(serde_json::json!({
        "asked_pages": pages,
        "reclaimed_pages": reclaimed,
        "error": error,
        "swapped_pages": stats.slots_used,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_mem_choices() {
        assert_eq!(HostMemChoice::parse("host").unwrap(), HostMemChoice::Host);
        assert_eq!(HostMemChoice::parse("cgroup").unwrap(), HostMemChoice::Cgroup);
        assert_eq!(HostMemChoice::parse("2G").unwrap(), HostMemChoice::Budget(2 << 30));
        assert!(HostMemChoice::parse("0").is_err());
        assert!(HostMemChoice::parse("lots").unwrap_err().contains("cgroup"));
    }
}
