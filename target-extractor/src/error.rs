//! Typed errors of the extractor.

use std::path::{Path, PathBuf};

/// Everything that can stop an extraction.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExtractError {
    /// IO on a file or folder.
    #[error("{path}: {op}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The IO error.
        source: std::io::Error,
    },
    /// The dataset folder is unusable.
    #[error("{0}")]
    Dataset(String),
    /// The teacher model is missing, malformed or does not fit the settings.
    #[error("teacher {path}: {what}")]
    Teacher {
        /// The ONNX file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// ONNX Runtime failed.
    #[error("onnxruntime: {0}")]
    Runtime(String),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] shard_store::StoreError),
    /// Invalid settings.
    #[error("{0}")]
    Config(String),
}

impl ExtractError {
    pub(crate) fn io(path: &Path, op: &'static str, source: std::io::Error) -> Self {
        Self::Io { path: path.to_owned(), op, source }
    }
}

impl<T> From<ort::Error<T>> for ExtractError {
    fn from(e: ort::Error<T>) -> Self {
        Self::Runtime(e.to_string())
    }
}

/// Result alias of the extractor.
pub type Result<T, E = ExtractError> = std::result::Result<T, E>;
