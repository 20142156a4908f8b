//! The virtio-mmio transport (virtio 1.x, register layout version 2), independent of
//! the device behind it.
//!
//! The transport keeps the feature negotiation, status and queue configuration, and
//! holds the driver to the order the spec gives them (3.1.1): ACKNOWLEDGE, DRIVER,
//! features, FEATURES_OK, queues, DRIVER_OK. Out of that order the write is refused
//! and counted: a status write that clears a bit (only a reset, writing 0, may),
//! sets a bit before the one it needs or an unknown bit; features written outside
//! DRIVER..FEATURES_OK; queue registers written outside FEATURES_OK..DRIVER_OK
//! (but for a queue taken down, QueueReady 0, while not running). At
//! DRIVER_OK it checks every ready queue ([`RingLayout::check`], [`check_disjoint`])
//! and hands them to the device; a bad layout, or a device that refuses them, gets
//! the device marked DEVICE_NEEDS_RESET instead of a running device. The same bit is
//! shown when the device breaks down at run time ([`VirtioDevice::needs_reset`]).
//! Every refusal is a counted guest error, logged at most once per kind per interval.

use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::virtqueue::{check_disjoint, RingLayout, Virtqueue};
use super::{Interrupt, VirtioDevice, INT_CONFIG, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;
use crate::devices::guest_errors::{GuestErrorKind, GuestErrors};
use crate::memory::GuestRam;

/// Bytes of MMIO space per device.
pub const MMIO_SIZE: u64 = 0x1000;
/// Offset of `QueueNotify` (the address the queue ioeventfds listen on).
pub const QUEUE_NOTIFY: u64 = 0x050;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4d56_4d56; // "VMVM"
const CONFIG_SPACE: u64 = 0x100;

/// Device status bits (virtio 1.x, 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// Status bits a driver may write.
const DRIVER_BITS: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED;
/// Each status bit and the bit that must be set before it.
const STATUS_ORDER: [(u32, u32); 3] =
    [(STATUS_DRIVER, STATUS_ACKNOWLEDGE), (STATUS_FEATURES_OK, STATUS_DRIVER), (STATUS_DRIVER_OK, STATUS_FEATURES_OK)];

/// Why a status write is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatusError {
    /// Only a reset (writing 0) may clear bits.
    #[error("status {from:#x} -> {to:#x} clears bits without a reset")]
    Cleared {
        /// Status before.
        from: u32,
        /// Status written.
        to: u32,
    },
    /// A bit set before the one it needs.
    #[error("status {to:#x} sets {bit:#x} without {needs:#x}")]
    Order {
        /// Status written.
        to: u32,
        /// The bit.
        bit: u32,
        /// The bit it needs.
        needs: u32,
    },
    /// Bits the spec does not define for drivers.
    #[error("status {to:#x} sets unknown bits")]
    Unknown {
        /// Status written.
        to: u32,
    },
}

/// Checks a driver's status write `to` against the current status `from` (both
/// without DEVICE_NEEDS_RESET, which is the device's bit).
fn check_status_order(from: u32, to: u32) -> Result<(), StatusError> {
    if to & !DRIVER_BITS != 0 {
        return Err(StatusError::Unknown { to });
    }
    if from & !to != 0 {
        return Err(StatusError::Cleared { from, to });
    }
    match STATUS_ORDER.iter().find(|&&(bit, needs)| to & bit != 0 && to & needs == 0) {
        Some(&(bit, needs)) => Err(StatusError::Order { to, bit, needs }),
        None => Ok(()),
    }
}

/// Queue configuration written by the driver before DRIVER_OK.
struct QueueSlot {
    layout: RingLayout,
    ready: bool,
}

/// One virtio device behind an MMIO window.
pub struct MmioTransport<D: VirtioDevice> {
    name: String,
    device: Arc<Mutex<D>>,
    ram: Arc<GuestRam>,
    interrupt: Arc<Interrupt>,
    errors: Arc<GuestErrors>,
    notify: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueSlot>,
    status: u32,
    config_generation: Arc<AtomicU32>,
    active: bool,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport for `device` over `ram`; `notify[i]` is signalled when queue `i`
    /// is kicked (the same eventfds are registered as ioeventfds, so kicks usually
    /// bypass the transport).
    pub fn new(
        name: impl Into<String>,
        device: Arc<Mutex<D>>,
        ram: Arc<GuestRam>,
        interrupt: Arc<Interrupt>,
        errors: Arc<GuestErrors>,
        notify: Vec<EventFd>,
        config_generation: Arc<AtomicU32>,
    ) -> Self {
        let mut t = MmioTransport {
            name: name.into(),
            device,
            ram,
            interrupt,
            errors,
            queues: notify.iter().map(|_| QueueSlot { layout: RingLayout::default(), ready: false }).collect(),
            notify,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation,
            active: false,
        };
        t.reset();
        t
    }

    fn queue_count(&self) -> usize {
        let dev = self.device.lock().unwrap();
        // Before features are negotiated, offer every queue the offered features allow.
        let feats = if self.status & STATUS_FEATURES_OK != 0 { self.driver_features } else { dev.features() };
        dev.queue_count(feats).min(self.queues.len())
    }

    fn selected(&mut self) -> Option<&mut QueueSlot> {
        let sel = self.queue_sel as usize;
        if sel < self.queue_count() {
            self.queues.get_mut(sel)
        } else {
            None
        }
    }

    fn reset(&mut self) {
        self.device.lock().unwrap().reset();
        self.active = false;
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        let max = self.device.lock().unwrap().queue_max_size();
        for q in &mut self.queues {
            *q = QueueSlot { layout: RingLayout { size: max, ..RingLayout::default() }, ready: false };
        }
        self.interrupt.ack(u32::MAX);
    }

    fn report(&self, kind: GuestErrorKind, detail: impl std::fmt::Display) {
        self.errors.report(kind, detail);
    }

    /// The device cannot go on: DEVICE_NEEDS_RESET, and a configuration interrupt.
    fn fail(&mut self, kind: GuestErrorKind, detail: impl std::fmt::Display) {
        self.report(kind, detail);
        self.status |= STATUS_NEEDS_RESET;
        self.interrupt.raise(INT_CONFIG);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let from = self.status & !STATUS_NEEDS_RESET;
        let to = value & !STATUS_NEEDS_RESET;
        if let Err(e) = check_status_order(from, to) {
            self.report(GuestErrorKind::StatusOrder, e);
            return;
        }
        let newly = to & !from;
        if newly & STATUS_FEATURES_OK != 0 {
            let offered = self.device.lock().unwrap().features();
            let unoffered = self.driver_features & !offered;
            if unoffered != 0 || self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                // FEATURES_OK is not kept: the driver reads it back and gives up.
                self.report(
                    GuestErrorKind::Features,
                    format_args!(
                        "driver accepted {:#x}: unoffered {unoffered:#x}, VERSION_1 required",
                        self.driver_features
                    ),
                );
                return;
            }
        }
        self.status = to | (self.status & STATUS_NEEDS_RESET);
        if newly & STATUS_DRIVER_OK != 0 {
            self.activate();
        }
        if newly & STATUS_FAILED != 0 && self.active {
            // The driver gave up: stop the device until it resets it.
            self.device.lock().unwrap().reset();
            self.active = false;
        }
    }

    fn activate(&mut self) {
        let count = self.queue_count();
        let max = self.device.lock().unwrap().queue_max_size();
        let ready: Vec<(usize, RingLayout)> =
            self.queues.iter().take(count).enumerate().filter(|(_, s)| s.ready).map(|(i, s)| (i, s.layout)).collect();
        for &(i, layout) in &ready {
            if let Err(e) = layout.check(&self.ram, max) {
                return self.fail(GuestErrorKind::QueueConfig, format_args!("queue {i}: {e}"));
            }
        }
        if let Err(e) = check_disjoint(&ready) {
            return self.fail(GuestErrorKind::QueueConfig, e);
        }
        let queues = self.queues.iter().take(count).map(|s| s.ready.then(|| Virtqueue::new(s.layout, max))).collect();
        let activated = self.device.lock().unwrap().activate(self.driver_features, queues);
        match activated {
            Ok(()) => {
                self.active = true;
                log::debug!("{}: activated with features {:#x}", self.name, self.driver_features);
                // A driver may make buffers available, and notify, before DRIVER_OK
                // (Linux's balloon primes its statistics queue so); the device may
                // only use them from now on: one notification per queue for them.
                for fd in &self.notify[..count] {
                    let _ = fd.write(1);
                }
            }
            Err(e) => self.fail(GuestErrorKind::QueueConfig, e),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) != STATUS_DRIVER {
            return self.report(
                GuestErrorKind::Features,
                format_args!("features written in status {:#x} (only after DRIVER, before FEATURES_OK)", self.status),
            );
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v as u64) << 32,
            sel => self.report(GuestErrorKind::Features, format_args!("features written with DriverFeaturesSel {sel}")),
        }
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        if offset == 0x044 && v == 0 && self.status & STATUS_DRIVER_OK == 0 {
            // Taking a queue down while the device is not running is harmless (Linux
            // does it after a reset, when it deletes its queues).
            if let Some(q) = self.selected() {
                q.ready = false;
            }
            return;
        }
        if self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED) != STATUS_FEATURES_OK {
            return self.report(
                GuestErrorKind::QueueConfig,
                format_args!(
                    "queue register {offset:#x} written in status {:#x} (only after FEATURES_OK, before DRIVER_OK)",
                    self.status
                ),
            );
        }
        if offset == 0x044 && v > 1 {
            return self.report(GuestErrorKind::QueueConfig, format_args!("QueueReady {v}"));
        }
        let sel = self.queue_sel;
        let Some(q) = self.selected() else {
            return self.report(
                GuestErrorKind::QueueConfig,
                format_args!("queue register of queue {sel}, which does not exist"),
            );
        };
        let low = |a: u64| (a & !0xffff_ffff) | v as u64;
        let high = |a: u64| (a & 0xffff_ffff) | (v as u64) << 32;
        let l = &mut q.layout;
        match offset {
            // Checked at DRIVER_OK with the rest of the layout.
            0x038 => l.size = u16::try_from(v).unwrap_or(0),
            0x044 => q.ready = v == 1,
            0x080 => l.desc = low(l.desc),
            0x084 => l.desc = high(l.desc),
            0x090 => l.avail = low(l.avail),
            0x094 => l.avail = high(l.avail),
            0x0a0 => l.used = low(l.used),
            0x0a4 => l.used = high(l.used),
            _ => unreachable!("only queue registers are dispatched here"),
        }
    }

    fn status(&self) -> u32 {
        let broken = self.active && self.device.lock().unwrap().needs_reset();
        self.status | if broken { STATUS_NEEDS_RESET } else { 0 }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.lock().unwrap().read_config(offset - CONFIG_SPACE, data);
            return;
        }
        data.fill(0);
        if data.len() != 4 {
            return self
                .report(GuestErrorKind::Register, format_args!("{}-byte read of register {offset:#x}", data.len()));
        }
        let v = match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.lock().unwrap().device_id(),
            0x00c => VENDOR,
            0x010 => {
                let f = self.device.lock().unwrap().features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x034 => match self.selected() {
                Some(_) => self.device.lock().unwrap().queue_max_size() as u32,
                None => 0,
            },
            0x038 => self.selected().map_or(0, |q| q.layout.size as u32),
            0x044 => self.selected().map_or(0, |q| q.ready as u32),
            0x060 => self.interrupt.status(),
            0x070 => self.status(),
            0x0fc => self.config_generation.load(std::sync::atomic::Ordering::Acquire),
            _ => {
                return self.report(
                    GuestErrorKind::Register,
                    format_args!("read of write-only or unknown register {offset:#x}"),
                )
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.lock().unwrap().write_config(offset - CONFIG_SPACE, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return self
                .report(GuestErrorKind::Register, format_args!("{}-byte write of register {offset:#x}", data.len()));
        };
        let v = u32::from_le_bytes(bytes);
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => self.write_driver_features(v),
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            QUEUE_NOTIFY => match self.notify.get(v as usize) {
                // Reached only where the ioeventfd is not registered. Before
                // DRIVER_OK the device ignores it (activation notifies every queue).
                Some(fd) => {
                    let _ = fd.write(1);
                }
                None => self.report(GuestErrorKind::Notify, format_args!("notify of queue {v}, which does not exist")),
            },
            0x064 => self.interrupt.ack(v),
            0x070 => self.set_status(v),
            0x038 | 0x044 | 0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => self.write_queue_reg(offset, v),
            _ => self
                .report(GuestErrorKind::Register, format_args!("write to read-only or unknown register {offset:#x}")),
        }
    }
}
