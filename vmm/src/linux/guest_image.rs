//! The test guest packaged as a bzImage, so that it boots through exactly the path a
//! Linux kernel takes (bzImage loader, zero page, e820, command line, initrd, ACPI)
//! on hosts where Linux itself cannot run.
//!
//! The guest is linked so that its image starts at 1 MiB with a 32-bit entry stub
//! (never used: the VMM enters in 64-bit mode) and has its 64-bit entry
//! `startup_64` at 1 MiB + 0x200, as a bzImage's decompressor has. Packaging is then
//! what Linux's `arch/x86/boot/tools/build` does: a boot sector and setup sector
//! holding the setup header (protocol 2.15, `XLF_KERNEL_64`, `init_size` covering
//! `.bss`, a `kernel_version` naming the test guest), followed by the image from
//! 1 MiB up, flat, as the protected-mode payload.

use guest_abi::linux::{self as abi, zero_page as zp};
use guest_abi::{KERNEL_MIN_GPA, PAGE_SIZE};

/// Setup sectors after the boot sector (the header and the version string fit in one).
const SETUP_SECTS: u8 = 1;
/// Where the version string lies in the setup area (offset from the file's start).
const VERSION_AT: usize = 0x300;

/// Why the ELF cannot be packaged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PackError {
    /// Not an ELF with loadable segments starting at 1 MiB.
    #[error("the test guest ELF cannot be packaged as a bzImage: {0}")]
    Layout(&'static str),
}

/// The bzImage of the test guest ELF `elf`.
pub fn bzimage(elf: &[u8]) -> Result<Vec<u8>, PackError> {
    let segments = segments(elf)?;
    let start = segments.iter().map(|s| s.paddr).min().ok_or(PackError::Layout("no loadable segment"))?;
    if start != KERNEL_MIN_GPA {
        return Err(PackError::Layout("the image does not start at 1 MiB"));
    }
    let file_end = segments.iter().map(|s| s.paddr + s.filesz).max().unwrap_or(start);
    let mem_end = segments.iter().map(|s| s.paddr + s.memsz).max().unwrap_or(start);
    let mut payload = vec![0u8; (file_end - start) as usize];
    for s in &segments {
        let at = (s.paddr - start) as usize;
        payload[at..at + s.filesz as usize].copy_from_slice(&elf[s.offset as usize..(s.offset + s.filesz) as usize]);
    }
    let setup_len = (SETUP_SECTS as usize + 1) * 512;
    let mut image = vec![0u8; setup_len];
    let put = |img: &mut Vec<u8>, off: usize, bytes: &[u8]| img[off..off + bytes.len()].copy_from_slice(bytes);
    put(&mut image, zp::SETUP_HEADER, &[SETUP_SECTS]);
    put(&mut image, zp::BOOT_FLAG, &abi::BOOT_FLAG.to_le_bytes());
    // jump: a short jump over the header, as real setup code starts with.
    put(&mut image, 0x200, &[0xeb, (0x26c - 0x202) as u8]);
    put(&mut image, zp::HEADER, &abi::HDRS_MAGIC.to_le_bytes());
    put(&mut image, zp::VERSION, &0x020fu16.to_le_bytes());
    put(&mut image, zp::KERNEL_VERSION, &((VERSION_AT - 0x200) as u16).to_le_bytes());
    put(&mut image, zp::LOADFLAGS, &[abi::LOADED_HIGH]);
    put(&mut image, zp::CODE32_START, &(start as u32).to_le_bytes());
    put(&mut image, zp::INITRD_ADDR_MAX, &0x7fff_ffffu32.to_le_bytes());
    put(&mut image, zp::KERNEL_ALIGNMENT, &(PAGE_SIZE as u32).to_le_bytes());
    put(&mut image, zp::XLOADFLAGS, &abi::XLF_KERNEL_64.to_le_bytes());
    put(&mut image, zp::CMDLINE_SIZE, &(abi::TEST_GUEST_CMDLINE_MAX as u32).to_le_bytes());
    put(&mut image, zp::PREF_ADDRESS, &start.to_le_bytes());
    let init_size = (mem_end - start).next_multiple_of(PAGE_SIZE);
    put(&mut image, zp::INIT_SIZE, &(init_size as u32).to_le_bytes());
    // syssize: the payload in 16-byte paragraphs.
    put(&mut image, 0x1f4, &(payload.len().div_ceil(16) as u32).to_le_bytes());
    let version = format!("{}{} (vmm test guest)\0", abi::TEST_GUEST_VERSION_PREFIX, env!("CARGO_PKG_VERSION"));
    put(&mut image, VERSION_AT, version.as_bytes());
    image.extend_from_slice(&payload);
    Ok(image)
}

/// A loadable segment.
struct Segment {
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// The loadable segments of a 64-bit ELF, each within the file.
fn segments(elf: &[u8]) -> Result<Vec<Segment>, PackError> {
    let bad = PackError::Layout("not a 64-bit ELF with sound program headers");
    if !elf.starts_with(b"\x7fELF") {
        return Err(bad);
    }
    let phoff = abi::u64_at(elf, 32).ok_or(PackError::Layout("cut short"))? as usize;
    let phnum = abi::u16_at(elf, 56).ok_or(PackError::Layout("cut short"))? as usize;
    let mut out = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * 56;
        if abi::u32_at(elf, ph) != Some(1) {
            continue;
        }
        let field = |o: usize| abi::u64_at(elf, ph + o).ok_or(PackError::Layout("cut short"));
        let s = Segment { offset: field(8)?, paddr: field(24)?, filesz: field(32)?, memsz: field(40)? };
        if s.offset.checked_add(s.filesz).is_none_or(|e| e > elf.len() as u64) || s.filesz > s.memsz {
            return Err(PackError::Layout("a segment lies outside the file"));
        }
        out.push(s);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use linux_loader::loader::{BzImage, KernelLoader};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::loader::BUILTIN_GUEST;

    #[test]
    fn linux_loader_loads_the_packaged_guest_like_a_bzimage() {
        let image = bzimage(BUILTIN_GUEST).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let r = BzImage::load(&mem, None, &mut Cursor::new(&image), None).unwrap();
        let hdr = r.setup_header.unwrap();
        assert_eq!(r.kernel_load, GuestAddress(KERNEL_MIN_GPA));
        let (version, xload, magic) = (hdr.version, hdr.xloadflags, hdr.header);
        assert_eq!((version, xload & 1, magic), (0x020f, 1, abi::HDRS_MAGIC));
        // The payload is the ELF's first segment at 1 MiB, byte for byte.
        let first: u64 = mem.read_obj(GuestAddress(KERNEL_MIN_GPA + ENTRY_PROBE)).unwrap();
        assert_eq!(first.to_le_bytes(), image[1024 + ENTRY_PROBE as usize..1024 + ENTRY_PROBE as usize + 8]);
        let init_size = hdr.init_size as u64;
        let bss_end = segments(BUILTIN_GUEST).unwrap().iter().map(|s| s.paddr + s.memsz).max().unwrap();
        assert!(KERNEL_MIN_GPA + init_size >= bss_end, "init_size covers .bss");
        assert!(r.kernel_end <= KERNEL_MIN_GPA + init_size);
    }

    /// The 64-bit entry's offset: its bytes are in the payload.
    const ENTRY_PROBE: u64 = abi::ENTRY_64_OFFSET;

    #[test]
    fn an_elf_not_at_1_mib_is_refused() {
        assert!(bzimage(b"not an elf").is_err());
        let mut elf = BUILTIN_GUEST.to_vec();
        let phoff = abi::u64_at(&elf, 32).unwrap() as usize;
        for i in 0..abi::u16_at(&elf, 56).unwrap() as usize {
            let at = phoff + i * 56 + 24;
            let paddr = abi::u64_at(&elf, at).unwrap();
            elf[at..at + 8].copy_from_slice(&(paddr + 0x1000).to_le_bytes());
        }
        assert_eq!(bzimage(&elf).unwrap_err(), PackError::Layout("the image does not start at 1 MiB"));
    }
}
