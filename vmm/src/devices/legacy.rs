//! The PC devices a Linux guest expects besides its console: the i8042 keyboard
//! controller (whose CPU-reset command is how `reboot=k` ends the VM), a CMOS clock
//! (Linux reads the date from ports 0x70/0x71 at boot), and the VMM's exit register,
//! an MMIO register through which a guest program sets the exit status of `vmm run`.
//!
//! The exit register is for kernels without `/dev/port` (Debian's cloud kernel):
//! `busybox devmem 0xd0100000 32 CODE` ends the VM with CODE. Kernels with
//! `/dev/port` can also write the code byte to the test guest's exit port
//! (`guest_abi::EXIT_PORT`). Both end the VM at once, like a power-off with a status.
//!
//! These devices end the VM from a vCPU thread; they get the VM through an
//! [`EndLine`] that the VM fills in once it exists (devices are created before it).

use std::sync::{Arc, OnceLock, Weak};

use vm_superio::{I8042Device, Trigger};

use crate::devices::bus::BusDevice;
use crate::vm::{Ending, VmShared};

/// First I/O port of the i8042 (data port 0x60; the command port is 0x64).
pub const I8042_PORT: u16 = 0x60;
/// Ports the i8042 spans (0x60..=0x64).
pub const I8042_PORTS: u16 = 5;
/// The CMOS index and data ports.
pub const CMOS_PORT: u16 = 0x70;
/// GPA of the exit register (in the MMIO hole, after the virtio windows).
pub const EXIT_MMIO_GPA: u64 = 0xd010_0000;
/// Bytes of the exit register's window.
pub const EXIT_MMIO_SIZE: u64 = 0x1000;

/// The VM a device may end, filled in once the VM exists.
#[derive(Clone, Default)]
pub struct EndLine(Arc<OnceLock<Weak<VmShared>>>);

impl EndLine {
    /// Connects the line to its VM.
    pub fn connect(&self, vm: &Arc<VmShared>) {
        let _ = self.0.set(Arc::downgrade(vm));
    }

    /// Ends the VM, if it is connected and still there.
    pub fn end(&self, ending: Ending) {
        if let Some(vm) = self.0.get().and_then(Weak::upgrade) {
            vm.end(ending);
        }
    }
}

/// The i8042's reset output: ends the VM as a guest exit with status 0 (`reboot`).
pub struct ResetLine(EndLine);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        log::info!("the guest reset the machine through the i8042 (reboot): ending the VM");
        self.0.end(Ending::GuestExit(0));
        Ok(())
    }
}

/// The i8042 (vm-superio) on the port bus.
pub struct I8042(I8042Device<ResetLine>);

impl I8042 {
    /// An i8042 whose reset ends the VM behind `line`.
    pub fn new(line: EndLine) -> Self {
        I8042(I8042Device::new(ResetLine(line)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for b in data {
            *b = self.0.read(offset as u8);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        for &b in data {
            let _ = self.0.write(offset as u8, b);
        }
    }
}

/// A CMOS clock: the host's UTC time in BCD, never "update in progress", no alarms,
/// no NVRAM beyond zeros.
#[derive(Default)]
pub struct Cmos {
    index: u8,
}

impl Cmos {
    /// Register `index` at Unix time `now` (seconds).
    fn register(index: u8, now: u64) -> u8 {
        let bcd = |v: u64| (((v / 10) << 4) | (v % 10)) as u8;
        let days = now / 86_400;
        let (year, month, day) = civil_from_days(days as i64);
        match index {
            0x00 => bcd(now % 60),
            0x02 => bcd(now / 60 % 60),
            0x04 => bcd(now / 3600 % 24),
            0x06 => ((days + 4) % 7 + 1) as u8, // day of week, Sunday = 1
            0x07 => bcd(day as u64),
            0x08 => bcd(month as u64),
            0x09 => bcd(year as u64 % 100),
            0x0a => 0x26,                   // 32.768 kHz divider, 1024 Hz rate, UIP clear
            0x0b => 0x02,                   // 24-hour mode, BCD
            0x0d => 0x80,                   // battery good
            0x32 => bcd(year as u64 / 100), // century
            _ => 0,
        }
    }
}

/// (year, month, day) of the day `days` after 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let v = if offset == 1 { Cmos::register(self.index, now) } else { self.index };
        data.fill(v);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0, Some(&b)) = (offset, data.last()) {
            // Bit 7 is the NMI mask, not part of the index.
            self.index = b & 0x7f;
        }
    }
}

/// The exit register: a 32-bit write of CODE at offset 0 ends the VM with CODE.
pub struct ExitRegister(pub EndLine);

impl BusDevice for ExitRegister {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            let mut code = [0u8; 4];
            let n = data.len().min(4);
            code[..n].copy_from_slice(&data[..n]);
            self.0.end(Ending::GuestExit(u32::from_le_bytes(code)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cmos_clock_reads_bcd_utc() {
        // 2026-12-02 15:30:45 UTC, a Wednesday.
        let t = 1_796_225_445;
        assert_eq!(civil_from_days(t / 86_400), (2026, 12, 2));
        let r = |i| Cmos::register(i, t as u64);
        assert_eq!((r(0x09), r(0x08), r(0x07), r(0x32)), (0x26, 0x12, 0x02, 0x20));
        assert_eq!((r(0x04), r(0x02), r(0x00)), (0x15, 0x30, 0x45));
        assert_eq!(r(0x06), 4, "Wednesday");
        assert_eq!(r(0x0a) & 0x80, 0, "never update-in-progress");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn the_cmos_index_ignores_the_nmi_bit() {
        let mut c = Cmos::default();
        c.write(0, &[0x8b]);
        let mut v = [0u8];
        c.read(1, &mut v);
        assert_eq!(v[0], 0x02, "register 0x0b");
    }
}
