//! KVM's binary statistics (`KVM_GET_STATS_FD`) of a vCPU: exit counts and, on
//! PVM, `insn_emulation`, which tells a natively running guest (tens) from one that
//! KVM emulates instruction by instruction (millions).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_ioctls::VcpuFd;
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);

/// The vCPU counters the summaries report; other counters are kept too.
pub const REPORTED: [&str; 6] = ["exits", "insn_emulation", "io_exits", "mmio_exits", "halt_exits", "signal_exits"];

/// Reads every statistic of `vcpu` (first value of each) by name.
pub fn read_vcpu_stats(vcpu: &VcpuFd) -> std::io::Result<BTreeMap<String, u64>> {
    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1.
    let fd = unsafe { ioctl(vcpu, KVM_GET_STATS_FD()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned to us and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    debug_assert!(file.as_raw_fd() >= 0);
    parse(&file)
}

fn parse(file: &File) -> std::io::Result<BTreeMap<String, u64>> {
    let mut header = [0u8; 24];
    file.read_exact_at(&mut header, 0)?;
    let word = |b: &[u8], i: usize| u32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().unwrap()) as u64;
    let (name_size, num_desc, desc_offset, data_offset) =
        (word(&header, 1), word(&header, 2), word(&header, 4), word(&header, 5));
    let desc_size = 16 + name_size;
    let mut descs = vec![0u8; (desc_size * num_desc) as usize];
    file.read_exact_at(&mut descs, desc_offset)?;
    let mut stats = BTreeMap::new();
    for d in descs.chunks_exact(desc_size as usize) {
        let offset = word(d, 2);
        let name = &d[16..];
        let name = String::from_utf8_lossy(&name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())]);
        let mut value = [0u8; 8];
        file.read_exact_at(&mut value, data_offset + offset)?;
        stats.insert(name.into_owned(), u64::from_le_bytes(value));
    }
    Ok(stats)
}
