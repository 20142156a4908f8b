//! A host process running several VMs at once (`vmm run --vms N` or a config file):
//! creates them all before starting any, starts them together, watches them
//! (hangs, time limit, interruption) and collects their reports.
//!
//! One process hosting every VM is what lets page sharing later merge pages across
//! VMs.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::api::server::Server;
use crate::config::VmConfig;
use crate::memory;
use crate::reclaim::swap::{self, SwapOptions};
use crate::vm::{open_kvm, Vm, VmReport};

/// How often the host checks its VMs.
const TICK: Duration = Duration::from_millis(20);

/// Everything `vmm run` reports at the end.
#[derive(Debug, Serialize)]
pub struct HostReport {
    /// One report per VM, in configuration order.
    pub vms: Vec<VmReport>,
    /// Resident memory of the whole process just before the VMs were torn down, MiB.
    pub process_rss_mib: f64,
    /// Of which guest RAM, MiB.
    pub guest_rss_mib: f64,
    /// The rest: the VMM's own memory, MiB.
    pub vmm_overhead_mib: f64,
    /// The free-memory policy's state and history, if swapping was on.
    pub swap_policy: Option<swapd::PolicyStats>,
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
    /// Host swapping and the free-memory policy.
    pub swap: Option<SwapOptions>,
}

/// Creates, starts and runs the VMs to their end. `t0` is the reference time of the
/// boot figures.
pub fn run(configs: &[VmConfig], t0: Instant, opts: RunOptions) -> Result<HostReport, String> {
    let mut vms = create_all(configs, t0)?;
    let policy = match &opts.swap {
        Some(s) => Some(swap::start(&vms, s)?),
        None => None,
    };
    let _api = match &opts.api_socket {
        Some(path) => Some(Server::start(path, vms.iter().map(|vm| vm.shared().clone()).collect())?),
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
    let swap_policy = policy.map(|p| p.stats());
    Ok(HostReport { swap_policy, ..finish_all(vms) })
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
    let process = memory::process_rss();
    let guest: u64 = vms.iter().map(|vm| vm.ram().resident_bytes()).sum();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    HostReport {
        vms: vms.into_iter().map(Vm::finish).collect(),
        process_rss_mib: mib(process),
        guest_rss_mib: mib(guest),
        vmm_overhead_mib: mib(process.saturating_sub(guest)),
        swap_policy: None,
    }
}
