//! Typed errors of the store.

use std::path::PathBuf;

/// Everything that can go wrong reading or writing a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// An IO operation on `path` failed.
    #[error("{path}: {op}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The IO error.
        source: std::io::Error,
    },
    /// A file's bytes are not what the format says.
    #[error("{path}: corrupt at byte {offset}: {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Byte offset of the problem in the file.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// The file was written by a newer or unknown format version.
    #[error("{path}: format version {found} is not supported (this build reads versions {oldest} to {supported})", oldest = crate::format::OLDEST_SUPPORTED_VERSION)]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// A codec model file of another version than this build's.
    #[error(
        "{path}: codec model version {found} is not supported (this build reads version {supported}); \
         re-extract, or recode the f32 or f16 store it came from with `caev2 inspect recode`"
    )]
    UnsupportedModelVersion {
        /// The model file.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The store cannot be used as asked: it was made with other settings.
    #[error("store {store}: {field} differs: the store has {found}, this run asks for {requested}")]
    Incompatible {
        /// The store folder.
        store: PathBuf,
        /// The setting that differs, e.g. `teacher.onnx_sha256`.
        field: String,
        /// The store's value.
        found: String,
        /// The requested value.
        requested: String,
    },
    /// The store is missing shards or other files.
    #[error("store {store} is incomplete: {what}")]
    Incomplete {
        /// The store folder.
        store: PathBuf,
        /// What is missing.
        what: String,
    },
    /// A path that names a remote location (`s3://...`): stores, images
    /// and runs are read and written through the local filesystem only.
    #[error(
        "{0}: not a local path; caev2 reads and writes local (or mounted) folders only, e.g. mount the bucket and give its mount point"
    )]
    NotLocal(PathBuf),
    /// A request outside the store, e.g. an image id past the end.
    #[error("{0}")]
    OutOfRange(String),
    /// The Parquet index could not be read or written.
    #[error("{path}: parquet: {source}")]
    Parquet {
        /// The index file.
        path: PathBuf,
        /// The Parquet error.
        source: parquet::errors::ParquetError,
    },
    /// The Parquet index does not have the expected columns.
    #[error("{path}: index schema: {what}")]
    IndexSchema {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A JSON file (manifest, shard report) could not be parsed or written.
    #[error("{path}: json: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The serde_json error.
        source: serde_json::Error,
    },
}

/// Result alias for the store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.into();
    move |source| StoreError::Io { path, op, source }
}
