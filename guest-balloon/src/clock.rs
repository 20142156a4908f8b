//! Time from the TSC, which is native (and cheap) on every backend.
//!
//! The VMM passes the TSC frequency in `BootInfo::tsc_khz`; without it the guest
//! assumes 1 GHz and says so in its boot line, since then its times are only
//! relative.

use crate::arch;

/// Frequency assumed when the VMM does not know the TSC's.
const ASSUMED_KHZ: u64 = 1_000_000;

/// Converts between TSC ticks and microseconds.
#[derive(Clone, Copy)]
pub struct Clock {
    khz: u64,
}

impl Clock {
    /// A clock for a TSC of `tsc_khz` (0: unknown).
    pub fn new(tsc_khz: u64) -> Clock {
        Clock { khz: if tsc_khz == 0 { ASSUMED_KHZ } else { tsc_khz } }
    }

    /// The frequency used, in kHz.
    pub fn khz(&self) -> u64 {
        self.khz
    }

    /// The current TSC value.
    pub fn now(&self) -> u64 {
        arch::rdtsc()
    }

    /// Microseconds since `start` (a [`Clock::now`] value).
    pub fn us_since(&self, start: u64) -> u64 {
        let ticks = self.now().wrapping_sub(start) as u128;
        (ticks * 1000 / self.khz as u128) as u64
    }

    /// The TSC value `us` microseconds from now.
    pub fn deadline(&self, us: u64) -> u64 {
        let ticks = (us as u128 * self.khz as u128 / 1000).min(u64::MAX as u128) as u64;
        self.now().saturating_add(ticks)
    }
}
