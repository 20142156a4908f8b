//! A vCPU thread: its run loop and the dispatch of each exit.
//!
//! Exits are expensive on PVM hosts (~50 us), so the loop does little per exit:
//! console lines arrive as one string write, `hlt` sleeps on the host instead of
//! spinning, and anything unexpected ends the VM with a clear reason.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::guest_errors::{GuestErrorKind, GuestErrors};
use crate::devices::system::{decode_out, SystemEvent};
use crate::kvm_stats;
use crate::vm::{Ending, VmShared};

/// How long a halted vCPU sleeps on the host before re-entering the guest (which
/// then re-checks its own deadline). Wake-ups (commands, `KICK_PORT`) end it early.
pub const HALT_SLEEP: Duration = Duration::from_millis(2);

/// Runs vCPU `cpu` until the VM stops; adds its KVM counters to the VM's.
pub fn run(mut vcpu: VcpuFd, cpu: u32, vm: Arc<VmShared>) {
    let run = vcpu.get_kvm_run() as *mut kvm_bindings::kvm_run;
    // SAFETY: `run` points to this vCPU's kvm_run mapping, alive as long as `vcpu`,
    // which outlives the slot (dropped below, on this thread, before `vcpu`).
    let slot = unsafe { vm.run().register_vcpu(cpu, std::ptr::addr_of_mut!((*run).immediate_exit)) };
    // Accesses no device owns: counted, logged at most once per interval (a set of
    // the addresses seen would grow with whatever the guest tries).
    let unhandled = GuestErrors::new(format!("{}: vCPU {cpu}", vm.name()));
    while vm.run().may_run(cpu) {
        match vcpu.run() {
            Ok(exit) => {
                if let Some(ending) = handle_exit(exit, cpu, &vm, &unhandled) {
                    let ending = match ending {
                        Ending::Error(msg) => Ending::Error(format!("{msg}{}", describe_regs(&vcpu))),
                        other => other,
                    };
                    vm.end(ending);
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => vm.end(Ending::Error(format!("KVM_RUN failed on vCPU {cpu}: {e}{}", describe_regs(&vcpu)))),
        }
    }
    let unhandled_total = unhandled.count(GuestErrorKind::Unmapped) + unhandled.count(GuestErrorKind::Port);
    vm.add_stats(&BTreeMap::from([("unhandled_accesses".to_string(), unhandled_total)]));
    match kvm_stats::read_vcpu_stats(&vcpu) {
        Ok(stats) => vm.add_stats(&stats),
        Err(e) => log::warn!("{}: vCPU {cpu}: cannot read KVM statistics: {e}", vm.name()),
    }
    drop(slot);
}

/// Handles one exit; returns how the VM ends if it does.
fn handle_exit(exit: VcpuExit, cpu: u32, vm: &VmShared, unhandled: &GuestErrors) -> Option<Ending> {
    match exit {
        VcpuExit::IoOut(port, data) => match decode_out(port, data) {
            Some(SystemEvent::Exit(code)) => return Some(Ending::GuestExit(code)),
            Some(SystemEvent::BootMarker) => vm.mark_first_instruction(),
            Some(SystemEvent::Kick) => vm.run().wake(),
            None => {
                if !vm.pio().write(port.into(), data) {
                    unhandled.report(GuestErrorKind::Port, format_args!("write to unhandled port {port:#x} ignored"));
                }
            }
        },
        VcpuExit::IoIn(port, data) => {
            if !vm.pio().read(port.into(), data) {
                unhandled
                    .report(GuestErrorKind::Port, format_args!("read of unhandled port {port:#x} returns all ones"));
                data.fill(0xff);
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            if !vm.mmio().read(addr, data) {
                let what = format_args!("read of unmapped MMIO address {addr:#x} returns all ones");
                unhandled.report(GuestErrorKind::Unmapped, what);
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !vm.mmio().write(addr, data) {
                unhandled
                    .report(GuestErrorKind::Unmapped, format_args!("write to unmapped MMIO address {addr:#x} ignored"));
            }
        }
        VcpuExit::Hlt => vm.run().halt(HALT_SLEEP),
        VcpuExit::Intr => {}
        VcpuExit::Shutdown => return Some(Ending::Error(format!("guest triple-faulted on vCPU {cpu}"))),
        VcpuExit::FailEntry(reason, hw_cpu) => {
            return Some(Ending::Error(format!(
                "KVM could not enter the guest on vCPU {cpu} (hardware reason {reason:#x}, cpu {hw_cpu})"
            )))
        }
        VcpuExit::InternalError => {
            return Some(Ending::Error(format!(
                "KVM internal error on vCPU {cpu} (an instruction KVM cannot emulate?)"
            )))
        }
        other => return Some(Ending::Error(format!("unexpected exit on vCPU {cpu}: {other:?}"))),
    }
    None
}

/// `, rip=... cr2=...` for error messages, best effort.
fn describe_regs(vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(" (rip={:#x} rsp={:#x} cr2={:#x})", r.rip, r.rsp, s.cr2),
        _ => String::new(),
    }
}
