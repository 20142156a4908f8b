//! What a guest does wrong, counted and logged without letting the guest flood
//! anything.
//!
//! A guest decides how often it misbehaves, so nothing here grows with it: one
//! 64-bit counter per [`GuestErrorKind`] (a fixed array, no per-address or
//! per-message state) and at most one log line per kind per interval
//! ([`LOG_INTERVAL`] by default). The first error of a kind is logged at once; later
//! ones inside the interval are only counted, and the next line of that kind says how
//! many were not logged. Devices and vCPU threads report guest errors here instead of
//! logging them themselves. Lines go to the log target [`LOG_TARGET`], at `warn`
//! (accesses to unhandled ports, which PC guests make while probing, at `debug`).

use std::collections::BTreeMap;
use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one line per kind of guest error per this interval.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Log target of guest error lines (`RUST_LOG=vmm::guest=off` silences them).
pub const LOG_TARGET: &str = "vmm::guest";

/// Kinds of guest misbehaviour, each counted on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GuestErrorKind {
    /// Feature negotiation: features not offered, no VERSION_1, features written
    /// outside the negotiation window.
    Features,
    /// A device status write out of the order the virtio spec requires.
    StatusOrder,
    /// Queue configuration: bad size, ring addresses misaligned, outside RAM or
    /// overlapping, queue registers written outside the configuration window.
    QueueConfig,
    /// A register access of the wrong width, or to an unknown or read-only register.
    Register,
    /// A notification of a queue that does not exist or is not running.
    Notify,
    /// The available ring broke the rules (index too far ahead, head outside the
    /// queue): the device stops and asks for a reset.
    Ring,
    /// A descriptor chain broke the rules (too long or looping, indirect, `next`
    /// outside the table): refused whole.
    Chain,
    /// A buffer whose content does not fit its queue (length, direction, PFN or
    /// range outside RAM, overlapping ranges): refused whole.
    Buffer,
    /// A configuration-space access out of range or with an impossible value.
    Config,
    /// An access to a guest-physical address that no device owns.
    Unmapped,
    /// An access to a port that no device owns. PC guests probe ports as a matter
    /// of course (Linux looks for serial ports, timers, ...): logged at `debug`.
    Port,
}

impl GuestErrorKind {
    /// Every kind, in counter order.
    pub const ALL: [GuestErrorKind; 11] = [
        GuestErrorKind::Features,
        GuestErrorKind::StatusOrder,
        GuestErrorKind::QueueConfig,
        GuestErrorKind::Register,
        GuestErrorKind::Notify,
        GuestErrorKind::Ring,
        GuestErrorKind::Chain,
        GuestErrorKind::Buffer,
        GuestErrorKind::Config,
        GuestErrorKind::Unmapped,
        GuestErrorKind::Port,
    ];

    /// Name in logs and counters.
    pub fn name(self) -> &'static str {
        match self {
            GuestErrorKind::Features => "features",
            GuestErrorKind::StatusOrder => "status_order",
            GuestErrorKind::QueueConfig => "queue_config",
            GuestErrorKind::Register => "register",
            GuestErrorKind::Notify => "notify",
            GuestErrorKind::Ring => "ring",
            GuestErrorKind::Chain => "chain",
            GuestErrorKind::Buffer => "buffer",
            GuestErrorKind::Config => "config",
            GuestErrorKind::Unmapped => "unmapped",
            GuestErrorKind::Port => "port",
        }
    }

    /// Level of its log lines.
    pub fn level(self) -> log::Level {
        match self {
            GuestErrorKind::Port => log::Level::Debug,
            _ => log::Level::Warn,
        }
    }
}

const KINDS: usize = GuestErrorKind::ALL.len();

/// When a kind was last logged, and its count then.
#[derive(Clone, Copy)]
struct Logged {
    at: Instant,
    count: u64,
}

/// The guest error counters of one device (or one vCPU), with rate-limited logging.
pub struct GuestErrors {
    source: String,
    interval: Duration,
    counts: [AtomicU64; KINDS],
    logged: Mutex<[Option<Logged>; KINDS]>,
}

impl GuestErrors {
    /// Counters for `source` (the prefix of each log line, e.g. `vm0/balloon`).
    pub fn new(source: impl Into<String>) -> Self {
        GuestErrors::with_interval(source, LOG_INTERVAL)
    }

    /// Counters logging each kind at most once per `interval`.
    pub fn with_interval(source: impl Into<String>, interval: Duration) -> Self {
        GuestErrors {
            source: source.into(),
            interval,
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            logged: Mutex::new([None; KINDS]),
        }
    }

    /// Counts one error of `kind`, and logs `detail` unless this kind was logged
    /// less than the interval ago. `detail` is only formatted when logged.
    pub fn report(&self, kind: GuestErrorKind, detail: impl Display) {
        let i = kind as usize;
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        let count = self.counts[i].fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        let unlogged = match logged[i] {
            Some(last) if now.duration_since(last.at) < self.interval => return,
            Some(last) => count - 1 - last.count,
            None => 0,
        };
        logged[i] = Some(Logged { at: now, count });
        drop(logged);
        if unlogged == 0 {
            log::log!(target: LOG_TARGET, kind.level(), "{}: guest error ({}): {detail}", self.source, kind.name());
        } else {
            log::log!(
                target: LOG_TARGET,
                kind.level(),
                "{}: guest error ({}): {detail} ({unlogged} more of this kind since the last line were only counted)",
                self.source,
                kind.name()
            );
        }
    }

    /// Errors of `kind` so far.
    pub fn count(&self, kind: GuestErrorKind) -> u64 {
        self.counts[kind as usize].load(Ordering::Relaxed)
    }

    /// Errors of every kind so far.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The kinds seen so far and their counts.
    pub fn by_kind(&self) -> BTreeMap<String, u64> {
        GuestErrorKind::ALL
            .iter()
            .filter(|&&k| self.count(k) > 0)
            .map(|&k| (k.name().to_string(), self.count(k)))
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::OnceLock;

    use super::*;

    /// Lines logged to [`LOG_TARGET`] by any test of this process, by source prefix:
    /// a test counts the lines of its own source only.
    /// [`install_capture`] must have run before those lines were logged.
    pub(crate) fn guest_lines(source: &str) -> usize {
        CAPTURED.get().unwrap().lock().unwrap().iter().filter(|l| l.starts_with(&format!("{source}:"))).count()
    }

    static CAPTURED: OnceLock<Mutex<Vec<String>>> = OnceLock::new();

    struct Capture;

    impl log::Log for Capture {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.target() == LOG_TARGET
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) {
                CAPTURED.get().unwrap().lock().unwrap().push(r.args().to_string());
            }
        }
        fn flush(&self) {}
    }

    /// Installs the capturing logger once per test process.
    pub(crate) fn install_capture() {
        static DONE: AtomicBool = AtomicBool::new(false);
        CAPTURED.get_or_init(|| Mutex::new(Vec::new()));
        if !DONE.swap(true, Ordering::SeqCst) {
            log::set_logger(&Capture).expect("no other logger in unit tests");
            log::set_max_level(log::LevelFilter::Trace);
        }
    }

    #[test]
    fn counts_every_error_and_logs_each_kind_once_per_interval() {
        install_capture();
        let errors = GuestErrors::with_interval("rate-test", Duration::from_millis(300));
        for i in 0..100_000u64 {
            errors.report(GuestErrorKind::Chain, format_args!("chain {i}"));
        }
        errors.report(GuestErrorKind::Buffer, "one buffer");
        assert_eq!(errors.count(GuestErrorKind::Chain), 100_000);
        assert_eq!(errors.total(), 100_001);
        assert_eq!(errors.by_kind(), BTreeMap::from([("buffer".to_string(), 1), ("chain".to_string(), 100_000)]));
        assert_eq!(guest_lines("rate-test"), 2, "one line per kind");
        std::thread::sleep(Duration::from_millis(350));
        errors.report(GuestErrorKind::Chain, "after the interval");
        assert_eq!(guest_lines("rate-test"), 3);
        let lines = CAPTURED.get().unwrap().lock().unwrap().clone();
        let last = lines.iter().rev().find(|l| l.starts_with("rate-test:")).unwrap();
        assert!(last.contains("99999 more of this kind"), "{last}");
    }
}
