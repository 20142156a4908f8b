//! The tunables of one swapper.

use std::path::PathBuf;
use std::time::Duration;

use crate::file::FileOptions;
use crate::victim::VictimPolicy;
use crate::zcache::CacheConfig;

/// Tunables of one swapper.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory of the swap file.
    pub dir: PathBuf,
    pub file: FileOptions,
    /// Pages per eviction batch: one VM pause, one file write each.
    pub batch_pages: usize,
    /// Pages read by one fault from the file: the faulting page and neighbours that
    /// were evicted in the same batch into adjacent slots (1 = no prefetch).
    pub prefetch_pages: usize,
    /// A fault on a page that is not in the file maps the zero page there and on up
    /// to this many following missing pages with one ioctl (1 = only the page).
    pub zero_fill_pages: usize,
    pub victims: VictimPolicy,
    /// Seed of the random victim order.
    pub seed: u64,
    /// Register the userfaultfd over guest RAM in `new` (true) or at the first
    /// eviction (false, default: until then, first touches of guest memory stay
    /// ordinary kernel faults).
    pub register_eagerly: bool,
    /// After a write error stopped eviction, how long until a later request tries
    /// again ([`Swapper::resume_eviction`](crate::Swapper::resume_eviction) retries at once).
    pub retry_after: Duration,
    /// The compression cache in front of the file (off by default).
    pub cache: Option<CacheConfig>,
}

impl Config {
    /// Defaults, with the swap file in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Config {
        Config {
            dir: dir.into(),
            file: FileOptions::default(),
            batch_pages: 256,
            prefetch_pages: 16,
            zero_fill_pages: 16,
            victims: VictimPolicy::Random,
            seed: 0x5eed,
            register_eagerly: false,
            retry_after: Duration::from_secs(30),
            cache: None,
        }
    }
}
