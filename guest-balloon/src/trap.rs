//! CPU exceptions: report them as a JSON line and end the VM.
//!
//! The guest never expects an exception, so each of the 32 exception vectors leads
//! to one report, `{"event":"exception","vector":V,...}`, and exit code
//! `EXCEPTION_BASE + V` (instead of a triple fault, which tells nothing). External
//! interrupts are never enabled, so the table stops at vector 31.
//!
//! On PVM the CPU keeps no CR2: the faulting address of a page fault is in the
//! vCPU's VIF area (offset 8), registered by the VMM at `VIF_BASE_GPA + cpu * 4096`.

use core::arch::global_asm;
use core::ptr::addr_of_mut;
use core::sync::atomic::{AtomicBool, Ordering};

use guest_abi::{exit_code, CODE_SELECTOR, PAGE_SIZE, VIF_BASE_GPA};

use crate::console::Line;
use crate::{arch, entry, system};

const VECTORS: usize = 32;
/// Each stub is 16-byte aligned: vector `v`'s stub is at `guest_trap_stubs + 16 * v`.
const STUB_SIZE: u64 = 16;
/// Present, DPL 0, 64-bit interrupt gate.
const INTERRUPT_GATE: u8 = 0x8e;
/// Offset of the CR2 cell in a PVM VIF area.
const VIF_CR2: u64 = 8;
/// Vector of the page fault.
const PAGE_FAULT: u64 = 14;

const NAMES: [&str; VECTORS] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS", "#GP", "#PF", "-",
    "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "-", "-", "-", "-", "-", "-", "#HV", "#VC", "#SX", "-",
];

/// A 64-bit IDT gate descriptor.
#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    attributes: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    const MISSING: Gate =
        Gate { offset_low: 0, selector: 0, ist: 0, attributes: 0, offset_mid: 0, offset_high: 0, reserved: 0 };

    fn to(handler: u64) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector: CODE_SELECTOR,
            ist: 0,
            attributes: INTERRUPT_GATE,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

/// Written once by the BSP before the application processors start.
static mut IDT: [Gate; VECTORS] = [Gate::MISSING; VECTORS];
/// Whether the VM runs on PVM (where CR2 is read from the VIF area).
static PVM: AtomicBool = AtomicBool::new(false);

/// What the stubs leave on the stack: vector, error code (0 when the CPU pushes
/// none), then the CPU's interrupt frame.
#[repr(C)]
struct TrapFrame {
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

// One stub per vector: push a zero error code where the CPU pushes none, push the
// vector, join the common path, which calls `trap_handler(frame)` on an aligned stack.
global_asm!(
    r#"
    .pushsection .text.trap, "ax"
    .p2align 4
    .global guest_trap_stubs
guest_trap_stubs:
    .set vector, 0
    .rept 32
    .p2align 4
    .if !(vector == 8 || vector == 10 || vector == 11 || vector == 12 || vector == 13 || vector == 14 || vector == 17 || vector == 21 || vector == 29 || vector == 30)
    pushq $0
    .endif
    pushq $vector
    jmp guest_trap_common
    .set vector, vector + 1
    .endr
guest_trap_common:
    movq %rsp, %rdi
    andq $-16, %rsp
    call {handler}
    ud2
    .popsection
    "#,
    handler = sym trap_handler,
    options(att_syntax)
);

extern "C" {
    fn guest_trap_stubs();
}

/// Builds the IDT and loads it on the BSP.
pub fn init(pvm: bool) {
    PVM.store(pvm, Ordering::Relaxed);
    let stubs = guest_trap_stubs as *const () as u64;
    let idt = addr_of_mut!(IDT);
    for v in 0..VECTORS {
        // SAFETY: only the BSP runs, before any vCPU loads the table.
        unsafe { (*idt)[v] = Gate::to(stubs + v as u64 * STUB_SIZE) };
    }
    load();
}

/// Loads the IDT on the calling vCPU.
pub fn load() {
    // SAFETY: the table is a static, complete once `init` has run (the APs call this
    // only after the BSP released them).
    unsafe { arch::lidt(addr_of_mut!(IDT) as u64, (core::mem::size_of::<[Gate; VECTORS]>() - 1) as u16) }
}

extern "C" fn trap_handler(frame: &TrapFrame) -> ! {
    let cpu = entry::cpu_of_stack(frame as *const TrapFrame as u64);
    let vector = frame.vector;
    let mut line = Line::vm();
    line.str("event", "exception").num("vector", vector).str("name", NAMES[vector as usize % VECTORS]);
    if let Some(cpu) = cpu {
        line.num("cpu", cpu as u64);
    }
    line.num("error_code", frame.error_code).num("rip", frame.rip).num("rsp", frame.rsp);
    if vector == PAGE_FAULT {
        let cr2 = match cpu {
            Some(cpu) if PVM.load(Ordering::Relaxed) => {
                // SAFETY: the VMM registered this vCPU's VIF area there; it is RAM.
                unsafe { ((VIF_BASE_GPA + cpu as u64 * PAGE_SIZE + VIF_CR2) as *const u64).read_volatile() }
            }
            _ => arch::read_cr2(),
        };
        line.num("cr2", cr2);
    }
    line.emit();
    system::exit(exit_code::EXCEPTION_BASE + vector as u32)
}
