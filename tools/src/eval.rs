//! `caev2 eval`: k-NN and linear-probe quality of an encoder's features on a
//! labelled image folder, for a trainer checkpoint, a random-init encoder of
//! the same size (the floor) and the teacher's ONNX model (the ceiling);
//! and [`alignment`], a student's cosine to the teacher's targets on
//! held-out stored views.
//!
//! Images are resized (shorter side to 256/224 of the input size, Pillow
//! bicubic) and centre-cropped, as in the usual evaluation transforms.
//! Features: the CLS token and the mean of the patch tokens (the encoder's
//! final-norm outputs; the teacher's output tokens). With no separate
//! validation split, accuracy is k-fold cross-validated.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use caev2_views::{RgbImage, SplitMix64, decode_image, normalize_chw, resize_bicubic};
use rayon::prelude::*;
use serde::Serialize;
use target_extractor::Dataset;
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor, nn};
use teacher::{Teacher, TeacherSpec};
use trainer::loader::{DataSource, LoaderConfig, TargetMap};
use trainer::masking::MaskGenerator;
use trainer::model::{Cae2, ModelConfig, Pass, Preset};

/// A labelled image folder.
#[derive(Debug, Clone)]
pub struct Labelled {
    /// Folder.
    pub root: PathBuf,
    /// Relative paths.
    pub files: Vec<String>,
    /// Label index per file.
    pub labels: Vec<usize>,
    /// Label names.
    pub classes: Vec<String>,
}

/// Read an ImageNet-layout folder; labels are the class folders, or, with
/// `labels = Some((tsv, column))`, the column of a TSV (with a header, first
/// column the folder name) such as imagenet-sample's `coarse-labels.tsv`.
///
/// # Errors
/// Unlabelled files, folders missing from the TSV, IO.
pub fn load_labelled(root: &Path, labels: Option<(&Path, &str)>) -> Result<Labelled> {
    let ds = Dataset::scan(root)?;
    let folder_of = |rel: &str| rel.split_once('/').map(|(c, _)| c.to_owned());
    let map: Option<BTreeMap<String, String>> = match labels {
        None => None,
        Some((tsv, column)) => {
            let text = std::fs::read_to_string(tsv).with_context(|| format!("reading {}", tsv.display()))?;
            let mut lines = text.lines();
            let header: Vec<&str> = lines.next().unwrap_or("").split('\t').collect();
            let col = header
                .iter()
                .position(|h| *h == column)
                .with_context(|| format!("{}: no column {column:?} in {header:?}", tsv.display()))?;
            Some(
                lines
                    .filter_map(|l| {
                        let f: Vec<&str> = l.split('\t').collect();
                        Some((f.first()?.to_string(), f.get(col)?.to_string()))
                    })
                    .collect(),
            )
        }
    };
    let mut names = Vec::new();
    for f in &ds.files {
        let folder = folder_of(&f.rel).with_context(|| format!("{}: not inside a class folder", f.rel))?;
        let name = match &map {
            Some(m) => m.get(&folder).cloned().with_context(|| format!("class folder {folder} is not in the label file"))?,
            None => folder,
        };
        names.push(name);
    }
    let mut classes: Vec<String> = names.clone();
    classes.sort();
    classes.dedup();
    let labels = names.iter().map(|n| classes.binary_search(n).unwrap_or(0)).collect();
    Ok(Labelled { root: root.to_owned(), files: ds.files.into_iter().map(|f| f.rel).collect(), labels, classes })
}

/// An encoder to evaluate.
#[derive(Debug, Clone)]
pub enum EncoderSpec {
    /// A trainer checkpoint (or run folder).
    Checkpoint(PathBuf),
    /// A randomly initialised student: size, input pixels, seed.
    Random(Preset, i64, u64),
    /// A teacher ONNX model.
    Teacher(PathBuf),
}

impl EncoderSpec {
    /// Display name.
    pub fn name(&self) -> String {
        match self {
            Self::Checkpoint(p) => format!("checkpoint {}", p.display()),
            Self::Random(p, px, s) => format!("random-init {} at {px} px (seed {s})", p.timm_name()),
            Self::Teacher(p) => format!("teacher {}", p.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()),
        }
    }
}

/// torchvision `Resize(round(s*256/224))` + `CenterCrop(s)` with Pillow bicubic.
pub fn eval_crop(img: &RgbImage, s: u32) -> RgbImage {
    let short = ((f64::from(s) * 256.0 / 224.0).round() as u32).max(s);
    let (w, h) = (img.width(), img.height());
    let (nw, nh) = if w <= h {
        (short, (f64::from(short) * f64::from(h) / f64::from(w)) as u32)
    } else {
        ((f64::from(short) * f64::from(w) / f64::from(h)) as u32, short)
    };
    let r = resize_bicubic(img, nw.max(s), nh.max(s));
    let top = ((f64::from(r.height() - s)) / 2.0).round() as u32;
    let left = ((f64::from(r.width() - s)) / 2.0).round() as u32;
    image::imageops::crop_imm(&r, left, top, s, s).to_image()
}

/// CLS and mean-pooled features, `[N, D]` each.
#[derive(Debug)]
pub struct Features {
    /// CLS features.
    pub cls: Vec<f32>,
    /// Mean of the patch tokens.
    pub mean: Vec<f32>,
    /// Feature size.
    pub dim: usize,
}

fn prepare(set: &Labelled, idx: &[usize], size: u32, mean: [f32; 3], std: [f32; 3]) -> Result<Vec<f32>> {
    let per = 3 * (size * size) as usize;
    let mut buf = vec![0f32; idx.len() * per];
    buf.par_chunks_mut(per).zip(idx.par_iter()).try_for_each(|(b, &i)| -> Result<()> {
        let img = decode_image(&set.root.join(&set.files[i]), true)?.rgb;
        normalize_chw(&eval_crop(&img, size), mean, std, b);
        Ok(())
    })?;
    Ok(buf)
}

/// Compute the features of every image of `set` with `enc`.
///
/// # Errors
/// Unreadable images or models.
pub fn features(enc: &EncoderSpec, set: &Labelled, batch: usize, threads: usize) -> Result<Features> {
    let n = set.files.len();
    let order: Vec<usize> = (0..n).collect();
    let (mut cls, mut mean) = (Vec::new(), Vec::new());
    let dim;
    match enc {
        EncoderSpec::Teacher(path) => {
            let mut t = Teacher::load(&TeacherSpec { path: path.clone(), ..Default::default() }, threads)?;
            let info = t.info().clone();
            dim = info.dim as usize;
            for chunk in order.chunks(batch) {
                let x = prepare(set, chunk, info.input_size, info.mean, info.std)?;
                let out = t.forward(&x, chunk.len())?;
                for tok in out.chunks(info.tokens as usize * dim) {
                    let c = usize::from(info.has_cls);
                    cls.extend_from_slice(&tok[..dim]);
                    let patches = &tok[c * dim..];
                    let np = patches.len() / dim;
                    mean.extend((0..dim).map(|d| (0..np).map(|p| patches[p * dim + d]).sum::<f32>() / np as f32));
                }
            }
        }
        _ => {
            let (model, _vs) = match enc {
                EncoderSpec::Checkpoint(p) => {
                    let l = trainer::load_checkpoint(p, Device::Cpu)?;
                    (l.model, l.vs)
                }
                EncoderSpec::Random(preset, px, seed) => {
                    let cfg = ModelConfig::preset(*preset, 512)
                        .with_image_size(*px)
                        .ok_or_else(|| anyhow::anyhow!("random-init encoder: {px} px is not a multiple of the patch size"))?;
                    let (vs, model) = Cae2::seeded(&cfg, *seed, Device::Cpu);
                    (model, vs)
                }
                EncoderSpec::Teacher(_) => unreachable!("handled above"),
            };
            let cfg = model.config().clone();
            dim = cfg.width as usize;
            let s = cfg.image_size;
            for chunk in order.chunks(batch) {
                let x = prepare(set, chunk, s as u32, trainer::loader::IMAGENET_MEAN, trainer::loader::IMAGENET_STD)?;
                let b = chunk.len() as i64;
                let all = Tensor::arange(cfg.num_patches(), (Kind::Int64, Device::Cpu)).unsqueeze(0).repeat([b, 1]);
                let out = tch::no_grad(|| model.encode(&Tensor::from_slice(&x).view([b, 3, s, s]), &all, trainer::model::Pass::Eval));
                let c = out.narrow(1, 0, 1).squeeze_dim(1).contiguous();
                let m = out.narrow(1, 1, cfg.num_patches()).mean_dim(&[1i64][..], false, Kind::Float).contiguous();
                cls.extend(Vec::<f32>::try_from(c.flatten(0, -1))?);
                mean.extend(Vec::<f32>::try_from(m.flatten(0, -1))?);
            }
        }
    }
    Ok(Features { cls, mean, dim })
}

fn folds(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::keyed(seed, &[0x666f_6c64]).shuffle(&mut order);
    let mut fold = vec![0; n];
    for (pos, &i) in order.iter().enumerate() {
        fold[i] = pos % k;
    }
    fold
}

/// k-NN accuracy, k-fold cross-validated: cosine similarity, votes weighted
/// by `exp(sim / temperature)` over the `k` nearest training samples (the
/// DINO protocol).
#[allow(clippy::too_many_arguments)] // one argument per protocol setting
pub fn knn_cv(x: &[f32], dim: usize, labels: &[usize], classes: usize, k: usize, nfolds: usize, seed: u64, temperature: f64) -> f64 {
    let n = labels.len();
    let feats = Tensor::from_slice(x).view([n as i64, dim as i64]);
    let feats = &feats / feats.norm_scalaropt_dim(2.0, [1i64].as_slice(), true).clamp_min(1e-12);
    let fold = folds(n, nfolds.max(2), seed);
    let mut correct = 0usize;
    let sims: Vec<f32> = Vec::try_from(feats.matmul(&feats.tr()).flatten(0, -1)).unwrap_or_default();
    if sims.len() != n * n {
        return 0.0;
    }
    for i in 0..n {
        let row = &sims[i * n..(i + 1) * n];
        let mut cand: Vec<(f64, usize)> = (0..n).filter(|&j| fold[j] != fold[i]).map(|j| (f64::from(row[j]), labels[j])).collect();
        cand.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut votes = vec![0f64; classes];
        for &(s, l) in cand.iter().take(k) {
            votes[l] += (s / temperature).exp();
        }
        let pred = votes.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(c, _)| c).unwrap_or(0);
        correct += usize::from(pred == labels[i]);
    }
    correct as f64 / n as f64
}

/// Linear-probe accuracy, k-fold cross-validated: BatchNorm without affine
/// (applied with the training split's statistics, the running statistics a
/// BN layer converges to) then a linear classifier, trained with SGD
/// (momentum 0.9, cosine schedule, batch 256) and cross-entropy.
#[allow(clippy::too_many_arguments)] // one argument per protocol setting
pub fn linear_cv(x: &[f32], dim: usize, labels: &[usize], classes: usize, nfolds: usize, seed: u64, epochs: usize, lr: f64) -> f64 {
    let n = labels.len();
    let feats = Tensor::from_slice(x).view([n as i64, dim as i64]);
    let y = Tensor::from_slice(&labels.iter().map(|&l| l as i64).collect::<Vec<_>>());
    let fold = folds(n, nfolds.max(2), seed);
    let mut correct = 0i64;
    for f in 0..nfolds.max(2) {
        let tr: Vec<i64> = (0..n).filter(|&i| fold[i] != f).map(|i| i as i64).collect();
        let te: Vec<i64> = (0..n).filter(|&i| fold[i] == f).map(|i| i as i64).collect();
        if te.is_empty() {
            continue;
        }
        let (tr_i, te_i) = (Tensor::from_slice(&tr), Tensor::from_slice(&te));
        let xtr = feats.index_select(0, &tr_i);
        let mu = xtr.mean_dim(&[0i64][..], true, Kind::Float);
        let sd = (xtr.var_dim(&[0i64][..], false, true) + 1e-5).sqrt();
        let norm = |t: &Tensor| (t - &mu) / &sd;
        let (xtr, ytr) = (norm(&xtr), y.index_select(0, &tr_i));
        let (xte, yte) = (norm(&feats.index_select(0, &te_i)), y.index_select(0, &te_i));
        tch::manual_seed(seed as i64 + f as i64);
        let vs = nn::VarStore::new(Device::Cpu);
        let lin = nn::linear(vs.root(), dim as i64, classes as i64, Default::default());
        let mut opt = nn::Sgd { momentum: 0.9, ..Default::default() }.build(&vs, lr).expect("sgd");
        let ntr = tr.len() as i64;
        let steps_per_epoch = (ntr + 255) / 256;
        let total = (epochs as i64 * steps_per_epoch).max(1);
        let mut step = 0;
        for e in 0..epochs {
            let perm = Tensor::randperm(ntr, (Kind::Int64, Device::Cpu));
            let _ = e;
            for b in 0..steps_per_epoch {
                let idx = perm.narrow(0, b * 256, (ntr - b * 256).min(256));
                opt.set_lr(lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total as f64).cos()));
                let loss = nn::Module::forward(&lin, &xtr.index_select(0, &idx)).cross_entropy_for_logits(&ytr.index_select(0, &idx));
                opt.backward_step(&loss);
                step += 1;
            }
        }
        let pred = tch::no_grad(|| nn::Module::forward(&lin, &xte).argmax(1, false));
        correct += pred.eq_tensor(&yte).sum(Kind::Int64).int64_value(&[]);
    }
    correct as f64 / n as f64
}

/// One line of the results table.
#[derive(Debug, Clone, Serialize)]
pub struct EvalRow {
    /// Encoder.
    pub encoder: String,
    /// `cls` or `mean`.
    pub feature: String,
    /// Feature size.
    pub dim: usize,
    /// k-NN accuracy.
    pub knn: Option<f64>,
    /// Linear-probe accuracy.
    pub linear: Option<f64>,
}

/// Settings of an evaluation.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    /// Run k-NN.
    pub knn: bool,
    /// Run the linear probe.
    pub linear: bool,
    /// Neighbours.
    pub k: usize,
    /// Folds.
    pub folds: usize,
    /// Seed of folds and probe.
    pub seed: u64,
    /// Probe epochs.
    pub epochs: usize,
    /// Probe learning rate.
    pub lr: f64,
    /// Feature batch.
    pub batch: usize,
    /// Threads.
    pub threads: usize,
}

/// Evaluate each encoder on `set`.
///
/// # Errors
/// Model or image errors; a set with fewer than two classes.
pub fn evaluate(encoders: &[EncoderSpec], set: &Labelled, cfg: &EvalConfig) -> Result<Vec<EvalRow>> {
    if set.classes.len() < 2 {
        bail!("{}: {} class(es); evaluation needs at least two", set.root.display(), set.classes.len());
    }
    let mut rows = Vec::new();
    for enc in encoders {
        let f = features(enc, set, cfg.batch, cfg.threads).with_context(|| format!("features of {}", enc.name()))?;
        for (name, x) in [("cls", &f.cls), ("mean", &f.mean)] {
            rows.push(EvalRow {
                encoder: enc.name(),
                feature: name.into(),
                dim: f.dim,
                knn: cfg.knn.then(|| knn_cv(x, f.dim, &set.labels, set.classes.len(), cfg.k, cfg.folds, cfg.seed, 0.07)),
                linear: cfg.linear.then(|| linear_cv(x, f.dim, &set.labels, set.classes.len(), cfg.folds, cfg.seed, cfg.epochs, cfg.lr)),
            });
        }
    }
    Ok(rows)
}

/// The results as a text table.
pub fn format_table(rows: &[EvalRow], set: &Labelled, cfg: &EvalConfig) -> String {
    let mut s = format!(
        "{} images, {} classes, {}-fold cross-validation{}\n",
        set.files.len(),
        set.classes.len(),
        cfg.folds,
        if cfg.knn { format!(", k-NN k={} T=0.07", cfg.k) } else { String::new() }
    );
    s.push_str(&format!("{:<60} {:<5} {:>5} {:>8} {:>8}\n", "encoder", "feat", "dim", "k-NN", "linear"));
    let pct = |v: Option<f64>| v.map(|x| format!("{:.1}%", 100.0 * x)).unwrap_or_else(|| "-".into());
    for r in rows {
        s.push_str(&format!("{:<60} {:<5} {:>5} {:>8} {:>8}\n", r.encoder, r.feature, r.dim, pct(r.knn), pct(r.linear)));
    }
    s
}

/// Mean cosine between a student's predictions and the (L2-normalised)
/// teacher targets on the stored views `views` (e.g. views held out with
/// `train_views`): `(visible incl. CLS, masked)`, with the run's masking.
/// (The same masks for a student and its step-0 floor: they come from the
/// run's seed.)
///
/// # Errors
/// Store, data or model errors.
pub fn alignment(
    loaded: &trainer::LoadedModel,
    store: &Path,
    data: Option<&Path>,
    views: std::ops::Range<u32>,
    batch: usize,
    threads: usize,
) -> Result<(f64, f64)> {
    let cfg = &loaded.config;
    let grid = cfg.model.grid() as usize;
    let source = Arc::new(DataSource::open(store, data, cfg.model.image_size as u32, Some(views))?);
    let batch = batch.min(source.num_images()).max(1);
    let steps = source.steps_per_epoch(batch);
    let masks = MaskGenerator::new(grid, grid, cfg.num_masked, cfg.masking);
    let lc = LoaderConfig { batch, seed: cfg.seed ^ 0x000a_119e, ..trainer::loader_config(cfg, 0..batch, threads, false) };
    let map = TargetMap::of(source.store(), tch::Device::Cpu);
    let rx = source.stream(lc, masks, 0, steps);
    let dim = i64::from(source.store().manifest().teacher.dim);
    let (b, s, np, nm) = (batch as i64, cfg.model.image_size, (grid * grid) as i64, cfg.num_masked as i64);
    let (mut sv, mut sz, mut n) = (0f64, 0f64, 0f64);
    for batch_data in rx {
        let bd = batch_data?;
        let images = Tensor::from_slice(&bd.images).view([b, 3, s, s]);
        let stored = Tensor::from_slice(&bd.targets).view([b, 1 + np, dim]);
        let targets = trainer::loss::l2_normalize(&map.as_ref().map_or(stored.shallow_clone(), |m| m.apply(&stored)));
        let visible = Tensor::from_slice(&bd.visible).view([b, np - nm]);
        let masked = Tensor::from_slice(&bd.masked).view([b, nm]);
        let out = tch::no_grad(|| loaded.model.forward(&images, &visible, &masked, Pass::Eval));
        let patches = targets.narrow(1, 1, np);
        let tv = Tensor::cat(&[targets.narrow(1, 0, 1), patches.gather(1, &visible.unsqueeze(-1).expand([-1, -1, dim], false), false)], 1);
        let tz = patches.gather(1, &masked.unsqueeze(-1).expand([-1, -1, dim], false), false);
        sv += (&out.visible * tv).sum_dim_intlist(&[-1i64][..], false, Kind::Float).mean(Kind::Float).double_value(&[]);
        sz += (&out.masked * tz).sum_dim_intlist(&[-1i64][..], false, Kind::Float).mean(Kind::Float).double_value(&[]);
        n += 1.0;
    }
    Ok((sv / n.max(1.0), sz / n.max(1.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three well-separated clusters: both protocols must find every label;
    /// with labels unrelated to the features they must fall to chance.
    fn clusters(n_per: usize, shuffle_labels: bool) -> (Vec<f32>, Vec<usize>) {
        let mut rng = SplitMix64::new(5);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for c in 0..3 {
            for _ in 0..n_per {
                for d in 0..8 {
                    let centre = if d == c { 5.0 } else { 0.0 };
                    x.push(centre + rng.uniform(-1.0, 1.0) as f32);
                }
                y.push(c);
            }
        }
        if shuffle_labels {
            rng.shuffle(&mut y);
        }
        (x, y)
    }

    #[test]
    fn knn_and_linear_find_known_answers() {
        let (x, y) = clusters(30, false);
        assert_eq!(knn_cv(&x, 8, &y, 3, 10, 5, 0, 0.07), 1.0);
        assert_eq!(linear_cv(&x, 8, &y, 3, 5, 0, 30, 0.1), 1.0);
        let (x, y) = clusters(30, true);
        let chance = knn_cv(&x, 8, &y, 3, 10, 5, 0, 0.07);
        assert!(chance < 0.6, "labels unrelated to features must give about 1/3, got {chance}");
    }

    #[test]
    fn eval_crop_is_square_and_centred() {
        let img = RgbImage::from_fn(300, 200, |x, _| image::Rgb([(x % 256) as u8, 0, 0]));
        let c = eval_crop(&img, 224);
        assert_eq!(c.dimensions(), (224, 224));
    }
}
