//! The host swapper driven by the VMM, with real guests on /dev/kvm: eviction of a
//! running guest's pages and their return on demand, the write race under several
//! vCPUs, zero pages, balloon discards, a full disk, a damaged slot, the
//! free-memory policy moving through its states under a host-memory budget, and
//! idle-aware against random victims. The tests that hold either way run with the
//! swap file alone (`file::NAME`) and with a small compression cache in front of it
//! (`zcache::NAME`), over guests holding pages that compress and pages that do not;
//! a damaged cache entry and the cache's end with its VM have tests of their own.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{guest, start_on, wait_serving, Running, TempDir};
use guest_abi::step::Outcome;
use guest_abi::workload::Op;
use swapd::{SwapStats, Swapper};
use vmm::api::server::handle;
use vmm::api::{Reply, Request};
use vmm::console::GuestStep;
use vmm::host::HostOptions;
use vmm::reclaim::policy::{HostMemChoice, PolicyOptions};
use vmm::reclaim::swap::{CacheSize, CompressOptions, SwapOptions};
use vmm::vm::{Ending, Vm};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// A tmpfs mounted for one test; unmounted on drop, even when the test fails.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "vmm-swap-test"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount -t tmpfs on {} failed (these tests run as root)", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Where evicted pages go: the swap file alone, or a 4 MiB compression cache in
/// front of it (small: the tests spill it).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    File,
    Cache,
}

impl Mode {
    fn options(self, dir: &Path) -> SwapOptions {
        let mut o = SwapOptions::new(dir);
        if self == Mode::Cache {
            o.compress = Some(CompressOptions { cache: CacheSize::Bytes(4 * MIB), ..CompressOptions::default() });
        }
        o
    }
}

// The tests that hold with and without the compression cache, run both ways.
common::both_ways!(
    file => super::Mode::File,
    zcache => super::Mode::Cache;
    evicted_pages_of_a_running_guest_come_back_intact,
    no_guest_write_is_lost_while_evicting,
    zero_pages_are_discarded_without_being_written,
    discarding_a_swapped_page_forgets_its_slot,
    a_full_swap_disk_stops_eviction_and_the_guest_runs_on,
    a_host_memory_budget_drives_balloon_then_swap,
    a_corrupt_slot_stops_the_vm_with_an_error,
);

/// Starts one VM running `boot` (which must leave it serving) with a swapper in `dir`.
fn swapping_vm(name: &str, mem: u64, vcpus: u32, boot: &str, dir: &Path, mode: Mode) -> Running {
    let mut c = guest(name, mem, boot);
    c.vcpus = vcpus;
    let vm = start_on(&[c], HostOptions { swap: Some(mode.options(dir)), ..HostOptions::default() });
    wait_serving(&vm);
    vm
}

/// Pages evicted to the file so far: those the cache refused (or all, without a
/// cache), and those it spilled.
fn file_pages(s: &SwapStats) -> u64 {
    let c = s.cache.clone().unwrap_or_default();
    s.pages_out - c.stored + c.spilled
}

/// Pages out of guest RAM now: in the file and in the cache.
fn swapped_now(s: &SwapStats) -> u64 {
    s.slots_used + s.cache.as_ref().map_or(0, |c| c.entries)
}

/// Faults resolved from the cache.
fn cache_hits(s: &SwapStats) -> u64 {
    s.cache.as_ref().map_or(0, |c| c.hits)
}

/// The swapper of the only VM of `vm`'s host.
fn swapper(vm: &Running) -> Arc<Swapper> {
    vm.host().swapper(0).expect("the VM has a swapper")
}

/// Runs a command; returns its step results, panicking with its lines if it failed.
fn command(vm: &Vm, cmd: &str) -> Vec<GuestStep> {
    let out = vm.run_command(cmd, Duration::from_secs(300)).unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert_eq!(out.status, 0, "{cmd} failed: {:?}", out.lines);
    out.steps()
}

/// Ends the guest with `exit 0` (the command is never acknowledged).
fn exit(vm: &Vm) {
    let _ = vm.run_command("exit 0", Duration::from_secs(30));
}

/// The `verify` results of a command's output, each asserted clean.
fn assert_verified(steps: &[GuestStep]) -> usize {
    let verifies: Vec<&GuestStep> = steps.iter().filter(|s| s.op == Op::Verify).collect();
    for v in &verifies {
        assert_eq!(v.bad, Some(0), "bad pages after swapping: {v:?}");
        assert_eq!(v.result, Outcome::Ok, "{v:?}");
    }
    verifies.len()
}

fn stats(vm: &Running) -> SwapStats {
    swapper(vm).stats()
}

/// The counters with the VM paused, so that no fault is in flight while they are
/// read (a serving guest keeps touching its own pages).
fn settled_stats(vm: &Running) -> SwapStats {
    let _pause = vm.pause().expect("pause");
    stats(vm)
}

/// Half the guest's data compresses (to about 30%), half does not: with the cache,
/// the first half goes to it (and, past its 4 MiB, on to the file), the other half
/// to the file directly.
fn evicted_pages_of_a_running_guest_come_back_intact(mode: Mode) {
    let dir = TempDir::new("evict");
    let vm = swapping_vm("evict", 256 * MIB, 1, "alloc 32M unique; alloc 32M compressible:30", &dir.0, mode);
    let file = dir.0.join("evict.vswp");
    assert!(file.exists(), "the swap file is created with the swapper");
    let rss_before = vm.ram().resident_bytes();
    let sw = swapper(&vm);
    let want = (64 * MIB / PAGE) as usize;
    let reclaimed = sw.swap_out(want).expect("evict 64 MiB");
    assert_eq!(reclaimed, want, "the guest holds more than 64 MiB resident");
    let s = settled_stats(&vm);
    assert_eq!(s.pages_out + s.zero_pages_elided, reclaimed as u64);
    assert_eq!(swapped_now(&s) + s.pages_in + s.prefetched, s.pages_out);
    assert_eq!(s.bytes_written, file_pages(&s) * PAGE);
    if let Some(c) = &s.cache {
        assert!(c.stored > 4096 && c.refused > 4096 && c.spilled > 0, "{c:?}");
        assert!(c.bytes <= c.cap_bytes && c.stored_ratio > 0.2 && c.stored_ratio < 0.4, "{c:?}");
    }
    let rss_after = vm.ram().resident_bytes();
    assert!(rss_before - rss_after >= 60 * MIB, "RSS {} -> {} MiB", rss_before >> 20, rss_after >> 20);

    assert_eq!(assert_verified(&command(&vm, "verify")), 1);
    let s = settled_stats(&vm);
    // Every page written is either back (faulted or prefetched) or still in the file.
    // (A page found present while in the file drops its slot and counts as a fault
    // error: it must not happen, and shows up here if it does.)
    assert_eq!(
        s.pages_in + s.prefetched + swapped_now(&s),
        s.pages_out,
        "in {} prefetched {} fault errors {} zero fills {} skipped {}/{}/{}/{}",
        s.pages_in,
        s.prefetched,
        s.fault_errors,
        s.zero_fills,
        s.skipped_not_present,
        s.skipped_vmm,
        s.skipped_shared,
        s.skipped_vma
    );
    assert!(s.pages_in + s.prefetched >= 16384 * 9 / 10, "verify read back most of the 64 MiB: {s:?}");
    assert_eq!(s.bytes_read, (s.pages_in - cache_hits(&s) + s.prefetched) * PAGE);
    assert_eq!(s.fault_in.count, s.pages_in - cache_hits(&s));
    if let Some(c) = &s.cache {
        assert!(c.hits > 0 && c.fault.count == c.hits && c.corrupt == 0, "{c:?}");
    }
    assert!(s.fault_in.p50_us > 0.0 && s.fault_in.p99_us >= s.fault_in.p50_us);
    assert_eq!((s.read_errors, s.checksum_errors, s.write_errors), (0, 0, 0));

    exit(&vm);
    assert_eq!(vm.wait(Duration::from_secs(30)), Some(Ending::GuestExit(0)));
    drop(sw);
    let report = vm.finish();
    let final_stats = report.vms[0].swap.clone().expect("the exit report carries the swap counters");
    assert_eq!(final_stats.pages_out, s.pages_out);
    assert!(!file.exists(), "the swap file is removed when the VM ends");
}

/// Two vCPUs rewrite and check their pages while the host evicts them again and
/// again: a write landing between an eviction's copy and its discard would be lost
/// and caught by `verify`.
fn no_guest_write_is_lost_while_evicting(mode: Mode) {
    let dir = TempDir::new("race");
    let vm = Arc::new(swapping_vm("race", 128 * MIB, 2, "alloc 8M unique; alloc 8M compressible:40", &dir.0, mode));
    let sw = swapper(&vm);
    let guest = {
        let vm = vm.clone();
        std::thread::spawn(move || command(&vm, "repeat 12 { touch 4M; verify }"))
    };
    let mut rounds = 0;
    while !guest.is_finished() {
        sw.swap_out(1024).expect("evict");
        rounds += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let lines = guest.join().expect("guest commands");
    assert_eq!(assert_verified(&lines), 12);
    let s = settled_stats(&vm);
    assert!(rounds >= 10, "only {rounds} eviction rounds ran during the workload");
    assert!(s.pages_out > 4096 && s.pages_in > 1000, "evictions raced with the guest: {s:?}");
    assert_eq!(s.pages_in + s.prefetched + swapped_now(&s), s.pages_out, "{s:?}");
    assert_verified(&command(&vm, "verify"));
}

fn zero_pages_are_discarded_without_being_written(mode: Mode) {
    let dir = TempDir::new("zero");
    let vm = swapping_vm("zero", 128 * MIB, 1, "alloc 32M zero; alloc 4M unique", &dir.0, mode);
    let sw = swapper(&vm);
    // Through the control API, as `vmm ctl swap out 128M --vm zero` does.
    let vms = vm.host().shared();
    let resp = handle(Request::SwapOut { size: "128M".into(), vm: "zero".into() }, vms);
    assert!(resp.ok, "{:?}", resp.error);
    let Some(Reply::SwapOut(out)) = resp.result else { panic!("not a swap_out result: {resp:?}") };
    let reclaimed = out.reclaimed_pages;
    let s = settled_stats(&vm);
    assert_eq!(s.pages_out + s.zero_pages_elided, reclaimed);
    assert!(s.zero_pages_elided >= 32 * MIB / PAGE, "{s:?}");
    assert!(s.pages_out >= 4 * MIB / PAGE, "{s:?}");
    // The 32 MiB of zeros are not in the file: it holds the unique pages and the
    // guest's own (kernel, page tables), a few MiB.
    assert!(s.pages_out < 12 * MIB / PAGE, "zero pages were written: {s:?}");
    assert_eq!(s.bytes_written, file_pages(&s) * PAGE);
    assert!(sw.file_allocated_bytes() <= (s.pages_out + 256) * PAGE, "file uses {} bytes", sw.file_allocated_bytes());
    assert!(vm.ram().resident_bytes() < 4 * MIB, "RSS {} KiB", vm.ram().resident_bytes() >> 10);
    assert_verified(&command(&vm, "verify"));
    let resp = handle(Request::SwapStats { vm: None }, vms);
    let Some(Reply::SwapStats(stats)) = resp.result else { panic!("not a swap_stats result: {resp:?}") };
    assert_eq!(stats.vms["zero"].as_ref().map(|s| s.zero_pages_elided), Some(s.zero_pages_elided));
    let resp = handle(Request::SwapOut { size: "1M".into(), vm: "nope".into() }, vms);
    assert!(!resp.ok && resp.error.unwrap().contains("no VM named"));
}

/// A balloon discard of a swapped-out page drops its slot: the page reads zeros
/// afterwards instead of coming back from the file.
fn discarding_a_swapped_page_forgets_its_slot(mode: Mode) {
    let dir = TempDir::new("forget");
    let vm = swapping_vm("forget", 64 * MIB, 1, "alloc 4M unique; alloc 4M compressible:20", &dir.0, mode);
    let sw = swapper(&vm);
    sw.swap_out((64 * MIB / PAGE) as usize).expect("evict");
    // The serving guest faults its own pages back in now and then; hold it still so
    // that the slot count changes only by the discard.
    let _still = vm.shared().run().pause_guard(Duration::from_secs(5)).expect("pause");
    let ram = vm.ram();
    let gpa = (0..ram.size() / PAGE).map(|p| p * PAGE).rev().find(|&g| sw.is_swapped(g)).expect("a swapped page");
    let used = swapped_now(&stats(&vm));
    ram.discard(gpa, PAGE).unwrap();
    assert!(!sw.is_swapped(gpa));
    assert_eq!(swapped_now(&stats(&vm)), used - 1);
    let mut word = [0u8; 8];
    vm_memory::Bytes::read_slice(ram.mem(), &mut word, vm_memory::GuestAddress(gpa)).unwrap();
    assert_eq!(word, [0; 8], "a discarded page reads zeros, not its old content");
}

/// A swap directory on a 4 MiB tmpfs fills up: eviction stops with a write error
/// counted, the batch that did not fit stays resident, the guest loses nothing.
fn a_full_swap_disk_stops_eviction_and_the_guest_runs_on(mode: Mode) {
    let dir = TempDir::new("enospc");
    let _mnt = Tmpfs::mount(&dir.0, "4m");
    let vm = swapping_vm("enospc", 128 * MIB, 1, "alloc 32M unique", &dir.0, mode);
    let sw = swapper(&vm);
    let err = sw.swap_out((32 * MIB / PAGE) as usize).expect_err("4 MiB cannot hold 32 MiB");
    assert!(err.to_string().contains("No space left"), "{err}");
    let s = stats(&vm);
    assert_eq!(s.write_errors, 1);
    assert!(s.eviction_stopped.is_some());
    assert!(file_pages(&s) > 0 && file_pages(&s) < 1024, "{s:?}");
    // Stopped: later requests are refused until retried, the VM is not harmed.
    assert!(sw.swap_out(16).is_err());
    assert_verified(&command(&vm, "verify"));
    assert!(vm.ending().is_none());
    let s = settled_stats(&vm);
    assert_eq!(s.pages_in + s.prefetched + swapped_now(&s), s.pages_out);
    exit(&vm);
    assert_eq!(vm.wait(Duration::from_secs(30)), Some(Ending::GuestExit(0)));
    drop(sw);
    vm.finish();
}

/// Two guests keep allocating past a host-memory budget: the policy goes from high
/// through soft (balloon targets set) into hard (pages swapped), and both guests
/// still verify every page.
///
/// What depends on the guest's balloon driver: only the last check (pages actually
/// ballooned), done when the driver negotiated the device. Balloon targets are set
/// whether or not a driver answers, and inflating frees only the guest's free
/// pages, which these guests never touched, so swapping is still needed.
fn a_host_memory_budget_drives_balloon_then_swap(mode: Mode) {
    let dir = TempDir::new("policy");
    let configs: Vec<_> = ["p0", "p1"].iter().map(|n| guest(n, 512 * MIB, "alloc 8M unique")).collect();
    let policy = PolicyOptions {
        host_mem: HostMemChoice::Budget(320 * MIB),
        tick: Duration::from_millis(50),
        ..PolicyOptions::default()
    };
    let running = start_on(
        &configs,
        HostOptions { swap: Some(mode.options(&dir.0)), policy: Some(policy), ..HostOptions::default() },
    );
    let host = running.host();
    let vms = host.vms();
    vms.iter().for_each(wait_serving);
    let pages_out = || -> u64 { (0..vms.len()).map(|i| host.swapper(i).expect("a swapper").stats().pages_out).sum() };
    // 2 x 180 MiB more, 1 MiB at a time: the budget's 2% bands (6.4 MiB) are wider
    // than what both guests add in one policy tick.
    let (mut first_target, mut first_swap) = (None, None);
    std::thread::scope(|s| {
        let workers: Vec<_> = vms
            .iter()
            .map(|vm| s.spawn(move || command(vm, "repeat 180 { alloc 1M unique; idle 20ms }; verify")))
            .collect();
        while workers.iter().any(|w| !w.is_finished()) {
            let now = Instant::now();
            let target: u64 = vms.iter().map(|vm| vm.balloon().unwrap().lock().unwrap().snapshot().target_pages).sum();
            if target > 0 && first_target.is_none() {
                first_target = Some(now);
            }
            if pages_out() > 0 && first_swap.is_none() {
                first_swap = Some(now);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for w in workers {
            assert_eq!(assert_verified(&w.join().expect("guest commands")), 1);
        }
    });
    let p = host.shared().policy_stats().expect("the policy runs");
    let to: Vec<&str> = p.history.iter().map(|c| c.to.name()).collect();
    let soft = to.iter().position(|&s| s == "soft").unwrap_or_else(|| panic!("never soft: {to:?}"));
    // Guests that allocate faster than one tick's band can pass hard on the way to
    // low; either is the swapping side.
    let hard = to.iter().position(|&s| s == "hard" || s == "low").unwrap_or_else(|| panic!("never hard: {to:?}"));
    assert!(soft < hard, "soft comes before hard: {to:?}");
    assert!(p.balloon_pages_asked > 0 && p.swap_pages_asked > 0, "{p:?}");
    let (first_target, first_swap) =
        (first_target.expect("no balloon target set"), first_swap.expect("nothing swapped"));
    assert!(first_target <= first_swap, "the balloon is asked before pages are swapped");
    assert!(pages_out() > 0);
    let ballooned: u64 = vms.iter().map(|vm| vm.balloon().unwrap().lock().unwrap().snapshot().ballooned_pages).sum();
    if vms.iter().any(|vm| vm.balloon().unwrap().lock().unwrap().snapshot().features != 0) {
        assert!(ballooned > 0, "a guest with a balloon driver gave pages");
    }
    for vm in vms {
        assert!(vm.ending().is_none(), "{:?}", vm.ending());
        assert_verified(&command(vm, "verify"));
    }
}

/// A slot damaged on disk is never handed to the guest: the VM stops with a clear
/// error at the first fault on it, and tearing it down does not hang on the vCPU
/// left waiting for that fault.
fn a_corrupt_slot_stops_the_vm_with_an_error(mode: Mode) {
    use std::os::unix::fs::FileExt;
    let dir = TempDir::new("corrupt");
    let vm = swapping_vm("corrupt", 64 * MIB, 1, "alloc 8M unique", &dir.0, mode);
    let sw = swapper(&vm);
    sw.swap_out((64 * MIB / PAGE) as usize).expect("evict");
    let pages = stats(&vm).slots_used;
    let file = std::fs::OpenOptions::new().write(true).open(sw.file_path()).unwrap();
    let junk = vec![0xa5u8; (pages * PAGE) as usize];
    file.write_all_at(&junk, PAGE).unwrap(); // slot i is at 4096 * (i + 1)
    file.sync_all().unwrap();
    drop(sw);
    let err = vm.run_command("verify", Duration::from_secs(60)).expect_err("the guest cannot verify damaged pages");
    assert!(err.contains("ended"), "{err}");
    match vm.wait(Duration::from_secs(10)) {
        Some(Ending::Error(e)) => assert!(e.contains("host swap"), "{e}"),
        other => panic!("expected an error ending, got {other:?}"),
    }
    let report = vm.finish().vms.remove(0);
    let s = report.swap.unwrap();
    assert!(s.checksum_errors > 0, "{s:?}");
    assert!(report.error.unwrap().contains("host swap"));
}

/// Idle-aware victims, fed KVM's dirty log, leave alone the pages the guest keeps
/// writing and take the ones it freed: far fewer faults afterwards than random
/// victims (`vmm bench swap` runs the same scenario, module doc of bench::swap).
#[test]
fn idle_victims_spare_the_pages_the_guest_keeps_writing() {
    common::require_kvm();
    let dir = TempDir::new("victims");
    let random = vmm::bench::swap::victim_faults(&dir.0, swapd::VictimPolicy::Random).unwrap();
    let idle = vmm::bench::swap::victim_faults(&dir.0, swapd::VictimPolicy::Idle).unwrap();
    assert!(random.evicted_mib >= 127.0 && idle.evicted_mib >= 127.0);
    // Random victims take about half of the 16 MiB hot set (128 of 256 MiB).
    assert!(random.read_back > 1000, "random: {} pages read back", random.read_back);
    assert!(idle.read_back * 10 < random.read_back, "idle {} against random {}", idle.read_back, random.read_back);
}

/// A compressed entry damaged in memory is never handed to the guest: the VM stops
/// with an error naming the cache at the first fault on it.
#[test]
fn a_corrupt_cache_entry_stops_the_vm_with_an_error() {
    let dir = TempDir::new("zcorrupt");
    let vm = swapping_vm("zcorrupt", 64 * MIB, 1, "alloc 8M compressible:20", &dir.0, Mode::Cache);
    let sw = swapper(&vm);
    sw.swap_out((64 * MIB / PAGE) as usize).expect("evict");
    let damaged = {
        let _still = vm.shared().run().pause_guard(Duration::from_secs(5)).expect("pause");
        (0..vm.ram().size() / PAGE).map(|p| p * PAGE).filter(|&g| sw.damage_cache_entry(g)).count()
    };
    assert!(damaged > 1000, "only {damaged} pages in the cache");
    drop(sw);
    let err = vm.run_command("verify", Duration::from_secs(60)).expect_err("the guest cannot verify damaged pages");
    assert!(err.contains("ended"), "{err}");
    match vm.wait(Duration::from_secs(10)) {
        Some(Ending::Error(e)) => assert!(e.contains("host swap") && e.contains("compression cache"), "{e}"),
        other => panic!("expected an error ending, got {other:?}"),
    }
    let report = vm.finish().vms.remove(0);
    let c = report.swap.unwrap().cache.unwrap();
    assert!(c.corrupt > 0, "{c:?}");
}

/// The cache's memory counts while the VM runs and goes with it: when the VM ends,
/// its swapper, and with it the cache, is dropped (the swapper's own tests show the
/// memory going back to the system).
#[test]
fn the_cache_goes_with_its_vm() {
    let dir = TempDir::new("zend");
    let vm = swapping_vm("zend", 64 * MIB, 1, "alloc 16M compressible:25", &dir.0, Mode::Cache);
    let sw = swapper(&vm);
    sw.swap_out((64 * MIB / PAGE) as usize).expect("evict");
    assert!(sw.cache_bytes() > MIB, "{:?}", sw.stats().cache);
    let held = Arc::downgrade(&sw);
    drop(sw);
    exit(&vm);
    assert_eq!(vm.wait(Duration::from_secs(30)), Some(Ending::GuestExit(0)));
    let report = vm.finish();
    let c = report.vms[0].swap.clone().unwrap().cache.unwrap();
    assert!(c.bytes > MIB && c.stored > 0, "the exit report has the cache's last figures: {c:?}");
    assert!(held.upgrade().is_none(), "the swapper and its cache are gone with the VM");
}
