//! The caev2 feature store: teacher targets for many augmented views per
//! image, in memory-mapped, sharded, checksummed files with a Parquet index.
//!
//! The on-disk format (versions 1 and 2) is specified byte by byte in
//! `FORMAT.md` next to this crate. In short: a store folder has a
//! `manifest.json` that records what makes its targets comparable (teacher,
//! view settings and seed, codec, dataset, layout); `shards/` holds
//! write-once shard files (header, 64-byte aligned records, record table,
//! footer; CRC-32C everywhere); `index/` holds one Parquet file per shard
//! with a row per stored view and all its parameters; `done/` marks
//! committed shards. A version 2 store also carries its images: `images/`
//! holds one image pack per shard with the files' own bytes
//! ([`ImagePackReader`], [`Store::image`]).
//!
//! * Writing: [`StoreWriter`] creates or reopens a store (refusing one made
//!   with other settings), hands out [`ShardClaim`]s under exclusive file
//!   locks so several processes can fill one store, and commits each shard
//!   atomically.
//! * Reading: [`Store`] maps shards lazily and gives [`TargetsRef`]s by
//!   `(image, view)` in O(1) or streams all views in storage order.
//! * [`PcaModel`] is the `pca` codec's fitted model (principal axes, step,
//!   entropy tables), stored once per store beside the manifest; its
//!   records are coded by a 64-lane rANS that decodes in AVX-512 or AVX2
//!   (the private `rans` module).
//! * [`recode`] writes a store again with another codec, without the teacher.
//! * [`resample_grid`] maps targets between token grids (teacher 16x16 to
//!   student 14x14, say).
//!
//! Layers, each module using only those above it in this list (the
//! bottom of the crate first):
//!
//! 1. `format` (names and versions) and `error` (the typed errors);
//! 2. `fs`: local paths, file permissions, atomic commits of files and
//!    folders ([`write_file_atomic`], [`commit_folder`]);
//! 3. the codecs' mathematics, knowing nothing of files: `rans` (the
//!    entropy coder), `pca` (the fitted transform coder), `grid`;
//! 4. `codec` (a record's bytes for each codec) and `index` (a shard's
//!    Parquet rows);
//! 5. `records` (the container of records, table and footer that shard
//!    files and image packs share), then `shard` (one shard file: writer,
//!    memory-mapped reader) and `images` (one shard's image pack);
//! 6. `manifest` (a store's identity, the shard headers it implies);
//! 7. `store` (a store folder: claims, commits, reads) and `recode`.

mod codec;
mod error;
mod format;
mod fs;
mod grid;
mod images;
mod index;
mod manifest;
mod pca;
mod rans;
mod recode;
mod records;
mod shard;
mod store;

pub use codec::Codec;
pub use error::{Result, StoreError};
pub use format::{EMBEDDED_IMAGES_VERSION, FORMAT_VERSION, MANIFEST_FILE, OLDEST_SUPPORTED_VERSION, PLAIN_FORMAT_VERSION};
pub use fs::{check_local, commit_folder, write_file_atomic};
pub use grid::resample_grid;
pub use images::{ImagePackHeader, ImagePackReader, ImagePackWriter};
pub use index::{IndexRow, decode_index, encode_index, read_index, schema as index_schema};
pub use manifest::{CodecFit, DatasetInfo, Layout, Manifest, TeacherInfo, ViewsInfo, canonical_json};
pub use pca::{PcaFit, PcaModel, fit_sample_images};
pub use rans::decoder_name as pca_decoder_name;
pub use recode::{RecodeImages, Recoded, recode};
pub use records::{Entry, FOOTER_LEN, HEADER_LEN, RECORD_ALIGN};
pub use shard::{ShardHeader, ShardReader, ShardWriter};
pub use store::{ShardClaim, ShardReport, Skipped, Store, StorePaths, StoreWriter, TargetsRef, load_codec_model};
