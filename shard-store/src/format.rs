//! The store format's names and versions (FORMAT.md), at the bottom of the
//! crate so that every layer, errors included, can name them.

/// The store format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The `format` field of every manifest.
pub const FORMAT_NAME: &str = "caev2-store";
/// Name of the manifest file in a store folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The oldest store format version this build still reads.
pub const OLDEST_SUPPORTED_VERSION: u32 = 1;
