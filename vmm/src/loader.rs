//! Loading the guest kernel: the embedded test guest or an ELF file.
//!
//! linux-loader copies the `PT_LOAD` segments; this module first checks what it does
//! not (64-bit, x86-64, segments inside guest RAM and clear of the VMM's low
//! memory) so a wrong file gets a one-line error instead of a guest that crashes.

use std::io::Cursor;
use std::path::Path;

use guest_abi::{KERNEL_MIN_GPA, PAGE_SIZE};
use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::GuestMemoryMmap;

use crate::config::Kernel;

/// The test guest built by build.rs from guest-balloon/.
pub static BUILTIN_GUEST: &[u8] = include_bytes!(env!("VMM_BUILTIN_GUEST"));

/// What the loader found.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// Entry point (guest virtual == guest physical).
    pub entry: u64,
    /// First page after the image, `.bss` included.
    pub end: u64,
}

/// Reads the kernel's bytes.
pub fn kernel_bytes(kernel: &Kernel) -> Result<Vec<u8>, String> {
    match kernel {
        Kernel::Builtin => Ok(BUILTIN_GUEST.to_vec()),
        Kernel::BuiltinBzImage => crate::linux::guest_image::bzimage(BUILTIN_GUEST).map_err(|e| e.to_string()),
        Kernel::Path(p) => read_file(p),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read kernel {}: {e}", path.display()))
}

/// Validates `image` and copies it into guest memory whose RAM ends at `ram_end`
/// (segments must lie in the first RAM region).
pub fn load(mem: &GuestMemoryMmap, image: &[u8], ram_end: u64) -> Result<LoadedKernel, String> {
    let segments = check_elf(image)?;
    let mut end = 0;
    for (paddr, memsz) in segments {
        let seg_end = paddr.checked_add(memsz).ok_or("ELF segment size overflows")?;
        if paddr < KERNEL_MIN_GPA {
            return Err(format!(
                "ELF segment at {paddr:#x} overlaps the VMM's low memory (kernels load at {KERNEL_MIN_GPA:#x} or above)"
            ));
        }
        if seg_end > ram_end {
            return Err(format!("ELF segment {paddr:#x}..{seg_end:#x} does not fit in guest RAM ({ram_end:#x} bytes)"));
        }
        end = end.max(seg_end);
    }
    let result =
        Elf::load(mem, None, &mut Cursor::new(image), None).map_err(|e| format!("loading the ELF kernel: {e}"))?;
    Ok(LoadedKernel { entry: result.kernel_load.0, end: end.next_multiple_of(PAGE_SIZE) })
}

const PT_LOAD: u32 = 1;
const EM_X86_64: u16 = 62;

/// Checks the ELF header; returns `(p_paddr, p_memsz)` of every loadable segment.
fn check_elf(image: &[u8]) -> Result<Vec<(u64, u64)>, String> {
    const NOT_X86: &str = "not an x86-64 ELF executable";
    if image.len() < 64 || &image[..4] != b"\x7fELF" {
        return Err(format!("{NOT_X86} (no ELF magic)"));
    }
    if image[4] != 2 || image[5] != 1 {
        return Err(format!("{NOT_X86} (not a 64-bit little-endian ELF)"));
    }
    let u16_at = |o: usize| u16::from_le_bytes([image[o], image[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(image[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(image[o..o + 8].try_into().unwrap());
    let machine = u16_at(18);
    if machine != EM_X86_64 {
        return Err(format!("{NOT_X86} (machine {machine})"));
    }
    let (phoff, phentsize, phnum) = (u64_at(32) as usize, u16_at(54) as usize, u16_at(56) as usize);
    if phentsize != 56 || phoff.checked_add(phnum * 56).is_none_or(|e| e > image.len()) {
        return Err(format!("{NOT_X86} (bad program headers)"));
    }
    let mut segments = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * 56;
        if u32_at(ph) != PT_LOAD {
            continue;
        }
        let (offset, paddr, filesz, memsz) = (u64_at(ph + 8), u64_at(ph + 24), u64_at(ph + 32), u64_at(ph + 40));
        if offset.checked_add(filesz).is_none_or(|e| e > image.len() as u64) || filesz > memsz {
            return Err(format!("{NOT_X86} (segment {i} lies outside the file)"));
        }
        segments.push((paddr, memsz));
    }
    if segments.is_empty() {
        return Err(format!("{NOT_X86} (no loadable segment)"));
    }
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_guest_is_a_loadable_elf() {
        let segments = check_elf(BUILTIN_GUEST).unwrap();
        assert!(segments.iter().all(|&(p, _)| p >= KERNEL_MIN_GPA));
    }

    #[test]
    fn garbage_is_rejected_clearly() {
        assert!(check_elf(b"#!/bin/sh\necho hi\n").unwrap_err().contains("not an x86-64 ELF"));
        let mut arm = BUILTIN_GUEST.to_vec();
        arm[18] = 183; // EM_AARCH64
        assert!(check_elf(&arm).unwrap_err().contains("machine 183"));
        let mut truncated = BUILTIN_GUEST.to_vec();
        truncated.truncate(200);
        assert!(check_elf(&truncated).is_err());
    }
}
