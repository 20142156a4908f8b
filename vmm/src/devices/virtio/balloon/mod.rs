//! virtio-balloon: the guest gives pages back to the host (ESX's first technique).
//!
//! - [`device`]: the device model (features, config space, queues, target);
//! - [`queues`]: what each queue's buffers mean, parsed defensively;
//! - [`pages`]: which guest pages are ballooned, and freeing host memory by ranges;
//! - [`metrics`]: counters for the control API and summaries;
//! - [`target`]: who moves the target (the policy or the user).
//!
//! Host side of inflation: the PFNs of a batch of buffers are validated, sorted,
//! merged into ranges, and each range is freed with one `madvise(MADV_DONTNEED)` (the
//! guest reads zeros if it touches a ballooned page anyway). Deflation only clears
//! the pages from the ballooned set: the next touch allocates a fresh zero page.

pub mod device;
pub mod metrics;
pub mod pages;
pub mod queues;
pub mod target;
#[cfg(test)]
mod tests;

pub use device::{Balloon, BalloonConfig};
pub use target::TargetMode;

/// virtio device ID of the balloon.
pub const DEVICE_ID: u32 = 5;

/// Feature bits (virtio spec, device-types/balloon).
pub mod features {
    /// The guest must tell the host before reusing deflated pages.
    pub const MUST_TELL_HOST: u32 = 0;
    /// A statistics queue exists.
    pub const STATS_VQ: u32 = 1;
    /// The guest deflates when it runs out of memory.
    pub const DEFLATE_ON_OOM: u32 = 2;
    /// Free page hinting (not offered: unsafe for reclaim without write tracking).
    pub const FREE_PAGE_HINT: u32 = 3;
    /// Page poisoning.
    pub const PAGE_POISON: u32 = 4;
    /// Free page reporting queue exists.
    pub const PAGE_REPORTING: u32 = 5;
}

/// Configuration space offsets (all little-endian u32).
pub mod config {
    /// Target size in 4 KiB pages (device writes).
    pub const NUM_PAGES: u64 = 0;
    /// Current size in 4 KiB pages (driver writes).
    pub const ACTUAL: u64 = 4;
    /// Free page hint command (unused).
    pub const FREE_PAGE_HINT_CMD_ID: u64 = 8;
    /// Poison value (driver writes).
    pub const POISON_VAL: u64 = 12;
    /// Size of the configuration space.
    pub const SIZE: u64 = 16;
}
