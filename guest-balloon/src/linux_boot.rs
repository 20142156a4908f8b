//! The test guest booted as a bzImage through Linux's boot protocol: it learns its
//! machine the way a Linux kernel does, then runs as usual.
//!
//! From the zero page (`rsi` at `startup_64`): the e820 map (its RAM), the command
//! line (the VMM's `vmm.*` parameters, then ` -- ` and the workload) and the initrd;
//! from the ACPI tables the zero page points to: the processors (MADT) and the
//! virtio-mmio devices (`LNRO0005` in the DSDT), among which it finds its balloon by
//! its device ID. It turns all of this into the same [`BootInfo`] the VMM's own
//! protocol hands over, so everything after the boot is shared. It prints one
//! `linux-boot` line with what it found, so the host can check each step.
//!
//! The initrd is kept out of the guest's free memory and fingerprinted (FNV-1a), as
//! a kernel keeps an initramfs until it has unpacked it.

use core::ptr::addr_of_mut;

use guest_abi::linux::{self as abi, acpi, aml, zero_page as zp, TestGuestCmdline};
use guest_abi::{
    exit_code, Backend, BootInfo, MemRegion, BOOT_INFO_MAGIC, BOOT_INFO_VERSION, CMDLINE_MAX, CONTROL_PAGE_GPA,
    PAGE_SIZE,
};

use crate::console::{self, Line};
use crate::{boot, smp, system};

/// virtio device ID of a balloon.
const BALLOON_DEVICE_ID: u32 = 5;
/// Offset of `DeviceID` in a virtio-mmio window.
const VIRTIO_MMIO_DEVICE_ID: u64 = 0x008;

extern "C" {
    /// End of the image, `.bss` included (linker.ld).
    static __kernel_end: u8;
}

/// The boot information built from what the Linux protocol gave.
static mut INFO: BootInfo = {
    // SAFETY: BootInfo is plain old data (integers and arrays); all-zero is valid.
    unsafe { core::mem::zeroed() }
};

/// `len` bytes of guest-physical memory at `gpa` (identity-mapped).
///
/// # Safety
/// The range must be mapped and not written by anyone while the slice lives.
unsafe fn phys(gpa: u64, len: usize) -> &'static [u8] {
    // SAFETY: the caller vouches for the range.
    unsafe { core::slice::from_raw_parts(gpa as *const u8, len) }
}

/// What the boot found, for the `linux-boot` line.
struct Found {
    e820: u64,
    cpus: u32,
    virtio: u64,
    balloon_gsi: Option<u32>,
    initrd: Option<(u64, u64)>,
    cmdline_bytes: usize,
}

/// Where [`crate::entry`]'s `startup_64` continues: `zero_page` from `rsi`, `cpu`
/// from `rdi`.
pub extern "C" fn linux_main(zero_page: u64, cpu: u64) -> ! {
    if cpu != 0 {
        smp::ap_main()
    }
    system::boot_marker();
    // SAFETY: the zero page is 4 KiB of RAM the VMM wrote before the first
    // instruction and nobody changes.
    let zero = unsafe { phys(zero_page, zp::SIZE) };
    let info = addr_of_mut!(INFO);
    // SAFETY: only the BSP runs here, before anything else reads INFO.
    let found = match read_machine(zero, unsafe { &mut *info }) {
        Ok(found) => found,
        Err(msg) => {
            Line::vm().str("event", "error").str("msg", format_args!("linux boot: {msg}")).emit();
            system::exit(exit_code::BAD_BOOT_INFO)
        }
    };
    // SAFETY: INFO is complete; from now on it is only read.
    console::set_vm(unsafe { (*info).vm_index });
    let mut line = Line::vm();
    line.str("event", "linux-boot")
        .num("e820", found.e820)
        .num("cpus", found.cpus as u64)
        .num("virtio_mmio", found.virtio)
        .num("cmdline_bytes", found.cmdline_bytes as u64);
    if let Some(gsi) = found.balloon_gsi {
        line.num("balloon_gsi", gsi as u64);
    }
    if let Some((addr, size)) = found.initrd {
        // SAFETY: the initrd is RAM the VMM filled, kept out of the allocator.
        let bytes = unsafe { phys(addr, size as usize) };
        line.num("initrd_bytes", size).num("initrd_fnv", abi::fnv1a64(bytes));
    }
    line.emit();
    boot::bsp_main(info)
}

/// Fills `info` from the zero page, the command line and the ACPI tables.
fn read_machine(zero: &[u8], info: &mut BootInfo) -> Result<Found, &'static str> {
    if abi::u32_at(zero, zp::HEADER) != Some(abi::HDRS_MAGIC) {
        return Err("no setup header in the zero page");
    }
    info.magic = BOOT_INFO_MAGIC;
    info.version = BOOT_INFO_VERSION;
    info.control_page = CONTROL_PAGE_GPA;
    // Only the linker symbol's address is taken, never its value.
    let image_end = core::ptr::addr_of!(__kernel_end) as u64;
    info.kernel_end = image_end.next_multiple_of(PAGE_SIZE);
    let initrd = abi::initrd(zero);
    let e820 = memory_map(zero, initrd, info)?;
    let cmdline_bytes = command_line(zero, info)?;
    let (cpus, virtio, balloon_gsi) = acpi_tables(zero, info)?;
    Ok(Found { e820, cpus, virtio, balloon_gsi, initrd, cmdline_bytes })
}

/// RAM from the e820 map, above the image and without the initrd.
fn memory_map(zero: &[u8], initrd: Option<(u64, u64)>, info: &mut BootInfo) -> Result<u64, &'static str> {
    let hole = initrd.map(|(a, s)| (a & !(PAGE_SIZE - 1), (a + s).next_multiple_of(PAGE_SIZE)));
    let first_free = info.kernel_end;
    let mut n = 0;
    let mut push = |base: u64, end: u64| {
        if end <= base {
            return Ok(());
        }
        let slot = info.mem.get_mut(n).ok_or("more RAM ranges than the boot information holds")?;
        *slot = MemRegion { base, size: end - base };
        n += 1;
        Ok(())
    };
    let mut entries = 0;
    for e in abi::e820(zero) {
        entries += 1;
        if e.kind != abi::E820_RAM {
            continue;
        }
        let (base, end) = (e.addr.max(first_free), e.addr + e.size);
        match hole {
            Some((h0, h1)) if h0 < end && base < h1 => {
                push(base, h0)?;
                push(h1, end)?;
            }
            _ => push(base, end)?,
        }
    }
    if n == 0 {
        return Err("no RAM above the image in the e820 map");
    }
    info.nr_mem = n as u32;
    Ok(entries)
}

/// The VMM's parameters and the workload from the command line; returns its length.
fn command_line(zero: &[u8], info: &mut BootInfo) -> Result<usize, &'static str> {
    let ptr = abi::cmdline_ptr(zero).ok_or("no command line")?;
    // SAFETY: the VMM wrote the command line (NUL-terminated, at most
    // TEST_GUEST_CMDLINE_MAX bytes) in low RAM before the first instruction.
    let area = unsafe { phys(ptr, abi::TEST_GUEST_CMDLINE_MAX + 1) };
    let len = area.iter().position(|&b| b == 0).ok_or("the command line has no end")?;
    let line = core::str::from_utf8(&area[..len]).map_err(|_| "the command line is not UTF-8")?;
    let parsed = TestGuestCmdline::parse(line);
    info.vm_index = parsed.number("vmm.vm").ok_or("no vmm.vm= on the command line")? as u32;
    info.vm_seed = parsed.number("vmm.seed").ok_or("no vmm.seed= on the command line")?;
    info.tsc_khz = parsed.number("vmm.tsc_khz").unwrap_or(0);
    info.backend = match parsed.param("vmm.backend") {
        Some("pvm") => Backend::Pvm as u32,
        Some("hardware") => Backend::Hardware as u32,
        _ => return Err("no vmm.backend=pvm|hardware on the command line"),
    };
    let workload = parsed.workload.as_bytes();
    if workload.len() > CMDLINE_MAX {
        return Err("the workload is too long");
    }
    info.cmdline[..workload.len()].copy_from_slice(workload);
    info.cmdline_len = workload.len() as u32;
    Ok(len)
}

/// A whole ACPI table at `gpa`, checked against `signature`.
fn table(gpa: u64, signature: &[u8; 4]) -> Result<&'static [u8], &'static str> {
    // SAFETY: ACPI tables are in the reserved area below 1 MiB (RAM the VMM wrote);
    // the header is read first, then exactly the length it announces.
    let header = unsafe { phys(gpa, acpi::HEADER_LEN) };
    let len = acpi::table_len(header).filter(|l| (acpi::HEADER_LEN..1 << 20).contains(l)).ok_or("bad ACPI length")?;
    // SAFETY: as above.
    let whole = unsafe { phys(gpa, len) };
    acpi::check_table(whole, signature).map_err(|e| e.as_str())?;
    Ok(whole)
}

/// Processors and virtio-mmio devices from ACPI: (CPUs, virtio devices, GSI of the
/// balloon); sets `info.vcpus` and `info.balloon_mmio`.
fn acpi_tables(zero: &[u8], info: &mut BootInfo) -> Result<(u32, u64, Option<u32>), &'static str> {
    let rsdp_gpa = abi::u64_at(zero, zp::ACPI_RSDP_ADDR).filter(|&a| a != 0).ok_or("no acpi_rsdp_addr")?;
    // SAFETY: the RSDP is 36 bytes of RAM the VMM wrote.
    let xsdt_gpa = acpi::rsdp_xsdt(unsafe { phys(rsdp_gpa, acpi::RSDP_LEN) }).map_err(|e| e.as_str())?;
    let xsdt = table(xsdt_gpa, b"XSDT")?;
    let (mut madt, mut fadt) = (None, None);
    for gpa in acpi::xsdt_entries(xsdt) {
        // SAFETY: a table the XSDT lists; only its signature is read here.
        match unsafe { phys(gpa, 4) } {
            b"APIC" => madt = Some(table(gpa, b"APIC")?),
            b"FACP" => fadt = Some(table(gpa, b"FACP")?),
            _ => {}
        }
    }
    let cpus = acpi::madt_apic_ids(madt.ok_or("no MADT")?).count() as u32;
    info.vcpus = cpus;
    let dsdt = table(acpi::fadt_dsdt(fadt.ok_or("no FADT")?).ok_or("no DSDT in the FADT")?, b"DSDT")?;
    let (mut virtio, mut balloon_gsi) = (0, None);
    let understood = aml::devices(&dsdt[acpi::HEADER_LEN..], |dev| {
        let Some((base, _)) = dev.memory.filter(|_| dev.hid_is(abi::VIRTIO_MMIO_HID)) else { return };
        virtio += 1;
        // SAFETY: a virtio-mmio register window the DSDT describes (MMIO hole,
        // identity-mapped); one 32-bit read is one register access.
        let id = unsafe { ((base as u64 + VIRTIO_MMIO_DEVICE_ID) as *const u32).read_volatile() };
        if id == BALLOON_DEVICE_ID && info.balloon_mmio == 0 {
            info.balloon_mmio = base as u64;
            balloon_gsi = dev.interrupt;
        }
    });
    if !understood {
        return Err("the DSDT holds AML this guest does not read");
    }
    Ok((cpus, virtio, balloon_gsi))
}
