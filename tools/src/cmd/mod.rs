//! One module per command: its arguments (clap derive) and its `run`.
//! Settings and their defaults live in the library crates; these modules
//! only map flags onto them and print the results.

pub mod eval;
pub mod export;
pub mod extract;
pub mod inspect;
pub mod plot;
pub mod train;

use std::ops::Range;

/// Parse `A..B` (end exclusive, non-empty).
pub fn parse_range(s: &str) -> Result<Range<u32>, String> {
    let (a, b) = s.split_once("..").ok_or("expected A..B")?;
    let a = a.parse::<u32>().map_err(|e| e.to_string())?;
    let b = b.parse::<u32>().map_err(|e| e.to_string())?;
    if a >= b {
        return Err(format!("empty range {a}..{b}"));
    }
    Ok(a..b)
}

/// How a codec that needs a fit (`--codec pca`) is fitted when the
/// destination store is new (an existing store keeps its model).
#[derive(Debug, Clone, clap::Args)]
pub struct FitArgs {
    /// pca: views to fit the principal axes and entropy tables on (all K
    /// views of images spread evenly over the dataset).
    #[arg(long, default_value_t = shard_store::PcaFit::default().views)]
    pub fit_views: u64,
    /// pca: the quantiser step is the largest whose mean token cosine to
    /// the teacher's targets on the fit views reaches this value.
    #[arg(long, default_value_t = shard_store::PcaFit::default().cosine)]
    pub fit_cosine: f32,
}

impl FitArgs {
    /// The library's fit settings.
    pub fn fit(&self) -> shard_store::PcaFit {
        shard_store::PcaFit { views: self.fit_views, cosine: self.fit_cosine }
    }
}

pub use target_extractor::cores;

/// This program, for a run's provenance (`run.json`): its version, the git
/// commit it was built from (when built in a git checkout) and its command
/// line.
pub fn program() -> trainer::Program {
    trainer::Program {
        version: format!("caev2 {}", env!("CARGO_PKG_VERSION")),
        git_commit: option_env!("CAEV2_GIT_COMMIT").map(str::to_owned),
        args: std::env::args().collect(),
    }
}

/// Whether to draw a progress bar: asked for, and stderr is a terminal.
pub fn progress(no_progress: bool) -> bool {
    use std::io::IsTerminal;
    !no_progress && std::io::stderr().is_terminal()
}
