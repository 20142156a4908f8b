//! ESX's free-memory states and the hysteresis between them.
//!
//! Thresholds are fractions of host memory that is free (defaults 6/4/2/1%, as in
//! ESX). Going down, a state is entered when free memory falls *below* its
//! threshold: soft under 4%, hard under 2%, low under 1%. Going up needs the next
//! threshold up (one band of hysteresis): low is left at 2% (for hard), hard at 4%
//! (for soft), soft at 6% (for high). So the 6% "high" threshold is both where
//! reclamation aims and where the soft state ends, and a host oscillating around
//! one threshold does not flap. A big change jumps several states at once.

use serde::{Deserialize, Serialize};

use crate::config::PolicyConfig;

/// A free-memory state, least severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FreeState {
    /// Plenty free: nothing is reclaimed (balloons start a little before soft).
    #[default]
    High,
    /// Balloon.
    Soft,
    /// Balloon and swap.
    Hard,
    /// Swap, and pause the VMs above their target.
    Low,
}

impl FreeState {
    /// The state's name as the logs, the docs and the JSON counters spell it.
    pub fn name(self) -> &'static str {
        match self {
            FreeState::High => "high",
            FreeState::Soft => "soft",
            FreeState::Hard => "hard",
            FreeState::Low => "low",
        }
    }

    /// Position in per-state counters: high, soft, hard, low.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The state after `self` once `free` (a fraction of host memory) is free.
    pub fn next(self, free: f64, c: &PolicyConfig) -> FreeState {
        let down = if free < c.low {
            FreeState::Low
        } else if free < c.hard {
            FreeState::Hard
        } else if free < c.soft {
            FreeState::Soft
        } else {
            FreeState::High
        };
        let up = if free >= c.high {
            FreeState::High
        } else if free >= c.soft {
            FreeState::Soft
        } else if free >= c.hard {
            FreeState::Hard
        } else {
            FreeState::Low
        };
        if down > self {
            down
        } else if up < self {
            up
        } else {
            self
        }
    }
}

impl std::fmt::Display for FreeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::FreeState::{self, *};
    use crate::PolicyConfig;

    fn walk(from: FreeState, percents: &[f64]) -> Vec<FreeState> {
        let c = PolicyConfig::default();
        let mut s = from;
        percents
            .iter()
            .map(|p| {
                s = s.next(p / 100.0, &c);
                s
            })
            .collect()
    }

    #[test]
    fn thresholds_going_down() {
        assert_eq!(
            walk(High, &[10.0, 6.0, 4.5, 4.0, 3.99, 2.0, 1.99, 1.0, 0.99, 0.0]),
            [High, High, High, High, Soft, Soft, Hard, Hard, Low, Low]
        );
    }

    #[test]
    fn hysteresis_going_up() {
        // Into low, then back up one band at a time: each state is left only at the
        // next threshold up.
        assert_eq!(
            walk(High, &[0.5, 1.5, 1.99, 2.0, 3.9, 4.0, 5.9, 6.0]),
            [Low, Low, Low, Hard, Hard, Soft, Soft, High]
        );
        // Oscillating around a threshold does not flap.
        assert_eq!(walk(Soft, &[3.9, 4.1, 3.95, 4.2, 5.0]), [Soft, Soft, Soft, Soft, Soft]);
        // A big recovery jumps several states at once.
        assert_eq!(walk(High, &[0.5, 7.0]), [Low, High]);
    }

    #[test]
    fn names_and_indices_agree() {
        for (i, s) in [High, Soft, Hard, Low].iter().enumerate() {
            assert_eq!(s.index(), i);
            assert_eq!(serde_json::to_string(s).unwrap(), format!("\"{}\"", s.name()));
        }
    }
}
