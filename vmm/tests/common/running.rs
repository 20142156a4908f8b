//! A `vmm run` child process serving a control socket, stopped when dropped.

use std::path::PathBuf;
use std::process::Child;

/// A `vmm run` child and its control socket; dropping it kills the child and
/// removes the socket.
pub struct Running {
    pub child: Child,
    pub sock: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}
