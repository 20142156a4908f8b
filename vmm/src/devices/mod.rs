//! Emulated devices and the buses the vCPU exits are dispatched on.
//!
//! [`bus`] routes exits to devices. Port I/O: the 16550 console ([`serial`]) and the VMM's own ports ([`system`]:
//! guest exit, boot marker, vCPU wake-up). MMIO, in the hole below 4 GiB: the virtio
//! balloon ([`virtio`]). Guests booted through the Linux protocol also get the PC
//! devices of [`legacy`] (i8042 reset, CMOS clock, exit register). [`guest_errors`]
//! counts what guests do wrong and rate-limits its logging.

pub mod bus;
pub mod guest_errors;
pub mod legacy;
pub mod serial;
pub mod system;
pub mod virtio;
