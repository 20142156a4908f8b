//! `vmm bench swap`: evict about 1 GiB of a guest's data to its swap file, then let
//! the guest read it back with `verify`, and put the figures next to the two limits
//! the swapper works against, measured in the same run: plain `O_DIRECT` write
//! throughput of the swap directory and the cost of a bare userfaultfd fault.
//!
//! The guest reads its pages in ascending order; what makes the read-back
//! sequential or random for the swap file is the order the pages were evicted in:
//! - **guest order**: every page evicted in ascending guest-physical order, so a
//!   fault's neighbours sit in the adjacent slots and prefetch brings them along;
//! - **random** (the swapper's default victim choice, as ESX): each batch holds
//!   pages from all over guest RAM, so consecutive guest reads hit scattered slots.
//!
//! A second, smaller run compares the victim choices by the faults the guest takes
//! afterwards: the guest writes 256 MiB, frees all but 16 MiB (freed pages stay
//! resident on the host, and are cold), keeps rewriting the 16 MiB it holds, and the
//! host evicts 128 MiB; then the guest rewrites its 16 MiB again. Random victims
//! hit the hot pages in proportion; idle-aware ones (KVM's dirty log, fed every
//! 100 ms) should take the cold ones.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{print_table, verify, wait_serving, with_host};
use crate::config::VmConfig;
use crate::devices::virtio::balloon::BalloonConfig;
use crate::host::{Host, HostOptions};
use crate::reclaim::swap::{self as vm_swap, DirtyLog, SwapOptions};
use crate::units::format_size;

/// Parameters of the swap benchmark.
pub struct SwapBench {
    /// Guest data to evict (the guest allocates this much `unique`).
    pub evict: u64,
    /// Swap directory.
    pub dir: PathBuf,
}

/// The two eviction orders, in table order.
const ORDERS: [&str; 2] = ["guest order", "random"];

struct Sample {
    evicted_mib: f64,
    evict_s: f64,
    read_s: f64,
    faults: u64,
    prefetched: u64,
    fault_p50_us: f64,
    fault_p99_us: f64,
    pause_p50_us: f64,
}

/// Runs the benchmark, prints the table and the JSON line.
pub fn run(b: &SwapBench) -> Result<(), String> {
    vm_swap::prepare_dir(&b.dir).map_err(|e| e.to_string())?;
    let file_write = swapd::limits::file_write_mib_s(&b.dir, 512, swapd::Config::new(&b.dir).batch_pages * 4096)
        .map_err(|e| format!("write test in {}: {e}", b.dir.display()))?;
    let bare = swapd::limits::bare_fault(&b.dir, 16384).map_err(|e| format!("bare userfaultfd fault: {e}"))?;
    let mut samples = Vec::new();
    for (i, order) in ORDERS.iter().enumerate() {
        let s = measure(b, i == 0)?;
        log::info!("{order}: evicted {:.0} MiB in {:.2} s, read back in {:.2} s", s.evicted_mib, s.evict_s, s.read_s);
        samples.push(s);
    }
    let mut rows = vec![vec![
        "eviction order".to_string(),
        "evicted MiB".into(),
        "evict MiB/s".into(),
        "read-back s".into(),
        "faults".into(),
        "prefetched".into(),
        "fault p50 us".into(),
        "fault p99 us".into(),
        "guest us/page".into(),
        "pause p50 us".into(),
        "total s".into(),
    ]];
    for (order, s) in ORDERS.iter().zip(&samples) {
        rows.push(vec![
            order.to_string(),
            format!("{:.0}", s.evicted_mib),
            format!("{:.0}", s.evicted_mib / s.evict_s),
            format!("{:.2}", s.read_s),
            s.faults.to_string(),
            s.prefetched.to_string(),
            format!("{:.1}", s.fault_p50_us),
            format!("{:.1}", s.fault_p99_us),
            format!("{:.1}", s.read_s * 1e6 / (s.evicted_mib * 256.0)),
            format!("{:.0}", s.pause_p50_us),
            format!("{:.2}", s.evict_s + s.read_s),
        ]);
    }
    println!("swap benchmark: {} of guest data, swap directory {}", format_size(b.evict), b.dir.display());
    print_table(&rows);
    println!(
        "limits: plain O_DIRECT write {file_write:.0} MiB/s; bare userfaultfd fault {:.1} us \
         (handler {:.1} us; kernel zero-page fault {:.2} us)",
        bare.round_trip_us, bare.handler_us, bare.kernel_us
    );
    let mut victims = Vec::new();
    for policy in [swapd::VictimPolicy::Random, swapd::VictimPolicy::Idle] {
        let v = victim_faults(&b.dir, policy)?;
        log::info!("{policy:?} victims: {} pages read back in {} faults", v.read_back, v.faults);
        victims.push(v);
    }
    let mut rows = vec![vec![
        "victims".to_string(),
        "evicted MiB".into(),
        "pages read back".into(),
        "faults after".into(),
        "prefetched after".into(),
    ]];
    for (name, v) in ["random", "idle (dirty log)"].iter().zip(&victims) {
        rows.push(vec![
            name.to_string(),
            format!("{:.0}", v.evicted_mib),
            v.read_back.to_string(),
            v.faults.to_string(),
            v.prefetched.to_string(),
        ]);
    }
    println!("victim choice: 16 MiB hot, 240 MiB freed by the guest (cold), 128 MiB evicted");
    print_table(&rows);
    let (seq, rnd) = (&samples[0], &samples[1]);
    let json = serde_json::json!({
        "bench": "swap",
        "evict_mib": b.evict >> 20,
        "evict_mib_s": rnd.evicted_mib / rnd.evict_s,
        "fault_p50_us": rnd.fault_p50_us,
        "fault_p99_us": rnd.fault_p99_us,
        "read_back_s": rnd.read_s,
        "total_s": rnd.evict_s + rnd.read_s,
        "faults": rnd.faults,
        "seq_evict_mib_s": seq.evicted_mib / seq.evict_s,
        "seq_fault_p50_us": seq.fault_p50_us,
        "seq_fault_p99_us": seq.fault_p99_us,
        "seq_read_back_s": seq.read_s,
        "seq_faults": seq.faults,
        "seq_prefetched": seq.prefetched,
        "file_write_mib_s": file_write,
        "uffd_fault_us": bare.round_trip_us,
        "uffd_handler_us": bare.handler_us,
        "kernel_fault_us": bare.kernel_us,
        "evict_over_file_write": (rnd.evicted_mib / rnd.evict_s) / file_write,
        "fault_p50_over_uffd": rnd.fault_p50_us / bare.round_trip_us,
        "random_victim_faults": victims[0].faults,
        "idle_victim_faults": victims[1].faults,
        "random_victim_read_back": victims[0].read_back,
        "idle_victim_read_back": victims[1].read_back,
    });
    println!("{json}");
    Ok(())
}

/// One guest: allocate, evict (in guest order or at random), read back.
fn measure(b: &SwapBench, guest_order: bool) -> Result<Sample, String> {
    // Room for the data, the guest's bookkeeping and its kernel.
    let mut cfg = VmConfig::new("swapbench", b.evict + (b.evict / 8).max(64 << 20));
    cfg.workload = format!("alloc {} unique", b.evict);
    let opts = HostOptions { swap: Some(SwapOptions::new(&b.dir)), ..HostOptions::default() };
    with_host(cfg, opts, |host| evict_and_read(host, guest_order))
}

/// The swapper registers guest RAM with its userfaultfd at the first eviction: the
/// guest fills its memory at full speed before.
fn evict_and_read(host: &Host, guest_order: bool) -> Result<Sample, String> {
    let vm = &host.vms()[0];
    wait_serving(vm, Duration::from_secs(600))?;
    let sw = host.swapper(0).expect("a swapper");
    let resident = vm.ram().resident_bytes() / guest_abi::PAGE_SIZE;
    let t = Instant::now();
    let reclaimed = if guest_order {
        let gpas: Vec<u64> = vm
            .ram()
            .regions()
            .iter()
            .flat_map(|r| (r.base..r.base + r.size).step_by(guest_abi::PAGE_SIZE as usize))
            .collect();
        sw.swap_out_gpas(&gpas)
    } else {
        sw.swap_out(resident as usize)
    }
    .map_err(|e| format!("eviction: {e}"))?;
    let evict_s = t.elapsed().as_secs_f64();
    let evicted = sw.stats();
    let t = Instant::now();
    verify(vm, Duration::from_secs(600)).map_err(|e| format!("after swapping: {e}"))?;
    let read_s = t.elapsed().as_secs_f64();
    let s = sw.stats();
    Ok(Sample {
        evicted_mib: reclaimed as f64 / 256.0,
        evict_s,
        read_s,
        faults: s.pages_in - evicted.pages_in,
        prefetched: s.prefetched - evicted.prefetched,
        fault_p50_us: s.fault_in.p50_us,
        fault_p99_us: s.fault_in.p99_us,
        pause_p50_us: s.pause.p50_us,
    })
}

/// What one victim choice cost the guest afterwards.
pub struct VictimSample {
    /// Evicted (written or zero), MiB.
    pub evicted_mib: f64,
    /// Pages read back from the file while the guest rewrote and checked its 16 MiB.
    pub read_back: u64,
    /// Faults that read them (the rest came with prefetch).
    pub faults: u64,
    /// Pages brought by prefetch.
    pub prefetched: u64,
}

/// The victim comparison's scenario (module doc) with swap files in `dir`.
pub fn victim_faults(dir: &Path, policy: swapd::VictimPolicy) -> Result<VictimSample, String> {
    let mut cfg = VmConfig::new("victims", 320 << 20);
    cfg.workload = "alloc 256M unique; free 240M".into();
    // The freed 240 MiB must stay resident (a guest that does not report its free
    // memory): that is what idle victims should find.
    cfg.balloon = Some(BalloonConfig { free_page_reporting: false, ..BalloonConfig::default() });
    let mut swap = SwapOptions::new(dir);
    swap.victims = policy;
    with_host(cfg, HostOptions { swap: Some(swap), ..HostOptions::default() }, |host| {
        let vm = &host.vms()[0];
        wait_serving(vm, Duration::from_secs(600))?;
        let sw = host.swapper(0).expect("a swapper");
        let log = match policy {
            swapd::VictimPolicy::Idle => {
                Some(DirtyLog::enable(vm.memory_slots().clone()).map_err(|e| format!("dirty log: {e}"))?)
            }
            swapd::VictimPolicy::Random => None,
        };
        // The guest keeps its 16 MiB hot while the host reads the dirty log.
        std::thread::scope(|s| {
            let guest = s.spawn(|| vm.run_command("repeat 10 { touch 16M; idle 50ms }", Duration::from_secs(600)));
            while !guest.is_finished() {
                if let Some(l) = &log {
                    l.feed(&sw).map_err(|e| format!("dirty log: {e}"))?;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            guest.join().expect("command thread").map(|_| ())
        })?;
        if let Some(l) = &log {
            l.feed(&sw).map_err(|e| format!("dirty log: {e}"))?;
        }
        // What the guest pays afterwards: pages read back from the file while it
        // rewrites and checks its 16 MiB (hot pages that were evicted, and any of
        // its kernel's).
        let reclaimed =
            sw.swap_out((128 << 20) / guest_abi::PAGE_SIZE as usize).map_err(|e| format!("eviction: {e}"))?;
        let evicted = sw.stats();
        let out = vm.run_command("touch 16M; verify", Duration::from_secs(600))?;
        if out.status != 0 {
            return Err(format!("the guest's check failed after swapping: {:?}", out.lines));
        }
        let after = sw.stats();
        Ok(VictimSample {
            evicted_mib: reclaimed as f64 / 256.0,
            read_back: (after.pages_in + after.prefetched) - (evicted.pages_in + evicted.prefetched),
            faults: after.pages_in - evicted.pages_in,
            prefetched: after.prefetched - evicted.prefetched,
        })
    })
}
