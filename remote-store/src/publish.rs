//! Extraction into a bucket: each worker writes its shards into a local
//! staging copy of the store (a normal store folder), then uploads every
//! committed shard, checks what the server stored, and only then writes the
//! shard's report under `done/`, so a reader never sees a half-uploaded
//! shard and a killed worker leaves nothing visible.
//!
//! Workers on machines without a shared file system divide the shards by
//! claims: `claims/shard-NNNNN.json`, written with a create-only
//! conditional put (`If-None-Match: *`). A claim whose writer is gone (a
//! dead process on the same host, or older than the claim lifetime) is
//! taken over with a put conditional on the claim's tag (`If-Match`).
//! Claims only avoid duplicated work: correctness does not rest on them,
//! because shards are deterministic (two workers that both write a shard
//! upload the same bytes) and `done/` is written only after the bytes are
//! checked. That matters because some S3-compatible servers check the
//! condition and then write, not atomically as S3, GCS and Azure do.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shard_store::{Manifest, ShardReport, StorePaths};

use crate::bucket::{Bucket, Written};
use crate::error::{RemoteError, Result, io};

/// How long a claim holds without its writer being seen alive, by default.
pub const DEFAULT_CLAIM_TTL: Duration = Duration::from_secs(6 * 3600);

/// `claims/shard-NNNNN.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claim {
    host: String,
    pid: u32,
    since_unix: u64,
    /// Tells this claim from an earlier one of the same process.
    #[serde(default)]
    nonce: u64,
}

/// Uploads a store's committed shards to its bucket.
#[derive(Debug, Clone)]
pub struct Publisher {
    bucket: Bucket,
    claim_ttl: Duration,
}

/// A store's files, as paths inside the store (`/`-separated), the way the
/// bucket names them.
pub mod names {
    /// The manifest.
    pub const MANIFEST: &str = "manifest.json";
    /// Shard file of shard `s`.
    pub fn shard(s: u32) -> String {
        format!("shards/shard-{s:05}.bin")
    }
    /// Index part of shard `s`.
    pub fn index(s: u32) -> String {
        format!("index/shard-{s:05}.parquet")
    }
    /// Image pack of shard `s`.
    pub fn images(s: u32) -> String {
        format!("images/shard-{s:05}.bin")
    }
    /// Report of shard `s`.
    pub fn done(s: u32) -> String {
        format!("done/shard-{s:05}.json")
    }
    /// Claim of shard `s` (object storage only).
    pub fn claim(s: u32) -> String {
        format!("claims/shard-{s:05}.json")
    }
}

impl Publisher {
    /// A publisher to `bucket`; claims older than `claim_ttl` are taken over.
    pub fn new(bucket: Bucket, claim_ttl: Duration) -> Self {
        Self { bucket, claim_ttl }
    }

    /// The bucket.
    pub fn bucket(&self) -> &Bucket {
        &self.bucket
    }

    /// Before the local store is opened: when the bucket already holds a
    /// store, copy its manifest (and fitted codec model) into the staging
    /// folder `local` if it lacks them, so this worker adds to the same
    /// store; a staging folder holding another store is refused.
    ///
    /// `true` when the bucket holds a store.
    ///
    /// # Errors
    /// Requests, local IO, [`RemoteError::Conflict`].
    pub fn pull_manifest(&self, local: &Path) -> Result<bool> {
        let Some((bytes, _)) = self.bucket.get(names::MANIFEST)? else { return Ok(false) };
        let remote = parse_manifest(&self.bucket, &bytes)?;
        let here = Manifest::path(local);
        if here.exists() {
            let mine = Manifest::read(local)?;
            if mine.store_id != remote.store_id {
                return Err(RemoteError::Conflict {
                    object: self.bucket.object_url(names::MANIFEST),
                    what: format!(
                        "the bucket holds store {} but the staging folder {} holds store {}; give another --cache or empty it",
                        remote.store_id,
                        local.display(),
                        mine.store_id
                    ),
                });
            }
            return Ok(true);
        }
        std::fs::create_dir_all(local).map_err(io(local, "create folder"))?;
        if let Some(fit) = &remote.codec_fit {
            let (model, _) = self.bucket.get(&fit.file)?.ok_or_else(|| RemoteError::Corrupt {
                object: self.bucket.object_url(&fit.file),
                what: "the codec model the manifest names is missing".into(),
            })?;
            shard_store::write_file_atomic(&local.join(&fit.file), &model)?;
        }
        shard_store::write_file_atomic(&here, &bytes)?;
        Ok(true)
    }

    /// After the local store is opened: publish its manifest (and codec
    /// model) if the bucket has none, create-only; if another worker
    /// published first, compare. `None` when the bucket now holds this
    /// store; the bucket's manifest when it holds another (two workers
    /// that started the store at once and fitted the `pca` codec to
    /// different models, e.g. on CPUs that round differently: see
    /// [`Publisher::adopt_manifest`]).
    ///
    /// # Errors
    /// Requests.
    pub fn push_manifest(&self, local: &Path, manifest: &Manifest) -> Result<Option<Manifest>> {
        if let Some(fit) = &manifest.codec_fit {
            // named by its hash: racing uploads write the same bytes or another name
            self.bucket.upload_checked(&local.join(&fit.file), &fit.file)?;
        }
        let here = Manifest::path(local);
        let bytes = std::fs::read(&here).map_err(io(&here, "read manifest"))?;
        if self.bucket.put(names::MANIFEST, Bytes::from(bytes), true)?.0 == Written::Yes {
            return Ok(None);
        }
        let (theirs, _) = self.bucket.get(names::MANIFEST)?.ok_or_else(|| RemoteError::Conflict {
            object: self.bucket.object_url(names::MANIFEST),
            what: "exists and then does not (deleted while this worker started?)".into(),
        })?;
        let remote = parse_manifest(&self.bucket, &theirs)?;
        if remote.store_id == manifest.store_id {
            return Ok(None);
        }
        if let Some(fit) = &manifest.codec_fit
            && remote.codec_fit.as_ref().is_none_or(|f| f.file != fit.file)
        {
            let _ = self.bucket.delete(&fit.file); // this worker's model, which no manifest names
        }
        Ok(Some(remote))
    }

    /// The error for a bucket that holds `remote`, another store than `mine`.
    pub fn another_store(&self, remote: &Manifest, mine: &Manifest) -> RemoteError {
        let field = remote
            .first_difference(mine)
            .map(|(f, there, here)| format!("{f} is {there} there, {here} here"))
            .unwrap_or_else(|| "its fitted codec model differs".into());
        RemoteError::Conflict {
            object: self.bucket.object_url(names::MANIFEST),
            what: format!("holds another store ({} against this one's {}: {field}); use another prefix", remote.store_id, mine.store_id),
        }
    }

    /// Replace the staging folder's manifest (and codec model), written by
    /// this worker a moment ago, with the bucket's: the worker that lost the
    /// race to create the store adds to the winner's instead. Refused when
    /// the staging folder already holds committed shards.
    ///
    /// # Errors
    /// [`RemoteError::Conflict`], requests, local IO.
    pub fn adopt_manifest(&self, local: &Path, mine: &Manifest, remote: &Manifest) -> Result<()> {
        let done = local.join("done");
        let committed = std::fs::read_dir(&done).map(|d| d.count()).unwrap_or(0);
        if committed > 0 {
            return Err(self.another_store(remote, mine));
        }
        if let Some(fit) = &mine.codec_fit {
            let p = local.join(&fit.file);
            std::fs::remove_file(&p).map_err(io(&p, "remove the codec model the bucket does not use"))?;
        }
        let here = Manifest::path(local);
        std::fs::remove_file(&here).map_err(io(&here, "remove the manifest the bucket does not use"))?;
        self.pull_manifest(local).map(|_| ())
    }

    /// Whether shard `s` is complete in the bucket.
    ///
    /// # Errors
    /// Requests.
    pub fn is_done(&self, s: u32) -> Result<bool> {
        Ok(self.bucket.head(&names::done(s))?.is_some())
    }

    /// Shards complete in the bucket.
    ///
    /// # Errors
    /// Requests.
    pub fn done_shards(&self) -> Result<Vec<u32>> {
        let mut v: Vec<u32> = self.bucket.list("done")?.iter().filter_map(|(name, _)| shard_number(name)).collect();
        v.sort_unstable();
        Ok(v)
    }

    /// Claim shard `s` for this process. `false` when another live worker
    /// holds it or it is already complete.
    ///
    /// # Errors
    /// Requests.
    pub fn claim(&self, s: u32) -> Result<bool> {
        let name = names::claim(s);
        let nonce = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0) ^ u64::from(s);
        let mine = Claim { host: hostname(), pid: std::process::id(), since_unix: unix_now(), nonce };
        let body = Bytes::from(serde_json::to_vec(&mine).unwrap_or_default());
        let won = match self.bucket.put(&name, body.clone(), true)?.0 {
            Written::Yes => true,
            Written::Lost => match self.bucket.get(&name)? {
                None => self.bucket.put(&name, body, true)?.0 == Written::Yes,
                Some((held, meta)) => {
                    let stale = match serde_json::from_slice::<Claim>(&held) {
                        Ok(c) => self.is_stale(&c),
                        Err(_) => true, // unreadable: a torn write of a dead worker
                    };
                    stale && self.bucket.replace(&name, body, &meta)? == Written::Yes
                }
            },
        };
        if !won {
            return Ok(false);
        }
        // On a server whose conditional writes check and then write (not
        // atomic), two workers may both "win"; the one whose claim is read
        // back goes on. This makes duplicated work rare there, not impossible,
        // which is harmless: both would upload the same bytes.
        let confirmed = match self.bucket.get(&name)? {
            Some((b, _)) => serde_json::from_slice::<Claim>(&b).is_ok_and(|c| c.nonce == nonce && c.pid == mine.pid && c.host == mine.host),
            None => false,
        };
        if !confirmed {
            return Ok(false);
        }
        if self.is_done(s)? {
            self.bucket.delete(&name)?;
            return Ok(false);
        }
        Ok(true)
    }

    fn is_stale(&self, c: &Claim) -> bool {
        let age = Duration::from_secs(unix_now().saturating_sub(c.since_unix));
        if age > self.claim_ttl {
            return true;
        }
        // a process of this host that no longer exists
        c.host == hostname() && c.pid != std::process::id() && !process_alive(c.pid)
    }

    /// Upload committed shard `s` of the local store: index part, image
    /// pack, shard file, each checked against what the server stored, then
    /// the report under `done/`, then drop the claim. Returns the bytes
    /// uploaded.
    ///
    /// # Errors
    /// A shard not committed locally, requests, [`RemoteError::Corrupt`]
    /// when the server stored other bytes.
    pub fn publish(&self, local: &StorePaths, manifest: &Manifest, s: u32) -> Result<u64> {
        let done = local.done(s);
        let report_bytes = std::fs::read(&done).map_err(io(&done, "read shard report"))?;
        let report: ShardReport = serde_json::from_slice(&report_bytes)
            .map_err(|source| RemoteError::Store(shard_store::StoreError::Json { path: done.clone(), source }))?;
        let mut files = vec![(local.index(s), names::index(s), report.index_bytes)];
        if manifest.embeds_images() {
            files.push((local.images(s), names::images(s), report.images_bytes.unwrap_or(0)));
        }
        files.push((local.shard(s), names::shard(s), report.shard_bytes));
        let mut total = 0;
        for (path, name, expect) in files {
            let n = self.bucket.upload_checked(&path, &name)?;
            if n != expect {
                return Err(RemoteError::Corrupt {
                    object: self.bucket.object_url(&name),
                    what: format!("{} is {n} bytes, its shard report says {expect}", path.display()),
                });
            }
            total += n;
        }
        total += report_bytes.len() as u64;
        self.bucket.put(&names::done(s), Bytes::from(report_bytes), false)?;
        self.bucket.delete(&names::claim(s))?;
        Ok(total)
    }
}

/// What [`upload_store`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Uploaded {
    /// Shards uploaded now.
    pub shards_uploaded: u32,
    /// Shards the bucket already had complete.
    pub shards_already_there: u32,
    /// Bytes uploaded.
    pub bytes: u64,
}

/// Publish a complete local store to `publisher`'s bucket: its manifest
/// (create-only: a bucket holding another store is refused), then every
/// shard the bucket lacks, each checked before its report is written.
/// Killed, it resumes: rerun it and it uploads only what is not complete.
///
/// # Errors
/// An incomplete local store, requests, [`RemoteError::Conflict`].
pub fn upload_store(publisher: &Publisher, store: &shard_store::Store, mut on_shard: impl FnMut(u32)) -> Result<Uploaded> {
    let m = store.manifest();
    let root = store.paths().root();
    if let Some(remote) = publisher.push_manifest(root, m)? {
        return Err(publisher.another_store(&remote, m));
    }
    let there: std::collections::BTreeSet<u32> = publisher.done_shards()?.into_iter().collect();
    let mut r = Uploaded::default();
    for s in 0..m.layout.num_shards {
        if there.contains(&s) {
            r.shards_already_there += 1;
        } else {
            r.bytes += publisher.publish(store.paths(), m, s)?;
            r.shards_uploaded += 1;
        }
        on_shard(s);
    }
    Ok(r)
}

/// The shard number in a name like `done/shard-00012.json`.
pub(crate) fn shard_number(name: &str) -> Option<u32> {
    let file = name.rsplit('/').next()?;
    let digits = file.strip_prefix("shard-")?.split('.').next()?;
    (digits.len() >= 5 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
}

/// A manifest read from the bucket, validated as a local one is.
pub(crate) fn parse_manifest(bucket: &Bucket, bytes: &[u8]) -> Result<Manifest> {
    let dir = tempfile_dir().map_err(io(&std::env::temp_dir(), "create temporary folder"))?;
    let p = dir.path().join(names::MANIFEST);
    std::fs::write(&p, bytes).map_err(io(&p, "write"))?;
    Manifest::read(dir.path()).map_err(|e| RemoteError::Corrupt { object: bucket.object_url(names::MANIFEST), what: e.to_string() })
}

fn tempfile_dir() -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix("caev2-manifest-").tempdir()
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// This machine's name.
pub(crate) fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // within it or truncates.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown-host".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Whether process `pid` of this host exists.
pub(crate) fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_numbers_are_read_from_names() {
        assert_eq!(shard_number("done/shard-00012.json"), Some(12));
        assert_eq!(shard_number("shards/shard-123456.bin"), Some(123_456));
        assert_eq!(shard_number("done/.shard-00001.json.x.tmp"), None);
        assert_eq!(shard_number("done/shard-1.json"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_free_pid_is_not() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(i32::MAX as u32));
        assert!(!hostname().is_empty());
    }
}
