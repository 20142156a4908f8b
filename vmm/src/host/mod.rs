//! A host process running several VMs at once, and everything that reclaims their
//! memory: [`Host`].
//!
//! One process hosting every VM is what lets page sharing merge pages across VMs.
//! A `Host` owns the VMs, the page-sharing scanner over all of them, a swapper per
//! VM, the free-memory policy thread and the control socket, starts them in one
//! order and tears them down in one order. `vmm run`, the demo, the benchmarks and
//! the tests all build their VMs through it.
//!
//! **Start** ([`Host::create`], then [`Host::start`]):
//! 1. every VM is created (RAM, memory slots, vCPUs, kernel, devices), none runs;
//! 2. page sharing covers every VM's RAM (and attaches to its `RamChanges`);
//! 3. the swap directory is cleaned of dead runs' files, each VM gets a swapper;
//! 4. the policy thread starts over the VMs and their swappers;
//! 5. the control socket opens;
//! 6. [`Host::start`] starts every VM's device and vCPU threads.
//!
//! **Teardown** ([`Host::finish`]), each step for the reason given:
//! 1. the policy thread stops: no balloon target, eviction or pause is issued any
//!    more, and the pauses it held are released;
//! 2. the control socket closes: no request reaches a VM that is going away;
//! 3. the figures that need every VM alive are taken (page sharing's counters, the
//!    guest memory held, the process's memory);
//! 4. for each VM: it is stopped and its vCPUs leave the guest; then its swapper
//!    goes (a vCPU blocked on a page whose slot is bad is released by closing the
//!    userfaultfd, and the swap file is removed once nothing can fault on it); then
//!    its threads are joined and it reports; then page sharing forgets it (its pool
//!    references are dropped only once nothing runs in it);
//! 5. the scanner stops, and the VMs' memory is unmapped last.

pub mod shared;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use swapd::Swapper;

use crate::api::server::Server;
use crate::config::VmConfig;
use crate::reclaim::policy::{PolicyOptions, PolicyThread, PolicyVm};
use crate::reclaim::sharing::PageSharing;
use crate::reclaim::swap::{self, SwapOptions, SwapSlot};
use crate::vm::{open_kvm, Vm, VmError, VmReport};

pub use shared::HostShared;

/// How often the host checks its VMs.
const TICK: Duration = Duration::from_millis(20);

/// How long a VM's vCPUs get to leave the guest at teardown before its swapper goes.
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// Everything `vmm run` reports at the end.
#[derive(Debug, Serialize)]
pub struct HostReport {
    /// One report per VM, in configuration order.
    pub vms: Vec<VmReport>,
    /// Resident memory of the whole process just before the VMs were torn down, MiB:
    /// guest RAM (below) plus the VMM's own memory.
    pub process_rss_mib: f64,
    /// Host memory holding guest RAM, MiB: its `Pss`, or with page sharing its
    /// private pages plus the sharing pool.
    pub guest_rss_mib: f64,
    /// The rest: the VMM's own memory, MiB.
    pub vmm_overhead_mib: f64,
    /// Page sharing counters just before the VMs were torn down, if it was on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tps: Option<tps::Stats>,
    /// The free-memory policy's state and history, if it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<policy::PolicyStats>,
}

/// What a host runs besides its VMs.
#[derive(Clone, Debug, Default)]
pub struct HostOptions {
    /// Page sharing over all the VMs, with this configuration (None: off).
    pub tps: Option<tps::Config>,
    /// A host swapper for every VM (None: off).
    pub swap: Option<SwapOptions>,
    /// The free-memory policy over every VM (None: off).
    pub policy: Option<PolicyOptions>,
    /// Serve the control API on this Unix socket.
    pub api_socket: Option<PathBuf>,
}

/// How [`Host::watch`] decides to stop the VMs from outside.
#[derive(Default)]
pub struct WatchLimits<'a> {
    /// Stop every VM after this long.
    pub timeout: Option<Duration>,
    /// Set from outside (e.g. SIGINT) to stop every VM.
    pub interrupted: Option<&'a AtomicBool>,
}

/// Why a host could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Two VMs share a name, or a configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A VM could not be created or started.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Page sharing could not cover the VMs.
    #[error("page sharing: {0}")]
    Sharing(#[from] tps::Error),
    /// The swap directory or a swapper could not be set up.
    #[error(transparent)]
    Swap(#[from] swap::HostSwapError),
    /// The free-memory policy could not start.
    #[error("free-memory policy: {0}")]
    Policy(#[from] crate::reclaim::policy::PolicyError),
    /// The control socket could not be opened.
    #[error("control API: {0}")]
    Api(#[from] crate::api::listener::ListenError),
}

/// VMs and the reclaimers over them, started and torn down together.
pub struct Host {
    vms: Vec<Vm>,
    shared: Arc<HostShared>,
    policy: Option<PolicyThread>,
    api: Option<Server>,
}

impl Host {
    /// Creates every VM of `configs` and the reclaimers `opts` asks for; nothing runs
    /// yet. `t0` is the reference time of the boot figures. The first error undoes
    /// everything.
    pub fn create(configs: &[VmConfig], t0: Instant, opts: HostOptions) -> Result<Host, HostError> {
        crate::config::check_unique_names(configs)?;
        let kvm = open_kvm().map_err(VmError::from)?;
        let label = configs.len() > 1;
        let vms = configs
            .iter()
            .enumerate()
            .map(|(i, c)| Vm::create(&kvm, c, i as u32, t0, label))
            .collect::<Result<Vec<Vm>, VmError>>()?;
        let sharing = opts.tps.map(|c| PageSharing::start(c, &vms)).transpose()?;
        let swappers: Vec<SwapSlot> = vms.iter().map(|_| SwapSlot::default()).collect();
        if let Some(s) = &opts.swap {
            swap::prepare_dir(&s.dir)?;
            for (vm, slot) in vms.iter().zip(&swappers) {
                slot.set(swap::attach(vm.shared(), s)?);
            }
        }
        let policy = match &opts.policy {
            Some(p) => {
                let members = vms
                    .iter()
                    .zip(&swappers)
                    .map(|(vm, slot)| PolicyVm {
                        vm: vm.shared().clone(),
                        swapper: slot.get(),
                        limit: vm.config().limit,
                        min: vm.config().min,
                        shares: vm.config().shares,
                        slots: vm.memory_slots().clone(),
                    })
                    .collect();
                Some(PolicyThread::start(members, p)?)
            }
            None => None,
        };
        let shared = Arc::new(HostShared::new(
            vms.iter().map(|vm| vm.shared().clone()).collect(),
            sharing,
            swappers,
            policy.as_ref().map(PolicyThread::handle),
        ));
        let api = match &opts.api_socket {
            Some(path) => Some(Server::start(path, shared.clone())?),
            None => None,
        };
        Ok(Host { vms, shared, policy, api })
    }

    /// Starts every VM's device and vCPU threads.
    pub fn start(&mut self) -> Result<(), HostError> {
        Ok(self.vms.iter_mut().try_for_each(Vm::start)?)
    }

    /// The VMs, in configuration order.
    pub fn vms(&self) -> &[Vm] {
        &self.vms
    }

    /// What the control API sees: the VMs and their reclaimers.
    pub fn shared(&self) -> &Arc<HostShared> {
        &self.shared
    }

    /// Page sharing, if on.
    pub fn sharing(&self) -> Option<&PageSharing> {
        self.shared.sharing()
    }

    /// The swapper of VM `index`, if it has one.
    pub fn swapper(&self, index: usize) -> Option<Arc<Swapper>> {
        self.shared.swapper(index)
    }

    /// The control socket, if one is served.
    pub fn api_socket(&self) -> Option<&std::path::Path> {
        self.api.as_ref().map(Server::path)
    }

    /// Watches the VMs until every one has ended: ends a guest that stopped making
    /// progress (hang timeout), stops them all on interruption or at the time limit.
    pub fn watch(&mut self, limits: WatchLimits) {
        let deadline = limits.timeout.map(|t| Instant::now() + t);
        loop {
            let now = Instant::now();
            for vm in &mut self.vms {
                vm.check_hang(now);
            }
            if limits.interrupted.is_some_and(|f| f.load(Ordering::Relaxed)) {
                self.stop_all("interrupted");
            }
            if deadline.is_some_and(|d| now >= d) {
                let t = limits.timeout.unwrap_or_default().as_secs_f64();
                self.stop_all(&format!("time limit of {t:.1}s reached"));
            }
            if self.vms.iter().all(|vm| vm.ending().is_some()) {
                return;
            }
            std::thread::sleep(TICK);
        }
    }

    /// Stops the free-memory policy early (no more balloon targets, evictions or
    /// pauses; the pauses it held are released), e.g. to hold the guests still for
    /// checks; returns its last counters. Teardown skips it then.
    pub fn stop_policy(&mut self) -> Option<policy::PolicyStats> {
        let thread = self.policy.take()?;
        let stats = thread.stats();
        drop(thread);
        Some(stats)
    }

    /// Stops every VM that still runs.
    pub fn stop_all(&self, why: &str) {
        self.vms.iter().filter(|vm| vm.ending().is_none()).for_each(|vm| vm.stop(why));
    }

    /// Tears everything down in the order of the module documentation and reports.
    /// VMs still running are stopped.
    pub fn finish(self) -> HostReport {
        let Host { vms, shared, policy, api } = self;
        let allocations: Vec<_> =
            vms.iter().map(|vm| shared.policy().and_then(|p| p.allocation(vm.shared().name()))).collect();
        let policy = policy.map(|p| {
            let stats = p.stats();
            drop(p);
            stats
        });
        drop(api);
        let tps = shared.sharing().map(PageSharing::stats);
        let pss: u64 = vms.iter().map(|vm| vm.ram().resident_bytes()).sum();
        let guest = shared.guest_memory_bytes();
        let overhead = pagestate::residency::process_rss().saturating_sub(pss);
        let reports = vms
            .into_iter()
            .zip(allocations)
            .enumerate()
            .map(|(i, (vm, alloc))| {
                vm.stop("finished by its host");
                vm.wait_exited(EXIT_WAIT);
                let swap = shared.close_swapper(i);
                let mut report = vm.finish();
                report.swap = swap;
                report.alloc = alloc;
                if let Some(s) = shared.sharing() {
                    s.vm_ended(i);
                }
                report
            })
            .collect();
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        HostReport {
            vms: reports,
            process_rss_mib: mib(overhead + guest),
            guest_rss_mib: mib(guest),
            vmm_overhead_mib: mib(overhead),
            tps,
            policy,
        }
    }
}

/// Set by SIGINT or SIGTERM once [`install_interrupt_handler`] has run.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The first SIGINT or SIGTERM sets [`INTERRUPTED`], so that the caller stops its
/// VMs and still reports (and restores what it changed); a second one exits at once.
pub fn install_interrupt_handler() -> &'static AtomicBool {
    extern "C" fn on_interrupt(_: libc::c_int) {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(130) };
        }
    }
    // SAFETY: the handler only touches an atomic and calls _exit.
    unsafe {
        libc::signal(libc::SIGINT, on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t);
    }
    &INTERRUPTED
}

/// `vmm run`: creates, starts and watches the VMs to their end, then tears down.
pub fn run(configs: &[VmConfig], t0: Instant, opts: HostOptions, limits: WatchLimits) -> Result<HostReport, HostError> {
    let mut host = Host::create(configs, t0, opts)?;
    if let Err(e) = host.start() {
        host.stop_all(&format!("start failed: {e}"));
        host.finish();
        return Err(e);
    }
    host.watch(limits);
    Ok(host.finish())
}
