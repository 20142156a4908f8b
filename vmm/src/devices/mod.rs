//! Emulated devices and the buses the vCPU exits are dispatched on.
//!
//! [`bus`] routes exits to devices. Port I/O: the 16550 console ([`serial`]) and the VMM's own ports ([`system`]:
//! guest exit, boot marker, vCPU wake-up). MMIO devices (virtio) join later on the
//! MMIO hole.

pub mod bus;
pub mod serial;
pub mod system;
pub mod virtio;
