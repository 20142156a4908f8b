//! One VM: its KVM handle, guest RAM, devices, vCPU threads, and how it ends.
//!
//! A [`Vm`] is created fully (RAM, memory slots, vCPUs in long mode, kernel and boot
//! information in memory) before any guest code runs, so every configuration
//! error is reported before the first instruction. [`VmShared`] is the part the vCPU
//! threads see.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_abi::{guest_state, BALLOON_MMIO_BASE, VIF_BASE_GPA};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use serde::Serialize;
use swapd::SwapStats;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootParams};
use crate::config::{ConsoleTarget, VmConfig};
use crate::console::{self, Console, GuestStep};
use crate::control::GuestProgress;
use crate::devices::bus::Bus;
use crate::devices::guest_errors::GuestErrors;
use crate::devices::serial::{IrqLine, SerialPort, PORT_BASE, PORT_COUNT};
use crate::devices::virtio::balloon::{Balloon, BalloonConfig};
use crate::devices::virtio::mmio::{self, MmioTransport};
use crate::devices::virtio::worker::Worker;
use crate::devices::virtio::Interrupt;
use crate::kvm_stats;
use crate::linux::platform::LinuxPlatform;
use crate::linux::{kind, TestGuestParams};
use crate::loader;
use crate::memory::slots::MemorySlots;
use crate::memory::GuestRam;
mod error;
mod shared;
mod vcpu;

use crate::x86::{cpuid, pvm, regs, Backend};
pub use error::{KvmOpenError, SetupError, VmError};
use pagestate::{Mode, PauseError, PauseGuard};
pub use shared::{BalloonTargetError, CommandOutput, Ending, VmShared, VmState, VmStats};

/// Queues of the balloon at most (inflate, deflate, stats, reporting).
const BALLOON_QUEUES: u32 = 4;

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
    /// Its allocation by the free-memory policy (min, max, shares, active estimate,
    /// target, ...), if the policy runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alloc: Option<crate::reclaim::policy::VmAllocation>,
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
pub fn open_kvm() -> Result<Kvm, KvmOpenError> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => KvmOpenError::Missing,
        libc::EACCES | libc::EPERM => KvmOpenError::Permission,
        _ => KvmOpenError::Other(e),
    })
}

impl Vm {
    /// Builds VM number `index` of its process. `t0` is the reference for the boot
    /// figures (the start of `vmm run`).
    pub fn create(kvm: &Kvm, config: &VmConfig, index: u32, t0: Instant, label_console: bool) -> Result<Vm, VmError> {
        config.validate()?;
        Self::set_up(kvm, config, index, t0, label_console)
            .map_err(|source| VmError::Setup { vm: config.name.clone(), source })
    }

    fn set_up(kvm: &Kvm, config: &VmConfig, index: u32, t0: Instant, label_console: bool) -> Result<Vm, SetupError> {
        let ioctl = SetupError::ioctl;
        let image = loader::kernel_bytes(&config.kernel)?;
        let kind = kind::recognise(&image)?;
        let vm_fd = Arc::new(kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?);
        let ram = Arc::new(GuestRam::new(config.mem, config.host_pages)?);
        // SAFETY: `ram` lives in VmShared, which the Vm holds until after its VM fd
        // and slots (fields dropped in order, `shared` last).
        let slots = unsafe { MemorySlots::register(vm_fd.clone(), &ram) }?;

        // A Linux kernel's irqchip must exist before its vCPUs.
        let linux = match kind.is_linux_protocol() {
            true => Some(LinuxPlatform::new(&kind, &vm_fd)?),
            false => None,
        };
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for i in 0..config.vcpus {
            let vcpu = vm_fd.create_vcpu(i as u64).map_err(SetupError::ioctl(format!("KVM_CREATE_VCPU {i}")))?;
            // Linux-protocol guests get their own APIC IDs and topology; the test
            // guest's own protocol passes its index in a register.
            let cpuid = match linux {
                Some(_) => cpuid::for_vcpu(&supported, i, config.vcpus, tsc_deadline),
                None => supported.clone(),
            };
            vcpu.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
            vcpus.push(vcpu);
        }
        let backend = Backend::detect(&vcpus[0]);
        LinuxPlatform::check_backend(&kind, backend)?;
        let tsc_khz = vcpus[0].get_tsc_khz().unwrap_or(0) as u64;
        let vm_seed = random_seed() ^ index as u64;
        let params = BootParams {
            vcpus: config.vcpus,
            backend: backend.abi(),
            vm_index: index,
            tsc_khz,
            vm_seed,
            workload: &config.workload,
            balloon_mmio: config.balloon.as_ref().map(|_| BALLOON_MMIO_BASE),
        };
        let (layout, linux_layout) = match &linux {
            Some(_) => {
                let test_guest = TestGuestParams { vm_index: index, vm_seed, backend, tsc_khz };
                let l = LinuxPlatform::boot(&kind, &ram, &image, config, &test_guest)?;
                (boot::BootLayout { entry: l.entry, cr3: l.cr3 }, Some(l))
            }
            None => (boot::prepare(&ram, &image, &params)?, None),
        };
        for (i, vcpu) in vcpus.iter().enumerate() {
            if backend == Backend::Pvm {
                pvm::register_vif(vcpu, VIF_BASE_GPA + i as u64 * 4096)?;
            }
            if let (Some(platform), Some(layout)) = (&linux, &linux_layout) {
                platform.setup_vcpu(vcpu, i as u32, layout)?;
                continue;
            }
            let sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
            vcpu.set_sregs(&regs::long_mode_sregs(sregs, layout.cr3)).map_err(ioctl("KVM_SET_SREGS"))?;
            vcpu.set_regs(&regs::entry_regs(layout.entry, guest_abi::BOOT_INFO_GPA, i as u32))
                .map_err(ioctl("KVM_SET_REGS"))?;
        }

        let console = Console::new(&config.console, &config.name, label_console).map_err(SetupError::Console)?;
        let mut pio = Bus::new();
        let serial_irq = match &linux {
            Some(platform) => platform.serial_irq(&vm_fd)?,
            None => IrqLine::None,
        };
        let serial = Arc::new(Mutex::new(SerialPort::new(console.clone(), serial_irq)));
        if config.console == ConsoleTarget::Stdio {
            crate::console_input::forward_stdin(serial.clone()).map_err(SetupError::Console)?;
        }
        pio.insert(serial, PORT_BASE.into(), PORT_COUNT.into())?;
        let mut mmio = Bus::new();
        if let Some(platform) = &linux {
            platform.attach_devices(&mut pio, &mut mmio)?;
        }
        let balloon = match &config.balloon {
            Some(cfg) => {
                let irqfd = match &linux {
                    Some(platform) => platform.balloon_irqfd(&vm_fd)?,
                    None => None,
                };
                Some(attach_balloon(&vm_fd, &mut mmio, &config.name, cfg, &ram, irqfd)?)
            }
            None => None,
        };
        let shared = Arc::new(VmShared::new(
            config.name.clone(),
            config.vcpus,
            (pio, mmio),
            console,
            ram,
            balloon.as_ref().map(|(dev, _)| dev.clone()),
        ));
        if let Some(platform) = &linux {
            platform.end_line.connect(&shared);
        }
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
    pub fn start(&mut self) -> Result<(), VmError> {
        self.last_progress = (0, Instant::now());
        let failed = |what| {
            let vm = self.config.name.clone();
            move |source| VmError::Setup { vm, source: SetupError::Thread { what, source } }
        };
        if let (Some(dev), Some(fds)) = (self.shared.balloon(), self.balloon_notify.take()) {
            let worker =
                Worker::spawn(format!("{}-balloon", self.config.name), dev.clone(), fds, self.shared.run().clone())
                    .map_err(failed("balloon"))?;
            self.workers.push(worker);
        }
        for (cpu, vcpu) in std::mem::take(&mut self.pending_vcpus).into_iter().enumerate() {
            let shared = self.shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("{}-vcpu{cpu}", self.config.name))
                .spawn(move || vcpu::run(vcpu, cpu as u32, shared))
                .map_err(failed("vCPU"))?;
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
        self.shared.console()
    }

    /// Its KVM memory slots (dirty logging).
    pub fn memory_slots(&self) -> &Arc<MemorySlots> {
        &self.slots
    }

    /// Its RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        self.shared.ram()
    }

    /// Its balloon device, if it has one.
    pub fn balloon(&self) -> Option<&Arc<Mutex<Balloon>>> {
        self.shared.balloon()
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
        self.shared.run().pause_guard(Duration::from_secs(5))
    }

    /// Stops the VM from outside.
    pub fn stop(&self, why: &str) {
        self.shared.end(Ending::Stopped(why.to_string()));
    }

    /// How the VM ended, if it has.
    pub fn ending(&self) -> Option<Ending> {
        self.shared.ending()
    }

    /// Waits up to `timeout` for every vCPU thread to leave its run loop (after the VM
    /// was stopped); false if one is still in it.
    pub fn wait_exited(&self, timeout: Duration) -> bool {
        self.shared.run().wait_exited(timeout)
    }

    /// Waits up to `timeout` for the VM to end.
    pub fn wait(&self, timeout: Duration) -> Option<Ending> {
        self.shared.wait_ended(timeout)
    }

    /// Watchdog tick: ends a guest that has made no progress on its control page
    /// for the configured hang timeout while allowed to run. Applies to the test
    /// guest, and to other kernels once they use the control page.
    pub fn check_hang(&mut self, now: Instant) {
        if self.ending().is_some() {
            return;
        }
        let p = self.progress();
        if !self.config.kernel.is_builtin() && p.state == guest_state::BOOTING {
            return;
        }
        if p.heartbeat != self.last_progress.0 || self.shared.run().mode() != Mode::Running {
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
        // A vCPU blocked on a page its swapper cannot bring back leaves once the
        // swapper goes (its owner drops it after `wait_exited`).
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("{}: a vCPU thread panicked", self.config.name);
            }
        }
        self.workers.clear();
        self.shared.console().flush();
        let kvm = self.shared.kvm_stats();
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
            first_insn_ms: self.shared.first_instruction().map(ms),
            first_output_ms: self.shared.console().first_output().map(ms),
            guest_rss_mib: self.shared.ram().resident_bytes() as f64 / (1 << 20) as f64,
            counters: kvm_stats::REPORTED.iter().map(|&k| (k.to_string(), kvm.get(k).copied().unwrap_or(0))).collect(),
            kvm,
            steps: console::steps(&self.shared.console().lines()),
            swap: None,
            alloc: None,
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

/// Creates the balloon behind a virtio-mmio window at [`BALLOON_MMIO_BASE`], with
/// ioeventfds on its queue-notify register and its interrupts on `irqfd` where the
/// VM has an interrupt controller; returns the device and the queue
/// eventfds for its worker.
fn attach_balloon(
    vm_fd: &VmFd,
    mmio: &mut Bus,
    name: &str,
    cfg: &BalloonConfig,
    ram: &Arc<GuestRam>,
    irqfd: Option<EventFd>,
) -> Result<(Arc<Mutex<Balloon>>, Vec<EventFd>), SetupError> {
    let interrupt = Arc::new(irqfd.map_or_else(Interrupt::default, Interrupt::with_irqfd));
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
        let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(SetupError::EventFd)?;
        if let Err(e) = vm_fd.register_ioevent(&fd, &IoEventAddress::Mmio(notify_addr), q) {
            // Still works: the notify write then exits to the transport.
            log::warn!("{name}: KVM_IOEVENTFD for balloon queue {q} failed ({e}); notifications will exit");
        }
        fds.push(fd);
    }
    let clones = fds.iter().map(|f| f.try_clone().map_err(SetupError::EventFd)).collect::<Result<Vec<_>, _>>()?;
    let transport = MmioTransport::new(
        format!("{name}/balloon"),
        device.clone(),
        ram.clone(),
        interrupt,
        errors,
        clones,
        generation,
    );
    mmio.insert(Arc::new(Mutex::new(transport)), BALLOON_MMIO_BASE, mmio::MMIO_SIZE)?;
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
