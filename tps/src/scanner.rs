//! The scanner thread and the calls the VMM makes.
//!
//! One thread per process scans all registered RAM, paced by a token bucket (ticks
//! of 10 ms; with no rate limit it scans in bursts of 8 chunks). For each chunk it
//! reads the pagemap and asks the VM which pages are off limits without any lock,
//! plans under the state lock, and commits a batch of merges when it is full, 100 ms
//! old, or the pass ends: pause the VMs involved, apply under the lock (re-checking
//! all that may have changed since the plan), announce the new mappings on each VM's
//! `RamChanges`, resume. The VMM's own calls (`add_vm`, discards through
//! `RamChanges`, `stats`, ...) take the same lock; the scanner yields it to them
//! between chunks.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use pagestate::pagemap::{Backing, PageInfo, Pagemap};
use pagestate::{GuestVm, ReclaimGuard, SharingHooks};

use crate::batch::Batch;
use crate::config::Config;
use crate::pass::{Chunk, Pass, Rng, CHUNK_PAGES};
use crate::state::{Remapped, State};
use crate::stats::{thread_cpu_ns, Stats, VmSharing};
use crate::{Error, Region, VmId};

/// Scan period when a rate is set.
const TICK: Duration = Duration::from_millis(10);
/// Sleep when disabled or with nothing registered.
const IDLE: Duration = Duration::from_millis(100);
/// Chunks per burst when the rate is unlimited.
const BURST_CHUNKS: usize = 8;
/// A batch that is not full is committed after this long: fewer, larger pauses at
/// low rates, and merges no more than this late.
const MAX_BATCH_AGE: Duration = Duration::from_millis(100);

/// How long a merge batch waits for a VM to pause before leaving its pages alone.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Locks, ignoring poisoning: the state stays consistent between operations.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Control {
    config: Config,
    generation: u64,
    /// The generation the thread runs by: its merges from older ones are applied.
    applied: u64,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    /// VMM threads waiting for `state`.
    waiting: AtomicUsize,
    /// The VMs, by [`VmId`]; None once removed.
    vms: RwLock<Vec<Option<Arc<dyn GuestVm>>>>,
    control: Mutex<Control>,
    wake: Condvar,
    passes: Mutex<u64>,
    pass_done: Condvar,
    paused_ns: AtomicU64,
    cpu_ns: AtomicU64,
    started: Instant,
}

impl Shared {
    /// The state lock for a VMM thread; the scanner lets it in between chunks.
    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.waiting.fetch_add(1, Relaxed);
        let g = lock(&self.state);
        self.waiting.fetch_sub(1, Relaxed);
        g
    }

    fn uptime_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// VM `id`, unless removed.
    fn vm(&self, id: VmId) -> Option<Arc<dyn GuestVm>> {
        self.vms.read().unwrap_or_else(|e| e.into_inner()).get(id as usize).cloned().flatten()
    }

    /// Announces new mappings on their VMs' `RamChanges` (the swapper covers them).
    fn announce(&self, remapped: Vec<Remapped>) {
        for (id, addr, len) in remapped {
            if let Some(vm) = self.vm(id) {
                if let Err(e) = vm.changes().remapped(addr, len) {
                    log::warn!("tps: {}: a new mapping at {addr:#x}+{len:#x} could not be covered: {e}", vm.name());
                }
            }
        }
    }
}

/// Discards of guest RAM reach page sharing here (see [`pagestate::changes`]).
impl SharingHooks for Shared {
    fn discard(&self, host_addr: usize, len: usize) -> std::io::Result<()> {
        let mut remapped = Vec::new();
        let result = self.lock_state().reset_range(host_addr, len, &mut remapped);
        self.announce(remapped);
        result.map_err(std::io::Error::other)
    }
}

/// Transparent page sharing for all the VMs of this process.
pub struct Scanner {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Scanner {
    /// Starts the scanner thread. Give it VMs with [`Scanner::add_vm`].
    pub fn start(config: Config) -> Result<Scanner, Error> {
        let state = State::new(&config)?;
        let pagemap = Pagemap::open().map_err(|source| Error::Io { what: "opening /proc/self/pagemap", source })?;
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            waiting: AtomicUsize::new(0),
            vms: RwLock::new(Vec::new()),
            control: Mutex::new(Control { config: config.clone(), generation: 0, applied: 0, stop: false }),
            wake: Condvar::new(),
            passes: Mutex::new(0),
            pass_done: Condvar::new(),
            paused_ns: AtomicU64::new(0),
            cpu_ns: AtomicU64::new(0),
            started: Instant::now(),
        });
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let seed = now.as_nanos() as u64 ^ ((std::process::id() as u64) << 32);
        let worker = Worker {
            shared: shared.clone(),
            pagemap,
            batch: Batch::default(),
            batch_since: None,
            pass: None,
            rng: Rng::new(seed),
            infos: vec![PageInfo::default(); CHUNK_PAGES],
            skip: vec![false; CHUNK_PAGES],
            seen_resets: 0,
            tokens: 0.0,
            last_tick: Instant::now(),
            generation: 0,
            config,
        };
        let thread = thread::Builder::new()
            .name("tps-scanner".into())
            .spawn(move || worker.run())
            .map_err(|source| Error::Io { what: "starting the scanner thread", source })?;
        Ok(Scanner { shared, thread: Mutex::new(Some(thread)) })
    }

    /// Covers `vm`'s guest RAM (its regions, page-aligned anonymous private memory)
    /// from the next pass on, and attaches to its `RamChanges` so that its discards
    /// come here. Returns its number in the scanner.
    pub fn add_vm(&self, vm: Arc<dyn GuestVm>) -> Result<VmId, Error> {
        let mut vms = self.shared.vms.write().unwrap_or_else(|e| e.into_inner());
        let id = vms.len() as VmId;
        let mut state = self.shared.lock_state();
        for r in vm.regions() {
            if let Err(e) = state.add_region(&Region { vm: id, gpa: r.gpa, host_addr: r.host_addr, len: r.len }) {
                state.remove_vm(id);
                return Err(e);
            }
        }
        drop(state);
        let hooks: Arc<dyn SharingHooks> = self.shared.clone();
        if let Err(source) = vm.changes().attach_sharing(Arc::downgrade(&hooks)) {
            self.shared.lock_state().remove_vm(id);
            return Err(Error::Attach { vm: vm.name().to_string(), source });
        }
        vms.push(Some(vm));
        Ok(id)
    }

    /// Unregisters every region of VM `id` and drops its references to the pool. Call
    /// it once the VM's vCPUs and device threads have stopped and before its memory is
    /// unmapped: pool pages no other VM maps are freed, which would change what the
    /// VM's (dead) mappings read. Later calls do nothing.
    pub fn remove_vm(&self, id: VmId) {
        let mut vms = self.shared.vms.write().unwrap_or_else(|e| e.into_inner());
        if vms.get_mut(id as usize).and_then(Option::take).is_some() {
            self.shared.lock_state().remove_vm(id);
        }
    }

    /// Page sharing's figures for VM `id` now (zeros for a VM not registered).
    pub fn vm_sharing(&self, id: VmId) -> VmSharing {
        self.shared.lock_state().vm_sharing(id)
    }

    /// The counters now.
    pub fn stats(&self) -> Stats {
        let mut s = self.shared.lock_state().snapshot();
        s.uptime_ms = self.shared.uptime_ms();
        s.enabled = lock(&self.shared.control).config.enabled;
        s.paused_us = self.shared.paused_ns.load(Relaxed) / 1000;
        s.cpu_ns = self.shared.cpu_ns.load(Relaxed);
        s
    }

    pub fn config(&self) -> Config {
        lock(&self.shared.control).config.clone()
    }

    /// Changes the configuration. What shapes merges (`cross_vm`, `run_replicas`,
    /// the VMA limit) holds for every page planned after this returns; the thread
    /// picks up the rest (rate, batch size, on/off) at once.
    pub fn set_config(&self, config: Config) {
        let mut c = lock(&self.shared.control);
        // Under the state lock, which planning holds: no chunk planned from now on
        // sees the old values (the thread may be half way through a burst).
        self.shared.lock_state().configure(&config);
        c.config = config;
        c.generation += 1;
        self.shared.wake.notify_all();
    }

    /// Waits until the thread runs by the configuration last set: once it does, a
    /// scanner turned off merges nothing more (what it had planned has landed).
    /// False on timeout (the thread is stopped, or stuck in a pause).
    pub fn wait_config_applied(&self, timeout: Duration) -> bool {
        let c = lock(&self.shared.control);
        let (c, _) = self
            .shared
            .wake
            .wait_timeout_while(c, timeout, |c| c.applied != c.generation && !c.stop)
            .unwrap_or_else(|e| e.into_inner());
        c.applied == c.generation
    }

    /// Waits until `passes` full passes have completed since the start (all merges
    /// of a pass are applied when it counts). False on timeout.
    pub fn wait_passes(&self, passes: u64, timeout: Duration) -> bool {
        let done = lock(&self.shared.passes);
        let (done, _) =
            self.shared.pass_done.wait_timeout_while(done, timeout, |d| *d < passes).unwrap_or_else(|e| e.into_inner());
        *done >= passes
    }

    /// Stops the thread. Shares stay; `reset_range`, `remove_vm` and `stats` keep
    /// working.
    pub fn stop(&self) {
        lock(&self.shared.control).stop = true;
        self.shared.wake.notify_all();
        if let Some(t) = lock(&self.thread).take() {
            if t.join().is_err() {
                log::error!("tps: the scanner thread panicked");
            }
        }
    }
}

impl Drop for Scanner {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Worker {
    shared: Arc<Shared>,
    pagemap: Pagemap,
    batch: Batch,
    /// When the batch got its first op.
    batch_since: Option<Instant>,
    pass: Option<(Pass, Instant)>,
    rng: Rng,
    infos: Vec<PageInfo>,
    skip: Vec<bool>,
    /// `State::resets` as of the last `plan_chunk`.
    seen_resets: u64,
    tokens: f64,
    last_tick: Instant,
    generation: u64,
    config: Config,
}

impl Worker {
    fn run(mut self) {
        loop {
            let changed = {
                let c = lock(&self.shared.control);
                if c.stop {
                    break;
                }
                let changed = (c.generation != self.generation).then(|| c.config.clone());
                self.generation = c.generation;
                changed
            };
            if let Some(config) = changed {
                self.config = config;
                if !self.config.enabled {
                    // Turned off: the merges planned so far land now, none later.
                    self.commit();
                }
                lock(&self.shared.control).applied = self.generation;
                self.shared.wake.notify_all();
            }
            if !self.config.enabled || !self.ensure_pass() {
                self.commit();
                self.sleep(IDLE);
                self.tokens = 0.0;
                self.last_tick = Instant::now();
                continue;
            }
            let rate = self.config.rate(self.pass.as_ref().map_or(0, |(p, _)| p.total_pages()));
            let now = Instant::now();
            let dt = now.duration_since(self.last_tick).as_secs_f64();
            self.last_tick = now;
            let mut budget = match rate {
                None => (BURST_CHUNKS * CHUNK_PAGES) as f64,
                Some(r) => {
                    // Accrue, but no burst beyond 100 ms worth after a slow tick.
                    self.tokens = (self.tokens + r * dt).min(r * 0.1 + CHUNK_PAGES as f64);
                    self.tokens
                }
            };
            while budget > 0.0 {
                let Some(chunk) = self.pass.as_mut().and_then(|(p, _)| p.next_chunk()) else {
                    break;
                };
                self.scan_chunk(&chunk);
                budget -= chunk.pages as f64;
                if rate.is_some() {
                    self.tokens -= chunk.pages as f64;
                }
                if self.batch.ops.len() >= self.config.max_batch.max(1) {
                    self.commit();
                }
                if self.pass.as_ref().is_some_and(|(p, _)| p.done()) {
                    self.commit();
                    self.end_pass();
                    break;
                }
                while self.shared.waiting.load(Relaxed) > 0 {
                    thread::yield_now();
                }
            }
            if self.batch_since.is_some_and(|t| t.elapsed() >= MAX_BATCH_AGE) {
                self.commit();
            }
            self.shared.cpu_ns.store(thread_cpu_ns(), Relaxed);
            if rate.is_some() {
                self.sleep(TICK);
            }
        }
        // Leave nothing half done (new pool pages of a planned batch).
        self.commit();
    }

    /// Makes sure a pass is under way; false when there is nothing to scan.
    fn ensure_pass(&mut self) -> bool {
        if self.pass.as_ref().is_none_or(|(p, _)| p.done()) {
            let regions = lock(&self.shared.state).pass_regions();
            self.pass = Some((Pass::new(regions, &mut self.rng), Instant::now()));
        }
        self.pass.as_ref().is_some_and(|(p, _)| !p.done())
    }

    fn end_pass(&mut self) {
        let started = self.pass.as_ref().map_or_else(Instant::now, |(_, s)| *s);
        lock(&self.shared.state).end_pass(started, self.shared.uptime_ms());
        *lock(&self.shared.passes) += 1;
        self.shared.pass_done.notify_all();
    }

    /// Sleeps `d`, or less if the configuration changes or the scanner stops.
    fn sleep(&self, d: Duration) {
        let c = lock(&self.shared.control);
        if !c.stop && c.generation == self.generation {
            drop(self.shared.wake.wait_timeout(c, d));
        }
    }

    fn scan_chunk(&mut self, chunk: &Chunk) {
        let n = chunk.pages;
        if let Err(e) = self.pagemap.read(chunk.addr(0), &mut self.infos[..n]) {
            log::warn!("tps: reading /proc/self/pagemap: {e}");
            lock(&self.shared.state).stats.errors += 1;
            return;
        }
        // Only resident private pages can be merged: ask about those only.
        let Some(vm) = self.shared.vm(chunk.region.vm) else { return };
        for i in 0..n {
            self.skip[i] = self.infos[i].backing() == Backing::Anon && vm.off_limits(chunk.gpa(i));
        }
        let (infos, skip) = (&mut self.infos[..n], &self.skip[..n]);
        lock(&self.shared.state).plan_chunk(chunk, infos, skip, &mut self.seen_resets, &mut self.batch);
        if self.batch_since.is_none() && !self.batch.is_empty() {
            self.batch_since = Some(Instant::now());
        }
    }

    /// Pauses the VMs of the batch (in VM order, so that two reclaimers taking several
    /// VMs cannot deadlock), applies it, announces the new mappings, resumes the VMs.
    fn commit(&mut self) {
        self.batch_since = None;
        if self.batch.is_empty() {
            return;
        }
        let ids: BTreeSet<VmId> = self.batch.ops.iter().map(|op| op.vm).collect();
        let t0 = Instant::now();
        let mut paused: Vec<(VmId, Arc<dyn GuestVm>, ReclaimGuard)> = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(vm) = self.shared.vm(id) else { continue };
            match vm.run().reclaim_guard(PAUSE_TIMEOUT) {
                Ok(guard) => paused.push((id, vm, guard)),
                Err(e) => log::debug!("tps: {}: merges left for later: {e}", vm.name()),
            }
        }
        // Paused, the VMM's device threads are parked: what is off limits holds still.
        let before = self.batch.ops.len();
        self.batch
            .ops
            .retain(|op| paused.iter().find(|(id, ..)| *id == op.vm).is_some_and(|(_, vm, _)| !vm.off_limits(op.gpa)));
        let dropped = (before - self.batch.ops.len()) as u64;
        let remapped = {
            let mut st = lock(&self.shared.state);
            st.stats.race_aborts += dropped;
            st.apply(&mut self.batch)
        };
        self.shared.announce(remapped);
        drop(paused);
        self.shared.paused_ns.fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
        self.batch.clear();
    }
}
