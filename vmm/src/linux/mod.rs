//! Booting through Linux's x86 boot protocol: bzImage and vmlinux kernels, and the
//! project's test guest packaged as a bzImage.
//!
//! The recipe is Firecracker's (see docs/linux.md): linux-loader loads the kernel
//! (a bzImage's protected-mode part at 1 MiB, entered at +0x200 in 64-bit mode; a
//! vmlinux at its physical addresses, entered at its ELF entry); the VMM writes the
//! zero page ([`zero_page`]: setup header, e820, command line, initrd), ACPI tables
//! ([`acpi`]), the GDT and an identity map, and starts the vCPU in long mode with
//! `rsi` = zero page. Linux guests also get KVM's in-kernel interrupt controllers and
//! irqfds ([`irqchip`]), per-vCPU CPUID and boot MSRs (`x86::cpuid`, `x86::msrs`),
//! and legacy devices (`devices::legacy`: i8042 reset, CMOS clock; an exit register).
//!
//! Layout below 1 MiB (the VMM's own areas of `guest_abi` stay where they are):
//!
//! | GPA | what |
//! |---|---|
//! | `0x0500` | GDT |
//! | `0x3000` | control page (test guest only) |
//! | `0x7000` | zero page |
//! | `0x8000..` | PVM VIF areas (PVM only) |
//! | `0x40000..` | page tables |
//! | `0x90000..0x9fc00` | command line |
//! | `0x9fc00..0x100000` | reserved in e820: ACPI tables from `0xe0000` |
//!
//! On a PVM host a Linux kernel is refused before it runs: its real-mode and
//! decompressor code would run in KVM's instruction emulator (~0.5 M instructions/s).
//! The test guest's bzImage is entered directly in 64-bit mode, so it runs here and
//! checks the whole path on every test run.

pub mod acpi;
pub mod guest_image;
pub mod irqchip;
pub mod kind;
pub mod platform;
pub mod zero_page;

use std::io::Cursor;

use guest_abi::linux as abi;
use guest_abi::{CONTROL_MAGIC, CONTROL_PAGE_GPA, PAGE_SIZE};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

pub use kind::KernelKind;

use crate::loader;
use crate::memory::GuestRam;
use crate::x86::{paging, regs};

/// GPA of the zero page.
pub const ZERO_PAGE_GPA: u64 = 0x7000;
/// GPA of the command line.
pub const CMDLINE_GPA: u64 = 0x9_0000;
/// Start of the extended BIOS data area: RAM ends here below 1 MiB.
pub const EBDA_START: u64 = 0x9_fc00;
/// GPA of the RSDP; the other ACPI tables follow it.
pub const ACPI_GPA: u64 = 0xe_0000;
/// 1 MiB: where a bzImage's protected-mode part is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Command line of a Linux guest when the user gives none: the console on COM1,
/// `reboot` through the i8042, no PCI probing (the VM has no PCI bus).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k pci=off i8042.noaux i8042.nomux i8042.dumbkbd";
/// A vmlinux has no setup header: the x86 default `COMMAND_LINE_SIZE` - 1.
const VMLINUX_CMDLINE_MAX: usize = 2047;

/// Why a kernel cannot be booted through the Linux protocol.
#[derive(Debug, thiserror::Error)]
pub enum LinuxBootError {
    /// linux-loader refused the image.
    #[error("loading the kernel: {0}")]
    Load(String),
    /// Not enough RAM below the MMIO hole for the kernel to start.
    #[error("the kernel needs RAM up to {need:#x} (1 MiB + its init_size) but the VM's low RAM ends at {have:#x}: give the VM more memory")]
    RamTooSmall {
        /// End of what the kernel needs.
        need: u64,
        /// End of RAM below the MMIO hole.
        have: u64,
    },
    /// The command line is too long for the kernel.
    #[error("the command line is {len} bytes; this kernel takes at most {max} (cmdline_size of its setup header)")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The kernel's limit.
        max: usize,
    },
    /// The command line holds a NUL byte.
    #[error("the command line holds a NUL byte")]
    CmdlineNul,
    /// The initrd does not fit.
    #[error("the initrd is {len} bytes but only {room} fit between the kernel and the top of low RAM: give the VM more memory")]
    InitrdTooLarge {
        /// Its size.
        len: u64,
        /// Room there is.
        room: u64,
    },
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}: {source}")]
    InitrdRead {
        /// Its path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// More e820 entries than the zero page holds.
    #[error("{0} e820 entries do not fit in the zero page")]
    E820Full(usize),
    /// The ACPI tables overflow their area.
    #[error("the ACPI tables take {bytes} bytes, more than the {room} reserved for them")]
    AcpiTooLarge {
        /// Their size.
        bytes: u64,
        /// The room.
        room: u64,
    },
    /// More vCPUs than 8-bit APIC IDs number.
    #[error("{0} vCPUs: the MADT numbers local APICs with 8 bits")]
    TooManyCpus(u32),
    /// A device window above 4 GiB (the DSDT describes 32-bit windows).
    #[error("device window {0:#x} is above 4 GiB")]
    DeviceAbove4G(u64),
    /// Writing guest memory failed.
    #[error("writing {what} into guest memory: {source}")]
    Memory {
        /// What was written.
        what: &'static str,
        /// The error.
        source: vm_memory::GuestMemoryError,
    },
    /// A Linux kernel on a host whose KVM cannot run it.
    #[error("cannot boot a Linux kernel here: this host's KVM is the PVM backend (no VMX/SVM), where Linux's boot code would run in KVM's instruction emulator (~0.5 M instructions/s, hours); use a host with hardware virtualisation (the test guest runs here, also as a bzImage: --kernel builtin:bzimage)")]
    NeedsHardwareVirtualisation,
}

/// What the Linux path needs besides the kernel image.
pub struct LinuxBoot<'a> {
    /// What the image is (a Linux protocol kind).
    pub kind: &'a KernelKind,
    /// The whole command line.
    pub cmdline: &'a str,
    /// The initrd's bytes.
    pub initrd: Option<&'a [u8]>,
    /// vCPU count (one local APIC each in the MADT).
    pub vcpus: u32,
    /// The virtio-mmio devices the DSDT describes.
    pub devices: &'a [acpi::VirtioMmio],
}

/// Where things went.
#[derive(Clone, Copy, Debug)]
pub struct LinuxLayout {
    /// The 64-bit entry point.
    pub entry: u64,
    /// CR3 of the identity map.
    pub cr3: u64,
    /// GPA of the zero page (for `rsi`).
    pub zero_page: u64,
    /// GPA and size of the initrd.
    pub initrd: Option<(u64, u64)>,
}

fn mem_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> LinuxBootError {
    move |source| LinuxBootError::Memory { what, source }
}

/// Loads `image` and writes everything the Linux boot protocol hands a kernel.
pub fn prepare(ram: &GuestRam, image: &[u8], boot: &LinuxBoot) -> Result<LinuxLayout, LinuxBootError> {
    let mem = ram.mem();
    let low_end = ram.regions()[0].base + ram.regions()[0].size;
    let ram_end = ram.regions().last().map(|r| r.base + r.size).unwrap_or(0);
    let (entry, kernel_end, header, cmdline_max, initrd_max) = match boot.kind {
        KernelKind::BzImage(h) => {
            let need = HIMEM_START + (h.init_size as u64).max(image.len() as u64).next_multiple_of(PAGE_SIZE);
            if need > low_end {
                return Err(LinuxBootError::RamTooSmall { need, have: low_end });
            }
            let r = BzImage::load(mem, None, &mut Cursor::new(image), Some(GuestAddress(HIMEM_START)))
                .map_err(|e| LinuxBootError::Load(e.to_string()))?;
            let load = r.kernel_load.0;
            (load + abi::ENTRY_64_OFFSET, need, r.setup_header, h.cmdline_size as usize, h.initrd_addr_max as u64)
        }
        _ => {
            let k = loader::load(mem, image, ram_end).map_err(LinuxBootError::Load)?;
            (k.entry, k.end, None, VMLINUX_CMDLINE_MAX, u32::MAX as u64)
        }
    };

    zero_page::check_cmdline(boot.cmdline, cmdline_max)?;
    let mut line = boot.cmdline.as_bytes().to_vec();
    line.push(0);
    mem.write_slice(&line, GuestAddress(CMDLINE_GPA)).map_err(mem_err("the command line"))?;

    let initrd = match boot.initrd {
        Some(bytes) => {
            let at = zero_page::place_initrd(bytes.len() as u64, kernel_end, low_end, initrd_max)?;
            mem.write_slice(bytes, GuestAddress(at)).map_err(mem_err("the initrd"))?;
            Some((at, bytes.len() as u64))
        }
        None => None,
    };

    let tables = acpi::build(ACPI_GPA, HIMEM_START, boot.vcpus, boot.devices)?;
    for (gpa, bytes) in &tables.blobs {
        mem.write_slice(bytes, GuestAddress(*gpa)).map_err(mem_err("the ACPI tables"))?;
    }
    regs::write_gdt(mem).map_err(mem_err("the GDT"))?;
    let cr3 = paging::build_identity_map(mem, ram_end).map_err(mem_err("page tables"))?;
    let e820 = zero_page::e820_map(ram.regions());
    let params = zero_page::ZeroPage {
        header,
        cmdline: (CMDLINE_GPA, boot.cmdline.len()),
        initrd,
        rsdp: tables.rsdp(),
        e820: &e820,
    }
    .build()?;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_GPA)).map_err(mem_err("the zero page"))?;
    if boot.kind.is_test_guest_bzimage() {
        mem.write_obj(CONTROL_MAGIC, GuestAddress(CONTROL_PAGE_GPA)).map_err(mem_err("the control page"))?;
    }
    Ok(LinuxLayout { entry, cr3, zero_page: ZERO_PAGE_GPA, initrd })
}

/// What the VMM tells its test guest on the command line, before the workload.
pub struct TestGuestParams {
    /// Index of the VM in its process.
    pub vm_index: u32,
    /// Seed of its `unique` pages.
    pub vm_seed: u64,
    /// The KVM backend (how the guest reads CR2 on a page fault).
    pub backend: crate::x86::Backend,
    /// TSC frequency in kHz (0: unknown).
    pub tsc_khz: u64,
}

impl TestGuestParams {
    /// The command line: `extra` (the user's), the VMM's parameters, ` -- `, the
    /// workload.
    pub fn cmdline(&self, extra: &str, workload: &str) -> String {
        let backend = match self.backend {
            crate::x86::Backend::Pvm => "pvm",
            crate::x86::Backend::Hardware => "hardware",
        };
        let params = format!(
            "vmm.vm={} vmm.seed={:#x} vmm.backend={backend} vmm.tsc_khz={}",
            self.vm_index, self.vm_seed, self.tsc_khz
        );
        let head = if extra.is_empty() { params } else { format!("{extra} {params}") };
        format!("{head}{}{workload}", abi::WORKLOAD_SEPARATOR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::HostPages;
    use crate::x86::Backend;

    #[test]
    fn the_test_guest_reads_back_the_params_the_vmm_writes() {
        let p = TestGuestParams { vm_index: 3, vm_seed: 0xfeed, backend: Backend::Pvm, tsc_khz: 2_000_000 };
        let line = p.cmdline("quiet", "alloc 4M unique -- odd; exit 0");
        let parsed = abi::TestGuestCmdline::parse(&line);
        assert_eq!(parsed.workload, "alloc 4M unique -- odd; exit 0");
        assert_eq!(parsed.number("vmm.vm"), Some(3));
        assert_eq!(parsed.number("vmm.seed"), Some(0xfeed));
        assert_eq!(parsed.param("vmm.backend"), Some("pvm"));
        assert_eq!(parsed.number("vmm.tsc_khz"), Some(2_000_000));
        assert_eq!(parsed.param("quiet"), None);
    }

    #[test]
    fn the_packaged_test_guest_is_laid_out_by_the_protocol() {
        let ram = GuestRam::new(64 << 20, HostPages::Small).unwrap();
        let image = guest_image::bzimage(loader::BUILTIN_GUEST).unwrap();
        let kind = kind::recognise(&image).unwrap();
        let initrd = vec![0x5a; 10_000];
        let devices = [acpi::VirtioMmio { base: guest_abi::BALLOON_MMIO_BASE, gsi: irqchip::VIRTIO_GSI_BASE }];
        let boot =
            LinuxBoot { kind: &kind, cmdline: "a b -- exit 0", initrd: Some(&initrd), vcpus: 2, devices: &devices };
        let layout = prepare(&ram, &image, &boot).unwrap();
        assert_eq!(layout.entry, HIMEM_START + 0x200);
        let mut zero = vec![0u8; 4096];
        ram.mem().read_slice(&mut zero, GuestAddress(layout.zero_page)).unwrap();
        assert_eq!(abi::u8_at(&zero, abi::zero_page::TYPE_OF_LOADER), Some(0xff));
        let (at, len) = abi::initrd(&zero).unwrap();
        assert_eq!((at % PAGE_SIZE, len, at + len <= 64 << 20), (0, 10_000, true));
        assert!(at + len > (64 << 20) - PAGE_SIZE, "the initrd sits at the top of RAM");
        let mut back = vec![0u8; 10_000];
        ram.mem().read_slice(&mut back, GuestAddress(at)).unwrap();
        assert_eq!(abi::fnv1a64(&back), abi::fnv1a64(&initrd));
        let mut line = [0u8; 14];
        ram.mem().read_slice(&mut line, GuestAddress(abi::cmdline_ptr(&zero).unwrap())).unwrap();
        assert_eq!(&line, b"a b -- exit 0\0");
        let rsdp = abi::u64_at(&zero, abi::zero_page::ACPI_RSDP_ADDR).unwrap();
        assert_eq!(rsdp, ACPI_GPA);
        let magic: u32 = ram.mem().read_obj(GuestAddress(CONTROL_PAGE_GPA)).unwrap();
        assert_eq!(magic, CONTROL_MAGIC);
    }

    #[test]
    fn a_vmlinux_is_entered_at_its_elf_entry_with_a_zero_page_the_vmm_fills() {
        // The test guest's ELF with its segments linked in Linux's kernel mapping.
        let mut elf = loader::BUILTIN_GUEST.to_vec();
        let phoff = abi::u64_at(&elf, 32).unwrap() as usize;
        for i in 0..abi::u16_at(&elf, 56).unwrap() as usize {
            let at = phoff + i * 56 + 16;
            let vaddr = abi::u64_at(&elf, at).unwrap();
            elf[at..at + 8].copy_from_slice(&(vaddr | 0xffff_ffff_8000_0000).to_le_bytes());
        }
        let kind = kind::recognise(&elf).unwrap();
        assert_eq!(kind, KernelKind::LinuxElf);
        let ram = GuestRam::new(64 << 20, HostPages::Small).unwrap();
        let boot = LinuxBoot { kind: &kind, cmdline: DEFAULT_CMDLINE, initrd: None, vcpus: 1, devices: &[] };
        let layout = prepare(&ram, &elf, &boot).unwrap();
        assert_eq!(layout.entry, abi::u64_at(&elf, 24).unwrap(), "e_entry");
        let mut zero = vec![0u8; 4096];
        ram.mem().read_slice(&mut zero, GuestAddress(layout.zero_page)).unwrap();
        assert_eq!(abi::u16_at(&zero, abi::zero_page::BOOT_FLAG), Some(abi::BOOT_FLAG));
        assert_eq!(abi::u32_at(&zero, abi::zero_page::HEADER), Some(abi::HDRS_MAGIC));
        assert_eq!(abi::u32_at(&zero, abi::zero_page::CMDLINE_SIZE), Some(DEFAULT_CMDLINE.len() as u32));
        let long = "x".repeat(VMLINUX_CMDLINE_MAX + 1);
        let boot = LinuxBoot { kind: &kind, cmdline: &long, initrd: None, vcpus: 1, devices: &[] };
        assert!(matches!(prepare(&ram, &elf, &boot), Err(LinuxBootError::CmdlineTooLong { max: 2047, .. })));
    }

    #[test]
    fn a_kernel_larger_than_ram_or_an_initrd_that_does_not_fit_is_refused() {
        let ram = GuestRam::new(16 << 20, HostPages::Small).unwrap();
        let image = guest_image::bzimage(loader::BUILTIN_GUEST).unwrap();
        let kind = kind::recognise(&image).unwrap();
        let big = vec![0u8; 32 << 20];
        let boot = LinuxBoot { kind: &kind, cmdline: "", initrd: Some(&big), vcpus: 1, devices: &[] };
        let err = prepare(&ram, &image, &boot).unwrap_err();
        assert!(matches!(err, LinuxBootError::InitrdTooLarge { .. } | LinuxBootError::RamTooSmall { .. }), "{err}");
        let long = "x".repeat(abi::TEST_GUEST_CMDLINE_MAX + 1);
        let boot = LinuxBoot { kind: &kind, cmdline: &long, initrd: None, vcpus: 1, devices: &[] };
        assert!(matches!(prepare(&ram, &image, &boot).unwrap_err(), LinuxBootError::CmdlineTooLong { .. }));
    }
}
