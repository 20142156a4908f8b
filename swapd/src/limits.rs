//! The limits the swapper works against, measured on this host: how fast the swap
//! directory takes plain large writes, how long one 4 KiB direct read from it takes
//! (the floor of a fault-in from the file), and what a bare userfaultfd fault costs
//! (the floor of every fault-in). `vmm bench swap` puts the swapper's figures next
//! to them.

use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

use pagestate::anon::{AnonMap, MemoryVm};
use pagestate::{Region, PAGE_SIZE};

use crate::file::AlignedBuf;
use crate::stats::AtomicHistogram;
use crate::{Config, Swapper};

/// Plain sequential `O_DIRECT` write throughput of `dir` (MiB/s), `mib` MiB in
/// writes of `chunk` bytes (the swapper's batch size), to a temporary file.
pub fn file_write_mib_s(dir: &Path, mib: usize, chunk: usize) -> io::Result<f64> {
    let path = dir.join(".swapd-write-test.tmp");
    let f =
        std::fs::OpenOptions::new().create(true).truncate(true).write(true).custom_flags(libc::O_DIRECT).open(&path)?;
    let buf = AnonMap::new(chunk)?;
    // SAFETY: the whole mapping, owned here.
    let b = unsafe { std::slice::from_raw_parts_mut(buf.addr() as *mut u8, chunk) };
    for (i, x) in b.iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(151) | 1; // not zero: no file system shortcut
    }
    let total = (mib << 20) / chunk * chunk;
    let t = Instant::now();
    let mut result = Ok(());
    for off in (0..total).step_by(chunk) {
        if let Err(e) = f.write_all_at(b, off as u64) {
            result = Err(e);
            break;
        }
    }
    let s = t.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    result.map(|()| total as f64 / (1 << 20) as f64 / s)
}

/// Latency of 4 KiB `O_DIRECT` reads at random offsets of the swap directory.
#[derive(Debug, Clone, Copy)]
pub struct DiskRead {
    /// Median and 99th percentile, microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Measures [`DiskRead`]: writes a `mib` MiB file in `dir` with `O_DIRECT` (so no
/// page of it is cached), then times `reads` single-page direct reads at
/// pseudo-random page offsets, one at a time as the fault thread does.
pub fn disk_read_4k(dir: &Path, mib: usize, reads: usize) -> io::Result<DiskRead> {
    let path = dir.join(".swapd-read-test.tmp");
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
    };
    let result = (|| {
        let f = open()?;
        let chunk = 1 << 20;
        let mut buf = AlignedBuf::new(chunk);
        for (i, x) in buf.iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(151) | 1;
        }
        for off in (0..mib << 20).step_by(chunk) {
            f.write_all_at(&buf, off as u64)?;
        }
        let pages = (mib << 20) / PAGE_SIZE;
        let h = AtomicHistogram::default();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..reads {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % pages as u64) * PAGE_SIZE as u64;
            let t = Instant::now();
            f.read_exact_at(&mut buf[..PAGE_SIZE], off)?;
            h.record(t.elapsed());
        }
        let s = h.snapshot();
        Ok(DiskRead { p50_us: s.p50_us, p99_us: s.p99_us })
    })();
    let _ = std::fs::remove_file(&path);
    result
}

/// Cost of a bare userfaultfd fault.
#[derive(Debug, Clone, Copy)]
pub struct BareFault {
    /// Per fault as the faulting thread sees it (fault, handler wake-up, zero-page
    /// ioctl, return), microseconds.
    pub round_trip_us: f64,
    /// The handler's share (median), microseconds.
    pub handler_us: f64,
    /// The same first read of fresh memory without userfaultfd (kernel zero-page
    /// fault), microseconds.
    pub kernel_us: f64,
}

/// Measures [`BareFault`] over `pages` first reads (a swapper's fault thread with
/// a throw-away swap file in `dir`, resolving each with one zero page).
pub fn bare_fault(dir: &Path, pages: usize) -> io::Result<BareFault> {
    let mem = AnonMap::new(pages * PAGE_SIZE)?;
    let mut cfg = Config::new(dir);
    cfg.register_eagerly = true;
    cfg.zero_fill_pages = 1;
    let region = Region { gpa: 0, host_addr: mem.addr(), len: mem.len() };
    let vm = MemoryVm::new("swapd-bare-fault", vec![region]);
    let sw = Swapper::new(vm, cfg).map_err(io::Error::other)?;
    let base = mem.addr();
    let t = Instant::now();
    // Another thread faults: the fault thread must not wait on itself.
    std::thread::spawn(move || {
        for p in 0..pages {
            // SAFETY: inside the mapping, which outlives the thread (joined below).
            unsafe { std::ptr::read_volatile((base + p * PAGE_SIZE) as *const u8) };
        }
    })
    .join()
    .map_err(|_| io::Error::other("fault thread panicked"))?;
    let round_trip_us = t.elapsed().as_secs_f64() * 1e6 / pages as f64;
    let handler_us = sw.stats().zero_fill.p50_us;
    drop(sw);
    let plain = AnonMap::new(pages * PAGE_SIZE)?;
    let t = Instant::now();
    for p in 0..pages {
        // SAFETY: inside the mapping.
        unsafe { std::ptr::read_volatile((plain.addr() + p * PAGE_SIZE) as *const u8) };
    }
    let kernel_us = t.elapsed().as_secs_f64() * 1e6 / pages as f64;
    Ok(BareFault { round_trip_us, handler_us, kernel_us })
}
