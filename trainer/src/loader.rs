//! Streaming (image, view, targets) from a store: each epoch takes one stored
//! view per image, chosen by a seeded RNG, in a shuffled order; the image is
//! decoded, the student input rebuilt with the shared view code, the targets
//! read from the memory map (and mapped to the student grid when the
//! teacher's differs). Batches are built on a thread pool and prefetched
//! through a bounded channel.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use caev2_views::{DECODER_ID, SplitMix64, ViewParams, decode_image, normalize_chw, render_crop, resize_bicubic};
use crossbeam_channel::{Receiver, bounded};
use rayon::prelude::*;
use shard_store::{Store, resample_grid};

use crate::error::{Result, TrainError};
use crate::masking::MaskGenerator;

/// ImageNet mean/std used for the student input.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet std.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

const TAG_ORDER: u64 = 0x006f_7264_6572;
const TAG_VIEW: u64 = 0x7669_6577;
const TAG_MASK: u64 = 0x6d61_736b;

/// Loader settings.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Samples per batch.
    pub batch: usize,
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
    /// `[B, 1 + grid^2, D]` targets on the student grid (empty in live-teacher mode).
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

/// The stored views of one image.
#[derive(Debug, Clone)]
struct ImageViews {
    image_id: u64,
    path: String,
    views: Vec<(u32, ViewParams)>,
}

/// A store plus the image folder it was made from, checked for use by a
/// student of the given grid.
#[derive(Debug)]
pub struct DataSource {
    store: Arc<Store>,
    data: PathBuf,
    images: Vec<ImageViews>,
}

impl DataSource {
    /// Open `store` for a student of `image_size` px, reading images from
    /// `data`, using only the stored views in `views` (all when `None`).
    ///
    /// # Errors
    /// [`TrainError::Incompatible`] when the store's views were made for
    /// another student size or decoder, or the teacher has no CLS token;
    /// store errors.
    pub fn open(store_dir: &Path, data: &Path, image_size: u32, views: Option<std::ops::Range<u32>>) -> Result<Self> {
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
        if !data.is_dir() {
            return Err(TrainError::setting("--data", data.display(), "must be a folder"));
        }
        // Shard by shard, so only one index part is decoded at a time; each
        // image keeps its path once and its views' parameters.
        let mut images: Vec<ImageViews> = Vec::new();
        for shard in 0..m.layout.num_shards {
            for row in store.index_of(shard)? {
                if views.as_ref().is_some_and(|r| !r.contains(&row.view)) {
                    continue;
                }
                match images.last_mut() {
                    Some(iv) if iv.image_id == row.image_id => iv.views.push((row.view, row.params)),
                    _ => images.push(ImageViews { image_id: row.image_id, path: row.path, views: vec![(row.view, row.params)] }),
                }
            }
        }
        images.shrink_to_fit();
        if images.is_empty() {
            return Err(bad(format!(
                "it holds no views{}",
                views.map(|r| format!(" numbered {}..{}", r.start, r.end)).unwrap_or_default()
            )));
        }
        Ok(Self { store: Arc::new(store), data: data.to_owned(), images })
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Images with at least one stored view.
    pub fn num_images(&self) -> usize {
        self.images.len()
    }

    /// Full batches per epoch.
    pub fn steps_per_epoch(&self, batch: usize) -> u64 {
        (self.images.len() / batch.max(1)) as u64
    }

    /// `(image index, view index)` of every sample of epoch `epoch`, in order.
    fn epoch_plan(&self, seed: u64, epoch: u64) -> Vec<(usize, usize)> {
        let mut order: Vec<usize> = (0..self.images.len()).collect();
        SplitMix64::keyed(seed, &[TAG_ORDER, epoch]).shuffle(&mut order);
        order
            .into_iter()
            .map(|i| {
                let n = self.images[i].views.len() as u64;
                (i, SplitMix64::keyed(seed, &[TAG_VIEW, epoch, self.images[i].image_id]).below(n) as usize)
            })
            .collect()
    }

    /// Stream batches for global steps `start..end` on a background thread.
    pub fn stream(self: &Arc<Self>, cfg: LoaderConfig, masks: MaskGenerator, start: u64, end: u64) -> Receiver<Result<Batch>> {
        let (tx, rx) = bounded(cfg.prefetch.max(1));
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
                let mut plan_epoch = u64::MAX;
                let mut plan = Vec::new();
                for step in start..end {
                    let epoch = step / spe;
                    if epoch != plan_epoch {
                        plan = me.epoch_plan(cfg.seed, epoch);
                        plan_epoch = epoch;
                    }
                    let b = (step % spe) as usize;
                    let picks = &plan[b * cfg.batch..(b + 1) * cfg.batch];
                    let batch = pool.install(|| me.build_batch(&cfg, &masks, step, epoch, picks));
                    if tx.send(batch).is_err() {
                        return;
                    }
                }
            })
            .ok();
        rx
    }

    fn build_batch(&self, cfg: &LoaderConfig, masks: &MaskGenerator, step: u64, epoch: u64, picks: &[(usize, usize)]) -> Result<Batch> {
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
            .map(|(img_buf, &(i, v))| {
                let iv = &self.images[i];
                let (view, params) = &iv.views[v];
                let path = self.data.join(&iv.path);
                let decoded = decode_image(&path, m.views.settings.apply_exif_orientation)
                    .map_err(|source| TrainError::Decode { image_id: iv.image_id, source })?;
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
                normalize_chw(&resize_bicubic(&crop, cfg.image_size, cfg.image_size), IMAGENET_MEAN, IMAGENET_STD, img_buf);
                let mut teacher_in = Vec::new();
                let mut target = Vec::new();
                if cfg.teacher_inputs {
                    teacher_in = vec![0f32; per_teacher];
                    normalize_chw(&resize_bicubic(&crop, st as u32, st as u32), m.teacher.mean, m.teacher.std, &mut teacher_in);
                } else {
                    let t = self.store.targets(iv.image_id, *view)?.ok_or_else(|| TrainError::Targets {
                        image_id: iv.image_id,
                        view: *view,
                        what: "listed in the index but not stored".into(),
                    })?;
                    let values = t.to_vec();
                    if values.iter().any(|x| !x.is_finite()) {
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
        let samples = picks.iter().map(|&(i, v)| (self.images[i].image_id, self.images[i].views[v].0)).collect();
        Ok(Batch { step, epoch, images, targets, teacher_inputs, visible, masked, samples })
    }
}
