//! What a lab run writes while it runs: every sample as a CSV row per VM
//! (`samples.csv`) and as one JSON line (`samples.jsonl`), flushed at each sample
//! so that an interrupted run keeps everything it measured; and the machine it ran
//! on (`machine.json`).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde::Serialize;

use crate::sample::format_value;
use crate::sample::HostSample;

/// One sample and when it was taken.
#[derive(Clone, Debug, Serialize)]
pub struct Timed {
    /// Seconds since the scenario started.
    pub t_s: f64,
    /// The sample.
    #[serde(flatten)]
    pub sample: HostSample,
}

/// The CSV header: host columns, then the VM's.
pub const CSV_COLUMNS: [&str; 31] = [
    "t_s",
    "state",
    "total_mib",
    "free_mib",
    "free_pct",
    "guest_mib",
    "shared_mib",
    "zero_mib",
    "saved_mib",
    "vm",
    "vm_state",
    "memsz_mib",
    "resident_mib",
    "target_mib",
    "active_mib",
    "active_fast_mib",
    "active_slow_mib",
    "working_set_mib",
    "shares",
    "balloon_mib",
    "balloon_target_mib",
    "balloon_max_mib",
    "swapped_mib",
    "swap_read_mib",
    "swap_written_mib",
    "vm_shared_mib",
    "vm_zero_mib",
    "vm_saved_mib",
    "allocated_mib",
    "work_step",
    "ops_per_sec",
];

/// The writers of one run's samples.
pub struct Recorder {
    csv: csv::Writer<File>,
    jsonl: BufWriter<File>,
}

impl Recorder {
    /// Creates `samples.csv` and `samples.jsonl` in `dir`.
    pub fn create(dir: &Path) -> std::io::Result<Recorder> {
        let mut csv = csv::Writer::from_writer(File::create(dir.join("samples.csv"))?);
        csv.write_record(CSV_COLUMNS)?;
        let jsonl = BufWriter::new(File::create(dir.join("samples.jsonl"))?);
        Ok(Recorder { csv, jsonl })
    }

    /// Writes one sample and flushes both files.
    pub fn write(&mut self, s: &Timed) -> std::io::Result<()> {
        let h = &s.sample;
        let opt = |v: Option<f64>| format_value(v);
        let p = h.policy.as_ref();
        let t = h.sharing.as_ref();
        for vm in &h.vms {
            let state = serde_json::to_value(&vm.state).expect("states serialise");
            let state = state.as_str().map_or_else(|| state.to_string(), str::to_string);
            let rec = [
                format!("{:.3}", s.t_s),
                p.map_or("-".into(), |p| p.state.to_string()),
                opt(p.map(|p| p.total_mib)),
                opt(p.map(|p| p.free_mib)),
                opt(p.map(|p| p.free_pct)),
                format!("{:.2}", h.guest_mib),
                opt(t.map(|t| t.shared_mib)),
                opt(t.map(|t| t.zero_mib)),
                opt(t.map(|t| t.saved_mib)),
                vm.name.clone(),
                state,
                format!("{:.2}", vm.memsz_mib),
                format!("{:.2}", vm.resident_mib),
                opt(vm.target_mib),
                opt(vm.active_mib),
                opt(vm.active_fast_mib),
                opt(vm.active_slow_mib),
                opt(vm.working_set_mib),
                vm.shares.map_or("-".into(), |s| s.to_string()),
                opt(vm.balloon_mib),
                opt(vm.balloon_target_mib),
                opt(vm.balloon_max_mib),
                opt(vm.swapped_mib),
                opt(vm.swap_read_mib),
                opt(vm.swap_written_mib),
                opt(vm.shared_mib),
                opt(vm.zero_mib),
                opt(vm.saved_mib),
                format!("{:.2}", vm.guest_allocated_mib),
                vm.work.map_or("-".into(), |w| w.step.to_string()),
                vm.work.map_or("-".into(), |w| format!("{:.0}", w.ops_per_sec)),
            ];
            self.csv.write_record(&rec)?;
        }
        self.csv.flush()?;
        serde_json::to_writer(&mut self.jsonl, s)?;
        self.jsonl.write_all(b"\n")?;
        self.jsonl.flush()
    }
}

/// The machine a run was measured on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// `uname -r`.
    pub kernel: String,
    /// CPU model.
    pub cpu: String,
    /// CPUs this process may use.
    pub cores: usize,
    /// Host memory, MiB.
    pub mem_mib: u64,
    /// KVM backend the guests ran on (hardware or pvm), from the first VM's report.
    pub kvm_backend: String,
}

impl Machine {
    /// Describes this machine; `backend` as the VMs reported it.
    pub fn describe(backend: &str) -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim()))
            .unwrap_or("unknown")
            .to_string();
        let mem_kib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0);
        Machine {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            mem_mib: mem_kib / 1024,
            kvm_backend: backend.to_string(),
        }
    }
}
