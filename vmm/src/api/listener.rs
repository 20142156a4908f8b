//! The control socket itself: creating it private, finding stale ones, and
//! reading requests from clients that may be broken or hostile.
//!
//! - [`bind_private`]: the socket file is mode 0600 from the moment it exists (its
//!   mode is set on the socket before `bind(2)` creates the file), so no other user
//!   can connect in between.
//! - [`claim`]: a file already at the path is replaced only if it is a socket
//!   nobody listens on (a process that died without removing it); a live socket
//!   or any other kind of file is an error.
//! - [`remove_stale_siblings`]: default sockets (`vmm-PID.sock`) of processes that
//!   died (SIGKILL leaves them behind) are removed when the next one starts.
//! - [`LineReader`]: one request line of [`Limits::max_request`] bytes at most,
//!   complete within [`Limits::request_timeout`] (an idle or trickling client is
//!   dropped), a line cut by a disconnect is dropped unexecuted.

use std::io::{self, ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What one client may hold of the server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Clients served at once; more are told so and disconnected.
    pub max_connections: usize,
    /// Longest request line, bytes.
    pub max_request: usize,
    /// A request line must be complete this long after the server starts reading it
    /// (the first one after connecting, the next one after each response).
    pub request_timeout: Duration,
    /// A response not taken by the client within this is dropped with the client.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 16,
            max_request: 64 << 10,
            request_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(5),
        }
    }
}

/// Why the control socket cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Another process listens there.
    #[error("{0} is in use by another vmm")]
    InUse(PathBuf),
    /// Something that is not a socket is there.
    #[error("{0} exists and is not a socket: not replaced")]
    NotASocket(PathBuf),
    /// A system call failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ListenError + 'a {
    move |source| ListenError::Io { what, path: path.to_path_buf(), source }
}

/// Makes `path` free for a new socket: nothing there, or a stale socket (removed).
pub fn claim(path: &Path) -> Result<(), ListenError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("inspecting", path)(e)),
        Ok(m) if !m.file_type().is_socket() => Err(ListenError::NotASocket(path.to_path_buf())),
        Ok(_) if UnixStream::connect(path).is_ok() => Err(ListenError::InUse(path.to_path_buf())),
        Ok(_) => std::fs::remove_file(path).map_err(io_error("removing stale socket", path)),
    }
}

/// A listening Unix socket at `path`, mode 0600 from the start.
pub fn bind_private(path: &Path) -> Result<UnixListener, ListenError> {
    let fail = |what| io_error(what, path);
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(fail("binding")(io::Error::new(ErrorKind::InvalidInput, "not a usable socket path (too long?)")));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = s as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the descriptor is owned right below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(fail("creating socket")(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // On Linux bind(2) creates the file with the socket's mode (less the umask).
    // SAFETY: fchmod on a descriptor we own.
    if unsafe { libc::fchmod(socket.as_raw_fd(), 0o600) } != 0 {
        return Err(fail("chmod 0600")(io::Error::last_os_error()));
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes.
    let bound =
        unsafe { libc::bind(socket.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len as libc::socklen_t) };
    if bound != 0 {
        return Err(fail("binding")(io::Error::last_os_error()));
    }
    // SAFETY: listen(2) on a bound socket we own.
    if unsafe { libc::listen(socket.as_raw_fd(), 128) } != 0 {
        return Err(fail("listening on")(io::Error::last_os_error()));
    }
    Ok(UnixListener::from(socket))
}

/// The pid in a default socket name `vmm-PID.sock`.
fn default_name_pid(name: &std::ffi::OsStr) -> Option<u32> {
    name.to_str()?.strip_prefix("vmm-")?.strip_suffix(".sock")?.parse().ok()
}

/// Removes the default sockets (`vmm-PID.sock`) in `dir` that belong to no live
/// process (nobody listens, and no process has that pid); returns them. A file of
/// another kind or a live socket is left alone.
pub fn remove_stale_siblings(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = default_name_pid(&entry.file_name()) else { continue };
        let path = entry.path();
        let is_socket = entry.file_type().is_ok_and(|t| t.is_socket());
        if !is_socket || Path::new(&format!("/proc/{pid}")).exists() || UnixStream::connect(&path).is_ok() {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// What [`LineReader::next_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line, without its newline.
    Request(Vec<u8>),
    /// More than the limit without a newline.
    TooLong,
    /// The client closed its side (a partial line is dropped).
    Closed,
    /// The line was not complete in time.
    TimedOut,
}

/// Reads newline-terminated requests with a size and time limit each.
pub struct LineReader {
    stream: UnixStream,
    buf: Vec<u8>,
    limits: Limits,
}

impl LineReader {
    /// Reads from `stream` under `limits`.
    pub fn new(stream: UnixStream, limits: Limits) -> Self {
        LineReader { stream, buf: Vec::new(), limits }
    }

    /// The next request line.
    pub fn next_line(&mut self) -> io::Result<Line> {
        let deadline = Instant::now() + self.limits.request_timeout;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                return Ok(if line.len() > self.limits.max_request { Line::TooLong } else { Line::Request(line) });
            }
            if self.buf.len() > self.limits.max_request {
                return Ok(Line::TooLong);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Line::TimedOut);
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(Line::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return Ok(Line::TimedOut),
                Err(e) => return Err(e),
            }
        }
    }
}
