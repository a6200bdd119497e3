//! Streaming (image, view, targets) from a store: each epoch takes one stored
//! view per image, chosen by a seeded RNG, in a shuffled order; the image is
//! decoded, the student input rebuilt with the shared view code, the targets
//! read from the memory map (and mapped to the student grid when the
//! teacher's differs). Batches are built on a thread pool and prefetched
//! through a bounded channel.
//!
//! With fresh views ([`DataSource::with_fresh_views`], the authors' regime:
//! K = infinity) each epoch instead draws a new view of every image from the
//! store's own sampler (its seed and settings), numbered
//! [`fresh_view`]`(epoch)`, a number no stored view has; the live teacher
//! then computes its targets in the loop. Order and masks are the cached
//! run's, so the two regimes differ only in the views.
//!
//! Memory: between epochs a process keeps only each image's id and view
//! count (10 bytes). At each epoch a helper thread reads the index for the
//! samples this process builds in the next epoch (its rows of every global
//! batch, one chosen view per image): a data-parallel rank holds 1/N of them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use caev2_views::{DECODER_ID, SplitMix64, ViewParams, ViewSampler, decode_image, decode_image_bytes, normalize_chw, render_crop};
use crossbeam_channel::{Receiver, bounded};
use rayon::prelude::*;
use shard_store::{Codec, Store, resample_grid};

use crate::error::{Result, TrainError};
use crate::masking::MaskGenerator;

/// ImageNet mean/std used for the student input.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet std.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

const TAG_ORDER: u64 = 0x006f_7264_6572;
const TAG_VIEW: u64 = 0x7669_6577;
const TAG_MASK: u64 = 0x6d61_736b;

/// The view number of epoch 0's fresh views; epoch `e` draws view
/// `FRESH_VIEW_BASE + e`. Stored views are numbered from 0 and a store holds
/// far fewer than 2^31 per image, so a fresh view is never a stored one.
pub const FRESH_VIEW_BASE: u32 = 1 << 31;

/// The view number every image's fresh view of `epoch` is drawn with, or
/// `None` past the 2^31 epochs that numbers can tell apart.
pub fn fresh_view(epoch: u64) -> Option<u32> {
    u32::try_from(epoch).ok().and_then(|e| FRESH_VIEW_BASE.checked_add(e))
}

/// Loader settings.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Samples per global batch.
    pub batch: usize,
    /// The rows of every global batch this process builds (`0..batch` for
    /// one process; a data-parallel rank's slice otherwise).
    pub rows: std::ops::Range<usize>,
    /// Seed of view choice, order and masks.
    pub seed: u64,
    /// Decode threads.
    pub threads: usize,
    /// Batches prefetched.
    pub prefetch: usize,
    /// Student input size.
    pub image_size: u32,
    /// Student patch grid (rows = cols).
    pub grid: usize,
    /// Also render the teacher's input (live-teacher mode) instead of reading targets.
    pub teacher_inputs: bool,
}

/// One batch, in flat row-major buffers ready for `Tensor::from_slice`.
#[derive(Debug)]
pub struct Batch {
    /// Global step this batch is for.
    pub step: u64,
    /// Epoch.
    pub epoch: u64,
    /// `[B, 3, S, S]` student inputs.
    pub images: Vec<f32>,
    /// `[B, 1 + grid^2, D]` targets on the student grid (empty in
    /// live-teacher mode); from a `pca` store, the coefficients that
    /// [`TargetMap`] turns into targets on the device.
    pub targets: Vec<f32>,
    /// `[B, 3, St, St]` teacher inputs (live-teacher mode only).
    pub teacher_inputs: Vec<f32>,
    /// `[B, Nv]` visible patch indices.
    pub visible: Vec<i64>,
    /// `[B, Nm]` masked patch indices.
    pub masked: Vec<i64>,
    /// `(image id, view)` of each sample.
    pub samples: Vec<(u64, u32)>,
}

/// Targets, teacher input and mask of one sample.
type SampleParts = (Vec<f32>, Vec<f32>, Vec<bool>);

/// One sample of an epoch: the image and the view chosen for it.
#[derive(Debug, Clone)]
struct Sample {
    image_id: u64,
    path: String,
    view: u32,
    params: ViewParams,
}

/// A store plus its images (the folder it was made from, or the store
/// itself when it carries them), checked for use by a student of the given
/// grid.
#[derive(Debug)]
pub struct DataSource {
    store: Arc<Store>,
    /// The image folder; `None`: the store's embedded images.
    data: Option<PathBuf>,
    /// Stored views used (all when `None`).
    views: Option<std::ops::Range<u32>>,
    /// Ids of the images with at least one view in `views`, ascending.
    ids: Vec<u64>,
    /// Number of such views of each image.
    counts: Vec<u16>,
    /// Draw a fresh view of every image in every epoch with the store's
    /// sampler instead of choosing a stored one.
    fresh: Option<ViewSampler>,
}

impl DataSource {
    /// Open `store` for a student of `image_size` px, reading images from
    /// `data` (from the store itself when `None`: a store that carries its
    /// images), using only the stored views in `views` (all when `None`).
    ///
    /// # Errors
    /// [`TrainError::Incompatible`] when the store's views were made for
    /// another student size or decoder, or the teacher has no CLS token;
    /// store errors.
    pub fn open(store_dir: &Path, data: Option<&Path>, image_size: u32, views: Option<std::ops::Range<u32>>) -> Result<Self> {
        let store = Store::open(store_dir)?;
        let m = store.manifest();
        let bad = |what: String| TrainError::Incompatible { store: store_dir.to_owned(), what };
        if m.views.settings.student_size != image_size {
            return Err(bad(format!(
                "its views record a {} px student input, the student wants {image_size} px; re-extract with --student-size {image_size}",
                m.views.settings.student_size
            )));
        }
        if m.views.decoder != DECODER_ID {
            return Err(bad(format!(
                "it was made with image decoder {:?}, this build decodes with {DECODER_ID:?}; views would not rebuild bit for bit",
                m.views.decoder
            )));
        }
        if !m.teacher.has_cls {
            return Err(bad("its teacher has no CLS token, but the CAE v2 loss aligns the CLS output".into()));
        }
        match data {
            Some(d) if !d.is_dir() => return Err(TrainError::setting("--data", d.display(), "must be a folder")),
            None if !m.embeds_images() => {
                return Err(bad(
                    "it does not carry its images (extracted without --embed-images): give --data, the image folder it was extracted from"
                        .into(),
                ));
            }
            _ => {}
        }
        // Shard by shard, so only one index part is decoded at a time; each
        // image keeps only its id and how many views it has.
        let (mut ids, mut counts): (Vec<u64>, Vec<u16>) = (Vec::new(), Vec::new());
        for shard in 0..m.layout.num_shards {
            for row in store.index_of(shard)? {
                if views.as_ref().is_some_and(|r| !r.contains(&row.view)) {
                    continue;
                }
                match (ids.last(), counts.last_mut()) {
                    (Some(&id), Some(n)) if id == row.image_id => *n = n.saturating_add(1),
                    _ => {
                        ids.push(row.image_id);
                        counts.push(1);
                    }
                }
            }
        }
        ids.shrink_to_fit();
        counts.shrink_to_fit();
        if ids.is_empty() {
            return Err(bad(format!(
                "it holds no views{}",
                views.map(|r| format!(" numbered {}..{}", r.start, r.end)).unwrap_or_default()
            )));
        }
        Ok(Self { store: Arc::new(store), data: data.map(Path::to_owned), views, ids, counts, fresh: None })
    }

    /// The same images, but every epoch draws a new view of each from the
    /// store's sampler (the manifest's seed and settings, as `extract` drew
    /// the stored ones), numbered [`fresh_view`]`(epoch)`. The loader then
    /// renders teacher inputs, not stored targets: train it with
    /// [`LoaderConfig::teacher_inputs`] and a live teacher.
    ///
    /// # Errors
    /// [`TrainError::Incompatible`] when the store could hold a view with a
    /// fresh view's number, or when only some of its views are used (fresh
    /// views use none of them).
    pub fn with_fresh_views(mut self) -> Result<Self> {
        let m = self.store.manifest();
        let bad = |what: String| TrainError::Incompatible { store: self.store.paths().root().to_owned(), what };
        if self.views.is_some() {
            return Err(bad("fresh views use no stored view, so there is no stored view range to choose (drop --train-views)".into()));
        }
        if m.views.views_per_image >= FRESH_VIEW_BASE {
            return Err(bad(format!(
                "it stores {} views per image; fresh views are numbered from {FRESH_VIEW_BASE} and would repeat stored ones",
                m.views.views_per_image
            )));
        }
        self.fresh = Some(ViewSampler::new(m.views.seed, m.views.settings.clone()));
        Ok(self)
    }

    /// Whether every epoch draws fresh views.
    pub fn fresh_views(&self) -> bool {
        self.fresh.is_some()
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Images with at least one stored view.
    pub fn num_images(&self) -> usize {
        self.ids.len()
    }

    /// Full batches per epoch.
    pub fn steps_per_epoch(&self, batch: usize) -> u64 {
        (self.ids.len() / batch.max(1)) as u64
    }

    /// `(image index, view ordinal)` of every sample of epoch `epoch`, in
    /// order (the ordinal counts the image's views in the range used).
    fn epoch_plan(&self, seed: u64, epoch: u64) -> Vec<(usize, usize)> {
        let mut order: Vec<usize> = (0..self.ids.len()).collect();
        SplitMix64::keyed(seed, &[TAG_ORDER, epoch]).shuffle(&mut order);
        order
            .into_iter()
            .map(|i| {
                if self.fresh.is_some() {
                    // the first stored view only gives the path and the size
                    return (i, 0);
                }
                let n = u64::from(self.counts[i]);
                (i, SplitMix64::keyed(seed, &[TAG_VIEW, epoch, self.ids[i]]).below(n) as usize)
            })
            .collect()
    }

    /// The samples this process builds in epoch `epoch`: rows `rows` of each
    /// of the epoch's global batches of `batch`, in order, with their paths
    /// and view parameters read from the index (with fresh views: drawn
    /// from the sampler for the image's size the index records).
    fn epoch_samples(&self, seed: u64, epoch: u64, batch: usize, rows: &std::ops::Range<usize>) -> Result<Vec<Sample>> {
        let fresh = match &self.fresh {
            Some(sampler) => {
                let view = fresh_view(epoch).ok_or_else(|| TrainError::Loader(format!("epoch {epoch}: past the last fresh view")))?;
                Some((sampler, view))
            }
            None => None,
        };
        let plan = self.epoch_plan(seed, epoch);
        let steps = self.steps_per_epoch(batch) as usize;
        let mine: Vec<(usize, usize)> =
            (0..steps).flat_map(|b| plan[b * batch + rows.start..b * batch + rows.end].iter().copied()).collect();
        drop(plan);
        // wanted (image id, ordinal, position), by image id: the index is read
        // shard by shard, in image order
        let mut wanted: Vec<(u64, usize, usize)> = mine.iter().enumerate().map(|(pos, &(i, k))| (self.ids[i], k, pos)).collect();
        wanted.sort_unstable();
        let mut found: Vec<Option<Sample>> = vec![None; mine.len()];
        let ips = u64::from(self.store.manifest().layout.images_per_shard.max(1));
        let mut next = 0;
        while next < wanted.len() {
            let shard = (wanted[next].0 / ips) as u32;
            let (mut ordinal, mut current) = (0usize, u64::MAX);
            for row in self.store.index_of(shard)? {
                if self.views.as_ref().is_some_and(|r| !r.contains(&row.view)) {
                    continue;
                }
                if row.image_id != current {
                    (current, ordinal) = (row.image_id, 0);
                } else {
                    ordinal += 1;
                }
                while next < wanted.len() && (wanted[next].0, wanted[next].1) < (row.image_id, ordinal) {
                    next += 1; // not in this shard's index any more: reported below
                }
                if next < wanted.len() && (wanted[next].0, wanted[next].1) == (row.image_id, ordinal) {
                    let (view, params) = match fresh {
                        Some((sampler, v)) => (v, sampler.sample(row.image_id, v, row.params.image_width, row.params.image_height)),
                        None => (row.view, row.params),
                    };
                    found[wanted[next].2] = Some(Sample { image_id: row.image_id, path: row.path, view, params });
                    next += 1;
                }
            }
            while next < wanted.len() && wanted[next].0 / ips == u64::from(shard) {
                next += 1;
            }
        }
        found
            .into_iter()
            .zip(&mine)
            .map(|(s, &(i, k))| {
                s.ok_or_else(|| TrainError::Targets {
                    image_id: self.ids[i],
                    view: k as u32,
                    what: "its view is no longer in the store's index (the store changed during training)".into(),
                })
            })
            .collect()
    }

    /// `(image id, view, parameters)` of every image's view in epoch
    /// `epoch` of a run seeded `seed`, in the epoch's order: the stored view
    /// chosen for it, or with fresh views the new one.
    ///
    /// # Errors
    /// Store errors.
    pub fn epoch_views(&self, seed: u64, epoch: u64) -> Result<Vec<(u64, u32, ViewParams)>> {
        Ok(self.epoch_samples(seed, epoch, 1, &(0..1))?.into_iter().map(|s| (s.image_id, s.view, s.params)).collect())
    }

    /// Stream batches for global steps `start..end` on a background thread.
    pub fn stream(self: &Arc<Self>, cfg: LoaderConfig, masks: MaskGenerator, start: u64, end: u64) -> Receiver<Result<Batch>> {
        let (tx, rx) = bounded(cfg.prefetch.max(1));
        if self.fresh.is_some() && !cfg.teacher_inputs {
            let _ = tx.send(Err(TrainError::Loader("fresh views have no stored targets: they need a live teacher".into())));
            return rx;
        }
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("caev2-loader".into())
            .spawn(move || {
                let pool = match rayon::ThreadPoolBuilder::new()
                    .num_threads(cfg.threads.max(1))
                    .thread_name(|i| format!("caev2-load-{i}"))
                    .build()
                {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(TrainError::Loader(format!("could not start: {e}"))));
                        return;
                    }
                };
                let spe = me.steps_per_epoch(cfg.batch).max(1);
                if start >= end {
                    return;
                }
                // the next epoch's samples are read while this one trains
                let (etx, erx) = bounded::<Result<Vec<Sample>>>(1);
                let reader = Arc::clone(&me);
                let (seed, batch, rows) = (cfg.seed, cfg.batch, cfg.rows.clone());
                let spawned = std::thread::Builder::new().name("caev2-epochs".into()).spawn(move || {
                    for epoch in start / spe..=(end - 1) / spe {
                        if etx.send(reader.epoch_samples(seed, epoch, batch, &rows)).is_err() {
                            return;
                        }
                    }
                });
                if let Err(e) = spawned {
                    let _ = tx.send(Err(TrainError::Loader(format!("could not start: {e}"))));
                    return;
                }
                let local = cfg.rows.len();
                let mut samples = Vec::new();
                for step in start..end {
                    let epoch = step / spe;
                    if step == start || step % spe == 0 {
                        samples = match erx.recv() {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                            Err(_) => {
                                let _ = tx.send(Err(TrainError::Loader("stopped reading the index".into())));
                                return;
                            }
                        };
                    }
                    let b = (step % spe) as usize;
                    let picks = &samples[b * local..(b + 1) * local];
                    let batch = pool.install(|| me.build_batch(&cfg, &masks, step, epoch, picks));
                    if tx.send(batch).is_err() {
                        return;
                    }
                }
            })
            .ok();
        rx
    }

    fn build_batch(&self, cfg: &LoaderConfig, masks: &MaskGenerator, step: u64, epoch: u64, picks: &[Sample]) -> Result<Batch> {
        let m = self.store.manifest();
        let s = cfg.image_size as usize;
        let per_img = 3 * s * s;
        let st = m.teacher.input_size as usize;
        let per_teacher = if cfg.teacher_inputs { 3 * st * st } else { 0 };
        let dim = m.teacher.dim as usize;
        let per_target = if cfg.teacher_inputs { 0 } else { (1 + cfg.grid * cfg.grid) * dim };
        let from = (m.teacher.grid[0] as usize, m.teacher.grid[1] as usize);
        let nm = masks.num_masked;
        let np = cfg.grid * cfg.grid;
        let bsz = picks.len();
        let mut images = vec![0f32; bsz * per_img];
        // Student inputs are written in place; targets, teacher inputs and
        // masks come back per sample.
        let parts: Vec<Result<SampleParts>> = images
            .par_chunks_mut(per_img)
            .zip(picks.par_iter())
            .map(|(img_buf, iv)| {
                let (view, params) = (&iv.view, &iv.params);
                let (path, decoded) = match &self.data {
                    Some(data) => {
                        let path = data.join(&iv.path);
                        (path.clone(), decode_image(&path, m.views.settings.apply_exif_orientation))
                    }
                    None => {
                        // the store's copy of the file: the bytes extract decoded
                        let (shard, _) = m.layout.slot(iv.image_id, 0, 1);
                        let path = PathBuf::from(format!("{} ({})", self.store.paths().images(shard).display(), iv.path));
                        let bytes = self.store.image(iv.image_id)?.ok_or_else(|| TrainError::Targets {
                            image_id: iv.image_id,
                            view: *view,
                            what: "has views but no image bytes in the store".into(),
                        })?;
                        let decoded = decode_image_bytes(bytes, &path, m.views.settings.apply_exif_orientation);
                        (path, decoded)
                    }
                };
                let decoded = decoded.map_err(|source| TrainError::Decode { image_id: iv.image_id, source })?;
                if (decoded.rgb.width(), decoded.rgb.height()) != (params.image_width, params.image_height) {
                    return Err(TrainError::Image {
                        path: path.clone(),
                        image_id: iv.image_id,
                        what: format!(
                            "decodes to {}x{}, the store recorded {}x{}: the image changed since extraction",
                            decoded.rgb.width(),
                            decoded.rgb.height(),
                            params.image_width,
                            params.image_height
                        ),
                    });
                }
                let crop = render_crop(&decoded.rgb, params);
                normalize_chw(&crop.resize(cfg.image_size, cfg.image_size), IMAGENET_MEAN, IMAGENET_STD, img_buf);
                let mut teacher_in = Vec::new();
                let mut target = Vec::new();
                if cfg.teacher_inputs {
                    teacher_in = vec![0f32; per_teacher];
                    normalize_chw(&crop.resize(st as u32, st as u32), m.teacher.mean, m.teacher.std, &mut teacher_in);
                } else {
                    let t = self.store.targets(iv.image_id, *view)?.ok_or_else(|| TrainError::Targets {
                        image_id: iv.image_id,
                        view: *view,
                        what: "listed in the index but not stored".into(),
                    })?;
                    let mut values = vec![0f32; t.tokens * t.dim];
                    if !t.decode_for_training(&mut values) {
                        return Err(TrainError::Targets {
                            image_id: iv.image_id,
                            view: *view,
                            what: "its stored record does not decode (damaged store; run `caev2 inspect verify`)".into(),
                        });
                    }
                    // (pca coefficients are finite by construction: small
                    // integers times the model's checked step)
                    if t.codec != Codec::Pca && !all_finite(&values) {
                        return Err(TrainError::Targets {
                            image_id: iv.image_id,
                            view: *view,
                            what: "its stored targets are not finite (damaged store; run `caev2 inspect verify`)".into(),
                        });
                    }
                    target =
                        if from == (cfg.grid, cfg.grid) { values } else { resample_grid(&values, dim, true, from, (cfg.grid, cfg.grid)) };
                }
                let mask = masks.generate(&mut SplitMix64::keyed(cfg.seed, &[TAG_MASK, epoch, iv.image_id]));
                Ok((target, teacher_in, mask))
            })
            .collect();
        let mut targets = Vec::with_capacity(bsz * per_target);
        let mut teacher_inputs = Vec::with_capacity(bsz * per_teacher);
        let mut visible = Vec::with_capacity(bsz * (np - nm));
        let mut masked = Vec::with_capacity(bsz * nm);
        for part in parts {
            let (t, ti, mask) = part?;
            targets.extend_from_slice(&t);
            teacher_inputs.extend_from_slice(&ti);
            for (p, &is_masked) in mask.iter().enumerate() {
                if is_masked { masked.push(p as i64) } else { visible.push(p as i64) }
            }
        }
        let samples = picks.iter().map(|p| (p.image_id, p.view)).collect();
        Ok(Batch { step, epoch, images, targets, teacher_inputs, visible, masked, samples })
    }
}

/// Whether every value is finite, without an early exit (so it vectorises:
/// a whole view is checked in a few microseconds).
fn all_finite(values: &[f32]) -> bool {
    values.iter().fold(0u32, |bad, x| bad | u32::from(!x.is_finite())) == 0
}

/// What turns the loader's `targets` into teacher targets on the device:
/// for a `pca` store, its model's affine reconstruction
/// `coefficients @ basis + mean` (grid resampling in the loader commutes
/// with it: bilinear weights sum to one); nothing for other codecs.
#[derive(Debug)]
pub struct TargetMap {
    /// `[D, D]`, row `k` = principal axis `k`.
    basis: tch::Tensor,
    /// `[D]`.
    mean: tch::Tensor,
}

impl TargetMap {
    /// The map for `store`'s codec, on `device` (`None`: targets are stored as is).
    pub fn of(store: &Store, device: tch::Device) -> Option<Self> {
        store.codec_model().map(|m| {
            let d = m.dim() as i64;
            Self {
                basis: tch::Tensor::from_slice(m.basis()).view([d, d]).to_device(device),
                mean: tch::Tensor::from_slice(m.mean()).to_device(device),
            }
        })
    }

    /// The targets of `stored` (`[..., D]` coefficients).
    pub fn apply(&self, stored: &tch::Tensor) -> tch::Tensor {
        stored.matmul(&self.basis) + &self.mean
    }
}
