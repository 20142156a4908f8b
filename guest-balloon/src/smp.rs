//! Several vCPUs, one workload: the BSP decides, everyone processes pages.
//!
//! Only the BSP parses, allocates and prints. Page work (`alloc`'s filling, `touch`,
//! `verify`) is shared so that a VM with several vCPUs writes its memory from
//! several vCPUs at once, as reclamation must expect. There is no interrupt
//! controller: the BSP publishes a [`Job`] on the board (shared memory), writes
//! `KICK_PORT` once to wake the halted application processors, and takes chunks of
//! the job itself; every vCPU claims chunks from a shared counter until none are
//! left, so a vCPU the host is slow to run simply does less. The BSP then waits,
//! spinning, until every application processor has reported the job done.
//!
//! Application processors halt between jobs (each `hlt` sleeps on the host until
//! the next kick, or the VMM's halt timeout: 2 ms on vmm).

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::workload::job::{Job, Tally};
use crate::{arch, system, trap};

/// Pages per claimed chunk; every vCPU signals progress after each.
const CHUNK: u64 = 256;

/// The job board shared by all vCPUs.
struct Board {
    /// Set once the BSP has finished booting.
    ready: AtomicBool,
    /// Bumped for each job (0: none yet).
    generation: AtomicU32,
    /// The current job: written by the BSP only while no application processor
    /// works on a job, read by them after they see a new generation.
    job: UnsafeCell<Option<Job>>,
    /// Next offset of the job to claim.
    next: AtomicU64,
    /// Application processors done with the current job.
    finished: AtomicU32,
    /// Bad pages found (verify).
    bad: AtomicU64,
    /// Lowest bad position found (verify; `u64::MAX`: none).
    first_bad: AtomicU64,
}

// SAFETY: `job` follows the publication protocol described on the field, with
// `generation` (release/acquire) and `finished` ordering the accesses.
unsafe impl Sync for Board {}

static BOARD: Board = Board {
    ready: AtomicBool::new(false),
    generation: AtomicU32::new(0),
    job: UnsafeCell::new(None),
    next: AtomicU64::new(0),
    finished: AtomicU32::new(0),
    bad: AtomicU64::new(0),
    first_bad: AtomicU64::new(u64::MAX),
};

/// Lets the application processors start (after the BSP set up what they use).
pub fn release_aps() {
    BOARD.ready.store(true, Ordering::Release);
}

/// Runs `job` on all `cpus` vCPUs (called by the BSP); returns the merged tally.
pub fn run(job: Job, cpus: u32) -> Tally {
    // SAFETY: every application processor has finished the previous job (the BSP
    // waited for that), so none reads the slot now.
    unsafe { *BOARD.job.get() = Some(job) };
    BOARD.next.store(0, Ordering::Relaxed);
    BOARD.finished.store(0, Ordering::Relaxed);
    BOARD.bad.store(0, Ordering::Relaxed);
    BOARD.first_bad.store(u64::MAX, Ordering::Relaxed);
    if cpus > 1 {
        BOARD.generation.fetch_add(1, Ordering::Release);
        system::kick();
    }
    work(&job);
    while BOARD.finished.load(Ordering::Acquire) < cpus - 1 {
        core::hint::spin_loop();
    }
    let first_bad = BOARD.first_bad.load(Ordering::Relaxed);
    Tally { bad: BOARD.bad.load(Ordering::Relaxed), first_bad: (first_bad != u64::MAX).then_some(first_bad) }
}

/// Life of an application processor: wait for the BSP to boot, then run jobs.
pub fn ap_main() -> ! {
    while !BOARD.ready.load(Ordering::Acquire) {
        arch::hlt();
    }
    trap::load();
    let mut seen = 0;
    loop {
        let generation = BOARD.generation.load(Ordering::Acquire);
        if generation == seen {
            arch::hlt();
            continue;
        }
        seen = generation;
        // SAFETY: published before `generation` (acquired above); the BSP does not
        // rewrite it until this vCPU reports the job finished.
        let job = unsafe { (*BOARD.job.get()).expect("a published job") };
        work(&job);
        BOARD.finished.fetch_add(1, Ordering::Release);
    }
}

/// Claims and processes chunks of `job` until none are left.
fn work(job: &Job) {
    let mut tally = Tally::default();
    loop {
        let start = BOARD.next.fetch_add(CHUNK, Ordering::Relaxed);
        if start >= job.count {
            break;
        }
        let t = job.run(start..(start + CHUNK).min(job.count));
        tally.bad += t.bad;
        tally.first_bad = tally.first_bad.or(t.first_bad);
        job.control.beat();
    }
    if tally.bad > 0 {
        BOARD.bad.fetch_add(tally.bad, Ordering::Relaxed);
    }
    if let Some(pos) = tally.first_bad {
        BOARD.first_bad.fetch_min(pos, Ordering::Relaxed);
    }
}
