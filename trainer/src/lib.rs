//! The CAE v2 trainer: a ViT student trained in libtorch (`tch`) from a
//! caev2 feature store, on CPU or CUDA. A run, file by file:
//!
//! * [`config`]: what a run trains ([`TrainConfig`], the paper's defaults
//!   and their bounds) and how it runs ([`RunOptions`]).
//! * [`run`]: [`run_train`], the outline of a run: the group, the device,
//!   the run folder, the loader, the loop; and [`measure_loader`].
//! * [`device`]: CUDA or the CPU, bf16 autocast, threads, the GPU's peak.
//! * [`dist`] and [`nccl`]: data-parallel training on libtorch's c10d
//!   (Gloo), launched by torchrun or Slurm, gradients over NCCL on GPUs.
//! * [`run_folder`]: the folder one training owns (its lock, `config.json`,
//!   `run.json`, `metrics.jsonl`); [`checkpoint`]: its checkpoints, and
//!   loading a student for evaluation or export.
//! * [`loader`]: one stored view per image per epoch (or a fresh one),
//!   rebuilt with `caev2-views`, targets from the memory map, prefetched on
//!   a pool.
//! * [`step`]: one optimisation step and the metrics it reads back.
//! * [`model`]: encoder (timm `vit_*_patch16_224` names), projection,
//!   cross-attention latent contextual regressor, shared LN -> Linear head;
//!   [`masking`]: BEiT block-wise (exact count) and random masking;
//!   [`loss`]: `l_v` / `l_z` with cosine, MSE or smooth-L1 distances, code
//!   or paper weighting; [`optim`]: AdamW with decay groups, gradient
//!   clipping, warmup + cosine.

pub mod checkpoint;
pub mod config;
pub mod device;
pub mod dist;
mod error;
pub mod loader;
pub mod loss;
pub mod masking;
pub mod model;
pub mod nccl;
pub mod optim;
pub mod run;
pub mod run_folder;
pub mod step;

pub use checkpoint::{LoadedModel, initial_model, latest_checkpoint, load_checkpoint, provenance_of};
pub use config::{
    Budget, DEFAULT_DIST_TIMEOUT, DEFAULT_METRICS_EVERY, MAX_BATCH, MAX_STEPS, MAX_THREADS, PAPER_EPOCHS, Program, RunOptions, TrainConfig,
};
pub use error::{Result, TrainError};
pub use run::{LoaderSpeed, TrainSummary, loader_config, measure_loader, run_train};
pub use run_folder::{Invocation, Provenance, RankInfo, read_provenance};
pub use step::Metrics;
