//! The per-tick decision: from host memory and each VM's memory to balloon
//! targets, pages to swap and pauses.
//!
//! [`Policy::tick`] builds one [`VmPlan`] per VM in small steps, each a rule of
//! ESX's policy:
//!
//! 1. **State**: the free-memory state moves with hysteresis ([`crate::state`]).
//! 2. **Allocation**: the memory the VMs may hold together is
//!    `T = min(free + resident(VMs), total) - high * total` (what keeps the host at the high
//!    threshold). Memory is **overcommitted** when the VMs' maxima do not fit in it
//!    (which is always the case below the high state). Then each VM's target comes
//!    from [`crate::allocation::allocate`] (min / max / shares, active estimate, the
//!    idle tax); otherwise every target is the VM's max and nothing is taken. Targets
//!    are recomputed every `realloc_period_ms`, at state changes
//!    (`realloc_on_state_change`), when `T` moved by more than 1% of host memory,
//!    and when the VMs or their parameters change.
//! 3. **Limits**, whatever the state: a VM above its limit has its balloon asked
//!    for the excess; if it is still above after `limit_grace_ticks` ticks (or its
//!    balloon cannot be used) the excess is swapped.
//! 4. **Balloon**: each balloon the policy owns aims at `max - target`
//!    (configured memory minus target, capped at `balloon_max_fraction`), so it
//!    deflates fully when memory is plentiful. In low only VMs without a swapper
//!    are ballooned further: the others are swapped and paused, and a paused guest
//!    cannot inflate.
//! 5. **Swap** (hard and low): up to the soft threshold, capped per tick (twice the
//!    cap in low), shared out by min-funding revocation among the VMs above their
//!    target (each gives at most its excess).
//! 6. **Targets and pauses**: in low, a VM above its target that can swap is
//!    paused.
//!
//! Balloons the user pinned (see `docs/policy.md`) are read like any other (their
//! pending pages count as coming) but never moved: the policy neither inflates nor
//! deflates them, and a pinned VM over its limit goes straight to swap.

use std::collections::HashMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Bytes per page, as the policy counts memory.
const PAGE: u64 = pagestate::PAGE_SIZE as u64;
use serde::{Deserialize, Serialize};

use crate::allocation::{allocate, Claimant};
use crate::config::PolicyConfig;
use crate::host_mem::{HostMem, HostMemError, HostMemSource};
use crate::revocation::min_funding;
use crate::state::FreeState;
use crate::stats::{PolicyStats, StateChange};
use crate::vm::VmMemInfo;

/// What to do with one VM this tick.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmPlan {
    /// The VM's name.
    pub name: String,
    /// Balloon target after this tick, pages (the device's target when unchanged).
    pub balloon_target_pages: u64,
    /// Change of that target from the device's current one (+ inflate,
    /// - deflate); 0: leave the balloon alone.
    pub balloon_delta_pages: i64,
    /// Pages to evict now with the VM's swapper.
    pub swap_pages: u64,
    /// Keep the VM paused (low state, above target) until a tick says otherwise.
    pub pause: bool,
    /// The VM's allocation target: resident memory it should come down to when
    /// above, pages.
    pub target_pages: u64,
    /// The VM is above its configured limit.
    pub over_limit: bool,
}

/// The decision of one tick.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The free-memory state after this tick.
    pub state: FreeState,
    /// Host free memory, percent.
    pub free_pct: f64,
    /// Host memory as sampled.
    pub host: HostMem,
    /// Memory the VMs may hold together, pages (see the module documentation).
    pub vm_memory_pages: u64,
    /// The VMs' maxima do not fit in it: targets come from allocation.
    pub overcommitted: bool,
    /// One plan per VM, in the order the VMs were given.
    pub vms: Vec<VmPlan>,
}

impl Decision {
    /// The plan of the VM called `name`.
    pub fn vm(&self, name: &str) -> Option<&VmPlan> {
        self.vms.iter().find(|a| a.name == name)
    }
}

/// Host memory at one tick, in pages, and the state it puts the host in.
struct HostPages {
    state: FreeState,
    total: u64,
    free: u64,
    /// `free / total`.
    fraction: f64,
}

impl HostPages {
    /// Pages missing to reach `threshold` (a fraction of host memory) free.
    fn missing_to(&self, threshold: f64) -> u64 {
        ((threshold * self.total as f64).ceil() as u64).saturating_sub(self.free)
    }
}

/// The allocation targets in force and what they were computed from.
struct Allocation {
    at: Instant,
    /// Names and parameters of the VMs (recomputed when they change).
    inputs: Vec<(String, u64, u64, u64)>,
    tax: f64,
    targets: Vec<u64>,
    vm_memory: u64,
    overcommitted: bool,
}

/// One VM while a tick is decided.
struct Draft<'a> {
    vm: &'a VmMemInfo,
    /// Its allocation target.
    target: u64,
    /// The device's balloon target when the tick began (0 without a balloon).
    balloon_now: u64,
    /// The balloon target this tick sets.
    balloon_target: u64,
    /// Largest target the policy may set: 0 without a balloon or when the user
    /// pinned it.
    balloon_max: u64,
    swap: u64,
    over_limit: bool,
}

impl<'a> Draft<'a> {
    fn new(vm: &'a VmMemInfo, target: u64, c: &PolicyConfig) -> Draft<'a> {
        let now = vm.balloon.map_or(0, |b| b.target_pages);
        let max = match vm.balloon {
            Some(b) if !b.pinned => (vm.size_pages as f64 * c.balloon_max_fraction) as u64,
            _ => 0,
        };
        Draft { vm, target, balloon_now: now, balloon_target: now, balloon_max: max, swap: 0, over_limit: false }
    }

    /// Whether the policy may move this VM's balloon.
    fn balloon_is_ours(&self) -> bool {
        self.balloon_max > 0
    }

    /// Pages asked of the guest (by this tick's target) and not given yet.
    fn pending(&self) -> u64 {
        self.balloon_target.saturating_sub(self.vm.balloon.map_or(0, |b| b.size_pages))
    }

    /// How much more may be swapped: the excess over its target, less what is
    /// already being swapped (in hard and low the balloon is too slow to wait for).
    fn swap_room(&self) -> u64 {
        if self.vm.swap {
            let excess = self.vm.resident_pages.saturating_sub(self.target.max(self.vm.min_pages));
            excess.saturating_sub(self.swap)
        } else {
            0
        }
    }
}

/// The free-memory policy (one per host process).
pub struct Policy {
    cfg: PolicyConfig,
    state: FreeState,
    started: Instant,
    stats: PolicyStats,
    /// Consecutive ticks each VM has been over its limit.
    over_limit: HashMap<String, u32>,
    allocation: Option<Allocation>,
}

impl Policy {
    /// A policy in the high state.
    pub fn new(cfg: PolicyConfig) -> Policy {
        Policy {
            cfg,
            state: FreeState::High,
            started: Instant::now(),
            stats: PolicyStats::default(),
            over_limit: HashMap::new(),
            allocation: None,
        }
    }

    /// Its tunables.
    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// Changes the idle memory tax (checked by [`crate::config::check_tax`]); the
    /// targets are recomputed at the next tick.
    pub fn set_idle_tax(&mut self, tau: f64) {
        self.cfg.idle_tax = tau;
        self.stats.idle_tax = tau;
    }

    /// The state now.
    pub fn state(&self) -> FreeState {
        self.state
    }

    /// Counters and state history.
    pub fn stats(&self) -> PolicyStats {
        self.stats.clone()
    }

    /// Samples `source` and decides.
    pub fn tick_with(&mut self, source: &mut dyn HostMemSource, vms: &[VmMemInfo]) -> Result<Decision, HostMemError> {
        let host = source.sample()?;
        Ok(self.tick(host, vms))
    }

    /// One tick: updates the state from host memory, and plans each VM.
    pub fn tick(&mut self, host: HostMem, vms: &[VmMemInfo]) -> Decision {
        let (h, changed) = self.enter_state(host);
        self.over_limit.retain(|k, _| vms.iter().any(|v| &v.name == k));
        self.allocate(&h, vms, changed);
        let a = self.allocation.as_ref().expect("allocate() sets it");
        let (vm_memory_pages, overcommitted) = (a.vm_memory, a.overcommitted);
        let mut drafts: Vec<Draft> =
            vms.iter().zip(&a.targets).map(|(v, &t)| Draft::new(v, t.min(v.max_pages()), &self.cfg)).collect();
        self.reclaim_over_limit(&mut drafts);
        self.balloon_to_targets(&h, &mut drafts, overcommitted);
        self.swap_to_soft(&h, &mut drafts);
        let plans = self.pauses(&h, drafts);
        self.stats.overcommitted = overcommitted;
        self.stats.vm_memory_mib = (vm_memory_pages * PAGE) as f64 / (1 << 20) as f64;
        Decision { state: h.state, free_pct: h.fraction * 100.0, host, vm_memory_pages, overcommitted, vms: plans }
    }

    /// Step 2: the allocation targets, recomputed when due.
    fn allocate(&mut self, h: &HostPages, vms: &[VmMemInfo], state_changed: bool) {
        let inputs: Vec<_> = vms.iter().map(|v| (v.name.clone(), v.shares, v.min_pages, v.max_pages())).collect();
        let resident: u64 = vms.iter().map(|v| v.resident_pages).sum();
        let keep_free = (self.cfg.high * h.total as f64).ceil() as u64;
        // Free memory reads 0 when the VMs hold more than a budget: they never have
        // more than the host's total.
        let vm_memory = (h.free + resident).min(h.total).saturating_sub(keep_free);
        let due = match &self.allocation {
            None => true,
            Some(a) => {
                a.at.elapsed().as_millis() >= self.cfg.realloc_period_ms as u128
                    || (state_changed && self.cfg.realloc_on_state_change)
                    || a.vm_memory.abs_diff(vm_memory) > h.total / 100
                    || a.inputs != inputs
                    || a.tax != self.cfg.idle_tax
            }
        };
        if !due {
            return;
        }
        let claimants: Vec<Claimant> = vms.iter().map(VmMemInfo::claimant).collect();
        let overcommitted = claimants.iter().map(|c| c.max).sum::<u64>() > vm_memory;
        let targets = allocate(vm_memory, &claimants, self.cfg.idle_tax);
        self.stats.reallocations += 1;
        self.allocation =
            Some(Allocation { at: Instant::now(), inputs, tax: self.cfg.idle_tax, targets, vm_memory, overcommitted });
    }

    /// Step 1: the new state, counted and logged; and whether it changed.
    fn enter_state(&mut self, host: HostMem) -> (HostPages, bool) {
        let total = (host.total_bytes / PAGE).max(1);
        let free = host.free_bytes.min(host.total_bytes) / PAGE;
        let fraction = free as f64 / total as f64;
        let new = self.state.next(fraction, &self.cfg);
        if new != self.state {
            let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            self.stats.push(StateChange {
                at_ms: self.started.elapsed().as_millis() as u64,
                unix_ms,
                from: self.state,
                to: new,
                free_pct: fraction * 100.0,
            });
            log::info!("policy: free memory {:.2}%: state {} -> {}", fraction * 100.0, self.state, new);
        }
        let changed = new != self.state;
        self.state = new;
        self.stats.tick(new, fraction * 100.0);
        self.stats.free_mib = (free * PAGE) as f64 / (1 << 20) as f64;
        self.stats.idle_tax = self.cfg.idle_tax;
        (HostPages { state: new, total, free, fraction }, changed)
    }

    /// Step 2: VMs above their limit, whatever the state.
    fn reclaim_over_limit(&mut self, drafts: &mut [Draft]) {
        for d in drafts.iter_mut() {
            let v = d.vm;
            let Some(limit) = v.limit_pages else { continue };
            if v.resident_pages <= limit {
                self.over_limit.remove(&v.name);
                continue;
            }
            d.over_limit = true;
            let excess = v.resident_pages - limit;
            let ticks = self.over_limit.entry(v.name.clone()).or_insert(0);
            *ticks += 1;
            if *ticks <= self.cfg.limit_grace_ticks && d.balloon_target < d.balloon_max {
                d.balloon_target = (d.balloon_target + excess.saturating_sub(d.pending())).min(d.balloon_max);
            } else if v.swap {
                d.swap += excess.saturating_sub(v.min_pages.saturating_sub(limit));
            }
        }
    }

    /// Step 5: in hard and low, swap up to the soft threshold, from the VMs above
    /// their targets.
    fn swap_to_soft(&self, h: &HostPages, drafts: &mut [Draft]) {
        let already: u64 = drafts.iter().map(|d| d.swap).sum();
        let cap = match h.state {
            FreeState::High | FreeState::Soft => return,
            FreeState::Hard => self.cfg.max_swap_pages_per_tick,
            FreeState::Low => 2 * self.cfg.max_swap_pages_per_tick,
        };
        let amount = h.missing_to(self.cfg.soft).saturating_sub(already).min(cap);
        let clients: Vec<_> = drafts.iter().map(|d| d.vm.client(d.swap_room())).collect();
        let give = min_funding(amount, &clients, self.cfg.idle_tax);
        for (d, g) in drafts.iter_mut().zip(give) {
            d.swap += g;
        }
    }

    /// Step 4: each balloon the policy owns aims at `max - target` (none when
    /// memory is plentiful); in low, VMs that can swap are not ballooned further.
    fn balloon_to_targets(&self, h: &HostPages, drafts: &mut [Draft], overcommitted: bool) {
        for d in drafts.iter_mut().filter(|d| d.balloon_is_ours() && !d.over_limit) {
            let want = if overcommitted { d.vm.size_pages.saturating_sub(d.target).min(d.balloon_max) } else { 0 };
            d.balloon_target = match h.state {
                FreeState::Low if d.vm.swap => want.min(d.balloon_now),
                _ => want,
            };
        }
    }

    /// Step 6: pauses, counters, plans.
    fn pauses(&mut self, h: &HostPages, drafts: Vec<Draft>) -> Vec<VmPlan> {
        drafts
            .into_iter()
            .map(|d| {
                let v = d.vm;
                let target = d.target;
                let pause = h.state == FreeState::Low && v.swap && v.resident_pages > target;
                let delta = d.balloon_target as i64 - d.balloon_now as i64;
                self.stats.balloon_pages_asked += delta.max(0) as u64;
                self.stats.swap_pages_asked += d.swap;
                self.stats.pauses_asked += pause as u64;
                VmPlan {
                    name: v.name.clone(),
                    balloon_target_pages: d.balloon_target,
                    balloon_delta_pages: delta,
                    swap_pages: d.swap,
                    pause,
                    target_pages: target,
                    over_limit: d.over_limit,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_mem::Budget;
    use crate::vm::BalloonInfo;

    const GIB: u64 = 1 << 30;

    fn host(free_pct: f64) -> HostMem {
        let total = 100 * GIB;
        HostMem { total_bytes: total, free_bytes: (total as f64 * free_pct / 100.0) as u64 }
    }

    /// A VM that holds all of its configured memory.
    fn vm(name: &str, resident_gib: u64) -> VmMemInfo {
        VmMemInfo::new(name, resident_gib * GIB / PAGE, resident_gib * GIB / PAGE)
    }

    /// What the VMM does between ticks with guests that do not inflate (yet): each
    /// balloon device takes the target the plan set.
    fn apply(vms: &mut [VmMemInfo], d: &Decision) {
        for v in vms.iter_mut() {
            let plan = d.vm(&v.name).unwrap();
            if let Some(b) = &mut v.balloon {
                if !b.pinned {
                    b.target_pages = plan.balloon_target_pages;
                }
            }
        }
    }

    fn balloon_total(d: &Decision) -> u64 {
        d.vms.iter().map(|a| a.balloon_target_pages).sum()
    }

    #[test]
    fn state_changes_are_recorded() {
        use FreeState::*;
        let mut p = Policy::new(PolicyConfig::default());
        let seq = [0.5, 1.5, 1.99, 2.0, 3.9, 4.0, 5.9, 6.0, 3.9, 4.1, 3.95, 4.2, 5.0, 0.5, 7.0];
        let states: Vec<FreeState> = seq.iter().map(|&f| p.tick(host(f), &[]).state).collect();
        assert_eq!(states, [Low, Low, Low, Hard, Hard, Soft, Soft, High, Soft, Soft, Soft, Soft, Soft, Low, High]);
        let s = p.stats();
        let path: Vec<(FreeState, FreeState)> = s.history.iter().map(|c| (c.from, c.to)).collect();
        assert_eq!(
            path,
            [(High, Low), (Low, Hard), (Hard, Soft), (Soft, High), (High, Soft), (Soft, Low), (Low, High)]
        );
        assert!(s.history.windows(2).all(|w| w[0].at_ms <= w[1].at_ms && w[0].unix_ms <= w[1].unix_ms));
        assert_eq!(s.ticks, 15);
        assert_eq!(s.ticks_in_state.iter().sum::<u64>(), 15);
        assert_eq!(s.state, High);
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"from\":\"low\""));
    }

    #[test]
    fn plentiful_memory_takes_nothing() {
        let mut p = Policy::new(PolicyConfig::default());
        // 30% free: the VMs' 16 GiB fit in the 24 GiB left above 6% free.
        let d = p.tick(host(30.0), &[vm("a", 8), vm("b", 8)]);
        assert_eq!(d.state, FreeState::High);
        assert!(!d.overcommitted && d.vm_memory_pages == 40 * GIB / PAGE, "{d:?}");
        for a in &d.vms {
            assert_eq!((a.balloon_target_pages, a.swap_pages, a.pause, a.target_pages), (0, 0, false, 8 * GIB / PAGE));
        }
    }

    #[test]
    fn balloon_starts_in_high_once_the_maxima_do_not_fit() {
        let mut p = Policy::new(PolicyConfig::default());
        let d = p.tick(host(4.5), &[vm("a", 8), vm("b", 8)]);
        assert_eq!(d.state, FreeState::High);
        let asked = balloon_total(&d);
        // Aim at 6% free: 1.5% of 100 GiB.
        let want = (1.5 * GIB as f64 / PAGE as f64) as u64;
        assert!(asked.abs_diff(want) <= 2, "{asked} vs {want}");
        assert!(d.vms.iter().all(|a| a.swap_pages == 0 && !a.pause));
        // Equal VMs give equally.
        assert!(d.vms[0].balloon_target_pages.abs_diff(d.vms[1].balloon_target_pages) <= want / 64 + 1);
    }

    #[test]
    fn soft_balloons_and_counts_pending() {
        let mut p = Policy::new(PolicyConfig::default());
        let mut vms = [vm("a", 8), vm("b", 8)];
        let d1 = p.tick(host(3.0), &vms);
        assert_eq!(d1.state, FreeState::Soft);
        let t1 = balloon_total(&d1);
        assert!(t1 > 0);
        assert!(d1.vms.iter().all(|a| a.swap_pages == 0 && !a.pause));
        // The guests have not inflated yet and free memory is the same: no more asked.
        apply(&mut vms, &d1);
        let d2 = p.tick(host(3.0), &vms);
        assert_eq!(balloon_total(&d2), t1);
        assert!(d2.vms.iter().all(|a| a.balloon_delta_pages == 0));
        // Free memory drops further: more is asked.
        apply(&mut vms, &d2);
        let d3 = p.tick(host(1.5), &vms);
        assert!(balloon_total(&d3) > t1);
    }

    #[test]
    fn hard_balloons_and_swaps_without_double_counting() {
        let mut p = Policy::new(PolicyConfig { max_swap_pages_per_tick: u64::MAX / 4, ..Default::default() });
        let d = p.tick(host(1.5), &[vm("a", 8), vm("b", 8)]);
        assert_eq!(d.state, FreeState::Hard);
        let swap: u64 = d.vms.iter().map(|a| a.swap_pages).sum();
        let balloon = balloon_total(&d);
        let gib_pages = GIB as f64 / PAGE as f64;
        // Swap up to the soft threshold (2.5%); the balloons aim at max - target,
        // the whole 4.5% missing to high.
        assert!((swap as f64 - 2.5 * gib_pages).abs() < 4.0, "{swap}");
        assert!((balloon as f64 - 4.5 * gib_pages).abs() < 4.0, "{balloon}");
        assert!(d.vms.iter().all(|a| !a.pause));
    }

    #[test]
    fn swap_is_capped_per_tick() {
        let mut p = Policy::new(PolicyConfig { max_swap_pages_per_tick: 1000, ..Default::default() });
        let d = p.tick(host(1.5), &[vm("a", 8)]);
        assert_eq!(d.vms[0].swap_pages, 1000);
        let d = p.tick(host(0.5), &[vm("a", 8)]);
        assert_eq!(d.state, FreeState::Low);
        assert_eq!(d.vms[0].swap_pages, 2000);
    }

    #[test]
    fn low_swaps_and_pauses_vms_above_target() {
        let mut p = Policy::new(PolicyConfig::default());
        let mut small = vm("small", 1);
        small.min_pages = small.resident_pages; // reserved: nothing to take
        let vms = [vm("big", 8), small];
        let d = p.tick(host(0.5), &vms);
        assert_eq!(d.state, FreeState::Low);
        let big = d.vm("big").unwrap();
        let small = d.vm("small").unwrap();
        assert!(big.swap_pages > 0 && big.pause && big.target_pages < vms[0].resident_pages);
        assert!(small.swap_pages == 0 && !small.pause);
        // Low does not ask the balloons of VMs it swaps and pauses for more.
        assert_eq!(big.balloon_delta_pages, 0);
        // Recovery to hard: nobody paused any more.
        let d = p.tick(host(2.5), &vms);
        assert_eq!(d.state, FreeState::Hard);
        assert!(d.vms.iter().all(|a| !a.pause));
    }

    #[test]
    fn without_swappers_the_balloon_does_it_all() {
        let mut vms = [vm("a", 8), vm("b", 8)];
        vms.iter_mut().for_each(|v| v.swap = false);
        let gib_pages = GIB as f64 / PAGE as f64;
        for (free, state) in [(3.0, FreeState::Soft), (1.5, FreeState::Hard), (0.5, FreeState::Low)] {
            let mut p = Policy::new(PolicyConfig::default());
            let d = p.tick(host(free), &vms);
            assert_eq!(d.state, state);
            // Nothing to swap: the balloons are asked for everything up to 6% free,
            // and nobody is paused (a pause frees nothing without eviction).
            assert!(d.vms.iter().all(|a| a.swap_pages == 0 && !a.pause), "{d:?}");
            let balloon = balloon_total(&d) as f64;
            assert!((balloon - (6.0 - free) * gib_pages).abs() < 4.0, "{state}: {balloon}");
        }
        // Mixed, in low: the VM with a swapper is swapped and paused, the other one
        // ballooned.
        let mut p = Policy::new(PolicyConfig::default());
        let mixed = [vm("swaps", 8), VmMemInfo { swap: false, ..vm("balloons", 8) }];
        let d = p.tick(host(0.5), &mixed);
        let (s, b) = (d.vm("swaps").unwrap(), d.vm("balloons").unwrap());
        assert!(s.swap_pages > 0 && s.pause && s.balloon_delta_pages == 0, "{s:?}");
        assert!(b.swap_pages == 0 && !b.pause && b.balloon_delta_pages > 0, "{b:?}");
    }

    #[test]
    fn over_limit_is_reclaimed_with_free_memory() {
        let mut p = Policy::new(PolicyConfig { limit_grace_ticks: 2, ..Default::default() });
        let mut a = vm("a", 8);
        a.limit_pages = Some(6 * GIB / PAGE);
        let mut nb = vm("nb", 8);
        nb.limit_pages = Some(7 * GIB / PAGE);
        nb.balloon = None;
        let mut vms = [a, nb, vm("free", 8)];
        let excess = 2 * GIB / PAGE;
        let d = p.tick(host(50.0), &vms);
        assert_eq!(d.state, FreeState::High);
        let da = d.vm("a").unwrap();
        assert!(da.over_limit);
        assert_eq!(da.balloon_target_pages, excess);
        assert_eq!(da.swap_pages, 0);
        // Without a balloon: swapped at once.
        assert_eq!(d.vm("nb").unwrap().swap_pages, GIB / PAGE);
        let f = d.vm("free").unwrap();
        assert!(!f.over_limit && f.swap_pages == 0 && f.balloon_target_pages == 0);
        // The guest does not inflate: same target (pending), then swap after the grace.
        apply(&mut vms, &d);
        let d = p.tick(host(50.0), &vms);
        assert_eq!(d.vm("a").unwrap().balloon_target_pages, excess);
        assert_eq!(d.vm("a").unwrap().swap_pages, 0);
        let d = p.tick(host(50.0), &vms);
        assert_eq!(d.vm("a").unwrap().swap_pages, excess);
        // Back under its limit: nothing more, and the streak resets.
        let mut a = vms[0].clone();
        a.resident_pages = 5 * GIB / PAGE;
        a.balloon = Some(BalloonInfo { target_pages: excess, size_pages: excess, pinned: false });
        let d = p.tick(host(50.0), &[a]);
        let da = d.vm("a").unwrap();
        assert!(!da.over_limit && da.swap_pages == 0);
        // Plenty free (50% > 8%): a VM not over its limit deflates.
        assert!(da.balloon_target_pages < excess);
    }

    #[test]
    fn a_pinned_balloon_is_read_but_never_moved() {
        let pinned = |target_gib: u64, size_gib: u64| {
            Some(BalloonInfo { target_pages: target_gib * GIB / PAGE, size_pages: size_gib * GIB / PAGE, pinned: true })
        };
        // Soft: the pinned VM's balloon stays; the other one aims at max - target
        // (targets 6.5 GiB each of T = 13 GiB).
        let mut p = Policy::new(PolicyConfig::default());
        let vms = [VmMemInfo { balloon: pinned(2, 1), ..vm("pinned", 8) }, vm("auto", 8)];
        let d = p.tick(host(3.0), &vms);
        let (pd, ad) = (d.vm("pinned").unwrap(), d.vm("auto").unwrap());
        assert_eq!((pd.balloon_target_pages, pd.balloon_delta_pages), (2 * GIB / PAGE, 0));
        assert!(ad.balloon_target_pages.abs_diff(3 * GIB / PAGE / 2) <= 2, "{ad:?}");
        // Plenty free: the policy's balloon deflates, the pinned one does not.
        let mut vms = vms;
        vms[1].balloon = Some(BalloonInfo { target_pages: GIB / PAGE, size_pages: GIB / PAGE, pinned: false });
        let d = p.tick(host(50.0), &vms);
        assert_eq!(d.vm("pinned").unwrap().balloon_delta_pages, 0);
        assert!(d.vm("auto").unwrap().balloon_delta_pages < 0);
        // Over its limit, a pinned VM goes to swap at once: its balloon is the user's.
        let mut p = Policy::new(PolicyConfig::default());
        let over = VmMemInfo { limit_pages: Some(6 * GIB / PAGE), balloon: pinned(0, 0), ..vm("over", 8) };
        let d = p.tick(host(50.0), &[over]);
        let od = d.vm("over").unwrap();
        assert!(od.over_limit && od.balloon_delta_pages == 0 && od.swap_pages == 2 * GIB / PAGE, "{od:?}");
    }

    #[test]
    fn a_target_set_elsewhere_is_moved_to_max_minus_target() {
        // A target the policy did not set (an API target handed back, or the boot
        // configuration) is read from the device and moved to where the allocation
        // says: T = 3 + 8 - 6 = 5 GiB, so 3 GiB in the balloon, not 4.
        let mut p = Policy::new(PolicyConfig::default());
        let set = BalloonInfo { target_pages: 4 * GIB / PAGE, size_pages: 0, pinned: false };
        let d = p.tick(host(3.0), &[VmMemInfo { balloon: Some(set), ..vm("a", 8) }]);
        assert_eq!(d.vms[0].balloon_target_pages, 3 * GIB / PAGE);
        assert_eq!(d.vms[0].balloon_delta_pages, -((GIB / PAGE) as i64));
        assert_eq!(p.stats().balloon_pages_asked, 0);
    }

    #[test]
    fn targets_follow_shares_tax_and_min() {
        // T = 3 + 16 - 6 = 13 GiB for two 8 GiB VMs.
        let gib = |g: f64| (g * (GIB / PAGE) as f64) as u64;
        let target = |p: &mut Policy, vms: &[VmMemInfo]| {
            let d = p.tick(host(3.0), vms);
            (d.vms[0].target_pages, d.vms[1].target_pages)
        };
        let (busy, mut idle) = (vm("busy", 8), vm("idle", 8));
        idle.active_fraction = 0.0;
        let mut p = Policy::new(PolicyConfig { idle_tax: 0.0, ..Default::default() });
        let (b, i) = target(&mut p, &[busy.clone(), idle.clone()]);
        assert!(b.abs_diff(gib(6.5)) < 2 && i.abs_diff(gib(6.5)) < 2, "{b} {i}");
        // The tax: the idle VM keeps (T + 3 * 0) / 5 = 2.6 GiB; taken at the next
        // tick without waiting for the period (a parameter changed).
        p.set_idle_tax(0.75);
        let (b, i) = target(&mut p, &[busy.clone(), idle.clone()]);
        assert!(b.abs_diff(gib(8.0)) < 2 && i.abs_diff(gib(5.0)) < 2, "capped at max: {b} {i}");
        // Twice the shares, both busy: 2:1 (within the maxima).
        let mut rich = vm("rich", 5);
        rich.shares *= 2;
        let d = Policy::new(PolicyConfig::default()).tick(host(3.0), &[rich, vm("poor", 5)]);
        let (r, q) = (d.vms[0].target_pages, d.vms[1].target_pages);
        assert!(r.abs_diff(2 * q) < 4, "T = 7 GiB: {r} {q}");
        // A reservation is never crossed.
        idle.min_pages = gib(7.0);
        let (_, i) = target(&mut p, &[busy, idle]);
        assert_eq!(i, gib(7.0));
    }

    #[test]
    fn balloon_is_capped() {
        let mut p = Policy::new(PolicyConfig::default());
        // One small VM cannot give 3% of a 100 GiB host through its balloon.
        let v = VmMemInfo::new("a", GIB / PAGE, GIB / PAGE);
        let d = p.tick(host(3.0), &[v]);
        assert_eq!(d.vms[0].balloon_target_pages, (GIB / PAGE) * 65 / 100);
    }

    #[test]
    fn budget_drives_the_states() {
        // With a budget a little above what the VMs touch, growing residency walks
        // the states down, reclaiming walks them back up.
        let mut p = Policy::new(PolicyConfig::default());
        let budget = 1000 * PAGE;
        let mut seen = Vec::new();
        for used in [900u64, 950, 965, 985, 995, 970, 950, 930] {
            let mut b = Budget::new(budget, move || used * PAGE);
            let d = p.tick_with(&mut b, &[VmMemInfo::new("a", 1000, used)]).unwrap();
            seen.push(d.state);
        }
        use FreeState::*;
        assert_eq!(seen, [High, High, Soft, Hard, Low, Hard, Soft, High]);
    }
}
