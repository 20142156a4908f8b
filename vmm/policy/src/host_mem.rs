//! Where host memory figures come from: the real host, a memory cgroup, or a
//! configured budget.
//!
//! The same policy runs for real (`/proc/meminfo`, or the cgroup the VMM is
//! confined to) and in deterministic tests: a budget says "this host has 2 GiB"
//! and counts as used only what the VMs hold, so a test can drive the states with
//! small guests without pushing the machine anywhere near exhaustion.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Host memory as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostMem {
    /// Memory the policy manages, bytes.
    pub total_bytes: u64,
    /// Of which free (available), bytes.
    pub free_bytes: u64,
}

/// Why host memory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HostMemError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A file lacks a field the source needs.
    #[error("{}: no {field}", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
        /// The field.
        field: &'static str,
    },
    /// A file holds something else than a number where one is expected.
    #[error("{}: {text:?} is not a number", path.display())]
    NotANumber {
        /// The file.
        path: PathBuf,
        /// What it holds.
        text: String,
    },
    /// `/proc/self/cgroup` lists no memory cgroup.
    #[error("no memory cgroup in /proc/self/cgroup")]
    NoMemoryCgroup,
}

/// Where host memory figures come from.
pub trait HostMemSource: Send {
    /// Reads the figures now.
    fn sample(&mut self) -> Result<HostMem, HostMemError>;
    /// What the source is, for the log.
    fn describe(&self) -> String;
}

fn read(path: &Path) -> Result<String, HostMemError> {
    std::fs::read_to_string(path).map_err(|source| HostMemError::Read { path: path.to_path_buf(), source })
}

/// The real host: `/proc/meminfo` MemTotal and MemAvailable.
pub struct MemInfo {
    path: PathBuf,
}

impl MemInfo {
    /// `/proc/meminfo`.
    pub fn new() -> MemInfo {
        MemInfo { path: PathBuf::from("/proc/meminfo") }
    }

    /// Another file in the meminfo format (tests).
    pub fn at(path: impl Into<PathBuf>) -> MemInfo {
        MemInfo { path: path.into() }
    }
}

impl Default for MemInfo {
    fn default() -> Self {
        MemInfo::new()
    }
}

/// A "Key:   123 kB" field of a meminfo-like text, in bytes.
fn meminfo_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k.trim() != key {
            return None;
        }
        let mut it = v.split_whitespace();
        let n: u64 = it.next()?.parse().ok()?;
        Some(if it.next() == Some("kB") { n * 1024 } else { n })
    })
}

impl HostMemSource for MemInfo {
    fn sample(&mut self) -> Result<HostMem, HostMemError> {
        let text = read(&self.path)?;
        let field = |field: &'static str| {
            meminfo_field(&text, field).ok_or_else(|| HostMemError::Missing { path: self.path.clone(), field })
        };
        Ok(HostMem { total_bytes: field("MemTotal")?, free_bytes: field("MemAvailable")? })
    }

    fn describe(&self) -> String {
        format!("host ({})", self.path.display())
    }
}

/// The memory cgroup this process runs in (v1 `memory` controller, or v2): total
/// is the cgroup's limit (the host's memory when unlimited), free is total minus
/// usage, not counting inactive file pages (reclaimable cache), and never more
/// than the host has available.
pub struct Cgroup {
    dir: PathBuf,
    v2: bool,
    host: MemInfo,
}

impl Cgroup {
    /// The cgroup of this process, from `/proc/self/cgroup`, under `/sys/fs/cgroup`.
    pub fn current() -> Result<Cgroup, HostMemError> {
        let text = read(Path::new("/proc/self/cgroup"))?;
        Cgroup::from_proc(&text, Path::new("/sys/fs/cgroup"), MemInfo::new())
    }

    /// Resolves a `/proc/PID/cgroup` text against a cgroup mount root: the v1
    /// memory controller (`ROOT/memory/PATH`) if listed, else v2 (`ROOT/PATH`).
    pub fn from_proc(text: &str, root: &Path, host: MemInfo) -> Result<Cgroup, HostMemError> {
        let mut v2_path = None;
        for line in text.lines() {
            let mut f = line.splitn(3, ':');
            let (Some(_id), Some(ctrls), Some(path)) = (f.next(), f.next(), f.next()) else { continue };
            let rel = path.trim_start_matches('/');
            if ctrls.split(',').any(|c| c == "memory") {
                return Ok(Cgroup { dir: root.join("memory").join(rel), v2: false, host });
            }
            if ctrls.is_empty() {
                v2_path = Some(root.join(rel));
            }
        }
        match v2_path {
            Some(dir) => Ok(Cgroup { dir, v2: true, host }),
            None => Err(HostMemError::NoMemoryCgroup),
        }
    }

    /// A number file of the cgroup; None for "max" (unlimited).
    fn number(&self, name: &str) -> Result<Option<u64>, HostMemError> {
        let path = self.dir.join(name);
        let text = read(&path)?;
        match text.trim() {
            "max" => Ok(None),
            t => t.parse().map(Some).map_err(|_| HostMemError::NotANumber { path, text: t.to_string() }),
        }
    }
}

impl HostMemSource for Cgroup {
    fn sample(&mut self) -> Result<HostMem, HostMemError> {
        let host = self.host.sample()?;
        let (limit_file, usage_file) =
            if self.v2 { ("memory.max", "memory.current") } else { ("memory.limit_in_bytes", "memory.usage_in_bytes") };
        let limit = self.number(limit_file)?;
        let usage = self.number(usage_file)?.unwrap_or(0);
        let stat = read(&self.dir.join("memory.stat"))?;
        let field = |k: &str| {
            stat.lines().find_map(|l| {
                let (a, b) = l.split_once(' ')?;
                (a == k).then(|| b.trim().parse::<u64>().ok()).flatten()
            })
        };
        let inactive_file = field("total_inactive_file").or_else(|| field("inactive_file")).unwrap_or(0);
        let used = usage.saturating_sub(inactive_file);
        let total = limit.map_or(host.total_bytes, |l| l.min(host.total_bytes));
        // Free in the cgroup, but never more than the host has.
        let free = total.saturating_sub(used).min(host.free_bytes);
        Ok(HostMem { total_bytes: total, free_bytes: free })
    }

    fn describe(&self) -> String {
        format!("memory cgroup {} ({})", self.dir.display(), if self.v2 { "v2" } else { "v1" })
    }
}

/// A configured budget (`--host-mem 2G`): free = budget - memory resident for the
/// VMs (given by a callback, e.g. the sum of the VMs' guest RAM residency). The
/// budget can be changed while the policy runs (through [`Budget::handle`]): a
/// scenario that tightens the host step by step, a test that sets it once the guests
/// have filled their memory.
pub struct Budget {
    bytes: Arc<AtomicU64>,
    resident: Box<dyn Fn() -> u64 + Send>,
}

impl Budget {
    /// A budget of `bytes`, of which `resident()` bytes are used.
    pub fn new(bytes: u64, resident: impl Fn() -> u64 + Send + 'static) -> Budget {
        Budget { bytes: Arc::new(AtomicU64::new(bytes)), resident: Box::new(resident) }
    }

    /// The budget itself: a store changes it from the next sample on.
    pub fn handle(&self) -> Arc<AtomicU64> {
        self.bytes.clone()
    }
}

impl HostMemSource for Budget {
    fn sample(&mut self) -> Result<HostMem, HostMemError> {
        let (bytes, used) = (self.bytes.load(Ordering::Relaxed), (self.resident)());
        Ok(HostMem { total_bytes: bytes, free_bytes: bytes.saturating_sub(used) })
    }

    fn describe(&self) -> String {
        format!("budget of {} MiB", self.bytes.load(Ordering::Relaxed) >> 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    use std::sync::Arc;

    const GIB: u64 = 1 << 30;

    #[test]
    fn sources() {
        let dir = std::env::temp_dir().join(format!("policy-host-mem-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("memory/grp")).unwrap();
        std::fs::create_dir_all(dir.join("v2grp")).unwrap();
        let mi = dir.join("meminfo");
        std::fs::write(&mi, "MemTotal:       1048576 kB\nMemFree:  1000 kB\nMemAvailable:    524288 kB\n").unwrap();
        assert_eq!(MemInfo::at(&mi).sample().unwrap(), HostMem { total_bytes: GIB, free_bytes: GIB / 2 });

        // v1: limit 256 MiB, usage 200 MiB of which 40 MiB inactive file cache.
        let g = dir.join("memory/grp");
        std::fs::write(g.join("memory.limit_in_bytes"), format!("{}\n", 256 << 20)).unwrap();
        std::fs::write(g.join("memory.usage_in_bytes"), format!("{}\n", 200 << 20)).unwrap();
        std::fs::write(g.join("memory.stat"), format!("cache 1\ntotal_inactive_file {}\n", 40 << 20)).unwrap();
        let proc_text = "9:name=systemd:/\n4:memory:/grp\n0::/\n";
        let mut cg = Cgroup::from_proc(proc_text, &dir, MemInfo::at(&mi)).unwrap();
        assert_eq!(cg.sample().unwrap(), HostMem { total_bytes: 256 << 20, free_bytes: 96 << 20 });
        assert!(cg.describe().contains("v1"));
        // Unlimited v1: the host's total, free capped by the host's available.
        std::fs::write(g.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        assert_eq!(cg.sample().unwrap(), HostMem { total_bytes: GIB, free_bytes: GIB / 2 });

        // v2.
        let g2 = dir.join("v2grp");
        std::fs::write(g2.join("memory.max"), "max\n").unwrap();
        std::fs::write(g2.join("memory.current"), format!("{}\n", 100 << 20)).unwrap();
        std::fs::write(g2.join("memory.stat"), "inactive_file 0\n").unwrap();
        let mut cg2 = Cgroup::from_proc("0::/v2grp\n", &dir, MemInfo::at(&mi)).unwrap();
        assert_eq!(cg2.sample().unwrap(), HostMem { total_bytes: GIB, free_bytes: GIB / 2 });
        std::fs::write(g2.join("memory.max"), format!("{}\n", 300 << 20)).unwrap();
        assert_eq!(cg2.sample().unwrap(), HostMem { total_bytes: 300 << 20, free_bytes: 200 << 20 });

        // Errors say which file and what is wrong.
        std::fs::write(g2.join("memory.max"), "lots\n").unwrap();
        let e = cg2.sample().unwrap_err();
        assert!(matches!(e, HostMemError::NotANumber { .. }) && e.to_string().contains("memory.max"), "{e}");
        std::fs::write(&mi, "MemTotal: 1 kB\n").unwrap();
        let e = MemInfo::at(&mi).sample().unwrap_err();
        assert!(matches!(e, HostMemError::Missing { field: "MemAvailable", .. }), "{e}");
        assert!(matches!(MemInfo::at(dir.join("none")).sample(), Err(HostMemError::Read { .. })));
        assert!(matches!(Cgroup::from_proc("1:cpu:/\n", &dir, MemInfo::new()), Err(HostMemError::NoMemoryCgroup)));

        // Budget.
        let used = Arc::new(AtomicU64::new(GIB + (GIB / 2)));
        let u = used.clone();
        let mut b = Budget::new(2 * GIB, move || u.load(Relaxed));
        assert_eq!(b.sample().unwrap(), HostMem { total_bytes: 2 * GIB, free_bytes: GIB / 2 });
        used.store(3 * GIB, Relaxed);
        assert_eq!(b.sample().unwrap().free_bytes, 0);
        b.handle().store(4 * GIB, Relaxed);
        assert_eq!(b.sample().unwrap(), HostMem { total_bytes: 4 * GIB, free_bytes: GIB }, "a changed budget");
        assert_eq!(b.describe(), "budget of 4096 MiB");

        // The real ones on this machine answer sensibly.
        let h = MemInfo::new().sample().unwrap();
        assert!(h.total_bytes > 0 && h.free_bytes <= h.total_bytes);
        if let Ok(mut c) = Cgroup::current() {
            let s = c.sample().unwrap();
            assert!(s.free_bytes <= s.total_bytes);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
