//! The in-kernel interrupt controllers of a Linux guest: KVM's IOAPIC, PIC and local
//! APICs, the PIT, and the irqfds through which devices raise interrupts.
//!
//! Only Linux guests get them. The test guest polls and halts by exiting to the VMM
//! (with an in-kernel local APIC, `hlt` sleeps inside KVM until an interrupt, and the
//! test guest takes none), so it keeps the VM without an interrupt controller.
//!
//! Order matters and follows KVM's rules: the TSS address, the irqchip and the PIT
//! come before any vCPU is created; each vCPU's LAPIC then gets LINT0 = ExtINT (the
//! PIC's output, through which Linux calibrates against the PIT) and LINT1 = NMI, as a
//! BIOS would leave them. Devices are wired by GSI: a device writes its
//! `InterruptStatus` first, then signals its irqfd, which KVM turns into an edge on
//! that IOAPIC pin.
//!
//! Fixed GSIs: the i8042 on 1, COM1 on 4 (the ISA numbers the DSDT also gives), the
//! virtio-mmio devices from 5 up.

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

/// GPA of the local APICs' registers.
pub const LAPIC_GPA: u32 = 0xfee0_0000;
/// GPA of the I/O APIC's registers.
pub const IOAPIC_GPA: u32 = 0xfec0_0000;
/// GPA of the three pages KVM needs for the real-mode TSS (in the MMIO hole, clear of
/// every device).
pub const TSS_GPA: usize = 0xfffb_d000;
/// GSI of the i8042 (keyboard controller).
pub const I8042_GSI: u32 = 1;
/// GSI of COM1.
pub const SERIAL_GSI: u32 = 4;
/// GSI of the first virtio-mmio device.
pub const VIRTIO_GSI_BASE: u32 = 5;
/// IOAPIC pins KVM's IOAPIC has.
pub const IOAPIC_PINS: u32 = 24;

/// Offset of the LVT LINT0 register in the LAPIC page.
const APIC_LVT_LINT0: usize = 0x350;
/// Offset of the LVT LINT1 register.
const APIC_LVT_LINT1: usize = 0x360;
/// LVT delivery mode field.
const APIC_MODE_MASK: u32 = 0x700;
/// Delivery mode ExtINT.
const APIC_MODE_EXTINT: u32 = 0x700;
/// Delivery mode NMI.
const APIC_MODE_NMI: u32 = 0x400;

/// What failed while setting up the interrupt controllers.
#[derive(Debug, thiserror::Error)]
pub enum IrqchipError {
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// Its error.
        source: kvm_ioctls::Error,
    },
    /// No eventfd could be made.
    #[error("eventfd for GSI {gsi}: {source}")]
    EventFd {
        /// The GSI it was for.
        gsi: u32,
        /// The error.
        source: std::io::Error,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> IrqchipError {
    move |source| IrqchipError::Kvm { what, source }
}

/// Creates the TSS area, the irqchip (IOAPIC, PIC, LAPICs) and the PIT. Call before
/// creating any vCPU.
pub fn create(vm_fd: &VmFd) -> Result<(), IrqchipError> {
    vm_fd.set_tss_address(TSS_GPA).map_err(kvm("KVM_SET_TSS_ADDR"))?;
    vm_fd.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm_fd.create_pit2(pit).map_err(kvm("KVM_CREATE_PIT2"))?;
    Ok(())
}

/// Sets LINT0 = ExtINT and LINT1 = NMI in `vcpu`'s local APIC.
pub fn set_lints(vcpu: &VcpuFd) -> Result<(), IrqchipError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    for (reg, mode) in [(APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)] {
        let v = lapic_reg(&lapic.regs, reg);
        set_lapic_reg(&mut lapic.regs, reg, (v & !APIC_MODE_MASK) | mode);
    }
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

/// A 32-bit register of a `kvm_lapic_state` page.
pub fn lapic_reg(regs: &[std::os::raw::c_char], offset: usize) -> u32 {
    let b = |i: usize| regs[offset + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

/// Writes a 32-bit register of a `kvm_lapic_state` page.
pub fn set_lapic_reg(regs: &mut [std::os::raw::c_char], offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        regs[offset + i] = byte as std::os::raw::c_char;
    }
}

/// An eventfd that raises an edge on `gsi` when written (`KVM_IRQFD`).
pub fn irqfd(vm_fd: &VmFd, gsi: u32) -> Result<EventFd, IrqchipError> {
    let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| IrqchipError::EventFd { gsi, source })?;
    vm_fd.register_irqfd(&fd, gsi).map_err(kvm("KVM_IRQFD"))?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lapic_registers_round_trip() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_lapic_reg(&mut regs, APIC_LVT_LINT0, 0x0001_0700);
        assert_eq!(lapic_reg(&regs, APIC_LVT_LINT0), 0x0001_0700);
        assert_eq!(lapic_reg(&regs, APIC_LVT_LINT1), 0);
    }
}
