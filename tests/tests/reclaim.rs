//! The three reclaimers together, with real guests on /dev/kvm: page sharing, a
//! host swapper per VM and the balloon act on the same guests at the same time.
//!
//! - the stress test: two 2-vCPU VMs keep allocating, rewriting, checking and
//!   freeing pages of every kind while the scanner merges without a rate limit,
//!   each swapper evicts in a loop, and each balloon inflates and deflates; every
//!   `verify` must pass and every mechanism must have acted;
//! - the interactions one at a time: shared pages never go to the swap file,
//!   ballooned pages are neither read back from it nor filled in behind the
//!   balloon's back, the VMM's control page is never evicted;
//! - the free-memory policy driving them: its soft state inflates the guests'
//!   balloon drivers without swapping; without swappers it balloons in the low
//!   state and pauses nobody; a balloon target set through the control API pins
//!   that balloon until `balloon_auto` hands it back.
//!
//! docs/architecture.md ("Reclaimers together") gives the argument these tests check.
//! Each test runs with the test guest booted through the VMM's own protocol
//! (`elf::*`) and as a bzImage through the Linux boot protocol (`bzimage::*`).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{
    change_sharing, converge, guest, on_both_boot_paths, start_on, two_vcpu_guests, via, wait_serving, Boot, Running,
    TempDir,
};
use guest_abi::workload::Op;
use guest_abi::PAGE_SIZE;
use swapd::SwapStats;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm::api::server::handle;
use vmm::api::{Reply, Request};
use vmm::config::VmConfig;
use vmm::console::GuestStep;
use vmm::devices::virtio::balloon::metrics::BalloonSnapshot;
use vmm::devices::virtio::balloon::pages::resident_pages;
use vmm::devices::virtio::balloon::{BalloonConfig, TargetMode};
use vmm::host::HostOptions;
use vmm::reclaim::policy::{HostMemChoice, PolicyOptions};
use vmm::reclaim::sharing::{PageSharing, TpsStats};
use vmm::reclaim::swap::SwapOptions;
use vmm::vm::Vm;

const MIB: u64 = 1 << 20;
const PAGES_PER_MIB: u64 = MIB / PAGE_SIZE;

/// Serving VMs under one page-sharing scanner (created off), each with a swapper.
struct Reclaiming {
    running: Running,
    _dir: TempDir,
}

impl Reclaiming {
    fn start(name: &str, configs: &[VmConfig]) -> Reclaiming {
        let dir = TempDir::new(name);
        let off = tps::Config { enabled: false, pages_per_sec: 1 << 18, ..tps::Config::default() };
        let opts = HostOptions { tps: Some(off), swap: Some(SwapOptions::new(&dir.0)), ..HostOptions::default() };
        let running = start_on(configs, opts);
        running.host().vms().iter().for_each(wait_serving);
        Reclaiming { running, _dir: dir }
    }

    fn vms(&self) -> &[Vm] {
        self.running.host().vms()
    }

    fn sharing(&self) -> &PageSharing {
        self.running.host().sharing().expect("page sharing is on")
    }

    fn set_sharing(&self, change: impl FnOnce(&mut tps::Config)) {
        change_sharing(self.sharing(), change);
    }

    fn converge(&self) -> tps::Stats {
        converge(self.sharing())
    }

    fn swapper(&self, vm: usize) -> std::sync::Arc<swapd::Swapper> {
        self.running.host().swapper(vm).expect("a swapper")
    }

    /// Swap counters with the VM paused (no fault in flight).
    fn swap_stats(&self, vm: usize) -> SwapStats {
        let _pause = self.vms()[vm].pause().expect("pause");
        self.swapper(vm).stats()
    }
}

/// Runs `cmd`; returns its step results, panicking with its lines if it failed.
fn command(vm: &Vm, cmd: &str) -> Vec<GuestStep> {
    let out = vm.run_command(cmd, Duration::from_secs(120)).unwrap_or_else(|e| panic!("{}: {cmd}: {e}", vm.name()));
    assert_eq!(out.status, 0, "{}: {cmd} failed: {:?}", vm.name(), out.lines);
    out.steps()
}

/// Runs `verify`, asserting no bad page; returns the pages checked.
fn verify(vm: &Vm) -> u64 {
    let lines = command(vm, "verify");
    let v = lines.iter().find(|s| s.op == Op::Verify).expect("a verify line");
    assert_eq!(v.bad, Some(0), "{}: {v:?}", vm.name());
    v.pages.unwrap()
}

fn balloon(vm: &Vm) -> BalloonSnapshot {
    vm.balloon().expect("a balloon").lock().unwrap().snapshot()
}

fn set_balloon(vm: &Vm, bytes: u64) {
    vm.shared().set_balloon_target(bytes).expect("balloon target");
}

/// Waits until `done` holds; a VM that ended, or `limit` passing, fails the test.
fn wait_for(vms: &[Vm], what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        for vm in vms {
            assert!(vm.ending().is_none(), "{} ended: {:?}", vm.name(), vm.ending());
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Host pages resident behind the ballooned pages of `vm` (the zero page included):
/// each one means something touched a page the guest gave away.
fn resident_in_balloon(vm: &Vm) -> u64 {
    let ballooned = vm.balloon().unwrap().lock().unwrap().ballooned().clone();
    let mut pfns = ballooned.pfns();
    vmm::devices::virtio::balloon::pages::merge_ranges(&mut pfns)
        .iter()
        .map(|r| {
            let host = vm.ram().mem().get_host_address(GuestAddress(r.first_pfn * PAGE_SIZE)).unwrap();
            resident_pages(host, r.count * PAGE_SIZE).unwrap()
        })
        .sum()
}

/// Sets the flag when dropped: a thread of the stress test that ends, by panic or
/// not, ends the others.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Everything at once. Two VMs with two vCPUs each keep allocating pages of every
/// kind (zero, duplicate, shared with the other VM, unique), rewriting, verifying
/// and freeing them, while
/// - page sharing merges across the VMs without a rate limit (small batches, many
///   pauses);
/// - each VM's swapper evicts random pages in a loop, which the guests fault back;
/// - each VM's balloon is inflated and deflated in a loop, with free page reporting
///   on (more discards of pages that may be shared or swapped);
///
/// At the end every guest verifies with no bad page, no VM ended, and the counters
/// show that each mechanism acted on pages the others were working on.
/// The copies of the stress test (one per boot path) take turns within a test
/// process (`cargo test`; .config/nextest.toml does it for nextest's processes):
/// two at once on a 2-core machine starve each other's pauses past the swapper's
/// 5 s limit.
static ONE_STRESS_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn every_reclaimer_at_once_loses_no_write(boot: Boot) {
    let _turn = ONE_STRESS_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let run_for = common::stress_duration(Duration::from_secs(25));
    let configs: Vec<VmConfig> =
        two_vcpu_guests(&["s0", "s1"], 256 * MIB, "alloc 16M shared:3").into_iter().map(|c| via(boot, c)).collect();
    let h = Reclaiming::start("stress", &configs);
    h.set_sharing(|c| {
        c.enabled = true;
        c.pages_per_sec = 0;
        c.max_batch = 64;
    });
    let t0 = Instant::now();
    let stop = AtomicBool::new(false);
    let round = "repeat 4 { alloc 8M shared:7; alloc 4M zero; alloc 4M dup; alloc 4M unique; touch 6M; verify; \
                 free 20M }; verify";
    let (rounds, evictions, balloon_flips) = std::thread::scope(|s| {
        let guests: Vec<_> = h
            .vms()
            .iter()
            .map(|vm| {
                let stop = &stop;
                s.spawn(move || {
                    let _stop = StopOnDrop(stop);
                    let mut rounds = 0u32;
                    while t0.elapsed() < run_for {
                        let bad: u64 =
                            command(vm, round).iter().filter(|s| s.op == Op::Verify).map(|s| s.bad.unwrap()).sum();
                        assert_eq!(bad, 0, "{} lost writes", vm.name());
                        rounds += 1;
                    }
                    rounds
                })
            })
            .collect();
        let evictors: Vec<_> = (0..h.vms().len())
            .map(|i| {
                let (sw, stop) = (h.swapper(i), &stop);
                s.spawn(move || {
                    let _stop = StopOnDrop(stop);
                    let mut n = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        sw.swap_out(512).expect("evict");
                        n += 1;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    n
                })
            })
            .collect();
        let ballooner = s.spawn(|| {
            let _stop = StopOnDrop(&stop);
            let mut flips = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let size = if flips % 2 == 0 { 96 * MIB } else { 0 };
                h.vms().iter().for_each(|vm| set_balloon(vm, size));
                flips += 1;
                std::thread::sleep(Duration::from_millis(300));
            }
            flips
        });
        let rounds: Vec<u32> = guests.into_iter().map(|g| g.join().unwrap()).collect();
        let evictions: Vec<u32> = evictors.into_iter().map(|e| e.join().unwrap()).collect();
        (rounds, evictions, ballooner.join().unwrap())
    });
    let ran = t0.elapsed();
    h.vms().iter().for_each(|vm| set_balloon(vm, 0));
    wait_for(h.vms(), "balloons deflated", Duration::from_secs(60), || {
        h.vms().iter().all(|vm| balloon(vm).actual_pages == 0)
    });
    for vm in h.vms() {
        verify(vm);
        assert!(vm.ending().is_none(), "{}: {:?}", vm.name(), vm.ending());
    }

    let t = h.sharing().stats();
    eprintln!(
        "ran {:.1}s: rounds {rounds:?}, eviction calls {evictions:?}, balloon flips {balloon_flips}",
        ran.as_secs_f64()
    );
    eprintln!("tps: {}", serde_json::to_string(&TpsStats::from(t.clone())).unwrap());
    assert!(t.merges > 0 && t.broken_shares > 0 && t.zero_pages_freed > 0, "page sharing acted: {t:?}");
    assert_eq!(t.errors, 0, "{t:?}");
    for i in 0..h.vms().len() {
        let (s, b) = (h.swap_stats(i), balloon(&h.vms()[i]));
        eprintln!("{}: swap {}", h.vms()[i].name(), serde_json::to_string(&s).unwrap());
        eprintln!("{}: balloon {}", h.vms()[i].name(), serde_json::to_string(&b).unwrap());
        assert!(s.pages_out > 0 && s.pages_in > 0, "swapped out and faulted back in: {s:?}");
        assert!(s.skipped_shared > 0, "the swapper met pages shared by page sharing: {s:?}");
        assert_eq!(
            (s.fault_errors, s.faults_unresolved, s.read_errors, s.checksum_errors, s.write_errors),
            (0, 0, 0, 0, 0),
            "{s:?}"
        );
        assert!(s.eviction_stopped.is_none(), "{s:?}");
        assert_eq!(s.pause_gave_up, 0, "every batch got its pause in the end: {s:?}");
        assert!(b.inflated_pages > 0 && b.deflated_pages > 0 && b.reported_pages > 0, "{b:?}");
        assert_eq!((b.touched_pages, b.guest_errors, b.discard_errors), (0, 0, 0), "{b:?}");
    }
}

/// A page that page sharing mapped from its pool is not private memory of the VM:
/// the swapper passes over it (writing it would cost I/O for memory that is shared,
/// and discarding it frees nothing). A share the guest broke by writing is a
/// private copy inside the pool's mapping, which the swapper must leave alone too.
fn shared_pages_stay_out_of_the_swap_file(boot: Boot) {
    let h = Reclaiming::start(
        "shared",
        &[
            via(boot, guest("a", 128 * MIB, "alloc 32M shared:7")),
            via(boot, guest("b", 128 * MIB, "alloc 32M shared:7")),
        ],
    );
    h.converge();
    h.set_sharing(|c| c.enabled = false);
    let t = h.sharing().stats();
    assert!(t.pool_mapped_pages >= 2 * 32 * PAGES_PER_MIB, "{t:?}");
    let (vm, sw) = (&h.vms()[0], h.swapper(0));
    let pages = vm.ram().size() / PAGE_SIZE;
    // Read every page once from the host: a pool page is only present in the page
    // tables of this process once something accessed it (the guest may not have
    // since the merge).
    let mut page = vec![0u8; PAGE_SIZE as usize];
    (0..pages).for_each(|p| vm.ram().mem().read_slice(&mut page, GuestAddress(p * PAGE_SIZE)).unwrap());
    let shared: Vec<u64> = (0..pages).filter(|&p| is_shared(vm, p)).collect();
    assert!(shared.len() as u64 >= 32 * PAGES_PER_MIB, "{} pages mapped from the pool", shared.len());
    sw.swap_out(pages as usize).expect("evict");
    let s = h.swap_stats(0);
    assert!(s.skipped_shared >= 32 * PAGES_PER_MIB, "{s:?}");
    let in_file = shared.iter().filter(|&&p| sw.is_swapped(p * PAGE_SIZE)).count();
    assert_eq!(in_file, 0, "pages mapped from the pool were swapped");
    // The guest reads its shared pages without a single fault on them, and they are
    // still shared.
    verify(vm);
    assert_eq!(h.sharing().stats().pool_mapped_pages, t.pool_mapped_pages);

    // Rewriting breaks the shares: private copies now, but inside the pool's
    // mappings, where a discard would bring the pool's page back instead of
    // faulting; the swapper passes over them. The guest keeps its data.
    command(vm, "touch 32M");
    let before = h.swap_stats(0);
    sw.swap_out(pages as usize).expect("evict");
    let s = h.swap_stats(0);
    assert!(s.skipped_vma - before.skipped_vma >= 32 * PAGES_PER_MIB, "{s:?}");
    assert_eq!(verify(vm), 32 * PAGES_PER_MIB);
    assert_eq!((s.fault_errors, s.checksum_errors), (0, 0), "{s:?}");
    assert_eq!(verify(&h.vms()[1]), 32 * PAGES_PER_MIB);
}

/// Whether page `pfn` of `vm` is present and mapped from a file (page sharing's
/// pool).
fn is_shared(vm: &Vm, pfn: u64) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let host = vm.ram().mem().get_host_address(GuestAddress(pfn * PAGE_SIZE)).unwrap() as u64;
    let mut f = std::fs::File::open("/proc/self/pagemap").unwrap();
    f.seek(SeekFrom::Start(host / PAGE_SIZE * 8)).unwrap();
    let mut e = [0u8; 8];
    f.read_exact(&mut e).unwrap();
    let e = u64::from_le_bytes(e);
    e & (1 << 63) != 0 && e & (1 << 61) != 0
}

/// The balloon and the swapper on the same pages: pages the guest freed were
/// swapped out, then the guest gives them to the balloon. Their slots are dropped
/// (nothing is read back from the file for them), nothing fills them in behind the
/// balloon's back (not even the swapper's zero fill ahead of a fault on the page
/// below), and after deflating the guest uses them again with its data intact.
fn ballooned_pages_leave_the_swap_file_and_stay_untouched(boot: Boot) {
    let mut c = via(boot, guest("bs", 256 * MIB, "alloc 160M unique; free 128M"));
    c.balloon = Some(BalloonConfig { free_page_reporting: false, ..BalloonConfig::default() });
    let h = Reclaiming::start("balloon", &[c]);
    let (vm, sw) = (&h.vms()[0], h.swapper(0));
    sw.swap_out((vm.ram().size() / PAGE_SIZE) as usize).expect("evict");
    let used = h.swap_stats(0).slots_used;
    assert!(used >= 150 * PAGES_PER_MIB, "the freed pages are in the file: {used} slots");

    let target = 192 * MIB;
    set_balloon(vm, target);
    wait_for(h.vms(), "inflate", Duration::from_secs(60), || balloon(vm).actual_pages == target / PAGE_SIZE);
    let ballooned = vm.balloon().unwrap().lock().unwrap().ballooned().pfns();
    assert!(ballooned.iter().all(|&p| !sw.is_swapped(p * PAGE_SIZE)), "a ballooned page kept its slot");
    let s = h.swap_stats(0);
    // The guest had 96 MiB free that it never touched (no slot): the rest of the
    // balloon came from pages in the file.
    assert!(used - s.slots_used >= 90 * PAGES_PER_MIB, "slots {used} -> {}", s.slots_used);

    assert_eq!(verify(vm), 32 * PAGES_PER_MIB);
    // Half back: the deflated pages are missing and have no slot, next to pages
    // still in the balloon. A fault on one of them (a host read here) is filled
    // with zeros by the swapper, and so are the missing pages that follow it: not
    // those in the balloon.
    set_balloon(vm, target / 2);
    wait_for(h.vms(), "deflate half", Duration::from_secs(60), || balloon(vm).actual_pages == target / 2 / PAGE_SIZE);
    let set = vm.balloon().unwrap().lock().unwrap().ballooned().clone();
    let host = |pfn: u64| vm.ram().mem().get_host_address(GuestAddress(pfn * PAGE_SIZE)).unwrap();
    let edges: Vec<u64> = (1..vm.ram().size() / PAGE_SIZE - 1)
        .filter(|&p| !set.contains(p) && set.contains(p + 1) && !sw.is_swapped(p * PAGE_SIZE))
        .filter(|&p| resident_pages(host(p), PAGE_SIZE).unwrap() == 0)
        .collect();
    assert!(!edges.is_empty(), "no missing page right below the balloon");
    let mut byte = [0u8; 1];
    for &pfn in &edges {
        vm.ram().mem().read_slice(&mut byte, GuestAddress(pfn * PAGE_SIZE)).unwrap();
    }
    assert_eq!(resident_in_balloon(vm), 0, "pages in the balloon were filled in");

    set_balloon(vm, 0);
    wait_for(h.vms(), "deflate", Duration::from_secs(60), || balloon(vm).actual_pages == 0);
    let b = balloon(vm);
    assert_eq!((b.touched_pages, b.guest_errors), (0, 0), "{b:?}");
    command(vm, "alloc 128M dup");
    assert_eq!(verify(vm), 160 * PAGES_PER_MIB);
    assert_eq!(h.swap_stats(0).fault_errors, 0);
}

/// The VMM writes the control page (commands) and reads it (progress) without
/// pausing the VM, so no reclaimer may drop it: a command posted between an
/// eviction's copy and its discard would be lost. Page sharing leaves the low
/// megabyte alone; the swapper must too.
fn the_control_page_is_never_evicted(boot: Boot) {
    let h = Reclaiming::start("control", &[via(boot, guest("ctl", 64 * MIB, "alloc 4M unique"))]);
    let (vm, sw) = (&h.vms()[0], h.swapper(0));
    let low: Vec<u64> = (0..guest_abi::KERNEL_MIN_GPA / PAGE_SIZE).map(|p| p * PAGE_SIZE).collect();
    assert_eq!(sw.swap_out_gpas(&low).expect("evict"), 0, "pages of the low megabyte were evicted");
    assert!(!sw.is_swapped(guest_abi::CONTROL_PAGE_GPA));
    // Commands keep working while everything else is evicted again and again.
    for _ in 0..50 {
        sw.swap_out((vm.ram().size() / PAGE_SIZE) as usize).expect("evict");
        assert!(!sw.is_swapped(guest_abi::CONTROL_PAGE_GPA));
        verify(vm);
    }
}

/// Serving guests that touched 160 MiB and freed 128 MiB of it, without free page
/// reporting: the freed memory stays resident until their balloons take it.
fn guests_with_freed_memory(boot: Boot, names: &[&str], swap: Option<&TempDir>) -> Running {
    let configs: Vec<VmConfig> = names
        .iter()
        .map(|n| {
            let mut c = via(boot, guest(n, 256 * MIB, "alloc 160M unique; free 128M"));
            c.balloon = Some(BalloonConfig { free_page_reporting: false, ..BalloonConfig::default() });
            c
        })
        .collect();
    // The policy watches a budget far above what the guests fill: it takes nothing
    // until `policy_with_free` sets the budget.
    let policy = PolicyOptions {
        host_mem: HostMemChoice::Budget(1 << 40),
        tick: Duration::from_millis(50),
        ..PolicyOptions::default()
    };
    let swap = swap.map(|d| SwapOptions::new(&d.0));
    let running = start_on(&configs, HostOptions { swap, policy: Some(policy), ..HostOptions::default() });
    running.host().vms().iter().for_each(wait_serving);
    running
}

/// Sets the policy's host-memory budget so that `free_permille` of it is free now.
fn policy_with_free(running: &Running, free_permille: u64) {
    let resident: u64 = running.host().vms().iter().map(|vm| vm.ram().resident_bytes()).sum();
    let policy = running.host().shared().policy().expect("the policy runs");
    policy.set_budget(resident * 1000 / (1000 - free_permille)).expect("a budget");
}

/// The policy's counters now.
fn policy_stats(running: &Running) -> policy::PolicyStats {
    running.host().shared().policy_stats().expect("the policy runs")
}

/// Waits until every balloon has reached its target and some pages were given.
fn wait_inflated(vms: &[Vm]) {
    wait_for(vms, "the balloons to inflate", Duration::from_secs(60), || {
        let b: Vec<BalloonSnapshot> = vms.iter().map(balloon).collect();
        b.iter().map(|b| b.ballooned_pages).sum::<u64>() > 0 && b.iter().all(|b| b.actual_pages == b.target_pages)
    });
}

fn states_entered(p: &policy::PolicyStats) -> Vec<&'static str> {
    p.history.iter().map(|c| c.to.name()).collect()
}

/// The policy stops; every guest still holds its 32 MiB intact and never touched a
/// ballooned page.
fn verify_and_finish(mut running: Running) {
    running.host_mut().stop_policy();
    for vm in running.host().vms() {
        assert_eq!(balloon(vm).touched_pages, 0);
        assert_eq!(verify(vm), 32 * PAGES_PER_MIB);
    }
}

/// The free-memory policy in its soft state inflates the guests' balloons through
/// their drivers, and swaps nothing: two guests that touched and freed most of their
/// memory, under a host-memory budget set so that 3% of it is free.
fn the_soft_state_inflates_the_guest_balloons_without_swapping(boot: Boot) {
    let dir = TempDir::new("soft");
    let mut running = guests_with_freed_memory(boot, &["p0", "p1"], Some(&dir));
    policy_with_free(&running, 30);
    wait_inflated(running.host().vms());
    let p = running.host_mut().stop_policy().expect("the policy ran");
    let states = states_entered(&p);
    assert!(states.contains(&"soft"), "{states:?}");
    assert!(!states.contains(&"hard") && !states.contains(&"low"), "{states:?}");
    assert_eq!(p.swap_pages_asked, 0, "{p:?}");
    for (i, vm) in running.host().vms().iter().enumerate() {
        let s = running.host().swapper(i).expect("a swapper").stats();
        assert_eq!(s.pages_out + s.zero_pages_elided, 0, "{}: {s:?}", vm.name());
    }
    verify_and_finish(running);
}

/// Without swappers the policy still runs, on the balloon alone: in the low state
/// (0.5% of the budget free) it asks the balloons for everything up to 6% free and
/// pauses nobody (a pause frees nothing without eviction).
fn without_swappers_the_policy_balloons_in_the_low_state(boot: Boot) {
    let running = guests_with_freed_memory(boot, &["b0", "b1"], None);
    policy_with_free(&running, 5);
    wait_inflated(running.host().vms());
    let p = policy_stats(&running);
    assert_eq!(states_entered(&p).first(), Some(&"low"), "{p:?}");
    assert!(p.balloon_pages_asked > 0, "{p:?}");
    assert_eq!((p.swap_pages_asked, p.pauses_asked), (0, 0), "{p:?}");
    verify_and_finish(running);
}

/// A balloon target set through the control API pins that balloon: the policy,
/// which deflates every balloon it owns while memory is plentiful, leaves it
/// alone tick after tick, and deflates it once `balloon_auto` hands it back.
fn an_api_target_pins_the_balloon_until_handed_back(boot: Boot) {
    let running = guests_with_freed_memory(boot, &["pin"], None);
    let vms = running.host().vms();
    // Three quarters of the budget free: the high state, deflating.
    policy_with_free(&running, 750);
    let call = |req: Request| {
        let resp = handle(req.clone(), running.host().shared());
        assert!(resp.ok, "{req:?}: {:?}", resp.error);
        resp.result.unwrap()
    };
    let Reply::BalloonSet(set) = call(Request::BalloonSet { size: "32M".into(), vm: None }) else {
        panic!("a balloon_set reply")
    };
    assert_eq!(set["pin"].target_mode, TargetMode::Pinned);
    let pinned = 32 * PAGES_PER_MIB;
    wait_for(vms, "the pinned target to be reached", Duration::from_secs(60), || {
        balloon(&vms[0]).ballooned_pages == pinned
    });
    let ticks = policy_stats(&running).ticks;
    wait_for(vms, "ten policy ticks", Duration::from_secs(60), || policy_stats(&running).ticks >= ticks + 10);
    let b = balloon(&vms[0]);
    assert_eq!((b.target_pages, b.ballooned_pages, b.target_mode), (pinned, pinned, TargetMode::Pinned));
    let Reply::PolicyStats(p) = call(Request::PolicyStats) else { panic!("a policy_stats reply") };
    assert_eq!(p.state, policy::FreeState::High, "{p:?}");
    assert_eq!(p.balloon_pages_asked, 0, "{p:?}");

    let Reply::BalloonAuto(auto) = call(Request::BalloonAuto { vm: Some("pin".into()) }) else {
        panic!("a balloon_auto reply")
    };
    assert_eq!(auto["pin"].target_mode, TargetMode::Auto);
    assert_eq!(auto["pin"].target_bytes, 32 * MIB, "handing back leaves the target where it is");
    wait_for(vms, "the policy to deflate the balloon", Duration::from_secs(60), || {
        let b = balloon(&vms[0]);
        b.target_pages == 0 && b.ballooned_pages == 0
    });
    let without = common::create(&[guest("nopolicy", 32 * MIB, "exit 0")]).expect("a host without a policy");
    let off = handle(Request::PolicyStats, without.shared());
    assert!(!off.ok && off.error.unwrap().contains("--policy on"));
    verify_and_finish(running);
}

on_both_boot_paths!(
    every_reclaimer_at_once_loses_no_write,
    shared_pages_stay_out_of_the_swap_file,
    ballooned_pages_leave_the_swap_file_and_stay_untouched,
    the_control_page_is_never_evicted,
    the_soft_state_inflates_the_guest_balloons_without_swapping,
    without_swappers_the_policy_balloons_in_the_low_state,
    an_api_target_pins_the_balloon_until_handed_back,
);
