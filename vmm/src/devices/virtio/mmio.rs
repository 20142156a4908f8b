//! The virtio-mmio transport (virtio 1.x, register layout version 2), independent of
//! the device behind it.
//!
//! The transport keeps the feature negotiation, status and queue configuration; on
//! DRIVER_OK it validates the queues and hands them to the device. A driver that
//! negotiates badly (no VERSION_1, queue sizes that are not powers of two, rings
//! outside guest RAM) gets the device marked NEEDS_RESET instead of a running
//! device, and the VMM logs why once.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{GuestErrors, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;

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

/// Queue configuration written by the driver before DRIVER_OK.
struct QueueSlot {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    ready: bool,
}

/// One virtio device behind an MMIO window.
pub struct MmioTransport<D: VirtioDevice> {
    name: String,
    device: Arc<Mutex<D>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    errors: Arc<GuestErrors>,
    notify: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueSlot>,
    status: u32,
    config_generation: Arc<std::sync::atomic::AtomicU32>,
    active: bool,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport for `device`; `notify[i]` is signalled when queue `i` is kicked
    /// (the same eventfds are registered as ioeventfds, so kicks usually bypass the
    /// transport).
    pub fn new(
        name: impl Into<String>,
        device: Arc<Mutex<D>>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        errors: Arc<GuestErrors>,
        notify: Vec<EventFd>,
        config_generation: Arc<std::sync::atomic::AtomicU32>,
    ) -> Self {
        let max = device.lock().unwrap().queue_max_size();
        let queues =
            (0..notify.len()).map(|_| QueueSlot { size: max, desc: 0, avail: 0, used: 0, ready: false }).collect();
        MmioTransport {
            name: name.into(),
            device,
            mem,
            interrupt,
            errors,
            notify,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            status: 0,
            config_generation,
            active: false,
        }
    }

    fn queue_count(&self) -> usize {
        // Before features are negotiated, offer every queue the offered features allow.
        let feats = if self.status & STATUS_FEATURES_OK != 0 {
            self.driver_features
        } else {
            self.device.lock().unwrap().features()
        };
        self.device.lock().unwrap().queue_count(feats).min(self.queues.len())
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
        if self.active {
            self.device.lock().unwrap().reset();
        }
        self.active = false;
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        let max = self.device.lock().unwrap().queue_max_size();
        for q in &mut self.queues {
            q.size = max;
            q.ready = false;
            q.desc = 0;
            q.avail = 0;
            q.used = 0;
        }
        self.interrupt.ack(u32::MAX);
    }

    fn fail(&mut self, kind: &'static str, detail: String) {
        self.errors.report(&self.name, kind, || detail);
        self.status |= STATUS_NEEDS_RESET;
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let newly = value & !self.status;
        if newly & STATUS_FEATURES_OK != 0 {
            let offered = self.device.lock().unwrap().features();
            if self.driver_features & !offered != 0 {
                self.fail(
                    "features",
                    format!("driver accepted unoffered features {:#x}", self.driver_features & !offered),
                );
                return;
            }
            if self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                // A legacy driver: this transport speaks virtio 1.x only.
                self.errors.report(&self.name, "legacy driver", || "driver did not accept VERSION_1".into());
                self.status = value & !STATUS_FEATURES_OK;
                return;
            }
        }
        self.status = value;
        if newly & STATUS_DRIVER_OK != 0 && !self.active {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.status & STATUS_FEATURES_OK == 0 {
            self.fail("status", "DRIVER_OK without FEATURES_OK".into());
            return;
        }
        let count = self.queue_count();
        let max = self.device.lock().unwrap().queue_max_size();
        let mut queues = Vec::with_capacity(count);
        for (i, slot) in self.queues.iter().take(count).enumerate() {
            let mut q = Queue::new(max).expect("the device's maximum queue size is valid");
            q.set_size(slot.size);
            q.set_desc_table_address(Some(slot.desc as u32), Some((slot.desc >> 32) as u32));
            q.set_avail_ring_address(Some(slot.avail as u32), Some((slot.avail >> 32) as u32));
            q.set_used_ring_address(Some(slot.used as u32), Some((slot.used >> 32) as u32));
            q.set_ready(slot.ready);
            if !slot.ready {
                queues.push(q);
                continue;
            }
            if slot.size == 0 || q.size() != slot.size || !q.is_valid(&self.mem) {
                let detail = format!(
                    "queue {i}: size {} desc {:#x} avail {:#x} used {:#x} is not a valid ring in guest RAM",
                    slot.size, slot.desc, slot.avail, slot.used
                );
                self.errors.report(&self.name, "queue config", || detail);
                self.status |= STATUS_NEEDS_RESET;
                return;
            }
            queues.push(q);
        }
        match self.device.lock().unwrap().activate(self.driver_features, queues) {
            Ok(()) => self.active = true,
            Err(e) => {
                self.errors.report(&self.name, "activate", || e);
                self.status |= STATUS_NEEDS_RESET;
            }
        }
        if self.active {
            log::debug!("{}: activated with features {:#x}", self.name, self.driver_features);
        }
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        if self.status & STATUS_DRIVER_OK != 0 {
            self.errors
                .report(&self.name, "queue config", || format!("queue register {offset:#x} written after DRIVER_OK"));
            return;
        }
        let max = self.device.lock().unwrap().queue_max_size();
        let Some(q) = self.selected() else { return };
        match offset {
            0x038 => {
                if v == 0 || v > max as u32 || !v.is_power_of_two() {
                    let detail = format!("queue size {v} (must be a power of two <= {max})");
                    q.size = 0;
                    self.errors.report(&self.name, "queue size", || detail);
                } else {
                    q.size = v as u16;
                }
            }
            0x044 => q.ready = v == 1,
            0x080 => q.desc = (q.desc & !0xffff_ffff) | v as u64,
            0x084 => q.desc = (q.desc & 0xffff_ffff) | (v as u64) << 32,
            0x090 => q.avail = (q.avail & !0xffff_ffff) | v as u64,
            0x094 => q.avail = (q.avail & 0xffff_ffff) | (v as u64) << 32,
            0x0a0 => q.used = (q.used & !0xffff_ffff) | v as u64,
            0x0a4 => q.used = (q.used & 0xffff_ffff) | (v as u64) << 32,
            _ => {}
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.lock().unwrap().read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 {
            self.errors
                .report(&self.name, "register width", || format!("{}-byte read of register {offset:#x}", data.len()));
            data.fill(0);
            return;
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
            0x038 => self.selected().map_or(0, |q| q.size as u32),
            0x044 => self.selected().map_or(0, |q| q.ready as u32),
            0x060 => self.interrupt.status(),
            0x070 => self.status,
            0x0fc => self.config_generation.load(std::sync::atomic::Ordering::Acquire),
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.lock().unwrap().write_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 {
            self.errors
                .report(&self.name, "register width", || format!("{}-byte write of register {offset:#x}", data.len()));
            return;
        }
        let v = u32::from_le_bytes(data.try_into().unwrap());
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => {
                if self.status & STATUS_FEATURES_OK == 0 {
                    match self.driver_features_sel {
                        0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64,
                        1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v as u64) << 32,
                        _ => {}
                    }
                }
            }
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            QUEUE_NOTIFY => match self.notify.get(v as usize) {
                // Reached only where the ioeventfd is not registered.
                Some(fd) if self.active => {
                    let _ = fd.write(1);
                }
                _ => self
                    .errors
                    .report(&self.name, "notify", || format!("notify of queue {v} (inactive or no such queue)")),
            },
            0x064 => self.interrupt.ack(v),
            0x070 => self.set_status(v),
            0x038 | 0x044 | 0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => self.write_queue_reg(offset, v),
            _ => self
                .errors
                .report(&self.name, "register", || format!("write to read-only or unknown register {offset:#x}")),
        }
        if self.status & STATUS_FAILED != 0 && self.active {
            self.reset();
        }
    }
}
