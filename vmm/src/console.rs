//! A VM's console: what its serial port prints, line by line.
//!
//! Every line goes to the chosen [`ConsoleTarget`] and into a bounded in-memory log,
//! from which the VMM reads the test guest's step results ([`GuestStep`]) and tests
//! check them. The time of the first byte is kept for the boot figures.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::config::ConsoleTarget;

/// A workload step's result as the test guest prints it: one type for the guest's
/// JSON line and every reader of it (see `guest_abi::step`).
pub type GuestStep = guest_abi::step::StepResult<String>;

/// The step results among `lines`; other lines (the guest's events, another
/// kernel's text) are skipped.
pub fn steps(lines: &[String]) -> Vec<GuestStep> {
    lines.iter().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Lines kept in memory per VM; older ones are dropped (and counted).
const LOG_LINES: usize = 10_000;
/// A line longer than this is cut (a guest printing without newlines).
const MAX_LINE: usize = 4096;

enum Sink {
    Stdout(Option<String>),
    File(File),
    Discard,
}

struct Log {
    lines: VecDeque<String>,
    total: u64,
}

/// A VM's console. Shared by the serial device (writer) and readers.
pub struct Console {
    sink: Mutex<Sink>,
    log: Mutex<Log>,
    grew: Condvar,
    partial: Mutex<Vec<u8>>,
    first_output: OnceLock<Instant>,
}

impl Console {
    /// Opens the console for VM `name`; `label` prefixes stdout lines with `[name] `.
    pub fn new(target: &ConsoleTarget, name: &str, label: bool) -> io::Result<Arc<Console>> {
        let sink = match target {
            ConsoleTarget::Stdout | ConsoleTarget::Stdio => Sink::Stdout(label.then(|| format!("[{name}] "))),
            ConsoleTarget::File(p) => Sink::File(
                File::create(p).map_err(|e| io::Error::new(e.kind(), format!("console file {}: {e}", p.display())))?,
            ),
            ConsoleTarget::Discard => Sink::Discard,
        };
        Ok(Arc::new(Console {
            sink: Mutex::new(sink),
            log: Mutex::new(Log { lines: VecDeque::new(), total: 0 }),
            grew: Condvar::new(),
            partial: Mutex::new(Vec::new()),
            first_output: OnceLock::new(),
        }))
    }

    /// Takes bytes from the serial port.
    pub fn write_bytes(&self, bytes: &[u8]) {
        self.first_output.get_or_init(Instant::now);
        let mut partial = self.partial.lock().unwrap();
        for &b in bytes {
            if b == b'\n' || partial.len() >= MAX_LINE {
                let line = String::from_utf8_lossy(&partial).trim_end_matches('\r').to_string();
                partial.clear();
                self.push_line(line);
            } else {
                partial.push(b);
            }
        }
    }

    /// Writes out a last line without newline (at VM exit).
    pub fn flush(&self) {
        let rest = std::mem::take(&mut *self.partial.lock().unwrap());
        if !rest.is_empty() {
            self.push_line(String::from_utf8_lossy(&rest).into_owned());
        }
    }

    fn push_line(&self, line: String) {
        match &mut *self.sink.lock().unwrap() {
            Sink::Stdout(label) => {
                let mut out = io::stdout().lock();
                let _ = writeln!(out, "{}{line}", label.as_deref().unwrap_or(""));
                let _ = out.flush();
            }
            Sink::File(f) => {
                let _ = writeln!(f, "{line}");
            }
            Sink::Discard => {}
        }
        let mut log = self.log.lock().unwrap();
        if log.lines.len() == LOG_LINES {
            log.lines.pop_front();
        }
        log.lines.push_back(line);
        log.total += 1;
        self.grew.notify_all();
    }

    /// When the guest first wrote to the console.
    pub fn first_output(&self) -> Option<Instant> {
        self.first_output.get().copied()
    }

    /// The lines kept in memory (the last `LOG_LINES`).
    pub fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().lines.iter().cloned().collect()
    }

    /// The lines from number `index` (0-based, counting all lines) on that are
    /// still kept.
    pub fn lines_since(&self, index: u64) -> Vec<String> {
        let log = self.log.lock().unwrap();
        let first = log.total - log.lines.len() as u64;
        let skip = index.saturating_sub(first) as usize;
        log.lines.iter().skip(skip).cloned().collect()
    }

    /// Number of lines printed so far (including dropped ones).
    pub fn line_count(&self) -> u64 {
        self.log.lock().unwrap().total
    }

    /// Waits until line number `index` (0-based, counting all lines) exists and
    /// returns it, or `None` on timeout or if it was already dropped.
    pub fn wait_line(&self, index: u64, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut log = self.log.lock().unwrap();
        while log.total <= index {
            let left = deadline.checked_duration_since(Instant::now())?;
            log = self.grew.wait_timeout(log, left).unwrap().0;
        }
        let first = log.total - log.lines.len() as u64;
        index.checked_sub(first).and_then(|i| log.lines.get(i as usize).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_and_logged() {
        let c = Console::new(&ConsoleTarget::Discard, "t", false).unwrap();
        assert!(c.first_output().is_none());
        c.write_bytes(b"hello\r\nwor");
        c.write_bytes(b"ld\npartial");
        assert_eq!(c.lines(), vec!["hello", "world"]);
        assert_eq!(c.wait_line(1, Duration::ZERO).as_deref(), Some("world"));
        assert_eq!(c.wait_line(2, Duration::from_millis(1)), None);
        assert_eq!(c.lines_since(1), vec!["world"]);
        c.flush();
        assert_eq!(c.line_count(), 3);
        assert!(c.first_output().is_some());
    }
}
