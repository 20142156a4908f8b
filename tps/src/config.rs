//! The knobs.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How the scanner runs. Every field can be changed while it runs
/// ([`Scanner::set_config`](crate::Scanner::set_config)).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Scan at all. Off: the thread idles; the shares already made stay.
    pub enabled: bool,
    /// Most pages visited per second (ESX's `Mem.ShareScanGHz` cap); 0: no cap.
    pub pages_per_sec: u64,
    /// Pace the scan so that one full pass over all registered RAM takes this long
    /// (ESX's `Mem.ShareScanTime`), never faster than `pages_per_sec`. None: scan at
    /// `pages_per_sec`.
    pub full_pass: Option<Duration>,
    /// Share identical pages of different VMs. Off: only within each VM (ESX's
    /// salting). A change applies to new shares; existing ones stay until broken.
    pub cross_vm: bool,
    /// Most pages merged during one pause of the VMs involved.
    pub max_batch: usize,
    /// VMAs the whole process may have before sharing stops adding more (merges
    /// that need none go on). None: 3/4 of `vm.max_map_count`.
    pub max_vmas: Option<usize>,
    /// Runs of identical pages (the same content on consecutive guest pages) are
    /// mapped onto up to this many consecutive copies of the content in the pool, so
    /// that each such run costs one VMA per this many pages instead of two per page.
    /// 0: one pool page per content, whatever the VMA cost.
    pub run_replicas: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            enabled: true,
            // 100 MiB/s: a 1 GiB guest in ~10 s, about 2% of a core for hashing.
            pages_per_sec: 25_600,
            full_pass: None,
            cross_vm: true,
            max_batch: 512,
            max_vmas: None,
            run_replicas: 64,
        }
    }
}

impl Config {
    /// Pages per second to visit with `total_pages` registered; None: unlimited.
    pub(crate) fn rate(&self, total_pages: usize) -> Option<f64> {
        let cap = (self.pages_per_sec > 0).then_some(self.pages_per_sec as f64);
        let paced = self.full_pass.filter(|p| !p.is_zero()).map(|p| (total_pages as f64 / p.as_secs_f64()).max(1.0));
        match (cap, paced) {
            (Some(c), Some(p)) => Some(c.min(p)),
            (c, p) => c.or(p),
        }
    }

    /// The VMA limit given the kernel's `vm.max_map_count`.
    pub(crate) fn vma_limit(&self, max_map_count: usize) -> usize {
        self.max_vmas.unwrap_or(max_map_count / 4 * 3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_limits() {
        let mut c = Config::default();
        assert_eq!(c.rate(1 << 20), Some(25_600.0));
        c.full_pass = Some(Duration::from_secs(100));
        assert_eq!(c.rate(1000 * 100), Some(1000.0), "paced below the cap");
        assert_eq!(c.rate(1 << 30), Some(25_600.0), "capped");
        c.pages_per_sec = 0;
        assert_eq!(c.rate(1 << 30), Some((1u64 << 30) as f64 / 100.0));
        c.full_pass = None;
        assert_eq!(c.rate(1 << 30), None, "unlimited");
        assert_eq!(c.vma_limit(65530), 49_146);
        c.max_vmas = Some(100);
        assert_eq!(c.vma_limit(65530), 100);
    }

    #[test]
    fn serde_defaults_missing_fields() {
        let c: Config = serde_json::from_str(r#"{"cross_vm": false}"#).unwrap();
        assert_eq!(c, Config { cross_vm: false, ..Config::default() });
    }
}
