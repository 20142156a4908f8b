//! An interactive console: what the user types on the VMM's stdin goes to the
//! guest's COM1 (`vmm run --console stdio`), for a Linux guest's shell.
//!
//! A thread reads stdin and feeds the UART's 64-byte receive FIFO, waiting while it
//! is full (the guest reads it on the receive interrupt). When stdin is a terminal
//! it is switched out of line mode and local echo (the guest's tty echoes), but
//! keeps its signals: Ctrl-C stops the VMM, as for any `vmm run`. The terminal's
//! settings come back when the process exits.

use std::io::Read;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::devices::serial::SerialPort;

/// The terminal settings to restore at exit.
static SAVED: OnceLock<libc::termios> = OnceLock::new();

extern "C" fn restore_terminal() {
    if let Some(t) = SAVED.get() {
        // SAFETY: tcsetattr reads the termios we saved; fd 0 is stdin.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
    }
}

/// Takes stdin out of line mode and echo if it is a terminal; restores it at exit.
fn raw_stdin() {
    // SAFETY: isatty only inspects fd 0.
    if unsafe { libc::isatty(0) } != 1 || SAVED.get().is_some() {
        return;
    }
    // SAFETY: all-zero is a valid termios for tcgetattr to fill.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd 0 is a terminal; `t` is a valid termios.
    if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
        return;
    }
    let _ = SAVED.set(t);
    // SAFETY: registers a function without arguments that only calls tcsetattr.
    unsafe { libc::atexit(restore_terminal) };
    t.c_lflag &= !(libc::ICANON | libc::ECHO);
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    // SAFETY: as above.
    unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
}

/// Starts forwarding stdin to `serial` until stdin ends.
pub fn forward_stdin(serial: Arc<Mutex<SerialPort>>) -> std::io::Result<()> {
    raw_stdin();
    std::thread::Builder::new().name("console-in".into()).spawn(move || {
        let mut buf = [0u8; 256];
        let mut stdin = std::io::stdin().lock();
        while let Ok(n @ 1..) = stdin.read(&mut buf) {
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                let taken = serial.lock().unwrap().enqueue_input(rest);
                rest = &rest[taken..];
                if taken == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    })?;
    Ok(())
}
