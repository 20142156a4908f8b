//! One snapshot of a host's memory: every VM's allocation, targets, balloon, swap
//! and sharing, and the host's free memory and state ([`HostSample`]).
//!
//! `vmm top` asks a running `vmm run` for one over the control socket (the
//! `sample` request) every refresh; `vmm lab` takes one in process every sampling
//! interval. Both therefore show the same figures under the same names, and a
//! column added here appears in both. A sample holds counters and amounts, never
//! rates: a reader computes rates (swap-ins per second, ...) from two samples and
//! the time between them, so that a sample is the same whoever takes it and when.
//!
//! Fields are `Option` where the data does not exist for this run (no balloon, no
//! swapper, no policy) or not yet in this project (per-VM sharing counts): a reader
//! shows "-" rather than a zero that would look measured.

use serde::{Deserialize, Serialize};

use crate::host::shared::HostShared;
use crate::vm::VmState;

const MIB: f64 = (1u64 << 20) as f64;
const PAGE: u64 = guest_abi::PAGE_SIZE;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB
}

fn pages_mib(pages: u64) -> f64 {
    mib(pages * PAGE)
}

/// A figure as `vmm top` and the lab's CSV print it: two decimals, "-" where the
/// data does not exist.
pub fn format_value(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.2}"))
}

/// A host and its VMs at one moment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostSample {
    /// The free-memory policy's view, if the policy runs and has ticked.
    pub policy: Option<PolicySample>,
    /// Host memory holding guest RAM, MiB: the guests' private pages plus page
    /// sharing's pool (their `Pss` without page sharing).
    pub guest_mib: f64,
    /// Page sharing over all VMs, if on.
    pub sharing: Option<SharingSample>,
    /// One per VM, in configuration order.
    pub vms: Vec<VmSample>,
}

/// The free-memory policy at its last tick.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicySample {
    /// The free-memory state.
    pub state: policy::FreeState,
    /// Memory the policy manages (the budget, the cgroup, the host), MiB.
    pub total_mib: f64,
    /// Of which free, MiB.
    pub free_mib: f64,
    /// Free, percent of total.
    pub free_pct: f64,
    /// The idle memory tax rate.
    pub idle_tax: f64,
}

/// Page sharing's host-wide figures (ESX reports them per VM; the scanner here
/// counts them over all VMs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SharingSample {
    /// Guest memory mapped onto shared pool pages, MiB (ESX `SHRD`, without zero pages).
    pub shared_mib: f64,
    /// Guest pages dropped as zero and not written since, MiB (ESX `ZERO`).
    pub zero_mib: f64,
    /// Host memory saved by sharing (zero pages plus shared minus pool), MiB (ESX `SHRDSVD`).
    pub saved_mib: f64,
    /// Full passes of the scanner over all guest RAM.
    pub full_passes: u64,
}

/// One VM at one moment. The ESX `esxtop` column each field stands for is named.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmSample {
    /// The VM's name.
    pub name: String,
    /// Running, paused, stopping, or how it ended.
    pub state: VmState,
    /// Configured guest RAM, MiB (`MEMSZ`).
    pub memsz_mib: f64,
    /// Guest RAM resident in host memory, MiB (`GRANT`; proportional: a page shared
    /// by N guest pages counts 1/N).
    pub resident_mib: f64,
    /// Resident memory the policy wants it at, MiB (`SZTGT`).
    pub target_mib: Option<f64>,
    /// Estimate of the memory the guest actively uses, MiB (`TCHD`): the largest
    /// of the sampler's averages.
    pub active_mib: Option<f64>,
    /// The sampler's fast average, MiB.
    pub active_fast_mib: Option<f64>,
    /// The sampler's slow average, MiB.
    pub active_slow_mib: Option<f64>,
    /// The VM's shares, as the policy counts them.
    pub shares: Option<u64>,
    /// Memory in the balloon, MiB (`MCTLSZ`).
    pub balloon_mib: Option<f64>,
    /// The balloon's target, MiB (`MCTLTGT`).
    pub balloon_target_mib: Option<f64>,
    /// The most the policy may balloon, MiB (`MCTLMAX`).
    pub balloon_max_mib: Option<f64>,
    /// Memory in the swap file now, MiB (`SWCUR`).
    pub swapped_mib: Option<f64>,
    /// What the policy asked the swapper at its last tick, MiB (`SWTGT`).
    pub swap_target_mib: Option<f64>,
    /// Swapped in so far (faults and prefetch), MiB; `SWR/s` is its rate.
    pub swap_read_mib: Option<f64>,
    /// Swapped out so far, MiB; `SWW/s` is its rate.
    pub swap_written_mib: Option<f64>,
    /// This VM's guest memory mapped onto page sharing's pool, MiB (`SHRD`, without
    /// zero pages, as the host figure).
    pub shared_mib: Option<f64>,
    /// This VM's pages dropped as zero and not written since, MiB (`ZERO`).
    pub zero_mib: Option<f64>,
    /// Host memory this VM's sharing saves, MiB (`SHRDSVD`): its zero pages, and of
    /// each pool page it maps its part of the saving (`1 - 1/refs`).
    pub saved_mib: Option<f64>,
    /// Pages the guest holds in its allocated set (its own count), MiB.
    pub guest_allocated_mib: f64,
    /// The guest's heartbeat: a progress counter of the test guest.
    pub heartbeat: u64,
    /// The working set of the guest's latest `read` or `work` step, MiB: what the
    /// guest itself says it uses (the truth an active estimate is held against).
    pub working_set_mib: Option<f64>,
    /// The throughput the guest's latest `work` step reported (operations per
    /// second: pages read or rewritten), and that step's number (a new number is a
    /// new measurement).
    pub work: Option<WorkReport>,
}

/// One `work` step's throughput, as the guest reported it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkReport {
    /// The step's number since boot.
    pub step: u64,
    /// Operations per second over the step.
    pub ops_per_sec: f64,
}

/// Console lines searched for the latest `work` step: a guest prints one line per
/// step, and a sample looks at what came since the last one or so.
const WORK_LINES: u64 = 64;

/// The latest `work` step among the last lines of `vm`'s console, and the working
/// set of the latest `read` or `work` step.
fn latest_steps(vm: &crate::vm::VmShared) -> (Option<WorkReport>, Option<f64>) {
    use guest_abi::workload::Op;
    let console = vm.console();
    let lines = console.lines_since(console.line_count().saturating_sub(WORK_LINES));
    let steps = crate::console::steps(&lines);
    let work = steps
        .iter()
        .rev()
        .find(|s| s.op == Op::Work)
        .and_then(|s| Some(WorkReport { step: s.step, ops_per_sec: s.ops_per_sec? as f64 }));
    let set = steps.iter().rev().find(|s| matches!(s.op, Op::Read | Op::Work)).and_then(|s| s.pages).map(pages_mib);
    (work, set)
}

impl HostSample {
    /// Takes a sample of `host` now.
    pub fn take(host: &HostShared) -> HostSample {
        let decision = host.policy().and_then(|p| p.last_decision());
        let policy = decision.as_ref().map(|d| PolicySample {
            state: d.state,
            total_mib: mib(d.host.total_bytes),
            free_mib: mib(d.host.free_bytes),
            free_pct: d.free_pct,
            idle_tax: host.policy().map_or(0.0, |p| p.idle_tax()),
        });
        let sharing = host.sharing().map(|s| {
            let t = s.stats();
            SharingSample {
                shared_mib: pages_mib(t.pool_mapped_pages),
                zero_mib: pages_mib(t.zero_pages),
                saved_mib: mib(t.bytes_saved),
                full_passes: t.full_passes,
            }
        });
        // Each figure reads /proc/self/smaps whole: once per VM here, and the host's
        // total from the same figures unless page sharing changes what it counts.
        let resident: Vec<u64> = host.vms().iter().map(|vm| vm.ram().resident_bytes()).collect();
        let guest_bytes = match host.sharing() {
            Some(_) => host.guest_memory_bytes(),
            None => resident.iter().sum(),
        };
        let vms = host
            .vms()
            .iter()
            .zip(&resident)
            .enumerate()
            .map(|(i, (vm, &resident))| {
                let balloon = vm.balloon_snapshot();
                let swap = host.swapper(i).map(|s| s.stats());
                let sharing = host.sharing().and_then(|s| s.vm_sharing(i));
                let plan = decision.as_ref().and_then(|d| d.vm(vm.name()));
                let alloc = host.policy().and_then(|p| p.allocation(vm.name()));
                let active = alloc.as_ref().and_then(|a| a.active.as_ref());
                let progress = vm.progress();
                let size = vm.ram().size();
                let (work, working_set_mib) = latest_steps(vm);
                VmSample {
                    name: vm.name().to_string(),
                    state: vm.state(),
                    memsz_mib: mib(size),
                    resident_mib: mib(resident),
                    target_mib: plan.map(|p| pages_mib(p.target_pages)),
                    active_mib: active.and_then(|a| a.active_mib),
                    active_fast_mib: active.filter(|a| a.estimate.periods > 0).map(|a| a.estimate.fast * mib(size)),
                    active_slow_mib: active.filter(|a| a.estimate.periods > 0).map(|a| a.estimate.slow * mib(size)),
                    shares: alloc.as_ref().map(|a| a.shares),
                    balloon_mib: balloon.as_ref().map(|b| pages_mib(b.ballooned_pages)),
                    balloon_target_mib: balloon.as_ref().map(|b| pages_mib(b.target_pages)),
                    balloon_max_mib: alloc.as_ref().and_then(|a| a.balloon_max_mib),
                    swapped_mib: swap.as_ref().map(|s| pages_mib(s.slots_used)),
                    swap_target_mib: swap.as_ref().and(plan).map(|p| pages_mib(p.swap_pages)),
                    swap_read_mib: swap.as_ref().map(|s| pages_mib(s.pages_in + s.prefetched)),
                    swap_written_mib: swap.as_ref().map(|s| pages_mib(s.pages_out)),
                    shared_mib: sharing.map(|s| pages_mib(s.pool_mapped_pages)),
                    zero_mib: sharing.map(|s| pages_mib(s.zero_pages)),
                    saved_mib: sharing.map(|s| mib(s.bytes_saved as u64)),
                    guest_allocated_mib: pages_mib(progress.allocated_pages),
                    heartbeat: progress.heartbeat,
                    working_set_mib,
                    work,
                }
            })
            .collect();
        HostSample { policy, guest_mib: mib(guest_bytes), sharing, vms }
    }
}
