//! A structured, seedable fuzzer over everything a guest controls at the balloon's
//! device boundary, against the real virtio-mmio transport and balloon over 16 MiB
//! of guest RAM: register reads and writes of any offset, width and order (biased
//! towards the registers that exist and the values that matter), whole driver
//! set-ups with random features and queue layouts, and the contents of descriptor
//! tables, available rings, used rings, PFN, statistics and report buffers, with
//! chains that loop, link outside the table, go indirect, or are fine.
//!
//! Every case checks:
//! - no panic (a failing case prints the seed that replays it);
//! - no discard outside what the guest offered: the data pages (256 pages filled
//!   with a pattern, which nothing but the device's discards may change) that read
//!   zero afterwards must each have been named, before a queue was served, by a PFN
//!   anywhere in the driver's memory (any byte alignment) or by a page-aligned range
//!   in a descriptor slot there;
//! - host memory bounded: the process's peak RSS over all cases;
//! - the control path answers between operations (snapshot, target, stats request),
//!   and serving a queue always runs dry within a bounded number of slices.
//!
//! The fuzzer runs in a process of its own (the test re-runs its binary for this
//! test alone), so that the peak RSS it checks is its own. The normal test command
//! runs [`DEFAULT_CASES`] cases (about a second). Longer:
//! `VMM_FUZZ_CASES=N` or `VMM_FUZZ_SECONDS=S`, with `VMM_FUZZ_SEED=X` for another
//! sequence (docs/security.md).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::balloon::metrics::BalloonSnapshot;
use super::balloon::{features, BalloonConfig};
use super::mmio::{STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK};
use super::testing::{Rig, F_INDIRECT, F_NEXT, F_WRITE, MIB};
use super::virtqueue::RingLayout;
use super::{VirtioDevice, Work};
use crate::devices::bus::BusDevice;

/// Cases in the normal test run.
const DEFAULT_CASES: u64 = 200;
const RAM: u64 = 16 * MIB;
const RAM_PAGES: u64 = RAM / 4096;
/// The driver's memory: rings (one 16 KiB slot per queue) and buffers.
const DRIVER_START: u64 = 0x1_0000;
const DRIVER_END: u64 = 0x3_0000;
const BUFFERS: u64 = 0x2_0000;
/// Pages only the device's discards may change.
const DATA_PFNS: std::ops::Range<u64> = 0x100..0x200;
const PATTERN: u8 = 0xa5;
/// The most slices a queue may take to run dry (a queue holds at most 256 chains).
const MAX_SLICES: usize = 64;
/// Peak RSS the fuzzer may add to the process.
const RSS_BOUND: u64 = 64 * MIB;

/// splitmix64: small, seedable, good enough to drive a fuzzer.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

/// What a chain's buffers hold.
#[derive(Clone, Copy)]
enum Kind {
    /// le32 PFNs (inflate, deflate).
    Pfns,
    /// A free page range (reporting).
    Range,
    /// Statistics entries.
    Stats,
    /// Any address and length.
    Any,
}

/// One fuzz case: the device, the driver's idea of its queues, and the pages the
/// guest offered so far.
struct Case {
    rng: Rng,
    rig: Rig,
    /// Where the fuzzer means its queues to be (what the device accepted may differ).
    layouts: Vec<RingLayout>,
    /// Next avail index the fuzzer writes, per queue.
    avail: Vec<u16>,
    /// Features of the last driver set-up.
    feats: u64,
    offered: Vec<bool>,
    /// The driver's memory at the last look (see [`Case::note_offered`]).
    seen: Vec<u8>,
}

impl Case {
    fn new(seed: u64) -> Case {
        let mut rng = Rng(seed);
        let cfg = BalloonConfig {
            deflate_on_oom: rng.chance(50),
            stats_interval: if rng.chance(70) { Duration::from_millis(1) } else { Duration::ZERO },
            free_page_reporting: rng.chance(80),
            per_page_discard: rng.chance(10),
            ..BalloonConfig::default()
        };
        let rig = Rig::new(RAM, cfg, "fuzz");
        for pfn in DATA_PFNS {
            rig.fill(pfn, PATTERN);
        }
        let layouts = (0..4).map(|q| slot_layout(q, 16)).collect();
        let mut offered = vec![false; RAM_PAGES as usize];
        offered[0] = true; // zeros anywhere name PFN 0
        Case { rng, rig, layouts, avail: vec![0; 4], feats: 0, offered, seen: Vec::new() }
    }

    /// Runs `ops` operations and the final checks; returns the device's counters.
    fn run(&mut self, ops: usize) -> BalloonSnapshot {
        if self.rng.chance(80) {
            self.set_up_driver();
        }
        for _ in 0..ops {
            match self.rng.below(100) {
                0..=19 => self.register_write(),
                20..=24 => self.register_read(),
                25..=29 => self.config_access(),
                30..=34 => self.set_up_driver(),
                35..=64 => self.post_chain(),
                65..=71 => self.scribble(),
                72..=94 => self.serve(),
                _ => self.control_path(),
            }
        }
        for q in 0..5 {
            self.serve_queue(q);
        }
        self.check_data_pages();
        self.rig.dev.lock().unwrap().snapshot()
    }

    // ---- registers -------------------------------------------------------------

    fn register_write(&mut self) {
        const REGS: [u64; 17] = [
            0x014, 0x020, 0x024, 0x030, 0x038, 0x044, 0x050, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4,
            0x0fc, 0x000,
        ];
        let offset = if self.rng.chance(85) { self.rng.pick(&REGS) } else { self.rng.below(0x100) };
        let v = match offset {
            0x080 | 0x090 | 0x0a0 => self.ring_address() as u32,
            0x084 | 0x094 | 0x0a4 => self.rng.pick(&[0, 0, 0, 1, u32::MAX]),
            0x038 => self.queue_size() as u32,
            0x070 => self.status_value(),
            0x020 => self.feature_word(),
            _ => self.word(),
        };
        let width = if self.rng.chance(90) { 4 } else { self.rng.pick(&[1, 2, 8]) };
        let bytes = (v as u64 | (self.word() as u64) << 32).to_le_bytes();
        self.rig.mmio.write(offset, &bytes[..width]);
    }

    fn register_read(&mut self) {
        let offset = self.rng.below(0x110);
        let mut data = [0u8; 8];
        let width = if self.rng.chance(90) { 4 } else { self.rng.pick(&[1, 2, 8]) };
        self.rig.mmio.read(offset, &mut data[..width]);
    }

    fn config_access(&mut self) {
        let offset = 0x100 + if self.rng.chance(80) { self.rng.pick(&[0, 4, 8, 12]) } else { self.rng.below(0xf00) };
        let width = self.rng.pick(&[4, 4, 4, 1, 2, 8]);
        if self.rng.chance(50) {
            let v = (self.word() as u64 | (self.word() as u64) << 32).to_le_bytes();
            self.rig.mmio.write(offset, &v[..width]);
        } else {
            let mut data = [0u8; 8];
            self.rig.mmio.read(offset, &mut data[..width]);
        }
    }

    /// A whole driver set-up: reset, features, queues, DRIVER_OK, each step
    /// sometimes wrong.
    fn set_up_driver(&mut self) {
        let offered = self.rig.dev.lock().unwrap().features();
        let mut feats = offered & self.rng.next() | 1 << 32;
        if self.rng.chance(10) {
            feats = self.rng.next();
        }
        let count = self.rig.dev.lock().unwrap().queue_count(feats).min(4);
        for q in 0..4 {
            let size = if self.rng.chance(85) { 1 << self.rng.below(9) } else { self.queue_size() };
            self.layouts[q] = if self.rng.chance(85) {
                slot_layout(q, size)
            } else {
                RingLayout { size, desc: self.ring_address(), avail: self.ring_address(), used: self.ring_address() }
            };
        }
        let layouts = self.layouts[..count].to_vec();
        self.rig.negotiate(feats, &layouts);
        self.feats = feats;
        self.avail = vec![0; 4];
    }

    // ---- guest memory ----------------------------------------------------------

    /// Builds a chain in queue `q`'s descriptor table and makes it available: its
    /// buffers are mostly of the kind the queue takes, sometimes of another kind or
    /// anything.
    fn post_chain(&mut self) {
        let q = self.rng.below(4) as usize;
        let l = self.layouts[q];
        if !(DRIVER_START..DRIVER_END).contains(&l.desc) || l.size == 0 {
            return self.scribble();
        }
        let fitting = match q {
            0 | 1 => Kind::Pfns,
            2 if self.feats & 1 << features::STATS_VQ != 0 => Kind::Stats,
            _ => Kind::Range,
        };
        let kind = if self.rng.chance(75) {
            fitting
        } else {
            self.rng.pick(&[Kind::Pfns, Kind::Range, Kind::Stats, Kind::Any])
        };
        let size = l.size.min(256);
        let head = if self.rng.chance(95) { self.rng.below(size as u64) as u16 } else { self.rng.next() as u16 };
        let len = match self.rng.below(20) {
            0 => 1 + self.rng.below(300) as u16,
            1..=4 => 2 + self.rng.below(4) as u16,
            _ => 1,
        };
        let mut index = head % size;
        for i in 0..len {
            let this = if self.rng.chance(95) { kind } else { Kind::Any };
            let (addr, bytes, mut flags) = self.buffer(this);
            if i + 1 < len {
                flags |= F_NEXT;
            }
            if self.rng.chance(3) {
                flags |= F_INDIRECT;
            }
            let next = if self.rng.chance(90) { (index + 1) % size } else { self.rng.next() as u16 };
            let d = l.desc + index as u64 * 16;
            if d + 16 <= DRIVER_END {
                let mem = self.rig.ram.mem();
                mem.write_obj(addr, GuestAddress(d)).unwrap();
                mem.write_obj(bytes, GuestAddress(d + 8)).unwrap();
                mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
                mem.write_obj(next, GuestAddress(d + 14)).unwrap();
            }
            index = next % size;
        }
        let idx = self.avail[q];
        let step = if self.rng.chance(95) { 1 } else { self.rng.next() as u16 };
        self.avail[q] = idx.wrapping_add(step);
        let mem = self.rig.ram.mem();
        let _ = mem.write_obj(head, GuestAddress(l.avail + 4 + (idx % size) as u64 * 2));
        let _ = mem.write_obj(self.avail[q], GuestAddress(l.avail + 2));
    }

    /// A buffer of `kind` for a descriptor: `(addr, len, flags)`, its content
    /// written.
    fn buffer(&mut self, kind: Kind) -> (u64, u32, u16) {
        let at = BUFFERS + self.rng.below(DRIVER_END - BUFFERS - 0x1000);
        match kind {
            Kind::Pfns => {
                let n = if self.rng.chance(90) { 1 + self.rng.below(64) } else { self.rng.below(1100) };
                let n = n.min((DRIVER_END - at) / 4);
                let clean = self.rng.chance(70);
                for i in 0..n {
                    let pfn = if clean { self.ram_pfn() } else { self.pfn() };
                    self.rig.ram.mem().write_obj(pfn, GuestAddress(at + 4 * i)).unwrap();
                }
                let len = if self.rng.chance(90) { 4 * n as u32 } else { self.word() };
                (at, len, if self.rng.chance(5) { F_WRITE } else { 0 })
            }
            Kind::Range => {
                let addr = if self.rng.chance(80) { self.ram_pfn() as u64 * 4096 } else { self.address() };
                let len = if self.rng.chance(80) { 4096 * (1 + self.rng.below(16)) as u32 } else { self.word() };
                (addr, len, if self.rng.chance(95) { F_WRITE } else { 0 })
            }
            Kind::Stats => {
                let n = if self.rng.chance(90) { 1 + self.rng.below(16) } else { self.rng.below(70) };
                let n = n.min((DRIVER_END - at) / 10);
                for i in 0..n {
                    let tag = self.rng.below(20) as u16;
                    let val = self.rng.next();
                    let mem = self.rig.ram.mem();
                    mem.write_obj(tag, GuestAddress(at + 10 * i)).unwrap();
                    mem.write_obj(val, GuestAddress(at + 10 * i + 2)).unwrap();
                }
                let len = if self.rng.chance(90) { 10 * n as u32 } else { self.word() };
                (at, len, if self.rng.chance(5) { F_WRITE } else { 0 })
            }
            Kind::Any => (self.address(), self.word(), self.rng.next() as u16 & (F_WRITE | F_NEXT)),
        }
    }

    /// Random bytes somewhere in the driver's memory (rings included).
    fn scribble(&mut self) {
        let n = 1 + self.rng.below(64);
        let at = DRIVER_START + self.rng.below(DRIVER_END - DRIVER_START - n);
        let bytes: Vec<u8> = (0..n).map(|_| self.rng.next() as u8).collect();
        self.rig.ram.mem().write_slice(&bytes, GuestAddress(at)).unwrap();
    }

    // ---- serving, control path, oracle -----------------------------------------

    fn serve(&mut self) {
        let q = self.rng.below(5) as usize;
        self.serve_queue(q);
    }

    fn serve_queue(&mut self, q: usize) {
        self.note_offered();
        let mut slices = 0;
        while self.rig.dev.lock().unwrap().process_queue(q) == Work::More {
            slices += 1;
            assert!(slices < MAX_SLICES, "queue {q} did not run dry in {MAX_SLICES} slices");
        }
    }

    fn control_path(&mut self) {
        let mut dev = self.rig.dev.lock().unwrap();
        let snap = dev.snapshot();
        assert!(snap.ballooned_pages <= RAM_PAGES);
        assert!(snap.actual_pages <= RAM_PAGES, "actual beyond RAM accepted");
        let target = self.rng.below(RAM_PAGES + 1) * 4096;
        dev.set_target(target).expect("a target within RAM is accepted");
        dev.request_stats();
        dev.tick();
    }

    /// Marks every page the driver's memory names right now: a le32 PFN at any
    /// byte, a page-aligned `(addr, len)` in any 16-byte descriptor slot. Only the
    /// pages of that memory that changed since the last look are read again.
    fn note_offered(&mut self) {
        const LEN: usize = (DRIVER_END - DRIVER_START) as usize;
        let mut mem = vec![0u8; LEN + 3];
        self.rig.ram.mem().read_slice(&mut mem, GuestAddress(DRIVER_START)).unwrap();
        for page in (0..LEN).step_by(4096) {
            // Windows starting in this page reach 3 bytes into the next one.
            let window = page..page + 4096 + 3;
            if self.seen.get(window.clone()) == Some(&mem[window.clone()]) {
                continue;
            }
            for w in mem[window].windows(4) {
                // A PFN of RAM has its two high bytes zero: most windows stop here.
                if w[3] == 0 && w[2] == 0 {
                    let pfn = u16::from_le_bytes([w[0], w[1]]) as u64;
                    if pfn < RAM_PAGES {
                        self.offered[pfn as usize] = true;
                    }
                }
            }
            for slot in mem[page..page + 4096].chunks_exact(16) {
                let addr = u64::from_le_bytes(slot[..8].try_into().unwrap());
                let len = u32::from_le_bytes(slot[8..12].try_into().unwrap()) as u64;
                if addr % 4096 == 0 && len % 4096 == 0 && addr < RAM && len <= RAM - addr {
                    for pfn in addr / 4096..(addr + len) / 4096 {
                        self.offered[pfn as usize] = true;
                    }
                }
            }
        }
        self.seen = mem;
    }

    fn check_data_pages(&self) {
        let mut page = [0u8; 4096];
        for pfn in DATA_PFNS {
            self.rig.ram.mem().read_slice(&mut page, GuestAddress(pfn * 4096)).unwrap();
            if page.iter().all(|&b| b == PATTERN) {
                continue;
            }
            let odd: Vec<(usize, u8)> = page.iter().copied().enumerate().filter(|&(_, b)| b != PATTERN).collect();
            let odd = (odd.len(), odd.first().copied(), odd.last().copied());
            assert!(page.iter().all(|&b| b == 0), "data page {pfn:#x} was written to: {odd:x?}");
            assert!(self.offered[pfn as usize], "data page {pfn:#x} was discarded, but the guest never offered it");
        }
    }

    // ---- values ----------------------------------------------------------------

    /// A ring address: in the driver's memory (aligned or not), at 0, outside RAM;
    /// never in the data pages or the rest of RAM (the oracle watches only the
    /// driver's memory for what the device writes).
    fn ring_address(&mut self) -> u64 {
        match self.rng.below(10) {
            0..=5 => {
                DRIVER_START + self.rng.below(8) * 0x1000 + if self.rng.chance(70) { 0 } else { self.rng.below(16) }
            }
            6 => DRIVER_START + self.rng.below(DRIVER_END - DRIVER_START - 0x1000),
            7 => 0,
            8 => self.rng.pick(&[RAM, RAM - 4, 0xd000_0000, 0xffff_fff0]),
            _ => RAM + self.rng.below(u32::MAX as u64 - RAM),
        }
    }

    fn queue_size(&mut self) -> u16 {
        if self.rng.chance(80) {
            1 << self.rng.below(9)
        } else {
            self.rng.pick(&[0, 3, 12, 257, 512, 1024, u16::MAX])
        }
    }

    fn status_value(&mut self) -> u32 {
        const BITS: [u32; 6] =
            [STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_FEATURES_OK, STATUS_DRIVER_OK, STATUS_FAILED, 0x40];
        match self.rng.below(10) {
            0 => 0,
            1 => self.word(),
            _ => BITS.iter().filter(|_| self.rng.chance(60)).fold(0, |a, b| a | b),
        }
    }

    fn feature_word(&mut self) -> u32 {
        let offered = self.rig.dev.lock().unwrap().features();
        match self.rng.below(4) {
            0 => self.word(),
            _ => (offered >> (32 * self.rng.below(2))) as u32 & self.rng.next() as u32 | 1,
        }
    }

    /// A PFN of guest RAM: mostly the data pages.
    fn ram_pfn(&mut self) -> u32 {
        match self.rng.below(10) {
            0..=7 => (DATA_PFNS.start + self.rng.below(DATA_PFNS.end - DATA_PFNS.start)) as u32,
            8 => (DRIVER_START / 4096 + self.rng.below((DRIVER_END - DRIVER_START) / 4096)) as u32,
            _ => self.rng.below(RAM_PAGES) as u32,
        }
    }

    fn pfn(&mut self) -> u32 {
        match self.rng.below(10) {
            0..=5 => (DATA_PFNS.start + self.rng.below(DATA_PFNS.end - DATA_PFNS.start)) as u32,
            6 => (DRIVER_START / 4096 + self.rng.below((DRIVER_END - DRIVER_START) / 4096)) as u32,
            7 => self.rng.pick(&[0, RAM_PAGES as u32, 0xd0000, u32::MAX]),
            _ => self.rng.next() as u32,
        }
    }

    fn address(&mut self) -> u64 {
        match self.rng.below(4) {
            0 => DRIVER_START + self.rng.below(DRIVER_END - DRIVER_START),
            1 => self.rng.pick(&[0, RAM - 4096, RAM, u64::MAX - 4095, 0xd000_0000]),
            _ => self.rng.next(),
        }
    }

    fn word(&mut self) -> u32 {
        match self.rng.below(4) {
            0 => self.rng.pick(&[0, 1, 2, 3, 4, 16, 256, 0x8000_0000, u32::MAX]),
            _ => self.rng.next() as u32,
        }
    }
}

/// The fuzzer's usual place for queue `q`: its own 16 KiB slot in the driver's memory.
fn slot_layout(q: usize, size: u16) -> RingLayout {
    let base = DRIVER_START + q as u64 * 0x4000;
    RingLayout { size, desc: base, avail: base + 0x1000, used: base + 0x2000 }
}

fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap();
    kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
}

/// Set in the process the fuzzer runs in.
const CHILD: &str = "VMM_FUZZ_CHILD";

fn env(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    Some(
        match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => v.parse(),
        }
        .unwrap_or_else(|e| panic!("{name}={v}: {e}")),
    )
}

#[test]
fn fuzz_the_balloon_through_its_transport() {
    // Peak RSS is the process's: under `cargo test` other tests run in this process
    // at the same time, so the fuzzer runs in a process of its own, this test
    // binary run again for this test alone.
    if std::env::var_os(CHILD).is_none() {
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "devices::virtio::fuzz::fuzz_the_balloon_through_its_transport"])
            .args(["--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .status()
            .expect("run the fuzzer in a process of its own");
        assert!(status.success(), "the fuzzer failed: {status}");
        return;
    }
    let seed = env("VMM_FUZZ_SEED").unwrap_or(0x5eed_ba11_0000_0014);
    let cases = env("VMM_FUZZ_CASES").unwrap_or(DEFAULT_CASES);
    let until = env("VMM_FUZZ_SECONDS").map(|s| Instant::now() + Duration::from_secs(s));
    let only = env("VMM_FUZZ_CASE");
    // A first case sets up everything the process keeps (allocator arenas, ...).
    Case::new(seed).run(10);
    let base = peak_rss();
    let start = Instant::now();
    let mut done = 0u64;
    let mut ops = 0u64;
    // What the cases reached, to show (and check) that the fuzzer gets deep.
    let mut reached: BTreeMap<String, u64> = BTreeMap::new();
    for case in 0.. {
        let more = match until {
            Some(t) => Instant::now() < t,
            None => case < cases,
        };
        if !more {
            break;
        }
        if only.is_some_and(|o| o != case) {
            continue;
        }
        let case_seed = Rng(seed ^ case.wrapping_mul(0x9e37_79b9_7f4a_7c15)).next();
        let n = 50 + (case_seed % 400) as usize;
        let snap = match std::panic::catch_unwind(|| Case::new(case_seed).run(n)) {
            Ok(snap) => snap,
            Err(e) => {
                eprintln!("fuzz case failed: replay with VMM_FUZZ_SEED={seed:#x} VMM_FUZZ_CASE={case}");
                std::panic::resume_unwind(e);
            }
        };
        done += 1;
        ops += n as u64;
        for (k, v) in [
            ("inflated_pages", snap.inflated_pages),
            ("deflated_pages", snap.deflated_pages),
            ("reported_pages", snap.reported_pages),
            ("stats_updates", snap.stats_updates),
            ("discard_calls", snap.discard_calls),
            ("needs_reset", snap.needs_reset as u64),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(snap.guest_error_kinds)
        {
            *reached.entry(k).or_default() += v;
        }
        let grown = peak_rss().saturating_sub(base);
        assert!(grown < RSS_BOUND, "peak RSS grew by {} MiB after case {case}", grown >> 20);
    }
    eprintln!(
        "fuzz: {done} cases, {ops} operations in {:.1} s (seed {seed:#x}), peak RSS +{} KiB; reached {reached:?}",
        start.elapsed().as_secs_f64(),
        peak_rss().saturating_sub(base) >> 10
    );
    if only.is_none() && done >= DEFAULT_CASES {
        for what in ["inflated_pages", "deflated_pages", "reported_pages", "stats_updates", "chain", "buffer", "ring"] {
            assert!(reached.get(what).is_some_and(|&n| n > 0), "no case reached {what}: {reached:?}");
        }
    }
}
