//! Pillow's 8-bit image operations, reproduced bit for bit.
//!
//! These follow Pillow's C sources (`libImaging/Resample.c`, `Blend.c`,
//! `Convert.c`) and `ImageEnhance`/`ImageStat`. Each function documents the
//! exact arithmetic so that `shard-store/FORMAT.md` can refer to it.

use crate::RgbImage;

/// `PRECISION_BITS` of Pillow's 8-bit resampler.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic kernel with `a = -0.5`, evaluated in `f64`.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point coefficients of one resampling direction
/// (`precompute_coeffs` + `normalize_coeffs_8bpc`).
struct Coeffs {
    ksize: usize,
    /// `(first input index, number of taps)` per output index.
    bounds: Vec<(usize, usize)>,
    /// `ksize` coefficients per output index.
    kk: Vec<i32>,
}

fn precompute_coeffs(in_size: usize, out_size: usize) -> Coeffs {
    const SUPPORT: f64 = 2.0;
    // Pillow passes the box as C floats; in0 = 0, in1 = in_size.
    let in1 = in_size as f32;
    let scale = f64::from(in1) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, &kx) in k.iter().enumerate().take(n) {
            let v = if ww != 0.0 { kx / ww } else { kx };
            let scaled = v * f64::from(1u32 << PRECISION_BITS);
            kk[xx * ksize + x] = if v < 0.0 { (scaled - 0.5) as i32 } else { (scaled + 0.5) as i32 };
        }
        bounds.push((xmin, n));
    }
    Coeffs { ksize, bounds, kk }
}

#[inline(always)]
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resize an RGB image with Pillow's `Image.resize(size, Image.BICUBIC)`
/// (no `reducing_gap`): a horizontal pass into an intermediate 8-bit image
/// covering only the rows the vertical pass reads, then a vertical pass, each
/// with 22-bit fixed-point coefficients, rounding offset `1 << 21` and
/// clipping to `0..=255`. Returns a copy when the size is unchanged.
///
/// Both passes run as whole-row multiply-adds, which vectorise: the
/// horizontal pass works on the image's columns (a transposed copy; see
/// [`crate::Crop`], which is rendered column by column to skip it) and is
/// transposed back. Integer sums over the same taps make the result
/// identical to Pillow's per-pixel loops at any vector width; on x86-64 an
/// AVX2 build of the same code is chosen at run time.
pub fn resize_bicubic(src: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    if src.dimensions() == (out_w, out_h) {
        return src.clone();
    }
    resize(Pixels::Rows(src.as_raw()), src.width(), src.height(), out_w, out_h)
}

/// RGB pixels in one of two orders.
#[derive(Clone, Copy)]
pub(crate) enum Pixels<'a> {
    /// Row after row (an [`RgbImage`]).
    Rows(&'a [u8]),
    /// Column after column.
    Columns(&'a [u8]),
}

/// [`resize_bicubic`] of a `width x height` image in either order.
pub(crate) fn resize(src: Pixels<'_>, width: u32, height: u32, out_w: u32, out_h: u32) -> RgbImage {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { resize_avx2(src, width, height, out_w, out_h) };
    }
    resize_impl(src, width, height, out_w, out_h)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn resize_avx2(src: Pixels<'_>, width: u32, height: u32, out_w: u32, out_h: u32) -> RgbImage {
    resize_impl(src, width, height, out_w, out_h)
}

#[inline(always)]
fn resize_impl(src: Pixels<'_>, width: u32, height: u32, out_w: u32, out_h: u32) -> RgbImage {
    let (in_w, in_h) = (width as usize, height as usize);
    let (ow, oh) = (out_w as usize, out_h as usize);
    let vert = precompute_coeffs(in_h, oh);

    // Horizontal pass over the rows the vertical pass reads, as a pass over
    // columns, into `tmp` (rows from `row0`, row after row).
    let (tmp, row0) = if ow != in_w {
        let horiz = precompute_coeffs(in_w, ow);
        let first = vert.bounds[0].0;
        let last = vert.bounds[oh - 1].0 + vert.bounds[oh - 1].1;
        let rows = last - first;
        let mut tmp_t = vec![0u8; ow * rows * 3];
        match src {
            Pixels::Columns(px) => weighted_rows(px, in_h * 3, first * 3, rows * 3, &horiz, 0, &mut tmp_t),
            Pixels::Rows(px) => {
                let columns = transpose_rgb(&px[first * in_w * 3..last * in_w * 3], in_w, rows);
                weighted_rows(&columns, rows * 3, 0, rows * 3, &horiz, 0, &mut tmp_t);
            }
        }
        (transpose_rgb(&tmp_t, rows, ow), first)
    } else {
        match src {
            Pixels::Rows(px) => (px.to_vec(), 0),
            Pixels::Columns(px) => (transpose_rgb(px, in_h, in_w), 0),
        }
    };
    if oh == in_h {
        return RgbImage::from_raw(out_w, out_h, tmp).expect("buffer size matches");
    }
    let mut out = vec![0u8; oh * ow * 3];
    weighted_rows(&tmp, ow * 3, 0, ow * 3, &vert, row0, &mut out);
    RgbImage::from_raw(out_w, out_h, out).expect("buffer size matches")
}

/// One resampling pass along rows: input row `r` is the `len` bytes at
/// `r * stride + offset`. Output row `o` (`len` bytes) is the clipped sum
/// over its taps of input row `first - row0 + k` times the tap's
/// coefficient, plus the rounding offset. Plain index loops: they are
/// inlined into the AVX2 build and vectorise there.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // index loops over equal lengths vectorise
fn weighted_rows(input: &[u8], stride: usize, offset: usize, len: usize, c: &Coeffs, row0: usize, out: &mut [u8]) {
    let mut acc = vec![0i32; len];
    for o in 0..c.bounds.len() {
        let (first, n) = c.bounds[o];
        acc.fill(1i32 << (PRECISION_BITS - 1));
        for y in 0..n {
            let ky = c.kk[o * c.ksize + y];
            let start = (first - row0 + y) * stride + offset;
            let row = &input[start..start + len];
            for i in 0..len {
                acc[i] += i32::from(row[i]) * ky;
            }
        }
        let out_row = &mut out[o * len..(o + 1) * len];
        for i in 0..len {
            out_row[i] = clip8(acc[i]);
        }
    }
}

/// Transpose a `height x width` block of RGB pixels into `width x height`,
/// in tiles that stay in the cache.
#[inline(always)]
fn transpose_rgb(src: &[u8], width: usize, height: usize) -> Vec<u8> {
    const TILE: usize = 16;
    let mut dst = vec![0u8; src.len()];
    for y0 in (0..height).step_by(TILE) {
        let y1 = (y0 + TILE).min(height);
        for x0 in (0..width).step_by(TILE) {
            let x1 = (x0 + TILE).min(width);
            for y in y0..y1 {
                let row = &src[(y * width + x0) * 3..(y * width + x1) * 3];
                for (i, p) in row.chunks_exact(3).enumerate() {
                    let d = ((x0 + i) * height + y) * 3;
                    dst[d..d + 3].copy_from_slice(p);
                }
            }
        }
    }
    dst
}

/// Pillow's `Image.blend(a, b, alpha)` on 8-bit bands:
/// `a + alpha * (b - a)` in `f32`, truncated towards zero and clipped.
#[inline]
pub fn blend(a: u8, b: u8, alpha: f32) -> u8 {
    (f32::from(a) + alpha * ((i32::from(b) - i32::from(a)) as f32)) as u8
}

/// Pillow's `convert("L")` of one RGB pixel:
/// `(r*19595 + g*38470 + b*7471 + 0x8000) >> 16`.
#[inline]
pub fn to_grayscale(p: [u8; 3]) -> u8 {
    ((u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471 + 0x8000) >> 16) as u8
}

/// `int(ImageStat.Stat(image.convert("L")).mean[0] + 0.5)` given the sum of
/// the grayscale values and the number of pixels (the mean is a `f64`
/// division, as in Python).
pub fn contrast_mean(gray_sum: u64, pixels: u64) -> u8 {
    if pixels == 0 {
        return 0;
    }
    ((gray_sum as f64 / pixels as f64) + 0.5).floor() as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blend_matches_pillow_cases() {
        // brightness 1.4 on 200 saturates; 0.6 on 201 truncates 120.6 -> 120.
        assert_eq!(blend(0, 200, 1.4), 255);
        assert_eq!(blend(0, 201, 0.6), 120);
        // contrast below the mean with factor > 1 goes negative and clips.
        assert_eq!(blend(128, 10, 1.4), 0);
    }

    #[test]
    fn gray_weights() {
        assert_eq!(to_grayscale([255, 255, 255]), 255);
        assert_eq!(to_grayscale([0, 0, 0]), 0);
        assert_eq!(to_grayscale([255, 0, 0]), 76);
    }

    /// Pillow's per-pixel loops, written the straightforward way.
    fn reference_resize(src: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
        let (in_w, in_h) = (src.width() as usize, src.height() as usize);
        let (ow, oh) = (out_w as usize, out_h as usize);
        if (in_w, in_h) == (ow, oh) {
            return src.clone();
        }
        let (horiz, vert) = (precompute_coeffs(in_w, ow), precompute_coeffs(in_h, oh));
        let px = src.as_raw();
        let (tmp, tmp_w, row0) = if ow != in_w {
            let (first, last) = (vert.bounds[0].0, vert.bounds[oh - 1].0 + vert.bounds[oh - 1].1);
            let mut tmp = vec![0u8; (last - first) * ow * 3];
            for y in first..last {
                for (xx, &(xmin, n)) in horiz.bounds.iter().enumerate() {
                    for ch in 0..3 {
                        let mut ss = 1i32 << (PRECISION_BITS - 1);
                        for x in 0..n {
                            ss += i32::from(px[(y * in_w + xmin + x) * 3 + ch]) * horiz.kk[xx * horiz.ksize + x];
                        }
                        tmp[((y - first) * ow + xx) * 3 + ch] = clip8(ss);
                    }
                }
            }
            (tmp, ow, first)
        } else {
            (px.to_vec(), in_w, 0)
        };
        if oh == in_h {
            return RgbImage::from_raw(out_w, out_h, tmp).expect("size");
        }
        let mut out = vec![0u8; oh * tmp_w * 3];
        for (yy, &(ymin, n)) in vert.bounds.iter().enumerate() {
            for i in 0..tmp_w * 3 {
                let mut ss = 1i32 << (PRECISION_BITS - 1);
                for y in 0..n {
                    ss += i32::from(tmp[(ymin - row0 + y) * tmp_w * 3 + i]) * vert.kk[yy * vert.ksize + y];
                }
                out[yy * tmp_w * 3 + i] = clip8(ss);
            }
        }
        RgbImage::from_raw(out_w, out_h, out).expect("size")
    }

    #[test]
    fn vectorised_resize_equals_per_pixel_loops() {
        let mut rng = crate::SplitMix64::keyed(7, &[]);
        for (w, h) in [(1, 1), (2, 9), (37, 23), (500, 375), (97, 1031), (300, 300)] {
            let img = RgbImage::from_fn(w, h, |_, _| image::Rgb([rng.below(256) as u8, rng.below(256) as u8, rng.below(256) as u8]));
            for (ow, oh) in [(224, 224), (5, 7), (1, 1), (w, 224), (224, h), (w * 2 + 1, h / 2 + 1)] {
                assert_eq!(resize_bicubic(&img, ow, oh), reference_resize(&img, ow, oh), "{w}x{h} -> {ow}x{oh}");
                assert_eq!(
                    resize_impl(Pixels::Rows(img.as_raw()), w, h, ow, oh),
                    reference_resize(&img, ow, oh),
                    "{w}x{h} -> {ow}x{oh}, no AVX2"
                );
                let columns = transpose_rgb(img.as_raw(), w as usize, h as usize);
                if (w, h) != (ow, oh) {
                    assert_eq!(
                        resize(Pixels::Columns(&columns), w, h, ow, oh),
                        reference_resize(&img, ow, oh),
                        "{w}x{h} -> {ow}x{oh} by columns"
                    );
                }
            }
        }
    }

    #[test]
    fn resize_identity_and_constant() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([12, 200, 99]));
        let same = resize_bicubic(&img, 37, 23);
        assert_eq!(same, img);
        for (w, h) in [(224, 224), (5, 7), (1, 1), (37, 100)] {
            let out = resize_bicubic(&img, w, h);
            assert_eq!(out.dimensions(), (w, h));
            assert!(out.pixels().all(|p| p.0 == [12, 200, 99]), "constant image stays constant at {w}x{h}");
        }
    }
}
