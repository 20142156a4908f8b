//! The write race, under stress: writer threads (standing for vCPUs) keep writing
//! sequence numbers into pages that are zero or identical and being merged, and
//! check before each write that their previous write is still there. The scanner
//! merges under each VM's reclaim pause, which really stops the writers (they write
//! through the VM's device gate).
//!
//! Meanwhile a balloon thread inflates and deflates other pages, discarding them
//! through the VM's `RamChanges` (they must read zero once inflated, and keep what the
//! guest wrote after deflating). At the end, discarding all memory must bring every
//! counter of shared memory back to zero: no pool reference leaked or counted twice.
//!
//! `TPS_STRESS_NO_PAUSE=1` lets the writers bypass the pause: the test then fails with
//! lost writes, which shows that it can see the race.

mod common;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use pagestate::anon::MemoryVm;
use pagestate::PAGE_SIZE;

const VMS: u32 = 2;
const PAGES: usize = 2048;
const WRITERS_PER_VM: usize = 2;
/// Every this many pages, one belongs to the balloon instead of the writers.
const BALLOON_EVERY: usize = 8;
/// Run at least this long, and until the counters below are reached.
const MIN_RUN: Duration = Duration::from_secs(4);
const MIN_MERGES: u64 = 20_000;
const MIN_ZERO_FREES: u64 = 5_000;
const MIN_BROKEN: u64 = 5_000;

/// What a writer last wrote into a page: a base pattern (0: zero page; 1-3: a byte
/// repeated, identical in every page with that base) and, in word 0, either the
/// pattern too or a sequence number that makes the page unique.
#[derive(Clone, Copy)]
struct Expect {
    base: u64,
    seq: Option<u64>,
}

fn pattern(base: u64) -> u64 {
    base * 0x0101_0101_0101_0101
}

/// Word `i` of the page at `addr` (a page of the test's guest memory).
fn word(addr: usize, i: usize) -> *mut u64 {
    (addr as *mut u64).wrapping_add(i)
}

fn holds(addr: usize, e: Expect) -> bool {
    // SAFETY: words of a page of the test's guest memory.
    let read = |i: usize| unsafe { word(addr, i).read_volatile() };
    read(0) == e.seq.unwrap_or(pattern(e.base)) && (1..PAGE_SIZE / 8).all(|i| read(i) == pattern(e.base))
}

fn write_all(addr: usize, e: Expect) {
    for i in 1..PAGE_SIZE / 8 {
        // SAFETY: a word of a page of the test's guest memory.
        unsafe { word(addr, i).write_volatile(pattern(e.base)) };
    }
    // SAFETY: as above.
    unsafe { word(addr, 0).write_volatile(e.seq.unwrap_or(pattern(e.base))) };
}

struct Writer {
    addrs: Vec<usize>,
    expect: Vec<Expect>,
    rng: u64,
    seq: u64,
    lost: u64,
    writes: u64,
}

impl Writer {
    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Checks that the page still holds the last write, then writes it again.
    fn step(&mut self, vm: &MemoryVm, no_pause: bool) {
        let j = (self.rand() % self.addrs.len() as u64) as usize;
        let addr = self.addrs[j];
        let mut e = self.expect[j];
        let (choice, base) = (self.rand() % 10, self.rand() % 4);
        if choice < 5 {
            self.seq += 1;
        }
        let seq = self.seq;
        let mut write = || {
            let lost = !holds(addr, e);
            if lost {
                write_all(addr, e);
            }
            match choice {
                0..5 => {
                    e.seq = Some(seq);
                    // SAFETY: a page of the test's guest memory.
                    unsafe { (addr as *mut u64).write_volatile(seq) };
                }
                5..9 => {
                    e.seq = None;
                    // SAFETY: a page of the test's guest memory.
                    unsafe { (addr as *mut u64).write_volatile(pattern(e.base)) };
                }
                _ => {
                    e = Expect { base, seq: None };
                    write_all(addr, e);
                }
            }
            lost
        };
        // The negative control writes past the pause.
        let lost = if no_pause { write() } else { vm.write(write) };
        self.lost += lost as u64;
        self.expect[j] = e;
        self.writes += 1;
    }
}

/// A balloon page: where, and whether inflated or else which pattern the guest wrote.
#[derive(Clone, Copy)]
struct BalloonPage {
    vm: u32,
    addr: usize,
    gpa: u64,
    inflated: bool,
    base: u64,
}

/// Inflates (the page becomes the balloon's: skipped, reset to zero) and deflates
/// (the guest has it back and writes it) balloon pages at random.
struct Balloon {
    pages: Vec<BalloonPage>,
    rng: u64,
    wrong: u64,
    steps: u64,
}

impl Balloon {
    fn step(&mut self, vms: &[Arc<MemoryVm>]) {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let j = (self.rng % self.pages.len() as u64) as usize;
        let mut p = self.pages[j];
        let zero = Expect { base: 0, seq: None };
        let vm = &vms[p.vm as usize];
        if p.inflated {
            self.wrong += !holds(p.addr, zero) as u64;
            vm.set_off_limits(p.gpa, false);
            p.base = 1 + (self.rng >> 20) % 3;
            vm.write(|| write_all(p.addr, Expect { base: p.base, seq: None }));
        } else {
            self.wrong += !holds(p.addr, Expect { base: p.base, seq: None }) as u64;
            vm.set_off_limits(p.gpa, true);
            vm.discard(p.addr, PAGE_SIZE).unwrap();
            self.wrong += !holds(p.addr, zero) as u64;
        }
        p.inflated = !p.inflated;
        self.pages[j] = p;
        self.steps += 1;
    }
}

#[test]
fn no_write_is_lost_while_pages_are_merged() {
    let no_pause = std::env::var_os("TPS_STRESS_NO_PAUSE").is_some();
    // Memory first: it must outlive the scanner (the VMM calls `remove_vm` first).
    let mems: Vec<GuestMem> = (0..VMS).map(|_| GuestMem::new(PAGES)).collect();
    let (scanner, rec) = fast_scanner(|c| c.max_batch = 256);
    let scanner = Arc::new(scanner);
    let vms: Arc<Vec<Arc<MemoryVm>>> = Arc::new(mems.iter().map(|m| rec.add(&scanner, m)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let is_balloons = |i: usize| i % BALLOON_EVERY == BALLOON_EVERY - 1;
    for (vm, m) in mems.iter().enumerate() {
        for w in 0..WRITERS_PER_VM {
            let mine = |&i: &usize| i % WRITERS_PER_VM == w && !is_balloons(i);
            let addrs: Vec<usize> = (0..PAGES).filter(mine).map(|i| m.page(i)).collect();
            let expect = vec![Expect { base: 0, seq: None }; addrs.len()];
            let rng = 0x9e37_79b9 + (vm * 16 + w) as u64;
            let mut writer = Writer { addrs, expect, rng, seq: 0, lost: 0, writes: 0 };
            let (vm, stop) = (vms[vm].clone(), stop.clone());
            threads.push(thread::spawn(move || {
                while !stop.load(Relaxed) {
                    for _ in 0..32 {
                        writer.step(&vm, no_pause);
                    }
                    thread::yield_now();
                }
                writer
            }));
        }
    }
    let pages = mems
        .iter()
        .enumerate()
        .flat_map(|(vm, m)| {
            (0..PAGES).filter(|&i| is_balloons(i)).map(move |i| BalloonPage {
                vm: vm as u32,
                addr: m.page(i),
                gpa: m.gpa(i),
                inflated: false,
                base: 0,
            })
        })
        .collect();
    let mut balloon = Balloon { pages, rng: 0x5eed, wrong: 0, steps: 0 };
    let balloon = {
        let (vms, stop) = (vms.clone(), stop.clone());
        thread::spawn(move || {
            while !stop.load(Relaxed) {
                balloon.step(&vms);
                if balloon.steps % 16 == 0 {
                    thread::sleep(Duration::from_micros(200));
                }
            }
            balloon
        })
    };

    let start = Instant::now();
    loop {
        thread::sleep(Duration::from_millis(100));
        let st = scanner.stats();
        let enough = st.merges >= MIN_MERGES && st.zero_pages_freed >= MIN_ZERO_FREES && st.broken_shares >= MIN_BROKEN;
        if start.elapsed() >= MIN_RUN && enough {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(300), "too little merging: {st:?}");
    }
    stop.store(true, Relaxed);
    let writers: Vec<Writer> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let balloon = balloon.join().unwrap();
    let during = scanner.stats();

    // Quiet now: let the scanner merge what is left, then check every page.
    passes(&scanner, 2);
    let after = scanner.stats();
    let mut wrong = 0;
    for w in &writers {
        wrong += w.addrs.iter().zip(&w.expect).filter(|&(&a, &e)| !holds(a, e)).count();
    }
    for p in &balloon.pages {
        let base = if p.inflated { 0 } else { p.base };
        wrong += !holds(p.addr, Expect { base, seq: None }) as usize;
    }
    let lost: u64 = writers.iter().map(|w| w.lost).sum();
    let writes: u64 = writers.iter().map(|w| w.writes).sum();
    let pauses = rec.pauses();
    println!(
        "{:.1} s, {writes} writes, {pauses} pauses, {} balloon steps; merges {}, zero frees {}, \
         broken shares {}, race aborts {}; lost writes {lost}, wrong balloon pages {}, \
         wrong pages at the end {wrong}",
        start.elapsed().as_secs_f64(),
        balloon.steps,
        during.merges,
        during.zero_pages_freed,
        during.broken_shares,
        during.race_aborts,
        balloon.wrong,
    );
    println!("{after:?}");
    assert_eq!((lost, balloon.wrong, wrong), (0, 0, 0), "writes were lost");
    assert!(after.pool_mapped_pages > 0 && after.errors == 0);

    // All memory back to plain anonymous memory: nothing may be left counted.
    scanner.stop();
    for (vm, m) in vms.iter().zip(&mems) {
        vm.discard(m.addr, m.len()).unwrap();
        assert_eq!(vmas(m), 1);
    }
    let end = scanner.stats();
    // (The VMAs were checked against the kernel above.)
    let shared = (end.pool_pages, end.pool_mapped_pages, end.zero_pages);
    assert_eq!(shared, (0, 0, 0), "{end:?}");
}
