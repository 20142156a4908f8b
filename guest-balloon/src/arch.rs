//! The x86 instructions the guest uses, wrapped.
//!
//! On PVM, `out`/`in` and `hlt` exit to the VMM (~50 us each) while `rdtsc`,
//! `pause` and ordinary memory accesses run natively. Only instructions that work
//! the same on PVM and on VMX appear here: no `int n`, no `cli`/`sti` (they do not
//! gate interrupts on PVM), no SSE (the target is soft-float).

use core::arch::asm;

/// `out` of one byte.
pub fn out8(port: u16, value: u8) {
    // SAFETY: port output touches no memory; the ports used are the VMM's own.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

/// `out` of 32 bits.
pub fn out32(port: u16, value: u32) {
    // SAFETY: as in `out8`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) }
}

/// `rep outsb`: all of `bytes` to `port` in one string instruction, which KVM turns
/// into a single exit.
pub fn rep_outsb(port: u16, bytes: &[u8]) {
    // SAFETY: reads exactly `bytes`; DF is clear (set by `_start`, never changed).
    unsafe {
        asm!(
            "rep outsb",
            in("dx") port,
            inout("rsi") bytes.as_ptr() => _,
            inout("rcx") bytes.len() => _,
            options(readonly, nostack, preserves_flags),
        )
    }
}

/// `hlt`: without an interrupt controller the VMM sleeps the vCPU until it is woken
/// (a command, a `KICK_PORT` write) or a short timeout passes.
pub fn hlt() {
    // SAFETY: stops the vCPU until the VMM resumes it; no memory effect.
    unsafe { asm!("hlt", options(nomem, nostack, preserves_flags)) }
}

/// The time-stamp counter (native on PVM, ~20 cycles).
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads the TSC into eax:edx.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (hi as u64) << 32 | lo as u64
}

/// CR2, the faulting address of the last page fault (hardware virtualisation only:
/// PVM keeps it in the vCPU's VIF area instead).
pub fn read_cr2() -> u64 {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effect at CPL 0.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) }
    cr2
}

/// Loads the interrupt descriptor table register.
///
/// # Safety
/// `base` must point to `limit + 1` bytes of valid gate descriptors that stay in
/// place for as long as the CPU may take an exception.
pub unsafe fn lidt(base: u64, limit: u16) {
    #[repr(C, packed)]
    struct Pseudo {
        limit: u16,
        base: u64,
    }
    let pseudo = Pseudo { limit, base };
    // SAFETY: the caller vouches for the table; the descriptor lives on the stack
    // for the duration of the instruction.
    unsafe { asm!("lidt [{}]", in(reg) &pseudo, options(readonly, nostack, preserves_flags)) }
}
