//! What a user asks for: VM definitions from the command line or a TOML file,
//! sizes and durations in human units, validated before anything is created.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::devices::virtio::balloon::BalloonConfig;
use crate::memory::{self, HostPages};
use crate::units::{parse_duration, parse_size, UnitError};
use policy::{Shares, SharesError};

/// The default boot workload of the built-in test guest: every kind of page, then a
/// check, a working set rewrite, a release and a final check.
pub const DEFAULT_WORKLOAD: &str =
    "alloc 16M zero; alloc 16M dup; alloc 32M shared:1; alloc 32M unique; verify; touch 16M; free 16M; verify; exit 0";

/// Where a VM's console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleTarget {
    /// The VMM's stdout, each line prefixed with `[NAME] ` when several VMs run.
    Stdout,
    /// The VMM's stdout, and its stdin typed into the guest's COM1: an interactive
    /// console (one VM only), e.g. a Linux guest's shell.
    Stdio,
    /// A file of its own.
    File(PathBuf),
    /// Nowhere but the in-memory log (library users and tests).
    Discard,
}

/// Which guest kernel a VM boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// The test guest embedded in the vmm binary.
    Builtin,
    /// The same test guest packaged as a bzImage, booted through the Linux boot
    /// protocol (`--kernel builtin:bzimage`).
    BuiltinBzImage,
    /// A kernel file: an x86-64 ELF, a Linux vmlinux or a bzImage.
    Path(PathBuf),
}

impl Kernel {
    /// What `--kernel VALUE` (or `kernel = "VALUE"` in a config file) names.
    pub fn from_arg(value: PathBuf) -> Kernel {
        if value.as_os_str() == "builtin:bzimage" {
            Kernel::BuiltinBzImage
        } else {
            Kernel::Path(value)
        }
    }

    /// Whether this is the built-in test guest, in either form.
    pub fn is_builtin(&self) -> bool {
        matches!(self, Kernel::Builtin | Kernel::BuiltinBzImage)
    }
}

/// One VM, fully specified.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Name used in logs, console prefixes, summaries and control requests.
    pub name: String,
    /// Guest RAM in bytes.
    pub mem: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest kernel.
    pub kernel: Kernel,
    /// Boot workload handed to the guest.
    pub workload: String,
    /// Console destination.
    pub console: ConsoleTarget,
    /// Host page policy for guest RAM.
    pub host_pages: HostPages,
    /// A running test guest that shows no progress for this long is declared hung.
    pub hang_timeout: Duration,
    /// The virtio balloon, if the VM has one.
    pub balloon: Option<BalloonConfig>,
    /// Most guest RAM the VM may keep resident (bytes; ESX "limit"): above it the
    /// free-memory policy reclaims from it whatever the host's state.
    pub limit: Option<u64>,
    /// Reservation (bytes; ESX "min"): the free-memory policy never reclaims the VM
    /// below it, and admission control refuses VMs whose reservations do not fit.
    pub min: u64,
    /// Shares (ESX): the VM's claim on memory when it is overcommitted.
    pub shares: Shares,
    /// Kernel command line for the Linux boot protocol (Linux: replaces the
    /// default; test guest as a bzImage: goes before the VMM's parameters).
    pub cmdline: Option<String>,
    /// Initrd for the Linux boot protocol.
    pub initrd: Option<PathBuf>,
}

impl VmConfig {
    /// A VM booting the built-in guest with the default workload.
    pub fn new(name: impl Into<String>, mem: u64) -> Self {
        VmConfig {
            name: name.into(),
            mem,
            vcpus: 1,
            kernel: Kernel::Builtin,
            workload: DEFAULT_WORKLOAD.to_string(),
            console: ConsoleTarget::Discard,
            host_pages: HostPages::Small,
            hang_timeout: Duration::from_secs(30),
            balloon: Some(BalloonConfig::default()),
            limit: None,
            min: 0,
            shares: Shares::Normal,
            cmdline: None,
            initrd: None,
        }
    }

    /// Checks everything that can be checked before creating the VM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(ConfigError::BadName(self.name.clone()));
        }
        let ctx = |e: ConfigError| ConfigError::InVm { vm: self.name.clone(), source: Box::new(e) };
        memory::validate_size(self.mem).map_err(|e| ctx(ConfigError::Memory(e)))?;
        if self.vcpus == 0 || self.vcpus > guest_abi::MAX_VCPUS {
            return Err(ctx(ConfigError::Vcpus(self.vcpus)));
        }
        if self.workload.len() > guest_abi::CMDLINE_MAX {
            return Err(ctx(ConfigError::WorkloadTooLong(self.workload.len())));
        }
        if self.kernel.is_builtin() {
            check_workload(&self.workload).map_err(ctx)?;
        }
        if let Some(balloon) = &self.balloon {
            balloon.validate(self.mem).map_err(|e| ctx(ConfigError::Balloon(e)))?;
        }
        if self.min > self.mem {
            return Err(ctx(ConfigError::MinAboveMax { min: self.min, max: self.mem }));
        }
        self.shares.validate().map_err(|e| ctx(ConfigError::Shares(e)))?;
        Ok(())
    }
}

/// What is wrong with what the user asked for, said in one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not a size or not a duration.
    #[error(transparent)]
    Unit(#[from] UnitError),
    /// A VM name that cannot name a VM in logs, files and requests.
    #[error("bad VM name {0:?}: use letters, digits, '-', '_' and '.'")]
    BadName(String),
    /// Two VMs with one name.
    #[error("two VMs are named {0:?}")]
    DuplicateName(String),
    /// Guest RAM out of range.
    #[error("{0}")]
    Memory(#[from] memory::MemoryError),
    /// A vCPU count out of range.
    #[error("vcpus must be between 1 and {max}, not {0}", max = guest_abi::MAX_VCPUS)]
    Vcpus(u32),
    /// A workload that does not fit the boot information.
    #[error("workload is {0} bytes, at most {max}", max = guest_abi::CMDLINE_MAX)]
    WorkloadTooLong(usize),
    /// A workload the test guest would refuse.
    #[error("bad workload: {0}")]
    BadWorkload(String),
    /// Balloon options the device refuses.
    #[error("{0}")]
    Balloon(String),
    /// A reservation above the configured memory.
    #[error("min {} MiB is more than the VM's memory ({} MiB)", min >> 20, max >> 20)]
    MinAboveMax {
        /// The reservation, bytes.
        min: u64,
        /// The configured memory, bytes.
        max: u64,
    },
    /// Shares of 0 or an unknown level.
    #[error(transparent)]
    Shares(#[from] SharesError),
    /// The config file cannot be read.
    #[error("cannot read config {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML for `vmm run`.
    #[error("bad config {}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the TOML reader said.
        message: String,
    },
    /// The config file lists no VM.
    #[error("config {} lists no [[vm]]", .0.display())]
    NoVm(PathBuf),
    /// An entry of the config file is wrong.
    #[error("config {}: vm {index}: {source}", path.display())]
    Entry {
        /// The file.
        path: PathBuf,
        /// Which `[[vm]]`, from 0.
        index: usize,
        /// What is wrong.
        #[source]
        source: Box<ConfigError>,
    },
    /// Something about one VM is wrong.
    #[error("vm {vm}: {source}")]
    InVm {
        /// The VM.
        vm: String,
        /// What is wrong.
        #[source]
        source: Box<ConfigError>,
    },
}

/// Checks a program of the test guest's workload language (the guest would refuse
/// it at boot; better to say so before creating the VM).
pub fn check_workload(text: &str) -> Result<(), ConfigError> {
    guest_abi::workload::Program::parse(text).map(|_| ()).map_err(|e| ConfigError::BadWorkload(e.to_string()))
}

/// The TOML file of `vmm run --config`: defaults, then a list of VMs.
///
/// ```toml
/// [defaults]
/// mem = "256M"
/// workload = "alloc 64M shared:7; verify; exit 0"
///
/// [[vm]]
/// name = "web"
///
/// [[vm]]
/// name = "db"
/// mem = "512M"
/// vcpus = 2
/// console = "db.log"
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Values used by every VM that does not set them.
    #[serde(default)]
    pub defaults: VmEntry,
    /// The VMs, at least one.
    #[serde(default)]
    pub vm: Vec<VmEntry>,
}

/// One `[[vm]]` (or the `[defaults]`) of a [`ConfigFile`].
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmEntry {
    /// VM name (defaults to `vmN`).
    pub name: Option<String>,
    /// Guest RAM, e.g. `"256M"`.
    pub mem: Option<String>,
    /// vCPU count.
    pub vcpus: Option<u32>,
    /// Path of an x86-64 ELF kernel instead of the built-in guest.
    pub kernel: Option<PathBuf>,
    /// Boot workload.
    pub workload: Option<String>,
    /// `"stdout"`, `"stdio"` (stdin goes to the guest too) or a file path
    /// (relative to the config file).
    pub console: Option<String>,
    /// `"small"` (4 KiB, default) or `"thp"`.
    pub host_pages: Option<HostPages>,
    /// e.g. `"30s"`.
    pub hang_timeout: Option<String>,
    /// Resident memory limit, e.g. `"192M"` (needs swapping on).
    pub limit: Option<String>,
    /// Reservation, e.g. `"64M"` (needs the policy on).
    pub min: Option<String>,
    /// Shares: a number (`2000`) or `"low"`, `"normal"`, `"high"`.
    pub shares: Option<Shares>,
    /// Kernel command line (Linux boot protocol).
    pub cmdline: Option<String>,
    /// Initrd path (relative to the config file).
    pub initrd: Option<PathBuf>,
}

impl VmEntry {
    /// Fills unset fields of `self` from `defaults`.
    fn or(self, defaults: &VmEntry) -> VmEntry {
        VmEntry {
            name: self.name,
            mem: self.mem.or_else(|| defaults.mem.clone()),
            vcpus: self.vcpus.or(defaults.vcpus),
            kernel: self.kernel.or_else(|| defaults.kernel.clone()),
            workload: self.workload.or_else(|| defaults.workload.clone()),
            console: self.console.or_else(|| defaults.console.clone()),
            host_pages: self.host_pages.or(defaults.host_pages),
            hang_timeout: self.hang_timeout.or_else(|| defaults.hang_timeout.clone()),
            limit: self.limit.or_else(|| defaults.limit.clone()),
            min: self.min.or_else(|| defaults.min.clone()),
            shares: self.shares.or(defaults.shares),
            cmdline: self.cmdline.or_else(|| defaults.cmdline.clone()),
            initrd: self.initrd.or_else(|| defaults.initrd.clone()),
        }
    }

    /// Applies this entry over `base` (the command line's values).
    pub fn apply(&self, mut base: VmConfig, dir: &Path) -> Result<VmConfig, ConfigError> {
        if let Some(n) = &self.name {
            base.name = n.clone();
        }
        if let Some(m) = &self.mem {
            base.mem = parse_size(m)?;
        }
        if let Some(v) = self.vcpus {
            base.vcpus = v;
        }
        if let Some(k) = &self.kernel {
            base.kernel = match Kernel::from_arg(k.clone()) {
                Kernel::Path(p) => Kernel::Path(dir.join(p)),
                other => other,
            };
        }
        if let Some(w) = &self.workload {
            base.workload = w.clone();
        }
        if let Some(c) = &self.console {
            base.console = match c.as_str() {
                "stdout" => ConsoleTarget::Stdout,
                "stdio" => ConsoleTarget::Stdio,
                path => ConsoleTarget::File(dir.join(path)),
            };
        }
        if let Some(p) = self.host_pages {
            base.host_pages = p;
        }
        if let Some(t) = &self.hang_timeout {
            base.hang_timeout = parse_duration(t)?;
        }
        if let Some(l) = &self.limit {
            base.limit = Some(parse_size(l)?);
        }
        if let Some(m) = &self.min {
            base.min = parse_size(m)?;
        }
        if let Some(s) = self.shares {
            base.shares = s.validate()?;
        }
        if let Some(c) = &self.cmdline {
            base.cmdline = Some(c.clone());
        }
        if let Some(i) = &self.initrd {
            base.initrd = Some(dir.join(i));
        }
        Ok(base)
    }
}

/// Reads a config file into VM configs, each starting from `base` (the command
/// line's values) and named `vmN` unless it names itself.
pub fn load_config_file(path: &Path, base: &VmConfig) -> Result<Vec<VmConfig>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    let file: ConfigFile = toml::from_str(&text)
        .map_err(|e| ConfigError::Parse { path: path.into(), message: e.message().to_string() })?;
    if file.vm.is_empty() {
        return Err(ConfigError::NoVm(path.into()));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut vms = Vec::with_capacity(file.vm.len());
    for (i, entry) in file.vm.into_iter().enumerate() {
        let mut vm = base.clone();
        vm.name = format!("vm{i}");
        let vm = entry.or(&file.defaults).apply(vm, dir).map_err(|e| ConfigError::Entry {
            path: path.into(),
            index: i,
            source: Box::new(e),
        })?;
        vms.push(vm);
    }
    check_unique_names(&vms)?;
    Ok(vms)
}

/// VM names address VMs in logs and control requests: they must differ.
pub fn check_unique_names(vms: &[VmConfig]) -> Result<(), ConfigError> {
    let mut names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    names.sort_unstable();
    match names.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(ConfigError::DuplicateName(w[0].to_string())),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_defaults_and_overrides() {
        let dir = std::env::temp_dir().join(format!("vmm-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vms.toml");
        std::fs::write(
            &path,
            "[defaults]\nmem = \"128M\"\nworkload = \"exit 3\"\nshares = \"high\"\n[[vm]]\nname = \"a\"\nlimit = \"96M\"\nmin = \"32M\"\n[[vm]]\nmem = \"64M\"\nconsole = \"b.log\"\nshares = 300\n",
        )
        .unwrap();
        let vms = load_config_file(&path, &VmConfig::new("x", 256 << 20)).unwrap();
        assert_eq!(vms.len(), 2);
        assert_eq!((vms[0].name.as_str(), vms[0].mem), ("a", 128 << 20));
        assert_eq!((vms[1].name.as_str(), vms[1].mem), ("vm1", 64 << 20));
        assert_eq!(vms[1].workload, "exit 3");
        assert_eq!((vms[0].limit, vms[1].limit), (Some(96 << 20), None));
        assert_eq!(vms[1].console, ConsoleTarget::File(dir.join("b.log")));
        assert_eq!(
            (vms[0].min, vms[0].shares, vms[1].min, vms[1].shares),
            (32 << 20, Shares::High, 0, Shares::Count(300))
        );
        for (entry, error) in [
            ("shares = 0", "shares must be at least 1"),
            ("shares = \"medium\"", "medium"),
            ("min = \"200M\"", "min 200 MiB is more than the VM's memory (128 MiB)"),
        ] {
            std::fs::write(&path, format!("[[vm]]\nmem = \"128M\"\n{entry}\n")).unwrap();
            let err = load_config_file(&path, &VmConfig::new("x", 256 << 20))
                .and_then(|vms| vms[0].validate().map(|()| vms))
                .unwrap_err();
            assert!(err.to_string().contains(error), "{entry}: {err}");
        }
        std::fs::write(&path, "[[vm]]\nmemory = \"1G\"\n").unwrap();
        let err = load_config_file(&path, &VmConfig::new("x", 256 << 20)).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }) && err.to_string().contains("memory"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
