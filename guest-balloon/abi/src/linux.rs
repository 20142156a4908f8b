//! What the test guest reads when the VMM boots it through Linux's x86 boot protocol
//! (the test guest packaged as a bzImage): the zero page, the command line and the
//! ACPI tables, read the way a Linux kernel reads them.
//!
//! The VMM writes these structures with `linux-loader`'s `boot_params` and the
//! `acpi_tables` crate; this module reads them back from plain byte slices with the
//! offsets of `Documentation/arch/x86/boot.rst` and the ACPI specification. Keeping
//! the reader here (not in the guest) lets the VMM's unit tests run it on the tables
//! the VMM builds, so both sides are checked against each other and against the
//! specifications' constants.
//!
//! The AML reader understands exactly the objects a DSDT of this VMM holds (scopes,
//! devices, names bound to strings, integers, EISA IDs and resource-template buffers,
//! methods): it is not a general AML interpreter, and it stops at anything else.

/// Offsets in the zero page (`struct boot_params`, 4 KiB).
pub mod zero_page {
    /// `acpi_rsdp_addr` (u64, boot protocol 2.14+).
    pub const ACPI_RSDP_ADDR: usize = 0x070;
    /// `ext_ramdisk_image` (u32): bits 32..63 of the initrd address.
    pub const EXT_RAMDISK_IMAGE: usize = 0x0c0;
    /// `ext_ramdisk_size` (u32).
    pub const EXT_RAMDISK_SIZE: usize = 0x0c4;
    /// `ext_cmd_line_ptr` (u32).
    pub const EXT_CMD_LINE_PTR: usize = 0x0c8;
    /// `e820_entries` (u8).
    pub const E820_ENTRIES: usize = 0x1e8;
    /// The setup header starts here (`setup_sects`).
    pub const SETUP_HEADER: usize = 0x1f1;
    /// `boot_flag` (u16, 0xaa55).
    pub const BOOT_FLAG: usize = 0x1fe;
    /// `header` (u32, "HdrS").
    pub const HEADER: usize = 0x202;
    /// `version` (u16, boot protocol).
    pub const VERSION: usize = 0x206;
    /// `kernel_version` (u16): offset of a NUL-terminated string, from 0x200.
    pub const KERNEL_VERSION: usize = 0x20e;
    /// `type_of_loader` (u8).
    pub const TYPE_OF_LOADER: usize = 0x210;
    /// `loadflags` (u8).
    pub const LOADFLAGS: usize = 0x211;
    /// `code32_start` (u32).
    pub const CODE32_START: usize = 0x214;
    /// `ramdisk_image` (u32).
    pub const RAMDISK_IMAGE: usize = 0x218;
    /// `ramdisk_size` (u32).
    pub const RAMDISK_SIZE: usize = 0x21c;
    /// `cmd_line_ptr` (u32).
    pub const CMD_LINE_PTR: usize = 0x228;
    /// `initrd_addr_max` (u32).
    pub const INITRD_ADDR_MAX: usize = 0x22c;
    /// `kernel_alignment` (u32).
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    /// `xloadflags` (u16).
    pub const XLOADFLAGS: usize = 0x236;
    /// `cmdline_size` (u32).
    pub const CMDLINE_SIZE: usize = 0x238;
    /// `pref_address` (u64).
    pub const PREF_ADDRESS: usize = 0x258;
    /// `init_size` (u32).
    pub const INIT_SIZE: usize = 0x260;
    /// `e820_table` (128 entries of 20 bytes).
    pub const E820_TABLE: usize = 0x2d0;
    /// Entries `e820_table` holds.
    pub const E820_MAX: usize = 128;
    /// Bytes of one e820 entry (`addr` u64, `size` u64, `type` u32, packed).
    pub const E820_ENTRY_SIZE: usize = 20;
    /// Size of the zero page.
    pub const SIZE: usize = 4096;
}

/// `header` magic: "HdrS".
pub const HDRS_MAGIC: u32 = u32::from_le_bytes(*b"HdrS");
/// `boot_flag` value.
pub const BOOT_FLAG: u16 = 0xaa55;
/// `xloadflags` bit: the kernel has a 64-bit entry at `load address + 0x200`.
pub const XLF_KERNEL_64: u16 = 1;
/// `loadflags` bit: the protected-mode code is loaded at 1 MiB.
pub const LOADED_HIGH: u8 = 1;
/// Offset of the 64-bit entry from the load address.
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;
/// `_HID` of a virtio-mmio device in ACPI.
pub const VIRTIO_MMIO_HID: &str = "LNRO0005";
/// Start of the test guest's `kernel_version` string in its bzImage: how the VMM
/// recognises its own test guest among bzImages.
pub const TEST_GUEST_VERSION_PREFIX: &str = "guest-balloon ";
/// Separates the VMM's parameters from the test guest's workload on its command
/// line (as `--` separates a kernel's parameters from init's arguments).
pub const WORKLOAD_SEPARATOR: &str = " -- ";
/// The longest command line the test guest's bzImage accepts (its `cmdline_size`):
/// a workload of [`crate::CMDLINE_MAX`] bytes and the VMM's parameters.
pub const TEST_GUEST_CMDLINE_MAX: usize = crate::CMDLINE_MAX + 255;

/// A little-endian integer at `off`, `None` past the end.
fn le<const N: usize>(bytes: &[u8], off: usize) -> Option<[u8; N]> {
    bytes.get(off..off.checked_add(N)?)?.try_into().ok()
}

/// `u8` at `off`.
pub fn u8_at(bytes: &[u8], off: usize) -> Option<u8> {
    bytes.get(off).copied()
}

/// Little-endian `u16` at `off`.
pub fn u16_at(bytes: &[u8], off: usize) -> Option<u16> {
    le(bytes, off).map(u16::from_le_bytes)
}

/// Little-endian `u32` at `off`.
pub fn u32_at(bytes: &[u8], off: usize) -> Option<u32> {
    le(bytes, off).map(u32::from_le_bytes)
}

/// Little-endian `u64` at `off`.
pub fn u64_at(bytes: &[u8], off: usize) -> Option<u64> {
    le(bytes, off).map(u64::from_le_bytes)
}

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`], [`E820_RESERVED`], ...
    pub kind: u32,
}

/// The e820 entries of a zero page (at most [`zero_page::E820_MAX`]).
pub fn e820(zero: &[u8]) -> impl Iterator<Item = E820Entry> + '_ {
    let n = u8_at(zero, zero_page::E820_ENTRIES).unwrap_or(0) as usize;
    (0..n.min(zero_page::E820_MAX)).map_while(move |i| {
        let off = zero_page::E820_TABLE + i * zero_page::E820_ENTRY_SIZE;
        Some(E820Entry { addr: u64_at(zero, off)?, size: u64_at(zero, off + 8)?, kind: u32_at(zero, off + 16)? })
    })
}

/// The initrd's `(address, size)` from a zero page (`None`: no initrd).
pub fn initrd(zero: &[u8]) -> Option<(u64, u64)> {
    let addr =
        u32_at(zero, zero_page::RAMDISK_IMAGE)? as u64 | (u32_at(zero, zero_page::EXT_RAMDISK_IMAGE)? as u64) << 32;
    let size =
        u32_at(zero, zero_page::RAMDISK_SIZE)? as u64 | (u32_at(zero, zero_page::EXT_RAMDISK_SIZE)? as u64) << 32;
    (size != 0).then_some((addr, size))
}

/// The command line's address from a zero page.
pub fn cmdline_ptr(zero: &[u8]) -> Option<u64> {
    Some(u32_at(zero, zero_page::CMD_LINE_PTR)? as u64 | (u32_at(zero, zero_page::EXT_CMD_LINE_PTR)? as u64) << 32)
}

/// A command line of the test guest: `KEY=VALUE ... -- WORKLOAD`.
pub struct TestGuestCmdline<'a> {
    params: &'a str,
    /// The workload (empty if the line has no separator).
    pub workload: &'a str,
}

impl<'a> TestGuestCmdline<'a> {
    /// Splits `line` at the first [`WORKLOAD_SEPARATOR`].
    pub fn parse(line: &'a str) -> Self {
        match line.split_once(WORKLOAD_SEPARATOR) {
            Some((params, workload)) => TestGuestCmdline { params, workload },
            None => TestGuestCmdline { params: line.strip_suffix(" --").unwrap_or(line), workload: "" },
        }
    }

    /// The value of parameter `key` (`key=value`), the last one if repeated.
    pub fn param(&self, key: &str) -> Option<&'a str> {
        self.params.split(' ').filter_map(|p| p.split_once('=')).filter(|(k, _)| *k == key).map(|(_, v)| v).next_back()
    }

    /// Parameter `key` as a number (decimal, or hexadecimal with `0x`).
    pub fn number(&self, key: &str) -> Option<u64> {
        let v = self.param(key)?;
        match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        }
    }
}

/// 64-bit FNV-1a: how the test guest and the VMM's tests fingerprint an initrd.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// ACPI tables, as the guest finds them from the RSDP.
pub mod acpi {
    use super::{u32_at, u64_at, u8_at};

    /// Bytes of the ACPI 2.0 RSDP.
    pub const RSDP_LEN: usize = 36;
    /// Bytes of an ACPI table header.
    pub const HEADER_LEN: usize = 36;
    /// Offset of `X_DSDT` (u64) in the FADT.
    pub const FADT_X_DSDT: usize = 140;
    /// Offset of `DSDT` (u32) in the FADT.
    pub const FADT_DSDT: usize = 40;
    /// Offset of the first interrupt controller structure in the MADT.
    pub const MADT_ENTRIES: usize = 44;
    /// MADT structure type of a processor local APIC.
    pub const MADT_LOCAL_APIC: u8 = 0;
    /// MADT structure type of an I/O APIC.
    pub const MADT_IO_APIC: u8 = 1;

    /// Whether `bytes` sum to zero (mod 256), as every ACPI checksum requires.
    pub fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)) == 0
    }

    /// Why a table cannot be used.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum AcpiError {
        /// The RSDP's signature, revision or checksums are wrong.
        BadRsdp,
        /// A table's header is cut short, or its length or checksum is wrong.
        BadTable([u8; 4]),
        /// A table the guest needs is missing.
        Missing([u8; 4]),
    }

    impl AcpiError {
        /// A short description.
        pub fn as_str(&self) -> &'static str {
            match self {
                AcpiError::BadRsdp => "bad RSDP (signature, revision or checksum)",
                AcpiError::BadTable(_) => "an ACPI table has a bad length or checksum",
                AcpiError::Missing(_) => "a needed ACPI table is missing",
            }
        }
    }

    /// Checks an RSDP (revision 2) and returns the XSDT's address.
    pub fn rsdp_xsdt(rsdp: &[u8]) -> Result<u64, AcpiError> {
        let ok = rsdp.len() >= RSDP_LEN
            && &rsdp[..8] == b"RSD PTR "
            && u8_at(rsdp, 15) >= Some(2)
            && checksum_ok(&rsdp[..20])
            && checksum_ok(&rsdp[..RSDP_LEN]);
        if !ok {
            return Err(AcpiError::BadRsdp);
        }
        u64_at(rsdp, 24).ok_or(AcpiError::BadRsdp)
    }

    /// The length a table header announces (to know how much to read).
    pub fn table_len(header: &[u8]) -> Option<usize> {
        u32_at(header, 4).map(|l| l as usize)
    }

    /// Checks a whole table (`table` is exactly its announced length) against
    /// `signature`.
    pub fn check_table(table: &[u8], signature: &[u8; 4]) -> Result<(), AcpiError> {
        let ok = table.len() >= HEADER_LEN
            && &table[..4] == signature
            && table_len(table) == Some(table.len())
            && checksum_ok(table);
        if ok {
            Ok(())
        } else {
            Err(AcpiError::BadTable(*signature))
        }
    }

    /// The table addresses an XSDT lists.
    pub fn xsdt_entries(xsdt: &[u8]) -> impl Iterator<Item = u64> + '_ {
        let n = xsdt.len().saturating_sub(HEADER_LEN) / 8;
        (0..n).filter_map(move |i| u64_at(xsdt, HEADER_LEN + i * 8))
    }

    /// The DSDT address a FADT gives (`X_DSDT`, else `DSDT`).
    pub fn fadt_dsdt(fadt: &[u8]) -> Option<u64> {
        match u64_at(fadt, FADT_X_DSDT) {
            Some(x) if x != 0 => Some(x),
            _ => u32_at(fadt, FADT_DSDT).map(u64::from).filter(|&a| a != 0),
        }
    }

    /// The APIC IDs of the enabled processors a MADT lists.
    pub fn madt_apic_ids(madt: &[u8]) -> impl Iterator<Item = u8> + '_ {
        let mut off = MADT_ENTRIES;
        core::iter::from_fn(move || loop {
            let kind = u8_at(madt, off)?;
            let len = u8_at(madt, off + 1)? as usize;
            if len < 2 {
                return None;
            }
            let here = off;
            off += len;
            if kind == MADT_LOCAL_APIC && len >= 8 && u32_at(madt, here + 4)? & 1 == 1 {
                return u8_at(madt, here + 3);
            }
        })
    }
}

/// The DSDT's devices, read from its AML.
pub mod aml {
    use super::{u16_at, u32_at, u8_at};

    const ZERO_OP: u8 = 0x00;
    const ONE_OP: u8 = 0x01;
    const NAME_OP: u8 = 0x08;
    const BYTE_PREFIX: u8 = 0x0a;
    const WORD_PREFIX: u8 = 0x0b;
    const DWORD_PREFIX: u8 = 0x0c;
    const STRING_PREFIX: u8 = 0x0d;
    const QWORD_PREFIX: u8 = 0x0e;
    const SCOPE_OP: u8 = 0x10;
    const BUFFER_OP: u8 = 0x11;
    const PACKAGE_OP: u8 = 0x12;
    const METHOD_OP: u8 = 0x14;
    const EXT_OP_PREFIX: u8 = 0x5b;
    const DEVICE_OP: u8 = 0x82;
    const ONES_OP: u8 = 0xff;
    const ROOT_CHAR: u8 = b'\\';
    const PARENT_CHAR: u8 = b'^';
    const DUAL_NAME_PREFIX: u8 = 0x2e;
    const MULTI_NAME_PREFIX: u8 = 0x2f;
    /// Large resource descriptor: 32-bit fixed memory range.
    const MEMORY32_FIXED: u8 = 0x86;
    /// Large resource descriptor: extended interrupt.
    const EXTENDED_IRQ: u8 = 0x89;
    /// Small resource descriptor: end tag.
    const END_TAG: u8 = 0x79;

    /// What the reader learns of one device.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Device {
        /// Last name segment of the device (e.g. `VR00`).
        pub name: [u8; 4],
        /// `_HID` as a string (`LNRO0005`), or an EISA ID decoded to its 7 letters
        /// (`PNP0501`); NUL-padded.
        pub hid: [u8; 8],
        /// The first `Memory32Fixed` of `_CRS`: (base, length).
        pub memory: Option<(u32, u32)>,
        /// The first extended interrupt of `_CRS`.
        pub interrupt: Option<u32>,
    }

    impl Device {
        /// Whether the `_HID` is `hid`.
        pub fn hid_is(&self, hid: &str) -> bool {
            let end = self.hid.iter().position(|&b| b == 0).unwrap_or(8);
            &self.hid[..end] == hid.as_bytes()
        }
    }

    /// A PkgLength at `off`: (value, bytes it took).
    fn pkg_length(aml: &[u8], off: usize) -> Option<(usize, usize)> {
        let lead = u8_at(aml, off)?;
        let follow = (lead >> 6) as usize;
        if follow == 0 {
            return Some(((lead & 0x3f) as usize, 1));
        }
        let mut v = (lead & 0x0f) as usize;
        for i in 0..follow {
            v |= (u8_at(aml, off + 1 + i)? as usize) << (4 + 8 * i);
        }
        Some((v, 1 + follow))
    }

    /// A NameString at `off`: (its last segment, bytes it took).
    fn name_string(aml: &[u8], mut off: usize) -> Option<([u8; 4], usize)> {
        let start = off;
        while matches!(u8_at(aml, off)?, ROOT_CHAR | PARENT_CHAR) {
            off += 1;
        }
        let segments = match u8_at(aml, off)? {
            DUAL_NAME_PREFIX => {
                off += 1;
                2
            }
            MULTI_NAME_PREFIX => {
                off += 2;
                u8_at(aml, off - 1)? as usize
            }
            ZERO_OP => return Some(([0; 4], off + 1 - start)),
            _ => 1,
        };
        let last = off + (segments.checked_sub(1)?) * 4;
        let seg: [u8; 4] = aml.get(last..last + 4)?.try_into().ok()?;
        Some((seg, last + 4 - start))
    }

    /// Decodes a compressed EISA ID (`EISAID("PNP0501")`).
    fn eisa_id(v: u32) -> [u8; 8] {
        let v = v.swap_bytes();
        let hex = |n: u32| b"0123456789ABCDEF"[(n & 0xf) as usize];
        let letter = |n: u32| b'@' + (n & 0x1f) as u8;
        [letter(v >> 26), letter(v >> 21), letter(v >> 16), hex(v >> 12), hex(v >> 8), hex(v >> 4), hex(v), 0]
    }

    /// A data object at `off`: (what `_HID`/`_CRS` need of it, bytes it took).
    fn data_object(aml: &[u8], off: usize, dev: &mut Device, name: &[u8; 4]) -> Option<usize> {
        let op = u8_at(aml, off)?;
        let len = match op {
            ZERO_OP | ONE_OP | ONES_OP => 1,
            BYTE_PREFIX => 2,
            WORD_PREFIX => 3,
            DWORD_PREFIX => {
                if name == b"_HID" {
                    dev.hid = eisa_id(u32_at(aml, off + 1)?);
                }
                5
            }
            QWORD_PREFIX => 9,
            STRING_PREFIX => {
                let s = aml.get(off + 1..)?;
                let n = s.iter().position(|&b| b == 0)?;
                if name == b"_HID" {
                    let m = n.min(8);
                    dev.hid = [0; 8];
                    dev.hid[..m].copy_from_slice(&s[..m]);
                }
                n + 2
            }
            BUFFER_OP | PACKAGE_OP => {
                let (pkg, _) = pkg_length(aml, off + 1)?;
                if op == BUFFER_OP && name == b"_CRS" {
                    resources(aml.get(off + 1..off + 1 + pkg)?, dev);
                }
                1 + pkg
            }
            _ => return None,
        };
        Some(len)
    }

    /// Reads a resource template buffer (`body` starts at its PkgLength).
    fn resources(body: &[u8], dev: &mut Device) {
        let Some((_, pl)) = pkg_length(body, 0) else { return };
        // BufferSize is an integer object.
        let size_len = match u8_at(body, pl) {
            Some(BYTE_PREFIX) => 2,
            Some(WORD_PREFIX) => 3,
            Some(DWORD_PREFIX) => 5,
            Some(ZERO_OP | ONE_OP) => 1,
            _ => return,
        };
        let mut off = pl + size_len;
        while let Some(tag) = u8_at(body, off) {
            if tag & 0x80 == 0 {
                if tag >> 3 == END_TAG >> 3 {
                    return;
                }
                off += 1 + (tag & 7) as usize;
                continue;
            }
            let Some(len) = u16_at(body, off + 1) else { return };
            match tag {
                MEMORY32_FIXED if dev.memory.is_none() => {
                    if let (Some(base), Some(size)) = (u32_at(body, off + 4), u32_at(body, off + 8)) {
                        dev.memory = Some((base, size));
                    }
                }
                EXTENDED_IRQ if dev.interrupt.is_none() && u8_at(body, off + 4).unwrap_or(0) >= 1 => {
                    dev.interrupt = u32_at(body, off + 5);
                }
                _ => {}
            }
            off += 3 + len as usize;
        }
    }

    /// Walks a term list, calling `found` for each device; returns `None` where it
    /// met an object it does not know (what came before was reported).
    fn walk(aml: &[u8], found: &mut dyn FnMut(Device)) -> Option<()> {
        let mut off = 0;
        while off < aml.len() {
            match u8_at(aml, off)? {
                SCOPE_OP => {
                    let (pkg, pl) = pkg_length(aml, off + 1)?;
                    let end = off + 1 + pkg;
                    let (_, nl) = name_string(aml, off + 1 + pl)?;
                    walk(aml.get(off + 1 + pl + nl..end)?, found)?;
                    off = end;
                }
                EXT_OP_PREFIX if u8_at(aml, off + 1)? == DEVICE_OP => {
                    let (pkg, pl) = pkg_length(aml, off + 2)?;
                    let end = off + 2 + pkg;
                    let (name, nl) = name_string(aml, off + 2 + pl)?;
                    let body = aml.get(off + 2 + pl + nl..end)?;
                    let mut dev = Device { name, ..Device::default() };
                    // Objects inside the device: names (read), methods and nested
                    // devices or scopes (walked).
                    let mut b = 0;
                    while b < body.len() {
                        match u8_at(body, b)? {
                            NAME_OP => {
                                let (obj, nl) = name_string(body, b + 1)?;
                                b += 1 + nl;
                                b += data_object(body, b, &mut dev, &obj)?;
                            }
                            METHOD_OP => b += 1 + pkg_length(body, b + 1)?.0,
                            _ => {
                                walk(body.get(b..)?, found)?;
                                break;
                            }
                        }
                    }
                    found(dev);
                    off = end;
                }
                NAME_OP => {
                    let (obj, nl) = name_string(aml, off + 1)?;
                    off += 1 + nl;
                    off += data_object(aml, off, &mut Device::default(), &obj)?;
                }
                METHOD_OP => off += 1 + pkg_length(aml, off + 1)?.0,
                _ => return None,
            }
        }
        Some(())
    }

    /// Calls `found` for every device of `aml` (a DSDT's body, after its header);
    /// returns `false` if the reader stopped at an object it does not understand.
    pub fn devices(aml: &[u8], mut found: impl FnMut(Device)) -> bool {
        walk(aml, &mut found).is_some()
    }
}
