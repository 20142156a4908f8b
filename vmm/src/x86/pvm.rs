//! The PVM backend: how to recognise it and what it needs that hardware
//! virtualisation does not.
//!
//! On PVM a guest runs natively only if each vCPU has registered a VIF area (the
//! paravirtual interrupt flag and CR2 cell) through a KVM-specific MSR. The backend is
//! detected by reading a second MSR that only PVM implements: a successful write of
//! an unknown MSR proves nothing (with `ignore_msrs` it "succeeds").

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use super::msrs::{self, MsrError};

/// MSR that reads [`PVM_SIGNATURE`] on a PVM host.
const MSR_PVM_SIGNATURE: u32 = 0x4b56_4d11;
/// "PVM".
const PVM_SIGNATURE: u64 = 0x4d_5650;
/// MSR that registers the VIF area: `GPA | KERNEL_STATE | CR2_CELL`.
const MSR_PVM_VIF: u32 = 0x4b56_4d10;
/// Host-side write of the kernel-mode state (bit 10).
const VIF_KERNEL_STATE: u64 = 0x400;
/// The area holds the CR2 cell at offset 8 (bit 4).
const VIF_CR2_CELL: u64 = 0x10;

/// Which KVM backend runs the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// VMX or SVM.
    Hardware,
    /// PVM (no hardware virtualisation).
    Pvm,
}

impl Backend {
    /// Asks a vCPU which backend it runs on.
    pub fn detect(vcpu: &VcpuFd) -> Backend {
        let Ok(mut msrs) = Msrs::from_entries(&[kvm_msr_entry { index: MSR_PVM_SIGNATURE, ..Default::default() }])
        else {
            return Backend::Hardware;
        };
        match vcpu.get_msrs(&mut msrs) {
            Ok(1) if msrs.as_slice()[0].data == PVM_SIGNATURE => Backend::Pvm,
            _ => Backend::Hardware,
        }
    }

    /// The value the guest ABI uses for this backend.
    pub fn abi(self) -> guest_abi::Backend {
        match self {
            Backend::Hardware => guest_abi::Backend::Hardware,
            Backend::Pvm => guest_abi::Backend::Pvm,
        }
    }
}

/// Registers the VIF area of `vcpu` at `gpa` (4 KiB aligned, 16 bytes used).
pub fn register_vif(vcpu: &VcpuFd, gpa: u64) -> Result<(), MsrError> {
    debug_assert_eq!(gpa % 4096, 0);
    msrs::set(vcpu, &[(MSR_PVM_VIF, gpa | VIF_KERNEL_STATE | VIF_CR2_CELL)])
}
