//! Shard files: a header, 64-byte-aligned target records, a record table and
//! a footer, each checksummed with CRC-32C. See FORMAT.md.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::codec::Codec;
use crate::error::{Result, StoreError, io};
use crate::fs::{sync_dir, temporary_beside};
use crate::pca::PcaModel;

/// Magic at the start of every shard.
pub const SHARD_MAGIC: [u8; 8] = *b"CAE2SHRD";
/// Magic at the end of every shard.
pub const FOOTER_MAGIC: [u8; 8] = *b"CAE2END\0";
/// Shard format version.
pub const SHARD_VERSION: u32 = 1;
/// Header size in bytes.
pub const HEADER_LEN: usize = 64;
/// Footer size in bytes.
pub const FOOTER_LEN: usize = 32;
/// Size of one record-table entry.
pub const ENTRY_LEN: usize = 16;
/// Alignment of every record payload (and of the table: 8).
pub const RECORD_ALIGN: u64 = 64;

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
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&SHARD_MAGIC);
        h[8..12].copy_from_slice(&SHARD_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.codec.id().to_le_bytes());
        h[16..20].copy_from_slice(&self.shard_index.to_le_bytes());
        h[20..24].copy_from_slice(&self.views_per_image.to_le_bytes());
        h[24..32].copy_from_slice(&self.first_image.to_le_bytes());
        h[32..36].copy_from_slice(&self.num_images.to_le_bytes());
        h[36..40].copy_from_slice(&self.tokens.to_le_bytes());
        h[40..44].copy_from_slice(&self.dim.to_le_bytes());
        // 44..48 reserved, zero
        h[48..60].copy_from_slice(&self.store_id);
        let crc = crc32c::crc32c(&h[..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        h
    }

    fn decode(path: &Path, h: &[u8]) -> Result<Self> {
        let corrupt = |offset: u64, what: String| StoreError::Corrupt { path: path.to_owned(), offset, what };
        if h.len() < HEADER_LEN {
            return Err(corrupt(0, format!("file is {} bytes, shorter than the {HEADER_LEN}-byte header", h.len())));
        }
        if h[0..8] != SHARD_MAGIC {
            return Err(corrupt(0, "bad magic: not a caev2 shard".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let version = u32_at(8);
        if version != SHARD_VERSION {
            return Err(StoreError::UnsupportedVersion { path: path.to_owned(), found: version, supported: SHARD_VERSION });
        }
        let crc = u32_at(60);
        if crc != crc32c::crc32c(&h[..60]) {
            return Err(corrupt(60, "header checksum mismatch".into()));
        }
        let codec = Codec::from_id(u32_at(12)).ok_or_else(|| corrupt(12, format!("unknown codec id {}", u32_at(12))))?;
        let mut store_id = [0u8; 12];
        store_id.copy_from_slice(&h[48..60]);
        Ok(Self {
            codec,
            shard_index: u32_at(16),
            views_per_image: u32_at(20),
            first_image: u64::from_le_bytes(h[24..32].try_into().map_err(|_| corrupt(24, "short".into()))?),
            num_images: u32_at(32),
            tokens: u32_at(36),
            dim: u32_at(40),
            store_id,
        })
    }
}

/// One record-table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry {
    /// Byte offset of the payload in the shard file (0 = slot empty).
    pub offset: u64,
    /// Payload length in bytes (0 = slot empty).
    pub length: u32,
    /// CRC-32C of the payload.
    pub crc: u32,
}

impl Entry {
    /// Whether the slot holds a record (a skipped image leaves it empty).
    pub fn is_present(&self) -> bool {
        self.length != 0
    }
}

/// Writes one shard to a temporary file beside its final name; nothing is
/// visible under the final name until [`ShardWriter::finish`] has fsynced
/// and renamed it. Dropping an unfinished writer deletes the temporary file.
pub struct ShardWriter {
    header: ShardHeader,
    final_path: PathBuf,
    out: BufWriter<tempfile::NamedTempFile>,
    pos: u64,
    entries: Vec<Entry>,
    scratch: Vec<u8>,
    pca: Option<std::sync::Arc<PcaModel>>,
}

impl ShardWriter {
    /// Start writing `final_path`.
    ///
    /// # Errors
    /// IO errors creating the temporary file.
    pub fn create(final_path: &Path, header: ShardHeader) -> Result<Self> {
        let tmp = temporary_beside(final_path)?;
        let mut out = BufWriter::with_capacity(1 << 20, tmp);
        out.write_all(&header.encode()).map_err(io(final_path, "write shard header"))?;
        Ok(Self {
            header,
            final_path: final_path.to_owned(),
            out,
            pos: HEADER_LEN as u64,
            entries: vec![Entry::default(); header.num_slots() as usize],
            scratch: Vec::new(),
            pca: None,
        })
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
        let entry = self
            .entries
            .get(slot as usize)
            .ok_or_else(|| StoreError::OutOfRange(format!("slot {slot} outside shard of {} slots", self.header.num_slots())))?;
        if entry.is_present() {
            return Err(StoreError::OutOfRange(format!("slot {slot} written twice")));
        }
        let aligned = self.pos.next_multiple_of(RECORD_ALIGN);
        let pad = [0u8; RECORD_ALIGN as usize];
        let e = Entry { offset: aligned, length: payload.len() as u32, crc: crc32c::crc32c(payload) };
        self.out.write_all(&pad[..(aligned - self.pos) as usize]).map_err(io(&self.final_path, "write shard record"))?;
        self.out.write_all(payload).map_err(io(&self.final_path, "write shard record"))?;
        self.pos = aligned + u64::from(e.length);
        self.entries[slot as usize] = e;
        Ok(e)
    }

    /// Write the table and footer, fsync, and rename to the final path.
    /// Returns the final file size.
    ///
    /// # Errors
    /// IO errors; the temporary file is removed.
    pub fn finish(mut self) -> Result<u64> {
        let table_offset = self.pos.next_multiple_of(8);
        let mut tail = vec![0u8; (table_offset - self.pos) as usize];
        let table_start = tail.len();
        for e in &self.entries {
            tail.extend_from_slice(&e.offset.to_le_bytes());
            tail.extend_from_slice(&e.length.to_le_bytes());
            tail.extend_from_slice(&e.crc.to_le_bytes());
        }
        let table_crc = crc32c::crc32c(&tail[table_start..]);
        let footer_start = tail.len();
        tail.extend_from_slice(&table_offset.to_le_bytes());
        tail.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        tail.extend_from_slice(&table_crc.to_le_bytes());
        let footer_crc = crc32c::crc32c(&tail[footer_start..]);
        tail.extend_from_slice(&footer_crc.to_le_bytes());
        tail.extend_from_slice(&FOOTER_MAGIC);
        let path = self.final_path.clone();
        self.out.write_all(&tail).map_err(io(&path, "write shard table"))?;
        let tmp = self.out.into_inner().map_err(|e| StoreError::Io { path: path.clone(), op: "flush shard", source: e.into_error() })?;
        tmp.as_file().sync_all().map_err(io(&path, "fsync shard"))?;
        let size = table_offset + tail.len() as u64 - table_start as u64;
        tmp.persist(&path).map_err(|e| StoreError::Io { path: path.clone(), op: "rename shard into place", source: e.error })?;
        sync_dir(path.parent().unwrap_or(Path::new(".")))?;
        Ok(size)
    }
}

/// A memory-mapped, verified-at-open shard.
pub struct ShardReader {
    path: PathBuf,
    mmap: Mmap,
    header: ShardHeader,
    table_offset: usize,
}

impl std::fmt::Debug for ShardReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardReader").field("path", &self.path).field("header", &self.header).finish()
    }
}

impl ShardReader {
    /// Map `path` and check magic, versions, header, footer and table
    /// checksums (not the record payloads: see [`ShardReader::verify_records`]).
    ///
    /// # Errors
    /// IO errors or [`StoreError::Corrupt`] naming the byte offset.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(io(path, "open shard"))?;
        // SAFETY: shards are write-once (written beside their name and
        // renamed), so the mapped file is never modified or truncated by caev2.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io(path, "mmap shard"))?;
        let header = ShardHeader::decode(path, &mmap)?;
        let corrupt = |offset: u64, what: String| StoreError::Corrupt { path: path.to_owned(), offset, what };
        let len = mmap.len();
        if len < HEADER_LEN + FOOTER_LEN {
            return Err(corrupt(len as u64, "file too short for header and footer (truncated?)".into()));
        }
        let f = &mmap[len - FOOTER_LEN..];
        let fo = (len - FOOTER_LEN) as u64;
        if f[24..32] != FOOTER_MAGIC {
            return Err(corrupt(fo + 24, "bad footer magic (truncated or unfinished shard)".into()));
        }
        let footer_crc = u32::from_le_bytes([f[20], f[21], f[22], f[23]]);
        if footer_crc != crc32c::crc32c(&f[..20]) {
            return Err(corrupt(fo + 20, "footer checksum mismatch".into()));
        }
        let table_offset = u64::from_le_bytes(f[0..8].try_into().map_err(|_| corrupt(fo, "short footer".into()))?);
        let num_slots = u64::from_le_bytes(f[8..16].try_into().map_err(|_| corrupt(fo, "short footer".into()))?);
        let table_crc = u32::from_le_bytes([f[16], f[17], f[18], f[19]]);
        if num_slots != header.num_slots() {
            return Err(corrupt(fo + 8, format!("footer says {num_slots} slots, header implies {}", header.num_slots())));
        }
        let table_end = num_slots.checked_mul(ENTRY_LEN as u64).and_then(|n| table_offset.checked_add(n));
        if table_end != Some(fo) || table_offset < HEADER_LEN as u64 {
            return Err(corrupt(fo, format!("record table at {table_offset} with {num_slots} entries does not end at the footer")));
        }
        let table = &mmap[table_offset as usize..fo as usize];
        if crc32c::crc32c(table) != table_crc {
            return Err(corrupt(table_offset, "record table checksum mismatch".into()));
        }
        let reader = Self { path: path.to_owned(), mmap, header, table_offset: table_offset as usize };
        let record_len = header
            .record_len_u32()
            .ok_or_else(|| corrupt(36, format!("{} tokens x {} values do not make a valid record length", header.tokens, header.dim)))?;
        for slot in 0..num_slots {
            let e = reader.entry(slot);
            let length_ok = if header.codec.is_fixed_size() { e.length == record_len } else { e.length <= record_len };
            if e.is_present()
                && (!length_ok
                    || e.offset < HEADER_LEN as u64
                    || e.offset.checked_add(u64::from(e.length)).is_none_or(|end| end > table_offset)
                    || !e.offset.is_multiple_of(RECORD_ALIGN))
            {
                return Err(corrupt(
                    table_offset + slot * ENTRY_LEN as u64,
                    format!("slot {slot}: record at {} of {} bytes is outside the data area or misaligned", e.offset, e.length),
                ));
            }
        }
        Ok(reader)
    }

    /// The header.
    pub fn header(&self) -> &ShardHeader {
        &self.header
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// File size in bytes.
    pub fn file_len(&self) -> u64 {
        self.mmap.len() as u64
    }

    /// The table entry of `slot` (`slot < num_slots`, checked by callers).
    pub fn entry(&self, slot: u64) -> Entry {
        let o = self.table_offset + slot as usize * ENTRY_LEN;
        let b = &self.mmap[o..o + ENTRY_LEN];
        Entry {
            offset: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            length: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            crc: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }

    /// Zero-copy bytes of `slot`, or `None` when the slot is empty.
    pub fn record(&self, slot: u64) -> Option<&[u8]> {
        if slot >= self.header.num_slots() {
            return None;
        }
        let e = self.entry(slot);
        e.is_present().then(|| &self.mmap[e.offset as usize..(e.offset + u64::from(e.length)) as usize])
    }

    /// Zero-copy bytes of `slot` after checking their CRC-32C against the
    /// record table, or `None` when the slot is empty.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] naming the shard file and the record's byte
    /// offset when the checksum does not match.
    pub fn record_checked(&self, slot: u64) -> Result<Option<&[u8]>> {
        let Some(bytes) = self.record(slot) else { return Ok(None) };
        let e = self.entry(slot);
        if crc32c::crc32c(bytes) != e.crc {
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                offset: e.offset,
                what: format!("slot {slot}: record checksum mismatch (damaged targets; run `caev2 inspect verify`)"),
            });
        }
        Ok(Some(bytes))
    }

    /// Check the CRC of every record. Returns the problems found as
    /// `(slot, byte offset, description)`; empty when all is well.
    pub fn verify_records(&self) -> Vec<(u64, u64, String)> {
        let mut bad = Vec::new();
        for slot in 0..self.header.num_slots() {
            let e = self.entry(slot);
            if let Some(bytes) = self.record(slot)
                && crc32c::crc32c(bytes) != e.crc
            {
                bad.push((slot, e.offset, format!("slot {slot}: record checksum mismatch")));
            }
        }
        bad
    }

    /// Advise the kernel that the records will be read sequentially.
    pub fn advise_sequential(&self) {
        let _ = self.mmap.advise(memmap2::Advice::Sequential);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
