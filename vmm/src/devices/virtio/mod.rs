//! virtio devices: the device model shared by every device type, the virtio-mmio
//! transport ([`mmio`]), the worker thread that serves queue notifications
//! ([`worker`]) and the devices themselves ([`balloon`]).
//!
//! Notifications arrive through `KVM_IOEVENTFD` (a queue kick does not exit to
//! userspace, which matters when an exit costs ~50 us). The test guest has no
//! interrupt controller: the device records interrupt causes in `InterruptStatus`
//! and the guest polls its used rings. A Linux guest has KVM's in-kernel irqchip:
//! there the device also signals an irqfd after recording the cause (used buffers,
//! or a configuration change such as a new balloon target), and the driver reads
//! `InterruptStatus` and acknowledges through `InterruptACK`.
//!
//! Everything a guest writes is untrusted: [`virtqueue`] holds rings and chains to
//! the spec's rules, devices do a bounded slice of work per call and say whether more
//! is left ([`Work`]), the worker yields between slices, and guest errors are counted
//! and rate-limited ([`crate::devices::guest_errors`]). docs/security.md has the
//! threat model.

pub mod balloon;
#[cfg(test)]
mod fuzz;
pub mod mmio;
#[cfg(test)]
pub(crate) mod testing;
pub mod virtqueue;
pub mod worker;

use std::sync::atomic::{AtomicU32, Ordering};

pub use virtqueue::Virtqueue;
use vmm_sys_util::eventfd::EventFd;

/// virtio 1.x feature bit: the device conforms to version 1.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// `InterruptStatus` bit: a queue has new used buffers.
pub const INT_VRING: u32 = 1;
/// `InterruptStatus` bit: the configuration changed (or the device needs a reset).
pub const INT_CONFIG: u32 = 2;

/// What is left after one bounded slice of a queue's work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    /// The queue holds nothing more to do.
    Done,
    /// The slice ended at a bound with chains still available: call again.
    More,
}

/// Why a device refuses to start with the queues the driver set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActivateError {
    /// A queue the device cannot work without is not ready.
    #[error("queue {0} must be set up and ready")]
    QueueNotReady(usize),
    /// The transport offered a number of queues the features do not give.
    #[error("{got} queues for {want} roles")]
    QueueCount {
        /// Queues handed over.
        got: usize,
        /// Queues the negotiated features call for.
        want: usize,
    },
}

/// What a device type implements; the transport does the rest.
pub trait VirtioDevice: Send {
    /// virtio device ID (5 for the balloon).
    fn device_id(&self) -> u32;
    /// Features the device offers.
    fn features(&self) -> u64;
    /// Number of queues for the negotiated `features` (numbered densely: a queue
    /// whose feature is not negotiated is skipped, as real drivers do).
    fn queue_count(&self, features: u64) -> usize;
    /// Largest queue size the device accepts.
    fn queue_max_size(&self) -> u16;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start using `queues` (checked by the transport;
    /// `None` where the driver did not make a queue ready) with `features`.
    fn activate(&mut self, features: u64, queues: Vec<Option<Virtqueue>>) -> Result<(), ActivateError>;
    /// The driver reset the device: drop the queues, keep host-side state that must
    /// survive (e.g. which pages are ballooned), and clear [`VirtioDevice::needs_reset`].
    fn reset(&mut self);
    /// Serves queue `index` for one bounded slice (see docs/balloon.md, "Bounds").
    fn process_queue(&mut self, index: usize) -> Work;
    /// The driver broke a ring: the device stopped and waits for a reset (the
    /// transport shows DEVICE_NEEDS_RESET).
    fn needs_reset(&self) -> bool;
    /// Periodic work; returns the wanted period in milliseconds (0: none).
    fn tick(&mut self) -> u64 {
        0
    }
}

/// Interrupt causes recorded for the guest (`InterruptStatus`/`InterruptACK`), and
/// the irqfd that delivers them where the VM has an interrupt controller.
#[derive(Default)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: Option<EventFd>,
}

impl Interrupt {
    /// Causes delivered through `irqfd` (`KVM_IRQFD` on the device's GSI).
    pub fn with_irqfd(irqfd: EventFd) -> Self {
        Interrupt { status: AtomicU32::new(0), irqfd: Some(irqfd) }
    }

    /// Records a cause, then signals the irqfd if there is one (the status is
    /// visible before the guest's handler can run).
    pub fn raise(&self, cause: u32) {
        self.status.fetch_or(cause, Ordering::AcqRel);
        if let Some(fd) = &self.irqfd {
            // Fails only when the counter is full (EAGAIN), and then an interrupt
            // is pending already: KVM consumes the counter as it injects.
            let _ = fd.write(1);
        }
    }
    /// Current causes.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }
    /// The driver acknowledged `causes`.
    pub fn ack(&self, causes: u32) {
        self.status.fetch_and(!causes, Ordering::AcqRel);
    }
}
