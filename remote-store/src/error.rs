//! Errors of the object-storage layer: each names the object (as a URL) or
//! the cache file it concerns.

use std::path::PathBuf;

use shard_store::StoreError;

/// Result of this crate.
pub type Result<T, E = RemoteError> = std::result::Result<T, E>;

/// What went wrong, naming the object or the file.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// A URL this crate cannot use.
    #[error("{url}: {why}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// Why it is refused.
        why: String,
    },
    /// A request to the object store failed (missing bucket, denied
    /// access, network); the source says what the server answered.
    #[error("{object}: {op} failed")]
    Object {
        /// The object's URL.
        object: String,
        /// The request.
        op: &'static str,
        /// The client's error.
        #[source]
        source: object_store::Error,
    },
    /// An object whose bytes are not what its shard report says, after
    /// every retry.
    #[error("{object}: {what}")]
    Corrupt {
        /// The object's URL.
        object: String,
        /// What differs.
        what: String,
    },
    /// The bucket holds a store that disagrees with this one.
    #[error("{object}: {what}")]
    Conflict {
        /// The object's URL.
        object: String,
        /// What disagrees.
        what: String,
    },
    /// The local cache cannot hold what is asked of it.
    #[error("cache {}: {what}", dir.display())]
    Cache {
        /// The cache folder.
        dir: PathBuf,
        /// What does not fit, and what to do.
        what: String,
    },
    /// A local file operation failed.
    #[error("{}: {op} failed", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operation.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The local copy of the store.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `map_err` helper for local IO.
pub(crate) fn io(path: &std::path::Path, op: &'static str) -> impl FnOnce(std::io::Error) -> RemoteError {
    let path = path.to_owned();
    move |source| RemoteError::Io { path, op, source }
}
