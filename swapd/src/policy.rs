//! ESX free-memory states and the per-tick reclamation decision.
//!
//! Pure logic: [`Policy::tick`] takes host memory (from a [`HostMemSource`]) and
//! each VM's memory, and returns a [`Decision`] the VMM applies (balloon targets
//! through the balloon devices, evictions through each VM's `Swapper`, pauses).
//!
//! ## States
//! Thresholds are fractions of host memory that is free (defaults 6/4/2/1%, as in
//! ESX). Going down, a state is entered when free memory falls *below* its
//! threshold: soft under 4%, hard under 2%, low under 1%. Going up needs the next
//! threshold up (one band of hysteresis): low is left at 2% (for hard), hard at 4%
//! (for soft), soft at 6% (for high). So the 6% "high" threshold is both where
//! reclamation is aiming and where the soft state ends.
//!
//! | state | entered when free < | left when free >= | reclamation |
//! |---|---|---|---|
//! | high | - | - | none; balloon early below `balloon_start` (5%): the guest needs time |
//! | soft | 4% | 6% | balloon |
//! | hard | 2% | 4% | balloon and swap |
//! | low  | 1% | 2% | swap, and pause the VMs above their target |
//!
//! Amounts: the balloons aim at the high threshold (6% free), counting what is
//! already asked of the guests and not yet given (pending), so a slow guest is not
//! asked twice; swapping aims at the soft threshold (4%) and is capped per tick; in
//! the hard state the balloon is asked only what swapping does not cover.
//!
//! Who gives: min-funding revocation with an idle memory tax (Waldspurger 2002):
//! memory is taken first from the VM with the lowest `shares / (pages * (f + k(1 -
//! f)))`, `f` its active fraction, `k = 1 / (1 - tau)`. A VM's *target* is its
//! resident memory minus its part of the whole deficit; in the low state, VMs above
//! target are paused until the state improves.
//!
//! A VM above its configured **limit** is reclaimed whatever the state: its balloon
//! is asked for the excess, and if it is still above after `limit_grace_ticks`
//! ticks (or it has no balloon) the excess is swapped.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::stats::{PolicyStats, StateChange};

/// Bytes per page.
const PAGE: u64 = 4096;

/// A free-memory state, least severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FreeState {
    #[default]
    High,
    Soft,
    Hard,
    Low,
}

impl FreeState {
    pub fn name(self) -> &'static str {
        match self {
            FreeState::High => "high",
            FreeState::Soft => "soft",
            FreeState::Hard => "hard",
            FreeState::Low => "low",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for FreeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Tunables of the policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyConfig {
    /// Thresholds, fractions of host memory free.
    pub high: f64,
    pub soft: f64,
    pub hard: f64,
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

/// Host memory as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostMem {
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// One VM's memory, as the VMM reports it each tick.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmMemInfo {
    pub name: String,
    /// Configured memory.
    pub size_pages: u64,
    /// Host memory backing the VM now (resident guest RAM).
    pub resident_pages: u64,
    /// Pages the guest has given to its balloon now.
    pub balloon_pages: u64,
    /// Whether the VM has a working balloon.
    pub balloon: bool,
    /// Configured limit (ESX "limit"), if any.
    pub limit_pages: Option<u64>,
    /// Reservation: never reclaimed below this.
    pub min_pages: u64,
    /// Shares; 0 means "proportional to configured size".
    pub shares: u64,
    /// Fraction of its pages the VM uses actively (1.0 if unknown).
    pub active_fraction: f64,
}

impl VmMemInfo {
    /// A VM with defaults: no limit, no reservation, shares by size, all active.
    pub fn new(name: &str, size_pages: u64, resident_pages: u64) -> VmMemInfo {
        VmMemInfo {
            name: name.to_string(),
            size_pages,
            resident_pages,
            balloon_pages: 0,
            balloon: true,
            limit_pages: None,
            min_pages: 0,
            shares: 0,
            active_fraction: 1.0,
        }
    }
}

/// What to do with one VM this tick.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmAction {
    pub name: String,
    /// Balloon size to ask of the guest (absolute, the balloon device's target).
    pub balloon_target_pages: u64,
    /// Change of that target since the previous tick (+ inflate, - deflate).
    pub balloon_delta_pages: i64,
    /// Pages to evict now with the VM's swapper.
    pub swap_pages: u64,
    /// Keep the VM paused (low state, above target) until a tick says otherwise.
    pub pause: bool,
    /// Resident memory the VM should come down to.
    pub target_pages: u64,
    /// The VM is above its configured limit.
    pub over_limit: bool,
}

/// The decision of one tick.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub state: FreeState,
    pub free_pct: f64,
    pub host: HostMem,
    pub vms: Vec<VmAction>,
}

impl Decision {
    pub fn vm(&self, name: &str) -> Option<&VmAction> {
        self.vms.iter().find(|a| a.name == name)
    }
}

/// The free-memory policy (one per host process).
pub struct Policy {
    cfg: PolicyConfig,
    state: FreeState,
    started: Instant,
    stats: PolicyStats,
    /// Balloon target asked of each VM at the previous tick.
    targets: HashMap<String, u64>,
    /// Consecutive ticks each VM has been over its limit.
    over_limit: HashMap<String, u32>,
}

/// The state after `cur` given free fraction `f` (see the module doc).
pub fn next_state(cur: FreeState, f: f64, c: &PolicyConfig) -> FreeState {
    let down = if f < c.low {
        FreeState::Low
    } else if f < c.hard {
        FreeState::Hard
    } else if f < c.soft {
        FreeState::Soft
    } else {
        FreeState::High
    };
    let up = if f >= c.high {
        FreeState::High
    } else if f >= c.soft {
        FreeState::Soft
    } else if f >= c.hard {
        FreeState::Hard
    } else {
        FreeState::Low
    };
    if down > cur {
        down
    } else if up < cur {
        up
    } else {
        cur
    }
}

/// Split `amount` pages among VMs by min-funding revocation: repeatedly take a
/// chunk from the VM with the lowest adjusted shares-per-page ratio that still has
/// something to give (`avail[i]`). Returns what each gives.
pub fn min_funding(amount: u64, vms: &[VmMemInfo], avail: &[u64], tau: f64) -> Vec<u64> {
    let n = vms.len();
    let mut take = vec![0u64; n];
    let k = 1.0 / (1.0 - tau.clamp(0.0, 0.99));
    let chunk = (amount / 64).max(1);
    let mut left = amount;
    while left > 0 {
        let mut best: Option<(usize, f64)> = None;
        for i in 0..n {
            if take[i] >= avail[i] {
                continue;
            }
            let v = &vms[i];
            let pages = v.resident_pages.saturating_sub(take[i]).max(1) as f64;
            let shares = if v.shares == 0 { v.size_pages.max(1) } else { v.shares } as f64;
            let f = v.active_fraction.clamp(0.0, 1.0);
            let rho = shares / (pages * (f + k * (1.0 - f)));
            if best.is_none_or(|(_, r)| rho < r) {
                best = Some((i, rho));
            }
        }
        let Some((i, _)) = best else { break };
        let t = chunk.min(left).min(avail[i] - take[i]);
        take[i] += t;
        left -= t;
    }
    take
}

impl Policy {
    pub fn new(cfg: PolicyConfig) -> Policy {
        Policy {
            cfg,
            state: FreeState::High,
            started: Instant::now(),
            stats: PolicyStats::default(),
            targets: HashMap::new(),
            over_limit: HashMap::new(),
        }
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    pub fn state(&self) -> FreeState {
        self.state
    }

    /// Counters and state history.
    pub fn stats(&self) -> PolicyStats {
        self.stats.clone()
    }

    /// Sample `source` and decide.
    pub fn tick_with(&mut self, source: &mut dyn HostMemSource, vms: &[VmMemInfo]) -> io::Result<Decision> {
        let host = source.sample()?;
        Ok(self.tick(host, vms))
    }

    /// One tick: update the state from host memory, and decide per VM.
    pub fn tick(&mut self, host: HostMem, vms: &[VmMemInfo]) -> Decision {
        let c = self.cfg.clone();
        let total_pages = (host.total_bytes / PAGE).max(1);
        let free_pages = host.free_bytes.min(host.total_bytes) / PAGE;
        let f = free_pages as f64 / total_pages as f64;
        let new = next_state(self.state, f, &c);
        if new != self.state {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            self.stats.push(StateChange {
                at_ms: self.started.elapsed().as_millis() as u64,
                unix_ms: now,
                from: self.state,
                to: new,
                free_pct: f * 100.0,
            });
            log::info!("swapd: free memory {:.2}%: state {} -> {}", f * 100.0, self.state, new);
            self.state = new;
        }
        self.stats.state = new;
        self.stats.free_pct = f * 100.0;
        self.stats.ticks += 1;
        self.stats.ticks_in_state[new.index()] += 1;

        self.targets.retain(|k, _| vms.iter().any(|v| &v.name == k));
        self.over_limit.retain(|k, _| vms.iter().any(|v| &v.name == k));
        let n = vms.len();
        let prev: Vec<u64> = vms.iter().map(|v| *self.targets.get(&v.name).unwrap_or(&v.balloon_pages)).collect();
        let bmax: Vec<u64> = vms
            .iter()
            .map(|v| if v.balloon { (v.size_pages as f64 * c.balloon_max_fraction) as u64 } else { 0 })
            .collect();
        let mut target = prev.clone();
        let mut swap = vec![0u64; n];
        let mut over = vec![false; n];

        // 1. Limits, whatever the state.
        for (i, v) in vms.iter().enumerate() {
            let Some(limit) = v.limit_pages else { continue };
            if v.resident_pages <= limit {
                self.over_limit.remove(&v.name);
                continue;
            }
            over[i] = true;
            let excess = v.resident_pages - limit;
            let ticks = self.over_limit.entry(v.name.clone()).or_insert(0);
            *ticks += 1;
            let pending = target[i].saturating_sub(v.balloon_pages);
            if v.balloon && *ticks <= c.limit_grace_ticks && target[i] < bmax[i] {
                target[i] = (target[i] + excess.saturating_sub(pending)).min(bmax[i]);
            } else {
                swap[i] += excess.saturating_sub(v.min_pages.saturating_sub(limit));
            }
        }

        // 2. Host level.
        let goal_high = (c.high * total_pages as f64).ceil() as u64;
        let goal_soft = (c.soft * total_pages as f64).ceil() as u64;
        let deficit = goal_high.saturating_sub(free_pages);
        let pending: u64 = vms.iter().zip(&target).map(|(v, t)| t.saturating_sub(v.balloon_pages)).sum();
        let swap_avail: Vec<u64> = vms
            .iter()
            .zip(&swap)
            .map(|(v, s)| v.resident_pages.saturating_sub(v.min_pages).saturating_sub(*s))
            .collect();
        let mut balloon_ask = 0u64;
        let mut deflate = 0u64;
        match new {
            FreeState::High => {
                if f < c.balloon_start {
                    balloon_ask = deficit.saturating_sub(pending);
                } else if f > c.high + c.deflate_margin {
                    deflate = (free_pages - ((c.high + c.deflate_margin) * total_pages as f64) as u64) / 2;
                }
            }
            FreeState::Soft => balloon_ask = deficit.saturating_sub(pending),
            FreeState::Hard | FreeState::Low => {
                let cap = if new == FreeState::Low { 2 * c.max_swap_pages_per_tick } else { c.max_swap_pages_per_tick };
                let already: u64 = swap.iter().sum();
                let s = goal_soft.saturating_sub(free_pages).saturating_sub(already).min(cap);
                let give = min_funding(s, vms, &swap_avail, c.idle_tax);
                for i in 0..n {
                    swap[i] += give[i];
                }
                if new == FreeState::Hard {
                    balloon_ask = deficit.saturating_sub(s + already).saturating_sub(pending);
                }
            }
        }
        if balloon_ask > 0 {
            let avail: Vec<u64> = (0..n)
                .map(|i| {
                    let room = bmax[i].saturating_sub(target[i]);
                    room.min(vms[i].resident_pages.saturating_sub(vms[i].min_pages))
                })
                .collect();
            let give = min_funding(balloon_ask, vms, &avail, c.idle_tax);
            for i in 0..n {
                target[i] += give[i];
            }
        }
        if deflate > 0 {
            let sum: u64 = (0..n).filter(|&i| !over[i]).map(|i| target[i]).sum();
            if sum > 0 {
                for i in (0..n).filter(|&i| !over[i]) {
                    let d = ((deflate as u128 * target[i] as u128) / sum as u128) as u64;
                    target[i] -= d.min(target[i]);
                }
            }
        }

        // 3. Targets (each VM's part of the whole deficit) and pauses.
        let all_avail: Vec<u64> = vms.iter().map(|v| v.resident_pages.saturating_sub(v.min_pages)).collect();
        let part = min_funding(deficit, vms, &all_avail, c.idle_tax);
        let mut acts = Vec::with_capacity(n);
        for (i, v) in vms.iter().enumerate() {
            let mut tgt = v.resident_pages - part[i];
            if let Some(l) = v.limit_pages {
                tgt = tgt.min(l.max(v.min_pages));
            }
            let pause = new == FreeState::Low && v.resident_pages > tgt;
            let delta = target[i] as i64 - prev[i] as i64;
            if delta > 0 {
                self.stats.balloon_pages_asked += delta as u64;
            }
            self.stats.swap_pages_asked += swap[i];
            self.stats.pauses_asked += pause as u64;
            self.targets.insert(v.name.clone(), target[i]);
            acts.push(VmAction {
                name: v.name.clone(),
                balloon_target_pages: target[i],
                balloon_delta_pages: delta,
                swap_pages: swap[i],
                pause,
                target_pages: tgt,
                over_limit: over[i],
            });
        }
        Decision { state: new, free_pct: f * 100.0, host, vms: acts }
    }
}

/// Where host memory figures come from.
pub trait HostMemSource: Send {
    fn sample(&mut self) -> io::Result<HostMem>;
    fn describe(&self) -> String;
}

/// The real host: `/proc/meminfo` MemTotal and MemAvailable.
pub struct MemInfo {
    path: PathBuf,
}

impl MemInfo {
    pub fn new() -> MemInfo {
        MemInfo { path: PathBuf::from("/proc/meminfo") }
    }

    /// Read another file in the meminfo format (tests).
    pub fn at(path: impl Into<PathBuf>) -> MemInfo {
        MemInfo { path: path.into() }
    }
}

impl Default for MemInfo {
    fn default() -> Self {
        MemInfo::new()
    }
}

/// A "Key:   123 kB" field of a meminfo-like text, in bytes.
pub fn meminfo_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k.trim() != key {
            return None;
        }
        let mut it = v.split_whitespace();
        let n: u64 = it.next()?.parse().ok()?;
        Some(if it.next() == Some("kB") { n * 1024 } else { n })
    })
}

impl HostMemSource for MemInfo {
    fn sample(&mut self) -> io::Result<HostMem> {
        let text = std::fs::read_to_string(&self.path)?;
        let bad =
            || io::Error::new(io::ErrorKind::InvalidData, format!("{}: no MemTotal/MemAvailable", self.path.display()));
        Ok(HostMem {
            total_bytes: meminfo_field(&text, "MemTotal").ok_or_else(bad)?,
            free_bytes: meminfo_field(&text, "MemAvailable").ok_or_else(bad)?,
        })
    }

    fn describe(&self) -> String {
        format!("host ({})", self.path.display())
    }
}

/// The memory cgroup this process runs in (v1 `memory` controller, or v2): total
/// is the cgroup's limit (the host's memory when unlimited), free is total minus
/// usage, not counting inactive file pages (reclaimable cache).
pub struct Cgroup {
    dir: PathBuf,
    v2: bool,
    host: MemInfo,
}

impl Cgroup {
    /// The cgroup of this process, from `/proc/self/cgroup`, under `/sys/fs/cgroup`.
    pub fn current() -> io::Result<Cgroup> {
        let text = std::fs::read_to_string("/proc/self/cgroup")?;
        Cgroup::from_proc(&text, Path::new("/sys/fs/cgroup"), MemInfo::new())
    }

    /// Resolve a `/proc/PID/cgroup` text against a cgroup mount root: the v1
    /// memory controller (`ROOT/memory/PATH`) if listed, else v2 (`ROOT/PATH`).
    pub fn from_proc(text: &str, root: &Path, host: MemInfo) -> io::Result<Cgroup> {
        let mut v2_path = None;
        for line in text.lines() {
            let mut f = line.splitn(3, ':');
            let (Some(_id), Some(ctrls), Some(path)) = (f.next(), f.next(), f.next()) else { continue };
            let rel = path.trim_start_matches('/');
            if ctrls.split(',').any(|c| c == "memory") {
                return Ok(Cgroup { dir: root.join("memory").join(rel), v2: false, host });
            }
            if ctrls.is_empty() {
                v2_path = Some(root.join(rel));
            }
        }
        match v2_path {
            Some(dir) => Ok(Cgroup { dir, v2: true, host }),
            None => Err(io::Error::new(io::ErrorKind::NotFound, "no memory cgroup in /proc/self/cgroup")),
        }
    }

    fn read(&self, name: &str) -> io::Result<String> {
        std::fs::read_to_string(self.dir.join(name))
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.dir.join(name).display())))
    }
}

impl HostMemSource for Cgroup {
    fn sample(&mut self) -> io::Result<HostMem> {
        let host = self.host.sample()?;
        let num = |s: String| -> io::Result<Option<u64>> {
            let s = s.trim();
            if s == "max" {
                return Ok(None);
            }
            s.parse::<u64>().map(Some).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        };
        let (limit, usage, stat) = if self.v2 {
            (num(self.read("memory.max")?)?, num(self.read("memory.current")?)?.unwrap_or(0), self.read("memory.stat")?)
        } else {
            (
                num(self.read("memory.limit_in_bytes")?)?,
                num(self.read("memory.usage_in_bytes")?)?.unwrap_or(0),
                self.read("memory.stat")?,
            )
        };
        let field = |k: &str| {
            stat.lines().find_map(|l| {
                let (a, b) = l.split_once(' ')?;
                (a == k).then(|| b.trim().parse::<u64>().ok()).flatten()
            })
        };
        let inactive_file = field("total_inactive_file").or_else(|| field("inactive_file")).unwrap_or(0);
        let used = usage.saturating_sub(inactive_file);
        let total = limit.map_or(host.total_bytes, |l| l.min(host.total_bytes));
        // Free in the cgroup, but never more than the host has.
        let free = total.saturating_sub(used).min(host.free_bytes);
        Ok(HostMem { total_bytes: total, free_bytes: free })
    }

    fn describe(&self) -> String {
        format!("memory cgroup {} ({})", self.dir.display(), if self.v2 { "v2" } else { "v1" })
    }
}

/// A configured budget (`--host-mem 2G`): free = budget - memory resident for the
/// VMs (given by a callback, e.g. the sum of the VMs' guest RAM residency).
pub struct Budget {
    bytes: u64,
    resident: Box<dyn Fn() -> u64 + Send>,
}

impl Budget {
    pub fn new(bytes: u64, resident: impl Fn() -> u64 + Send + 'static) -> Budget {
        Budget { bytes, resident: Box::new(resident) }
    }
}

impl HostMemSource for Budget {
    fn sample(&mut self) -> io::Result<HostMem> {
        let used = (self.resident)();
        Ok(HostMem { total_bytes: self.bytes, free_bytes: self.bytes.saturating_sub(used) })
    }

    fn describe(&self) -> String {
        format!("budget of {} MiB", self.bytes >> 20)
    }
}

/// Parse a size: a number with an optional K/M/G/T suffix (powers of 1024,
/// optionally followed by "B" or "iB"): "2G", "512M", "1.5GiB", "4096".
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return Err(format!("bad size unit in {s:?} (K, M, G, T)")),
    };
    Ok((n * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn host(free_pct: f64) -> HostMem {
        let total = 100 * GIB;
        HostMem { total_bytes: total, free_bytes: (total as f64 * free_pct / 100.0) as u64 }
    }

    fn vm(name: &str, resident_gib: u64) -> VmMemInfo {
        VmMemInfo::new(name, 16 * GIB / PAGE, resident_gib * GIB / PAGE)
    }

    fn states(p: &mut Policy, seq: &[f64]) -> Vec<FreeState> {
        seq.iter().map(|&f| p.tick(host(f), &[]).state).collect()
    }

    #[test]
    fn thresholds_going_down() {
        use FreeState::*;
        let mut p = Policy::new(PolicyConfig::default());
        assert_eq!(
            states(&mut p, &[10.0, 6.0, 4.5, 4.0, 3.99, 2.0, 1.99, 1.0, 0.99, 0.0]),
            [High, High, High, High, Soft, Soft, Hard, Hard, Low, Low]
        );
    }

    #[test]
    fn hysteresis_going_up() {
        use FreeState::*;
        let mut p = Policy::new(PolicyConfig::default());
        // Into low, then back up one band at a time: each state is left only at the
        // next threshold up.
        assert_eq!(
            states(&mut p, &[0.5, 1.5, 1.99, 2.0, 3.9, 4.0, 5.9, 6.0]),
            [Low, Low, Low, Hard, Hard, Soft, Soft, High]
        );
        // Oscillating around a threshold does not flap.
        assert_eq!(states(&mut p, &[3.9, 4.1, 3.95, 4.2, 5.0]), [Soft, Soft, Soft, Soft, Soft]);
        // A big recovery jumps several states at once.
        assert_eq!(states(&mut p, &[0.5, 7.0]), [Low, High]);
        let s = p.stats();
        let path: Vec<(FreeState, FreeState)> = s.history.iter().map(|c| (c.from, c.to)).collect();
        assert_eq!(
            path,
            [(High, Low), (Low, Hard), (Hard, Soft), (Soft, High), (High, Soft), (Soft, Low), (Low, High)]
        );
        assert!(s.history.windows(2).all(|w| w[0].at_ms <= w[1].at_ms && w[0].unix_ms <= w[1].unix_ms));
        assert_eq!(s.ticks, 15);
        assert_eq!(s.ticks_in_state.iter().sum::<u64>(), 15);
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"from\":\"low\""));
    }

    #[test]
    fn high_state_reclaims_nothing_above_balloon_start() {
        let mut p = Policy::new(PolicyConfig::default());
        let d = p.tick(host(5.5), &[vm("a", 8), vm("b", 8)]);
        assert_eq!(d.state, FreeState::High);
        for a in &d.vms {
            assert_eq!((a.balloon_target_pages, a.swap_pages, a.pause), (0, 0, false));
        }
    }

    #[test]
    fn balloon_starts_a_little_before_soft() {
        let mut p = Policy::new(PolicyConfig::default());
        let d = p.tick(host(4.5), &[vm("a", 8), vm("b", 8)]);
        assert_eq!(d.state, FreeState::High);
        let asked: u64 = d.vms.iter().map(|a| a.balloon_target_pages).sum();
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
        let vms = [vm("a", 8), vm("b", 8)];
        let d1 = p.tick(host(3.0), &vms);
        assert_eq!(d1.state, FreeState::Soft);
        let t1: u64 = d1.vms.iter().map(|a| a.balloon_target_pages).sum();
        assert!(t1 > 0);
        assert!(d1.vms.iter().all(|a| a.swap_pages == 0 && !a.pause));
        // The guests have not inflated yet and free memory is the same: no more asked.
        let d2 = p.tick(host(3.0), &vms);
        let t2: u64 = d2.vms.iter().map(|a| a.balloon_target_pages).sum();
        assert_eq!(t1, t2);
        assert!(d2.vms.iter().all(|a| a.balloon_delta_pages == 0));
        // Free memory drops further: more is asked.
        let d3 = p.tick(host(2.5), &vms);
        assert!(d3.vms.iter().map(|a| a.balloon_target_pages).sum::<u64>() > t2);
    }

    #[test]
    fn hard_balloons_and_swaps_without_double_counting() {
        let mut p = Policy::new(PolicyConfig { max_swap_pages_per_tick: u64::MAX / 4, ..Default::default() });
        let d = p.tick(host(1.5), &[vm("a", 8), vm("b", 8)]);
        assert_eq!(d.state, FreeState::Hard);
        let swap: u64 = d.vms.iter().map(|a| a.swap_pages).sum();
        let balloon: u64 = d.vms.iter().map(|a| a.balloon_target_pages).sum();
        let gib_pages = GIB as f64 / PAGE as f64;
        // Swap up to the soft threshold (2.5%), balloon the rest up to high (2%).
        assert!((swap as f64 - 2.5 * gib_pages).abs() < 4.0, "{swap}");
        assert!((balloon as f64 - 2.0 * gib_pages).abs() < 4.0, "{balloon}");
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
        // Low does not ask the balloons for more.
        assert_eq!(big.balloon_delta_pages, 0);
        // Recovery to hard: nobody paused any more.
        let d = p.tick(host(2.5), &vms);
        assert_eq!(d.state, FreeState::Hard);
        assert!(d.vms.iter().all(|a| !a.pause));
    }

    #[test]
    fn over_limit_is_reclaimed_with_free_memory() {
        let mut p = Policy::new(PolicyConfig { limit_grace_ticks: 2, ..Default::default() });
        let mut a = vm("a", 8);
        a.limit_pages = Some(6 * GIB / PAGE);
        let mut nb = vm("nb", 8);
        nb.limit_pages = Some(7 * GIB / PAGE);
        nb.balloon = false;
        let vms = [a.clone(), nb, vm("free", 8)];
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
        let d = p.tick(host(50.0), &vms);
        assert_eq!(d.vm("a").unwrap().balloon_target_pages, excess);
        assert_eq!(d.vm("a").unwrap().swap_pages, 0);
        let d = p.tick(host(50.0), &vms);
        assert_eq!(d.vm("a").unwrap().swap_pages, excess);
        // Back under its limit: nothing more, and the streak resets.
        a.resident_pages = 5 * GIB / PAGE;
        a.balloon_pages = excess;
        let d = p.tick(host(50.0), &[a.clone()]);
        let da = d.vm("a").unwrap();
        assert!(!da.over_limit && da.swap_pages == 0);
        // Plenty free (50% > 8%): the balloon deflates, but not below what holds
        // the limit... a VM not over its limit may deflate.
        assert!(da.balloon_target_pages < excess);
    }

    #[test]
    fn idle_tax_takes_from_the_idle_vm() {
        let mut idle = vm("idle", 8);
        idle.active_fraction = 0.1;
        let busy = vm("busy", 8);
        let vms = [idle, busy];
        let avail = [u64::MAX, u64::MAX];
        let amount = GIB / PAGE;
        // No tax: equal shares and pages give equally.
        let g = min_funding(amount, &vms, &avail, 0.0);
        assert!(g[0].abs_diff(g[1]) <= amount / 32, "{g:?}");
        assert_eq!(g[0] + g[1], amount);
        // tau = 0.75: the idle VM gives (almost) everything.
        let g = min_funding(amount, &vms, &avail, 0.75);
        assert!(g[0] > 9 * g[1], "{g:?}");
        // Limited availability is respected.
        let g = min_funding(amount, &vms, &[10, u64::MAX], 0.75);
        assert_eq!(g[0], 10);
        assert_eq!(g[1], amount - 10);
        // Nothing available: nothing taken.
        assert_eq!(min_funding(amount, &vms, &[0, 0], 0.75), vec![0, 0]);
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
    fn sources() {
        let dir = std::env::temp_dir().join(format!("swapd-policy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("memory/grp")).unwrap();
        std::fs::create_dir_all(dir.join("v2grp")).unwrap();
        let mi = dir.join("meminfo");
        std::fs::write(&mi, "MemTotal:       1048576 kB\nMemFree:  1000 kB\nMemAvailable:    524288 kB\n").unwrap();
        assert_eq!(MemInfo::at(&mi).sample().unwrap(), HostMem { total_bytes: GIB, free_bytes: GIB / 2 });

        // v1: limit 256 MiB, usage 200 MiB of which 40 MiB inactive file cache.
        let g = dir.join("memory/grp");
        std::fs::write(g.join("memory.limit_in_bytes"), format!("{}\n", 256 << 20)).unwrap();
        std::fs::write(g.join("memory.usage_in_bytes"), format!("{}\n", 200 << 20)).unwrap();
        std::fs::write(g.join("memory.stat"), format!("cache 1\ntotal_inactive_file {}\n", 40 << 20)).unwrap();
        let proc_text = "9:name=systemd:/\n4:memory:/grp\n0::/\n";
        let mut cg = Cgroup::from_proc(proc_text, &dir, MemInfo::at(&mi)).unwrap();
        assert_eq!(cg.sample().unwrap(), HostMem { total_bytes: 256 << 20, free_bytes: 96 << 20 });
        assert!(cg.describe().contains("v1"));
        // Unlimited v1: the host's total, free capped by the host's available.
        std::fs::write(g.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        assert_eq!(cg.sample().unwrap(), HostMem { total_bytes: GIB, free_bytes: GIB / 2 });

        // v2.
        let g2 = dir.join("v2grp");
        std::fs::write(g2.join("memory.max"), "max\n").unwrap();
        std::fs::write(g2.join("memory.current"), format!("{}\n", 100 << 20)).unwrap();
        std::fs::write(g2.join("memory.stat"), "inactive_file 0\n").unwrap();
        let mut cg2 = Cgroup::from_proc("0::/v2grp\n", &dir, MemInfo::at(&mi)).unwrap();
        assert_eq!(cg2.sample().unwrap(), HostMem { total_bytes: GIB, free_bytes: GIB / 2 });
        std::fs::write(g2.join("memory.max"), format!("{}\n", 300 << 20)).unwrap();
        assert_eq!(cg2.sample().unwrap(), HostMem { total_bytes: 300 << 20, free_bytes: 200 << 20 });

        // Budget.
        let used = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(GIB + (GIB / 2)));
        let u = used.clone();
        let mut b = Budget::new(2 * GIB, move || u.load(std::sync::atomic::Ordering::Relaxed));
        assert_eq!(b.sample().unwrap(), HostMem { total_bytes: 2 * GIB, free_bytes: GIB / 2 });
        used.store(3 * GIB, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(b.sample().unwrap().free_bytes, 0);

        // The real ones on this machine answer sensibly.
        let h = MemInfo::new().sample().unwrap();
        assert!(h.total_bytes > 0 && h.free_bytes <= h.total_bytes);
        if let Ok(mut c) = Cgroup::current() {
            let s = c.sample().unwrap();
            assert!(s.free_bytes <= s.total_bytes);
        }
        std::fs::remove_dir_all(&dir).unwrap();
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

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2G").unwrap(), 2 * GIB);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 * GIB / 2);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64kB").unwrap(), 64 << 10);
        assert!(parse_size("2X").is_err());
        assert!(parse_size("G").is_err());
    }
}
