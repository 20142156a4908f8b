//! Serves the control API inside `vmm run`: an accept thread, a thread per
//! connection (a `command` request may wait on the guest for a long time).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{Request, Response};
use crate::config::parse_size;
use crate::devices::virtio::balloon::device::check_size;
use crate::devices::virtio::balloon::metrics::BalloonSnapshot;
use crate::devices::virtio::balloon::Balloon;
use crate::reclaim::sharing::{self, PageSharing};
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
    /// Listens on `path` (mode 0600) for requests about `vms` and their page sharing.
    /// A stale socket left by a dead process is replaced; a live one is an error.
    pub fn start(path: &Path, vms: Vec<Arc<VmShared>>, tps: Option<Arc<PageSharing>>) -> Result<Server, String> {
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
        let vms = Arc::new(Targets { vms, tps });
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || accept_loop(listener, vms, stop2))
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

/// What requests act on.
pub struct Targets {
    /// The VMs of the process.
    pub vms: Vec<Arc<VmShared>>,
    /// Page sharing, if on.
    pub tps: Option<Arc<PageSharing>>,
}

fn accept_loop(listener: UnixListener, vms: Arc<Targets>, stop: Arc<AtomicBool>) {
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

fn serve(stream: UnixStream, vms: &Targets) {
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
pub fn handle(req: Request, vms: &Targets) -> Response {
    match run(req, vms) {
        Ok(v) => Response::ok(v),
        Err(e) => Response::err(e),
    }
}

fn select<'a>(vms: &'a [Arc<VmShared>], name: Option<&str>) -> Result<Vec<&'a Arc<VmShared>>, String> {
    match name {
        None => Ok(vms.iter().collect()),
        Some(n) => vms.iter().find(|v| v.name == n).map(|v| vec![v]).ok_or_else(|| {
            let names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
            format!("no VM named {n:?} (VMs: {})", names.join(", "))
        }),
    }
}

fn per_vm(vms: &[&Arc<VmShared>], f: impl Fn(&VmShared) -> Result<Value, String>) -> Result<Value, String> {
    let mut out = serde_json::Map::new();
    for vm in vms {
        out.insert(vm.name.clone(), f(vm)?);
    }
    Ok(Value::Object(out))
}

/// Asks the guest for fresh statistics and waits up to [`FRESH_STATS_WAIT`] for
/// them; a guest that is busy (its driver polls between workload steps) or has no
/// statistics queue gets its latest numbers reported, with their age.
fn fresh_balloon_stats(v: &VmShared, dev: &Mutex<Balloon>) -> BalloonSnapshot {
    let before = dev.lock().unwrap().snapshot().stats_updates;
    let mut asked = false;
    if let Some(_busy) = v.run.device_guard() {
        asked = dev.lock().unwrap().request_stats();
        v.run.wake();
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

fn run(req: Request, targets: &Targets) -> Result<Value, String> {
    let vms = &targets.vms[..];
    let tps = || targets.tps.as_ref().ok_or("page sharing is off (start vmm run with --tps on)");
    match req {
        Request::Vms => Ok(json!(vms.iter().map(|v| &v.name).collect::<Vec<_>>())),
        Request::BalloonSet { size, vm } => {
            let bytes = parse_size(&size)?;
            let targets = select(vms, vm.as_deref())?;
            // Check every VM before changing any.
            for v in &targets {
                if v.balloon.is_none() {
                    return Err(format!("vm {} has no balloon device", v.name));
                }
                check_size(bytes, v.ram.size()).map_err(|e| format!("vm {}: {e}", v.name))?;
            }
            per_vm(&targets, |v| {
                let dev = v.balloon.as_ref().expect("checked above");
                dev.lock().unwrap().set_target(bytes)?;
                v.run.wake();
                Ok(json!({ "target_bytes": bytes }))
            })
        }
        Request::BalloonStats { vm } => per_vm(&select(vms, vm.as_deref())?, |v| {
            let dev = v.balloon.as_ref().ok_or_else(|| format!("vm {} has no balloon device", v.name))?;
            serde_json::to_value(fresh_balloon_stats(v, dev)).map_err(|e| e.to_string())
        }),
        Request::VmStats { vm } => per_vm(&select(vms, vm.as_deref())?, |v| Ok(v.stats())),
        Request::Command { vm, workload, timeout_s } => {
            let target = select(vms, Some(&vm))?[0];
            let timeout =
                Duration::try_from_secs_f64(timeout_s.unwrap_or(60.0)).map_err(|e| format!("bad timeout: {e}"))?;
            let out = target.run_command(&workload, timeout)?;
            let lines: Vec<Value> = out
                .lines
                .iter()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|_| Value::String(l.clone())))
                .collect();
            Ok(json!({ "status": out.status, "lines": lines }))
        }
        Request::TpsStats => Ok(sharing::stats_json(&tps()?.stats())),
        Request::TpsSet { options } => {
            let config = tps()?.set_options(&options)?;
            serde_json::to_value(config).map_err(|e| e.to_string())
        }
        Request::SwapOut { size, vm } => {
            let bytes = parse_size(&size)?;
            crate::reclaim::swap::swap_out(select(vms, Some(&vm))?[0], bytes)
        }
        Request::SwapStats { vm } => {
            let targets = select(vms, vm.as_deref())?;
            let policy = targets.iter().find_map(|v| v.swap.policy_stats());
            let per = per_vm(&targets, |v| Ok(json!(v.swap.stats())))?;
            Ok(json!({ "policy": policy, "vms": per }))
        }
    }
}
