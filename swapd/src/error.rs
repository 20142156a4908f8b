//! What can go wrong in a swapper, with what the caller needs to act on it.

use std::io;
use std::time::Duration;

/// Errors of the swapper.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// A region of guest RAM that cannot be swapped (not page aligned, empty, too
    /// large), or a range outside the VM's RAM.
    #[error("guest RAM range {host_addr:#x}+{len:#x}: {why}")]
    BadRange {
        /// Host address of the range.
        host_addr: usize,
        /// Its length.
        len: usize,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Setting up, or an unexpected system call failure.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// Writing a batch failed (ENOSPC, EIO): that batch's pages stayed resident,
    /// eviction is stopped until retried; `reclaimed` pages had been evicted by the
    /// earlier batches of the same request.
    #[error("swap file write failed after {reclaimed} pages: {source}; eviction stopped")]
    Write {
        /// Pages evicted before the failure.
        reclaimed: usize,
        /// The write's error.
        #[source]
        source: io::Error,
    },
    /// Eviction is stopped by an earlier write error.
    #[error("eviction stopped: {reason}")]
    Stopped {
        /// The earlier error.
        reason: String,
    },
    /// The VM is ending (its pause was refused).
    #[error("the VM is ending")]
    Ending {
        /// Pages evicted before.
        reclaimed: usize,
    },
    /// The VM did not pause in time (another reclaimer or a busy device held it),
    /// on every try of one batch; it runs on, and a later request may succeed.
    #[error("the VM did not pause within {:.1}s, three times ({reclaimed} pages evicted before)", waited.as_secs_f64())]
    PauseTimedOut {
        /// Pages evicted before.
        reclaimed: usize,
        /// How long the batch waited.
        waited: Duration,
    },
    /// A slot failed its checksum or could not be read (the VM is being stopped).
    #[error("{what}")]
    Corrupt {
        /// Which slot, which page, what happened.
        what: String,
    },
}

impl SwapError {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> SwapError {
        SwapError::Io { what: what.into(), source }
    }
}
