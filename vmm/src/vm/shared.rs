//! The part of a VM that its vCPU threads, device threads, reclaimers and the
//! control API share: [`VmShared`], how it ends ([`Ending`]), and what it reports
//! while it runs ([`VmStats`]).
//!
//! Everything a thread other than the VM's owner may do to a running VM goes
//! through its methods: end it, run a command in its guest, set its balloon's
//! target (which wakes the guest's driver), read its figures.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use guest_abi::guest_state;
use pagestate::{Mode, RunControl};
use serde::{Deserialize, Serialize};
use swapd::SwapStats;

use crate::console::{self, Console, GuestStep};
use crate::control::{self, GuestProgress};
use crate::devices::bus::Bus;
use crate::devices::virtio::balloon::metrics::BalloonSnapshot;
use crate::devices::virtio::balloon::Balloon;
use crate::memory::GuestRam;

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
    pub(super) fn new(mode: Mode, ending: Option<Ending>) -> VmState {
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
    /// How its guest RAM is backed, in pages (private, shared, zero page, not
    /// resident), read from the pagemap when asked (for the exit summary: just
    /// before teardown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pages: Option<pagestate::pagemap::Census>,
    /// Its allocation by the free-memory policy (min, max, shares, active estimate,
    /// target, ...), if the policy runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alloc: Option<crate::reclaim::policy::VmAllocation>,
}

/// The state of a VM that its vCPU threads, device threads, reclaimers and the
/// control API share.
pub struct VmShared {
    name: String,
    /// Mode and wake-ups of the vCPUs, gate of the device threads.
    run: Arc<RunControl>,
    /// Port I/O devices (COM1, the system ports).
    pio: Bus,
    /// MMIO devices (in the MMIO hole).
    mmio: Bus,
    console: Arc<Console>,
    ram: Arc<GuestRam>,
    balloon: Option<Arc<Mutex<Balloon>>>,
    ending: Mutex<Option<Ending>>,
    ended: Condvar,
    command_lock: Mutex<()>,
    first_insn: OnceLock<Instant>,
    stats: Mutex<BTreeMap<String, u64>>,
}

/// Why a balloon target was not set.
#[derive(Debug, thiserror::Error)]
pub enum BalloonTargetError {
    /// The VM has no balloon device.
    #[error("vm {0} has no balloon device")]
    NoBalloon(String),
    /// The device refused the size.
    #[error("vm {vm}: {why}")]
    Refused {
        /// The VM.
        vm: String,
        /// What the device said.
        why: String,
    },
}

impl VmShared {
    /// The shared state of a VM made of these parts (see [`super::Vm::create`]).
    pub(super) fn new(
        name: String,
        vcpus: u32,
        (pio, mmio): (Bus, Bus),
        console: Arc<Console>,
        ram: Arc<GuestRam>,
        balloon: Option<Arc<Mutex<Balloon>>>,
    ) -> VmShared {
        VmShared {
            name,
            run: Arc::new(RunControl::new(vcpus)),
            pio,
            mmio,
            console,
            ram,
            balloon,
            ending: Mutex::new(None),
            ended: Condvar::new(),
            command_lock: Mutex::new(()),
            first_insn: OnceLock::new(),
            stats: Mutex::new(BTreeMap::new()),
        }
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its pause: mode and wake-ups of the vCPUs, gate of the device threads.
    pub fn run(&self) -> &Arc<RunControl> {
        &self.run
    }

    /// Its guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Its balloon device, if it has one.
    pub fn balloon(&self) -> Option<&Arc<Mutex<Balloon>>> {
        self.balloon.as_ref()
    }

    /// Its console (the guest's serial output).
    pub fn console(&self) -> &Arc<Console> {
        &self.console
    }

    /// Its port I/O devices (what `in`/`out` of its vCPUs reach).
    pub fn pio(&self) -> &Bus {
        &self.pio
    }

    /// Its MMIO devices (what accesses to the MMIO hole reach).
    pub fn mmio(&self) -> &Bus {
        &self.mmio
    }

    /// A balloon snapshot, if it has a balloon.
    pub fn balloon_snapshot(&self) -> Option<BalloonSnapshot> {
        self.balloon.as_ref().map(|b| b.lock().unwrap().snapshot())
    }

    /// Sets the balloon's target as the user does (the free-memory policy leaves it
    /// alone until [`VmShared::release_balloon_target`]) and wakes the guest's driver.
    pub fn set_balloon_target(&self, bytes: u64) -> Result<(), BalloonTargetError> {
        let dev = self.balloon.as_ref().ok_or_else(|| BalloonTargetError::NoBalloon(self.name.clone()))?;
        dev.lock()
            .unwrap()
            .set_target(bytes)
            .map_err(|why| BalloonTargetError::Refused { vm: self.name.clone(), why })?;
        self.run.wake();
        Ok(())
    }

    /// Hands the balloon's target back to the free-memory policy (which moves it
    /// from its next tick); returns the balloon's state.
    pub fn release_balloon_target(&self) -> Result<BalloonSnapshot, BalloonTargetError> {
        let dev = self.balloon.as_ref().ok_or_else(|| BalloonTargetError::NoBalloon(self.name.clone()))?;
        let mut dev = dev.lock().unwrap();
        dev.release_target();
        Ok(dev.snapshot())
    }

    /// Sets the balloon's target as the free-memory policy does, to `pages`: refused
    /// (false) while the user holds the target. Wakes the guest's driver when the
    /// target changed.
    pub fn set_policy_balloon_target(&self, pages: u64) -> bool {
        let Some(dev) = &self.balloon else { return false };
        let set = dev.lock().unwrap().set_auto_target(pages);
        if set {
            self.run.wake();
        }
        set
    }

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

    /// Waits up to `timeout` for the VM to end.
    pub fn wait_ended(&self, timeout: Duration) -> Option<Ending> {
        let slot = self.ending.lock().unwrap();
        let (slot, _) = self.ended.wait_timeout_while(slot, timeout, |e| e.is_none()).unwrap();
        slot.clone()
    }

    /// The guest's first instruction, if it ran.
    pub fn first_instruction(&self) -> Option<Instant> {
        self.first_insn.get().copied()
    }

    /// The KVM counters of its vCPUs that have finished, summed.
    pub fn kvm_stats(&self) -> BTreeMap<String, u64> {
        self.stats.lock().unwrap().clone()
    }

    /// What the guest publishes on the control page.
    pub fn progress(&self) -> GuestProgress {
        control::progress(self.ram.mem())
    }

    /// Running, paused, stopping, or how it ended.
    pub fn state(&self) -> VmState {
        VmState::new(self.run.mode(), self.ending())
    }

    /// Memory figures and counters, for the control API.
    pub fn stats(&self) -> VmStats {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let balloon = self.balloon.as_ref().map(|b| b.lock().unwrap().snapshot());
        VmStats {
            state: self.state(),
            mem_mib: mib(self.ram.size()),
            guest_rss_mib: mib(self.ram.resident_bytes()),
            ballooned_mib: balloon.as_ref().map(|b| mib(b.ballooned_pages * guest_abi::PAGE_SIZE)),
            guest: self.progress(),
            balloon,
            swap: None,
            alloc: None,
            pages: self.ram.census(),
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
