//! The balloon through the real binaries: `vmm run` with a control socket, and
//! `vmm ctl balloon set|auto|stats`, `vmm ctl vm stats` and `vmm ctl policy stats`
//! talking to it. The guest's statistics make the round trip guest -> device ->
//! API -> `vmm ctl`; a target set with `vmm ctl` holds against the free-memory
//! policy until handed back.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use guest_abi::guest_state;
use policy::PolicyStats;
use serde::de::DeserializeOwned;
use vmm::api::{BalloonSnapshot, BalloonTarget, TargetMode, VmStats};

mod common;
use common::Running;

const MIB: u64 = 1 << 20;

fn vmm() -> Command {
    assert!(Path::new("/dev/kvm").exists(), "these tests boot real guests and need /dev/kvm");
    Command::new(env!("CARGO_BIN_EXE_vmm"))
}

fn ctl(sock: &Path, args: &[&str]) -> Output {
    vmm().arg("ctl").arg("--sock").arg(sock).args(args).output().expect("run vmm ctl")
}

/// What `vmm ctl` printed, panicking with its error if it failed.
fn ctl_ok<T: DeserializeOwned>(sock: &Path, args: &[&str]) -> T {
    let out = ctl(sock, args);
    assert!(out.status.success(), "vmm ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("vmm ctl prints the request's result")
}

/// `vmm ctl balloon stats`, per VM.
fn balloon_stats(sock: &Path) -> BTreeMap<String, BalloonSnapshot> {
    ctl_ok(sock, &["balloon", "stats"])
}

/// Starts `vmm run` with `args` and waits until its guest serves commands.
fn start(name: &str, args: &[&str]) -> Running {
    let sock = std::env::temp_dir().join(format!("vmm-balloon-{name}-{}.sock", std::process::id()));
    let child = vmm()
        .args(["--log-level", "warn", "run", "--api-sock"])
        .arg(&sock)
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .expect("run vmm");
    let running = Running { child, sock };
    wait(&running, "the guest to serve commands", |stats| stats["vm0"].guest.state == guest_state::SERVING);
    running
}

/// Polls `vmm ctl vm stats` until `done` holds (30 s at most).
fn wait(
    r: &Running,
    what: &str,
    mut done: impl FnMut(&BTreeMap<String, VmStats>) -> bool,
) -> BTreeMap<String, VmStats> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = ctl(&r.sock, &["vm", "stats"]);
        if out.status.success() {
            let stats = serde_json::from_slice(&out.stdout).unwrap();
            if done(&stats) {
                return stats;
            }
        }
        assert!(Instant::now() < deadline, "{what}: not within 30 s ({})", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn guest_statistics_round_trip_through_vmm_ctl() {
    let r = start("stats", &["--mem", "128M", "--workload", "alloc 32M unique"]);
    let stats = balloon_stats(&r.sock);
    let s = &stats["vm0"];
    assert!(s.stats_updates >= 1, "{s:?}");
    let guest = &s.guest_stats;
    assert_eq!(guest.get("total_memory"), Some(&(128 * MIB)), "{s:?}");
    let free = *guest.get("free_memory").expect("free_memory");
    assert!(free < 96 * MIB && free > 80 * MIB, "free {} MiB after alloc 32M", free / MIB);
    assert_eq!(guest.get("available_memory"), Some(&free));
    assert_eq!(guest.get("oom_kills"), Some(&0));

    // Inflate 32 MiB: the guest's own numbers show the frames gone.
    let set: BTreeMap<String, BalloonTarget> = ctl_ok(&r.sock, &["balloon", "set", "32M", "--vm", "vm0"]);
    assert_eq!(set["vm0"].target_bytes, 32 * MIB);
    // The device holds the pages as soon as it took the buffers; the guest writes
    // `actual` once it has seen them back: wait for both.
    let actual = |v: &BTreeMap<String, VmStats>| v["vm0"].balloon.as_ref().map(|b| b.actual_pages);
    wait(&r, "inflate 32M", |v| v["vm0"].ballooned_mib == Some(32.0) && actual(v) == Some(32 * MIB / 4096));
    let stats = balloon_stats(&r.sock);
    let now_free = *stats["vm0"].guest_stats.get("free_memory").expect("free_memory");
    assert_eq!(now_free, free - 32 * MIB, "fresh statistics after the inflate: {:?}", stats["vm0"]);
}

#[test]
fn bad_balloon_requests_get_one_line_errors() {
    let r = start("errors", &["--mem", "64M", "--workload", "alloc 4M dup"]);
    let cases: &[(&[&str], &str)] = &[
        (&["balloon", "set", "1G"], "exceeds"),
        (&["balloon", "set", "lots"], "bad size"),
        (&["balloon", "set", "4097"], "4 KiB"),
        (&["balloon", "stats", "--vm", "nope"], "no VM named"),
        (&["balloon", "auto", "--vm", "nope"], "no VM named"),
        (&["policy", "stats"], "--policy on"),
    ];
    for (args, expect) in cases {
        let out = ctl(&r.sock, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(expect) && err.lines().count() == 1, "{args:?}: {err}");
    }
    // The VMM is still there, and the balloon untouched.
    assert_eq!(balloon_stats(&r.sock)["vm0"].target_pages, 0);
    let out = vmm().args(["run", "--mem", "64M", "--balloon", "size=128M", "--workload", "exit 0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exceeds the VM's memory"));
}

#[test]
fn a_target_set_with_vmm_ctl_holds_against_the_policy_until_handed_back() {
    // A 4 GiB budget for one 128 MiB guest: plenty free, so the policy deflates
    // every balloon it owns.
    let r = start(
        "pin",
        &["--mem", "128M", "--policy", "on", "--host-mem", "4G", "--workload", "alloc 32M unique; free 32M"],
    );
    let set: BTreeMap<String, BalloonTarget> = ctl_ok(&r.sock, &["balloon", "set", "32M"]);
    assert_eq!(set["vm0"].target_mode, TargetMode::Pinned);
    wait(&r, "inflate 32M", |v| v["vm0"].ballooned_mib == Some(32.0));
    let policy = |r: &Running| -> PolicyStats { ctl_ok(&r.sock, &["policy", "stats"]) };
    let ticks = |r: &Running| policy(r).ticks;
    let t0 = ticks(&r);
    let deadline = Instant::now() + Duration::from_secs(30);
    while ticks(&r) < t0 + 10 {
        assert!(Instant::now() < deadline, "the policy does not tick");
        std::thread::sleep(Duration::from_millis(20));
    }
    let b = &balloon_stats(&r.sock)["vm0"];
    assert_eq!((b.target_pages, b.target_mode), (32 * MIB / 4096, TargetMode::Pinned), "{b:?}");
    assert_eq!(policy(&r).state, policy::FreeState::High);

    let auto: BTreeMap<String, BalloonTarget> = ctl_ok(&r.sock, &["balloon", "auto"]);
    assert_eq!(auto["vm0"].target_mode, TargetMode::Auto);
    wait(&r, "the policy to deflate the balloon", |v| {
        v["vm0"].balloon.as_ref().is_some_and(|b| b.target_pages == 0) && v["vm0"].ballooned_mib == Some(0.0)
    });
}

#[test]
fn the_tax_and_shares_change_at_run_time_through_vmm_ctl() {
    // Two idle 128 MiB VMs under a 200 MiB budget: overcommitted, targets by shares.
    let args = ["--vms", "2", "--mem", "128M", "--policy", "on", "--host-mem", "200M", "--workload", "alloc 8M unique"];
    let r = start("alloc", &[&args[..], &["--active-period", "200ms", "--realloc-period", "200ms"]].concat());
    let tax: serde_json::Value = ctl_ok(&r.sock, &["policy", "tax", "0.5"]);
    assert_eq!(tax["idle_tax"], 0.5);
    let shares: serde_json::Value = ctl_ok(&r.sock, &["policy", "shares", "high", "--vm", "vm0"]);
    assert_eq!(shares["vm0"], "high");
    let stats = wait(&r, "vm0's new shares to take effect", |s| {
        let (a, b) = (s["vm0"].alloc.as_ref(), s["vm1"].alloc.as_ref());
        a.zip(b).is_some_and(|(a, b)| a.shares == 2560 && a.target_mib > 1.5 * b.target_mib)
    });
    let (a, b) = (stats["vm0"].alloc.clone().unwrap(), stats["vm1"].alloc.clone().unwrap());
    assert_eq!((a.shares_setting.as_str(), b.shares_setting.as_str(), b.shares), ("high", "normal", 1280));
    assert!((a.target_mib + b.target_mib - 188.0).abs() < 4.0, "{a:?} {b:?}");
    let policy: PolicyStats = ctl_ok(&r.sock, &["policy", "stats"]);
    assert!(policy.idle_tax == 0.5 && policy.overcommitted, "{policy:?}");
    for (args, expect) in [
        (&["policy", "tax", "1"][..], "idle memory tax 1 is not between 0 (included) and 1 (excluded)"),
        (&["policy", "shares", "0", "--vm", "vm0"][..], "shares must be at least 1"),
        (&["policy", "shares", "lots", "--vm", "vm0"][..], "bad shares \"lots\""),
        (&["policy", "shares", "high", "--vm", "nope"][..], "nope"),
    ] {
        let out = ctl(&r.sock, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(expect) && err.trim_end().lines().count() == 1,
            "{args:?}: {err}"
        );
    }
}
