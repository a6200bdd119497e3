//! `caev2 plot`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

/// Arguments of `caev2 plot`.
#[derive(Args)]
pub struct PlotArgs {
    /// Run folder.
    run: PathBuf,
    /// Output PNG [default: RUN/curves.png].
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Run `caev2 plot`.
pub fn run(a: PlotArgs) -> Result<ExitCode> {
    let (path, n) = tools::plot::plot(&a.run, a.out.as_deref())?;
    println!("plot: {} steps -> {}", n, path.display());
    Ok(ExitCode::SUCCESS)
}
