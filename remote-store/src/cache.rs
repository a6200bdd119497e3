//! Reading a store from a bucket through a local cache folder.
//!
//! ```text
//! CACHE/
//!   stores/<scheme>/<bucket>/<prefix>/   a local copy of each store: a normal store folder
//!                                        (the prefix's `/` written `%2F`: one folder level)
//!   locks/<key>.use                      shared-locked by every process reading the copy;
//!                                        its modification time orders eviction (least recent first)
//!   locks/<key>.sync                     held while a process fetches into the copy
//!   locks/<key>.path                     the copy's folder, relative to CACHE
//! ```
//!
//! The small files (manifest, codec model, shard reports, index parts) are
//! always fetched. Shard files and image packs are fetched when a command
//! needs them (all of them, or one image's shard); each download goes to a temporary name and is renamed only
//! after it matched its shard report (sizes, the image pack's CRC-32C, and
//! the shard file's header and every record's CRC-32C): a damaged or
//! partial download is fetched again, up to three times, then refused
//! naming the object. A copy found in the cache is trusted when its size
//! matches its report; `caev2 inspect verify` checks every byte.
//!
//! The size limit counts shard files and image packs. When a fetch would
//! pass it, the copies of other stores that no process is reading are
//! emptied of them, least recently used first; a store being read is
//! never touched. A store that does not fit the limit on its own is
//! refused before anything is downloaded.

use std::fs::File;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt;
use shard_store::{Manifest, ShardReader, ShardReport};

use crate::bucket::Bucket;
use crate::error::{RemoteError, Result, io};
use crate::publish::{names, parse_manifest, shard_number};

/// Attempts at a download that does not match its report.
const ATTEMPTS: usize = 3;
/// Downloads in flight at once.
const PARALLEL_DOWNLOADS: usize = 8;

/// Where the cache lives and how large it may grow.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// The cache folder.
    pub dir: PathBuf,
    /// Most bytes of shard files and image packs kept, over every store.
    pub limit: Option<u64>,
    /// Print what is fetched.
    pub progress: bool,
}

impl CacheOptions {
    /// The default cache folder: `$CAEV2_CACHE`, else `$XDG_CACHE_HOME/caev2`,
    /// else `~/.cache/caev2`.
    pub fn default_dir() -> PathBuf {
        if let Some(d) = std::env::var_os("CAEV2_CACHE") {
            return PathBuf::from(d);
        }
        if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
            return PathBuf::from(d).join("caev2");
        }
        std::env::var_os("HOME").map_or_else(|| std::env::temp_dir().join("caev2-cache"), |h| PathBuf::from(h).join(".cache/caev2"))
    }

    /// The local copy of the store at `url` inside this cache.
    ///
    /// # Errors
    /// [`RemoteError::BadUrl`] for a URL that does not name a bucket.
    pub fn store_dir(&self, url: &str) -> Result<PathBuf> {
        Ok(self.dir.join("stores").join(cache_key(url)?))
    }
}

/// What a command reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// Manifest, codec model, reports and index parts.
    Metadata,
    /// The metadata, and these shards' files and image packs (one image's views).
    Shards(Vec<u32>),
    /// Everything: every shard file and image pack too.
    Everything,
}

impl Need {
    fn shard(&self, s: u32) -> bool {
        match self {
            Need::Metadata => false,
            Need::Shards(v) => v.contains(&s),
            Need::Everything => true,
        }
    }
}

/// A store's local copy, complete for what was asked, held open: while it
/// lives no other process evicts it.
#[derive(Debug)]
pub struct CachedStore {
    dir: PathBuf,
    fetched_bytes: u64,
    pin: Pin,
}

impl CachedStore {
    /// The local store folder (open it with `shard_store::Store`).
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Bytes this call downloaded (0 when the cache was warm).
    pub fn fetched_bytes(&self) -> u64 {
        self.fetched_bytes
    }

    /// Drop shard `s`'s files (shard file, image pack, index part) from
    /// the copy, so that the next fetch downloads and checks them again:
    /// for damage found in the copy after its download.
    ///
    /// # Errors
    /// Local IO.
    pub fn forget_shard(&self, s: u32) -> Result<()> {
        let sync = open_lock(&self.pin.sync_lock)?;
        sync.lock().map_err(io(&self.pin.sync_lock, "lock"))?;
        for name in [names::shard(s), names::images(s), names::index(s)] {
            let p = self.dir.join(name);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(RemoteError::Io { path: p, op: "remove from the cache", source: e }),
            }
        }
        Ok(())
    }
}

/// `s3://bucket/a/b` -> `s3/bucket/a%2Fb`: one folder per store, whatever
/// the prefixes (a store at `a` never holds the copy of one at `a/shards`);
/// `%` and `/` of the prefix escaped, an empty prefix as `%2F`.
fn cache_key(url: &str) -> Result<PathBuf> {
    let bad = |why: &str| RemoteError::BadUrl { url: url.to_owned(), why: why.to_owned() };
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("not a URL"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() || bucket == "." || bucket == ".." || bucket.contains('\\') {
        return Err(bad("names no usable bucket"));
    }
    let parts: Vec<&str> = prefix.split('/').filter(|p| !p.is_empty()).collect();
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(bad("has a `.` or `..` part"));
    }
    let prefix = parts.iter().map(|p| p.replace('%', "%25")).collect::<Vec<_>>().join("%2F");
    Ok(PathBuf::from(scheme).join(bucket).join(if prefix.is_empty() { "%2F".into() } else { prefix }))
}

/// The lock files' stem of a cache key: its parts joined by `_`, each part's
/// own `_` escaped, so two keys never share a name.
fn lock_name(key: &Path) -> String {
    key.iter().map(|p| p.to_string_lossy().replace('_', "%5F")).collect::<Vec<_>>().join("_")
}

/// Take `file`'s exclusive lock without waiting; `false` when another holds it.
fn try_lock_exclusive(file: &File) -> std::io::Result<bool> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

fn open_lock(path: &Path) -> Result<File> {
    File::options().create(true).truncate(false).write(true).open(path).map_err(io(path, "open lock"))
}

/// Fetch what `need` asks of the store at `url` into the cache and return
/// its local copy, pinned against eviction for as long as it is held.
///
/// # Errors
/// Requests (a missing bucket or store, denied access: naming the object),
/// [`RemoteError::Corrupt`] for an object that does not match its report
/// after every retry, [`RemoteError::Cache`] when the store does not fit
/// the limit, local IO.
pub fn fetch(url: &str, opts: &CacheOptions, need: Need) -> Result<CachedStore> {
    let bucket = Bucket::open(url)?;
    let (dir, pin) = opts.pin(url)?;
    let sync_path = pin.sync_lock.clone();
    let sync = open_lock(&sync_path)?;
    sync.lock().map_err(io(&sync_path, "lock"))?;
    let bar = indicatif::ProgressBar::hidden();
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} fetch [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes}  {bytes_per_sec}  ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let fetched_bytes = Fetcher { bucket: &bucket, dir: &dir, opts, bar }.run(need)?;
    drop(sync);
    Ok(CachedStore { dir, fetched_bytes, pin })
}

/// A store's copy in use: while this lives, no other process evicts it.
#[derive(Debug)]
pub struct Pin {
    _file: File,
    sync_lock: PathBuf,
}

impl CacheOptions {
    /// Create the copy's folder for `url` if needed and hold it in use.
    /// Extraction stages its shards here; readers fetch into it.
    ///
    /// # Errors
    /// A URL that names no bucket, local IO.
    pub fn pin(&self, url: &str) -> Result<(PathBuf, Pin)> {
        let key = cache_key(url)?;
        let dir = self.dir.join("stores").join(&key);
        let locks = self.dir.join("locks");
        std::fs::create_dir_all(&locks).map_err(io(&locks, "create folder"))?;
        std::fs::create_dir_all(&dir).map_err(io(&dir, "create folder"))?;
        let name = lock_name(&key);
        let path_file = locks.join(format!("{name}.path"));
        if !path_file.exists() {
            shard_store::write_file_atomic(&path_file, Path::new("stores").join(&key).to_string_lossy().as_bytes())?;
        }
        let use_path = locks.join(format!("{name}.use"));
        let file = open_lock(&use_path)?;
        file.lock_shared().map_err(io(&use_path, "lock"))?;
        let _ = file.set_modified(std::time::SystemTime::now()); // least recently used comes first
        Ok((dir, Pin { _file: file, sync_lock: locks.join(format!("{name}.sync")) }))
    }
}

struct Fetcher<'a> {
    bucket: &'a Bucket,
    dir: &'a Path,
    opts: &'a CacheOptions,
    /// Bytes downloaded (drawn only with `opts.progress`).
    bar: indicatif::ProgressBar,
}

/// Clears a progress bar however the fetch ends.
struct ClearOnDrop<'a>(&'a indicatif::ProgressBar);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

/// One file to fetch: its name in the store, its size by the report, how to check it.
struct Wanted {
    name: String,
    bytes: u64,
    check: Check,
}

#[derive(Clone)]
enum Check {
    Index { crc: Option<u32> },
    Images { crc: Option<u32> },
    Shard { header: shard_store::ShardHeader },
}

impl Fetcher<'_> {
    fn run(&self, need: Need) -> Result<u64> {
        let Some((manifest_bytes, _)) = self.bucket.get(names::MANIFEST)? else {
            self.bucket.check_listable()?; // a missing bucket says so
            return Err(RemoteError::Conflict {
                object: self.bucket.object_url(names::MANIFEST),
                what: "no store here (no manifest.json); check the URL, or extract into it first".into(),
            });
        };
        let remote = parse_manifest(self.bucket, &manifest_bytes)?;
        let manifest_path = Manifest::path(self.dir);
        if manifest_path.exists() {
            let same = Manifest::read(self.dir).map(|m| m.store_id == remote.store_id).unwrap_or(false);
            if !same {
                // the bucket now holds another store: start the copy afresh
                std::fs::remove_dir_all(self.dir).map_err(io(self.dir, "empty the stale cached copy"))?;
                std::fs::create_dir_all(self.dir).map_err(io(self.dir, "create folder"))?;
            }
        }
        for sub in ["shards", "index", "done", "images"] {
            let d = self.dir.join(sub);
            std::fs::create_dir_all(&d).map_err(io(&d, "create folder"))?;
            remove_temporaries(&d)?;
        }
        if let Some(fit) = &remote.codec_fit {
            let p = self.dir.join(&fit.file);
            if !p.exists() {
                let (b, _) = self.bucket.get(&fit.file)?.ok_or_else(|| RemoteError::Corrupt {
                    object: self.bucket.object_url(&fit.file),
                    what: "the codec model the manifest names is missing".into(),
                })?;
                shard_store::write_file_atomic(&p, &b)?;
            }
        }
        if !manifest_path.exists() {
            shard_store::write_file_atomic(&manifest_path, &manifest_bytes)?;
        }
        // the check of the codec model against the manifest's SHA-256
        shard_store::load_codec_model(self.dir, &remote)?;

        let done: Vec<u32> = {
            let mut v: Vec<u32> = self.bucket.list("done")?.iter().filter_map(|(n, _)| shard_number(n)).collect();
            v.sort_unstable();
            v.into_iter().filter(|&s| s < remote.layout.num_shards).collect()
        };
        // the reports: fetched (and checked) where the copy lacks them, else read from it
        let missing: Vec<u32> = done.iter().copied().filter(|&s| !self.dir.join(names::done(s)).exists()).collect();
        let fetched: Vec<(u32, Bytes)> = self.bucket.block_on(async {
            futures::stream::iter(missing.iter().map(|&s| async move {
                let name = names::done(s);
                let b = self.bucket.get_async(&name).await?;
                Ok::<_, RemoteError>((s, b))
            }))
            .buffer_unordered(PARALLEL_DOWNLOADS * 4)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<_>>>()
        })?;
        let mut reports: std::collections::BTreeMap<u32, ShardReport> = std::collections::BTreeMap::new();
        for (s, b) in fetched {
            let name = names::done(s);
            let r: ShardReport = serde_json::from_slice(&b)
                .map_err(|e| RemoteError::Corrupt { object: self.bucket.object_url(&name), what: format!("not a shard report: {e}") })?;
            if r.shard != s {
                return Err(RemoteError::Corrupt { object: self.bucket.object_url(&name), what: format!("reports shard {}", r.shard) });
            }
            shard_store::write_file_atomic(&self.dir.join(&name), &b)?;
            reports.insert(s, r);
        }
        let on_disk: Vec<u32> = done.iter().copied().filter(|s| !reports.contains_key(s)).collect();
        for s in on_disk {
            let p = self.dir.join(names::done(s));
            let b = std::fs::read(&p).map_err(io(&p, "read shard report"))?;
            let r: ShardReport = serde_json::from_slice(&b)
                .map_err(|source| RemoteError::Store(shard_store::StoreError::Json { path: p.clone(), source }))?;
            reports.insert(s, r);
        }

        let mut wanted = Vec::new();
        for r in reports.values() {
            let s = r.shard;
            wanted.push(Wanted { name: names::index(s), bytes: r.index_bytes, check: Check::Index { crc: r.index_crc32c } });
            if need.shard(s) {
                if remote.embeds_images() {
                    wanted.push(Wanted {
                        name: names::images(s),
                        bytes: r.images_bytes.unwrap_or(0),
                        check: Check::Images { crc: r.images_crc32c },
                    });
                }
                wanted.push(Wanted { name: names::shard(s), bytes: r.shard_bytes, check: Check::Shard { header: remote.shard_header(s) } });
            }
        }
        let missing: Vec<Wanted> =
            wanted.into_iter().filter(|w| std::fs::metadata(self.dir.join(&w.name)).map(|m| m.len() != w.bytes).unwrap_or(true)).collect();
        let bulk = |w: &Wanted| !matches!(w.check, Check::Index { .. });
        let need_bytes: u64 = missing.iter().filter(|w| bulk(w)).map(|w| w.bytes).sum();
        if need != Need::Metadata {
            let store_bytes: u64 =
                reports.values().filter(|r| need.shard(r.shard)).map(|r| r.shard_bytes + r.images_bytes.unwrap_or(0)).sum();
            self.make_room(need_bytes, store_bytes)?;
        }
        let total: u64 = missing.iter().map(|w| w.bytes).sum();
        if self.opts.progress && total > 0 {
            eprintln!("fetching {} files of {} into {}", missing.len(), self.bucket.url(), self.dir.display());
            self.bar.set_length(total);
            self.bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
        let _clear = ClearOnDrop(&self.bar);
        self.bucket.block_on(async {
            futures::stream::iter(missing.iter().map(|w| self.download_checked(w)))
                .buffer_unordered(PARALLEL_DOWNLOADS)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<Vec<()>>>()
        })?;
        Ok(total)
    }

    /// Download `w` to a temporary name, check it, rename it; again on a mismatch.
    async fn download_checked(&self, w: &Wanted) -> Result<()> {
        let dst = self.dir.join(&w.name);
        let file_name = dst.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = dst.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
        let mut why = String::new();
        for _ in 0..ATTEMPTS {
            let n = self.bucket.download(&w.name, &tmp, &|b| self.bar.inc(b)).await?;
            match check_file(&tmp, n, w) {
                Ok(()) => {
                    std::fs::rename(&tmp, &dst).map_err(io(&dst, "rename into place"))?;
                    return Ok(());
                }
                Err(e) => why = e,
            }
        }
        let _ = std::fs::remove_file(&tmp);
        Err(RemoteError::Corrupt { object: self.bucket.object_url(&w.name), what: format!("{why} ({ATTEMPTS} downloads)") })
    }

    /// Empty other stores' copies, least recently used first, until
    /// `need` more bytes fit the limit.
    fn make_room(&self, need: u64, store_bytes: u64) -> Result<()> {
        let Some(limit) = self.opts.limit else { return Ok(()) };
        let cache_err = |what: String| RemoteError::Cache { dir: self.opts.dir.clone(), what };
        if store_bytes > limit {
            return Err(cache_err(format!(
                "{} needs {:.2} GB of shard files and image packs, more than --cache-limit {:.2} GB; raise the limit",
                self.bucket.url(),
                store_bytes as f64 / 1e9,
                limit as f64 / 1e9
            )));
        }
        let locks = self.opts.dir.join("locks");
        let mut others = Vec::new(); // (last use, lock file, folder)
        let mut used = 0u64;
        for e in std::fs::read_dir(&locks).map_err(io(&locks, "list folder"))? {
            let p = e.map_err(io(&locks, "list folder"))?.path();
            if p.extension().is_none_or(|x| x != "path") {
                continue;
            }
            let rel = std::fs::read_to_string(&p).map_err(io(&p, "read"))?;
            let folder = self.opts.dir.join(rel.trim());
            let size = bulk_bytes(&folder)?;
            used += size;
            if folder != self.dir && size > 0 {
                let use_lock = p.with_extension("use");
                let last = std::fs::metadata(&use_lock).and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
                others.push((last, use_lock, folder, size));
            }
        }
        others.sort_by_key(|o| o.0);
        for (_, use_lock, folder, size) in others {
            if used + need <= limit {
                break;
            }
            let f = open_lock(&use_lock)?;
            if try_lock_exclusive(&f).map_err(io(&use_lock, "lock"))? {
                for sub in ["shards", "images"] {
                    let d = folder.join(sub);
                    if d.exists() {
                        std::fs::remove_dir_all(&d).map_err(io(&d, "evict"))?;
                    }
                }
                // its reports say complete shards whose files are gone: drop them too
                let d = folder.join("done");
                if d.exists() {
                    std::fs::remove_dir_all(&d).map_err(io(&d, "evict"))?;
                }
                used -= size;
                if self.opts.progress {
                    eprintln!("cache: evicted {} ({:.1} MB)", folder.display(), size as f64 / 1e6);
                }
            }
        }
        if used + need > limit {
            return Err(cache_err(format!(
                "{:.2} GB more would pass --cache-limit {:.2} GB ({:.2} GB held, by stores in use or this one); raise the limit or end the other runs",
                need as f64 / 1e9,
                limit as f64 / 1e9,
                used as f64 / 1e9
            )));
        }
        Ok(())
    }
}

/// Bytes of shard files and image packs in a cached copy.
fn bulk_bytes(folder: &Path) -> Result<u64> {
    let mut n = 0;
    for sub in ["shards", "images"] {
        let d = folder.join(sub);
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd {
            let e = e.map_err(io(&d, "list folder"))?;
            n += e.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    Ok(n)
}

fn remove_temporaries(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(io(dir, "list folder"))? {
        let p = e.map_err(io(dir, "list folder"))?.path();
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with('.') && name.ends_with(".tmp") {
            std::fs::remove_file(&p).map_err(io(&p, "remove partial download"))?;
        }
    }
    Ok(())
}

/// Whether the downloaded file `tmp` (`n` bytes) is what its report says.
fn check_file(tmp: &Path, n: u64, w: &Wanted) -> std::result::Result<(), String> {
    if n != w.bytes {
        return Err(format!("{n} bytes, its shard report says {}", w.bytes));
    }
    let crc_of = |p: &Path| std::fs::read(p).map(|b| crc32c::crc32c(&b)).map_err(|e| format!("cannot read the download: {e}"));
    match &w.check {
        Check::Index { crc: Some(c) } | Check::Images { crc: Some(c) } => {
            let got = crc_of(tmp)?;
            if got != *c {
                return Err(format!("CRC-32C {got:08x}, its shard report says {c:08x}"));
            }
        }
        Check::Index { crc: None } | Check::Images { crc: None } => {}
        Check::Shard { header } => {
            let r = ShardReader::open(tmp).map_err(|e| e.to_string())?;
            if r.header() != header {
                return Err("its header does not match the manifest (a shard of another store?)".into());
            }
            if let Some((slot, offset, what)) = r.verify_records().into_iter().next() {
                return Err(format!("record of slot {slot} at byte {offset}: {what}"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_follow_the_url() {
        assert_eq!(cache_key("s3://bucket/a/b/").expect("key"), PathBuf::from("s3/bucket/a%2Fb"));
        assert_eq!(cache_key("s3://bucket").expect("key"), PathBuf::from("s3/bucket/%2F"));
        assert_ne!(cache_key("s3://b/a%2Fb").expect("key"), cache_key("s3://b/a/b").expect("key"));
        assert!(cache_key("s3://bucket/../x").is_err());
        // a store's copy never lies inside another's
        let (a, b) = (cache_key("s3://b/x").expect("a"), cache_key("s3://b/x/shards").expect("b"));
        assert!(!b.starts_with(&a) && !a.starts_with(&b));
        assert_eq!(lock_name(Path::new("s3/bucket/a")), "s3_bucket_a");
        assert_ne!(lock_name(&cache_key("gs://a_b/c").expect("k")), lock_name(&cache_key("gs://a/b_c").expect("k")));
    }
}
