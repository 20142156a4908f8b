//! A VM as a reclaimer sees it: [`GuestVm`].
//!
//! Page sharing, the swapper and the active-memory sampler never see the VMM's own
//! types. They see a VM's RAM regions, its pause ([`RunControl`]), the rule that says
//! which pages they must never touch ([`GuestVm::off_limits`]), the path their changes
//! to its RAM go through ([`RamChanges`]), and a way to stop it when something they
//! found makes running on unsafe ([`GuestVm::fatal`]). The VMM implements this trait
//! once (`vmm::reclaim::guest`); the reclaimers' own tests implement it over plain
//! anonymous memory with a real [`RunControl`].

use std::sync::Arc;

use crate::changes::RamChanges;
use crate::pause::RunControl;

/// One contiguous range of a VM's guest RAM, mapped in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Guest-physical address of its first byte.
    pub gpa: u64,
    /// Where it is mapped in this process: private anonymous memory, page aligned.
    pub host_addr: usize,
    /// Its length in bytes, a multiple of [`PAGE_SIZE`](crate::PAGE_SIZE).
    pub len: usize,
}

impl Region {
    /// Whether the host range `[host_addr, host_addr + len)` lies inside this region.
    pub fn contains_host(&self, host_addr: usize, len: usize) -> bool {
        host_addr >= self.host_addr && host_addr.checked_add(len).is_some_and(|end| end <= self.host_addr + self.len)
    }
}

/// A VM as a reclaimer sees it.
pub trait GuestVm: Send + Sync + 'static {
    /// Its name (logs, file names).
    fn name(&self) -> &str;

    /// Its guest RAM, fixed for the VM's life: the mappings stay valid as long as this
    /// object lives, which is what lets reclaimers hold it and read its pages.
    fn regions(&self) -> &[Region];

    /// Its pause. Reclaimers take [`RunControl::reclaim_guard`] around every change of
    /// how a page is backed.
    fn run(&self) -> &Arc<RunControl>;

    /// **The off-limits rule**: true for a page no reclaimer may touch (share, evict,
    /// fill, sample): memory the VMM itself writes without pausing the guest (boot
    /// information, the control page, PVM's VIF areas written by the host kernel, the
    /// page tables) and pages the guest gave away (in its balloon: their memory is gone
    /// and must stay gone). Cheap: called per page, sometimes with reclaimer locks
    /// held; it must not call back into a reclaimer.
    fn off_limits(&self, gpa: u64) -> bool;

    /// The one path for discards and remaps of its RAM.
    fn changes(&self) -> &RamChanges;

    /// Something a reclaimer found makes running on unsafe (a swap slot that fails its
    /// checksum): the VM must be stopped with this error, never handed wrong data.
    fn fatal(&self, error: String);
}
