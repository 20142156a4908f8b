//! The scanner thread and the calls the VMM makes.
//!
//! One thread per process scans all registered RAM, paced by a token bucket (ticks
//! of 10 ms; with no rate limit it scans in bursts of 8 chunks). For each chunk it
//! reads the pagemap and asks the VMM which pages to skip without any lock, plans
//! under the state lock, and commits a batch of merges when it is full, 100 ms old,
//! or the pass ends: pause the VMs involved, apply under the lock (re-checking all
//! that may have changed since the plan), tell the VMM of the new mappings, resume. The VMM's own calls (`add_region`, `reset_range`, `stats`, ...)
//! take the same lock; the scanner yields it to them between chunks.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::batch::Batch;
use crate::config::Config;
use crate::pagemap::{Backing, PageInfo, PageMap};
use crate::pass::{Chunk, Pass, Rng, CHUNK_PAGES};
use crate::state::State;
use crate::stats::{thread_cpu_ns, Stats};
use crate::{Error, Region, VmControl};

/// Scan period when a rate is set.
const TICK: Duration = Duration::from_millis(10);
/// Sleep when disabled or with nothing registered.
const IDLE: Duration = Duration::from_millis(100);
/// Chunks per burst when the rate is unlimited.
const BURST_CHUNKS: usize = 8;
/// A batch that is not full is committed after this long: fewer, larger pauses at
/// low rates, and merges no more than this late.
const MAX_BATCH_AGE: Duration = Duration::from_millis(100);

/// Locks, ignoring poisoning: the state stays consistent between operations.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Control {
    config: Config,
    generation: u64,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    /// VMM threads waiting for `state`.
    waiting: AtomicUsize,
    ctl: Arc<dyn VmControl>,
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
}

/// Transparent page sharing for all the VMs of this process.
pub struct Scanner {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Scanner {
    /// Starts the scanner thread. Register memory with [`Scanner::add_region`].
    pub fn start(config: Config, ctl: Arc<dyn VmControl>) -> Result<Scanner, Error> {
        let state = State::new(&config)?;
        let pagemap = PageMap::open().map_err(|source| Error::Io { what: "opening /proc/self/pagemap", source })?;
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            waiting: AtomicUsize::new(0),
            ctl,
            control: Mutex::new(Control { config: config.clone(), generation: 0, stop: false }),
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

    /// Registers guest RAM: page-aligned anonymous private memory of `region.vm`,
    /// mapped at `region.host_addr`. Scanned from the next pass on.
    pub fn add_region(&self, region: Region) -> Result<(), Error> {
        self.shared.lock_state().add_region(&region)
    }

    /// Unregisters every region of `vm` and drops its references to the pool. Call it
    /// once the VM's vCPUs and device threads have stopped and before its memory is
    /// unmapped: pool pages no other VM maps are freed, which would change what the
    /// VM's (dead) mappings read.
    pub fn remove_vm(&self, vm: u32) {
        self.shared.lock_state().remove_vm(vm);
    }

    /// Makes `host_addr..host_addr+len` plain anonymous memory, not resident, reading
    /// zeros: `MADV_DONTNEED` semantics, also on pages the scanner shared (where a
    /// bare `MADV_DONTNEED` would bring the pool's content back instead of zeros).
    /// The balloon frees guest pages with this. Calls [`VmControl::remapped`] for each
    /// new mapping. Does not pause the VM: the caller knows nobody uses the range.
    pub fn reset_range(&self, host_addr: usize, len: usize) -> Result<(), Error> {
        let mut remapped = Vec::new();
        let result = self.shared.lock_state().reset_range(host_addr, len, &mut remapped);
        for (vm, addr, len) in remapped {
            self.shared.ctl.remapped(vm, addr, len);
        }
        result
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
    pagemap: PageMap,
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
        for i in 0..n {
            self.skip[i] =
                self.infos[i].backing() == Backing::Anon && self.shared.ctl.skip_page(chunk.region.vm, chunk.gpa(i));
        }
        let (infos, skip) = (&mut self.infos[..n], &self.skip[..n]);
        lock(&self.shared.state).plan_chunk(chunk, infos, skip, &mut self.seen_resets, &mut self.batch);
        if self.batch_since.is_none() && !self.batch.is_empty() {
            self.batch_since = Some(Instant::now());
        }
    }

    /// Pauses the VMs of the batch, applies it, tells the VMM of the new mappings,
    /// resumes the VMs.
    fn commit(&mut self) {
        self.batch_since = None;
        if self.batch.is_empty() {
            return;
        }
        let ctl = self.shared.ctl.clone();
        let vms: BTreeSet<u32> = self.batch.ops.iter().map(|op| op.vm).collect();
        let t0 = Instant::now();
        let mut guards = Vec::with_capacity(vms.len());
        let mut gone = Vec::new();
        for vm in vms {
            match ctl.pause(vm) {
                Some(g) => guards.push(g),
                None => gone.push(vm),
            }
        }
        // Paused, the VMM's device threads are parked: what is skipped holds still.
        let before = self.batch.ops.len();
        self.batch.ops.retain(|op| !gone.contains(&op.vm) && !ctl.skip_page(op.vm, op.gpa));
        let dropped = (before - self.batch.ops.len()) as u64;
        let remapped = {
            let mut st = lock(&self.shared.state);
            st.stats.race_aborts += dropped;
            st.apply(&mut self.batch)
        };
        for (vm, addr, len) in remapped {
            ctl.remapped(vm, addr, len);
        }
        drop(guards);
        self.shared.paused_ns.fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
        self.batch.clear();
    }
}
