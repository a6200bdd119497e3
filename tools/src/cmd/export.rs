//! `caev2 export`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

/// Arguments of `caev2 export`.
#[derive(Args)]
pub struct ExportArgs {
    /// Checkpoint folder (RUN/checkpoints/step-N) or run folder (latest).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output file (.safetensors).
    #[arg(long)]
    out: PathBuf,
}

/// Run `caev2 export`.
pub fn run(a: ExportArgs) -> Result<ExitCode> {
    let e = tools::export::export(&a.checkpoint, &a.out)?;
    println!("export: {} tensors -> {} (+ {}, {})", e.tensors, e.weights.display(), e.config.display(), e.check.display());
    Ok(ExitCode::SUCCESS)
}
