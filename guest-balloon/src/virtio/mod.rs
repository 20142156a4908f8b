//! The driver side of virtio over MMIO (virtio 1.x, register layout version 2):
//! the transport's registers ([`mmio`]) and split virtqueues in guest memory
//! ([`queue`]).
//!
//! There is no interrupt controller: the driver polls its used rings, which are
//! plain memory (no exit). Only register accesses exit (~50 us each on PVM): the
//! setup, one notification per batch of buffers, and configuration reads.

pub mod mmio;
pub mod queue;
