//! Runs a scenario: boots its VMs on one [`Host`], applies its events on time,
//! samples every interval into the [`Recorder`], shows a progress line, and stops
//! at the end, when every VM has ended, or on Ctrl-C (keeping what it recorded).

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::record::{Recorder, Timed};
use super::scenario::{Action, HostMemory, Scenario};
use super::LabError;
use crate::config::{ConsoleTarget, VmConfig};
use crate::devices::virtio::balloon::BalloonConfig;
use crate::host::{self, Host, HostOptions, HostReport};
use crate::reclaim::active::ActiveOptions;
use crate::reclaim::policy::{HostMemChoice, PolicyOptions};
use crate::reclaim::swap::{SwapOptions, DEFAULT_DIR};
use crate::sample::HostSample;

/// What a run recorded.
pub struct Recording {
    /// Every sample, in time order.
    pub samples: Vec<Timed>,
    /// Each event: when it was applied (s), what, and its error if it failed.
    pub events: Vec<(f64, String, Option<String>)>,
    /// Stopped by Ctrl-C before the end.
    pub interrupted: bool,
    /// When sampling started (t = 0), milliseconds since the Unix epoch: where the
    /// policy's state changes (`report.policy.history`) fall on the timeline.
    pub start_unix_ms: u64,
    /// The host's report at teardown.
    pub report: HostReport,
}

/// The VMs of `s` as the host boots them; consoles go to `out/NAME.log`.
fn vm_configs(s: &Scenario, out: &Path) -> Vec<VmConfig> {
    s.vms
        .iter()
        .map(|v| {
            let mut c = VmConfig::new(v.name.clone(), v.mem);
            c.vcpus = v.vcpus;
            c.workload = v.workload.clone();
            c.limit = v.limit;
            c.min = v.min;
            c.shares = v.shares;
            c.console = ConsoleTarget::File(out.join(format!("{}.log", v.name)));
            c.hang_timeout = s.duration + Duration::from_secs(60);
            c.balloon = v
                .balloon
                .then(|| BalloonConfig { free_page_reporting: v.free_page_reporting, ..BalloonConfig::default() });
            c
        })
        .collect()
}

fn host_options(s: &Scenario) -> Result<HostOptions, LabError> {
    let tps = s
        .tps
        .as_deref()
        .map(|t| crate::reclaim::sharing::parse_options(t, tps::Config::default()))
        .transpose()
        .map_err(|e| LabError::Setup(e.to_string()))?;
    let policy = s.policy.then(|| {
        let mut p = PolicyOptions {
            host_mem: match s.host_memory {
                HostMemory::Host => HostMemChoice::Host,
                HostMemory::Budget(b) => HostMemChoice::Budget(b),
            },
            ..PolicyOptions::default()
        };
        if let Some(t) = s.idle_tax {
            p.config.idle_tax = t;
        }
        if let Some(r) = s.realloc_period {
            p.config.realloc_period_ms = r.as_millis() as u64;
        }
        let defaults = ActiveOptions::default();
        p.active = match s.active {
            (Some(period), _) if period.is_zero() => None,
            (period, samples) => Some(ActiveOptions {
                period: period.unwrap_or(defaults.period),
                samples: samples.map_or(defaults.samples, |n| n as usize),
            }),
        };
        p
    });
    Ok(HostOptions { tps, swap: s.swap.then(|| SwapOptions::new(DEFAULT_DIR)), policy, api_socket: None })
}

/// Applies one event to the running host. Commands run on their own thread (a
/// workload may take long); their outcome comes back through `done`.
fn apply(host: &Host, action: &Action, done: &mpsc::Sender<(String, Option<String>)>) -> Result<(), String> {
    let shared = host.shared();
    match action {
        Action::Budget(b) => shared.policy().ok_or("no policy")?.set_budget(*b).map_err(|e| e.to_string()),
        Action::Balloon { vm, bytes } => {
            shared.vm(vm).ok_or("no such VM")?.1.set_balloon_target(*bytes).map_err(|e| e.to_string())
        }
        Action::Tax(t) => shared.policy().ok_or("no policy")?.set_idle_tax(*t).map(drop).map_err(|e| e.to_string()),
        Action::Shares { vm, shares } => {
            shared.policy().ok_or("no policy")?.set_shares(vm, *shares).map(drop).map_err(|e| e.to_string())
        }
        Action::Tps(o) => {
            shared.sharing().ok_or("page sharing off")?.set_options(o).map(drop).map_err(|e| e.to_string())
        }
        Action::Command { vm, workload } => {
            let v = shared.vm(vm).ok_or("no such VM")?.1.clone();
            let (workload, done, what) = (workload.clone(), done.clone(), action.to_string());
            std::thread::spawn(move || {
                let r = v.run_command(&workload, Duration::from_secs(600));
                let err = match r {
                    Ok(o) if o.status == 0 => None,
                    Ok(o) => Some(format!("status {}", o.status)),
                    Err(e) => Some(e),
                };
                let _ = done.send((what, err));
            });
            Ok(())
        }
    }
}

/// The progress line: elapsed and remaining time, the state, free memory.
fn progress(s: &Scenario, t: f64, sample: &HostSample) {
    let total = s.duration.as_secs_f64();
    let state = sample.policy.as_ref().map_or_else(
        || "policy off".to_string(),
        |p| format!("{} {:.0} MiB free ({:.1}%)", p.state, p.free_mib, p.free_pct),
    );
    let resident: f64 = sample.vms.iter().map(|v| v.resident_mib).sum();
    let mut err = std::io::stderr().lock();
    // On a terminal the line is redrawn in place; in a log, one line per sample.
    let (start, end) = if err.is_terminal() { ("\r", "   ") } else { ("", "\n") };
    let _ = write!(
        err,
        "{start}lab {}: {:>5.0}s / {:.0}s, {:>4.0}s left | {state} | guests {:.0} MiB{end}",
        s.name,
        t,
        total,
        (total - t).max(0.0),
        resident
    );
    let _ = err.flush();
}

/// Runs `s`, recording into `out` (which exists).
pub fn run(s: &Scenario, out: &Path) -> Result<Recording, LabError> {
    let interrupted = host::install_interrupt_handler();
    let t0 = Instant::now();
    let mut host =
        Host::create(&vm_configs(s, out), t0, host_options(s)?).map_err(|e| LabError::Setup(e.to_string()))?;
    if let Err(e) = host.start() {
        host.stop_all(&format!("start failed: {e}"));
        host.finish();
        return Err(LabError::Setup(e.to_string()));
    }
    let mut rec = Recorder::create(out).map_err(|e| LabError::Write { path: out.to_path_buf(), source: e })?;
    let (done_tx, done_rx) = mpsc::channel();
    let mut events = Vec::new();
    let mut pending = s.events.iter().peekable();
    let mut samples = Vec::new();
    let mut next_sample = Duration::ZERO;
    let start = Instant::now();
    let start_unix_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let was_interrupted = loop {
        let t = start.elapsed();
        while let Some(e) = pending.next_if(|e| e.at <= t) {
            let r = apply(&host, &e.action, &done_tx);
            events.push((t.as_secs_f64(), e.action.to_string(), r.err()));
        }
        while let Ok((what, err)) = done_rx.try_recv() {
            if let Some(err) = err {
                events.push((start.elapsed().as_secs_f64(), format!("{what} (finished)"), Some(err)));
            }
        }
        if t >= next_sample {
            let sample = HostSample::take(host.shared());
            let timed = Timed { t_s: t.as_secs_f64(), sample };
            rec.write(&timed).map_err(|e| LabError::Write { path: out.to_path_buf(), source: e })?;
            progress(s, timed.t_s, &timed.sample);
            samples.push(timed);
            next_sample += s.sample;
        }
        if interrupted.load(Ordering::Relaxed) {
            break true;
        }
        if t >= s.duration || host.vms().iter().all(|v| v.ending().is_some()) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!();
    host.stop_all(if was_interrupted { "interrupted" } else { "scenario ended" });
    let report = host.finish();
    Ok(Recording { samples, events, interrupted: was_interrupted, start_unix_ms, report })
}
