//! `caev2 extract`: run a frozen teacher ONCE over K augmented views of every
//! image and write its tokens, with the exact parameters of each view, into a
//! [`shard_store`] feature store.
//!
//! * [`Dataset`] lists an ImageNet-style folder (sorted; image id = position).
//! * [`teacher::Teacher`] (its own crate) loads the ONNX teacher with ONNX
//!   Runtime and resolves its identity from `caev2.*` metadata or the
//!   command line.
//! * [`run_extract`] is the pipeline: decoding and view rendering on a rayon
//!   pool, inference, and shard writing run concurrently; work is split into
//!   shards claimed under file locks, so a run can be killed and resumed, and
//!   several processes (`--num-workers/--worker-index`, or simply several
//!   runs on one folder) fill one store.
//! * [`launcher`] takes the worker split from `torchrun`, `srun` or a Slurm
//!   job array.
//!
//! The views are drawn and rendered by [`caev2_views`], the same code the
//! trainer uses to rebuild the student's pixels.

mod dataset;
mod error;
mod extract;
pub mod launcher;

pub use dataset::{Dataset, IMAGE_EXTENSIONS, ImageFile};
pub use error::{ExtractError, Result};
pub use extract::{
    DEFAULT_BATCH, DEFAULT_IMAGES_PER_SHARD, DEFAULT_STUDENT_SIZE, DEFAULT_VIEWS, ExtractConfig, ExtractSummary, MAX_BATCH, MAX_VIEWS,
    build_manifest, cores, run_extract,
};
