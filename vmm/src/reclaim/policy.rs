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
use swapd::SwapError;

use pagestate::PauseGuard;

use super::swap::DirtyLog;
use crate::devices::virtio::balloon::TargetMode;
use crate::vm::{Vm, VmShared};

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
    NotASize(String),
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
            size => match crate::config::parse_size(size) {
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
    #[error("{0}")]
    DirtyLog(String),
    /// The thread could not be created.
    #[error("cannot start the policy thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// One VM under the policy.
struct PolicyVm {
    vm: Arc<VmShared>,
    /// Its configured limit in bytes.
    limit: Option<u64>,
    /// Its dirty log, fed to its swapper every tick (idle-aware victims).
    dirty: Option<DirtyLog>,
}

/// A reader of the running policy's counters (for the control API).
#[derive(Clone)]
pub struct PolicyCounters(Arc<Mutex<PolicyStats>>);

impl PolicyCounters {
    /// The counters and state history as of the last tick.
    pub fn get(&self) -> PolicyStats {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The running policy thread; dropping it stops the thread and resumes every VM it
/// paused.
pub struct PolicyThread {
    stop: Arc<AtomicBool>,
    counters: PolicyCounters,
    thread: Option<JoinHandle<()>>,
}

impl PolicyThread {
    /// Starts the thread over `vms` (their swappers, if any, attached already).
    pub fn start(vms: &[Vm], opts: &PolicyOptions) -> Result<PolicyThread, PolicyError> {
        let resident = Arc::new(AtomicU64::new(0));
        let source: Box<dyn HostMemSource> = match opts.host_mem {
            HostMemChoice::Host => Box::new(MemInfo::new()),
            HostMemChoice::Cgroup => Box::new(Cgroup::current().map_err(PolicyError::Cgroup)?),
            HostMemChoice::Budget(bytes) => {
                let r = resident.clone();
                Box::new(Budget::new(bytes, move || r.load(Ordering::Relaxed)))
            }
        };
        let mut members = Vec::with_capacity(vms.len());
        for vm in vms {
            let dirty = if opts.feed_dirty_log && vm.shared().swap.get().is_some() {
                Some(DirtyLog::enable(vm).map_err(PolicyError::DirtyLog)?)
            } else {
                None
            };
            members.push(PolicyVm { vm: vm.shared().clone(), limit: vm.config().limit, dirty });
        }
        log::info!("free-memory policy: {} every {:?}", source.describe(), opts.tick);
        let counters = PolicyCounters(Arc::new(Mutex::new(PolicyStats::default())));
        let stop = Arc::new(AtomicBool::new(false));
        let mut state = Loop {
            vms: members,
            policy: Policy::new(opts.config.clone()),
            source,
            resident,
            paused: HashMap::new(),
            counters: counters.clone(),
            tick: opts.tick,
            last_error: None,
        };
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("policy".into())
            .spawn(move || state.run(&stop2))
            .map_err(PolicyError::Spawn)?;
        Ok(PolicyThread { stop, counters, thread: Some(thread) })
    }

    /// The policy's counters and state history.
    pub fn stats(&self) -> PolicyStats {
        self.counters.get()
    }

    /// A reader of the counters, for the control API.
    pub fn counters(&self) -> PolicyCounters {
        self.counters.clone()
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
    vms: Vec<PolicyVm>,
    policy: Policy,
    source: Box<dyn HostMemSource>,
    /// Guest RAM resident over all VMs (what a budget source subtracts).
    resident: Arc<AtomicU64>,
    /// Pauses held for the low state, by VM name.
    paused: HashMap<String, PauseGuard>,
    counters: PolicyCounters,
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
        let live: Vec<&PolicyVm> = self.vms.iter().filter(|p| p.vm.ending().is_none()).collect();
        self.paused.retain(|name, _| live.iter().any(|p| &p.vm.name == name));
        for p in &live {
            if let (Some(log), Some(sw)) = (&p.dirty, p.vm.swap.get()) {
                if let Err(e) = log.feed(&sw) {
                    log::warn!("{}: dirty log: {e}", p.vm.name);
                }
            }
        }
        let infos: Vec<VmMemInfo> = live.iter().map(|p| mem_info(&p.vm, p.limit)).collect();
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
        *self.counters.0.lock().unwrap_or_else(|p| p.into_inner()) = self.policy.stats();
        for p in &live {
            if let Some(plan) = decision.vm(&p.vm.name) {
                set_balloon(&p.vm, plan);
                let pause = evict(&p.vm, plan, &decision);
                hold_pause(&mut self.paused, &p.vm, pause, &decision);
            }
        }
    }
}

/// Holds or releases the low state's pause of `vm`.
fn hold_pause(paused: &mut HashMap<String, PauseGuard>, vm: &VmShared, pause: bool, d: &Decision) {
    match (pause, paused.contains_key(&vm.name)) {
        (true, false) => {
            if let Ok(g) = vm.run.pause_guard(Duration::from_secs(2)) {
                log::info!("{}: paused ({} state, {:.2}% free, above its target)", vm.name, d.state, d.free_pct);
                paused.insert(vm.name.clone(), g);
            }
        }
        (false, true) => {
            paused.remove(&vm.name);
            log::info!("{}: resumed ({} state, {:.2}% free)", vm.name, d.state, d.free_pct);
        }
        _ => {}
    }
}

/// Sets the balloon target the plan asks for, unless the user pinned it.
fn set_balloon(vm: &VmShared, plan: &VmPlan) {
    if plan.balloon_delta_pages == 0 {
        return;
    }
    if let Some(b) = &vm.balloon {
        if b.lock().unwrap().set_auto_target(plan.balloon_target_pages) {
            vm.run.wake();
        }
    }
}

/// Evicts what the plan asks for; returns whether the plan's pause may be held:
/// pausing helps only while eviction can run.
fn evict(vm: &VmShared, plan: &VmPlan, d: &Decision) -> bool {
    let Some(sw) = vm.swap.get() else { return false };
    if plan.swap_pages > 0 {
        match sw.swap_out(plan.swap_pages as usize) {
            Ok(n) => log::debug!("{}: swapped {n} of {} pages ({} state)", vm.name, plan.swap_pages, d.state),
            Err(SwapError::Stopped { .. } | SwapError::Write { .. }) => return false,
            Err(SwapError::Ending { .. }) => {}
            Err(e) => log::warn!("{}: eviction failed: {e}", vm.name),
        }
    }
    plan.pause && sw.stats().eviction_stopped.is_none()
}

/// What the policy needs to know of one VM this tick: read from the VM and its
/// devices now, never remembered.
fn mem_info(vm: &VmShared, limit: Option<u64>) -> VmMemInfo {
    let mut info = VmMemInfo::new(&vm.name, vm.ram.size() / PAGE, vm.ram.resident_bytes() / PAGE);
    info.balloon = vm.balloon.as_ref().map(|b| {
        let s = b.lock().unwrap().snapshot();
        BalloonInfo {
            target_pages: s.target_pages,
            size_pages: s.ballooned_pages,
            pinned: s.target_mode == TargetMode::Pinned,
        }
    });
    info.swap = vm.swap.get().is_some();
    info.limit_pages = limit.map(|l| l / PAGE);
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
