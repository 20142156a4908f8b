//! The built-in test guest on /dev/kvm: every workload step, its JSON results, exit
//! codes, several vCPUs and several VMs, native execution, and run-time commands.

mod common;

use std::time::Duration;

use common::{guest, run, run_one, start, wait_serving};
use guest_abi::step::Outcome;
use guest_abi::workload::Op;
use vmm::console::GuestStep;

const MIB: u64 = 1 << 20;

fn op(steps: &[GuestStep], op: Op) -> Vec<&GuestStep> {
    steps.iter().filter(|s| s.op == op).collect()
}

#[test]
fn every_page_kind_allocates_and_verifies() {
    let run = run_one(guest(
        "kinds",
        128 * MIB,
        "alloc 8M zero; alloc 8M dup; alloc 8M shared:5; alloc 8M unique; verify; exit 0",
    ));
    assert_eq!(run.exit_code(0), 0);
    let steps = run.steps(0);
    let allocs = op(&steps, Op::Alloc);
    assert_eq!(allocs.len(), 4);
    for a in &allocs {
        assert_eq!(a.pages, Some(2048), "{a:?}");
        assert_eq!(a.result, Outcome::Ok, "{a:?}");
    }
    let verify = op(&steps, Op::Verify);
    assert_eq!(verify[0].bad, Some(0));
    assert_eq!(verify[0].pages, Some(4 * 2048));
    let boot = &run.json(0)[0];
    assert_eq!(boot["event"], "boot");
    assert_eq!(boot["mem_mib"], 128);
    // The guest made 32 MiB resident, and not much more.
    let rss = run.report.vms[0].guest_rss_mib;
    assert!((32.0..64.0).contains(&rss), "guest RSS {rss} MiB");
}

#[test]
fn touch_free_repeat_and_idle_keep_contents_right() {
    let run = run_one(guest(
        "steps",
        128 * MIB,
        "alloc 16M unique; repeat 3 { touch 4M; verify }; free 8M; verify; idle 20ms; exit 0",
    ));
    assert_eq!(run.exit_code(0), 0);
    let steps = run.steps(0);
    let verifies = op(&steps, Op::Verify);
    assert_eq!(verifies.len(), 4);
    assert!(verifies.iter().all(|v| v.bad == Some(0) && v.result == Outcome::Ok));
    assert_eq!(verifies[3].pages, Some(2048), "free 8M leaves 8M allocated");
    assert_eq!(op(&steps, Op::Touch).len(), 3);
    let idle = op(&steps, Op::Idle)[0];
    assert!(idle.us.unwrap() >= 20_000, "{idle:?}");
}

#[test]
fn exit_codes_reach_the_host() {
    let run = run_one(guest("code", 32 * MIB, "exit 7"));
    assert_eq!(run.exit_code(0), 7);
}

#[test]
fn out_of_memory_is_a_failed_step_and_a_failed_exit() {
    let run = run_one(guest("oom", 32 * MIB, "alloc 64M unique; exit 0"));
    let alloc = op(&run.steps(0), Op::Alloc)[0].clone();
    assert_eq!(alloc.result, Outcome::Fail, "{alloc:?}");
    assert_eq!(run.exit_code(0), 1, "a failed step turns exit 0 into 1");
}

#[test]
fn the_guest_runs_natively() {
    // A loop-heavy workload: KVM must not emulate it instruction by instruction.
    let run = run_one(guest("native", 64 * MIB, "spin 200000000; alloc 16M unique; verify; exit 0"));
    assert_eq!(run.exit_code(0), 0);
    let r = &run.report.vms[0];
    let emulated = r.counters["insn_emulation"];
    assert!(emulated < 1000, "insn_emulation {emulated}: the guest is being emulated");
}

#[test]
fn several_vcpus_share_the_work() {
    let mut c = guest("smp", 128 * MIB, "alloc 32M unique; touch 16M; verify; exit 0");
    c.vcpus = 2;
    let run = run_one(c);
    assert_eq!(run.exit_code(0), 0);
    assert_eq!(op(&run.steps(0), Op::Verify)[0].bad, Some(0));
    assert_eq!(run.json(0)[0]["vcpus"], 2);
}

#[test]
fn several_vms_in_one_process_each_with_its_workload() {
    let configs = vec![
        guest("a", 64 * MIB, "alloc 8M shared:5; verify; exit 0"),
        guest("b", 96 * MIB, "alloc 16M unique; verify; exit 3"),
        guest("c", 64 * MIB, "alloc 8M shared:5; verify; exit 0"),
    ];
    let run = run(&configs);
    assert_eq!([run.exit_code(0), run.exit_code(1), run.exit_code(2)], [0, 3, 0]);
    assert_eq!(run.json(1)[0]["mem_mib"], 96);
    assert_eq!(run.json(2)[0]["vm"], 2);
    for vm in 0..3 {
        assert_eq!(op(&run.steps(vm), Op::Verify)[0].bad, Some(0));
    }
}

#[test]
fn shared_seeds_give_identical_pages_across_vms_and_unique_pages_differ() {
    use vm_memory_pages::*;
    let configs = vec![
        guest("x", 64 * MIB, "alloc 4M shared:9; alloc 4M unique"),
        guest("y", 64 * MIB, "alloc 4M shared:9; alloc 4M unique"),
    ];
    let vms: Vec<_> = configs.into_iter().map(start).collect();
    vms.iter().for_each(|vm| wait_serving(vm));
    let (x, y) = (page_hashes(&vms[0]), page_hashes(&vms[1]));
    let common = x.iter().filter(|h| y.contains(h)).count();
    // 1024 shared pages in common (plus zero pages); the 1024 unique ones differ.
    assert!((1024..1100).contains(&common), "{common} pages in common");
}

/// Hashes of the resident non-zero guest pages of a VM, read from the host side.
mod vm_memory_pages {
    use std::collections::HashSet;
    use std::hash::{DefaultHasher, Hash, Hasher};
    use vm_memory::{Bytes, GuestAddress};
    use vmm::vm::Vm;

    pub fn page_hashes(vm: &Vm) -> HashSet<u64> {
        let mut set = HashSet::new();
        let mut page = vec![0u8; 4096];
        for r in vm.ram().regions() {
            for gpa in (r.base..r.base + r.size).step_by(4096) {
                vm.ram().mem().read_slice(&mut page, GuestAddress(gpa)).unwrap();
                if page.iter().any(|&b| b != 0) {
                    let mut h = DefaultHasher::new();
                    page.hash(&mut h);
                    set.insert(h.finish());
                }
            }
        }
        set
    }
}

#[test]
fn run_time_commands_through_the_control_page() {
    let vm = start(guest("ctl", 64 * MIB, "alloc 8M unique"));
    wait_serving(&vm);
    let before = vm.progress();
    let out = vm.run_command("alloc 4M dup; verify", Duration::from_secs(30)).unwrap();
    assert_eq!(out.status, 0, "{:?}", out.lines);
    let steps = out.steps();
    let verify = steps.iter().find(|s| s.op == Op::Verify).expect("verify line");
    assert_eq!(verify.pages, Some(3072));
    assert!(verify.seq.is_some(), "command lines carry their sequence number: {verify:?}");
    let after = vm.progress();
    assert_eq!(after.allocated_pages, before.allocated_pages + 1024);
    assert!(after.steps_done > before.steps_done);
    // A failing command reports failure and the guest keeps serving.
    let out = vm.run_command("alloc 1G unique", Duration::from_secs(30)).unwrap();
    assert_ne!(out.status, 0);
    assert!(vm.run_command("bogus 3", Duration::from_secs(5)).unwrap_err().contains("bad command"));
    let out = vm.run_command("exit 5", Duration::from_secs(30));
    assert!(out.is_err() || out.unwrap().status == 0);
    assert_eq!(vm.wait(Duration::from_secs(10)), Some(vmm::vm::Ending::GuestExit(5)));
}

#[test]
fn pause_and_resume_keep_the_guest_intact() {
    let mut c = guest("pause", 64 * MIB, "alloc 16M unique; repeat 200 { touch 1M; verify }; exit 0");
    c.vcpus = 2;
    let vm = start(c);
    let mut pauses = 0;
    while vm.ending().is_none() && pauses < 20 {
        std::thread::sleep(Duration::from_millis(20));
        if let Ok(pause) = vm.pause() {
            let took = pause.waited();
            pauses += 1;
            let hb = vm.progress().heartbeat;
            std::thread::sleep(Duration::from_millis(10));
            assert_eq!(vm.progress().heartbeat, hb, "a paused guest made progress");
            assert!(took < Duration::from_secs(1), "pause took {took:?}");
            drop(pause);
        }
    }
    assert!(pauses > 5, "only {pauses} pauses happened");
    assert_eq!(
        vm.wait(Duration::from_secs(120)),
        Some(vmm::vm::Ending::GuestExit(0)),
        "{}",
        vm.console().lines().join("\n")
    );
    let verifies = vmm::console::steps(&vm.console().lines()).iter().filter(|s| s.op == Op::Verify).count();
    assert_eq!(verifies, 200);
}

#[test]
fn working_set_steps_read_work_for_and_zeroing_free() {
    let run = run_one(guest(
        "wset",
        128 * MIB,
        "alloc 16M unique; read 8M; work 4M 100ms; work 4M 100ms write; verify; \
         for 150ms { read 2M; idle 20ms }; free 8M zero; verify; read 17M; exit 0",
    ));
    let steps = run.steps(0);
    let read = op(&steps, Op::Read);
    assert_eq!((read[0].pages, read[0].bad, read[0].result), (Some(2048), Some(0), Outcome::Ok), "{:?}", read[0]);
    // `for` repeats its body until its time is up: 150 ms of 20 ms idles is about 7.
    let looped = read.len() - 2;
    assert!((3..=8).contains(&looped), "{looped} reads in the for loop");
    assert!(read[1..=looped].iter().all(|r| r.pages == Some(512) && r.bad == Some(0)));
    let last = read.last().unwrap();
    assert_eq!((last.result, last.error.as_deref()), (Outcome::Fail, Some("more pages than allocated")));
    for (work, write) in op(&steps, Op::Work).into_iter().zip([false, true]) {
        assert_eq!((work.pages, work.result), (Some(1024), Outcome::Ok), "{work:?}");
        let (ops, rate, us) = (work.ops.unwrap(), work.ops_per_sec.unwrap(), work.us.unwrap());
        assert!(ops > 0 && us >= 100_000, "{work:?}");
        let expect = ops * 1_000_000 / us;
        assert!(rate >= expect && rate <= expect + expect / 50, "the rate is ops over the step's time: {work:?}");
        assert_eq!(work.bad, (!write).then_some(0), "reads are checked: {work:?}");
    }
    // Rewritten pages, then the zeroed and freed ones, still verify.
    let verify = op(&steps, Op::Verify);
    assert!(verify.iter().all(|v| v.bad == Some(0)), "{verify:?}");
    assert_eq!(verify[1].pages, Some(2048));
    assert_eq!(run.exit_code(0), 1, "the read of more than allocated failed");
}

#[test]
fn free_zero_leaves_zeros_behind_and_plain_free_does_not() {
    use vm_memory_pages::page_hashes;
    let nonzero = |workload: &str| {
        let vm = start(guest("zfree", 64 * MIB, workload));
        wait_serving(&vm);
        page_hashes(&vm).len()
    };
    let kept = nonzero("alloc 8M unique; free 8M");
    let zeroed = nonzero("alloc 8M unique; free 8M zero");
    // The 2048 unique pages stay behind after a plain free, and are zero after the other.
    assert!(kept >= zeroed + 2048, "{kept} non-zero pages after free, {zeroed} after free zero");
}
