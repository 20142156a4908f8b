//! `vmm bench ...`: benchmarks a user can run. Each one measures a mechanism and the
//! baseline it should be judged against in the same run, prints a table and ends
//! with one JSON line (`{"bench": NAME, ...}`) for scripts.
//!
//! These hosts are noisy: every figure is a median over runs, and comparisons are
//! ratios taken within one run.

pub mod balloon;
pub mod boot;
pub mod swap;
pub mod tps;

use std::time::{Duration, Instant};

use crate::vm::Vm;

/// Polls `done` until it holds; fails if the guest ends or `limit` passes.
pub fn wait(vm: &Vm, limit: Duration, mut done: impl FnMut(&Vm) -> bool) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !done(vm) {
        if let Some(e) = vm.ending() {
            return Err(format!("benchmark guest ended: {e:?}"));
        }
        if Instant::now() > deadline {
            return Err(format!("benchmark step did not finish within {limit:?}"));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
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
