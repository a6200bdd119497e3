//! `caev2 eval knn | linear | align`.

use std::ops::Range;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use tools::eval::*;
use trainer::model::{ModelConfig, Preset};

use super::parse_range;

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Weighted k-NN on cosine similarity (cross-validated).
    Knn(EvalArgs),
    /// BatchNorm (no affine) + linear classifier (cross-validated).
    Linear(EvalArgs),
    /// Alignment of a checkpoint's predictions with the teacher's targets on
    /// stored views (e.g. those held out with `train --train-views`): mean
    /// cosine for visible (+CLS) and masked tokens, with the run's masking.
    Align {
        /// Checkpoint folder or run folder.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Store, or a bucket URL read through --cache [default: the run's].
        #[arg(long)]
        shards: Option<PathBuf>,
        #[command(flatten)]
        cache: super::CacheArgs,
        /// Image folder [default: the run's].
        #[arg(long)]
        data: Option<PathBuf>,
        /// Stored views to use, e.g. 2..3.
        #[arg(long, value_parser = parse_range)]
        views: Range<u32>,
        /// Batch size.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Skip the random-init floor (the run's student before its first step).
        #[arg(long)]
        no_random: bool,
        /// libtorch and loader threads [default: all cores].
        #[arg(long)]
        threads: Option<usize>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct EvalArgs {
    /// Labelled images: ImageNet layout (DATA/<class>/<image>).
    #[arg(long)]
    data: PathBuf,
    /// TSV mapping class folders to labels (header row; first column the folder).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Column of --labels to use.
    #[arg(long, default_value = "coarse")]
    label_column: String,
    /// Trainer checkpoints or run folders to evaluate (repeatable).
    #[arg(long)]
    checkpoint: Vec<PathBuf>,
    /// Also a random-init encoder of this size [default: the first checkpoint's].
    #[arg(long, value_enum)]
    random: Option<Preset>,
    /// Input size of the random-init encoder [default: the first checkpoint's, else 224].
    #[arg(long)]
    random_size: Option<u32>,
    /// Skip the random-init floor.
    #[arg(long)]
    no_random: bool,
    /// Teacher ONNX models to evaluate (the ceiling; repeatable).
    #[arg(long)]
    teacher: Vec<PathBuf>,
    /// Neighbours for k-NN.
    #[arg(long, default_value_t = 20)]
    k: usize,
    /// Cross-validation folds.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Linear-probe epochs.
    #[arg(long, default_value_t = 100)]
    epochs: usize,
    /// Linear-probe learning rate.
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    /// Seed of folds, probe and random init.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Threads.
    #[arg(long)]
    threads: Option<usize>,
    /// Also write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
}

/// Run `caev2 eval ...`.
pub fn run(cmd: EvalCommand) -> Result<ExitCode> {
    match cmd {
        EvalCommand::Knn(a) => run_probe(a, true),
        EvalCommand::Linear(a) => run_probe(a, false),
        EvalCommand::Align { checkpoint, shards, cache, data, views, batch, no_random, threads, json } => {
            let threads = threads.unwrap_or_else(super::cores);
            tch::set_num_threads(threads as i32);
            let loaded = trainer::load_checkpoint(&checkpoint, tch::Device::Cpu)?;
            let store = shards.unwrap_or_else(|| loaded.config.store.clone());
            let (store, _pin) = cache.local(&store, remote_store::Need::Everything, super::progress(json))?;
            let data = data.or_else(|| loaded.config.data.clone());
            let (v, z) = tools::eval::alignment(&loaded, &store, data.as_deref(), views.clone(), batch, threads)?;
            let floor = if no_random {
                None
            } else {
                let init = trainer::initial_model(&loaded, tch::Device::Cpu);
                Some(tools::eval::alignment(&init, &store, data.as_deref(), views.clone(), batch, threads)?)
            };
            if json {
                let mut j = serde_json::json!({
                    "checkpoint": checkpoint, "views": [views.start, views.end], "align_visible": v, "align_masked": z,
                    "provenance": loaded.provenance,
                });
                if let Some((rv, rz)) = floor {
                    j["random_visible"] = rv.into();
                    j["random_masked"] = rz.into();
                }
                println!("{j}");
            } else {
                println!("alignment on views {}..{} (mean cosine to the teacher's targets):", views.start, views.end);
                println!("  checkpoint         visible (+CLS) {v:.4}, masked {z:.4}");
                if let Some((rv, rz)) = floor {
                    println!("  random-init floor  visible (+CLS) {rv:.4}, masked {rz:.4}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn run_probe(a: EvalArgs, knn: bool) -> Result<ExitCode> {
    let threads = a.threads.unwrap_or_else(super::cores);
    tch::set_num_threads(threads as i32);
    let set = load_labelled(&a.data, a.labels.as_deref().map(|p| (p, a.label_column.as_str())))?;
    let mut encoders: Vec<EncoderSpec> = a.checkpoint.iter().cloned().map(EncoderSpec::Checkpoint).collect();
    if !a.no_random {
        // the first checkpoint's settings, read only when --random or --random-size leave one open
        let first = match a.checkpoint.first() {
            Some(c) if a.random.is_none() || a.random_size.is_none() => Some(trainer::load_checkpoint(c, tch::Device::Cpu)?.config.model),
            _ => None,
        };
        let preset = match (&a.random, &first) {
            (Some(r), _) => Some(*r),
            (None, Some(m)) => Some(m.preset),
            (None, None) => None,
        };
        let px = a.random_size.map(i64::from).or(first.as_ref().map(|m| m.image_size)).unwrap_or(224);
        // every preset has the same patch size, so the size is checked even without a preset
        let base = ModelConfig::preset(preset.unwrap_or(Preset::Tiny), 512);
        let patch = base.patch_size;
        if base.with_image_size(px).is_none() {
            bail!("--random-size {px}: must be a positive multiple of the patch size {patch}");
        }
        if let Some(p) = preset {
            encoders.push(EncoderSpec::Random(p, px, a.seed));
        }
    }
    encoders.extend(a.teacher.iter().cloned().map(EncoderSpec::Teacher));
    if encoders.is_empty() {
        bail!("nothing to evaluate: give --checkpoint, --random or --teacher");
    }
    let cfg = EvalConfig { knn, linear: !knn, k: a.k, folds: a.folds, seed: a.seed, epochs: a.epochs, lr: a.lr, batch: 32, threads };
    let rows = evaluate(&encoders, &set, &cfg)?;
    // how each checkpoint's run ran, by the path given
    let provenance: serde_json::Map<String, serde_json::Value> = a
        .checkpoint
        .iter()
        .map(|c| (c.display().to_string(), serde_json::to_value(trainer::provenance_of(c)).unwrap_or_default()))
        .collect();
    let j = serde_json::json!({
        "data": a.data, "images": set.files.len(), "classes": set.classes, "folds": a.folds, "k": a.k, "rows": rows,
        "provenance": provenance,
    });
    if let Some(o) = &a.out {
        std::fs::write(o, serde_json::to_vec_pretty(&j)?).with_context(|| format!("writing {}", o.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        print!("{}", format_table(&rows, &set, &cfg));
    }
    Ok(ExitCode::SUCCESS)
}
