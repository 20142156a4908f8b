//! Reclaiming guest memory behind the guests' backs: each mechanism drives its
//! library crate (`tps`, `swapd`, `policy`) over the VMs of this process, and closes the race
//! with vCPUs and device threads through the VM's pause ([`crate::run_control`]).
//!
//! - [`sharing`]: one page-sharing scanner over every VM of the process;
//! - [`swap`]: a `swapd::Swapper` per VM (pause, skip and fatal hooks, swap file
//!   life, balloon discards, control requests);
//! - [`policy`]: the free-memory policy thread that drives every VM's balloon and,
//!   where the VM has one, its swapper.

pub mod policy;
pub mod sharing;
pub mod swap;

use crate::devices::virtio::balloon::pages::BalloonedPages;

/// Pages no reclaimer may touch: the low megabyte (boot information, the control
/// page that the VMM writes without pausing the VM, PVM's VIF areas that the host
/// kernel writes, page tables) and the pages in the VM's balloon (their memory is
/// already gone). One rule for page sharing and the swapper alike.
pub fn off_limits(ballooned: Option<&BalloonedPages>, gpa: u64) -> bool {
    gpa < guest_abi::KERNEL_MIN_GPA || ballooned.is_some_and(|b| b.contains(gpa / guest_abi::PAGE_SIZE))
}
