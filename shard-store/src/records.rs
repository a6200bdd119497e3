//! The record container that shard files and image packs share (FORMAT.md):
//! a 64-byte header of the file's own kind, then records at 64-byte
//! offsets, a table of `(offset, length, CRC-32C)` per slot and a 32-byte
//! footer, each checksummed with CRC-32C. Written beside the final name
//! and renamed into place when finished; read through a memory map.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Result, StoreError, io};
use crate::fs::{sync_dir, temporary_beside};

/// Magic at the end of every file of records.
pub const FOOTER_MAGIC: [u8; 8] = *b"CAE2END\0";
/// Header size in bytes.
pub const HEADER_LEN: usize = 64;
/// Footer size in bytes.
pub const FOOTER_LEN: usize = 32;
/// Size of one record-table entry.
pub const ENTRY_LEN: usize = 16;
/// Alignment of every record payload (and of the table: 8).
pub const RECORD_ALIGN: u64 = 64;

/// A header of `kind` (`shard`, `image pack`) with its frame, which every
/// record file shares: `magic` at 0..8, `version` at 8..12, `store_id` at
/// 48..60 and the CRC-32C of bytes 0..60 at 60..64; `fields` writes the
/// kind's own bytes 12..48.
pub(crate) fn frame_header(magic: &[u8; 8], version: u32, store_id: &[u8; 12], fields: impl FnOnce(&mut [u8])) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(magic);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    fields(&mut h[12..48]);
    h[48..60].copy_from_slice(store_id);
    let crc = crc32c::crc32c(&h[..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Check the frame of the header at the start of `bytes` (a file of
/// `kind`): its length, magic, version and CRC, in that order. Returns the
/// header's 64 bytes.
pub(crate) fn check_header<'a>(path: &Path, bytes: &'a [u8], magic: &[u8; 8], version: u32, kind: &str) -> Result<&'a [u8]> {
    let corrupt = |offset: u64, what: String| StoreError::Corrupt { path: path.to_owned(), offset, what };
    if bytes.len() < HEADER_LEN {
        return Err(corrupt(0, format!("file is {} bytes, shorter than the {HEADER_LEN}-byte header", bytes.len())));
    }
    let h = &bytes[..HEADER_LEN];
    if h[0..8] != magic[..] {
        return Err(corrupt(0, format!("bad magic: not a caev2 {kind}")));
    }
    let found = u32_le(h, 8);
    if found != version {
        return Err(StoreError::UnsupportedVersion { path: path.to_owned(), found, supported: version });
    }
    if u32_le(h, 60) != crc32c::crc32c(&h[..60]) {
        return Err(corrupt(60, "header checksum mismatch".into()));
    }
    Ok(h)
}

/// The little-endian u32 at byte `o` of `b`.
pub(crate) fn u32_le(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// The little-endian u64 at byte `o` of `b`.
pub(crate) fn u64_le(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3], b[o + 4], b[o + 5], b[o + 6], b[o + 7]])
}

/// The 12-byte store id of a header.
pub(crate) fn store_id_of(h: &[u8]) -> [u8; 12] {
    let mut id = [0u8; 12];
    id.copy_from_slice(&h[48..60]);
    id
}

/// One record-table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry {
    /// Byte offset of the payload in the file (0 = slot empty).
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

/// Writes records to a temporary file beside `final_path`; nothing is
/// visible under the final name until [`RecordWriter::finish`]. Dropping
/// an unfinished writer deletes the temporary file.
pub(crate) struct RecordWriter {
    final_path: PathBuf,
    /// What the file is, for error messages (`shard`, `image pack`).
    kind: &'static str,
    out: BufWriter<tempfile::NamedTempFile>,
    pos: u64,
    entries: Vec<Entry>,
    /// CRC-32C of every byte written so far.
    crc: u32,
}

impl RecordWriter {
    /// Start `final_path` with `header` and `slots` empty slots.
    pub(crate) fn create(final_path: &Path, header: &[u8; HEADER_LEN], slots: u64, kind: &'static str) -> Result<Self> {
        let tmp = temporary_beside(final_path)?;
        let mut w = Self {
            final_path: final_path.to_owned(),
            kind,
            out: BufWriter::with_capacity(1 << 20, tmp),
            pos: 0,
            entries: vec![Entry::default(); usize::try_from(slots).unwrap_or(usize::MAX)],
            crc: 0,
        };
        w.put(header, "write header")?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8], op: &'static str) -> Result<()> {
        self.out.write_all(bytes).map_err(io(&self.final_path, op))?;
        self.crc = crc32c::crc32c_append(self.crc, bytes);
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Store `payload` in `slot`.
    ///
    /// # Errors
    /// An out-of-range or already written slot, an empty payload, or an IO
    /// error (e.g. a full disk).
    pub(crate) fn write(&mut self, slot: u64, payload: &[u8]) -> Result<Entry> {
        let n = self.entries.len();
        let kind = self.kind;
        let entry =
            self.entries.get(slot as usize).ok_or_else(|| StoreError::OutOfRange(format!("slot {slot} outside {kind} of {n} slots")))?;
        if entry.is_present() {
            return Err(StoreError::OutOfRange(format!("slot {slot} of the {kind} written twice")));
        }
        let length = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l > 0)
            .ok_or_else(|| StoreError::OutOfRange(format!("slot {slot}: a record of {} bytes (1 to 2^32 - 1)", payload.len())))?;
        let aligned = self.pos.next_multiple_of(RECORD_ALIGN);
        let pad = [0u8; RECORD_ALIGN as usize];
        self.put(&pad[..(aligned - self.pos) as usize], "write record")?;
        self.put(payload, "write record")?;
        let e = Entry { offset: aligned, length, crc: crc32c::crc32c(payload) };
        self.entries[slot as usize] = e;
        Ok(e)
    }

    /// Write the table and footer, fsync, and rename to the final path.
    /// Returns the file's size and the CRC-32C of all its bytes.
    ///
    /// # Errors
    /// IO errors; the temporary file is removed.
    pub(crate) fn finish(mut self) -> Result<(u64, u32)> {
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
        self.put(&tail, "write record table")?;
        let (path, kind, size, crc) = (self.final_path, self.kind, self.pos, self.crc);
        let tmp = self.out.into_inner().map_err(|e| StoreError::Io { path: path.clone(), op: "flush", source: e.into_error() })?;
        tmp.as_file().sync_all().map_err(io(&path, "fsync"))?;
        tmp.persist(&path).map_err(|e| StoreError::Io {
            path: path.clone(),
            op: if kind == "shard" { "rename shard into place" } else { "rename image pack into place" },
            source: e.error,
        })?;
        sync_dir(path.parent().unwrap_or(Path::new(".")))?;
        Ok((size, crc))
    }
}

/// Map `path` (a write-once file of this store) for reading.
pub(crate) fn map_file(path: &Path, kind: &'static str) -> Result<Mmap> {
    let file = File::open(path).map_err(io(path, if kind == "shard" { "open shard" } else { "open image pack" }))?;
    // SAFETY: store files are write-once (written beside their name and
    // renamed), so the mapped file is never modified or truncated by caev2.
    unsafe { Mmap::map(&file) }.map_err(io(path, "mmap"))
}

/// A memory-mapped file of records whose footer and table were checked.
pub(crate) struct RecordFile {
    path: PathBuf,
    mmap: Mmap,
    slots: u64,
    table_offset: usize,
}

impl RecordFile {
    /// Check the footer and the record table of `mmap` (`slots` entries,
    /// as the header says), and that every entry lies in the data area,
    /// 64-byte aligned, with a length `length_ok` accepts.
    pub(crate) fn open(path: &Path, mmap: Mmap, slots: u64, length_ok: impl Fn(&Entry) -> bool) -> Result<Self> {
        let corrupt = |offset: u64, what: String| StoreError::Corrupt { path: path.to_owned(), offset, what };
        let len = mmap.len();
        if len < HEADER_LEN + FOOTER_LEN {
            return Err(corrupt(len as u64, "file too short for header and footer (truncated?)".into()));
        }
        let f = &mmap[len - FOOTER_LEN..];
        let fo = (len - FOOTER_LEN) as u64;
        if f[24..32] != FOOTER_MAGIC {
            return Err(corrupt(fo + 24, "bad footer magic (truncated or unfinished file)".into()));
        }
        let footer_crc = u32::from_le_bytes([f[20], f[21], f[22], f[23]]);
        if footer_crc != crc32c::crc32c(&f[..20]) {
            return Err(corrupt(fo + 20, "footer checksum mismatch".into()));
        }
        let table_offset = u64::from_le_bytes(f[0..8].try_into().map_err(|_| corrupt(fo, "short footer".into()))?);
        let num_slots = u64::from_le_bytes(f[8..16].try_into().map_err(|_| corrupt(fo, "short footer".into()))?);
        let table_crc = u32::from_le_bytes([f[16], f[17], f[18], f[19]]);
        if num_slots != slots {
            return Err(corrupt(fo + 8, format!("footer says {num_slots} slots, header implies {slots}")));
        }
        let table_end = num_slots.checked_mul(ENTRY_LEN as u64).and_then(|n| table_offset.checked_add(n));
        if table_end != Some(fo) || table_offset < HEADER_LEN as u64 {
            return Err(corrupt(fo, format!("record table at {table_offset} with {num_slots} entries does not end at the footer")));
        }
        let table = &mmap[table_offset as usize..fo as usize];
        if crc32c::crc32c(table) != table_crc {
            return Err(corrupt(table_offset, "record table checksum mismatch".into()));
        }
        let file = Self { path: path.to_owned(), mmap, slots, table_offset: table_offset as usize };
        for slot in 0..num_slots {
            let e = file.entry(slot);
            if e.is_present()
                && (!length_ok(&e)
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
        Ok(file)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn file_len(&self) -> u64 {
        self.mmap.len() as u64
    }

    /// CRC-32C of the whole file, from the map.
    pub(crate) fn file_crc32c(&self) -> u32 {
        crc32c::crc32c(&self.mmap)
    }

    /// The table entry of `slot` (`slot < slots`, checked by callers).
    pub(crate) fn entry(&self, slot: u64) -> Entry {
        let o = self.table_offset + slot as usize * ENTRY_LEN;
        let b = &self.mmap[o..o + ENTRY_LEN];
        Entry {
            offset: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            length: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            crc: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }

    /// Zero-copy bytes of `slot`, or `None` when the slot is empty or past
    /// the table.
    pub(crate) fn record(&self, slot: u64) -> Option<&[u8]> {
        if slot >= self.slots {
            return None;
        }
        let e = self.entry(slot);
        e.is_present().then(|| &self.mmap[e.offset as usize..(e.offset + u64::from(e.length)) as usize])
    }

    /// [`RecordFile::record`] after checking the CRC-32C; a mismatch names
    /// the file, the byte offset, `what` the record is and what the damage
    /// means (`damage`).
    pub(crate) fn record_checked(&self, slot: u64, what: &str, damage: &str) -> Result<Option<&[u8]>> {
        let Some(bytes) = self.record(slot) else { return Ok(None) };
        let e = self.entry(slot);
        if crc32c::crc32c(bytes) != e.crc {
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                offset: e.offset,
                what: format!("slot {slot}: {what} checksum mismatch ({damage}; run `caev2 inspect verify`)"),
            });
        }
        Ok(Some(bytes))
    }

    /// The CRC problems of every record, as `(slot, byte offset, what)`.
    pub(crate) fn verify_records(&self, what: &str) -> Vec<(u64, u64, String)> {
        let mut bad = Vec::new();
        for slot in 0..self.slots {
            let e = self.entry(slot);
            if let Some(bytes) = self.record(slot)
                && crc32c::crc32c(bytes) != e.crc
            {
                bad.push((slot, e.offset, format!("slot {slot}: {what} checksum mismatch")));
            }
        }
        bad
    }

    pub(crate) fn advise_sequential(&self) {
        let _ = self.mmap.advise(memmap2::Advice::Sequential);
    }
}
