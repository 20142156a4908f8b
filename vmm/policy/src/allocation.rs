//! How much memory each VM may hold when memory is overcommitted: ESX's min / max /
//! shares, allocated by min-funding revocation with the idle memory tax
//! (Waldspurger, OSDI 2002, sections 5 and 6).
//!
//! Each VM has a reservation `min` (never reclaimed below), a maximum `max` (its
//! configured memory, or its limit if lower), shares `S` and an active estimate `a`
//! (pages, from the sampler). With `T` pages for all VMs, [`allocate`] gives each VM
//! `min <= P <= max` such that, for every VM strictly between its bounds, the
//! adjusted shares-per-page ratio
//!
//! ```text
//! rho = S / cost(P),   cost(P) = min(P, a) + k * max(0, P - a),   k = 1 / (1 - tau)
//! ```
//!
//! is the same: an idle page costs `k` active ones (at the ESX default `tau` = 0.75,
//! k = 4), so a VM that does not use its memory pays for it with its allocation. This
//! is the fixed point of min-funding revocation (taking page after page from the VM
//! of lowest `rho`), computed directly: `cost` is increasing in `P`, so for a common
//! level `L = 1 / rho` each VM's `P(L)` is `cost⁻¹(S * L)` clamped to its bounds, and
//! the level where the `P(L)` sum to `T` is found by bisection.
//!
//! Two VMs with equal shares, one fully active and one with `a1` active pages, get
//! `P1 = (T + (k - 1) * a1) / (k + 1)` for the idle one: the formula of the paper's
//! figure 7, checked by the tests below.

use serde::{Deserialize, Serialize};

use crate::revocation::idle_page_cost;

/// Pages per MiB.
const PAGES_PER_MIB: u64 = (1 << 20) / pagestate::PAGE_SIZE as u64;

/// A VM's shares, as the user gives them: a number, or an ESX level that scales
/// with the VM's configured memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "SharesText")]
pub enum Shares {
    /// 5 per MiB of configured memory.
    Low,
    /// 10 per MiB (the default).
    #[default]
    Normal,
    /// 20 per MiB.
    High,
    /// Exactly this many (at least 1).
    #[serde(untagged)]
    Count(u64),
}

/// Shares as a config file or a request writes them: a number or a word.
#[derive(Deserialize)]
#[serde(untagged)]
enum SharesText {
    Count(u64),
    Word(String),
}

impl TryFrom<SharesText> for Shares {
    type Error = SharesError;

    fn try_from(text: SharesText) -> Result<Shares, SharesError> {
        match text {
            SharesText::Count(n) => Shares::Count(n).validate(),
            SharesText::Word(w) => Shares::parse(&w),
        }
    }
}

/// A shares value that is neither a positive number nor `low`, `normal`, `high`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SharesError {
    /// Zero shares would give a VM nothing to claim with.
    #[error("shares must be at least 1")]
    Zero,
    /// Not a number nor a level.
    #[error("bad shares {0:?}: a number or low, normal, high")]
    Unknown(String),
}

impl Shares {
    /// Parses `2000`, `low`, `normal` or `high`.
    pub fn parse(text: &str) -> Result<Shares, SharesError> {
        match text {
            "low" => Ok(Shares::Low),
            "normal" => Ok(Shares::Normal),
            "high" => Ok(Shares::High),
            n => match n.parse::<u64>() {
                Ok(0) => Err(SharesError::Zero),
                Ok(n) => Ok(Shares::Count(n)),
                Err(_) => Err(SharesError::Unknown(text.to_string())),
            },
        }
    }

    /// Checks a value that did not come through [`Shares::parse`] (a config file).
    pub fn validate(self) -> Result<Shares, SharesError> {
        match self {
            Shares::Count(0) => Err(SharesError::Zero),
            s => Ok(s),
        }
    }

    /// The number of shares of a VM of `size_pages` configured pages.
    pub fn of(self, size_pages: u64) -> u64 {
        let mib = size_pages.div_ceil(PAGES_PER_MIB);
        match self {
            Shares::Low => 5 * mib,
            Shares::Normal => 10 * mib,
            Shares::High => 20 * mib,
            Shares::Count(n) => n,
        }
        .max(1)
    }
}

impl std::fmt::Display for Shares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shares::Low => f.write_str("low"),
            Shares::Normal => f.write_str("normal"),
            Shares::High => f.write_str("high"),
            Shares::Count(n) => write!(f, "{n}"),
        }
    }
}

/// One VM as allocation sees it, in pages.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Claimant {
    /// Its shares `S` (at least 1 is used).
    pub shares: u64,
    /// Its reservation.
    pub min: u64,
    /// The most it may have (configured memory, or its limit if lower); at least
    /// `min` is used.
    pub max: u64,
    /// Pages it uses actively (`a`, the sampler's estimate; capped at `max`).
    pub active: u64,
}

impl Claimant {
    /// The allocation at level `level` (see the module documentation).
    fn at(&self, level: f64, k: f64) -> f64 {
        let want = self.shares.max(1) as f64 * level;
        let active = self.active.min(self.max) as f64;
        let p = if want <= active { want } else { active + (want - active) / k };
        p.clamp(self.min as f64, self.max.max(self.min) as f64)
    }
}

/// Splits `total` pages among `claimants` by min-funding revocation with the idle
/// tax `tau`: each gets between its min and max; everyone gets max when the maxima
/// fit, everyone min when not even the minima do (admission control keeps that
/// from happening). The sum is at most `total` (pages are rounded down) unless the
/// minima alone exceed it.
pub fn allocate(total: u64, claimants: &[Claimant], tau: f64) -> Vec<u64> {
    let max = |c: &Claimant| c.max.max(c.min);
    if claimants.iter().map(max).sum::<u64>() <= total {
        return claimants.iter().map(max).collect();
    }
    if claimants.iter().map(|c| c.min).sum::<u64>() >= total {
        return claimants.iter().map(|c| c.min).collect();
    }
    let k = idle_page_cost(tau);
    let sum_at = |level: f64| claimants.iter().map(|c| c.at(level, k)).sum::<f64>();
    // At this level every claimant is at its max (cost(max) <= k * max).
    let mut hi = claimants.iter().map(|c| k * max(c) as f64 / c.shares.max(1) as f64).fold(0.0, f64::max);
    let mut lo = 0.0;
    for _ in 0..200 {
        let mid = (lo + hi) / 2.0;
        if sum_at(mid) > total as f64 {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    claimants.iter().map(|c| c.at(lo, k).floor() as u64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = PAGES_PER_MIB;

    fn vm(shares: u64, active: u64) -> Claimant {
        Claimant { shares, min: 0, max: 256 * MIB, active }
    }

    fn close(got: u64, want: f64, tolerance: f64) -> bool {
        (got as f64 - want).abs() <= tolerance
    }

    #[test]
    fn shares_parse_and_scale() {
        assert_eq!(Shares::parse("low").unwrap().of(256 * MIB), 1280);
        assert_eq!(Shares::parse("normal").unwrap().of(256 * MIB), 2560);
        assert_eq!(Shares::parse("high").unwrap().of(256 * MIB), 5120);
        assert_eq!(Shares::parse("700").unwrap().of(256 * MIB), 700);
        assert_eq!(Shares::parse("0").unwrap_err().to_string(), "shares must be at least 1");
        assert_eq!(
            Shares::parse("medium").unwrap_err().to_string(),
            "bad shares \"medium\": a number or low, normal, high"
        );
        assert_eq!(Shares::Count(0).validate(), Err(SharesError::Zero));
        assert_eq!(serde_json::to_string(&Shares::High).unwrap(), "\"high\"");
        assert_eq!(serde_json::from_str::<Shares>("300").unwrap(), Shares::Count(300));
        assert_eq!(serde_json::from_str::<Shares>("\"low\"").unwrap(), Shares::Low);
    }

    #[test]
    fn plentiful_memory_gives_everyone_max() {
        assert_eq!(allocate(600 * MIB, &[vm(10, 0), vm(10, 0)], 0.75), [256 * MIB, 256 * MIB]);
    }

    #[test]
    fn no_tax_equal_shares_split_equally() {
        let t = 360 * MIB;
        let p = allocate(t, &[vm(10, 256 * MIB), vm(10, 0)], 0.0);
        assert!(close(p[0], 180.0 * MIB as f64, 2.0) && close(p[1], 180.0 * MIB as f64, 2.0), "{p:?}");
    }

    #[test]
    fn the_tax_moves_idle_memory_to_the_busy_vm_as_the_paper_says() {
        // T = 300 MiB; VM 0 fully active; VM 1 actively uses a1 = 20 MiB.
        let (t, a1) = (300.0 * MIB as f64, 20.0 * MIB as f64);
        let p = allocate(t as u64, &[vm(10, 256 * MIB), vm(10, 20 * MIB)], 0.75);
        let idle = (t + 3.0 * a1) / 5.0;
        assert!(close(p[1], idle, 2.0), "{p:?} vs {idle}");
        assert!(close(p[0], t - idle, 2.0), "{p:?}");
        // The more tax, the less the idle VM keeps.
        let p50 = allocate(t as u64, &[vm(10, 256 * MIB), vm(10, 20 * MIB)], 0.5);
        assert!(p50[1] > p[1] && p50[1] < 150 * MIB, "{p50:?}");
    }

    #[test]
    fn shares_two_to_one_both_busy() {
        let p = allocate(300 * MIB, &[vm(20, 256 * MIB), vm(10, 256 * MIB)], 0.75);
        assert!(close(p[0], 200.0 * MIB as f64, 2.0) && close(p[1], 100.0 * MIB as f64, 2.0), "{p:?}");
    }

    #[test]
    fn min_and_max_bound_every_allocation() {
        let idle_with_min = Claimant { min: 150 * MIB, ..vm(10, 0) };
        let p = allocate(300 * MIB, &[vm(10, 256 * MIB), idle_with_min], 0.75);
        assert_eq!(p[1], 150 * MIB, "{p:?}");
        assert!(close(p[0], 150.0 * MIB as f64, 2.0), "{p:?}");
        // A max below the fair share gives the rest to the other.
        let capped = Claimant { max: 64 * MIB, ..vm(10, 256 * MIB) };
        let p = allocate(300 * MIB, &[vm(10, 256 * MIB), capped], 0.0);
        assert_eq!(p[1], 64 * MIB);
        assert!(close(p[0], 236.0 * MIB as f64, 2.0), "{p:?}");
        // Minima that do not fit: everyone at min (admission refuses this).
        let big = Claimant { min: 200 * MIB, ..vm(10, 0) };
        assert_eq!(allocate(300 * MIB, &[big, big], 0.75), [200 * MIB, 200 * MIB]);
    }
}
