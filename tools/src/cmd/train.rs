//! `caev2 train`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use trainer::loss::{LossConfig, LossKind, Weighting};
use trainer::masking::Masking;
use trainer::model::Preset;
use trainer::{Budget, PAPER_EPOCHS, TrainConfig};

#[derive(Args)]
pub struct TrainArgs {
    /// Target store made by `caev2 extract`: a folder, or a bucket URL
    /// (s3://, gs://, az://) whose store is fetched into --cache and checked
    /// before training starts.
    #[arg(long)]
    shards: PathBuf,
    #[command(flatten)]
    cache: super::CacheArgs,
    /// The image folder the store was extracted from; not needed for a
    /// store that carries its images (`extract --embed-images`).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Student size.
    #[arg(long, value_enum, default_value_t = Preset::Tiny)]
    model: Preset,
    /// Run folder (config.json, metrics.jsonl, checkpoints/).
    #[arg(long)]
    out: PathBuf,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Epochs (one stored view per image per epoch)...
    #[arg(long, conflicts_with = "steps")]
    epochs: Option<u64>,
    /// ...or optimisation steps [default: 300 epochs].
    #[arg(long)]
    steps: Option<u64>,
    /// Peak learning rate [default: 1.5e-3 x batch / 2048, the paper's rate scaled linearly].
    #[arg(long)]
    lr: Option<f64>,
    /// Final learning rate of the cosine schedule [default: 1e-5].
    #[arg(long)]
    min_lr: Option<f64>,
    /// Warmup steps [default: 10/300 of the steps, as in the paper].
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// AdamW weight decay of every parameter of rank >= 2 (tokens included,
    /// as released; not biases, norms or layer-scale gammas) [default: 0.05].
    #[arg(long)]
    weight_decay: Option<f64>,
    /// AdamW beta2 [default: 0.999, the released scripts'; the paper's table says 0.98].
    #[arg(long)]
    beta2: Option<f64>,
    /// Clip the global gradient norm to this value [default: 3].
    #[arg(long)]
    clip_grad: Option<f64>,
    /// Distance of both losses.
    #[arg(long, value_enum, default_value_t = LossKind::Cosine)]
    loss: LossKind,
    /// How l_v and l_z are combined: released code (mean over all tokens) or paper Eq. 2 (sum of means).
    #[arg(long, value_enum, default_value_t = Weighting::Code)]
    weighting: Weighting,
    /// Turn off the visible latent alignment loss l_v.
    #[arg(long)]
    no_lv: bool,
    /// Turn off the masked latent alignment loss l_z.
    #[arg(long)]
    no_lz: bool,
    /// Fraction of patches masked [default: T/S/B/L 30/49/98/118 of 196].
    #[arg(long, conflicts_with = "num_masked")]
    mask_ratio: Option<f64>,
    /// Number of patches masked.
    #[arg(long)]
    num_masked: Option<usize>,
    /// Masking strategy.
    #[arg(long, value_enum, default_value_t = Masking::Block)]
    masking: Masking,
    /// Regressor depth [default: T/S/B/L 1/1/4/4].
    #[arg(long)]
    regressor_depth: Option<i64>,
    /// Maximum drop-path rate [default: 0.1, Large 0.2].
    #[arg(long)]
    drop_path: Option<f64>,
    /// Seed of initialisation, view choice, order, masks and drop path.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Threads of this process [default: all cores, shared among the ranks
    /// of the node under torchrun (LOCAL_WORLD_SIZE)]. On CUDA libtorch gets
    /// one and the loader the rest; on the CPU libtorch gets all of them and
    /// the loader a quarter (it works only while refilling its prefetch).
    #[arg(long)]
    threads: Option<usize>,
    /// Loader threads, instead of the split of --threads.
    #[arg(long)]
    loader_threads: Option<usize>,
    /// Read the losses back from the device every N steps: one host sync per
    /// N steps instead of several per step. metrics.jsonl still has a line
    /// per step; images/s, TFLOP/s and MFU are over each group of N.
    #[arg(long, default_value_t = trainer::DEFAULT_METRICS_EVERY)]
    metrics_every: u64,
    /// Peak TFLOP/s of one device at the run's precision, for the MFU in
    /// metrics.jsonl [default: looked up for H100, H200 and A100 GPUs; none
    /// on the CPU].
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Data-parallel runs (under torchrun or srun): seconds a rank waits for
    /// the rendezvous or any collective before it gives up with an error.
    #[arg(long, default_value_t = trainer::DEFAULT_DIST_TIMEOUT.as_secs())]
    dist_timeout: u64,
    /// Data-parallel runs on CUDA: which library all-reduces the gradients.
    /// auto: NCCL when every rank has a GPU of its own (torchrun's one rank
    /// per GPU), else Gloo through host memory, saying why; nccl: NCCL or an
    /// error; gloo: always Gloo. CPU runs always use Gloo.
    #[arg(long, default_value = "auto", value_parser = ["auto", "nccl", "gloo"])]
    dist_backend: String,
    /// Write a checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 100)]
    checkpoint_every: u64,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Compute targets with this ONNX teacher (the store's) inside the loop
    /// instead of reading them: proves equivalence, measures what caching saves.
    #[arg(long, value_name = "FILE.onnx")]
    live_teacher: Option<PathBuf>,
    /// Run --live-teacher on the training GPU (ONNX Runtime's CUDA
    /// provider, from setup's onnxruntime-gpu) instead of the CPU: what a
    /// live teacher costs on a GPU node. Not with --fresh-views.
    #[arg(long, requires = "live_teacher")]
    live_teacher_gpu: bool,
    /// Train on stored views 0..N only; the others stay held out for
    /// `caev2 eval align`.
    #[arg(long)]
    train_views: Option<u32>,
    /// Train as the authors do, with K = infinity: in every epoch draw a NEW
    /// view of every image from the store's own sampler (its seed and
    /// augmentation settings, a view number no stored view has) and compute
    /// its targets with --live-teacher in the loop. Same order and masks as
    /// the cached run with the same seed; deterministic and resumable. The
    /// baseline that shows what K stored views cost.
    #[arg(long, requires = "live_teacher", conflicts_with = "train_views")]
    fresh_views: bool,
    /// After training, evaluate the encoder with k-NN on this labelled folder
    /// (plus the random-init floor); results in RUN/eval.json.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Label file for --eval-data (see `caev2 eval knn --help`).
    #[arg(long)]
    eval_labels: Option<PathBuf>,
    /// Column of --eval-labels.
    #[arg(long, default_value = "coarse")]
    eval_label_column: String,
    /// On CUDA, train in fp32 instead of bfloat16 autocast.
    #[arg(long)]
    fp32: bool,
    /// Measure the loader alone instead of training: stream the run's
    /// batches (decode, view rebuild, targets, masks) with all --threads and
    /// no model, and print images/s. Compare with a training run's images/s
    /// to see whether the loader or the device is the bound.
    #[arg(long)]
    loader_only: bool,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// Run `caev2 train`.
pub fn run(a: TrainArgs) -> Result<ExitCode> {
    let budget = match a.steps {
        Some(s) => Budget::Steps(s),
        None => Budget::Epochs(a.epochs.unwrap_or(PAPER_EPOCHS)),
    };
    // a bucket: its local copy, held (never evicted) until training ends
    let (shards, _pin) = a.cache.local(&a.shards, remote_store::Need::Everything, super::progress(a.no_progress))?;
    let mut cfg = TrainConfig::paper(&shards, a.data.as_deref(), a.model, a.batch, budget, a.train_views)?;
    if let Some(d) = a.regressor_depth {
        cfg.model.regressor_depth = d;
    }
    if let Some(d) = a.drop_path {
        cfg.model.drop_path = d;
    }
    let patches = cfg.model.num_patches() as usize;
    match (a.num_masked, a.mask_ratio) {
        (Some(n), _) => cfg.num_masked = n,
        (None, Some(r)) if r.is_finite() && r > 0.0 && r < 1.0 => cfg.num_masked = (r * patches as f64).round() as usize,
        (None, Some(r)) => bail!("--mask-ratio {r}: must be between 0 and 1"),
        (None, None) => {}
    }
    cfg.loss = LossConfig { kind: a.loss, weighting: a.weighting, visible: !a.no_lv, masked: !a.no_lz };
    cfg.masking = a.masking;
    cfg.lr = a.lr.unwrap_or(cfg.lr);
    cfg.min_lr = a.min_lr.unwrap_or(cfg.min_lr);
    cfg.warmup_steps = a.warmup_steps.unwrap_or(cfg.warmup_steps);
    cfg.adamw.weight_decay = a.weight_decay.unwrap_or(cfg.adamw.weight_decay);
    cfg.adamw.beta2 = a.beta2.unwrap_or(cfg.adamw.beta2);
    cfg.clip_grad = a.clip_grad.unwrap_or(cfg.clip_grad);
    cfg.seed = a.seed;
    cfg.live_teacher = a.live_teacher.clone();
    cfg.fresh_views = a.fresh_views;
    // torchrun / srun: this process is one rank of a data-parallel group
    let launch = trainer::dist::Launch::from_env().context("reading the launcher's environment")?;
    let ranks_here = std::env::var("LOCAL_WORLD_SIZE").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0);
    let main_rank = launch.as_ref().is_none_or(|l| l.rank == 0);
    let opts = trainer::RunOptions {
        out: a.out.clone(),
        device: a.device.clone(),
        threads: a.threads.unwrap_or_else(|| (super::cores() / ranks_here.filter(|_| launch.is_some()).unwrap_or(1)).max(1)),
        loader_threads: a.loader_threads,
        metrics_every: a.metrics_every,
        peak_tflops: a.peak_tflops,
        checkpoint_every: a.checkpoint_every,
        resume: a.resume,
        progress: super::progress(a.no_progress),
        bf16: !a.fp32,
        launch,
        dist_timeout: std::time::Duration::from_secs(a.dist_timeout.max(1)),
        dist_backend: a.dist_backend.parse().map_err(anyhow::Error::msg)?,
        program: super::program(),
        live_teacher_gpu: a.live_teacher_gpu,
    };
    if a.loader_only {
        let l = trainer::measure_loader(&cfg, opts.threads, cfg.steps).context("measuring the loader")?;
        if a.json {
            let j = serde_json::json!({"loader": l, "images_per_second": l.images_per_sec()});
            println!("{}", serde_json::to_string_pretty(&j)?);
        } else {
            println!(
                "loader: {} images in {:.2} s = {:.1} images/s with {} threads ({:.1} per thread)",
                l.images,
                l.seconds,
                l.images_per_sec(),
                l.threads,
                l.images_per_sec() / l.threads as f64
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let s = trainer::run_train(&cfg, &opts).with_context(|| format!("training into {}", a.out.display()))?;
    if !main_rank {
        // rank 0 prints the summary, writes the run folder and evaluates
        return Ok(ExitCode::SUCCESS);
    }
    let last = s.metrics.last();
    let secs = s.elapsed.as_secs_f64();
    let imgs = (s.steps - s.start_step) as f64 * a.batch as f64;
    if a.json {
        let j = serde_json::json!({
            "out": a.out, "device": s.device, "start_step": s.start_step, "steps": s.steps,
            "seconds": secs, "images_per_second": imgs / secs.max(1e-9),
            "first": s.metrics.first(), "last": last, "checkpoint": s.checkpoint,
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        println!("{}", s.device);
        if let (Some(f), Some(l)) = (s.metrics.first(), last) {
            println!(
                "train: steps {}..{} in {:.1} s ({:.1} images/s); loss {:.4} -> {:.4} (l_v {:.4}, l_z {:.4})",
                s.start_step,
                s.steps,
                secs,
                imgs / secs.max(1e-9),
                f.loss,
                l.loss,
                l.loss_v,
                l.loss_z
            );
        } else {
            println!("train: nothing to do, the run already has {} steps", s.steps);
        }
        if let Some(c) = &s.checkpoint {
            println!("checkpoint: {}", c.display());
        }
    }
    if let Some(data) = &a.eval_data {
        use tools::eval::*;
        let set = load_labelled(data, a.eval_labels.as_deref().map(|p| (p, a.eval_label_column.as_str())))?;
        let ecfg =
            EvalConfig { knn: true, linear: false, k: 20, folds: 5, seed: a.seed, epochs: 0, lr: 0.0, batch: 32, threads: opts.threads };
        let encoders = [EncoderSpec::Checkpoint(a.out.clone()), EncoderSpec::Random(cfg.model.preset, cfg.model.image_size, a.seed)];
        let rows = evaluate(&encoders, &set, &ecfg)?;
        let path = a.out.join("eval.json");
        let j = serde_json::json!({"data": data, "images": set.files.len(), "classes": set.classes, "folds": 5, "k": 20, "rows": rows});
        std::fs::write(&path, serde_json::to_vec_pretty(&j)?).with_context(|| format!("writing {}", path.display()))?;
        print!("{}", format_table(&rows, &set, &ecfg));
    }
    Ok(ExitCode::SUCCESS)
}
