//! `vmm bench ...`: benchmarks a user can run. Each one measures a mechanism and the
//! baseline it should be judged against in the same run, prints a table and ends
//! with one JSON line (`{"bench": NAME, ...}`) for scripts.
//!
//! These hosts are noisy: every figure is a median over runs, and comparisons are
//! ratios taken within one run.
//!
//! The helpers below (one VM's life, waiting on a guest, `verify`, medians, the
//! table) also serve `vmm demo`.

pub mod active;
pub mod balloon;
pub mod boot;
pub mod swap;
pub mod tps;

use std::time::{Duration, Instant};

use guest_abi::workload::Op;

use crate::config::VmConfig;
use crate::host::{Host, HostOptions};
use crate::vm::Vm;

/// Boots one VM of `config` (with the reclaimers of `opts`) on a [`Host`], hands
/// them to `f`, and tears everything down afterwards whatever `f` returned.
pub fn with_host<T>(
    config: VmConfig,
    opts: HostOptions,
    f: impl FnOnce(&Host) -> Result<T, String>,
) -> Result<T, String> {
    let mut host = Host::create(&[config], Instant::now(), opts).map_err(|e| e.to_string())?;
    let result = host.start().map_err(|e| e.to_string()).and_then(|()| f(&host));
    host.finish();
    result
}

/// Polls `done` until it holds; fails if the VM ends first or `limit` passes.
/// `what` says what is awaited ("to fill its memory").
pub fn wait(vm: &Vm, what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !done() {
        if let Some(e) = vm.ending() {
            return Err(format!("vm {} ended while waiting for it {what}: {e:?}", vm.name()));
        }
        if Instant::now() > deadline {
            return Err(format!("vm {} took longer than {limit:?} {what}", vm.name()));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

/// Waits until the test guest has run its boot workload and serves commands.
pub fn wait_serving(vm: &Vm, limit: Duration) -> Result<(), String> {
    wait(vm, "to run its workload", limit, || vm.progress().state == guest_abi::guest_state::SERVING)
}

/// Has the test guest check every page it holds (`verify`); fails unless it reports
/// no bad page.
pub fn verify(vm: &Vm, limit: Duration) -> Result<(), String> {
    let out = vm.run_command("verify", limit)?;
    let bad = out.steps().into_iter().find(|s| s.op == Op::Verify).map(|s| s.bad);
    match (out.status, bad) {
        (0, Some(Some(0))) => Ok(()),
        _ => Err(format!("vm {}: verify failed: {:?}", vm.name(), out.lines)),
    }
}

/// The median of `values` (NaN if empty).
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Prints rows as an aligned table (first row is the header).
pub fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(String::len).max().unwrap_or(0)).collect();
    for (i, row) in rows.iter().enumerate() {
        let line: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:>w$}")).collect();
        println!("{}", line.join("  "));
        if i == 0 {
            println!("{}", widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  "));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(super::median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(super::median(&mut []).is_nan());
    }
}
