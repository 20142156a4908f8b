//! The virtio-balloon driver: gives free frames to the host when the device's
//! target (`num_pages`) grows, takes them back when it shrinks, answers the
//! statistics queue, takes pages back when an allocation would fail (deflate on
//! OOM) and reports freed memory (free page reporting).
//!
//! There are no interrupts: [`Balloon::poll`] runs between workload steps, while
//! idling and while serving commands. It reaps the used rings (memory reads, no
//! exit), reads `num_pages` at most every [`CONFIG_POLL_US`] (one exit), and posts
//! new work. The VMM's device thread wakes halted vCPUs when it has finished a
//! batch, so a guest waiting in `hlt` sees the result at once.
//!
//! Accounting: a frame taken for inflation leaves the frame allocator (the
//! workload can never get it) and joins `held` once the device has acknowledged it;
//! deflation takes frames out of `held` and returns them to the allocator once the
//! device has acknowledged them (MUST_TELL_HOST). `actual` is `held` plus the
//! frames being deflated: the pages the host still counts as ballooned.
//!
//! Queues are numbered densely as the device expects: inflate 0, deflate 1,
//! statistics 2 if negotiated, reporting next if negotiated.

mod pfn_queue;
mod report;
mod stats;

use guest_abi::{MemRegion, PAGE_SIZE};

use crate::arch;
use crate::clock::Clock;
use crate::mm::frame_alloc::{FrameAllocator, FrameRun};
use crate::mm::frame_set::FrameSet;
use crate::virtio::mmio::Transport;
use pfn_queue::PfnQueue;
use report::Reporter;
use stats::Stats;

/// virtio device type of the balloon.
const DEVICE_ID: u32 = 5;
/// Feature bits the driver understands.
const MUST_TELL_HOST: u64 = 1 << 0;
const STATS_VQ: u64 = 1 << 1;
const DEFLATE_ON_OOM: u64 = 1 << 2;
const PAGE_REPORTING: u64 = 1 << 5;
/// Configuration fields.
const CONFIG_NUM_PAGES: u64 = 0;
const CONFIG_ACTUAL: u64 = 4;
/// Shortest interval between two reads of `num_pages` (each read is an exit).
const CONFIG_POLL_US: u64 = 1000;

/// What the driver counts for the statistics queue.
#[derive(Default)]
struct Counters {
    /// Allocations that failed for lack of memory, balloon considered.
    alloc_failures: u64,
    /// Allocations that deflated the balloon to succeed.
    oom_deflates: u64,
    /// Pages deflated for them.
    oom_pages: u64,
}

/// The driver of one balloon device.
pub struct Balloon {
    transport: Transport,
    features: u64,
    inflate: PfnQueue,
    deflate: PfnQueue,
    stats: Option<Stats>,
    report: Option<Reporter>,
    /// Frames the host holds (inflated and acknowledged), not being deflated.
    held: FrameSet,
    /// Target size in pages (`num_pages`, bounded by RAM).
    target: u64,
    /// Last value written to `actual`.
    actual: u64,
    total_pages: u64,
    clock: Clock,
    next_config_read: u64,
    counters: Counters,
}

impl Balloon {
    /// Sets up the balloon whose virtio-mmio window is at `base`; its rings and
    /// buffers come from `frames`.
    pub fn new(
        base: u64,
        regions: &[MemRegion],
        frames: &mut FrameAllocator,
        clock: Clock,
    ) -> Result<Balloon, &'static str> {
        let mut transport = Transport::probe(base, DEVICE_ID)?;
        let features = transport.negotiate(MUST_TELL_HOST | STATS_VQ | DEFLATE_ON_OOM | PAGE_REPORTING)?;
        let end_pfn = regions.iter().map(|r| (r.base + r.size) / PAGE_SIZE).max().unwrap_or(0);
        let mut next_index = 2;
        let mut index = || {
            next_index += 1;
            next_index - 1
        };
        let parts = (|| {
            let inflate = PfnQueue::new(0, frames)?;
            let deflate = PfnQueue::new(1, frames)?;
            let stats = match features & STATS_VQ != 0 {
                true => Some(Stats::new(index(), frames)?),
                false => None,
            };
            let report = match features & PAGE_REPORTING != 0 {
                true => Some(Reporter::new(index(), frames)?),
                false => None,
            };
            Some((inflate, deflate, stats, report, FrameSet::new(frames, end_pfn)?))
        })();
        let Some((inflate, deflate, stats, report, held)) = parts else {
            return transport.fail("no memory for the balloon's queues");
        };
        transport.setup_queue(inflate.virtq())?;
        transport.setup_queue(deflate.virtq())?;
        if let Some(s) = &stats {
            transport.setup_queue(s.virtq())?;
        }
        if let Some(r) = &report {
            transport.setup_queue(r.virtq())?;
        }
        transport.driver_ok()?;
        let total_pages = regions.iter().map(|r| r.size / PAGE_SIZE).sum();
        let mut balloon = Balloon {
            transport,
            features,
            inflate,
            deflate,
            stats,
            report,
            held,
            target: 0,
            actual: 0,
            total_pages,
            clock,
            next_config_read: 0,
            counters: Counters::default(),
        };
        let values = balloon.stat_values(frames);
        if let Some(s) = &mut balloon.stats {
            s.send(&balloon.transport, &values);
        }
        Ok(balloon)
    }

    /// The negotiated features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Makes progress: reaps finished buffers, follows the target, answers the
    /// statistics queue, reports freed memory.
    pub fn poll(&mut self, frames: &mut FrameAllocator) {
        self.reap(frames);
        let now = self.clock.now();
        if now >= self.next_config_read {
            self.target = (self.transport.config_read(CONFIG_NUM_PAGES) as u64).min(self.total_pages);
            self.next_config_read = self.clock.deadline(CONFIG_POLL_US);
        }
        let projected = self.held.count() + self.inflate.in_flight();
        if self.target > projected {
            let want = (self.target - projected).min(frames.free_pages()).min(self.inflate.capacity());
            let mut run = FrameRun { start: 0, count: 0 };
            let mut left = want;
            let posted = self.inflate.post(want, || {
                if run.count == 0 {
                    run = frames.alloc_run(left)?;
                    left -= run.count;
                }
                run.start += 1;
                run.count -= 1;
                Some(run.start - 1)
            });
            if posted > 0 {
                self.transport.notify(self.inflate.virtq().index());
            }
        } else if self.target < projected {
            self.post_deflate(projected - self.target);
        }
        if let Some(r) = &mut self.report {
            r.poll(frames, &self.transport, &self.clock);
        }
        self.publish_actual();
    }

    /// Called when an allocation needs `need` free frames and fewer are free:
    /// waits for frames in flight to the host, then, if DEFLATE_ON_OOM was
    /// negotiated, deflates what is missing. Returns whether `need` frames are free.
    pub fn make_room(&mut self, frames: &mut FrameAllocator, need: u64) -> bool {
        self.wait_idle(frames);
        let free = frames.free_pages();
        if free >= need {
            return true;
        }
        let short = need - free;
        if self.features & DEFLATE_ON_OOM == 0 || self.held.count() < short {
            self.counters.alloc_failures += 1;
            return false;
        }
        let mut left = short;
        while left > 0 {
            left -= self.post_deflate(left);
            self.wait_idle(frames);
        }
        self.counters.oom_deflates += 1;
        self.counters.oom_pages += short;
        self.publish_actual();
        frames.free_pages() >= need
    }

    /// Offers up to `pages` held frames for deflation; returns how many.
    fn post_deflate(&mut self, pages: u64) -> u64 {
        let want = pages.min(self.held.count()).min(self.deflate.capacity());
        let held = &mut self.held;
        let posted = self.deflate.post(want, || held.take_next());
        if posted > 0 {
            self.transport.notify(self.deflate.virtq().index());
        }
        posted
    }

    /// Waits (halted; the device wakes the vCPU) until no buffer is in flight.
    fn wait_idle(&mut self, frames: &mut FrameAllocator) {
        loop {
            self.reap(frames);
            let reporting = self.report.as_ref().is_some_and(Reporter::busy);
            if self.inflate.in_flight() == 0 && self.deflate.in_flight() == 0 && !reporting {
                return;
            }
            arch::hlt();
        }
    }

    /// Takes in what the device has finished with.
    fn reap(&mut self, frames: &mut FrameAllocator) {
        let held = &mut self.held;
        self.inflate.complete(|pfns| pfns.iter().for_each(|&p| held.insert(p as u64)));
        self.deflate.complete(|pfns| {
            // Deflated frames have no host memory behind them; return them as runs.
            let mut run = FrameRun { start: 0, count: 0 };
            for &p in pfns {
                let p = p as u64;
                if run.count > 0 && run.start + run.count == p {
                    run.count += 1;
                } else {
                    if run.count > 0 {
                        frames.free_unbacked(run);
                    }
                    run = FrameRun { start: p, count: 1 };
                }
            }
            if run.count > 0 {
                frames.free_unbacked(run);
            }
        });
        if let Some(r) = &mut self.report {
            r.complete(frames);
        }
        if self.stats.as_mut().is_some_and(Stats::wanted) {
            let values = self.stat_values(frames);
            if let Some(s) = &mut self.stats {
                s.send(&self.transport, &values);
            }
        }
    }

    /// Writes `actual` if it changed (one exit).
    fn publish_actual(&mut self) {
        let actual = self.held.count() + self.deflate.in_flight();
        if actual != self.actual {
            self.transport.config_write(CONFIG_ACTUAL, actual as u32);
            self.actual = actual;
        }
    }

    fn stat_values(&self, frames: &FrameAllocator) -> [(u16, u64); 6] {
        let free = frames.free_pages() * PAGE_SIZE;
        [
            (stats::MEMFREE, free),
            (stats::MEMTOT, self.total_pages * PAGE_SIZE),
            (stats::AVAIL, free),
            (stats::OOM_KILL, self.counters.alloc_failures),
            (stats::ALLOC_STALL, self.counters.oom_deflates),
            (stats::DIRECT_RECLAIM, self.counters.oom_pages),
        ]
    }
}
