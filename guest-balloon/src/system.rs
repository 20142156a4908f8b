//! The VMM's system ports (see `guest_abi`): mark the first instruction, wake the
//! halted vCPUs, end the VM.

use guest_abi::{BOOT_MARKER_PORT, EXIT_PORT, KICK_PORT};

use crate::arch;

/// Tells the VMM the guest's first instruction ran (it times boot with it).
pub fn boot_marker() {
    arch::out8(BOOT_MARKER_PORT, 0);
}

/// Wakes every halted vCPU of this VM (one exit, however many vCPUs).
pub fn kick() {
    arch::out8(KICK_PORT, 0);
}

/// Ends the VM with `code` as the exit status of `vmm run`.
pub fn exit(code: u32) -> ! {
    arch::out32(EXIT_PORT, code);
    // The VMM stops the vCPUs; never run past this point meanwhile.
    loop {
        arch::hlt();
    }
}
