//! Host-side benchmark of the swapper on plain anonymous memory (no guest): evict
//! a buffer of unique data, read it back sequentially and randomly from a thread
//! (real userfaultfd faults), and measure the limits: plain O_DIRECT write
//! throughput of the swap directory and the cost of a bare userfaultfd zero fault.
//!
//! `cargo run -p swapd --release --example swapbench -- [MiB] [DIR]` (root).

use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

use swapd::{Config, Region, Swapper, VictimPolicy, VmControl};

const PAGE: usize = 4096;

struct NoVm;

impl VmControl for NoVm {
    fn pause(&self) -> Option<Box<dyn Any>> {
        Some(Box::new(()))
    }
    fn skip_page(&self, _gpa: u64) -> bool {
        false
    }
    fn fatal(&self, error: String) {
        panic!("fatal: {error}");
    }
}

fn fill(base: usize, pages: usize) {
    for p in 0..pages {
        let w = (base + p * PAGE) as *mut u64;
        for i in 0..512 {
            // SAFETY: inside the mapping.
            unsafe { w.add(i).write(((p as u64) << 20 | i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1) };
        }
    }
}

fn check(base: usize, p: usize) {
    let w = (base + p * PAGE) as *const u64;
    // SAFETY: inside the mapping.
    let v = unsafe { std::ptr::read_volatile(w.add(5)) };
    assert_eq!(v, ((p as u64) << 20 | 5).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1, "page {p}");
}

fn run(mib: usize, dir: &std::path::Path, policy: VictimPolicy, prefetch: usize) -> serde_json::Value {
    let pages = mib * 256;
    let mem = swapd::limits::AnonMap::new(pages * PAGE).unwrap();
    let base = mem.addr();
    fill(base, pages);
    let mut cfg = Config::new(dir);
    cfg.victims = policy;
    cfg.prefetch_pages = prefetch;
    let sw =
        Swapper::with_config("bench", vec![Region { gpa: 0, host_addr: base, len: pages * PAGE }], Arc::new(NoVm), cfg)
            .unwrap();
    let t = Instant::now();
    let n = sw.swap_out(pages).unwrap();
    let evict_s = t.elapsed().as_secs_f64();
    assert_eq!(n, pages);
    let evict = sw.stats();

    // Sequential read-back of the first half, random of the second half.
    let half = pages / 2;
    let t = Instant::now();
    std::thread::spawn(move || (0..half).for_each(|p| check(base, p))).join().unwrap();
    let seq_s = t.elapsed().as_secs_f64();
    let seq = sw.stats();
    let mut order: Vec<usize> = (half..pages).collect();
    let mut r = 0x1234_5678u64;
    for i in (1..order.len()).rev() {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        order.swap(i, (r % (i as u64 + 1)) as usize);
    }
    let t = Instant::now();
    std::thread::spawn(move || order.iter().for_each(|&p| check(base, p))).join().unwrap();
    let rnd_s = t.elapsed().as_secs_f64();
    let all = sw.stats();
    let rnd_faults = all.pages_in - seq.pages_in;
    drop(sw);
    drop(mem);
    serde_json::json!({
        "policy": format!("{policy:?}").to_lowercase(),
        "prefetch_pages": prefetch,
        "evict_mib_s": mib as f64 / evict_s,
        "evict_s": evict_s,
        "batches": evict.batches,
        "batch_pause_p50_us": evict.pause.p50_us,
        "batch_pause_p99_us": evict.pause.p99_us,
        "seq_read_s": seq_s,
        "seq_faults": seq.pages_in,
        "seq_prefetched": seq.prefetched,
        "seq_fault_p50_us": seq.fault_in.p50_us,
        "seq_fault_p99_us": seq.fault_in.p99_us,
        "rnd_read_s": rnd_s,
        "rnd_faults": rnd_faults,
        "all_fault_p50_us": all.fault_in.p50_us,
        "all_fault_p99_us": all.fault_in.p99_us,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).map(|s| s.parse().unwrap()).unwrap_or(256);
    let dir = std::path::PathBuf::from(args.get(2).cloned().unwrap_or_else(|| "/tmp/swapbench".into()));
    std::fs::create_dir_all(&dir).unwrap();
    let fw = swapd::limits::file_write_mib_s(&dir, mib.min(512), 1 << 20).unwrap();
    let swapd::limits::BareFault { round_trip_us: rt, handler_us: handler, kernel_us: kernel } =
        swapd::limits::bare_fault(&dir, 16384).unwrap();
    println!("swap directory {}: plain O_DIRECT write {fw:.0} MiB/s", dir.display());
    println!(
        "bare userfaultfd zero fault: {rt:.1} us round trip (handler {handler:.1} us); kernel zero fault {kernel:.2} us"
    );
    println!(
        "{:>7} {:>4} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "victims", "pf", "evict", "seq s", "seq flt", "seq p50", "seq p99", "rnd s", "rnd p99"
    );
    let mut rows = Vec::new();
    for (policy, pf) in [(VictimPolicy::Idle, 16), (VictimPolicy::Idle, 1), (VictimPolicy::Random, 16)] {
        let r = run(mib, &dir, policy, pf);
        println!(
            "{:>7} {:>4} {:>5.0} MiB/s {:>7.2} {:>9} {:>7.1}us {:>7.1}us {:>9.2} {:>7.1}us",
            r["policy"].as_str().unwrap(),
            pf,
            r["evict_mib_s"].as_f64().unwrap(),
            r["seq_read_s"].as_f64().unwrap(),
            r["seq_faults"],
            r["seq_fault_p50_us"].as_f64().unwrap(),
            r["seq_fault_p99_us"].as_f64().unwrap(),
            r["rnd_read_s"].as_f64().unwrap(),
            r["all_fault_p99_us"].as_f64().unwrap(),
        );
        rows.push(r);
    }
    let first = &rows[0];
    println!(
        "{}",
        serde_json::json!({
            "bench": "swapd-host",
            "mib": mib,
            "evict_mib_s": first["evict_mib_s"],
            "fault_p50_us": first["all_fault_p50_us"],
            "fault_p99_us": first["all_fault_p99_us"],
            "file_write_mib_s": fw,
            "uffd_fault_us": rt,
            "uffd_handler_us": handler,
            "runs": rows,
        })
    );
    let _ = std::fs::remove_dir(&dir);
}
