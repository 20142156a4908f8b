//! Reclaiming guest memory behind the guests' backs: each mechanism drives its
//! library crate (`tps`, `swapd`) over the VMs of this process, and closes the race
//! with vCPUs and device threads through the VM's pause ([`crate::run_control`]).

pub mod sharing;
