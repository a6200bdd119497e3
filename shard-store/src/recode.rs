//! Converting a store to another codec without the teacher.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::codec::Codec;
use crate::error::{Result, StoreError};
use crate::images::ImagePackWriter;
use crate::index::IndexRow;
use crate::manifest::{CodecFit, Manifest};
use crate::pca::{PcaFit, fit_sample_images};
use crate::store::{ShardClaim, ShardReport, Store, StoreWriter};

/// What the destination of [`recode`] carries of the images.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RecodeImages {
    /// What the source carries: its image packs are copied, or there are
    /// none.
    #[default]
    Keep,
    /// Embed the images, read from this dataset folder (the one the store
    /// was extracted from; each file must decode to the size its index
    /// rows record, the only check a store without its images allows: a
    /// replacement of the same size goes unnoticed), or copied from the
    /// source when it carries them.
    Embed(PathBuf),
    /// No images (a version 1 store that reads them from a dataset folder).
    Drop,
}

/// What [`recode`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Recoded {
    /// Shards written by this call.
    pub shards_written: u32,
    /// Shards that were already complete in the destination (a resumed run).
    pub shards_already_done: u32,
    /// Views written by this call.
    pub views: u64,
    /// Bytes of shard files, index parts and image packs written by this
    /// call.
    pub bytes: u64,
    /// Images embedded by this call.
    pub images: u64,
}

/// Write the complete store `src` again at `dst` with `codec`, and with or
/// without its images (`images`): the same views, index rows (with the new
/// offsets, lengths and CRCs), reports and layout, under a manifest that
/// differs only in the codec and the images (and so in its `store_id`).
/// With the source's codec the records are copied byte for byte (a `pca`
/// store keeps its model), so embedding images changes no target. Each
/// shard is claimed, written and committed like
/// `extract` does, so a killed run resumes and concurrent runs share the
/// work. Recoding an f32 store gives the bytes `extract --codec C` would
/// have written; from a lossy codec the losses add up.
///
/// A codec that needs a fit (`pca`) is fitted with `fit` on the views of
/// [`fit_sample_images`], the same views `extract` fits on, unless the
/// destination already has its model (a resumed run).
///
/// `progress(views)` is called after each shard.
///
/// # Errors
/// An incomplete or damaged source, a destination holding another store,
/// a source equal to the destination, an image file that is missing or
/// differs from the one extracted, IO errors.
pub fn recode(src: &Store, dst: &Path, codec: Codec, fit: PcaFit, images: &RecodeImages, mut progress: impl FnMut(u64)) -> Result<Recoded> {
    let m = src.manifest();
    if std::fs::canonicalize(src.paths().root()).ok() == std::fs::canonicalize(dst).ok() {
        return Err(StoreError::OutOfRange(format!("{}: the destination is the source store; give a new folder", dst.display())));
    }
    for s in 0..m.layout.num_shards {
        if !src.is_done(s) {
            return Err(StoreError::Incomplete { store: src.paths().root().to_owned(), what: format!("shard {s} is not complete") });
        }
    }
    let embed = match images {
        RecodeImages::Keep => m.embeds_images(),
        RecodeImages::Embed(_) => true,
        RecodeImages::Drop => false,
    };
    let same_codec = codec == m.codec;
    let fit_asked = if same_codec { m.codec_fit.clone() } else { CodecFit::asked(codec, fit) };
    let manifest = Manifest::new(m.teacher.clone(), m.views.clone(), codec, m.dataset.clone(), m.layout.clone(), m.created_by.clone())
        .with_codec_fit(fit_asked)
        .with_embedded_images(embed);
    let k = m.views.views_per_image;
    let out = StoreWriter::create_or_open_fitting(dst, &manifest, || {
        if same_codec && let Some(model) = src.codec_model() {
            return Ok(model.as_ref().clone()); // the records are copied: so is their model
        }
        let mut sample = Vec::new();
        for id in fit_sample_images(m.dataset.num_images, k, fit.views) {
            for v in 0..k {
                if let Some(t) = src.targets(id, v)? {
                    sample.extend(t.to_vec());
                }
            }
        }
        m.teacher.fit_pca(&sample, fit.cosine)
    })?;
    let mut done = Recoded::default();
    for s in 0..m.layout.num_shards {
        let Some(claim) = out.try_claim(s)? else {
            done.shards_already_done += u32::from(out.is_done(s));
            continue;
        };
        let mut writer = claim.writer()?;
        let rows = src.index_of(s)?;
        let mut written = Vec::with_capacity(rows.len());
        // decode and encode on rayon's pool, a chunk of rows at a time; write in order
        for chunk in rows.chunks(256) {
            let w = &writer;
            let records: Vec<Result<Vec<u8>>> = chunk
                .par_iter()
                .map(|row| {
                    let t = src.targets(row.image_id, row.view)?.ok_or_else(|| StoreError::Corrupt {
                        path: src.paths().shard(s),
                        offset: row.offset,
                        what: format!("image {} view {} is listed in the index but not stored", row.image_id, row.view),
                    })?;
                    if same_codec {
                        return Ok(t.bytes.to_vec());
                    }
                    let mut values = vec![0f32; m.values_per_view()];
                    if !t.decode_into(&mut values) {
                        return Err(StoreError::Corrupt {
                            path: src.paths().shard(s),
                            offset: row.offset,
                            what: format!("image {} view {}: the record does not decode", row.image_id, row.view),
                        });
                    }
                    let mut rec = Vec::new();
                    w.encode_into(&values, &mut rec)?;
                    Ok(rec)
                })
                .collect();
            for (row, rec) in chunk.iter().zip(records) {
                let (_, slot) = m.layout.slot(row.image_id, row.view, k);
                let e = writer.write_encoded(slot, &rec?)?;
                written.push(IndexRow { offset: e.offset, length: e.length, crc32c: e.crc, ..row.clone() });
            }
        }
        let old = src
            .report(s)?
            .ok_or_else(|| StoreError::Incomplete { store: src.paths().root().to_owned(), what: format!("shard {s} has no report") })?;
        let (pack, embedded) = pack_images(src, &claim, &rows, images)?;
        let range = m.layout.images_of(s, m.dataset.num_images);
        let r = claim.commit(writer, pack, &written, ShardReport::new(s, range, written.len() as u64, old.skipped))?;
        done.shards_written += 1;
        done.views += r.views_stored;
        done.images += embedded;
        done.bytes += r.shard_bytes + r.index_bytes + r.images_bytes.unwrap_or(0);
        progress(r.views_stored);
    }
    Ok(done)
}

/// The image pack of `claim`'s shard for a destination that carries its
/// images: copied from the source's pack, or read from the dataset folder
/// (each image once, checked to decode to the size its rows record); and
/// how many images it holds.
fn pack_images(src: &Store, claim: &ShardClaim<'_>, rows: &[IndexRow], images: &RecodeImages) -> Result<(Option<ImagePackWriter>, u64)> {
    let Some(mut pack) = claim.image_writer()? else { return Ok((None, 0)) };
    let m = src.manifest();
    let mut firsts: Vec<&IndexRow> = Vec::new();
    for row in rows {
        if firsts.last().is_none_or(|last| last.image_id != row.image_id) {
            firsts.push(row);
        }
    }
    let read = |row: &IndexRow| -> Result<Vec<u8>> {
        if m.embeds_images() {
            return src.image(row.image_id)?.map(<[u8]>::to_vec).ok_or_else(|| StoreError::Corrupt {
                path: src.paths().images(row.shard),
                offset: 0,
                what: format!("image {} has views but no bytes in the pack", row.image_id),
            });
        }
        let RecodeImages::Embed(data) = images else {
            return Err(StoreError::OutOfRange("embedding images needs the dataset folder they were extracted from".into()));
        };
        let path = data.join(&row.path);
        let bytes = std::fs::read(&path).map_err(crate::error::io(&path, "read image to embed"))?;
        let decoded = caev2_views::decode_image_bytes(&bytes, &path, m.views.settings.apply_exif_orientation)
            .map_err(|e| StoreError::OutOfRange(format!("{}: cannot embed: {e}", path.display())))?;
        let (w, h) = (decoded.rgb.width(), decoded.rgb.height());
        if (w, h) != (row.params.image_width, row.params.image_height) {
            return Err(StoreError::OutOfRange(format!(
                "{}: decodes to {w}x{h}, the store recorded {}x{}: not the image it was extracted from",
                path.display(),
                row.params.image_width,
                row.params.image_height
            )));
        }
        Ok(bytes)
    };
    // decoded on rayon's pool a few at a time, written in order
    for chunk in firsts.chunks(64) {
        let files: Vec<Result<Vec<u8>>> = chunk.par_iter().map(|row| read(row)).collect();
        for (row, bytes) in chunk.iter().zip(files) {
            pack.write(row.image_id, &bytes?)?;
        }
    }
    Ok((Some(pack), firsts.len() as u64))
}
