//! The store format's names and versions (FORMAT.md), at the bottom of the
//! crate so that every layer, errors included, can name them.

/// The newest store format version this build writes and reads: 2, a
/// store that carries its images (version 1 otherwise, which this build
/// still writes for stores without them).
pub const FORMAT_VERSION: u32 = 2;
/// The version of a store without embedded images.
pub const PLAIN_FORMAT_VERSION: u32 = 1;
/// The version of a store with embedded images (`images: "embedded"`).
pub const EMBEDDED_IMAGES_VERSION: u32 = 2;
/// The `format` field of every manifest.
pub const FORMAT_NAME: &str = "caev2-store";
/// Name of the manifest file in a store folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The oldest store format version this build still reads.
pub const OLDEST_SUPPORTED_VERSION: u32 = 1;
