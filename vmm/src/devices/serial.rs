//! COM1: a 16550 UART (vm-superio) whose output goes to the VM's [`Console`].
//!
//! There is no interrupt controller: the guest polls the line status register (the
//! transmitter is always empty) and writes whole lines with `rep outsb`, which KVM
//! hands over in one exit.

use std::io;
use std::sync::Arc;

use vm_superio::{Serial, Trigger};

use crate::console::Console;
use crate::devices::bus::BusDevice;

/// COM1's eight I/O ports start here.
pub const PORT_BASE: u16 = guest_abi::SERIAL_PORT;
/// Number of I/O ports of a 16550.
pub const PORT_COUNT: u16 = 8;

/// Interrupt line of a VM without interrupt controller: raising it does nothing.
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Adapts the console to the `Write` the UART wants.
pub struct ConsoleWriter(Arc<Console>);

impl io::Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_bytes(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The UART with its console.
pub struct SerialPort {
    uart: Serial<NoInterrupt, vm_superio::serial::NoEvents, ConsoleWriter>,
}

impl SerialPort {
    /// A UART printing to `console`.
    pub fn new(console: Arc<Console>) -> Self {
        SerialPort { uart: Serial::new(NoInterrupt, ConsoleWriter(console)) }
    }
}

impl BusDevice for SerialPort {
    /// Every byte of a string read (`rep insb`) comes from the same register.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for b in data {
            *b = self.uart.read(offset as u8);
        }
    }

    /// Every byte of a string write (`rep outsb`) goes to the same register.
    fn write(&mut self, offset: u64, data: &[u8]) {
        for &b in data {
            if let Err(e) = self.uart.write(offset as u8, b) {
                log::warn!("serial write: {e:?}");
            }
        }
    }
}
