//! One VM: its KVM handle, guest RAM, devices, vCPU threads, and how it ends.
//!
//! A [`Vm`] is created fully (RAM, memory slots, vCPUs in long mode, kernel and boot
//! information in memory) before any guest code runs, so every configuration
//! error is reported before the first instruction. [`VmShared`] is the part the vCPU
//! threads see.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_abi::{guest_state, BALLOON_MMIO_BASE, VIF_BASE_GPA};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use swapd::SwapStats;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootParams};
use crate::config::{Kernel, VmConfig};
use crate::console::{self, Console, GuestStep};
use crate::control::{self, GuestProgress};
use crate::devices::bus::Bus;
use crate::devices::guest_errors::GuestErrors;
use crate::devices::serial::{SerialPort, PORT_BASE, PORT_COUNT};
use crate::devices::virtio::balloon::metrics::BalloonSnapshot;
use crate::devices::virtio::balloon::{Balloon, BalloonConfig};
use crate::devices::virtio::mmio::{self, MmioTransport};
use crate::devices::virtio::worker::Worker;
use crate::devices::virtio::Interrupt;
use crate::kvm_stats;
use crate::loader;
use crate::memory::slots::MemorySlots;
use crate::memory::GuestRam;
use crate::reclaim::swap::SwapSlot;
use crate::vcpu;
use crate::x86::{pvm, regs, Backend};
use pagestate::{Mode, PauseError, PauseGuard, RunControl};

/// Queues of the balloon at most (inflate, deflate, stats, reporting).
const BALLOON_QUEUES: u32 = 4;

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The guest wrote this code to the exit port.
    GuestExit(u32),
    /// The VMM stopped the guest because something went wrong (triple fault,
    /// KVM error, hang).
    Error(String),
    /// Stopped from outside (interrupt, time limit, shutdown of the host process).
    Stopped(String),
}

/// What a VM is doing, as the control API reports it (`vm_stats`). Serialized as
/// `"running"`, `"paused"`, `"stopping"`, or, once it ended, `{"exited": CODE}`,
/// `{"failed": "why"}`, `{"stopped": "why"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Its vCPUs run guest code.
    Running,
    /// Its vCPUs are held out of the guest (page sharing, the swapper, a pause).
    Paused,
    /// It is being stopped; its ending is not recorded yet.
    Stopping,
    /// The guest ended with this exit code.
    Exited(u32),
    /// The VMM stopped it because something went wrong (triple fault, KVM error,
    /// hang, a damaged swap slot).
    Failed(String),
    /// Stopped from outside (interrupt, time limit, end of the host process).
    Stopped(String),
}

impl VmState {
    /// The state of a VM whose vCPUs are in `mode`, and which ended as `ending`.
    fn new(mode: Mode, ending: Option<Ending>) -> VmState {
        match (ending, mode) {
            (Some(Ending::GuestExit(code)), _) => VmState::Exited(code),
            (Some(Ending::Error(e)), _) => VmState::Failed(e),
            (Some(Ending::Stopped(why)), _) => VmState::Stopped(why),
            (None, Mode::Running) => VmState::Running,
            (None, Mode::Paused) => VmState::Paused,
            (None, Mode::Stopping) => VmState::Stopping,
        }
    }
}

/// A VM's memory figures and counters (the control API's `vm_stats`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmStats {
    /// What it is doing.
    pub state: VmState,
    /// Guest RAM, MiB.
    pub mem_mib: f64,
    /// Guest RAM resident in host memory, MiB (proportional: `Pss`).
    pub guest_rss_mib: f64,
    /// Guest RAM in the balloon, MiB (none without a balloon device).
    pub ballooned_mib: Option<f64>,
    /// What the guest publishes on its control page.
    pub guest: GuestProgress,
    /// The balloon's counters (none without a balloon device).
    pub balloon: Option<BalloonSnapshot>,
    /// The host swapper's counters, if the VM has one.
    pub swap: Option<SwapStats>,
}

/// The state of a VM that its vCPU threads share.
pub struct VmShared {
    /// The VM's name.
    pub name: String,
    /// Mode and wake-ups of the vCPUs, gate of the device threads.
    pub run: Arc<RunControl>,
    /// Port I/O devices (COM1).
    pub pio: Bus,
    /// MMIO devices (in the MMIO hole).
    pub mmio: Bus,
    /// The console behind COM1.
    pub console: Arc<Console>,
    /// Guest RAM.
    pub ram: Arc<GuestRam>,
    /// The balloon device, if the VM has one.
    pub balloon: Option<Arc<Mutex<Balloon>>>,
    /// The host swapper, once swapping is on.
    pub swap: SwapSlot,
    ending: Mutex<Option<Ending>>,
    ended: Condvar,
    command_lock: Mutex<()>,
    first_insn: OnceLock<Instant>,
    stats: Mutex<BTreeMap<String, u64>>,
}

impl VmShared {
    /// Ends the VM (the first ending wins) and stops its vCPUs.
    pub fn end(&self, ending: Ending) {
        let mut slot = self.ending.lock().unwrap();
        if slot.is_none() {
            match &ending {
                Ending::GuestExit(code) => log::info!("{}: guest exited with code {code}", self.name),
                Ending::Error(msg) => log::error!("{}: {msg}", self.name),
                Ending::Stopped(why) => log::info!("{}: stopped: {why}", self.name),
            }
            *slot = Some(ending);
        }
        self.run.stop();
        self.ended.notify_all();
    }

    /// Runs a command of the workload language in a serving test guest and waits
    /// for it; returns its status (0 = success) and the lines it printed. Fails if the
    /// guest is not serving commands or busy with another one.
    pub fn run_command(&self, cmd: &str, timeout: Duration) -> Result<CommandOutput, String> {
        crate::config::check_workload(cmd).map_err(|e| format!("bad command: {e}"))?;
        let _one_at_a_time = self.command_lock.lock().unwrap();
        let mem = self.ram.mem();
        let p = control::progress(mem);
        if self.ending().is_some() {
            return Err(format!("vm {} has ended", self.name));
        }
        if p.state != guest_state::SERVING {
            return Err(format!("vm {} is not taking commands yet (its boot workload is still running)", self.name));
        }
        if control::posted_seq(mem) != p.ack_seq {
            return Err(format!("vm {} is busy with another command", self.name));
        }
        let first_line = self.console.line_count();
        let seq = control::post(mem, cmd)?;
        self.run.wake();
        let deadline = Instant::now() + timeout;
        loop {
            let p = control::progress(mem);
            if p.ack_seq == seq {
                // Lines of a finished command are printed before the ack.
                return Ok(CommandOutput { status: p.cmd_status, lines: self.console.lines_since(first_line) });
            }
            if let Some(e) = self.ending() {
                return Err(format!("vm {} ended during the command: {e:?}", self.name));
            }
            if Instant::now() >= deadline {
                return Err(format!("vm {}: command not finished after {:.1}s", self.name, timeout.as_secs_f64()));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// How the VM ended, if it has.
    pub fn ending(&self) -> Option<Ending> {
        self.ending.lock().unwrap().clone()
    }

    /// What the guest publishes on the control page.
    pub fn progress(&self) -> GuestProgress {
        control::progress(self.ram.mem())
    }

    /// Memory figures and counters, for the control API.
    pub fn stats(&self) -> VmStats {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let balloon = self.balloon.as_ref().map(|b| b.lock().unwrap().snapshot());
        VmStats {
            state: VmState::new(self.run.mode(), self.ending()),
            mem_mib: mib(self.ram.size()),
            guest_rss_mib: mib(self.ram.resident_bytes()),
            ballooned_mib: balloon.as_ref().map(|b| mib(b.ballooned_pages * guest_abi::PAGE_SIZE)),
            guest: self.progress(),
            balloon,
            swap: self.swap.stats(),
        }
    }

    /// The guest reached its first instruction.
    pub fn mark_first_instruction(&self) {
        self.first_insn.get_or_init(Instant::now);
    }

    /// Adds one vCPU's KVM counters to the VM's.
    pub fn add_stats(&self, stats: &BTreeMap<String, u64>) {
        let mut total = self.stats.lock().unwrap();
        for (k, v) in stats {
            *total.entry(k.clone()).or_default() += v;
        }
    }
}

/// What a finished VM reports (one JSON line in `vmm run`'s summary).
#[derive(Clone, Debug, Serialize)]
pub struct VmReport {
    /// VM name.
    pub vm: String,
    /// The guest's exit code, if it exited by itself.
    pub exit_code: Option<u32>,
    /// Why the VMM ended it, if it did.
    pub error: Option<String>,
    /// KVM backend.
    pub backend: Backend,
    /// vCPU count.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// From the start of the host process (or library caller) to the VM's end.
    pub wall_ms: f64,
    /// From the start to the guest's first instruction (its boot-marker exit).
    pub first_insn_ms: Option<f64>,
    /// From the start to the guest's first console output.
    pub first_output_ms: Option<f64>,
    /// Guest RAM resident in host memory at the end, MiB.
    pub guest_rss_mib: f64,
    /// The KVM vCPU counters of [`kvm_stats::REPORTED`] (`exits`, `insn_emulation`,
    /// ...), summed over vCPUs.
    #[serde(flatten)]
    pub counters: BTreeMap<String, u64>,
    /// Every KVM vCPU counter, summed over vCPUs.
    #[serde(skip)]
    pub kvm: BTreeMap<String, u64>,
    /// The step results the test guest printed.
    #[serde(skip)]
    pub steps: Vec<GuestStep>,
    /// The host swapper's counters, if swapping was on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap: Option<SwapStats>,
}

/// A running (or finished) VM.
pub struct Vm {
    config: VmConfig,
    backend: Backend,
    t0: Instant,
    pending_vcpus: Vec<VcpuFd>,
    threads: Vec<JoinHandle<()>>,
    /// Queue eventfds of the balloon, until its worker starts.
    balloon_notify: Option<Vec<EventFd>>,
    workers: Vec<Worker>,
    last_progress: (u64, Instant),
    slots: Arc<MemorySlots>,
    /// Last: the RAM (in `shared`) outlives the VM fd held by `slots`.
    shared: Arc<VmShared>,
}

/// Opens `/dev/kvm` with an error a user can act on.
pub fn open_kvm() -> Result<Kvm, String> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => {
            "/dev/kvm does not exist: this host has no KVM (load the kvm module, or enable nested virtualisation)"
                .to_string()
        }
        libc::EACCES | libc::EPERM => {
            "no permission to open /dev/kvm: run as root or join the group that owns it (usually kvm)".to_string()
        }
        _ => format!("cannot open /dev/kvm: {e}"),
    })
}

impl Vm {
    /// Builds VM number `index` of its process. `t0` is the reference for the boot
    /// figures (the start of `vmm run`).
    pub fn create(kvm: &Kvm, config: &VmConfig, index: u32, t0: Instant, label_console: bool) -> Result<Vm, String> {
        config.validate()?;
        let ctx = |m: String| format!("vm {}: {m}", config.name);
        let image = loader::kernel_bytes(&config.kernel).map_err(ctx)?;
        let vm_fd = Arc::new(kvm.create_vm().map_err(|e| ctx(format!("KVM_CREATE_VM failed: {e}")))?);
        let ram = Arc::new(GuestRam::new(config.mem, config.host_pages).map_err(|e| ctx(e.to_string()))?);
        // SAFETY: `ram` lives in VmShared, which the Vm holds until after its VM fd
        // and slots (fields dropped in order, `shared` last).
        let slots = unsafe { MemorySlots::register(vm_fd.clone(), &ram) }.map_err(|e| ctx(e.to_string()))?;

        let cpuid =
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|e| ctx(format!("KVM_GET_SUPPORTED_CPUID: {e}")))?;
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for i in 0..config.vcpus {
            let vcpu = vm_fd.create_vcpu(i as u64).map_err(|e| ctx(format!("KVM_CREATE_VCPU {i}: {e}")))?;
            vcpu.set_cpuid2(&cpuid).map_err(|e| ctx(format!("KVM_SET_CPUID2: {e}")))?;
            vcpus.push(vcpu);
        }
        let backend = Backend::detect(&vcpus[0]);
        let tsc_khz = vcpus[0].get_tsc_khz().unwrap_or(0) as u64;
        let params = BootParams {
            vcpus: config.vcpus,
            backend: backend.abi(),
            vm_index: index,
            tsc_khz,
            vm_seed: random_seed() ^ index as u64,
            workload: &config.workload,
            balloon_mmio: config.balloon.as_ref().map(|_| BALLOON_MMIO_BASE),
        };
        let layout = boot::prepare(&ram, &image, &params).map_err(ctx)?;
        for (i, vcpu) in vcpus.iter().enumerate() {
            if backend == Backend::Pvm {
                pvm::register_vif(vcpu, VIF_BASE_GPA + i as u64 * 4096).map_err(ctx)?;
            }
            let sregs = vcpu.get_sregs().map_err(|e| ctx(format!("KVM_GET_SREGS: {e}")))?;
            vcpu.set_sregs(&regs::long_mode_sregs(sregs, layout.cr3))
                .map_err(|e| ctx(format!("KVM_SET_SREGS: {e}")))?;
            vcpu.set_regs(&regs::entry_regs(layout.entry, guest_abi::BOOT_INFO_GPA, i as u32))
                .map_err(|e| ctx(format!("KVM_SET_REGS: {e}")))?;
        }

        let console = Console::new(&config.console, &config.name, label_console).map_err(|e| ctx(e.to_string()))?;
        let mut pio = Bus::new();
        let serial = Arc::new(Mutex::new(SerialPort::new(console.clone())));
        pio.insert(serial, PORT_BASE.into(), PORT_COUNT.into()).map_err(|e| ctx(e.to_string()))?;
        let mut mmio = Bus::new();
        let balloon = match &config.balloon {
            Some(cfg) => Some(attach_balloon(&vm_fd, &mut mmio, &config.name, cfg, &ram).map_err(ctx)?),
            None => None,
        };
        let shared = Arc::new(VmShared {
            name: config.name.clone(),
            run: Arc::new(RunControl::new(config.vcpus)),
            pio,
            mmio,
            balloon: balloon.as_ref().map(|(dev, _)| dev.clone()),
            console,
            ram,
            swap: SwapSlot::default(),
            ending: Mutex::new(None),
            ended: Condvar::new(),
            command_lock: Mutex::new(()),
            first_insn: OnceLock::new(),
            stats: Mutex::new(BTreeMap::new()),
        });
        log::info!(
            "{}: {} MiB, {} vCPU(s), {backend:?} backend, TSC {tsc_khz} kHz, entry {:#x}",
            config.name,
            config.mem >> 20,
            config.vcpus,
            layout.entry
        );
        Ok(Vm {
            shared,
            balloon_notify: balloon.map(|(_, fds)| fds),
            workers: Vec::new(),
            config: config.clone(),
            backend,
            t0,
            pending_vcpus: vcpus,
            threads: Vec::new(),
            last_progress: (0, Instant::now()),
            slots: Arc::new(slots),
        })
    }

    /// Starts the device threads and the vCPU threads.
    pub fn start(&mut self) -> Result<(), String> {
        self.last_progress = (0, Instant::now());
        if let (Some(dev), Some(fds)) = (&self.shared.balloon, self.balloon_notify.take()) {
            let worker =
                Worker::spawn(format!("{}-balloon", self.config.name), dev.clone(), fds, self.shared.run.clone())
                    .map_err(|e| format!("vm {}: cannot start the balloon thread: {e}", self.config.name))?;
            self.workers.push(worker);
        }
        for (cpu, vcpu) in std::mem::take(&mut self.pending_vcpus).into_iter().enumerate() {
            let shared = self.shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("{}-vcpu{cpu}", self.config.name))
                .spawn(move || vcpu::run(vcpu, cpu as u32, shared))
                .map_err(|e| format!("vm {}: cannot start a vCPU thread: {e}", self.config.name))?;
            self.threads.push(handle);
        }
        Ok(())
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Its configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The KVM backend it runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Its console.
    pub fn console(&self) -> &Arc<Console> {
        &self.shared.console
    }

    /// Its KVM memory slots (dirty logging).
    pub fn memory_slots(&self) -> &Arc<MemorySlots> {
        &self.slots
    }

    /// Its RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.shared.ram
    }

    /// Its balloon device, if it has one.
    pub fn balloon(&self) -> Option<&Arc<Mutex<Balloon>>> {
        self.shared.balloon.as_ref()
    }

    /// The shared state (for the control API and reclaim threads).
    pub fn shared(&self) -> &Arc<VmShared> {
        &self.shared
    }

    /// What the guest publishes on the control page.
    pub fn progress(&self) -> GuestProgress {
        self.shared.progress()
    }

    /// Pulls every vCPU out of the guest and keeps it out until the guard drops; the
    /// VM then runs again once no other pause (page sharing's, another thread's)
    /// holds it. Fails if the VM is ending or did not settle within 5 s.
    pub fn pause(&self) -> Result<PauseGuard, PauseError> {
        self.shared.run.pause_guard(Duration::from_secs(5))
    }

    /// Stops the VM from outside.
    pub fn stop(&self, why: &str) {
        self.shared.end(Ending::Stopped(why.to_string()));
    }

    /// How the VM ended, if it has.
    pub fn ending(&self) -> Option<Ending> {
        self.shared.ending()
    }

    /// Waits up to `timeout` for the VM to end.
    pub fn wait(&self, timeout: Duration) -> Option<Ending> {
        let slot = self.shared.ending.lock().unwrap();
        let (slot, _) = self.shared.ended.wait_timeout_while(slot, timeout, |e| e.is_none()).unwrap();
        slot.clone()
    }

    /// Watchdog tick: ends a guest that has made no progress on its control page
    /// for the configured hang timeout while allowed to run. Applies to the test
    /// guest, and to other kernels once they use the control page.
    pub fn check_hang(&mut self, now: Instant) {
        if self.ending().is_some() {
            return;
        }
        let p = self.progress();
        if self.config.kernel != Kernel::Builtin && p.state == guest_state::BOOTING {
            return;
        }
        if p.heartbeat != self.last_progress.0 || self.shared.run.mode() != Mode::Running {
            self.last_progress = (p.heartbeat, now);
            return;
        }
        let quiet = now.duration_since(self.last_progress.1);
        if quiet >= self.config.hang_timeout {
            let what = if p.state == guest_state::BOOTING { "did not start" } else { "stopped responding" };
            self.shared.end(Ending::Error(format!(
                "guest {what}: no progress for {:.1}s (hang timeout)",
                quiet.as_secs_f64()
            )));
        }
    }

    /// Runs a command of the workload language in the serving test guest and waits
    /// for it (see [`VmShared::run_command`]).
    pub fn run_command(&self, cmd: &str, timeout: Duration) -> Result<CommandOutput, String> {
        self.shared.run_command(cmd, timeout)
    }

    /// Waits for the vCPU threads and reports. The VM must have ended.
    pub fn finish(mut self) -> VmReport {
        let ending = self.ending().unwrap_or_else(|| {
            self.stop("finished by its owner");
            self.ending().expect("ending set by stop")
        });
        let end_time = Instant::now();
        // The swap file goes once no vCPU can fault on it any more.
        self.shared.run.wait_exited(Duration::from_secs(2));
        let swap = self.shared.swap.close();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("{}: a vCPU thread panicked", self.config.name);
            }
        }
        self.workers.clear();
        self.shared.console.flush();
        let kvm = self.shared.stats.lock().unwrap().clone();
        let ms = |t: Instant| t.duration_since(self.t0).as_secs_f64() * 1e3;
        let (exit_code, error) = match ending {
            Ending::GuestExit(c) => (Some(c), None),
            Ending::Error(e) => (None, Some(e)),
            Ending::Stopped(w) => (None, Some(format!("stopped: {w}"))),
        };
        VmReport {
            vm: self.config.name.clone(),
            exit_code,
            error,
            backend: self.backend,
            vcpus: self.config.vcpus,
            mem_mib: self.config.mem >> 20,
            wall_ms: ms(end_time),
            first_insn_ms: self.shared.first_insn.get().map(|&t| ms(t)),
            first_output_ms: self.shared.console.first_output().map(ms),
            guest_rss_mib: self.shared.ram.resident_bytes() as f64 / (1 << 20) as f64,
            counters: kvm_stats::REPORTED.iter().map(|&k| (k.to_string(), kvm.get(k).copied().unwrap_or(0))).collect(),
            kvm,
            steps: console::steps(&self.shared.console.lines()),
            swap,
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shared.end(Ending::Stopped("dropped".into()));
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}

/// What a run-time command returned.
#[derive(Clone, Debug)]
pub struct CommandOutput {
    /// 0 if every step succeeded.
    pub status: u32,
    /// The console lines printed while it ran.
    pub lines: Vec<String>,
}

impl CommandOutput {
    /// The step results among its lines.
    pub fn steps(&self) -> Vec<GuestStep> {
        console::steps(&self.lines)
    }
}

/// Creates the balloon behind a virtio-mmio window at [`BALLOON_MMIO_BASE`], with
/// ioeventfds on its queue-notify register; returns the device and the queue
/// eventfds for its worker.
fn attach_balloon(
    vm_fd: &VmFd,
    mmio: &mut Bus,
    name: &str,
    cfg: &BalloonConfig,
    ram: &Arc<GuestRam>,
) -> Result<(Arc<Mutex<Balloon>>, Vec<EventFd>), String> {
    let interrupt = Arc::new(Interrupt::default());
    let errors = Arc::new(GuestErrors::new(format!("{name}/balloon")));
    let generation = Arc::new(AtomicU32::new(0));
    let device = Arc::new(Mutex::new(Balloon::new(
        format!("{name}/balloon"),
        cfg.clone(),
        ram.clone(),
        interrupt.clone(),
        errors.clone(),
        generation.clone(),
    )));
    let notify_addr = BALLOON_MMIO_BASE + mmio::QUEUE_NOTIFY;
    let mut fds = Vec::new();
    for q in 0..BALLOON_QUEUES {
        let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        if let Err(e) = vm_fd.register_ioevent(&fd, &IoEventAddress::Mmio(notify_addr), q) {
            // Still works: the notify write then exits to the transport.
            log::warn!("{name}: KVM_IOEVENTFD for balloon queue {q} failed ({e}); notifications will exit");
        }
        fds.push(fd);
    }
    let clones =
        fds.iter().map(|f| f.try_clone().map_err(|e| format!("eventfd: {e}"))).collect::<Result<Vec<_>, _>>()?;
    let transport = MmioTransport::new(
        format!("{name}/balloon"),
        device.clone(),
        ram.clone(),
        interrupt,
        errors,
        clones,
        generation,
    );
    mmio.insert(Arc::new(Mutex::new(transport)), BALLOON_MMIO_BASE, mmio::MMIO_SIZE).map_err(|e| e.to_string())?;
    Ok((device, fds))
}

/// 64 random bits (the time if the kernel has none to give).
pub(crate) fn random_seed() -> u64 {
    let mut seed = 0u64;
    // SAFETY: getrandom writes at most 8 bytes into `seed`.
    let n = unsafe { libc::getrandom((&mut seed as *mut u64).cast(), 8, 0) };
    if n != 8 {
        seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
    }
    seed
}
