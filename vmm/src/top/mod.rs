//! `vmm top`: a live, `esxtop`-like view of a running `vmm run` over its control
//! socket, or its batch mode printing CSV (`esxtop -b`).
//!
//! Every refresh sends one `sample` request ([`HostSample`]) and shows one row per
//! VM under ESX's column names ([`columns`]); rates (`SWR/s`, `SWW/s`) come from two
//! consecutive samples. The screen (`screen.rs`) is drawn with ratatui on crossterm;
//! the batch mode needs no terminal at all.

pub mod columns;
mod screen;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::api::{client, Reply, Request};
use crate::sample::HostSample;
pub use columns::Column;

/// What `vmm top` shows and how.
#[derive(Clone, Debug)]
pub struct TopOptions {
    /// The control socket of the running `vmm run`.
    pub sock: PathBuf,
    /// Time between refreshes.
    pub interval: Duration,
    /// Print CSV instead of drawing the screen.
    pub batch: bool,
    /// Stop after this many samples (batch and screen alike).
    pub count: Option<u64>,
    /// Sort the rows by this column, largest first (None: by name).
    pub sort: Option<Column>,
}

/// Why `vmm top` stopped early.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    /// The running `vmm` could not be asked or answered badly.
    #[error("{0}")]
    Api(String),
    /// The terminal or stdout could not be written.
    #[error("terminal: {0}")]
    Io(#[from] std::io::Error),
    /// The CSV could not be written.
    #[error("csv: {0}")]
    Csv(#[from] csv::Error),
}

/// Asks the running `vmm` at `sock` for one sample.
pub fn fetch(sock: &std::path::Path) -> Result<HostSample, TopError> {
    let resp = client::send(sock, &Request::Sample).map_err(TopError::Api)?;
    match (resp.result, resp.error) {
        (Some(Reply::Sample(s)), _) => Ok(*s),
        (_, e) => Err(TopError::Api(e.unwrap_or_else(|| "no sample in the response".into()))),
    }
}

/// Two consecutive samples: what a refresh shows.
pub struct Frame {
    /// The sample now.
    pub now: HostSample,
    /// The one before, if any.
    pub prev: Option<HostSample>,
    /// Seconds between them.
    pub dt_s: f64,
    /// Seconds since `vmm top` started.
    pub t_s: f64,
}

impl Frame {
    /// The VMs' rows in order of `sort` (largest first; by name without one), each
    /// with its value per column.
    pub fn rows(&self, sort: Option<Column>) -> Vec<(String, String, Vec<Option<f64>>)> {
        let mut rows: Vec<_> = self
            .now
            .vms
            .iter()
            .map(|vm| {
                let prev = self.prev.as_ref().and_then(|p| p.vms.iter().find(|v| v.name == vm.name));
                let values = Column::ALL.iter().map(|c| c.value(vm, prev, self.dt_s)).collect::<Vec<_>>();
                (vm.name.clone(), state_text(&vm.state), values)
            })
            .collect();
        match sort.and_then(|c| Column::ALL.iter().position(|x| *x == c)) {
            Some(i) => rows.sort_by(|a, b| b.2[i].unwrap_or(f64::MIN).total_cmp(&a.2[i].unwrap_or(f64::MIN))),
            None => rows.sort_by(|a, b| a.0.cmp(&b.0)),
        }
        rows
    }
}

/// A VM's state in one word or a short phrase.
fn state_text(s: &crate::vm::VmState) -> String {
    match serde_json::to_value(s).expect("states serialise") {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }
}

/// The shortest refresh interval (`-d`, the `-` key): each refresh costs the
/// running VMM a sample.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// The longest refresh interval (`-d`, the `+` key).
pub const MAX_INTERVAL: Duration = Duration::from_secs(60);

/// Parses `-d`: a duration (`500ms`, `2s`) from [`MIN_INTERVAL`] to [`MAX_INTERVAL`].
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let d = crate::units::parse_duration(text).map_err(|e| e.to_string())?;
    if (MIN_INTERVAL..=MAX_INTERVAL).contains(&d) {
        Ok(d)
    } else {
        Err(format!("{text:?}: the refresh interval must be from 100ms to 60s"))
    }
}

/// Runs `vmm top` until `q`, the count, or an error.
pub fn run(opts: &TopOptions) -> Result<(), TopError> {
    if opts.batch {
        batch(opts, std::io::stdout().lock())
    } else {
        screen::run(opts)
    }
}

/// Samples and hands each frame to `show` until it returns false or the count is
/// reached; `show` waits out the interval unless told the frame is the last.
fn sample_loop(
    opts: &TopOptions,
    mut show: impl FnMut(&Frame, bool) -> Result<bool, TopError>,
) -> Result<(), TopError> {
    let start = Instant::now();
    let mut prev: Option<(HostSample, Instant)> = None;
    let mut n = 0u64;
    loop {
        let now = fetch(&opts.sock)?;
        let at = Instant::now();
        let dt_s = prev.as_ref().map_or(0.0, |(_, t)| at.duration_since(*t).as_secs_f64());
        let frame = Frame { now, prev: prev.take().map(|(s, _)| s), dt_s, t_s: at.duration_since(start).as_secs_f64() };
        n += 1;
        let last = opts.count.is_some_and(|c| n >= c);
        if !show(&frame, last)? || last {
            return Ok(());
        }
        prev = Some((frame.now, at));
    }
}

/// The batch mode: a header, then one CSV row per VM per sample.
fn batch(opts: &TopOptions, out: impl Write) -> Result<(), TopError> {
    let mut w = csv::Writer::from_writer(out);
    let mut head = vec!["time_s", "vm", "state", "mem_state", "free_mib", "tax"];
    head.extend(Column::ALL.iter().map(|c| c.name()));
    w.write_record(&head)?;
    w.flush()?;
    sample_loop(opts, |f, last| {
        let (mem_state, free, tax) = match &f.now.policy {
            Some(p) => (p.state.to_string(), format!("{:.2}", p.free_mib), format!("{:.2}", p.idle_tax)),
            None => ("-".into(), "-".into(), "-".into()),
        };
        for (name, state, values) in f.rows(opts.sort) {
            let mut rec = vec![format!("{:.3}", f.t_s), name, state, mem_state.clone(), free.clone(), tax.clone()];
            rec.extend(values.into_iter().map(crate::sample::format_value));
            w.write_record(&rec)?;
        }
        w.flush()?;
        if !last {
            std::thread::sleep(opts.interval);
        }
        Ok(true)
    })
}
