//! The balloon device model: features, configuration space, queue roles, target,
//! and the host side of each queue.
//!
//! Queues are numbered densely, as Linux and the project's guest driver do:
//! inflate (0), deflate (1), then statistics if STATS_VQ was negotiated, then free
//! page reporting if PAGE_REPORTING was; a queue whose feature is not negotiated does
//! not take a number.
//!
//! **Bounded work.** A guest decides how much work it hands over, so the device
//! never does all of it at once. One [`VirtioDevice::process_queue`] call is a
//! slice: at most [`SLICE_CHAINS`] chains, and no new chain once [`SLICE_TIME`] has
//! passed. A chain is at most queue-size descriptors ([`Virtqueue::pop`]) and
//! [`queues::MAX_PFNS`] PFNs. Chains are completed as the slice goes: those of a
//! statistics, deflate or report queue one by one, inflate chains in batches whose
//! pages are freed together (a batch closes at [`FLUSH_PFNS`] pages or
//! [`FLUSH_RUNS`] runs of pages, so that one `madvise` frees a run across several
//! buffers but a batch never costs more than `FLUSH_RUNS + MAX_PFNS` calls). A slice
//! that stops with chains still available returns [`Work::More`]; the worker then
//! lets go of the device and the VM before the next one. Host memory is a set of
//! scratch buffers reused from slice to slice, each bounded by these limits.
//!
//! **Refusals.** A malformed chain or a buffer that breaks its queue's rules is
//! refused whole (nothing of it acted on), counted, and completed. A ring the driver
//! broke ([`RingError`]) stops the device until the driver resets it
//! (DEVICE_NEEDS_RESET and a configuration interrupt).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::desc::split::Descriptor;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::metrics::{stat_name, BalloonMetrics, BalloonSnapshot};
use super::pages::{merge_ranges, resident_pages, BalloonedPages};
use super::queues::BufferError;
use super::target::TargetMode;
use super::{config, features, queues, DEVICE_ID};
use crate::devices::guest_errors::{GuestErrorKind, GuestErrors};
use crate::devices::virtio::virtqueue::{Popped, RingError};
use crate::devices::virtio::{
    ActivateError, Interrupt, VirtioDevice, Virtqueue, Work, INT_CONFIG, INT_VRING, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestRam;

/// Largest queue the balloon accepts.
pub const QUEUE_SIZE: u16 = 256;
/// Chains one slice takes at most.
pub const SLICE_CHAINS: usize = 64;
/// A slice takes no new chain once it has run this long.
pub const SLICE_TIME: Duration = Duration::from_millis(5);
/// Inflated pages freed together at most (32 MiB of guest memory).
pub const FLUSH_PFNS: usize = 8192;
/// Runs of inflated pages freed together at most (about one `madvise` each).
pub const FLUSH_RUNS: usize = 64;

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
            crate::units::format_size(bytes),
            crate::units::format_size(mem)
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// Host buffers reused from chain to chain; each is bounded by the limits above.
#[derive(Default)]
struct Scratch {
    /// The descriptors of the chain at hand (queue size at most).
    descs: Vec<Descriptor>,
    /// Its bytes ([`queues::MAX_PFNS`] PFNs or [`queues::MAX_STATS`] entries at most).
    bytes: Vec<u8>,
    /// Its PFNs.
    pfns: Vec<u64>,
    /// Its statistics entries.
    stats: Vec<(u16, u64)>,
    /// Its reported ranges (queue size at most).
    ranges: Vec<(u64, u64)>,
    /// Pages newly inflated by the chains of `batch`, not yet freed.
    fresh: Vec<u64>,
    /// Runs in `fresh` (counted per chain, an upper bound).
    runs: usize,
    /// Inflate chains whose pages are in `fresh`, completed once they are freed.
    batch: Vec<u16>,
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
    queues: Vec<(Role, Option<Virtqueue>)>,
    /// The driver broke a ring: nothing is served until it resets the device.
    broken: bool,
    stats_head: Option<u16>,
    stats_asked: Instant,
    guest_stats: BTreeMap<String, u64>,
    guest_stats_at: Option<Instant>,
    scratch: Scratch,
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
            broken: false,
            stats_head: None,
            stats_asked: Instant::now(),
            guest_stats: BTreeMap::new(),
            guest_stats_at: None,
            scratch: Scratch::default(),
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
        log::info!("{}: balloon target {} ({} pages, pinned)", self.name, crate::units::format_size(bytes), pages);
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
        if self.broken {
            return false;
        }
        let Some(head) = self.stats_head.take() else { return false };
        self.stats_asked = Instant::now();
        let Some(index) = self.queues.iter().position(|(r, q)| *r == Role::Stats && q.is_some()) else {
            return false;
        };
        match self.complete(index, head) {
            Ok(()) => true,
            Err(e) => {
                self.break_down(index, e);
                false
            }
        }
    }

    /// Counters and state for reports.
    pub fn snapshot(&self) -> BalloonSnapshot {
        BalloonSnapshot {
            target_pages: self.num_pages as u64,
            target_mode: self.mode,
            actual_pages: self.actual as u64,
            ballooned_pages: self.ballooned.count(),
            guest_errors: self.errors.total(),
            guest_error_kinds: self.errors.by_kind(),
            needs_reset: self.broken,
            features: self.acked,
            guest_stats: self.guest_stats.clone(),
            guest_stats_age_ms: self.guest_stats_at.map(|t| t.elapsed().as_secs_f64() * 1e3),
            ..Default::default()
        }
        .with_metrics(&self.metrics)
    }

    fn report(&self, kind: GuestErrorKind, detail: impl std::fmt::Display) {
        self.errors.report(kind, detail);
    }

    /// The driver broke queue `index`'s ring: stop until it resets the device.
    fn break_down(&mut self, index: usize, e: RingError) {
        self.report(GuestErrorKind::Ring, format_args!("queue {index}: {e}; the device needs a reset"));
        self.broken = true;
        self.interrupt.raise(INT_CONFIG);
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

    /// Returns chain `head` of queue `index` to the guest.
    fn complete(&mut self, index: usize, head: u16) -> Result<(), RingError> {
        let q = self.queues[index].1.as_mut().expect("only running queues are served");
        q.complete(self.ram.mem(), head, 0)?;
        self.interrupt.raise(INT_VRING);
        Ok(())
    }

    /// Completes a chain refused because of `e`, without acting on it.
    fn refuse(&mut self, index: usize, head: u16, e: BufferError) -> Result<(), RingError> {
        if let BufferError::PfnOutsideRam { count, .. } = e {
            BalloonMetrics::add(&self.metrics.invalid_pfns, count);
        }
        self.report(GuestErrorKind::Buffer, format_args!("queue {index}: {e}; chain refused"));
        self.complete(index, head)
    }

    /// One slice of queue `index`'s work (see the module documentation).
    fn slice(&mut self, index: usize, role: Role) -> Result<Work, RingError> {
        let deadline = Instant::now() + SLICE_TIME;
        let ram = self.ram.clone();
        let mem = ram.mem();
        let taken = self.take_chains(index, role, mem, deadline);
        // Whatever stopped the slice, the batch taken so far is freed and completed.
        self.flush_inflated(index)?;
        taken?;
        let q = self.queues[index].1.as_ref().expect("only running queues are served");
        Ok(if q.pending(mem)? > 0 { Work::More } else { Work::Done })
    }

    fn take_chains(
        &mut self,
        index: usize,
        role: Role,
        mem: &GuestMemoryMmap,
        deadline: Instant,
    ) -> Result<(), RingError> {
        for _ in 0..SLICE_CHAINS {
            let q = self.queues[index].1.as_mut().expect("only running queues are served");
            let Some(popped) = q.pop(mem, &mut self.scratch.descs)? else { return Ok(()) };
            match popped {
                Popped::Malformed(head, e) => {
                    self.report(GuestErrorKind::Chain, format_args!("queue {index}: {e}; chain refused"));
                    self.complete(index, head)?;
                }
                Popped::Chain(head) => match role {
                    Role::Inflate => self.inflate(index, head, mem)?,
                    Role::Deflate => self.deflate(index, head, mem)?,
                    Role::Stats => self.stats(index, head, mem)?,
                    Role::Reporting => self.reporting(index, head)?,
                },
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        Ok(())
    }

    fn inflate(&mut self, index: usize, head: u16, mem: &GuestMemoryMmap) -> Result<(), RingError> {
        let s = &mut self.scratch;
        let ballooned = &self.ballooned;
        if let Err(e) = queues::pfns(mem, &s.descs, |p| ballooned.is_ram(p), &mut s.bytes, &mut s.pfns) {
            return self.refuse(index, head, e);
        }
        let mut previous = None;
        for &pfn in &s.pfns {
            if ballooned.insert(pfn) {
                s.fresh.push(pfn);
            } else {
                BalloonMetrics::add(&self.metrics.duplicate_pfns, 1);
            }
            // Each run costs one `madvise` (each page, in the per-page baseline).
            if self.cfg.per_page_discard || previous.is_none_or(|p: u64| p + 1 != pfn) {
                s.runs += 1;
            }
            previous = Some(pfn);
        }
        s.batch.push(head);
        if s.fresh.len() >= FLUSH_PFNS || s.runs >= FLUSH_RUNS {
            self.flush_inflated(index)?;
        }
        Ok(())
    }

    /// Frees the pages of the inflate batch and completes its chains.
    fn flush_inflated(&mut self, index: usize) -> Result<(), RingError> {
        let mut fresh = std::mem::take(&mut self.scratch.fresh);
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
        fresh.clear();
        self.scratch.fresh = fresh;
        self.scratch.runs = 0;
        let mut batch = std::mem::take(&mut self.scratch.batch);
        let done = batch.drain(..).try_for_each(|head| self.complete(index, head));
        self.scratch.batch = batch;
        done
    }

    fn deflate(&mut self, index: usize, head: u16, mem: &GuestMemoryMmap) -> Result<(), RingError> {
        let s = &mut self.scratch;
        let ballooned = &self.ballooned;
        if let Err(e) = queues::pfns(mem, &s.descs, |p| ballooned.is_ram(p), &mut s.bytes, &mut s.pfns) {
            return self.refuse(index, head, e);
        }
        s.pfns.retain(|&pfn| {
            let was = ballooned.remove(pfn);
            if !was {
                BalloonMetrics::add(&self.metrics.duplicate_pfns, 1);
            }
            was
        });
        BalloonMetrics::add(&self.metrics.deflated_pages, s.pfns.len() as u64);
        // Before the buffer completes, the guest must not touch these pages: any
        // host memory behind them now means it used them while ballooned.
        for r in merge_ranges(&mut s.pfns) {
            let (gpa, len) = (r.first_pfn * guest_abi::PAGE_SIZE, r.count * guest_abi::PAGE_SIZE);
            match mem.get_host_address(GuestAddress(gpa)).map_err(std::io::Error::other) {
                Ok(host) => match resident_pages(host, len) {
                    Ok(n) => BalloonMetrics::add(&self.metrics.touched_pages, n),
                    Err(e) => log::warn!("{}: mincore of deflated pages: {e}", self.name),
                },
                Err(e) => log::warn!("{}: deflated range {gpa:#x}: {e}", self.name),
            }
        }
        self.complete(index, head)
    }

    fn stats(&mut self, index: usize, head: u16, mem: &GuestMemoryMmap) -> Result<(), RingError> {
        let s = &mut self.scratch;
        if let Err(e) = queues::stats(mem, &s.descs, &mut s.bytes, &mut s.stats) {
            return self.refuse(index, head, e);
        }
        for &(tag, val) in &s.stats {
            if let Some(name) = stat_name(tag) {
                self.guest_stats.insert(name.to_string(), val);
            }
        }
        self.guest_stats_at = Some(Instant::now());
        BalloonMetrics::add(&self.metrics.stats_updates, 1);
        // Keep the newest buffer to ask for the next update; give back older ones.
        match self.stats_head.replace(head) {
            Some(old) => self.complete(index, old),
            None => Ok(()),
        }
    }

    fn reporting(&mut self, index: usize, head: u16) -> Result<(), RingError> {
        let mut ranges = std::mem::take(&mut self.scratch.ranges);
        let parsed = queues::reported_ranges(&self.ram, &self.scratch.descs, &mut ranges);
        if parsed.is_ok() {
            BalloonMetrics::add(&self.metrics.reported_buffers, 1);
            for &(gpa, len) in &ranges {
                BalloonMetrics::add(&self.metrics.reported_pages, len / guest_abi::PAGE_SIZE);
                self.discard(gpa, len);
            }
        }
        self.scratch.ranges = ranges;
        match parsed {
            Ok(()) => self.complete(index, head),
            Err(e) => self.refuse(index, head, e),
        }
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
        let range = usize::try_from(offset).ok().and_then(|o| Some(o..o.checked_add(data.len())?));
        match range.and_then(|r| space.get(r)) {
            Some(src) => data.copy_from_slice(src),
            None => {
                data.fill(0);
                self.report(GuestErrorKind::Config, format_args!("config read at {offset:#x}+{}", data.len()));
            }
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let value = <[u8; 4]>::try_from(data).map(u32::from_le_bytes);
        match (offset, value) {
            (config::ACTUAL, Ok(pages)) if pages as u64 <= self.ram.size() / guest_abi::PAGE_SIZE => {
                self.actual = pages
            }
            (config::ACTUAL, Ok(pages)) => self.report(
                GuestErrorKind::Config,
                format_args!("actual = {pages} pages, more than the VM's memory: ignored"),
            ),
            (config::POISON_VAL, Ok(v)) => self.poison = v,
            _ => {
                self.report(GuestErrorKind::Config, format_args!("config write at {offset:#x}+{} ignored", data.len()))
            }
        }
    }

    fn activate(&mut self, acked: u64, queues: Vec<Option<Virtqueue>>) -> Result<(), ActivateError> {
        let mut roles = vec![Role::Inflate, Role::Deflate];
        if acked & 1 << features::STATS_VQ != 0 {
            roles.push(Role::Stats);
        }
        if acked & 1 << features::PAGE_REPORTING != 0 {
            roles.push(Role::Reporting);
        }
        if queues.len() != roles.len() {
            return Err(ActivateError::QueueCount { got: queues.len(), want: roles.len() });
        }
        if let Some(i) = queues[..2].iter().position(Option::is_none) {
            return Err(ActivateError::QueueNotReady(i));
        }
        self.acked = acked;
        self.queues = roles.into_iter().zip(queues).collect();
        self.stats_asked = Instant::now();
        // Debug, not info: a guest can reset and re-activate in a loop.
        log::debug!("{}: balloon driver ready (features {acked:#x})", self.name);
        Ok(())
    }

    fn reset(&mut self) {
        // Ballooned pages stay ballooned: their host memory is gone either way, and
        // the guest's driver re-learns the balloon size from `actual`.
        self.queues.clear();
        self.stats_head = None;
        self.acked = 0;
        self.broken = false;
        self.scratch.fresh.clear();
        self.scratch.batch.clear();
        self.scratch.runs = 0;
    }

    fn process_queue(&mut self, index: usize) -> Work {
        // Not running yet: buffers made available before DRIVER_OK are served once
        // the driver sets it (the transport notifies every queue then).
        if self.broken || self.queues.is_empty() {
            return Work::Done;
        }
        let role = match self.queues.get(index) {
            Some(&(role, Some(_))) => role,
            _ => {
                self.report(GuestErrorKind::Notify, format_args!("notify of queue {index}, which is not running"));
                return Work::Done;
            }
        };
        match self.slice(index, role) {
            Ok(work) => work,
            Err(e) => {
                self.break_down(index, e);
                Work::Done
            }
        }
    }

    fn needs_reset(&self) -> bool {
        self.broken
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
