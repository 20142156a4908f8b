//! A VM's active memory estimate from sampling periods, as ESX keeps it (Waldspurger,
//! OSDI 2002, section 5.3).
//!
//! Each period the sampler watches `n` random guest pages and counts those the
//! guest read or wrote (`t`); `f = t / n` is one noisy observation of the fraction
//! of memory in active use (standard error `sqrt(f (1 - f) / n)`). Three averages
//! are kept:
//!
//! - **slow**: `slow += (f - slow) / 8` per period, for stability;
//! - **fast**: `fast += (f - fast) / 2` per period, for agility;
//! - **current**: the fast average as it would be if the period ended now, from the
//!   samples touched so far (`t_so_far / n`); it can only rise during a period, so a
//!   working set that grows is seen before the period ends.
//!
//! The estimate is their maximum: it rises fast and falls slowly (after the working
//! set shrinks to nothing it still says about half after 5 periods). Until the first
//! period ends nothing is known, and the policy counts the VM as fully active.

use serde::{Deserialize, Serialize};

/// Weight of a new period in the slow average.
pub const SLOW_WEIGHT: f64 = 1.0 / 8.0;
/// Weight of a new period in the fast average.
pub const FAST_WEIGHT: f64 = 1.0 / 2.0;

/// The three averages of a VM's touched fraction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ActiveEstimate {
    /// Slow average, fraction of the VM's memory.
    pub slow: f64,
    /// Fast average.
    pub fast: f64,
    /// The fast average updated with the current period's samples so far.
    pub current: f64,
    /// Periods ended so far.
    pub periods: u64,
}

impl ActiveEstimate {
    /// The estimate, a fraction of the VM's memory: the maximum of the three
    /// averages; None before the first period ends.
    pub fn fraction(&self) -> Option<f64> {
        (self.periods > 0).then(|| self.slow.max(self.fast).max(self.current))
    }

    /// The current period has seen `touched` of `valid` samples so far.
    pub fn observe(&mut self, touched: u64, valid: u64) {
        if self.periods > 0 && valid > 0 {
            let f = touched as f64 / valid as f64;
            self.current = self.current.max(self.fast + (f - self.fast) * FAST_WEIGHT);
        }
    }

    /// A period ended with `touched` of `valid` samples touched. A period without
    /// a valid sample changes nothing.
    pub fn end_period(&mut self, touched: u64, valid: u64) {
        if valid == 0 {
            return;
        }
        let f = touched as f64 / valid as f64;
        if self.periods == 0 {
            (self.slow, self.fast) = (f, f);
        } else {
            self.slow += (f - self.slow) * SLOW_WEIGHT;
            self.fast += (f - self.fast) * FAST_WEIGHT;
        }
        self.current = self.fast;
        self.periods += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rises_fast_and_falls_slowly() {
        let mut e = ActiveEstimate::default();
        assert_eq!(e.fraction(), None);
        e.end_period(0, 100);
        assert_eq!(e.fraction(), Some(0.0));
        // A working set of half the memory appears: seen within the period.
        e.observe(30, 100);
        assert!(e.fraction().unwrap() >= 0.15);
        e.end_period(50, 100);
        e.end_period(50, 100);
        assert!(e.fraction().unwrap() >= 0.37, "{e:?}");
        for _ in 0..6 {
            e.end_period(50, 100);
        }
        assert!((e.fraction().unwrap() - 0.5).abs() < 0.01, "{e:?}");
        // It disappears: the fast average follows at once, but after 5 periods the
        // estimate (the slow average) still says a third of it or more.
        for _ in 0..5 {
            e.end_period(0, 100);
        }
        let f = e.fraction().unwrap();
        assert!(e.fast < 0.02 && (0.15..0.35).contains(&f), "{e:?}");
        // A period without valid samples changes nothing.
        let before = e;
        e.end_period(0, 0);
        assert_eq!(e, before);
    }
}
