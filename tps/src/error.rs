//! Errors of the public API.

use std::fmt;
use std::io;

/// Why a scanner operation failed.
#[derive(Debug)]
pub enum Error {
    /// A system call needed to start or to register memory failed.
    Io { what: &'static str, source: io::Error },
    /// A region that cannot be registered, or a range that is not page aligned.
    BadRange { host_addr: usize, len: usize, why: &'static str },
    /// Changing the mapping of guest memory failed; the range may still be shared.
    Remap { host_addr: usize, len: usize, source: io::Error },
    /// The VM's RAM is already covered by another scanner.
    Attach { vm: String, source: pagestate::changes::AlreadyAttached },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { what, source } => write!(f, "tps: {what}: {source}"),
            Error::BadRange { host_addr, len, why } => {
                write!(f, "tps: range {host_addr:#x}+{len:#x}: {why}")
            }
            Error::Remap { host_addr, len, source } => {
                write!(f, "tps: remapping {host_addr:#x}+{len:#x}: {source}")
            }
            Error::Attach { vm, source } => write!(f, "tps: vm {vm}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } | Error::Remap { source, .. } => Some(source),
            Error::Attach { source, .. } => Some(source),
            Error::BadRange { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_and_where() {
        let e = Error::Remap { host_addr: 0x1000, len: 0x2000, source: io::Error::from_raw_os_error(libc::ENOMEM) };
        assert!(e.to_string().starts_with("tps: remapping 0x1000+0x2000: "), "{e}");
        assert!(std::error::Error::source(&e).is_some());
        let e = Error::BadRange { host_addr: 0x10, len: 1, why: "not page aligned" };
        assert_eq!(e.to_string(), "tps: range 0x10+0x1: not page aligned");
    }
}
