//! The virtio-mmio registers of one device, accessed through the identity map
//! (the VMM maps the MMIO hole; every access is an exit to the VMM or, for queue
//! notifications, to KVM's ioeventfd).

use super::queue::Virtq;

/// `MagicValue`: "virt".
const MAGIC: u32 = 0x7472_6976;
/// The register layout this driver speaks.
const VERSION: u32 = 2;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC: u64 = 0x080;
const REG_QUEUE_AVAIL: u64 = 0x090;
const REG_QUEUE_USED: u64 = 0x0a0;
const REG_CONFIG: u64 = 0x100;

/// Device status bits.
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const NEEDS_RESET: u32 = 0x40;
const FAILED: u32 = 0x80;

/// virtio 1.x feature bit: the device is not a legacy one.
pub const VERSION_1: u64 = 1 << 32;

/// One device's register window.
pub struct Transport {
    base: u64,
    status: u32,
}

impl Transport {
    /// The device at `base` if it is a version-2 virtio-mmio device of type
    /// `device_id`; it is reset.
    pub fn probe(base: u64, device_id: u32) -> Result<Transport, &'static str> {
        let mut t = Transport { base, status: 0 };
        if t.read(REG_MAGIC) != MAGIC || t.read(REG_VERSION) != VERSION {
            return Err("not a virtio-mmio version 2 device");
        }
        if t.read(REG_DEVICE_ID) != device_id {
            return Err("unexpected virtio device type");
        }
        t.set_status(0);
        t.set_status(ACKNOWLEDGE | DRIVER);
        Ok(t)
    }

    /// Accepts the features of `wanted` that the device offers (VERSION_1 is
    /// required) and checks the device agrees; returns the accepted features.
    pub fn negotiate(&mut self, wanted: u64) -> Result<u64, &'static str> {
        self.write(REG_DEVICE_FEATURES_SEL, 0);
        let mut offered = self.read(REG_DEVICE_FEATURES) as u64;
        self.write(REG_DEVICE_FEATURES_SEL, 1);
        offered |= (self.read(REG_DEVICE_FEATURES) as u64) << 32;
        let accepted = offered & (wanted | VERSION_1);
        if accepted & VERSION_1 == 0 {
            return self.fail("the device does not offer VERSION_1");
        }
        self.write(REG_DRIVER_FEATURES_SEL, 0);
        self.write(REG_DRIVER_FEATURES, accepted as u32);
        self.write(REG_DRIVER_FEATURES_SEL, 1);
        self.write(REG_DRIVER_FEATURES, (accepted >> 32) as u32);
        self.set_status(self.status | FEATURES_OK);
        if self.read(REG_STATUS) & FEATURES_OK == 0 {
            return self.fail("the device refused the features (FEATURES_OK not kept)");
        }
        Ok(accepted)
    }

    /// Tells the device where queue `q` (its index and size) lives and enables it.
    pub fn setup_queue(&mut self, q: &Virtq) -> Result<(), &'static str> {
        self.write(REG_QUEUE_SEL, q.index() as u32);
        if self.read(REG_QUEUE_NUM_MAX) < q.size() as u32 {
            return self.fail("a queue is missing or smaller than the driver needs");
        }
        self.write(REG_QUEUE_NUM, q.size() as u32);
        for (reg, addr) in
            [(REG_QUEUE_DESC, q.desc_addr()), (REG_QUEUE_AVAIL, q.avail_addr()), (REG_QUEUE_USED, q.used_addr())]
        {
            self.write(reg, addr as u32);
            self.write(reg + 4, (addr >> 32) as u32);
        }
        self.write(REG_QUEUE_READY, 1);
        Ok(())
    }

    /// Sets DRIVER_OK: the device starts serving the queues.
    pub fn driver_ok(&mut self) -> Result<(), &'static str> {
        self.set_status(self.status | DRIVER_OK);
        if self.read(REG_STATUS) & NEEDS_RESET != 0 {
            return self.fail("the device refused the queue setup (NEEDS_RESET)");
        }
        Ok(())
    }

    /// Marks the driver FAILED and returns `Err(why)`.
    pub fn fail<T>(&mut self, why: &'static str) -> Result<T, &'static str> {
        self.set_status(self.status | FAILED);
        Err(why)
    }

    /// Notifies queue `index` of new available buffers.
    pub fn notify(&self, index: u16) {
        self.write(REG_QUEUE_NOTIFY, index as u32);
    }

    /// Reads the 32-bit device configuration field at `offset`.
    pub fn config_read(&self, offset: u64) -> u32 {
        self.read(REG_CONFIG + offset)
    }

    /// Writes the 32-bit device configuration field at `offset`.
    pub fn config_write(&self, offset: u64, value: u32) {
        self.write(REG_CONFIG + offset, value);
    }

    fn set_status(&mut self, status: u32) {
        self.status = status;
        self.write(REG_STATUS, status);
    }

    fn read(&self, offset: u64) -> u32 {
        // SAFETY: the window is device memory in the MMIO hole, identity-mapped by
        // the VMM; a 32-bit volatile access is one register access.
        unsafe { ((self.base + offset) as *const u32).read_volatile() }
    }

    fn write(&self, offset: u64, value: u32) {
        // SAFETY: as in `read`.
        unsafe { ((self.base + offset) as *mut u32).write_volatile(value) }
    }
}
