//! The policy's counters: current state, its history, what it asked for.

use serde::{Deserialize, Serialize};

use crate::state::FreeState;

/// Changes kept in [`PolicyStats::history`].
pub const HISTORY_MAX: usize = 4096;

/// One change of free-memory state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StateChange {
    /// Milliseconds since the policy started.
    pub at_ms: u64,
    /// Milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// The state left.
    pub from: FreeState,
    /// The state entered.
    pub to: FreeState,
    /// Host free memory at the change, percent of host memory.
    pub free_pct: f64,
}

/// The policy's counters (serde: the control API and the exit summary).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PolicyStats {
    /// The state now.
    pub state: FreeState,
    /// Host free memory at the last tick, percent of host memory.
    pub free_pct: f64,
    /// Ticks so far.
    pub ticks: u64,
    /// Ticks spent in each state: high, soft, hard, low.
    pub ticks_in_state: [u64; 4],
    /// State changes, oldest first (the most recent [`HISTORY_MAX`] are kept).
    pub history: Vec<StateChange>,
    /// Changes dropped from the front of `history`.
    pub history_dropped: u64,
    /// Balloon pages asked of the guests (increases of targets), over all ticks.
    pub balloon_pages_asked: u64,
    /// Pages asked of the swappers, over all ticks.
    pub swap_pages_asked: u64,
    /// VM pauses asked (one per VM per tick in the low state above its target).
    pub pauses_asked: u64,
    /// Host free memory at the last tick, MiB.
    pub free_mib: f64,
    /// The idle memory tax in force.
    pub idle_tax: f64,
    /// Memory the VMs may hold together at the last allocation, MiB.
    pub vm_memory_mib: f64,
    /// The VMs' maxima did not fit in it: their targets come from allocation.
    pub overcommitted: bool,
    /// Allocation targets computed so far.
    pub reallocations: u64,
}

impl PolicyStats {
    /// Counts one tick spent in `state` with `free_pct` free.
    pub fn tick(&mut self, state: FreeState, free_pct: f64) {
        self.state = state;
        self.free_pct = free_pct;
        self.ticks += 1;
        self.ticks_in_state[state.index()] += 1;
    }

    /// Appends a change, dropping the oldest beyond [`HISTORY_MAX`].
    pub fn push(&mut self, c: StateChange) {
        if self.history.len() >= HISTORY_MAX {
            self.history.remove(0);
            self.history_dropped += 1;
        }
        self.history.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_bounded() {
        let mut s = PolicyStats::default();
        for i in 0..HISTORY_MAX as u64 + 3 {
            s.push(StateChange { at_ms: i, unix_ms: i, from: FreeState::High, to: FreeState::Soft, free_pct: 3.0 });
        }
        assert_eq!(s.history.len(), HISTORY_MAX);
        assert_eq!(s.history_dropped, 3);
        assert_eq!(s.history[0].at_ms, 3);
    }
}
