//! Address buses that route a vCPU's port I/O or MMIO exit to the device owning
//! the address.
//!
//! Devices register a range; an access must lie entirely inside one range. Each
//! device sits behind its own mutex, so vCPUs touching different devices do not
//! contend.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. Offsets are relative to the start of its range.
pub trait BusDevice: Send {
    /// Fills `data` with the value at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Takes `data` written at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Registration errors.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// Empty range.
    #[error("empty bus range")]
    Empty,
    /// The range overlaps one already registered.
    #[error("bus range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// Its start.
        base: u64,
        /// Its length.
        len: u64,
    },
}

/// A shared device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// One bus (port I/O or MMIO).
#[derive(Default)]
pub struct Bus {
    /// base -> (length, device)
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Bus::default()
    }

    /// Registers `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty);
        }
        let end = base.checked_add(len).ok_or(BusError::Overlap { base, len })?;
        let before = self.devices.range(..end).next_back();
        if before.is_some_and(|(&b, &(l, _))| b + l > base) {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    /// The device and offset for an access of `size` bytes at `addr`.
    fn find(&self, addr: u64, size: usize) -> Option<(&SharedDevice, u64)> {
        let (&base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(size as u64)? <= *len).then_some((dev, offset))
    }

    /// Dispatches a read; `false` if no device owns the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((dev, offset)) => {
                dev.lock().unwrap().read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; `false` if no device owns the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((dev, offset)) => {
                dev.lock().unwrap().write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(Vec<u8>);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.copy_from_slice(&self.0[offset as usize..offset as usize + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn routes_and_rejects() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Reg(vec![0; 8]))), 0x100, 8).unwrap();
        bus.insert(Arc::new(Mutex::new(Reg(vec![0; 4]))), 0x108, 4).unwrap();
        assert_eq!(
            bus.insert(Arc::new(Mutex::new(Reg(vec![]))), 0x104, 8),
            Err(BusError::Overlap { base: 0x104, len: 8 })
        );
        assert_eq!(
            bus.insert(Arc::new(Mutex::new(Reg(vec![]))), 0xfc, 8),
            Err(BusError::Overlap { base: 0xfc, len: 8 })
        );
        assert!(bus.write(0x102, &[1, 2]));
        let mut out = [0u8; 4];
        assert!(bus.read(0x100, &mut out));
        assert_eq!(out, [0, 0, 1, 2]);
        assert!(!bus.read(0x10a, &mut out), "access crossing the end of a device");
        assert!(!bus.write(0xff, &[0]));
        assert!(bus.write(0x10b, &[9]));
    }
}
