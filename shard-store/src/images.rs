//! Image packs (`images/shard-NNNNN.bin`, format version 2): the original
//! file bytes of one shard's images, one record per image in the record
//! container of `records.rs`, so that a store carries its images and a
//! trainer needs no image folder. The bytes are the files' own (never
//! re-encoded): the views rebuild from them bit for bit with the same
//! decoder. See FORMAT.md.

use std::path::Path;

use crate::error::{Result, StoreError};
use crate::records::{HEADER_LEN, RecordFile, RecordWriter, check_header, frame_header, map_file, store_id_of, u32_le, u64_le};

/// Magic at the start of every image pack.
pub const IMAGES_MAGIC: [u8; 8] = *b"CAE2IMGS";
/// Image pack version.
pub const IMAGES_VERSION: u32 = 1;

/// The fixed fields of an image pack's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImagePackHeader {
    /// Shard number in the store.
    pub shard_index: u32,
    /// Id of the shard's first image.
    pub first_image: u64,
    /// Images in the shard (one slot each).
    pub num_images: u32,
    /// The store's id (manifest `store_id`).
    pub store_id: [u8; 12],
}

impl ImagePackHeader {
    fn encode(&self) -> [u8; HEADER_LEN] {
        frame_header(&IMAGES_MAGIC, IMAGES_VERSION, &self.store_id, |f| {
            // bytes 12..48 of the header; 28..48 reserved, zero
            f[0..4].copy_from_slice(&self.shard_index.to_le_bytes());
            f[4..12].copy_from_slice(&self.first_image.to_le_bytes());
            f[12..16].copy_from_slice(&self.num_images.to_le_bytes());
        })
    }

    fn decode(path: &Path, bytes: &[u8]) -> Result<Self> {
        let h = check_header(path, bytes, &IMAGES_MAGIC, IMAGES_VERSION, "image pack")?;
        Ok(Self { shard_index: u32_le(h, 12), first_image: u64_le(h, 16), num_images: u32_le(h, 24), store_id: store_id_of(h) })
    }
}

/// Writes one shard's image pack beside its final name (nothing visible
/// there until [`ImagePackWriter::finish`]).
pub struct ImagePackWriter {
    header: ImagePackHeader,
    records: RecordWriter,
}

impl ImagePackWriter {
    /// Start writing `final_path`.
    ///
    /// # Errors
    /// IO errors creating the temporary file.
    pub fn create(final_path: &Path, header: ImagePackHeader) -> Result<Self> {
        Ok(Self { header, records: RecordWriter::create(final_path, &header.encode(), u64::from(header.num_images), "image pack")? })
    }

    /// Store the file bytes of image `image_id` (of this shard).
    ///
    /// # Errors
    /// An image outside the shard or written twice, an empty or 4 GiB file,
    /// IO errors.
    pub fn write(&mut self, image_id: u64, bytes: &[u8]) -> Result<()> {
        let slot = image_id
            .checked_sub(self.header.first_image)
            .ok_or_else(|| StoreError::OutOfRange(format!("image {image_id} is before shard {}'s first image", self.header.shard_index)))?;
        self.records.write(slot, bytes).map(|_| ())
    }

    /// Write the table and footer, fsync and rename into place. Returns the
    /// file's size and the CRC-32C of all its bytes (for the shard report).
    ///
    /// # Errors
    /// IO errors; the temporary file is removed.
    pub fn finish(self) -> Result<(u64, u32)> {
        self.records.finish()
    }
}

/// A memory-mapped image pack, checked at open (header, footer, table).
pub struct ImagePackReader {
    header: ImagePackHeader,
    records: RecordFile,
}

impl std::fmt::Debug for ImagePackReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImagePackReader").field("path", &self.records.path()).field("header", &self.header).finish()
    }
}

impl ImagePackReader {
    /// Map `path` and check its header, footer and record table, and that
    /// the header is `expect`'s (the shard the manifest implies).
    ///
    /// # Errors
    /// IO errors, [`StoreError::Corrupt`] naming the byte offset, or a pack
    /// of another shard or store.
    pub fn open(path: &Path, expect: &ImagePackHeader) -> Result<Self> {
        let mmap = map_file(path, "image pack")?;
        let header = ImagePackHeader::decode(path, &mmap)?;
        if header != *expect {
            return Err(StoreError::Corrupt {
                path: path.to_owned(),
                offset: 0,
                what: format!("header {header:?} does not match the manifest (expected {expect:?}); image pack from another store?"),
            });
        }
        let records = RecordFile::open(path, mmap, u64::from(header.num_images), |_| true)?;
        Ok(Self { header, records })
    }

    /// The header.
    pub fn header(&self) -> &ImagePackHeader {
        &self.header
    }

    /// File size in bytes.
    pub fn file_len(&self) -> u64 {
        self.records.file_len()
    }

    /// CRC-32C of the whole file (the shard report's `images_crc32c`).
    pub fn file_crc32c(&self) -> u32 {
        self.records.file_crc32c()
    }

    /// The file bytes of image `image_id`, zero-copy, after checking their
    /// CRC-32C; `None` for an image that is not in the pack (one that could
    /// not be decoded at extraction).
    ///
    /// # Errors
    /// An image outside the shard, or [`StoreError::Corrupt`] naming the
    /// pack and the byte offset when the checksum does not match.
    pub fn image(&self, image_id: u64) -> Result<Option<&[u8]>> {
        let slot = image_id
            .checked_sub(self.header.first_image)
            .filter(|&s| s < u64::from(self.header.num_images))
            .ok_or_else(|| StoreError::OutOfRange(format!("image {image_id} is not in shard {}", self.header.shard_index)))?;
        self.records.record_checked(slot, "image", "damaged image bytes")
    }

    /// Image ids with bytes in the pack, in order.
    pub fn present(&self) -> impl Iterator<Item = u64> + '_ {
        (0..u64::from(self.header.num_images)).filter(|&s| self.records.entry(s).is_present()).map(|s| self.header.first_image + s)
    }

    /// The CRC problems of every image, as `(image id, byte offset, what)`.
    pub fn verify(&self) -> Vec<(u64, u64, String)> {
        self.records.verify_records("image").into_iter().map(|(slot, off, what)| (self.header.first_image + slot, off, what)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> ImagePackHeader {
        ImagePackHeader { shard_index: 2, first_image: 10, num_images: 3, store_id: [9; 12] }
    }

    fn write(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("shard-00002.bin");
        let mut w = ImagePackWriter::create(&path, header()).expect("create");
        w.write(12, b"third image").expect("write");
        w.write(10, b"first").expect("write");
        assert!(w.write(9, b"x").is_err(), "an image of another shard");
        assert!(w.write(10, b"again").is_err(), "written twice");
        let (size, crc) = w.finish().expect("finish");
        let bytes = std::fs::read(&path).expect("read");
        assert_eq!((size, crc), (bytes.len() as u64, crc32c::crc32c(&bytes)));
        path
    }

    #[test]
    fn round_trip_and_checks() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = write(dir.path());
        let r = ImagePackReader::open(&path, &header()).expect("open");
        assert_eq!(r.image(10).expect("ok"), Some(&b"first"[..]));
        assert_eq!(r.image(11).expect("ok"), None, "never written: a skipped image");
        assert_eq!(r.image(12).expect("ok"), Some(&b"third image"[..]));
        assert!(r.image(13).is_err());
        assert_eq!(r.present().collect::<Vec<_>>(), vec![10, 12]);
        assert!(r.verify().is_empty());
        let other = ImagePackHeader { store_id: [1; 12], ..header() };
        assert!(ImagePackReader::open(&path, &other).expect_err("other store").to_string().contains("another store"));

        // a flipped byte of an image is found where it is read, naming the offset
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[64 + 2] ^= 4;
        std::fs::write(&path, &bytes).expect("write");
        let r = ImagePackReader::open(&path, &header()).expect("table intact");
        let e = r.image(12).expect_err("damaged").to_string();
        assert!(e.contains("image checksum mismatch") && e.contains("byte 64"), "{e}");
        assert_eq!(r.verify().len(), 1);
        bytes[20] ^= 1;
        std::fs::write(&path, &bytes).expect("write");
        assert!(ImagePackReader::open(&path, &header()).expect_err("header").to_string().contains("header checksum"));
    }
}
