//! Transparent page sharing with real guests on /dev/kvm: what it saves, that guests
//! keep their contents (shares broken by writes, the write race under an aggressive
//! scanner), and what it must leave alone (never-touched and ballooned pages, and
//! pages freed after being shared, which must read zero).

mod common;

use std::time::{Duration, Instant};

use common::{change_sharing, converge, guest, require_kvm, start_on, two_vcpu_guests, wait_serving, Running};
use guest_abi::content::{self, Page};
use guest_abi::workload::{Kind, Op};
use guest_abi::PAGE_SIZE;
use vm_memory::{Bytes, GuestAddress};
use vmm::console::GuestStep;
use vmm::host::{self, HostOptions, WatchLimits};
use vmm::reclaim::sharing::{PageSharing, TpsStats};
use vmm::vm::Vm;

const MIB: u64 = 1 << 20;
const PAGES_PER_MIB: u64 = MIB / PAGE_SIZE;

/// Serving VMs under one scanner, created with scanning off so that the figures
/// "before" are taken before any merge.
struct Shared(Running);

impl Shared {
    fn start(configs: &[vmm::config::VmConfig]) -> Shared {
        // 1 GiB/s: a pass over these VMs takes well under a second.
        let off = tps::Config { enabled: false, pages_per_sec: 1 << 18, ..tps::Config::default() };
        let running = start_on(configs, HostOptions { tps: Some(off), ..HostOptions::default() });
        running.host().vms().iter().for_each(wait_serving);
        Shared(running)
    }

    fn vms(&self) -> &[Vm] {
        self.0.host().vms()
    }

    fn sharing(&self) -> &PageSharing {
        self.0.host().sharing().expect("page sharing is on")
    }

    fn set(&self, change: impl FnOnce(&mut tps::Config)) {
        change_sharing(self.sharing(), change);
    }

    fn converge(&self) -> tps::Stats {
        converge(self.sharing())
    }

    /// Host memory holding the guests' RAM: private pages plus the pool.
    fn resident_mib(&self) -> f64 {
        self.0.host().shared().guest_memory_bytes() as f64 / MIB as f64
    }

    fn run(&self, vm: usize, cmd: &str) -> Vec<GuestStep> {
        let out = self.vms()[vm].run_command(cmd, Duration::from_secs(120)).expect("command");
        assert_eq!(out.status, 0, "{cmd} failed in vm {vm}: {:?}", out.lines);
        out.steps()
    }

    fn verify_all(&self) {
        for vm in 0..self.vms().len() {
            let steps = self.run(vm, "verify");
            let v = steps.iter().find(|s| s.op == Op::Verify).expect("a verify line");
            assert_eq!(v.bad, Some(0), "vm {vm}: {v:?}");
        }
    }
}

fn assert_between(what: &str, value: f64, lo: f64, hi: f64) {
    assert!((lo..=hi).contains(&value), "{what}: {value:.1} MiB, expected {lo}..={hi}");
}

#[test]
fn two_vms_with_the_same_pages_keep_one_copy() {
    let h = Shared::start(&[guest("a", 128 * MIB, "alloc 64M shared:7"), guest("b", 128 * MIB, "alloc 64M shared:7")]);
    let before = h.resident_mib();
    let s = h.converge();
    let fall = before - h.resident_mib();
    assert_between("resident memory saved", fall, 60.0, 72.0);
    assert!(s.pool_pages >= 64 * PAGES_PER_MIB && s.pool_mapped_pages >= 128 * PAGES_PER_MIB, "{s:?}");
    assert!(s.bytes_saved as f64 / MIB as f64 >= 60.0, "{s:?}");
    // Per VM (`vmm top`'s SHRD and SHRDSVD): each maps its 64 MiB onto the pool and
    // saves half of it, as the other maps the same pool pages.
    let sample = vmm::sample::HostSample::take(h.0.host().shared());
    for vm in &sample.vms {
        assert_between(&format!("{} SHRD", vm.name), vm.shared_mib.unwrap(), 64.0, 66.0);
        assert_between(&format!("{} SHRDSVD", vm.name), vm.saved_mib.unwrap(), 30.0, 34.0);
        assert!(vm.zero_mib.unwrap() < 1.0, "{vm:?}");
    }
    h.verify_all();
}

#[test]
fn zero_and_duplicate_pages_of_one_vm_are_freed() {
    let h = Shared::start(&[guest("zd", 256 * MIB, "alloc 64M zero; alloc 64M dup")]);
    let before = h.resident_mib();
    let s = h.converge();
    let fall = before - h.resident_mib();
    // 64 MiB of zero pages dropped; 64 MiB of one page onto 64 replicas (256 KiB).
    assert_between("resident memory saved", fall, 124.0, 132.0);
    assert!(s.zero_pages >= 64 * PAGES_PER_MIB, "{s:?}");
    assert!(s.pool_mapped_pages >= 64 * PAGES_PER_MIB && s.pool_pages < 256, "{s:?}");
    let vm = &vmm::sample::HostSample::take(h.0.host().shared()).vms[0];
    assert_between("ZERO", vm.zero_mib.unwrap(), 64.0, 66.0);
    // The dup pages share 64 replicas: each saves 1 - 1/(pages per replica).
    assert_between("SHRDSVD", vm.saved_mib.unwrap(), 124.0, 130.0);
    h.verify_all();
}

#[test]
fn rewriting_half_of_the_shared_pages_breaks_those_shares_only() {
    let h = Shared::start(&[guest("a", 128 * MIB, "alloc 64M shared:7"), guest("b", 128 * MIB, "alloc 64M shared:7")]);
    let s0 = h.converge();
    let shared = h.resident_mib();
    h.run(0, "touch 32M");
    let s1 = h.converge();
    let rise = h.resident_mib() - shared;
    assert_between("resident memory added by the writes", rise, 30.0, 36.0);
    let broken = s1.broken_shares - s0.broken_shares;
    assert!(broken >= 32 * PAGES_PER_MIB, "{broken} broken shares for 8192 pages written");
    assert!(broken <= 33 * PAGES_PER_MIB, "{broken} broken shares for 8192 pages written");
    h.verify_all();
}

/// Guests keep rewriting pages that the scanner keeps merging (pages cycle through
/// shared, zero, duplicate and touched contents, written by two vCPUs in each of two
/// VMs) while it scans without a rate limit; every `verify` must pass. A merge that
/// lost a write would show as a bad page.
#[test]
fn no_write_is_lost_while_the_scanner_merges_under_the_guests() {
    let configs = two_vcpu_guests(&["a", "b"], 128 * MIB, "alloc 8M shared:3");
    let h = Shared::start(&configs);
    h.set(|c| {
        c.enabled = true;
        c.pages_per_sec = 0;
        c.max_batch = 64;
    });
    const ROUNDS: usize = 8;
    let round = "repeat 10 { alloc 8M shared:7; alloc 4M zero; alloc 4M dup; touch 6M; verify; free 16M }; verify";
    std::thread::scope(|s| {
        for vm in 0..h.vms().len() {
            let h = &h;
            s.spawn(move || {
                for _ in 0..ROUNDS {
                    let steps = h.run(vm, round);
                    let bad: u64 = steps.iter().filter(|s| s.op == Op::Verify).map(|s| s.bad.unwrap()).sum();
                    assert_eq!(bad, 0, "vm {vm} lost writes");
                }
            });
        }
    });
    let s = h.converge();
    h.verify_all();
    // The race was there to lose: merges and broken shares by the thousand, zero
    // pages dropped and written again.
    assert!(s.merges > 10_000 && s.broken_shares > 5_000 && s.zero_pages_freed > 5_000, "{s:?}");
    eprintln!("{}", serde_json::to_string(&TpsStats::from(s)).unwrap());
}

/// Guest page `gpa` of `vm`, read from the host side.
fn read_page(vm: &Vm, gpa: u64) -> Page {
    let mut bytes = [0u8; PAGE_SIZE as usize];
    vm.ram().mem().read_slice(&mut bytes, GuestAddress(gpa)).unwrap();
    let mut page: Page = [0; 512];
    for (w, b) in page.iter_mut().zip(bytes.chunks_exact(8)) {
        *w = u64::from_le_bytes(b.try_into().unwrap());
    }
    page
}

/// The page frames of `vm` holding the page with `key`.
fn frames_with(vm: &Vm, key: u64) -> Vec<u64> {
    let pfns = vm.ram().regions().iter().flat_map(|r| r.base / PAGE_SIZE..(r.base + r.size) / PAGE_SIZE);
    pfns.filter(|&pfn| content::matches(&read_page(vm, pfn * PAGE_SIZE), key)).collect()
}

/// The guest-physical address of the `pages` pages of an allocation of
/// `shared:SEED` in `vm` (the guest allocates contiguously).
fn find_shared_pages(vm: &Vm, seed: u64, pages: u64) -> u64 {
    let first = frames_with(vm, content::alloc_key(Kind::Shared(seed), 0, 0));
    assert_eq!(first.len(), 1, "one allocation of shared:{seed}");
    let start = first[0] * PAGE_SIZE;
    for i in 0..pages {
        let key = content::alloc_key(Kind::Shared(seed), i, 0);
        assert!(content::matches(&read_page(vm, start + i * PAGE_SIZE), key), "page {i} not contiguous");
    }
    start
}

/// What the balloon does on inflation (mark the pages, then discard them through
/// guest RAM), on pages that had been shared: they must read zero, the other VM's
/// copies keep their content, and the pages come back usable.
#[test]
fn pages_freed_after_being_shared_read_zero() {
    let h = Shared::start(&[guest("a", 128 * MIB, "alloc 16M shared:7"), guest("b", 128 * MIB, "alloc 16M shared:7")]);
    let s = h.converge();
    assert!(s.pool_mapped_pages >= 2 * 16 * PAGES_PER_MIB, "{s:?}");
    let pages = 16 * PAGES_PER_MIB;
    let gpa = find_shared_pages(&h.vms()[0], 7, pages);
    h.run(0, "free 16M");
    let vm = &h.vms()[0];
    let ballooned = vm.balloon().expect("a balloon").lock().unwrap().ballooned().clone();
    (gpa / PAGE_SIZE..(gpa / PAGE_SIZE + pages)).for_each(|pfn| assert!(ballooned.insert(pfn)));
    vm.ram().discard(gpa, pages * PAGE_SIZE).expect("discard");
    let mut back = vec![1u8; PAGE_SIZE as usize];
    for i in 0..pages {
        vm.ram().mem().read_slice(&mut back, GuestAddress(gpa + i * PAGE_SIZE)).unwrap();
        assert!(back.iter().all(|&b| b == 0), "page {i} of a freed shared range reads {:#x}", back[0]);
    }
    h.verify_all();
    // Deflate: the guest may use the pages again.
    (gpa / PAGE_SIZE..(gpa / PAGE_SIZE + pages)).for_each(|pfn| assert!(ballooned.remove(pfn)));
    h.run(0, "alloc 16M shared:7; verify");
    h.converge();
    h.verify_all();
}

/// A big VM that touched little, with part of what it touched in the balloon: the
/// scanner faults nothing in, and leaves ballooned pages alone even when resident.
#[test]
fn never_touched_and_ballooned_pages_are_left_alone() {
    let h = Shared::start(&[guest("big", 1 << 30, "alloc 16M dup")]);
    let before = h.resident_mib();
    let vm = &h.vms()[0];
    let ballooned = vm.balloon().expect("a balloon").lock().unwrap().ballooned().clone();
    // Put the first 4 MiB of the dup pages in the balloon, resident.
    let dup_pfns = frames_with(vm, content::DUP_KEY);
    assert_eq!(dup_pfns.len() as u64, 16 * PAGES_PER_MIB);
    let held = &dup_pfns[..(4 * PAGES_PER_MIB) as usize];
    held.iter().for_each(|&pfn| assert!(ballooned.insert(pfn)));
    let s = h.converge();
    let after = h.resident_mib();
    // 1 GiB scanned twice; only the 12 MiB of dup pages out of the balloon merged.
    assert!(s.pages_scanned >= 2 * 1024 * PAGES_PER_MIB, "{s:?}");
    assert_between("saved", before - after, 11.5, 12.5);
    // Out of the balloon, the held pages are merged too: about 4 MiB more saved.
    held.iter().for_each(|&pfn| assert!(ballooned.remove(pfn)));
    h.converge();
    assert_between("saved once out of the balloon", after - h.resident_mib(), 3.8, 4.2);
    h.verify_all();
}

#[test]
fn sharing_within_each_vm_only_keeps_vms_apart() {
    let h = Shared::start(&[guest("a", 128 * MIB, "alloc 32M shared:7"), guest("b", 128 * MIB, "alloc 32M shared:7")]);
    h.set(|c| c.cross_vm = false);
    let before = h.resident_mib();
    let s = h.converge();
    assert!(before - h.resident_mib() < 2.0, "pages of two VMs were merged with scope=vm: {s:?}");
    h.verify_all();
}

/// An outside pause (the control API's, a swapper's) holds the VM even while merge
/// batches pause and resume it: pauses nest, and the scanner's resume does not end
/// the other pause.
#[test]
fn a_pause_holds_while_merge_batches_pause_and_resume_the_vm() {
    let mut c = guest("held", 128 * MIB, "alloc 8M shared:3");
    c.vcpus = 2;
    let h = Shared::start(&[c]);
    h.set(|c| {
        c.enabled = true;
        c.pages_per_sec = 0;
        c.max_batch = 16;
    });
    let vm = &h.vms()[0];
    let (mut held, mut batches_while_held) = (0, 0);
    std::thread::scope(|s| {
        let worker = s.spawn(|| h.run(0, "repeat 40 { alloc 8M dup; alloc 8M shared:5; touch 4M; verify; free 16M }"));
        while !worker.is_finished() {
            std::thread::sleep(Duration::from_millis(15));
            let Ok(pause) = vm.pause() else { continue };
            let (heartbeat, batches) = (vm.progress().heartbeat, h.sharing().stats().batches);
            std::thread::sleep(Duration::from_millis(30));
            batches_while_held += h.sharing().stats().batches - batches;
            assert_eq!(vm.progress().heartbeat, heartbeat, "the guest ran during a pause");
            held += 1;
            drop(pause);
        }
        worker.join().unwrap();
    });
    assert!(held >= 5 && batches_while_held > 0, "{held} pauses, {batches_while_held} merge batches during them");
    h.verify_all();
}

/// `vmm run`'s path: one scanner over the VMs of `host::run`, its counters in the
/// report, taken before the VMs drop their shares.
#[test]
fn host_run_shares_and_reports_its_counters() {
    require_kvm();
    let workload = "alloc 16M shared:7; alloc 8M zero; idle 1500ms; verify; exit 0";
    let configs = [guest("a", 64 * MIB, workload), guest("b", 64 * MIB, workload)];
    let opts = HostOptions {
        tps: Some(tps::Config { pages_per_sec: 1 << 18, ..tps::Config::default() }),
        ..HostOptions::default()
    };
    let report = host::run(&configs, Instant::now(), opts, WatchLimits::default()).expect("run");
    assert!(report.vms.iter().all(|vm| vm.exit_code == Some(0)), "{:?}", report.vms);
    let s = report.tps.expect("page sharing counters in the report");
    assert!(s.full_passes >= 1 && s.regions == 2, "{s:?}");
    // 16 MiB kept once instead of twice, 16 MiB of zero pages dropped.
    assert!(s.bytes_saved >= 30 * MIB, "{s:?}");
    assert!(report.guest_rss_mib < 24.0, "guest memory {} MiB", report.guest_rss_mib);
}
