//! What a run trains and how it runs: [`TrainConfig`] (the resolved
//! settings saved as `config.json`, with the paper's defaults in
//! [`TrainConfig::paper`] and their bounds in [`TrainConfig::validate`]) and
//! [`RunOptions`] (device, threads, checkpoints, launch: nothing that
//! changes the numbers).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::loader::DataSource;
use crate::loss::LossConfig;
use crate::masking::Masking;
use crate::model::{ModelConfig, Preset};
use crate::optim::AdamWConfig;

/// The resolved configuration of a run, saved as `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Target store.
    pub store: PathBuf,
    /// Image folder the store was extracted from; `None` for a store that
    /// carries its images (they are read from it).
    #[serde(default)]
    pub data: Option<PathBuf>,
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
    /// This configuration without where things are (the store's, the
    /// images' and the live teacher's paths): what must be equal between
    /// the ranks of a group and between a run and its resumption, which may
    /// read the same store from other places.
    pub fn without_paths(&self) -> TrainConfig {
        let mut c = self.clone();
        c.store = PathBuf::new();
        c.data = None; // a store that carries its images may be read with or without --data
        c.live_teacher = c.live_teacher.as_ref().map(|_| PathBuf::new());
        c
    }

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
    pub fn paper(
        store: &Path,
        data: Option<&Path>,
        preset: Preset,
        batch: usize,
        budget: Budget,
        train_views: Option<u32>,
    ) -> Result<Self> {
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
            data: data.map(Path::to_owned),
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
        if self.lr < self.min_lr {
            // the cosine would run from lr up to min_lr: a schedule that rises
            // (the released code does this silently at small batches)
            return bad(
                "--lr",
                &format!("{:.3e}", self.lr),
                &format!(
                    "is below --min-lr {:.1e}, so the schedule would rise instead of decaying; pass a smaller --min-lr (e.g. --min-lr 0) or a larger --lr (the default is 1.5e-3 x batch / 2048)",
                    self.min_lr
                ),
            );
        }
        shard_store::check_local(&self.store)?;
        if let Some(data) = &self.data {
            shard_store::check_local(data)?;
        }
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
    /// [`crate::device::thread_budget`]).
    pub threads: usize,
    /// Loader threads, overriding the split of `threads`.
    pub loader_threads: Option<usize>,
    /// Read the losses back from the device every N steps (one host sync
    /// per N steps; `metrics.jsonl` still gets a line per step).
    pub metrics_every: u64,
    /// The device's peak TFLOP/s at the run's precision, for MFU; `None`
    /// looks the GPU up in a table of known ones (see [`crate::device::peak_tflops`]).
    pub peak_tflops: Option<f64>,
    /// Checkpoint every N steps (and at the end).
    pub checkpoint_every: u64,
    /// Continue from the run folder's last checkpoint.
    pub resume: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Mixed precision (bfloat16 autocast) on CUDA.
    pub bf16: bool,
    /// Data-parallel launch (see [`crate::dist::Launch::from_env`]); `None` trains in
    /// this process alone.
    pub launch: Option<crate::dist::Launch>,
    /// Timeout of the data-parallel rendezvous and of every collective.
    pub dist_timeout: Duration,
    /// Which library all-reduces gradients on CUDA.
    pub dist_backend: crate::dist::Backend,
    /// The program running the training, for the run's provenance.
    pub program: Program,
    /// Run `--live-teacher` on the training GPU (ONNX Runtime's CUDA
    /// provider) instead of the CPU: what a live teacher costs on a GPU
    /// node. Its targets round differently from the CPU's, so it is refused
    /// with `--fresh-views`, whose stored targets come from the CPU.
    pub live_teacher_gpu: bool,
}

/// The program that runs a training, as `run.json` records it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Program {
    /// Its version (`caev2 0.1.0`).
    pub version: String,
    /// The git commit it was built from, when known (the build's HEAD;
    /// uncommitted changes are not recorded).
    pub git_commit: Option<String>,
    /// Its command line.
    pub args: Vec<String>,
}

/// Default of [`RunOptions::dist_timeout`].
pub const DEFAULT_DIST_TIMEOUT: Duration = Duration::from_secs(300);

/// Default of [`RunOptions::metrics_every`].
pub const DEFAULT_METRICS_EVERY: u64 = 10;

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TrainConfig {
        TrainConfig {
            store: "store".into(),
            data: Some("data".into()),
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
            fresh_views: false,
        }
    }

    /// Library users get the refusals the command line's flags also make.
    #[test]
    fn fresh_views_need_a_live_teacher_and_no_stored_view_range() {
        let cfg = TrainConfig { fresh_views: true, ..config() };
        let e = cfg.validate().expect_err("no teacher").to_string();
        assert!(e.contains("--fresh-views") && e.contains("--live-teacher"), "{e}");
        let with_teacher = TrainConfig { live_teacher: Some("t.onnx".into()), ..cfg.clone() };
        with_teacher.validate().expect("fresh views with a teacher");
        let e = TrainConfig { train_views: Some(9), ..with_teacher }.validate().expect_err("a view range").to_string();
        assert!(e.contains("--train-views"), "{e}");
    }

    /// `--batch 8` scales the paper's rate to 5.9e-6, below the final 1e-5:
    /// refused, naming both flags, instead of a schedule that rises.
    #[test]
    fn a_peak_rate_below_the_final_one_is_refused() {
        let cfg = TrainConfig { lr: 1.5e-3 * 8.0 / 2048.0, ..config() };
        let e = cfg.validate().expect_err("rising schedule").to_string();
        assert!(e.starts_with("--lr 5.859e-6: is below --min-lr 1.0e-5"), "{e}");
        assert!(e.contains("--min-lr 0"), "{e}");
        TrainConfig { min_lr: 0.0, ..cfg.clone() }.validate().expect("--min-lr 0 accepts it");
        TrainConfig { lr: 1e-5, ..cfg }.validate().expect("a flat schedule is fine");
    }
}
