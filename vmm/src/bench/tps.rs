//! `vmm bench tps`: page sharing against Linux KSM on the same guests, in one run.
//!
//! N VMs each fill SIZE of RAM with a content mix: 25% zero pages, 50% `shared:SEED`
//! (the same in every VM), 25% unique pages. What can be saved is known: every zero
//! page and all but one copy of each shared page. Each configuration boots fresh
//! VMs, waits until the guests have written everything, then turns its mechanism
//! on and measures the time and the CPU needed to reach 95% of that saving, the
//! final saving (host memory holding guest RAM, before minus after), and pages
//! scanned per CPU second:
//!
//! 1. this project's scanner (`tps`, default settings unless `--tps` says otherwise);
//! 2. KSM (`madvise(MADV_MERGEABLE)` on guest RAM, `/sys/kernel/mm/ksm/run=1`) at its
//!    default speed (100 pages per 20 ms);
//! 3. KSM at a speed giving `ksmd` the CPU per second that the scanner used while
//!    converging (from KSM's CPU per page measured in 2).
//!
//! KSM's settings are saved before and restored after (also on errors and Ctrl-C).

use std::fs;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{median, print_table};
use crate::config::VmConfig;
use crate::host::{self, Host, HostOptions};
use crate::units::format_size;
use crate::vm::Vm;

/// Parameters of the page sharing benchmark.
pub struct TpsBench {
    /// Number of VMs.
    pub vms: u32,
    /// Guest memory each VM fills with the content mix.
    pub size: u64,
    /// The scanner's settings (`--tps` syntax applied to the defaults).
    pub tps: tps::Config,
    /// Longest wait for one configuration to converge.
    pub limit: Duration,
    /// Also run KSM.
    pub ksm: bool,
    /// Repetitions of each configuration (the table shows medians).
    pub runs: usize,
}

const KSM: &str = "/sys/kernel/mm/ksm";
const SHARED_SEED: u64 = 42;
const POLL: Duration = Duration::from_millis(20);
const MIB: f64 = (1 << 20) as f64;

/// What one configuration achieved.
#[derive(Default)]
struct Outcome {
    /// Time to 95% of the achievable saving; None if never reached.
    converge_ms: Option<f64>,
    /// CPU of the scanner (or ksmd) until then, or until the limit.
    cpu_ms: f64,
    /// Pages it scanned meanwhile.
    pages_scanned: u64,
    /// Host memory holding guest RAM, before and at the end.
    before_mib: f64,
    after_mib: f64,
    /// Wall time of the measurement.
    wall_ms: f64,
}

impl Outcome {
    /// Field-wise medians of `runs`; converged only if most runs converged.
    fn median(runs: &[Outcome]) -> Outcome {
        let med = |f: fn(&Outcome) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
        let mut converged: Vec<f64> = runs.iter().filter_map(|o| o.converge_ms).collect();
        Outcome {
            converge_ms: (2 * converged.len() > runs.len()).then(|| median(&mut converged)),
            cpu_ms: med(|o| o.cpu_ms),
            pages_scanned: med(|o| o.pages_scanned as f64) as u64,
            before_mib: med(|o| o.before_mib),
            after_mib: med(|o| o.after_mib),
            wall_ms: med(|o| o.wall_ms),
        }
    }

    fn saved_mib(&self) -> f64 {
        self.before_mib - self.after_mib
    }
    fn pages_per_cpu_s(&self) -> f64 {
        self.pages_scanned as f64 / (self.cpu_ms / 1e3)
    }
}

/// Runs the benchmark, prints the table and the JSON line.
pub fn run(b: &TpsBench) -> Result<(), String> {
    if b.vms < 2 {
        return Err("--vms must be at least 2 (sharing across VMs is what is measured)".into());
    }
    if b.size < (4 << 20) || b.size % (4 << 20) != 0 {
        return Err("--size must be a multiple of 4M".into());
    }
    host::install_interrupt_handler();
    let quarter = b.size / 4;
    let achievable = (b.vms as u64 * quarter + (b.vms as u64 - 1) * 2 * quarter) as f64 / MIB;
    let repeat = |what: &str, f: &dyn Fn() -> Result<Outcome, String>| -> Result<Outcome, String> {
        let mut runs = Vec::with_capacity(b.runs);
        for i in 0..b.runs.max(1) {
            let o = f()?;
            log::info!(
                "{what} run {i}: saved {:.0} MiB, 95% after {:?} ms, {:.0} ms CPU",
                o.saved_mib(),
                o.converge_ms,
                o.cpu_ms
            );
            runs.push(o);
        }
        Ok(Outcome::median(&runs))
    };
    let tps = repeat("tps", &|| measure_tps(b, achievable))?;
    log::info!("tps: saved {:.0} MiB, converged in {:?} ms", tps.saved_mib(), tps.converge_ms);
    let (mut ksm, mut matched, mut matched_pages) = (None, None, 0);
    if b.ksm {
        let _restore = KsmSettings::save()?;
        let default = repeat("ksm default", &|| measure_ksm(b, achievable, 100))?;
        log::info!("ksm (default): saved {:.0} MiB, converged in {:?} ms", default.saved_mib(), default.converge_ms);
        // Same CPU per second as the scanner while it converged.
        let tps_cpu_share = tps.cpu_ms / tps.converge_ms.unwrap_or(tps.wall_ms);
        let ksm_cpu_per_page_ms = default.cpu_ms / default.pages_scanned.max(1) as f64;
        let pages_per_s = tps_cpu_share / ksm_cpu_per_page_ms * 1e3;
        matched_pages = ((pages_per_s * 0.020).round() as u64).max(1);
        let m = repeat("ksm matched", &|| measure_ksm(b, achievable, matched_pages))?;
        log::info!("ksm (matched, {matched_pages} pages/20 ms): saved {:.0} MiB", m.saved_mib());
        ksm = Some(default);
        matched = Some(m);
    }

    println!(
        "page sharing: {} VMs x {} (25% zero, 50% shared, 25% unique), achievable saving {achievable:.0} MiB, median of {} runs",
        b.vms,
        format_size(b.size),
        b.runs.max(1)
    );
    let mut rows = vec![[
        "mechanism",
        "saved MiB",
        "to 95% ms",
        "CPU ms",
        "CPU share %",
        "pages/CPU s",
        "before MiB",
        "after MiB",
    ]
    .map(String::from)
    .to_vec()];
    let ms = |v: Option<f64>| v.map_or("never".to_string(), |v| format!("{v:.0}"));
    let scanner_name = format!("tps ({} pages/s)", b.tps.pages_per_sec);
    let matched_name = format!("KSM matched ({matched_pages}/20ms)");
    let entries = [
        (scanner_name.as_str(), Some(&tps)),
        ("KSM default (100/20ms)", ksm.as_ref()),
        (matched_name.as_str(), matched.as_ref()),
    ];
    for (name, o) in entries {
        let Some(o) = o else { continue };
        rows.push(vec![
            name.to_string(),
            format!("{:.0}", o.saved_mib()),
            ms(o.converge_ms),
            format!("{:.0}", o.cpu_ms),
            format!("{:.1}", 100.0 * o.cpu_ms / o.converge_ms.unwrap_or(o.wall_ms)),
            format!("{:.0}", o.pages_per_cpu_s()),
            format!("{:.0}", o.before_mib),
            format!("{:.0}", o.after_mib),
        ]);
    }
    print_table(&rows);
    let field = |o: &Option<Outcome>, f: fn(&Outcome) -> Option<f64>| o.as_ref().and_then(f);
    let json = serde_json::json!({
        "bench": "tps",
        "runs": b.runs.max(1),
        "vms": b.vms,
        "size_mib": b.size >> 20,
        "achievable_mib": achievable,
        "saved_mib": tps.saved_mib(),
        "converge_ms": tps.converge_ms,
        "cpu_ms": tps.cpu_ms,
        "pages_per_cpu_s": tps.pages_per_cpu_s(),
        "ksm_saved_mib": field(&ksm, |o| Some(o.saved_mib())),
        "ksm_converge_ms": field(&ksm, |o| o.converge_ms),
        "ksm_cpu_ms": field(&ksm, |o| Some(o.cpu_ms)),
        "ksm_pages_per_cpu_s": field(&ksm, |o| Some(o.pages_per_cpu_s())),
        "ksm_matched_pages_to_scan": b.ksm.then_some(matched_pages),
        "ksm_matched_saved_mib": field(&matched, |o| Some(o.saved_mib())),
        "ksm_matched_converge_ms": field(&matched, |o| o.converge_ms),
        "ksm_matched_cpu_ms": field(&matched, |o| Some(o.cpu_ms)),
    });
    println!("{json}");
    Ok(())
}

/// Boots the VMs on a host (with page sharing covering them, scanning off when
/// `sharing` is set, so that "before" precedes every merge) and waits until each has
/// written its content mix.
fn boot(b: &TpsBench, sharing: bool) -> Result<Host, String> {
    let q = format_size(b.size / 4);
    let h = format_size(b.size / 2);
    let configs: Vec<VmConfig> = (0..b.vms)
        .map(|i| {
            let mut c = VmConfig::new(format!("tps{i}"), b.size + (32 << 20));
            c.workload = format!("alloc {q} zero; alloc {h} shared:{SHARED_SEED}; alloc {q} unique");
            c.balloon = None;
            c.hang_timeout = Duration::from_secs(300);
            c
        })
        .collect();
    let tps = sharing.then(|| tps::Config { enabled: false, ..b.tps.clone() });
    let mut host = Host::create(&configs, Instant::now(), HostOptions { tps, ..HostOptions::default() })
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let booted = host.start().map_err(|e| e.to_string()).and_then(|()| {
        while host.vms().iter().any(|vm| vm.progress().state != guest_abi::guest_state::SERVING) {
            check(host.vms(), deadline)?;
            std::thread::sleep(POLL);
        }
        Ok(())
    });
    match booted {
        Ok(()) => Ok(host),
        Err(e) => {
            host.finish();
            Err(e)
        }
    }
}

/// Fails if a guest ended, the deadline passed or the user interrupted.
fn check(vms: &[Vm], deadline: Instant) -> Result<(), String> {
    if host::INTERRUPTED.load(Ordering::Relaxed) {
        return Err("interrupted".into());
    }
    if let Some(e) = vms.iter().find_map(|vm| vm.ending()) {
        return Err(format!("a benchmark guest ended: {e:?}"));
    }
    if Instant::now() > deadline {
        return Err("the guests did not finish their workload in time".into());
    }
    Ok(())
}

fn measure_tps(b: &TpsBench, achievable: f64) -> Result<Outcome, String> {
    let host = boot(b, true)?;
    let result = converge_tps(b, &host, achievable);
    host.finish();
    result
}

fn converge_tps(b: &TpsBench, host: &Host, achievable: f64) -> Result<Outcome, String> {
    let (vms, sharing) = (host.vms(), host.sharing().expect("page sharing is on"));
    let held = || host.shared().guest_memory_bytes() as f64 / MIB;
    let mut o = Outcome { before_mib: held(), ..Outcome::default() };
    let s0 = sharing.stats();
    sharing.scanner().set_config(tps::Config { enabled: true, ..b.tps.clone() });
    let t0 = Instant::now();
    let deadline = t0 + b.limit;
    loop {
        check(vms, deadline + Duration::from_secs(1))?;
        let s = sharing.stats();
        o.cpu_ms = (s.cpu_ns - s0.cpu_ns) as f64 / 1e6;
        o.pages_scanned = s.pages_scanned - s0.pages_scanned;
        if s.bytes_saved as f64 / MIB >= 0.95 * achievable {
            o.converge_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(POLL);
    }
    // The final figure after one more full pass.
    let passes = sharing.stats().full_passes;
    sharing.scanner().wait_passes(passes + 1, b.limit);
    o.after_mib = held();
    o.wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok(o)
}

fn measure_ksm(b: &TpsBench, achievable: f64, pages_to_scan: u64) -> Result<Outcome, String> {
    let host = boot(b, false)?;
    let result = converge_ksm(b, host.vms(), achievable, pages_to_scan);
    host.finish();
    ksm_write("run", "2")?; // unmerge what is left, so the next run starts clean
    result
}

fn converge_ksm(b: &TpsBench, vms: &[Vm], achievable: f64, pages_to_scan: u64) -> Result<Outcome, String> {
    let resident = || vms.iter().map(|vm| vm.ram().resident_bytes()).sum::<u64>() as f64 / MIB;
    let mut o = Outcome { before_mib: resident(), ..Outcome::default() };
    ksm_write("pages_to_scan", &pages_to_scan.to_string())?;
    ksm_write("sleep_millisecs", "20")?;
    for vm in vms {
        for r in vm.ram().host_regions() {
            // SAFETY: guest RAM owned by the VM; MADV_MERGEABLE changes no content.
            if unsafe { libc::madvise(r.host_addr as *mut libc::c_void, r.len, libc::MADV_MERGEABLE) } != 0 {
                return Err(format!("madvise(MADV_MERGEABLE): {}", std::io::Error::last_os_error()));
            }
        }
    }
    let ksmd = ksmd_pid()?;
    let (cpu0, scanned0, scans0) = (ksmd_cpu_ms(ksmd)?, ksm_read("pages_scanned")?, ksm_read("full_scans")?);
    ksm_write("run", "1")?;
    let t0 = Instant::now();
    let deadline = t0 + b.limit;
    loop {
        check(vms, deadline + Duration::from_secs(1))?;
        o.cpu_ms = ksmd_cpu_ms(ksmd)? - cpu0;
        o.pages_scanned = ksm_read("pages_scanned")? - scanned0;
        let saved = (ksm_read("pages_sharing")? + ksm_read("ksm_zero_pages").unwrap_or(0)) as f64 * 4096.0 / MIB;
        if saved >= 0.95 * achievable {
            o.converge_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(POLL);
    }
    // The final figure after one more full scan.
    let scans = ksm_read("full_scans")?.max(scans0);
    let end = Instant::now() + b.limit;
    while ksm_read("full_scans")? <= scans && Instant::now() < end {
        check(vms, end + Duration::from_secs(1))?;
        std::thread::sleep(POLL);
    }
    o.after_mib = resident();
    o.wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok(o)
}

/// KSM's knobs as found, written back when dropped.
struct KsmSettings(Vec<(&'static str, String)>);

impl KsmSettings {
    fn save() -> Result<KsmSettings, String> {
        let mut saved = Vec::new();
        for knob in ["run", "pages_to_scan", "sleep_millisecs"] {
            let path = format!("{KSM}/{knob}");
            let v = fs::read_to_string(&path)
                .map_err(|e| format!("{path}: {e} (is KSM built into this kernel? --no-ksm skips it)"))?;
            saved.push((knob, v.trim().to_string()));
        }
        Ok(KsmSettings(saved))
    }
}

impl Drop for KsmSettings {
    fn drop(&mut self) {
        // run last, so that ksmd is stopped before the others change.
        for (knob, v) in self.0.iter().rev() {
            if let Err(e) = ksm_write(knob, v) {
                log::error!("restoring KSM's {knob}={v}: {e}");
            }
        }
    }
}

fn ksm_read(knob: &str) -> Result<u64, String> {
    let path = format!("{KSM}/{knob}");
    let text = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    text.trim().parse().map_err(|_| format!("{path}: not a number: {text:?}"))
}

fn ksm_write(knob: &str, value: &str) -> Result<(), String> {
    let path = format!("{KSM}/{knob}");
    fs::write(&path, value).map_err(|e| format!("writing {value} to {path}: {e}"))
}

fn ksmd_pid() -> Result<u32, String> {
    let dir = fs::read_dir("/proc").map_err(|e| format!("/proc: {e}"))?;
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "ksmd"))
        .ok_or_else(|| "no ksmd thread found".to_string())
}

/// utime + stime of ksmd, in ms.
fn ksmd_cpu_ms(pid: u32) -> Result<f64, String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // Fields after the command name (which ends with the last ')'): state is 3rd,
    // utime the 14th and stime the 15th field of the whole line.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or("bad /proc stat line")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f
        .get(11)
        .and_then(|u| u.parse().ok())
        .zip(f.get(12).and_then(|s| s.parse().ok()))
        .map(|(u, s): (u64, u64)| u + s)
        .ok_or("bad /proc stat line")?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 * 1e3 / hz)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ksmd_stat_fields() {
        // Our own stat line parses the same way (a command name with spaces and a ')').
        let pid = std::process::id();
        assert!(super::ksmd_cpu_ms(pid).unwrap() >= 0.0);
    }
}
