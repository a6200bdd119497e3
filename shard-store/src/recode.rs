//! Converting a store to another codec without the teacher.

use std::path::Path;

use rayon::prelude::*;

use crate::codec::Codec;
use crate::error::{Result, StoreError};
use crate::index::IndexRow;
use crate::manifest::{CodecFit, Manifest};
use crate::pca::{PcaFit, fit_sample_images};
use crate::store::{ShardReport, Store, StoreWriter};

/// What [`recode`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Recoded {
    /// Shards written by this call.
    pub shards_written: u32,
    /// Shards that were already complete in the destination (a resumed run).
    pub shards_already_done: u32,
    /// Views written by this call.
    pub views: u64,
    /// Bytes of shard files and index parts written by this call.
    pub bytes: u64,
}

/// Write the complete store `src` again at `dst` with `codec`: the same
/// views, index rows (with the new offsets, lengths and CRCs), reports and
/// layout, under a manifest that differs only in the codec (and so in its
/// `store_id`). Each shard is claimed, written and committed like
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
/// a source equal to the destination, IO errors.
pub fn recode(src: &Store, dst: &Path, codec: Codec, fit: PcaFit, mut progress: impl FnMut(u64)) -> Result<Recoded> {
    let m = src.manifest();
    if std::fs::canonicalize(src.paths().root()).ok() == std::fs::canonicalize(dst).ok() {
        return Err(StoreError::OutOfRange(format!("{}: the destination is the source store; give a new folder", dst.display())));
    }
    for s in 0..m.layout.num_shards {
        if !src.is_done(s) {
            return Err(StoreError::Incomplete { store: src.paths().root().to_owned(), what: format!("shard {s} is not complete") });
        }
    }
    let manifest = Manifest::new(m.teacher.clone(), m.views.clone(), codec, m.dataset.clone(), m.layout.clone(), m.created_by.clone())
        .with_codec_fit(CodecFit::asked(codec, fit));
    let k = m.views.views_per_image;
    let out = StoreWriter::create_or_open_fitting(dst, &manifest, || {
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
        let images = m.layout.images_of(s, m.dataset.num_images);
        let r = claim.commit(writer, &written, ShardReport::new(s, images, written.len() as u64, old.skipped))?;
        done.shards_written += 1;
        done.views += r.views_stored;
        done.bytes += r.shard_bytes + r.index_bytes;
        progress(r.views_stored);
    }
    Ok(done)
}
