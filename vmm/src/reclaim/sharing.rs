//! Transparent page sharing over the VMs of this process: one [`tps::Scanner`]
//! covers the RAM of every VM (`--tps`), which is what lets identical pages of
//! different VMs be merged.
//!
//! The scanner needs three things from the VMM ([`tps::VmControl`]), given here:
//! - **pause**: the VM's [`RunControl::reclaim_guard`], which parks every vCPU
//!   outside `KVM_RUN`, waits for the device threads to leave guest memory, and
//!   keeps the swapper's evictions of that VM out while a batch is merged; pauses
//!   nest, so a merge batch and an API pause never resume each other's VM early;
//! - **skip_page**: pages in the balloon (one bit each, read without a lock) and the
//!   first megabyte (boot information, the control page that the VMM writes without
//!   pausing the VM, PVM's VIF areas written by the host kernel, page tables);
//! - **remapped**: the hook where a reclaimer that watches guest RAM through a
//!   userfaultfd (the swapper) must re-register each new mapping.
//!
//! Freeing guest pages must reset the scanner's view: on a shared page a bare
//! `MADV_DONTNEED` would bring back the pool's content, not zeros. Every VM's
//! [`GuestRam::discard`] is therefore routed to [`tps::Scanner::reset_range`].
//!
//! Ownership: the scanner holds the VMs' [`RunControl`]s, balloon bitmaps and RAM
//! (so that RAM stays mapped while registered); a VM's RAM holds the scanner only
//! weakly, which keeps the two from holding each other alive.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use guest_abi::PAGE_SIZE;

use crate::config::{parse_duration, parse_size};
use crate::devices::virtio::balloon::pages::BalloonedPages;
use crate::memory::{Discarder, GuestRam};
use crate::run_control::RunControl;
use crate::vm::{Vm, VmShared};

/// How long a merge batch waits for a VM to settle before skipping it.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the scanner knows of one VM; indexed by the VM's number in the process.
struct Guest {
    name: String,
    /// The VM (for its swapper); None in unit tests of bare RAM.
    vm: Option<Arc<VmShared>>,
    run: Arc<RunControl>,
    ballooned: Option<Arc<BalloonedPages>>,
    /// Keeps the RAM mapped as long as the scanner may touch it.
    _ram: Arc<GuestRam>,
    removed: AtomicBool,
}

/// The VMs, as the scanner sees them. Fixed at start: no lock on any path.
struct Guests(Vec<Guest>);

impl tps::VmControl for Guests {
    fn pause(&self, vm: u32) -> Option<Box<dyn std::any::Any>> {
        let guest = self.0.get(vm as usize)?;
        match guest.run.reclaim_guard(PAUSE_TIMEOUT) {
            Some(g) => Some(Box::new(g)),
            None => {
                log::debug!("tps: {} did not pause (ending, or busy beyond {PAUSE_TIMEOUT:?})", guest.name);
                None
            }
        }
    }

    fn skip_page(&self, vm: u32, gpa: u64) -> bool {
        let Some(guest) = self.0.get(vm as usize) else {
            return true;
        };
        super::off_limits(guest.ballooned.as_deref(), gpa)
    }

    fn remapped(&self, vm: u32, host_addr: usize, len: usize) {
        // The range is a new VMA, registered with no userfaultfd: the VM's swapper
        // (if any) registers it again.
        if let Some(shared) = self.0.get(vm as usize).and_then(|g| g.vm.as_ref()) {
            if let Err(e) = crate::reclaim::swap::remapped(shared, host_addr, len) {
                log::warn!("tps: {e}");
            }
        }
    }
}

/// Guest RAM discards, routed to the scanner.
struct ResetThroughScanner(Weak<tps::Scanner>);

impl Discarder for ResetThroughScanner {
    fn discard(&self, host_addr: usize, len: usize) -> std::io::Result<()> {
        let scanner = self.0.upgrade().ok_or_else(|| std::io::Error::other("page sharing has been shut down"))?;
        scanner.reset_range(host_addr, len).map_err(std::io::Error::other)
    }
}

/// Page sharing for the VMs of one host process.
pub struct PageSharing {
    scanner: Arc<tps::Scanner>,
    guests: Arc<Guests>,
}

impl PageSharing {
    /// Starts the scanner over `vms` (VM `i` of the slice is tps VM `i`), created and
    /// not yet ended; registers their RAM and routes their discards through it.
    pub fn start(config: tps::Config, vms: &[Vm]) -> Result<PageSharing, String> {
        let guests = Arc::new(Guests(
            vms.iter()
                .map(|vm| Guest {
                    name: vm.name().to_string(),
                    vm: Some(vm.shared().clone()),
                    run: vm.shared().run.clone(),
                    ballooned: vm.balloon().map(|b| b.lock().unwrap().ballooned().clone()),
                    _ram: vm.ram().clone(),
                    removed: AtomicBool::new(false),
                })
                .collect(),
        ));
        let scanner = Arc::new(tps::Scanner::start(config, guests.clone()).map_err(|e| e.to_string())?);
        for (i, vm) in vms.iter().enumerate() {
            for (gpa, host_addr, len) in vm.ram().host_ranges() {
                let region = tps::Region { vm: i as u32, gpa, host_addr: host_addr as usize, len: len as usize };
                scanner.add_region(region).map_err(|e| format!("vm {}: {e}", vm.name()))?;
            }
            if !vm.ram().set_discarder(Arc::new(ResetThroughScanner(Arc::downgrade(&scanner)))) {
                return Err(format!("vm {}: its RAM is already covered by page sharing", vm.name()));
            }
            if vm.ram().host_pages() == crate::memory::HostPages::Thp {
                log::warn!("vm {}: page sharing splits the transparent huge pages of its RAM", vm.name());
            }
        }
        Ok(PageSharing { scanner, guests })
    }

    /// VM `index` has ended: its shares are dropped. Call it once its vCPU threads
    /// have left their loops; later calls do nothing.
    pub fn vm_ended(&self, index: usize) {
        if let Some(g) = self.guests.0.get(index) {
            if !g.removed.swap(true, Ordering::AcqRel) {
                self.scanner.remove_vm(index as u32);
            }
        }
    }

    /// The scanner (for waiting on passes, changing the configuration).
    pub fn scanner(&self) -> &Arc<tps::Scanner> {
        &self.scanner
    }

    /// Host memory holding the RAM of `vms` (those it covers): their private pages
    /// plus the pool. (`Pss` would miss pool pages that no guest page has faulted
    /// into its page tables since the merge.)
    pub fn guest_memory_bytes(&self, vms: &[Vm]) -> u64 {
        let private: u64 = vms.iter().map(|vm| vm.ram().private_bytes()).sum();
        private + self.stats().pool_pages * PAGE_SIZE
    }

    /// The counters.
    pub fn stats(&self) -> tps::Stats {
        self.scanner.stats()
    }

    /// Applies `--tps`-style options to the running scanner; returns the new config.
    pub fn set_options(&self, text: &str) -> Result<tps::Config, String> {
        let config = parse_options(text, self.scanner.config())?;
        self.scanner.set_config(config.clone());
        Ok(config)
    }
}

/// The counters as JSON, with the two figures people look for first.
pub fn stats_json(s: &tps::Stats) -> serde_json::Value {
    let mut v = serde_json::to_value(s).expect("stats serialise");
    let obj = v.as_object_mut().expect("an object");
    obj.insert("saved_mib".into(), (s.bytes_saved as f64 / (1u64 << 20) as f64).into());
    obj.insert("cpu_ms".into(), (s.cpu_ns as f64 / 1e6).into());
    v
}

/// Parses `--tps` options on top of `base`: `on`, `off`, `rate=PAGES_PER_S` or
/// `rate=SIZE/s` (e.g. `100M/s`; 0: no limit), `period=DURATION` (pace a full pass
/// over all guest RAM to this; 0: none), `scope=global|vm` (share across VMs, or
/// only within each VM), separated by commas. `off` turns scanning off.
pub fn parse_options(text: &str, base: tps::Config) -> Result<tps::Config, String> {
    let mut c = base;
    let items: Vec<&str> = text.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if items.is_empty() {
        return Err("empty page sharing options (on, off, rate=, period=, scope=)".into());
    }
    for item in items {
        match item.split_once('=') {
            None if item == "on" => c.enabled = true,
            None if item == "off" => c.enabled = false,
            Some(("rate", v)) => c.pages_per_sec = parse_rate(v)?,
            Some(("period", v)) => {
                let d = parse_duration(v).map_err(|e| format!("period: {e}"))?;
                c.full_pass = (!d.is_zero()).then_some(d);
            }
            Some(("scope", "global")) => c.cross_vm = true,
            Some(("scope", "vm")) => c.cross_vm = false,
            Some(("scope", v)) => return Err(format!("scope={v}: expected global or vm")),
            _ => {
                return Err(format!("unknown page sharing option {item:?} (on, off, rate=, period=, scope=global|vm)"))
            }
        }
    }
    Ok(c)
}

/// `25600` (pages per second) or `100M/s`, `1G/s`, `512K/s`, `100MB/s`.
fn parse_rate(v: &str) -> Result<u64, String> {
    match v.strip_suffix("/s") {
        Some(size) => {
            let bytes = parse_size(size).map_err(|e| format!("rate: {e}"))?;
            if bytes != 0 && bytes < PAGE_SIZE {
                return Err(format!("rate={v}: less than one page per second"));
            }
            Ok(bytes / PAGE_SIZE)
        }
        None => v.parse().map_err(|_| {
            format!("rate={v}: expected pages per second (e.g. 25600) or a size per second (e.g. 100M/s)")
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::HostPages;
    use vm_memory::{Bytes, GuestAddress};

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
            let e = parse_options(bad, d.clone()).unwrap_err();
            assert!(!e.contains('\n') && !e.is_empty(), "{bad}: {e}");
        }
    }

    /// A page the scanner shared reads zero after a discard of guest RAM (what the
    /// balloon does), where a bare `MADV_DONTNEED` would bring the pool back.
    #[test]
    fn discards_of_shared_pages_read_zero() {
        let rams: Vec<Arc<GuestRam>> =
            (0..2).map(|_| Arc::new(GuestRam::new(32 << 20, HostPages::Small).unwrap())).collect();
        let guests = Arc::new(Guests(
            rams.iter()
                .enumerate()
                .map(|(i, ram)| Guest {
                    name: format!("vm{i}"),
                    vm: None,
                    run: Arc::new(RunControl::new(1)),
                    ballooned: None,
                    _ram: ram.clone(),
                    removed: AtomicBool::new(false),
                })
                .collect(),
        ));
        let config = tps::Config { pages_per_sec: 0, ..tps::Config::default() };
        let scanner = Arc::new(tps::Scanner::start(config, guests).unwrap());
        let page = [0x5au8; 4096];
        let pages = 256u64;
        for (i, ram) in rams.iter().enumerate() {
            for p in 0..pages {
                ram.mem().write_slice(&page, GuestAddress((1 << 20) + p * PAGE_SIZE)).unwrap();
            }
            let (gpa, host, len) = ram.host_ranges()[0];
            scanner.add_region(tps::Region { vm: i as u32, gpa, host_addr: host as usize, len: len as usize }).unwrap();
        }
        // Two passes from now: the first may have started before VM 1 was added,
        // and passes over VM 0 alone may have ended while VM 1 was being written.
        let done = scanner.stats().full_passes;
        assert!(scanner.wait_passes(done + 2, Duration::from_secs(120)), "no progress");
        assert!(scanner.stats().pool_mapped_pages >= 2 * pages, "{:?}", scanner.stats());
        // Without the scanner's reset the discarded page would read 0x5a again.
        let (target, other) = (&rams[0], &rams[1]);
        target.set_discarder(Arc::new(ResetThroughScanner(Arc::downgrade(&scanner))));
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
