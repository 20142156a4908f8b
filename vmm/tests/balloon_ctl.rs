//! The balloon through the real binaries: `vmm run` with a control socket, and
//! `vmm ctl balloon set|auto|stats`, `vmm ctl vm stats` and `vmm ctl policy stats`
//! talking to it. The guest's statistics make the round trip guest -> device ->
//! API -> `vmm ctl`; a target set with `vmm ctl` holds against the free-memory
//! policy until handed back.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const MIB: u64 = 1 << 20;

/// A `vmm run` child, stopped when dropped.
struct Running {
    child: Child,
    sock: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

fn vmm() -> Command {
    assert!(Path::new("/dev/kvm").exists(), "these tests boot real guests and need /dev/kvm");
    Command::new(env!("CARGO_BIN_EXE_vmm"))
}

fn ctl(sock: &Path, args: &[&str]) -> Output {
    vmm().arg("ctl").arg("--sock").arg(sock).args(args).output().expect("run vmm ctl")
}

/// The JSON `vmm ctl` printed, panicking with its error if it failed.
fn ctl_ok(sock: &Path, args: &[&str]) -> Value {
    let out = ctl(sock, args);
    assert!(out.status.success(), "vmm ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("vmm ctl prints JSON")
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
    wait(&running, "the guest to serve commands", |stats| stats["vm0"]["guest"]["state"] == 2);
    running
}

/// Polls `vmm ctl vm stats` until `done` holds (30 s at most).
fn wait(r: &Running, what: &str, mut done: impl FnMut(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = ctl(&r.sock, &["vm", "stats"]);
        if out.status.success() {
            let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
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
    let stats = ctl_ok(&r.sock, &["balloon", "stats"]);
    let s = &stats["vm0"];
    assert!(s["stats_updates"].as_u64().unwrap() >= 1, "{s}");
    let guest = &s["guest_stats"];
    assert_eq!(guest["total_memory"], 128 * MIB, "{s}");
    let free = guest["free_memory"].as_u64().expect("free_memory");
    assert!(free < 96 * MIB && free > 80 * MIB, "free {} MiB after alloc 32M", free / MIB);
    assert_eq!(guest["available_memory"], free);
    assert_eq!(guest["oom_kills"], 0);

    // Inflate 32 MiB: the guest's own numbers show the frames gone.
    let set = ctl_ok(&r.sock, &["balloon", "set", "32M", "--vm", "vm0"]);
    assert_eq!(set["vm0"]["target_bytes"], 32 * MIB);
    let vm = wait(&r, "inflate 32M", |v| v["vm0"]["ballooned_mib"] == 32.0);
    assert_eq!(vm["vm0"]["balloon"]["actual_pages"], 32 * MIB / 4096);
    let stats = ctl_ok(&r.sock, &["balloon", "stats"]);
    let now_free = stats["vm0"]["guest_stats"]["free_memory"].as_u64().unwrap();
    assert_eq!(now_free, free - 32 * MIB, "fresh statistics after the inflate: {}", stats["vm0"]);
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
    assert_eq!(ctl_ok(&r.sock, &["balloon", "stats"])["vm0"]["target_pages"], 0);
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
    let set = ctl_ok(&r.sock, &["balloon", "set", "32M"]);
    assert_eq!(set["vm0"]["target_mode"], "pinned");
    wait(&r, "inflate 32M", |v| v["vm0"]["ballooned_mib"] == 32.0);
    let ticks = |r: &Running| ctl_ok(&r.sock, &["policy", "stats"])["ticks"].as_u64().unwrap();
    let t0 = ticks(&r);
    let deadline = Instant::now() + Duration::from_secs(30);
    while ticks(&r) < t0 + 10 {
        assert!(Instant::now() < deadline, "the policy does not tick");
        std::thread::sleep(Duration::from_millis(20));
    }
    let b = &ctl_ok(&r.sock, &["balloon", "stats"])["vm0"];
    assert_eq!((b["target_pages"].as_u64(), b["target_mode"].as_str()), (Some(32 * MIB / 4096), Some("pinned")), "{b}");
    assert_eq!(ctl_ok(&r.sock, &["policy", "stats"])["state"], "high");

    let auto = ctl_ok(&r.sock, &["balloon", "auto"]);
    assert_eq!(auto["vm0"]["target_mode"], "auto");
    wait(&r, "the policy to deflate the balloon", |v| {
        v["vm0"]["balloon"]["target_pages"] == 0 && v["vm0"]["ballooned_mib"] == 0.0
    });
}
