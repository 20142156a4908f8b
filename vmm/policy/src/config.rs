//! The policy's tunables: thresholds, amounts, caps.

use serde::{Deserialize, Serialize};

/// Tunables of the policy (defaults: ESX's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyConfig {
    /// Threshold of the high state, fraction of host memory free; also what the
    /// allocation keeps free (the VMs share the rest).
    pub high: f64,
    /// Threshold of the soft state; also what swapping aims at.
    pub soft: f64,
    /// Threshold of the hard state.
    pub hard: f64,
    /// Threshold of the low state.
    pub low: f64,
    /// Largest balloon, fraction of the VM's configured memory (ESX: 65%).
    pub balloon_max_fraction: f64,
    /// Most pages swapped per tick over all VMs (twice that in the low state).
    pub max_swap_pages_per_tick: u64,
    /// Ticks a VM over its limit is left to its balloon before being swapped.
    pub limit_grace_ticks: u32,
    /// Idle memory tax rate `tau` (0 <= tau < 1; ESX: 0.75).
    pub idle_tax: f64,
    /// Allocation targets are recomputed this often (ESX: 15 s), milliseconds...
    pub realloc_period_ms: u64,
    /// ... and at every change of free-memory state when this is set.
    pub realloc_on_state_change: bool,
}

/// An idle memory tax outside `0 <= tau < 1`.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("idle memory tax {0} is not between 0 (included) and 1 (excluded)")]
pub struct TaxError(pub f64);

/// Checks an idle memory tax rate.
pub fn check_tax(tau: f64) -> Result<f64, TaxError> {
    if (0.0..1.0).contains(&tau) {
        Ok(tau)
    } else {
        Err(TaxError(tau))
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            high: 0.06,
            soft: 0.04,
            hard: 0.02,
            low: 0.01,
            balloon_max_fraction: 0.65,
            max_swap_pages_per_tick: 16384,
            limit_grace_ticks: 5,
            idle_tax: 0.75,
            realloc_period_ms: 15_000,
            realloc_on_state_change: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tax_bounds() {
        assert_eq!(check_tax(0.0), Ok(0.0));
        assert_eq!(check_tax(0.75), Ok(0.75));
        assert!(check_tax(1.0).is_err());
        assert!(check_tax(-0.1).is_err());
        assert!(check_tax(f64::NAN).is_err());
        assert_eq!(
            check_tax(1.5).unwrap_err().to_string(),
            "idle memory tax 1.5 is not between 0 (included) and 1 (excluded)"
        );
    }
}
