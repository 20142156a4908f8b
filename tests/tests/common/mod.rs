//! Helpers shared by the integration tests: run real VMs on /dev/kvm and read the
//! guest's JSON lines.
#![allow(dead_code)] // each test binary uses a different subset

mod both_ways;
#[path = "../../../vmm/tests/common/temp_dir.rs"]
mod temp_dir;
#[allow(unused_imports)] // each test binary uses a different subset
pub use temp_dir::TempDir;

use std::time::{Duration, Instant};

use serde_json::Value;
use vmm::config::VmConfig;
use vmm::console::GuestStep;
use vmm::host::{Host, HostOptions, HostReport, WatchLimits};
use vmm::reclaim::sharing::PageSharing;
use vmm::vm::Vm;

/// Panics loudly if this machine has no usable /dev/kvm: these tests never skip.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("these tests boot real guests and need /dev/kvm (read-write): {e}");
    }
}

/// A config for the built-in guest with `workload`.
pub fn guest(name: &str, mem: u64, workload: &str) -> VmConfig {
    let mut c = VmConfig::new(name, mem);
    c.workload = workload.to_string();
    c.hang_timeout = Duration::from_secs(60);
    c
}

/// A finished run: the host report and each VM's console lines.
pub struct Run {
    pub report: HostReport,
    pub consoles: Vec<Vec<String>>,
}

impl Run {
    /// The JSON objects VM `vm` printed (its events: `boot`, `serving`, ...).
    pub fn json(&self, vm: usize) -> Vec<Value> {
        json_objects(&self.consoles[vm])
    }

    /// The step results VM `vm` printed.
    pub fn steps(&self, vm: usize) -> Vec<GuestStep> {
        vmm::console::steps(&self.consoles[vm])
    }

    /// The exit code of VM `vm`, panicking with its console if the VMM stopped it.
    pub fn exit_code(&self, vm: usize) -> u32 {
        let r = &self.report.vms[vm];
        r.exit_code.unwrap_or_else(|| panic!("{} did not exit: {:?}\n{}", r.vm, r.error, self.consoles[vm].join("\n")))
    }
}

/// The console lines that are JSON objects (the guest's events, not its steps).
pub fn json_objects(lines: &[String]) -> Vec<Value> {
    lines.iter().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter(Value::is_object).collect()
}

/// Runs `configs` to their end (2 minutes at most).
pub fn run(configs: &[VmConfig]) -> Run {
    let mut running = start_on(configs, HostOptions::default());
    let host = running.0.as_mut().expect("a host");
    host.watch(WatchLimits { timeout: Some(Duration::from_secs(120)), ..WatchLimits::default() });
    let consoles: Vec<Vec<String>> = host.vms().iter().map(|vm| vm.console().lines()).collect();
    let report = running.finish();
    for vm in &report.vms {
        let limit = vm.error.as_deref().is_some_and(|e| e.contains("time limit"));
        assert!(!limit, "{} did not finish within 2 minutes", vm.vm);
    }
    for (c, vm) in consoles.iter().zip(&report.vms) {
        // Trailing partial lines are flushed at finish; nothing else is lost.
        assert!(!c.is_empty() || vm.exit_code.is_none(), "{}: empty console", vm.vm);
    }
    Run { report, consoles }
}

/// Runs one VM.
pub fn run_one(config: VmConfig) -> Run {
    run(&[config])
}

/// VMs running on a [`Host`], torn down (in the host's order) when dropped. With
/// one VM it reads as that VM.
pub struct Running(Option<Host>);

impl Running {
    /// The host.
    pub fn host(&self) -> &Host {
        self.0.as_ref().expect("a host until finished")
    }

    /// The host, to change it.
    pub fn host_mut(&mut self) -> &mut Host {
        self.0.as_mut().expect("a host until finished")
    }

    /// VM `i`.
    pub fn vm(&self, i: usize) -> &Vm {
        &self.host().vms()[i]
    }

    /// Tears everything down now and reports.
    pub fn finish(mut self) -> HostReport {
        self.0.take().expect("a host").finish()
    }
}

impl std::ops::Deref for Running {
    type Target = Vm;
    fn deref(&self) -> &Vm {
        self.vm(0)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(host) = self.0.take() {
            host.finish();
        }
    }
}

/// Creates `configs` on a host with no reclaimer, none started (the error as the
/// user would read it).
pub fn create(configs: &[VmConfig]) -> Result<Host, String> {
    Host::create(configs, Instant::now(), HostOptions::default()).map_err(|e| e.to_string())
}

/// Creates `configs` on a host with the reclaimers of `opts` and starts them.
pub fn start_on(configs: &[VmConfig], opts: HostOptions) -> Running {
    require_kvm();
    let mut host = Host::create(configs, Instant::now(), opts).expect("create the VMs");
    host.start().expect("start");
    Running(Some(host))
}

/// Starts one VM and returns it running (for run-time commands).
pub fn start(config: VmConfig) -> Running {
    start_on(&[config], HostOptions::default())
}

/// Waits until the guest of `vm` serves run-time commands.
pub fn wait_serving(vm: &Vm) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while vm.progress().state != guest_abi::guest_state::SERVING {
        assert!(vm.ending().is_none(), "guest ended: {:?}\n{}", vm.ending(), vm.console().lines().join("\n"));
        assert!(Instant::now() < deadline, "guest never served commands:\n{}", vm.console().lines().join("\n"));
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A minimal x86-64 ELF executable whose single segment (at 1 MiB) holds `code`.
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    const BASE: u64 = 0x10_0000;
    let mut elf = Vec::new();
    let hdr_len = 64 + 56;
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&(BASE + hdr_len as u64).to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // shoff
    elf.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    let size = (hdr_len + code.len()) as u64;
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&7u32.to_le_bytes()); // RWX
    for v in [0u64, BASE, BASE, size, size, 0x1000] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(code);
    elf
}

/// Writes `bytes` to a fresh temporary file and returns its path.
pub fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// How long a stress test runs: `VMM_STRESS_DURATION` (`10m` for a long run:
/// liveness under contention shows after minutes), else `default` (short, for CI).
pub fn stress_duration(default: Duration) -> Duration {
    std::env::var("VMM_STRESS_DURATION")
        .map_or(default, |d| vmm::units::parse_duration(&d).unwrap_or_else(|e| panic!("VMM_STRESS_DURATION={d}: {e}")))
}

/// Configs of the built-in guest named `names`, each with `mem` and 2 vCPUs (two
/// writers per VM, as the race stress tests need), booting with `workload`.
pub fn two_vcpu_guests(names: &[&str], mem: u64, workload: &str) -> Vec<VmConfig> {
    names
        .iter()
        .map(|n| {
            let mut c = guest(n, mem, workload);
            c.vcpus = 2;
            c
        })
        .collect()
}

/// Changes the running scanner's configuration and waits until it runs by it.
pub fn change_sharing(sharing: &PageSharing, change: impl FnOnce(&mut tps::Config)) {
    let mut c = sharing.scanner().config();
    change(&mut c);
    sharing.scanner().set_config(c);
    assert!(sharing.scanner().wait_config_applied(Duration::from_secs(60)), "the scanner did not take the new config");
}

/// Turns scanning on and waits for two full passes: every page seen after the last
/// guest write, every merge applied.
pub fn converge(sharing: &PageSharing) -> tps::Stats {
    change_sharing(sharing, |c| c.enabled = true);
    let passes = sharing.stats().full_passes;
    assert!(sharing.scanner().wait_passes(passes + 2, Duration::from_secs(120)), "no full pass");
    sharing.stats()
}

/// How the test guest is booted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boot {
    /// Its ELF through the VMM's own protocol.
    Elf,
    /// Packaged as a bzImage, through the Linux boot protocol (zero page, e820,
    /// command line, ACPI).
    BzImage,
}

/// `config` booted the way `boot` says.
pub fn via(boot: Boot, mut config: VmConfig) -> VmConfig {
    if boot == Boot::BzImage {
        config.kernel = vmm::config::Kernel::BuiltinBzImage;
    }
    config
}

/// Runs each named test function (`fn name(boot: Boot)`) twice, as `elf::name` and
/// `bzimage::name`: through the VMM's own boot protocol and through Linux's.
#[allow(unused_macros)] // each test binary uses a different subset
macro_rules! on_both_boot_paths {
    ($($name:ident),* $(,)?) => {
        $crate::common::both_ways!(
            elf => super::common::Boot::Elf,
            bzimage => super::common::Boot::BzImage;
            $($name),*
        );
    };
}
#[allow(unused_imports)]
pub(crate) use both_ways::both_ways;
#[allow(unused_imports)]
pub(crate) use on_both_boot_paths;
