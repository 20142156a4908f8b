//! Which kind of kernel a file holds, recognised from its bytes before anything is
//! loaded: the VMM's own ELF protocol (the test guest, hand-made kernels), a Linux
//! `vmlinux` ELF, or a bzImage (Linux, or the test guest packaged as one).
//!
//! A vmlinux is told from an ELF of the VMM's protocol by its link addresses: Linux
//! links its segments at virtual addresses in the top half of the address space
//! (`0xffffffff81000000`) and at physical addresses for the loader, while the VMM's
//! protocol is identity-mapped (virtual == physical). A bzImage has the `HdrS` setup
//! header at 0x202. The VMM recognises its own test guest among bzImages by the
//! `kernel_version` string of its setup header.

use guest_abi::linux::{self as abi, zero_page as zp};

/// What a kernel file is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelKind {
    /// An x86-64 ELF of the VMM's own boot protocol (identity-mapped, entered with
    /// `rdi` = boot information): the test guest's usual form.
    VmmElf,
    /// A Linux `vmlinux`: entered at its ELF entry point with a zero page.
    LinuxElf,
    /// A bzImage: its 64-bit entry is at the load address + 0x200.
    BzImage(BzImageHeader),
}

impl KernelKind {
    /// Whether it boots through Linux's boot protocol.
    pub fn is_linux_protocol(&self) -> bool {
        !matches!(self, KernelKind::VmmElf)
    }

    /// Whether it is a Linux kernel (not the project's test guest): it needs the
    /// in-kernel interrupt controller, and hardware virtualisation to run at all.
    pub fn is_linux(&self) -> bool {
        match self {
            KernelKind::VmmElf => false,
            KernelKind::LinuxElf => true,
            KernelKind::BzImage(h) => !h.test_guest,
        }
    }

    /// The test guest packaged as a bzImage.
    pub fn is_test_guest_bzimage(&self) -> bool {
        matches!(self, KernelKind::BzImage(h) if h.test_guest)
    }
}

/// What the VMM uses of a bzImage's setup header (validated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BzImageHeader {
    /// Boot protocol version (`0x020f` is 2.15).
    pub version: u16,
    /// Longest command line the kernel takes, without its NUL.
    pub cmdline_size: u32,
    /// Highest address the initrd may end at, plus one.
    pub initrd_addr_max: u32,
    /// Memory the kernel needs from its load address while it starts.
    pub init_size: u32,
    /// The `kernel_version` string (empty if none).
    pub kernel_version: String,
    /// The string names the project's test guest.
    pub test_guest: bool,
}

/// Why a file is not a kernel the VMM boots.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KindError {
    /// Neither ELF nor bzImage.
    #[error("not a kernel this VMM boots: neither an x86-64 ELF (no ELF magic) nor a bzImage (no \"HdrS\" setup header at 0x202)")]
    Unknown,
    /// A bzImage too old for a 64-bit entry.
    #[error("bzImage boot protocol {major}.{minor:02} is older than 2.12, the first with a 64-bit entry")]
    OldProtocol {
        /// Major version.
        major: u8,
        /// Minor version.
        minor: u8,
    },
    /// A bzImage without a 64-bit entry.
    #[error("the bzImage has no 64-bit entry point (XLF_KERNEL_64 is not set in its xloadflags): a 32-bit kernel")]
    Not64Bit,
    /// A bzImage whose header is cut short.
    #[error("the bzImage is cut short ({0} bytes, shorter than its setup header)")]
    Truncated(usize),
}

/// Recognises the kind of `image`.
pub fn recognise(image: &[u8]) -> Result<KernelKind, KindError> {
    if image.starts_with(b"\x7fELF") {
        return Ok(if elf_is_vmlinux(image) { KernelKind::LinuxElf } else { KernelKind::VmmElf });
    }
    if abi::u32_at(image, zp::HEADER) != Some(abi::HDRS_MAGIC) {
        return Err(KindError::Unknown);
    }
    let short = || KindError::Truncated(image.len());
    let version = abi::u16_at(image, zp::VERSION).ok_or_else(short)?;
    if version < 0x020c {
        return Err(KindError::OldProtocol { major: (version >> 8) as u8, minor: version as u8 });
    }
    let xloadflags = abi::u16_at(image, zp::XLOADFLAGS).ok_or_else(short)?;
    if xloadflags & abi::XLF_KERNEL_64 == 0 {
        return Err(KindError::Not64Bit);
    }
    let kernel_version = kernel_version(image);
    Ok(KernelKind::BzImage(BzImageHeader {
        version,
        cmdline_size: abi::u32_at(image, zp::CMDLINE_SIZE).ok_or_else(short)?,
        initrd_addr_max: abi::u32_at(image, zp::INITRD_ADDR_MAX).ok_or_else(short)?,
        init_size: abi::u32_at(image, zp::INIT_SIZE).ok_or_else(short)?,
        test_guest: kernel_version.starts_with(abi::TEST_GUEST_VERSION_PREFIX),
        kernel_version,
    }))
}

/// The NUL-terminated `kernel_version` string (at 0x200 + the header's offset).
fn kernel_version(image: &[u8]) -> String {
    let Some(off) = abi::u16_at(image, zp::KERNEL_VERSION).filter(|&o| o != 0) else {
        return String::new();
    };
    let start = 0x200 + off as usize;
    let bytes = image.get(start..).unwrap_or(&[]);
    let end = bytes.iter().take(256).position(|&b| b == 0).unwrap_or(0);
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Whether a 64-bit ELF has a loadable segment linked in the top half of the
/// address space (Linux's kernel mapping) rather than identity-mapped.
fn elf_is_vmlinux(image: &[u8]) -> bool {
    const PT_LOAD: u32 = 1;
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (abi::u64_at(image, 32), abi::u16_at(image, 54), abi::u16_at(image, 56))
    else {
        return false;
    };
    (0..phnum as usize).any(|i| {
        let ph = (phoff as usize).saturating_add(i * phentsize as usize);
        abi::u32_at(image, ph) == Some(PT_LOAD)
            && abi::u64_at(image, ph + 16).is_some_and(|v| v >= 0xffff_8000_0000_0000)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linux::guest_image;
    use crate::loader::BUILTIN_GUEST;

    #[test]
    fn the_test_guest_is_recognised_in_both_forms() {
        assert_eq!(recognise(BUILTIN_GUEST).unwrap(), KernelKind::VmmElf);
        let kind = recognise(&guest_image::bzimage(BUILTIN_GUEST).unwrap()).unwrap();
        assert!(kind.is_test_guest_bzimage() && kind.is_linux_protocol() && !kind.is_linux(), "{kind:?}");
    }

    #[test]
    fn a_vmlinux_is_told_from_the_vmm_protocol_by_its_link_address() {
        let mut elf = BUILTIN_GUEST.to_vec();
        let phoff = abi::u64_at(&elf, 32).unwrap() as usize;
        // First program header's p_vaddr moved to Linux's kernel mapping.
        let first_load = (0..abi::u16_at(&elf, 56).unwrap() as usize)
            .map(|i| phoff + i * 56)
            .find(|&ph| abi::u32_at(&elf, ph) == Some(1))
            .unwrap();
        elf[first_load + 16..first_load + 24].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes());
        assert_eq!(recognise(&elf).unwrap(), KernelKind::LinuxElf);
        assert!(KernelKind::LinuxElf.is_linux());
    }

    /// A bzImage header of `version` with `xloadflags`.
    fn header(version: u16, xloadflags: u16) -> Vec<u8> {
        let mut img = vec![0u8; 0x400];
        img[zp::HEADER..zp::HEADER + 4].copy_from_slice(b"HdrS");
        img[zp::VERSION..zp::VERSION + 2].copy_from_slice(&version.to_le_bytes());
        img[zp::XLOADFLAGS..zp::XLOADFLAGS + 2].copy_from_slice(&xloadflags.to_le_bytes());
        img[zp::KERNEL_VERSION..zp::KERNEL_VERSION + 2].copy_from_slice(&0x100u16.to_le_bytes());
        img[0x300..0x306].copy_from_slice(b"6.1.0\0");
        img
    }

    #[test]
    fn bzimages_are_checked_with_one_line_errors() {
        let KernelKind::BzImage(h) = recognise(&header(0x020f, 1)).unwrap() else { panic!("not a bzImage") };
        assert_eq!((h.version, h.kernel_version.as_str(), h.test_guest), (0x020f, "6.1.0", false));
        let old = recognise(&header(0x020b, 1)).unwrap_err();
        assert_eq!(old, KindError::OldProtocol { major: 2, minor: 11 });
        assert_eq!(old.to_string(), "bzImage boot protocol 2.11 is older than 2.12, the first with a 64-bit entry");
        assert_eq!(recognise(&header(0x020f, 0)).unwrap_err(), KindError::Not64Bit);
        assert_eq!(recognise(&header(0x020f, 1)[..0x237]).unwrap_err(), KindError::Truncated(0x237));
        let unknown = recognise(b"#!/bin/sh\necho hi\n").unwrap_err();
        assert!(!unknown.to_string().contains('\n') && unknown.to_string().contains("not a kernel"));
    }
}
