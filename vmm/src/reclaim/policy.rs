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
    VmMemInfo, VmPlan,
};
use swapd::{SwapError, Swapper};

use pagestate::PauseGuard;

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
    /// A budget in bytes: free = budget - guest RAM resident for every VM.
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
}

impl Default for PolicyOptions {
    fn default() -> Self {
        PolicyOptions {
            host_mem: HostMemChoice::Host,
            tick: Duration::from_millis(100),
            config: PolicyConfig::default(),
            feed_dirty_log: false,
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
}

/// One VM under the policy.
pub struct PolicyVm {
    /// The VM.
    pub vm: Arc<VmShared>,
    /// Its swapper, if it has one.
    pub swapper: Option<Arc<Swapper>>,
    /// Its configured limit in bytes.
    pub limit: Option<u64>,
    /// Its memory slots (whose dirty log feeds idle-aware victim choice).
    pub slots: Arc<MemorySlots>,
}

/// A VM as the policy thread keeps it.
struct Member {
    vm: Arc<VmShared>,
    swapper: Option<Arc<Swapper>>,
    limit: Option<u64>,
    /// Its dirty log, fed to its swapper every tick (idle-aware victims).
    dirty: Option<DirtyLog>,
}

/// What others may see and change of the running policy (the control API, the
/// host's owner): its counters, and the host-memory budget when it watches one.
#[derive(Clone)]
pub struct PolicyHandle {
    counters: Arc<Mutex<PolicyStats>>,
    /// The decision of the last tick that read host memory.
    last: Arc<Mutex<Option<Decision>>>,
    budget: Option<Arc<AtomicU64>>,
    config: PolicyConfig,
}

impl PolicyHandle {
    /// The counters and state history as of the last tick.
    pub fn stats(&self) -> PolicyStats {
        self.counters.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The decision of the last tick (host memory, state, each VM's plan and
    /// target), if a tick has read host memory yet.
    pub fn last_decision(&self) -> Option<Decision> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The policy's thresholds and amounts (the idle tax, the balloon's cap, ...).
    pub fn config(&self) -> &PolicyConfig {
        &self.config
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
    /// Starts the thread over `vms`.
    pub fn start(vms: Vec<PolicyVm>, opts: &PolicyOptions) -> Result<PolicyThread, PolicyError> {
        let resident = Arc::new(AtomicU64::new(0));
        let mut budget = None;
        let source: Box<dyn HostMemSource> = match opts.host_mem {
            HostMemChoice::Host => Box::new(MemInfo::new()),
            HostMemChoice::Cgroup => Box::new(Cgroup::current().map_err(PolicyError::Cgroup)?),
            HostMemChoice::Budget(bytes) => {
                let r = resident.clone();
                let source = Budget::new(bytes, move || r.load(Ordering::Relaxed));
                budget = Some(source.handle());
                Box::new(source)
            }
        };
        let mut members = Vec::with_capacity(vms.len());
        for p in vms {
            let dirty = match (&p.swapper, opts.feed_dirty_log) {
                (Some(_), true) => {
                    Some(DirtyLog::enable(p.slots).map_err(|e| PolicyError::DirtyLog(p.vm.name().to_string(), e))?)
                }
                _ => None,
            };
            members.push(Member { vm: p.vm, swapper: p.swapper, limit: p.limit, dirty });
        }
        log::info!("free-memory policy: {} every {:?}", source.describe(), opts.tick);
        let handle = PolicyHandle {
            counters: Arc::new(Mutex::new(PolicyStats::default())),
            last: Arc::new(Mutex::new(None)),
            budget,
            config: opts.config.clone(),
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
        let infos: Vec<VmMemInfo> = live.iter().map(|p| mem_info(p)).collect();
        self.resident.store(infos.iter().map(|v| v.resident_pages * PAGE).sum(), Ordering::Relaxed);
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
            Err(e) => log::warn!("{}: eviction failed: {e}", vm.name()),
        }
    }
    plan.pause && sw.stats().eviction_stopped.is_none()
}

/// What the policy needs to know of one VM this tick: read from the VM and its
/// devices now, never remembered.
fn mem_info(p: &Member) -> VmMemInfo {
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
