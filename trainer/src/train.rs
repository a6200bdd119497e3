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

use crate::dist::{Dist, Launch};
use crate::error::{Result, TrainError};
use crate::loader::{DataSource, LoaderConfig};
use crate::loss::{LossConfig, losses};
use crate::masking::{MaskGenerator, Masking};
use crate::model::{Cae2, ModelConfig, Pass, Preset, decays};
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
    /// Draw a new view of every image in every epoch (the authors' regime,
    /// K = infinity) and run `live_teacher` on it, instead of reading a
    /// stored view's targets.
    #[serde(default)]
    pub fresh_views: bool,
}

/// How long a run trains: optimisation steps, or epochs of one stored view
/// per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Optimisation steps.
    Steps(u64),
    /// Epochs (steps = epochs x full batches per epoch).
    Epochs(u64),
}

/// Epochs of the paper's pretraining (its default budget).
pub const PAPER_EPOCHS: u64 = 300;

impl TrainConfig {
    /// The paper's (and the released scripts') settings for a `preset`
    /// student trained from `store`: the student sized for the store's views
    /// and targets, AdamW (0.9, 0.999) with weight decay 0.05, peak learning
    /// rate 1.5e-3 x batch / 2048 with 10/300 of the steps of warmup and a
    /// cosine to 1e-5, gradient clipping at 3, both losses (cosine, the
    /// code's weighting), block-wise masking of the preset's patch count.
    /// `train_views` (`0..N`) restricts training to the first N stored views.
    ///
    /// # Errors
    /// An unreadable or unusable store, a student size that is not a
    /// multiple of the patch size, or a budget too large to count.
    pub fn paper(store: &Path, data: &Path, preset: Preset, batch: usize, budget: Budget, train_views: Option<u32>) -> Result<Self> {
        shard_store::check_local(store)?;
        let manifest = shard_store::Manifest::read(store)?;
        // the student's input size is the one the store's views were made for
        // (224 px in the paper; 112 px pairs a /16 student with a 7x7 teacher grid)
        let px = manifest.views.settings.student_size;
        let base = ModelConfig::preset(preset, i64::from(manifest.teacher.dim));
        let patch = base.patch_size;
        let model = base.with_image_size(i64::from(px)).ok_or_else(|| TrainError::Incompatible {
            store: store.to_owned(),
            what: format!("its views are for a {px} px student, not a multiple of the patch size {patch}"),
        })?;
        if !(1..=MAX_BATCH).contains(&batch) {
            return Err(TrainError::setting("--batch", batch, format!("must be between 1 and {MAX_BATCH}")));
        }
        let steps = match budget {
            Budget::Steps(s) => s,
            Budget::Epochs(e) => {
                // images with a view to train on, counted from the index
                // (checked against the shard reports), never from report counters
                let source = DataSource::open(store, data, px, train_views.map(|n| 0..n))?;
                e.checked_mul(source.steps_per_epoch(batch).max(1))
                    .ok_or_else(|| TrainError::setting("--epochs", e, "too many steps to count"))?
            }
        };
        Ok(Self {
            store: store.to_owned(),
            data: data.to_owned(),
            num_masked: model.default_masked() as usize,
            model,
            loss: LossConfig::default(),
            masking: Masking::Block,
            batch,
            steps,
            lr: 1.5e-3 * batch as f64 / 2048.0,
            min_lr: 1e-5,
            warmup_steps: (steps as f64 * 10.0 / 300.0).round() as u64,
            adamw: AdamWConfig::default(),
            clip_grad: 3.0,
            seed: 0,
            live_teacher: None,
            train_views,
            fresh_views: false,
        })
    }
}

/// Largest batch `train` accepts.
pub const MAX_BATCH: usize = 65_536;
/// Largest step count `train` accepts.
pub const MAX_STEPS: u64 = 1 << 40;
/// Largest `--threads`.
pub const MAX_THREADS: usize = 1024;

impl TrainConfig {
    /// Check every setting against its bounds before anything is read or
    /// written.
    ///
    /// # Errors
    /// [`TrainError::Setting`] naming the setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |flag, value: &dyn std::fmt::Display, expected: &str| Err(TrainError::setting(flag, value, expected));
        let finite_in = |x: f64, lo: f64, hi: f64| x.is_finite() && (lo..=hi).contains(&x);
        if !(1..=MAX_BATCH).contains(&self.batch) {
            return bad("--batch", &self.batch, &format!("must be between 1 and {MAX_BATCH}"));
        }
        if !(1..=MAX_STEPS).contains(&self.steps) {
            return bad("--steps", &self.steps, &format!("must be between 1 and {MAX_STEPS} (check --steps / --epochs)"));
        }
        if !(finite_in(self.lr, 0.0, 10.0) && self.lr > 0.0) {
            return bad("--lr", &self.lr, "must be positive and at most 10");
        }
        if !finite_in(self.min_lr, 0.0, 10.0) {
            return bad("--min-lr", &self.min_lr, "must be between 0 and 10");
        }
        if !finite_in(self.adamw.weight_decay, 0.0, 10.0) {
            return bad("--weight-decay", &self.adamw.weight_decay, "must be between 0 and 10");
        }
        if !(finite_in(self.adamw.beta2, 0.0, 1.0) && self.adamw.beta2 < 1.0) {
            return bad("--beta2", &self.adamw.beta2, "must be in [0, 1)");
        }
        if !(self.clip_grad.is_finite() && self.clip_grad > 0.0) {
            return bad("--clip-grad", &self.clip_grad, "must be positive");
        }
        if !(finite_in(self.model.drop_path, 0.0, 1.0) && self.model.drop_path < 1.0) {
            return bad("--drop-path", &self.model.drop_path, "must be in [0, 1)");
        }
        if !(1..=64).contains(&self.model.regressor_depth) {
            return bad("--regressor-depth", &self.model.regressor_depth, "must be between 1 and 64");
        }
        if self.train_views == Some(0) {
            return bad("--train-views", &0, "train on at least one stored view");
        }
        if self.fresh_views && self.live_teacher.is_none() {
            return bad("--fresh-views", &"", "fresh views have no stored targets: give the store's teacher with --live-teacher FILE.onnx");
        }
        if let (true, Some(n)) = (self.fresh_views, self.train_views) {
            return bad("--train-views", &n, "fresh views use no stored view: drop --train-views or --fresh-views");
        }
        if !self.loss.visible && !self.loss.masked {
            return bad("--no-lv --no-lz", &"", "both losses are off: keep l_v or l_z");
        }
        shard_store::check_local(&self.store)?;
        shard_store::check_local(&self.data)?;
        Ok(())
    }
}

/// Runtime settings that do not change results.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Run folder.
    pub out: PathBuf,
    /// Device name (`auto`, `cpu`, `cuda`, `cuda:N`).
    pub device: String,
    /// Threads of this process, split between libtorch and the loader (see
    /// [`thread_budget`]).
    pub threads: usize,
    /// Loader threads, overriding the split of `threads`.
    pub loader_threads: Option<usize>,
    /// Read the losses back from the device every N steps (one host sync
    /// per N steps; `metrics.jsonl` still gets a line per step).
    pub metrics_every: u64,
    /// The device's peak TFLOP/s at the run's precision, for MFU; `None`
    /// looks the GPU up in a table of known ones (see [`peak_tflops`]).
    pub peak_tflops: Option<f64>,
    /// Checkpoint every N steps (and at the end).
    pub checkpoint_every: u64,
    /// Continue from the run folder's last checkpoint.
    pub resume: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Mixed precision (bfloat16 autocast) on CUDA.
    pub bf16: bool,
    /// Data-parallel launch (see [`Launch::from_env`]); `None` trains in
    /// this process alone.
    pub launch: Option<Launch>,
    /// Timeout of the data-parallel rendezvous and of every collective.
    pub dist_timeout: Duration,
    /// Which library all-reduces gradients on CUDA.
    pub dist_backend: crate::dist::Backend,
}

/// Default of [`RunOptions::dist_timeout`].
pub const DEFAULT_DIST_TIMEOUT: Duration = Duration::from_secs(300);

/// Default of [`RunOptions::metrics_every`].
pub const DEFAULT_METRICS_EVERY: u64 = 10;

/// How `threads` are split: `(libtorch intra-op threads, loader threads)`.
///
/// On CUDA the GPU computes and libtorch's CPU pool has little to do (one
/// thread), so the loader gets the rest. On the CPU the model's compute is
/// libtorch's and takes every thread; the loader gets a quarter (at least
/// one). Its threads work only while they refill the two prefetched
/// batches, a few per cent of a CPU step, so the two rarely run at once.
/// `loader` overrides the loader's share.
pub fn thread_budget(threads: usize, cuda: bool, loader: Option<usize>) -> (usize, usize) {
    let threads = threads.max(1);
    match (cuda, loader) {
        (true, Some(l)) => (threads.saturating_sub(l).max(1), l.max(1)),
        (true, None) => (1, threads.saturating_sub(1).max(1)),
        (false, Some(l)) => (threads, l.max(1)),
        (false, None) => (threads, threads.div_ceil(4)),
    }
}

/// Dense peak TFLOP/s of the GPU named `model` (as the NVIDIA driver names
/// it) in bfloat16 (`bf16`) or fp32 without TF32 (libtorch's default for
/// matmuls), from NVIDIA's data sheets; `None` for other devices.
pub fn peak_tflops(model: &str, bf16: bool) -> Option<f64> {
    let m = model.to_ascii_uppercase();
    let (bf, fp) = if m.contains("H100") && m.contains("PCIE") {
        (756.0, 51.0)
    } else if m.contains("H100") && m.contains("NVL") {
        (835.0, 60.0)
    } else if m.contains("H100") || m.contains("H200") || m.contains("GH200") {
        (989.4, 66.9)
    } else if m.contains("A100") {
        (312.0, 19.5)
    } else {
        return None;
    };
    Some(if bf16 { bf } else { fp })
}

/// The NVIDIA GPU model of this machine, from the driver's
/// `/proc/driver/nvidia/gpus/*/information`; `None` without one, or when
/// the GPUs differ.
fn gpu_model() -> Option<String> {
    let mut models = std::fs::read_dir("/proc/driver/nvidia/gpus").ok()?.filter_map(|e| {
        let text = std::fs::read_to_string(e.ok()?.path().join("information")).ok()?;
        text.lines().find_map(|l| l.strip_prefix("Model:").map(|m| m.trim().to_string()))
    });
    let first = models.next()?;
    models.all(|m| m == first).then_some(first)
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
    /// Images per second (of all ranks together) over the steps whose
    /// losses were read back together (`--metrics-every`).
    pub images_per_sec: f64,
    /// Model TFLOP/s over the same steps, all ranks together
    /// ([`ModelConfig::train_flops_per_image`]).
    #[serde(default)]
    pub tflops: f64,
    /// Model FLOPs utilisation: `tflops` over the devices' peak, when the
    /// peak is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
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
    let st = serde_json::to_vec_pretty(&CheckpointState { step, seed })
        .map_err(|e| TrainError::Checkpoint { path: tmp.clone(), what: format!("cannot serialise the state: {e}") })?;
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

/// The device and its description, with bf16 autocast on CUDA when asked.
fn choose_device(opts: &RunOptions, local_rank: usize) -> Result<(tch::Device, String, bool)> {
    let (mut device, mut line) =
        crate::device::choose(&opts.device).map_err(|what| TrainError::Device { device: opts.device.clone(), what })?;
    if local_rank > 0 && matches!(opts.device.as_str(), "auto" | "cuda") && device.is_cuda() {
        // one GPU per rank of the node, as torchrun users expect
        let n = tch::Cuda::device_count().max(1) as usize;
        device = tch::Device::Cuda(local_rank % n);
        line = format!("training on CUDA device {} (LOCAL_RANK {local_rank})", local_rank % n);
    }
    let autocast = device.is_cuda() && opts.bf16;
    if autocast {
        if !crate::device::use_bf16_autocast() {
            return Err(TrainError::Device { device: opts.device.clone(), what: "cannot switch CUDA autocast to bfloat16".into() });
        }
        line.push_str(", bf16 autocast");
    } else if device.is_cuda() {
        line.push_str(", fp32");
    }
    Ok((device, line, autocast))
}

/// Create or check the run folder's `config.json`. Returns whether the run
/// resumes from a checkpoint. A run killed before its first checkpoint holds
/// no progress: both a plain rerun and `--resume` start it over.
fn prepare_run_folder(cfg: &TrainConfig, opts: &RunOptions) -> Result<bool> {
    std::fs::create_dir_all(&opts.out).map_err(TrainError::io(&opts.out, "create run folder"))?;
    let cfg_path = opts.out.join("config.json");
    let has_checkpoint = opts.out.join("checkpoints/latest").exists();
    if opts.resume && has_checkpoint {
        let old: TrainConfig = serde_json::from_slice(&std::fs::read(&cfg_path).map_err(TrainError::io(&cfg_path, "read config"))?)
            .map_err(|source| TrainError::Json { path: cfg_path.clone(), source })?;
        if &old != cfg {
            return Err(TrainError::RunFolder {
                path: cfg_path,
                what: "--resume: the settings differ from this run's (resume with the same arguments)".into(),
            });
        }
        return Ok(true);
    }
    if has_checkpoint {
        return Err(TrainError::RunFolder {
            path: opts.out.clone(),
            what: "already holds a run with checkpoints: pass --resume to continue it, or another --out".into(),
        });
    }
    let json = serde_json::to_vec_pretty(cfg).map_err(|source| TrainError::Json { path: cfg_path.clone(), source })?;
    shard_store::write_file_atomic(&cfg_path, &json)?;
    Ok(false)
}

/// Load the latest checkpoint's model and optimiser; returns its step.
fn restore_checkpoint(out: &Path, vs: &mut nn::VarStore, opt: &mut AdamW, device: tch::Device) -> Result<u64> {
    let ck = latest_checkpoint(out)?;
    vs.load(ck.join("model.safetensors")).map_err(|e| TrainError::Checkpoint { path: ck.clone(), what: e.to_string() })?;
    let state: CheckpointState = serde_json::from_slice(&std::fs::read(ck.join("state.json")).map_err(TrainError::io(&ck, "read state"))?)
        .map_err(|e| TrainError::Checkpoint { path: ck.clone(), what: e.to_string() })?;
    let t = tensors_of(&ck.join("optimizer.safetensors"))?.into_iter().map(|(k, v)| (k, v.to_device(device))).collect();
    opt.load_state(&t, state.step as i64).map_err(|what| TrainError::Checkpoint { path: ck.clone(), what })?;
    Ok(state.step)
}

/// `metrics.jsonl`, opened for appending: emptied for a new run; on resume,
/// only the steps the checkpoint covers are kept.
fn open_metrics(out: &Path, resume: bool, start: u64) -> Result<(PathBuf, std::fs::File)> {
    let path = out.join("metrics.jsonl");
    if resume {
        let kept: String = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter(|l| serde_json::from_str::<Metrics>(l).is_ok_and(|m| m.step <= start))
            .map(|l| format!("{l}\n"))
            .collect();
        shard_store::write_file_atomic(&path, kept.as_bytes())?;
    } else {
        shard_store::write_file_atomic(&path, b"")?;
    }
    let file = std::fs::OpenOptions::new().append(true).open(&path).map_err(TrainError::io(&path, "open metrics"))?;
    Ok((path, file))
}

/// The store's own teacher for `--live-teacher` (checked by its SHA-256).
/// With `--fresh-views` the store's targets must also be what this teacher
/// computes on the CPU for a view of the store's settings, so that fresh
/// and stored targets come from one distribution.
fn live_teacher(cfg: &TrainConfig, m: &shard_store::Manifest, threads: usize) -> Result<Option<teacher::Teacher>> {
    let Some(p) = &cfg.live_teacher else { return Ok(None) };
    let bad = |what: String| TrainError::Incompatible { store: cfg.store.clone(), what };
    let sha = teacher::sha256_file(p)?;
    if sha != m.teacher.onnx_sha256 {
        return Err(bad(format!("--live-teacher {} is not the store's teacher (sha256 {sha} vs {})", p.display(), m.teacher.onnx_sha256)));
    }
    if cfg.fresh_views && m.teacher.precision != "fp32" {
        return Err(bad(format!(
            "--fresh-views: its targets came from the teacher in {}, the live teacher runs in fp32 on the CPU, so fresh targets would differ from stored ones",
            m.teacher.precision
        )));
    }
    if cfg.fresh_views && m.teacher.input_size != m.views.settings.teacher_size {
        return Err(bad(format!(
            "--fresh-views: its views were rendered at {} px for the teacher, the teacher takes {} px",
            m.views.settings.teacher_size, m.teacher.input_size
        )));
    }
    let spec = teacher::TeacherSpec {
        path: p.clone(),
        name: Some(m.teacher.name.clone()),
        input_size: Some(m.teacher.input_size),
        mean: Some(m.teacher.mean),
        std: Some(m.teacher.std),
        patch_size: Some(m.teacher.patch_size),
        has_cls: Some(m.teacher.has_cls),
        output: Some(m.teacher.output.clone()),
        // on the CPU, as the store's targets were checked against
        device: teacher::TeacherDevice::Cpu,
    };
    Ok(Some(teacher::Teacher::load(&spec, threads)?))
}

/// Everything one optimisation step needs besides the batch.
struct Stepper<'a> {
    cfg: &'a TrainConfig,
    model: &'a Cae2,
    dist: &'a Dist,
    device: tch::Device,
    autocast: bool,
    /// This process's rows of every global batch.
    rows: std::ops::Range<usize>,
    /// Patches per side of the student.
    grid: usize,
    /// The teacher's grid, when targets must be mapped to the student's.
    teacher_grid: (usize, usize),
    dim: i64,
    /// Reconstruction of a `pca` store's targets on the device.
    target_map: Option<crate::loader::TargetMap>,
}

impl Stepper<'_> {
    /// Samples this process trains per step.
    fn local_batch(&self) -> usize {
        self.rows.len()
    }

    /// The batch on the device: images, visible and masked positions, and
    /// the targets as `[B, 1 + grid^2, D]` (read from the store, or computed
    /// by the live teacher). On CUDA the copies go through pinned host memory
    /// and do not block, so the next batch is queued while the GPU still
    /// works on this one.
    fn upload(&self, batch: crate::loader::Batch, teacher: Option<&mut teacher::Teacher>) -> Result<DeviceBatch> {
        let (b, s) = (self.local_batch() as i64, self.cfg.model.image_size);
        let np = (self.grid * self.grid) as i64;
        let nm = self.cfg.num_masked as i64;
        let tokens = 1 + np;
        let mapped: Vec<f32>;
        let stored = teacher.is_none();
        let targets: &[f32] = match teacher {
            Some(t) => {
                let out = t.forward(&batch.teacher_inputs, b as usize)?;
                let per = out.len() / b as usize;
                let student = (self.grid, self.grid);
                mapped = if self.teacher_grid == student {
                    out
                } else {
                    out.chunks(per)
                        .flat_map(|c| shard_store::resample_grid(c, self.dim as usize, true, self.teacher_grid, student))
                        .collect()
                };
                &mapped
            }
            None => &batch.targets,
        };
        let device = self.device;
        Ok(DeviceBatch {
            epoch: batch.epoch,
            images: upload(&batch.images, &[b, 3, s, s], device),
            visible: upload(&batch.visible, &[b, np - nm], device),
            masked: upload(&batch.masked, &[b, nm], device),
            targets: match (&self.target_map, stored) {
                (Some(map), true) => map.apply(&upload(targets, &[b, tokens, self.dim], device)),
                _ => upload(targets, &[b, tokens, self.dim], device),
            },
        })
    }

    /// Forward, losses, backward, the gradients' all-reduce, clipping and
    /// the AdamW update of `step`, without reading anything back: the
    /// losses and the gradient norm stay on the device until the next
    /// [`flush`].
    fn step(&self, step: u64, batch: &DeviceBatch, opt: &mut AdamW) -> Result<Pending> {
        let cfg = self.cfg;
        let dim = self.dim;
        let np = (self.grid * self.grid) as i64;
        let DeviceBatch { images, visible, masked, targets, .. } = batch;

        tch::manual_seed((cfg.seed as i64).wrapping_add(step as i64 + 1));
        opt.zero_grad();
        let pass = Pass::Train { global: cfg.batch as i64, offset: self.rows.start as i64 };
        let out = tch::autocast(self.autocast, || self.model.forward(images, visible, masked, pass));
        let out = crate::model::Output { visible: out.visible.to_kind(Kind::Float), masked: out.masked.to_kind(Kind::Float) };
        let patches = targets.narrow(1, 1, np);
        let target_v =
            Tensor::cat(&[targets.narrow(1, 0, 1), patches.gather(1, &visible.unsqueeze(-1).expand([-1, -1, dim], false), false)], 1);
        let target_z = patches.gather(1, &masked.unsqueeze(-1).expand([-1, -1, dim], false), false);
        let l = losses(&out.visible, &target_v, &out.masked, &target_z, &cfg.loss);
        l.total.backward();
        // every rank's slice has the same number of tokens, so the mean of
        // the ranks' mean gradients is the global batch's
        self.dist.average_gradients(&opt.grads())?;
        let grad_norm = opt.clip_grad_norm(cfg.clip_grad)?.unwrap_or_else(|| Tensor::zeros([], (Kind::Float, self.device)));
        let lr = cosine_lr(step as i64, cfg.steps as i64, cfg.warmup_steps as i64, cfg.lr, cfg.min_lr);
        opt.step(lr)?;
        let values = Tensor::stack(&[l.total.detach().to_kind(Kind::Float), l.visible, l.masked, grad_norm], 0);
        Ok(Pending { step: step + 1, epoch: batch.epoch, lr, values })
    }
}

/// `data` as a tensor of `shape` on `device`. On CUDA it is copied once,
/// straight into pinned (page-locked) host memory, and sent with a
/// non-blocking transfer, so the host goes on while the GPU works; elsewhere
/// it is one copy into a new tensor.
///
/// # Panics
/// If `data` does not hold `shape`'s number of values (the loader builds
/// both from the same sizes).
fn upload<T: tch::kind::Element>(data: &[T], shape: &[i64], device: tch::Device) -> Tensor {
    assert_eq!(data.len() as i64, shape.iter().product::<i64>(), "batch buffer does not match its shape");
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    // SAFETY: `borrowed` views `data` (contiguous, `shape`'s size, checked
    // above) without owning it; it is read only by the host-to-host copy
    // below, which completes before `copy_` returns, and dropped right after,
    // while `data` is still borrowed.
    let borrowed = unsafe { Tensor::from_blob(data.as_ptr().cast(), shape, &strides, T::KIND, tch::Device::Cpu) };
    let mut host = Tensor::empty(shape, (T::KIND, tch::Device::Cpu));
    if device.is_cuda() {
        host = host.pin_memory(device);
    }
    host.copy_(&borrowed);
    drop(borrowed);
    if device.is_cuda() { host.to_device_(device, T::KIND, true, false) } else { host }
}

/// A batch on the training device.
struct DeviceBatch {
    epoch: u64,
    images: Tensor,
    visible: Tensor,
    masked: Tensor,
    targets: Tensor,
}

/// A step whose losses are still on the device.
struct Pending {
    step: u64,
    epoch: u64,
    lr: f64,
    /// `[loss, l_v, l_z, grad_norm]` of this rank (the norm is global).
    values: Tensor,
}

/// Read the pending steps' values back (one host sync), average the losses
/// over the ranks (one collective), and turn them into metrics; speed and
/// FLOPs are over the `elapsed` time the steps took. The first step whose
/// loss is not finite is an error.
fn flush(
    pending: &mut Vec<Pending>,
    dist: &Dist,
    batch: usize,
    flops_per_step: f64,
    peak: Option<f64>,
    elapsed: Duration,
) -> Result<Vec<Metrics>> {
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<Tensor> = pending.iter().map(|p| p.values.shallow_clone()).collect();
    let host = Tensor::stack(&rows, 0).to_device(tch::Device::Cpu).to_kind(Kind::Double);
    let values: Vec<f64> = Vec::<f64>::try_from(host.flatten(0, -1))?;
    // the ranks' mean (one process: its own values, divided by 1 exactly)
    let local: Vec<f64> = values.chunks_exact(4).flat_map(|v| [v[0], v[1], v[2]]).collect();
    let world = dist.world as f64;
    let losses: Vec<f64> = dist.sum(&local)?.into_iter().map(|x| x / world).collect();
    let n = pending.len() as f64;
    let secs = elapsed.as_secs_f64().max(1e-9);
    let images_per_sec = batch as f64 * n / secs;
    let tflops = flops_per_step * n / secs / 1e12;
    let mut out = Vec::with_capacity(pending.len());
    for (i, p) in pending.drain(..).enumerate() {
        let (loss, loss_v, loss_z) = (losses[3 * i], losses[3 * i + 1], losses[3 * i + 2]);
        if !loss.is_finite() {
            return Err(TrainError::Diverged { step: p.step, loss });
        }
        out.push(Metrics {
            step: p.step,
            epoch: p.epoch,
            loss,
            loss_v,
            loss_z,
            lr: p.lr,
            grad_norm: values[4 * i + 3],
            images_per_sec,
            tflops,
            mfu: peak.map(|pk| tflops / (pk * dist.world as f64)),
        });
    }
    Ok(out)
}

/// A digest of everything that must be equal on every data-parallel rank:
/// the configuration (but not the store's and images' paths, which may
/// differ between nodes), the store's identity, the precision, the steps at
/// which the ranks read their losses back together (`--metrics-every`, and
/// every checkpoint step) and the build.
fn settings_digest(cfg: &TrainConfig, store_id: &str, opts: &RunOptions) -> [u8; 32] {
    use sha2::Digest;
    let mut c = cfg.clone();
    c.store = PathBuf::new();
    c.data = PathBuf::new();
    c.live_teacher = c.live_teacher.map(|_| PathBuf::new());
    let mut h = sha2::Sha256::new();
    h.update(serde_json::to_vec(&c).unwrap_or_default());
    h.update(store_id.as_bytes());
    h.update([u8::from(opts.bf16)]);
    h.update(opts.metrics_every.max(1).to_le_bytes());
    h.update(opts.checkpoint_every.max(1).to_le_bytes());
    h.update(format!("{:?}", opts.dist_backend).as_bytes());
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.finalize().into()
}

/// What every rank opens before training: the device and the data.
struct Setup {
    device: tch::Device,
    device_line: String,
    autocast: bool,
    source: Arc<DataSource>,
    manifest: shard_store::Manifest,
}

/// Check the settings and open the device and the store (on every rank).
fn open_setup(cfg: &TrainConfig, opts: &RunOptions, dist: &Dist) -> Result<Setup> {
    cfg.validate()?;
    if !(1..=MAX_THREADS).contains(&opts.threads) {
        return Err(TrainError::setting("--threads", opts.threads, format!("must be between 1 and {MAX_THREADS}")));
    }
    if let Some(l) = opts.loader_threads.filter(|l| !(1..=MAX_THREADS).contains(l)) {
        return Err(TrainError::setting("--loader-threads", l, format!("must be between 1 and {MAX_THREADS}")));
    }
    if let Some(p) = opts.peak_tflops.filter(|p| !(p.is_finite() && *p > 0.0)) {
        return Err(TrainError::setting("--peak-tflops", p, "must be a positive number of TFLOP/s"));
    }
    if !cfg.batch.is_multiple_of(dist.world) {
        return Err(TrainError::setting(
            "--batch",
            cfg.batch,
            format!("must be a multiple of the {} ranks (each trains an equal slice of the global batch)", dist.world),
        ));
    }
    shard_store::check_local(&opts.out)?;
    let (device, device_line, autocast) = choose_device(opts, dist.local_rank)?;
    let source = open_source(cfg)?;
    let manifest = source.store().manifest().clone();
    Ok(Setup { device, device_line, autocast, source, manifest })
}

/// Open the run's store and images, and check that they can train `cfg`'s
/// student with its batch and masking.
fn open_source(cfg: &TrainConfig) -> Result<Arc<DataSource>> {
    let grid = cfg.model.grid() as usize;
    let mut source = DataSource::open(&cfg.store, &cfg.data, cfg.model.image_size as u32, cfg.train_views.map(|n| 0..n))?;
    if cfg.fresh_views {
        source = source.with_fresh_views()?;
        let last_epoch = cfg.steps.saturating_sub(1) / source.steps_per_epoch(cfg.batch).max(1);
        if crate::loader::fresh_view(last_epoch).is_none() {
            return Err(TrainError::setting("--steps", cfg.steps, "too many epochs for fresh views (at most 2^31)"));
        }
    }
    let source = Arc::new(source);
    let dim = source.store().manifest().teacher.dim;
    if i64::from(dim) != cfg.model.target_dim {
        return Err(TrainError::Incompatible {
            store: cfg.store.clone(),
            what: format!("targets have {dim} dims, the model's head outputs {}", cfg.model.target_dim),
        });
    }
    if source.steps_per_epoch(cfg.batch) == 0 {
        return Err(TrainError::setting("--batch", cfg.batch, format!("more than the store's {} images", source.num_images())));
    }
    if cfg.num_masked == 0 || cfg.num_masked >= grid * grid {
        return Err(TrainError::setting("--num-masked", cfg.num_masked, format!("must be between 1 and {}", grid * grid - 1)));
    }
    Ok(source)
}

/// The loader settings of the run `cfg`: this process's `rows` of every
/// global batch, built by `threads` threads, two batches ahead.
fn loader_config(cfg: &TrainConfig, rows: std::ops::Range<usize>, threads: usize, teacher_inputs: bool) -> LoaderConfig {
    LoaderConfig {
        batch: cfg.batch,
        rows,
        seed: cfg.seed,
        threads,
        prefetch: 2,
        image_size: cfg.model.image_size as u32,
        grid: cfg.model.grid() as usize,
        teacher_inputs,
    }
}

/// The parameters in name order (the same on every rank).
fn parameters_by_name(vs: &nn::VarStore) -> Vec<Tensor> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named.into_iter().map(|(_, t)| t).collect()
}

/// Train (or resume) a CAE v2 student: in this process alone, or as one
/// rank of a data-parallel group when `opts.launch` says so (every rank
/// builds its slice of each global batch; rank 0 alone writes the run
/// folder).
///
/// # Errors
/// Incompatible store, bad settings, data errors, IO, libtorch errors, a
/// failed rendezvous or collective, another rank's failure.
pub fn run_train(cfg: &TrainConfig, opts: &RunOptions) -> Result<TrainSummary> {
    let t0 = Instant::now();
    let mut dist = match &opts.launch {
        Some(l) => Dist::connect(l, opts.dist_timeout)?,
        None => Dist::single(),
    };
    let Setup { device, mut device_line, autocast, source, manifest: m } = dist.agree("set-up", open_setup(cfg, opts, &dist))?;
    dist.check_same("the settings", &settings_digest(cfg, &m.store_id, opts))?;
    let backend = dist.set_backend(device, opts.dist_backend, opts.dist_timeout)?;
    let (torch_threads, loader_threads) = thread_budget(opts.threads, device.is_cuda(), opts.loader_threads);
    tch::set_num_threads(torch_threads as i32);
    device_line.push_str(&format!(", {torch_threads} libtorch + {loader_threads} loader threads"));
    let peak = opts.peak_tflops.or_else(|| if device.is_cuda() { gpu_model().and_then(|m| peak_tflops(&m, autocast)) } else { None });
    let grid = cfg.model.grid() as usize;
    let local = cfg.batch / dist.world;
    let rows = dist.rank * local..(dist.rank + 1) * local;
    if dist.world > 1 {
        device_line
            .push_str(&format!(", data-parallel: {} ranks ({}, {backend}), {local} images per rank and step", dist.world, dist.launcher));
    }

    let (mut vs, model) = Cae2::seeded(&cfg.model, cfg.seed, device);
    let mut opt = AdamW::new(cfg.adamw, vs.variables(), decays);
    // rank 0 owns the run folder: it checks it, restores the checkpoint, and
    // hands the step, the weights and the moments to the others
    let resumed = if dist.is_main() {
        prepare_run_folder(cfg, opts)
            .and_then(|resume| if resume { restore_checkpoint(&opts.out, &mut vs, &mut opt, device) } else { Ok(0) })
    } else {
        Ok(0)
    };
    let start = dist.agree("preparing the run folder", resumed)?;
    let start = dist.sum(&[start as f64])?[0] as u64;
    if dist.world > 1 {
        let mut state = parameters_by_name(&vs);
        state.extend(opt.state().into_iter().map(|(_, t)| t));
        dist.copy_from_main(&state)?;
        opt.set_steps(start as i64);
    }
    let mut metrics_out = if dist.is_main() { Some(open_metrics(&opts.out, start > 0, start)?) } else { None };
    let mut teacher = live_teacher(cfg, &m, opts.threads)?;

    let masks = MaskGenerator::new(grid, grid, cfg.num_masked, cfg.masking);
    let rx = source.stream(loader_config(cfg, rows.clone(), loader_threads, teacher.is_some()), masks, start, cfg.steps);
    let bar = if opts.progress && dist.is_main() { ProgressBar::new(cfg.steps) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} train [{elapsed_precise}] {wide_bar} step {pos}/{len} ETA {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(start);
    bar.println(&device_line);

    let stepper = Stepper {
        cfg,
        model: &model,
        dist: &dist,
        device,
        autocast,
        rows,
        grid,
        teacher_grid: (m.teacher.grid[0] as usize, m.teacher.grid[1] as usize),
        dim: i64::from(m.teacher.dim),
        target_map: crate::loader::TargetMap::of(source.store(), device),
    };
    let mut summary = TrainSummary {
        start_step: start,
        steps: start,
        metrics: Vec::new(),
        elapsed: Duration::ZERO,
        device: device_line,
        checkpoint: None,
    };
    let flops_per_step = cfg.model.train_flops_per_image(cfg.num_masked as i64) * cfg.batch as f64;
    let metrics_every = opts.metrics_every.max(1);
    let next = |teacher: Option<&mut teacher::Teacher>| -> Result<DeviceBatch> {
        let batch = rx.recv().map_err(|_| TrainError::Loader("stopped unexpectedly".into()))??;
        stepper.upload(batch, teacher)
    };
    let mut upcoming = if start < cfg.steps { Some(next(teacher.as_mut())?) } else { None };
    let mut pending = Vec::new();
    let mut window = Instant::now();
    for step in start..cfg.steps {
        let Some(batch) = upcoming.take() else { break };
        pending.push(stepper.step(step, &batch, &mut opt)?);
        drop(batch);
        if step + 1 < cfg.steps {
            upcoming = Some(next(teacher.as_mut())?);
        }
        let checkpoint = (step + 1) % opts.checkpoint_every.max(1) == 0 || step + 1 == cfg.steps;
        bar.inc(1);
        if !(checkpoint || pending.len() as u64 >= metrics_every) {
            continue;
        }
        let now = Instant::now();
        let done = flush(&mut pending, &dist, cfg.batch, flops_per_step, peak, now.duration_since(window))?;
        window = now;
        if let Some((path, file)) = metrics_out.as_mut() {
            for met in &done {
                let line = serde_json::to_string(met).map_err(|source| TrainError::Json { path: path.clone(), source })?;
                writeln!(file, "{line}").map_err(TrainError::io(&*path, "append metrics"))?;
            }
            if checkpoint {
                file.sync_data().map_err(TrainError::io(&*path, "fsync metrics"))?;
                summary.checkpoint = Some(save_checkpoint(&opts.out, &vs, &opt, step + 1, cfg.seed)?);
            }
        }
        if let Some(met) = done.last() {
            let mfu = met.mfu.map(|u| format!(" MFU {:.1}%", 100.0 * u)).unwrap_or_default();
            bar.set_message(format!(
                "loss_v {:.4} loss_z {:.4} lr {:.2e} {:.1} img/s{mfu}",
                met.loss_v, met.loss_z, met.lr, met.images_per_sec
            ));
        }
        summary.metrics.extend(done);
        summary.steps = step + 1;
    }
    bar.finish_and_clear();
    summary.elapsed = t0.elapsed();
    Ok(summary)
}

/// What [`measure_loader`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoaderSpeed {
    /// Images timed (after one warm-up batch).
    pub images: u64,
    /// Seconds they took.
    pub seconds: f64,
    /// Loader threads.
    pub threads: usize,
}

impl LoaderSpeed {
    /// Images per second.
    pub fn images_per_sec(&self) -> f64 {
        self.images as f64 / self.seconds.max(1e-9)
    }
}

/// Stream `steps` batches of the run `cfg` describes through the loader
/// alone (decode, view rebuild, targets, masks), with `threads` loader
/// threads and no model: the most images per second this loader can feed a
/// device, for telling a loader-bound run from a device-bound one.
///
/// # Errors
/// Bad settings, an incompatible store, data errors.
pub fn measure_loader(cfg: &TrainConfig, threads: usize, steps: u64) -> Result<LoaderSpeed> {
    cfg.validate()?;
    if !(1..=MAX_THREADS).contains(&threads) {
        return Err(TrainError::setting("--threads", threads, format!("must be between 1 and {MAX_THREADS}")));
    }
    let source = open_source(cfg)?;
    let grid = cfg.model.grid() as usize;
    let masks = MaskGenerator::new(grid, grid, cfg.num_masked, cfg.masking);
    let rx = source.stream(loader_config(cfg, 0..cfg.batch, threads, false), masks, 0, steps.max(2));
    let mut first = true;
    let (mut images, mut t0) = (0u64, Instant::now());
    for batch in rx {
        let batch = batch?;
        if first {
            first = false;
            t0 = Instant::now();
        } else {
            images += batch.samples.len() as u64;
        }
    }
    Ok(LoaderSpeed { images, seconds: t0.elapsed().as_secs_f64(), threads })
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
    let lc = LoaderConfig { batch, seed: cfg.seed ^ 0x000a_119e, ..loader_config(cfg, 0..batch, threads, false) };
    let map = crate::loader::TargetMap::of(source.store(), tch::Device::Cpu);
    let rx = source.stream(lc, masks, 0, steps);
    let dim = i64::from(source.store().manifest().teacher.dim);
    let (b, s, np, nm) = (batch as i64, cfg.model.image_size, (grid * grid) as i64, cfg.num_masked as i64);
    let (mut sv, mut sz, mut n) = (0f64, 0f64, 0f64);
    for batch_data in rx {
        let bd = batch_data?;
        let images = Tensor::from_slice(&bd.images).view([b, 3, s, s]);
        let stored = Tensor::from_slice(&bd.targets).view([b, 1 + np, dim]);
        let targets = crate::loss::l2_normalize(&map.as_ref().map_or(stored.shallow_clone(), |m| m.apply(&stored)));
        let visible = Tensor::from_slice(&bd.visible).view([b, np - nm]);
        let masked = Tensor::from_slice(&bd.masked).view([b, nm]);
        let out = tch::no_grad(|| loaded.model.forward(&images, &visible, &masked, Pass::Eval));
        let patches = targets.narrow(1, 1, np);
        let tv = Tensor::cat(&[targets.narrow(1, 0, 1), patches.gather(1, &visible.unsqueeze(-1).expand([-1, -1, dim], false), false)], 1);
        let tz = patches.gather(1, &masked.unsqueeze(-1).expand([-1, -1, dim], false), false);
        sv += (&out.visible * tv).sum_dim_intlist(&[-1i64][..], false, Kind::Float).mean(Kind::Float).double_value(&[]);
        sz += (&out.masked * tz).sum_dim_intlist(&[-1i64][..], false, Kind::Float).mean(Kind::Float).double_value(&[]);
        n += 1.0;
    }
    Ok((sv / n.max(1.0), sz / n.max(1.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_budget_splits_without_oversubscribing_the_gpu_host() {
        assert_eq!(thread_budget(16, true, None), (1, 15), "CUDA: the loader gets all but one");
        assert_eq!(thread_budget(16, true, Some(8)), (8, 8));
        assert_eq!(thread_budget(1, true, None), (1, 1));
        assert_eq!(thread_budget(16, false, None), (16, 4), "CPU: libtorch computes, the loader refills");
        assert_eq!(thread_budget(2, false, None), (2, 1));
        assert_eq!(thread_budget(2, false, Some(3)), (2, 3));
    }

    /// The host copy of a batch buffer keeps its values and shape (on CUDA the
    /// same copy lands in pinned memory first).
    #[test]
    fn upload_copies_values_into_the_shape() {
        let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5).collect();
        let t = upload(&data, &[2, 3, 4], tch::Device::Cpu);
        assert_eq!(t.size(), [2, 3, 4]);
        assert_eq!(t.double_value(&[1, 2, 3]), 11.5);
        assert_eq!(Vec::<f32>::try_from(t.flatten(0, -1)).expect("values"), data);
        let ids: Vec<i64> = vec![7, 8, 9, 10, 11, 12];
        let t = upload(&ids, &[3, 2], tch::Device::Cpu);
        assert_eq!((t.kind(), t.int64_value(&[2, 0])), (Kind::Int64, 11));
    }

    /// Library users get the refusals the command line's flags also make.
    #[test]
    fn fresh_views_need_a_live_teacher_and_no_stored_view_range() {
        let cfg = TrainConfig {
            store: "store".into(),
            data: "data".into(),
            model: ModelConfig::preset(Preset::Tiny, 24),
            loss: LossConfig::default(),
            masking: Masking::Block,
            num_masked: 30,
            batch: 4,
            steps: 10,
            lr: 1e-3,
            min_lr: 1e-5,
            warmup_steps: 1,
            adamw: AdamWConfig::default(),
            clip_grad: 3.0,
            seed: 0,
            live_teacher: None,
            train_views: None,
            fresh_views: true,
        };
        let e = cfg.validate().expect_err("no teacher").to_string();
        assert!(e.contains("--fresh-views") && e.contains("--live-teacher"), "{e}");
        let with_teacher = TrainConfig { live_teacher: Some("t.onnx".into()), ..cfg.clone() };
        with_teacher.validate().expect("fresh views with a teacher");
        let e = TrainConfig { train_views: Some(9), ..with_teacher }.validate().expect_err("a view range").to_string();
        assert!(e.contains("--train-views"), "{e}");
    }

    #[test]
    fn peaks_of_known_gpus() {
        assert_eq!(peak_tflops("NVIDIA H100 80GB HBM3", true), Some(989.4));
        assert_eq!(peak_tflops("NVIDIA H100 PCIe", true), Some(756.0));
        assert_eq!(peak_tflops("NVIDIA H200", false), Some(66.9));
        assert_eq!(peak_tflops("NVIDIA A100-SXM4-80GB", true), Some(312.0));
        assert_eq!(peak_tflops("Tesla T4", true), None);
    }
}
