//! Emulated devices and the buses the vCPU exits are dispatched on.
//!
//! [`bus`] routes exits to devices. Port I/O: the 16550 console ([`serial`]) and the VMM's own ports ([`system`]:
//! guest exit, boot marker, vCPU wake-up). MMIO, in the hole below 4 GiB: the virtio
//! balloon ([`virtio`]).

pub mod bus;
pub mod serial;
pub mod system;
pub mod virtio;
