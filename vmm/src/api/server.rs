//! Serves the control API inside `vmm run`: an accept thread, a thread per
//! connection (a `command` request may wait on the guest for a long time).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{BalloonTarget, CommandResult, ConsoleLine, Reply, Request, Response, SwapStatsResult};
use crate::config::parse_size;
use crate::devices::virtio::balloon::device::check_size;
use crate::devices::virtio::balloon::metrics::BalloonSnapshot;
use crate::devices::virtio::balloon::{Balloon, TargetMode};
use crate::host::HostShared;
use crate::vm::VmShared;

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 << 10;
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
    /// reclaimers. A stale socket left by a dead process is replaced; a live one is an
    /// error.
    pub fn start(path: &Path, host: Arc<HostShared>) -> Result<Server, String> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(format!("{} is in use by another vmm", path.display()));
            }
            std::fs::remove_file(path).map_err(|e| format!("removing stale socket {}: {e}", path.display()))?;
        }
        let listener = UnixListener::bind(path).map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("chmod 0600 {}: {e}", path.display()))?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || accept_loop(listener, host, stop2))
            .map_err(|e| e.to_string())?;
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
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, vms: Arc<HostShared>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let vms = vms.clone();
                let spawned = std::thread::Builder::new().name("api-conn".into()).spawn(move || serve(stream, &vms));
                if let Err(e) = spawned {
                    log::warn!("control API: cannot serve a connection: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                log::warn!("control API: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve(stream: UnixStream, vms: &HostShared) {
    let _ = stream.set_nonblocking(false);
    let Ok(mut out) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_REQUEST as u64 + 1).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let response = if line.len() > MAX_REQUEST {
            Response::err(format!("request longer than {MAX_REQUEST} bytes"))
        } else {
            match serde_json::from_str::<Request>(line.trim()) {
                Ok(req) => handle(req, vms),
                Err(e) => Response::err(format!("bad request: {e}")),
            }
        };
        let text = serde_json::to_string(&response).expect("responses serialise");
        if writeln!(out, "{text}").is_err() || line.len() > MAX_REQUEST {
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
            let policy = host.policy_stats().ok_or("the free-memory policy is off (start vmm run with --policy on)")?;
            Ok(Reply::PolicyStats(policy))
        }
    }
}
