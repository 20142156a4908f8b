//! `vmm lab` end to end: the built-in `smoke` scenario (a few seconds, a real
//! guest) through the binary, and what it leaves: the CSV with its columns, the
//! JSON lines, the plots as images that decode, the report and the final JSON line;
//! and one-line errors for scenarios that do not check.

use std::path::Path;
use std::process::Command;

mod common;
use common::TempDir;

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

/// Decodes a PNG completely; returns its size.
fn png_size(path: &Path) -> (u32, u32) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(buf.iter().any(|b| *b != 0xff), "{}: all white", path.display());
    (info.width, info.height)
}

/// Parses an SVG as XML; returns the text of its `<text>` elements.
fn svg_texts(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let doc = roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    doc.descendants().filter(|n| n.has_tag_name("text")).filter_map(|n| n.text()).map(String::from).collect()
}

#[test]
fn a_short_scenario_leaves_its_timeline_plots_report_and_json_line() {
    assert!(Path::new("/dev/kvm").exists(), "this test boots a real guest and needs /dev/kvm");
    let dir = TempDir::new("lab");
    let out = dir.0.join("smoke");
    let run = Command::new(VMM)
        .args(["--log-level", "warn", "lab", "run", "smoke", "--out"])
        .arg(&out)
        .output()
        .expect("run vmm lab");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("lab smoke:") && stderr.contains("left |"), "no progress line: {stderr}");

    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["lab"], "smoke");
    assert_eq!(last["interrupted"], false);
    assert_eq!(last["event_errors"], 0);
    let a = &last["vms"]["a"];
    assert_eq!(a["memsz_mib"], 64.0);
    // 32 MiB held (16 unique, 8 zero, 8 of one page) and 8 MiB written and freed:
    // page sharing leaves at least the unique 16 MiB plus the freed 8 MiB, the
    // balloon (28 MiB, nearly all the guest's free memory) takes the freed part.
    let peak = a["peak_resident_mib"].as_f64().unwrap();
    assert!((24.0..=64.0).contains(&peak), "peak resident {peak}");
    assert_eq!(a["max_balloon_mib"], 28.0);
    assert!(last["samples"].as_u64().unwrap() >= 10, "{last}");

    let mut csv = csv::Reader::from_path(out.join("samples.csv")).unwrap();
    let head: Vec<String> = csv.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(head, vmm::lab::record::CSV_COLUMNS);
    let rows: Vec<csv::StringRecord> = csv.records().map(Result::unwrap).collect();
    assert_eq!(rows.len() as u64, last["samples"].as_u64().unwrap(), "one VM: one row per sample");
    let col = |n: &str| head.iter().position(|h| h == n).unwrap();
    let t: Vec<f64> = rows.iter().map(|r| r[col("t_s")].parse().unwrap()).collect();
    assert!(t.windows(2).all(|w| w[0] < w[1]), "{t:?}");
    assert!(rows.iter().all(|r| &r[col("vm")] == "a" && &r[col("swapped_mib")] == "-"));
    assert!(rows.iter().skip(2).all(|r| &r[col("state")] == "high" && &r[col("total_mib")] == "256.00"));
    let resident = |r: &csv::StringRecord| r[col("resident_mib")].parse::<f64>().unwrap();
    let before = rows.iter().rfind(|r| r[col("t_s")].parse::<f64>().unwrap() < 3.0).map(resident).unwrap();
    let after = resident(rows.last().unwrap());
    assert!(before - after >= 4.0, "the balloon gave back {before} -> {after} MiB");
    assert!((after - a["final_resident_mib"].as_f64().unwrap()).abs() < 0.01);
    let jsonl = std::fs::read_to_string(out.join("samples.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count(), rows.len());
    for line in jsonl.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["t_s"].is_number() && v["vms"][0]["name"] == "a", "{v}");
    }

    for base in ["host", "vm-a"] {
        assert_eq!(png_size(&out.join(format!("{base}.png"))), (960, 540));
        let texts = svg_texts(&out.join(format!("{base}.svg")));
        assert!(texts.iter().any(|t| t.contains("time (s)")), "{base}.svg: {texts:?}");
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("![vm-a](vm-a.png)") && report.contains("| a | 64 |"), "{report}");
    let machine: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("machine.json")).unwrap()).unwrap();
    assert!(machine["cores"].as_u64().unwrap() >= 1 && machine["kernel"].as_str().is_some_and(|k| !k.is_empty()));
    assert!(["pvm", "hardware"].contains(&machine["kvm_backend"].as_str().unwrap()));
    assert!(out.join("scenario.toml").exists() && out.join("a.log").exists());
}

#[test]
fn bad_scenarios_are_one_line_errors_before_anything_boots() {
    let dir = TempDir::new("lab-bad");
    let file = dir.0.join("bad.toml");
    std::fs::write(
        &file,
        "duration = \"10s\"\n[[vm]]\nname = \"a\"\nmem = \"64M\"\nworkload = \"alloc 1M unique\"\n\
         [[event]]\nat = \"2s\"\nvm = \"b\"\nballoon = \"1M\"\n",
    )
    .unwrap();
    for (arg, want) in [
        (file.to_str().unwrap(), "event 1 (at 2s): no VM named \"b\" (VMs: a)"),
        ("no-such-scenario", "no built-in scenario of that name"),
    ] {
        let out = Command::new(VMM).args(["lab", "run", arg]).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("vmm: error: ") && err.contains(want), "{err}");
    }
    let list = Command::new(VMM).args(["lab", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for name in ["fig4", "states", "idle-zero", "smoke"] {
        assert!(list.lines().any(|l| l.starts_with(name)), "{list}");
    }
}

#[test]
fn ctrl_c_stops_the_run_and_keeps_its_record() {
    assert!(Path::new("/dev/kvm").exists(), "this test boots a real guest and needs /dev/kvm");
    let dir = TempDir::new("lab-int");
    let out = dir.0.join("smoke");
    let child = Command::new(VMM)
        .args(["--log-level", "warn", "lab", "run", "smoke", "--out"])
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    // Three samples recorded (header + 3 rows), then Ctrl-C.
    while std::fs::read_to_string(out.join("samples.csv")).map_or(0, |t| t.lines().count()) < 4 {
        assert!(std::time::Instant::now() < deadline, "no samples recorded");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: signals a child process this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) }, 0);
    let done = child.wait_with_output().unwrap();
    assert_eq!(done.status.code(), Some(130), "interrupted runs say so in their status");
    let stdout = String::from_utf8_lossy(&done.stdout);
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["interrupted"], true);
    let samples = last["samples"].as_u64().unwrap();
    assert!((3..13).contains(&samples), "{samples} samples");
    let rows = std::fs::read_to_string(out.join("samples.csv")).unwrap().lines().count() as u64;
    assert_eq!(rows, samples + 1, "every sample taken is in the CSV");
    assert!(std::fs::read_to_string(out.join("report.md")).unwrap().contains("**Interrupted**"));
    png_size(&out.join("vm-a.png"));
}
