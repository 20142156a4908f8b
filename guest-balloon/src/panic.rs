//! The panic handler: report the panic as a JSON line and end the VM.
//!
//! A panic is a bug in the guest (or memory it relies on changed under it), never an
//! expected outcome, so it ends the VM with `exit_code::PANIC`. Any vCPU may panic;
//! the console lock keeps its line whole.

use core::panic::PanicInfo;

use guest_abi::exit_code;

use crate::console::Line;
use crate::{entry, system};

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    let mut line = Line::vm();
    line.str("event", "panic");
    let here = 0u8;
    if let Some(cpu) = entry::cpu_of_stack(&here as *const u8 as u64) {
        line.num("cpu", cpu as u64);
    }
    if let Some(at) = info.location() {
        line.str("at", format_args!("{}:{}", at.file(), at.line()));
    }
    line.str("msg", info.message()).emit();
    system::exit(exit_code::PANIC)
}
