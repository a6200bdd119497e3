//! The extraction pipeline: decode + view rendering on a thread pool,
//! teacher inference, and shard writing, as three overlapping stages joined
//! by bounded channels.
//!
//! ```text
//! producer (rayon pool)  --Msg-->  inference (ONNX Runtime)  --Msg-->  writer (encode on rayon's pool, fsync, commit)
//! ```
//! Within a shard, views flow in image/view order and batches never span
//! shards, so a shard's bytes do not depend on which shards ran before it
//! (resume gives the same store as an uninterrupted run).

use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use caev2_views::{DECODER_ID, ViewParams, ViewSampler, ViewSettings, decode_image_bytes, normalize_chw, render_view};
use crossbeam_channel::{Receiver, Sender, bounded};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use shard_store::{
    Codec, CodecFit, DatasetInfo, ImagePackWriter, IndexRow, Layout, Manifest, PcaFit, PcaModel, ShardClaim, ShardReport, ShardWriter,
    Skipped, StorePaths, StoreWriter, ViewsInfo, fit_sample_images,
};

use crate::dataset::Dataset;
use crate::error::{ExtractError, Result};
use teacher::{Teacher, TeacherError, TeacherSpec};

/// Settings of one extraction run.
#[derive(Debug, Clone)]
pub struct ExtractConfig {
    /// Image folder.
    pub data: PathBuf,
    /// Store folder (with `publish`, the local staging copy of the bucket's store).
    pub out: PathBuf,
    /// Object storage the store is published to: every committed shard is
    /// uploaded and checked before its report appears there, and shards are
    /// claimed in the bucket so that machines without a shared file system
    /// divide the work.
    pub publish: Option<remote_store::Publisher>,
    /// The teacher.
    pub teacher: TeacherSpec,
    /// Views per image (K).
    pub views: u32,
    /// Teacher batch size.
    pub batch: usize,
    /// ONNX Runtime intra-op threads.
    pub threads: usize,
    /// Decode/render threads.
    pub decode_threads: usize,
    /// Target codec.
    pub codec: Codec,
    /// How a codec that needs a fit (`pca`) is fitted, when the store is new.
    pub fit: PcaFit,
    /// View sampler seed.
    pub seed: u64,
    /// Student input size recorded with the views.
    pub student_size: u32,
    /// Images per shard.
    pub images_per_shard: u32,
    /// Number of cooperating workers (processes or machines).
    pub num_workers: u32,
    /// This worker's index in `0..num_workers`: it takes shards `s` with
    /// `s % num_workers == worker_index`.
    pub worker_index: u32,
    /// Restrict to these shards (after the worker split).
    pub shards: Option<Range<u32>>,
    /// Apply EXIF orientation when decoding.
    pub apply_exif_orientation: bool,
    /// Store the images' file bytes in the store (format version 2), so
    /// that training needs no image folder.
    pub embed_images: bool,
    /// Write every teacher input tensor to this folder (debugging/tests).
    pub dump_inputs: Option<PathBuf>,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// Largest `--views` (K).
pub const MAX_VIEWS: u32 = 1000;
/// Largest teacher `--batch`.
pub const MAX_BATCH: usize = 1024;
/// Largest `--images-per-shard`.
pub const MAX_IMAGES_PER_SHARD: u32 = 1 << 20;
/// Largest `--threads` / `--decode-threads`.
pub const MAX_THREADS: usize = 1024;
/// Student sizes accepted by `--student-size` (a /16 student needs at least 16 px).
pub const STUDENT_SIZES: std::ops::RangeInclusive<u32> = 16..=1024;
/// Teacher sizes accepted by `--teacher-size`.
pub const TEACHER_SIZES: std::ops::RangeInclusive<u32> = 1..=2048;
/// Largest shard file a run may plan (images per shard x views x record).
pub const MAX_SHARD_BYTES: u64 = 64_000_000_000;

/// Committed shards waiting for their upload to a bucket before the writer
/// waits too (each is on local disk meanwhile).
const UPLOADS_QUEUED: usize = 2;

/// Default `--views` (K), as in the paper's offline setting.
pub const DEFAULT_VIEWS: u32 = 10;
/// Default teacher batch.
pub const DEFAULT_BATCH: usize = 32;
/// Default `--images-per-shard` (~516 MB shards for CLIP-B/16 in f16 at K = 10).
pub const DEFAULT_IMAGES_PER_SHARD: u32 = 256;
/// Default student input size (the paper's 224 px).
pub const DEFAULT_STUDENT_SIZE: u32 = 224;

/// Cores of this machine: the default of every `--threads` (the trainer's
/// too, through the command line).
pub fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

impl ExtractConfig {
    /// The defaults: K = [`DEFAULT_VIEWS`] views per image, teacher batch
    /// [`DEFAULT_BATCH`], f16 targets, seed 0, [`DEFAULT_STUDENT_SIZE`] px
    /// students, [`DEFAULT_IMAGES_PER_SHARD`] images per shard, one worker,
    /// ONNX Runtime on every core and a quarter of them decoding, EXIF
    /// orientation applied, no progress bar.
    pub fn new(data: PathBuf, out: PathBuf, teacher: TeacherSpec) -> Self {
        Self {
            data,
            out,
            publish: None,
            teacher,
            views: DEFAULT_VIEWS,
            batch: DEFAULT_BATCH,
            threads: cores(),
            decode_threads: (cores() / 4).max(1),
            codec: Codec::F16,
            fit: PcaFit::default(),
            seed: 0,
            student_size: DEFAULT_STUDENT_SIZE,
            images_per_shard: DEFAULT_IMAGES_PER_SHARD,
            num_workers: 1,
            worker_index: 0,
            shards: None,
            apply_exif_orientation: true,
            embed_images: false,
            dump_inputs: None,
            progress: false,
        }
    }

    /// Check every setting against its bounds, before anything is read or
    /// written, so a bad argument never leaves a store that refuses the
    /// corrected retry.
    ///
    /// # Errors
    /// [`ExtractError::Setting`] naming the option and its bounds.
    pub fn validate(&self) -> Result<()> {
        fn bounded<T: PartialOrd + std::fmt::Display>(flag: &'static str, v: T, lo: T, hi: T, unit: &str) -> Result<()> {
            if lo <= v && v <= hi {
                return Ok(());
            }
            Err(ExtractError::Setting { flag, value: v.to_string(), expected: format!("must be between {lo} and {hi}{unit}") })
        }
        bounded("--views", self.views, 1, MAX_VIEWS, "")?;
        bounded("--batch", self.batch, 1, MAX_BATCH, "")?;
        bounded("--images-per-shard", self.images_per_shard, 1, MAX_IMAGES_PER_SHARD, "")?;
        bounded("--threads", self.threads, 1, MAX_THREADS, "")?;
        bounded("--decode-threads", self.decode_threads, 1, MAX_THREADS, "")?;
        if self.codec.needs_fit() {
            bounded("--fit-views", self.fit.views, 1, 1_000_000, "")?;
            bounded("--fit-cosine", self.fit.cosine, 0.5, 0.99999, "")?;
        }
        bounded("--student-size", self.student_size, *STUDENT_SIZES.start(), *STUDENT_SIZES.end(), " px")?;
        if let Some(t) = self.teacher.input_size {
            bounded("--teacher-size", t, *TEACHER_SIZES.start(), *TEACHER_SIZES.end(), " px")?;
        }
        if self.num_workers == 0 || self.worker_index >= self.num_workers {
            return Err(ExtractError::Setting {
                flag: "--worker-index",
                value: self.worker_index.to_string(),
                expected: format!("must be below --num-workers {}", self.num_workers),
            });
        }
        shard_store::check_local(&self.data).map_err(ExtractError::Store)?;
        shard_store::check_local(&self.out).map_err(ExtractError::Store)?;
        Ok(())
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct ExtractSummary {
    /// Images in the dataset.
    pub images: u64,
    /// Shards in the store.
    pub shards_total: u32,
    /// Shards this run wrote.
    pub shards_written: u32,
    /// Shards that were already complete.
    pub shards_already_done: u32,
    /// Shards of this worker held by another process (left to it).
    pub shards_busy: u32,
    /// Shards assigned to other workers.
    pub shards_other_workers: u32,
    /// Views stored by this run.
    pub views_stored: u64,
    /// Images this run could not decode.
    pub skipped: Vec<Skipped>,
    /// Bytes written (shards + index).
    pub bytes_written: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Part of `elapsed` spent loading and probing the teacher.
    pub teacher_load: Duration,
    /// Whether every shard of the store is now complete.
    pub store_complete: bool,
    /// The store's manifest.
    pub manifest: Option<Manifest>,
}

/// One view's teacher input and where it goes.
struct ViewJob {
    image_id: u64,
    view: u32,
    params: ViewParams,
}

enum Msg<'a> {
    Start(ShardClaim<'a>),
    /// An image's file bytes, for a store that carries its images.
    File(u64, Vec<u8>),
    Views(Vec<ViewJob>, Vec<f32>),
    Skip(Skipped),
    Targets(Vec<ViewJob>, Vec<f32>),
    End,
}

/// What the decode stage needs.
struct Decode<'a> {
    cfg: &'a ExtractConfig,
    ds: &'a Dataset,
    sampler: &'a ViewSampler,
    pool: &'a rayon::ThreadPool,
    /// Teacher input size.
    size: u32,
    mean: [f32; 3],
    std: [f32; 3],
    /// Images decoded in parallel at a time.
    chunk: usize,
}

impl Decode<'_> {
    /// The teacher inputs of every view of image `id` (after its file
    /// bytes, for a store that carries its images), or why it is skipped.
    fn image(&self, id: u64) -> Vec<Msg<'static>> {
        let (cfg, file) = (self.cfg, &self.ds.files[id as usize]);
        let skip = |reason: String| vec![Msg::Skip(Skipped { image_id: id, path: file.rel.clone(), reason })];
        if let Some(why) = &file.problem {
            return skip(why.clone());
        }
        let path = self.ds.path_of(id as usize);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => return skip(format!("{}: read: {e}", path.display())),
        };
        let img = match decode_image_bytes(&bytes, &path, cfg.apply_exif_orientation) {
            Ok(d) => d.rgb,
            Err(e) => return skip(e.to_string()),
        };
        let per_view = 3 * self.size as usize * self.size as usize;
        let mut input = vec![0f32; per_view * cfg.views as usize];
        let mut jobs = Vec::with_capacity(cfg.views as usize);
        for (v, buf) in (0..cfg.views).zip(input.chunks_exact_mut(per_view)) {
            let params = self.sampler.sample(id, v, img.width(), img.height());
            normalize_chw(&render_view(&img, &params, self.size), self.mean, self.std, buf);
            jobs.push(ViewJob { image_id: id, view: v, params });
        }
        let views = Msg::Views(jobs, input);
        if cfg.embed_images { vec![Msg::File(id, bytes), views] } else { vec![views] }
    }

    /// With `--debug-dump-inputs`, write each view's teacher input.
    fn dump(&self, m: &Msg<'_>) -> Result<()> {
        if let (Some(dir), Msg::Views(jobs, input)) = (&self.cfg.dump_inputs, m) {
            let per_view = input.len() / jobs.len().max(1);
            for (j, buf) in jobs.iter().zip(input.chunks_exact(per_view.max(1))) {
                let p = dir.join(format!("{}-{}.f32", j.image_id, j.view));
                let bytes: Vec<u8> = buf.iter().flat_map(|x| x.to_le_bytes()).collect();
                std::fs::write(&p, bytes).map_err(|e| ExtractError::io(&p, "write dump", e))?;
            }
        }
        Ok(())
    }
}

/// Stage 1: claim each shard of `todo` (skipping those another process
/// holds) and send, in image order, every image's rendered views or its
/// skip, between the shard's `Start` and `End`. Returns the shards left to
/// other processes.
fn decode_stage<'a>(d: &Decode<'_>, store: &'a StoreWriter, todo: &[u32], tx: Sender<Msg<'a>>) -> Result<u32> {
    let mut busy = 0;
    let num_images = d.ds.files.len() as u64;
    for &shard in todo {
        let Some(claim) = store.try_claim(shard)? else {
            busy += 1;
            continue;
        };
        // a worker on another machine may hold it in the bucket
        if let Some(p) = &d.cfg.publish
            && !p.claim(shard)?
        {
            busy += 1;
            continue;
        }
        let ids: Vec<u64> = store.manifest().layout.images_of(shard, num_images).collect();
        if tx.send(Msg::Start(claim)).is_err() {
            return Ok(busy);
        }
        for part in ids.chunks(d.chunk) {
            let prepared: Vec<Vec<Msg<'static>>> = d.pool.install(|| part.par_iter().map(|&id| d.image(id)).collect());
            for m in prepared.into_iter().flatten() {
                d.dump(&m)?;
                if tx.send(m).is_err() {
                    return Ok(busy);
                }
            }
        }
        if tx.send(Msg::End).is_err() {
            return Ok(busy);
        }
    }
    Ok(busy)
}

/// Stage 2: gather rendered views into teacher batches of `batch`, run the
/// teacher, and pass targets (and every other message, in order) on to the
/// writer. A shard's last views are flushed at its end, so batches never
/// span shards and a shard's bytes do not depend on what ran before.
fn infer_stage<'a>(rx: Receiver<Msg<'a>>, tx: Sender<Msg<'a>>, teacher: &mut Teacher, batch: usize, per_view: usize) -> Result<()> {
    let mut jobs: Vec<ViewJob> = Vec::new();
    let mut input: Vec<f32> = Vec::new();
    // Ok(false): the writer stopped (its error explains why)
    let mut flush = |jobs: &mut Vec<ViewJob>, input: &mut Vec<f32>, all: bool| -> Result<bool> {
        while jobs.len() >= batch || (all && !jobs.is_empty()) {
            let n = jobs.len().min(batch);
            let out = teacher.forward(&input[..n * per_view], n)?;
            let batch_jobs: Vec<ViewJob> = jobs.drain(..n).collect();
            input.drain(..n * per_view);
            if tx.send(Msg::Targets(batch_jobs, out)).is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    };
    for m in rx {
        let go_on = match m {
            Msg::Views(j, inp) => {
                jobs.extend(j);
                input.extend_from_slice(&inp);
                flush(&mut jobs, &mut input, false)?
            }
            Msg::End => flush(&mut jobs, &mut input, true)? && tx.send(Msg::End).is_ok(),
            other => tx.send(other).is_ok(),
        };
        if !go_on {
            return Ok(());
        }
    }
    Ok(())
}

/// A shard the writer stage is filling.
struct OpenShard<'a> {
    claim: ShardClaim<'a>,
    writer: ShardWriter,
    /// The image pack, for a store that carries its images.
    pack: Option<ImagePackWriter>,
    rows: Vec<IndexRow>,
    skipped: Vec<Skipped>,
}

/// What the writer stage committed.
#[derive(Default)]
struct Written {
    shards: u32,
    views: u64,
    skipped: Vec<Skipped>,
    bytes: u64,
}

/// Stage 3: put each view's targets in its slot (refusing non-finite
/// values), and commit a shard (index, shard file, report) at its end.
fn write_stage(
    rx: Receiver<Msg<'_>>,
    cfg: &ExtractConfig,
    manifest: &Manifest,
    ds: &Dataset,
    bar: &ProgressBar,
    to_upload: Option<Sender<u32>>,
) -> Result<Written> {
    let mut done = Written::default();
    let values = manifest.values_per_view();
    let mut current: Option<OpenShard<'_>> = None;
    for m in rx {
        match m {
            Msg::Start(claim) => {
                let writer = claim.writer()?;
                let pack = claim.image_writer()?;
                current = Some(OpenShard { claim, writer, pack, rows: Vec::new(), skipped: Vec::new() });
            }
            Msg::File(id, bytes) => {
                if let Some(pack) = current.as_mut().and_then(|o| o.pack.as_mut()) {
                    pack.write(id, &bytes)?;
                }
            }
            Msg::Targets(jobs, out) => {
                let Some(open) = current.as_mut() else { continue };
                for (j, t) in jobs.iter().zip(out.chunks_exact(values)) {
                    if let Some(bad) = t.iter().find(|x| !x.is_finite()) {
                        return Err(ExtractError::Teacher(TeacherError::Model {
                            path: cfg.teacher.path.clone(),
                            what: format!(
                                "output {bad} for view {} of {}: the teacher's targets must be finite; nothing was stored for this shard",
                                j.view, ds.files[j.image_id as usize].rel
                            ),
                        }));
                    }
                }
                // a batch's records are encoded in parallel (pca costs a few
                // ms per view), then written in order
                let writer = &open.writer;
                let records: Vec<shard_store::Result<Vec<u8>>> = out
                    .par_chunks_exact(values)
                    .map(|t| {
                        let mut rec = Vec::new();
                        writer.encode_into(t, &mut rec).map(|()| rec)
                    })
                    .collect();
                for (j, rec) in jobs.into_iter().zip(records) {
                    let f = &ds.files[j.image_id as usize];
                    let (_, slot) = manifest.layout.slot(j.image_id, j.view, cfg.views);
                    let e = open.writer.write_encoded(slot, &rec?)?;
                    open.rows.push(IndexRow {
                        image_id: j.image_id,
                        path: f.rel.clone(),
                        label: f.label,
                        view: j.view,
                        params: j.params,
                        shard: open.claim.shard(),
                        offset: e.offset,
                        length: e.length,
                        crc32c: e.crc,
                    });
                    bar.inc(1);
                }
            }
            Msg::Skip(s) => {
                if let Some(open) = current.as_mut() {
                    bar.inc(u64::from(cfg.views));
                    bar.println(format!("skipped {}: {}", s.path, s.reason));
                    open.skipped.push(s);
                }
            }
            Msg::End => {
                if let Some(open) = current.take() {
                    let range = manifest.layout.images_of(open.claim.shard(), manifest.dataset.num_images);
                    let report = ShardReport::new(open.claim.shard(), range, open.rows.len() as u64, open.skipped);
                    let shard = open.claim.shard();
                    let r = open.claim.commit(open.writer, open.pack, &open.rows, report)?;
                    if let Some(tx) = &to_upload
                        && tx.send(shard).is_err()
                    {
                        return Ok(done); // the uploader stopped: its error explains why
                    }
                    done.shards += 1;
                    done.views += r.views_stored;
                    done.bytes += r.shard_bytes + r.index_bytes + r.images_bytes.unwrap_or(0);
                    done.skipped.extend(r.skipped);
                    bar.set_message(format!("{} shards written", done.shards));
                }
            }
            Msg::Views(..) => {}
        }
    }
    Ok(done)
}

/// Fit a codec that needs it (`pca`) on the teacher's targets for every
/// view of [`fit_sample_images`]: decoded on the pool, run through the
/// teacher in batches. Those views are computed again with their shards;
/// at ImageNet scale the fit costs ~0.01 % of the run.
fn fit_codec(d: &Decode<'_>, teacher: &mut Teacher, manifest: &Manifest, per_view: usize) -> Result<PcaModel> {
    let cfg = d.cfg;
    let ids = fit_sample_images(manifest.dataset.num_images, cfg.views, cfg.fit.views);
    if cfg.progress {
        eprintln!(
            "fitting the {} codec on the {} views of {} images spread over the dataset",
            cfg.codec,
            cfg.views as usize * ids.len(),
            ids.len()
        );
    }
    let mut sample = Vec::new();
    for part in ids.chunks(d.chunk.max(1)) {
        let prepared: Vec<Vec<Msg<'static>>> = d.pool.install(|| part.par_iter().map(|&id| d.image(id)).collect());
        for m in prepared.into_iter().flatten() {
            if let Msg::Views(jobs, input) = m {
                for (b, chunk) in input.chunks(cfg.batch * per_view).enumerate() {
                    let n = chunk.len() / per_view;
                    let out = teacher.forward(chunk, n)?;
                    if let Some(bad) = out.iter().find(|x| !x.is_finite()) {
                        return Err(ExtractError::Teacher(TeacherError::Model {
                            path: cfg.teacher.path.clone(),
                            what: format!(
                                "output {bad} for image {} in the codec fit: the teacher's targets must be finite",
                                jobs[b * cfg.batch].image_id
                            ),
                        }));
                    }
                    sample.extend(out);
                }
            }
        }
    }
    if sample.is_empty() {
        return Err(ExtractError::Setting {
            flag: "--codec",
            value: cfg.codec.to_string(),
            expected: "a fit sample: none of the sampled images decoded".into(),
        });
    }
    Ok(manifest.teacher.fit_pca(&sample, cfg.fit.cosine)?)
}

/// The manifest a run with `cfg` writes, given the loaded teacher and the
/// scanned dataset.
pub fn build_manifest(cfg: &ExtractConfig, teacher: &Teacher, ds: &Dataset) -> Manifest {
    let settings = ViewSettings {
        apply_exif_orientation: cfg.apply_exif_orientation,
        ..ViewSettings::cae_v2(cfg.student_size, teacher.info().input_size)
    };
    Manifest::new(
        teacher.info().clone(),
        ViewsInfo { seed: cfg.seed, views_per_image: cfg.views, settings, decoder: DECODER_ID.into() },
        cfg.codec,
        DatasetInfo {
            root: std::fs::canonicalize(&ds.root).unwrap_or_else(|_| ds.root.clone()).display().to_string(),
            num_images: ds.files.len() as u64,
            file_list_sha256: ds.file_list_sha256(),
            classes: ds.classes.clone(),
        },
        Layout::new(ds.files.len() as u64, cfg.images_per_shard),
        format!("caev2 {}", env!("CARGO_PKG_VERSION")),
    )
    .with_codec_fit(CodecFit::asked(cfg.codec, cfg.fit))
    .with_embedded_images(cfg.embed_images)
}

/// Run an extraction (or resume one).
///
/// # Errors
/// Invalid settings, teacher or store problems, IO errors. Undecodable
/// images are not errors: they are skipped and reported.
pub fn run_extract(cfg: &ExtractConfig) -> Result<ExtractSummary> {
    let start = Instant::now();
    cfg.validate()?;
    let ds = Dataset::scan(&cfg.data)?;
    let load_start = Instant::now();
    let mut teacher = Teacher::load(&cfg.teacher, cfg.threads)?;
    let teacher_load = load_start.elapsed();
    let manifest = build_manifest(cfg, &teacher, &ds);
    let shard_bytes = u64::from(cfg.images_per_shard)
        * u64::from(cfg.views)
        * manifest.codec.encoded_len(manifest.teacher.tokens as usize, manifest.teacher.dim as usize) as u64;
    if shard_bytes > MAX_SHARD_BYTES {
        return Err(ExtractError::Setting {
            flag: "--images-per-shard",
            value: cfg.images_per_shard.to_string(),
            expected: format!(
                "with --views {} and {} bytes per view this makes {:.1} GB shards (at most {} GB); lower it",
                cfg.views,
                manifest.codec.encoded_len(manifest.teacher.tokens as usize, manifest.teacher.dim as usize),
                shard_bytes as f64 / 1e9,
                MAX_SHARD_BYTES / 1_000_000_000
            ),
        });
    }
    if let Some(d) = &cfg.dump_inputs {
        std::fs::create_dir_all(d).map_err(|e| ExtractError::io(d, "create dump folder", e))?;
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.decode_threads.max(1))
        .thread_name(|i| format!("caev2-decode-{i}"))
        .build()
        .map_err(|e| ExtractError::Thread { stage: "decode", what: format!("pool could not start: {e}") })?;
    let sampler = ViewSampler::new(cfg.seed, manifest.views.settings.clone());
    let s = manifest.teacher.input_size;
    let per_view = 3 * s as usize * s as usize;
    let (mean, std) = (manifest.teacher.mean, manifest.teacher.std);
    // Enough images per chunk to keep every decode thread and one batch busy.
    let chunk = (cfg.batch.div_ceil(cfg.views as usize)).max(cfg.decode_threads * 2).max(1);
    let decode = Decode { cfg, ds: &ds, sampler: &sampler, pool: &pool, size: s, mean, std, chunk };
    // join the bucket's store, if it has one
    let joined = match &cfg.publish {
        Some(p) => p.pull_manifest(&cfg.out)?,
        None => false,
    };
    let mut store = StoreWriter::create_or_open_fitting(&cfg.out, &manifest, || fit_codec(&decode, &mut teacher, &manifest, per_view))?;
    if let Some(p) = &cfg.publish
        && let Some(remote) = p.push_manifest(&cfg.out, store.manifest())?
    {
        if joined {
            return Err(p.another_store(&remote, store.manifest()).into());
        }
        // another worker created the store first, with another codec fit: add to its store
        p.adopt_manifest(&cfg.out, store.manifest(), &remote)?;
        store = StoreWriter::create_or_open_fitting(&cfg.out, &manifest, || fit_codec(&decode, &mut teacher, &manifest, per_view))?;
    }
    let manifest = store.manifest().clone();
    let remote_done = match &cfg.publish {
        Some(p) => Some(p.done_shards()?.into_iter().collect::<std::collections::BTreeSet<u32>>()),
        None => None,
    };
    // complete here and, with a bucket, there too (a shard committed here by
    // a worker killed before its upload ended is uploaded now)
    let is_done = |s: u32| -> Result<bool> {
        match (&cfg.publish, &remote_done) {
            (Some(p), Some(remote)) => {
                if remote.contains(&s) {
                    return Ok(true);
                }
                if store.is_done(s) {
                    p.publish(store.paths(), &manifest, s)?;
                    return Ok(true);
                }
                Ok(false)
            }
            _ => Ok(store.is_done(s)),
        }
    };

    let layout = &manifest.layout;
    let mut summary = ExtractSummary { images: ds.files.len() as u64, shards_total: layout.num_shards, teacher_load, ..Default::default() };
    let mut todo = Vec::new();
    for s in 0..layout.num_shards {
        if s % cfg.num_workers != cfg.worker_index || cfg.shards.as_ref().is_some_and(|r| !r.contains(&s)) {
            summary.shards_other_workers += 1;
        } else if is_done(s)? {
            summary.shards_already_done += 1;
        } else {
            todo.push(s);
        }
    }
    let total_views: u64 = todo.iter().map(|&s| layout.images_of(s, summary.images).count() as u64).sum::<u64>() * u64::from(cfg.views);
    let bar = if cfg.progress { ProgressBar::new(total_views) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} extract [{elapsed_precise}] {wide_bar} {pos}/{len} views  {per_sec}  ETA {eta}  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    let cap = (2 * cfg.batch).div_ceil(cfg.views as usize).max(4);

    let (to_infer, from_producer) = bounded::<Msg<'_>>(cap);
    let (to_writer, from_infer) = bounded::<Msg<'_>>(4);

    let result = std::thread::scope(|scope| -> Result<()> {
        let (store, todo) = (&store, &todo);
        let producer = scope.spawn(move || decode_stage(&decode, store, todo, to_infer));

        let infer = scope.spawn(|| infer_stage(from_producer, to_writer, &mut teacher, cfg.batch, per_view));

        // With a bucket, committed shards are uploaded behind the pipeline,
        // at most UPLOADS_QUEUED waiting, so the teacher does not wait on the network.
        let (to_upload, uploads) = match &cfg.publish {
            Some(_) => {
                let (tx, rx) = bounded::<u32>(UPLOADS_QUEUED);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let uploader = scope.spawn(|| -> Result<()> {
            if let (Some(p), Some(rx)) = (&cfg.publish, uploads) {
                let paths = StorePaths::new(&cfg.out);
                for shard in rx {
                    p.publish(&paths, &manifest, shard)?;
                }
            }
            Ok(())
        });

        let writer = scope.spawn(|| write_stage(from_infer, cfg, &manifest, &ds, &bar, to_upload));

        let died = |stage| ExtractError::Thread { stage, what: "panicked".into() };
        let w = writer.join().map_err(|_| died("writer"))?;
        let u = uploader.join().map_err(|_| died("upload"))?;
        let i = infer.join().map_err(|_| died("inference"))?;
        let p = producer.join().map_err(|_| died("decode"))?;
        // The first stage to fail explains the others' early stops.
        u?;
        let written = w?;
        i?;
        summary.shards_busy = p?;
        summary.shards_written = written.shards;
        summary.views_stored = written.views;
        summary.skipped = written.skipped;
        summary.bytes_written = written.bytes;
        Ok(())
    });
    bar.finish_and_clear();
    result?;
    summary.store_complete = match &cfg.publish {
        Some(p) => p.done_shards()?.len() as u32 == layout.num_shards,
        None => (0..layout.num_shards).all(|s| store.is_done(s)),
    };
    summary.elapsed = start.elapsed();
    summary.manifest = Some(manifest);
    Ok(summary)
}
