//! The control API: one Unix socket per host process (mode 0600), one JSON request
//! per line, one JSON response per line.
//!
//! Requests: `{"cmd": "balloon_set", "size": "128M", "vm": "vm0"}`,
//! `{"cmd": "balloon_stats"}`, `{"cmd": "vm_stats"}`, `{"cmd": "vms"}`,
//! `{"cmd": "command", "vm": "vm0", "workload": "verify"}`, `{"cmd": "tps_stats"}`,
//! `{"cmd": "tps_set", "options": "rate=50M/s,scope=vm"}`,
//! `{"cmd": "swap_out", "size": "64M", "vm": "vm0"}`, `{"cmd": "swap_stats"}`. Without `"vm"`, a
//! request applies to every VM. Responses: `{"ok": true, "result": ...}` or
//! `{"ok": false, "error": "..."}`. A malformed request gets an error response;
//! nothing a client sends can stop the VMM.
//!
//! [`server`] serves it inside `vmm run` over the socket of [`listener`], which
//! also bounds what a client may hold; [`client`] is `vmm ctl`.

pub mod client;
pub mod listener;
pub mod server;

use serde::{Deserialize, Serialize};

/// A request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// List the VMs.
    Vms,
    /// Set the balloon target (`size`: bytes with K/M/G suffix).
    BalloonSet {
        /// Target size.
        size: String,
        /// VM name; every VM if absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vm: Option<String>,
    },
    /// Balloon counters and the guest's latest statistics.
    BalloonStats {
        /// VM name; every VM if absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vm: Option<String>,
    },
    /// Memory figures and counters of the VMs.
    VmStats {
        /// VM name; every VM if absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vm: Option<String>,
    },
    /// Run a program of the workload language in a serving test guest.
    Command {
        /// VM name (required).
        vm: String,
        /// The program.
        workload: String,
        /// Give up after this many seconds (default 60).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_s: Option<f64>,
    },
    /// Page sharing counters (the process's scanner covers every VM).
    TpsStats,
    /// Change page sharing at run time, in `--tps` syntax (`off`, `rate=...`, ...).
    TpsSet {
        /// The options.
        options: String,
    },
    /// Evict up to `size` of a VM's memory to its swap file now.
    SwapOut {
        /// How much (bytes with K/M/G suffix).
        size: String,
        /// VM name (required).
        vm: String,
    },
    /// The host swapper's counters and the free-memory policy's state and history.
    SwapStats {
        /// VM name; every VM if absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vm: Option<String>,
    },
}

/// A response.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Its result when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Why not when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    /// A success.
    pub fn ok(result: serde_json::Value) -> Self {
        Response { ok: true, result: Some(result), error: None }
    }
    /// A failure.
    pub fn err(error: impl Into<String>) -> Self {
        Response { ok: false, result: None, error: Some(error.into()) }
    }
}

/// The default socket path of the process `pid`.
pub fn default_socket(pid: u32) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("vmm-{pid}.sock"))
}
