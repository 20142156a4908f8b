//! The result of a workload step: the JSON line the test guest prints when a step
//! ends, and what the VMM, its benchmarks and the tests read back.
//!
//! One type for both sides, so that they cannot drift apart: the guest serializes a
//! [`StepResult<&str>`] (with `serde-json-core`, no allocation), the host
//! deserializes a [`StepResult<String>`] (with `serde_json`). A field a step does
//! not report is left out of the line, and a line with a field this type does not
//! know is not a step result: what the host parses it prints back unchanged.
//!
//! ```text
//! {"vm":0,"step":2,"op":"verify","pages":4096,"bad":0,"us":2437,"result":"ok"}
//! {"vm":0,"seq":3,"step":7,"op":"alloc","arg":"64M unique","us":0,"result":"fail","error":"out of memory"}
//! {"vm":0,"step":9,"op":"exit","code":1,"failed_steps":2,"result":"ok"}
//! {"vm":0,"step":4,"op":"work","arg":"16M 2s","pages":4096,"bad":0,"ops":3100000,"ops_per_sec":1550000,"us":2000001,"result":"ok"}
//! ```

use serde::{Deserialize, Serialize};

use crate::workload::Op;

/// Whether a step did what it was asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// It did.
    Ok,
    /// It did not (out of memory, bad pages, ...); [`StepResult::error`] or
    /// [`StepResult::bad`] says why.
    Fail,
}

/// One finished step. `S` is the type of its strings: `&str` in the guest, `String`
/// on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepResult<S> {
    /// The VM's index in its host process ([`crate::BootInfo::vm_index`]).
    pub vm: u32,
    /// The run-time command the step belongs to (absent for the boot workload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u32>,
    /// Steps finished since boot, this one included (a `repeat` header is not a
    /// step; its body's steps are, each time).
    pub step: u64,
    /// What the step was.
    pub op: Op,
    /// Its argument in canonical form (`16M unique`, `500us`), if it has one
    /// (`exit` reports [`StepResult::code`] instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arg: Option<S>,
    /// Pages the step allocated, touched, read, checked or freed; `work`: its
    /// working set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<u64>,
    /// `verify`, `read`, `work`: pages that did not hold what they should.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bad: Option<u64>,
    /// `verify`, `read`, `work`: the frame number of the first bad page found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_bad_pfn: Option<u64>,
    /// `work`: operations done (one page read or rewritten each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<u64>,
    /// `work`: operations per second over the step's duration: the guest's
    /// throughput, which reclamation of its working set lowers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops_per_sec: Option<u64>,
    /// Duration in microseconds (TSC); every step but `exit` reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub us: Option<u64>,
    /// `exit`: the VM's exit code (0 becomes 1 when a step failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u32>,
    /// `exit`: steps that failed since boot, when some did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_steps: Option<u64>,
    /// Whether it succeeded.
    pub result: Outcome,
    /// Why it failed, when that is not a `verify` finding bad pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<S>,
}

impl<S> StepResult<S> {
    /// A step of `op` with only its identity and outcome filled in.
    pub fn new(vm: u32, seq: Option<u32>, step: u64, op: Op, result: Outcome) -> Self {
        StepResult {
            vm,
            seq,
            step,
            op,
            arg: None,
            pages: None,
            bad: None,
            first_bad_pfn: None,
            ops: None,
            ops_per_sec: None,
            us: None,
            code: None,
            failed_steps: None,
            result,
            error: None,
        }
    }

    /// Whether the step succeeded.
    pub fn ok(&self) -> bool {
        self.result == Outcome::Ok
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::string::String;

    use super::*;
    use crate::CONSOLE_LINE_MAX;

    /// What the guest prints, through the serializer the guest uses.
    fn guest_line(step: &StepResult<&str>) -> String {
        let mut buf = [0u8; CONSOLE_LINE_MAX];
        let len = serde_json_core::to_slice(step, &mut buf).expect("fits a console line");
        String::from(std::str::from_utf8(&buf[..len]).unwrap())
    }

    #[test]
    fn lines_are_the_documented_ones() {
        let mut verify = StepResult::new(0, None, 2, Op::Verify, Outcome::Ok);
        (verify.pages, verify.bad, verify.us) = (Some(4096), Some(0), Some(2437));
        assert_eq!(
            guest_line(&verify),
            r#"{"vm":0,"step":2,"op":"verify","pages":4096,"bad":0,"us":2437,"result":"ok"}"#
        );
        let mut alloc = StepResult::new(1, Some(3), 7, Op::Alloc, Outcome::Fail);
        (alloc.arg, alloc.us, alloc.error) = (Some("64M unique"), Some(0), Some("out of memory"));
        assert_eq!(
            guest_line(&alloc),
            r#"{"vm":1,"seq":3,"step":7,"op":"alloc","arg":"64M unique","us":0,"result":"fail","error":"out of memory"}"#
        );
        let mut exit = StepResult::new(0, None, 9, Op::Exit, Outcome::Ok);
        (exit.code, exit.failed_steps) = (Some(1), Some(2));
        assert_eq!(guest_line(&exit), r#"{"vm":0,"step":9,"op":"exit","code":1,"failed_steps":2,"result":"ok"}"#);
        let mut work = StepResult::new(0, None, 4, Op::Work, Outcome::Ok);
        (work.arg, work.pages, work.bad, work.us) = (Some("16M 2s"), Some(4096), Some(0), Some(2000001));
        (work.ops, work.ops_per_sec) = (Some(3100000), Some(1550000));
        assert_eq!(
            guest_line(&work),
            r#"{"vm":0,"step":4,"op":"work","arg":"16M 2s","pages":4096,"bad":0,"ops":3100000,"ops_per_sec":1550000,"us":2000001,"result":"ok"}"#
        );
    }

    #[test]
    fn the_host_reads_back_what_the_guest_wrote() {
        let mut step = StepResult::new(u32::MAX, Some(u32::MAX), u64::MAX, Op::Verify, Outcome::Fail);
        step.arg = Some("quote \" backslash \\ tab \t newline \n");
        (step.pages, step.bad, step.first_bad_pfn, step.us) = (Some(1), Some(2), Some(3), Some(4));
        (step.code, step.failed_steps, step.error) = (Some(5), Some(6), Some("no room"));
        (step.ops, step.ops_per_sec) = (Some(7), Some(8));
        let back: StepResult<String> = serde_json::from_str(&guest_line(&step)).unwrap();
        assert_eq!(back.arg.as_deref(), step.arg);
        assert_eq!(back.error.as_deref(), step.error);
        assert_eq!(
            (back.vm, back.seq, back.step, back.op, back.result),
            (step.vm, step.seq, step.step, step.op, step.result)
        );
        assert_eq!((back.pages, back.bad, back.first_bad_pfn, back.us), (Some(1), Some(2), Some(3), Some(4)));
        assert_eq!((back.code, back.failed_steps, back.ops, back.ops_per_sec), (Some(5), Some(6), Some(7), Some(8)));
        // And writes it back the same (the control API re-serializes step lines).
        assert_eq!(serde_json::to_string(&back).unwrap(), guest_line(&step));
    }

    #[test]
    fn other_lines_are_not_steps() {
        for line in [
            r#"{"vm":0,"event":"boot","vcpus":1,"mem_mib":256}"#,
            r#"{"vm":0,"event":"serving","steps":3}"#,
            r#"{"vm":0,"step":1,"op":"alloc","us":3,"result":"ok","extra":1}"#,
            r#"{"vm":0,"step":1,"op":"dance","us":3,"result":"ok"}"#,
            r#"{"vm":0,"step":1,"op":"alloc","us":3,"result":"maybe"}"#,
            "hello",
        ] {
            assert!(serde_json::from_str::<StepResult<String>>(line).is_err(), "{line}");
        }
    }

    #[test]
    fn the_longest_step_line_fits_a_console_line() {
        let arg = "18014398509481980K 18446744073709551615us write";
        assert_eq!(arg.len(), crate::workload::ARG_MAX - 1);
        // Longer than any error the guest reports (41 bytes at most).
        let error = "e".repeat(64);
        let mut step = StepResult::new(u32::MAX, Some(u32::MAX), u64::MAX, Op::Verify, Outcome::Fail);
        (step.arg, step.error) = (Some(arg), Some(error.as_str()));
        (step.pages, step.bad, step.first_bad_pfn, step.us) =
            (Some(u64::MAX), Some(u64::MAX), Some(u64::MAX), Some(u64::MAX));
        (step.code, step.failed_steps) = (Some(u32::MAX), Some(u64::MAX));
        (step.ops, step.ops_per_sec) = (Some(u64::MAX), Some(u64::MAX));
        // Every field at once (no step reports them all), and room for the newline.
        let len = guest_line(&step).len();
        assert!(len < CONSOLE_LINE_MAX, "{len} bytes");
    }
}
