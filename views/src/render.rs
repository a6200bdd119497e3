//! Rebuilding a view's pixels from its parameters.

use crate::RgbImage;
use crate::params::{ColorOp, ViewParams};
#[cfg(doc)]
use crate::pil::resize_bicubic;
use crate::pil::{Pixels, blend, contrast_mean, resize, to_grayscale};

/// A sequence of colour operations prepared for one pass over the pixels:
/// a per-value map, then at most one saturation blend, then another map.
///
/// Brightness and contrast are per-value maps (256-entry tables of Pillow's
/// blend), and consecutive maps compose into one. Saturation blends a value
/// with its pixel's gray level: a 256 x 256 table indexed by
/// `(gray, value)`. Every entry is the `f32` blend Pillow computes, so the
/// tables change nothing but speed. ColorJitter draws each operation once,
/// so a sequence never holds two saturations. Maps that are the identity
/// are skipped.
struct Jitter<'t> {
    pre: Option<[u8; 256]>,
    saturation: Option<&'t [[u8; 256]; 256]>,
    post: Option<[u8; 256]>,
}

/// Pillow's saturation blend of every value `v` with every gray level `g`,
/// as `table[g][v]`.
#[inline(always)]
fn saturation_table(factor: f32) -> Box<[[u8; 256]; 256]> {
    let mut t = Box::new([[0u8; 256]; 256]);
    for g in 0..256 {
        for v in 0..256 {
            t[g][v] = blend(g as u8, v as u8, factor);
        }
    }
    t
}

impl<'t> Jitter<'t> {
    /// The operations `ops` in order, with the contrast mean `mean` and the
    /// saturation table of their saturation factor (used when they hold one).
    #[inline(always)]
    fn prepare(ops: &[(ColorOp, f32)], mean: u8, saturation: &'t [[u8; 256]; 256]) -> Self {
        let mut j = Jitter { pre: None, saturation: None, post: None };
        for &(op, factor) in ops {
            let base = match op {
                ColorOp::Saturation => {
                    j.saturation = Some(saturation);
                    continue;
                }
                ColorOp::Contrast => mean,
                ColorOp::Brightness => 0,
            };
            let map = if j.saturation.is_some() { &mut j.post } else { &mut j.pre };
            let map = map.get_or_insert(std::array::from_fn(|v| v as u8));
            for v in map.iter_mut() {
                *v = blend(base, *v, factor);
            }
        }
        j
    }

    /// Map the RGB pixels `src` and write pixel `i` at `dst[i * stride..]`
    /// (pixel order reversed when `flip`; nothing written when `WRITE` is
    /// false), returning the sum of the results' gray levels when `GRAY`.
    /// One monomorphic loop per combination of steps, so the loops carry no
    /// branches and the identity steps cost nothing.
    #[inline(always)]
    fn run<const GRAY: bool, const WRITE: bool>(&self, src: &[u8], dst: &mut [u8], stride: usize, flip: bool) -> u64 {
        let (pre, sat, post) = (self.pre.as_ref(), self.saturation, self.post.as_ref());
        match (pre, sat, post, flip) {
            (None, None, None, _) if !WRITE => gray_sum(src),
            (p, s, q, false) => map_pixels::<GRAY, WRITE, false>(src, dst, stride, p, s, q),
            (p, s, q, true) => map_pixels::<GRAY, WRITE, true>(src, dst, stride, p, s, q),
        }
    }
}

/// The per-pixel loop of [`Jitter::run`], specialised on which steps exist.
#[inline(always)]
fn map_pixels<const GRAY: bool, const WRITE: bool, const FLIP: bool>(
    src: &[u8],
    dst: &mut [u8],
    stride: usize,
    pre: Option<&[u8; 256]>,
    sat: Option<&[[u8; 256]; 256]>,
    post: Option<&[u8; 256]>,
) -> u64 {
    // A scalar loop (table lookups do not vectorise): the gray sum is a u64
    // as cheap as a u32 here. Iterators over the pixels and over the output
    // positions (every `stride` bytes) keep bounds checks out of the loop.
    macro_rules! body {
        ($pre:expr, $sat:expr, $post:expr) => {{
            let mut total = 0u64;
            macro_rules! each {
                ($pixels:expr) => {
                    if WRITE {
                        for (p, d) in $pixels.zip(dst.chunks_mut(stride)) {
                            let q = $post($sat($pre([p[0], p[1], p[2]])));
                            if GRAY {
                                total += u64::from(to_grayscale(q));
                            }
                            d[..3].copy_from_slice(&q);
                        }
                    } else {
                        for p in $pixels {
                            total += u64::from(to_grayscale($post($sat($pre([p[0], p[1], p[2]])))));
                        }
                    }
                };
            }
            if FLIP {
                each!(src.chunks_exact(3).rev())
            } else {
                each!(src.chunks_exact(3))
            }
            total
        }};
    }
    let id = |q: [u8; 3]| q;
    match (pre, sat, post) {
        (None, None, None) => body!(id, id, id),
        (Some(p), None, None) => body!(|q| map3(p, q), id, id),
        (None, Some(s), None) => body!(id, |q| blend3(s, q), id),
        (Some(p), Some(s), None) => body!(|q| map3(p, q), |q| blend3(s, q), id),
        (None, Some(s), Some(t)) => body!(id, |q| blend3(s, q), |q| map3(t, q)),
        (Some(p), Some(s), Some(t)) => body!(|q| map3(p, q), |q| blend3(s, q), |q| map3(t, q)),
        // `prepare` keeps a post map only after a saturation; mapped all the same
        (p, None, Some(t)) => body!(|q| p.map_or(q, |p| map3(p, q)), id, |q| map3(t, q)),
    }
}

#[inline(always)]
fn map3(t: &[u8; 256], q: [u8; 3]) -> [u8; 3] {
    q.map(|v| t[usize::from(v)])
}

#[inline(always)]
fn blend3(t: &[[u8; 256]; 256], q: [u8; 3]) -> [u8; 3] {
    let row = &t[usize::from(to_grayscale(q))];
    q.map(|v| row[usize::from(v)])
}

/// Sum of the gray levels of RGB pixels.
#[inline(always)]
fn gray_sum(px: &[u8]) -> u64 {
    let mut total = 0u64;
    for run in px.chunks(3 << 16) {
        let mut sum = 0u32;
        for i in 0..run.len() / 3 {
            sum += u32::from(to_grayscale([run[3 * i], run[3 * i + 1], run[3 * i + 2]]));
        }
        total += u64::from(sum);
    }
    total
}

/// The jittered, flipped and cropped pixels of a view, before resizing:
/// torchvision's `ColorJitter -> RandomHorizontalFlip -> crop` on a PIL
/// image. They are kept column after column, the order the resampler's
/// horizontal pass reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crop {
    width: u32,
    height: u32,
    columns: Vec<u8>,
}

impl Crop {
    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// Pillow bicubic resize to `out_w x out_h` ([`resize_bicubic`]).
    pub fn resize(&self, out_w: u32, out_h: u32) -> RgbImage {
        if (self.width, self.height) == (out_w, out_h) {
            return self.to_image();
        }
        resize(Pixels::Columns(&self.columns), self.width, self.height, out_w, out_h)
    }

    /// The pixels as an image (row after row).
    pub fn to_image(&self) -> RgbImage {
        RgbImage::from_fn(self.width, self.height, |x, y| {
            let i = ((x * self.height + y) * 3) as usize;
            image::Rgb([self.columns[i], self.columns[i + 1], self.columns[i + 2]])
        })
    }
}

/// The jittered, flipped and cropped pixels of a view, before resizing.
///
/// The colour operations are point-wise except that contrast blends with the
/// mean gray level of the *whole* image after the operations before it, so
/// one pass over the full image applies the operations before contrast and
/// sums the gray levels, keeping the crop region; the operations from
/// contrast on are then applied to the crop only (flip and crop commute with
/// point-wise maps). The result is identical to jittering the full image
/// first.
///
/// # Panics
/// If the image size differs from the one recorded in `params` or the crop
/// box lies outside the image; [`ViewParams`] from the sampler or a verified
/// store always fit.
pub fn render_crop(img: &RgbImage, params: &ViewParams) -> Crop {
    assert_eq!((img.width(), img.height()), (params.image_width, params.image_height), "image size differs from the view's recorded size");
    let c = params.crop;
    assert!(c.top + c.height <= img.height() && c.left + c.width <= img.width(), "crop box outside the image");
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { render_crop_avx2(img, params) };
    }
    render_crop_impl(img, params)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn render_crop_avx2(img: &RgbImage, params: &ViewParams) -> Crop {
    render_crop_impl(img, params)
}

#[inline(always)]
fn render_crop_impl(img: &RgbImage, params: &ViewParams) -> Crop {
    let c = params.crop;
    let (w, h, cw, ch) = (img.width() as usize, img.height() as usize, c.width as usize, c.height as usize);
    let top = c.top as usize;
    let src = img.as_raw();
    let factor = params.jitter.iter().find(|(op, _)| *op == ColorOp::Saturation).map_or(1.0, |&(_, f)| f);
    let saturation = saturation_table(factor);

    // The operations before contrast over the whole image, summing gray
    // levels; the crop region is written column by column into `columns`.
    let ci = params.jitter.iter().position(|(op, _)| *op == ColorOp::Contrast).unwrap_or(3);
    let before = Jitter::prepare(&params.jitter[..ci], 0, &saturation);
    let x0 = if params.flip { w - c.left as usize - cw } else { c.left as usize };
    let mut columns = vec![0u8; cw * ch * 3];
    let mut gray = 0u64;
    for (y, row) in src.chunks_exact(w * 3).enumerate() {
        if (top..top + ch).contains(&y) {
            let (left, rest) = row.split_at(x0 * 3);
            let (mid, right) = rest.split_at(cw * 3);
            gray += before.run::<true, false>(left, &mut [], 0, false);
            gray += before.run::<true, true>(mid, &mut columns[(y - top) * 3..], ch * 3, params.flip);
            gray += before.run::<true, false>(right, &mut [], 0, false);
        } else {
            gray += before.run::<true, false>(row, &mut [], 0, false);
        }
    }
    let mean = contrast_mean(gray, (w * h) as u64);

    // The operations from contrast on, over the crop in place.
    let after = Jitter::prepare(&params.jitter[ci..], mean, &saturation);
    let mut chunk = [0u8; 3 * 1024];
    for part in columns.chunks_mut(chunk.len()) {
        let from = &mut chunk[..part.len()];
        from.copy_from_slice(part);
        after.run::<false, true>(from, part, 3, false);
    }
    Crop { width: c.width, height: c.height, columns }
}

/// A view's pixels at `size x size`: [`render_crop`] then Pillow bicubic.
pub fn render_view(img: &RgbImage, params: &ViewParams, size: u32) -> RgbImage {
    render_crop(img, params).resize(size, size)
}

/// torchvision's `ToTensor()` then `Normalize(mean, std)`, in `f32`:
/// `((v / 255) - mean[c]) / std[c]`, written channel-major (CHW) into `out`.
///
/// # Panics
/// If `out` is not `3 * width * height` long.
pub fn normalize_chw(img: &RgbImage, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    let plane = (img.width() * img.height()) as usize;
    assert_eq!(out.len(), 3 * plane, "output buffer must hold 3 x H x W floats");
    // the same f32 arithmetic, done once per value and channel
    let table: [[f32; 256]; 3] = std::array::from_fn(|c| std::array::from_fn(|v| (v as f32 / 255.0 - mean[c]) / std[c]));
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (((p, r), g), b) in img.as_raw().chunks_exact(3).zip(r).zip(g).zip(b) {
        *r = table[0][usize::from(p[0])];
        *g = table[1][usize::from(p[1])];
        *b = table[2][usize::from(p[2])];
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
            for p in full.pixels_mut() {
                let g = to_grayscale(p.0);
                p.0 = p.0.map(|v| match op {
                    ColorOp::Brightness => blend(0, v, f),
                    ColorOp::Contrast => blend(mean, v, f),
                    ColorOp::Saturation => blend(g, v, f),
                });
            }
        }
        if p.flip {
            image::imageops::flip_horizontal_in_place(&mut full);
        }
        image::imageops::crop_imm(&full, p.crop.left, p.crop.top, p.crop.width, p.crop.height).to_image()
    }

    #[test]
    fn region_jitter_equals_full_image_jitter() {
        let img = gradient(61, 47);
        for (order, flip) in [("bcs", false), ("bsc", true), ("cbs", true), ("csb", true), ("sbc", true), ("scb", false)] {
            let p = ViewParams::from_parts(61, 47, order, 1.3, 0.7, 1.2, flip, CropBox { top: 5, left: 9, height: 30, width: 40 })
                .expect("valid order");
            assert_eq!(render_crop(&img, &p).to_image(), reference_crop(&img, &p), "order {order} flip {flip}");
            assert_eq!(render_crop_impl(&img, &p).to_image(), reference_crop(&img, &p), "order {order} flip {flip}, no AVX2");
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
