//! `guest-balloon`: the project's test guest, a freestanding x86-64 kernel.
//!
//! Reclamation (ballooning, page sharing, host swapping) is only correct if the guest
//! never notices it. This guest makes that checkable: it runs a workload (see
//! `guest_abi::workload`) that allocates pages with known content, rewrites and
//! frees them, idles, and verifies every page it holds, printing one JSON line per
//! step. Between workloads it serves run-time commands from the control page.
//!
//! It is built for the VMM's boot protocol and for KVM's PVM backend, where every
//! exit costs ~50 us: the VMM starts all vCPUs in 64-bit mode with an identity map,
//! the guest prints a line with one string `out`, waits with `hlt`, and polls shared
//! memory instead of taking interrupts.
//!
//! It can also be packaged as a bzImage and booted through Linux's boot protocol:
//! [`linux_boot`] then reads the zero page and the ACPI tables into the same boot
//! information.
//!
//! Modules: [`entry`] (first instructions, stacks), [`boot`] (the BSP's life),
//! [`smp`] (work split across vCPUs), [`workload`] (the interpreter), [`mm`]
//! (frames), [`balloon`] (the virtio-balloon driver) over [`virtio`] (virtio-mmio
//! transport and queues), [`control`], [`console`], [`clock`], [`trap`] and
//! [`panic`] (failure reports), [`arch`] and [`system`] (instructions and VMM ports).
#![no_std]
#![no_main]

mod arch;
mod balloon;
mod boot;
mod clock;
mod console;
mod control;
mod entry;
mod linux_boot;
mod mm;
mod panic;
mod smp;
mod system;
mod trap;
mod virtio;
mod workload;

use guest_abi::BootInfo;

/// Where every vCPU continues once `entry::_start` gave it a stack: `info` is the
/// boot information (`rdi`), `cpu` the vCPU index (`rsi`).
extern "C" fn kernel_main(info: *const BootInfo, cpu: u64) -> ! {
    if cpu == 0 {
        boot::bsp_main(info)
    } else {
        smp::ap_main()
    }
}
