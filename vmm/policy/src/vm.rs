//! One VM as the policy sees it at a tick: what the VMM measures and reads from
//! the VM's devices just before the tick. The policy keeps nothing about a VM from
//! one tick to the next but how long it has been over its limit.

use serde::{Deserialize, Serialize};

use crate::allocation::Claimant;
use crate::revocation::Client;

/// A VM's balloon device, read at the tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BalloonInfo {
    /// The device's target now, pages: whoever set it (the policy at an earlier
    /// tick, the user, the boot configuration).
    pub target_pages: u64,
    /// Pages the guest has given to the balloon (the host's count, not the guest's
    /// word).
    pub size_pages: u64,
    /// The user set the target and has not handed it back: the policy must not
    /// change it.
    pub pinned: bool,
}

impl BalloonInfo {
    /// Pages asked of the guest and not given yet: memory on its way.
    pub fn pending_pages(&self) -> u64 {
        self.target_pages.saturating_sub(self.size_pages)
    }
}

/// One VM's memory, as the VMM reports it each tick.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmMemInfo {
    /// The VM's name.
    pub name: String,
    /// Configured memory, pages.
    pub size_pages: u64,
    /// Host memory backing the VM now (resident guest RAM), pages.
    pub resident_pages: u64,
    /// Its balloon device, if it has one.
    pub balloon: Option<BalloonInfo>,
    /// Whether the VM has a host swapper that can evict now.
    pub swap: bool,
    /// Configured limit (ESX "limit"), pages, if any.
    pub limit_pages: Option<u64>,
    /// Reservation: never reclaimed below this, pages.
    pub min_pages: u64,
    /// Shares (at least 1 is used).
    pub shares: u64,
    /// Fraction of its configured memory the VM uses actively (the sampler's
    /// estimate; 1.0 while unknown).
    pub active_fraction: f64,
}

impl VmMemInfo {
    /// A VM with defaults: an idle balloon, a swapper, no limit, no reservation,
    /// normal shares (10 per MiB), all active.
    pub fn new(name: &str, size_pages: u64, resident_pages: u64) -> VmMemInfo {
        VmMemInfo {
            name: name.to_string(),
            size_pages,
            resident_pages,
            balloon: Some(BalloonInfo::default()),
            swap: true,
            limit_pages: None,
            min_pages: 0,
            shares: crate::allocation::Shares::Normal.of(size_pages),
            active_fraction: 1.0,
        }
    }

    /// Pages above the reservation.
    pub fn reclaimable_pages(&self) -> u64 {
        self.resident_pages.saturating_sub(self.min_pages)
    }

    /// The most it may hold: its configured memory, or its limit if lower (never
    /// below its reservation).
    pub fn max_pages(&self) -> u64 {
        self.limit_pages.map_or(self.size_pages, |l| l.min(self.size_pages)).max(self.min_pages)
    }

    /// Pages in active use, from the active fraction.
    pub fn active_pages(&self) -> u64 {
        (self.active_fraction.clamp(0.0, 1.0) * self.size_pages as f64) as u64
    }

    /// The VM as a claimant of allocation.
    pub fn claimant(&self) -> Claimant {
        Claimant { shares: self.shares, min: self.min_pages, max: self.max_pages(), active: self.active_pages() }
    }

    /// The VM as a client of min-funding revocation, able to give `available`: its
    /// active pages are a fraction of what it holds now.
    pub fn client(&self, available: u64) -> Client {
        let held = self.resident_pages.max(1);
        Client {
            shares: self.shares,
            pages: self.resident_pages,
            active_fraction: (self.active_pages() as f64 / held as f64).min(1.0),
            available,
        }
    }
}
