//! ESX's allocation policy on real guests: the active memory sampler's estimate
//! against the working set the guest reads, and the allocation targets of two VMs
//! under a budget that overcommits them (tax, shares, min, admission).
//!
//! Sampling periods are short (a quarter of a second) and samples many (400) so that
//! each test takes seconds; the bounds are stated in periods and in standard errors,
//! never in wall time (the deadlines only end a test that would otherwise hang). A
//! period must be long enough for the guest to go over its whole working set at
//! least once: every watched page it touches costs it a fault into KVM (~80 us on
//! PVM), so many samples in a short period slow it down.

mod common;

use std::time::{Duration, Instant};

use common::{guest, start_on, wait_serving, Running};
use vmm::host::HostOptions;
use vmm::reclaim::active::{ActiveOptions, ActiveStats};
use vmm::reclaim::policy::{HostMemChoice, PolicyOptions, VmAllocation};

const MIB: u64 = 1 << 20;

/// Pages watched per period.
const N: usize = 400;

fn policy(budget: u64, tax: f64) -> HostOptions {
    let mut p = PolicyOptions {
        host_mem: HostMemChoice::Budget(budget),
        active: Some(ActiveOptions { period: Duration::from_millis(250), samples: N }),
        ..PolicyOptions::default()
    };
    p.config.idle_tax = tax;
    p.config.realloc_period_ms = 200;
    HostOptions { policy: Some(p), ..HostOptions::default() }
}

fn alloc_of(host: &Running, vm: usize) -> Option<VmAllocation> {
    let name = host.vm(vm).config().name.clone();
    host.host().shared().policy()?.allocation(&name)
}

fn active_of(host: &Running, vm: usize) -> Option<ActiveStats> {
    alloc_of(host, vm)?.active
}

/// Waits (polling every 20 ms, 60 s at most) until `check` returns Some.
fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The estimate once `periods` more periods have ended.
fn estimate_after(host: &Running, vm: usize, periods: u64) -> ActiveStats {
    let start = wait_for("a first period", || active_of(host, vm).filter(|a| a.estimate.periods > 0)).estimate.periods;
    wait_for("more periods", || active_of(host, vm).filter(|a| a.estimate.periods >= start + periods))
}

/// Runs `workload` as a command of VM `vm` in the background (the guest serves).
/// Its status, None if the VM ended first.
fn command(host: &Running, vm: usize, workload: &'static str) -> std::thread::JoinHandle<Option<u32>> {
    let vm = host.vm(vm).shared().clone();
    std::thread::spawn(move || vm.run_command(workload, Duration::from_secs(120)).ok().map(|o| o.status))
}

#[test]
fn the_estimate_of_a_read_only_working_set_is_within_the_sampling_error() {
    // 64 MiB guests that allocate X, then only read it, for several X. With n = 400
    // samples one period's f has standard error sqrt(f (1 - f) / n) (0.022 at
    // f = 0.25); the estimate (a maximum of averages) is allowed 4 of them, plus 3%
    // for the guest's own pages (kernel, stacks, page records, 1.5 MiB).
    for (x_mib, reads) in
        [(0u64, "idle 20s"), (16, "for 20s { read 16M; idle 5ms }"), (48, "for 20s { read 48M; idle 5ms }")]
    {
        let alloc = if x_mib == 0 { String::new() } else { format!("alloc {x_mib}M unique") };
        let host = start_on(&[guest("ws", 64 * MIB, &alloc)], policy(8 << 30, 0.75));
        wait_serving(&host);
        let running = command(&host, 0, reads);
        // 12 periods of reads only: a sampler that saw writes alone would be down
        // to (7/8)^12 = 0.2 of the allocation's estimate by now.
        let a = estimate_after(&host, 0, 12);
        let truth = x_mib as f64 / 64.0;
        let sigma = (truth * (1.0 - truth) / N as f64).sqrt();
        let f = a.estimate.fraction().unwrap();
        assert!(f >= truth - 4.0 * sigma && f <= truth + 4.0 * sigma + 0.03, "X = {x_mib} MiB: estimate {f:.4} {a:?}");
        assert!(a.faults_per_period <= N as f64, "{a:?}");
        assert!(a.last_valid >= N as u64 * 9 / 10, "samples are rarely lost: {a:?}");
        host.vm(0).stop("test over");
        let _ = running.join();
    }
}

#[test]
fn the_estimate_rises_fast_and_falls_slowly() {
    let host = start_on(&[guest("steps", 64 * MIB, "alloc 48M unique")], policy(8 << 30, 0.75));
    wait_serving(&host);
    let run = |workload: &'static str| command(&host, 0, workload);
    // 8 MiB (f = 0.125) long enough for the slow average to settle.
    assert_eq!(run("for 6s { read 8M; idle 5ms }").join().unwrap(), Some(0));
    let before = estimate_after(&host, 0, 1).estimate;
    assert!(before.fraction().unwrap() < 0.25, "{before:?}");
    // Up to 48 MiB (f = 0.75): 90% of it within 6 periods of the change.
    let up = run("for 6s { read 48M; idle 5ms }");
    let p0 = active_of(&host, 0).unwrap().estimate.periods;
    let reached = wait_for("the estimate rises", || {
        active_of(&host, 0).filter(|a| a.estimate.fraction().unwrap() >= 0.9 * 0.75).map(|a| a.estimate.periods)
    });
    assert!(reached <= p0 + 6, "rose in {} periods", reached - p0);
    assert_eq!(up.join().unwrap(), Some(0));
    // Down to 8 MiB: five periods later the fast average has followed, the
    // estimate (the slow one) still says more than twice the new working set.
    let down = run("for 3s { read 8M; idle 5ms }");
    let after = estimate_after(&host, 0, 5).estimate;
    assert!(after.fast < 0.25, "{after:?}");
    assert!(after.fraction().unwrap() > 0.3, "falls slowly: {after:?}");
    assert_eq!(down.join().unwrap(), Some(0));
}

/// Two 256 MiB VMs under a 400 MiB budget: `T` = 376 MiB for the VMs.
const T_MIB: f64 = 400.0 * 0.94;

/// Two VMs that allocate, then serve; then `reads` of each run as commands.
fn two_vms(
    allocs: [&str; 2],
    reads: [&'static str; 2],
    tax: f64,
    tune: impl Fn(&mut [vmm::config::VmConfig]),
) -> Running {
    two_vms_under(400 * MIB, allocs, reads, tax, tune)
}

fn two_vms_under(
    budget: u64,
    allocs: [&str; 2],
    reads: [&'static str; 2],
    tax: f64,
    tune: impl Fn(&mut [vmm::config::VmConfig]),
) -> Running {
    let mut configs = vec![guest("a", 256 * MIB, allocs[0]), guest("b", 256 * MIB, allocs[1])];
    tune(&mut configs);
    let host = start_on(&configs, policy(budget, tax));
    (0..2).for_each(|i| wait_serving(host.vm(i)));
    for (i, r) in reads.into_iter().enumerate() {
        drop(command(&host, i, r));
    }
    host
}

/// Both VMs' allocations once both estimates have `periods` more periods.
fn settled(host: &Running, periods: u64) -> [VmAllocation; 2] {
    let start = |i| alloc_of(host, i).and_then(|a| a.active).map_or(0, |s| s.estimate.periods);
    let from = [start(0), start(1)];
    wait_for("settled estimates", || {
        let (a, b) = (alloc_of(host, 0)?, alloc_of(host, 1)?);
        let done =
            |x: &VmAllocation, i: usize| x.active.as_ref().is_some_and(|s| s.estimate.periods >= from[i] + periods);
        (done(&a, 0) && done(&b, 1)).then_some([a, b])
    })
}

const IDLE: &str = "idle 60s";
const BUSY: &str = "for 60s { read 160M; idle 5ms }";

fn within(got: f64, want: f64, pct: f64) -> bool {
    (got - want).abs() <= want * pct / 100.0
}

#[test]
fn without_tax_equal_shares_get_equal_targets() {
    let host = two_vms(["alloc 8M unique", "alloc 160M unique"], [IDLE, BUSY], 0.0, |_| {});
    let [a, b] = settled(&host, 8);
    assert!(within(a.target_mib, b.target_mib, 10.0), "{} vs {}", a.target_mib, b.target_mib);
    assert!(within(a.target_mib + b.target_mib, T_MIB, 2.0), "{a:?} {b:?}");
}

#[test]
fn the_idle_tax_moves_memory_from_the_idle_vm_to_the_busy_one() {
    let host = two_vms(["alloc 8M unique", "alloc 160M unique"], [IDLE, BUSY], 0.75, |_| {});
    let [idle, busy] = settled(&host, 8);
    // Equal rho with a_i <= P_i: a_i + k (P_i - a_i) equal, P_idle + P_busy = T, so
    // P_idle = T / 2 + (k - 1) (a_idle - a_busy) / (2 k), k = 4.
    let (a_idle, a_busy) = (idle.active_fraction * 256.0, busy.active_fraction * 256.0);
    assert!(a_busy > 100.0 && a_idle < 16.0, "estimates {a_idle} {a_busy}");
    let want_idle = T_MIB / 2.0 + 3.0 * (a_idle - a_busy) / 8.0;
    assert!(within(idle.target_mib, want_idle, 10.0), "idle target {} vs {want_idle}", idle.target_mib);
    assert!(within(busy.target_mib, T_MIB - want_idle, 10.0), "busy target {}", busy.target_mib);
    // The idle VM's balloon takes the difference (max - target), for real.
    let inflated = wait_for("the idle VM's balloon inflates", || {
        let idle = alloc_of(&host, 0)?;
        let (target, size) = (idle.balloon_target_mib?, idle.balloon_mib?);
        (size >= target * 0.9 && target > 0.0).then_some((target, size))
    });
    assert!(within(inflated.0, 256.0 - idle.target_mib, 10.0), "{inflated:?} {idle:?}");
}

#[test]
fn shares_two_to_one_give_two_to_one() {
    // A 260 MiB budget: T = 244 MiB, 2:1 is 163 and 81 MiB; both read 220 MiB, more
    // than either gets: both are fully active, so the tax plays no part.
    let (alloc, busy) = ("alloc 220M unique", "for 60s { read 220M; idle 5ms }");
    let host = two_vms_under(260 * MIB, [alloc, alloc], [busy, busy], 0.75, |c| {
        c[0].shares = policy::Shares::Count(2 * c[1].shares.of(65536))
    });
    let [rich, poor] = settled(&host, 8);
    assert!(within(rich.target_mib + poor.target_mib, 244.0, 2.0), "{rich:?} {poor:?}");
    let ratio = rich.target_mib / poor.target_mib;
    assert!(within(ratio, 2.0, 10.0), "{} / {} = {ratio}", rich.target_mib, poor.target_mib);
}

#[test]
fn a_reservation_is_never_crossed_and_admission_refuses_what_does_not_fit() {
    let host = two_vms(["alloc 8M unique", "alloc 160M unique"], [IDLE, BUSY], 0.75, |c| c[0].min = 200 * MIB);
    for _ in 0..5 {
        let [idle, _] = settled(&host, 2);
        assert!(idle.target_mib >= 200.0, "{idle:?}");
        assert!(idle.balloon_target_mib.unwrap() <= 56.0, "{idle:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(host);
    // 2 x 200 MiB of reservations do not fit the 376 MiB.
    let mut configs = vec![guest("a", 256 * MIB, "exit 0"), guest("b", 256 * MIB, "exit 0")];
    configs.iter_mut().for_each(|c| c.min = 200 * MIB);
    let err = vmm::host::Host::create(&configs, Instant::now(), policy(400 * MIB, 0.75)).err().expect("refused");
    let msg = err.to_string();
    assert!(msg.starts_with("free-memory policy: admission refused") && !msg.contains('\n'), "{msg}");
}
