//! `vmm bench boot`: how fast the test guest starts, how fast it populates its
//! memory with 4 KiB host pages and with THP, and what the VMM itself costs in
//! memory.
//!
//! Baseline in the same run: the host populating the same amount of fresh
//! anonymous memory itself (4 KiB pages and THP), which is the floor under what a
//! guest can achieve (a guest adds the shadow-paging or EPT fault on top).

use std::time::{Duration, Instant};

use guest_abi::workload::Op;
use serde::Serialize;

use super::{median, print_table};
use crate::config::VmConfig;
use crate::host::{self, HostOptions, WatchLimits};
use crate::memory::HostPages;
use crate::units::format_size;

/// Parameters of the boot benchmark.
pub struct BootBench {
    /// Repetitions per configuration.
    pub runs: usize,
    /// Guest RAM.
    pub mem: u64,
    /// Amount the guest allocates (`alloc SIZE unique`).
    pub alloc: u64,
}

/// Medians of one page mode.
#[derive(Debug, Default, Serialize)]
pub struct ModeResult {
    /// `vmm` start (VM creation included) to the guest's first instruction.
    pub first_insn_ms: f64,
    /// ... to its first console line.
    pub first_output_ms: f64,
    /// Guest-measured time of `alloc SIZE unique`.
    pub alloc_ms: f64,
    /// Host populating the same size itself.
    pub host_populate_ms: f64,
    /// Process RSS minus guest RSS.
    pub vmm_overhead_mib: f64,
    /// KVM exits per run.
    pub exits: f64,
    /// KVM instruction emulations per run.
    pub insn_emulation: f64,
}

/// Runs the benchmark, prints the table and the JSON line.
pub fn run(b: &BootBench) -> Result<(), String> {
    let small = measure(b, HostPages::Small)?;
    let thp = measure(b, HostPages::Thp)?;
    let size = format_size(b.alloc);
    let mut rows = vec![vec![
        "host pages".to_string(),
        "first insn ms".into(),
        "first output ms".into(),
        format!("alloc {size} ms"),
        format!("host populate {size} ms"),
        "guest/host".into(),
        "VMM overhead MiB".into(),
        "exits".into(),
        "insn_emulation".into(),
    ]];
    for (name, r) in [("4 KiB", &small), ("THP", &thp)] {
        rows.push(vec![
            name.to_string(),
            format!("{:.2}", r.first_insn_ms),
            format!("{:.2}", r.first_output_ms),
            format!("{:.1}", r.alloc_ms),
            format!("{:.1}", r.host_populate_ms),
            format!("{:.2}", r.alloc_ms / r.host_populate_ms),
            format!("{:.1}", r.vmm_overhead_mib),
            format!("{:.0}", r.exits),
            format!("{:.0}", r.insn_emulation),
        ]);
    }
    println!("boot benchmark: {} MiB guest, alloc {size} unique, median of {} runs", b.mem >> 20, b.runs);
    print_table(&rows);
    let json = serde_json::json!({
        "bench": "boot",
        "runs": b.runs,
        "mem_mib": b.mem >> 20,
        "alloc_mib": b.alloc >> 20,
        "first_insn_ms": small.first_insn_ms,
        "first_output_ms": small.first_output_ms,
        "alloc_small_ms": small.alloc_ms,
        "alloc_thp_ms": thp.alloc_ms,
        "host_populate_small_ms": small.host_populate_ms,
        "host_populate_thp_ms": thp.host_populate_ms,
        "thp_speedup": small.alloc_ms / thp.alloc_ms,
        "vmm_overhead_mib": small.vmm_overhead_mib,
        "insn_emulation": small.insn_emulation,
    });
    println!("{json}");
    Ok(())
}

fn measure(b: &BootBench, pages: HostPages) -> Result<ModeResult, String> {
    let mut cols: [Vec<f64>; 7] = Default::default();
    for i in 0..b.runs {
        let mut cfg = VmConfig::new(format!("bench{i}"), b.mem);
        cfg.workload = format!("alloc {} unique; exit 0", b.alloc);
        cfg.host_pages = pages;
        let t0 = Instant::now();
        let limits = WatchLimits { timeout: Some(Duration::from_secs(300)), ..Default::default() };
        let report = host::run(&[cfg.clone()], t0, HostOptions::default(), limits).map_err(|e| e.to_string())?;
        let vm = &report.vms[0];
        if vm.exit_code != Some(0) {
            return Err(format!("benchmark guest failed: {:?}", vm.error));
        }
        let alloc_us = vm
            .steps
            .iter()
            .find(|s| s.op == Op::Alloc)
            .and_then(|s| s.us)
            .ok_or("no alloc step in the guest's output")? as f64;
        cols[0].push(vm.first_insn_ms.unwrap_or(f64::NAN));
        cols[1].push(vm.first_output_ms.unwrap_or(f64::NAN));
        cols[2].push(alloc_us / 1e3);
        cols[3].push(host_populate_ms(b.alloc, pages));
        cols[4].push(report.vmm_overhead_mib);
        cols[5].push(vm.counters.get("exits").copied().unwrap_or(0) as f64);
        cols[6].push(vm.counters.get("insn_emulation").copied().unwrap_or(0) as f64);
        log::info!("run {i} ({pages:?}): alloc {:.1} ms", alloc_us / 1e3);
    }
    let mut m = cols.iter_mut().map(|c| median(c));
    Ok(ModeResult {
        first_insn_ms: m.next().unwrap(),
        first_output_ms: m.next().unwrap(),
        alloc_ms: m.next().unwrap(),
        host_populate_ms: m.next().unwrap(),
        vmm_overhead_mib: m.next().unwrap(),
        exits: m.next().unwrap(),
        insn_emulation: m.next().unwrap(),
    })
}

/// Time for the host to write every page of `bytes` of fresh anonymous memory.
fn host_populate_ms(bytes: u64, pages: HostPages) -> f64 {
    let ram = crate::memory::GuestRam::new(bytes.max(crate::memory::MIN_MEM), pages).expect("map benchmark memory");
    let r = ram.host_regions()[0];
    let (host, len) = (r.host_addr as u64, r.len as u64);
    let t = Instant::now();
    for off in (0..len.min(bytes)).step_by(4096) {
        // SAFETY: `host + off` lies inside the mapping owned by `ram`.
        unsafe { std::ptr::write_volatile((host + off) as *mut u64, off | 1) };
    }
    t.elapsed().as_secs_f64() * 1e3
}
