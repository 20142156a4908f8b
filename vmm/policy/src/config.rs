//! The policy's tunables: thresholds, amounts, caps.

use serde::{Deserialize, Serialize};

/// Tunables of the policy (defaults: ESX's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyConfig {
    /// Threshold of the high state, fraction of host memory free; also what
    /// ballooning aims at.
    pub high: f64,
    /// Threshold of the soft state; also what swapping aims at.
    pub soft: f64,
    /// Threshold of the hard state.
    pub hard: f64,
    /// Threshold of the low state.
    pub low: f64,
    /// Ballooning starts in the high state once free memory is below this.
    pub balloon_start: f64,
    /// Balloons deflate when free memory exceeds `high + deflate_margin`.
    pub deflate_margin: f64,
    /// Largest balloon, fraction of the VM's configured memory (ESX: 65%).
    pub balloon_max_fraction: f64,
    /// Most pages swapped per tick over all VMs (twice that in the low state).
    pub max_swap_pages_per_tick: u64,
    /// Ticks a VM over its limit is left to its balloon before being swapped.
    pub limit_grace_ticks: u32,
    /// Idle memory tax rate `tau` (0 <= tau < 1; ESX: 0.75).
    pub idle_tax: f64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            high: 0.06,
            soft: 0.04,
            hard: 0.02,
            low: 0.01,
            balloon_start: 0.05,
            deflate_margin: 0.02,
            balloon_max_fraction: 0.65,
            max_swap_pages_per_tick: 16384,
            limit_grace_ticks: 5,
            idle_tax: 0.75,
        }
    }
}
