//! The one adapter between a VM of this VMM and its reclaimers: [`ReclaimView`], the
//! VM as page sharing, the swapper and the active-memory sampler see it
//! ([`pagestate::GuestVm`]).
//!
//! - **Regions**: the VM's RAM, mapped for as long as the view lives (it holds the
//!   RAM).
//! - **Pause**: the VM's [`RunControl`]: vCPUs out of `KVM_RUN`, device threads out
//!   of guest memory.
//! - **Off limits**: the low megabyte (boot information, the control page that the
//!   VMM writes without pausing the VM, PVM's VIF areas written by the host kernel,
//!   the VMM's page tables) and the pages in the VM's balloon (one bit each, read
//!   without a lock: their memory is gone and must stay gone).
//! - **Changes**: the RAM's [`RamChanges`] (discards by the balloon, remaps by page
//!   sharing).
//! - **Fatal**: ends the VM with [`Ending::Error`]; the view holds the VM weakly (the
//!   VM owns its reclaimers, not the other way round).

use std::sync::{Arc, Weak};

use pagestate::{GuestVm, RamChanges, Region, RunControl};

use crate::devices::virtio::balloon::pages::BalloonedPages;
use crate::memory::GuestRam;
use crate::vm::{Ending, VmShared};

/// A VM as its reclaimers see it.
pub struct ReclaimView {
    name: String,
    ram: Arc<GuestRam>,
    run: Arc<RunControl>,
    ballooned: Option<Arc<BalloonedPages>>,
    vm: Weak<VmShared>,
}

impl ReclaimView {
    /// The view of `vm`.
    pub fn of(vm: &Arc<VmShared>) -> Arc<ReclaimView> {
        Arc::new(ReclaimView {
            name: vm.name().to_string(),
            ram: vm.ram().clone(),
            run: vm.run().clone(),
            ballooned: vm.balloon().map(|b| b.lock().unwrap().ballooned().clone()),
            vm: Arc::downgrade(vm),
        })
    }

    /// A view of bare RAM with no VM around it (unit tests of the reclaimers' wiring):
    /// a fatal error is only logged.
    pub fn of_ram(name: &str, ram: Arc<GuestRam>, run: Arc<RunControl>) -> Arc<ReclaimView> {
        Arc::new(ReclaimView { name: name.to_string(), ram, run, ballooned: None, vm: Weak::new() })
    }
}

impl GuestVm for ReclaimView {
    fn name(&self) -> &str {
        &self.name
    }

    fn regions(&self) -> &[Region] {
        self.ram.host_regions()
    }

    fn run(&self) -> &Arc<RunControl> {
        &self.run
    }

    fn off_limits(&self, gpa: u64) -> bool {
        gpa < guest_abi::KERNEL_MIN_GPA
            || self.ballooned.as_ref().is_some_and(|b| b.contains(gpa / guest_abi::PAGE_SIZE))
    }

    fn changes(&self) -> &RamChanges {
        self.ram.changes()
    }

    fn fatal(&self, error: String) {
        match self.vm.upgrade() {
            Some(vm) => vm.end(Ending::Error(error)),
            None => log::error!("{}: {error}", self.name),
        }
    }
}
