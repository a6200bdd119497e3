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
    #[error("{root}: {what}")]
    Dataset {
        /// The dataset folder.
        root: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// A setting is outside its bounds.
    #[error("{flag} {value}: {expected}")]
    Setting {
        /// The command-line option (`--views`, ...).
        flag: &'static str,
        /// The value given.
        value: String,
        /// What it must be.
        expected: String,
    },
    /// The teacher could not be loaded or run, or gave unusable outputs.
    #[error(transparent)]
    Teacher(#[from] teacher::TeacherError),
    /// A pipeline thread could not start or died.
    #[error("the {stage} thread {what}")]
    Thread {
        /// Which stage: decode, inference, writer.
        stage: &'static str,
        /// What happened.
        what: String,
    },
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] shard_store::StoreError),
    /// The bucket the store is published to refused or failed.
    #[error(transparent)]
    Remote(#[from] remote_store::RemoteError),
}

impl ExtractError {
    pub(crate) fn io(path: &Path, op: &'static str, source: std::io::Error) -> Self {
        Self::Io { path: path.to_owned(), op, source }
    }
}

/// Result alias of the extractor.
pub type Result<T, E = ExtractError> = std::result::Result<T, E>;
