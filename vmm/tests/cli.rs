//! The `vmm` binary as a user runs it: the commands the README and the issues show,
//! exit statuses, and one-line errors for bad input.

use std::process::{Command, Output};

use guest_abi::workload::Op;
use vmm::console::GuestStep;

fn vmm(args: &[&str]) -> Output {
    assert!(std::path::Path::new("/dev/kvm").exists(), "these tests boot real guests and need /dev/kvm");
    Command::new(env!("CARGO_BIN_EXE_vmm")).args(args).output().expect("run vmm")
}

/// The JSON lines on stdout (console lines without their `[NAME] ` label).
fn stdout_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim_start_matches(|c| c != '{').to_string()).collect()
}

/// The summaries and other JSON objects on stdout.
fn stdout_json(out: &Output) -> Vec<serde_json::Value> {
    stdout_lines(out).iter().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).collect()
}

/// The guests' step results on stdout.
fn stdout_steps(out: &Output) -> Vec<GuestStep> {
    vmm::console::steps(&stdout_lines(out))
}

/// The first summary line of `kind` (`vm` or `host`) among `lines`.
fn summary<'a>(lines: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    lines.iter().find(|l| l["summary"] == kind).unwrap_or_else(|| panic!("no {kind} summary line"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn default_run_boots_the_builtin_guest() {
    let out = vmm(&["--log-level", "warn", "run"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines = stdout_json(&out);
    let vm = summary(&lines, "vm");
    assert_eq!(vm["exit_code"], 0);
    for key in ["exits", "insn_emulation", "first_output_ms", "first_insn_ms", "wall_ms"] {
        assert!(vm.get(key).is_some_and(|v| !v.is_null()), "summary lacks {key}: {vm}");
    }
    assert!(lines.iter().any(|l| l["summary"] == "host"));
    assert!(stdout_steps(&out).iter().any(|s| s.op == Op::Verify && s.bad == Some(0)));
}

#[test]
fn the_issue_examples_work_as_written() {
    let out = vmm(&["run", "--mem", "256M", "--workload", "alloc 128M unique; verify; exit 0"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = vmm(&["run", "--vms", "3", "--mem", "128M", "--workload", "alloc 32M shared:5; verify; exit 0"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for vm in ["vm0", "vm1", "vm2"] {
        assert!(text.contains(&format!("[{vm}] ")), "console lines of {vm} are labelled");
    }
    let summaries: Vec<_> = stdout_json(&out).into_iter().filter(|l| l["summary"] == "vm").collect();
    assert_eq!(summaries.len(), 3);
}

#[test]
fn the_guest_exit_code_is_the_exit_status() {
    let out = vmm(&["run", "--mem", "32M", "--workload", "exit 9"]);
    assert_eq!(out.status.code(), Some(9));
}

#[test]
fn bad_input_gets_one_line_errors() {
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--mem", "8M"], "too small"),
        (&["run", "--mem", "100T"], "too large"),
        (&["run", "--mem", "lots"], "bad size"),
        (&["run", "--vcpus", "0"], "vcpus"),
        (&["run", "--workload", "alloc 1M purple"], "bad workload"),
        (&["run", "--kernel", "/etc/hostname"], "not a kernel this VMM boots"),
        (&["run", "--kernel", "builtin:bzimage", "--initrd", "/nonexistent/initrd"], "cannot read initrd"),
        (&["run", "--kernel", "/nonexistent/kernel"], "cannot read kernel"),
        (&["run", "--config", "/nonexistent.toml"], "cannot read config"),
        (&["run", "--policy", "on", "--idle-tax", "1"], "idle memory tax 1 is not between 0 (included) and 1"),
        (&["run", "--policy", "on", "--idle-tax=-0.5"], "idle memory tax -0.5 is not between 0"),
        (&["run", "--policy", "on", "--idle-tax", "much"], "expected a number"),
        (&["run", "--policy", "on", "--shares", "0"], "shares must be at least 1"),
        (&["run", "--policy", "on", "--shares", "medium"], "bad shares \"medium\": a number or low, normal, high"),
        (&["run", "--policy", "on", "--mem", "128M", "--min", "256M"], "min 256 MiB is more than the VM's memory"),
        (&["run", "--min", "64M"], "a reservation (min) needs the free-memory policy"),
        (
            &["run", "--policy", "on", "--host-mem", "512M", "--vms", "2", "--mem", "256M", "--min", "250M"],
            "admission refused: the VMs' reservations (500 MiB) do not fit",
        ),
        (&["top", "--sock", "/nonexistent.sock", "-d", "0"], "the refresh interval must be from 100ms to 60s"),
        (&["top", "--sock", "/nonexistent.sock", "-d", "3600s"], "the refresh interval must be from 100ms to 60s"),
        (&["top", "--sock", "/nonexistent.sock", "-b"], "cannot connect to /nonexistent.sock"),
    ];
    for (args, expect) in cases {
        let out = vmm(args);
        let err = stderr(&out);
        assert!(matches!(out.status.code(), Some(1 | 2)), "{args:?}: status {:?}", out.status);
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{args:?}: {err}");
        assert!(err.trim_end().lines().count() <= 3, "{args:?}: short: {err}");
    }
}

#[test]
fn config_files_define_vms() {
    let dir = std::env::temp_dir().join(format!("vmm-cli-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("vms.toml");
    std::fs::write(
        &cfg,
        "[defaults]\nmem = \"64M\"\n[[vm]]\nname = \"small\"\nworkload = \"alloc 4M dup; verify; exit 0\"\n\
         [[vm]]\nname = \"big\"\nmem = \"128M\"\nworkload = \"alloc 64M unique; verify; exit 0\"\nconsole = \"big.log\"\n",
    )
    .unwrap();
    let out = vmm(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let big = std::fs::read_to_string(dir.join("big.log")).unwrap();
    assert!(big.contains("\"op\":\"verify\""), "{big}");
    let vms: Vec<_> = stdout_json(&out).into_iter().filter(|l| l["summary"] == "vm").collect();
    assert_eq!(vms[1]["vm"], "big");
    assert_eq!(vms[1]["mem_mib"], 128);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_demo_reclaims_with_each_technique_and_loses_nothing() {
    let dir = std::env::temp_dir().join(format!("vmm-cli-demo-{}", std::process::id()));
    let out = vmm(&[
        "demo",
        "--mem",
        "128M",
        "--balloon",
        "32M",
        "--swap",
        "16M",
        "--swap-dir",
        dir.to_str().unwrap(),
        "--log-level",
        "warn",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = stdout_json(&out);
    let demo = lines.iter().find(|l| l["demo"] == "reclaim").expect("the demo's JSON line");
    let phases = demo["phases"].as_array().unwrap();
    let held = |name: &str| {
        phases.iter().find(|p| p["phase"] == name).unwrap_or_else(|| panic!("phase {name}"))["guest_mib"]
            .as_f64()
            .unwrap()
    };
    // Two 128 MiB guests: 12+12 MiB of zero/identical pages each and 32 MiB shared
    // between them are what page sharing can take; 24 MiB each written and freed is
    // what the balloon can; the swapper evicts 16 MiB of each.
    let (filled, tps, balloon, swap) = (held("boot+fill"), held("tps"), held("balloon"), held("swap"));
    assert!(filled - tps > 60.0, "page sharing gave back {} MiB", filled - tps);
    assert!(tps - balloon > 20.0, "the balloon gave back {} MiB", tps - balloon);
    assert!(balloon - swap > 20.0, "the swapper gave back {} MiB", balloon - swap);
    assert!(phases.iter().any(|p| p["phase"] == "verify"));
    let vms: Vec<_> = lines.iter().filter(|l| l["summary"] == "vm").collect();
    assert_eq!(vms.len(), 2);
    assert!(vms.iter().all(|v| v["exit_code"] == 0), "{vms:?}");
    assert!(vms.iter().all(|v| v["swap"]["pages_in"].as_u64().unwrap() > 0), "verify faulted pages back: {vms:?}");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "swap files left behind: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn swapping_runs_under_a_limit_and_cleans_up() {
    let dir = std::env::temp_dir().join(format!("vmm-cli-swap-{}", std::process::id()));
    let d = dir.to_str().unwrap();
    let out = vmm(&[
        "--log-level",
        "warn",
        "run",
        "--mem",
        "128M",
        "--swap-dir",
        d,
        "--limit",
        "24M",
        "--swap-victims",
        "idle",
        "--workload",
        "alloc 48M unique; idle 1500ms; verify; exit 0",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines = stdout_json(&out);
    let vm = summary(&lines, "vm");
    assert!(vm["swap"]["pages_out"].as_u64().unwrap() > 0, "a VM over its limit is swapped: {vm}");
    assert!(vm["swap"]["prefetch_hits"].is_u64(), "{vm}");
    assert!(stdout_steps(&out).iter().any(|s| s.op == Op::Verify && s.bad == Some(0)));
    let host = summary(&lines, "host");
    assert!(host["policy"]["ticks"].as_u64().unwrap() > 0, "{host}");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "swap files left behind: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();

    // The policy's settings without the policy: one line saying how to turn it on.
    let out = vmm(&["run", "--host-mem", "1G"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--host-mem needs the free-memory policy: add --policy on"), "{}", stderr(&out));
    let out = vmm(&["run", "--swap-dir", d, "--policy", "off", "--limit", "24M"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("drop --policy off"), "{}", stderr(&out));
}

#[test]
fn the_policy_runs_on_the_balloon_alone() {
    let out = vmm(&[
        "--log-level",
        "warn",
        "run",
        "--mem",
        "128M",
        "--policy",
        "on",
        "--host-mem",
        "1G",
        "--workload",
        "alloc 16M unique; idle 300ms; exit 0",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines = stdout_json(&out);
    let vm = summary(&lines, "vm");
    assert!(vm.get("swap").is_none(), "no swapper without --swap: {vm}");
    let host = summary(&lines, "host");
    assert!(host["policy"]["ticks"].as_u64().unwrap() > 0, "{host}");
    assert_eq!(host["policy"]["state"], "high", "{host}");
}
