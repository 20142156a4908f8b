//! Reclaiming guest memory while VMs run: the glue between the VMM and the reclaim
//! crates (`swapd` for the host swapper). Each mechanism changes guest memory under
//! running vCPUs and device threads; its module says how it excludes them.
//!
//! - [`swap`]: a `swapd::Swapper` per VM (pause, skip and fatal hooks, swap file
//!   life, balloon discards, control requests);
//! - [`policy`]: the free-memory policy thread that drives balloons and swappers.

pub mod policy;
pub mod swap;
