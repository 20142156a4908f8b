//! What a lab run leaves behind once it ends: the plots, the machine description,
//! the Markdown report with its summary table, and the key results (the final JSON
//! line of `vmm lab run`).
//!
//! Key results are computed from the samples alone, so the same code reads any
//! scenario: per VM its peak and final allocation, balloon and swap; per state the
//! time the host spent in it; and, when the number of VMs holding their memory
//! grows during the run (a staggered start, as `fig4`), page sharing at each count.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use plotters::style::RGBColor;
use policy::FreeState;
use serde::Serialize;

use super::plot::{Band, Chart, Series};
use super::record::{Machine, Timed};
use super::run::Recording;
use super::scenario::Scenario;
use super::LabError;

/// A VM's figures over the run, MiB.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VmSummary {
    /// Configured memory.
    pub memsz_mib: f64,
    /// Highest resident.
    pub peak_resident_mib: f64,
    /// Resident at the end.
    pub final_resident_mib: f64,
    /// Largest balloon.
    pub max_balloon_mib: f64,
    /// Most swapped at once.
    pub max_swapped_mib: f64,
    /// The first sample with something in the balloon, seconds.
    pub balloon_from_s: Option<f64>,
    /// The first sample with something swapped, seconds.
    pub swap_from_s: Option<f64>,
    /// `work` steps the guest reported during the run.
    pub work_steps: usize,
    /// Their median throughput, operations per second.
    pub median_ops_per_sec: Option<f64>,
}

/// Points of a line: (x, y).
type Points = Vec<(f64, f64)>;

/// Each VM's `work` reports: (first seen at, seconds; ops/s), one per step.
fn work_points(samples: &[Timed]) -> BTreeMap<String, Points> {
    let mut last_step: BTreeMap<&str, u64> = BTreeMap::new();
    let mut points: BTreeMap<String, Points> = BTreeMap::new();
    for s in samples {
        for v in &s.sample.vms {
            let Some(w) = v.work else { continue };
            if last_step.insert(&v.name, w.step) != Some(w.step) {
                points.entry(v.name.clone()).or_default().push((s.t_s, w.ops_per_sec));
            }
        }
    }
    points
}

/// Each VM's median `work` throughput between consecutive events (the run cut at
/// every event time): how an event (a tax, a balloon, a budget) changed it.
fn work_phases(samples: &[Timed], events: &[(f64, String, Option<String>)], end_s: f64) -> Vec<serde_json::Value> {
    let work = work_points(samples);
    if work.values().all(Vec::is_empty) {
        return Vec::new();
    }
    // Events at the very start (a balloon set at 0 s) cut nothing.
    let mut cuts: Vec<f64> =
        events.iter().filter(|e| !e.1.ends_with("(finished)")).map(|e| e.0).filter(|t| *t > 0.5).collect();
    cuts.dedup();
    let mut bounds = vec![0.0];
    bounds.extend(cuts);
    bounds.push(end_s);
    bounds
        .windows(2)
        .map(|w| {
            let vms: BTreeMap<&str, Option<f64>> = work
                .iter()
                .filter(|(_, p)| !p.is_empty())
                .map(|(name, p)| {
                    let inside = p.iter().filter(|(t, _)| *t >= w[0] && *t < w[1]).map(|x| x.1).collect();
                    (name.as_str(), median(inside))
                })
                .collect();
            serde_json::json!({"from_s": w[0], "to_s": w[1], "median_ops_per_sec": vms})
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Page sharing with `vms` VMs holding their memory.
#[derive(Clone, Debug, Serialize)]
pub struct SharingPoint {
    /// VMs holding their memory.
    pub vms: usize,
    /// Their memory, MiB.
    pub vm_mib: f64,
    /// Guest memory shared (mapped on pool pages, or dropped as zero), MiB.
    pub shared_mib: f64,
    /// Of all their memory, percent.
    pub shared_pct: f64,
    /// Host memory saved, MiB.
    pub saved_mib: f64,
    /// Of all their memory, percent.
    pub saved_pct: f64,
}

fn state_color(s: FreeState) -> Option<RGBColor> {
    match s {
        FreeState::High => None,
        FreeState::Soft => Some(RGBColor(240, 200, 0)),
        FreeState::Hard => Some(RGBColor(255, 120, 0)),
        FreeState::Low => Some(RGBColor(220, 0, 0)),
    }
}

/// The stretches of time in each free-memory state, from the policy's history of
/// state changes (every change at its tick, not only those a sample caught), up to
/// `end_s`. Empty without a policy.
fn state_spans(r: &Recording, end_s: f64) -> Vec<(f64, f64, FreeState)> {
    let Some(policy) = &r.report.policy else { return Vec::new() };
    let mut spans = Vec::new();
    let (mut from, mut state) = (0.0, FreeState::High);
    for c in &policy.history {
        let at = ((c.unix_ms as f64 - r.start_unix_ms as f64) / 1e3).clamp(0.0, end_s);
        if at > from {
            spans.push((from, at, state));
        }
        (from, state) = (at, c.to);
    }
    if end_s > from {
        spans.push((from, end_s, state));
    }
    spans
}

/// Per VM summaries, in configuration order.
fn vm_summaries(samples: &[Timed]) -> BTreeMap<String, VmSummary> {
    let mut out: BTreeMap<String, VmSummary> = BTreeMap::new();
    for s in samples {
        for v in &s.sample.vms {
            let e = out.entry(v.name.clone()).or_default();
            e.memsz_mib = v.memsz_mib;
            e.peak_resident_mib = e.peak_resident_mib.max(v.resident_mib);
            e.final_resident_mib = v.resident_mib;
            e.max_balloon_mib = e.max_balloon_mib.max(v.balloon_mib.unwrap_or(0.0));
            e.max_swapped_mib = e.max_swapped_mib.max(v.swapped_mib.unwrap_or(0.0));
            if v.balloon_mib.unwrap_or(0.0) >= 0.5 {
                e.balloon_from_s.get_or_insert(s.t_s);
            }
            if v.swapped_mib.unwrap_or(0.0) >= 0.5 {
                e.swap_from_s.get_or_insert(s.t_s);
            }
        }
    }
    for (name, points) in work_points(samples) {
        if let Some(e) = out.get_mut(&name) {
            e.work_steps = points.len();
            e.median_ops_per_sec = median(points.into_iter().map(|p| p.1).collect());
        }
    }
    out
}

/// Page sharing at each number of VMs holding their memory (a VM holds it once its
/// guest has allocated 90% of the most it allocates in the run): the last sample at
/// each count. Empty unless the count changes during the run.
pub fn sharing_points(samples: &[Timed]) -> Vec<SharingPoint> {
    let mut most: BTreeMap<&str, f64> = BTreeMap::new();
    for s in samples {
        for v in &s.sample.vms {
            let m = most.entry(v.name.as_str()).or_default();
            *m = m.max(v.guest_allocated_mib);
        }
    }
    let mut by_count: BTreeMap<usize, SharingPoint> = BTreeMap::new();
    for s in samples {
        let Some(t) = &s.sample.sharing else { continue };
        let holding: Vec<_> = s
            .sample
            .vms
            .iter()
            .filter(|v| most[v.name.as_str()] > 0.0 && v.guest_allocated_mib >= 0.9 * most[v.name.as_str()])
            .collect();
        if holding.is_empty() {
            continue;
        }
        let vm_mib: f64 = holding.iter().map(|v| v.memsz_mib).sum();
        let shared = t.shared_mib + t.zero_mib;
        by_count.insert(
            holding.len(),
            SharingPoint {
                vms: holding.len(),
                vm_mib,
                shared_mib: shared,
                shared_pct: 100.0 * shared / vm_mib,
                saved_mib: t.saved_mib,
                saved_pct: 100.0 * t.saved_mib / vm_mib,
            },
        );
    }
    if by_count.len() < 2 {
        return Vec::new();
    }
    by_count.into_values().collect()
}

fn series(name: &str, samples: &[Timed], f: impl Fn(&Timed) -> Option<f64>) -> Option<Series> {
    let points: Vec<(f64, f64)> = samples.iter().filter_map(|s| f(s).map(|y| (s.t_s, y))).collect();
    (!points.is_empty()).then(|| Series { name: name.to_string(), points })
}

/// Draws every plot of the run into `out`; returns their file names (PNG, SVG).
fn plots(
    s: &Scenario,
    samples: &[Timed],
    spans: &[(f64, f64, FreeState)],
    sharing: &[SharingPoint],
    out: &Path,
) -> Result<Vec<String>, LabError> {
    let mut files = Vec::new();
    let bands: Vec<Band> =
        spans.iter().copied().filter_map(|(x0, x1, st)| state_color(st).map(|color| Band { x0, x1, color })).collect();
    let host = Chart {
        title: format!("{}: host memory (shaded: soft, hard, low)", s.name),
        x_label: "time (s)".into(),
        y_label: "MiB".into(),
        series: [
            series("free", samples, |t| t.sample.policy.as_ref().map(|p| p.free_mib)),
            series("guest memory held", samples, |t| Some(t.sample.guest_mib)),
            series("shared", samples, |t| t.sample.sharing.as_ref().map(|x| x.shared_mib + x.zero_mib)),
            series("saved by sharing", samples, |t| t.sample.sharing.as_ref().map(|x| x.saved_mib)),
        ]
        .into_iter()
        .flatten()
        .collect(),
        bands,
    };
    host.draw(&out.join("host"))?;
    files.push("host".to_string());
    for vm in &s.vms {
        let one = |f: fn(&crate::sample::VmSample) -> Option<f64>| {
            let name = vm.name.clone();
            move |t: &Timed| t.sample.vms.iter().find(|v| v.name == name).and_then(f)
        };
        let chart = Chart {
            title: format!("{}: VM {}", s.name, vm.name),
            x_label: "time (s)".into(),
            y_label: "MiB".into(),
            series: [
                series("resident (GRANT)", samples, one(|v| Some(v.resident_mib))),
                series("target (SZTGT)", samples, one(|v| v.target_mib)),
                series("active estimate (TCHD)", samples, one(|v| v.active_mib)),
                series("active, fast average", samples, one(|v| v.active_fast_mib)),
                series("active, slow average", samples, one(|v| v.active_slow_mib)),
                series("working set (guest)", samples, one(|v| v.working_set_mib)),
                series("balloon (MCTLSZ)", samples, one(|v| v.balloon_mib)),
                series("swapped (SWCUR)", samples, one(|v| v.swapped_mib)),
                series("guest allocated", samples, one(|v| Some(v.guest_allocated_mib))),
            ]
            .into_iter()
            .flatten()
            .collect(),
            bands: Vec::new(),
        };
        let base = format!("vm-{}", vm.name);
        chart.draw(&out.join(&base))?;
        files.push(base);
    }
    let work = work_points(samples);
    if work.values().any(|p| !p.is_empty()) {
        let chart = Chart {
            title: format!("{}: guest throughput (work steps)", s.name),
            x_label: "time (s)".into(),
            y_label: "operations/s".into(),
            series: work
                .into_iter()
                .filter(|(_, p)| !p.is_empty())
                .map(|(name, points)| Series { name, points })
                .collect(),
            bands: Vec::new(),
        };
        chart.draw(&out.join("throughput"))?;
        files.push("throughput".to_string());
    }
    if !sharing.is_empty() {
        let pts = |f: fn(&SharingPoint) -> f64| sharing.iter().map(|p| (p.vms as f64, f(p))).collect();
        let chart = Chart {
            title: format!("{}: page sharing against the number of VMs", s.name),
            x_label: "VMs".into(),
            y_label: "% of VM memory".into(),
            series: vec![
                Series { name: "shared %".into(), points: pts(|p| p.shared_pct) },
                Series { name: "reclaimed (saved) %".into(), points: pts(|p| p.saved_pct) },
            ],
            bands: Vec::new(),
        };
        chart.draw(&out.join("sharing"))?;
        files.push("sharing".to_string());
    }
    Ok(files)
}

/// Writes the plots, `machine.json` and `report.md`; returns the key results.
pub fn write(s: &Scenario, quick: bool, r: &Recording, out: &Path) -> Result<serde_json::Value, LabError> {
    let backend = r.report.vms.first().map_or_else(
        || "unknown".to_string(),
        |v| serde_json::to_value(v.backend).ok().and_then(|b| b.as_str().map(String::from)).unwrap_or_default(),
    );
    let machine = Machine::describe(&backend);
    let wr = |name: &str, text: String| {
        std::fs::write(out.join(name), text).map_err(|e| LabError::Write { path: out.join(name), source: e })
    };
    wr("machine.json", serde_json::to_string_pretty(&machine).expect("json"))?;
    let last_t = r.samples.last().map_or(0.0, |t| t.t_s);
    let sharing = sharing_points(&r.samples);
    let spans = state_spans(r, last_t);
    let files = plots(s, &r.samples, &spans, &sharing, out)?;
    let vms = vm_summaries(&r.samples);
    let mut states: BTreeMap<String, f64> = BTreeMap::new();
    for (x0, x1, st) in &spans {
        *states.entry(st.to_string()).or_default() += x1 - x0;
    }
    let phases = work_phases(&r.samples, &r.events, last_t);
    let changes: Vec<serde_json::Value> = spans
        .iter()
        .skip(1)
        .map(|(t, _, st)| serde_json::json!({"t_s": (t * 100.0).round() / 100.0, "to": st.to_string()}))
        .collect();
    let min_free_pct = r.samples.iter().filter_map(|t| t.sample.policy.as_ref().map(|p| p.free_pct)).reduce(f64::min);
    let event_errors = r.events.iter().filter(|e| e.2.is_some()).count();
    let key = serde_json::json!({
        "lab": s.name,
        "quick": quick,
        "interrupted": r.interrupted,
        "duration_s": last_t,
        "samples": r.samples.len(),
        "out": out.display().to_string(),
        "vms": vms,
        "state_s": states,
        "min_free_pct": min_free_pct,
        "state_changes": changes,
        "sharing": sharing,
        "work_phases": phases,
        "events": r.events.len(),
        "event_errors": event_errors,
        "backend": backend,
    });
    let mut md = String::new();
    let _ = writeln!(md, "# Lab run: {}\n\n{}\n", s.name, s.description);
    let _ = writeln!(
        md,
        "{}{:.0} s recorded, {} samples every {:.1} s. Machine: {}, {} cores, kernel {}, KVM backend {}.\n",
        if r.interrupted { "**Interrupted** (Ctrl-C). " } else { "" },
        last_t,
        r.samples.len(),
        s.sample.as_secs_f64(),
        machine.cpu,
        machine.cores,
        machine.kernel,
        machine.kvm_backend
    );
    let _ = writeln!(
        md,
        "| VM | MEMSZ MiB | peak resident | final resident | max balloon | max swapped | balloon from s | swap from s | median ops/s |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    let at = |t: Option<f64>| t.map_or_else(|| "-".to_string(), |t| format!("{t:.1}"));
    for (name, v) in &vms {
        let _ = writeln!(
            md,
            "| {name} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
            v.memsz_mib,
            v.peak_resident_mib,
            v.final_resident_mib,
            v.max_balloon_mib,
            v.max_swapped_mib,
            at(v.balloon_from_s),
            at(v.swap_from_s),
            v.median_ops_per_sec.map_or_else(|| "-".to_string(), |o| format!("{o:.0}"))
        );
    }
    if !states.is_empty() {
        let _ = writeln!(md, "\nTime in each free-memory state: {}.", {
            let parts: Vec<String> = states.iter().map(|(k, v)| format!("{k} {v:.1} s")).collect();
            parts.join(", ")
        });
        let _ = writeln!(md, "State changes: {}.", {
            let parts: Vec<String> = spans.iter().skip(1).map(|(t, _, st)| format!("{st} at {t:.1} s")).collect();
            if parts.is_empty() {
                "none".to_string()
            } else {
                parts.join(", ")
            }
        });
    }
    if !sharing.is_empty() {
        let _ = writeln!(md, "\n| VMs | VM memory MiB | shared MiB | shared % | reclaimed MiB | reclaimed % |");
        let _ = writeln!(md, "|---|---|---|---|---|---|");
        for p in &sharing {
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} |",
                p.vms, p.vm_mib, p.shared_mib, p.shared_pct, p.saved_mib, p.saved_pct
            );
        }
    }
    if phases.len() > 1 {
        let _ = writeln!(md, "\nMedian guest throughput (ops/s) between events:\n");
        let _ = writeln!(md, "| from s | to s | VM | median ops/s |\n|---|---|---|---|");
        for p in &phases {
            for (vm, m) in p["median_ops_per_sec"].as_object().into_iter().flatten() {
                let m = m.as_f64().map_or_else(|| "-".to_string(), |m| format!("{m:.0}"));
                let _ = writeln!(
                    md,
                    "| {:.1} | {:.1} | {vm} | {m} |",
                    p["from_s"].as_f64().unwrap_or(0.0),
                    p["to_s"].as_f64().unwrap_or(0.0)
                );
            }
        }
    }
    if !r.events.is_empty() {
        let _ = writeln!(md, "\n| at s | event | error |\n|---|---|---|");
        for (t, what, err) in &r.events {
            let _ = writeln!(md, "| {t:.1} | {what} | {} |", err.as_deref().unwrap_or(""));
        }
    }
    let _ = writeln!(md);
    for f in &files {
        let _ = writeln!(md, "![{f}]({f}.png)\n");
    }
    let _ = writeln!(md, "Data: `samples.csv`, `samples.jsonl`; scenario: `scenario.toml`; machine: `machine.json`.");
    wr("report.md", md)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::{HostSample, SharingSample, VmSample, WorkReport};
    use crate::vm::VmState;

    fn vm(name: &str, allocated: f64, work: Option<(u64, f64)>) -> VmSample {
        VmSample {
            name: name.into(),
            state: VmState::Running,
            memsz_mib: 100.0,
            resident_mib: allocated,
            target_mib: None,
            active_mib: None,
            active_fast_mib: None,
            active_slow_mib: None,
            shares: None,
            balloon_mib: None,
            balloon_target_mib: None,
            balloon_max_mib: None,
            swapped_mib: None,
            swap_target_mib: None,
            swap_read_mib: None,
            swap_written_mib: None,
            shared_mib: None,
            zero_mib: None,
            saved_mib: None,
            guest_allocated_mib: allocated,
            heartbeat: 1,
            working_set_mib: None,
            work: work.map(|(step, ops_per_sec)| WorkReport { step, ops_per_sec }),
        }
    }

    fn at(t_s: f64, shared: f64, saved: f64, vms: Vec<VmSample>) -> Timed {
        let sharing = Some(SharingSample { shared_mib: shared, zero_mib: 0.0, saved_mib: saved, full_passes: 1 });
        Timed { t_s, sample: HostSample { policy: None, guest_mib: 0.0, sharing, vms } }
    }

    #[test]
    fn sharing_is_read_at_the_last_sample_of_each_number_of_vms() {
        let samples = [
            at(0.0, 0.0, 0.0, vec![vm("a", 0.0, None), vm("b", 0.0, None)]),
            at(1.0, 5.0, 4.0, vec![vm("a", 90.0, None), vm("b", 0.0, None)]),
            at(2.0, 10.0, 8.0, vec![vm("a", 90.0, None), vm("b", 50.0, None)]),
            at(3.0, 120.0, 60.0, vec![vm("a", 90.0, None), vm("b", 90.0, None)]),
        ];
        let p = sharing_points(&samples);
        assert_eq!(p.len(), 2, "one VM, then two");
        assert_eq!((p[0].vms, p[0].shared_mib, p[0].saved_pct), (1, 10.0, 8.0), "b not yet at 90% of its fill");
        assert_eq!((p[1].vms, p[1].vm_mib, p[1].shared_pct, p[1].saved_pct), (2, 200.0, 60.0, 30.0));
        assert!(sharing_points(&samples[3..]).is_empty(), "no change in the number of VMs: no sweep");
    }

    #[test]
    fn throughput_is_counted_once_per_step_and_split_at_events() {
        let w = |t, step, ops| at(t, 0.0, 0.0, vec![vm("busy", 10.0, Some((step, ops)))]);
        let samples = [w(1.0, 1, 10.0), w(2.0, 1, 10.0), w(3.0, 2, 30.0), w(6.0, 3, 100.0), w(7.0, 4, 300.0)];
        let points = work_points(&samples);
        assert_eq!(points["busy"].len(), 4, "step 1 seen twice counts once");
        let events = [(0.1, "balloon a 1M".to_string(), None), (5.0, "tax 0.75".to_string(), None)];
        let phases = work_phases(&samples, &events, 8.0);
        assert_eq!(phases.len(), 2, "the event at the start cuts nothing");
        assert_eq!(phases[0]["median_ops_per_sec"]["busy"], 20.0);
        assert_eq!(phases[1]["median_ops_per_sec"]["busy"], 200.0);
        assert_eq!((phases[1]["from_s"].as_f64(), phases[1]["to_s"].as_f64()), (Some(5.0), Some(8.0)));
    }
}
