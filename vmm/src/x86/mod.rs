//! x86-64 boot state: everything a vCPU needs to start in 64-bit mode at the
//! kernel's entry, on both KVM backends this project meets.
//!
//! Nothing before long mode runs natively on a PVM host (KVM would emulate it at
//! ~0.5 M instructions/s), so the VMM does what firmware and a boot loader would:
//! it builds the page tables ([`paging`]), a GDT and the long-mode registers
//! ([`regs`]), gives each vCPU its identity ([`cpuid`]), sets the MSRs Linux expects
//! ([`msrs`]), and on PVM registers each vCPU's virtual-interrupt-flag area
//! ([`pvm`]).

pub mod cpuid;
pub mod msrs;
pub mod paging;
pub mod pvm;
pub mod regs;

pub use pvm::Backend;
