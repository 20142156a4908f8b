//! A host process running several VMs at once (`vmm run --vms N` or a config file):
//! creates them all before starting any, starts them together, watches them
//! (hangs, time limit, interruption) and collects their reports.
//!
//! One process hosting every VM is what lets page sharing merge pages across VMs:
//! with `--tps` one scanner covers them all ([`PageSharing`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::api::server::Server;
use crate::config::VmConfig;
use crate::reclaim::policy::{PolicyOptions, PolicyThread};
use crate::reclaim::sharing::PageSharing;
use crate::reclaim::swap::{self, SwapOptions};
use crate::vm::{open_kvm, Vm, VmReport};

/// How often the host checks its VMs.
const TICK: Duration = Duration::from_millis(20);

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

/// Options of a run.
#[derive(Default)]
pub struct RunOptions<'a> {
    /// Stop every VM after this long.
    pub timeout: Option<Duration>,
    /// Set from outside (e.g. SIGINT) to stop every VM.
    pub interrupted: Option<&'a AtomicBool>,
    /// Serve the control API on this Unix socket.
    pub api_socket: Option<PathBuf>,
    /// Page sharing over all the VMs, with this configuration (None: off).
    pub tps: Option<tps::Config>,
    /// A host swapper for every VM (None: off).
    pub swap: Option<SwapOptions>,
    /// The free-memory policy over every VM (None: off).
    pub policy: Option<PolicyOptions>,
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

/// Creates, starts and runs the VMs to their end. `t0` is the reference time of the
/// boot figures.
pub fn run(configs: &[VmConfig], t0: Instant, opts: RunOptions) -> Result<HostReport, String> {
    let mut vms = create_all(configs, t0)?;
    let sharing = opts.tps.map(|c| PageSharing::start(c, &vms)).transpose().map_err(|e| e.to_string())?.map(Arc::new);
    if let Some(s) = &opts.swap {
        swap::start(&vms, s)?;
    }
    let policy = opts.policy.map(|p| PolicyThread::start(&vms, &p)).transpose().map_err(|e| e.to_string())?;
    let _api = match &opts.api_socket {
        Some(path) => Some(
            Server::start(
                path,
                vms.iter().map(|vm| vm.shared().clone()).collect(),
                sharing.clone(),
                policy.as_ref().map(PolicyThread::counters),
            )
            .map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    for vm in &mut vms {
        vm.start()?;
    }
    let deadline = opts.timeout.map(|t| Instant::now() + t);
    loop {
        let now = Instant::now();
        for vm in &mut vms {
            vm.check_hang(now);
        }
        if opts.interrupted.is_some_and(|f| f.load(Ordering::Relaxed)) {
            vms.iter().for_each(|vm| vm.stop("interrupted"));
        }
        if deadline.is_some_and(|d| now >= d) {
            let t = opts.timeout.unwrap_or_default().as_secs_f64();
            vms.iter().for_each(|vm| vm.stop(&format!("time limit of {t:.1}s reached")));
        }
        if vms.iter().all(|vm| vm.ending().is_some()) {
            break;
        }
        std::thread::sleep(TICK);
    }
    let policy = policy.map(|p| p.stats());
    Ok(HostReport { policy, ..finish_with_sharing(vms, sharing.as_deref()) })
}

/// Creates every VM (none runs yet); the first error aborts all.
pub fn create_all(configs: &[VmConfig], t0: Instant) -> Result<Vec<Vm>, String> {
    crate::config::check_unique_names(configs)?;
    let kvm = open_kvm()?;
    let label = configs.len() > 1;
    configs.iter().enumerate().map(|(i, c)| Vm::create(&kvm, c, i as u32, t0, label)).collect()
}

/// Reports of ended VMs plus the process's memory figures.
pub fn finish_all(vms: Vec<Vm>) -> HostReport {
    finish_with_sharing(vms, None)
}

/// [`finish_all`] for VMs covered by `sharing`: its counters, taken while every VM
/// still holds its shares, go into the report, and each VM leaves it once its
/// threads are gone. (An ended VM is never paused, so nothing is merged in it
/// meanwhile.)
pub fn finish_with_sharing(vms: Vec<Vm>, sharing: Option<&PageSharing>) -> HostReport {
    let tps = sharing.map(PageSharing::stats);
    let pss: u64 = vms.iter().map(|vm| vm.ram().resident_bytes()).sum();
    let overhead = pagestate::residency::process_rss().saturating_sub(pss);
    let guest = sharing.map_or(pss, |s| s.guest_memory_bytes(&vms));
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let reports = vms
        .into_iter()
        .enumerate()
        .map(|(i, vm)| {
            let report = vm.finish();
            if let Some(s) = sharing {
                s.vm_ended(i);
            }
            report
        })
        .collect();
    HostReport {
        vms: reports,
        process_rss_mib: mib(overhead + guest),
        guest_rss_mib: mib(guest),
        vmm_overhead_mib: mib(overhead),
        tps,
        policy: None,
    }
}
