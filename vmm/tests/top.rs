//! `vmm top` as a person uses it: in a real pseudo-terminal against a running
//! `vmm run`, reading the screen it draws (a vt100 emulator parses what it writes),
//! pressing keys; and its batch mode's CSV.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use portable_pty::{native_pty_system, CommandBuilder, PtySize};

mod common;
use common::Running;

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

/// Two VMs of 64 MiB, each holding 16 MiB, under a policy with a 1 GiB budget;
/// returns once both guests hold their memory and the policy has seen it.
fn start(name: &str) -> Running {
    assert!(Path::new("/dev/kvm").exists(), "these tests boot real guests and need /dev/kvm");
    let sock = std::env::temp_dir().join(format!("vmm-top-{name}-{}.sock", std::process::id()));
    let child = Command::new(VMM)
        .args(["--log-level", "warn", "run", "--vms", "2", "--mem", "64M", "--workload", "alloc 16M unique"])
        .args(["--policy", "on", "--host-mem", "1G", "--api-sock"])
        .arg(&sock)
        .stdout(Stdio::null())
        .spawn()
        .expect("run vmm");
    let running = Running { child, sock };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = vmm::top::fetch(&running.sock) {
            let filled = s.vms.iter().all(|v| v.heartbeat > 0 && v.guest_allocated_mib >= 16.0);
            // The policy's figures are those of its last tick: wait until one saw the fill.
            if filled && s.policy.is_some_and(|p| p.free_mib <= 1024.0 - 32.0) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the guests did not fill their memory in 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    running
}

/// `vmm top` in a pseudo-terminal of 40 x 160, and the screen it draws.
struct Tty {
    child: Box<dyn portable_pty::Child + Send + Sync>,
    writer: Box<dyn Write + Send>,
    output: mpsc::Receiver<Vec<u8>>,
    screen: vt100::Parser,
}

impl Tty {
    fn spawn(args: &[&str]) -> Tty {
        let pair = native_pty_system()
            .openpty(PtySize { rows: 40, cols: 160, pixel_width: 0, pixel_height: 0 })
            .expect("open a pseudo-terminal");
        let mut cmd = CommandBuilder::new(VMM);
        cmd.args(args);
        cmd.env("TERM", "xterm-256color");
        let child = pair.slave.spawn_command(cmd).expect("spawn vmm top");
        drop(pair.slave);
        let mut reader = pair.master.try_clone_reader().expect("pty reader");
        let writer = pair.master.take_writer().expect("pty writer");
        let (tx, output) = mpsc::channel();
        std::thread::spawn(move || {
            // The master must outlive the reads.
            let _master = pair.master;
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Tty { child, writer, output, screen: vt100::Parser::new(40, 160, 0) }
    }

    /// Reads what it drew until `done` holds of the screen's text (20 s at most).
    fn wait_for(&mut self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.screen.screen().contents();
            if done(&text) {
                return text;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "vmm top never showed {what}; the screen:\n{text}");
            if let Ok(bytes) = self.output.recv_timeout(left.min(Duration::from_millis(100))) {
                self.screen.process(&bytes);
            }
        }
    }

    fn press(&mut self, key: &str) {
        self.writer.write_all(key.as_bytes()).unwrap();
        self.writer.flush().unwrap();
    }
}

/// The row of `vm` on the screen, split into its cells.
fn row<'a>(screen: &'a str, vm: &str) -> Vec<&'a str> {
    let line = screen.lines().find(|l| l.trim_start().starts_with(vm)).expect("a row per VM");
    line.split_whitespace().collect()
}

#[test]
fn top_shows_every_vm_sorts_and_quits_in_a_terminal() {
    let run = start("tty");
    let sock = run.sock.to_str().unwrap();
    let mut tty = Tty::spawn(&["top", "--sock", sock, "-d", "300ms"]);
    let screen = tty.wait_for("both VMs and the policy's state", |s| {
        s.contains("MEMSZ") && s.contains("vm0") && s.contains("vm1") && s.contains("state high")
    });
    for name in ["GRANT", "SZTGT", "TCHD", "MCTLSZ", "MCTLTGT", "MCTLMAX", "SWCUR", "SWR/s", "SHRD", "SHRDSVD"] {
        assert!(screen.contains(name), "no {name} column:\n{screen}");
    }
    // NAME STATE MEMSZ GRANT ...: 64 MiB configured, at least the 16 MiB allocated resident.
    let vm0 = row(&screen, "vm0");
    assert_eq!(vm0[1], "running", "{screen}");
    assert_eq!(vm0[2], "64.00", "{screen}");
    let grant: f64 = vm0[3].parse().unwrap();
    assert!((16.0..=64.0).contains(&grant), "GRANT {grant}:\n{screen}");
    assert!(screen.contains("sorted by name"), "{screen}");
    tty.press(">");
    tty.wait_for("the sort on MEMSZ", |s| s.contains("sorted by MEMSZ") && s.contains("MEMSZ*"));
    tty.press(">");
    tty.wait_for("the sort on GRANT", |s| s.contains("sorted by GRANT") && s.contains("GRANT*"));
    tty.press("+");
    tty.wait_for("the longer interval", |s| s.contains("refresh 0.6s"));
    tty.press("q");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = tty.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "vmm top did not quit on q");
        while let Ok(bytes) = tty.output.try_recv() {
            tty.screen.process(&bytes);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "vmm top: {status:?}");
    while let Ok(bytes) = tty.output.recv_timeout(Duration::from_millis(200)) {
        tty.screen.process(&bytes);
    }
    assert!(!tty.screen.screen().alternate_screen(), "the terminal was left in the alternate screen");
}

#[test]
fn batch_mode_prints_one_csv_row_per_vm_per_sample() {
    let run = start("batch");
    let out = Command::new(VMM)
        .args(["top", "--sock", run.sock.to_str().unwrap(), "-b", "-n", "3", "-d", "200ms", "--sort", "grant"])
        .output()
        .expect("run vmm top -b");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut csv = csv::Reader::from_reader(&out.stdout[..]);
    let head: Vec<String> = csv.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(&head[..6], ["time_s", "vm", "state", "mem_state", "free_mib", "tax"]);
    let names: Vec<&str> = vmm::top::Column::ALL.iter().map(|c| c.name()).collect();
    assert_eq!(&head[6..], names);
    let rows: Vec<csv::StringRecord> = csv.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 6, "3 samples x 2 VMs");
    let col = |name: &str| head.iter().position(|h| h == name).unwrap();
    for r in &rows {
        assert_eq!(&r[col("MEMSZ")], "64.00");
        let grant: f64 = r[col("GRANT")].parse().unwrap();
        assert!((16.0..=64.0).contains(&grant), "GRANT {grant}");
        assert_eq!(&r[col("mem_state")], "high");
        let free: f64 = r[col("free_mib")].parse().unwrap();
        assert!(free > 1024.0 - 2.0 * 64.0 - 1.0 && free < 1024.0 - 2.0 * 16.0 + 1.0, "free {free}");
        // Page sharing is on (vmm run's default): per VM, within its memory.
        for c in ["SHRD", "ZERO", "SHRDSVD"] {
            let v: f64 = r[col(c)].parse().unwrap_or_else(|_| panic!("{c}: {:?}", &r[col(c)]));
            assert!((0.0..=64.0).contains(&v), "{c} {v}");
        }
        assert_eq!(&r[col("SWCUR")], "-", "no swapper");
    }
    // The first sample has no rate; later ones do (no swapper here: still none).
    assert_eq!(&rows[0][col("SWR/s")], "-");
    let times: Vec<f64> = rows.iter().map(|r| r[0].parse().unwrap()).collect();
    assert!(times[0] < times[2] && times[2] < times[4], "{times:?}");
    // The last sample is not followed by a wait: `-n 1` with a minute's interval
    // returns at once.
    let t0 = Instant::now();
    let out =
        Command::new(VMM).args(["top", "--sock", run.sock.to_str().unwrap(), "-b", "-n", "1", "-d", "60s"]).output();
    assert!(out.unwrap().status.success());
    assert!(t0.elapsed() < Duration::from_secs(30), "waited {:?} after the last sample", t0.elapsed());
}
