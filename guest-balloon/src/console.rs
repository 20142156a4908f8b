//! The console: JSON lines on COM1, each written with a single `rep outsb`.
//!
//! Every port access exits to the VMM (~50 us on PVM), so a line is built in memory
//! and sent whole: one exit per line instead of one per byte. Lines are JSON objects
//! below [`MAX_LINE`] bytes. Step results are typed ([`guest_abi::step`]) and go out
//! through [`print`]; the other lines (events) are built field by field with
//! [`Line`], where a value that does not fit is cut short (strings) or left out. Either
//! way every line stays valid JSON. Normally only the BSP prints; the lock keeps a
//! line from another vCPU (a panic, an exception) from interleaving.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use guest_abi::{CONSOLE_LINE_MAX, SERIAL_PORT};
use serde::Serialize;

use crate::arch;

/// Longest line, newline included.
const MAX_LINE: usize = CONSOLE_LINE_MAX;
/// Bytes kept free for the closing `}\n`.
const TAIL: usize = 2;
/// Room a field needs beyond its key: `,"":` and a number or a short string.
const FIELD_MIN: usize = 4 + 20;

/// This VM's index (`BootInfo::vm_index`) once the boot information is checked.
static VM: AtomicU32 = AtomicU32::new(NO_VM);
const NO_VM: u32 = u32::MAX;

/// Held while a line is written to the port.
static LOCK: AtomicBool = AtomicBool::new(false);
/// Spins before a printer takes the lock anyway (a vCPU that died holding it must
/// not silence the others' failure reports).
const LOCK_PATIENCE: u32 = 1 << 24;

/// Sets the VM index every [`Line::vm`] starts with.
pub fn set_vm(vm: u32) {
    VM.store(vm, Ordering::Relaxed);
}

/// Prints `value` as one JSON line. A value that does not fit a line (no step
/// result does: `guest_abi::step` checks the longest) is replaced by an error event.
pub fn print(value: &impl Serialize) {
    let mut buf = [0u8; MAX_LINE];
    match serde_json_core::to_slice(value, &mut buf[..MAX_LINE - 1]) {
        Ok(len) => {
            buf[len] = b'\n';
            send(&buf[..len + 1]);
        }
        Err(_) => Line::vm().str("event", "error").str("msg", "a result did not fit a console line").emit(),
    }
}

/// Writes a whole line to the port, under the lock.
fn send(line: &[u8]) {
    let mut spins = 0;
    while LOCK.swap(true, Ordering::Acquire) && spins < LOCK_PATIENCE {
        core::hint::spin_loop();
        spins += 1;
    }
    arch::rep_outsb(SERIAL_PORT, line);
    LOCK.store(false, Ordering::Release);
}

/// A JSON object being built: `Line::vm().str("event", "serving").num("steps", 8).emit()`.
pub struct Line {
    buf: [u8; MAX_LINE],
    len: usize,
}

impl Line {
    /// An object starting with `"vm":N` (once [`set_vm`] was called): every line
    /// names its VM, since several VMs may share one console.
    pub fn vm() -> Line {
        let mut line = Line { buf: [0; MAX_LINE], len: 1 };
        line.buf[0] = b'{';
        let vm = VM.load(Ordering::Relaxed);
        if vm != NO_VM {
            line.num("vm", vm as u64);
        }
        line
    }

    /// Adds `"key":value` for a number.
    pub fn num(&mut self, key: &str, value: u64) -> &mut Line {
        if self.key(key) {
            let _ = write!(Raw(self), "{value}");
        }
        self
    }

    /// Adds `"key":"value"`, escaping `value` and cutting it short if needed.
    pub fn str(&mut self, key: &str, value: impl fmt::Display) -> &mut Line {
        if self.key(key) {
            self.push(b"\"");
            let _ = write!(Escaped(self), "{value}");
            self.push(b"\"");
        }
        self
    }

    /// Adds `"key":true`.
    pub fn flag(&mut self, key: &str) -> &mut Line {
        if self.key(key) {
            self.push(b"true");
        }
        self
    }

    /// Closes the object and prints it.
    pub fn emit(&mut self) {
        self.buf[self.len..self.len + TAIL].copy_from_slice(b"}\n");
        send(&self.buf[..self.len + TAIL]);
    }

    /// Starts a field; false (and nothing written) if it would not fit.
    fn key(&mut self, key: &str) -> bool {
        let comma = usize::from(self.len > 1);
        if self.room() < comma + key.len() + FIELD_MIN {
            return false;
        }
        if comma == 1 {
            self.push(b",");
        }
        self.push(b"\"");
        self.push(key.as_bytes());
        self.push(b"\":");
        true
    }

    /// Bytes left before the reserved tail.
    fn room(&self) -> usize {
        MAX_LINE - TAIL - self.len
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }
}

/// Appends formatted text as is (numbers), failing when it does not fit.
struct Raw<'a>(&'a mut Line);

impl Write for Raw<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if s.len() > self.0.room() {
            return Err(fmt::Error);
        }
        self.0.push(s.as_bytes());
        Ok(())
    }
}

/// Appends text as the inside of a JSON string, stopping (on a character
/// boundary) where only the closing quote still fits.
struct Escaped<'a>(&'a mut Line);

impl Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            let mut utf8 = [0; 4];
            let mut escape = [b'\\', 0, b'0', b'0', 0, 0];
            let bytes: &[u8] = match c {
                '"' | '\\' => {
                    escape[1] = c as u8;
                    &escape[..2]
                }
                c if (c as u32) < 0x20 => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    escape[1] = b'u';
                    escape[4] = HEX[(c as usize) >> 4];
                    escape[5] = HEX[(c as usize) & 0xf];
                    &escape
                }
                c => c.encode_utf8(&mut utf8).as_bytes(),
            };
            if bytes.len() + 1 > self.0.room() {
                return Err(fmt::Error);
            }
            self.0.push(bytes);
        }
        Ok(())
    }
}
