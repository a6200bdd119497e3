//! Decoding the images ImageNet really contains.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageReader, Limits};

use crate::RgbImage;

/// Largest decoded image accepted, in pixels (a 16k x 16k photo). Larger
/// files are skipped rather than allowed to exhaust memory.
pub const MAX_PIXELS: u64 = 16_384 * 16_384;

/// Why an image could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The bytes are not an image in a supported format, or are corrupt.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        reason: String,
    },
}

/// A decoded image as RGB8 plus what was found in the file.
#[derive(Debug)]
pub struct DecodedImage {
    /// Pixels after EXIF orientation (when applied) and conversion to RGB8.
    pub rgb: RgbImage,
    /// The container format found from the bytes (not the file name).
    pub format: &'static str,
    /// The colour type stored in the file, e.g. `L8`, `Rgba8`, `Rgb16`.
    pub color: String,
}

/// Read and decode the file at `path`; see [`decode_image_bytes`].
///
/// # Errors
/// [`DecodeError::Io`] when the file cannot be read, [`DecodeError::Invalid`]
/// when its contents are not a decodable image.
pub fn decode_image(path: &Path, apply_exif_orientation: bool) -> Result<DecodedImage, DecodeError> {
    let bytes = std::fs::read(path).map_err(|source| DecodeError::Io { path: path.to_owned(), source })?;
    decode_image_bytes(&bytes, path, apply_exif_orientation)
}

/// Decode image bytes to RGB8. The format is detected from the content, so a
/// PNG named `.JPEG` decodes. Grayscale is replicated to three channels,
/// alpha is dropped (as Pillow's `convert("RGB")` does), palettes are
/// expanded, 16-bit samples are rounded to 8 bits, CMYK JPEGs are converted
/// by the decoder, and the EXIF orientation is applied when asked.
///
/// # Errors
/// [`DecodeError::Invalid`] naming `path` and the decoder's reason.
pub fn decode_image_bytes(bytes: &[u8], path: &Path, apply_exif_orientation: bool) -> Result<DecodedImage, DecodeError> {
    let invalid = |reason: String| DecodeError::Invalid { path: path.to_owned(), reason };
    if bytes.is_empty() {
        return Err(invalid("empty file".into()));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| invalid(format!("cannot read: {e}")))?;
    let format = match reader.format() {
        Some(f) => f,
        None => return Err(invalid("not a recognised image format".into())),
    };
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_PIXELS * 8);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| invalid(format!("{format:?}: {e}")))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(invalid(format!("{format:?}: image has zero size {w}x{h}")));
    }
    if u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(invalid(format!("{format:?}: {w}x{h} exceeds the {MAX_PIXELS}-pixel limit")));
    }
    let orientation = if apply_exif_orientation { decoder.orientation().ok() } else { None };
    let color = format!("{:?}", decoder.color_type());
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| invalid(format!("{format:?}: {e}")))?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    let rgb = match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    };
    Ok(DecodedImage { rgb, format: format_name(format), color })
}

fn format_name(f: image::ImageFormat) -> &'static str {
    f.extensions_str().first().copied().unwrap_or("unknown")
}

/// Identity of the decoder stack, recorded in store manifests: JPEG decoding
/// can differ by a level between decoders, so a store built with one decoder
/// only rebuilds bit for bit with the same one. Bump it with the `image`
/// pin in the workspace `Cargo.toml`.
pub const DECODER_ID: &str = "image 0.25.10 (zune-jpeg, png)";
