//! Reclaiming guest memory behind the guests' backs: each mechanism drives its
//! library crate (`tps`, `swapd`, `policy`) over the VMs of this process. The
//! reclaimers see a VM only through [`guest::ReclaimView`] (a `pagestate::GuestVm`):
//! its RAM, its pause, the off-limits rule, its `RamChanges`.
//!
//! - [`guest`]: the one adapter from a VM to what reclaimers see;
//! - [`sharing`]: one page-sharing scanner over every VM of the process;
//! - [`swap`]: a `swapd::Swapper` per VM (swap file life, control requests);
//! - [`policy`]: the free-memory policy thread that drives every VM's balloon and,
//!   where the VM has one, its swapper;
//! - [`active`]: the active memory sampler that feeds the policy each VM's estimate.

pub mod active;
pub mod guest;
pub mod policy;
pub mod sharing;
pub mod swap;
