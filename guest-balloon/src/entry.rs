//! The entry points every vCPU jumps to, and the per-CPU stacks.
//!
//! The VMM starts each vCPU at `_start` in 64-bit mode with `rdi` = boot
//! information and `rsi` = vCPU index, but with no usable stack. `_start` is
//! therefore a naked function: it picks the vCPU's stack from [`STACKS`] (in .bss)
//! before any Rust code runs. The BSP gets a large stack (it parses workloads into a
//! 32 KiB program); application processors only process pages and get small ones.
//!
//! Booted as a bzImage through Linux's boot protocol, every vCPU enters at
//! `startup_64` instead, with `rsi` = zero page (the protocol) and `rdi` = vCPU index
//! (the VMM's addition: Linux starts its application processors itself, this guest
//! has them all started at the entry), and continues in
//! `linux_boot::linux_main(zero_page, cpu)`. The index cannot come from CPUID leaf 1
//! (`EBX[31:24]`, the initial APIC ID the VMM sets per vCPU): on KVM's PVM backend
//! the guest reads the host CPU's APIC ID there, not the VMM's table.

use core::arch::naked_asm;

use guest_abi::{exit_code, EXIT_PORT, MAX_VCPUS};

/// Stack of vCPU 0.
const BSP_STACK_SIZE: usize = 256 << 10;
/// Stack of each other vCPU.
const AP_STACK_SIZE: usize = 32 << 10;

/// All stacks, BSP first: vCPU `n`'s stack top is `base + BSP_STACK_SIZE + n * AP_STACK_SIZE`.
#[repr(C, align(4096))]
struct Stacks {
    bsp: [u8; BSP_STACK_SIZE],
    aps: [[u8; AP_STACK_SIZE]; MAX_VCPUS as usize - 1],
}

static mut STACKS: Stacks = Stacks { bsp: [0; BSP_STACK_SIZE], aps: [[0; AP_STACK_SIZE]; MAX_VCPUS as usize - 1] };

/// Picks the stack of vCPU `rsi` and calls `$main(rdi, rsi)`; a vCPU index beyond
/// [`MAX_VCPUS`] has no stack: it ends the VM. `$prologue` runs first.
macro_rules! enter_on_own_stack {
    ($main:path $(, $prologue:literal)*) => {
        naked_asm!(
            "cld",
            $($prologue,)*
            "cmp rsi, {max_vcpus}",
            "jae 2f",
            "imul rax, rsi, {ap_stack}",
            "lea rsp, [rip + {stacks} + {bsp_stack}]",
            "add rsp, rax",
            "xor ebp, ebp",
            "call {main}",
            "2:",
            "mov eax, {bad_boot_info}",
            "mov dx, {exit_port}",
            "out dx, eax",
            "3:",
            "hlt",
            "jmp 3b",
            max_vcpus = const MAX_VCPUS,
            ap_stack = const AP_STACK_SIZE,
            bsp_stack = const BSP_STACK_SIZE,
            stacks = sym STACKS,
            main = sym $main,
            bad_boot_info = const exit_code::BAD_BOOT_INFO,
            exit_port = const EXIT_PORT,
        )
    };
}

/// First instruction of every vCPU: set the stack, call `kernel_main(rdi, rsi)`.
#[unsafe(naked)]
#[no_mangle]
#[link_section = ".text.entry"]
unsafe extern "C" fn _start() -> ! {
    enter_on_own_stack!(crate::kernel_main)
}

/// The 64-bit entry of the bzImage (at 1 MiB + 0x200, see linker.ld):
/// `linux_main(zero page, vCPU index)` from `rsi` and `rdi`.
#[unsafe(naked)]
#[no_mangle]
#[link_section = ".text.linux64"]
unsafe extern "C" fn startup_64() -> ! {
    enter_on_own_stack!(crate::linux_boot::linux_main, "xchg rdi, rsi")
}

// The bzImage's 32-bit entry at 1 MiB: the VMM enters in 64-bit mode, so reaching
// it is a loader's mistake, which `ud2` (the same bytes in 32-bit mode) makes loud.
core::arch::global_asm!(".pushsection .text.linux32, \"ax\"", "linux_entry32:", "ud2", ".popsection");

/// The vCPU whose stack holds `addr` (how failure reports name the CPU without
/// per-CPU registers).
pub fn cpu_of_stack(addr: u64) -> Option<u32> {
    let base = core::ptr::addr_of!(STACKS) as u64;
    let bsp_top = base + BSP_STACK_SIZE as u64;
    match addr.checked_sub(base)? {
        _ if addr < bsp_top => Some(0),
        off if off < core::mem::size_of::<Stacks>() as u64 => {
            Some(((addr - bsp_top) / AP_STACK_SIZE as u64) as u32 + 1)
        }
        _ => None,
    }
}
