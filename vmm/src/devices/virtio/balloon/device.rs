//! The balloon device model: features, configuration space, queue roles, target.
//!
//! Queues are numbered densely, as Linux and the project's guest driver do:
//! inflate (0), deflate (1), then statistics if STATS_VQ was negotiated, then free
//! page reporting if PAGE_REPORTING was; a queue whose feature is not negotiated does
//! not take a number.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::metrics::{stat_name, BalloonMetrics, BalloonSnapshot};
use super::pages::{merge_ranges, resident_pages, BalloonedPages};
use super::{config, features, queues, DEVICE_ID};
use crate::devices::virtio::{GuestErrors, Interrupt, VirtioDevice, INT_CONFIG, INT_VRING, VIRTIO_F_VERSION_1};
use crate::memory::GuestRam;

/// Largest queue the balloon accepts.
pub const QUEUE_SIZE: u16 = 256;

/// Boot-time balloon options (`--balloon size=..,deflate_on_oom=..,...`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Initial target size in bytes.
    pub size: u64,
    /// Offer DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Ask the guest for fresh statistics this often (zero: statistics off).
    pub stats_interval: Duration,
    /// Offer free page reporting.
    pub free_page_reporting: bool,
    /// Free inflated pages with one `madvise` per page instead of per merged range
    /// (the baseline of `vmm bench balloon`).
    pub per_page_discard: bool,
}

impl BalloonConfig {
    /// Checks the options against a VM of `mem` bytes.
    pub fn validate(&self, mem: u64) -> Result<(), String> {
        check_size(self.size, mem)
    }
}

/// A balloon size must be whole pages and fit the VM's `mem` bytes.
pub fn check_size(bytes: u64, mem: u64) -> Result<(), String> {
    if bytes % guest_abi::PAGE_SIZE != 0 {
        return Err(format!("balloon size {bytes} is not a multiple of 4 KiB"));
    }
    if bytes > mem {
        return Err(format!(
            "balloon size {} exceeds the VM's memory ({})",
            crate::config::format_size(bytes),
            crate::config::format_size(mem)
        ));
    }
    Ok(())
}

impl Default for BalloonConfig {
    fn default() -> Self {
        BalloonConfig {
            size: 0,
            deflate_on_oom: true,
            stats_interval: Duration::from_secs(1),
            free_page_reporting: true,
            per_page_discard: false,
        }
    }
}

/// Who moves a balloon's target. A target the user sets belongs to the user until
/// handed back: the free-memory policy must never undo it 100 ms later.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetMode {
    /// The free-memory policy may move it, when one runs: from boot (the boot
    /// `size` is where it starts), and again after [`Balloon::release_target`].
    #[default]
    Auto,
    /// Set by the user ([`Balloon::set_target`]): the policy leaves it alone.
    Pinned,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// The balloon.
pub struct Balloon {
    name: String,
    cfg: BalloonConfig,
    ram: Arc<GuestRam>,
    ballooned: Arc<BalloonedPages>,
    metrics: Arc<BalloonMetrics>,
    errors: Arc<GuestErrors>,
    interrupt: Arc<Interrupt>,
    config_generation: Arc<AtomicU32>,
    num_pages: u32,
    mode: TargetMode,
    actual: u32,
    poison: u32,
    acked: u64,
    queues: Vec<(Role, Queue)>,
    stats_head: Option<u16>,
    stats_asked: Instant,
    guest_stats: BTreeMap<String, u64>,
    guest_stats_at: Option<Instant>,
}

impl Balloon {
    /// A balloon for the VM whose RAM is `ram`.
    pub fn new(
        name: impl Into<String>,
        cfg: BalloonConfig,
        ram: Arc<GuestRam>,
        interrupt: Arc<Interrupt>,
        errors: Arc<GuestErrors>,
        config_generation: Arc<AtomicU32>,
    ) -> Self {
        let ballooned = Arc::new(BalloonedPages::new(ram.regions()));
        let num_pages = (cfg.size / guest_abi::PAGE_SIZE).min(u32::MAX as u64) as u32;
        Balloon {
            name: name.into(),
            cfg,
            ram,
            ballooned,
            metrics: Arc::new(BalloonMetrics::default()),
            errors,
            interrupt,
            config_generation,
            num_pages,
            mode: TargetMode::Auto,
            actual: 0,
            poison: 0,
            acked: 0,
            queues: Vec::new(),
            stats_head: None,
            stats_asked: Instant::now(),
            guest_stats: BTreeMap::new(),
            guest_stats_at: None,
        }
    }

    /// The set of ballooned pages (shared with the other reclaim mechanisms).
    pub fn ballooned(&self) -> &Arc<BalloonedPages> {
        &self.ballooned
    }

    /// The user's target, in bytes: the guest sees the new `num_pages` and
    /// inflates or deflates towards it, and the target is pinned (the free-memory
    /// policy leaves it alone) until [`Balloon::release_target`].
    pub fn set_target(&mut self, bytes: u64) -> Result<(), String> {
        check_size(bytes, self.ram.size())?;
        let pages = bytes / guest_abi::PAGE_SIZE;
        self.write_target(pages);
        self.mode = TargetMode::Pinned;
        log::info!("{}: balloon target {} ({} pages, pinned)", self.name, crate::config::format_size(bytes), pages);
        Ok(())
    }

    /// The free-memory policy's target, in pages (at most the VM's memory): set
    /// unless the user pinned the target. Returns whether it was set. Checking and
    /// setting under the device's lock means a user's target set between the
    /// policy's reading and its writing is never overwritten.
    pub fn set_auto_target(&mut self, pages: u64) -> bool {
        if self.mode == TargetMode::Pinned {
            return false;
        }
        let pages = pages.min(self.ram.size() / guest_abi::PAGE_SIZE);
        if pages != self.num_pages as u64 {
            self.write_target(pages);
            log::debug!("{}: balloon target {pages} pages (policy)", self.name);
        }
        true
    }

    /// Hands a pinned target back to the free-memory policy, which moves it from
    /// where it is at its next tick.
    pub fn release_target(&mut self) {
        if self.mode == TargetMode::Pinned {
            log::info!("{}: balloon target handed back to the policy", self.name);
        }
        self.mode = TargetMode::Auto;
    }

    /// Publishes a new target to the guest (a configuration change interrupt).
    fn write_target(&mut self, pages: u64) {
        self.num_pages = pages.min(u32::MAX as u64) as u32;
        self.config_generation.fetch_add(1, Ordering::AcqRel);
        self.interrupt.raise(INT_CONFIG);
    }

    /// Hands the statistics buffer back to the guest so it sends fresh numbers;
    /// false if the device holds no buffer (no statistics queue, or the guest has
    /// not answered the previous request yet).
    pub fn request_stats(&mut self) -> bool {
        let Some(head) = self.stats_head.take() else { return false };
        let mem = self.ram.mem().clone();
        self.stats_asked = Instant::now();
        let returned = self
            .queues
            .iter_mut()
            .find(|(r, _)| *r == Role::Stats)
            .is_some_and(|(_, q)| q.add_used(&mem, head, 0).is_ok());
        if returned {
            self.interrupt.raise(INT_VRING);
        }
        returned
    }

    /// Counters and state for reports.
    pub fn snapshot(&self) -> BalloonSnapshot {
        BalloonSnapshot {
            target_pages: self.num_pages as u64,
            target_mode: self.mode,
            actual_pages: self.actual as u64,
            ballooned_pages: self.ballooned.count(),
            guest_errors: self.errors.count() as u64,
            features: self.acked,
            guest_stats: self.guest_stats.clone(),
            guest_stats_age_ms: self.guest_stats_at.map(|t| t.elapsed().as_secs_f64() * 1e3),
            ..Default::default()
        }
        .with_metrics(&self.metrics)
    }

    fn report(&self, kind: &'static str, detail: impl FnOnce() -> String) {
        self.errors.report(&self.name, kind, detail);
    }

    /// Frees the host memory of `[gpa, gpa + len)`, timing and counting it.
    fn discard(&self, gpa: u64, len: u64) {
        let t = Instant::now();
        BalloonMetrics::add(&self.metrics.discard_calls, 1);
        if let Err(e) = self.ram.discard(gpa, len) {
            BalloonMetrics::add(&self.metrics.discard_errors, 1);
            log::error!("{}: freeing {len:#x} bytes at {gpa:#x}: {e}", self.name);
        }
        BalloonMetrics::add(&self.metrics.discard_ns, t.elapsed().as_nanos() as u64);
    }

    /// Pops every available chain of queue `index`, passing each to `f`, then
    /// completes them all. Returns the number completed.
    fn drain(&mut self, index: usize, mut f: impl FnMut(&mut Self, Result<Vec<u64>, queues::ChainError>)) -> usize {
        let mem = self.ram.mem().clone();
        let mut heads = Vec::new();
        let mut parsed = Vec::new();
        {
            let q = &mut self.queues[index].1;
            while let Some(chain) = q.pop_descriptor_chain(&mem) {
                heads.push(chain.head_index());
                parsed.push(queues::pfns(chain));
            }
        }
        for p in parsed {
            f(self, p);
        }
        self.complete(index, &heads, &mem)
    }

    fn complete(&mut self, index: usize, heads: &[u16], mem: &GuestMemoryMmap) -> usize {
        let q = &mut self.queues[index].1;
        let done = heads.iter().filter(|&&h| q.add_used(mem, h, 0).is_ok()).count();
        if done > 0 {
            self.interrupt.raise(INT_VRING);
        }
        done
    }

    fn inflate(&mut self, index: usize) {
        let mut fresh = Vec::new();
        self.drain(index, |b, pfns| match pfns {
            Err(e) => b.report(e.kind(), || format!("inflate buffer: {e}")),
            Ok(pfns) => {
                for pfn in pfns {
                    if !b.ballooned.is_ram(pfn) {
                        BalloonMetrics::add(&b.metrics.invalid_pfns, 1);
                        b.report("pfn outside RAM", || format!("inflate of PFN {pfn:#x}, not guest RAM: ignored"));
                    } else if b.ballooned.insert(pfn) {
                        fresh.push(pfn);
                    } else {
                        BalloonMetrics::add(&b.metrics.duplicate_pfns, 1);
                    }
                }
            }
        });
        BalloonMetrics::add(&self.metrics.inflated_pages, fresh.len() as u64);
        for r in merge_ranges(&mut fresh) {
            if self.cfg.per_page_discard {
                for pfn in r.first_pfn..r.first_pfn + r.count {
                    self.discard(pfn * guest_abi::PAGE_SIZE, guest_abi::PAGE_SIZE);
                }
            } else {
                self.discard(r.first_pfn * guest_abi::PAGE_SIZE, r.count * guest_abi::PAGE_SIZE);
            }
        }
    }

    fn deflate(&mut self, index: usize) {
        self.drain(index, |b, pfns| match pfns {
            Err(e) => b.report(e.kind(), || format!("deflate buffer: {e}")),
            Ok(pfns) => {
                let mut left = Vec::with_capacity(pfns.len());
                for pfn in pfns {
                    if b.ballooned.remove(pfn) {
                        left.push(pfn);
                    } else if b.ballooned.is_ram(pfn) {
                        BalloonMetrics::add(&b.metrics.duplicate_pfns, 1);
                    } else {
                        BalloonMetrics::add(&b.metrics.invalid_pfns, 1);
                        b.report("pfn outside RAM", || format!("deflate of PFN {pfn:#x}, not guest RAM: ignored"));
                    }
                }
                BalloonMetrics::add(&b.metrics.deflated_pages, left.len() as u64);
                // Before the buffer completes, the guest must not touch these pages:
                // any host memory behind them now means it used them while ballooned.
                for r in merge_ranges(&mut left) {
                    let (gpa, len) = (r.first_pfn * guest_abi::PAGE_SIZE, r.count * guest_abi::PAGE_SIZE);
                    match b.ram.mem().get_host_address(GuestAddress(gpa)).map_err(std::io::Error::other) {
                        Ok(host) => match resident_pages(host, len) {
                            Ok(n) => BalloonMetrics::add(&b.metrics.touched_pages, n),
                            Err(e) => log::warn!("{}: mincore of deflated pages: {e}", b.name),
                        },
                        Err(e) => log::warn!("{}: deflated range {gpa:#x}: {e}", b.name),
                    }
                }
            }
        });
    }

    fn stats(&mut self, index: usize) {
        let mem = self.ram.mem().clone();
        while let Some(chain) = self.queues[index].1.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            match queues::stats(chain) {
                Ok(entries) => {
                    for (tag, val) in entries {
                        if let Some(name) = stat_name(tag) {
                            self.guest_stats.insert(name.to_string(), val);
                        }
                    }
                    self.guest_stats_at = Some(Instant::now());
                    BalloonMetrics::add(&self.metrics.stats_updates, 1);
                }
                Err(e) => self.report(e.kind(), || format!("stats buffer: {e}")),
            }
            // Keep the newest buffer to ask for the next update; give back older ones.
            if let Some(old) = self.stats_head.replace(head) {
                self.complete(index, &[old], &mem);
            }
        }
    }

    fn reporting(&mut self, index: usize) {
        let mem = self.ram.mem().clone();
        let mut heads = Vec::new();
        let mut ranges = Vec::new();
        while let Some(chain) = self.queues[index].1.pop_descriptor_chain(&mem) {
            heads.push(chain.head_index());
            match queues::reported_ranges(chain) {
                Ok(r) => ranges.extend(r),
                Err(e) => self.report(e.kind(), || format!("free page report: {e}")),
            }
        }
        BalloonMetrics::add(&self.metrics.reported_buffers, heads.len() as u64);
        for (gpa, len) in ranges {
            // `contains` checks the end without overflowing: `gpa` is any u64 the guest wrote.
            if !self.ram.contains(gpa, len) {
                self.report("report outside RAM", || {
                    format!("reported range {gpa:#x}+{len:#x} is not guest RAM: ignored")
                });
                continue;
            }
            BalloonMetrics::add(&self.metrics.reported_pages, len / guest_abi::PAGE_SIZE);
            self.discard(gpa, len);
        }
        self.complete(index, &heads, &mem);
    }
}

impl VirtioDevice for Balloon {
    fn device_id(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1 | 1 << features::MUST_TELL_HOST;
        if !self.cfg.stats_interval.is_zero() {
            f |= 1 << features::STATS_VQ;
        }
        if self.cfg.deflate_on_oom {
            f |= 1 << features::DEFLATE_ON_OOM;
        }
        if self.cfg.free_page_reporting {
            f |= 1 << features::PAGE_REPORTING;
        }
        f
    }

    fn queue_count(&self, features: u64) -> usize {
        2 + (features >> features::STATS_VQ & 1) as usize + (features >> features::PAGE_REPORTING & 1) as usize
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut space = [0u8; config::SIZE as usize];
        space[0..4].copy_from_slice(&self.num_pages.to_le_bytes());
        space[4..8].copy_from_slice(&self.actual.to_le_bytes());
        space[12..16].copy_from_slice(&self.poison.to_le_bytes());
        match space.get(offset as usize..offset as usize + data.len()) {
            Some(src) => data.copy_from_slice(src),
            None => {
                data.fill(0);
                self.report("config", || format!("config read at {offset:#x}+{}", data.len()));
            }
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (config::ACTUAL, 4) => self.actual = u32::from_le_bytes(data.try_into().unwrap()),
            (config::POISON_VAL, 4) => self.poison = u32::from_le_bytes(data.try_into().unwrap()),
            _ => self.report("config", || format!("config write at {offset:#x}+{} ignored", data.len())),
        }
    }

    fn activate(&mut self, acked: u64, queues: Vec<Queue>) -> Result<(), String> {
        let mut roles = vec![Role::Inflate, Role::Deflate];
        if acked & 1 << features::STATS_VQ != 0 {
            roles.push(Role::Stats);
        }
        if acked & 1 << features::PAGE_REPORTING != 0 {
            roles.push(Role::Reporting);
        }
        if queues.len() != roles.len() {
            return Err(format!("{} queues for {} roles", queues.len(), roles.len()));
        }
        if !queues[0].ready() || !queues[1].ready() {
            return Err("the inflate and deflate queues must be set up".into());
        }
        self.acked = acked;
        self.queues = roles.into_iter().zip(queues).collect();
        self.stats_asked = Instant::now();
        log::info!("{}: balloon driver ready (features {acked:#x})", self.name);
        Ok(())
    }

    fn reset(&mut self) {
        // Ballooned pages stay ballooned: their host memory is gone either way, and
        // the guest's driver re-learns the balloon size from `actual`.
        self.queues.clear();
        self.stats_head = None;
        self.acked = 0;
    }

    fn process_queue(&mut self, index: usize) {
        let Some(&(role, _)) = self.queues.get(index) else { return };
        if !self.queues[index].1.ready() {
            return;
        }
        match role {
            Role::Inflate => self.inflate(index),
            Role::Deflate => self.deflate(index),
            Role::Stats => self.stats(index),
            Role::Reporting => self.reporting(index),
        }
    }

    fn tick(&mut self) -> u64 {
        let interval = self.cfg.stats_interval;
        if interval.is_zero() {
            return 0;
        }
        if self.stats_head.is_some() && self.stats_asked.elapsed() >= interval {
            self.request_stats();
        }
        interval.as_millis().clamp(1, u64::MAX as u128) as u64
    }
}
