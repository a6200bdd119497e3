//! Typed errors of the trainer.

use std::path::PathBuf;

/// Everything that can stop training.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// The store cannot be used for this student.
    #[error("store {store} cannot train this student: {what}")]
    Incompatible {
        /// The store folder.
        store: PathBuf,
        /// Why.
        what: String,
    },
    /// A setting is outside its bounds or inconsistent with the store.
    #[error("{flag} {value}: {expected}")]
    Setting {
        /// The option (`--batch`, ...) or setting.
        flag: &'static str,
        /// The value given.
        value: String,
        /// What it must be.
        expected: String,
    },
    /// The run folder cannot be used as asked.
    #[error("{path}: {what}")]
    RunFolder {
        /// The run folder or its file.
        path: PathBuf,
        /// Why.
        what: String,
    },
    /// The requested device cannot be used.
    #[error("device {device}: {what}")]
    Device {
        /// The `--device` value.
        device: String,
        /// Why.
        what: String,
    },
    /// An image of the store cannot be read as recorded.
    #[error("{path} (image {image_id} of the store): {what}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// Its id in the store.
        image_id: u64,
        /// What is wrong.
        what: String,
    },
    /// Stored targets are missing or unusable.
    #[error("image {image_id} view {view}: {what}")]
    Targets {
        /// Image id.
        image_id: u64,
        /// View.
        view: u32,
        /// What is wrong.
        what: String,
    },
    /// The loss became infinite or NaN.
    #[error("step {step}: the loss is {loss}; lower --lr or check the targets")]
    Diverged {
        /// The step (1-based).
        step: u64,
        /// The loss.
        loss: f64,
    },
    /// An image of the store could not be decoded.
    #[error("image {image_id} of the store: {source}")]
    Decode {
        /// Its id in the store.
        image_id: u64,
        /// The decoder's error (names the file).
        source: caev2_views::DecodeError,
    },
    /// The loader's threads could not start or stopped.
    #[error("the loader's threads {0}")]
    Loader(String),
    /// IO on a run file.
    #[error("{path}: {op}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The IO error.
        source: std::io::Error,
    },
    /// A checkpoint is missing or does not fit the model.
    #[error("checkpoint {path}: {what}")]
    Checkpoint {
        /// The checkpoint folder.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// libtorch failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] shard_store::StoreError),
    /// A run file could not be (de)serialised.
    #[error("{path}: json: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The serde_json error.
        source: serde_json::Error,
    },
    /// The live teacher failed.
    #[error(transparent)]
    Teacher(#[from] teacher::TeacherError),
    /// A launcher environment variable (torchrun's or Slurm's) is missing or wrong.
    #[error("{var}={value}: {what}")]
    Launch {
        /// The variable.
        var: &'static str,
        /// Its value (empty when unset).
        value: String,
        /// What is wrong.
        what: String,
    },
    /// Data-parallel training failed: rendezvous, a collective, another rank.
    #[error("rank {rank} of {world}: {what}")]
    Distributed {
        /// This process's rank.
        rank: usize,
        /// The world size.
        world: usize,
        /// What failed.
        what: String,
    },
}

impl TrainError {
    pub(crate) fn setting(flag: &'static str, value: impl std::fmt::Display, expected: impl Into<String>) -> Self {
        Self::Setting { flag, value: value.to_string(), expected: expected.into() }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, op, source }
    }
}

/// Result alias of the trainer.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;
