//! Typed errors of the teacher.

use std::path::{Path, PathBuf};

/// Everything that can go wrong loading or running a teacher.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TeacherError {
    /// IO on the model file.
    #[error("{path}: {op}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The IO error.
        source: std::io::Error,
    },
    /// The teacher model is missing, malformed, or does not fit the settings,
    /// or its outputs are unusable.
    #[error("teacher {path}: {what}")]
    Model {
        /// The ONNX file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// ONNX Runtime failed.
    #[error("onnxruntime: {0}")]
    Runtime(String),
}

impl TeacherError {
    pub(crate) fn io(path: &Path, op: &'static str, source: std::io::Error) -> Self {
        Self::Io { path: path.to_owned(), op, source }
    }
}

impl<T> From<ort::Error<T>> for TeacherError {
    fn from(e: ort::Error<T>) -> Self {
        Self::Runtime(e.to_string())
    }
}

/// Result alias of the teacher.
pub type Result<T, E = TeacherError> = std::result::Result<T, E>;
