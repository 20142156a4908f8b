//! A crash of the VMM: `vmm run` killed with SIGKILL in the middle of an
//! eviction leaves its swap file and its control socket behind; the next `vmm run`
//! removes both and, when it ends, leaves nothing of its own behind either.
//!
//! Both runs get a private `TMPDIR` (where the default control socket
//! `vmm-PID.sock` lives) and swap directory, so that what is left can be listed.

mod common;

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TempDir;

fn vmm(tmp: &TempDir) -> Command {
    assert!(Path::new("/dev/kvm").exists(), "these tests boot real guests and need /dev/kvm");
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmm"));
    c.env("TMPDIR", &tmp.0);
    c
}

/// Kills the child if a test fails before it does.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `vmm ctl` against `sock`; its JSON if it succeeded.
fn ctl(tmp: &TempDir, sock: &Path, args: &[&str]) -> Option<serde_json::Value> {
    let out = vmm(tmp).arg("ctl").arg("--sock").arg(sock).args(args).output().unwrap();
    out.status.success().then(|| serde_json::from_slice(&out.stdout).unwrap())
}

/// Bytes of the file actually written (blocks allocated).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

#[test]
fn sigkill_during_eviction_leaves_nothing_behind_after_the_next_start() {
    let tmp = TempDir::new("tmp");
    let swap = TempDir::new("swap");
    let swap_dir = swap.0.to_str().unwrap();
    let child = vmm(&tmp)
        .args(["--log-level", "warn", "run", "--mem", "256M", "--swap-dir", swap_dir])
        .args(["--workload", "alloc 224M unique"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut running = Killed(child);
    let sock = tmp.0.join(format!("vmm-{pid}.sock"));
    let swap_file = swap.0.join("vm0.vswp");

    // Wait until the guest has its memory filled and serves commands.
    let deadline = Instant::now() + Duration::from_secs(60);
    while ctl(&tmp, &sock, &["vm", "stats"]).is_none_or(|s| s["vm0"]["guest"]["state"] != 2) {
        assert!(Instant::now() < deadline, "the guest never served commands");
        assert!(running.0.try_wait().unwrap().is_none(), "vmm run ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Evict everything; kill the VMM once the swap file is being written.
    let header_only = allocated(&swap_file);
    let evict = vmm(&tmp)
        .arg("ctl")
        .arg("--sock")
        .arg(&sock)
        .args(["swap", "out", "224M", "--vm", "vm0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while allocated(&swap_file) < header_only + (1 << 20) {
        assert!(Instant::now() < deadline, "the eviction never started writing");
        std::thread::sleep(Duration::from_micros(200));
    }
    running.0.kill().unwrap();
    running.0.wait().unwrap();
    let written = allocated(&swap_file);
    let evicted = evict.wait_with_output().unwrap();
    assert!(
        !evicted.status.success(),
        "the eviction finished before the kill: not a crash in the middle of it ({})",
        String::from_utf8_lossy(&evicted.stdout)
    );
    println!("killed with {} MiB of the swap file written", written >> 20);
    assert!(swap_file.exists(), "the killed run's swap file");
    assert!(std::fs::symlink_metadata(&sock).unwrap().file_type().is_socket(), "the killed run's socket");

    // The next start cleans up what the crash left.
    let next = vmm(&tmp)
        .args(["--log-level", "info", "run", "--mem", "64M", "--swap-dir", swap_dir, "--workload", "exit 0"])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&next.stderr);
    assert_eq!(next.status.code(), Some(0), "{log}");
    assert!(log.contains("removed 1 stale swap file"), "{log}");
    assert!(log.contains("removed the stale control socket"), "{log}");
    assert_eq!(swap.files(), Vec::<String>::new(), "left in the swap directory");
    assert_eq!(tmp.files(), Vec::<String>::new(), "left in TMPDIR");
}
