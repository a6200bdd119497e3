//! The training loop: run folder, configuration, checkpoints, resume,
//! metrics, progress, and the optional live teacher.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor, nn};

use crate::error::{Result, TrainError};
use crate::loader::{DataSource, LoaderConfig};
use crate::loss::{LossConfig, losses};
use crate::masking::{MaskGenerator, Masking};
use crate::model::{Cae2, ModelConfig, decays};
use crate::optim::{AdamW, AdamWConfig, cosine_lr};

/// The resolved configuration of a run, saved as `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Target store.
    pub store: PathBuf,
    /// Image folder the store was extracted from.
    pub data: PathBuf,
    /// Student.
    pub model: ModelConfig,
    /// Losses.
    pub loss: LossConfig,
    /// Masking strategy.
    pub masking: Masking,
    /// Masked patches per image.
    pub num_masked: usize,
    /// Batch size.
    pub batch: usize,
    /// Total optimisation steps.
    pub steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Warmup steps.
    pub warmup_steps: u64,
    /// AdamW.
    pub adamw: AdamWConfig,
    /// Gradient clipping (global L2 norm).
    pub clip_grad: f64,
    /// Seed of initialisation, loader and drop path.
    pub seed: u64,
    /// Live teacher ONNX file (targets computed in the loop instead of read).
    pub live_teacher: Option<PathBuf>,
    /// Train on stored views `0..N` only, holding the rest out for `eval align`.
    #[serde(default)]
    pub train_views: Option<u32>,
}

/// Runtime settings that do not change results.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Run folder.
    pub out: PathBuf,
    /// Device name (`auto`, `cpu`, `cuda`, `cuda:N`).
    pub device: String,
    /// libtorch and loader threads.
    pub threads: usize,
    /// Checkpoint every N steps (and at the end).
    pub checkpoint_every: u64,
    /// Continue from the run folder's last checkpoint.
    pub resume: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Mixed precision (bfloat16 autocast) on CUDA.
    pub bf16: bool,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metrics {
    /// Steps completed.
    pub step: u64,
    /// Epoch of the step.
    pub epoch: u64,
    /// Optimised loss.
    pub loss: f64,
    /// Mean `l_v` per token.
    pub loss_v: f64,
    /// Mean `l_z` per token.
    pub loss_z: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Images per second over the last step.
    pub images_per_sec: f64,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// First step of this invocation.
    pub start_step: u64,
    /// Steps completed in total.
    pub steps: u64,
    /// Metrics of every step of this invocation.
    pub metrics: Vec<Metrics>,
    /// Wall time of this invocation.
    pub elapsed: Duration,
    /// The device line.
    pub device: String,
    /// Last checkpoint written.
    pub checkpoint: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CheckpointState {
    step: u64,
    seed: u64,
}

/// Save model, optimiser and position as `checkpoints/step-NNNNNNNN/`, then
/// point `checkpoints/latest` at it; keeps the two newest.
fn save_checkpoint(out: &Path, vs: &nn::VarStore, opt: &AdamW, step: u64, seed: u64) -> Result<PathBuf> {
    let dir = out.join("checkpoints");
    let name = format!("step-{step:08}");
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(TrainError::io(&tmp, "create checkpoint folder"))?;
    vs.save(tmp.join("model.safetensors"))?;
    let state = opt.state();
    Tensor::write_safetensors(&state, tmp.join("optimizer.safetensors"))?;
    let st = serde_json::to_vec_pretty(&CheckpointState { step, seed }).unwrap_or_default();
    std::fs::write(tmp.join("state.json"), st).map_err(TrainError::io(&tmp, "write state"))?;
    for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        let p = tmp.join(f);
        std::fs::File::open(&p).and_then(|f| f.sync_all()).map_err(TrainError::io(&p, "fsync"))?;
    }
    let final_dir = dir.join(&name);
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(TrainError::io(&final_dir, "rename checkpoint"))?;
    shard_store::write_file_atomic(&dir.join("latest"), name.as_bytes())?;
    let mut old: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(TrainError::io(&dir, "list"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-")))
        .collect();
    old.sort();
    for p in old.iter().rev().skip(2) {
        let _ = std::fs::remove_dir_all(p);
    }
    Ok(final_dir)
}

/// The latest checkpoint folder of a run.
///
/// # Errors
/// When the run has none.
pub fn latest_checkpoint(out: &Path) -> Result<PathBuf> {
    let latest = out.join("checkpoints/latest");
    let name = std::fs::read_to_string(&latest)
        .map_err(|_| TrainError::Checkpoint { path: latest.clone(), what: "no checkpoint to resume from".into() })?;
    Ok(out.join("checkpoints").join(name.trim()))
}

fn tensors_of(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    Ok(Tensor::read_safetensors(path)?.into_iter().collect())
}

/// Train (or resume) a CAE v2 student.
///
/// # Errors
/// Incompatible store, bad settings, data errors, IO, libtorch errors.
pub fn run_train(cfg: &TrainConfig, opts: &RunOptions) -> Result<TrainSummary> {
    let t0 = Instant::now();
    if !cfg.loss.visible && !cfg.loss.masked {
        return Err(TrainError::Config("both losses are off: keep l_v or l_z".into()));
    }
    let (device, mut device_line) = crate::device::choose(&opts.device).map_err(TrainError::Config)?;
    let autocast = device.is_cuda() && opts.bf16;
    if autocast {
        if crate::device::use_bf16_autocast() {
            device_line.push_str(", bf16 autocast");
        } else {
            return Err(TrainError::Config("cannot switch CUDA autocast to bfloat16".into()));
        }
    } else if device.is_cuda() {
        device_line.push_str(", fp32");
    }
    tch::set_num_threads(opts.threads.max(1) as i32);
    let grid = cfg.model.grid() as usize;
    let source = Arc::new(DataSource::open(&cfg.store, &cfg.data, cfg.model.image_size as u32, cfg.train_views.map(|n| 0..n))?);
    let m = source.store().manifest().clone();
    if i64::from(m.teacher.dim) != cfg.model.target_dim {
        return Err(TrainError::Incompatible {
            store: cfg.store.clone(),
            what: format!("targets have {} dims, the model's head outputs {}", m.teacher.dim, cfg.model.target_dim),
        });
    }
    if source.steps_per_epoch(cfg.batch) == 0 {
        return Err(TrainError::Config(format!("the store has {} images, fewer than one batch of {}", source.num_images(), cfg.batch)));
    }
    if cfg.num_masked == 0 || cfg.num_masked >= grid * grid {
        return Err(TrainError::Config(format!("{} masked patches: must be between 1 and {}", cfg.num_masked, grid * grid - 1)));
    }

    // run folder and configuration
    std::fs::create_dir_all(&opts.out).map_err(TrainError::io(&opts.out, "create run folder"))?;
    let cfg_path = opts.out.join("config.json");
    let cfg_json = serde_json::to_vec_pretty(cfg).unwrap_or_default();
    if opts.resume {
        let old: TrainConfig = serde_json::from_slice(&std::fs::read(&cfg_path).map_err(TrainError::io(&cfg_path, "read config"))?)
            .map_err(|e| TrainError::Config(format!("{}: {e}", cfg_path.display())))?;
        if &old != cfg {
            return Err(TrainError::Config(format!(
                "--resume: the settings differ from {} (resume with the same arguments)",
                cfg_path.display()
            )));
        }
    } else if cfg_path.exists() {
        return Err(TrainError::Config(format!(
            "{} already holds a run: pass --resume to continue it, or another --out",
            opts.out.display()
        )));
    } else {
        shard_store::write_file_atomic(&cfg_path, &cfg_json)?;
    }

    let (mut vs, model) = Cae2::seeded(&cfg.model, cfg.seed, device);
    let mut opt = AdamW::new(cfg.adamw, vs.variables(), decays);
    let mut start = 0u64;
    if opts.resume {
        let ck = latest_checkpoint(&opts.out)?;
        vs.load(ck.join("model.safetensors")).map_err(|e| TrainError::Checkpoint { path: ck.clone(), what: e.to_string() })?;
        let state: CheckpointState =
            serde_json::from_slice(&std::fs::read(ck.join("state.json")).map_err(TrainError::io(&ck, "read state"))?)
                .map_err(|e| TrainError::Checkpoint { path: ck.clone(), what: e.to_string() })?;
        let t = tensors_of(&ck.join("optimizer.safetensors"))?.into_iter().map(|(k, v)| (k, v.to_device(device))).collect();
        opt.load_state(&t, state.step as i64).map_err(|what| TrainError::Checkpoint { path: ck.clone(), what })?;
        start = state.step;
    }

    // metrics: on resume keep only the steps the checkpoint covers
    let metrics_path = opts.out.join("metrics.jsonl");
    if opts.resume {
        let kept: String = std::fs::read_to_string(&metrics_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| serde_json::from_str::<Metrics>(l).is_ok_and(|m| m.step <= start))
            .map(|l| format!("{l}\n"))
            .collect();
        shard_store::write_file_atomic(&metrics_path, kept.as_bytes())?;
    } else {
        shard_store::write_file_atomic(&metrics_path, b"")?;
    }
    let mut metrics_file =
        std::fs::OpenOptions::new().append(true).open(&metrics_path).map_err(TrainError::io(&metrics_path, "open metrics"))?;

    let mut teacher = match &cfg.live_teacher {
        Some(p) => {
            let sha = target_extractor::sha256_file(p)?;
            if sha != m.teacher.onnx_sha256 {
                return Err(TrainError::Incompatible {
                    store: cfg.store.clone(),
                    what: format!("--live-teacher {} is not the store's teacher (sha256 {sha} vs {})", p.display(), m.teacher.onnx_sha256),
                });
            }
            let spec = target_extractor::TeacherSpec {
                path: p.clone(),
                name: Some(m.teacher.name.clone()),
                input_size: Some(m.teacher.input_size),
                mean: Some(m.teacher.mean),
                std: Some(m.teacher.std),
                patch_size: Some(m.teacher.patch_size),
                has_cls: Some(m.teacher.has_cls),
                output: Some(m.teacher.output.clone()),
            };
            Some(target_extractor::Teacher::load(&spec, opts.threads)?)
        }
        None => None,
    };

    let masks = MaskGenerator::new(grid, grid, cfg.num_masked, cfg.masking);
    let loader_cfg = LoaderConfig {
        batch: cfg.batch,
        seed: cfg.seed,
        threads: opts.threads,
        prefetch: 2,
        image_size: cfg.model.image_size as u32,
        grid,
        teacher_inputs: teacher.is_some(),
    };
    let rx = source.stream(loader_cfg, masks, start, cfg.steps);
    let bar = if opts.progress { ProgressBar::new(cfg.steps) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} train [{elapsed_precise}] {wide_bar} step {pos}/{len} ETA {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(start);
    bar.println(&device_line);

    let b = cfg.batch as i64;
    let s = cfg.model.image_size;
    let np = (grid * grid) as i64;
    let nm = cfg.num_masked as i64;
    let (tokens, dim) = (1 + np, i64::from(m.teacher.dim));
    let from = (m.teacher.grid[0] as usize, m.teacher.grid[1] as usize);
    let mut summary = TrainSummary {
        start_step: start,
        steps: start,
        metrics: Vec::new(),
        elapsed: Duration::ZERO,
        device: device_line,
        checkpoint: None,
    };
    let mut last = Instant::now();
    for step in start..cfg.steps {
        let batch = rx.recv().map_err(|_| TrainError::Data("the loader stopped unexpectedly".into()))??;
        let images = Tensor::from_slice(&batch.images).view([b, 3, s, s]).to_device(device);
        let targets = match teacher.as_mut() {
            Some(t) => {
                let out = t.forward(&batch.teacher_inputs, cfg.batch)?;
                let per = out.len() / cfg.batch;
                let mapped: Vec<f32> = if from == (grid, grid) {
                    out
                } else {
                    out.chunks(per).flat_map(|c| shard_store::resample_grid(c, dim as usize, true, from, (grid, grid))).collect()
                };
                Tensor::from_slice(&mapped)
            }
            None => Tensor::from_slice(&batch.targets),
        }
        .view([b, tokens, dim])
        .to_device(device);
        let visible = Tensor::from_slice(&batch.visible).view([b, np - nm]).to_device(device);
        let masked = Tensor::from_slice(&batch.masked).view([b, nm]).to_device(device);

        tch::manual_seed((cfg.seed as i64).wrapping_add(step as i64 + 1));
        opt.zero_grad();
        let out = tch::autocast(autocast, || model.forward(&images, &visible, &masked, true));
        let out = crate::model::Output { visible: out.visible.to_kind(Kind::Float), masked: out.masked.to_kind(Kind::Float) };
        let patches = targets.narrow(1, 1, np);
        let target_v =
            Tensor::cat(&[targets.narrow(1, 0, 1), patches.gather(1, &visible.unsqueeze(-1).expand([-1, -1, dim], false), false)], 1);
        let target_z = patches.gather(1, &masked.unsqueeze(-1).expand([-1, -1, dim], false), false);
        let l = losses(&out.visible, &target_v, &out.masked, &target_z, &cfg.loss);
        l.total.backward();
        let grad_norm = opt.clip_grad_norm(cfg.clip_grad);
        let lr = cosine_lr(step as i64, cfg.steps as i64, cfg.warmup_steps as i64, cfg.lr, cfg.min_lr);
        opt.step(lr);
        let loss = l.total.to_kind(Kind::Double).double_value(&[]);
        if !loss.is_finite() {
            return Err(TrainError::Data(format!("step {}: the loss is {loss}; lower --lr or check the targets", step + 1)));
        }
        let now = Instant::now();
        let met = Metrics {
            step: step + 1,
            epoch: batch.epoch,
            loss,
            loss_v: l.visible,
            loss_z: l.masked,
            lr,
            grad_norm,
            images_per_sec: cfg.batch as f64 / now.duration_since(last).as_secs_f64().max(1e-9),
        };
        last = now;
        let line = serde_json::to_string(&met).unwrap_or_default();
        writeln!(metrics_file, "{line}").map_err(TrainError::io(&metrics_path, "append metrics"))?;
        bar.set_message(format!("loss_v {:.4} loss_z {:.4} lr {:.2e} {:.1} img/s", met.loss_v, met.loss_z, lr, met.images_per_sec));
        bar.inc(1);
        summary.metrics.push(met);
        summary.steps = step + 1;
        if (step + 1) % opts.checkpoint_every.max(1) == 0 || step + 1 == cfg.steps {
            metrics_file.sync_data().map_err(TrainError::io(&metrics_path, "fsync metrics"))?;
            summary.checkpoint = Some(save_checkpoint(&opts.out, &vs, &opt, step + 1, cfg.seed)?);
        }
    }
    bar.finish_and_clear();
    summary.elapsed = t0.elapsed();
    Ok(summary)
}

/// A trained (or freshly initialised) student loaded for evaluation or export.
#[derive(Debug)]
pub struct LoadedModel {
    /// The run's configuration.
    pub config: TrainConfig,
    /// The parameters.
    pub vs: nn::VarStore,
    /// The model.
    pub model: Cae2,
}

/// Load the student of a checkpoint folder (`RUN/checkpoints/step-N`, or the
/// run folder itself for its latest checkpoint); the configuration is read
/// from `RUN/config.json`.
///
/// # Errors
/// Missing files or parameters that do not fit the configuration.
pub fn load_checkpoint(path: &Path, device: tch::Device) -> Result<LoadedModel> {
    let ck = if path.join("model.safetensors").exists() { path.to_owned() } else { latest_checkpoint(path)? };
    let run = ck
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| TrainError::Checkpoint { path: ck.clone(), what: "not inside a run folder".into() })?;
    let cfg_path = run.join("config.json");
    let config: TrainConfig = serde_json::from_slice(&std::fs::read(&cfg_path).map_err(TrainError::io(&cfg_path, "read config"))?)
        .map_err(|e| TrainError::Checkpoint { path: cfg_path.clone(), what: e.to_string() })?;
    let mut vs = nn::VarStore::new(device);
    let model = Cae2::new(&vs.root(), &config.model);
    vs.load(ck.join("model.safetensors")).map_err(|e| TrainError::Checkpoint { path: ck.clone(), what: e.to_string() })?;
    Ok(LoadedModel { config, vs, model })
}

/// The student of `loaded`'s run as it was before its first step: the same
/// configuration, freshly initialised from the run's seed (the floor that
/// alignment and k-NN numbers are compared with).
pub fn initial_model(loaded: &LoadedModel, device: tch::Device) -> LoadedModel {
    let (vs, model) = Cae2::seeded(&loaded.config.model, loaded.config.seed, device);
    LoadedModel { config: loaded.config.clone(), vs, model }
}

/// Mean cosine between a student's predictions and the (L2-normalised)
/// teacher targets on the stored views `views` (e.g. views held out with
/// `train_views`): `(visible incl. CLS, masked)`, with the run's masking.
///
/// # Errors
/// Store, data or model errors.
pub fn alignment(
    loaded: &LoadedModel,
    store: &Path,
    data: &Path,
    views: std::ops::Range<u32>,
    batch: usize,
    threads: usize,
) -> Result<(f64, f64)> {
    let cfg = &loaded.config;
    let grid = cfg.model.grid() as usize;
    let source = Arc::new(DataSource::open(store, data, cfg.model.image_size as u32, Some(views))?);
    let batch = batch.min(source.num_images()).max(1);
    let steps = source.steps_per_epoch(batch);
    let masks = MaskGenerator::new(grid, grid, cfg.num_masked, cfg.masking);
    let lc = LoaderConfig {
        batch,
        seed: cfg.seed ^ 0x000a_119e,
        threads,
        prefetch: 2,
        image_size: cfg.model.image_size as u32,
        grid,
        teacher_inputs: false,
    };
    let rx = source.stream(lc, masks, 0, steps);
    let dim = i64::from(source.store().manifest().teacher.dim);
    let (b, s, np, nm) = (batch as i64, cfg.model.image_size, (grid * grid) as i64, cfg.num_masked as i64);
    let (mut sv, mut sz, mut n) = (0f64, 0f64, 0f64);
    for batch_data in rx {
        let bd = batch_data?;
        let images = Tensor::from_slice(&bd.images).view([b, 3, s, s]);
        let targets = crate::loss::l2_normalize(&Tensor::from_slice(&bd.targets).view([b, 1 + np, dim]));
        let visible = Tensor::from_slice(&bd.visible).view([b, np - nm]);
        let masked = Tensor::from_slice(&bd.masked).view([b, nm]);
        let out = tch::no_grad(|| loaded.model.forward(&images, &visible, &masked, false));
        let patches = targets.narrow(1, 1, np);
        let tv = Tensor::cat(&[targets.narrow(1, 0, 1), patches.gather(1, &visible.unsqueeze(-1).expand([-1, -1, dim], false), false)], 1);
        let tz = patches.gather(1, &masked.unsqueeze(-1).expand([-1, -1, dim], false), false);
        sv += (&out.visible * tv).sum_dim_intlist(&[-1i64][..], false, Kind::Float).mean(Kind::Float).double_value(&[]);
        sz += (&out.masked * tz).sum_dim_intlist(&[-1i64][..], false, Kind::Float).mean(Kind::Float).double_value(&[]);
        n += 1.0;
    }
    Ok((sv / n.max(1.0), sz / n.max(1.0)))
}
