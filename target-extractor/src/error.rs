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
    /// The teacher could not be loaded or run, or gave unusable outputs.
    #[error(transparent)]
    Teacher(#[from] teacher::TeacherError),
    /// A worker thread died.
    #[error("{0}")]
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

/// Result alias of the extractor.
pub type Result<T, E = ExtractError> = std::result::Result<T, E>;
