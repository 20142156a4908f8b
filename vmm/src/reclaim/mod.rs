//! Reclaiming guest memory behind the guests' backs: each mechanism drives its
//! library crate (`tps`, `swapd`) over the VMs of this process, and closes the race
//! with vCPUs and device threads through the VM's pause ([`crate::run_control`]).
//!
//! - [`sharing`]: one page-sharing scanner over every VM of the process;
//! - [`swap`]: a `swapd::Swapper` per VM (pause, skip and fatal hooks, swap file
//!   life, balloon discards, control requests);
//! - [`policy`]: the free-memory policy thread that drives balloons and swappers.

pub mod policy;
pub mod sharing;
pub mod swap;
