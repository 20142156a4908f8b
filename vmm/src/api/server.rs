//! Serves the control API inside `vmm run`: an accept thread, a thread per
//! connection (a `command` request may wait on the guest for a long time).
//!
//! A client is untrusted input: the socket layer ([`listener`]) bounds what one
//! can hold ([`Limits`]): connections at once (more are told so and dropped), the
//! length of a request line and the time to send it, the time to take a response.
//! Malformed JSON gets a one-line error and the connection stays usable; a line cut
//! by a disconnect is not executed. Nothing a client does stops the server or the
//! VMM, or keeps other clients from being served.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::listener::{self, Limits, Line, LineReader, ListenError};
use super::{BalloonTarget, CommandResult, ConsoleLine, PolicySetResult, Reply, Request, Response, SwapStatsResult};
use crate::devices::virtio::balloon::device::check_size;
use crate::devices::virtio::balloon::metrics::BalloonSnapshot;
use crate::devices::virtio::balloon::{Balloon, TargetMode};
use crate::host::shared::HostShared;
use crate::sample::HostSample;
use crate::units::parse_size;
use crate::vm::VmShared;

/// How long `balloon_stats` waits for the guest to answer with fresh statistics.
const FRESH_STATS_WAIT: Duration = Duration::from_millis(500);

/// A running API server; dropping it stops it and removes the socket.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens on `path` (mode 0600) for requests about the VMs of `host` and their
    /// reclaimers. A stale socket left by a dead process is replaced; a live one, or
    /// a file that is not a socket, is an error.
    pub fn start(path: &Path, host: Arc<HostShared>) -> Result<Server, ListenError> {
        Server::with_limits(path, host, Limits::default())
    }

    /// Like [`Server::start`], with explicit client limits.
    pub fn with_limits(path: &Path, host: Arc<HostShared>, limits: Limits) -> Result<Server, ListenError> {
        listener::claim(path)?;
        if path.file_name() == super::default_socket(std::process::id()).file_name() {
            for stale in listener::remove_stale_siblings(path.parent().unwrap_or(Path::new("."))) {
                log::info!("removed the stale control socket {}", stale.display());
            }
        }
        let socket = listener::bind_private(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || accept_loop(socket, host, limits, stop2))
            .map_err(|source| ListenError::Io { what: "starting the thread for", path: path.to_path_buf(), source })?;
        log::info!("control API on {}", path.display());
        Ok(Server { path: path.to_path_buf(), stop, thread: Some(thread) })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept thread up from its blocking accept.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Counts a connection while its thread runs.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn accept_loop(socket: UnixListener, host: Arc<HostShared>, limits: Limits, stop: Arc<AtomicBool>) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut last_error_logged: Option<Instant> = None;
    for stream in socket.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, say: wait a little, and say so now and then.
                if last_error_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    log::warn!("control API: accept failed: {e}");
                    last_error_logged = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            active.fetch_sub(1, Ordering::AcqRel);
            refuse(stream, &limits);
            continue;
        }
        let slot = Slot(active.clone());
        let host = host.clone();
        let spawned = std::thread::Builder::new().name("api-conn".into()).spawn(move || {
            let _slot = slot;
            serve(stream, &host, limits)
        });
        if let Err(e) = spawned {
            log::warn!("control API: cannot serve a connection: {e}");
        }
    }
}

/// Tells a client over the connection limit why it is dropped.
fn refuse(mut stream: UnixStream, limits: &Limits) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let why = Response::err(format!("too many connections ({} at most); try again", limits.max_connections));
    let _ = writeln!(stream, "{}", serde_json::to_string(&why).expect("responses serialise"));
}

fn serve(stream: UnixStream, host: &HostShared, limits: Limits) {
    let Ok(mut out) = stream.try_clone() else { return };
    if out.set_write_timeout(Some(limits.write_timeout)).is_err() {
        return;
    }
    let mut reader = LineReader::new(stream, limits);
    loop {
        let (response, last) = match reader.next_line() {
            Ok(Line::Request(bytes)) => {
                let request = std::str::from_utf8(&bytes)
                    .map_err(|e| e.to_string())
                    .and_then(|text| serde_json::from_str::<Request>(text.trim()).map_err(|e| e.to_string()));
                match request {
                    Ok(req) => (handle(req, host), false),
                    Err(e) => (Response::err(format!("bad request: {e}")), false),
                }
            }
            Ok(Line::TooLong) => (Response::err(format!("request longer than {} bytes", limits.max_request)), true),
            Ok(Line::TimedOut) => {
                (Response::err(format!("no complete request within {:?}", limits.request_timeout)), true)
            }
            Ok(Line::Closed) | Err(_) => return,
        };
        let text = serde_json::to_string(&response).expect("responses serialise");
        // A client that does not take its response within the write timeout is dropped.
        if writeln!(out, "{text}").is_err() || last {
            return;
        }
    }
}

/// Handles one request.
pub fn handle(req: Request, vms: &HostShared) -> Response {
    match run(req, vms) {
        Ok(v) => Response::ok(v),
        Err(e) => Response::err(e),
    }
}

fn select<'a>(vms: &'a [Arc<VmShared>], name: Option<&str>) -> Result<Vec<&'a Arc<VmShared>>, String> {
    match name {
        None => Ok(vms.iter().collect()),
        Some(n) => vms.iter().find(|v| v.name() == n).map(|v| vec![v]).ok_or_else(|| {
            let names: Vec<&str> = vms.iter().map(|v| v.name()).collect();
            format!("no VM named {n:?} (VMs: {})", names.join(", "))
        }),
    }
}

fn per_vm<T>(
    vms: &[&Arc<VmShared>],
    f: impl Fn(&VmShared) -> Result<T, String>,
) -> Result<BTreeMap<String, T>, String> {
    vms.iter().map(|vm| Ok((vm.name().to_string(), f(vm)?))).collect()
}

/// Asks the guest for fresh statistics and waits up to [`FRESH_STATS_WAIT`] for
/// them; a guest that is busy (its driver polls between workload steps) or has no
/// statistics queue gets its latest numbers reported, with their age.
fn fresh_balloon_stats(v: &VmShared, dev: &Mutex<Balloon>) -> BalloonSnapshot {
    let before = dev.lock().unwrap().snapshot().stats_updates;
    let mut asked = false;
    if let Some(_busy) = v.run().device_guard() {
        asked = dev.lock().unwrap().request_stats();
        v.run().wake();
    }
    let deadline = Instant::now() + FRESH_STATS_WAIT;
    loop {
        let snapshot = dev.lock().unwrap().snapshot();
        if !asked || snapshot.stats_updates > before || Instant::now() >= deadline {
            return snapshot;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

const POLICY_OFF: &str = "the free-memory policy is off (start vmm run with --policy on)";

fn run(req: Request, host: &HostShared) -> Result<Reply, String> {
    let vms = host.vms();
    let tps = || host.sharing().ok_or("page sharing is off (start vmm run with --tps on)");
    let swapper_of = |v: &VmShared| host.vm(v.name()).and_then(|(i, _)| host.swapper(i));
    match req {
        Request::Vms => Ok(Reply::Vms(vms.iter().map(|v| v.name().to_string()).collect())),
        Request::BalloonSet { size, vm } => {
            let bytes = parse_size(&size).map_err(|e| e.to_string())?;
            let targets = select(vms, vm.as_deref())?;
            // Check every VM before changing any.
            for v in &targets {
                if v.balloon().is_none() {
                    return Err(format!("vm {} has no balloon device", v.name()));
                }
                check_size(bytes, v.ram().size()).map_err(|e| format!("vm {}: {e}", v.name()))?;
            }
            per_vm(&targets, |v| {
                v.set_balloon_target(bytes).map_err(|e| e.to_string())?;
                Ok(BalloonTarget { target_bytes: bytes, target_mode: TargetMode::Pinned })
            })
            .map(Reply::BalloonSet)
        }
        Request::BalloonAuto { vm } => {
            let targets = select(vms, vm.as_deref())?;
            if let Some(v) = targets.iter().find(|v| v.balloon().is_none()) {
                return Err(format!("vm {} has no balloon device", v.name()));
            }
            let set = per_vm(&targets, |v| {
                let s = v.release_balloon_target().map_err(|e| e.to_string())?;
                Ok(BalloonTarget { target_bytes: s.target_pages * guest_abi::PAGE_SIZE, target_mode: s.target_mode })
            })?;
            Ok(Reply::BalloonAuto(set))
        }
        Request::BalloonStats { vm } => per_vm(&select(vms, vm.as_deref())?, |v| {
            let dev = v.balloon().ok_or_else(|| format!("vm {} has no balloon device", v.name()))?;
            Ok(fresh_balloon_stats(v, dev))
        })
        .map(Reply::BalloonStats),
        Request::VmStats { vm } => per_vm(&select(vms, vm.as_deref())?, |v| {
            let mut stats = v.stats();
            stats.swap = swapper_of(v).map(|sw| sw.stats());
            stats.alloc = host.policy().and_then(|p| p.allocation(v.name()));
            Ok(stats)
        })
        .map(Reply::VmStats),
        Request::Command { vm, workload, timeout_s } => {
            let target = select(vms, Some(&vm))?[0];
            let timeout =
                Duration::try_from_secs_f64(timeout_s.unwrap_or(60.0)).map_err(|e| format!("bad timeout: {e}"))?;
            let out = target.run_command(&workload, timeout)?;
            let lines = out.lines.iter().map(|l| ConsoleLine::parse(l)).collect();
            Ok(Reply::Command(CommandResult { status: out.status, lines }))
        }
        Request::TpsStats => Ok(Reply::TpsStats(tps()?.stats().into())),
        Request::TpsSet { options } => Ok(Reply::TpsSet(tps()?.set_options(&options).map_err(|e| e.to_string())?)),
        Request::SwapOut { size, vm } => {
            let bytes = parse_size(&size).map_err(|e| e.to_string())?;
            let v = select(vms, Some(&vm))?[0];
            let sw = swapper_of(v).ok_or_else(|| format!("vm {} has no swapper (run with --swap)", v.name()))?;
            crate::reclaim::swap::swap_out(&sw, bytes).map(Reply::SwapOut).map_err(|e| e.to_string())
        }
        Request::SwapStats { vm } => {
            let vms = per_vm(&select(vms, vm.as_deref())?, |v| Ok(swapper_of(v).map(|sw| sw.stats())))?;
            Ok(Reply::SwapStats(SwapStatsResult { vms }))
        }
        Request::PolicyStats => {
            let policy = host.policy_stats().ok_or(POLICY_OFF)?;
            Ok(Reply::PolicyStats(policy))
        }
        Request::Sample => Ok(Reply::Sample(Box::new(HostSample::take(host)))),
        Request::PolicySet { idle_tax } => {
            let tau = host.policy().ok_or(POLICY_OFF)?.set_idle_tax(idle_tax).map_err(|e| e.to_string())?;
            Ok(Reply::PolicySet(PolicySetResult { idle_tax: tau }))
        }
        Request::SharesSet { vm, shares } => {
            let shares = policy::Shares::parse(&shares).map_err(|e| e.to_string())?;
            let v = select(vms, Some(&vm))?[0];
            let set = host.policy().ok_or(POLICY_OFF)?.set_shares(v.name(), shares).map_err(|e| e.to_string())?;
            Ok(Reply::SharesSet([(v.name().to_string(), set)].into()))
        }
    }
}
