//! Measures the scanner on guest-RAM-like memory (no real guests): convergence time,
//! CPU, scan and merge costs.
//!
//! `cargo run -p tps --release --example measure -- [VMS] [MIB_PER_VM] [sparse]`
//! (default 4 x 256 MiB). Each "VM" holds 25% zero pages, 50% pages common to all
//! VMs (in the same order) and 25% pages of its own, written before the scanner
//! starts; `sparse`: 25% zero, 25% common, 50% own, interleaved page by page (every
//! merge is a run of one page: the worst case for mmap calls and VMAs). The
//! scanner runs with no rate limit; pauses cost nothing here (no vCPUs), so the
//! figures are the scanner's own work. Prints a table and a JSON line.

use std::time::{Duration, Instant};

use pagestate::anon::{AnonMap, MemoryVm};
use pagestate::{Region, PAGE_SIZE};
use tps::{Config, Scanner, Stats};

fn fill(addr: usize, key: u64) {
    let p = addr as *mut u64;
    for i in 0..PAGE_SIZE / 8 {
        let mut z = key.wrapping_add((i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        // SAFETY: `addr` is a page of memory this program mapped.
        unsafe { p.add(i).write(z ^ (z >> 31)) };
    }
}

fn per(n: u64, d: u64) -> f64 {
    if d == 0 {
        0.0
    } else {
        n as f64 / d as f64
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, default| args.get(i).map_or(default, |a| a.parse().expect("a number"));
    let (vms, mib): (usize, usize) = (num(0, 4), num(1, 256));
    let sparse = args.get(2).is_some_and(|a| a == "sparse");
    let pages = mib * (1 << 20) / PAGE_SIZE;
    let (zero, shared) = if sparse { (pages / 4, pages / 4) } else { (pages / 4, pages / 2) };
    // What page `i` holds: 0 zero, 1 common, 2 the VM's own.
    let kind = |i: usize| match (sparse, i) {
        (true, i) => [0, 1, 2, 2][i % 4],
        (false, i) if i < zero => 0,
        (false, i) if i < zero + shared => 1,
        _ => 2,
    };

    let t = Instant::now();
    let mems: Vec<AnonMap> = (0..vms).map(|_| AnonMap::new(pages * PAGE_SIZE).expect("map guest RAM")).collect();
    for (vm, m) in mems.iter().enumerate() {
        for i in 0..pages {
            let addr = m.addr() + i * PAGE_SIZE;
            match kind(i) {
                // SAFETY: a page of memory this program mapped.
                0 => unsafe { (addr as *mut u8).write(0) },
                1 => fill(addr, 0x5000_0000 + i as u64),
                _ => fill(addr, ((vm as u64 + 1) << 40) + i as u64),
            }
        }
    }
    println!("{vms} VMs x {mib} MiB written in {:.2} s", t.elapsed().as_secs_f64());

    let config = Config { pages_per_sec: 0, ..Config::default() };
    let scanner = Scanner::start(config).expect("scanner");
    for m in &mems {
        let region = Region { gpa: 0, host_addr: m.addr(), len: m.len() };
        scanner.add_vm(MemoryVm::new("measure", vec![region])).expect("add the VM");
    }
    // Achievable: every zero page, and all but one copy of each shared page.
    let achievable = ((zero * vms + shared * (vms - 1)) * PAGE_SIZE) as u64;
    let start = Instant::now();
    let mut converged: Option<(Duration, Stats)> = None;
    while converged.is_none() {
        std::thread::sleep(Duration::from_millis(5));
        let st = scanner.stats();
        assert!(start.elapsed() < Duration::from_secs(600), "no convergence: {st:?}");
        // Three passes without reaching it: the VMA limit held merges back.
        if st.bytes_saved * 100 >= achievable * 95 || st.full_passes >= 3 {
            converged = Some((start.elapsed(), st));
        }
    }
    let (converge, at) = converged.expect("converged");
    let first = scanner.stats().full_passes;
    assert!(scanner.wait_passes(first + 1, Duration::from_secs(600)));
    let full = scanner.stats();

    // Steady state: nothing left to merge; what does a pass cost?
    let before = scanner.stats();
    assert!(scanner.wait_passes(before.full_passes + 5, Duration::from_secs(600)));
    let after = scanner.stats();
    scanner.stop();

    let merged = at.merges + at.zero_pages_freed;
    let steady_pages = after.pages_scanned - before.pages_scanned;
    let steady_hashed = after.pages_hashed - before.pages_hashed;
    let steady_cpu = after.cpu_ns - before.cpu_ns;
    let steady_wall = after.uptime_ms - before.uptime_ms;
    println!(
        "converged to 95% of {} MiB in {} ms (or 3 passes, whichever came first)",
        achievable >> 20,
        converge.as_millis()
    );
    println!("  scanner CPU        {:>10.1} ms", at.cpu_ns as f64 / 1e6);
    println!(
        "  pages scanned      {:>10}   ({:.0} per CPU second)",
        at.pages_scanned,
        per(at.pages_scanned * 1_000_000_000, at.cpu_ns)
    );
    println!("  pages hashed       {:>10}", at.pages_hashed);
    println!("  merged             {:>10}   ({} onto the pool, {} zero)", merged, at.merges, at.zero_pages_freed);
    println!("  CPU per page       {:>10.2} us", per(at.cpu_ns, at.pages_scanned) / 1e3);
    println!("  batches            {:>10}   ({:.1} pages per batch)", at.batches, per(merged, at.batches));
    println!(
        "  apply time         {:>10.2} us per merged page (pauses, re-compare, mmap/madvise)",
        per(at.paused_us, merged)
    );
    println!("  mmap/madvise calls {:>10}   ({:.1} pages per call)", at.remap_calls, per(merged, at.remap_calls));
    println!(
        "after a full pass: saved {} MiB, pool {} pages, VMAs added {}, metadata {} KiB",
        full.bytes_saved >> 20,
        full.pool_pages,
        full.vmas_added,
        full.metadata_bytes >> 10
    );
    println!("steady state (5 passes, nothing to merge):");
    println!(
        "  {:.0} pages/s wall, {:.0} pages per CPU second, {:.0} pages hashed per CPU second",
        per(steady_pages * 1000, steady_wall),
        per(steady_pages * 1_000_000_000, steady_cpu),
        per(steady_hashed * 1_000_000_000, steady_cpu)
    );
    println!(
        "{{\"bench\":\"tps-measure\",\"vms\":{vms},\"mib_per_vm\":{mib},\"saved_mib\":{},\"converge_ms\":{},\"cpu_ms\":{},\
         \"pages_per_cpu_s\":{:.0},\"apply_us_per_page\":{:.2},\"steady_pages_per_cpu_s\":{:.0},\"steady_hashed_per_cpu_s\":{:.0},\"vmas_added\":{},\"remap_calls\":{}}}",
        full.bytes_saved >> 20,
        converge.as_millis(),
        at.cpu_ns / 1_000_000,
        per(at.pages_scanned * 1_000_000_000, at.cpu_ns),
        per(at.paused_us, merged),
        per(steady_pages * 1_000_000_000, steady_cpu),
        per(steady_hashed * 1_000_000_000, steady_cpu),
        full.vmas_added,
        at.remap_calls,
    );
}
