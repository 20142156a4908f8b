//! The contract between the VMM and the project's test guest (`guest-balloon`).
//!
//! Both sides compile this crate: the VMM (std, host target) writes these structures
//! into guest RAM before the first instruction and reads the control page while the
//! guest runs; the guest (`no_std`, `x86_64-unknown-none`) reads them through the
//! identity mapping the VMM built. Everything is `#[repr(C)]`, little-endian, and
//! versioned by [`BOOT_INFO_VERSION`].
//!
//! Guest-physical layout (the VMM maps guest RAM and the MMIO hole 1:1, VA == GPA):
//!
//! | GPA                 | what                                                   |
//! |---------------------|--------------------------------------------------------|
//! | `0x0500`            | GDT (null, null, 64-bit code `0x10`, data `0x18`)       |
//! | `0x1000..0x3000`    | [`BootInfo`] (pointer also passed in `rdi`)            |
//! | `0x3000..0x4000`    | [`ControlPage`]                                         |
//! | `0x8000 + cpu*4K`   | PVM VIF area of each vCPU (only used on PVM hosts)      |
//! | `0x40000..`         | page tables built by the VMM                            |
//! | `0x100000..`        | the guest kernel image; free RAM starts at `kernel_end` |
//! | `3 GiB..4 GiB`      | MMIO hole (devices); RAM above 3 GiB continues at 4 GiB |
//!
//! Three modules hold what both sides must compute or read identically: [`workload`],
//! the parser of the guest's workload language (the VMM validates a workload before
//! it boots), [`content`], the content of every page the workload writes, and
//! [`step`], the result line the guest prints for each step.
#![no_std]

pub mod content;
pub mod linux;
pub mod step;
pub mod workload;

/// GPA of the GDT the VMM installs.
pub const GDT_GPA: u64 = 0x500;
/// GDT selector of the 64-bit code segment.
pub const CODE_SELECTOR: u16 = 0x10;
/// GDT selector of the data segment.
pub const DATA_SELECTOR: u16 = 0x18;
/// GPA of [`BootInfo`].
pub const BOOT_INFO_GPA: u64 = 0x1000;
/// GPA of [`ControlPage`].
pub const CONTROL_PAGE_GPA: u64 = 0x3000;
/// GPA of the VIF area of vCPU 0; vCPU `n` uses `VIF_BASE_GPA + n * 4096`.
pub const VIF_BASE_GPA: u64 = 0x8000;
/// Upper bound on vCPUs per VM (VIF areas must fit below [`PAGE_TABLES_GPA`]).
pub const MAX_VCPUS: u32 = 32;
/// GPA where the VMM builds the guest page tables.
pub const PAGE_TABLES_GPA: u64 = 0x40000;
/// Lowest GPA a guest kernel image may be loaded at.
pub const KERNEL_MIN_GPA: u64 = 0x10_0000;
/// Start of the MMIO hole; RAM beyond this size continues at [`MMIO_HOLE_END`].
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// GPA of the virtio-mmio window of the balloon (4 KiB, in the MMIO hole).
pub const BALLOON_MMIO_BASE: u64 = 0xD000_0000;
/// Guest page size used by every interface (PFNs are in these units).
pub const PAGE_SIZE: u64 = 4096;

/// COM1: a 16550 UART. The test guest writes whole lines with `rep outsb`
/// (one exit per line instead of one per byte).
pub const SERIAL_PORT: u16 = 0x3f8;
/// Longest line the test guest prints, newline included: each line is one JSON
/// object, built in a buffer of this size.
pub const CONSOLE_LINE_MAX: usize = 512;
/// `out` of a 32-bit value ends the VM; the value is the exit code of `vmm run`.
pub const EXIT_PORT: u16 = 0x501;
/// The first thing the test guest does: one `out` here, so the VMM can time the
/// first guest instruction.
pub const BOOT_MARKER_PORT: u16 = 0x502;
/// `out` here wakes every halted vCPU of the VM (the guest's way to hand work to
/// sleeping application processors without an interrupt controller).
pub const KICK_PORT: u16 = 0x503;

/// Exit codes the test guest uses for its own failures (workload codes are 0..=255).
pub mod exit_code {
    /// The boot information was missing or of another version.
    pub const BAD_BOOT_INFO: u32 = 0x100;
    /// The workload did not parse.
    pub const BAD_WORKLOAD: u32 = 0x101;
    /// A CPU exception (vector in the low byte).
    pub const EXCEPTION_BASE: u32 = 0x200;
    /// Rust panic inside the guest.
    pub const PANIC: u32 = 0x300;
}

/// Magic value of [`BootInfo::magic`]: "BALLOON1".
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"BALLOON1");
/// Layout version of [`BootInfo`] and [`ControlPage`].
pub const BOOT_INFO_VERSION: u32 = 1;
/// Maximum number of RAM regions in [`BootInfo::mem`].
pub const MAX_MEM_REGIONS: usize = 4;
/// Capacity of [`BootInfo::cmdline`] (the boot workload).
pub const CMDLINE_MAX: usize = 6144;

/// Which KVM backend the guest runs on; decides how interrupts would be enabled.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Hardware virtualisation (VMX or SVM).
    Hardware = 0,
    /// The PVM backend (no VMX; VIF area instead of RFLAGS.IF).
    Pvm = 1,
}

/// One range of guest RAM.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemRegion {
    /// First guest-physical address.
    pub base: u64,
    /// Length in bytes (a multiple of [`PAGE_SIZE`]).
    pub size: u64,
}

/// What the VMM tells the guest at boot. Written at [`BOOT_INFO_GPA`]; `rdi` holds
/// its address and `rsi` the vCPU index when each vCPU starts.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`BOOT_INFO_VERSION`].
    pub version: u32,
    /// Number of vCPUs started (all enter the kernel entry point at once).
    pub vcpus: u32,
    /// A [`Backend`] value.
    pub backend: u32,
    /// Index of this VM in its host process (0-based).
    pub vm_index: u32,
    /// TSC frequency in kHz (from `KVM_GET_TSC_KHZ`); 0 if unknown.
    pub tsc_khz: u64,
    /// Seed for `unique` page contents, different per VM and per run.
    pub vm_seed: u64,
    /// First free guest-physical address after the kernel image (page aligned).
    pub kernel_end: u64,
    /// GPA of the [`ControlPage`].
    pub control_page: u64,
    /// Number of valid entries in [`BootInfo::mem`].
    pub nr_mem: u32,
    /// Length of the boot workload in [`BootInfo::cmdline`].
    pub cmdline_len: u32,
    /// Guest RAM ranges, ascending.
    pub mem: [MemRegion; MAX_MEM_REGIONS],
    /// GPA of the virtio-mmio window of the balloon device (0: no balloon).
    pub balloon_mmio: u64,
    /// Reserved for later devices.
    pub reserved: [u64; 31],
    /// The boot workload (UTF-8, not NUL-terminated).
    pub cmdline: [u8; CMDLINE_MAX],
}

impl BootInfo {
    /// The boot workload as bytes.
    pub fn cmdline(&self) -> &[u8] {
        let len = (self.cmdline_len as usize).min(CMDLINE_MAX);
        &self.cmdline[..len]
    }

    /// The valid RAM regions.
    pub fn mem_regions(&self) -> &[MemRegion] {
        &self.mem[..(self.nr_mem as usize).min(MAX_MEM_REGIONS)]
    }
}

/// Magic value of [`ControlPage::magic`]: "CTRL".
pub const CONTROL_MAGIC: u32 = u32::from_le_bytes(*b"CTRL");
/// Capacity of [`ControlPage::cmd`].
pub const CONTROL_CMD_MAX: usize = 3968;

/// Guest states published in [`ControlPage::state`].
pub mod guest_state {
    /// Not started yet (the VMM zeroes the page).
    pub const BOOTING: u32 = 0;
    /// Running its boot workload.
    pub const RUNNING: u32 = 1;
    /// Boot workload done; polling for run-time commands.
    pub const SERVING: u32 = 2;
    /// About to leave through [`super::EXIT_PORT`].
    pub const EXITING: u32 = 3;
}

/// A page of guest RAM shared by the VMM and the guest for run-time commands
/// without exits: the VMM writes `cmd`, `cmd_len`, then increments `cmd_seq`
/// (release); the guest, once serving, polls `cmd_seq`, runs the command with the
/// workload interpreter (printing its JSON lines as usual), stores `cmd_status`,
/// then sets `ack_seq = cmd_seq` (release). The guest bumps `heartbeat` while it
/// makes progress so the VMM can tell a busy guest from a hung one.
///
/// Access every field with volatile or atomic operations: the other side changes
/// them concurrently.
#[repr(C)]
pub struct ControlPage {
    /// [`CONTROL_MAGIC`], written by the VMM.
    pub magic: u32,
    /// Sequence number of the latest command (VMM writes).
    pub cmd_seq: u32,
    /// Sequence number of the latest finished command (guest writes).
    pub ack_seq: u32,
    /// 0 if every step of the latest finished command succeeded, else 1.
    pub cmd_status: u32,
    /// Length of `cmd` in bytes (VMM writes).
    pub cmd_len: u32,
    /// One of [`guest_state`] (guest writes).
    pub state: u32,
    /// Incremented by the guest as it makes progress.
    pub heartbeat: u64,
    /// Number of workload steps the guest has finished.
    pub steps_done: u64,
    /// Guest pages currently allocated by the workload.
    pub allocated_pages: u64,
    /// Guest pages free in the guest's allocator.
    pub free_pages: u64,
    /// Reserved for later use.
    pub reserved: [u64; 9],
    /// The command text (the workload language).
    pub cmd: [u8; CONTROL_CMD_MAX],
}

const _: () = assert!(core::mem::size_of::<ControlPage>() <= PAGE_SIZE as usize);
const _: () = assert!(core::mem::size_of::<BootInfo>() <= (CONTROL_PAGE_GPA - BOOT_INFO_GPA) as usize);
const _: () = assert!(VIF_BASE_GPA + MAX_VCPUS as u64 * PAGE_SIZE <= PAGE_TABLES_GPA);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_stable() {
        assert_eq!(core::mem::offset_of!(ControlPage, cmd), 128);
        assert_eq!(core::mem::offset_of!(BootInfo, mem), 64);
        assert_eq!(core::mem::size_of::<ControlPage>(), 4096);
    }
}
