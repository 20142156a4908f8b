//! The `vmm` command line: `vmm run` boots VMs (the built-in test guest by default).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};
use vmm::api::Request;
use vmm::config::{self, ConsoleTarget, Kernel, VmConfig};
use vmm::devices::virtio::balloon::BalloonConfig;
use vmm::host::{self, HostOptions, WatchLimits};
use vmm::memory::HostPages;
use vmm::reclaim::policy::{HostMemChoice, PolicyOptions};
use vmm::reclaim::sharing;
use vmm::reclaim::swap::{CompressOptions, SwapOptions};
use vmm::units;

/// A userspace KVM hypervisor for measuring memory reclamation.
#[derive(Parser)]
#[command(name = "vmm", version, about, long_about = None)]
struct Cli {
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides it).
    #[arg(long, global = true, default_value = "info", value_name = "LEVEL")]
    log_level: log::LevelFilter,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot one or more VMs and run them to their end.
    ///
    /// Without --kernel, boots the built-in test guest, which runs the --workload
    /// (a `;`-separated program: alloc SIZE zero|dup|shared:SEED|unique, touch SIZE,
    /// verify, free SIZE, idle DURATION, spin N, repeat N { ... }, exit CODE; see
    /// docs/guest.md) and prints one JSON line per step. At the end, one JSON summary
    /// line per VM and one for the process. The exit status is the guest's exit code
    /// (the first non-zero one with several VMs), 254 for a guest-internal failure,
    /// 255 if the VMM had to stop a guest.
    Run(Box<RunArgs>),
    /// The reclamation demo: the test guest through page sharing, balloon and swap.
    ///
    /// Boots the built-in test guest in several VMs, fills their memory with every
    /// kind of page, then gives host memory back with page sharing, the balloon and
    /// the host swapper, checks every guest page, and reports what each phase gave
    /// back (a table and a JSON line). See docs/cli.md.
    Demo(DemoArgs),
    /// Talk to a running `vmm run` through its control socket.
    Ctl(CtlArgs),
    /// Measure a mechanism against its baseline; prints a table and a JSON line.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// A live, esxtop-like view of a running `vmm run` (its control socket).
    ///
    /// One row per VM under ESX's column names (MEMSZ, GRANT, SZTGT, TCHD, MCTLSZ,
    /// MCTLTGT, MCTLMAX, SWCUR, SWTGT, SWR/s, SWW/s, SHRD, ZERO, SHRDSVD; "-" where
    /// the data does not exist), a header with the free-memory state, free memory and
    /// the idle tax. Keys: q quits, < and > choose the sort column, n sorts by name,
    /// + and - change the interval. -b prints CSV instead (like esxtop -b).
    Top(TopArgs),
    /// Run a scenario and record it: timelines (CSV, JSON lines), plots, a report.
    #[command(subcommand)]
    Lab(LabCommand),
}

#[derive(Subcommand)]
enum LabCommand {
    /// The built-in scenarios.
    List,
    /// Run a scenario (a built-in name or a TOML file); the last line is a JSON
    /// object with its key results.
    Run {
        /// Built-in name (vmm lab list) or scenario file.
        scenario: String,
        /// The scenario's quick variant (its [quick] values).
        #[arg(long)]
        quick: bool,
        /// Output directory (default lab-out/NAME).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

#[derive(Args)]
struct TopArgs {
    /// Socket of the running `vmm run` (it logs the path at start).
    #[arg(long, value_name = "PATH")]
    sock: PathBuf,
    /// Time between refreshes.
    #[arg(short = 'd', long = "delay", default_value = "2s", value_parser = vmm::top::parse_interval)]
    delay: std::time::Duration,
    /// Batch mode: print CSV, one row per VM per sample, no screen.
    #[arg(short = 'b', long)]
    batch: bool,
    /// Stop after this many samples.
    #[arg(short = 'n', long = "count", value_name = "COUNT")]
    count: Option<u64>,
    /// Sort the rows by this column, largest first (default: by name).
    #[arg(long, value_name = "COLUMN", value_parser = parse_column)]
    sort: Option<vmm::top::Column>,
}

fn parse_column(text: &str) -> Result<vmm::top::Column, String> {
    vmm::top::Column::parse(text).ok_or_else(|| {
        let names: Vec<&str> = vmm::top::Column::ALL.iter().map(|c| c.name()).collect();
        format!("{text:?}: expected one of {}", names.join(", "))
    })
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Active memory sampling: estimate against the truth for working sets and
    /// sample sizes, CPU and guest faults per period, guest throughput with and
    /// without sampling.
    Active {
        /// Guest RAM.
        #[arg(long, default_value = "256M", value_parser = units::parse_size)]
        mem: u64,
        /// Working sets the guest reads, comma-separated.
        #[arg(long, default_value = "0,64M,128M,192M", value_delimiter = ',', value_parser = units::parse_size)]
        sizes: Vec<u64>,
        /// Pages watched per period, comma-separated.
        #[arg(long, default_value = "100,400", value_delimiter = ',')]
        samples: Vec<usize>,
        /// Sampling period (long enough for the guest to read its working set at
        /// least once per period, also on a loaded host).
        #[arg(long, default_value = "1s", value_parser = units::parse_duration)]
        period: std::time::Duration,
        /// Periods measured per configuration (after two of warm-up).
        #[arg(long, default_value_t = 6)]
        periods: u64,
    },
    /// Balloon inflate/deflate: merged madvise ranges against one madvise per page.
    Balloon {
        /// Repetitions per mode (the table shows medians).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Guest RAM (the guest touches all of it first).
        #[arg(long, default_value = "2G", value_parser = units::parse_size)]
        mem: u64,
        /// Balloon size to inflate to.
        #[arg(long, default_value = "1G", value_parser = units::parse_size)]
        inflate: u64,
    },
    /// Page sharing against Linux KSM: time and CPU to converge, memory saved.
    Tps {
        /// Number of VMs.
        #[arg(long, default_value_t = 4)]
        vms: u32,
        /// Memory each VM fills (25% zero, 50% shared by all VMs, 25% unique).
        #[arg(long, default_value = "256M", value_parser = units::parse_size)]
        size: u64,
        /// Quick run: 2 VMs x 64M, 60 s limit per configuration.
        #[arg(long)]
        quick: bool,
        /// The scanner's settings, in `vmm run --tps` syntax.
        #[arg(long, value_name = "OPTIONS", default_value = "on", value_parser = parse_tps)]
        tps: tps::Config,
        /// Longest wait for one configuration to converge.
        #[arg(long, default_value = "300s", value_parser = units::parse_duration)]
        limit: std::time::Duration,
        /// Skip the KSM comparison.
        #[arg(long)]
        no_ksm: bool,
        /// Repetitions of each configuration (the table shows medians).
        #[arg(long, default_value_t = 1)]
        runs: usize,
    },
    /// Host swap: evict a guest's data, read it back; file write and bare
    /// userfaultfd fault as the limits.
    Swap {
        /// Guest data to evict.
        #[arg(long, default_value = "1G", value_parser = units::parse_size)]
        evict: u64,
        /// Swap directory.
        #[arg(long, default_value = vmm::reclaim::swap::DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Boot time, memory population with 4 KiB pages and THP, VMM overhead.
    Boot {
        /// Repetitions per configuration (the table shows medians).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Guest RAM.
        #[arg(long, default_value = "512M", value_parser = units::parse_size)]
        mem: u64,
        /// How much the guest allocates and fills (`alloc SIZE unique`).
        #[arg(long, default_value = "256M", value_parser = units::parse_size)]
        alloc: u64,
    },
}

#[derive(Args)]
struct DemoArgs {
    /// Number of VMs.
    #[arg(long, default_value_t = 2, value_name = "N")]
    vms: u32,
    /// Guest RAM per VM (the guests fill 11/16 of it).
    #[arg(long, default_value = "256M", value_parser = units::parse_size, value_name = "SIZE")]
    mem: u64,
    /// Balloon target of each VM in the balloon phase.
    #[arg(long, default_value = "64M", value_parser = units::parse_size, value_name = "SIZE")]
    balloon: u64,
    /// Memory evicted from each VM in the swap phase.
    #[arg(long, default_value = "32M", value_parser = units::parse_size, value_name = "SIZE")]
    swap: u64,
    /// Directory of the swap files NAME.vswp (removed at the end).
    #[arg(long, default_value = vmm::reclaim::swap::DEFAULT_DIR, value_name = "DIR")]
    swap_dir: PathBuf,
}

#[derive(Args)]
struct RunArgs {
    /// Guest RAM per VM, e.g. 256M or 2G (16M..63G).
    #[arg(long, default_value = "256M", value_parser = units::parse_size, value_name = "SIZE")]
    mem: u64,
    /// vCPUs per VM (1..32).
    #[arg(long, default_value_t = 1, value_name = "N")]
    vcpus: u32,
    /// Number of identical VMs in this process (vm0, vm1, ...).
    #[arg(long, default_value_t = 1, value_name = "N", conflicts_with = "config")]
    vms: u32,
    /// TOML file listing VMs ([[vm]] with name, mem, vcpus, workload, kernel,
    /// cmdline, initrd, console, host_pages, hang_timeout; [defaults] for all). Command-line values
    /// are the defaults of the file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// A kernel to boot instead of the built-in test guest: an x86-64 ELF of the
    /// VMM's protocol, a Linux bzImage or vmlinux (hosts with VMX/SVM only; see
    /// docs/linux.md), or builtin:bzimage (the test guest through the Linux boot
    /// protocol).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Kernel command line for a bzImage or vmlinux (default for Linux: "console=ttyS0
    /// reboot=k pci=off i8042.noaux i8042.nomux i8042.dumbkbd").
    #[arg(long, value_name = "TEXT")]
    cmdline: Option<String>,
    /// Initrd (initramfs) for a bzImage or vmlinux.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// The test guest's boot workload.
    #[arg(long, value_name = "PROGRAM", default_value = config::DEFAULT_WORKLOAD)]
    workload: String,
    /// Write each VM's console to DIR/NAME.log instead of stdout.
    #[arg(long, value_name = "DIR")]
    console_dir: Option<PathBuf>,
    /// stdout (default), or stdio: stdin is typed into the guest's serial console
    /// too (one VM; e.g. a Linux shell).
    #[arg(long, value_name = "stdout|stdio", conflicts_with = "console_dir", value_parser = parse_console)]
    console: Option<ConsoleTarget>,
    /// Back guest RAM with transparent huge pages (default: 4 KiB pages, which is
    /// what reclamation works on).
    #[arg(long)]
    thp: bool,
    /// Stop every VM after this long (e.g. 30s, 5m).
    #[arg(long, value_parser = units::parse_duration, value_name = "DURATION")]
    timeout: Option<std::time::Duration>,
    /// Declare a test guest hung after this long without progress.
    #[arg(long, default_value = "30s", value_parser = units::parse_duration, value_name = "DURATION")]
    hang_timeout: std::time::Duration,
    /// The virtio balloon of every VM: size=SIZE (initial target, default 0),
    /// deflate_on_oom=on|off (default on), stats_interval=DURATION (default 1s,
    /// 0 = no statistics queue), free_page_reporting=on|off (default on).
    #[arg(long, value_name = "OPTIONS", value_parser = parse_balloon, conflicts_with = "no_balloon")]
    balloon: Option<BalloonConfig>,
    /// VMs without a balloon device.
    #[arg(long)]
    no_balloon: bool,
    /// Control socket (mode 0600) for `vmm ctl`; default /tmp/vmm-PID.sock.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Transparent page sharing over all VMs: on, off, or comma-separated
    /// rate=PAGES_PER_S|SIZE/s (default 25600, i.e. 100M/s; 0 = no limit),
    /// period=DURATION (pace a full pass to this), scope=global|vm (share across
    /// VMs, the default, or only within each VM).
    #[arg(long, value_name = "OPTIONS", default_value = "on", value_parser = parse_tps)]
    tps: tps::Config,
    /// Turn on the host swapper (swap files in /var/tmp/vmm unless --swap-dir), and
    /// the free-memory policy unless --policy off.
    #[arg(long)]
    swap: bool,
    /// Directory of the swap files NAME.vswp (turns swapping on).
    #[arg(long, value_name = "DIR")]
    swap_dir: Option<PathBuf>,
    /// The free-memory policy (docs/policy.md): on or off. Default: on with
    /// swapping, off without. With the balloon alone it balloons; with swapping it
    /// also swaps and pauses.
    #[arg(long, value_name = "on|off", value_parser = PossibleValuesParser::new(["on", "off"]).map(|v| v == "on"))]
    policy: Option<bool>,
    /// Host memory the policy watches: host (/proc/meminfo, default), cgroup (this
    /// process's memory cgroup), or a budget SIZE (free = SIZE minus resident guest
    /// RAM of every VM). Needs the policy on.
    #[arg(long, value_name = "SIZE|host|cgroup", value_parser = HostMemChoice::parse)]
    host_mem: Option<HostMemChoice>,
    /// Resident memory limit of every VM (ESX limit; a config file's `limit` wins):
    /// reclaimed above it whatever the host's state. Needs the policy on.
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
    limit: Option<u64>,
    /// Reservation of every VM (ESX min; a config file's `min` wins): never
    /// reclaimed below it; VMs whose reservations do not fit are refused at start.
    /// Needs the policy on.
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
    min: Option<u64>,
    /// Shares of every VM (a config file's `shares` wins): a number, or low,
    /// normal (default), high = 5, 10, 20 per MiB of the VM's memory.
    #[arg(long, value_name = "N|low|normal|high", value_parser = policy::Shares::parse)]
    shares: Option<policy::Shares>,
    /// Idle memory tax of the policy, 0 <= TAX < 1 (ESX default 0.75): the largest
    /// fraction of a VM's idle memory that may be taken from it.
    #[arg(long, value_name = "TAX", default_value_t = 0.75, value_parser = parse_tax)]
    idle_tax: f64,
    /// Recompute the allocation targets this often (ESX: 15 s).
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = units::parse_duration)]
    realloc_period: std::time::Duration,
    /// Also recompute them at every change of free-memory state.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = PossibleValuesParser::new(["on", "off"]).map(|v| v == "on"))]
    realloc_on_state_change: bool,
    /// Active memory sampling period, in VM run time (ESX: 30 s); 0 turns sampling
    /// off (every VM then counts as fully active).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = units::parse_duration)]
    active_period: std::time::Duration,
    /// Guest pages watched per sampling period (ESX: 100).
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    active_samples: u32,
    /// Which pages the swapper evicts: random (as ESX) or idle (not written for the
    /// longest time, from KVM's dirty log; logging costs the guest a fault on its
    /// first write to a page in each 100 ms period).
    #[arg(long, value_name = "random|idle", default_value = "random", value_parser = parse_victims)]
    swap_victims: swapd::VictimPolicy,
    /// A compression cache in front of each VM's swap file (turns swapping on): on
    /// (10% of each VM's RAM, pages compressing to half a page or less), off, or
    /// comma-separated cache=SIZE|PCT% (per VM), ratio=R (fraction of a page).
    #[arg(long, value_name = "on|off|OPTIONS", value_parser = parse_compress)]
    swap_compress: Option<SwapCompress>,
}

/// `--swap-compress`: the cache's options, or off.
#[derive(Clone, Copy, Debug)]
struct SwapCompress(Option<CompressOptions>);

fn parse_compress(text: &str) -> Result<SwapCompress, vmm::reclaim::swap::CompressOptionsError> {
    CompressOptions::parse(text).map(SwapCompress)
}

/// A one-line error for the user (`vmm: error: ...`).
type CliError = Box<dyn std::error::Error + Send + Sync>;

fn parse_victims(text: &str) -> Result<swapd::VictimPolicy, String> {
    match text {
        "random" => Ok(swapd::VictimPolicy::Random),
        "idle" => Ok(swapd::VictimPolicy::Idle),
        _ => Err(format!("{text:?}: expected random or idle")),
    }
}

fn parse_tax(text: &str) -> Result<f64, CliError> {
    let tau: f64 = text.parse().map_err(|_| format!("{text:?}: expected a number"))?;
    Ok(policy::check_tax(tau)?)
}

fn parse_console(text: &str) -> Result<ConsoleTarget, String> {
    match text {
        "stdout" => Ok(ConsoleTarget::Stdout),
        "stdio" => Ok(ConsoleTarget::Stdio),
        _ => Err(format!("{text:?}: expected stdout or stdio")),
    }
}

fn parse_tps(text: &str) -> Result<tps::Config, sharing::TpsOptionsError> {
    sharing::parse_options(text, tps::Config::default())
}

/// Parses `size=128M,deflate_on_oom=on,stats_interval=1s,free_page_reporting=off`.
fn parse_balloon(text: &str) -> Result<BalloonConfig, CliError> {
    let mut cfg = BalloonConfig::default();
    let on_off = |k: &str, v: &str| match v {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(CliError::from(format!("{k}={v}: expected on or off"))),
    };
    for item in text.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = item.split_once('=').ok_or_else(|| format!("{item:?}: expected key=value"))?;
        match k {
            "size" => cfg.size = units::parse_size(v)?,
            "deflate_on_oom" => cfg.deflate_on_oom = on_off(k, v)?,
            "stats_interval" => cfg.stats_interval = units::parse_duration(v)?,
            "free_page_reporting" => cfg.free_page_reporting = on_off(k, v)?,
            _ => {
                return Err(format!(
                    "unknown balloon option {k:?} (size, deflate_on_oom, stats_interval, free_page_reporting)"
                )
                .into())
            }
        }
    }
    Ok(cfg)
}

#[derive(Args)]
struct CtlArgs {
    /// Socket of the running `vmm run` (it logs the path at start).
    #[arg(long, value_name = "PATH")]
    sock: PathBuf,
    #[command(subcommand)]
    what: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// The balloon: set its target, or read its counters and the guest's statistics.
    #[command(subcommand)]
    Balloon(BalloonCtl),
    /// The VMs.
    #[command(subcommand)]
    Vm(VmCtl),
    /// Transparent page sharing: its counters, or new settings.
    #[command(subcommand)]
    Tps(TpsCtl),
    /// The host swapper: force eviction, read its counters.
    #[command(subcommand)]
    Swap(SwapCtl),
    /// The free-memory policy: its state and history.
    #[command(subcommand)]
    Policy(PolicyCtl),
    /// Run a workload program in a serving test guest and print its results.
    Command {
        /// The program, e.g. "alloc 64M unique; verify".
        workload: String,
        /// The VM.
        #[arg(long)]
        vm: String,
        /// Seconds to wait for it.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
}

#[derive(Subcommand)]
enum BalloonCtl {
    /// Set the balloon target size (e.g. 128M; 0 deflates fully) and pin it: the
    /// free-memory policy leaves it alone until `balloon auto`.
    Set {
        /// Target size.
        size: String,
        /// Only this VM (default: every VM).
        #[arg(long)]
        vm: Option<String>,
    },
    /// Hand the balloon target back to the free-memory policy.
    Auto {
        /// Only this VM (default: every VM).
        #[arg(long)]
        vm: Option<String>,
    },
    /// Balloon counters and guest statistics.
    Stats {
        /// Only this VM (default: every VM).
        #[arg(long)]
        vm: Option<String>,
    },
}

#[derive(Subcommand)]
enum TpsCtl {
    /// Pages scanned, passes, zero pages, pool pages, shares, memory saved, CPU, VMAs.
    Stats,
    /// Change the settings: on, off, rate=..., period=..., scope=global|vm.
    Set {
        /// Options in --tps syntax.
        options: String,
    },
}

#[derive(Subcommand)]
enum SwapCtl {
    /// Evict up to SIZE of a VM's memory to its swap file now (e.g. 64M).
    Out {
        /// How much.
        size: String,
        /// The VM.
        #[arg(long)]
        vm: String,
    },
    /// Swapper counters of the VMs.
    Stats {
        /// Only this VM (default: every VM).
        #[arg(long)]
        vm: Option<String>,
    },
}

#[derive(Subcommand)]
enum PolicyCtl {
    /// The free-memory state, free memory, the history of states, totals asked.
    Stats,
    /// Change the idle memory tax (0 <= TAX < 1) at run time.
    Tax {
        /// The new tax, e.g. 0.5.
        tax: f64,
    },
    /// Change a VM's shares at run time: a number or low, normal, high.
    Shares {
        /// The shares.
        shares: String,
        /// The VM.
        #[arg(long)]
        vm: String,
    },
}

#[derive(Subcommand)]
enum VmCtl {
    /// Memory figures and counters.
    Stats {
        /// Only this VM (default: every VM).
        #[arg(long)]
        vm: Option<String>,
    },
    /// List the VMs.
    List,
}

/// Exit status when the VMM had to stop a guest (crash, hang, time limit).
const EXIT_VMM_STOPPED: u8 = 255;
/// Exit status of a `vmm lab run` stopped by Ctrl-C (its record is kept).
const EXIT_INTERRUPTED: u8 = 130;
/// Exit status for a guest-internal failure code (>= 256: panic, bad boot info...).
const EXIT_GUEST_FAILURE: u8 = 254;

fn main() -> ExitCode {
    let t0 = Instant::now();
    let cli = Cli::parse();
    env_logger::Builder::new()
        .filter_level(cli.log_level)
        // virtio-queue logs an error for every bad descriptor a guest writes; the
        // devices never let it reach those paths (devices/virtio/virtqueue.rs), and
        // should one be missed, a guest still cannot flood the log through it.
        .filter_module("virtio_queue", log::LevelFilter::Off)
        .parse_env("RUST_LOG")
        .format_timestamp_millis()
        .init();
    let result: Result<u8, CliError> = match cli.command {
        Command::Run(args) => run(*args, t0),
        Command::Demo(args) => {
            let opts = vmm::demo::DemoOptions {
                vms: args.vms,
                mem: args.mem,
                balloon: args.balloon,
                swap: args.swap,
                swap_dir: args.swap_dir,
            };
            vmm::demo::run(&opts, t0).map(|report| print_report(&report)).map_err(CliError::from)
        }
        Command::Ctl(args) => ctl(args),
        Command::Bench(BenchCommand::Active { mem, sizes, samples, period, periods }) => {
            let b = vmm::bench::active::ActiveBench { mem, sizes, samples, period, periods: periods.max(1) };
            if b.samples.contains(&0) || b.period.is_zero() {
                Err(CliError::from("--samples and --period must be above 0"))
            } else {
                vmm::bench::active::run(&b).map(|()| 0).map_err(CliError::from)
            }
        }
        Command::Lab(LabCommand::List) => {
            for (name, description) in vmm::lab::list() {
                println!("{name:<10} {description}");
            }
            Ok(0)
        }
        Command::Lab(LabCommand::Run { scenario, quick, out }) => {
            vmm::lab::run(&vmm::lab::LabOptions { scenario, quick, out })
                .map(|key| {
                    println!("{key}");
                    // Interrupted: the record is kept, the status says it is partial.
                    if key["interrupted"] == true {
                        EXIT_INTERRUPTED
                    } else {
                        0
                    }
                })
                .map_err(CliError::from)
        }
        Command::Top(args) => {
            let opts = vmm::top::TopOptions {
                sock: args.sock,
                interval: args.delay,
                batch: args.batch,
                count: args.count,
                sort: args.sort,
            };
            vmm::top::run(&opts).map(|()| 0).map_err(CliError::from)
        }
        Command::Bench(BenchCommand::Balloon { runs, mem, inflate }) => {
            vmm::bench::balloon::run(&vmm::bench::balloon::BalloonBench { mem, inflate, runs: runs.max(1) })
                .map(|()| 0)
                .map_err(CliError::from)
        }
        Command::Bench(BenchCommand::Tps { vms, size, quick, tps, limit, no_ksm, runs }) => {
            let (vms, size, limit) =
                if quick { (2, 64 << 20, limit.min(std::time::Duration::from_secs(60))) } else { (vms, size, limit) };
            vmm::bench::tps::run(&vmm::bench::tps::TpsBench { vms, size, tps, limit, ksm: !no_ksm, runs })
                .map(|()| 0)
                .map_err(CliError::from)
        }
        Command::Bench(BenchCommand::Swap { evict, dir }) => {
            vmm::bench::swap::run(&vmm::bench::swap::SwapBench { evict, dir }).map(|()| 0).map_err(CliError::from)
        }
        Command::Bench(BenchCommand::Boot { runs, mem, alloc }) => {
            vmm::bench::boot::run(&vmm::bench::boot::BootBench { runs: runs.max(1), mem, alloc })
                .map(|()| 0)
                .map_err(CliError::from)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(msg) => {
            eprintln!("vmm: error: {msg}");
            ExitCode::from(1)
        }
    }
}

fn run(args: RunArgs, t0: Instant) -> Result<u8, CliError> {
    let configs = vm_configs(&args)?;
    let interrupted = host::install_interrupt_handler();
    let api_socket = args.api_sock.clone().unwrap_or_else(|| vmm::api::default_socket(std::process::id()));
    let swap = swap_options(&args);
    let policy = policy_options(&args, &configs, swap.as_ref())?;
    let opts =
        HostOptions { tps: Some(args.tps.clone()).filter(|c| c.enabled), swap, policy, api_socket: Some(api_socket) };
    let limits = WatchLimits { timeout: args.timeout, interrupted: Some(interrupted) };
    let report = host::run(&configs, t0, opts, limits)?;
    Ok(print_report(&report))
}

/// Prints one JSON summary line per VM and one for the process; returns the exit
/// status: the first non-zero guest exit code, or what says why a VM ended badly.
fn print_report(report: &host::HostReport) -> u8 {
    let mut status = 0u8;
    for vm in &report.vms {
        let mut line = serde_json::to_value(vm).expect("report serialises");
        line.as_object_mut().expect("object").insert("summary".into(), "vm".into());
        println!("{line}");
        let vm_status = match (vm.exit_code, &vm.error) {
            (Some(c), _) if c <= 255 => c as u8,
            (Some(c), _) => {
                eprintln!("vmm: {}: the guest failed internally (code {c:#x}, see its console)", vm.vm);
                EXIT_GUEST_FAILURE
            }
            (None, Some(e)) => {
                eprintln!("vmm: error: {}: {e}", vm.vm);
                EXIT_VMM_STOPPED
            }
            (None, None) => EXIT_VMM_STOPPED,
        };
        if status == 0 {
            status = vm_status;
        }
    }
    let mut host = serde_json::json!({
        "summary": "host",
        "vms": report.vms.len(),
        "process_rss_mib": report.process_rss_mib,
        "guest_rss_mib": report.guest_rss_mib,
        "vmm_overhead_mib": report.vmm_overhead_mib,
    });
    if let Some(tps) = &report.tps {
        host["tps"] = serde_json::json!(sharing::TpsStats::from(tps.clone()));
    }
    if let Some(policy) = &report.policy {
        host["policy"] = serde_json::json!(policy);
    }
    println!("{host}");
    status
}

fn ctl(args: CtlArgs) -> Result<u8, CliError> {
    let req = match args.what {
        CtlCommand::Balloon(BalloonCtl::Set { size, vm }) => Request::BalloonSet { size, vm },
        CtlCommand::Balloon(BalloonCtl::Auto { vm }) => Request::BalloonAuto { vm },
        CtlCommand::Balloon(BalloonCtl::Stats { vm }) => Request::BalloonStats { vm },
        CtlCommand::Vm(VmCtl::Stats { vm }) => Request::VmStats { vm },
        CtlCommand::Vm(VmCtl::List) => Request::Vms,
        CtlCommand::Tps(TpsCtl::Stats) => Request::TpsStats,
        CtlCommand::Tps(TpsCtl::Set { options }) => Request::TpsSet { options },
        CtlCommand::Swap(SwapCtl::Out { size, vm }) => Request::SwapOut { size, vm },
        CtlCommand::Swap(SwapCtl::Stats { vm }) => Request::SwapStats { vm },
        CtlCommand::Policy(PolicyCtl::Stats) => Request::PolicyStats,
        CtlCommand::Policy(PolicyCtl::Tax { tax }) => Request::PolicySet { idle_tax: tax },
        CtlCommand::Policy(PolicyCtl::Shares { shares, vm }) => Request::SharesSet { vm, shares },
        CtlCommand::Command { workload, vm, timeout } => Request::Command { vm, workload, timeout_s: Some(timeout) },
    };
    let resp = vmm::api::client::send(&args.sock, &req)?;
    match (resp.ok, resp.result, resp.error) {
        (true, Some(result), _) => {
            println!("{}", serde_json::to_string_pretty(&result).expect("json"));
            Ok(0)
        }
        (_, _, error) => Err(error.unwrap_or_else(|| "request failed".into()).into()),
    }
}

/// Swapping options, if swapping is on.
fn swap_options(args: &RunArgs) -> Option<SwapOptions> {
    let compress = args.swap_compress.and_then(|c| c.0);
    if !args.swap && args.swap_dir.is_none() && compress.is_none() {
        return None;
    }
    let mut opts = SwapOptions::new(args.swap_dir.clone().unwrap_or_else(|| vmm::reclaim::swap::DEFAULT_DIR.into()));
    opts.victims = args.swap_victims;
    opts.compress = compress;
    Some(opts)
}

/// Options of the free-memory policy, if it runs: `--policy`, or by default
/// whenever swapping is on (the swapper evicts what the policy decides).
fn policy_options(
    args: &RunArgs,
    configs: &[VmConfig],
    swap: Option<&SwapOptions>,
) -> Result<Option<PolicyOptions>, CliError> {
    let idle_victims = swap.is_some_and(|s| s.victims == swapd::VictimPolicy::Idle);
    if !args.policy.unwrap_or(swap.is_some()) {
        let what = if args.host_mem.is_some() {
            "--host-mem"
        } else if configs.iter().any(|c| c.limit.is_some()) {
            "a memory limit"
        } else if configs.iter().any(|c| c.min > 0) {
            "a reservation (min)"
        } else if idle_victims {
            "--swap-victims idle (the policy feeds the swappers the dirty log)"
        } else {
            return Ok(None);
        };
        let how = if args.policy.is_some() { "drop --policy off" } else { "add --policy on" };
        return Err(format!("{what} needs the free-memory policy: {how}").into());
    }
    let mut opts = PolicyOptions { feed_dirty_log: idle_victims, ..PolicyOptions::default() };
    opts.config.idle_tax = args.idle_tax;
    opts.config.realloc_period_ms = args.realloc_period.as_millis() as u64;
    opts.config.realloc_on_state_change = args.realloc_on_state_change;
    opts.active = (!args.active_period.is_zero()).then_some(vmm::reclaim::active::ActiveOptions {
        period: args.active_period,
        samples: args.active_samples as usize,
    });
    if let Some(h) = &args.host_mem {
        opts.host_mem = h.clone();
    }
    Ok(Some(opts))
}

/// The VMs this run asks for, validated.
fn vm_configs(args: &RunArgs) -> Result<Vec<VmConfig>, CliError> {
    let mut base = VmConfig::new("vm0", args.mem);
    base.vcpus = args.vcpus;
    base.workload = args.workload.clone();
    base.kernel = args.kernel.clone().map_or(Kernel::Builtin, Kernel::from_arg);
    base.cmdline = args.cmdline.clone();
    base.initrd = args.initrd.clone();
    base.console = args.console.clone().unwrap_or(ConsoleTarget::Stdout);
    base.host_pages = if args.thp { HostPages::Thp } else { HostPages::Small };
    base.hang_timeout = args.hang_timeout;
    base.limit = args.limit;
    base.min = args.min.unwrap_or(0);
    base.shares = args.shares.unwrap_or_default();
    base.balloon = if args.no_balloon { None } else { Some(args.balloon.clone().unwrap_or_default()) };
    let mut configs = match &args.config {
        Some(path) => config::load_config_file(path, &base)?,
        None => {
            if args.vms == 0 {
                return Err("--vms must be at least 1".into());
            }
            (0..args.vms).map(|i| VmConfig { name: format!("vm{i}"), ..base.clone() }).collect()
        }
    };
    if let Some(dir) = &args.console_dir {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create console directory {}: {e}", dir.display()))?;
        for c in &mut configs {
            c.console = ConsoleTarget::File(dir.join(format!("{}.log", c.name)));
        }
    }
    for c in &configs {
        c.validate()?;
    }
    if configs.len() > 1 && configs.iter().any(|c| c.console == ConsoleTarget::Stdio) {
        return Err("an interactive console (stdio) takes one VM: stdin can only go to one guest".into());
    }
    Ok(configs)
}
