//! The free-memory policy thread: one per host process, ticking
//! [`swapd::Policy`] over every VM that has a swapper and applying its decisions.
//!
//! Each tick (100 ms by default) it measures each VM's resident guest RAM, asks the
//! configured host-memory source how much is free, and applies the decision:
//!
//! | state | what the thread does |
//! |---|---|
//! | high | nothing (balloon targets start rising a little before soft) |
//! | soft | sets balloon targets through each VM's balloon device |
//! | hard | balloon targets, and evicts pages with each VM's swapper |
//! | low | evicts, and pauses the VMs above their target until the state improves |
//!
//! With idle-aware victims it first feeds each VM's KVM dirty log to its swapper.
//! A VM above its configured limit is reclaimed whatever the state. Pauses are
//! nesting [`PauseGuard`]s: the thread releases them when the state improves, when
//! the VM ends, when eviction cannot help (its eviction is stopped by a write
//! error), and when the thread stops, so a paused VM never outlives its reason.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use swapd::{Budget, Cgroup, Decision, HostMemSource, MemInfo, Policy, PolicyStats, SwapError, VmMemInfo};

use super::swap::{DirtyLog, HostMemChoice, SwapOptions};
use crate::vm::VmShared;
use pagestate::PauseGuard;

const PAGE: u64 = guest_abi::PAGE_SIZE;

/// One VM under the policy.
pub struct PolicyVm {
    /// The VM (with its swapper attached).
    pub vm: Arc<VmShared>,
    /// Its configured limit in bytes.
    pub limit: Option<u64>,
    /// Its dirty log, fed to its swapper every tick (idle-aware victims).
    pub dirty: Option<DirtyLog>,
}

/// The running policy thread; dropping it stops the thread and resumes every VM it
/// paused.
pub struct PolicyThread {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<PolicyStats>>,
    thread: Option<JoinHandle<()>>,
}

impl PolicyThread {
    /// Starts the thread over `vms`.
    pub fn start(vms: Vec<PolicyVm>, opts: &SwapOptions) -> Result<PolicyThread, String> {
        let resident = Arc::new(AtomicU64::new(0));
        let source: Box<dyn HostMemSource> = match opts.host_mem {
            HostMemChoice::Host => Box::new(MemInfo::new()),
            HostMemChoice::Cgroup => Box::new(Cgroup::current().map_err(|e| format!("--host-mem cgroup: {e}"))?),
            HostMemChoice::Budget(bytes) => {
                let r = resident.clone();
                Box::new(Budget::new(bytes, move || r.load(Ordering::Relaxed)))
            }
        };
        log::info!("free-memory policy: {} every {:?}", source.describe(), opts.tick);
        let stats = Arc::new(Mutex::new(PolicyStats::default()));
        for v in &vms {
            v.vm.swap.set_policy(stats.clone());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut state = Loop {
            vms,
            policy: Policy::new(opts.policy.clone()),
            source,
            resident,
            paused: HashMap::new(),
            stats: stats.clone(),
            tick: opts.tick,
            last_error: None,
        };
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("swap-policy".into())
            .spawn(move || state.run(&stop2))
            .map_err(|e| format!("cannot start the policy thread: {e}"))?;
        Ok(PolicyThread { stop, stats, thread: Some(thread) })
    }

    /// The policy's counters and state history.
    pub fn stats(&self) -> PolicyStats {
        self.stats.lock().unwrap().clone()
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
    stats: Arc<Mutex<PolicyStats>>,
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
        let live: Vec<usize> = (0..self.vms.len()).filter(|&i| self.vms[i].vm.ending().is_none()).collect();
        self.paused.retain(|name, _| live.iter().any(|&i| &self.vms[i].vm.name == name));
        for &i in &live {
            let p = &self.vms[i];
            if let (Some(log), Some(sw)) = (&p.dirty, p.vm.swap.get()) {
                if let Err(e) = log.feed(&sw) {
                    log::warn!("{}: dirty log: {e}", p.vm.name);
                }
            }
        }
        let infos: Vec<VmMemInfo> = live.iter().map(|&i| mem_info(&self.vms[i])).collect();
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
        *self.stats.lock().unwrap() = self.policy.stats();
        for &i in &live {
            self.apply(i, &decision);
        }
    }

    fn apply(&mut self, i: usize, d: &Decision) {
        let vm = &self.vms[i].vm;
        let Some(act) = d.vm(&vm.name) else { return };
        if act.balloon_delta_pages != 0 {
            if let Some(b) = &vm.balloon {
                if let Err(e) = b.lock().unwrap().set_target(act.balloon_target_pages * PAGE) {
                    log::warn!("{}: balloon target: {e}", vm.name);
                }
                vm.run.wake();
            }
        }
        let Some(sw) = vm.swap.get() else { return };
        let mut stopped = false;
        if act.swap_pages > 0 {
            match sw.swap_out(act.swap_pages as usize) {
                Ok(n) => log::debug!("{}: swapped {n} of {} pages ({} state)", vm.name, act.swap_pages, d.state),
                Err(SwapError::Stopped { .. } | SwapError::Write { .. }) => stopped = true,
                Err(SwapError::Ending { .. }) => {}
                Err(e) => log::warn!("{}: eviction failed: {e}", vm.name),
            }
        }
        // Pausing helps only while eviction can run.
        let pause = act.pause && !stopped && sw.stats().eviction_stopped.is_none();
        match (pause, self.paused.contains_key(&vm.name)) {
            (true, false) => {
                if let Ok(g) = vm.run.pause_guard(Duration::from_secs(2)) {
                    log::info!("{}: paused ({} state, {:.2}% free, above its target)", vm.name, d.state, d.free_pct);
                    self.paused.insert(vm.name.clone(), g);
                }
            }
            (false, true) => {
                self.paused.remove(&vm.name);
                log::info!("{}: resumed ({} state, {:.2}% free)", vm.name, d.state, d.free_pct);
            }
            _ => {}
        }
    }
}

/// What the policy needs to know of one VM this tick.
fn mem_info(p: &PolicyVm) -> VmMemInfo {
    let vm = &p.vm;
    let mut info = VmMemInfo::new(&vm.name, vm.ram.size() / PAGE, vm.ram.resident_bytes() / PAGE);
    info.balloon = vm.balloon.is_some();
    info.balloon_pages = vm.balloon.as_ref().map_or(0, |b| b.lock().unwrap().ballooned().count());
    info.limit_pages = p.limit.map(|l| l / PAGE);
    info
}
