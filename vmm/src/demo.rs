//! `vmm demo`: the built-in test guest taken through the reclamation techniques, one
//! phase at a time, with the host memory each phase gives back.
//!
//! Several VMs boot and fill their RAM with every kind of page the workload language
//! has (zero, identical, shared with the other VMs, unique), then wait for commands.
//! The host then turns the techniques on one after another, the way ESX's memory
//! scheduler would reach for them as memory gets tighter:
//!
//! 1. **page sharing** merges identical pages (cheap, invisible to the guest);
//! 2. the **balloon** asks each guest for memory it does not need (here: memory the
//!    guest wrote and freed, which the host cannot know is free);
//! 3. the **host swapper** evicts part of what is left to each VM's `.vswp` file
//!    (blind, as a host under hard memory pressure does);
//! 4. finally every guest checks every page it holds (`verify`), faulting the
//!    evicted ones back in, and the demo ends with the guests exiting normally.
//!
//! Each phase prints a line; at the end a table and one JSON line (`{"demo": ...}`)
//! summarise the memory held for guest RAM after each phase.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::bench::{print_table, verify, wait, wait_serving};
use crate::config::VmConfig;
use crate::devices::virtio::balloon::BalloonConfig;
use crate::host::{Host, HostOptions, HostReport};
use crate::reclaim::swap::{self, SwapOptions};

/// What the demo boots.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Number of VMs.
    pub vms: u32,
    /// Guest RAM of each, bytes.
    pub mem: u64,
    /// Balloon target of each VM in the balloon phase, bytes.
    pub balloon: u64,
    /// Memory evicted from each VM in the swap phase, bytes.
    pub swap: u64,
    /// Directory of the swap files.
    pub swap_dir: PathBuf,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions { vms: 2, mem: 256 << 20, balloon: 64 << 20, swap: 32 << 20, swap_dir: swap::DEFAULT_DIR.into() }
    }
}

/// Longest wait for any phase.
const PHASE_LIMIT: Duration = Duration::from_secs(120);
const MIB: f64 = (1u64 << 20) as f64;

/// The boot workload of every guest (sizes for 256 MiB of RAM, scaled to `mem`):
/// 176 MiB of every kind of page, checked, and 48 MiB written then freed again, as
/// a guest drops a cache: free memory the host still backs, which only the guest
/// can say is free (the balloon's job).
fn boot_workload(mem: u64) -> String {
    let part = (mem / 16) >> 20; // 16 MiB of a 256 MiB guest
    format!(
        "alloc {z}M zero; alloc {s}M shared:7; alloc {z}M dup; alloc {u}M unique; alloc {c}M unique; verify; free {c}M",
        z = part + part / 2,
        s = part * 4,
        u = part * 4,
        c = part * 3
    )
}

/// One measured phase.
struct Phase {
    name: &'static str,
    guest_mib: f64,
    ms: f64,
    note: String,
}

/// Runs the demo; returns the VMs' reports (the caller prints the summaries).
pub fn run(opts: &DemoOptions, t0: Instant) -> Result<HostReport, String> {
    if opts.vms == 0 {
        return Err("the demo needs at least one VM".into());
    }
    if opts.balloon >= opts.mem {
        return Err(format!(
            "balloon target {} MiB must be below guest RAM {} MiB",
            opts.balloon >> 20,
            opts.mem >> 20
        ));
    }
    let configs: Vec<VmConfig> = (0..opts.vms)
        .map(|i| {
            let mut c = VmConfig::new(format!("demo{i}"), opts.mem);
            c.workload = boot_workload(opts.mem);
            // Free page reporting would hand the dropped cache back by itself; the
            // demo shows the balloon doing it on the host's request.
            c.balloon = Some(BalloonConfig { free_page_reporting: false, ..BalloonConfig::default() });
            c
        })
        .collect();
    for c in &configs {
        c.validate()?;
    }
    // Page sharing covers the VMs from the start, scanning off until its phase.
    let reclaimers = HostOptions {
        tps: Some(tps::Config { enabled: false, ..tps::Config::default() }),
        swap: Some(SwapOptions::new(&opts.swap_dir)),
        ..HostOptions::default()
    };
    let mut host = Host::create(&configs, t0, reclaimers).map_err(|e| e.to_string())?;
    let result = host.start().map_err(|e| e.to_string()).and_then(|()| phases(opts, &host));
    if let Err(e) = &result {
        host.stop_all(&format!("demo failed: {e}"));
    }
    for vm in host.vms() {
        vm.wait(Duration::from_secs(10));
    }
    let report = host.finish();
    let phases = result?;
    print_summary(opts, &phases);
    Ok(report)
}

fn phases(opts: &DemoOptions, host: &Host) -> Result<Vec<Phase>, String> {
    let (vms, sharing) = (host.vms(), host.sharing().expect("page sharing is on"));
    let mut out = Vec::new();
    let mut mark = Instant::now();
    let mut phase = |name, note: String, out: &mut Vec<Phase>| {
        let p = Phase { name, guest_mib: host.shared().guest_memory_bytes() as f64 / MIB, ms: ms_since(mark), note };
        println!("demo: {:<12} guest RAM held {:>7.1} MiB  ({} ms) {}", p.name, p.guest_mib, p.ms as u64, p.note);
        out.push(p);
        mark = Instant::now();
    };

    for vm in vms {
        wait_serving(vm, PHASE_LIMIT)?;
    }
    phase("boot+fill", format!("{} VMs x {} MiB: {}", vms.len(), opts.mem >> 20, boot_workload(opts.mem)), &mut out);

    let passes = sharing.stats().full_passes;
    sharing.set_options("on,rate=0")?;
    if !sharing.scanner().wait_passes(passes + 2, PHASE_LIMIT) {
        return Err("page sharing did not complete two passes in time".into());
    }
    let s = sharing.stats();
    phase(
        "tps",
        format!(
            "{} zero pages freed, {} guest pages on {} pool pages",
            s.zero_pages_freed, s.pool_mapped_pages, s.pool_pages
        ),
        &mut out,
    );
    sharing.set_options("rate=25600")?;

    for vm in vms {
        vm.shared().set_balloon_target(opts.balloon).map_err(|e| e.to_string())?;
    }
    let want = opts.balloon / guest_abi::PAGE_SIZE;
    for vm in vms {
        let dev = vm.balloon().expect("checked above");
        wait(vm, "to inflate its balloon", PHASE_LIMIT, || dev.lock().unwrap().snapshot().actual_pages >= want)?;
    }
    phase("balloon", format!("each guest gave {} MiB to its balloon", opts.balloon >> 20), &mut out);

    let mut written = 0;
    for (i, vm) in vms.iter().enumerate() {
        let sw = host.swapper(i).expect("every VM has a swapper");
        let r = swap::swap_out(&sw, opts.swap)?;
        if let Some(e) = r.error {
            return Err(format!("vm {}: eviction stopped: {e}", vm.name()));
        }
        written += sw.stats().pages_out;
    }
    phase("swap", format!("{written} pages written to the VMs' .vswp files in {}", opts.swap_dir.display()), &mut out);

    for vm in vms {
        verify(vm, PHASE_LIMIT)?;
    }
    let faulted: u64 =
        (0..vms.len()).filter_map(|i| host.swapper(i)).map(|sw| sw.stats()).map(|s| s.pages_in + s.prefetched).sum();
    phase("verify", format!("every guest page holds what its guest wrote; {faulted} pages read back"), &mut out);

    for vm in vms {
        vm.run_command("exit 0", PHASE_LIMIT).ok();
        vm.wait(Duration::from_secs(10));
    }
    Ok(out)
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn print_summary(opts: &DemoOptions, phases: &[Phase]) {
    let start = phases.first().map_or(0.0, |p| p.guest_mib);
    let mut rows = vec![vec!["phase".to_string(), "guest RAM held MiB".into(), "given back MiB".into(), "ms".into()]];
    for p in phases {
        rows.push(vec![
            p.name.to_string(),
            format!("{:.1}", p.guest_mib),
            format!("{:.1}", start - p.guest_mib),
            format!("{:.0}", p.ms),
        ]);
    }
    print_table(&rows);
    let json = serde_json::json!({
        "demo": "reclaim",
        "vms": opts.vms,
        "mem_mib": opts.mem >> 20,
        "phases": phases.iter().map(|p| serde_json::json!({
            "phase": p.name, "guest_mib": p.guest_mib, "ms": p.ms,
        })).collect::<Vec<_>>(),
    });
    println!("{json}");
}
