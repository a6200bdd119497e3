//! `caev2 inspect`: what a store holds, and whether it is intact.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use caev2_views::ViewSampler;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::Serialize;
use sha2::Digest;
use shard_store::{Manifest, ShardReport, Skipped, Store};

/// `inspect summary` output.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Store folder.
    pub store: String,
    /// The manifest.
    pub manifest: Manifest,
    /// Shards complete / total.
    pub shards_done: u32,
    /// Shards in the layout.
    pub shards_total: u32,
    /// Views stored (from the shard reports).
    pub views_stored: u64,
    /// Images with at least one stored view.
    pub images_stored: u64,
    /// Bytes of shard files.
    pub shard_bytes: u64,
    /// Bytes of index files.
    pub index_bytes: u64,
    /// Bytes of image packs (stores that carry their images).
    pub image_bytes: u64,
    /// Bytes on disk per stored view (shards + index).
    pub bytes_per_view: f64,
    /// Images skipped, with reasons.
    pub skipped: Vec<Skipped>,
    /// The fitted codec model, for codecs that need one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub codec_model: Option<CodecModel>,
}

/// What a fitted codec model holds (see `shard_store::PcaModel`).
#[derive(Debug, Clone, Serialize)]
pub struct CodecModel {
    /// Views it was fitted on.
    pub fit_views: u64,
    /// Its quantiser step.
    pub step: f32,
    /// Mean token cosine reached on the fit views.
    pub fit_cosine: f32,
}

/// Summarise a store from its manifest and shard reports (no shard is read).
///
/// # Errors
/// Unreadable manifest or reports.
pub fn summary(root: &Path) -> Result<Summary> {
    let store = Store::open_partial(root).with_context(|| format!("opening store {}", root.display()))?;
    let m = store.manifest().clone();
    let (mut done, mut views, mut sb, mut ib, mut skipped, mut images) = (0, 0, 0, 0, Vec::new(), 0);
    let mut packs = 0;
    for s in 0..m.layout.num_shards {
        if let Some(r) = store.report(s)? {
            done += 1;
            views += r.views_stored;
            sb += r.shard_bytes;
            ib += r.index_bytes;
            packs += r.images_bytes.unwrap_or(0);
            // saturating: a damaged report is verify's to flag, not a panic here
            images += u64::from(r.num_images).saturating_sub(r.skipped.len() as u64);
            skipped.extend(r.skipped);
        }
    }
    Ok(Summary {
        store: root.display().to_string(),
        shards_total: m.layout.num_shards,
        manifest: m,
        shards_done: done,
        views_stored: views,
        images_stored: images,
        shard_bytes: sb,
        index_bytes: ib,
        image_bytes: packs,
        bytes_per_view: if views > 0 { (sb + ib) as f64 / views as f64 } else { 0.0 },
        skipped,
        codec_model: store.codec_model().map(|p| CodecModel { fit_views: p.fit_views(), step: p.step(), fit_cosine: p.fit_cosine() }),
    })
}

/// Human-readable rendering of a [`Summary`].
pub fn format_summary(s: &Summary) -> String {
    let m = &s.manifest;
    let t = &m.teacher;
    let v = &m.views;
    let mut out = String::new();
    let mut line = |k: &str, val: String| out.push_str(&format!("{k:<18} {val}\n"));
    line("store", format!("{} (id {}, format v{})", s.store, m.store_id, m.format_version));
    line("shards", format!("{}/{} complete ({} images per shard)", s.shards_done, s.shards_total, m.layout.images_per_shard));
    line("images", format!("{} in dataset, {} stored, {} skipped", m.dataset.num_images, s.images_stored, s.skipped.len()));
    line("views", format!("{} stored, {} per image", s.views_stored, v.views_per_image));
    if m.embeds_images() {
        line("image files", format!("embedded: {:.1} MB in image packs (no --data needed)", s.image_bytes as f64 / 1e6));
    } else {
        line("image files", "read from the dataset folder (--data)".into());
    }
    line("targets", format!("{} tokens x {} dims, codec {}", t.tokens, t.dim, m.codec));
    if let (Some(fit), Some(model)) = (&m.codec_fit, &s.codec_model) {
        line(
            "codec model",
            format!(
                "{} (fitted on {} views, step {:.4}, mean token cosine {:.5} on them)",
                fit.file, model.fit_views, model.step, model.fit_cosine
            ),
        );
    }
    line(
        "bytes",
        format!(
            "{:.1} MB shards + {:.2} MB index = {:.0} bytes per view",
            s.shard_bytes as f64 / 1e6,
            s.index_bytes as f64 / 1e6,
            s.bytes_per_view
        ),
    );
    line("teacher", format!("{} (sha256 {}..)", t.name, &t.onnx_sha256[..t.onnx_sha256.len().min(16)]));
    line(
        "teacher input",
        format!(
            "{} px, patch {}, grid {}x{}, cls {}, mean {:?}, std {:?}",
            t.input_size, t.patch_size, t.grid[0], t.grid[1], t.has_cls, t.mean, t.std
        ),
    );
    let vs = &v.settings;
    line(
        "views",
        format!(
            "seed {}, jitter b/c/s {}/{}/{}, flip p {}, crop scale {:?} ratio ({:.3}, {:.3}), student {} px, teacher {} px, {}, exif {}",
            v.seed,
            vs.brightness,
            vs.contrast,
            vs.saturation,
            vs.flip_prob,
            vs.scale,
            vs.ratio.0,
            vs.ratio.1,
            vs.student_size,
            vs.teacher_size,
            "pil-bicubic",
            if vs.apply_exif_orientation { "applied" } else { "ignored" }
        ),
    );
    line("decoder", v.decoder.clone());
    line(
        "dataset",
        format!("{} ({} classes, file list sha256 {}..)", m.dataset.root, m.dataset.classes.len(), &m.dataset.file_list_sha256[..16]),
    );
    for sk in s.skipped.iter().take(20) {
        out.push_str(&format!("  skipped {}: {}\n", sk.path, sk.reason));
    }
    if s.skipped.len() > 20 {
        out.push_str(&format!("  ... and {} more skipped\n", s.skipped.len() - 20));
    }
    out
}

/// One problem found by [`verify`].
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// Shard number, when the problem is in a shard or its index.
    pub shard: Option<u32>,
    /// Byte offset in the shard, when known.
    pub offset: Option<u64>,
    /// Description.
    pub what: String,
}

/// `inspect verify` output.
#[derive(Debug, Serialize)]
pub struct VerifyReport {
    /// Shards checked.
    pub shards_checked: u32,
    /// Views checked.
    pub views_checked: u64,
    /// Problems found (the first [`MAX_PROBLEMS_LISTED`]); empty when the
    /// store is intact.
    pub problems: Vec<Problem>,
    /// Problems found beyond those listed.
    pub problems_not_listed: u64,
}

/// What [`verify_shard`] found in one shard.
#[derive(Default)]
struct ShardCheck {
    /// Index rows checked.
    views: u64,
    problems: Vec<Problem>,
    /// The path of every image of the shard (index rows and skipped files),
    /// for the file-list hash.
    paths: Vec<(u64, String)>,
}

fn verify_shard(store: &Store, s: u32) -> ShardCheck {
    let m = store.manifest();
    let p = |offset: Option<u64>, what: String| Problem { shard: Some(s), offset, what };
    let failed = |what: String| ShardCheck { problems: vec![p(None, what)], ..ShardCheck::default() };
    let report = match store.report(s) {
        Ok(Some(r)) => r,
        Ok(None) => return failed("shard not complete (no done/ report)".into()),
        Err(e) => return failed(e.to_string()),
    };
    // opened for this check alone: unmapped when it ends
    let reader = match store.open_shard(s) {
        Ok(r) => r,
        Err(e) => return failed(e.to_string()),
    };
    let mut problems: Vec<Problem> = reader.verify_records().into_iter().map(|(_, off, what)| p(Some(off), what)).collect();
    // index_of checks the part's size and checksum against the report
    let rows = match store.index_of(s) {
        Ok(r) => r,
        Err(e) => {
            problems.push(p(None, e.to_string()));
            return ShardCheck { problems, ..ShardCheck::default() };
        }
    };
    let k = m.views.views_per_image;
    let range = m.layout.images_of(s, m.dataset.num_images);
    let sampler = ViewSampler::new(m.views.seed, m.views.settings.clone());
    let mut seen = HashSet::new();
    let mut values = vec![0f32; m.values_per_view()];
    for row in &rows {
        if !range.contains(&row.image_id) || row.view >= k || row.shard != s {
            problems.push(p(Some(row.offset), format!("index row image {} view {} does not belong to this shard", row.image_id, row.view)));
            continue;
        }
        if !seen.insert((row.image_id, row.view)) {
            problems.push(p(Some(row.offset), format!("image {} view {} listed twice in the index", row.image_id, row.view)));
        }
        // The parameters are a pure function of (seed, image, view, size):
        // any damaged crop, flip or jitter value shows up here.
        let expect = sampler.sample(row.image_id, row.view, row.params.image_width, row.params.image_height);
        if expect != row.params {
            problems.push(p(
                Some(row.offset),
                format!(
                    "image {} view {}: the index's view parameters differ from the seeded sampler's ({:?} vs {:?})",
                    row.image_id, row.view, row.params, expect
                ),
            ));
        }
        let (_, slot) = m.layout.slot(row.image_id, row.view, k);
        let e = reader.entry(slot);
        if !e.is_present() {
            problems.push(p(Some(row.offset), format!("index lists image {} view {} but the shard slot is empty", row.image_id, row.view)));
            continue;
        }
        if (e.offset, e.length, e.crc) != (row.offset, row.length, row.crc32c) {
            problems.push(p(Some(e.offset), format!("image {} view {}: index and shard table disagree", row.image_id, row.view)));
        }
        if let Some(bytes) = reader.record(slot) {
            if !store.targets_of(bytes).decode_for_training(&mut values) {
                problems.push(p(Some(e.offset), format!("image {} view {}: the record does not decode", row.image_id, row.view)));
            } else if values.iter().any(|x| !x.is_finite()) {
                problems.push(p(Some(e.offset), format!("image {} view {}: non-finite target values", row.image_id, row.view)));
            }
        }
    }
    // Paths: each image's path is the one of its position in the dataset
    // listing, whose hash is in the manifest; within the store, one image
    // keeps one path.
    let mut paths = std::collections::HashMap::new();
    for row in &rows {
        if let Some(old) = paths.insert(row.image_id, &row.path)
            && old != &row.path
        {
            problems.push(p(Some(row.offset), format!("image {}: two paths in the index ({old:?} and {:?})", row.image_id, row.path)));
        }
    }
    // The report must describe this shard and agree with its files.
    let present = (0..reader.header().num_slots()).filter(|&slot| reader.entry(slot).is_present()).count() as u64;
    if (report.shard, report.first_image, u64::from(report.num_images)) != (s, range.start, range.end - range.start) {
        problems.push(p(
            None,
            format!(
                "report says shard {} with images {}..{}, the layout has images {}..{} in shard {s}",
                report.shard,
                report.first_image,
                report.first_image.saturating_add(u64::from(report.num_images)),
                range.start,
                range.end
            ),
        ));
    }
    if report.views_stored != present || report.views_stored != rows.len() as u64 {
        problems.push(p(
            None,
            format!("report says {} views stored; the shard holds {present} and the index lists {}", report.views_stored, rows.len()),
        ));
    }
    if report.shard_bytes != reader.file_len() {
        problems.push(p(None, format!("report says the shard file has {} bytes, it has {}", report.shard_bytes, reader.file_len())));
    }
    let skipped: HashSet<u64> = report.skipped.iter().map(|x| x.image_id).collect();
    if let Some(x) = report.skipped.iter().find(|x| !range.contains(&x.image_id)) {
        problems.push(p(None, format!("report lists image {} ({}) as skipped, outside this shard", x.image_id, x.path)));
    }
    for img in range.clone() {
        for v in 0..k {
            let (_, slot) = m.layout.slot(img, v, k);
            let present = reader.entry(slot).is_present();
            if skipped.contains(&img) {
                if present {
                    problems.push(p(None, format!("image {img} is reported skipped but view {v} is stored")));
                }
            } else if !seen.contains(&(img, v)) {
                problems.push(p(
                    None,
                    format!("image {img} view {v} is missing from the index{}", if present { "" } else { " and the shard" }),
                ));
            }
        }
    }
    if m.embeds_images() {
        check_image_pack(store, s, &report, &rows, &mut problems);
    }
    let paths = paths.into_iter().map(|(id, path)| (id, path.clone())).chain(report.skipped.iter().map(|x| (x.image_id, x.path.clone())));
    ShardCheck { views: rows.len() as u64, problems, paths: paths.collect() }
}

/// A store that carries its images: shard `s`'s image pack is whole (its
/// size and CRC-32C as the report says, every image's CRC) and holds bytes
/// for exactly the images with views.
fn check_image_pack(store: &Store, s: u32, report: &ShardReport, rows: &[shard_store::IndexRow], problems: &mut Vec<Problem>) {
    let p = |offset: Option<u64>, what: String| Problem { shard: Some(s), offset, what };
    let pack = match store.open_image_pack(s) {
        Ok(pack) => pack,
        Err(e) => return problems.push(p(None, e.to_string())),
    };
    let damaged = pack.verify();
    // the bytes between the images: the whole file against the report
    if damaged.is_empty() && report.images_crc32c != Some(pack.file_crc32c()) {
        problems.push(p(None, format!("{}: checksum differs from the one in its shard report", store.paths().images(s).display())));
    }
    problems.extend(damaged.into_iter().map(|(_, off, what)| p(Some(off), format!("image pack: {what}"))));
    let with_views: HashSet<u64> = rows.iter().map(|r| r.image_id).collect();
    let with_bytes: HashSet<u64> = pack.present().collect();
    if let Some(id) = with_views.difference(&with_bytes).min() {
        problems.push(p(None, format!("image {id} has views but no bytes in the image pack")));
    }
    if let Some(id) = with_bytes.difference(&with_views).min() {
        problems.push(p(None, format!("image {id} has bytes in the image pack but no views")));
    }
}

/// The manifest's file-list hash, fed with each image's path in image
/// order as the shards are checked (shards hold consecutive images).
struct PathHash {
    hasher: sha2::Sha256,
    /// The next image whose path the hash wants.
    next: u64,
    /// An image had no path (reported per shard already): no hash to compare.
    broken: bool,
}

impl PathHash {
    fn new() -> Self {
        Self { hasher: sha2::Sha256::new(), next: 0, broken: false }
    }

    /// The paths of one shard's images (index rows and skipped files).
    fn add(&mut self, mut paths: Vec<(u64, String)>) {
        paths.sort();
        paths.dedup_by_key(|(id, _)| *id); // two paths for one image are reported per shard
        for (id, path) in paths {
            if id != self.next {
                self.broken = true;
                return;
            }
            self.hasher.update(path.as_bytes());
            self.hasher.update(b"\n");
            self.next += 1;
        }
    }

    /// Whether the paths hash to the manifest's, once every image had one.
    fn check(self, m: &shard_store::Manifest) -> Option<Problem> {
        if self.broken || self.next != m.dataset.num_images {
            return None;
        }
        (hex::encode(self.hasher.finalize()) != m.dataset.file_list_sha256).then(|| Problem {
            shard: None,
            offset: None,
            what: "the image paths in the index and reports do not hash to the manifest's dataset.file_list_sha256 (a damaged path)".into(),
        })
    }
}

/// Problems [`verify`] lists in full; beyond them it only counts.
pub const MAX_PROBLEMS_LISTED: usize = 1000;

/// Check every checksum, that index and shards agree, that no view is
/// missing or duplicated and that targets are finite. Shards are checked in
/// parallel, a few per thread at a time, each mapped only while it is
/// checked: memory is bounded by a few shards, not by the store.
///
/// # Errors
/// Only when the manifest cannot be read; everything else is a [`Problem`].
pub fn verify(root: &Path, progress: bool) -> Result<VerifyReport> {
    let store = Store::open_partial(root).with_context(|| format!("opening store {}", root.display()))?;
    let n = store.manifest().layout.num_shards;
    let bar = if progress { ProgressBar::new(u64::from(n)) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("verify [{elapsed_precise}] {wide_bar} {pos}/{len} shards ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let window = (2 * rayon::current_num_threads()).max(1) as u32;
    let mut report = VerifyReport { shards_checked: n, views_checked: 0, problems: Vec::new(), problems_not_listed: 0 };
    let mut hash = PathHash::new();
    for first in (0..n).step_by(window as usize) {
        let checks: Vec<ShardCheck> = (first..n.min(first.saturating_add(window)))
            .into_par_iter()
            .map(|s| {
                let r = verify_shard(&store, s);
                bar.inc(1);
                r
            })
            .collect();
        for c in checks {
            report.views_checked += c.views;
            for problem in c.problems {
                if report.problems.len() < MAX_PROBLEMS_LISTED {
                    report.problems.push(problem);
                } else {
                    report.problems_not_listed += 1;
                }
            }
            hash.add(c.paths);
        }
    }
    bar.finish_and_clear();
    if report.problems.is_empty() {
        report.problems.extend(hash.check(store.manifest()));
    }
    Ok(report)
}

/// Statistics of one view's targets.
#[derive(Debug, Clone, Serialize)]
pub struct TargetStats {
    /// View number.
    pub view: u32,
    /// The view's parameters.
    pub params: caev2_views::ViewParams,
    /// Mean / min / max L2 norm of the tokens.
    pub norm_mean: f64,
    /// Smallest token norm.
    pub norm_min: f64,
    /// Largest token norm.
    pub norm_max: f64,
    /// Mean cosine between horizontally and vertically neighbouring patches.
    pub neighbour_cosine: f64,
    /// Mean cosine between the CLS token and the patches (if CLS).
    pub cls_patch_cosine: Option<f64>,
}

/// `inspect show` output.
#[derive(Debug, Serialize)]
pub struct Show {
    /// Image id.
    pub image_id: u64,
    /// Path relative to the dataset root.
    pub path: String,
    /// Class name, if labelled.
    pub class: Option<String>,
    /// Stats per shown view.
    pub views: Vec<TargetStats>,
}

fn cos(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        d += f64::from(*x) * f64::from(*y);
        na += f64::from(*x).powi(2);
        nb += f64::from(*y).powi(2);
    }
    d / (na.sqrt() * nb.sqrt()).max(1e-30)
}

/// The index rows of one image, found by id or by its path relative to the
/// dataset root (or a path suffix such as the file name), reading as few
/// index parts as possible: an id names its shard; a full path is found by
/// binary search, since ids (and so shards) follow the sorted paths; only a
/// suffix needs a scan, one part at a time.
///
/// # Errors
/// When no stored view matches, or an index part cannot be read.
pub fn image_rows(store: &Store, image: &str) -> Result<Vec<shard_store::IndexRow>> {
    let m = store.manifest();
    let n = m.layout.num_shards;
    let of = |rows: Vec<shard_store::IndexRow>, pick: &dyn Fn(&shard_store::IndexRow) -> bool| -> Vec<shard_store::IndexRow> {
        let id = rows.iter().find(|r| pick(r)).map(|r| r.image_id);
        rows.into_iter().filter(|r| Some(r.image_id) == id).collect()
    };
    if let Ok(id) = image.parse::<u64>()
        && id < m.dataset.num_images
    {
        let s = (id / u64::from(m.layout.images_per_shard)) as u32;
        if store.is_done(s) {
            let rows = of(store.index_of(s)?, &|r| r.image_id == id);
            if !rows.is_empty() {
                return Ok(rows);
            }
        }
    }
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if !store.is_done(mid) {
            break;
        }
        let rows = store.index_of(mid)?;
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else { break };
        if image < first.path.as_str() {
            hi = mid;
        } else if image > last.path.as_str() {
            lo = mid + 1;
        } else {
            let found = of(rows, &|r| r.path == image);
            if !found.is_empty() {
                return Ok(found);
            }
            break;
        }
    }
    let suffix = format!("/{image}");
    for s in (0..n).filter(|&s| store.is_done(s)) {
        let found = of(store.index_of(s)?, &|r| r.path == image || r.path.ends_with(&suffix));
        if !found.is_empty() {
            return Ok(found);
        }
    }
    anyhow::bail!("no stored image {image:?} (give an image id or a path relative to the dataset root)")
}

/// Statistics of the targets of `image` (all views, or one).
///
/// # Errors
/// Unknown image or store errors.
pub fn show(root: &Path, image: &str, view: Option<u32>) -> Result<Show> {
    let store = Store::open_partial(root).with_context(|| format!("opening store {}", root.display()))?;
    let rows = image_rows(&store, image)?;
    let id = rows[0].image_id;
    let m = store.manifest();
    let (d, cls) = (m.teacher.dim as usize, m.teacher.has_cls);
    let [gh, gw] = m.teacher.grid.map(|g| g as usize);
    let mut views = Vec::new();
    let mut path = String::new();
    let mut class = None;
    for r in rows.iter().filter(|r| r.image_id == id && view.is_none_or(|v| v == r.view)) {
        path = r.path.clone();
        class = r.label.and_then(|l| m.dataset.classes.get(l as usize).cloned());
        let t = store.targets(id, r.view)?.context("index row without targets")?.to_vec();
        let toks: Vec<&[f32]> = t.chunks(d).collect();
        let norms: Vec<f64> = toks.iter().map(|x| x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt()).collect();
        let patches = &toks[usize::from(cls)..];
        let mut nc = Vec::new();
        for y in 0..gh {
            for x in 0..gw {
                if x + 1 < gw {
                    nc.push(cos(patches[y * gw + x], patches[y * gw + x + 1]));
                }
                if y + 1 < gh {
                    nc.push(cos(patches[y * gw + x], patches[(y + 1) * gw + x]));
                }
            }
        }
        views.push(TargetStats {
            view: r.view,
            params: r.params.clone(),
            norm_mean: norms.iter().sum::<f64>() / norms.len() as f64,
            norm_min: norms.iter().copied().fold(f64::MAX, f64::min),
            norm_max: norms.iter().copied().fold(0.0, f64::max),
            neighbour_cosine: nc.iter().sum::<f64>() / nc.len().max(1) as f64,
            cls_patch_cosine: cls.then(|| patches.iter().map(|p| cos(toks[0], p)).sum::<f64>() / patches.len() as f64),
        });
    }
    if views.is_empty() {
        anyhow::bail!("image {id} has no stored view {}", view.map(|v| v.to_string()).unwrap_or_default());
    }
    Ok(Show { image_id: id, path, class, views })
}

/// Human-readable rendering of a [`Show`].
pub fn format_show(s: &Show) -> String {
    let mut out = format!("image {} {} {}\n", s.image_id, s.path, s.class.as_deref().map(|c| format!("(class {c})")).unwrap_or_default());
    for v in &s.views {
        let p = &v.params;
        out.push_str(&format!(
            "view {}: jitter {} b={:.3} c={:.3} s={:.3}, flip {}, crop top {} left {} {}x{} of {}x{}\n  token norm mean {:.3} [{:.3}, {:.3}], neighbour cosine {:.3}, CLS-patch cosine {}\n",
            v.view,
            p.jitter_order(),
            p.factor(caev2_views::ColorOp::Brightness),
            p.factor(caev2_views::ColorOp::Contrast),
            p.factor(caev2_views::ColorOp::Saturation),
            p.flip,
            p.crop.top,
            p.crop.left,
            p.crop.width,
            p.crop.height,
            p.image_width,
            p.image_height,
            v.norm_mean,
            v.norm_min,
            v.norm_max,
            v.neighbour_cosine,
            v.cls_patch_cosine.map(|c| format!("{c:.3}")).unwrap_or_else(|| "-".into())
        ));
    }
    out
}

/// `inspect compare` output.
#[derive(Debug, Serialize)]
pub struct Comparison {
    /// Views compared.
    pub views: u64,
    /// Mean cosine per token between the stores.
    pub mean_cosine: f64,
    /// Smallest cosine of any token.
    pub min_cosine: f64,
    /// Largest absolute difference of any value, after L2-normalising each token.
    pub max_abs_error: f64,
    /// Bytes per view of store A (shards + index).
    pub bytes_per_view_a: f64,
    /// Bytes per view of store B.
    pub bytes_per_view_b: f64,
    /// Codec of store A.
    pub codec_a: String,
    /// Codec of store B.
    pub codec_b: String,
    /// 1st percentile of the token cosines.
    pub p1_cosine: f64,
    /// Views decoded per second from store A, as the trainer decodes them
    /// (a pca store's coefficients; one core, records in memory).
    pub decode_views_per_sec_a: f64,
    /// Views decoded per second from store B.
    pub decode_views_per_sec_b: f64,
    /// Views encoded per second with B's codec (one core).
    pub encode_views_per_sec_b: f64,
    /// The pca decoder that ran (`avx512`, `avx2` or `scalar`), when a
    /// store is pca.
    pub pca_decoder: Option<String>,
}

/// Compare two stores of the same images and views (e.g. two codecs).
///
/// # Errors
/// Stores of different datasets, views or teachers.
pub fn compare(a: &Path, b: &Path) -> Result<Comparison> {
    let (sa, sb) = (Store::open(a)?, Store::open(b)?);
    let (ma, mb) = (sa.manifest(), sb.manifest());
    for (what, x, y) in [
        ("dataset", &ma.dataset.file_list_sha256, &mb.dataset.file_list_sha256),
        ("teacher", &ma.teacher.onnx_sha256, &mb.teacher.onnx_sha256),
    ] {
        if x != y {
            anyhow::bail!("the stores have different {what}s ({x} vs {y})");
        }
    }
    if (ma.views.seed, ma.views.views_per_image, &ma.views.settings) != (mb.views.seed, mb.views.views_per_image, &mb.views.settings) {
        anyhow::bail!("the stores' views differ (seed, K or settings)");
    }
    let d = ma.teacher.dim as usize;
    let (mut sum, mut max_err, mut views) = (0f64, 0f64, 0u64);
    let mut cosines = Vec::new();
    let (mut decode_a, mut decode_b, mut encode_b) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut x = vec![0f32; ma.values_per_view()];
    let mut y = vec![0f32; mb.values_per_view()];
    let mut scratch = Vec::new();
    for row in sa.index()? {
        let (Some(ra), Some(rb)) = (sa.targets(row.image_id, row.view)?, sb.targets(row.image_id, row.view)?) else { continue };
        // timed: what the trainer decodes (a pca store's coefficients)
        let t = Instant::now();
        let ok_a = ra.decode_for_training(&mut x);
        decode_a += t.elapsed();
        let t = Instant::now();
        let ok_b = rb.decode_for_training(&mut y);
        decode_b += t.elapsed();
        if !(ok_a && ok_b && ra.decode_into(&mut x) && rb.decode_into(&mut y)) {
            anyhow::bail!("image {} view {}: a record does not decode (run `caev2 inspect verify`)", row.image_id, row.view);
        }
        let t = Instant::now();
        scratch.clear();
        mb.codec.encode_with(sb.codec_model().map(|p| &**p), std::hint::black_box(&x), d, &mut scratch)?;
        encode_b += t.elapsed();
        views += 1;
        for (p, q) in x.chunks(d).zip(y.chunks(d)) {
            let c = cos(p, q);
            sum += c;
            cosines.push(c);
            let (np, nq) = (p.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12), q.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12));
            for (u, v) in p.iter().zip(q) {
                max_err = max_err.max(f64::from((u / np - v / nq).abs()));
            }
        }
    }
    cosines.sort_by(f64::total_cmp);
    let bpv = |root: &Path| -> Result<f64> { Ok(summary(root)?.bytes_per_view) };
    let rate = |t: Duration| views as f64 / t.as_secs_f64().max(1e-9);
    Ok(Comparison {
        views,
        mean_cosine: sum / cosines.len().max(1) as f64,
        min_cosine: cosines.first().copied().unwrap_or(f64::NAN),
        max_abs_error: max_err,
        bytes_per_view_a: bpv(a)?,
        bytes_per_view_b: bpv(b)?,
        codec_a: ma.codec.name().into(),
        codec_b: mb.codec.name().into(),
        p1_cosine: cosines.get(cosines.len() / 100).copied().unwrap_or(f64::NAN),
        decode_views_per_sec_a: rate(decode_a),
        decode_views_per_sec_b: rate(decode_b),
        encode_views_per_sec_b: rate(encode_b),
        pca_decoder: [ma.codec, mb.codec].contains(&shard_store::Codec::Pca).then(|| shard_store::pca_decoder_name().to_owned()),
    })
}

/// Render the views of `image` as the teacher saw them, each next to a
/// 3-component PCA colouring of its patch targets (components fitted on all
/// shown views together), one row per view. Returns the sheet size.
///
/// # Errors
/// Unknown image, unreadable image file, store errors.
pub fn render(root: &Path, data: Option<&Path>, image: &str, view: Option<u32>, out: &Path) -> Result<(u32, u32)> {
    let store = Store::open_partial(root).with_context(|| format!("opening store {}", root.display()))?;
    let m = store.manifest().clone();
    let rows = image_rows(&store, image)?;
    let id = rows[0].image_id;
    let chosen: Vec<_> = rows.iter().filter(|r| r.image_id == id && view.is_none_or(|v| v == r.view)).collect();
    anyhow::ensure!(!chosen.is_empty(), "image {id} has no such view");
    let exif = m.views.settings.apply_exif_orientation;
    let src = match data {
        // a store that carries its images, unless told to read a folder
        None if m.embeds_images() => {
            let bytes = store.image(id)?.with_context(|| format!("image {id} has no bytes in the store"))?;
            caev2_views::decode_image_bytes(bytes, Path::new(&chosen[0].path), exif)?
        }
        _ => {
            let data = data.map(Path::to_path_buf).unwrap_or_else(|| std::path::PathBuf::from(&m.dataset.root));
            caev2_views::decode_image(&data.join(&chosen[0].path), exif)
                .with_context(|| format!("decoding the original (pass --data if the dataset moved from {})", data.display()))?
        }
    }
    .rgb;
    let s = m.teacher.input_size;
    let d = m.teacher.dim as usize;
    let c = usize::from(m.teacher.has_cls);
    let [gh, gw] = m.teacher.grid.map(|g| g as usize);
    // patch tokens of all chosen views, L2-normalised
    let mut x: Vec<Vec<f64>> = Vec::new();
    for r in &chosen {
        let t = store.targets(id, r.view)?.context("no targets")?.to_vec();
        for p in t.chunks(d).skip(c) {
            let n = p.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt().max(1e-12);
            x.push(p.iter().map(|v| f64::from(*v) / n).collect());
        }
    }
    let comps = pca3(&x, d);
    let proj: Vec<[f64; 3]> = x.iter().map(|v| std::array::from_fn(|k| v.iter().zip(&comps[k]).map(|(a, b)| a * b).sum())).collect();
    let (lo, hi): (Vec<f64>, Vec<f64>) = (0..3)
        .map(|k| {
            let mut col: Vec<f64> = proj.iter().map(|p| p[k]).collect();
            col.sort_by(f64::total_cmp);
            (col[col.len() / 100], col[col.len() - 1 - col.len() / 100])
        })
        .unzip();
    let mut sheet = image::RgbImage::new(2 * s + 8, chosen.len() as u32 * (s + 8));
    for (vi, r) in chosen.iter().enumerate() {
        let y0 = vi as u32 * (s + 8);
        let viewimg = caev2_views::render_view(&src, &r.params, s);
        image::imageops::replace(&mut sheet, &viewimg, 0, i64::from(y0));
        for py in 0..s {
            for px in 0..s {
                let (gy, gx) = (py as usize * gh / s as usize, px as usize * gw / s as usize);
                let p = proj[vi * gh * gw + gy * gw + gx];
                let rgb: [u8; 3] = std::array::from_fn(|k| (255.0 * ((p[k] - lo[k]) / (hi[k] - lo[k]).max(1e-12)).clamp(0.0, 1.0)) as u8);
                sheet.put_pixel(s + 8 + px, y0 + py, image::Rgb(rgb));
            }
        }
    }
    sheet.save(out).with_context(|| format!("writing {}", out.display()))?;
    Ok((sheet.width(), sheet.height()))
}

/// The top 3 principal directions of `x` (rows of length `d`), by power
/// iteration with deflation on the covariance.
fn pca3(x: &[Vec<f64>], d: usize) -> [Vec<f64>; 3] {
    let n = x.len().max(1) as f64;
    let mean: Vec<f64> = (0..d).map(|j| x.iter().map(|r| r[j]).sum::<f64>() / n).collect();
    let xc: Vec<Vec<f64>> = x.iter().map(|r| r.iter().zip(&mean).map(|(a, m)| a - m).collect()).collect();
    let mut comps: Vec<Vec<f64>> = Vec::new();
    for k in 0..3 {
        let mut v: Vec<f64> = (0..d).map(|j| ((j * 7919 + k * 104729) % 1000) as f64 / 1000.0 - 0.5).collect();
        for _ in 0..100 {
            // w = X^T (X v), minus projections on earlier components
            let xv: Vec<f64> = xc.iter().map(|r| r.iter().zip(&v).map(|(a, b)| a * b).sum()).collect();
            let mut w = vec![0f64; d];
            for (r, s) in xc.iter().zip(&xv) {
                for (wj, rj) in w.iter_mut().zip(r) {
                    *wj += rj * s;
                }
            }
            for c in &comps {
                let dot: f64 = w.iter().zip(c).map(|(a, b)| a * b).sum();
                for (wj, cj) in w.iter_mut().zip(c) {
                    *wj -= dot * cj;
                }
            }
            let norm = w.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-30);
            v = w.into_iter().map(|a| a / norm).collect();
        }
        comps.push(v);
    }
    [comps[0].clone(), comps[1].clone(), comps[2].clone()]
}
