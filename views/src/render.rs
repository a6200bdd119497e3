//! Rebuilding a view's pixels from its parameters.

use crate::RgbImage;
use crate::params::{ColorOp, ViewParams};
use crate::pil::{blend, contrast_mean, resize_bicubic, to_grayscale};

/// One colour operation prepared for fast application: brightness and
/// contrast are per-value maps (a 256-entry table of Pillow's blend);
/// saturation blends with the pixel's own gray level.
#[allow(clippy::large_enum_variant)] // a handful per view, on the stack
enum PreparedOp {
    Table([u8; 256]),
    Saturation(f32),
}

impl PreparedOp {
    fn new(op: ColorOp, factor: f32, mean: u8) -> Self {
        match op {
            ColorOp::Brightness => Self::Table(std::array::from_fn(|v| blend(0, v as u8, factor))),
            ColorOp::Contrast => Self::Table(std::array::from_fn(|v| blend(mean, v as u8, factor))),
            ColorOp::Saturation => Self::Saturation(factor),
        }
    }

    /// Apply to a row of RGB pixels in place.
    fn apply(&self, row: &mut [u8]) {
        match self {
            Self::Table(t) => row.iter_mut().for_each(|v| *v = t[usize::from(*v)]),
            Self::Saturation(f) => {
                for p in row.chunks_exact_mut(3) {
                    let g = to_grayscale([p[0], p[1], p[2]]);
                    p[0] = blend(g, p[0], *f);
                    p[1] = blend(g, p[1], *f);
                    p[2] = blend(g, p[2], *f);
                }
            }
        }
    }
}

/// The jittered, flipped and cropped image of a view, before resizing:
/// torchvision's `ColorJitter -> RandomHorizontalFlip -> crop` on a PIL image.
///
/// The colour operations are point-wise except that contrast blends with the
/// mean gray level of the *whole* image after the operations before it, so
/// that mean is computed over the full image and the operations are then
/// applied to the crop region only (flip and crop commute with point-wise
/// maps). The result is identical to jittering the full image first.
///
/// # Panics
/// If the image size differs from the one recorded in `params` or the crop
/// box lies outside the image; [`ViewParams`] from the sampler or a verified
/// store always fit.
pub fn render_crop(img: &RgbImage, params: &ViewParams) -> RgbImage {
    assert_eq!((img.width(), img.height()), (params.image_width, params.image_height), "image size differs from the view's recorded size");
    let c = params.crop;
    assert!(c.top + c.height <= img.height() && c.left + c.width <= img.width(), "crop box outside the image");
    let (w, cw) = (img.width() as usize, c.width as usize);
    let src = img.as_raw();

    // Mean gray level before the contrast op, over the whole image.
    let ci = params.jitter.iter().position(|(op, _)| *op == ColorOp::Contrast).unwrap_or(3);
    let before: Vec<PreparedOp> = params.jitter[..ci].iter().map(|&(op, f)| PreparedOp::new(op, f, 0)).collect();
    let mut row = vec![0u8; w * 3];
    let mut gray_sum = 0u64;
    for src_row in src.chunks_exact(w * 3) {
        let r: &[u8] = if before.is_empty() {
            src_row
        } else {
            row.copy_from_slice(src_row);
            before.iter().for_each(|op| op.apply(&mut row));
            &row
        };
        gray_sum += r.chunks_exact(3).map(|p| u64::from(to_grayscale([p[0], p[1], p[2]]))).sum::<u64>();
    }
    let mean = contrast_mean(gray_sum, (w * img.height() as usize) as u64);
    let ops: Vec<PreparedOp> = params.jitter.iter().map(|&(op, f)| PreparedOp::new(op, f, mean)).collect();

    // Crop in original coordinates, jitter, flip.
    let x0 = if params.flip { w - c.left as usize - cw } else { c.left as usize };
    let mut out = vec![0u8; cw * c.height as usize * 3];
    for (y, dst) in out.chunks_exact_mut(cw * 3).enumerate() {
        let start = ((c.top as usize + y) * w + x0) * 3;
        dst.copy_from_slice(&src[start..start + cw * 3]);
        ops.iter().for_each(|op| op.apply(dst));
        if params.flip {
            let (mut i, mut j) = (0, cw - 1);
            while i < j {
                for k in 0..3 {
                    dst.swap(i * 3 + k, j * 3 + k);
                }
                i += 1;
                j -= 1;
            }
        }
    }
    RgbImage::from_raw(c.width, c.height, out).expect("buffer size matches")
}

/// A view's pixels at `size x size`: [`render_crop`] then Pillow bicubic.
pub fn render_view(img: &RgbImage, params: &ViewParams, size: u32) -> RgbImage {
    resize_bicubic(&render_crop(img, params), size, size)
}

/// torchvision's `ToTensor()` then `Normalize(mean, std)`, in `f32`:
/// `((v / 255) - mean[c]) / std[c]`, written channel-major (CHW) into `out`.
///
/// # Panics
/// If `out` is not `3 * width * height` long.
pub fn normalize_chw(img: &RgbImage, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    let plane = (img.width() * img.height()) as usize;
    assert_eq!(out.len(), 3 * plane, "output buffer must hold 3 x H x W floats");
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, p) in img.as_raw().chunks_exact(3).enumerate() {
        r[i] = (f32::from(p[0]) / 255.0 - mean[0]) / std[0];
        g[i] = (f32::from(p[1]) / 255.0 - mean[1]) / std[1];
        b[i] = (f32::from(p[2]) / 255.0 - mean[2]) / std[2];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::CropBox;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7 % 256) as u8, (y * 5 % 256) as u8, ((x + y) % 256) as u8]))
    }

    /// The straightforward order: jitter the full image, flip it, crop.
    fn reference_crop(img: &RgbImage, p: &ViewParams) -> RgbImage {
        let mut full = img.clone();
        for &(op, f) in &p.jitter {
            let n = u64::from(full.width()) * u64::from(full.height());
            let mean = contrast_mean(full.pixels().map(|q| u64::from(to_grayscale(q.0))).sum(), n);
            let prepared = PreparedOp::new(op, f, mean);
            prepared.apply(&mut full);
        }
        if p.flip {
            image::imageops::flip_horizontal_in_place(&mut full);
        }
        image::imageops::crop_imm(&full, p.crop.left, p.crop.top, p.crop.width, p.crop.height).to_image()
    }

    #[test]
    fn region_jitter_equals_full_image_jitter() {
        let img = gradient(61, 47);
        for (order, flip) in [("bcs", false), ("csb", true), ("sbc", true), ("scb", false)] {
            let p = ViewParams::from_parts(61, 47, order, 1.3, 0.7, 1.2, flip, CropBox { top: 5, left: 9, height: 30, width: 40 })
                .expect("valid order");
            assert_eq!(render_crop(&img, &p), reference_crop(&img, &p), "order {order} flip {flip}");
        }
    }

    #[test]
    fn normalize_layout() {
        let img = RgbImage::from_pixel(2, 1, image::Rgb([255, 0, 51]));
        let mut out = vec![0.0; 6];
        normalize_chw(&img, [0.5; 3], [0.5; 3], &mut out);
        assert_eq!(out, vec![1.0, 1.0, -1.0, -1.0, -0.6, -0.6]);
    }
}
