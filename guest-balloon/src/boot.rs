//! The BSP's life: check the boot information, set up memory, run the boot
//! workload, then serve run-time commands until told to exit.

use core::str;

use guest_abi::workload::Program;
use guest_abi::{
    exit_code, guest_state, Backend, BootInfo, BOOT_INFO_MAGIC, BOOT_INFO_VERSION, CONTROL_CMD_MAX, MAX_VCPUS,
};

use crate::balloon::Balloon;
use crate::clock::Clock;
use crate::console::{self, Line};
use crate::control::Control;
use crate::mm::frame_alloc::FrameAllocator;
use crate::workload::pages::PageSet;
use crate::workload::{Interpreter, Machine};
use crate::{arch, smp, system, trap};

/// Entry of vCPU 0 (`info` is what the VMM passed in `rdi`).
pub fn bsp_main(info: *const BootInfo) -> ! {
    system::boot_marker();
    // SAFETY: the VMM wrote the boot information before the first instruction and
    // never changes it; it is identity-mapped RAM.
    let info = unsafe { &*info };
    if info.magic != BOOT_INFO_MAGIC || info.version != BOOT_INFO_VERSION {
        fail("bad boot information (magic or version)", exit_code::BAD_BOOT_INFO);
    }
    console::set_vm(info.vm_index);
    if info.vcpus == 0 || info.vcpus > MAX_VCPUS {
        fail("bad boot information (vCPU count)", exit_code::BAD_BOOT_INFO);
    }
    let control = Control::new(info.control_page);
    control.set_state(guest_state::RUNNING);
    let pvm = info.backend == Backend::Pvm as u32;
    trap::init(pvm);

    let mut frames = FrameAllocator::new(info.mem_regions(), info.kernel_end)
        .unwrap_or_else(|msg| fail(msg, exit_code::BAD_BOOT_INFO));
    let pages =
        PageSet::new(&mut frames).unwrap_or_else(|| fail("no room for the page records", exit_code::BAD_BOOT_INFO));
    smp::release_aps();

    let clock = Clock::new(info.tsc_khz);
    let balloon = match info.balloon_mmio {
        0 => Ok(None),
        base => Balloon::new(base, info.mem_regions(), &mut frames, clock).map(Some),
    };
    let (balloon, balloon_error) = match balloon {
        Ok(b) => (b, None),
        Err(msg) => (None, Some(msg)),
    };
    let balloon_features = balloon.as_ref().map(Balloon::features);
    let machine = Machine { vm: info.vm_index, cpus: info.vcpus, vm_seed: info.vm_seed, clock, control };
    let mut interpreter = Interpreter::new(machine, frames, pages, balloon);
    let mem_bytes: u64 = info.mem_regions().iter().map(|r| r.size).sum();
    let mut line = Line::vm();
    line.str("event", "boot")
        .num("vcpus", info.vcpus as u64)
        .num("mem_mib", mem_bytes >> 20)
        .str("backend", if pvm { "pvm" } else { "hardware" })
        .num("free_pages", interpreter.free_pages())
        .num("tsc_khz", clock.khz());
    if let Some(features) = balloon_features {
        line.num("balloon", features);
    }
    if info.tsc_khz == 0 {
        line.flag("tsc_assumed");
    }
    line.emit();
    if let Some(msg) = balloon_error {
        // The guest runs on without a balloon.
        Line::vm().str("event", "error").str("msg", format_args!("balloon: {msg}")).emit();
    }

    if run_text(&mut interpreter, info.cmdline(), None).is_none() {
        control.set_state(guest_state::EXITING);
        system::exit(exit_code::BAD_WORKLOAD);
    }
    serve(&mut interpreter, control)
}

/// Boot workload done (without `exit`): run commands from the control page.
fn serve(interpreter: &mut Interpreter, control: Control) -> ! {
    control.set_state(guest_state::SERVING);
    Line::vm().str("event", "serving").num("steps", interpreter.steps_done()).emit();
    let mut buf = [0u8; CONTROL_CMD_MAX];
    loop {
        interpreter.poll_devices();
        let Some(seq) = control.pending() else {
            control.beat();
            arch::hlt();
            continue;
        };
        let text = control.read_command(&mut buf);
        let ok = run_text(interpreter, text, Some(seq)).unwrap_or(false);
        // The command's lines are out before the VMM sees the acknowledgement.
        control.finish(seq, u32::from(!ok));
    }
}

/// Parses and runs a workload (command `seq`, or the boot workload); `None` if it
/// did not parse (reported), else whether every step succeeded.
fn run_text(interpreter: &mut Interpreter, text: &[u8], seq: Option<u32>) -> Option<bool> {
    let Ok(text) = str::from_utf8(text) else {
        interpreter.print_error(seq, "the workload is not UTF-8");
        return None;
    };
    match Program::parse(text) {
        Ok(program) => Some(interpreter.run(&program, seq)),
        Err(e) => {
            interpreter.print_error(seq, e);
            None
        }
    }
}

/// Reports a boot failure and ends the VM.
fn fail(msg: &str, code: u32) -> ! {
    Line::vm().str("event", "error").str("msg", msg).emit();
    system::exit(code)
}
