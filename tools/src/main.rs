//! `caev2`: CAE v2 pretraining with cached CLIP targets.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Parser)]
#[command(name = "caev2", version, about = "CAE v2 self-supervised pretraining with cached teacher targets", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a frozen teacher once over K augmented views per image and store
    /// its tokens and the views' parameters in a shard store. Safe to kill and
    /// rerun with the same arguments (it resumes), and to run several times at
    /// once on one store (shards are claimed under file locks, or by claims
    /// in the bucket for --out s3://, gs://, az://).
    Extract(Box<cmd::extract::ExtractArgs>),
    /// Train a CAE v2 student from a store (cached targets; a folder or a
    /// bucket, read through a local cache) and the images it was extracted
    /// from (or its own, with --embed-images). Kill it at any time and rerun
    /// with --resume.
    Train(Box<cmd::train::TrainArgs>),
    /// Look at a store.
    #[command(subcommand)]
    Inspect(cmd::inspect::InspectCommand),
    /// Measure encoders on a labelled image folder: a checkpoint, a random-init
    /// encoder of the same size (the floor) and the teacher (the ceiling).
    #[command(subcommand)]
    Eval(cmd::eval::EvalCommand),
    /// Render a run's training curves (loss, loss_v, loss_z, lr) to PNG.
    Plot(cmd::plot::PlotArgs),
    /// Write a checkpoint's encoder as safetensors with timm's
    /// vit_*_patch16_224 names (plus a JSON config and a reference for
    /// tools/scripts/check_timm_export.py).
    Export(cmd::export::ExportArgs),
}

fn main() -> ExitCode {
    // `caev2 ... | head` ends quietly, as other command-line tools do,
    // instead of panicking on the closed pipe.
    reset_sigpipe();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line: the error and its causes, never a backtrace (even
            // with RUST_BACKTRACE set; that is for panics, which are bugs).
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once: library errors
/// often repeat their source in their own message.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if !line.contains(&c) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&c);
        }
    }
    line.replace('\n', " ")
}

fn reset_sigpipe() {
    // SAFETY: called first thing in main, before any thread exists;
    // restoring the default action of SIGPIPE has no other effect.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Extract(a) => cmd::extract::run(*a),
        Command::Train(a) => cmd::train::run(*a),
        Command::Inspect(c) => cmd::inspect::run(c),
        Command::Eval(c) => cmd::eval::run(c),
        Command::Plot(a) => cmd::plot::run(a),
        Command::Export(a) => cmd::export::run(a),
    }
}
