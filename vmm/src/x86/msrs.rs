//! The MSRs a Linux kernel expects a boot loader or firmware to have set: the
//! SYSENTER/SYSCALL entry points cleared, the TSC at zero, fast string operations
//! on, and MTRRs enabled with write-back as the default type (without it Linux maps
//! all of RAM uncached). Firecracker's list; set for every guest booted through the
//! Linux boot protocol.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// `MISC_ENABLE`: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// `MTRRdefType`: MTRRs enabled (bit 11), default type write-back (6).
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The boot MSRs and their values.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

/// Writes [`boot_msrs`] into `vcpu`; fails naming the first MSR KVM refused.
pub fn set_boot_msrs(vcpu: &VcpuFd) -> Result<(), String> {
    let list = boot_msrs();
    let entries: Vec<kvm_msr_entry> =
        list.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| format!("boot MSRs: {e:?}"))?;
    match vcpu.set_msrs(&msrs) {
        Ok(n) if n == list.len() => Ok(()),
        Ok(n) => Err(format!("KVM refused boot MSR {:#x}", list[n].0)),
        Err(e) => Err(format!("KVM_SET_MSRS (boot MSRs): {e}")),
    }
}
