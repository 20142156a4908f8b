//! The active memory sampler: one thread per process that estimates, for each VM of
//! every [`Host`](crate::host::Host) in it, the fraction of its memory the guest reads
//! or writes, as ESX does (random pages watched per period; `docs/policy.md` gives
//! the method, its cost and the figures).
//!
//! One thread for the whole process, not one per host, because `clear_refs` clears
//! the referenced bits of the whole process: two samplers would erase each other's
//! evidence (two hosts in one process, as the tests run them, saw their estimates
//! halved). [`ActiveSampler::start`] hands its VMs to that thread, started on first
//! use; dropping the [`ActiveSampler`] takes them back, and the thread ends when it
//! has none left.
//!
//! Each VM has its own periods, counted in the time it runs (not while paused or
//! stopping). At the start of a period the thread picks `n` random guest pages, and
//! for those resident makes KVM forget its mapping ([`pagestate::accessed`]), with
//! the VM held by a [`ReclaimGuard`](pagestate::ReclaimGuard): vCPUs out of the
//! guest, and no other reclaimer halfway through a page. A page is touched if the
//! guest accessed it since: a resident page was marked referenced by KVM's
//! re-fault, a page that was not resident (never touched, ballooned, swapped) has
//! become resident. At the end `f = t / n_valid` feeds the VM's
//! [`ActiveEstimate`].
//!
//! Invariants:
//! - **Off-limits pages and shared pages are never sampled**: the first are the
//!   VMM's own or given away ([`GuestVm::off_limits`]); the flags of the second
//!   (the zero page, page sharing's pool) are every mapper's. A sampled page that
//!   becomes shared or is evicted during its period is left out of `n_valid`.
//! - **Every watched page's evidence is read before each `clear_refs`**, which is
//!   process-wide: a VM's period start would otherwise erase another VM's touches.
//!   Evidence is sticky within a period. Only the one thread calls `clear_refs`,
//!   with the registry of every watched VM locked.
//! - Once [`ActiveSampler`]'s drop returns, the thread holds nothing of its VMs.
//! - At most one extra guest fault per watched resident page and period: the
//!   figures report them (`faults_per_period`, at most `n`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pagestate::accessed::{self, KPageFlags};
use pagestate::pagemap::{Backing, Pagemap};
use pagestate::{GuestVm, Mode, PAGE_SIZE};
use policy::ActiveEstimate;
use serde::{Deserialize, Serialize};

/// How long the sampler waits for a VM to pause at a period start before trying
/// again a quarter period later.
const PAUSE_TIMEOUT: Duration = Duration::from_millis(500);

/// Options of the sampler (`--active-period`, `--active-samples`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActiveOptions {
    /// Length of a period, in the VM's run time (ESX: 30 s, later 60 s).
    pub period: Duration,
    /// Pages watched per period (`n`; ESX: 100).
    pub samples: usize,
}

impl Default for ActiveOptions {
    fn default() -> Self {
        ActiveOptions { period: Duration::from_secs(30), samples: 100 }
    }
}

/// What the sampler says of one VM (the control API, the exit summary, the policy).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ActiveStats {
    /// The three averages and the periods ended.
    pub estimate: ActiveEstimate,
    /// The active estimate, MiB (the maximum of the averages times the VM's memory);
    /// None before the first period ends.
    pub active_mib: Option<f64>,
    /// Pages watched per period.
    pub samples: u64,
    /// Of the last period: touched samples, and valid ones (watched to the end).
    pub last_touched: u64,
    /// See `last_touched`.
    pub last_valid: u64,
    /// Sampler CPU time per period, microseconds (mean): picking pages, dropping
    /// KVM's mappings, `clear_refs`, reading the flags.
    pub cpu_us_per_period: f64,
    /// Guest faults the sampling caused per period (mean): touched samples that
    /// were resident, each re-faulted once into KVM. At most `samples`.
    pub faults_per_period: f64,
    /// Time the VM was held paused per period start, microseconds (mean).
    pub pause_us_per_period: f64,
    /// Why sampling stopped, if it did (no `CAP_SYS_ADMIN`, ...).
    pub error: Option<String>,
}

/// One watched page.
struct Sample {
    host_addr: usize,
    /// Resident (privately) when the period began.
    was_present: bool,
    touched: bool,
}

/// A VM under the sampler.
struct Watched {
    /// The [`ActiveSampler`] that handed it over.
    owner: u64,
    opts: ActiveOptions,
    last_look: Instant,
    vm: Arc<dyn GuestVm>,
    stats: Arc<Mutex<ActiveStats>>,
    /// Run time in the current period.
    ran: Duration,
    /// The current period's samples; None before the first period starts.
    samples: Option<Vec<Sample>>,
    /// When to try again to start a period, after the VM did not pause in time.
    retry_at: Option<Instant>,
    size_pages: u64,
    cpu: Duration,
    faults: u64,
    paused: Duration,
}

/// The VMs this process samples, of every host, and whether the thread runs.
struct Registry {
    vms: Vec<Watched>,
    next_owner: u64,
    running: bool,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { vms: Vec::new(), next_owner: 0, running: false });

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// A host's VMs under the process's sampler; dropping it takes them back.
pub struct ActiveSampler {
    owner: u64,
    stats: Vec<Arc<Mutex<ActiveStats>>>,
}

impl ActiveSampler {
    /// Has the process's sampling thread (started if need be) sample `vms`, each
    /// with `opts`.
    pub fn start(vms: Vec<Arc<dyn GuestVm>>, opts: ActiveOptions) -> std::io::Result<ActiveSampler> {
        let stats: Vec<_> = vms
            .iter()
            .map(|_| Arc::new(Mutex::new(ActiveStats { samples: opts.samples as u64, ..ActiveStats::default() })))
            .collect();
        let mut reg = registry();
        let owner = reg.next_owner;
        reg.next_owner += 1;
        let now = Instant::now();
        for (vm, stats) in vms.into_iter().zip(&stats) {
            let size_pages = vm.regions().iter().map(|r| (r.len / PAGE_SIZE) as u64).sum();
            reg.vms.push(Watched {
                owner,
                opts,
                last_look: now,
                vm,
                stats: stats.clone(),
                ran: Duration::ZERO,
                samples: None,
                retry_at: None,
                size_pages,
                cpu: Duration::ZERO,
                faults: 0,
                paused: Duration::ZERO,
            });
        }
        if !reg.running {
            if let Err(e) = std::thread::Builder::new().name("active".into()).spawn(sample_all) {
                reg.vms.retain(|w| w.owner != owner);
                return Err(e);
            }
            reg.running = true;
        }
        Ok(ActiveSampler { owner, stats })
    }

    /// The figures of VM `index` (in the order given to [`ActiveSampler::start`]).
    pub fn stats(&self, index: usize) -> Option<Arc<Mutex<ActiveStats>>> {
        self.stats.get(index).cloned()
    }
}

impl Drop for ActiveSampler {
    fn drop(&mut self) {
        registry().vms.retain(|w| w.owner != self.owner);
    }
}

/// The sampling thread: runs while any VM is watched.
fn sample_all() {
    let mut s = Sampler { rng: seed() };
    // A panic must not leave VMs registered with nobody sampling them.
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.run()))
        .unwrap_or_else(|_| Err("the sampling thread panicked".into()));
    if let Err(e) = ran {
        log::warn!("active memory sampling stopped: {e}");
        let mut reg = registry();
        for w in reg.vms.drain(..) {
            w.stats.lock().unwrap_or_else(|p| p.into_inner()).error = Some(e.clone());
        }
        reg.running = false;
    }
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (t.as_nanos() as u64) | 1
}

/// The CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

struct Sampler {
    rng: u64,
}

impl Sampler {
    /// Samples the registry's VMs until there are none; the registry is locked
    /// for each round's work, not while the thread sleeps.
    fn run(&mut self) -> Result<(), String> {
        let pagemap = Pagemap::open().map_err(|e| format!("/proc/self/pagemap: {e}"))?;
        if pagemap.zero_pfn() == 0 {
            return Err("needs CAP_SYS_ADMIN: page frame numbers are hidden in /proc/self/pagemap".into());
        }
        let flags = KPageFlags::open().map_err(|e| format!("/proc/kpageflags: {e}"))?;
        let mut last = Instant::now();
        let mut tick = Duration::from_millis(1);
        loop {
            std::thread::sleep(tick);
            let mut reg = registry();
            if reg.vms.is_empty() {
                reg.running = false;
                return Ok(());
            }
            let vms = &mut reg.vms;
            tick = vms
                .iter()
                .map(|w| (w.opts.period / 8).clamp(Duration::from_millis(1), Duration::from_millis(50)))
                .min()
                .unwrap_or(Duration::from_millis(50));
            let now = Instant::now();
            let dt = now - last;
            last = now;
            for w in vms.iter_mut() {
                if w.vm.run().mode() == Mode::Running {
                    w.ran += dt;
                }
            }
            let due: Vec<usize> = (0..vms.len())
                .filter(|&i| {
                    let w = &vms[i];
                    w.vm.run().mode() != Mode::Stopping
                        && (w.samples.is_none() || w.ran >= w.opts.period)
                        && w.retry_at.is_none_or(|t| now >= t)
                })
                .collect();
            let looks: Vec<usize> =
                (0..vms.len()).filter(|&i| now - vms[i].last_look >= vms[i].opts.period / 4).collect();
            if !due.is_empty() {
                self.new_periods(vms, &due, &pagemap, &flags)?;
            } else if !looks.is_empty() {
                for &i in &looks {
                    let w = &mut vms[i];
                    let cpu = thread_cpu();
                    look(w, &pagemap, &flags);
                    w.last_look = now;
                    w.cpu += thread_cpu() - cpu;
                    if let Some(samples) = &w.samples {
                        let (t, v) = count(samples, &pagemap);
                        w.stats.lock().unwrap_or_else(|p| p.into_inner()).estimate.observe(t, v);
                    }
                }
            }
        }
    }

    /// Ends the periods of the VMs `due` (those that had one) and starts new ones.
    fn new_periods(
        &mut self,
        vms: &mut [Watched],
        due: &[usize],
        pagemap: &Pagemap,
        flags: &KPageFlags,
    ) -> Result<(), String> {
        let cpu = thread_cpu();
        look_all(vms, pagemap, flags);
        for &i in due {
            end_period(&mut vms[i], pagemap);
        }
        accessed::clear_refs().map_err(|e| format!("/proc/self/clear_refs: {e}"))?;
        let shared = (thread_cpu() - cpu) / due.len() as u32;
        for &i in due {
            let cpu = thread_cpu();
            self.start_period(&mut vms[i], pagemap);
            vms[i].cpu += shared + (thread_cpu() - cpu);
        }
        Ok(())
    }

    /// Picks the new period's pages with the VM paused and no other reclaimer at
    /// work, and makes KVM forget the resident ones. A VM that does not pause in
    /// time is tried again a quarter period later (not at every tick, with the
    /// registry locked).
    fn start_period(&mut self, w: &mut Watched, pagemap: &Pagemap) {
        let n = w.opts.samples;
        let Ok(guard) = w.vm.run().reclaim_guard(PAUSE_TIMEOUT) else {
            w.retry_at = Some(Instant::now() + w.opts.period / 4);
            return;
        };
        w.retry_at = None;
        let held = Instant::now();
        let regions = w.vm.regions().to_vec();
        let mut chosen = HashSet::new();
        let mut samples = Vec::with_capacity(n);
        for _ in 0..4 * n {
            if samples.len() == n || w.size_pages == 0 {
                break;
            }
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let mut page = self.rng % w.size_pages;
            let Some(r) = regions.iter().find(|r| {
                let len = (r.len / PAGE_SIZE) as u64;
                let here = page < len;
                if !here {
                    page -= len;
                }
                here
            }) else {
                continue;
            };
            let (gpa, host_addr) = (r.gpa + page * PAGE_SIZE as u64, r.host_addr + page as usize * PAGE_SIZE);
            if w.vm.off_limits(gpa) || !chosen.insert(gpa) {
                continue;
            }
            let was_present = match pagemap.one(host_addr).map(|e| e.backing()) {
                Ok(Backing::Absent) => false,
                Ok(Backing::Anon) => {
                    if accessed::drop_kvm_mapping(host_addr).is_err() {
                        continue;
                    }
                    true
                }
                _ => continue,
            };
            samples.push(Sample { host_addr, was_present, touched: false });
        }
        drop(guard);
        w.paused += held.elapsed();
        w.samples = Some(samples);
        w.ran = Duration::ZERO;
    }
}

/// Reads every watched page's evidence (before any `clear_refs`).
fn look_all(vms: &mut [Watched], pagemap: &Pagemap, flags: &KPageFlags) {
    for w in vms {
        look(w, pagemap, flags);
    }
}

/// Reads the evidence of `w`'s watched pages not yet seen touched.
fn look(w: &mut Watched, pagemap: &Pagemap, flags: &KPageFlags) {
    for s in w.samples.iter_mut().flatten().filter(|s| !s.touched) {
        s.touched = touched(s, pagemap, flags);
    }
}

/// Ends `w`'s period, if it had one, into its estimate and figures.
fn end_period(w: &mut Watched, pagemap: &Pagemap) {
    let Some(samples) = w.samples.take() else { return };
    let (t, valid) = count(&samples, pagemap);
    w.faults += samples.iter().filter(|s| s.touched && s.was_present).count() as u64;
    let mut st = w.stats.lock().unwrap_or_else(|p| p.into_inner());
    st.estimate.end_period(t, valid);
    let periods = st.estimate.periods.max(1) as f64;
    (st.last_touched, st.last_valid) = (t, valid);
    st.active_mib = st.estimate.fraction().map(|f| f * (w.size_pages * PAGE_SIZE as u64) as f64 / (1 << 20) as f64);
    st.cpu_us_per_period = w.cpu.as_secs_f64() * 1e6 / periods;
    st.faults_per_period = w.faults as f64 / periods;
    st.pause_us_per_period = w.paused.as_secs_f64() * 1e6 / periods;
}

/// Whether the guest accessed the page of `s` since its period began.
fn touched(s: &Sample, pagemap: &Pagemap, flags: &KPageFlags) -> bool {
    let Ok(e) = pagemap.one(s.host_addr) else { return false };
    match (s.was_present, e.backing()) {
        (false, Backing::Absent) => false,
        (false, _) => true,
        (true, Backing::Anon) => flags.referenced(e.pfn()).unwrap_or(false),
        (true, _) => false,
    }
}

/// Touched and valid samples: a resident sample that became absent or shared is
/// not valid unless it was seen touched before.
fn count(samples: &[Sample], pagemap: &Pagemap) -> (u64, u64) {
    let valid = |s: &Sample| {
        s.touched || !s.was_present || pagemap.one(s.host_addr).map(|e| e.backing() == Backing::Anon).unwrap_or(false)
    };
    let t = samples.iter().filter(|s| s.touched).count() as u64;
    (t, samples.iter().filter(|s| valid(s)).count() as u64)
}
