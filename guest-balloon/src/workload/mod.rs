//! The workload interpreter: runs a parsed `guest_abi::workload::Program` and prints
//! one JSON line per step (a `guest_abi::step::StepResult`).
//!
//! The interpreter owns the guest's memory state: the frame allocator and the set
//! of allocated pages with what each must hold. Page work is handed to all vCPUs
//! through `smp`; everything else (allocation, bookkeeping, printing) stays on the
//! BSP. A failed step (out of memory, bad pages) does not stop the workload; it is
//! counted, and turns a later `exit 0` into exit code 1.
//!
//! The interpreter also owns the balloon driver, which shares the frame allocator
//! with the workload: it is polled after every step, while idling, during `spin`,
//! and by the command loop ([`Interpreter::poll_devices`]), and an `alloc` that
//! finds too few free frames asks it for room first.

pub mod job;
pub mod pages;

use core::hint::black_box;

use guest_abi::content;
use guest_abi::guest_state;
use guest_abi::step::{Outcome, StepResult};
use guest_abi::workload::{self, Kind, Program, Step, ARG_MAX};

use crate::balloon::Balloon;
use crate::clock::Clock;
use crate::console::{self, Line};
use crate::control::Control;
use crate::mm::frame_alloc::FrameAllocator;
use crate::{arch, smp, system};
use job::{Job, Op, Tally};
use pages::{PageMeta, PageSet};

/// `spin` iterations between heartbeats (about a millisecond).
const SPIN_BEAT: u64 = 1 << 20;
/// `work` operations between heartbeats, device polls and looks at the clock
/// (about 0.2 ms of resident pages).
const WORK_BEAT: u64 = 256;
/// An address no VM maps (PML4 slot 2; the identity map uses slot 0): `fault`
/// reads it.
const UNMAPPED: u64 = 2 << 39;

/// The VM-wide facts the interpreter needs.
pub struct Machine {
    /// This VM's index in its host process (every result line names it).
    pub vm: u32,
    /// vCPUs sharing page work.
    pub cpus: u32,
    /// Seed of `unique` and touched contents.
    pub vm_seed: u64,
    /// Time source.
    pub clock: Clock,
    /// Where progress is published.
    pub control: Control,
}

/// The workload's state and its interpreter.
pub struct Interpreter {
    machine: Machine,
    frames: FrameAllocator,
    pages: PageSet,
    balloon: Option<Balloon>,
    /// Position in the allocated set where the next `touch` starts.
    touch_cursor: u64,
    /// `unique` pages allocated so far (their content index).
    unique_pages: u64,
    steps_done: u64,
    failed_steps: u64,
}

/// What a step reports besides its name, time and result.
#[derive(Default)]
struct Report {
    pages: Option<u64>,
    bad: Option<u64>,
    first_bad_pfn: Option<u64>,
    ops: Option<u64>,
    ops_per_sec: Option<u64>,
    error: Option<&'static str>,
    failed: bool,
}

impl Report {
    fn pages(pages: u64) -> Report {
        Report { pages: Some(pages), ..Report::default() }
    }

    fn error(msg: &'static str) -> Report {
        Report { error: Some(msg), failed: true, ..Report::default() }
    }
}

impl Interpreter {
    /// An interpreter with nothing allocated yet.
    pub fn new(machine: Machine, frames: FrameAllocator, pages: PageSet, balloon: Option<Balloon>) -> Interpreter {
        let interpreter = Interpreter {
            machine,
            frames,
            pages,
            balloon,
            touch_cursor: 0,
            unique_pages: 0,
            steps_done: 0,
            failed_steps: 0,
        };
        interpreter.publish();
        interpreter
    }

    /// Lets the balloon driver make progress (see `crate::balloon`).
    pub fn poll_devices(&mut self) {
        if let Some(b) = &mut self.balloon {
            b.poll(&mut self.frames);
            self.publish();
        }
    }

    /// Free frames.
    pub fn free_pages(&self) -> u64 {
        self.frames.free_pages()
    }

    /// Steps finished so far (over all programs).
    pub fn steps_done(&self) -> u64 {
        self.steps_done
    }

    /// Runs `program`; its lines carry `"seq":S` when it is command `seq`. Returns
    /// whether every step succeeded. Does not return after an `exit` step.
    pub fn run(&mut self, program: &Program, seq: Option<u32>) -> bool {
        let failed_before = self.failed_steps;
        self.block(program.steps(), seq);
        self.failed_steps == failed_before
    }

    /// Prints `{"event":"error","msg":...}` for a workload that cannot run.
    pub fn print_error(&self, seq: Option<u32>, msg: impl core::fmt::Display) {
        let mut line = Line::vm();
        if let Some(seq) = seq {
            line.num("seq", seq as u64);
        }
        line.str("event", "error").str("msg", msg).emit();
    }

    fn block(&mut self, steps: &[Step], seq: Option<u32>) {
        let mut i = 0;
        while i < steps.len() {
            match steps[i] {
                Step::Repeat { count, body } => {
                    let body = &steps[i + 1..i + 1 + body as usize];
                    for _ in 0..count {
                        self.block(body, seq);
                    }
                    i += body.len();
                }
                Step::For { us, body } => {
                    let body = &steps[i + 1..i + 1 + body as usize];
                    let deadline = self.machine.clock.deadline(us);
                    while self.machine.clock.now() < deadline {
                        self.block(body, seq);
                        // An empty or step-less body must still beat and poll.
                        self.machine.control.beat();
                        self.poll_devices();
                    }
                    i += body.len();
                }
                step => self.step(step, seq),
            }
            i += 1;
        }
    }

    fn step(&mut self, step: Step, seq: Option<u32>) {
        let start = self.machine.clock.now();
        let report = match step {
            Step::Alloc { pages, kind } => self.alloc(pages, kind),
            Step::Touch { pages } => self.touch(pages),
            Step::Read { pages } => self.read(pages),
            Step::Verify => self.verify(),
            Step::Free { pages, zero } => self.free(pages, zero),
            Step::Work { pages, us, write } => self.work(pages, us, write),
            Step::Idle { us } => self.idle(us),
            Step::Spin { iterations } => self.spin(iterations),
            Step::Exit { code } => self.exit(code, seq),
            Step::Fault => self.fault(),
            Step::Repeat { .. } | Step::For { .. } => unreachable!("repeat and for are expanded by block()"),
        };
        let us = self.machine.clock.us_since(start);
        self.steps_done += 1;
        self.failed_steps += report.failed as u64;
        self.publish();
        self.poll_devices();

        let outcome = if report.failed { Outcome::Fail } else { Outcome::Ok };
        let mut arg = [0; ARG_MAX];
        let mut result = self.result(seq, step.op(), outcome);
        result.arg = step.arg().map(|a| a.to_str(&mut arg));
        (result.pages, result.bad, result.first_bad_pfn) = (report.pages, report.bad, report.first_bad_pfn);
        (result.ops, result.ops_per_sec) = (report.ops, report.ops_per_sec);
        (result.us, result.error) = (Some(us), report.error);
        console::print(&result);
    }

    /// The result of the step being finished, with its identity filled in.
    fn result<'a>(&self, seq: Option<u32>, op: workload::Op, outcome: Outcome) -> StepResult<&'a str> {
        StepResult::new(self.machine.vm, seq, self.steps_done, op, outcome)
    }

    fn publish(&self) {
        self.machine.control.publish(self.steps_done, self.pages.len(), self.frames.free_pages());
    }

    /// Runs a job over positions `first..first + count` of the allocated set.
    fn job(&self, op: Op, first: u64, count: u64) -> Tally {
        smp::run(self.job_of(op, first, count), self.machine.cpus)
    }

    /// The job of `op` over positions `first..first + count` of the allocated set.
    fn job_of(&self, op: Op, first: u64, count: u64) -> Job {
        Job {
            op,
            records: self.pages.records(),
            set_len: self.pages.len(),
            first,
            count,
            vm_seed: self.machine.vm_seed,
            control: self.machine.control,
        }
    }

    fn alloc(&mut self, pages: u64, kind: Kind) -> Report {
        if pages > self.frames.free_pages() {
            let room = match &mut self.balloon {
                Some(b) => b.make_room(&mut self.frames, pages),
                None => false,
            };
            if !room {
                return Report::error("out of memory");
            }
        }
        let first = self.pages.len();
        let mut index = 0;
        while index < pages {
            let run = self.frames.alloc_run(pages - index).expect("enough frames were free");
            for pfn in run.start..run.start + run.count {
                let content_index = match kind {
                    Kind::Unique => self.unique_pages + index,
                    _ => index,
                };
                let key = content::alloc_key(kind, content_index, self.machine.vm_seed);
                let pfn = u32::try_from(pfn).expect("frame numbers fit 32 bits");
                self.pages.push(PageMeta { key, pfn, version: 0 });
                index += 1;
            }
        }
        if kind == Kind::Unique {
            self.unique_pages += pages;
        }
        self.job(Op::Fill, first, pages);
        Report::pages(pages)
    }

    /// Touches round-robin; more pages than allocated means several rounds (one job
    /// each, so no page is written by two vCPUs at once).
    fn touch(&mut self, pages: u64) -> Report {
        let len = self.pages.len();
        if len == 0 {
            return Report::error("nothing allocated");
        }
        let mut left = pages;
        while left > 0 {
            let n = left.min(len);
            let first = self.touch_cursor % len;
            self.job(Op::Touch, first, n);
            self.touch_cursor = (first + n) % len;
            left -= n;
        }
        Report::pages(pages)
    }

    fn verify(&mut self) -> Report {
        let len = self.pages.len();
        let tally = if len == 0 { Tally::default() } else { self.job(Op::Verify, 0, len) };
        self.checked(len, tally)
    }

    /// Reads (checks) the first `pages` of the allocated set: the same pages every
    /// time, so that repeating it keeps a read-only working set of that size.
    fn read(&mut self, pages: u64) -> Report {
        if pages > self.pages.len() {
            return Report::error("more pages than allocated");
        }
        let tally = self.job(Op::Verify, 0, pages);
        self.checked(pages, tally)
    }

    /// The report of a check of `pages` pages that found `tally`.
    fn checked(&self, pages: u64, tally: Tally) -> Report {
        let first_bad_pfn = tally.first_bad.map(|pos| self.pfn_at(pos));
        Report { pages: Some(pages), bad: Some(tally.bad), first_bad_pfn, failed: tally.bad > 0, ..Report::default() }
    }

    /// The frame of position `pos` (< `self.pages.len()`) of the allocated set.
    fn pfn_at(&self, pos: u64) -> u64 {
        debug_assert!(pos < self.pages.len());
        // SAFETY: pos < len, a written record of the set.
        unsafe { (*self.pages.records().add(pos as usize)).pfn as u64 }
    }

    /// Frees the most recent pages, after writing zeros into them when `zero`.
    fn free(&mut self, pages: u64, zero: bool) -> Report {
        let len = self.pages.len();
        if pages > len {
            return Report::error("more pages than allocated");
        }
        if zero {
            self.job(Op::Zero, len - pages, pages);
        }
        self.pages.pop_into(pages, &mut self.frames);
        Report::pages(pages)
    }

    /// Reads (checks) or rewrites pseudo-random pages among the first `pages` of the
    /// allocated set, one at a time on the BSP, until `us` have passed; reports the
    /// rate. One operation is one whole page, so the rate falls with every page the
    /// host has to bring back (swap) or re-map.
    fn work(&mut self, pages: u64, us: u64, write: bool) -> Report {
        if pages > self.pages.len() {
            return Report::error("more pages than allocated");
        }
        let clock = self.machine.clock;
        let (start, deadline) = (clock.now(), clock.deadline(us));
        let op = if write { Op::Touch } else { Op::Verify };
        // xorshift64: any non-zero state; differs per VM and per step.
        let mut state = (self.machine.vm_seed ^ self.steps_done.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
        let (mut ops, mut tally) = (0u64, Tally::default());
        while clock.now() < deadline {
            for _ in 0..WORK_BEAT {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let found = self.job_of(op, state % pages, 1).run(0..1);
                tally.bad += found.bad;
                tally.first_bad = tally.first_bad.or(found.first_bad);
            }
            ops += WORK_BEAT;
            self.machine.control.beat();
            self.poll_devices();
        }
        let elapsed_us = clock.us_since(start).max(1) as u128;
        let mut report = if write { Report::pages(pages) } else { self.checked(pages, tally) };
        let rate = (ops as u128 * 1_000_000 / elapsed_us).min(u64::MAX as u128) as u64;
        (report.ops, report.ops_per_sec) = (Some(ops), Some(rate));
        report
    }

    /// Halts until the deadline: each `hlt` sleeps on the host until a wake-up or
    /// the VMM's halt timeout (2 ms on vmm), then the TSC says whether to go on. An
    /// idle step can therefore overshoot by up to that timeout.
    fn idle(&mut self, us: u64) -> Report {
        let clock = self.machine.clock;
        let deadline = clock.deadline(us);
        while clock.now() < deadline {
            self.machine.control.beat();
            self.poll_devices();
            arch::hlt();
        }
        Report::default()
    }

    /// A loop the compiler cannot remove, and that exits only for heartbeats' sake
    /// (which are plain memory writes, no exits).
    fn spin(&mut self, iterations: u64) -> Report {
        let mut left = iterations;
        while left > 0 {
            let n = left.min(SPIN_BEAT);
            for i in 0..n {
                black_box(i);
            }
            left -= n;
            self.machine.control.beat();
            self.poll_devices();
        }
        Report::default()
    }

    /// Prints the final line and ends the VM: exit 0 becomes 1 if a step failed.
    fn exit(&mut self, code: u8, seq: Option<u32>) -> ! {
        let code = match (code, self.failed_steps) {
            (0, 1..) => 1,
            (code, _) => code as u32,
        };
        self.steps_done += 1;
        self.publish();
        let mut result = self.result(seq, workload::Op::Exit, Outcome::Ok);
        result.code = Some(code);
        result.failed_steps = Some(self.failed_steps).filter(|&n| n > 0);
        console::print(&result);
        self.machine.control.set_state(guest_state::EXITING);
        system::exit(code)
    }

    /// Reads [`UNMAPPED`]: the page fault is reported by `trap` and ends the VM.
    fn fault(&mut self) -> Report {
        // SAFETY: a plain load (in assembly: Rust must not assume the address is
        // valid); it faults and the exception handler never returns.
        unsafe { core::arch::asm!("mov {0}, [{0}]", inout(reg) UNMAPPED => _, options(nostack, readonly)) };
        Report::error("reading an unmapped address did not fault")
    }
}
