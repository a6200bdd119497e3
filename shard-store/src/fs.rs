//! File-system helpers every layer of the store writes with: local paths
//! only, the permissions of store files, and atomic commits (a temporary
//! beside the final name, fsynced, renamed, its folder fsynced), for single
//! files and for whole folders.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;

use crate::error::{Result, StoreError, io};

/// Refuse paths that name a remote location (`scheme://...`), which would
/// otherwise silently become a local folder named `scheme:`.
///
/// # Errors
/// [`StoreError::NotLocal`].
pub fn check_local(path: &Path) -> Result<()> {
    let s = path.to_string_lossy();
    let scheme = s.split_once("://").map(|(a, _)| a);
    if scheme.is_some_and(|a| !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))) {
        return Err(StoreError::NotLocal(path.to_owned()));
    }
    Ok(())
}

/// Permissions of every file a store writes: `0666` less the process's
/// umask, as `File::create` would give (temporary files are created `0600`,
/// which would hide a store from the other users of a shared file system).
pub(crate) fn file_permissions() -> std::fs::Permissions {
    use std::os::unix::fs::PermissionsExt;
    static UMASK: OnceLock<u32> = OnceLock::new();
    // read, not set: umask(2) would change it for every thread meanwhile
    let umask = *UMASK.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Umask:").and_then(|v| u32::from_str_radix(v.trim(), 8).ok())))
            .unwrap_or(0o022)
    });
    std::fs::Permissions::from_mode(0o666 & !umask)
}

/// fsync a directory so that renames inside it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir, "fsync folder"))
}

/// Write `bytes` to `path` atomically; returns the size.
///
/// # Errors
/// IO errors naming `path`; nothing appears under `path` on failure.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<u64> {
    atomic_write(path, Replace::Yes, |mut f| f.write_all(bytes).map_err(io(path, "write"))).map(|len| len.unwrap_or(0))
}

/// Whether [`atomic_write`] may replace an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replace {
    Yes,
    /// Keep an existing file (a no-replace rename): of racing writers, one wins.
    No,
}

/// Write a file atomically: a temporary file beside `path`, fsynced, renamed
/// into place, folder fsynced. Returns the size, or `None` when `Replace::No`
/// found the file already there (the temporary is then removed).
pub(crate) fn atomic_write(path: &Path, replace: Replace, fill: impl FnOnce(&File) -> Result<()>) -> Result<Option<u64>> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = temporary_beside(path)?;
    fill(tmp.as_file())?;
    tmp.as_file().sync_all().map_err(io(path, "fsync"))?;
    let len = tmp.as_file().metadata().map_err(io(path, "stat"))?.len();
    let persisted = match replace {
        Replace::Yes => tmp.persist(path).map(|_| ()),
        Replace::No => tmp.persist_noclobber(path).map(|_| ()),
    };
    match persisted {
        Ok(()) => {}
        Err(e) if replace == Replace::No && e.error.kind() == std::io::ErrorKind::AlreadyExists => return Ok(None),
        Err(e) => return Err(StoreError::Io { path: path.to_owned(), op: "rename into place", source: e.error }),
    }
    sync_dir(dir)?;
    Ok(Some(len))
}

/// A temporary file beside `path` (named `.NAME.XXXXXX.tmp`, with the
/// permissions of store files), to be renamed onto `path` once complete.
///
/// # Errors
/// IO errors naming the folder.
pub(crate) fn temporary_beside(path: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .permissions(file_permissions())
        .tempfile_in(dir)
        .map_err(io(dir, "create temporary file"))
}

/// Move a folder whose files are all written into place as `dst`,
/// replacing an older `dst`: every file in it fsynced, the folder renamed,
/// the parent fsynced. Its files appear together or not at all (a run's
/// checkpoint: weights, optimiser moments, position).
///
/// # Errors
/// IO errors naming the file or folder.
pub fn commit_folder(tmp: &Path, dst: &Path) -> Result<()> {
    for entry in std::fs::read_dir(tmp).map_err(io(tmp, "list folder"))? {
        let p = entry.map_err(io(tmp, "list folder"))?.path();
        File::open(&p).and_then(|f| f.sync_all()).map_err(io(&p, "fsync"))?;
    }
    sync_dir(tmp)?;
    if dst.exists() {
        // a rename onto a non-empty folder fails: an older copy (left by a
        // run killed before it moved on) goes first
        std::fs::remove_dir_all(dst).map_err(io(dst, "remove the older folder"))?;
    }
    std::fs::rename(tmp, dst).map_err(io(dst, "rename into place"))?;
    sync_dir(dst.parent().unwrap_or(Path::new(".")))
}

/// Remove what a crashed writer of `final_path` left: its temporaries.
pub(crate) fn remove_stale_temporaries(final_path: &Path) -> Result<()> {
    let (Some(dir), Some(name)) = (final_path.parent(), final_path.file_name().and_then(|n| n.to_str())) else {
        return Ok(());
    };
    let prefix = format!(".{name}.");
    for entry in std::fs::read_dir(dir).map_err(io(dir, "list folder"))? {
        let entry = entry.map_err(io(dir, "list folder"))?;
        let n = entry.file_name();
        let n = n.to_string_lossy();
        if n.starts_with(&prefix) && n.ends_with(".tmp") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}
