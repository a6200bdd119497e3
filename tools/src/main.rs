//! `caev2`: CAE v2 pretraining with cached CLIP targets.

use std::io::IsTerminal;
use std::ops::Range;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use shard_store::Codec;
use target_extractor::{ClipModel, ExtractConfig, TeacherSpec, models_dir, run_extract};

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
    /// once on one store (shards are claimed under file locks).
    Extract(Box<ExtractArgs>),
    /// Train a CAE v2 student from a store (cached targets) and the images it
    /// was extracted from. Kill it at any time and rerun with --resume.
    Train(Box<TrainArgs>),
    /// Look at a store.
    #[command(subcommand)]
    Inspect(InspectCommand),
    /// Measure encoders on a labelled image folder: a checkpoint, a random-init
    /// encoder of the same size (the floor) and the teacher (the ceiling).
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Write a checkpoint's encoder as safetensors with timm's
    /// vit_*_patch16_224 names (plus a JSON config and a reference for
    /// tools/scripts/check_timm_export.py).
    /// Render a run's training curves (loss, loss_v, loss_z, lr) to PNG.
    Plot {
        /// Run folder.
        run: PathBuf,
        /// Output PNG [default: RUN/curves.png].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    Export {
        /// Checkpoint folder (RUN/checkpoints/step-N) or run folder (latest).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Output file (.safetensors).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum EvalCommand {
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
        /// Store [default: the run's].
        #[arg(long)]
        shards: Option<PathBuf>,
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
struct EvalArgs {
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
    #[arg(long, value_parser = ["tiny", "small", "base", "large"])]
    random: Option<String>,
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

#[derive(Args)]
struct TrainArgs {
    /// Target store made by `caev2 extract`.
    #[arg(long)]
    shards: PathBuf,
    /// The image folder the store was extracted from.
    #[arg(long)]
    data: PathBuf,
    /// Student size.
    #[arg(long, default_value = "tiny", value_parser = ["tiny", "small", "base", "large"])]
    model: String,
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
    /// Final learning rate of the cosine schedule.
    #[arg(long, default_value_t = 1e-5)]
    min_lr: f64,
    /// Warmup steps [default: 10/300 of the steps, as in the paper].
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// AdamW weight decay (not on biases, norms, tokens, layer-scale gammas).
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f64,
    /// AdamW beta2 (released scripts 0.999; the paper's table says 0.98).
    #[arg(long, default_value_t = 0.999)]
    beta2: f64,
    /// Clip the global gradient norm to this value.
    #[arg(long, default_value_t = 3.0)]
    clip_grad: f64,
    /// Distance of both losses.
    #[arg(long, default_value = "cosine", value_parser = ["cosine", "mse", "smooth-l1"])]
    loss: String,
    /// How l_v and l_z are combined: released code (mean over all tokens) or paper Eq. 2 (sum of means).
    #[arg(long, default_value = "code", value_parser = ["code", "paper"])]
    weighting: String,
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
    #[arg(long, default_value = "block", value_parser = ["block", "random"])]
    masking: String,
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
    /// libtorch and loader threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
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
    /// Train on stored views 0..N only; the others stay held out for
    /// `caev2 eval align`.
    #[arg(long)]
    train_views: Option<u32>,
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
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ExtractArgs {
    /// Image folder: ImageNet layout (DATA/<class>/<image>) or a flat folder.
    #[arg(long)]
    data: PathBuf,
    /// Store folder to create or resume.
    #[arg(long)]
    out: PathBuf,
    /// Built-in CLIP teacher (base16: ViT-B/16 at 224 px; large14: ViT-L/14
    /// at 196 px), looked up in --models; see target-extractor/scripts/export_clip.py.
    #[arg(long, value_name = "base16|large14", conflicts_with = "teacher", required_unless_present = "teacher")]
    clip: Option<String>,
    /// Any ONNX teacher with one input [B,3,S,S] and a [B,tokens,dim] output,
    /// e.g. .deps/models/efficientnet-lite0.onnx (semantic, ImageNet) or
    /// .deps/models/dinov2-vits14.onnx.
    #[arg(long, value_name = "FILE.onnx")]
    teacher: Option<PathBuf>,
    /// Folder of teacher models [default: $CAEV2_MODELS or .deps/models].
    #[arg(long)]
    models: Option<PathBuf>,
    /// Views per image (K).
    #[arg(long, default_value_t = 10)]
    views: u32,
    /// Teacher batch size.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// ONNX Runtime threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Image decoding / augmentation threads [default: cores / 4, at least 1].
    #[arg(long)]
    decode_threads: Option<usize>,
    /// Target codec.
    #[arg(long, default_value = "f16", value_parser = ["f16", "f32"])]
    codec: String,
    /// Seed of the view sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Student input size recorded with the views; `train` builds its
    /// student for it (224: 14x14 patches of 16 px; 112: 7x7, the native grid
    /// of the EfficientNet-Lite0 teacher, 4x cheaper steps).
    #[arg(long, default_value_t = 224)]
    student_size: u32,
    /// Teacher input size [default: the model's caev2.default_input_size].
    #[arg(long)]
    teacher_size: Option<u32>,
    /// Teacher input mean R,G,B [default: from the model's metadata].
    #[arg(long, value_name = "R,G,B", value_parser = parse_triple)]
    teacher_mean: Option<[f32; 3]>,
    /// Teacher input std R,G,B [default: from the model's metadata].
    #[arg(long, value_name = "R,G,B", value_parser = parse_triple)]
    teacher_std: Option<[f32; 3]>,
    /// Teacher patch size [default: from the model's metadata].
    #[arg(long)]
    teacher_patch: Option<u32>,
    /// Whether the teacher's first token is CLS [default: metadata, else true].
    #[arg(long)]
    teacher_has_cls: Option<bool>,
    /// Name of the teacher output holding the tokens [default: first output].
    #[arg(long)]
    teacher_output: Option<String>,
    /// Name recorded for the teacher [default: metadata or file name].
    #[arg(long)]
    teacher_name: Option<String>,
    /// Images per shard (a shard is the unit of work, resume and locking).
    #[arg(long, default_value_t = 256)]
    images_per_shard: u32,
    /// Split the work across N processes or machines writing one store...
    #[arg(long, default_value_t = 1)]
    num_workers: u32,
    /// ...of which this is number I (it takes shards s with s % N == I).
    #[arg(long, default_value_t = 0)]
    worker_index: u32,
    /// Only these shards, e.g. 0..100 (end exclusive).
    #[arg(long, value_name = "A..B", value_parser = parse_range)]
    shards: Option<Range<u32>>,
    /// Ignore EXIF orientation (torchvision's default loader does).
    #[arg(long)]
    ignore_exif: bool,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Write every teacher input tensor to this folder (for tests).
    #[arg(long, hide = true)]
    debug_dump_inputs: Option<PathBuf>,
}

#[derive(Subcommand)]
enum InspectCommand {
    /// What a store holds: images, views, shards, bytes, teacher, view settings,
    /// dataset, skipped files. Reads the manifest and shard reports only.
    Summary {
        /// Store folder.
        store: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check every checksum, that index and shards agree, that no view is
    /// missing or duplicated, and that targets are finite. Exit code 1 on any
    /// problem.
    Verify {
        /// Store folder.
        store: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One image's view parameters and target statistics (token norms, mean
    /// cosine of neighbouring tokens, CLS-patch similarity).
    Show {
        /// Store folder.
        store: PathBuf,
        /// Image id or path relative to the dataset root.
        #[arg(long)]
        image: String,
        /// Only this view.
        #[arg(long)]
        view: Option<u32>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A PNG sheet: each view as the teacher saw it next to a 3-component PCA
    /// colouring of its patch targets.
    Render {
        /// Store folder.
        store: PathBuf,
        /// Image id or path relative to the dataset root.
        #[arg(long)]
        image: String,
        /// Only this view [default: all views of the image].
        #[arg(long)]
        view: Option<u32>,
        /// Image folder [default: the dataset root recorded in the store].
        #[arg(long)]
        data: Option<PathBuf>,
        /// Output PNG.
        #[arg(long)]
        out: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Two stores of the same images and views (e.g. two codecs): mean/min
    /// token cosine, max error, bytes per view of each.
    Compare {
        /// First store.
        a: PathBuf,
        /// Second store.
        b: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn parse_triple(s: &str) -> Result<[f32; 3], String> {
    target_extractor::parse_triple(s).ok_or_else(|| format!("{s:?}: expected three comma-separated numbers R,G,B"))
}

fn parse_range(s: &str) -> Result<Range<u32>, String> {
    let (a, b) = s.split_once("..").ok_or("expected A..B")?;
    let a = a.parse::<u32>().map_err(|e| e.to_string())?;
    let b = b.parse::<u32>().map_err(|e| e.to_string())?;
    if a >= b {
        return Err(format!("empty range {a}..{b}"));
    }
    Ok(a..b)
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn run_extract_cmd(a: ExtractArgs) -> Result<ExitCode> {
    let models = a.models.clone().unwrap_or_else(models_dir);
    let mut spec = match (&a.clip, &a.teacher) {
        (Some(c), None) => ClipModel::parse(c).with_context(|| format!("--clip {c}: expected base16 or large14"))?.spec(&models)?,
        (None, Some(t)) => TeacherSpec { path: t.clone(), ..Default::default() },
        _ => bail!("give exactly one of --clip and --teacher"),
    };
    spec.input_size = a.teacher_size;
    spec.mean = a.teacher_mean;
    spec.std = a.teacher_std;
    spec.patch_size = a.teacher_patch;
    spec.has_cls = a.teacher_has_cls;
    spec.output = a.teacher_output.clone();
    spec.name = a.teacher_name.clone();
    let cfg = ExtractConfig {
        data: a.data.clone(),
        out: a.out.clone(),
        teacher: spec,
        views: a.views,
        batch: a.batch,
        threads: a.threads.unwrap_or_else(cores),
        decode_threads: a.decode_threads.unwrap_or_else(|| (cores() / 4).max(1)),
        codec: Codec::parse(&a.codec).with_context(|| format!("unknown codec {}", a.codec))?,
        seed: a.seed,
        student_size: a.student_size,
        images_per_shard: a.images_per_shard,
        num_workers: a.num_workers,
        worker_index: a.worker_index,
        shards: a.shards.clone(),
        apply_exif_orientation: !a.ignore_exif,
        dump_inputs: a.debug_dump_inputs.clone(),
        progress: !a.no_progress && std::io::stderr().is_terminal(),
    };
    let s = run_extract(&cfg).with_context(|| format!("extracting {} into {}", a.data.display(), a.out.display()))?;
    let secs = s.elapsed.as_secs_f64();
    if a.json {
        let j = serde_json::json!({
            "store": a.out, "images": s.images, "shards_total": s.shards_total,
            "shards_written": s.shards_written, "shards_already_done": s.shards_already_done,
            "shards_busy": s.shards_busy, "shards_other_workers": s.shards_other_workers,
            "views_stored": s.views_stored, "skipped": s.skipped, "bytes_written": s.bytes_written,
            "seconds": secs, "views_per_second": s.views_stored as f64 / secs.max(1e-9),
            "store_complete": s.store_complete,
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        println!(
            "extract: {} views of {} images written in {:.1} s ({:.2} views/s), {:.1} MB",
            s.views_stored,
            s.images,
            secs,
            s.views_stored as f64 / secs.max(1e-9),
            s.bytes_written as f64 / 1e6
        );
        println!(
            "shards: {} written now, {} already complete, {} held by another process, {} for other workers; store {}",
            s.shards_written,
            s.shards_already_done,
            s.shards_busy,
            s.shards_other_workers,
            if s.store_complete { "complete" } else { "NOT complete yet" }
        );
        if !s.skipped.is_empty() {
            println!("skipped {} undecodable files (also listed in {}/done/*.json):", s.skipped.len(), a.out.display());
            for sk in &s.skipped {
                println!("  {}: {}", sk.path, sk.reason);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_train_cmd(a: TrainArgs) -> Result<ExitCode> {
    use trainer::loss::{LossConfig, LossKind, Weighting};
    use trainer::masking::Masking;
    use trainer::model::{ModelConfig, Preset};
    let store = shard_store::Store::open(&a.shards).with_context(|| format!("opening store {}", a.shards.display()))?;
    let m = store.manifest();
    let preset = Preset::parse(&a.model).with_context(|| format!("--model {}", a.model))?;
    // The student's input size is the one the store's views were made for
    // (224 px in the paper; 112 px pairs a /16 student with a 7x7 teacher grid).
    let px = m.views.settings.student_size;
    let preset_cfg = ModelConfig::preset(preset, i64::from(m.teacher.dim));
    let patch = preset_cfg.patch_size;
    let mut model = preset_cfg.with_image_size(i64::from(px)).with_context(|| {
        format!("{}: its views are for a {px} px student, not a multiple of the patch size {patch}", a.shards.display())
    })?;
    if let Some(d) = a.regressor_depth {
        model.regressor_depth = d;
    }
    if let Some(d) = a.drop_path {
        model.drop_path = d;
    }
    let patches = model.num_patches() as usize;
    let num_masked = match (a.num_masked, a.mask_ratio) {
        (Some(n), _) => n,
        (None, Some(r)) => (r * patches as f64).round() as usize,
        (None, None) => model.default_masked() as usize,
    };
    // Every stored image has all K views, so the images with a view in
    // 0..train_views are those not skipped (read from the shard reports,
    // not the whole index; the loader reads the index once more anyway).
    let images = tools::inspect::summary(&a.shards)?.images_stored;
    let steps_per_epoch = (images / a.batch.max(1) as u64).max(1);
    let steps = a.steps.unwrap_or(a.epochs.unwrap_or(300) * steps_per_epoch);
    drop(store);
    let cfg = trainer::TrainConfig {
        store: a.shards.clone(),
        data: a.data.clone(),
        model,
        loss: LossConfig {
            kind: match a.loss.as_str() {
                "mse" => LossKind::Mse,
                "smooth-l1" => LossKind::SmoothL1,
                _ => LossKind::Cosine,
            },
            weighting: if a.weighting == "paper" { Weighting::Paper } else { Weighting::Code },
            visible: !a.no_lv,
            masked: !a.no_lz,
        },
        masking: if a.masking == "random" { Masking::Random } else { Masking::Block },
        num_masked,
        batch: a.batch,
        steps,
        lr: a.lr.unwrap_or(1.5e-3 * a.batch as f64 / 2048.0),
        min_lr: a.min_lr,
        warmup_steps: a.warmup_steps.unwrap_or((steps as f64 * 10.0 / 300.0).round() as u64),
        adamw: trainer::optim::AdamWConfig { beta1: 0.9, beta2: a.beta2, eps: 1e-8, weight_decay: a.weight_decay },
        clip_grad: a.clip_grad,
        seed: a.seed,
        live_teacher: a.live_teacher.clone(),
        train_views: a.train_views,
    };
    let opts = trainer::RunOptions {
        out: a.out.clone(),
        device: a.device.clone(),
        threads: a.threads.unwrap_or_else(cores),
        checkpoint_every: a.checkpoint_every,
        resume: a.resume,
        progress: !a.no_progress && std::io::stderr().is_terminal(),
        bf16: !a.fp32,
    };
    let s = trainer::run_train(&cfg, &opts).with_context(|| format!("training into {}", a.out.display()))?;
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

fn run_eval_cmd(a: EvalArgs, knn: bool) -> Result<ExitCode> {
    use tools::eval::*;
    use trainer::model::{ModelConfig, Preset};
    let threads = a.threads.unwrap_or_else(cores);
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
            (Some(r), _) => Preset::parse(r),
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
    let j =
        serde_json::json!({"data": a.data, "images": set.files.len(), "classes": set.classes, "folds": a.folds, "k": a.k, "rows": rows});
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

fn main() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Eval(EvalCommand::Knn(a)) => run_eval_cmd(a, true),
        Command::Eval(EvalCommand::Linear(a)) => run_eval_cmd(a, false),
        Command::Eval(EvalCommand::Align { checkpoint, shards, data, views, batch, no_random, threads, json }) => {
            let threads = threads.unwrap_or_else(cores);
            tch::set_num_threads(threads as i32);
            let loaded = trainer::load_checkpoint(&checkpoint, tch::Device::Cpu)?;
            let store = shards.unwrap_or_else(|| loaded.config.store.clone());
            let data = data.unwrap_or_else(|| loaded.config.data.clone());
            let (v, z) = trainer::alignment(&loaded, &store, &data, views.clone(), batch, threads)?;
            let floor = if no_random {
                None
            } else {
                let init = trainer::initial_model(&loaded, tch::Device::Cpu);
                Some(trainer::alignment(&init, &store, &data, views.clone(), batch, threads)?)
            };
            if json {
                let mut j =
                    serde_json::json!({"checkpoint": checkpoint, "views": [views.start, views.end], "align_visible": v, "align_masked": z});
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
        Command::Plot { run, out } => {
            let (path, n) = tools::plot::plot(&run, out.as_deref())?;
            println!("plot: {} steps -> {}", n, path.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Export { checkpoint, out } => {
            let e = tools::export::export(&checkpoint, &out)?;
            println!("export: {} tensors -> {} (+ {}, {})", e.tensors, e.weights.display(), e.config.display(), e.check.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Extract(a) => run_extract_cmd(*a),
        Command::Train(a) => run_train_cmd(*a),
        Command::Inspect(InspectCommand::Summary { store, json }) => {
            let s = tools::inspect::summary(&store)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", tools::inspect::format_summary(&s));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect(InspectCommand::Show { store, image, view, json }) => {
            let s = tools::inspect::show(&store, &image, view)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", tools::inspect::format_show(&s));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect(InspectCommand::Render { store, image, view, data, out, json }) => {
            let (w, h) = tools::inspect::render(&store, data.as_deref(), &image, view, &out)?;
            if json {
                println!("{}", serde_json::json!({"out": out, "width": w, "height": h}));
            } else {
                println!("render: {} ({w}x{h})", out.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect(InspectCommand::Compare { a, b, json }) => {
            let c = tools::inspect::compare(&a, &b)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                println!(
                    "compare: {} views; token cosine mean {:.6} min {:.6}; max abs error {:.2e} (unit tokens); bytes/view {:.0} vs {:.0}",
                    c.views, c.mean_cosine, c.min_cosine, c.max_abs_error, c.bytes_per_view_a, c.bytes_per_view_b
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect(InspectCommand::Verify { store, json }) => {
            let r = tools::inspect::verify(&store, std::io::stderr().is_terminal() && !json)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                for p in &r.problems {
                    let shard = p.shard.map(|s| format!("shard {s}")).unwrap_or_else(|| "store".into());
                    let off = p.offset.map(|o| format!(" @ byte {o}")).unwrap_or_default();
                    println!("PROBLEM {shard}{off}: {}", p.what);
                }
                println!(
                    "verify: {} shards, {} views checked, {} problems{}",
                    r.shards_checked,
                    r.views_checked,
                    r.problems.len(),
                    if r.problems.is_empty() { ": store is intact" } else { "" }
                );
            }
            Ok(if r.problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}
