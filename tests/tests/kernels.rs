//! Booting kernels other than the test guest: hand-made ELF files exercise the
//! boot path, exit codes and each way a guest can go wrong.

mod common;

use std::time::Duration;

use common::{run_one, temp_file, tiny_elf};
use vmm::config::{Kernel, VmConfig};

const MSG: &[u8] = b"hello from a tiny guest\n";

/// `out` to the boot marker, one `rep outsb` line on COM1, exit with `code`.
fn hello_then_exit(code: u8) -> Vec<u8> {
    let mut c = vec![
        0x66, 0xba, 0x02, 0x05, 0xee, // mov dx,0x502; out dx,al
        0x48, 0x8d, 0x35, 0, 0, 0, 0, // lea rsi,[rip+disp] -> msg (patched below)
    ];
    c.extend_from_slice(&[0xb9, MSG.len() as u8, 0, 0, 0]); // mov ecx,len
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xf3, 0x6e]); // mov dx,0x3f8; rep outsb
    c.extend_from_slice(&[0xb8, code, 0, 0, 0, 0x66, 0xba, 0x01, 0x05, 0xef]); // mov eax,code; mov dx,0x501; out dx,eax
    c.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    let disp = (c.len() - 12) as u32; // from the end of the lea to the message
    c[8..12].copy_from_slice(&disp.to_le_bytes());
    c.extend_from_slice(MSG);
    c
}

fn kernel(name: &str, code: &[u8]) -> VmConfig {
    let mut c = VmConfig::new(name, 32 << 20);
    c.kernel = Kernel::Path(temp_file(&format!("{name}.elf"), &tiny_elf(code)));
    c.workload = String::new();
    c
}

#[test]
fn a_foreign_elf_boots_prints_and_exits_with_its_code() {
    let run = run_one(kernel("hello", &hello_then_exit(42)));
    assert_eq!(run.exit_code(0), 42);
    assert_eq!(run.consoles[0], vec!["hello from a tiny guest"]);
    let r = &run.report.vms[0];
    assert!(r.first_insn_ms.is_some() && r.first_output_ms.is_some());
    assert!(r.first_insn_ms <= r.first_output_ms);
    // Three exits for boot marker, console line and exit port: no per-byte exits.
    assert!(r.counters["io_exits"] <= 4, "io exits: {:?}", r.counters);
}

#[test]
fn a_triple_fault_is_reported_not_fatal_to_the_vmm() {
    // ud2 with no IDT: the exception cannot be delivered.
    let run = run_one(kernel("ud2", &[0x0f, 0x0b]));
    let r = &run.report.vms[0];
    assert_eq!(r.exit_code, None);
    let err = r.error.as_deref().unwrap();
    assert!(err.contains("triple-fault") || err.contains("KVM"), "{err}");
    assert!(err.contains("rip="), "{err}");
}

#[test]
fn a_hung_guest_is_detected() {
    // Says it runs (control page state = RUNNING) and then never makes progress.
    let code = [
        0xc7, 0x04, 0x25, 0x14, 0x30, 0, 0, 1, 0, 0, 0, // mov dword [0x3014], 1
        0xeb, 0xfe, // jmp $
    ];
    let mut c = kernel("hang", &code);
    c.hang_timeout = Duration::from_millis(500);
    let run = run_one(c);
    let err = run.report.vms[0].error.clone().unwrap_or_default();
    assert!(err.contains("stopped responding"), "{err:?}");
}

#[test]
fn a_file_that_is_not_an_elf_is_refused_before_boot() {
    let mut c = VmConfig::new("script", 32 << 20);
    c.kernel = Kernel::Path(temp_file("script.sh", b"#!/bin/sh\necho hi\n"));
    let err = common::create(&[c]).err().unwrap();
    assert!(err.contains("not a kernel this VMM boots"), "{err}");
}
