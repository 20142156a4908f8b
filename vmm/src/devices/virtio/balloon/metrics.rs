//! Balloon counters, updated by the device thread and read by the control API and
//! the exit summary.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::target::TargetMode;

/// Monotonic counters of one balloon device.
#[derive(Default)]
pub struct BalloonMetrics {
    /// Pages newly put in the balloon by inflate buffers.
    pub inflated_pages: AtomicU64,
    /// Pages taken back out by deflate buffers.
    pub deflated_pages: AtomicU64,
    /// Deflated pages that had host memory behind them: the guest touched them
    /// while they were in the balloon (read as zeros, or written).
    pub touched_pages: AtomicU64,
    /// Pages freed because the guest reported them free.
    pub reported_pages: AtomicU64,
    /// Free-page-reporting buffers handled.
    pub reported_buffers: AtomicU64,
    /// `madvise` calls made to free host memory.
    pub discard_calls: AtomicU64,
    /// `madvise` calls that failed.
    pub discard_errors: AtomicU64,
    /// Time spent freeing host memory, nanoseconds.
    pub discard_ns: AtomicU64,
    /// PFNs outside guest RAM (refused).
    pub invalid_pfns: AtomicU64,
    /// PFNs inflated twice or deflated while not in the balloon (ignored).
    pub duplicate_pfns: AtomicU64,
    /// Statistics buffers received.
    pub stats_updates: AtomicU64,
}

impl BalloonMetrics {
    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Names of the statistics tags (virtio spec; 10..15 from Linux 6.12).
pub fn stat_name(tag: u16) -> Option<&'static str> {
    Some(match tag {
        0 => "swap_in",
        1 => "swap_out",
        2 => "major_faults",
        3 => "minor_faults",
        4 => "free_memory",
        5 => "total_memory",
        6 => "available_memory",
        7 => "disk_caches",
        8 => "hugetlb_allocations",
        9 => "hugetlb_failures",
        10 => "oom_kills",
        11 => "alloc_stalls",
        12 => "async_scans",
        13 => "direct_scans",
        14 => "async_reclaims",
        15 => "direct_reclaims",
        _ => return None,
    })
}

/// A consistent view for reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BalloonSnapshot {
    /// Requested balloon size, pages.
    pub target_pages: u64,
    /// Whether the user pinned that target or the free-memory policy may move it.
    pub target_mode: TargetMode,
    /// Size the driver reports (`actual`), pages.
    pub actual_pages: u64,
    /// Pages the host holds as ballooned.
    pub ballooned_pages: u64,
    /// See [`BalloonMetrics`].
    pub inflated_pages: u64,
    /// See [`BalloonMetrics`].
    pub deflated_pages: u64,
    /// See [`BalloonMetrics`].
    pub touched_pages: u64,
    /// See [`BalloonMetrics`].
    pub reported_pages: u64,
    /// See [`BalloonMetrics`].
    pub reported_buffers: u64,
    /// See [`BalloonMetrics`].
    pub discard_calls: u64,
    /// See [`BalloonMetrics`].
    pub discard_errors: u64,
    /// See [`BalloonMetrics`].
    pub discard_ms: f64,
    /// See [`BalloonMetrics`].
    pub invalid_pfns: u64,
    /// See [`BalloonMetrics`].
    pub duplicate_pfns: u64,
    /// See [`BalloonMetrics`].
    pub stats_updates: u64,
    /// Guest errors of every kind (malformed chains and buffers, queue
    /// configuration, register accesses, ...), each counted.
    pub guest_errors: u64,
    /// The same by kind (see [`crate::devices::guest_errors::GuestErrorKind`]).
    pub guest_error_kinds: BTreeMap<String, u64>,
    /// The driver broke a ring: the device serves nothing until it is reset.
    pub needs_reset: bool,
    /// Features the driver accepted.
    pub features: u64,
    /// The guest's latest statistics (bytes or counts, by name).
    pub guest_stats: BTreeMap<String, u64>,
    /// Age of those statistics, ms (None if never received).
    pub guest_stats_age_ms: Option<f64>,
}

impl BalloonSnapshot {
    /// Fills the counter fields from `m`.
    pub fn with_metrics(mut self, m: &BalloonMetrics) -> Self {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        self.inflated_pages = get(&m.inflated_pages);
        self.deflated_pages = get(&m.deflated_pages);
        self.touched_pages = get(&m.touched_pages);
        self.reported_pages = get(&m.reported_pages);
        self.reported_buffers = get(&m.reported_buffers);
        self.discard_calls = get(&m.discard_calls);
        self.discard_errors = get(&m.discard_errors);
        self.discard_ms = get(&m.discard_ns) as f64 / 1e6;
        self.invalid_pfns = get(&m.invalid_pfns);
        self.duplicate_pfns = get(&m.duplicate_pfns);
        self.stats_updates = get(&m.stats_updates);
        self
    }
}
