//! The CAE v2 trainer: a ViT student trained in libtorch (`tch`) from a
//! caev2 feature store, on CPU or CUDA.
//!
//! * [`model`]: encoder (timm `vit_*_patch16_224` names), projection,
//!   cross-attention latent contextual regressor, shared LN -> Linear head.
//! * [`masking`]: BEiT block-wise (exact count) and random masking.
//! * [`loss`]: `l_v` / `l_z` with cosine, MSE or smooth-L1 distances, code
//!   or paper weighting.
//! * [`optim`]: AdamW with decay groups, gradient clipping, warmup + cosine.
//! * [`loader`]: one stored view per image per epoch, rebuilt with
//!   `caev2-views`, targets from the memory map, prefetched on a pool.
//! * [`dist`]: data-parallel training on libtorch's c10d (Gloo), launched
//!   by torchrun or Slurm.
//! * [`run_train`]: the loop, with checkpoints, exact resume, JSON-lines
//!   metrics and an optional live teacher that computes the same targets.

pub mod device;
pub mod dist;
mod error;
pub mod loader;
pub mod loss;
pub mod masking;
pub mod model;
pub mod nccl;
pub mod optim;
mod train;

pub use error::{Result, TrainError};
pub use train::{
    Budget, DEFAULT_DIST_TIMEOUT, DEFAULT_METRICS_EVERY, LoadedModel, LoaderSpeed, MAX_BATCH, MAX_STEPS, MAX_THREADS, Metrics,
    PAPER_EPOCHS, RunOptions, TrainConfig, TrainSummary, alignment, initial_model, latest_checkpoint, load_checkpoint, measure_loader,
    peak_tflops, run_train, thread_budget,
};
