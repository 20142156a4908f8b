//! Transparent page sharing over the VMs of this process: one [`tps::Scanner`]
//! covers the RAM of every VM (`--tps`), which is what lets identical pages of
//! different VMs be merged.
//!
//! The scanner sees each VM through its [`ReclaimView`]: it pauses the VM with its
//! reclaim guard for each merge batch, leaves its off-limits pages alone, and
//! attaches itself to the VM's `RamChanges`, so that every discard of guest RAM (the
//! balloon's) reaches it: on a shared page a bare `MADV_DONTNEED` would bring back
//! the pool's content, not zeros.
//!
//! Ownership: the scanner holds the views (and so the RAM, which stays mapped while
//! registered); a VM's `RamChanges` holds the scanner only weakly, which keeps the
//! two from holding each other alive.

use guest_abi::PAGE_SIZE;
use serde::{Deserialize, Serialize};

use super::guest::ReclaimView;
use crate::memory::GuestRam;
use crate::units::{parse_duration, parse_size, UnitError};
use crate::vm::Vm;

/// Page sharing for the VMs of one host process.
pub struct PageSharing {
    scanner: tps::Scanner,
    /// The scanner's number of each VM, in the order given to `start`.
    ids: Vec<tps::VmId>,
}

impl PageSharing {
    /// Starts the scanner over `vms`, created and not yet ended: it covers their RAM
    /// and receives their discards.
    pub fn start(config: tps::Config, vms: &[Vm]) -> Result<PageSharing, tps::Error> {
        let scanner = tps::Scanner::start(config)?;
        let mut ids = Vec::with_capacity(vms.len());
        for vm in vms {
            ids.push(scanner.add_vm(ReclaimView::of(vm.shared()))?);
            if vm.ram().host_pages() == crate::memory::HostPages::Thp {
                log::warn!("vm {}: page sharing splits the transparent huge pages of its RAM", vm.name());
            }
        }
        Ok(PageSharing { scanner, ids })
    }

    /// VM `index` (of the slice given to `start`) has ended: its shares are dropped.
    /// Call it once its vCPU threads have left their loops; later calls do nothing.
    pub fn vm_ended(&self, index: usize) {
        if let Some(&id) = self.ids.get(index) {
            self.scanner.remove_vm(id);
        }
    }

    /// The scanner (for waiting on passes, changing the configuration).
    pub fn scanner(&self) -> &tps::Scanner {
        &self.scanner
    }

    /// Host memory holding the guest RAM `rams` (those it covers): their private pages
    /// plus the pool. (`Pss` would miss pool pages that no guest page has faulted
    /// into its page tables since the merge.)
    pub fn guest_memory_bytes<'a>(&self, rams: impl Iterator<Item = &'a GuestRam>) -> u64 {
        let private: u64 = rams.map(GuestRam::private_bytes).sum();
        private + self.stats().pool_pages * PAGE_SIZE
    }

    /// Page sharing's figures for VM `index` (of the slice given to `start`).
    pub fn vm_sharing(&self, index: usize) -> Option<tps::VmSharing> {
        self.ids.get(index).map(|&id| self.scanner.vm_sharing(id))
    }

    /// The counters.
    pub fn stats(&self) -> tps::Stats {
        self.scanner.stats()
    }

    /// Applies `--tps`-style options to the running scanner; returns the new config.
    pub fn set_options(&self, text: &str) -> Result<tps::Config, TpsOptionsError> {
        let config = parse_options(text, self.scanner.config())?;
        self.scanner.set_config(config.clone());
        Ok(config)
    }
}

/// The scanner's counters as reported (the control API's `tps_stats`, the summary
/// of `vmm run`), with the two figures people look for first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TpsStats {
    /// The counters.
    #[serde(flatten)]
    pub counters: tps::Stats,
    /// `bytes_saved` in MiB.
    pub saved_mib: f64,
    /// `cpu_ns` in milliseconds.
    pub cpu_ms: f64,
}

impl From<tps::Stats> for TpsStats {
    fn from(counters: tps::Stats) -> TpsStats {
        let saved_mib = counters.bytes_saved as f64 / (1u64 << 20) as f64;
        let cpu_ms = counters.cpu_ns as f64 / 1e6;
        TpsStats { counters, saved_mib, cpu_ms }
    }
}

/// `--tps` options that cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum TpsOptionsError {
    /// Nothing given.
    #[error("empty page sharing options (on, off, rate=, period=, scope=)")]
    Empty,
    /// An option this VMM does not know.
    #[error("unknown page sharing option {0:?} (on, off, rate=, period=, scope=global|vm)")]
    Unknown(String),
    /// `scope=` with neither `global` nor `vm`.
    #[error("scope={0}: expected global or vm")]
    Scope(String),
    /// `period=` that is not a duration.
    #[error("period: {0}")]
    Period(#[source] UnitError),
    /// `rate=SIZE/s` with a size that is not one.
    #[error("rate: {0}")]
    RateSize(#[source] UnitError),
    /// `rate=` below one page per second.
    #[error("rate={0}: less than one page per second")]
    RateTooLow(String),
    /// `rate=` neither a number nor a size per second.
    #[error("rate={0}: expected pages per second (e.g. 25600) or a size per second (e.g. 100M/s)")]
    Rate(String),
}

/// Parses `--tps` options on top of `base`: `on`, `off`, `rate=PAGES_PER_S` or
/// `rate=SIZE/s` (e.g. `100M/s`; 0: no limit), `period=DURATION` (pace a full pass
/// over all guest RAM to this; 0: none), `scope=global|vm` (share across VMs, or
/// only within each VM), separated by commas. `off` turns scanning off.
pub fn parse_options(text: &str, base: tps::Config) -> Result<tps::Config, TpsOptionsError> {
    let mut c = base;
    let items: Vec<&str> = text.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if items.is_empty() {
        return Err(TpsOptionsError::Empty);
    }
    for item in items {
        match item.split_once('=') {
            None if item == "on" => c.enabled = true,
            None if item == "off" => c.enabled = false,
            Some(("rate", v)) => c.pages_per_sec = parse_rate(v)?,
            Some(("period", v)) => {
                let d = parse_duration(v).map_err(TpsOptionsError::Period)?;
                c.full_pass = (!d.is_zero()).then_some(d);
            }
            Some(("scope", "global")) => c.cross_vm = true,
            Some(("scope", "vm")) => c.cross_vm = false,
            Some(("scope", v)) => return Err(TpsOptionsError::Scope(v.into())),
            _ => return Err(TpsOptionsError::Unknown(item.into())),
        }
    }
    Ok(c)
}

/// `25600` (pages per second) or `100M/s`, `1G/s`, `512K/s`, `100MB/s`.
fn parse_rate(v: &str) -> Result<u64, TpsOptionsError> {
    match v.strip_suffix("/s") {
        Some(size) => {
            let bytes = parse_size(size).map_err(TpsOptionsError::RateSize)?;
            if bytes != 0 && bytes < PAGE_SIZE {
                return Err(TpsOptionsError::RateTooLow(v.into()));
            }
            Ok(bytes / PAGE_SIZE)
        }
        None => v.parse().map_err(|_| TpsOptionsError::Rate(v.into())),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use pagestate::RunControl;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::memory::HostPages;

    #[test]
    fn options_parse_and_errors_are_one_line() {
        let d = tps::Config::default();
        assert!(parse_options("on", d.clone()).unwrap().enabled);
        assert!(!parse_options("off", d.clone()).unwrap().enabled);
        let c = parse_options("rate=100M/s,period=30s,scope=vm", d.clone()).unwrap();
        assert_eq!((c.pages_per_sec, c.full_pass, c.cross_vm), (25_600, Some(Duration::from_secs(30)), false));
        assert_eq!(parse_options("rate=5000", d.clone()).unwrap().pages_per_sec, 5000);
        assert_eq!(parse_options("rate=0,period=0", d.clone()).unwrap().full_pass, None);
        assert_eq!(parse_options("rate=1G/s", d.clone()).unwrap().pages_per_sec, 262_144);
        for bad in ["", "rate=fast", "rate=100/s", "scope=host", "period=soon", "speed=3", "onn"] {
            let e = parse_options(bad, d.clone()).unwrap_err().to_string();
            assert!(!e.contains('\n') && !e.is_empty(), "{bad}: {e}");
        }
    }

    /// A page the scanner shared reads zero after a discard of guest RAM (what the
    /// balloon does), where a bare `MADV_DONTNEED` would bring the pool back.
    #[test]
    fn discards_of_shared_pages_read_zero() {
        let rams: Vec<Arc<GuestRam>> =
            (0..2).map(|_| Arc::new(GuestRam::new(32 << 20, HostPages::Small).unwrap())).collect();
        let config = tps::Config { pages_per_sec: 0, ..tps::Config::default() };
        let scanner = tps::Scanner::start(config).unwrap();
        let page = [0x5au8; 4096];
        let pages = 256u64;
        for (i, ram) in rams.iter().enumerate() {
            for p in 0..pages {
                ram.mem().write_slice(&page, GuestAddress((1 << 20) + p * PAGE_SIZE)).unwrap();
            }
            let view = ReclaimView::of_ram(&format!("vm{i}"), ram.clone(), Arc::new(RunControl::new(0)));
            scanner.add_vm(view).unwrap();
        }
        // Two passes from now: the first may have started before VM 1 was added,
        // and passes over VM 0 alone may have ended while VM 1 was being written.
        let done = scanner.stats().full_passes;
        assert!(scanner.wait_passes(done + 2, Duration::from_secs(120)), "no progress");
        assert!(scanner.stats().pool_mapped_pages >= 2 * pages, "{:?}", scanner.stats());
        // Without the scanner's reset the discarded page would read 0x5a again.
        let (target, other) = (&rams[0], &rams[1]);
        target.discard(1 << 20, pages * PAGE_SIZE).unwrap();
        let mut back = [1u8; 4096];
        for p in 0..pages {
            target.mem().read_slice(&mut back, GuestAddress((1 << 20) + p * PAGE_SIZE)).unwrap();
            assert!(back.iter().all(|&b| b == 0), "page {p} reads {:#x} after discard", back[0]);
            other.mem().read_slice(&mut back, GuestAddress((1 << 20) + p * PAGE_SIZE)).unwrap();
            assert_eq!(back, page, "the other VM keeps its content");
        }
    }
}
