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
    /// Invalid settings.
    #[error("{0}")]
    Config(String),
    /// An image or target could not be loaded.
    #[error("{0}")]
    Data(String),
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
    /// The live teacher failed.
    #[error(transparent)]
    Teacher(#[from] teacher::TeacherError),
}

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, op, source }
    }
}

/// Result alias of the trainer.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;
