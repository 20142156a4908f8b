//! The zero page (`struct boot_params`) and what it points to: the e820 memory map,
//! the command line and the initrd.
//!
//! Rules from `Documentation/arch/x86/boot.rst`, checked before anything is written:
//! the command line fits the kernel's `cmdline_size` and holds no NUL; the initrd is
//! page aligned, ends below `initrd_addr_max` and below the MMIO hole, and lies clear
//! of the kernel's load range plus its `init_size`. The e820 map is sorted and exact:
//! RAM `[0, 0x9fc00)`, reserved up to 1 MiB (EBDA, ACPI tables, BIOS area), then each
//! RAM region of the VM.

use guest_abi::linux as abi;
use guest_abi::{MemRegion, PAGE_SIZE};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use super::{LinuxBootError, EBDA_START, HIMEM_START};

/// `type_of_loader` for a boot loader without an assigned ID.
const LOADER_UNDEFINED: u8 = 0xff;

/// The e820 map of a VM whose RAM is `regions` (ascending; the first starts at 0).
pub fn e820_map(regions: &[MemRegion]) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, kind: u32| boot_e820_entry { addr, size, r#type: kind };
    let mut map =
        vec![entry(0, EBDA_START, abi::E820_RAM), entry(EBDA_START, HIMEM_START - EBDA_START, abi::E820_RESERVED)];
    for r in regions {
        let start = r.base.max(HIMEM_START);
        let end = r.base + r.size;
        if start < end {
            map.push(entry(start, end - start, abi::E820_RAM));
        }
    }
    map
}

/// Checks a command line against the kernel's limit (`cmdline_size`, without NUL).
pub fn check_cmdline(cmdline: &str, max: usize) -> Result<(), LinuxBootError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(LinuxBootError::CmdlineNul);
    }
    if cmdline.len() > max {
        return Err(LinuxBootError::CmdlineTooLong { len: cmdline.len(), max });
    }
    Ok(())
}

/// Where an initrd of `len` bytes goes: the highest page-aligned address where it
/// ends at or below both `low_ram_end` (the end of RAM below the MMIO hole) and
/// `addr_max + 1`, and starts at or above `kernel_end`.
pub fn place_initrd(len: u64, kernel_end: u64, low_ram_end: u64, addr_max: u64) -> Result<u64, LinuxBootError> {
    let top = low_ram_end.min(addr_max.saturating_add(1));
    let start = top.checked_sub(len).map(|s| s & !(PAGE_SIZE - 1));
    match start {
        Some(start) if start >= kernel_end && len > 0 => Ok(start),
        _ => Err(LinuxBootError::InitrdTooLarge { len, room: top.saturating_sub(kernel_end) }),
    }
}

/// What goes into the zero page.
pub struct ZeroPage<'a> {
    /// The setup header from the bzImage, or `None` for a vmlinux (the VMM then
    /// writes the fields a loader must provide).
    pub header: Option<setup_header>,
    /// GPA and length of the command line (written with its NUL).
    pub cmdline: (u64, usize),
    /// GPA and length of the initrd.
    pub initrd: Option<(u64, u64)>,
    /// GPA of the ACPI RSDP.
    pub rsdp: u64,
    /// The memory map.
    pub e820: &'a [boot_e820_entry],
}

impl ZeroPage<'_> {
    /// The `boot_params` to write at the zero page's GPA.
    pub fn build(&self) -> Result<boot_params, LinuxBootError> {
        let mut p = boot_params::default();
        if let Some(h) = self.header {
            p.hdr = h;
        } else {
            p.hdr.boot_flag = abi::BOOT_FLAG;
            p.hdr.header = abi::HDRS_MAGIC;
            p.hdr.kernel_alignment = 0x100_0000;
        }
        p.hdr.type_of_loader = LOADER_UNDEFINED;
        p.hdr.cmd_line_ptr = self.cmdline.0 as u32;
        p.ext_cmd_line_ptr = (self.cmdline.0 >> 32) as u32;
        p.hdr.cmdline_size = self.cmdline.1 as u32;
        if let Some((addr, len)) = self.initrd {
            p.hdr.ramdisk_image = addr as u32;
            p.ext_ramdisk_image = (addr >> 32) as u32;
            p.hdr.ramdisk_size = len as u32;
            p.ext_ramdisk_size = (len >> 32) as u32;
        }
        p.acpi_rsdp_addr = self.rsdp;
        if self.e820.len() > p.e820_table.len() {
            return Err(LinuxBootError::E820Full(self.e820.len()));
        }
        p.e820_table[..self.e820.len()].copy_from_slice(self.e820);
        p.e820_entries = self.e820.len() as u8;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use std::mem::offset_of;

    use abi::zero_page as zp;
    use vm_memory::ByteValued;

    use super::*;

    #[test]
    fn the_zero_page_offsets_are_those_of_the_boot_protocol() {
        // linux-loader's bindings (generated from Linux's headers) against the
        // constants the test guest reads (from boot.rst).
        assert_eq!(std::mem::size_of::<boot_params>(), zp::SIZE);
        assert_eq!(offset_of!(boot_params, acpi_rsdp_addr), zp::ACPI_RSDP_ADDR);
        assert_eq!(offset_of!(boot_params, ext_ramdisk_image), zp::EXT_RAMDISK_IMAGE);
        assert_eq!(offset_of!(boot_params, ext_cmd_line_ptr), zp::EXT_CMD_LINE_PTR);
        assert_eq!(offset_of!(boot_params, e820_entries), zp::E820_ENTRIES);
        assert_eq!(offset_of!(boot_params, hdr), zp::SETUP_HEADER);
        assert_eq!(offset_of!(boot_params, e820_table), zp::E820_TABLE);
        let hdr = |o: usize| zp::SETUP_HEADER + o;
        assert_eq!(hdr(offset_of!(setup_header, boot_flag)), zp::BOOT_FLAG);
        assert_eq!(hdr(offset_of!(setup_header, header)), zp::HEADER);
        assert_eq!(hdr(offset_of!(setup_header, type_of_loader)), zp::TYPE_OF_LOADER);
        assert_eq!(hdr(offset_of!(setup_header, ramdisk_image)), zp::RAMDISK_IMAGE);
        assert_eq!(hdr(offset_of!(setup_header, ramdisk_size)), zp::RAMDISK_SIZE);
        assert_eq!(hdr(offset_of!(setup_header, cmd_line_ptr)), zp::CMD_LINE_PTR);
        assert_eq!(hdr(offset_of!(setup_header, xloadflags)), zp::XLOADFLAGS);
        assert_eq!(hdr(offset_of!(setup_header, cmdline_size)), zp::CMDLINE_SIZE);
        assert_eq!(hdr(offset_of!(setup_header, init_size)), zp::INIT_SIZE);
        assert_eq!(std::mem::size_of::<boot_e820_entry>(), zp::E820_ENTRY_SIZE);
    }

    #[test]
    fn the_zero_page_holds_what_the_loader_must_provide() {
        let regions = guest_abi_regions(256 << 20);
        let e820 = e820_map(&regions);
        let zero = ZeroPage {
            header: None,
            cmdline: (0x9_0000, 12),
            initrd: Some((0x0f00_0000, 0x1234)),
            rsdp: 0xe_0000,
            e820: &e820,
        };
        let p = zero.build().unwrap();
        let bytes = p.as_slice();
        assert_eq!(abi::u8_at(bytes, zp::TYPE_OF_LOADER), Some(0xff));
        assert_eq!(abi::u16_at(bytes, zp::BOOT_FLAG), Some(0xaa55));
        assert_eq!(abi::u32_at(bytes, zp::HEADER), Some(abi::HDRS_MAGIC));
        assert_eq!(abi::cmdline_ptr(bytes), Some(0x9_0000));
        assert_eq!(abi::u32_at(bytes, zp::CMDLINE_SIZE), Some(12));
        assert_eq!(abi::initrd(bytes), Some((0x0f00_0000, 0x1234)));
        assert_eq!(abi::u64_at(bytes, zp::ACPI_RSDP_ADDR), Some(0xe_0000));
        let read: Vec<_> = abi::e820(bytes).collect();
        assert_eq!(read.len(), 3);
        assert_eq!((read[2].addr, read[2].size, read[2].kind), (HIMEM_START, (256 << 20) - HIMEM_START, 1));
    }

    fn guest_abi_regions(bytes: u64) -> Vec<MemRegion> {
        crate::memory::layout(bytes)
    }

    #[test]
    fn e820_is_sorted_exact_and_skips_the_mmio_hole() {
        let e820 = e820_map(&guest_abi_regions(5 << 30));
        let got: Vec<(u64, u64, u32)> = e820.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            got,
            vec![
                (0, 0x9_fc00, 1),
                (0x9_fc00, 0x10_0000 - 0x9_fc00, 2),
                (0x10_0000, 0xc000_0000 - 0x10_0000, 1),
                (0x1_0000_0000, 2 << 30, 1),
            ]
        );
        assert!(e820.windows(2).all(|w| w[0].addr + w[0].size <= w[1].addr), "sorted, no overlap");
        let ram: u64 = e820.iter().filter(|e| e.r#type == 1).map(|e| e.size).sum();
        assert_eq!(ram, (5 << 30) - (HIMEM_START - EBDA_START), "all RAM but the legacy hole");
    }

    #[test]
    fn the_initrd_goes_high_and_never_over_the_kernel() {
        // Top of low RAM, page aligned down.
        assert_eq!(place_initrd(0x1800, 0x20_0000, 0x1000_0000, 0x7fff_ffff).unwrap(), 0x1000_0000 - 0x2000);
        // initrd_addr_max wins over the end of RAM.
        assert_eq!(place_initrd(0x1000, 0x20_0000, 0xc000_0000, 0x3fff_ffff).unwrap(), 0x4000_0000 - 0x1000);
        // Exactly the room between the kernel and the top fits; one byte more does not.
        assert_eq!(place_initrd(0x1000, 0x20_0000, 0x20_1000, u32::MAX as u64).unwrap(), 0x20_0000);
        let err = place_initrd(0x1001, 0x20_0000, 0x20_1000, u32::MAX as u64).unwrap_err();
        assert!(matches!(err, LinuxBootError::InitrdTooLarge { len: 0x1001, room: 0x1000 }), "{err}");
        assert!(!err.to_string().contains('\n'));
    }

    #[test]
    fn command_lines_are_limited() {
        assert!(check_cmdline("console=ttyS0", 2047).is_ok());
        let long = "x".repeat(2048);
        let err = check_cmdline(&long, 2047).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the command line is 2048 bytes; this kernel takes at most 2047 (cmdline_size of its setup header)"
        );
        assert!(matches!(check_cmdline("a\0b", 2047), Err(LinuxBootError::CmdlineNul)));
    }
}
