//! What the control API, the demo and the tests see of a running host: [`HostShared`].
//!
//! A leaf under [`crate::host`]: the control API reads it, and the host that starts
//! the control API builds it, so it lives apart from both.

use std::sync::Arc;

use swapd::Swapper;

use crate::reclaim::policy::PolicyHandle;
use crate::reclaim::sharing::PageSharing;
use crate::reclaim::swap::SwapSlot;
use crate::vm::VmShared;

/// What the control API, the demo and the tests see of a host: its VMs and their
/// reclaimers, fixed when the host is created.
pub struct HostShared {
    vms: Vec<Arc<VmShared>>,
    sharing: Option<PageSharing>,
    /// The swapper of VM `i`, while it has one.
    swappers: Vec<SwapSlot>,
    policy: Option<PolicyHandle>,
}

impl HostShared {
    /// The view of a host's VMs (in configuration order) and their reclaimers.
    pub(super) fn new(
        vms: Vec<Arc<VmShared>>,
        sharing: Option<PageSharing>,
        swappers: Vec<SwapSlot>,
        policy: Option<PolicyHandle>,
    ) -> HostShared {
        HostShared { vms, sharing, swappers, policy }
    }

    /// The VMs, in configuration order.
    pub fn vms(&self) -> &[Arc<VmShared>] {
        &self.vms
    }

    /// The VM called `name`, with its index.
    pub fn vm(&self, name: &str) -> Option<(usize, &Arc<VmShared>)> {
        self.vms.iter().enumerate().find(|(_, v)| v.name() == name)
    }

    /// Page sharing, if on.
    pub fn sharing(&self) -> Option<&PageSharing> {
        self.sharing.as_ref()
    }

    /// The swapper of VM `index`, if it has one (and has not ended).
    pub fn swapper(&self, index: usize) -> Option<Arc<Swapper>> {
        self.swappers.get(index).and_then(SwapSlot::get)
    }

    /// Drops VM `index`'s swapper for good (teardown; its vCPUs are out) and returns
    /// its final counters.
    pub(super) fn close_swapper(&self, index: usize) -> Option<swapd::SwapStats> {
        self.swappers[index].close()
    }

    /// The free-memory policy, if it runs.
    pub fn policy(&self) -> Option<&PolicyHandle> {
        self.policy.as_ref()
    }

    /// The free-memory policy's counters and state history, if it runs.
    pub fn policy_stats(&self) -> Option<policy::PolicyStats> {
        self.policy.as_ref().map(PolicyHandle::stats)
    }

    /// Host memory holding the guests' RAM now: their private pages plus page
    /// sharing's pool, or without page sharing their `Pss`.
    pub fn guest_memory_bytes(&self) -> u64 {
        match &self.sharing {
            Some(s) => s.guest_memory_bytes(self.vms.iter().map(|v| &**v.ram())),
            None => self.vms.iter().map(|v| v.ram().resident_bytes()).sum(),
        }
    }
}
