//! The extraction pipeline: decode + view rendering on a thread pool,
//! teacher inference, and shard writing, as three overlapping stages joined
//! by bounded channels.
//!
//! ```text
//! producer (rayon pool)  --Msg-->  inference (ONNX Runtime)  --Msg-->  writer (encode, fsync, commit)
//! ```
//! Within a shard, views flow in image/view order and batches never span
//! shards, so a shard's bytes do not depend on which shards ran before it
//! (resume gives the same store as an uninterrupted run).

use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use caev2_views::{DECODER_ID, ViewParams, ViewSampler, ViewSettings, decode_image, normalize_chw, render_view};
use crossbeam_channel::{Receiver, Sender, bounded};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use shard_store::{Codec, DatasetInfo, IndexRow, Layout, Manifest, ShardClaim, ShardReport, Skipped, StoreWriter, ViewsInfo};

use crate::dataset::Dataset;
use crate::error::{ExtractError, Result};
use crate::teacher::{Teacher, TeacherSpec};

/// Settings of one extraction run.
#[derive(Debug, Clone)]
pub struct ExtractConfig {
    /// Image folder.
    pub data: PathBuf,
    /// Store folder.
    pub out: PathBuf,
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
    /// Write every teacher input tensor to this folder (debugging/tests).
    pub dump_inputs: Option<PathBuf>,
    /// Show a progress bar on stderr.
    pub progress: bool,
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
    Start(ShardClaim<'a>, Range<u64>),
    Views(Vec<ViewJob>, Vec<f32>),
    Skip(Skipped),
    Targets(Vec<ViewJob>, Vec<f32>),
    End,
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
}

/// Run an extraction (or resume one).
///
/// # Errors
/// Invalid settings, teacher or store problems, IO errors. Undecodable
/// images are not errors: they are skipped and reported.
pub fn run_extract(cfg: &ExtractConfig) -> Result<ExtractSummary> {
    let start = Instant::now();
    if cfg.views == 0 || cfg.batch == 0 || cfg.images_per_shard == 0 {
        return Err(ExtractError::Config("--views, --batch and --images-per-shard must be positive".into()));
    }
    if cfg.num_workers == 0 || cfg.worker_index >= cfg.num_workers {
        return Err(ExtractError::Config(format!("--worker-index {} must be below --num-workers {}", cfg.worker_index, cfg.num_workers)));
    }
    let ds = Dataset::scan(&cfg.data)?;
    let load_start = Instant::now();
    let mut teacher = Teacher::load(&cfg.teacher, cfg.threads)?;
    let teacher_load = load_start.elapsed();
    let manifest = build_manifest(cfg, &teacher, &ds);
    let store = StoreWriter::create_or_open(&cfg.out, &manifest)?;
    if let Some(d) = &cfg.dump_inputs {
        std::fs::create_dir_all(d).map_err(|e| ExtractError::io(d, "create dump folder", e))?;
    }

    let layout = &manifest.layout;
    let mut summary = ExtractSummary { images: ds.files.len() as u64, shards_total: layout.num_shards, teacher_load, ..Default::default() };
    let mut todo = Vec::new();
    for s in 0..layout.num_shards {
        if s % cfg.num_workers != cfg.worker_index || cfg.shards.as_ref().is_some_and(|r| !r.contains(&s)) {
            summary.shards_other_workers += 1;
        } else if store.is_done(s) {
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

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.decode_threads.max(1))
        .thread_name(|i| format!("caev2-decode-{i}"))
        .build()
        .map_err(|e| ExtractError::Config(format!("cannot start decode threads: {e}")))?;
    let sampler = ViewSampler::new(cfg.seed, manifest.views.settings.clone());
    let s = manifest.teacher.input_size;
    let per_view = 3 * s as usize * s as usize;
    let (mean, std) = (manifest.teacher.mean, manifest.teacher.std);
    // Enough images per chunk to keep every decode thread and one batch busy.
    let chunk = (cfg.batch.div_ceil(cfg.views as usize)).max(cfg.decode_threads * 2).max(1);
    let cap = (2 * cfg.batch).div_ceil(cfg.views as usize).max(4);

    let (to_infer, from_producer) = bounded::<Msg<'_>>(cap);
    let (to_writer, from_infer) = bounded::<Msg<'_>>(4);

    let result = std::thread::scope(|scope| -> Result<()> {
        let producer = scope.spawn(|| -> Result<u32> {
            let tx = to_infer;
            let mut busy = 0;
            for &shard in &todo {
                let Some(claim) = store.try_claim(shard)? else {
                    busy += 1;
                    continue;
                };
                let range = layout.images_of(shard, summary.images);
                if tx.send(Msg::Start(claim, range.clone())).is_err() {
                    return Ok(busy);
                }
                let ids: Vec<u64> = range.collect();
                for part in ids.chunks(chunk) {
                    let prepared: Vec<Msg<'_>> = pool.install(|| {
                        part.par_iter()
                            .map(|&id| {
                                let rel = &ds.files[id as usize].rel;
                                let img = match decode_image(&ds.path_of(id as usize), cfg.apply_exif_orientation) {
                                    Ok(d) => d.rgb,
                                    Err(e) => return Msg::Skip(Skipped { image_id: id, path: rel.clone(), reason: e.to_string() }),
                                };
                                let mut input = vec![0f32; per_view * cfg.views as usize];
                                let mut jobs = Vec::with_capacity(cfg.views as usize);
                                for (v, buf) in (0..cfg.views).zip(input.chunks_exact_mut(per_view)) {
                                    let params = sampler.sample(id, v, img.width(), img.height());
                                    normalize_chw(&render_view(&img, &params, s), mean, std, buf);
                                    jobs.push(ViewJob { image_id: id, view: v, params });
                                }
                                Msg::Views(jobs, input)
                            })
                            .collect()
                    });
                    for m in prepared {
                        if let (Some(dir), Msg::Views(jobs, input)) = (&cfg.dump_inputs, &m) {
                            for (j, buf) in jobs.iter().zip(input.chunks_exact(per_view)) {
                                let p = dir.join(format!("{}-{}.f32", j.image_id, j.view));
                                let bytes: Vec<u8> = buf.iter().flat_map(|x| x.to_le_bytes()).collect();
                                std::fs::write(&p, bytes).map_err(|e| ExtractError::io(&p, "write dump", e))?;
                            }
                        }
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
        });

        let infer = scope.spawn(|| -> Result<()> {
            let rx: Receiver<Msg<'_>> = from_producer;
            let tx: Sender<Msg<'_>> = to_writer;
            let mut jobs: Vec<ViewJob> = Vec::new();
            let mut input: Vec<f32> = Vec::new();
            let mut flush = |jobs: &mut Vec<ViewJob>, input: &mut Vec<f32>, all: bool, tx: &Sender<Msg<'_>>| -> Result<bool> {
                while jobs.len() >= cfg.batch || (all && !jobs.is_empty()) {
                    let n = jobs.len().min(cfg.batch);
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
                match m {
                    Msg::Views(j, inp) => {
                        jobs.extend(j);
                        input.extend_from_slice(&inp);
                        if !flush(&mut jobs, &mut input, false, &tx)? {
                            return Ok(());
                        }
                    }
                    Msg::End => {
                        if !flush(&mut jobs, &mut input, true, &tx)? || tx.send(Msg::End).is_err() {
                            return Ok(());
                        }
                    }
                    other => {
                        if tx.send(other).is_err() {
                            return Ok(());
                        }
                    }
                }
            }
            Ok(())
        });

        let writer = scope.spawn(|| -> Result<(u32, u64, Vec<Skipped>, u64)> {
            let rx: Receiver<Msg<'_>> = from_infer;
            let (mut shards, mut views, mut skipped_all, mut bytes) = (0u32, 0u64, Vec::new(), 0u64);
            let values = manifest.values_per_view();
            let mut current = None;
            for m in rx {
                match m {
                    Msg::Start(claim, range) => {
                        let w = claim.writer()?;
                        current = Some((claim, w, range, Vec::<IndexRow>::new(), Vec::<Skipped>::new()));
                    }
                    Msg::Targets(jobs, out) => {
                        let Some((claim, w, range, rows, _)) = current.as_mut() else { continue };
                        for (j, t) in jobs.into_iter().zip(out.chunks_exact(values)) {
                            let slot = (j.image_id - range.start) * u64::from(cfg.views) + u64::from(j.view);
                            let e = w.write(slot, t)?;
                            let f = &ds.files[j.image_id as usize];
                            rows.push(IndexRow {
                                image_id: j.image_id,
                                path: f.rel.clone(),
                                label: f.label,
                                view: j.view,
                                params: j.params,
                                shard: claim.shard(),
                                offset: e.offset,
                                length: e.length,
                                crc32c: e.crc,
                            });
                            bar.inc(1);
                        }
                    }
                    Msg::Skip(s) => {
                        if let Some((_, _, _, _, sk)) = current.as_mut() {
                            bar.inc(u64::from(cfg.views));
                            bar.println(format!("skipped {}: {}", s.path, s.reason));
                            sk.push(s);
                        }
                    }
                    Msg::End => {
                        if let Some((claim, w, range, rows, sk)) = current.take() {
                            let report = ShardReport {
                                shard: claim.shard(),
                                first_image: range.start,
                                num_images: (range.end - range.start) as u32,
                                views_stored: rows.len() as u64,
                                shard_bytes: 0,
                                index_bytes: 0,
                                skipped: sk,
                            };
                            let r = claim.commit(w, &rows, report)?;
                            shards += 1;
                            views += r.views_stored;
                            bytes += r.shard_bytes + r.index_bytes;
                            skipped_all.extend(r.skipped);
                            bar.set_message(format!("{shards} shards written"));
                        }
                    }
                    Msg::Views(..) => {}
                }
            }
            Ok((shards, views, skipped_all, bytes))
        });

        let w = writer.join().map_err(|_| ExtractError::Runtime("writer thread panicked".into()))?;
        let i = infer.join().map_err(|_| ExtractError::Runtime("inference thread panicked".into()))?;
        let p = producer.join().map_err(|_| ExtractError::Runtime("decode thread panicked".into()))?;
        // The first stage to fail explains the others' early stops.
        let (shards, views, skipped, bytes) = w?;
        i?;
        summary.shards_busy = p?;
        summary.shards_written = shards;
        summary.views_stored = views;
        summary.skipped = skipped;
        summary.bytes_written = bytes;
        Ok(())
    });
    bar.finish_and_clear();
    result?;
    summary.store_complete = (0..layout.num_shards).all(|s| store.is_done(s));
    summary.elapsed = start.elapsed();
    summary.manifest = Some(manifest);
    Ok(summary)
}
