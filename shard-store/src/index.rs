//! The Parquet index: one row per stored view (see FORMAT.md, "index").

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, Float32Array, Int32Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use caev2_views::{CropBox, ViewParams};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::error::{Result, StoreError, io};

/// One stored view.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexRow {
    /// Image id: position of the image in the sorted file list.
    pub image_id: u64,
    /// Path relative to the dataset root, `/`-separated.
    pub path: String,
    /// Class index (position of the class folder in `manifest.dataset.classes`).
    pub label: Option<i32>,
    /// View number, `0..K`.
    pub view: u32,
    /// All parameters of the view.
    pub params: ViewParams,
    /// Shard holding the targets.
    pub shard: u32,
    /// Byte offset of the record in the shard.
    pub offset: u64,
    /// Record length in bytes.
    pub length: u32,
    /// CRC-32C of the record.
    pub crc32c: u32,
}

/// The index schema, in column order.
pub fn schema() -> Schema {
    use DataType::*;
    Schema::new(vec![
        Field::new("image_id", UInt64, false),
        Field::new("path", Utf8, false),
        Field::new("label", Int32, true),
        Field::new("view", UInt32, false),
        Field::new("image_width", UInt32, false),
        Field::new("image_height", UInt32, false),
        Field::new("jitter_order", Utf8, false),
        Field::new("brightness", Float32, false),
        Field::new("contrast", Float32, false),
        Field::new("saturation", Float32, false),
        Field::new("flip", Boolean, false),
        Field::new("crop_top", UInt32, false),
        Field::new("crop_left", UInt32, false),
        Field::new("crop_height", UInt32, false),
        Field::new("crop_width", UInt32, false),
        Field::new("shard", UInt32, false),
        Field::new("offset", UInt64, false),
        Field::new("length", UInt32, false),
        Field::new("crc32c", UInt32, false),
    ])
}

fn to_batch(rows: &[IndexRow]) -> std::result::Result<RecordBatch, arrow::error::ArrowError> {
    use caev2_views::ColorOp::*;
    let u32s = |f: &dyn Fn(&IndexRow) -> u32| Arc::new(UInt32Array::from_iter_values(rows.iter().map(f))) as ArrayRef;
    let f32s = |f: &dyn Fn(&IndexRow) -> f32| Arc::new(Float32Array::from_iter_values(rows.iter().map(f))) as ArrayRef;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.image_id))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.path.as_str()))),
        Arc::new(Int32Array::from_iter(rows.iter().map(|r| r.label))),
        u32s(&|r| r.view),
        u32s(&|r| r.params.image_width),
        u32s(&|r| r.params.image_height),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.params.jitter_order()))),
        f32s(&|r| r.params.factor(Brightness)),
        f32s(&|r| r.params.factor(Contrast)),
        f32s(&|r| r.params.factor(Saturation)),
        Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(r.params.flip)))),
        u32s(&|r| r.params.crop.top),
        u32s(&|r| r.params.crop.left),
        u32s(&|r| r.params.crop.height),
        u32s(&|r| r.params.crop.width),
        u32s(&|r| r.shard),
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.offset))),
        u32s(&|r| r.length),
        u32s(&|r| r.crc32c),
    ];
    RecordBatch::try_new(Arc::new(schema()), columns)
}

/// The Parquet bytes of an index part holding `rows` (zstd level 3), to be
/// written with [`crate::write_file_atomic`]; `path` names the file in
/// errors.
///
/// # Errors
/// Parquet errors naming `path`.
pub fn encode_index(path: &Path, rows: &[IndexRow]) -> Result<Vec<u8>> {
    let perr = |source| StoreError::Parquet { path: path.to_owned(), source };
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).map_err(perr)?))
        .set_created_by("caev2 shard-store".into())
        .build();
    let batch = to_batch(rows).map_err(|e| perr(e.into()))?;
    let mut w = ArrowWriter::try_new(Vec::new(), batch.schema(), Some(props)).map_err(perr)?;
    w.write(&batch).map_err(perr)?;
    w.into_inner().map_err(perr)
}

fn column<'a, T: 'static>(path: &Path, batch: &'a RecordBatch, name: &str) -> Result<&'a T> {
    batch
        .column_by_name(name)
        .ok_or_else(|| StoreError::IndexSchema { path: path.to_owned(), what: format!("missing column {name:?}") })?
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| StoreError::IndexSchema { path: path.to_owned(), what: format!("column {name:?} has the wrong type") })
}

/// Read every row of the Parquet index file at `path`.
///
/// # Errors
/// As [`decode_index`], and IO errors naming `path`.
pub fn read_index(path: &Path) -> Result<Vec<IndexRow>> {
    decode_index(path, std::fs::read(path).map_err(io(path, "read index"))?)
}

/// The rows of an index part from its bytes (read from `path`).
///
/// # Errors
/// Parquet or schema errors naming `path`; a row whose jitter order is not
/// a permutation of `bcs`, or whose crop box does not fit its image, is
/// reported as corrupt.
pub fn decode_index(path: &Path, bytes: Vec<u8>) -> Result<Vec<IndexRow>> {
    // The Parquet reader can panic on damaged bytes (seen in fuzzing); that
    // is a corrupt file, not a crash.
    contain_panics(|| decode_index_unguarded(path, bytes)).unwrap_or_else(|msg| {
        Err(StoreError::Corrupt { path: path.to_owned(), offset: 0, what: format!("the Parquet reader failed on damaged bytes ({msg})") })
    })
}

thread_local! {
    static CONTAINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f`, turning a panic into `Err(message)`. The panic hook is wrapped
/// once so that contained panics print nothing; every other panic goes to
/// the previous hook unchanged.
fn contain_panics<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CONTAINED.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    let was = CONTAINED.with(|c| c.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CONTAINED.with(|c| c.set(was));
    r.map_err(|p| p.downcast_ref::<&str>().map(|s| (*s).to_owned()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default())
}

fn decode_index_unguarded(path: &Path, bytes: Vec<u8>) -> Result<Vec<IndexRow>> {
    let perr = |source| StoreError::Parquet { path: path.to_owned(), source };
    let reader =
        ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes)).map_err(perr)?.with_batch_size(65536).build().map_err(perr)?;
    let mut rows = Vec::new();
    for batch in reader {
        let b = batch.map_err(|e| perr(e.into()))?;
        let image_id = column::<UInt64Array>(path, &b, "image_id")?;
        let p = column::<StringArray>(path, &b, "path")?;
        let label = column::<Int32Array>(path, &b, "label")?;
        let u = |name| column::<UInt32Array>(path, &b, name);
        let f = |name| column::<Float32Array>(path, &b, name);
        let (view, iw, ih) = (u("view")?, u("image_width")?, u("image_height")?);
        let order = column::<StringArray>(path, &b, "jitter_order")?;
        let (fb, fc, fs) = (f("brightness")?, f("contrast")?, f("saturation")?);
        let flip = column::<BooleanArray>(path, &b, "flip")?;
        let (ct, cl, ch, cw) = (u("crop_top")?, u("crop_left")?, u("crop_height")?, u("crop_width")?);
        let (shard, length, crc) = (u("shard")?, u("length")?, u("crc32c")?);
        let offset = column::<UInt64Array>(path, &b, "offset")?;
        for i in 0..b.num_rows() {
            let crop = CropBox { top: ct.value(i), left: cl.value(i), height: ch.value(i), width: cw.value(i) };
            let params = ViewParams::from_parts(
                iw.value(i),
                ih.value(i),
                order.value(i),
                fb.value(i),
                fc.value(i),
                fs.value(i),
                flip.value(i),
                crop,
            )
            .ok_or_else(|| StoreError::Corrupt {
                path: path.to_owned(),
                offset: 0,
                what: format!("row {i}: jitter order {:?} is not a permutation of \"bcs\"", order.value(i)),
            })?;
            let (w, h) = (params.image_width, params.image_height);
            if w == 0
                || h == 0
                || crop.width == 0
                || crop.height == 0
                || u64::from(crop.left) + u64::from(crop.width) > u64::from(w)
                || u64::from(crop.top) + u64::from(crop.height) > u64::from(h)
            {
                return Err(StoreError::Corrupt {
                    path: path.to_owned(),
                    offset: 0,
                    what: format!(
                        "row {i} (image {} view {}): crop box {crop:?} does not fit its {w}x{h} image",
                        image_id.value(i),
                        view.value(i)
                    ),
                });
            }
            rows.push(IndexRow {
                image_id: image_id.value(i),
                path: p.value(i).to_owned(),
                label: label.is_valid(i).then(|| label.value(i)),
                view: view.value(i),
                params,
                shard: shard.value(i),
                offset: offset.value(i),
                length: length.value(i),
                crc32c: crc.value(i),
            });
        }
    }
    Ok(rows)
}
