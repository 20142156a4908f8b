//! The host swapper of each VM: a [`swapd::Swapper`] per VM, wired to the VM.
//!
//! - **Pause** is the VM's [`RunControl`](crate::run_control::RunControl) pause: no
//!   vCPU in the guest and no device thread at work until the guard drops. Pauses
//!   nest, so eviction batches, the policy's low-state pause and other reclaim code
//!   never resume the VM under each other.
//! - **Skip**: ballooned pages (one bit test in the balloon's ballooned set): their
//!   host memory is already gone and the guest promised not to use them; and the
//!   low megabyte, as page sharing does: it holds the control page, which the VMM
//!   writes without pausing the VM (a command posted between an eviction's copy and
//!   its discard would be lost), and PVM's VIF areas, which the host kernel writes.
//! - **Fatal**: a slot that cannot be read or fails its checksum ends the VM with
//!   [`Ending::Error`]: the guest never receives wrong data.
//! - **Balloon discards** go through [`GuestRam::discard`](crate::memory::GuestRam::discard),
//!   whose hook makes the swapper forget those pages first, so a ballooned page that
//!   was swapped out reads zeros instead of coming back from the file.
//! - **Remaps**: page sharing replaces mappings of guest RAM; it must call
//!   [`remapped`] afterwards so the new mappings are registered with the userfaultfd.
//!
//! The swap file `NAME.vswp` lives in the swap directory from VM creation to the end
//! of [`Vm::finish`](crate::vm::Vm::finish); stale files of crashed runs are removed
//! when a run starts. See `docs/swap.md`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;

use swapd::{SwapError, SwapStats, Swapper, VictimPolicy, VmControl};

use crate::devices::virtio::balloon::pages::BalloonedPages;
use crate::vm::{Ending, Vm, VmShared};

/// Default swap directory.
pub const DEFAULT_DIR: &str = "/var/tmp/vmm";

/// How long an eviction batch waits for the VM to pause.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

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

/// A VM's swapper, once swapping is on (a field of [`VmShared`]).
#[derive(Default)]
pub struct SwapSlot {
    swapper: RwLock<Option<Arc<Swapper>>>,
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

    /// Drops the swapper (its file is removed once no request still holds it) and
    /// returns its final counters. Call when the VM's vCPUs are out for good.
    pub fn close(&self) -> Option<SwapStats> {
        let sw = self.swapper.write().unwrap_or_else(|p| p.into_inner()).take()?;
        Some(sw.stats())
    }
}

/// What the swapper of one VM needs from it. Holds the VM weakly: the VM owns its
/// swapper, not the other way round.
struct VmHooks {
    vm: Weak<VmShared>,
    run: Arc<crate::run_control::RunControl>,
    ballooned: Option<Arc<BalloonedPages>>,
}

impl VmControl for VmHooks {
    fn pause(&self) -> Option<Box<dyn std::any::Any>> {
        self.run.reclaim_guard(PAUSE_TIMEOUT).map(|g| Box::new(g) as Box<dyn std::any::Any>)
    }

    fn skip_page(&self, gpa: u64) -> bool {
        super::off_limits(self.ballooned.as_deref(), gpa)
    }

    fn fatal(&self, error: String) {
        if let Some(vm) = self.vm.upgrade() {
            vm.end(Ending::Error(format!("host swap: {error}")));
        }
    }
}

/// KVM's dirty log of one VM's memory slots, for idle-aware victim choice: once
/// per policy period the bitmaps (which `KVM_GET_DIRTY_LOG` clears) go to the
/// swapper's `note_dirty`, which ages the pages not written since.
///
/// Logging makes the first write to each page in a period fault into KVM (a write
/// protection fault, handled in the kernel), which is its cost to the guest.
pub struct DirtyLog {
    fd: Arc<VmFd>,
    /// (KVM slot, guest-physical address, length) of each slot.
    slots: Vec<(u32, u64, u64)>,
}

impl DirtyLog {
    /// Turns dirty logging on for every memory slot of `vm`.
    pub fn enable(vm: &Vm) -> Result<DirtyLog, String> {
        let mut slots = Vec::new();
        for (slot, (gpa, host, len)) in vm.ram().host_ranges().into_iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: gpa,
                memory_size: len,
                userspace_addr: host,
            };
            // SAFETY: the same slot, addresses and length as Vm::create registered
            // (guest RAM that lives as long as the VM fd); only the flags change.
            unsafe { vm.vm_fd().set_user_memory_region(region) }
                .map_err(|e| format!("vm {}: dirty logging on slot {slot}: {e}", vm.name()))?;
            slots.push((slot as u32, gpa, len));
        }
        Ok(DirtyLog { fd: vm.vm_fd().clone(), slots })
    }

    /// Reads (and clears) every slot's dirty bitmap into `sw`.
    pub fn feed(&self, sw: &Swapper) -> Result<(), String> {
        for &(slot, gpa, len) in &self.slots {
            let bitmap = self.fd.get_dirty_log(slot, len as usize).map_err(|e| format!("KVM_GET_DIRTY_LOG: {e}"))?;
            sw.note_dirty(&bitmap, gpa);
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

/// Gives `vm` a swapper: creates `DIR/NAME.vswp` and the fault thread, and makes
/// balloon discards forget swapped copies.
pub fn attach(vm: &Arc<VmShared>, opts: &SwapOptions) -> Result<(), String> {
    let regions = vm
        .ram
        .host_ranges()
        .into_iter()
        .map(|(gpa, host, len)| swapd::Region { gpa, host_addr: host as usize, len: len as usize })
        .collect();
    let hooks = VmHooks {
        vm: Arc::downgrade(vm),
        run: vm.run.clone(),
        ballooned: vm.balloon.as_ref().map(|b| b.lock().unwrap().ballooned().clone()),
    };
    let mut cfg = swapd::Config::new(&opts.dir);
    cfg.victims = opts.victims;
    cfg.seed = crate::vm::random_seed();
    let swapper = Arc::new(
        Swapper::with_config(&vm.name, regions, Arc::new(hooks), cfg).map_err(|e| format!("vm {}: {e}", vm.name))?,
    );
    let weak = Arc::downgrade(&swapper);
    vm.ram.on_discard(Arc::new(move |gpa, len| {
        if let Some(sw) = weak.upgrade() {
            sw.forget(gpa, len);
        }
    }));
    *vm.swap.swapper.write().unwrap_or_else(|p| p.into_inner()) = Some(swapper);
    Ok(())
}

/// Turns swapping on for a run: prepares the directory and attaches a swapper to
/// every VM (before any starts). The free-memory policy, which decides what to
/// evict, starts separately ([`super::policy::PolicyThread`]).
pub fn start(vms: &[Vm], opts: &SwapOptions) -> Result<(), String> {
    prepare_dir(&opts.dir)?;
    vms.iter().try_for_each(|vm| attach(vm.shared(), opts))
}

/// Page sharing calls this after it replaced the mapping of `[host_addr, host_addr +
/// len)` of `vm`'s guest RAM: the new mapping is registered with the VM's
/// userfaultfd, so pages evicted from it later fault back in. A no-op without a
/// swapper.
pub fn remapped(vm: &VmShared, host_addr: usize, len: usize) -> Result<(), String> {
    match vm.swap.get() {
        Some(sw) => sw.reregister(host_addr, len).map_err(|e| format!("vm {}: {e}", vm.name)),
        None => Ok(()),
    }
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
        Err(e @ SwapError::Stopped { .. }) => (0, Some(e.to_string())),
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
