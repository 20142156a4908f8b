//! `vmm lab`: runs a scenario (VMs, a host-memory budget, reclaimers, timed
//! events), records every VM's and the host's counters over time, and draws what
//! happened as plots and a short report.
//!
//! - [`scenario`]: the scenario file and its checks;
//! - [`run`](mod@run): the run itself (host, events, sampling, progress, Ctrl-C);
//! - [`record`]: the CSV and JSON lines written while it runs, the machine;
//! - [`plot`]: PNG and SVG charts with an embedded font;
//! - [`report`]: the plots of a run, its summary table and key results, the
//!   Markdown report.
//!
//! The built-in scenarios (`vmm lab list`) are scenario files like any other,
//! compiled into the binary from `vmm/src/lab/scenarios/`.

pub mod plot;
pub mod record;
pub mod report;
pub mod run;
pub mod scenario;

use std::path::{Path, PathBuf};

pub use scenario::{Scenario, ScenarioError};

/// The built-in scenarios: name, file text.
pub const BUILTIN: [(&str, &str); 7] = [
    ("fig2", include_str!("scenarios/fig2.toml")),
    ("fig4", include_str!("scenarios/fig4.toml")),
    ("fig6", include_str!("scenarios/fig6.toml")),
    ("fig7", include_str!("scenarios/fig7.toml")),
    ("states", include_str!("scenarios/states.toml")),
    ("idle-zero", include_str!("scenarios/idle-zero.toml")),
    ("smoke", include_str!("scenarios/smoke.toml")),
];

/// Why a lab run failed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// Neither a built-in name nor a readable file.
    #[error("{0:?}: no built-in scenario of that name (vmm lab list) and no such file: {1}")]
    NotFound(String, #[source] std::io::Error),
    /// The scenario does not check.
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    /// The host could not be set up.
    #[error("setting up the VMs: {0}")]
    Setup(String),
    /// The output could not be written.
    #[error("writing {}: {source}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A plot could not be drawn.
    #[error(transparent)]
    Plot(#[from] plot::PlotError),
}

/// What `vmm lab run` was asked.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// A built-in name or a scenario file.
    pub scenario: String,
    /// Use the scenario's `[quick]` values.
    pub quick: bool,
    /// The output directory (default `lab-out/NAME`).
    pub out: Option<PathBuf>,
}

/// The text of a built-in scenario or a file, and its origin.
pub fn load(name_or_file: &str) -> Result<(String, String), LabError> {
    if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_file) {
        return Ok((text.to_string(), name_or_file.to_string()));
    }
    let text = std::fs::read_to_string(name_or_file).map_err(|e| LabError::NotFound(name_or_file.into(), e))?;
    Ok((text, name_or_file.to_string()))
}

/// `vmm lab list`: one line per built-in scenario, its name and description.
pub fn list() -> Vec<(String, String)> {
    BUILTIN
        .iter()
        .map(|(n, text)| {
            let d =
                Scenario::parse(text, n, false).map_or_else(|e| format!("(does not parse: {e})"), |s| s.description);
            (n.to_string(), d)
        })
        .collect()
}

/// Runs a scenario and writes everything into its output directory; returns the
/// final JSON object (`{"lab": NAME, ...}`).
pub fn run(opts: &LabOptions) -> Result<serde_json::Value, LabError> {
    let (text, origin) = load(&opts.scenario)?;
    let s = Scenario::parse(&text, &origin, opts.quick)?;
    let out = opts.out.clone().unwrap_or_else(|| Path::new("lab-out").join(&s.name));
    std::fs::create_dir_all(&out).map_err(|e| LabError::Write { path: out.clone(), source: e })?;
    std::fs::write(out.join("scenario.toml"), &text)
        .map_err(|e| LabError::Write { path: out.join("scenario.toml"), source: e })?;
    let recording = run::run(&s, &out)?;
    report::write(&s, opts.quick, &recording, &out)
}
