//! `vmm bench active`: the active memory sampler against the truth, and what it
//! costs.
//!
//! For each sample size `n` and working set `X`, one VM allocates `X` and then only
//! reads it (`for ... { read X; idle 5ms }`) while the sampler runs; after a
//! warm-up, the estimate at each of the next periods is compared with `X / mem`.
//! The error is in percent of the VM's memory (so a working set of 0 has one too),
//! and should be near the standard error `100 * sqrt(f (1 - f) / n)` the table
//! shows. The costs are the sampler's own figures: CPU per period, guest faults per
//! period (at most `n`), time the VM is held paused per period.
//!
//! Baseline in the same run: the guest's throughput over its working set (`work X
//! 500ms`, pages read at random per second, median of five) without sampling,
//! against the same with sampling; the ratio is what sampling costs the guest. The
//! JSON line's figures are medians over the configurations, except
//! `mean_abs_error_pct`, the mean.

use std::time::Duration;

use serde::Serialize;

use super::{median, print_table, wait_serving, with_host};
use crate::config::VmConfig;
use crate::host::HostOptions;
use crate::reclaim::active::{ActiveOptions, ActiveStats};
use crate::reclaim::policy::{HostMemChoice, PolicyOptions};
use crate::units::format_size;
use crate::vm::Vm;

/// Parameters of the benchmark.
pub struct ActiveBench {
    /// Guest RAM.
    pub mem: u64,
    /// Working sets to measure.
    pub sizes: Vec<u64>,
    /// Sample sizes to measure.
    pub samples: Vec<usize>,
    /// Sampling period.
    pub period: Duration,
    /// Periods measured (after two of warm-up).
    pub periods: u64,
}

/// One configuration's results.
#[derive(Debug, Serialize)]
pub struct Row {
    /// Working set, MiB.
    pub working_set_mib: u64,
    /// Pages watched per period.
    pub samples: usize,
    /// The truth, percent of memory.
    pub truth_pct: f64,
    /// Median estimate over the measured periods, percent of memory.
    pub estimate_pct: f64,
    /// Mean absolute error, percent of memory.
    pub mean_abs_error_pct: f64,
    /// Standard error of one period's fraction, percent of memory.
    pub std_error_pct: f64,
    /// Sampler CPU per period, microseconds.
    pub cpu_us_per_period: f64,
    /// Guest faults caused per period.
    pub faults_per_period: f64,
    /// VM held paused per period, microseconds.
    pub pause_us_per_period: f64,
    /// Guest throughput with sampling over that without.
    pub throughput_ratio: f64,
}

/// Runs the benchmark, prints the table and the JSON line.
pub fn run(b: &ActiveBench) -> Result<(), String> {
    let mut rows = Vec::new();
    for &x in &b.sizes {
        let baseline = measure(b, x, None)?.1;
        for &n in &b.samples {
            let (row, rate) = measure(b, x, Some(n))?;
            let mut row = row.expect("sampling on");
            row.throughput_ratio = rate / baseline;
            rows.push(row);
        }
    }
    let mut table = vec![vec![
        "X".to_string(),
        "n".into(),
        "truth %".into(),
        "estimate %".into(),
        "|error| %".into(),
        "std error %".into(),
        "cpu us/period".into(),
        "faults/period".into(),
        "pause us/period".into(),
        "guest ops ratio".into(),
    ]];
    for r in &rows {
        table.push(vec![
            format_size(r.working_set_mib << 20),
            r.samples.to_string(),
            format!("{:.1}", r.truth_pct),
            format!("{:.1}", r.estimate_pct),
            format!("{:.2}", r.mean_abs_error_pct),
            format!("{:.2}", r.std_error_pct),
            format!("{:.0}", r.cpu_us_per_period),
            format!("{:.1}", r.faults_per_period),
            format!("{:.0}", r.pause_us_per_period),
            format!("{:.3}", r.throughput_ratio),
        ]);
    }
    print_table(&table);
    let all = |f: fn(&Row) -> f64| median(&mut rows.iter().map(f).filter(|v| !v.is_nan()).collect::<Vec<_>>());
    let mean_err = rows.iter().map(|r| r.mean_abs_error_pct).sum::<f64>() / rows.len().max(1) as f64;
    let line = serde_json::json!({
        "bench": "active",
        "mem_mib": b.mem >> 20,
        "period_ms": b.period.as_millis() as u64,
        "mean_abs_error_pct": mean_err,
        "cpu_us_per_period": all(|r| r.cpu_us_per_period),
        "faults_per_period": all(|r| r.faults_per_period),
        "pause_us_per_period": all(|r| r.pause_us_per_period),
        "throughput_ratio": all(|r| r.throughput_ratio),
        "rows": rows,
    });
    println!("{line}");
    Ok(())
}

/// One VM with working set `x` and `n` samples per period (None: no sampling):
/// the row (with sampling) and the guest's throughput (pages per second).
fn measure(b: &ActiveBench, x: u64, n: Option<usize>) -> Result<(Option<Row>, f64), String> {
    let mut config = VmConfig::new("active", b.mem);
    config.workload = if x == 0 { String::new() } else { format!("alloc {}K unique", x >> 10) };
    config.balloon = None;
    let policy = PolicyOptions {
        host_mem: HostMemChoice::Budget(64 << 30),
        active: n.map(|samples| ActiveOptions { period: b.period, samples }),
        ..PolicyOptions::default()
    };
    let opts = HostOptions { policy: Some(policy), ..HostOptions::default() };
    with_host(config, opts, |host| {
        let vm = &host.vms()[0];
        wait_serving(vm, Duration::from_secs(120))?;
        // First the throughput (the guest serves one command at a time), then the
        // reads for as long as the VM lives.
        let rate = throughput(vm, x)?;
        let reads =
            if x == 0 { "idle 3600s".to_string() } else { format!("for 3600s {{ read {}K; idle 5ms }}", x >> 10) };
        let row = match n {
            Some(n) => Some(estimate(b, host, vm, x, n, &reads)?),
            None => None,
        };
        Ok((row, rate))
    })
}

/// Runs the reads in the background and compares the estimates with the truth.
fn estimate(b: &ActiveBench, host: &crate::host::Host, vm: &Vm, x: u64, n: usize, reads: &str) -> Result<Row, String> {
    let stats = || -> Option<ActiveStats> { host.shared().policy()?.allocation(vm.name())?.active };
    crate::config::check_workload(reads).map_err(|e| e.to_string())?;
    let shared = vm.shared().clone();
    let reads = reads.to_string();
    // The command ends with the VM (torn down by with_host): its result is moot.
    std::thread::spawn(move || shared.run_command(&reads, Duration::from_secs(3600)));
    let truth = x as f64 / b.mem as f64;
    let periods = |s: &Option<ActiveStats>| s.as_ref().map_or(0, |s| s.estimate.periods);
    let limit = b.period * (b.periods as u32 + 4) * 20;
    let start = periods(&stats());
    let mut seen = start;
    let mut errors = Vec::new();
    let mut estimates = Vec::new();
    super::wait(vm, "to sample", limit, || {
        let s = stats();
        let p = periods(&s);
        if p > seen {
            seen = p;
            if p > start + 2 {
                let f = s.and_then(|s| s.estimate.fraction()).unwrap_or(f64::NAN);
                estimates.push(f * 100.0);
                errors.push((f - truth).abs() * 100.0);
            }
        }
        errors.len() as u64 >= b.periods
    })?;
    let s = stats().ok_or("no sampler figures")?;
    if let Some(e) = s.error {
        return Err(format!("sampling failed: {e}"));
    }
    Ok(Row {
        working_set_mib: x >> 20,
        samples: n,
        truth_pct: truth * 100.0,
        estimate_pct: median(&mut estimates),
        mean_abs_error_pct: errors.iter().sum::<f64>() / errors.len() as f64,
        std_error_pct: 100.0 * (truth * (1.0 - truth) / n as f64).sqrt(),
        cpu_us_per_period: s.cpu_us_per_period,
        faults_per_period: s.faults_per_period,
        pause_us_per_period: s.pause_us_per_period,
        throughput_ratio: f64::NAN,
    })
}

/// Pages per second the guest reads at random over its working set: the median of
/// five half-second runs (NaN for an empty working set).
fn throughput(vm: &Vm, x: u64) -> Result<f64, String> {
    if x == 0 {
        return Ok(f64::NAN);
    }
    let out = vm.run_command(&format!("repeat 5 {{ work {}K 500ms }}", x >> 10), Duration::from_secs(60))?;
    let mut rates: Vec<f64> = out.steps().into_iter().filter_map(|s| s.ops_per_sec).map(|r| r as f64).collect();
    if rates.len() != 5 {
        return Err(format!("no work results: {:?}", out.lines));
    }
    Ok(median(&mut rates))
}
