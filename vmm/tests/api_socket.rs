//! The control socket against broken and hostile clients: malformed JSON, a line
//! of several MiB, a client that never reads, many clients at once, a client that
//! disconnects mid-request or never finishes one. Each gets an error or is dropped,
//! and the server keeps serving the others. Also: the socket file is 0600, and only
//! a stale socket is ever replaced.
//!
//! The server runs in this process with no VMs (`{"cmd":"vms"}` answers `[]`): the
//! socket layer is the subject here; requests against real VMs are tested in
//! `balloon_ctl.rs` and the hostile-guest tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::TempDir;
use vmm::api::listener::{Limits, ListenError};
use vmm::api::server::Server;
use vmm::host::{Host, HostOptions, HostShared};

/// A host with no VMs: the socket layer is the subject.
fn no_vms() -> Arc<HostShared> {
    let host = Host::create(&[], Instant::now(), HostOptions::default()).expect("a host without VMs");
    host.shared().clone()
}

fn limits() -> Limits {
    Limits {
        max_connections: 4,
        max_request: 64 << 10,
        request_timeout: Duration::from_millis(500),
        write_timeout: Duration::from_millis(500),
    }
}

fn server(dir: &TempDir) -> Server {
    server_with(dir, limits())
}

fn server_with(dir: &TempDir, limits: Limits) -> Server {
    Server::with_limits(&dir.0.join("api.sock"), no_vms(), limits).unwrap()
}

/// Sends `line` and reads one response line.
fn ask(stream: &mut UnixStream, line: &str) -> serde_json::Value {
    writeln!(stream, "{line}").unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut response = String::new();
    reader.read_line(&mut response).unwrap();
    serde_json::from_str(&response).unwrap_or_else(|e| panic!("{response:?}: {e}"))
}

fn connect(s: &Server) -> UnixStream {
    let c = UnixStream::connect(s.path()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c
}

/// A fresh client is served at once.
fn still_serves(s: &Server) {
    let t = Instant::now();
    let r = ask(&mut connect(s), r#"{"cmd":"vms"}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert!(t.elapsed() < Duration::from_secs(5));
}

/// Reads until the server closes the connection; what it sent last.
fn until_closed(mut c: UnixStream) -> String {
    let mut all = Vec::new();
    let _ = c.read_to_end(&mut all);
    String::from_utf8_lossy(&all).lines().last().unwrap_or_default().to_string()
}

#[test]
fn malformed_requests_get_one_line_errors_and_the_connection_stays_usable() {
    let dir = TempDir::new("malformed");
    let s = server(&dir);
    let mut c = connect(&s);
    for bad in ["{", "null", r#"{"cmd":"reboot"}"#, r#"{"cmd":"balloon_set"}"#, "\u{0}\u{1}"] {
        let r = ask(&mut c, bad);
        assert_eq!(r["ok"], false, "{bad}: {r}");
        assert!(r["error"].as_str().unwrap().starts_with("bad request"), "{r}");
    }
    c.write_all(b"\xff\xfe\n").unwrap(); // not UTF-8
    let mut line = String::new();
    BufReader::new(c.try_clone().unwrap()).read_line(&mut line).unwrap();
    assert!(line.contains("bad request"), "{line}");
    assert_eq!(ask(&mut c, r#"{"cmd":"vms"}"#)["result"], serde_json::json!([]));
}

#[test]
fn a_line_of_several_mib_is_refused_without_holding_it() {
    let dir = TempDir::new("long");
    let s = server(&dir);
    let mut c = connect(&s);
    let base = rss();
    // 8 MiB without a newline, in 64 KiB writes: the server stops reading long before.
    let chunk = vec![b'x'; 64 << 10];
    let mut sent = 0;
    while sent < 8 << 20 && c.write_all(&chunk).is_ok() {
        sent += chunk.len();
    }
    let last = until_closed(c);
    assert!(last.contains("request longer than"), "{last:?}");
    assert!(rss().saturating_sub(base) < 4 << 20, "the server held the line");
    still_serves(&s);
}

#[test]
fn a_client_that_never_reads_is_dropped_and_others_are_served() {
    let dir = TempDir::new("noread");
    let s = server(&dir);
    let mut c = connect(&s);
    still_serves(&s);
    // Requests whose responses fill the socket buffers: the server's write blocks,
    // times out, and the client is dropped.
    let requests = r#"{"cmd":"vms"}"#.to_string() + "\n";
    c.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let t = Instant::now();
    let mut dropped = false;
    while t.elapsed() < Duration::from_secs(20) {
        if c.write_all(requests.repeat(1000).as_bytes()).is_err() {
            dropped = true;
            break;
        }
    }
    assert!(dropped, "the client could write for ever");
    // The write failed because the server dropped the client, not because of our
    // own timeout: what is left to read ends, it does not time out.
    let mut rest = Vec::new();
    if let Err(e) = c.read_to_end(&mut rest) {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "the server still holds the client: {e}");
    }
    still_serves(&s);
}

#[test]
fn clients_beyond_the_limit_are_told_and_the_slots_come_back() {
    let dir = TempDir::new("many");
    // Idle clients must hold their slots while the others knock.
    let s = server_with(&dir, Limits { request_timeout: Duration::from_secs(2), ..limits() });
    let idle: Vec<UnixStream> = (0..4).map(|_| connect(&s)).collect();
    std::thread::sleep(Duration::from_millis(100));
    let extra: Vec<UnixStream> = (0..20).map(|_| connect(&s)).collect();
    for c in extra {
        let last = until_closed(c);
        assert!(last.contains("too many connections (4 at most)"), "{last:?}");
    }
    // Idle clients are dropped after the request timeout: their slots come back.
    for c in idle {
        let last = until_closed(c);
        assert!(last.contains("no complete request within"), "{last:?}");
    }
    still_serves(&s);
}

#[test]
fn a_request_cut_by_a_disconnect_is_not_executed() {
    let dir = TempDir::new("cut");
    let s = server(&dir);
    let mut c = connect(&s);
    c.write_all(br#"{"cmd":"vms"}"#).unwrap(); // no newline
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = String::new();
    c.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "", "a partial line got an answer");
    // A slow client that trickles its request past the timeout is dropped.
    let mut slow = connect(&s);
    for b in br#"{"cmd":"vms"}"#.chunks(2) {
        if slow.write_all(b).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let last = until_closed(slow);
    assert!(last.contains("no complete request within"), "{last:?}");
    still_serves(&s);
}

#[test]
fn the_socket_is_private_and_replaces_only_a_stale_socket() {
    let dir = TempDir::new("file");
    let path = dir.0.join("api.sock");
    // A regular file is never replaced.
    std::fs::write(&path, b"precious").unwrap();
    let err = Server::with_limits(&path, no_vms(), limits()).err().unwrap();
    assert!(matches!(err, ListenError::NotASocket(_)), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();
    // A socket nobody listens on (its process died) is replaced.
    drop(UnixListener::bind(&path).unwrap());
    assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_socket());
    let s = server(&dir);
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    // A live one is not.
    let err = Server::with_limits(&path, no_vms(), limits()).err().unwrap();
    assert!(matches!(err, ListenError::InUse(_)), "{err}");
    still_serves(&s);
    drop(s);
    assert!(!path.exists(), "the socket is removed at exit");
}

#[test]
fn default_sockets_left_by_dead_processes_are_removed() {
    let dir = TempDir::new("stale");
    let dead = {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    };
    let stale = dir.0.join(format!("vmm-{dead}.sock"));
    drop(UnixListener::bind(&stale).unwrap());
    let not_a_socket = dir.0.join(format!("vmm-{}.sock", u32::MAX));
    std::fs::write(&not_a_socket, b"x").unwrap();
    let ours = dir.0.join(format!("vmm-{}.sock", std::process::id()));
    let s = Server::with_limits(&ours, no_vms(), limits()).unwrap();
    assert!(!stale.exists(), "the dead process's socket is still there");
    assert!(not_a_socket.exists(), "a file that is not a socket was removed");
    still_serves(&s);
}

fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap();
    kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
}

#[test]
fn the_client_gives_up_on_a_peer_that_answers_nothing_whole() {
    // `vmm top` and `vmm ctl` talk through this client: a socket that closes
    // mid-line, or never answers, is a one-line error, not a hang.
    let dir = TempDir::new("badpeer");
    let path = dir.0.join("peer.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let peer = std::thread::spawn(move || {
        let (mut half, _) = listener.accept().unwrap();
        BufReader::new(&half).read_line(&mut String::new()).unwrap();
        half.write_all(b"{\"ok\":tr").unwrap();
        drop(half);
        let (silent, _) = listener.accept().unwrap();
        std::thread::sleep(Duration::from_secs(12));
        drop(silent);
    });
    let err = vmm::api::client::send(&path, &vmm::api::Request::Sample).unwrap_err();
    assert!(err.starts_with("no complete response"), "{err}");
    let t0 = Instant::now();
    let err = vmm::api::client::send(&path, &vmm::api::Request::Sample).unwrap_err();
    assert!(err.starts_with("reading the response"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(12), "gave up after its timeout");
    peer.join().unwrap();
}
