//! Shard files: a header, then the target records of every view in the
//! record container of `records.rs` (64-byte-aligned records, a record
//! table and a footer), each checksummed with CRC-32C. See FORMAT.md.

use std::path::Path;

use crate::codec::Codec;
use crate::error::{Result, StoreError};
use crate::pca::PcaModel;
use crate::records::{Entry, HEADER_LEN, RecordFile, RecordWriter, check_header, frame_header, map_file, store_id_of, u32_le, u64_le};

/// Magic at the start of every shard.
pub const SHARD_MAGIC: [u8; 8] = *b"CAE2SHRD";
/// Shard format version.
pub const SHARD_VERSION: u32 = 1;

/// The fixed fields of a shard header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardHeader {
    /// Codec of every record.
    pub codec: Codec,
    /// Shard number in the store.
    pub shard_index: u32,
    /// Views per image (K).
    pub views_per_image: u32,
    /// Id of the shard's first image.
    pub first_image: u64,
    /// Images in the shard.
    pub num_images: u32,
    /// Tokens per view.
    pub tokens: u32,
    /// Values per token.
    pub dim: u32,
    /// The store's id (manifest `store_id`).
    pub store_id: [u8; 12],
}

impl ShardHeader {
    /// Slots in the record table: `num_images * views_per_image`.
    pub fn num_slots(&self) -> u64 {
        u64::from(self.num_images) * u64::from(self.views_per_image)
    }

    /// Encoded bytes of one record.
    pub fn record_len(&self) -> usize {
        self.codec.encoded_len(self.tokens as usize, self.dim as usize)
    }

    /// Encoded bytes of one record when that fits a `u32` record length
    /// (`None` for a damaged header claiming more).
    fn record_len_u32(&self) -> Option<u32> {
        let bytes = self.codec.encoded_len_checked(u64::from(self.tokens), u64::from(self.dim))?;
        u32::try_from(bytes).ok().filter(|&b| b > 0)
    }

    fn encode(&self) -> [u8; HEADER_LEN] {
        frame_header(&SHARD_MAGIC, SHARD_VERSION, &self.store_id, |f| {
            // bytes 12..48 of the header; 44..48 reserved, zero
            f[0..4].copy_from_slice(&self.codec.id().to_le_bytes());
            f[4..8].copy_from_slice(&self.shard_index.to_le_bytes());
            f[8..12].copy_from_slice(&self.views_per_image.to_le_bytes());
            f[12..20].copy_from_slice(&self.first_image.to_le_bytes());
            f[20..24].copy_from_slice(&self.num_images.to_le_bytes());
            f[24..28].copy_from_slice(&self.tokens.to_le_bytes());
            f[28..32].copy_from_slice(&self.dim.to_le_bytes());
        })
    }

    fn decode(path: &Path, bytes: &[u8]) -> Result<Self> {
        let h = check_header(path, bytes, &SHARD_MAGIC, SHARD_VERSION, "shard")?;
        let codec = Codec::from_id(u32_le(h, 12)).ok_or_else(|| StoreError::Corrupt {
            path: path.to_owned(),
            offset: 12,
            what: format!("unknown codec id {}", u32_le(h, 12)),
        })?;
        Ok(Self {
            codec,
            shard_index: u32_le(h, 16),
            views_per_image: u32_le(h, 20),
            first_image: u64_le(h, 24),
            num_images: u32_le(h, 32),
            tokens: u32_le(h, 36),
            dim: u32_le(h, 40),
            store_id: store_id_of(h),
        })
    }
}

/// Writes one shard to a temporary file beside its final name; nothing is
/// visible under the final name until [`ShardWriter::finish`] has fsynced
/// and renamed it. Dropping an unfinished writer deletes the temporary file.
pub struct ShardWriter {
    header: ShardHeader,
    records: RecordWriter,
    scratch: Vec<u8>,
    pca: Option<std::sync::Arc<PcaModel>>,
}

impl ShardWriter {
    /// Start writing `final_path`.
    ///
    /// # Errors
    /// IO errors creating the temporary file.
    pub fn create(final_path: &Path, header: ShardHeader) -> Result<Self> {
        let records = RecordWriter::create(final_path, &header.encode(), header.num_slots(), "shard")?;
        Ok(Self { header, records, scratch: Vec::new(), pca: None })
    }

    /// Encode with this fitted model (required for [`Codec::Pca`] shards).
    pub fn with_pca(mut self, model: Option<std::sync::Arc<PcaModel>>) -> Self {
        self.pca = model;
        self
    }

    /// Encode `values` (`tokens * dim` floats) with the shard's codec and
    /// store them in `slot` (`(image - first_image) * K + view`).
    ///
    /// # Errors
    /// An out-of-range or already written slot, a wrong number of values, or
    /// an IO error (e.g. a full disk).
    pub fn write(&mut self, slot: u64, values: &[f32]) -> Result<Entry> {
        let mut payload = std::mem::take(&mut self.scratch);
        payload.clear();
        self.encode_into(values, &mut payload)?;
        let e = self.write_encoded(slot, &payload);
        self.scratch = payload;
        e
    }

    /// Append the record of `values` (`tokens * dim` floats) in the shard's
    /// codec to `out`, without writing it: several threads may encode for
    /// one writer, which then stores the records with
    /// [`ShardWriter::write_encoded`].
    ///
    /// # Errors
    /// A wrong number of values, or a `pca` shard without its model.
    pub fn encode_into(&self, values: &[f32], out: &mut Vec<u8>) -> Result<()> {
        let expected = self.header.tokens as usize * self.header.dim as usize;
        if values.len() != expected {
            return Err(StoreError::OutOfRange(format!("record has {} values, the shard expects {expected}", values.len())));
        }
        self.header.codec.encode_with(self.pca.as_deref(), values, self.header.dim as usize, out)
    }

    /// Store a record made by [`ShardWriter::encode_into`] in `slot`.
    ///
    /// # Errors
    /// An out-of-range or already written slot, or an IO error.
    pub fn write_encoded(&mut self, slot: u64, payload: &[u8]) -> Result<Entry> {
        self.records.write(slot, payload)
    }

    /// Write the table and footer, fsync, and rename to the final path.
    /// Returns the final file size.
    ///
    /// # Errors
    /// IO errors; the temporary file is removed.
    pub fn finish(self) -> Result<u64> {
        Ok(self.records.finish()?.0)
    }
}

/// A memory-mapped, verified-at-open shard.
pub struct ShardReader {
    records: RecordFile,
    header: ShardHeader,
}

impl std::fmt::Debug for ShardReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardReader").field("path", &self.records.path()).field("header", &self.header).finish()
    }
}

impl ShardReader {
    /// Map `path` and check magic, versions, header, footer and table
    /// checksums (not the record payloads: see [`ShardReader::verify_records`]).
    ///
    /// # Errors
    /// IO errors or [`StoreError::Corrupt`] naming the byte offset.
    pub fn open(path: &Path) -> Result<Self> {
        let mmap = map_file(path, "shard")?;
        let header = ShardHeader::decode(path, &mmap)?;
        let corrupt = |offset: u64, what: String| StoreError::Corrupt { path: path.to_owned(), offset, what };
        // a damaged header could claim a record length past u32
        let record_len = header
            .record_len_u32()
            .ok_or_else(|| corrupt(36, format!("{} tokens x {} values do not make a valid record length", header.tokens, header.dim)))?;
        let fixed = header.codec.is_fixed_size();
        let records =
            RecordFile::open(path, mmap, header.num_slots(), |e| if fixed { e.length == record_len } else { e.length <= record_len })?;
        Ok(Self { records, header })
    }

    /// The header.
    pub fn header(&self) -> &ShardHeader {
        &self.header
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        self.records.path()
    }

    /// File size in bytes.
    pub fn file_len(&self) -> u64 {
        self.records.file_len()
    }

    /// The table entry of `slot` (`slot < num_slots`, checked by callers).
    pub fn entry(&self, slot: u64) -> Entry {
        self.records.entry(slot)
    }

    /// Zero-copy bytes of `slot`, or `None` when the slot is empty.
    pub fn record(&self, slot: u64) -> Option<&[u8]> {
        self.records.record(slot)
    }

    /// Zero-copy bytes of `slot` after checking their CRC-32C against the
    /// record table, or `None` when the slot is empty.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] naming the shard file and the record's byte
    /// offset when the checksum does not match.
    pub fn record_checked(&self, slot: u64) -> Result<Option<&[u8]>> {
        self.records.record_checked(slot, "record", "damaged targets")
    }

    /// Check the CRC of every record. Returns the problems found as
    /// `(slot, byte offset, description)`; empty when all is well.
    pub fn verify_records(&self) -> Vec<(u64, u64, String)> {
        self.records.verify_records("record")
    }

    /// Advise the kernel that the records will be read sequentially.
    pub fn advise_sequential(&self) {
        self.records.advise_sequential();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    use crate::records::FOOTER_LEN;

    fn header() -> ShardHeader {
        ShardHeader {
            codec: Codec::F32,
            shard_index: 3,
            views_per_image: 2,
            first_image: 6,
            num_images: 2,
            tokens: 5,
            dim: 3,
            store_id: [7; 12],
        }
    }

    fn write_sample(dir: &Path) -> PathBuf {
        let path = dir.join("shard-00003.bin");
        let mut w = ShardWriter::create(&path, header()).expect("create");
        for slot in [1u64, 0, 3] {
            let v: Vec<f32> = (0..15).map(|i| slot as f32 * 100.0 + i as f32).collect();
            w.write(slot, &v).expect("write");
        }
        w.finish().expect("finish");
        path
    }

    #[test]
    fn write_read_round_trip() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = write_sample(dir.path());
        let r = ShardReader::open(&path).expect("open");
        assert_eq!(*r.header(), header());
        assert!(r.record(2).is_none(), "slot 2 was never written");
        let rec = r.record(3).expect("slot 3");
        let mut out = [0f32; 15];
        assert!(Codec::F32.decode(rec, header().dim as usize, &mut out));
        assert_eq!(out[4], 304.0);
        assert!(r.verify_records().is_empty());
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1, "no temporary file left");
    }

    #[test]
    fn flipped_payload_byte_is_found() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = write_sample(dir.path());
        let off = ShardReader::open(&path).expect("open").entry(0).offset;
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[off as usize + 5] ^= 0x10;
        std::fs::write(&path, &bytes).expect("write");
        let r = ShardReader::open(&path).expect("header and table still fine");
        let bad = r.verify_records();
        assert_eq!(bad.len(), 1);
        assert_eq!((bad[0].0, bad[0].1), (0, off));
    }

    #[test]
    fn rejects_bad_magic_future_version_truncation_and_table_damage() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = write_sample(dir.path());
        let good = std::fs::read(&path).expect("read");
        let check = |bytes: Vec<u8>, needle: &str| {
            std::fs::write(&path, bytes).expect("write");
            let err = ShardReader::open(&path).expect_err("must fail").to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        };
        let mut b = good.clone();
        b[0] = b'X';
        check(b, "bad magic");
        let mut b = good.clone();
        b[8] = 9;
        check(b, "format version 9");
        check(good[..good.len() - 7].to_vec(), "footer");
        let mut b = good.clone();
        let n = b.len();
        b[n - FOOTER_LEN - 3] ^= 1;
        check(b, "record table checksum");
        let mut b = good.clone();
        b[20] ^= 1;
        check(b, "header checksum");
    }

    #[test]
    fn dropped_writer_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("s.bin");
        let mut w = ShardWriter::create(&path, header()).expect("create");
        w.write(0, &[0.0; 15]).expect("write");
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
    }
}
