//! virtio-balloon end to end: the test guest's driver and the VMM's device on
//! /dev/kvm. Inflating frees host memory and deflating gives it back, free page
//! reporting frees what the guest freed, and an allocation that would fail takes
//! pages back from the balloon. Targets are set through the control API handler,
//! the code `vmm ctl` reaches (vmm/tests/balloon_ctl.rs drives the binary itself).
//! Each test runs twice: with the test guest booted through the VMM's own protocol
//! (`elf::*`) and as a bzImage through the Linux boot protocol, finding its balloon
//! through ACPI (`bzimage::*`).

mod common;

use std::time::{Duration, Instant};

use common::{guest, on_both_boot_paths, start, via, wait_serving, Boot, Running};
use guest_abi::workload::Op;
use vmm::api::{server, Reply, Request};
use vmm::console::GuestStep;
use vmm::devices::virtio::balloon::metrics::BalloonSnapshot;
use vmm::devices::virtio::balloon::BalloonConfig;
use vmm::vm::Vm;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

fn snapshot(vm: &Vm) -> BalloonSnapshot {
    vm.balloon().expect("the VM has a balloon").lock().unwrap().snapshot()
}

/// Sends `req` to the control API's handler for `vm`; returns its result.
fn api(vm: &Running, req: Request) -> Reply {
    let what = format!("{req:?}");
    let resp = server::handle(req, vm.host().shared());
    assert!(resp.ok, "{what}: {:?}", resp.error);
    resp.result.expect("a result")
}

/// Sets the balloon target through the control API.
fn set_target(vm: &Running, size: &str) {
    api(vm, Request::BalloonSet { size: size.into(), vm: None });
}

/// Waits until `done` holds, failing with the guest's console after `limit`.
fn wait_for(vm: &Vm, what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(vm.ending().is_none(), "guest ended: {:?}\n{}", vm.ending(), vm.console().lines().join("\n"));
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}; balloon {:?}\n{}",
            snapshot(vm),
            vm.console().lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `cmd` in the serving guest; returns its step results, asserting success.
fn command(vm: &Vm, cmd: &str) -> Vec<GuestStep> {
    let out = vm.run_command(cmd, Duration::from_secs(60)).unwrap();
    assert_eq!(out.status, 0, "{cmd}: {:?}", out.lines);
    out.steps()
}

fn verify_ok(vm: &Vm, expect_pages: u64) {
    let steps = command(vm, "verify");
    let verify = steps.iter().find(|s| s.op == Op::Verify).expect("a verify line");
    assert_eq!(verify.bad, Some(0), "{verify:?}");
    assert_eq!(verify.pages, Some(expect_pages), "{verify:?}");
}

fn no_reporting() -> Option<BalloonConfig> {
    Some(BalloonConfig { free_page_reporting: false, ..BalloonConfig::default() })
}

fn inflating_frees_host_memory_and_deflating_returns_the_pages(boot: Boot) {
    // Touch all but ~2 MiB of the guest's free memory, keep 104 MiB of it: the
    // rest is free in the guest but resident on the host, which only the balloon
    // can get back here.
    let mut c = via(boot, guest("inflate", 256 * MIB, "alloc 250M unique; free 146M; verify"));
    c.vcpus = 2;
    c.balloon = no_reporting();
    let vm = start(c);
    wait_serving(&vm);
    let kept = 104 * MIB / PAGE;
    let rss_before = vm.ram().resident_bytes();
    assert!(rss_before >= 245 * MIB, "the guest touched its memory: {} MiB", rss_before / MIB);
    let free_before = vm.progress().free_pages;

    set_target(&vm, "128M");
    let target = 128 * MIB / PAGE;
    wait_for(&vm, "inflate 128M", Duration::from_secs(30), || {
        let s = snapshot(&vm);
        s.actual_pages == target && s.ballooned_pages == target
    });
    let rss_inflated = vm.ram().resident_bytes();
    let dropped = (rss_before - rss_inflated) as f64 / MIB as f64;
    assert!((120.0..=136.0).contains(&dropped), "resident guest memory dropped by {dropped:.1} MiB, not ~128");
    let s = snapshot(&vm);
    assert_eq!(s.inflated_pages, target);
    assert!(s.discard_calls < 1000, "PFNs are merged into ranges: {} madvise calls", s.discard_calls);
    assert_eq!(s.guest_errors, 0);
    verify_ok(&vm, kept);
    assert_eq!(vm.progress().free_pages, free_before - target, "ballooned frames left the guest's allocator");

    set_target(&vm, "0");
    wait_for(&vm, "deflate", Duration::from_secs(30), || {
        let s = snapshot(&vm);
        s.actual_pages == 0 && s.ballooned_pages == 0
    });
    let s = snapshot(&vm);
    assert_eq!(s.deflated_pages, target);
    assert_eq!(s.touched_pages, 0, "the guest never touched a page while it was ballooned");
    assert_eq!(vm.progress().free_pages, free_before, "deflated frames are back in the allocator");
    verify_ok(&vm, kept);
    // The returned frames hold data again.
    command(&vm, "alloc 128M unique");
    verify_ok(&vm, kept + target);
}

fn free_page_reporting_frees_what_the_guest_freed(boot: Boot) {
    let vm = start(via(boot, guest("report", 256 * MIB, "alloc 200M unique; verify")));
    wait_serving(&vm);
    let rss_before = vm.ram().resident_bytes();
    assert!(rss_before >= 195 * MIB, "{} MiB resident", rss_before / MIB);
    command(&vm, "free 128M");
    wait_for(&vm, "resident memory to fall after free 128M", Duration::from_secs(10), || {
        vm.ram().resident_bytes() + 120 * MIB <= rss_before
    });
    let s = snapshot(&vm);
    assert!(s.reported_pages >= 120 * MIB / PAGE && s.reported_pages <= 128 * MIB / PAGE, "{s:?}");
    assert_eq!((s.ballooned_pages, s.guest_errors), (0, 0), "{s:?}");
    verify_ok(&vm, 72 * MIB / PAGE);
    // Reported frames went back to the allocator: all of the memory is usable again.
    command(&vm, "alloc 128M dup");
    verify_ok(&vm, 200 * MIB / PAGE);
}

fn an_allocation_beyond_what_is_left_deflates_the_balloon(boot: Boot) {
    let vm = start(via(boot, guest("oom", 256 * MIB, "alloc 64M unique")));
    wait_serving(&vm);
    set_target(&vm, "160M");
    let target = 160 * MIB / PAGE;
    wait_for(&vm, "inflate 160M", Duration::from_secs(30), || snapshot(&vm).actual_pages == target);
    let free = vm.progress().free_pages;
    let want = 96 * MIB / PAGE;
    assert!(free < want, "the allocation must not fit without the balloon ({free} pages free)");

    let steps = command(&vm, "alloc 96M unique; verify");
    let verify = steps.iter().find(|s| s.op == Op::Verify).unwrap();
    assert_eq!((verify.bad, verify.pages), (Some(0), Some(160 * MIB / PAGE)));
    let s = snapshot(&vm);
    assert!(s.actual_pages <= target - (want - free), "the balloon shrank: {s:?}");
    assert_eq!(s.actual_pages, s.ballooned_pages);
    assert_eq!(s.deflated_pages, want - free, "exactly the missing pages came back");
    assert_eq!(s.touched_pages, 0, "none was used before the device acknowledged it");
    // The guest counts the event in its statistics.
    let Reply::BalloonStats(stats) = api(&vm, Request::BalloonStats { vm: None }) else { panic!("not balloon stats") };
    let stats = &stats["oom"].guest_stats;
    assert_eq!(stats.get("alloc_stalls"), Some(&1), "{stats:?}");
    assert_eq!(stats.get("direct_reclaims"), Some(&(want - free)), "{stats:?}");
}

fn without_deflate_on_oom_the_balloon_keeps_its_pages(boot: Boot) {
    let mut c = via(boot, guest("no-oom", 256 * MIB, "alloc 64M unique"));
    c.balloon = Some(BalloonConfig { deflate_on_oom: false, ..BalloonConfig::default() });
    let vm = start(c);
    wait_serving(&vm);
    set_target(&vm, "160M");
    let target = 160 * MIB / PAGE;
    wait_for(&vm, "inflate 160M", Duration::from_secs(30), || snapshot(&vm).actual_pages == target);
    let out = vm.run_command("alloc 96M unique", Duration::from_secs(60)).unwrap();
    assert_ne!(out.status, 0, "{:?}", out.lines);
    assert!(out.lines.iter().any(|l| l.contains("out of memory")), "{:?}", out.lines);
    let s = snapshot(&vm);
    assert_eq!((s.actual_pages, s.deflated_pages), (target, 0), "{s:?}");
    verify_ok(&vm, 64 * MIB / PAGE);
}

fn a_busy_guest_follows_the_target_and_keeps_its_data(boot: Boot) {
    // Two vCPUs rewrite and check their pages while the balloon inflates and
    // deflates underneath: the driver polls between steps and must never give away
    // (or take back into use too early) a frame the workload relies on.
    let mut c =
        via(boot, guest("busy", 256 * MIB, "alloc 64M unique; repeat 150 { touch 8M; verify; idle 1ms }; exit 0"));
    c.vcpus = 2;
    let vm = start(c);
    for (size, pages) in [("128M", 128 * MIB / PAGE), ("32M", 32 * MIB / PAGE), ("160M", 160 * MIB / PAGE)] {
        set_target(&vm, size);
        wait_for(&vm, size, Duration::from_secs(60), || snapshot(&vm).actual_pages == pages);
    }
    assert_eq!(vm.wait(Duration::from_secs(120)), Some(vmm::vm::Ending::GuestExit(0)));
    let steps = vmm::console::steps(&vm.console().lines());
    let verifies: Vec<_> = steps.iter().filter(|s| s.op == Op::Verify).collect();
    assert_eq!(verifies.len(), 150);
    assert!(verifies.iter().all(|v| v.bad == Some(0)), "{verifies:?}");
    let s = snapshot(&vm);
    assert_eq!((s.ballooned_pages, s.touched_pages, s.guest_errors), (160 * MIB / PAGE, 0, 0), "{s:?}");
}

on_both_boot_paths!(
    inflating_frees_host_memory_and_deflating_returns_the_pages,
    free_page_reporting_frees_what_the_guest_freed,
    an_allocation_beyond_what_is_left_deflates_the_balloon,
    without_deflate_on_oom_the_balloon_keeps_its_pages,
    a_busy_guest_follows_the_target_and_keeps_its_data,
);
