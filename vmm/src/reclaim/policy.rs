//! The free-memory policy thread: one per host process, ticking [`policy::Policy`]
//! over every VM and applying its decisions through the VMs' balloon devices and,
//! where a VM has one, its swapper.
//!
//! Each tick (100 ms by default) it reads each VM's resident guest RAM, its balloon
//! device's target, size and pin, and whether it has a swapper; asks the configured
//! host-memory source how much is free; and applies the decision:
//!
//! | state | what the thread does |
//! |---|---|
//! | high | nothing (balloon targets start rising a little before soft; they deflate when plenty is free) |
//! | soft | sets balloon targets |
//! | hard | balloon targets, and evicts pages with each VM's swapper |
//! | low | evicts, and pauses the VMs above their target until the state improves; VMs without a swapper are ballooned |
//!
//! The policy reads every balloon device afresh each tick rather than remembering
//! what it asked: the device is the one truth about a target, whoever set it. A
//! target the user sets (`vmm ctl balloon set`) pins that balloon: the thread
//! writes targets only through [`Balloon::set_auto_target`], which refuses a pinned
//! balloon under the device's lock, so a user's target is never overwritten, even
//! one set between this thread's reading and its writing. `vmm ctl balloon auto`
//! hands it back.
//!
//! Each VM's allocation parameters (min, shares, limit) and its active estimate from
//! the [`ActiveSampler`] (which the thread owns) go into every tick; the tax and a
//! VM's shares can be changed at run time ([`PolicyHandle`]). After each tick the
//! thread publishes each VM's [`VmAllocation`] (the control API's `vm_stats`, the
//! exit summary).
//!
//! With idle-aware victims it first feeds each VM's KVM dirty log to its swapper.
//! A VM above its configured limit is reclaimed whatever the state. Pauses are
//! nesting [`PauseGuard`]s: the thread releases them when the state improves, when
//! the VM ends, when eviction cannot help (its eviction is stopped by a write
//! error), and when the thread stops, so a paused VM never outlives its reason.
//!
//! [`Balloon::set_auto_target`]: crate::devices::virtio::balloon::Balloon::set_auto_target

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use policy::{
    BalloonInfo, Budget, Cgroup, Decision, HostMemError, HostMemSource, MemInfo, Policy, PolicyConfig, PolicyStats,
    Shares, TaxError, VmMemInfo, VmPlan,
};
use serde::{Deserialize, Serialize};
use swapd::{SwapError, Swapper};

use pagestate::PauseGuard;

use super::active::{ActiveOptions, ActiveSampler, ActiveStats};
use super::guest::ReclaimView;
use super::swap::DirtyLog;
use crate::devices::virtio::balloon::TargetMode;
use crate::memory::slots::MemorySlots;
use crate::memory::MemoryError;
use crate::vm::VmShared;

const PAGE: u64 = guest_abi::PAGE_SIZE;

/// Where the policy learns how much host memory is free (`--host-mem`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostMemChoice {
    /// The real host: `/proc/meminfo` (default).
    Host,
    /// The memory cgroup this process runs in.
    Cgroup,
    /// A budget in bytes: free = budget - guest RAM resident for every VM (and
    /// their swappers' compression caches).
    Budget(u64),
}

/// A `--host-mem` value that is neither `host`, `cgroup` nor a size above zero.
#[derive(Debug, thiserror::Error)]
pub enum HostMemChoiceError {
    /// Not a size.
    #[error("{0} (or host, cgroup)")]
    NotASize(#[source] crate::units::UnitError),
    /// A budget of nothing.
    #[error("a host memory budget must be more than 0")]
    Zero,
}

impl HostMemChoice {
    /// Parses `host`, `cgroup` or a size (`2G`).
    pub fn parse(text: &str) -> Result<HostMemChoice, HostMemChoiceError> {
        match text {
            "host" => Ok(HostMemChoice::Host),
            "cgroup" => Ok(HostMemChoice::Cgroup),
            size => match crate::units::parse_size(size) {
                Ok(0) => Err(HostMemChoiceError::Zero),
                Ok(b) => Ok(HostMemChoice::Budget(b)),
                Err(e) => Err(HostMemChoiceError::NotASize(e)),
            },
        }
    }
}

/// Options of the free-memory policy (`vmm run --policy on ...`).
#[derive(Clone, Debug)]
pub struct PolicyOptions {
    /// Host memory source.
    pub host_mem: HostMemChoice,
    /// Period of the ticks.
    pub tick: Duration,
    /// Thresholds and amounts.
    pub config: PolicyConfig,
    /// Read each swapping VM's KVM dirty log every tick and give it to its swapper
    /// (for idle-aware victims, `--swap-victims idle`).
    pub feed_dirty_log: bool,
    /// The active memory sampler (None: every VM counts as fully active).
    pub active: Option<ActiveOptions>,
}

impl Default for PolicyOptions {
    fn default() -> Self {
        PolicyOptions {
            host_mem: HostMemChoice::Host,
            tick: Duration::from_millis(100),
            config: PolicyConfig::default(),
            feed_dirty_log: false,
            active: Some(ActiveOptions::default()),
        }
    }
}

/// Why the policy thread could not start.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The memory cgroup (`--host-mem cgroup`) cannot be found or read.
    #[error("--host-mem cgroup: {0}")]
    Cgroup(#[source] HostMemError),
    /// KVM's dirty log could not be turned on.
    #[error("vm {0}: {1}")]
    DirtyLog(String, #[source] MemoryError),
    /// The budget can only be changed when the policy watches one (`--host-mem SIZE`).
    #[error("the policy watches no budget (start it with --host-mem SIZE)")]
    NoBudget,
    /// A budget of nothing.
    #[error("a host memory budget must be more than 0")]
    ZeroBudget,
    /// The thread could not be created.
    #[error("cannot start the policy thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// A tax out of range.
    #[error(transparent)]
    Tax(#[from] TaxError),
    /// No VM of that name.
    #[error("no vm {0:?}")]
    NoVm(String),
    /// The reservations do not fit.
    #[error(
        "admission refused: the VMs' reservations ({min_mib} MiB) do not fit in the {room_mib} MiB the policy \
         can give VMs (free memory less the high-state reserve)"
    )]
    Admission {
        /// The sum of the reservations.
        min_mib: u64,
        /// What there is.
        room_mib: u64,
    },
}

/// One VM's allocation as the policy sees it at its last tick (the control API's
/// `vm_stats` and the exit summary, field `alloc`). Sizes in MiB.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmAllocation {
    /// Shares as configured (`low`, `normal`, `high` or a number).
    pub shares_setting: String,
    /// Shares in numbers.
    pub shares: u64,
    /// Reservation.
    pub min_mib: f64,
    /// Configured memory.
    pub max_mib: f64,
    /// Limit, if any.
    pub limit_mib: Option<f64>,
    /// The allocation target (max when memory is plentiful).
    pub target_mib: f64,
    /// Resident guest memory at the tick.
    pub resident_mib: f64,
    /// Balloon target the plan set, and the balloon's size and largest target.
    pub balloon_target_mib: Option<f64>,
    /// See `balloon_target_mib`.
    pub balloon_mib: Option<f64>,
    /// See `balloon_target_mib`.
    pub balloon_max_mib: Option<f64>,
    /// The active fraction the policy used (1.0 while the estimate is unknown).
    pub active_fraction: f64,
    /// The sampler's estimate and costs (None with sampling off).
    pub active: Option<ActiveStats>,
}

/// One VM under the policy.
pub struct PolicyVm {
    /// The VM.
    pub vm: Arc<VmShared>,
    /// Its swapper, if it has one.
    pub swapper: Option<Arc<Swapper>>,
    /// Its configured limit in bytes.
    pub limit: Option<u64>,
    /// Its reservation in bytes.
    pub min: u64,
    /// Its shares.
    pub shares: Shares,
    /// Its memory slots (whose dirty log feeds idle-aware victim choice).
    pub slots: Arc<MemorySlots>,
}

/// A VM as the policy thread keeps it.
struct Member {
    vm: Arc<VmShared>,
    swapper: Option<Arc<Swapper>>,
    limit: Option<u64>,
    min: u64,
    /// Its dirty log, fed to its swapper every tick (idle-aware victims).
    dirty: Option<DirtyLog>,
    /// Its figures from the sampler.
    active: Option<Arc<Mutex<ActiveStats>>>,
}

/// What may change at run time: the tax and each VM's shares (by VM name).
struct Settings {
    idle_tax: f64,
    shares: HashMap<String, Shares>,
}

/// What others may see and change of the running policy (the control API, the
/// host's owner): its counters, and the host-memory budget when it watches one.
#[derive(Clone)]
pub struct PolicyHandle {
    counters: Arc<Mutex<PolicyStats>>,
    /// The decision of the last tick that read host memory.
    last: Arc<Mutex<Option<Decision>>>,
    budget: Option<Arc<AtomicU64>>,
    settings: Arc<Mutex<Settings>>,
    allocations: Arc<Mutex<HashMap<String, VmAllocation>>>,
}

impl PolicyHandle {
    /// Changes the idle memory tax from the next tick on (targets are recomputed).
    pub fn set_idle_tax(&self, tau: f64) -> Result<f64, PolicyError> {
        let tau = policy::check_tax(tau)?;
        self.settings.lock().unwrap_or_else(|p| p.into_inner()).idle_tax = tau;
        log::info!("free-memory policy: idle memory tax set to {tau}");
        Ok(tau)
    }

    /// Changes the shares of VM `vm` from the next tick on.
    pub fn set_shares(&self, vm: &str, shares: Shares) -> Result<Shares, PolicyError> {
        let mut s = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        let slot = s.shares.get_mut(vm).ok_or_else(|| PolicyError::NoVm(vm.to_string()))?;
        *slot = shares;
        log::info!("free-memory policy: {vm}: shares set to {shares}");
        Ok(shares)
    }

    /// VM `vm`'s allocation at the last tick.
    pub fn allocation(&self, vm: &str) -> Option<VmAllocation> {
        self.allocations.lock().unwrap_or_else(|p| p.into_inner()).get(vm).cloned()
    }

    /// The counters and state history as of the last tick.
    pub fn stats(&self) -> PolicyStats {
        self.counters.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The decision of the last tick (host memory, state, each VM's plan and
    /// target), if a tick has read host memory yet.
    pub fn last_decision(&self) -> Option<Decision> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The idle memory tax in force.
    pub fn idle_tax(&self) -> f64 {
        self.settings.lock().unwrap_or_else(|p| p.into_inner()).idle_tax
    }

    /// Sets the host-memory budget the policy watches, from its next tick on.
    pub fn set_budget(&self, bytes: u64) -> Result<(), PolicyError> {
        let budget = self.budget.as_ref().ok_or(PolicyError::NoBudget)?;
        if bytes == 0 {
            return Err(PolicyError::ZeroBudget);
        }
        budget.store(bytes, Ordering::Relaxed);
        log::info!("free-memory policy: budget set to {} MiB", bytes >> 20);
        Ok(())
    }
}

/// The running policy thread; dropping it stops the thread and resumes every VM it
/// paused.
pub struct PolicyThread {
    stop: Arc<AtomicBool>,
    handle: PolicyHandle,
    thread: Option<JoinHandle<()>>,
}

impl PolicyThread {
    /// Starts the thread over `vms`, after admission control: the VMs'
    /// reservations must fit in what the policy can give VMs (free memory less the
    /// high-state reserve, as the source says now).
    pub fn start(vms: Vec<PolicyVm>, opts: &PolicyOptions) -> Result<PolicyThread, PolicyError> {
        policy::check_tax(opts.config.idle_tax)?;
        let resident = Arc::new(AtomicU64::new(0));
        let mut budget = None;
        let mut source: Box<dyn HostMemSource> = match opts.host_mem {
            HostMemChoice::Host => Box::new(MemInfo::new()),
            HostMemChoice::Cgroup => Box::new(Cgroup::current().map_err(PolicyError::Cgroup)?),
            HostMemChoice::Budget(bytes) => {
                let r = resident.clone();
                let source = Budget::new(bytes, move || r.load(Ordering::Relaxed));
                budget = Some(source.handle());
                Box::new(source)
            }
        };
        admit(&vms, source.as_mut(), &opts.config)?;
        let sampler = match opts.active {
            Some(a) => {
                let views = vms.iter().map(|p| ReclaimView::of(&p.vm) as Arc<dyn pagestate::GuestVm>).collect();
                Some(ActiveSampler::start(views, a).map_err(PolicyError::Spawn)?)
            }
            None => None,
        };
        let settings = Settings {
            idle_tax: opts.config.idle_tax,
            shares: vms.iter().map(|p| (p.vm.name().to_string(), p.shares)).collect(),
        };
        let mut members = Vec::with_capacity(vms.len());
        for (i, p) in vms.into_iter().enumerate() {
            let dirty = match (&p.swapper, opts.feed_dirty_log) {
                (Some(_), true) => {
                    Some(DirtyLog::enable(p.slots).map_err(|e| PolicyError::DirtyLog(p.vm.name().to_string(), e))?)
                }
                _ => None,
            };
            let active = sampler.as_ref().and_then(|s| s.stats(i));
            members.push(Member { vm: p.vm, swapper: p.swapper, limit: p.limit, min: p.min, dirty, active });
        }
        log::info!("free-memory policy: {} every {:?}", source.describe(), opts.tick);
        let handle = PolicyHandle {
            counters: Arc::new(Mutex::new(PolicyStats::default())),
            last: Arc::new(Mutex::new(None)),
            budget,
            settings: Arc::new(Mutex::new(settings)),
            allocations: Arc::new(Mutex::new(HashMap::new())),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let mut state = Loop {
            vms: members,
            policy: Policy::new(opts.config.clone()),
            source,
            resident,
            paused: HashMap::new(),
            counters: handle.counters.clone(),
            last: handle.last.clone(),
            settings: handle.settings.clone(),
            allocations: handle.allocations.clone(),
            _sampler: sampler,
            tick: opts.tick,
            last_error: None,
        };
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("policy".into())
            .spawn(move || state.run(&stop2))
            .map_err(PolicyError::Spawn)?;
        Ok(PolicyThread { stop, handle, thread: Some(thread) })
    }

    /// The policy's counters and state history.
    pub fn stats(&self) -> PolicyStats {
        self.handle.stats()
    }

    /// What others may see and change of it (the control API, the host's owner).
    pub fn handle(&self) -> PolicyHandle {
        self.handle.clone()
    }
}

impl Drop for PolicyThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Loop {
    vms: Vec<Member>,
    policy: Policy,
    source: Box<dyn HostMemSource>,
    /// Guest RAM resident over all VMs (what a budget source subtracts).
    resident: Arc<AtomicU64>,
    /// Pauses held for the low state, by VM name.
    paused: HashMap<String, PauseGuard>,
    counters: Arc<Mutex<PolicyStats>>,
    last: Arc<Mutex<Option<Decision>>>,
    settings: Arc<Mutex<Settings>>,
    allocations: Arc<Mutex<HashMap<String, VmAllocation>>>,
    /// Held, not read: dropping it (with the thread's state) stops the sampling.
    _sampler: Option<ActiveSampler>,
    tick: Duration,
    last_error: Option<String>,
}

impl Loop {
    fn run(&mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            self.tick_once();
            std::thread::sleep(self.tick);
        }
        for name in std::mem::take(&mut self.paused).into_keys() {
            log::info!("{name}: resumed (policy stopping)");
        }
    }

    fn tick_once(&mut self) {
        let live: Vec<&Member> = self.vms.iter().filter(|p| p.vm.ending().is_none()).collect();
        self.paused.retain(|name, _| live.iter().any(|p| p.vm.name() == name));
        for p in &live {
            if let (Some(log), Some(sw)) = (&p.dirty, &p.swapper) {
                if let Err(e) = log.feed(sw) {
                    log::warn!("{}: dirty log: {e}", p.vm.name());
                }
            }
        }
        let settings = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        if settings.idle_tax != self.policy.config().idle_tax {
            self.policy.set_idle_tax(settings.idle_tax);
        }
        let infos: Vec<VmMemInfo> = live.iter().map(|p| mem_info(p, settings.shares.get(p.vm.name()))).collect();
        drop(settings);
        // A budget counts what the VMs hold: their resident RAM and their swappers'
        // compression caches (the real host and a cgroup see both by themselves).
        let caches: u64 = live.iter().filter_map(|p| p.swapper.as_ref()).map(|sw| sw.cache_bytes()).sum();
        self.resident.store(infos.iter().map(|v| v.resident_pages * PAGE).sum::<u64>() + caches, Ordering::Relaxed);
        let decision = match self.policy.tick_with(self.source.as_mut(), &infos) {
            Ok(d) => d,
            Err(e) => {
                let msg = format!("free-memory policy: cannot read host memory: {e}");
                if self.last_error.as_ref() != Some(&msg) {
                    log::warn!("{msg}");
                    self.last_error = Some(msg);
                }
                return;
            }
        };
        *self.counters.lock().unwrap_or_else(|p| p.into_inner()) = self.policy.stats();
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(decision.clone());
        let settings = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        let mut allocations = self.allocations.lock().unwrap_or_else(|p| p.into_inner());
        for (p, info) in live.iter().zip(&infos) {
            if let Some(plan) = decision.vm(p.vm.name()) {
                let shares = settings.shares.get(p.vm.name()).copied().unwrap_or_default();
                allocations.insert(p.vm.name().to_string(), allocation(p, info, plan, shares, &self.policy));
            }
        }
        drop((settings, allocations));
        for p in &live {
            if let Some(plan) = decision.vm(p.vm.name()) {
                set_balloon(&p.vm, plan);
                let pause = evict(p, plan, &decision);
                hold_pause(&mut self.paused, &p.vm, pause, &decision);
            }
        }
    }
}

/// Holds or releases the low state's pause of `vm`.
fn hold_pause(paused: &mut HashMap<String, PauseGuard>, vm: &VmShared, pause: bool, d: &Decision) {
    match (pause, paused.contains_key(vm.name())) {
        (true, false) => {
            if let Ok(g) = vm.run().pause_guard(Duration::from_secs(2)) {
                log::info!("{}: paused ({} state, {:.2}% free, above its target)", vm.name(), d.state, d.free_pct);
                paused.insert(vm.name().to_string(), g);
            }
        }
        (false, true) => {
            paused.remove(vm.name());
            log::info!("{}: resumed ({} state, {:.2}% free)", vm.name(), d.state, d.free_pct);
        }
        _ => {}
    }
}

/// Sets the balloon target the plan asks for, unless the user pinned it.
fn set_balloon(vm: &VmShared, plan: &VmPlan) {
    if plan.balloon_delta_pages == 0 {
        return;
    }
    vm.set_policy_balloon_target(plan.balloon_target_pages);
}

/// Evicts what the plan asks for; returns whether the plan's pause may be held:
/// pausing helps only while eviction can run.
fn evict(p: &Member, plan: &VmPlan, d: &Decision) -> bool {
    let (vm, Some(sw)) = (&p.vm, &p.swapper) else { return false };
    if plan.swap_pages > 0 {
        match sw.swap_out(plan.swap_pages as usize) {
            Ok(n) => log::debug!("{}: swapped {n} of {} pages ({} state)", vm.name(), plan.swap_pages, d.state),
            Err(SwapError::Stopped { .. } | SwapError::Write { .. }) => return false,
            Err(SwapError::Ending { .. }) => {}
            // Counted in the swapper's stats (`pause_timeouts`); the next tick asks again.
            Err(e @ SwapError::PauseTimedOut { .. }) => log::warn!("{}: eviction postponed: {e}", vm.name()),
            Err(e) => log::warn!("{}: eviction failed: {e}", vm.name()),
        }
    }
    plan.pause && sw.stats().eviction_stopped.is_none()
}

/// Admission control: the reservations must fit in what the policy can give VMs.
fn admit(vms: &[PolicyVm], source: &mut dyn HostMemSource, cfg: &PolicyConfig) -> Result<(), PolicyError> {
    let min: u64 = vms.iter().map(|p| p.min).sum();
    if min == 0 {
        return Ok(());
    }
    let host = match source.sample() {
        Ok(h) => h,
        Err(e) => {
            log::warn!("admission control: cannot read host memory ({e}); reservations not checked");
            return Ok(());
        }
    };
    let room = host.free_bytes.saturating_sub((cfg.high * host.total_bytes as f64) as u64);
    if min > room {
        return Err(PolicyError::Admission { min_mib: min >> 20, room_mib: room >> 20 });
    }
    Ok(())
}

/// A VM's allocation for the control API, from this tick's inputs and plan.
fn allocation(p: &Member, info: &VmMemInfo, plan: &VmPlan, shares: Shares, policy: &Policy) -> VmAllocation {
    let mib = |pages: u64| (pages * PAGE) as f64 / (1 << 20) as f64;
    let balloon_max = (info.size_pages as f64 * policy.config().balloon_max_fraction) as u64;
    VmAllocation {
        shares_setting: shares.to_string(),
        shares: info.shares,
        min_mib: mib(info.min_pages),
        max_mib: mib(info.size_pages),
        limit_mib: info.limit_pages.map(mib),
        target_mib: mib(plan.target_pages),
        resident_mib: mib(info.resident_pages),
        balloon_target_mib: info.balloon.map(|_| mib(plan.balloon_target_pages)),
        balloon_mib: info.balloon.map(|b| mib(b.size_pages)),
        balloon_max_mib: info.balloon.map(|_| mib(balloon_max)),
        active_fraction: info.active_fraction,
        active: p.active.as_ref().map(|a| a.lock().unwrap_or_else(|e| e.into_inner()).clone()),
    }
}

/// What the policy needs to know of one VM this tick: read from the VM and its
/// devices now, never remembered.
fn mem_info(p: &Member, shares: Option<&Shares>) -> VmMemInfo {
    let vm = &p.vm;
    let mut info = VmMemInfo::new(vm.name(), vm.ram().size() / PAGE, vm.ram().resident_bytes() / PAGE);
    info.balloon = vm.balloon().map(|b| {
        let s = b.lock().unwrap().snapshot();
        BalloonInfo {
            target_pages: s.target_pages,
            size_pages: s.ballooned_pages,
            pinned: s.target_mode == TargetMode::Pinned,
        }
    });
    info.swap = p.swapper.is_some();
    info.limit_pages = p.limit.map(|l| l / PAGE);
    info.min_pages = p.min / PAGE;
    info.shares = shares.copied().unwrap_or_default().of(info.size_pages);
    let estimate = p.active.as_ref().and_then(|a| a.lock().unwrap_or_else(|e| e.into_inner()).estimate.fraction());
    info.active_fraction = estimate.unwrap_or(1.0);
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_mem_choices() {
        assert_eq!(HostMemChoice::parse("host").unwrap(), HostMemChoice::Host);
        assert_eq!(HostMemChoice::parse("cgroup").unwrap(), HostMemChoice::Cgroup);
        assert_eq!(HostMemChoice::parse("2G").unwrap(), HostMemChoice::Budget(2 << 30));
        assert!(matches!(HostMemChoice::parse("0"), Err(HostMemChoiceError::Zero)));
        assert!(HostMemChoice::parse("lots").unwrap_err().to_string().contains("cgroup"));
    }
}
