//! `caev2 inspect`: what a store holds, and whether it is intact.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::Serialize;
use shard_store::{Manifest, Skipped, Store};

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
    /// Bytes on disk per stored view (shards + index).
    pub bytes_per_view: f64,
    /// Images skipped, with reasons.
    pub skipped: Vec<Skipped>,
}

/// Summarise a store from its manifest and shard reports (no shard is read).
///
/// # Errors
/// Unreadable manifest or reports.
pub fn summary(root: &Path) -> Result<Summary> {
    let store = Store::open_partial(root).with_context(|| format!("opening store {}", root.display()))?;
    let m = store.manifest().clone();
    let (mut done, mut views, mut sb, mut ib, mut skipped, mut images) = (0, 0, 0, 0, Vec::new(), 0);
    for s in 0..m.layout.num_shards {
        if let Some(r) = store.report(s)? {
            done += 1;
            views += r.views_stored;
            sb += r.shard_bytes;
            ib += r.index_bytes;
            images += u64::from(r.num_images) - r.skipped.len() as u64;
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
        bytes_per_view: if views > 0 { (sb + ib) as f64 / views as f64 } else { 0.0 },
        skipped,
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
    line("targets", format!("{} tokens x {} dims, codec {}", t.tokens, t.dim, m.codec));
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
    /// Problems found; empty when the store is intact.
    pub problems: Vec<Problem>,
}

fn verify_shard(store: &Store, s: u32) -> (u64, Vec<Problem>) {
    let m = store.manifest();
    let p = |offset: Option<u64>, what: String| Problem { shard: Some(s), offset, what };
    if !store.is_done(s) {
        return (0, vec![p(None, "shard not complete (no done/ report)".into())]);
    }
    let reader = match store.shard(s) {
        Ok(r) => r,
        Err(e) => return (0, vec![p(None, e.to_string())]),
    };
    let mut problems: Vec<Problem> = reader.verify_records().into_iter().map(|(_, off, what)| p(Some(off), what)).collect();
    let rows = match store.index_of(s) {
        Ok(r) => r,
        Err(e) => {
            problems.push(p(None, e.to_string()));
            return (0, problems);
        }
    };
    let k = m.views.views_per_image;
    let range = m.layout.images_of(s, m.dataset.num_images);
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
        let slot = (row.image_id - range.start) * u64::from(k) + u64::from(row.view);
        let e = reader.entry(slot);
        if !e.is_present() {
            problems.push(p(Some(row.offset), format!("index lists image {} view {} but the shard slot is empty", row.image_id, row.view)));
            continue;
        }
        if (e.offset, e.length, e.crc) != (row.offset, row.length, row.crc32c) {
            problems.push(p(Some(e.offset), format!("image {} view {}: index and shard table disagree", row.image_id, row.view)));
        }
        if let Some(bytes) = reader.record(slot)
            && m.codec.decode(bytes, &mut values)
            && values.iter().any(|x| !x.is_finite())
        {
            problems.push(p(Some(e.offset), format!("image {} view {}: non-finite target values", row.image_id, row.view)));
        }
    }
    let skipped: HashSet<u64> = match store.report(s) {
        Ok(Some(r)) => r.skipped.iter().map(|x| x.image_id).collect(),
        Ok(None) => HashSet::new(),
        Err(e) => {
            problems.push(p(None, e.to_string()));
            HashSet::new()
        }
    };
    for img in range.clone() {
        for v in 0..k {
            let slot = (img - range.start) * u64::from(k) + u64::from(v);
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
    (rows.len() as u64, problems)
}

/// Check every checksum, that index and shards agree, that no view is
/// missing or duplicated and that targets are finite. Shards are checked in
/// parallel.
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
    let results: Vec<(u64, Vec<Problem>)> = (0..n)
        .into_par_iter()
        .map(|s| {
            let r = verify_shard(&store, s);
            bar.inc(1);
            r
        })
        .collect();
    bar.finish_and_clear();
    Ok(VerifyReport {
        shards_checked: n,
        views_checked: results.iter().map(|r| r.0).sum(),
        problems: results.into_iter().flat_map(|r| r.1).collect(),
    })
}
