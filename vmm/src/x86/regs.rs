//! Long-mode register state for a vCPU's first instruction, and the GDT behind it.
//!
//! CR0 = PE|MP|ET|NE|WP|AM|PG, CR4 = PAE only (SMEP/SMAP off, as PVM requires),
//! EFER = SCE|LME|LMA|NXE, flat 64-bit code segment at CPL 0.

use guest_abi::{CODE_SELECTOR, DATA_SELECTOR, GDT_GPA};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const CR0: u64 = 0x8005_0033;
const CR4_PAE: u64 = 0x20;
const EFER: u64 = 0xd01;

/// GDT entries: null, null, 64-bit code (0x10), data (0x18).
const GDT: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// Writes the GDT into guest memory.
pub fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_GPA + i as u64 * 8))?;
    }
    Ok(())
}

/// Turns the reset state in `sregs` into long mode with paging rooted at `cr3`.
pub fn long_mode_sregs(mut sregs: kvm_sregs, cr3: u64) -> kvm_sregs {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: CODE_SELECTOR,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment { selector: DATA_SELECTOR, type_: 0x3, l: 0, db: 1, ..code };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.cr0 = CR0;
    sregs.cr3 = cr3;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER;
    sregs
}

/// General registers at entry: `rdi` = boot information, `rsi` = vCPU index.
pub fn entry_regs(entry: u64, boot_info: u64, cpu: u32) -> kvm_regs {
    kvm_regs { rip: entry, rdi: boot_info, rsi: cpu as u64, rflags: 0x2, rsp: 0, ..Default::default() }
}

/// General registers at a Linux boot protocol 64-bit entry: `rsi` = zero page, and
/// `rdi` = vCPU index. The index is not part of Linux's protocol (Linux starts its
/// application processors itself; for Linux only vCPU 0 runs this state); the test
/// guest's bzImage has every vCPU started at the entry and takes its index from
/// `rdi`, because on KVM's PVM backend CPUID leaf 1 shows the guest the host CPU's
/// APIC ID rather than the VMM's per-vCPU table.
pub fn linux_entry_regs(entry: u64, zero_page: u64, cpu: u32) -> kvm_regs {
    kvm_regs { rip: entry, rsi: zero_page, rdi: cpu as u64, rflags: 0x2, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_is_written_where_the_abi_says() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        write_gdt(&mem).unwrap();
        let code: u64 = mem.read_obj(GuestAddress(GDT_GPA + CODE_SELECTOR as u64)).unwrap();
        assert_eq!(code >> 53 & 1, 1, "L bit of the code segment");
        let s = long_mode_sregs(kvm_sregs::default(), 0x40000);
        assert_eq!((s.cs.l, s.efer & 0x400, s.cr4 & (3 << 20)), (1, 0x400, 0));
    }
}
