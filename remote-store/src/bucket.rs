//! A store's place in object storage: a client for its URL (S3, GCS,
//! Azure), configured from the environment the way each cloud's tools are,
//! with blocking calls over a small tokio runtime of its own.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use md5::Digest;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, PutResult, UpdateVersion, WriteMultipart};

use crate::error::{RemoteError, Result, io};

/// Files up to this size are uploaded in one request; larger ones in parts.
pub const MULTIPART_THRESHOLD: u64 = 32 << 20;
/// Size of each part of a multipart upload (S3 allows 10,000 parts: 160 GB).
pub const PART_SIZE: usize = 16 << 20;
/// Parts of one upload in flight at once.
const PARTS_IN_FLIGHT: usize = 4;

/// Whether `s` names object storage rather than a local path.
pub fn is_url(s: &str) -> bool {
    s.contains("://")
}

/// A store's prefix in a bucket.
#[derive(Debug, Clone)]
pub struct Bucket {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    rt: Arc<tokio::runtime::Runtime>,
}

/// What a conditional write found.
#[derive(Debug, PartialEq, Eq)]
pub enum Written {
    /// The object was written.
    Yes,
    /// It already existed (or changed since it was read); nothing written.
    Lost,
}

impl Bucket {
    /// The client for `url` (`s3://bucket/prefix`, `gs://bucket/prefix`,
    /// `az://container/prefix`), configured from the environment:
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
    /// `AWS_REGION`, `AWS_ENDPOINT_URL` (S3-compatible servers),
    /// `AWS_ALLOW_HTTP`, under them a static profile of `~/.aws` (`AWS_PROFILE`); `GOOGLE_SERVICE_ACCOUNT` / `GOOGLE_APPLICATION_CREDENTIALS`;
    /// `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY` and the other
    /// `AZURE_*` variables of `object_store`.
    ///
    /// # Errors
    /// [`RemoteError::BadUrl`] for another scheme, a URL without a bucket
    /// or a client that cannot be configured.
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with(url, &[])
    }

    /// [`Bucket::open`] with settings on top of the environment's, as
    /// `object_store` names them (`aws_endpoint`, `aws_access_key_id`,
    /// `google_service_account`, `azure_storage_account_name`, ...).
    ///
    /// # Errors
    /// As [`Bucket::open`], and an unknown setting.
    pub fn open_with(url: &str, settings: &[(&str, &str)]) -> Result<Self> {
        let bad = |why: String| RemoteError::BadUrl { url: url.to_owned(), why };
        let parsed = url::Url::parse(url).map_err(|e| bad(format!("not a URL ({e})")))?;
        let bucket = parsed.host_str().unwrap_or_default();
        if bucket.is_empty() {
            return Err(bad("names no bucket (expected SCHEME://BUCKET/PREFIX)".into()));
        }
        let prefix = parsed.path().trim_matches('/');
        let client = |e: object_store::Error| bad(format!("cannot configure the client: {e}"));
        // transient failures are retried, but an unreachable endpoint fails within a minute
        let retry = object_store::RetryConfig { max_retries: 4, retry_timeout: std::time::Duration::from_secs(60), ..Default::default() };
        let given = settings.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
        // each builder's settings by name, naming one it does not know
        fn configure<B, K: std::str::FromStr>(
            mut b: B,
            settings: &[(String, String)],
            with: impl Fn(B, K, &str) -> B,
            unknown: impl Fn(&str) -> RemoteError,
        ) -> Result<B> {
            for (k, v) in settings {
                b = with(b, k.parse().map_err(|_| unknown(k))?, v);
            }
            Ok(b)
        }
        let unknown = |k: &str| bad(format!("unknown object store setting {k:?}"));
        let store: Arc<dyn ObjectStore> = match parsed.scheme() {
            "s3" | "s3a" => {
                // a static profile of ~/.aws under what the environment sets, then the given settings
                let all: Vec<_> = crate::aws_profile::settings(url, &|k| std::env::var(k).ok())?.into_iter().chain(given).collect();
                let b = object_store::aws::AmazonS3Builder::from_env().with_url(url).with_retry(retry);
                Arc::new(configure(b, &all, |b, k, v| b.with_config(k, v), unknown)?.build().map_err(client)?)
            }
            "gs" => {
                let b = object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(url).with_retry(retry);
                Arc::new(configure(b, &given.collect::<Vec<_>>(), |b, k, v| b.with_config(k, v), unknown)?.build().map_err(client)?)
            }
            "az" | "abfs" | "abfss" => {
                let b = object_store::azure::MicrosoftAzureBuilder::from_env().with_url(url).with_retry(retry);
                Arc::new(configure(b, &given.collect::<Vec<_>>(), |b, k, v| b.with_config(k, v), unknown)?.build().map_err(client)?)
            }
            other => return Err(bad(format!("scheme {other}:// is not supported (s3://, gs:// or az://)"))),
        };
        let prefix = ObjectPath::parse(prefix).map_err(|e| bad(format!("bad prefix: {e}")))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .thread_name("caev2-object-store")
            .enable_all()
            .build()
            .map_err(|e| bad(format!("cannot start the IO runtime: {e}")))?;
        Ok(Self { url: url.trim_end_matches('/').to_owned(), store, prefix, rt: Arc::new(rt) })
    }

    /// The URL of the store's prefix.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL of the object at `rel` (a path inside the store, `/`-separated).
    pub fn object_url(&self, rel: &str) -> String {
        format!("{}/{rel}", self.url)
    }

    fn path(&self, rel: &str) -> ObjectPath {
        rel.split('/').fold(self.prefix.clone(), |p, part| p.join(part))
    }

    fn fail(&self, rel: &str, op: &'static str) -> impl FnOnce(object_store::Error) -> RemoteError {
        let object = self.object_url(rel);
        move |source| RemoteError::Object { object, op, source }
    }

    /// Run `f` on the bucket's runtime.
    pub(crate) fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// The object's bytes, `None` when it does not exist.
    ///
    /// # Errors
    /// Any other failure of the request.
    pub fn get(&self, rel: &str) -> Result<Option<(Bytes, ObjectMeta)>> {
        let path = self.path(rel);
        self.block_on(async {
            match self.store.get(&path).await {
                Ok(r) => {
                    let meta = r.meta.clone();
                    Ok(Some((r.bytes().await.map_err(self.fail(rel, "read"))?, meta)))
                }
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.fail(rel, "get")(e)),
            }
        })
    }

    /// The object's bytes (it must exist). Run on the bucket's runtime.
    pub(crate) async fn get_async(&self, rel: &str) -> Result<Bytes> {
        let path = self.path(rel);
        let r = self.store.get(&path).await.map_err(self.fail(rel, "get"))?;
        r.bytes().await.map_err(self.fail(rel, "read"))
    }

    /// The object's size and tag, `None` when it does not exist.
    ///
    /// # Errors
    /// Any other failure of the request.
    pub fn head(&self, rel: &str) -> Result<Option<ObjectMeta>> {
        let path = self.path(rel);
        self.block_on(async {
            match self.store.head(&path).await {
                Ok(m) => Ok(Some(m)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.fail(rel, "head")(e)),
            }
        })
    }

    /// Stream the object into `file` (which is truncated first); returns
    /// its size. Run on the bucket's runtime by the caller.
    pub(crate) async fn download(&self, rel: &str, dst: &Path, on_bytes: &(dyn Fn(u64) + Sync)) -> Result<u64> {
        let path = self.path(rel);
        let r = self.store.get(&path).await.map_err(self.fail(rel, "get"))?;
        let mut f = std::fs::File::create(dst).map_err(io(dst, "create"))?;
        let mut stream = r.into_stream();
        let mut n = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(self.fail(rel, "read"))?;
            f.write_all(&chunk).map_err(io(dst, "write"))?;
            n += chunk.len() as u64;
            on_bytes(chunk.len() as u64);
        }
        f.sync_all().map_err(io(dst, "fsync"))?;
        Ok(n)
    }

    /// Write `bytes` at `rel`. With `create_only`, an existing object is left
    /// alone and [`Written::Lost`] returned (a conditional put:
    /// `If-None-Match: *` on S3).
    ///
    /// # Errors
    /// Failure of the request.
    pub fn put(&self, rel: &str, bytes: Bytes, create_only: bool) -> Result<(Written, PutResult)> {
        let mode = if create_only { PutMode::Create } else { PutMode::Overwrite };
        self.put_mode(rel, bytes, mode)
    }

    /// Replace the object at `rel` only if it is still the version `seen`
    /// (`If-Match` on S3).
    ///
    /// # Errors
    /// Failure of the request.
    pub fn replace(&self, rel: &str, bytes: Bytes, seen: &ObjectMeta) -> Result<Written> {
        let version = UpdateVersion { e_tag: seen.e_tag.clone(), version: seen.version.clone() };
        Ok(self.put_mode(rel, bytes, PutMode::Update(version))?.0)
    }

    fn put_mode(&self, rel: &str, bytes: Bytes, mode: PutMode) -> Result<(Written, PutResult)> {
        let path = self.path(rel);
        self.block_on(async {
            let opts = PutOptions { mode, ..Default::default() };
            match self.store.put_opts(&path, PutPayload::from_bytes(bytes), opts).await {
                Ok(r) => Ok((Written::Yes, r)),
                Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                    Ok((Written::Lost, PutResult { e_tag: None, version: None, extensions: Default::default() }))
                }
                Err(e) => Err(self.fail(rel, "put")(e)),
            }
        })
    }

    /// Upload the local file `src` to `rel` and check what the server
    /// stored: its size (`HEAD`) and, where the server's tag is an MD5 of
    /// the content as S3's is (`md5` for one request, `md5 of the parts'
    /// md5s`-N for a multipart upload), that digest against the local
    /// bytes. Returns the size.
    ///
    /// # Errors
    /// Failure of a request, or [`RemoteError::Corrupt`] when the stored
    /// object differs.
    pub fn upload_checked(&self, src: &Path, rel: &str) -> Result<u64> {
        let len = std::fs::metadata(src).map_err(io(src, "stat"))?.len();
        let path = self.path(rel);
        let (result, expected_tag) = if len <= MULTIPART_THRESHOLD {
            let bytes = std::fs::read(src).map_err(io(src, "read"))?;
            let tag = hex::encode(md5::Md5::digest(&bytes));
            (self.put(rel, Bytes::from(bytes), false)?.1, tag)
        } else {
            self.block_on(async {
                let upload = self.store.put_multipart(&path).await.map_err(self.fail(rel, "start multipart upload"))?;
                let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
                let mut digests = Vec::new();
                let mut parts = 0usize;
                let sent: Result<()> = async {
                    let mut f = std::fs::File::open(src).map_err(io(src, "open"))?;
                    loop {
                        let mut buf = vec![0u8; PART_SIZE];
                        let n = read_full(&mut f, &mut buf).map_err(io(src, "read"))?;
                        if n == 0 {
                            return Ok(());
                        }
                        buf.truncate(n);
                        digests.extend_from_slice(&md5::Md5::digest(&buf));
                        parts += 1;
                        w.wait_for_capacity(PARTS_IN_FLIGHT).await.map_err(self.fail(rel, "upload part"))?;
                        w.put(Bytes::from(buf));
                    }
                }
                .await;
                if let Err(e) = sent {
                    let _ = w.abort().await; // leave no incomplete upload behind
                    return Err(e);
                }
                let r = w.finish().await.map_err(self.fail(rel, "complete multipart upload"))?;
                Ok::<_, RemoteError>((r, format!("{}-{parts}", hex::encode(md5::Md5::digest(&digests)))))
            })?
        };
        let meta = self
            .head(rel)?
            .ok_or_else(|| RemoteError::Corrupt { object: self.object_url(rel), what: "missing right after its upload".into() })?;
        if meta.size != len {
            return Err(RemoteError::Corrupt {
                object: self.object_url(rel),
                what: format!("{} bytes stored, {len} uploaded from {}", meta.size, src.display()),
            });
        }
        let tag = result.e_tag.or(meta.e_tag).unwrap_or_default();
        let tag = tag.trim_matches('"').to_ascii_lowercase();
        if looks_like_md5_tag(&tag) && tag != expected_tag {
            return Err(RemoteError::Corrupt {
                object: self.object_url(rel),
                what: format!("the server's digest {tag} differs from the uploaded bytes' {expected_tag} ({})", src.display()),
            });
        }
        Ok(len)
    }

    /// Delete the object (no error when it is already gone).
    ///
    /// # Errors
    /// Failure of the request.
    pub fn delete(&self, rel: &str) -> Result<()> {
        let path = self.path(rel);
        self.block_on(async {
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.fail(rel, "delete")(e)),
            }
        })
    }

    /// Check that the bucket can be listed (it exists and these credentials
    /// may read it), to explain a missing object.
    ///
    /// # Errors
    /// The server's answer, naming the bucket.
    pub fn check_listable(&self) -> Result<()> {
        self.block_on(async {
            self.store.list_with_delimiter(Some(&self.prefix)).await.map(|_| ()).map_err(|source| RemoteError::Object {
                object: self.url.clone(),
                op: "list",
                source,
            })
        })
    }

    /// Names (paths inside the store) of the objects under `rel_dir`.
    ///
    /// # Errors
    /// Failure of the request.
    pub fn list(&self, rel_dir: &str) -> Result<Vec<(String, u64)>> {
        let dir = self.path(rel_dir);
        let base = self.prefix.as_ref().len();
        self.block_on(async {
            let metas: Vec<ObjectMeta> = self.store.list(Some(&dir)).try_collect().await.map_err(self.fail(rel_dir, "list"))?;
            Ok(metas
                .into_iter()
                .map(|m| {
                    let full = m.location.as_ref();
                    let rel = if base == 0 { full } else { full.get(base + 1..).unwrap_or(full) };
                    (rel.to_owned(), m.size)
                })
                .collect())
        })
    }
}

/// An S3-style content tag: 32 hex digits, optionally `-N` parts.
fn looks_like_md5_tag(tag: &str) -> bool {
    let (digest, parts) = tag.split_once('-').unwrap_or((tag, "1"));
    digest.len() == 32 && digest.bytes().all(|b| b.is_ascii_hexdigit()) && parts.bytes().all(|b| b.is_ascii_digit())
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_tags_are_recognised() {
        assert!(looks_like_md5_tag("0123456789abcdef0123456789abcdef"));
        assert!(looks_like_md5_tag("0123456789abcdef0123456789abcdef-3"));
        assert!(!looks_like_md5_tag("CAE="));
        assert!(!looks_like_md5_tag("0x8D9"));
    }

    #[test]
    fn urls_are_checked() {
        assert!(is_url("s3://b/p") && !is_url("/data/store"));
        let e = Bucket::open("ftp://host/x").expect_err("ftp");
        assert!(e.to_string().contains("scheme ftp:// is not supported"), "{e}");
        let e = Bucket::open("s3:///x").expect_err("no bucket");
        assert!(e.to_string().contains("names no bucket"), "{e}");
    }
}
