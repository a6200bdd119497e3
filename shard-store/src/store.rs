//! A store folder: manifest, shards, index parts, shard reports and locks.
//!
//! ```text
//! STORE/
//!   manifest.json              identity of the store (manifest.rs)
//!   codec-pca-<hash>.bin       fitted codec model, for codecs that need one (pca.rs)
//!   shards/shard-00000.bin     targets (shard.rs)
//!   index/shard-00000.parquet  one row per stored view (index.rs)
//!   images/shard-00000.bin     the shard's image files (format 2 only; images.rs)
//!   done/shard-00000.json      shard report; its presence marks the shard complete
//!   locks/shard-00000.lock     advisory lock held while a process writes the shard
//! ```

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::codec::Codec;
use crate::error::{Result, StoreError, io};
use crate::fs::{Replace, atomic_write, check_local, remove_stale_temporaries, write_file_atomic};
use crate::images::{ImagePackReader, ImagePackWriter};
use crate::index::{IndexRow, decode_index, encode_index};
use crate::manifest::{CodecFit, Manifest};
use crate::pca::PcaModel;
use crate::shard::{ShardReader, ShardWriter};

/// An image that was not stored, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    /// Image id.
    pub image_id: u64,
    /// Path relative to the dataset root.
    pub path: String,
    /// The decoder's or reader's reason.
    pub reason: String,
}

/// `done/shard-NNNNN.json`: written last when a shard is committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardReport {
    /// Shard number.
    pub shard: u32,
    /// First image id.
    pub first_image: u64,
    /// Images in the shard.
    pub num_images: u32,
    /// Views stored.
    pub views_stored: u64,
    /// Size of the shard file.
    pub shard_bytes: u64,
    /// Size of the index part.
    pub index_bytes: u64,
    /// CRC-32C of the index part's bytes (absent in stores written before
    /// it was recorded; readers then rely on the row checks alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_crc32c: Option<u32>,
    /// Size of the image pack (stores that carry their images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_bytes: Option<u64>,
    /// CRC-32C of the image pack's bytes (stores that carry their images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_crc32c: Option<u32>,
    /// Images that could not be decoded.
    pub skipped: Vec<Skipped>,
}

impl ShardReport {
    /// A report for `commit`, which fills in the sizes and the index checksum.
    pub fn new(shard: u32, images: std::ops::Range<u64>, views_stored: u64, skipped: Vec<Skipped>) -> Self {
        Self {
            shard,
            first_image: images.start,
            num_images: u32::try_from(images.end - images.start).unwrap_or(u32::MAX),
            views_stored,
            shard_bytes: 0,
            index_bytes: 0,
            index_crc32c: None,
            images_bytes: None,
            images_crc32c: None,
            skipped,
        }
    }
}

/// Paths inside a store folder.
#[derive(Debug, Clone)]
pub struct StorePaths {
    root: PathBuf,
}

impl StorePaths {
    /// Paths of the store at `root`.
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_owned() }
    }
    /// The store folder.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// Shard file of shard `s`.
    pub fn shard(&self, s: u32) -> PathBuf {
        self.root.join("shards").join(format!("shard-{s:05}.bin"))
    }
    /// Index part of shard `s`.
    pub fn index(&self, s: u32) -> PathBuf {
        self.root.join("index").join(format!("shard-{s:05}.parquet"))
    }
    /// Image pack of shard `s` (stores that carry their images).
    pub fn images(&self, s: u32) -> PathBuf {
        self.root.join("images").join(format!("shard-{s:05}.bin"))
    }
    /// Report (completion marker) of shard `s`.
    pub fn done(&self, s: u32) -> PathBuf {
        self.root.join("done").join(format!("shard-{s:05}.json"))
    }
    /// Lock file of shard `s`.
    pub fn lock(&self, s: u32) -> PathBuf {
        self.root.join("locks").join(format!("shard-{s:05}.lock"))
    }
}

/// Read and check the fitted codec model a manifest names, if its codec
/// needs one.
///
/// # Errors
/// [`StoreError::Corrupt`] naming the model file when it is missing from
/// the manifest, damaged (its SHA-256 differs from the manifest's) or of
/// another shape; IO errors.
pub fn load_codec_model(root: &Path, m: &Manifest) -> Result<Option<Arc<PcaModel>>> {
    if !m.codec.needs_fit() {
        return Ok(None);
    }
    let manifest_path = Manifest::path(root);
    let fit = m.codec_fit.as_ref().filter(|f| !f.file.is_empty()).ok_or_else(|| StoreError::Corrupt {
        path: manifest_path.clone(),
        offset: 0,
        what: format!("codec {} needs a fitted model, and the manifest names none", m.codec),
    })?;
    if fit.file.contains(['/', '\\']) || fit.file.starts_with('.') {
        return Err(StoreError::Corrupt {
            path: manifest_path,
            offset: 0,
            what: format!("model file name {:?} is not a plain file name", fit.file),
        });
    }
    let path = root.join(&fit.file);
    let bytes = std::fs::read(&path).map_err(io(&path, "read codec model"))?;
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    if sha != fit.sha256 {
        return Err(StoreError::Corrupt {
            path,
            offset: 0,
            what: format!("damaged codec model: SHA-256 {sha}, the manifest records {}", fit.sha256),
        });
    }
    let model = PcaModel::from_bytes(&path, &bytes)?;
    if (model.tokens(), model.dim()) != (m.teacher.tokens as usize, m.teacher.dim as usize) {
        return Err(StoreError::Corrupt {
            path,
            offset: 12,
            what: format!("model of {} x {} targets, the store has {} x {}", model.tokens(), model.dim(), m.teacher.tokens, m.teacher.dim),
        });
    }
    Ok(Some(Arc::new(model)))
}

/// A store being written. Several processes may hold one for the same
/// folder: shards are claimed with exclusive file locks and committed
/// atomically, so concurrent writers never corrupt each other.
#[derive(Debug)]
pub struct StoreWriter {
    paths: StorePaths,
    manifest: Manifest,
    pca: Option<Arc<PcaModel>>,
}

impl StoreWriter {
    /// Create the store at `root` with `manifest`, or open an existing one
    /// whose manifest has the same identity.
    ///
    /// # Errors
    /// [`StoreError::Incompatible`] when the folder holds a store made with
    /// other settings; [`StoreError::Incomplete`] for a new store whose
    /// codec needs a fit (use [`StoreWriter::create_or_open_fitting`]); IO
    /// errors.
    pub fn create_or_open(root: &Path, manifest: &Manifest) -> Result<Self> {
        Self::create_or_open_fitting(root, manifest, || {
            Err(StoreError::Incomplete {
                store: root.to_owned(),
                what: format!("codec {} needs a fitted model, and the store has none yet", manifest.codec),
            })
        })
    }

    /// [`StoreWriter::create_or_open`] for any codec: when the store does
    /// not exist yet and its codec needs a fit, `fit()` gives the model,
    /// which is written beside the manifest (its file first, then the
    /// manifest naming it). An existing store's model is reused, never
    /// refitted, so resumed and concurrent runs write the same bytes; of
    /// two runs fitting at once, the first manifest wins and the loser
    /// uses the winner's model.
    ///
    /// # Errors
    /// As [`StoreWriter::create_or_open`], and `fit`'s errors.
    pub fn create_or_open_fitting<E: From<StoreError>>(
        root: &Path,
        manifest: &Manifest,
        fit: impl FnOnce() -> std::result::Result<PcaModel, E>,
    ) -> std::result::Result<Self, E> {
        check_local(root)?;
        let images = manifest.embeds_images().then_some("images");
        for sub in ["shards", "index", "done", "locks"].into_iter().chain(images) {
            let d = root.join(sub);
            std::fs::create_dir_all(&d).map_err(io(&d, "create folder"))?;
        }
        let path = Manifest::path(root);
        // the model this process fitted and wrote, if it did
        let mut own: Option<(String, PcaModel)> = None;
        if !path.exists() {
            let mut new = manifest.clone();
            if manifest.codec.needs_fit() {
                let model = fit()?;
                let settings =
                    manifest.codec_fit.clone().unwrap_or(CodecFit { views: 0, cosine: 0.0, file: String::new(), sha256: String::new() });
                let file = model.file_name();
                let model_path = root.join(&file);
                // named by its hash: racing fits never overwrite each other
                atomic_write(&model_path, Replace::No, |mut f| {
                    f.write_all(model.to_bytes()).map_err(io(&model_path, "write codec model"))
                })?;
                new = manifest.clone().with_codec_fit(Some(CodecFit { file: file.clone(), sha256: model.sha256().to_owned(), ..settings }));
                own = Some((file, model));
            }
            // of two processes racing here, one wins and the other reads and
            // compares the winner's manifest below
            let json = new.to_json(&path)?;
            atomic_write(&path, Replace::No, |mut f| f.write_all(&json).map_err(io(&path, "write manifest")))?;
        }
        let existing = Manifest::read(root)?;
        existing.check_same(root, manifest)?;
        let winner = existing.codec_fit.as_ref().map(|f| f.file.as_str());
        let pca = match own {
            // this process's manifest won: its model is the one in memory
            Some((file, model)) if winner == Some(file.as_str()) => Some(Arc::new(model)),
            lost => {
                if let Some((file, _)) = lost {
                    let _ = std::fs::remove_file(root.join(file)); // lost the race: the winner's model is used
                }
                load_codec_model(root, &existing)?
            }
        };
        Ok(Self { paths: StorePaths::new(root), manifest: existing, pca })
    }

    /// The fitted codec model, for codecs that need one.
    pub fn codec_model(&self) -> Option<&Arc<PcaModel>> {
        self.pca.as_ref()
    }

    /// The store's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Paths in the store.
    pub fn paths(&self) -> &StorePaths {
        &self.paths
    }

    /// Whether shard `s` has been committed.
    pub fn is_done(&self, s: u32) -> bool {
        self.paths.done(s).exists()
    }

    /// Try to claim shard `s` for writing. `Ok(None)` when another process
    /// holds it or it is already complete. Leftover temporary files of a
    /// crashed writer of this shard are removed once the lock is held.
    ///
    /// # Errors
    /// IO errors on the lock file.
    pub fn try_claim(&self, s: u32) -> Result<Option<ShardClaim<'_>>> {
        if self.is_done(s) {
            return Ok(None);
        }
        let lock_path = self.paths.lock(s);
        let file = File::options().create(true).truncate(false).write(true).open(&lock_path).map_err(io(&lock_path, "open lock"))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => return Err(StoreError::Io { path: lock_path, op: "lock", source: e }),
        }
        if self.is_done(s) {
            return Ok(None); // finished by another process between the checks
        }
        let pack = self.manifest.embeds_images().then(|| self.paths.images(s));
        for p in [self.paths.shard(s), self.paths.index(s), self.paths.done(s)].into_iter().chain(pack) {
            remove_stale_temporaries(&p)?;
        }
        Ok(Some(ShardClaim { store: self, shard: s, _lock: file }))
    }
}

/// Exclusive ownership of one shard while it is written.
#[derive(Debug)]
pub struct ShardClaim<'a> {
    store: &'a StoreWriter,
    shard: u32,
    _lock: File,
}

impl ShardClaim<'_> {
    /// The shard number.
    pub fn shard(&self) -> u32 {
        self.shard
    }

    /// Start the shard file (a temporary until [`ShardClaim::commit`]).
    ///
    /// # Errors
    /// IO errors.
    pub fn writer(&self) -> Result<ShardWriter> {
        Ok(ShardWriter::create(&self.store.paths.shard(self.shard), self.store.manifest.shard_header(self.shard))?
            .with_pca(self.store.pca.clone()))
    }

    /// Start the shard's image pack (a temporary until
    /// [`ShardClaim::commit`]), for a store that carries its images; `None`
    /// for one that does not.
    ///
    /// # Errors
    /// IO errors.
    pub fn image_writer(&self) -> Result<Option<ImagePackWriter>> {
        let m = &self.store.manifest;
        if !m.embeds_images() {
            return Ok(None);
        }
        ImagePackWriter::create(&self.store.paths.images(self.shard), m.image_pack_header(self.shard)).map(Some)
    }

    /// Commit the shard: index part, image pack (stores that carry their
    /// images), shard file, then the report, each written beside its name,
    /// fsynced and renamed. A crash at any point leaves the shard not done,
    /// and a later run redoes it.
    ///
    /// # Errors
    /// IO or Parquet errors, an image pack missing from a store that
    /// carries its images (or given to one that does not); nothing is
    /// marked done.
    pub fn commit(
        self,
        writer: ShardWriter,
        images: Option<ImagePackWriter>,
        rows: &[IndexRow],
        mut report: ShardReport,
    ) -> Result<ShardReport> {
        let p = &self.store.paths;
        if images.is_some() != self.store.manifest.embeds_images() {
            return Err(StoreError::OutOfRange(format!(
                "shard {}: an image pack {} for a store that {} its images",
                self.shard,
                if images.is_some() { "given" } else { "missing" },
                if images.is_some() { "does not carry" } else { "carries" }
            )));
        }
        let index_path = p.index(self.shard);
        let index = encode_index(&index_path, rows)?;
        report.index_crc32c = Some(crc32c::crc32c(&index));
        report.index_bytes = write_file_atomic(&index_path, &index)?;
        if let Some(w) = images {
            let (bytes, crc) = w.finish()?;
            report.images_bytes = Some(bytes);
            report.images_crc32c = Some(crc);
        }
        report.shard_bytes = writer.finish()?;
        let done = p.done(self.shard);
        let json = serde_json::to_vec_pretty(&report).map_err(|source| StoreError::Json { path: done.clone(), source })?;
        write_file_atomic(&done, &json)?;
        Ok(report)
    }
}

/// Decoded access to one view's targets, borrowed from the memory map.
#[derive(Debug, Clone, Copy)]
pub struct TargetsRef<'a> {
    /// Encoded bytes.
    pub bytes: &'a [u8],
    /// Codec of `bytes`.
    pub codec: Codec,
    /// Tokens.
    pub tokens: usize,
    /// Values per token.
    pub dim: usize,
    /// The store's fitted model, for [`Codec::Pca`].
    pub pca: Option<&'a PcaModel>,
}

impl TargetsRef<'_> {
    /// Decode into `out` (`tokens * dim` floats). `false` when the record
    /// does not decode (a pca record whose CRC matched but whose entropy
    /// code does not end where it should: written by a faulty encoder).
    ///
    /// # Panics
    /// If `out` has the wrong length.
    pub fn decode_into(&self, out: &mut [f32]) -> bool {
        assert_eq!(out.len(), self.tokens * self.dim, "output buffer must hold tokens x dim floats");
        match (self.codec, self.pca) {
            (Codec::Pca, Some(m)) => m.decode(self.bytes, out),
            (codec, _) => codec.decode(self.bytes, self.dim, out),
        }
    }

    /// Decode what the trainer needs into `out`: the targets, except for
    /// [`Codec::Pca`], where it is the quantised coefficients on the
    /// model's axes (the trainer applies [`PcaModel::basis`] and
    /// [`PcaModel::mean`] on its device). `false` as [`TargetsRef::decode_into`].
    ///
    /// # Panics
    /// If `out` has the wrong length.
    pub fn decode_for_training(&self, out: &mut [f32]) -> bool {
        match (self.codec, self.pca) {
            (Codec::Pca, Some(m)) => {
                assert_eq!(out.len(), self.tokens * self.dim, "output buffer must hold tokens x dim floats");
                m.decode_coefficients(self.bytes, out)
            }
            _ => self.decode_into(out),
        }
    }

    /// Decoded values as a new vector.
    /// Non-finite values (NaN) when the record does not decode.
    pub fn to_vec(&self) -> Vec<f32> {
        let mut v = vec![0.0; self.tokens * self.dim];
        if !self.decode_into(&mut v) {
            v.fill(f32::NAN);
        }
        v
    }

    /// Zero-copy view of an `f16` record.
    pub fn as_f16(&self) -> Option<&[half::f16]> {
        (self.codec == Codec::F16).then(|| bytemuck::try_cast_slice(self.bytes).ok()).flatten()
    }

    /// Zero-copy view of an `f32` record.
    pub fn as_f32(&self) -> Option<&[f32]> {
        (self.codec == Codec::F32).then(|| bytemuck::try_cast_slice(self.bytes).ok()).flatten()
    }
}

/// A complete (or, for inspection, partial) store opened for reading.
/// Shards are memory-mapped lazily and checked against the manifest.
#[derive(Debug)]
pub struct Store {
    paths: StorePaths,
    manifest: Manifest,
    shards: Vec<OnceLock<ShardReader>>,
    packs: Vec<OnceLock<ImagePackReader>>,
    pca: Option<Arc<PcaModel>>,
}

impl Store {
    /// Open a complete store.
    ///
    /// # Errors
    /// Manifest errors, or [`StoreError::Incomplete`] listing missing shards.
    pub fn open(root: &Path) -> Result<Self> {
        let s = Self::open_partial(root)?;
        let missing: Vec<u32> = (0..s.manifest.layout.num_shards).filter(|&i| !s.paths.done(i).exists()).collect();
        if !missing.is_empty() {
            let list: Vec<String> = missing.iter().take(10).map(|m| m.to_string()).collect();
            return Err(StoreError::Incomplete {
                store: root.to_owned(),
                what: format!(
                    "{} of {} shards are not complete (first: {}); rerun extract with the same arguments to finish it",
                    missing.len(),
                    s.manifest.layout.num_shards,
                    list.join(", ")
                ),
            });
        }
        Ok(s)
    }

    /// Open a store that may still be missing shards.
    ///
    /// # Errors
    /// Manifest errors.
    pub fn open_partial(root: &Path) -> Result<Self> {
        check_local(root)?;
        let manifest = Manifest::read(root)?;
        let pca = load_codec_model(root, &manifest)?;
        let n = manifest.layout.num_shards as usize;
        let packs = if manifest.embeds_images() { n } else { 0 };
        Ok(Self {
            paths: StorePaths::new(root),
            manifest,
            shards: (0..n).map(|_| OnceLock::new()).collect(),
            packs: (0..packs).map(|_| OnceLock::new()).collect(),
            pca,
        })
    }

    /// The fitted codec model, for codecs that need one (checked against
    /// the manifest's SHA-256 when the store was opened).
    pub fn codec_model(&self) -> Option<&Arc<PcaModel>> {
        self.pca.as_ref()
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Paths in the store.
    pub fn paths(&self) -> &StorePaths {
        &self.paths
    }

    /// Whether shard `s` is complete.
    pub fn is_done(&self, s: u32) -> bool {
        self.paths.done(s).exists()
    }

    /// The memory-mapped shard `s`, opened and checked on first use and kept
    /// mapped for the life of the store (readers come back to it).
    ///
    /// # Errors
    /// IO, corruption, or a shard that belongs to another store or
    /// disagrees with the manifest.
    pub fn shard(&self, s: u32) -> Result<&ShardReader> {
        let cell = self.shards.get(s as usize).ok_or_else(|| StoreError::OutOfRange(format!("shard {s} of {}", self.shards.len())))?;
        if let Some(r) = cell.get() {
            return Ok(r);
        }
        let _ = cell.set(self.open_shard(s)?);
        Ok(cell.get().expect("set above"))
    }

    /// Shard `s` opened and checked as [`Store::shard`] does, but not kept:
    /// its mapping ends with the reader, so a pass over every shard (a
    /// verification) holds one shard at a time, not the whole store.
    ///
    /// # Errors
    /// As [`Store::shard`].
    pub fn open_shard(&self, s: u32) -> Result<ShardReader> {
        if s as usize >= self.shards.len() {
            return Err(StoreError::OutOfRange(format!("shard {s} of {}", self.shards.len())));
        }
        let path = self.paths.shard(s);
        let r = ShardReader::open(&path)?;
        let h = r.header();
        let expect = self.manifest.shard_header(s);
        if *h != expect {
            return Err(StoreError::Corrupt {
                path,
                offset: 0,
                what: format!("header {h:?} does not match the manifest (expected {expect:?}); shard from another store?"),
            });
        }
        Ok(r)
    }

    /// Image pack `s` opened and checked (its header against the manifest,
    /// its size against the shard's report), not kept. The whole file's
    /// CRC is [`ImagePackReader::file_crc32c`], for a verification.
    ///
    /// # Errors
    /// A store that does not carry its images, IO, corruption.
    pub fn open_image_pack(&self, s: u32) -> Result<ImagePackReader> {
        let m = &self.manifest;
        if !m.embeds_images() {
            return Err(StoreError::OutOfRange(format!("store {} does not carry its images", self.paths.root.display())));
        }
        if s >= m.layout.num_shards {
            return Err(StoreError::OutOfRange(format!("shard {s} of {}", m.layout.num_shards)));
        }
        let path = self.paths.images(s);
        let pack = ImagePackReader::open(&path, &m.image_pack_header(s))?;
        if let Some(report) = self.report(s)?
            && report.images_bytes != Some(pack.file_len())
        {
            return Err(StoreError::Corrupt {
                path,
                offset: 0,
                what: format!("{} bytes, its shard report says {:?}", pack.file_len(), report.images_bytes),
            });
        }
        Ok(pack)
    }

    /// The file bytes of image `image_id` from its shard's image pack
    /// (mapped on first use and kept), after checking their CRC-32C;
    /// `Ok(None)` for an image the store skipped.
    ///
    /// # Errors
    /// A store that does not carry its images, an id past the end, IO or
    /// corruption naming the pack and the byte offset.
    pub fn image(&self, image_id: u64) -> Result<Option<&[u8]>> {
        let m = &self.manifest;
        if image_id >= m.dataset.num_images {
            return Err(StoreError::OutOfRange(format!("image {image_id} outside the store ({} images)", m.dataset.num_images)));
        }
        let s = (image_id / u64::from(m.layout.images_per_shard)) as u32;
        let cell = self
            .packs
            .get(s as usize)
            .ok_or_else(|| StoreError::OutOfRange(format!("store {} does not carry its images", self.paths.root.display())))?;
        if cell.get().is_none() {
            let _ = cell.set(self.open_image_pack(s)?);
        }
        cell.get().expect("set above").image(image_id)
    }

    /// The targets of view `view` of image `image_id`, in O(1) through the
    /// shard's record table, after checking the record's CRC-32C.
    /// `Ok(None)` when the image was skipped.
    ///
    /// # Errors
    /// Out-of-range ids, or shard errors.
    pub fn targets(&self, image_id: u64, view: u32) -> Result<Option<TargetsRef<'_>>> {
        let m = &self.manifest;
        if image_id >= m.dataset.num_images || view >= m.views.views_per_image {
            return Err(StoreError::OutOfRange(format!(
                "image {image_id} view {view} outside the store ({} images x {} views)",
                m.dataset.num_images, m.views.views_per_image
            )));
        }
        let (shard, slot) = m.layout.slot(image_id, view, m.views.views_per_image);
        let shard = self.shard(shard)?;
        Ok(shard.record_checked(slot)?.map(|bytes| self.targets_of(bytes)))
    }

    /// Decoded access to `bytes`, a record of this store read by other means
    /// (e.g. [`ShardReader::record`] while verifying).
    pub fn targets_of<'a>(&'a self, bytes: &'a [u8]) -> TargetsRef<'a> {
        let m = &self.manifest;
        TargetsRef { bytes, codec: m.codec, tokens: m.teacher.tokens as usize, dim: m.teacher.dim as usize, pca: self.pca.as_deref() }
    }

    /// Rows of shard `s`'s index part, after checking the part's bytes
    /// against the CRC-32C and size in the shard's report (when recorded).
    ///
    /// # Errors
    /// IO, Parquet or schema errors; [`StoreError::Corrupt`] when the bytes
    /// differ from the report or a row is impossible (see [`decode_index`]).
    pub fn index_of(&self, s: u32) -> Result<Vec<IndexRow>> {
        let path = self.paths.index(s);
        let bytes = std::fs::read(&path).map_err(io(&path, "read index"))?;
        if let Some(report) = self.report(s)? {
            if bytes.len() as u64 != report.index_bytes {
                return Err(StoreError::Corrupt {
                    path,
                    offset: bytes.len() as u64,
                    what: format!("{} bytes, its shard report says {}", bytes.len(), report.index_bytes),
                });
            }
            if let Some(crc) = report.index_crc32c
                && crc32c::crc32c(&bytes) != crc
            {
                return Err(StoreError::Corrupt {
                    path,
                    offset: 0,
                    what: "checksum differs from the one in its shard report (damaged index; run `caev2 inspect verify`)".into(),
                });
            }
        }
        decode_index(&path, bytes)
    }

    /// All index rows of complete shards, in shard order.
    ///
    /// # Errors
    /// As [`Store::index_of`].
    pub fn index(&self) -> Result<Vec<IndexRow>> {
        let mut rows = Vec::new();
        for s in 0..self.manifest.layout.num_shards {
            if self.is_done(s) {
                rows.extend(self.index_of(s)?);
            }
        }
        Ok(rows)
    }

    /// The report of shard `s`, if complete.
    ///
    /// # Errors
    /// IO or JSON errors.
    pub fn report(&self, s: u32) -> Result<Option<ShardReport>> {
        let path = self.paths.done(s);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|source| StoreError::Json { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Io { path, op: "read report", source: e }),
        }
    }

    /// Stream every stored view in storage order: each shard's index part
    /// with its targets, reading the shard sequentially.
    pub fn stream(&self) -> impl Iterator<Item = Result<(IndexRow, TargetsRef<'_>)>> + '_ {
        (0..self.manifest.layout.num_shards).filter(|&s| self.is_done(s)).flat_map(move |s| {
            let rows = self.shard(s).and_then(|r| {
                r.advise_sequential();
                self.index_of(s)
            });
            let (rows, err) = match rows {
                Ok(r) => (r, None),
                Err(e) => (Vec::new(), Some(Err(e))),
            };
            err.into_iter().chain(rows.into_iter().map(move |row| {
                let t = self.targets(row.image_id, row.view)?.ok_or_else(|| StoreError::Corrupt {
                    path: self.paths.shard(row.shard),
                    offset: row.offset,
                    what: format!("index lists image {} view {} but its slot is empty", row.image_id, row.view),
                })?;
                Ok((row, t))
            }))
        })
    }
}
