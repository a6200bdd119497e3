//! Augmented views for CAE v2, in one implementation shared by the target
//! extractor and the trainer.
//!
//! A *view* is everything needed to turn an original image into the pixels a
//! network sees (REFERENCE.md, "Augmentation"): colour-jitter factors and their
//! order, horizontal flip, the crop box on the flipped image, and the output
//! sizes. The released CAE v2 code applies, with torchvision on PIL images,
//! `ColorJitter(0.4, 0.4, 0.4) -> RandomHorizontalFlip(0.5) ->
//! RandomResizedCrop(scale 0.4-1, ratio 3/4-4/3, bicubic)` and produces the
//! student and the teacher input from the same crop box.
//!
//! * [`ViewSampler`] draws [`ViewParams`] deterministically from
//!   `(seed, image id, view number)` with the torchvision distributions.
//! * [`decode_image`] reads what ImageNet really contains (CMYK, grayscale,
//!   PNG named `.JPEG`, palettes, alpha, 16-bit, EXIF orientation).
//! * [`render_crop`] + [`Crop::resize`] (or [`resize_bicubic`]) rebuild the pixels. They reproduce
//!   Pillow's integer algorithms bit for bit (ImageEnhance blends in `f32`,
//!   `convert("L")` with 16-bit fixed-point weights, the two-pass fixed-point
//!   bicubic resampler), so the pixels equal what torchvision computes on the
//!   same decoded image; `tests/pil_parity.rs` checks that against Pillow.
//! * [`normalize_chw`] is `ToTensor()` + `Normalize(mean, std)` in `f32`.
//!
//! Everything is integer or IEEE `f32`/`f64` arithmetic with a fixed order of
//! operations and no platform-dependent intrinsics, so a view rebuilt by the
//! trainer is bit-identical to the one the extractor fed the teacher. The
//! hot loops are also compiled for AVX2 and chosen at run time; vector
//! integer sums and IEEE `f32` operations (never fused into FMAs) give the
//! same bits as the scalar build, which the unit tests check.

mod decode;
mod params;
mod pil;
mod render;
mod rng;
mod sampler;

pub use decode::{DECODER_ID, DecodeError, DecodedImage, decode_image, decode_image_bytes};
pub use params::{ColorOp, CropBox, Interpolation, ViewParams, ViewSettings};
pub use pil::{blend, contrast_mean, resize_bicubic, to_grayscale};
pub use render::{Crop, normalize_chw, render_crop, render_view};
pub use rng::SplitMix64;
pub use sampler::ViewSampler;

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
pub type RgbImage = image::RgbImage;

/// One pixel of an [`RgbImage`].
pub type RgbPixel = image::Rgb<u8>;
