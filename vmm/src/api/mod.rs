//! The control API: one Unix socket per host process (mode 0600), one JSON request
//! per line, one JSON response per line.
//!
//! Requests: `{"cmd": "balloon_set", "size": "128M", "vm": "vm0"}`,
//! `{"cmd": "balloon_auto", "vm": "vm0"}`,
//! `{"cmd": "balloon_stats"}`, `{"cmd": "vm_stats"}`, `{"cmd": "vms"}`,
//! `{"cmd": "command", "vm": "vm0", "workload": "verify"}`, `{"cmd": "tps_stats"}`,
//! `{"cmd": "tps_set", "options": "rate=50M/s,scope=vm"}`,
//! `{"cmd": "swap_out", "size": "64M", "vm": "vm0"}`, `{"cmd": "swap_stats"}`,
//! `{"cmd": "policy_stats"}`, `{"cmd": "policy_set", "idle_tax": 0.5}`,
//! `{"cmd": "shares_set", "vm": "vm0", "shares": "high"}`, `{"cmd": "sample"}`
//! (what `vmm top` shows). Without `"vm"`, a
//! request applies to every VM. Responses: `{"ok": true, "result": ...}` or
//! `{"ok": false, "error": "..."}`, where the result of each request is a typed
//! [`Reply`]. A malformed request gets an error response; nothing a client sends
//! can stop the VMM.
//!
//! [`server`] serves it inside `vmm run` over the socket of [`listener`], which
//! also bounds what a client may hold; [`client`] is `vmm ctl`.

pub mod client;
pub mod listener;
pub mod server;

use std::collections::BTreeMap;

use policy::PolicyStats;
use serde::{Deserialize, Serialize};
use swapd::SwapStats;

pub use crate::console::GuestStep;
pub use crate::control::GuestProgress;
pub use crate::devices::virtio::balloon::metrics::BalloonSnapshot;
pub use crate::devices::virtio::balloon::TargetMode;
pub use crate::reclaim::sharing::TpsStats;
pub use crate::reclaim::swap::SwapOutResult;
pub use crate::sample::HostSample;
pub use crate::vm::{VmState, VmStats};

/// A request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// List the VMs.
    Vms,
    /// Set the balloon target (`size`: bytes with K/M/G suffix) and pin it: the
    /// free-memory policy leaves it alone until `balloon_auto`.
    BalloonSet {
        /// Target size.
        size: String,
        /// VM name; every VM if absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vm: Option<String>,
    },
    /// Hand the balloon target back to the free-memory policy (undoes the pin of
    /// `balloon_set`; the target stays where it is until the policy moves it).
    BalloonAuto {
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
    /// The host swapper's counters.
    SwapStats {
        /// VM name; every VM if absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vm: Option<String>,
    },
    /// The free-memory policy's state, history and totals.
    PolicyStats,
    /// One snapshot of the host and every VM ([`HostSample`]): what `vmm top` shows.
    Sample,
    /// Change the free-memory policy at run time: the idle memory tax (0 <= tau < 1).
    PolicySet {
        /// The new tax.
        idle_tax: f64,
    },
    /// Change a VM's shares at run time: a number or `low`, `normal`, `high`.
    SharesSet {
        /// VM name (required).
        vm: String,
        /// The shares.
        shares: String,
    },
}

/// A response.
#[derive(Clone, Debug, Serialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Its result when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Reply>,
    /// Why not when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    /// A success.
    pub fn ok(result: Reply) -> Self {
        Response { ok: true, result: Some(result), error: None }
    }
    /// A failure.
    pub fn err(error: impl Into<String>) -> Self {
        Response { ok: false, result: None, error: Some(error.into()) }
    }
}

/// The result of a request, one variant per [`Request`] variant. On the wire it is
/// the variant's content alone (`"result": {...}`): which variant a result is
/// follows from the request ([`Reply::decode`]). Results per VM are maps from the
/// VM's name.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Reply {
    /// [`Request::Vms`]: the VMs' names.
    Vms(Vec<String>),
    /// [`Request::BalloonSet`]: the target each VM was given (pinned).
    BalloonSet(BTreeMap<String, BalloonTarget>),
    /// [`Request::BalloonAuto`]: each VM's target, handed back to the policy.
    BalloonAuto(BTreeMap<String, BalloonTarget>),
    /// [`Request::BalloonStats`].
    BalloonStats(BTreeMap<String, BalloonSnapshot>),
    /// [`Request::VmStats`].
    VmStats(BTreeMap<String, VmStats>),
    /// [`Request::Command`].
    Command(CommandResult),
    /// [`Request::TpsStats`].
    TpsStats(TpsStats),
    /// [`Request::TpsSet`]: the settings now in force.
    TpsSet(tps::Config),
    /// [`Request::SwapOut`].
    SwapOut(SwapOutResult),
    /// [`Request::SwapStats`].
    SwapStats(SwapStatsResult),
    /// [`Request::PolicyStats`].
    PolicyStats(PolicyStats),
    /// [`Request::Sample`].
    Sample(Box<HostSample>),
    /// [`Request::PolicySet`]: the tax now in force.
    PolicySet(PolicySetResult),
    /// [`Request::SharesSet`]: the VM's shares now.
    SharesSet(BTreeMap<String, policy::Shares>),
}

/// The result of `policy_set`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicySetResult {
    /// The idle memory tax in force from the next tick.
    pub idle_tax: f64,
}

impl Reply {
    /// Reads the result of `req` from its JSON form.
    pub fn decode(req: &Request, result: serde_json::Value) -> Result<Reply, serde_json::Error> {
        use serde_json::from_value as from;
        Ok(match req {
            Request::Vms => Reply::Vms(from(result)?),
            Request::BalloonSet { .. } => Reply::BalloonSet(from(result)?),
            Request::BalloonAuto { .. } => Reply::BalloonAuto(from(result)?),
            Request::BalloonStats { .. } => Reply::BalloonStats(from(result)?),
            Request::VmStats { .. } => Reply::VmStats(from(result)?),
            Request::Command { .. } => Reply::Command(from(result)?),
            Request::TpsStats => Reply::TpsStats(from(result)?),
            Request::TpsSet { .. } => Reply::TpsSet(from(result)?),
            Request::SwapOut { .. } => Reply::SwapOut(from(result)?),
            Request::SwapStats { .. } => Reply::SwapStats(from(result)?),
            Request::PolicyStats => Reply::PolicyStats(from(result)?),
            Request::Sample => Reply::Sample(from(result)?),
            Request::PolicySet { .. } => Reply::PolicySet(from(result)?),
            Request::SharesSet { .. } => Reply::SharesSet(from(result)?),
        })
    }
}

/// A VM's balloon target after `balloon_set` or `balloon_auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonTarget {
    /// The target, bytes.
    pub target_bytes: u64,
    /// Who moves it from now on: the user (pinned) or the policy (auto).
    pub target_mode: TargetMode,
}

/// What a run-time command did (`command`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    /// 0 if every step succeeded.
    pub status: u32,
    /// The lines the guest printed while it ran.
    pub lines: Vec<ConsoleLine>,
}

impl CommandResult {
    /// The step results among its lines.
    pub fn steps(&self) -> impl Iterator<Item = &GuestStep> {
        self.lines.iter().filter_map(|l| match l {
            ConsoleLine::Step(s) => Some(s),
            ConsoleLine::Other(_) => None,
        })
    }
}

/// A line of a guest's console.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ConsoleLine {
    /// A step result.
    Step(GuestStep),
    /// Anything else the guest printed: a JSON value if the line is one (the test
    /// guest's events), else the line as a string.
    Other(serde_json::Value),
}

impl ConsoleLine {
    /// Reads one console line.
    pub fn parse(line: &str) -> ConsoleLine {
        if let Ok(step) = serde_json::from_str(line) {
            return ConsoleLine::Step(step);
        }
        ConsoleLine::Other(serde_json::from_str(line).unwrap_or_else(|_| serde_json::Value::String(line.to_string())))
    }
}

/// The host swappers and the free-memory policy (`swap_stats`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SwapStatsResult {
    /// Each VM's swapper counters (none for a VM without a swapper).
    pub vms: BTreeMap<String, Option<SwapStats>>,
}

/// The default socket path of the process `pid`.
pub fn default_socket(pid: u32) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("vmm-{pid}.sock"))
}

#[cfg(test)]
mod tests {
    use guest_abi::workload::Op;

    use super::*;

    /// The JSON of `reply` as `vmm ctl` prints it: decoded by the request, written out.
    fn through_the_client(req: &Request, reply: &Reply) -> String {
        let wire = serde_json::to_value(reply).unwrap();
        serde_json::to_string(&Reply::decode(req, wire).unwrap()).unwrap()
    }

    fn vm0<T>(value: T) -> BTreeMap<String, T> {
        BTreeMap::from([("vm0".to_string(), value)])
    }

    #[test]
    fn every_reply_reads_back_as_the_server_wrote_it() {
        let stats = VmStats {
            state: VmState::Exited(3),
            mem_mib: 128.0,
            guest_rss_mib: 66.25,
            ballooned_mib: Some(32.0),
            guest: GuestProgress { state: 2, steps_done: 5, ..GuestProgress::default() },
            balloon: Some(BalloonSnapshot { target_pages: 8192, ..BalloonSnapshot::default() }),
            swap: None,
            alloc: Some(crate::reclaim::policy::VmAllocation {
                shares_setting: "high".into(),
                shares: 2560,
                target_mib: 96.5,
                active: Some(Default::default()),
                ..Default::default()
            }),
            pages: Some(pagestate::pagemap::Census { private: 10, shared: 3, zero: 2, absent: 1 }),
        };
        let lines = [
            r#"{"vm":0,"seq":1,"step":5,"op":"verify","pages":3072,"bad":0,"us":812,"result":"ok"}"#,
            r#"{"vm":0,"seq":1,"event":"error","msg":"bad"}"#,
            "not JSON",
        ];
        let vm = || Some("vm0".to_string());
        let cases = [
            (Request::Vms, Reply::Vms(vec!["vm0".into(), "vm1".into()])),
            (
                Request::BalloonSet { size: "4K".into(), vm: vm() },
                Reply::BalloonSet(vm0(BalloonTarget { target_bytes: 4096, target_mode: TargetMode::Pinned })),
            ),
            (
                Request::BalloonAuto { vm: vm() },
                Reply::BalloonAuto(vm0(BalloonTarget { target_bytes: 0, target_mode: TargetMode::Auto })),
            ),
            (Request::BalloonStats { vm: None }, Reply::BalloonStats(vm0(BalloonSnapshot::default()))),
            (Request::VmStats { vm: None }, Reply::VmStats(vm0(stats))),
            (
                Request::Command { vm: "vm0".into(), workload: "verify".into(), timeout_s: None },
                Reply::Command(CommandResult {
                    status: 1,
                    lines: lines.iter().map(|l| ConsoleLine::parse(l)).collect(),
                }),
            ),
            (Request::TpsStats, Reply::TpsStats(tps::Stats { bytes_saved: 3 << 20, ..tps::Stats::default() }.into())),
            (Request::TpsSet { options: "off".into() }, Reply::TpsSet(tps::Config::default())),
            (
                Request::SwapOut { size: "1M".into(), vm: "vm0".into() },
                Reply::SwapOut(SwapOutResult {
                    asked_pages: 256,
                    reclaimed_pages: 3,
                    error: Some("stopped".into()),
                    swapped_pages: 2,
                }),
            ),
            (
                Request::SwapStats { vm: None },
                Reply::SwapStats(SwapStatsResult { vms: vm0(Some(SwapStats::default())) }),
            ),
            (Request::PolicyStats, Reply::PolicyStats(PolicyStats::default())),
            (
                Request::Sample,
                Reply::Sample(Box::new(HostSample {
                    policy: Some(crate::sample::PolicySample {
                        state: policy::FreeState::Soft,
                        total_mib: 512.0,
                        free_mib: 20.5,
                        free_pct: 4.0,
                        idle_tax: 0.75,
                    }),
                    guest_mib: 1.5,
                    sharing: None,
                    vms: vec![crate::sample::VmSample {
                        name: "vm0".into(),
                        state: VmState::Paused,
                        memsz_mib: 128.0,
                        resident_mib: 64.25,
                        target_mib: Some(60.0),
                        active_mib: Some(20.0),
                        active_fast_mib: Some(20.0),
                        active_slow_mib: Some(10.0),
                        shares: Some(1280),
                        balloon_mib: Some(4.0),
                        balloon_target_mib: Some(8.0),
                        balloon_max_mib: Some(83.2),
                        swapped_mib: None,
                        swap_target_mib: None,
                        swap_read_mib: None,
                        swap_written_mib: None,
                        shared_mib: Some(2.0),
                        zero_mib: Some(1.0),
                        saved_mib: Some(2.5),
                        guest_allocated_mib: 64.0,
                        heartbeat: 9,
                        working_set_mib: Some(32.0),
                        work: Some(crate::sample::WorkReport { step: 3, ops_per_sec: 1e5 }),
                    }],
                })),
            ),
            (Request::PolicySet { idle_tax: 0.5 }, Reply::PolicySet(PolicySetResult { idle_tax: 0.5 })),
            (
                Request::SharesSet { vm: "vm0".into(), shares: "300".into() },
                Reply::SharesSet(vm0(policy::Shares::Count(300))),
            ),
        ];
        for (req, reply) in &cases {
            assert_eq!(through_the_client(req, reply), serde_json::to_string(reply).unwrap(), "{req:?}");
        }
        // A result of another request is refused, not misread.
        let wire = serde_json::to_value(&cases[1].1).unwrap();
        assert!(Reply::decode(&Request::SwapOut { size: "1M".into(), vm: "vm0".into() }, wire).is_err());
    }

    #[test]
    fn console_lines_keep_what_the_guest_printed() {
        let step = r#"{"vm":0,"seq":2,"step":5,"op":"verify","pages":3072,"bad":0,"us":812,"result":"ok"}"#;
        let ConsoleLine::Step(s) = ConsoleLine::parse(step) else { panic!("a step line") };
        assert_eq!((s.seq, s.op, s.pages, s.bad), (Some(2), Op::Verify, Some(3072), Some(0)));
        assert_eq!(serde_json::to_string(&ConsoleLine::parse(step)).unwrap(), step);
        let event = r#"{"vm":0,"event":"serving","steps":3}"#;
        assert_eq!(ConsoleLine::parse(event), ConsoleLine::Other(serde_json::from_str(event).unwrap()));
        assert_eq!(ConsoleLine::parse("[  0.1] hello"), ConsoleLine::Other("[  0.1] hello".into()));
    }

    #[test]
    fn vm_states_are_strings_until_the_vm_ends() {
        let json = |s: VmState| serde_json::to_string(&s).unwrap();
        assert_eq!(json(VmState::Running), r#""running""#);
        assert_eq!(json(VmState::Paused), r#""paused""#);
        assert_eq!(json(VmState::Stopping), r#""stopping""#);
        assert_eq!(json(VmState::Exited(3)), r#"{"exited":3}"#);
        assert_eq!(
            json(VmState::Failed("guest stopped responding".into())),
            r#"{"failed":"guest stopped responding"}"#
        );
        assert_eq!(json(VmState::Stopped("interrupted".into())), r#"{"stopped":"interrupted"}"#);
    }
}
