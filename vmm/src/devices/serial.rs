//! COM1: a 16550 UART (vm-superio) whose output goes to the VM's [`Console`].
//!
//! The test guest has no interrupt controller: it polls the line status register
//! (the transmitter is always empty) and writes whole lines with `rep outsb`, which
//! KVM hands over in one exit. A Linux guest has KVM's in-kernel irqchip, and its
//! 8250 driver waits for the transmitter-empty interrupt: there the UART's interrupt
//! line is an irqfd on GSI 4.

use std::io;
use std::sync::Arc;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::console::Console;
use crate::devices::bus::BusDevice;

/// COM1's eight I/O ports start here.
pub const PORT_BASE: u16 = guest_abi::SERIAL_PORT;
/// Number of I/O ports of a 16550.
pub const PORT_COUNT: u16 = 8;

/// The UART's interrupt line.
pub enum IrqLine {
    /// A VM without interrupt controller: raising it does nothing.
    None,
    /// An irqfd: raising it signals the eventfd (an edge on the UART's GSI).
    Irqfd(EventFd),
}

impl Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        match self {
            IrqLine::None => Ok(()),
            IrqLine::Irqfd(fd) => fd.write(1),
        }
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
    uart: Serial<IrqLine, vm_superio::serial::NoEvents, ConsoleWriter>,
}

impl SerialPort {
    /// A UART printing to `console`, raising `irq`.
    pub fn new(console: Arc<Console>, irq: IrqLine) -> Self {
        SerialPort { uart: Serial::new(irq, ConsoleWriter(console)) }
    }
}

impl SerialPort {
    /// Puts bytes typed on the host into the receive FIFO (raising the receive
    /// interrupt if the guest enabled it); returns how many fit (0 when full).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConsoleTarget;

    #[test]
    fn typed_input_reaches_the_guest_and_raises_the_receive_interrupt() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let console = Console::new(&ConsoleTarget::Discard, "t", false).unwrap();
        let mut port = SerialPort::new(console, IrqLine::Irqfd(irq.try_clone().unwrap()));
        port.write(1, &[0x01]); // IER: received-data interrupt on
        assert_eq!(port.enqueue_input(b"ls\n"), 3);
        assert_eq!(irq.read().unwrap(), 1, "one interrupt for the input");
        let mut got = [0u8; 1];
        let mut typed = Vec::new();
        for _ in 0..3 {
            port.read(0, &mut got);
            typed.push(got[0]);
        }
        assert_eq!(typed, b"ls\n");
        let full = vec![b'x'; 100];
        let first = port.enqueue_input(&full);
        assert!(first < full.len() && first > 0, "the FIFO is bounded: {first}");
        assert_eq!(port.enqueue_input(&full), 0, "full");
    }
}
