//! What a VM booted through the Linux protocol has that the test guest's usual VM
//! has not, in the order `Vm::create` needs it: the in-kernel irqchip before the
//! vCPUs, the boot structures, each vCPU's entry state, and the PC devices.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use super::acpi::VirtioMmio;
use super::irqchip::{self, SERIAL_GSI, VIRTIO_GSI_BASE};
use super::{KernelKind, LinuxBoot, LinuxBootError, LinuxLayout, TestGuestParams, DEFAULT_CMDLINE};
use crate::config::VmConfig;
use crate::devices::bus::Bus;
use crate::devices::legacy::{
    Cmos, EndLine, ExitRegister, CMOS_PORT, EXIT_MMIO_GPA, EXIT_MMIO_SIZE, I8042, I8042_PORT, I8042_PORTS,
};
use crate::devices::serial::IrqLine;
use crate::memory::GuestRam;
use crate::x86::{msrs, regs, Backend};

/// GSI of the balloon's virtio-mmio window (the first and only virtio device).
pub const BALLOON_GSI: u32 = VIRTIO_GSI_BASE;

/// The Linux-protocol parts of one VM.
pub struct LinuxPlatform {
    /// Whether KVM's irqchip and PIT were created (Linux kernels only).
    pub irqchip: bool,
    /// The VM the legacy devices end; `Vm::create` connects it.
    pub end_line: EndLine,
}

impl LinuxPlatform {
    /// Creates the in-kernel irqchip for a Linux kernel (call before the vCPUs).
    pub fn new(kind: &KernelKind, vm_fd: &VmFd) -> Result<LinuxPlatform, String> {
        let irqchip = kind.is_linux();
        if irqchip {
            irqchip::create(vm_fd).map_err(|e| e.to_string())?;
        }
        Ok(LinuxPlatform { irqchip, end_line: EndLine::default() })
    }

    /// Refuses a Linux kernel on a PVM host, before any guest code runs.
    pub fn check_backend(kind: &KernelKind, backend: Backend) -> Result<(), String> {
        match (kind.is_linux(), backend) {
            (true, Backend::Pvm) => Err(LinuxBootError::NeedsHardwareVirtualisation.to_string()),
            _ => Ok(()),
        }
    }

    /// Writes the kernel, command line, initrd, ACPI tables and zero page.
    pub fn boot(
        kind: &KernelKind,
        ram: &GuestRam,
        image: &[u8],
        config: &VmConfig,
        params: &TestGuestParams,
    ) -> Result<LinuxLayout, String> {
        let cmdline = match kind {
            k if k.is_test_guest_bzimage() => {
                crate::config::check_workload(&config.workload).map_err(|e| format!("bad workload: {e}"))?;
                params.cmdline(config.cmdline.as_deref().unwrap_or(""), &config.workload)
            }
            _ => config.cmdline.clone().unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
        };
        let initrd = match &config.initrd {
            Some(path) => Some(std::fs::read(path).map_err(|source| {
                LinuxBootError::InitrdRead { path: path.display().to_string(), source }.to_string()
            })?),
            None => None,
        };
        let devices: Vec<VirtioMmio> = config
            .balloon
            .iter()
            .map(|_| VirtioMmio { base: guest_abi::BALLOON_MMIO_BASE, gsi: BALLOON_GSI })
            .collect();
        let boot =
            LinuxBoot { kind, cmdline: &cmdline, initrd: initrd.as_deref(), vcpus: config.vcpus, devices: &devices };
        super::prepare(ram, image, &boot).map_err(|e| e.to_string())
    }

    /// Sets vCPU `cpu` up for the 64-bit entry: long mode, `rsi` = zero page (`rdi` =
    /// `cpu`, see `regs::linux_entry_regs`), the boot MSRs, and its LAPIC's LINT pins where there is an irqchip. Every vCPU
    /// gets this state; with an irqchip KVM holds the application processors in
    /// wait-for-SIPI until Linux starts them, so only vCPU 0 uses it.
    pub fn setup_vcpu(&self, vcpu: &VcpuFd, cpu: u32, layout: &LinuxLayout) -> Result<(), String> {
        let sregs = vcpu.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
        vcpu.set_sregs(&regs::long_mode_sregs(sregs, layout.cr3)).map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
        vcpu.set_regs(&regs::linux_entry_regs(layout.entry, layout.zero_page, cpu))
            .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        msrs::set_boot_msrs(vcpu)?;
        if self.irqchip {
            irqchip::set_lints(vcpu).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The interrupt line of COM1.
    pub fn serial_irq(&self, vm_fd: &VmFd) -> Result<IrqLine, String> {
        self.irqfd(vm_fd, SERIAL_GSI).map(|fd| fd.map_or(IrqLine::None, IrqLine::Irqfd))
    }

    /// The irqfd of the balloon, where there is an irqchip.
    pub fn balloon_irqfd(&self, vm_fd: &VmFd) -> Result<Option<vmm_sys_util::eventfd::EventFd>, String> {
        self.irqfd(vm_fd, BALLOON_GSI)
    }

    fn irqfd(&self, vm_fd: &VmFd, gsi: u32) -> Result<Option<vmm_sys_util::eventfd::EventFd>, String> {
        match self.irqchip {
            true => irqchip::irqfd(vm_fd, gsi).map(Some).map_err(|e| e.to_string()),
            false => Ok(None),
        }
    }

    /// Puts the i8042, the CMOS clock and the exit register on the buses. (The
    /// i8042's interrupt, GSI 1, is never raised: the VM has no keyboard.)
    pub fn attach_devices(&self, pio: &mut Bus, mmio: &mut Bus) -> Result<(), String> {
        pio.insert(Arc::new(Mutex::new(I8042::new(self.end_line.clone()))), I8042_PORT.into(), I8042_PORTS.into())
            .map_err(|e| e.to_string())?;
        pio.insert(Arc::new(Mutex::new(Cmos::default())), CMOS_PORT.into(), 2).map_err(|e| e.to_string())?;
        mmio.insert(Arc::new(Mutex::new(ExitRegister(self.end_line.clone()))), EXIT_MMIO_GPA, EXIT_MMIO_SIZE)
            .map_err(|e| e.to_string())
    }
}

/// The backend of this host's KVM, asked of a scratch VM's vCPU (for tests and
/// tools that must know before they create a VM).
pub fn host_backend(kvm: &Kvm) -> Result<Backend, String> {
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let vcpu = vm.create_vcpu(0).map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    Ok(Backend::detect(&vcpu))
}
