//! `vmm bench balloon`: inflate a balloon of a guest that touched all its memory,
//! then deflate it, with the host freeing inflated pages as merged ranges (the
//! device's way) and, in the same run, with one `madvise` per page (the baseline
//! that the range merging is measured against).
//!
//! The guest is the test guest with its balloon driver (free page reporting off,
//! so only the balloon frees memory); inflation counts from the new target until
//! the device holds every page and the driver's `actual` says so.

use std::time::{Duration, Instant};

use super::{median, print_table, wait, wait_serving, with_host};
use crate::config::VmConfig;
use crate::host::HostOptions;
use crate::units::format_size;
use crate::vm::Vm;

/// Parameters of the balloon benchmark.
pub struct BalloonBench {
    /// Guest RAM.
    pub mem: u64,
    /// Balloon size to inflate to.
    pub inflate: u64,
    /// Repetitions per mode.
    pub runs: usize,
}

struct Sample {
    inflate_ms: f64,
    deflate_ms: f64,
    rss_before_mib: f64,
    rss_after_mib: f64,
    discard_calls: u64,
    /// Time the device spent in `madvise` during the inflate.
    discard_ms: f64,
}

/// Runs the benchmark, prints the table and the JSON line.
pub fn run(b: &BalloonBench) -> Result<(), String> {
    let mut results = Vec::new();
    for per_page in [false, true] {
        let mut samples = Vec::new();
        for i in 0..b.runs {
            let s = measure(b, per_page)?;
            log::info!(
                "{} run {i}: inflate {:.1} ms, deflate {:.1} ms",
                if per_page { "per-page" } else { "ranges" },
                s.inflate_ms,
                s.deflate_ms
            );
            samples.push(s);
        }
        results.push(samples);
    }
    let med = |v: &[Sample], f: fn(&Sample) -> f64| median(&mut v.iter().map(f).collect::<Vec<_>>());
    let pages = (b.inflate / guest_abi::PAGE_SIZE) as f64;
    let mut rows = vec![vec![
        "host freeing".to_string(),
        "inflate ms".into(),
        "pages/s".into(),
        "deflate ms".into(),
        "RSS before MiB".into(),
        "RSS after MiB".into(),
        "madvise calls".into(),
        "madvise ms".into(),
    ]];
    for (name, r) in ["merged ranges", "one madvise per page"].iter().zip(&results) {
        let inflate = med(r, |s| s.inflate_ms);
        rows.push(vec![
            name.to_string(),
            format!("{inflate:.1}"),
            format!("{:.0}", pages / (inflate / 1e3)),
            format!("{:.1}", med(r, |s| s.deflate_ms)),
            format!("{:.0}", med(r, |s| s.rss_before_mib)),
            format!("{:.0}", med(r, |s| s.rss_after_mib)),
            format!("{:.0}", med(r, |s| s.discard_calls as f64)),
            format!("{:.1}", med(r, |s| s.discard_ms)),
        ]);
    }
    println!(
        "balloon benchmark: {} guest, inflate {} then deflate, median of {} runs",
        format_size(b.mem),
        format_size(b.inflate),
        b.runs
    );
    print_table(&rows);
    let (ranges, per_page) = (&results[0], &results[1]);
    let inflate_ms = med(ranges, |s| s.inflate_ms);
    let per_page_ms = med(per_page, |s| s.inflate_ms);
    let json = serde_json::json!({
        "bench": "balloon",
        "runs": b.runs,
        "mem_mib": b.mem >> 20,
        "inflate_mib": b.inflate >> 20,
        "inflate_ms": inflate_ms,
        "inflate_pages_s": pages / (inflate_ms / 1e3),
        "deflate_ms": med(ranges, |s| s.deflate_ms),
        "rss_before_mib": med(ranges, |s| s.rss_before_mib),
        "rss_after_mib": med(ranges, |s| s.rss_after_mib),
        "rss_drop_mib": med(ranges, |s| s.rss_before_mib - s.rss_after_mib),
        "madvise_ms": med(ranges, |s| s.discard_ms),
        "per_page_inflate_ms": per_page_ms,
        "per_page_madvise_ms": med(per_page, |s| s.discard_ms),
        "per_page_over_ranges": per_page_ms / inflate_ms,
    });
    println!("{json}");
    Ok(())
}

fn measure(b: &BalloonBench, per_page: bool) -> Result<Sample, String> {
    let mut cfg = VmConfig::new("bench", b.mem);
    cfg.workload = String::new(); // serve commands at once
    let mut balloon = cfg.balloon.clone().unwrap_or_default();
    balloon.free_page_reporting = false; // measure the balloon alone
    balloon.per_page_discard = per_page;
    cfg.balloon = Some(balloon);
    with_host(cfg, HostOptions::default(), |host| inflate_and_deflate(b, &host.vms()[0]))
}

fn inflate_and_deflate(b: &BalloonBench, vm: &Vm) -> Result<Sample, String> {
    wait_serving(vm, Duration::from_secs(60))?;
    // Touch every free frame of the guest, then give them back to its allocator:
    // all of its memory is resident on the host and free in the guest.
    let touch = vm.progress().free_pages * guest_abi::PAGE_SIZE;
    let out = vm.run_command(&format!("alloc {touch} zero; free {touch}"), Duration::from_secs(300))?;
    if out.status != 0 {
        return Err(format!("the benchmark guest could not touch its memory: {:?}", out.lines));
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let rss_before = mib(vm.ram().resident_bytes());
    let dev = vm.balloon().ok_or("the VM has no balloon")?.clone();
    let target = b.inflate / guest_abi::PAGE_SIZE;
    let t = Instant::now();
    vm.shared().set_balloon_target(b.inflate).map_err(|e| e.to_string())?;
    wait(vm, "to inflate its balloon", Duration::from_secs(300), || {
        let s = dev.lock().unwrap().snapshot();
        s.ballooned_pages >= target && s.actual_pages >= target
    })?;
    let inflate_ms = t.elapsed().as_secs_f64() * 1e3;
    let rss_after = mib(vm.ram().resident_bytes());
    let s = dev.lock().unwrap().snapshot();
    let (discard_calls, discard_ms) = (s.discard_calls, s.discard_ms);
    let t = Instant::now();
    vm.shared().set_balloon_target(0).map_err(|e| e.to_string())?;
    wait(vm, "to deflate its balloon", Duration::from_secs(300), || {
        let s = dev.lock().unwrap().snapshot();
        s.ballooned_pages == 0 && s.actual_pages == 0
    })?;
    let deflate_ms = t.elapsed().as_secs_f64() * 1e3;
    Ok(Sample {
        inflate_ms,
        deflate_ms,
        rss_before_mib: rss_before,
        rss_after_mib: rss_after,
        discard_calls,
        discard_ms,
    })
}
