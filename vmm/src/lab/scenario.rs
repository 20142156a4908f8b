//! The scenario file of `vmm lab`: VMs, the host memory the policy watches, the
//! reclaimers, and timed events; read from TOML and checked before anything boots.
//!
//! ```toml
//! name = "states"
//! duration = "60s"
//! sample = "1s"                 # sampling interval (default 1 s)
//! [host]
//! budget = "512M"               # default: the sum of the VMs' memory; or "host"
//! tps = "on,rate=0"             # page sharing, `--tps` syntax ("off": none)
//! swap = true                   # a host swapper per VM
//! policy = true                 # the free-memory policy (default on)
//! idle_tax = 0.75               # the idle memory tax at the start
//! realloc_period = "1s"         # allocation targets recomputed this often
//! active_period = "5s"          # the active-memory sampler's period ("0s": off)
//! active_samples = 100          # pages it watches per period
//! [[vm]]
//! name = "a"
//! mem = "128M"
//! count = 2                     # a0, a1 (default 1: the name as is)
//! stagger = "10s"               # copy k idles k x 10 s before its workload
//! limit = "96M"
//! workload = "alloc 96M unique"
//! [[event]]
//! at = "20s"
//! budget = "-64M"               # one action: budget (SIZE, -SIZE, +SIZE),
//!                               # balloon (+ vm), command (+ vm), tps, tax,
//!                               # shares (+ vm)
//! [quick]                       # --quick: these keys replace the ones above
//! duration = "30s"
//! ```
//!
//! Every mistake is one line naming the place: an unknown key, a VM an event names
//! that does not exist, events out of order or past the end, a budget below the
//! VMs' reservations.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Deserialize;

use crate::units::{parse_duration, parse_size, UnitError};

/// Why a scenario cannot run.
/// The most VMs a scenario may start (all `count`s together).
const MAX_VMS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// Not TOML, or keys the format does not have.
    #[error("scenario {name}: {msg}")]
    Toml {
        /// The scenario (file or built-in name).
        name: String,
        /// What the TOML reader said, on one line.
        msg: String,
    },
    /// A size or duration that does not read.
    #[error("scenario {name}: {what}: {source}")]
    Unit {
        /// The scenario.
        name: String,
        /// Which value.
        what: String,
        /// Why.
        source: UnitError,
    },
    /// Values that read but do not fit together.
    #[error("scenario {name}: {msg}")]
    Invalid {
        /// The scenario.
        name: String,
        /// What is wrong.
        msg: String,
    },
}

/// A scenario as its file says it (durations and sizes still text).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: Option<String>,
    #[serde(default)]
    description: String,
    duration: String,
    sample: Option<String>,
    #[serde(default)]
    host: RawHost,
    #[serde(default, rename = "vm")]
    vms: Vec<RawVm>,
    #[serde(default, rename = "event")]
    events: Vec<RawEvent>,
    /// Read before the rest (`--quick` merges it over the scenario).
    #[serde(default)]
    #[allow(dead_code)]
    quick: Option<toml::Table>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    budget: Option<String>,
    tps: Option<String>,
    #[serde(default)]
    swap: bool,
    policy: Option<bool>,
    idle_tax: Option<f64>,
    realloc_period: Option<String>,
    active_period: Option<String>,
    active_samples: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    name: String,
    mem: String,
    #[serde(default = "one")]
    vcpus: u32,
    #[serde(default = "one")]
    count: u32,
    stagger: Option<String>,
    limit: Option<String>,
    min: Option<String>,
    shares: Option<String>,
    workload: String,
    #[serde(default = "yes")]
    balloon: bool,
    #[serde(default = "yes")]
    free_page_reporting: bool,
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    at: String,
    vm: Option<String>,
    budget: Option<String>,
    balloon: Option<String>,
    command: Option<String>,
    tps: Option<String>,
    tax: Option<f64>,
    shares: Option<String>,
}

/// Host memory the policy watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostMemory {
    /// The real host (`/proc/meminfo`).
    Host,
    /// A budget, bytes.
    Budget(u64),
}

/// A checked scenario.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Its name.
    pub name: String,
    /// What it shows.
    pub description: String,
    /// How long it runs.
    pub duration: Duration,
    /// Sampling interval.
    pub sample: Duration,
    /// Host memory the policy watches.
    pub host_memory: HostMemory,
    /// Page sharing settings (`--tps` syntax), if on.
    pub tps: Option<String>,
    /// A swapper per VM.
    pub swap: bool,
    /// The free-memory policy.
    pub policy: bool,
    /// The idle memory tax at the start (None: the policy's default).
    pub idle_tax: Option<f64>,
    /// How often the policy recomputes allocation targets (None: its default).
    pub realloc_period: Option<Duration>,
    /// The active-memory sampler: period and pages per period (None: its
    /// defaults; a period of 0: off).
    pub active: (Option<Duration>, Option<u32>),
    /// The VMs, copies expanded.
    pub vms: Vec<LabVm>,
    /// The events, in time order.
    pub events: Vec<Event>,
}

/// One VM of a scenario.
#[derive(Clone, Debug)]
pub struct LabVm {
    /// Its name.
    pub name: String,
    /// Guest RAM, bytes.
    pub mem: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Resident memory limit, bytes.
    pub limit: Option<u64>,
    /// Reservation, bytes (what the policy never takes).
    pub min: u64,
    /// Shares.
    pub shares: policy::Shares,
    /// Boot workload (with the copy's stagger idle in front).
    pub workload: String,
    /// Whether it has a balloon.
    pub balloon: bool,
    /// Whether its balloon reports free pages.
    pub free_page_reporting: bool,
}

/// A timed event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// When, from the start.
    pub at: Duration,
    /// What.
    pub action: Action,
}

/// What an event does.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Set the host-memory budget, bytes (a relative step in the file is made
    /// absolute when the scenario is read).
    Budget(u64),
    /// Set (and pin) a VM's balloon target, bytes.
    Balloon {
        /// The VM.
        vm: String,
        /// The target.
        bytes: u64,
    },
    /// Run a workload program in a VM (the guest must serve commands).
    Command {
        /// The VM.
        vm: String,
        /// The program.
        workload: String,
    },
    /// Change page sharing's settings (`--tps` syntax).
    Tps(String),
    /// Set the idle memory tax.
    Tax(f64),
    /// Set a VM's shares.
    Shares {
        /// The VM.
        vm: String,
        /// Its shares.
        shares: policy::Shares,
    },
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Budget(b) => write!(f, "budget {}", crate::units::format_size(*b)),
            Action::Balloon { vm, bytes } => write!(f, "balloon {vm} {}", crate::units::format_size(*bytes)),
            Action::Command { vm, workload } => write!(f, "command {vm}: {workload}"),
            Action::Tps(o) => write!(f, "tps {o}"),
            Action::Tax(t) => write!(f, "tax {t}"),
            Action::Shares { vm, shares } => write!(f, "shares {vm} {shares}"),
        }
    }
}

/// `--quick`: the `[quick]` table's keys replace the scenario's (tables merge key
/// by key, arrays and values are replaced whole).
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

impl Scenario {
    /// Reads a scenario from TOML text; `origin` names it in errors (a file or a
    /// built-in name) and is its name if the file gives none.
    pub fn parse(text: &str, origin: &str, quick: bool) -> Result<Scenario, ScenarioError> {
        let toml_err = |e: &dyn std::fmt::Display| ScenarioError::Toml {
            name: origin.to_string(),
            msg: e.to_string().split_whitespace().collect::<Vec<_>>().join(" "),
        };
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| toml_err(&e))?;
        if let Some(q) = table.remove("quick") {
            let toml::Value::Table(q) = q else { return Err(toml_err(&"quick must be a table")) };
            if quick {
                merge(&mut table, q);
            }
        }
        let raw: RawScenario = table.try_into().map_err(|e: toml::de::Error| toml_err(&e))?;
        raw.check(origin)
    }

    /// The reservations of every VM, bytes.
    pub fn reservations(&self) -> u64 {
        self.vms.iter().map(|v| v.min).sum()
    }
}

impl RawScenario {
    fn check(self, origin: &str) -> Result<Scenario, ScenarioError> {
        let name = self.name.clone().unwrap_or_else(|| origin.to_string());
        let unit = |what: &str, source| ScenarioError::Unit { name: name.clone(), what: what.to_string(), source };
        let invalid = |msg: String| ScenarioError::Invalid { name: name.clone(), msg };
        let dur = |what: &str, text: &str| parse_duration(text).map_err(|e| unit(what, e));
        let size = |what: &str, text: &str| parse_size(text).map_err(|e| unit(what, e));
        let duration = dur("duration", &self.duration)?;
        if duration.is_zero() {
            return Err(invalid("duration must be more than 0".into()));
        }
        let sample = match &self.sample {
            Some(s) => dur("sample", s)?,
            None => Duration::from_secs(1),
        };
        if sample < Duration::from_millis(100) || sample > duration {
            return Err(invalid(format!("sample {sample:?}: between 100ms and the duration")));
        }
        let mut vms = Vec::new();
        for v in &self.vms {
            let what = |k: &str| format!("vm {} {k}", v.name);
            let mem = size(&what("mem"), &v.mem)?;
            let stagger = v.stagger.as_deref().map(|s| dur(&what("stagger"), s)).transpose()?;
            let limit = v.limit.as_deref().map(|s| size(&what("limit"), s)).transpose()?;
            let min = v.min.as_deref().map(|s| size(&what("min"), s)).transpose()?.unwrap_or(0);
            if v.count == 0 {
                return Err(invalid(format!("vm {}: count must be at least 1", v.name)));
            }
            if vms.len() as u64 + u64::from(v.count) > MAX_VMS as u64 {
                return Err(invalid(format!("vm {}: more than {MAX_VMS} VMs in all", v.name)));
            }
            crate::config::check_workload(&v.workload).map_err(|e| invalid(format!("vm {} workload: {e}", v.name)))?;
            let shares = match &v.shares {
                Some(t) => policy::Shares::parse(t).map_err(|e| invalid(format!("vm {} shares: {e}", v.name)))?,
                None => policy::Shares::default(),
            };
            if min > mem {
                return Err(invalid(format!("vm {}: min {} above its memory", v.name, v.min.as_deref().unwrap())));
            }
            for k in 0..v.count {
                let name = if v.count == 1 { v.name.clone() } else { format!("{}{k}", v.name) };
                let delay = stagger.map_or(0, |s| (s.as_millis() as u64).saturating_mul(u64::from(k)));
                let workload = if delay > 0 { format!("idle {delay}ms; {}", v.workload) } else { v.workload.clone() };
                vms.push(LabVm {
                    name,
                    mem,
                    vcpus: v.vcpus,
                    limit,
                    min,
                    shares,
                    workload,
                    balloon: v.balloon,
                    free_page_reporting: v.free_page_reporting,
                });
            }
        }
        if vms.is_empty() {
            return Err(invalid("no [[vm]]".into()));
        }
        let names: BTreeSet<&str> = vms.iter().map(|v| v.name.as_str()).collect();
        if names.len() != vms.len() {
            return Err(invalid("two VMs have the same name".into()));
        }
        let host_memory = match self.host.budget.as_deref() {
            Some("host") => HostMemory::Host,
            Some(b) => HostMemory::Budget(size("host budget", b)?),
            None => HostMemory::Budget(vms.iter().map(|v| v.mem).sum()),
        };
        let policy = self.host.policy.unwrap_or(true);
        let reservations: u64 = vms.iter().map(|v| v.min).sum();
        let budget_below = |b: u64| {
            invalid(format!(
                "budget {} is below the VMs' reservations ({} in all)",
                crate::units::format_size(b),
                crate::units::format_size(reservations)
            ))
        };
        if let HostMemory::Budget(b) = host_memory {
            if b < reservations {
                return Err(budget_below(b));
            }
        }
        let mut events = Vec::new();
        let mut last = Duration::ZERO;
        // The budget in force as the events change it (relative steps read from it).
        let mut budget = match host_memory {
            HostMemory::Budget(b) => Some(b),
            HostMemory::Host => None,
        };
        for (i, e) in self.events.iter().enumerate() {
            let at = dur(&format!("event {} at", i + 1), &e.at)?;
            let here = |msg: String| invalid(format!("event {} (at {}): {msg}", i + 1, e.at));
            if at < last {
                return Err(here(format!("out of order: before the event before it ({last:?})")));
            }
            if at >= duration {
                return Err(here(format!("after the end of the scenario ({})", self.duration)));
            }
            last = at;
            let vm = || -> Result<String, ScenarioError> {
                let vm = e.vm.clone().ok_or_else(|| here("this action needs vm = NAME".into()))?;
                if !names.contains(vm.as_str()) {
                    let all: Vec<&str> = names.iter().copied().collect();
                    return Err(here(format!("no VM named {vm:?} (VMs: {})", all.join(", "))));
                }
                Ok(vm)
            };
            let actions = [
                e.budget.is_some(),
                e.balloon.is_some(),
                e.command.is_some(),
                e.tps.is_some(),
                e.tax.is_some(),
                e.shares.is_some(),
            ];
            if actions.iter().filter(|a| **a).count() != 1 {
                return Err(here("exactly one action: budget, balloon, command, tps, tax or shares".into()));
            }
            let action = if let Some(text) = &e.budget {
                let (Some(now), true) = (budget, policy) else {
                    return Err(here("a budget event needs the policy watching a budget".into()));
                };
                let what = format!("event {} budget", i + 1);
                let b = match (text.strip_prefix('-'), text.strip_prefix('+')) {
                    (Some(d), _) => now.saturating_sub(size(&what, d)?),
                    (_, Some(d)) => now.saturating_add(size(&what, d)?),
                    _ => size(&what, text)?,
                };
                if b == 0 {
                    return Err(here("the budget would be 0".into()));
                }
                budget = Some(b);
                if b < reservations {
                    return Err(here(budget_below(b).to_string()));
                }
                Action::Budget(b)
            } else if let Some(b) = &e.balloon {
                Action::Balloon { vm: vm()?, bytes: size(&format!("event {} balloon", i + 1), b)? }
            } else if let Some(t) = e.tax {
                if !policy {
                    return Err(here("a tax event needs the policy".into()));
                }
                Action::Tax(policy::check_tax(t).map_err(|err| here(err.to_string()))?)
            } else if let Some(sh) = &e.shares {
                if !policy {
                    return Err(here("a shares event needs the policy".into()));
                }
                Action::Shares { vm: vm()?, shares: policy::Shares::parse(sh).map_err(|err| here(err.to_string()))? }
            } else if let Some(w) = &e.command {
                crate::config::check_workload(w).map_err(|err| here(err.to_string()))?;
                Action::Command { vm: vm()?, workload: w.clone() }
            } else {
                let t = e.tps.clone().unwrap_or_default();
                if self.host.tps.as_deref().is_none_or(|t| t == "off") {
                    return Err(here("a tps event needs page sharing on ([host] tps)".into()));
                }
                crate::reclaim::sharing::parse_options(&t, tps::Config::default())
                    .map_err(|err| here(err.to_string()))?;
                Action::Tps(t)
            };
            events.push(Event { at, action });
        }
        if let Some(t) = &self.host.tps {
            crate::reclaim::sharing::parse_options(t, tps::Config::default())
                .map_err(|e| invalid(format!("host tps: {e}")))?;
        }
        if (self.host.swap || vms.iter().any(|v| v.limit.is_some())) && !policy {
            return Err(invalid("swap and limits need the policy (host policy = true)".into()));
        }
        if let Some(t) = self.host.idle_tax {
            policy::check_tax(t).map_err(|e| invalid(format!("host idle_tax: {e}")))?;
        }
        let realloc_period = self.host.realloc_period.as_deref().map(|d| dur("host realloc_period", d)).transpose()?;
        let active_period = self.host.active_period.as_deref().map(|d| dur("host active_period", d)).transpose()?;
        if self.host.active_samples == Some(0) {
            return Err(invalid("host active_samples must be at least 1".into()));
        }
        Ok(Scenario {
            name,
            description: self.description,
            duration,
            sample,
            host_memory,
            tps: self.host.tps.filter(|t| t != "off"),
            swap: self.host.swap,
            policy,
            idle_tax: self.host.idle_tax,
            realloc_period,
            active: (active_period, self.host.active_samples),
            vms,
            events,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        name = "t"
        duration = "60s"
        [host]
        tps = "on"
        [[vm]]
        name = "a"
        mem = "128M"
        workload = "alloc 64M unique"
        [[vm]]
        name = "b"
        mem = "64M"
        count = 3
        stagger = "5s"
        workload = "alloc 8M dup"
    "#;

    fn parse(extra: &str) -> Result<Scenario, String> {
        Scenario::parse(&format!("{BASE}\n{extra}"), "t.toml", false).map_err(|e| e.to_string())
    }

    #[test]
    fn a_scenario_reads_with_its_copies_events_and_defaults() {
        let s = parse(
            r#"
            [[event]]
            at = "10s"
            budget = "200M"
            [[event]]
            at = "10s"
            vm = "b2"
            command = "touch 4M"
            [[event]]
            at = "15s"
            budget = "-8M"
            [[event]]
            at = "20s"
            vm = "a"
            balloon = "32M"
            [[event]]
            at = "30s"
            tps = "rate=0"
            "#,
        )
        .unwrap();
        let names: Vec<&str> = s.vms.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["a", "b0", "b1", "b2"]);
        assert_eq!(s.vms[1].workload, "alloc 8M dup");
        assert_eq!(s.vms[3].workload, "idle 10000ms; alloc 8M dup");
        assert_eq!(s.host_memory, HostMemory::Budget(320 << 20), "the VMs' memory by default");
        assert_eq!(s.sample, Duration::from_secs(1));
        assert!(s.policy && !s.swap);
        let actions: Vec<String> = s.events.iter().map(|e| e.action.to_string()).collect();
        assert_eq!(actions, ["budget 200M", "command b2: touch 4M", "budget 192M", "balloon a 32M", "tps rate=0"]);
    }

    #[test]
    fn quick_replaces_what_it_names() {
        let text = format!("{BASE}\n[quick]\nduration = \"20s\"\n[quick.host]\ntps = \"off\"");
        let full = Scenario::parse(&text, "t", false).unwrap();
        let quick = Scenario::parse(&text, "t", true).unwrap();
        assert_eq!((full.duration, quick.duration), (Duration::from_secs(60), Duration::from_secs(20)));
        assert_eq!((full.tps.as_deref(), quick.tps), (Some("on"), None));
        assert_eq!(quick.vms.len(), 4, "what [quick] does not name stays");
    }

    #[test]
    fn mistakes_are_one_line_naming_the_place() {
        let cases = [
            (
                "[[event]]\nat = \"5s\"\nvm = \"zz\"\nballoon = \"1M\"",
                "event 1 (at 5s): no VM named \"zz\" (VMs: a, b0, b1, b2)",
            ),
            (
                "[[event]]\nat = \"20s\"\nbudget = \"300M\"\n[[event]]\nat = \"10s\"\nbudget = \"300M\"",
                "event 2 (at 10s): out of order",
            ),
            ("[[event]]\nat = \"60s\"\nbudget = \"300M\"", "after the end of the scenario"),
            ("[[event]]\nat = \"1s\"\nbudget = \"300M\"\ntps = \"off\"", "exactly one action"),
            ("[[event]]\nat = \"1s\"\ntax = 1.0", "event 1 (at 1s): "),
            ("[[event]]\nat = \"1s\"\nvm = \"a\"\nshares = \"lots\"", "bad shares \"lots\""),
            ("[[event]]\nat = \"1s\"\nballoon = \"1M\"", "needs vm = NAME"),
            ("[[event]]\nat = \"1s\"\nvm = \"a\"\ncommand = \"alocc 1M\"", "unknown step"),
            ("[[event]]\nat = \"soon\"\nbudget = \"1M\"", "event 1 at:"),
            ("[[event]]\nat = \"1s\"\nbudget = \"1M\"\ncolour = 3", "unknown field `colour`"),
            ("[[vm]]\nname = \"c\"\nmem = \"64M\"\nworkload = \"fill 1M\"", "vm c workload: "),
            (
                "[[vm]]\nname = \"c\"\nmem = \"64M\"\nworkload = \"idle 1s\"\ncount = 4000000000\nstagger = \"1s\"",
                "vm c: more than 64 VMs in all",
            ),
        ];
        for (extra, want) in cases {
            let e = parse(extra).unwrap_err();
            assert!(e.contains(want), "{extra:?}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
            assert!(e.starts_with("scenario "), "{e}");
        }
    }

    #[test]
    fn a_budget_below_the_reservations_is_refused() {
        let text = r#"
            duration = "10s"
            [host]
            budget = "100M"
            [[vm]]
            name = "a"
            mem = "128M"
            min = "64M"
            count = 2
            workload = "alloc 1M unique"
        "#;
        let e = Scenario::parse(text, "r.toml", false).unwrap_err().to_string();
        assert_eq!(e, "scenario r.toml: budget 100M is below the VMs' reservations (128M in all)");
        let s = Scenario::parse(&text.replace("100M", "1G"), "r.toml", false).unwrap();
        assert_eq!(s.reservations(), 128 << 20);
    }

    #[test]
    fn every_builtin_scenario_reads_full_and_quick() {
        for (name, text) in super::super::BUILTIN {
            for quick in [false, true] {
                let s = Scenario::parse(text, name, quick).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(s.name, name);
                for v in &s.vms {
                    crate::config::check_workload(&v.workload).unwrap();
                }
            }
        }
    }
}
