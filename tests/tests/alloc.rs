//! ESX's allocation policy on real guests: the active memory sampler's estimate
//! against the working set the guest reads, and the allocation targets of two VMs
//! under a budget that overcommits them (tax, shares, min, admission).
//!
//! Sampling periods are short (half a second) and samples many (400) so that
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

/// One test of this file at a time: each is sized for the guests to go over their
/// working sets within a period, which two cores shared by many guests cannot do.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn policy(budget: u64, tax: f64) -> HostOptions {
    let mut p = PolicyOptions {
        host_mem: HostMemChoice::Budget(budget),
        active: Some(ActiveOptions { period: Duration::from_millis(500), samples: N }),
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
    let _turn = one_at_a_time();
    // 64 MiB guests that allocate X, then only read it, for several X.
    for (x_mib, reads) in
        [(0u64, "idle 20s"), (8, "for 20s { read 8M; idle 5ms }"), (24, "for 20s { read 24M; idle 5ms }")]
    {
        let alloc = if x_mib == 0 { String::new() } else { format!("alloc {x_mib}M unique") };
        let host = start_on(&[guest("ws", 64 * MIB, &alloc)], policy(8 << 30, 0.75));
        wait_serving(&host);
        let running = command(&host, 0, reads);
        // 12 periods of reads only: a sampler that saw writes alone would be down
        // to (7/8)^12 = 0.2 of the allocation's estimate by now.
        assert_estimate(&estimate_after(&host, 0, 12), x_mib);
        host.vm(0).stop("test over");
        let _ = running.join();
    }
}

/// `a` estimates a read-only working set of `x_mib` of a 64 MiB guest: within 4
/// standard errors of one period's `f` (0.024 at f = 0.375 with n = 400), plus 3%
/// for the guest's own pages (kernel, stacks, page records, 1.5 MiB).
fn assert_estimate(a: &ActiveStats, x_mib: u64) {
    let truth = x_mib as f64 / 64.0;
    let sigma = (truth * (1.0 - truth) / N as f64).sqrt();
    let f = a.estimate.fraction().unwrap();
    assert!(f >= truth - 4.0 * sigma && f <= truth + 4.0 * sigma + 0.03, "X = {x_mib} MiB: estimate {f:.4} {a:?}");
    assert!(a.faults_per_period <= N as f64, "{a:?}");
    assert!(a.last_valid >= N as u64 * 9 / 10, "samples are rarely lost: {a:?}");
}

#[test]
fn two_hosts_in_one_process_keep_each_others_evidence() {
    let _turn = one_at_a_time();
    // `clear_refs` is process-wide: with a sampler per host, each host's period
    // starts erased the other's touches and both estimates fell (to about 0.5 of
    // 0.75 in CI). One sampling thread per process reads every sample first.
    let hosts: Vec<Running> =
        (0..2).map(|_| start_on(&[guest("ws", 64 * MIB, "alloc 24M unique")], policy(8 << 30, 0.75))).collect();
    for h in &hosts {
        wait_serving(h);
    }
    let running: Vec<_> = hosts.iter().map(|h| command(h, 0, "for 20s { read 24M; idle 5ms }")).collect();
    for host in &hosts {
        assert_estimate(&estimate_after(host, 0, 12), 24);
    }
    for (host, run) in hosts.iter().zip(running) {
        host.vm(0).stop("test over");
        let _ = run.join();
    }
}

#[test]
fn the_estimate_rises_fast_and_falls_slowly() {
    let _turn = one_at_a_time();
    let host = start_on(&[guest("steps", 64 * MIB, "alloc 48M unique")], policy(8 << 30, 0.75));
    wait_serving(&host);
    let run = |workload: &'static str| command(&host, 0, workload);
    // 8 MiB (f = 0.125) long enough for the slow average to settle.
    assert_eq!(run("for 10s { read 8M; idle 5ms }").join().unwrap(), Some(0));
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

/// Two 128 MiB VMs under a 200 MiB budget: `T` = 188 MiB for the VMs. Periods of
/// half a second: the busy guest reads its working set many times in each.
const T_MIB: f64 = 200.0 * 0.94;

/// Two VMs that allocate, then serve; then `reads` of each run as commands.
fn two_vms(
    allocs: [&str; 2],
    reads: [&'static str; 2],
    tax: f64,
    tune: impl Fn(&mut [vmm::config::VmConfig]),
) -> Running {
    two_vms_under(200 * MIB, allocs, reads, tax, tune)
}

fn two_vms_under(
    budget: u64,
    allocs: [&str; 2],
    reads: [&'static str; 2],
    tax: f64,
    tune: impl Fn(&mut [vmm::config::VmConfig]),
) -> Running {
    let mut configs = vec![guest("a", 128 * MIB, allocs[0]), guest("b", 128 * MIB, allocs[1])];
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
const BUSY: &str = "for 60s { read 80M; idle 5ms }";

fn within(got: f64, want: f64, pct: f64) -> bool {
    (got - want).abs() <= want * pct / 100.0
}

#[test]
fn without_tax_equal_shares_get_equal_targets() {
    let _turn = one_at_a_time();
    let host = two_vms(["alloc 8M unique", "alloc 80M unique"], [IDLE, BUSY], 0.0, |_| {});
    let [a, b] = settled(&host, 6);
    assert!(within(a.target_mib, b.target_mib, 10.0), "{} vs {}", a.target_mib, b.target_mib);
    assert!(within(a.target_mib + b.target_mib, T_MIB, 2.0), "{a:?} {b:?}");
}

#[test]
fn the_idle_tax_moves_memory_from_the_idle_vm_to_the_busy_one() {
    let _turn = one_at_a_time();
    let host = two_vms(["alloc 8M unique", "alloc 80M unique"], [IDLE, BUSY], 0.75, |_| {});
    let [idle, busy] = settled(&host, 6);
    // Equal rho with a_i <= P_i: a_i + k (P_i - a_i) equal, P_idle + P_busy = T, so
    // P_idle = T / 2 + (k - 1) (a_idle - a_busy) / (2 k), k = 4.
    let (a_idle, a_busy) = (idle.active_fraction * 128.0, busy.active_fraction * 128.0);
    // Busy and idle, whatever the load lets the busy guest cover per period (the
    // prediction below uses the estimates as reported).
    assert!(a_busy > 40.0 && a_idle < 8.0, "estimates {a_idle} {a_busy}");
    let want_idle = T_MIB / 2.0 + 3.0 * (a_idle - a_busy) / 8.0;
    assert!(within(idle.target_mib, want_idle, 10.0), "idle target {} vs {want_idle}", idle.target_mib);
    assert!(within(busy.target_mib, T_MIB - want_idle, 10.0), "busy target {}", busy.target_mib);
    // The idle VM's balloon takes the difference (max - target), for real.
    let inflated = wait_for("the idle VM's balloon inflates", || {
        let idle = alloc_of(&host, 0)?;
        let (target, size) = (idle.balloon_target_mib?, idle.balloon_mib?);
        (size >= target * 0.9 && target > 0.0).then_some((target, size))
    });
    assert!(within(inflated.0, 128.0 - idle.target_mib, 10.0), "{inflated:?} {idle:?}");
}

#[test]
fn shares_two_to_one_give_two_to_one() {
    let _turn = one_at_a_time();
    // An 80 MiB budget: T = 75 MiB, 2:1 is 50 and 25 MiB; both read 60 MiB, more
    // than either gets: both are fully active, so the tax plays no part.
    let (alloc, busy) = ("alloc 60M unique", "for 60s { read 60M; idle 5ms }");
    let host = two_vms_under(80 * MIB, [alloc, alloc], [busy, busy], 0.75, |c| {
        c[0].shares = policy::Shares::Count(2 * c[1].shares.of(32768))
    });
    // Both fully active (estimates above their targets) first.
    wait_for("both estimates above 52 MiB", || {
        let f = |i| alloc_of(&host, i).map_or(0.0, |a| a.active_fraction);
        (f(0) * 128.0 >= 52.0 && f(1) * 128.0 >= 52.0).then_some(())
    });
    let [rich, poor] = settled(&host, 2);
    assert!(within(rich.target_mib + poor.target_mib, 80.0 * 0.94, 2.0), "{rich:?} {poor:?}");
    let ratio = rich.target_mib / poor.target_mib;
    assert!(within(ratio, 2.0, 10.0), "{} / {} = {ratio}", rich.target_mib, poor.target_mib);
}

#[test]
fn a_reservation_is_never_crossed_and_admission_refuses_what_does_not_fit() {
    let _turn = one_at_a_time();
    let host = two_vms(["alloc 8M unique", "alloc 80M unique"], [IDLE, BUSY], 0.75, |c| c[0].min = 100 * MIB);
    for _ in 0..5 {
        let [idle, _] = settled(&host, 1);
        assert!(idle.target_mib >= 100.0, "{idle:?}");
        assert!(idle.balloon_target_mib.unwrap() <= 28.0, "{idle:?}");
    }
    drop(host);
    // 2 x 100 MiB of reservations do not fit the 188 MiB.
    let mut configs = vec![guest("a", 128 * MIB, "exit 0"), guest("b", 128 * MIB, "exit 0")];
    configs.iter_mut().for_each(|c| c.min = 100 * MIB);
    let err = vmm::host::Host::create(&configs, Instant::now(), policy(200 * MIB, 0.75)).err().expect("refused");
    let msg = err.to_string();
    assert!(msg.starts_with("free-memory policy: admission refused") && !msg.contains('\n'), "{msg}");
}

#[test]
fn sampling_alongside_every_reclaimer_loses_no_write() {
    let _turn = one_at_a_time();
    // Two 2-vCPU guests rewrite and check their memory for a few seconds while the
    // sampler drops KVM's mappings of 1000 pages every 50 ms, page sharing merges at
    // full speed, and the policy (a budget below the guests' memory) balloons and
    // swaps them: every verify must find every page intact. Rounds go on for
    // `VMM_STRESS_DURATION` (one round by default).
    let run_for = common::stress_duration(Duration::ZERO);
    let dir = common::TempDir::new("alloc-stress");
    let mut opts = policy(112 * MIB, 0.75);
    if let Some(p) = &mut opts.policy {
        p.active = Some(ActiveOptions { period: Duration::from_millis(50), samples: 1000 });
    }
    opts.tps = Some(tps::Config { pages_per_sec: 0, ..tps::Config::default() });
    opts.swap = Some(vmm::reclaim::swap::SwapOptions::new(&dir.0));
    let configs = common::two_vcpu_guests(&["s0", "s1"], 128 * MIB, "alloc 24M shared:3; alloc 24M unique");
    let host = start_on(&configs, opts);
    (0..2).for_each(|i| wait_serving(host.vm(i)));
    let round = "repeat 5 { touch 8M; alloc 8M unique; alloc 4M zero; verify; free 12M zero; verify }";
    let t0 = Instant::now();
    let mut rounds = 0;
    while rounds == 0 || t0.elapsed() < run_for {
        let runs: Vec<_> = (0..2).map(|i| command(&host, i, round)).collect();
        let status: Vec<_> = runs.into_iter().map(|r| r.join().unwrap()).collect();
        assert_eq!(status, [Some(0), Some(0)], "round {rounds}: a verify found a bad page (or a step failed)");
        rounds += 1;
    }
    for i in 0..2 {
        let a = active_of(&host, i).expect("sampled");
        assert!(a.estimate.periods >= 10 && a.error.is_none(), "sampling ran alongside: {a:?}");
        // vm_stats' page census covers the whole RAM, and page sharing merged some.
        let c = host.vm(i).shared().stats().pages.expect("a census");
        assert_eq!(c.private + c.shared + c.zero + c.absent, 128 * MIB / 4096, "{c:?}");
        assert!(c.private > 0 && c.shared > 0, "{c:?}");
        eprintln!(
            "{}: {rounds} rounds in {:.0?}, {} sampling periods, {:.0} faults and {:.0} us paused per period",
            host.vm(i).config().name,
            t0.elapsed(),
            a.estimate.periods,
            a.faults_per_period,
            a.pause_us_per_period
        );
    }
}

#[test]
fn periods_count_only_while_the_vm_runs() {
    let _turn = one_at_a_time();
    let host = start_on(&[guest("paused", 64 * MIB, "alloc 8M unique")], policy(8 << 30, 0.75));
    wait_serving(&host);
    let periods = || active_of(&host, 0).map_or(0, |a| a.estimate.periods);
    wait_for("two periods", || (periods() >= 2).then_some(()));
    // Paused for the length of six periods: at most the one in progress ends.
    let pause = host.vm(0).shared().run().pause_guard(Duration::from_secs(5)).expect("pause");
    let before = periods();
    std::thread::sleep(Duration::from_secs(3));
    let during = periods();
    drop(pause);
    assert!(during <= before + 1, "{before} -> {during} periods while paused");
    wait_for("periods once running again", || (periods() >= during + 2).then_some(()));
}
