//! `vmm ctl`: sends one request to a running `vmm` and prints the response.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::Deserialize;

use super::{Reply, Request, Response};

/// A response as it arrives: its result is typed once the request says which
/// [`Reply`] it is.
#[derive(Deserialize)]
struct Received {
    ok: bool,
    #[serde(default)]
    result: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<String>,
}

/// How long a response may take: the server answers within 5 s, so a peer that
/// says nothing for longer is not a `vmm run` that works.
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The longest response read (a `sample` of many VMs is a few KiB).
const MAX_REPLY: u64 = 16 << 20;

/// Sends `req` to the socket at `path` and returns the response.
pub fn send(path: &Path, req: &Request) -> Result<Response, String> {
    let mut stream = UnixStream::connect(path).map_err(|e| {
        format!("cannot connect to {}: {e} (is `vmm run` running? it prints its socket path at start)", path.display())
    })?;
    let text = serde_json::to_string(req).expect("requests serialise");
    writeln!(stream, "{text}").map_err(|e| format!("sending the request: {e}"))?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(|e| format!("setting a read timeout: {e}"))?;
    let mut line = String::new();
    BufReader::new(stream.take(MAX_REPLY)).read_line(&mut line).map_err(|e| format!("reading the response: {e}"))?;
    if !line.ends_with('\n') {
        return Err(format!("no complete response (the socket closed, or sent over {} MiB)", MAX_REPLY >> 20));
    }
    let bad = |e: serde_json::Error| format!("bad response {line:?}: {e}");
    let received: Received = serde_json::from_str(&line).map_err(bad)?;
    let result = received.result.map(|r| Reply::decode(req, r)).transpose().map_err(bad)?;
    Ok(Response { ok: received.ok, result, error: received.error })
}
